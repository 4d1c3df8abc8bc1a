//! Loop devices, by ioctl: a free `/dev/loopN` from `/dev/loop-control`,
//! attached to a file in one `LOOP_CONFIGURE` (block size and direct I/O
//! set atomically, never autoclear: the device must outlive the agent
//! process), `LOOP_SET_CAPACITY` after the file grew, `LOOP_CLR_FD` only
//! when nobody uses the device, and the device of a backing file found
//! again after a restart.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
/// The loop driver's block major.
const LOOP_MAJOR: u32 = 7;

pub const LO_FLAGS_READ_ONLY: u32 = 1;
pub const LO_FLAGS_AUTOCLEAR: u32 = 4;
pub const LO_FLAGS_PARTSCAN: u32 = 8;
pub const LO_FLAGS_DIRECT_IO: u32 = 16;

/// `struct loop_info64`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LoopInfo64 {
    pub lo_device: u64,
    pub lo_inode: u64,
    pub lo_rdevice: u64,
    pub lo_offset: u64,
    pub lo_sizelimit: u64,
    pub lo_number: u32,
    pub lo_encrypt_type: u32,
    pub lo_encrypt_key_size: u32,
    pub lo_flags: u32,
    pub lo_file_name: [u8; 64],
    pub lo_crypt_name: [u8; 64],
    pub lo_encrypt_key: [u8; 32],
    pub lo_init: [u64; 2],
}

impl Default for LoopInfo64 {
    fn default() -> Self {
        Self {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; 64],
            lo_crypt_name: [0; 64],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        }
    }
}

/// `struct loop_config`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LoopConfig {
    pub fd: u32,
    pub block_size: u32,
    pub info: LoopInfo64,
    pub reserved: [u64; 8],
}

impl LoopConfig {
    /// Attach `fd` with `block_size` (0: 512), direct I/O if asked, the
    /// file's name (for `losetup -l`, truncated to 63 bytes).
    pub fn new(fd: u32, block_size: u32, direct_io: bool, name: &Path) -> Self {
        let mut c = LoopConfig {
            fd,
            block_size,
            ..Default::default()
        };
        if direct_io {
            c.info.lo_flags |= LO_FLAGS_DIRECT_IO;
        }
        let n = name.as_os_str().as_bytes();
        let l = n.len().min(63);
        c.info.lo_file_name[..l].copy_from_slice(&n[..l]);
        c
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Why a loop device was not detached.
#[derive(Debug)]
pub enum DetachError {
    /// Mounted or open by someone: nothing was changed.
    Busy,
    Io(io::Error),
}

/// One loop device, by number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Loop(pub u32);

impl Loop {
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/loop{}", self.0))
    }

    fn sys(&self) -> PathBuf {
        PathBuf::from(format!("/sys/block/loop{}", self.0))
    }

    /// The number of `/dev/loopN`.
    pub fn from_path(p: &Path) -> Option<Loop> {
        p.to_str()?
            .strip_prefix("/dev/loop")?
            .parse()
            .ok()
            .map(Loop)
    }

    /// Attaches `file` (open read-write, with O_DIRECT for direct I/O) to
    /// a free loop device in one `LOOP_CONFIGURE`. `name` is what `losetup
    /// -l` shows. Retries when another process takes the free device first.
    pub fn configure(
        file: &File,
        name: &Path,
        block_size: u32,
        direct_io: bool,
    ) -> io::Result<Loop> {
        let ctl = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/loop-control")?;
        let cfg = LoopConfig::new(file.as_raw_fd() as u32, block_size, direct_io, name);
        let mut last = None;
        for _ in 0..16 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a
            // device number (allocating the device if needed).
            let n = cvt(unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) })?;
            let lo = Loop(n as u32);
            lo.ensure_node()?;
            let dev = lo.open(false)?;
            // SAFETY: LOOP_CONFIGURE reads a struct loop_config from the
            // pointer, which points at a live value of that layout.
            let r =
                unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg as *const LoopConfig) };
            match cvt(r) {
                Ok(_) => return Ok(lo),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no free loop device")))
    }

    /// Makes `/dev/loopN` if the node is missing (a container without
    /// udev): its numbers come from sysfs.
    fn ensure_node(&self) -> io::Result<()> {
        let path = self.path();
        if path.exists() {
            return Ok(());
        }
        let dev = std::fs::read_to_string(self.sys().join("dev")).ok();
        let (major, minor) = dev
            .as_deref()
            .and_then(|d| d.trim().split_once(':'))
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            .unwrap_or((LOOP_MAJOR, self.0));
        let c = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: c is a NUL-terminated path that outlives the call.
        let r = unsafe {
            libc::mknod(
                c.as_ptr(),
                libc::S_IFBLK | 0o660,
                libc::makedev(major, minor),
            )
        };
        match cvt(r) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn open(&self, exclusive: bool) -> io::Result<File> {
        let mut flags = libc::O_CLOEXEC;
        if exclusive {
            flags |= libc::O_EXCL;
        }
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(self.path())
    }

    /// `LOOP_GET_STATUS64`; ENXIO when nothing is attached.
    pub fn status(&self) -> io::Result<LoopInfo64> {
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(self.path())?;
        status_of(&f)
    }

    /// The backing file's path as the kernel names it (sysfs), None when
    /// nothing is attached.
    pub fn backing_file(&self) -> Option<PathBuf> {
        let s = std::fs::read(self.sys().join("loop/backing_file")).ok()?;
        let s = s.strip_suffix(b"\n").unwrap_or(&s);
        (!s.is_empty()).then(|| PathBuf::from(std::ffi::OsStr::from_bytes(s)))
    }

    /// Whether the kernel runs the device with direct I/O.
    pub fn dio(&self) -> bool {
        std::fs::read_to_string(self.sys().join("loop/dio")).is_ok_and(|s| s.trim() == "1")
    }

    /// The device's size in bytes (sysfs).
    pub fn size(&self) -> io::Result<u64> {
        let s = std::fs::read_to_string(self.sys().join("size"))?;
        s.trim()
            .parse::<u64>()
            .map(|sectors| sectors * 512)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// The device's `major:minor` as a `dev_t`.
    pub fn rdev(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(std::fs::metadata(self.path())?.rdev())
    }

    /// Re-reads the backing file's size (`LOOP_SET_CAPACITY`).
    pub fn set_capacity(&self) -> io::Result<()> {
        let dev = self.open(false)?;
        // SAFETY: LOOP_SET_CAPACITY takes no argument.
        cvt(unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_CAPACITY, 0) }).map(|_| ())
    }

    /// Detaches the backing file unless the device is in use: mounted or
    /// claimed (our exclusive open fails), or open by anyone else (the
    /// kernel would only mark it to clear on last close: that is undone).
    /// Detached already is fine.
    pub fn detach(&self) -> Result<(), DetachError> {
        let dev = match self.open(true) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Err(DetachError::Busy),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(DetachError::Io(e)),
        };
        // SAFETY: LOOP_CLR_FD takes no argument.
        match cvt(unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD, 0) }) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(()),
            Err(e) => return Err(DetachError::Io(e)),
        }
        // Bound still: others have it open, and the kernel only set
        // autoclear. Take that back: the device stays as it was.
        if let Ok(mut info) = status_of(&dev) {
            info.lo_flags &= !LO_FLAGS_AUTOCLEAR;
            // SAFETY: LOOP_SET_STATUS64 reads a struct loop_info64 from the
            // pointer, which points at a live value of that layout.
            let r = unsafe {
                libc::ioctl(
                    dev.as_raw_fd(),
                    LOOP_SET_STATUS64,
                    &info as *const LoopInfo64,
                )
            };
            if let Err(e) = cvt(r) {
                tracing::warn!(device = %self.path().display(), error = %e,
                    "the busy loop device is left to clear itself on last close");
            }
            return Err(DetachError::Busy);
        }
        // Our descriptor is the last: closing it tears the device down.
        drop(dev);
        Ok(())
    }

    /// The loop device `file` is attached to (by sysfs backing file).
    pub fn find_by_backing(file: &Path) -> Option<Loop> {
        let dir = std::fs::read_dir("/sys/block").ok()?;
        dir.filter_map(|e| {
            let name = e.ok()?.file_name();
            let n: u32 = name.to_str()?.strip_prefix("loop")?.parse().ok()?;
            Some(Loop(n))
        })
        .find(|lo| lo.backing_file().as_deref() == Some(file))
    }
}

