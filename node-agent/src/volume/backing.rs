//! A backing device: where a volume's bytes live. Regular files and block
//! devices, positional I/O (`pread`/`pwrite`, callers run it off the async
//! reactor), `fdatasync` flush, trim, write-zeroes and allocation queries.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::Segment;
use super::span_locks::SpanLocks;
use crate::error::{AgentError, Result};

// Linux block-device ioctls (linux/fs.h).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// Alignment O_DIRECT needs on buffers, offsets and lengths when the kernel
/// does not say (`statx` without `STATX_DIOALIGN`): the largest common one.
const DIRECT_ALIGN: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    File,
    Block,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    ReadOnly,
    ReadWrite,
}

/// Largest single buffered write of the copier (see `write_bulk`).
const BULK_PIECE: usize = 128 << 10;

/// An open backing device. All methods are blocking; call them from a
/// blocking pool thread, never from the async reactor.
#[derive(Debug)]
pub struct BackingDevice {
    file: File,
    path: PathBuf,
    kind: DeviceKind,
    /// Grows when the device grew and [`refresh_size`](Self::refresh_size)
    /// is called; never shrinks.
    size: std::sync::atomic::AtomicU64,
    read_only: bool,
    direct: bool,
    /// (st_dev, st_ino) for files, (0, st_rdev) for block devices.
    identity: (u64, u64),
    /// The filesystem accepts `RWF_NOWAIT` writes (cleared at the first
    /// EOPNOTSUPP: ext4 on many kernels refuses them for buffered I/O).
    nowait_writes: std::sync::atomic::AtomicBool,
    /// Taken by bulk (copier) writes to a buffered file: see `write_bulk`.
    bulk: std::sync::Mutex<()>,
    /// O_DIRECT only: what keeps a read-modify-write of a partial span
    /// from undoing a concurrent write (see `span_locks`).
    spans: Option<std::sync::Arc<SpanLocks>>,
    /// O_DIRECT's alignment for this device (see [`dio_align`]).
    align: usize,
}

impl BackingDevice {
    /// Opens `path`. `direct` adds `O_DIRECT` (unaligned requests then go
    /// through an aligned bounce buffer).
    pub fn open(path: &Path, mode: OpenMode, direct: bool) -> Result<Self> {
        let open_err = |source| AgentError::Open {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(open_err)?;
        let ft = meta.file_type();
        let kind = if ft.is_file() {
            DeviceKind::File
        } else if ft.is_block_device() {
            DeviceKind::Block
        } else {
            return Err(AgentError::NotADevice {
                path: path.to_path_buf(),
            });
        };
        let mut opts = OpenOptions::new();
        opts.read(true);
        if mode == OpenMode::ReadWrite {
            opts.write(true);
        }
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(path).map_err(|e| match e.raw_os_error() {
            Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM)
                if mode == OpenMode::ReadWrite =>
            {
                AgentError::ReadOnly {
                    path: path.to_path_buf(),
                }
            }
            _ => open_err(e),
        })?;
        let size = match kind {
            DeviceKind::File => meta.len(),
            DeviceKind::Block => block_size_of(&file).map_err(open_err)?,
        };
        let align = if direct { dio_align(&file) } else { 1 };
        let identity = match kind {
            DeviceKind::File => (meta.dev(), meta.ino()),
            DeviceKind::Block => (0, meta.rdev()),
        };
        Ok(Self {
            file,
            path: path.to_path_buf(),
            kind,
            size: std::sync::atomic::AtomicU64::new(size),
            read_only: mode == OpenMode::ReadOnly,
            direct,
            identity,
            nowait_writes: std::sync::atomic::AtomicBool::new(true),
            bulk: std::sync::Mutex::new(()),
            spans: direct.then(|| SpanLocks::of(identity, align as u64)),
            align,
        })
    }