fn status_of(dev: &File) -> io::Result<LoopInfo64> {
    let mut info = LoopInfo64::default();
    // SAFETY: LOOP_GET_STATUS64 writes a struct loop_info64 to the pointer,
    // which points at a live, writable value of that layout.
    cvt(unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            LOOP_GET_STATUS64,
            &mut info as *mut LoopInfo64,
        )
    })?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn structs_match_linux_loop_h() {
        assert_eq!(size_of::<LoopInfo64>(), 232);
        assert_eq!(offset_of!(LoopInfo64, lo_number), 40);
        assert_eq!(offset_of!(LoopInfo64, lo_flags), 52);
        assert_eq!(offset_of!(LoopInfo64, lo_file_name), 56);
        assert_eq!(offset_of!(LoopInfo64, lo_init), 216);
        assert_eq!(size_of::<LoopConfig>(), 304);
        assert_eq!(offset_of!(LoopConfig, info), 8);
        assert_eq!(offset_of!(LoopConfig, reserved), 240);
    }

    #[test]
    fn config_sets_direct_io_and_a_bounded_name() {
        let long = "/x".repeat(50);
        let c = LoopConfig::new(5, 4096, true, Path::new(&long));
        assert_eq!((c.fd, c.block_size), (5, 4096));
        assert_eq!(c.info.lo_flags, LO_FLAGS_DIRECT_IO);
        assert_eq!(c.info.lo_flags & LO_FLAGS_AUTOCLEAR, 0, "never autoclear");
        assert_eq!(c.info.lo_file_name[63], 0, "NUL-terminated");
        assert_eq!(&c.info.lo_file_name[..2], b"/x");
        let c = LoopConfig::new(5, 0, false, Path::new("/f"));
        assert_eq!(c.info.lo_flags, 0);
    }

    #[test]
    fn device_numbers_from_paths() {
        assert_eq!(Loop::from_path(Path::new("/dev/loop12")), Some(Loop(12)));
        assert_eq!(Loop::from_path(Path::new("/dev/nbd0")), None);
        assert_eq!(Loop(3).path(), Path::new("/dev/loop3"));
    }
}