    /// A large write by the copier. A buffered write to a file holds the
    /// inode's lock for its whole memcpy, so parallel copier writes to one
    /// file gain nothing: they queue on that lock, spinning on it (on 2
    /// cores, that starved mirrored workload writes to 0 IOPS; see
    /// docs/BENCHMARKS.md). One bulk writer per buffered file at a time
    /// waits on a mutex instead, so a workload write to the same file waits
    /// for at most one copier write. O_DIRECT and block devices write in
    /// parallel.
    ///
    /// The write goes out in pieces of `BULK_PIECE`, so the inode lock is
    /// free between them and a workload write waits for one piece's
    /// memcpy, not a whole chunk's.
    ///
    /// Then the written range's writeback is started (see
    /// [`start_writeback`](Self::start_writeback)).
    pub fn write_bulk(&self, buf: &[u8], offset: u64) -> Result<()> {
        match self.bulk_turn() {
            None => self.write_at(buf, offset)?,
            Some(_one) => {
                for (i, piece) in buf.chunks(BULK_PIECE).enumerate() {
                    self.write_at(piece, offset + (i * BULK_PIECE) as u64)?;
                }
            }
        }
        self.start_writeback(offset, buf.len() as u64);
        Ok(())
    }

    /// Queues the pages of a range just written for writeback without
    /// waiting (`sync_file_range(SYNC_FILE_RANGE_WRITE)`). A copy at page
    /// cache speed otherwise leaves gigabytes dirty until the kernel's
    /// dirty limit throttles every writer of the machine, the workload
    /// first (4 GiB under load: its writes down to ~15% of its rate, 170 ms
    /// worst latency; see docs/BENCHMARKS.md). Durability still comes from
    /// the flush after every pass: this only starts the I/O early. Nothing
    /// to do for O_DIRECT.
    fn start_writeback(&self, offset: u64, length: u64) {
        if self.direct || length == 0 {
            return;
        }
        // SAFETY: a plain syscall on the fd of a live File, integer
        // arguments only; no memory is passed.
        let r = unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset as libc::off64_t,
                length as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if r != 0 {
            // Harmless: the pass's flush writes the pages back anyway.
            tracing::debug!(device = %self.name(), offset, length, error = %io::Error::last_os_error(),
                "starting writeback failed");
        }
    }

    /// `write_zeroes` for the copier, under the same rule as `write_bulk`.
    pub fn write_zeroes_bulk(&self, offset: u64, length: u64, may_trim: bool) -> Result<()> {
        let _one = self.bulk_turn();
        self.write_zeroes(offset, length, may_trim)
    }

    /// The bulk-writer turn of a buffered file; `None` for O_DIRECT files
    /// and block devices, which need none.
    fn bulk_turn(&self) -> Option<std::sync::MutexGuard<'_, ()>> {
        (self.kind == DeviceKind::File && !self.direct)
            // The mutex guards no data: a poisoned one is as good.
            .then(|| self.bulk.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn name(&self) -> String {
        self.path.display().to_string()
    }

    pub fn kind(&self) -> DeviceKind {
        self.kind
    }

    pub fn size(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Reads the device's size again (a file or block device that grew,
    /// e.g. a backing volume expanded underneath) and returns it. A device
    /// that shrank is an error and keeps its old size: the bytes beyond the
    /// new end were the volume's.
    pub fn refresh_size(&self) -> Result<u64> {
        let err = |source| AgentError::Open {
            path: self.path.clone(),
            source,
        };
        let now = match self.kind {
            DeviceKind::File => self.file.metadata().map_err(err)?.len(),
            DeviceKind::Block => block_size_of(&self.file).map_err(err)?,
        };
        let was = self.size();
        if now < was {
            return Err(AgentError::Shrunk {
                path: self.path.clone(),
                was,
                now,
            });
        }
        self.size.store(now, std::sync::atomic::Ordering::Release);
        Ok(now)
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Opened with O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// True when both handles name the same file or block device.
    pub fn same_device(&self, other: &BackingDevice) -> bool {
        self.identity == other.identity
    }

    fn io_err(&self, op: &'static str, offset: u64, length: u64, source: io::Error) -> AgentError {
        AgentError::Io {
            op,
            device: self.name(),
            offset,
            length,
            source,
        }
    }

    fn check_range(&self, op: &'static str, offset: u64, length: u64) -> Result<()> {
        match offset.checked_add(length) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(self.io_err(
                op,
                offset,
                length,
                io::Error::new(io::ErrorKind::InvalidInput, "range beyond end of device"),
            )),
        }
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range("read", offset, buf.len() as u64)?;
        let res =
            if self.direct && !is_aligned(buf.as_ptr() as usize, offset, buf.len(), self.align) {
                with_bounce(offset, buf.len(), self.align, |bounce, boff| {
                    self.file.read_exact_at(bounce, boff)?;
                    let skip = (offset - boff) as usize;
                    buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
                    Ok(())
                })
            } else {
                self.file.read_exact_at(buf, offset)
            };
        res.map_err(|e| self.io_err("read", offset, buf.len() as u64, e))
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range("write", offset, buf.len() as u64)?;
        let len = buf.len() as u64;
        let res =
            if self.direct && !is_aligned(buf.as_ptr() as usize, offset, buf.len(), self.align) {
                // Read-modify-write of the aligned span around the request,
                // alone on those spans.
                let _alone = self.spans.as_ref().map(|s| s.exclusive(offset, len));
                with_bounce(offset, buf.len(), self.align, |bounce, boff| {
                    self.file.read_exact_at(bounce, boff)?;
                    let skip = (offset - boff) as usize;
                    bounce[skip..skip + buf.len()].copy_from_slice(buf);
                    self.file.write_all_at(bounce, boff)
                })
            } else {
                self.beside(offset, len, || self.file.write_all_at(buf, offset))
            };
        res.map_err(|e| self.io_err("write", offset, len, e))
    }

    /// Runs `op`, a change of `[offset, offset + length)` in one syscall,
    /// beside other such changes but never inside a read-modify-write of
    /// those spans (O_DIRECT; see `span_locks`). The locks are released
    /// when it returns, so a fallback that writes buffers takes its own.
    fn beside<T>(&self, offset: u64, length: u64, op: impl FnOnce() -> T) -> T {
        let _held = self.spans.as_ref().map(|s| s.shared(offset, length));
        op()
    }

    /// Reads all of `buf` at `offset` only if that cannot block (the data
    /// is in the page cache): `preadv2(RWF_NOWAIT)`. `None` means "would
    /// block, or only part was there": do the read on the blocking pool.
    /// Safe to call on the async reactor.
    pub fn try_read_nowait(&self, buf: &mut [u8], offset: u64) -> Option<Result<()>> {
        if self.direct || self.check_range("read", offset, buf.len() as u64).is_err() {
            return None;
        }
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: one iovec describing `buf`, which is live and exclusively
        // borrowed for the call; the fd belongs to a live File.
        let r = unsafe {
            libc::preadv2(
                self.file.as_raw_fd(),
                &iov,
                1,
                offset as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        nowait_result(self, "read", offset, buf.len(), r)
    }

    /// The descriptor to read `[offset, offset+length)` from directly
    /// (splice): buffered devices only (an O_DIRECT read needs aligned
    /// buffers of its own), inside the device.
    pub fn plain_fd(&self, offset: u64, length: u64) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        (!self.direct && self.check_range("read", offset, length).is_ok())
            .then(|| self.file.as_fd())
    }

    /// Writes all of `buf` at `offset` only if that cannot block:
    /// `pwritev2(RWF_NOWAIT)`. `None`: do it on the blocking pool (a short
    /// write already wrote a prefix; writing the whole again is harmless).
    pub fn try_write_nowait(&self, buf: &[u8], offset: u64) -> Option<Result<()>> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.direct
            || self.read_only
            || !self.nowait_writes.load(Relaxed)
            || self.check_range("write", offset, buf.len() as u64).is_err()
        {
            return None;
        }
        let iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: one iovec describing `buf`, live for the call (the kernel
        // only reads through it); the fd belongs to a live File.
        let r = unsafe {
            libc::pwritev2(
                self.file.as_raw_fd(),
                &iov,
                1,
                offset as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        if r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
            self.nowait_writes.store(false, Relaxed);
            return None;
        }
        nowait_result(self, "write", offset, buf.len(), r)
    }

    /// Makes completed writes durable (`fdatasync`).
    pub fn flush(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| self.io_err("flush", 0, self.size(), e))
    }

    /// Discards a range; afterwards it reads as zeroes. Falls back to writing
    /// zeroes where the device cannot discard.
    pub fn trim(&self, offset: u64, length: u64) -> Result<()> {
        self.check_range("trim", offset, length)?;
        if length == 0 {
            return Ok(());
        }
        let res = self.beside(offset, length, || match self.kind {
            DeviceKind::File => fallocate(
                &self.file,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                length,
            ),
            DeviceKind::Block => blk_range_ioctl(&self.file, BLKDISCARD, offset, length),
        });
        match res {
            Ok(()) => Ok(()),
            Err(e) if unsupported(&e) => self.write_zero_buffers(offset, length),
            Err(e) => Err(self.io_err("trim", offset, length, e)),
        }
    }

    /// Writes zeroes over a range. With `may_trim` the range may be
    /// deallocated (punched) instead.
    pub fn write_zeroes(&self, offset: u64, length: u64, may_trim: bool) -> Result<()> {
        self.check_range("write_zeroes", offset, length)?;
        if length == 0 {
            return Ok(());
        }
        let res = self.beside(offset, length, || match (self.kind, may_trim) {
            (DeviceKind::File, true) => fallocate(
                &self.file,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                length,
            ),
            (DeviceKind::File, false) => fallocate(
                &self.file,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                length,
            ),
            (DeviceKind::Block, _) => blk_range_ioctl(&self.file, BLKZEROOUT, offset, length),
        });
        match res {
            Ok(()) => Ok(()),
            Err(e) if unsupported(&e) => self.write_zero_buffers(offset, length),
            Err(e) => Err(self.io_err("write_zeroes", offset, length, e)),
        }
    }

    fn write_zero_buffers(&self, offset: u64, length: u64) -> Result<()> {
        const ZERO_CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; ZERO_CHUNK.min(length) as usize];
        let mut done = 0u64;
        while done < length {
            let n = ZERO_CHUNK.min(length - done) as usize;
            self.write_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Allocation runs covering `[offset, offset+length)`. Block devices and
    /// filesystems without `SEEK_DATA` report one data run.
    pub fn segments(&self, offset: u64, length: u64) -> Result<Vec<Segment>> {
        self.check_range("segments", offset, length)?;
        let end = offset + length;
        let mut out = Vec::new();
        if self.kind == DeviceKind::Block {
            out.push(Segment {
                offset,
                length,
                hole: false,
            });
            return Ok(out);
        }
        let fd = self.file.as_raw_fd();
        let mut pos = offset;
        while pos < end {
            let data = match lseek(fd, pos, libc::SEEK_DATA) {
                Ok(d) => d.min(end),
                // ENXIO: no data at or after pos.
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
                Err(e) if unsupported(&e) || e.raw_os_error() == Some(libc::EINVAL) => {
                    out.push(Segment {
                        offset: pos,
                        length: end - pos,
                        hole: false,
                    });
                    return Ok(out);
                }
                Err(e) => return Err(self.io_err("seek_data", pos, end - pos, e)),
            };
            if data > pos {
                push_segment(&mut out, pos, data - pos, true);
                pos = data;
                if pos >= end {
                    break;
                }
            }
            let hole = match lseek(fd, pos, libc::SEEK_HOLE) {
                Ok(h) => h.min(end),
                Err(e) => return Err(self.io_err("seek_hole", pos, end - pos, e)),
            };
            let hole = hole.max(pos + 1).min(end);
            push_segment(&mut out, pos, hole - pos, false);
            pos = hole;
        }
        Ok(out)
    }

    /// True when the whole device is unallocated (a fresh sparse file):
    /// then it is known to read as zeroes everywhere.
    pub fn is_fully_unallocated(&self) -> Result<bool> {
        let size = self.size();
        if self.kind == DeviceKind::Block || size == 0 {
            return Ok(size == 0);
        }
        let segs = self.segments(0, size)?;
        Ok(segs.iter().all(|s| s.hole))
    }
}

fn nowait_result(
    dev: &BackingDevice,
    op: &'static str,
    offset: u64,
    len: usize,
    r: isize,
) -> Option<Result<()>> {
    if r == len as isize {
        return Some(Ok(()));
    }
    if r >= 0 {
        return None; // short: finish on the blocking pool
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // would block, or the kernel/filesystem cannot do it without
        // blocking: the blocking pool will
        Some(libc::EAGAIN) | Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            None
        }
        _ => Some(Err(dev.io_err(op, offset, len as u64, e))),
    }
}

fn push_segment(out: &mut Vec<Segment>, offset: u64, length: u64, hole: bool) {
    if let Some(last) = out.last_mut()
        && last.hole == hole
        && last.end() == offset
    {
        last.length += length;
        return;
    }
    out.push(Segment {
        offset,
        length,
        hole,
    });
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::ENOSYS)
    )
}

fn is_aligned(ptr: usize, offset: u64, len: usize, align: usize) -> bool {
    ptr.is_multiple_of(align) && offset.is_multiple_of(align as u64) && len.is_multiple_of(align)
}

/// The alignment O_DIRECT needs on `file` (buffers, offsets and lengths
/// alike): what `statx(STATX_DIOALIGN)` reports (Linux 6.1+ for files, 6.11+
/// for block devices), at least 512; [`DIRECT_ALIGN`] when it says nothing.
/// A write that is not aligned to it is a read-modify-write of its spans,
/// so the smaller the alignment, the fewer (ext4 with 1 KiB blocks on a
/// disk of 512-byte sectors: none).
fn dio_align(file: &File) -> usize {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx on the fd of a live File with an empty, NUL-terminated
    // path and AT_EMPTY_PATH; the kernel writes into `st`, which lives for
    // the call.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut st,
        )
    };
    if r != 0 || st.stx_mask & libc::STATX_DIOALIGN == 0 || st.stx_dio_offset_align == 0 {
        return DIRECT_ALIGN;
    }
    let a = st.stx_dio_offset_align.max(st.stx_dio_mem_align).max(512) as usize;
    if a.is_power_of_two() { a } else { DIRECT_ALIGN }
}

/// Runs `f` with a thread-local aligned buffer spanning the aligned range
/// around `[offset, offset+len)`, and that range's start.
fn with_bounce(
    offset: u64,
    len: usize,
    align: usize,
    f: impl FnOnce(&mut [u8], u64) -> io::Result<()>,
) -> io::Result<()> {
    thread_local! {
        static BOUNCE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let a = align as u64;
    let start = offset / a * a;
    let end = (offset + len as u64).div_ceil(a) * a;
    let span = (end - start) as usize;
    BOUNCE.with(|cell| {
        let mut v = cell.borrow_mut();
        if v.len() < span + align {
            v.resize(span + align, 0);
        }
        let base = v.as_ptr() as usize;
        let pad = (align - base % align) % align;
        f(&mut v[pad..pad + span], start)
    })
}

fn lseek(fd: libc::c_int, pos: u64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: lseek on a valid fd owned by a live File has no memory effects.
    let r = unsafe { libc::lseek(fd, pos as libc::off_t, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, length: u64) -> io::Result<()> {
    // SAFETY: fallocate on a valid fd with plain integer arguments.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            offset as libc::off_t,
            length as libc::off_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn blk_range_ioctl(file: &File, req: libc::c_ulong, offset: u64, length: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, length];
    // SAFETY: BLKDISCARD/BLKZEROOUT read a `uint64_t[2]` from the pointer,
    // which points at a live, properly sized array for the call's duration.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), req, range.as_ptr()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn block_size_of(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // at a live local.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn o_direct_alignment_comes_from_the_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v");
        std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
        let d = BackingDevice::open(&p, OpenMode::ReadWrite, true).unwrap();
        eprintln!(
            "O_DIRECT alignment of a file in {}: {}",
            dir.path().display(),
            d.align
        );
        assert!(d.align.is_power_of_two() && (512..=DIRECT_ALIGN).contains(&d.align));
        // Aligned to it: a plain write; one byte off: a read-modify-write.
        assert!(is_aligned(d.align, d.align as u64, d.align, d.align));
        assert!(!is_aligned(d.align, 1, d.align, d.align));
        assert!(!is_aligned(1, 0, d.align, d.align));
        let b = BackingDevice::open(&p, OpenMode::ReadWrite, false).unwrap();
        assert_eq!(b.align, 1, "buffered: no alignment");
    }
}
