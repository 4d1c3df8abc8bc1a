//! Kernel block frontends: a served volume as a kernel block device of the
//! node (what the CSI node plugin mounts for a pod), whose I/O the agent
//! serves from the volume's [`VolumeIo`] (its interposer).
//!
//! One interface, [`BlockDriver`], several kinds ([`BlockKind`]):
//!
//! - [`fuse`]: FUSE + loop. The agent's own FUSE file system (raw
//!   `/dev/fuse`, one mount per agent) shows each volume as one regular
//!   file; a loop device with direct I/O makes it `/dev/loopN`. Runs
//!   wherever FUSE and loop do (these machines, CI).
//! - kernel NBD over netlink and ublk: beside it, over the same interface
//!   (their drivers register in [`BlockDrivers`] like this one).
//!
//! An agent restart is a stall, not an I/O error: a driver's kernel device
//! outlives the agent process ([`DeviceRecord`] is what the agent persists
//! to find it again, [`BlockDriver::reattach`] serves it again). For FUSE,
//! the `/dev/fuse` descriptors are held across the restart by a [`keeper`]
//! process and the kernel re-sends the requests in flight.
//!
//! Memory pressure: a user-space block device must not wait for reclaim
//! that writes back to itself ([`memsafe`]: `PR_SET_IO_FLUSHER` on the I/O
//! threads, locked memory).

pub mod fuse;
pub mod keeper;
pub mod loopdev;
pub mod memsafe;
pub mod mountinfo;
pub mod nbd_netlink;
#[cfg(feature = "ublk")]
pub mod ublk;

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use volmig_api::io::VolumeIo;
pub use volmig_api::io::{BlockChoice, BlockKind};

/// Paths of the ublk driver, known whether or not the `ublk` feature is
/// built.
pub mod ublk_paths {
    /// The ublk control device.
    pub const CONTROL: &str = "/dev/ublk-control";
}

/// Makes the device node `path` from the `major:minor` in its sysfs `dev`
/// file if the node is missing: a container's private /dev (a kind node,
/// an agent pod without the host's /dev) does not get the nodes the kernel
/// makes after it started (ublk makes its nodes on ADD_DEV).
pub fn ensure_device_node(path: &Path, sysfs_dev: &Path, block: bool) -> io::Result<()> {
    if path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(sysfs_dev)?;
    let (major, minor) = parse_dev_numbers(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {text:?} is not major:minor", sysfs_dev.display()),
        )
    })?;
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mode = if block { libc::S_IFBLK } else { libc::S_IFCHR } | 0o600;
    // SAFETY: `c` is a NUL-terminated path that lives across the call.
    let rc = unsafe { libc::mknod(c.as_ptr(), mode, libc::makedev(major, minor)) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        // Made meanwhile by udev or another caller.
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(e);
        }
    }
    Ok(())
}

/// Marks the calling thread an I/O flusher: see [`memsafe::io_flusher_best_effort`].
pub fn mark_io_flusher() {
    memsafe::io_flusher_best_effort();
}

/// `major:minor` as in a sysfs `dev` file.
pub fn parse_dev_numbers(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// What this kernel offers, best first (ublk, then NBD, then FUSE + loop);
/// ublk only when this build has the `ublk` feature.
pub fn available() -> Vec<BlockKind> {
    available_with(|p| Path::new(p).exists())
}

/// [`available`] with the file probe injected (tests).
pub fn available_with(exists: impl Fn(&str) -> bool) -> Vec<BlockKind> {
    BlockKind::BEST_FIRST
        .into_iter()
        .filter(|k| match k {
            BlockKind::Ublk => cfg!(feature = "ublk") && exists(ublk_paths::CONTROL),
            BlockKind::Nbd => exists("/sys/module/nbd"),
            BlockKind::FuseLoop => exists("/dev/fuse") && exists("/dev/loop-control"),
        })
        .collect()
}

/// What a restarted agent needs to attach the same kernel device again
/// (persisted by the agent with the volume's served record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub kind: BlockKind,
    pub volume: String,
    /// The device node (`/dev/loop3`).
    pub path: PathBuf,
    /// The driver's own facts (loop number, FUSE inode...).
    pub detail: serde_json::Value,
}

/// A kernel device serving a volume.
#[derive(Debug, Clone, PartialEq)]
pub struct Attached {
    pub path: PathBuf,
    pub record: DeviceRecord,
}

/// Makes kernel block devices of volumes, one kind.
pub trait BlockDriver<V: VolumeIo>: Send + Sync + 'static {
    fn kind(&self) -> BlockKind;
    /// Creates the kernel block device of `volume`, serving its I/O from `io`.
    fn attach(
        &self,
        volume: &str,
        io: Arc<V>,
    ) -> impl Future<Output = Result<Attached, BlockError>> + Send;
    /// After an agent restart: serves `record`'s existing device again from
    /// `io` (the workload's I/O waited meanwhile); fails if the device is
    /// gone.
    fn reattach(
        &self,
        record: &DeviceRecord,
        io: Arc<V>,
    ) -> impl Future<Output = Result<Attached, BlockError>> + Send;
    /// Removes the device (its users must have closed it: EBUSY otherwise).
    fn detach(&self, volume: &str) -> impl Future<Output = Result<(), BlockError>> + Send;
    /// The volume grew to `size`: the device shows the new size.
    fn resize(
        &self,
        volume: &str,
        size: u64,
    ) -> impl Future<Output = Result<(), BlockError>> + Send;
}

/// What went wrong, for callers that act on it (never parse the text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BlockErrorKind {
    /// The kernel (or this build) does not offer what was asked.
    #[error("not supported here")]
    Unsupported,
    /// The device belongs to another backend: never reconfigured.
    #[error("the device belongs to another backend")]
    Foreign,
    /// The device of a record no longer exists.
    #[error("the device is gone")]
    Gone,
    /// The device is in use (mounted, open).
    #[error("the device is busy")]
    Busy,
    /// The volume has no device on this driver.
    #[error("no device for this volume")]
    NotAttached,
    /// The volume already has a device on this driver.
    #[error("the volume already has a device")]
    AlreadyAttached,
    /// A record this driver cannot use.
    #[error("invalid device record")]
    InvalidRecord,
    /// A parameter out of range.
    #[error("invalid argument")]
    InvalidArgument,
    /// The kernel refused or a system call failed.
    #[error("I/O error")]
    Io,
    /// The descriptor keeper failed or answered nonsense.
    #[error("descriptor keeper")]
    Keeper,
}

/// Where an error happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockContext {
    pub kind: BlockKind,
    /// What was being done: "attach", "reattach", "detach", "resize", ...
    pub op: &'static str,
    pub volume: String,
    pub device: Option<PathBuf>,
}

impl fmt::Display for BlockContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.op)?;
        if !self.volume.is_empty() {
            write!(f, " of volume {:?}", self.volume)?;
        }
        if let Some(d) = &self.device {
            write!(f, " ({})", d.display())?;
        }
        Ok(())
    }
}

/// A block frontend's error: kind, context, what exactly.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {kind}{}{}", if detail.is_empty() { String::new() } else { format!(": {detail}") }, source.as_ref().map(|s| format!(": {s}")).unwrap_or_default())]
pub struct BlockError {
    pub kind: BlockErrorKind,
    pub context: Box<BlockContext>,
    pub detail: String,
    #[source]
    pub source: Option<io::Error>,
}

impl BlockError {
    pub fn new(kind: BlockErrorKind, context: BlockContext, detail: impl Into<String>) -> Self {
        BlockError {
            kind,
            context: Box::new(context),
            detail: detail.into(),
            source: None,
        }
    }

    /// An I/O error; EBUSY becomes [`BlockErrorKind::Busy`], ENOENT and
    /// ENODEV [`BlockErrorKind::Gone`], EOPNOTSUPP (and errors of kind
    /// [`io::ErrorKind::Unsupported`]) [`BlockErrorKind::Unsupported`].
    pub fn io(context: BlockContext, detail: impl Into<String>, source: io::Error) -> Self {
        let kind = match source.raw_os_error() {
            Some(libc::EBUSY) => BlockErrorKind::Busy,
            Some(libc::ENOENT) | Some(libc::ENODEV) => BlockErrorKind::Gone,
            Some(libc::EOPNOTSUPP) => BlockErrorKind::Unsupported,
            _ if source.kind() == io::ErrorKind::Unsupported => BlockErrorKind::Unsupported,
            _ => BlockErrorKind::Io,
        };
        BlockError {
            kind,
            context: Box::new(context),
            detail: detail.into(),
            source: Some(source),
        }
    }

    pub fn kind(&self) -> BlockErrorKind {
        self.kind
    }

    /// A device in use (the agent reports it as such, never as a failure).
    pub fn is_busy(&self) -> bool {
        self.kind == BlockErrorKind::Busy
    }

    /// An error of `kind` at `op` on `volume`'s device of `block`.
    pub fn at(
        kind: BlockErrorKind,
        block: BlockKind,
        op: &'static str,
        volume: &str,
        device: Option<&Path>,
        detail: impl Into<String>,
    ) -> Self {
        Self::new(
            kind,
            BlockContext {
                kind: block,
                op,
                volume: volume.to_string(),
                device: device.map(Path::to_path_buf),
            },
            detail,
        )
    }

    /// A failed system call at `op` on `volume`'s device of `block` (the
    /// error's kind from its errno, as [`io`](Self::io)).
    pub fn sys(
        block: BlockKind,
        op: &'static str,
        volume: &str,
        device: Option<&Path>,
        source: io::Error,
    ) -> Self {
        Self::io(
            BlockContext {
                kind: block,
                op,
                volume: volume.to_string(),
                device: device.map(Path::to_path_buf),
            },
            "",
            source,
        )
    }

    /// A kind this agent cannot use (not offered, not run).
    pub(crate) fn unavailable(
        kind: BlockKind,
        op: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self::new(
            BlockErrorKind::Unsupported,
            BlockContext {
                kind,
                op,
                volume: String::new(),
                device: None,
            },
            detail,
        )
    }
}

/// The block drivers an agent runs, one per kind at most: picks the driver
/// for a [`BlockChoice`] and forwards to it. (The trait's methods return
/// futures of their own types, so the registry dispatches by kind.)
pub struct BlockDrivers<V: VolumeIo> {
    fuse: Option<Arc<fuse::FuseLoop<V>>>,
    nbd: Option<Arc<nbd_netlink::NbdNetlinkDriver<V>>>,
    #[cfg(feature = "ublk")]
    ublk: Option<Arc<ublk::UblkDriver>>,
    /// What the kernel offers, best first (probed once).
    offered: Vec<BlockKind>,
}

impl<V: VolumeIo> Clone for BlockDrivers<V> {
    fn clone(&self) -> Self {
        Self {
            fuse: self.fuse.clone(),
            nbd: self.nbd.clone(),
            #[cfg(feature = "ublk")]
            ublk: self.ublk.clone(),
            offered: self.offered.clone(),
        }
    }
}

impl<V: VolumeIo> Default for BlockDrivers<V> {
    fn default() -> Self {
        Self::none()
    }
}

impl<V: VolumeIo> fmt::Debug for BlockDrivers<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockDrivers")
            .field("kinds", &self.kinds())
            .field("offered", &self.offered)
            .finish()
    }
}

/// One driver of a [`BlockDrivers`], borrowed to forward a call to.
enum Driver<'a, V: VolumeIo> {
    Fuse(&'a fuse::FuseLoop<V>),
    Nbd(&'a nbd_netlink::NbdNetlinkDriver<V>),
    #[cfg(feature = "ublk")]
    Ublk(&'a ublk::UblkDriver),
}

/// Forwards one [`BlockDriver`] call to whichever driver `$d` is.
macro_rules! forward {
    ($d:expr, $drv:ident => $call:expr) => {
        match $d {
            Driver::Fuse($drv) => $call.await,
            Driver::Nbd($drv) => $call.await,
            #[cfg(feature = "ublk")]
            Driver::Ublk($drv) => $call.await,
        }
    };
}

impl<V: VolumeIo> BlockDrivers<V> {
    /// No driver: block frontends are refused.
    pub fn none() -> Self {
        Self {
            fuse: None,
            nbd: None,
            #[cfg(feature = "ublk")]
            ublk: None,
            offered: available(),
        }
    }

    pub fn with_fuse(mut self, d: fuse::FuseLoop<V>) -> Self {
        self.fuse = Some(Arc::new(d));
        self
    }

    pub fn with_nbd(mut self, d: nbd_netlink::NbdNetlinkDriver<V>) -> Self {
        self.nbd = Some(Arc::new(d));
        self
    }

    #[cfg(feature = "ublk")]
    pub fn with_ublk(mut self, d: ublk::UblkDriver) -> Self {
        self.ublk = Some(Arc::new(d));
        self
    }

    /// Overrides what the kernel is taken to offer (tests).
    pub fn with_offered(mut self, offered: Vec<BlockKind>) -> Self {
        self.offered = offered;
        self
    }

    pub fn fuse(&self) -> Option<&Arc<fuse::FuseLoop<V>>> {
        self.fuse.as_ref()
    }

    /// What the kernel offers, best first.
    pub fn offered(&self) -> &[BlockKind] {
        &self.offered
    }

    /// The kinds this agent runs a driver for, best first.
    pub fn kinds(&self) -> Vec<BlockKind> {
        BlockKind::BEST_FIRST
            .into_iter()
            .filter(|k| self.has(*k))
            .collect()
    }

    fn has(&self, k: BlockKind) -> bool {
        self.driver(k).is_ok()
    }

    /// The kind `choice` means here: `Auto` is the best kind the kernel
    /// offers that this agent runs.
    pub fn pick(&self, choice: BlockChoice) -> Result<BlockKind, BlockError> {
        match choice {
            BlockChoice::Only(k) if self.has(k) => Ok(k),
            BlockChoice::Only(k) => Err(BlockError::unavailable(
                k,
                "pick",
                format!(
                    "this agent runs no {k} block driver (it runs: {})",
                    names(&self.kinds())
                ),
            )),
            BlockChoice::Auto => self
                .offered
                .iter()
                .copied()
                .find(|k| self.has(*k))
                .ok_or_else(|| {
                    BlockError::unavailable(
                        BlockKind::FuseLoop,
                        "pick",
                        format!(
                            "no kind both offered by the kernel ({}) and run by this agent ({})",
                            names(&self.offered),
                            names(&self.kinds())
                        ),
                    )
                }),
        }
    }

    fn driver(&self, kind: BlockKind) -> Result<Driver<'_, V>, BlockError> {
        let d = match kind {
            BlockKind::FuseLoop => self.fuse.as_deref().map(Driver::Fuse),
            BlockKind::Nbd => self.nbd.as_deref().map(Driver::Nbd),
            #[cfg(feature = "ublk")]
            BlockKind::Ublk => self.ublk.as_deref().map(Driver::Ublk),
            #[cfg(not(feature = "ublk"))]
            BlockKind::Ublk => None,
        };
        d.ok_or_else(|| {
            BlockError::unavailable(
                kind,
                "pick",
                format!("this agent runs no {kind} block driver"),
            )
        })
    }

    /// Creates the kernel device of `volume` with the driver `choice` picks.
    pub async fn attach(
        &self,
        choice: BlockChoice,
        volume: &str,
        io: Arc<V>,
    ) -> Result<Attached, BlockError> {
        let kind = self.pick(choice)?;
        forward!(self.driver(kind)?, d => d.attach(volume, io))
    }

    /// Serves a recorded device again (after a restart).
    pub async fn reattach(
        &self,
        record: &DeviceRecord,
        io: Arc<V>,
    ) -> Result<Attached, BlockError> {
        forward!(self.driver(record.kind)?, d => d.reattach(record, io))
    }

    pub async fn detach(&self, kind: BlockKind, volume: &str) -> Result<(), BlockError> {
        forward!(self.driver(kind)?, d => BlockDriver::<V>::detach(d, volume))
    }

    pub async fn resize(&self, kind: BlockKind, volume: &str, size: u64) -> Result<(), BlockError> {
        forward!(self.driver(kind)?, d => BlockDriver::<V>::resize(d, volume, size))
    }

    /// Every recorded device was reattached (or failed): requests for
    /// devices nobody claimed fail from now on instead of waiting.
    pub fn restored(&self) {
        if let Some(f) = &self.fuse {
            f.restored();
        }
    }
}

fn names(kinds: &[BlockKind]) -> String {
    if kinds.is_empty() {
        return "none".into();
    }
    kinds
        .iter()
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn available_lists_best_first_what_the_kernel_has() {
        let all = available_with(|_| true);
        if cfg!(feature = "ublk") {
            assert_eq!(all, [BlockKind::Ublk, BlockKind::Nbd, BlockKind::FuseLoop]);
        } else {
            assert_eq!(all, [BlockKind::Nbd, BlockKind::FuseLoop]);
        }
        let fuse_only = available_with(|p| p == "/dev/fuse" || p == "/dev/loop-control");
        assert_eq!(fuse_only, [BlockKind::FuseLoop]);
        let no_loop = available_with(|p| p == "/dev/fuse" || p == "/sys/module/nbd");
        assert_eq!(no_loop, [BlockKind::Nbd]);
    }

    #[test]
    fn device_records_roundtrip_as_json() {
        let r = DeviceRecord {
            kind: BlockKind::FuseLoop,
            volume: "v".into(),
            path: "/dev/loop3".into(),
            detail: serde_json::json!({"ino": 12, "loop": 3}),
        };
        let j = serde_json::to_string(&r).unwrap();
        assert!(j.contains("\"kind\":\"fuse\""), "{j}");
        assert_eq!(serde_json::from_str::<DeviceRecord>(&j).unwrap(), r);
    }

    struct NoIo;
    impl VolumeIo for NoIo {
        fn size(&self) -> u64 {
            0
        }
        async fn read(&self, _: u64, b: Vec<u8>) -> io::Result<Vec<u8>> {
            Ok(b)
        }
        async fn write(&self, _: u64, b: Vec<u8>, _: bool) -> io::Result<Vec<u8>> {
            Ok(b)
        }
        async fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        async fn trim(&self, _: u64, _: u64) -> io::Result<()> {
            Ok(())
        }
        async fn write_zeroes(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
            Ok(())
        }
        async fn block_status(&self, _: u64, _: u64) -> io::Result<Vec<volmig_api::io::Extent>> {
            Ok(Vec::new())
        }
    }

    #[test]
    fn no_driver_means_block_frontends_are_refused_clearly() {
        let d = BlockDrivers::<NoIo>::none().with_offered(vec![BlockKind::FuseLoop]);
        assert!(d.kinds().is_empty());
        let e = d.pick(BlockChoice::Auto).unwrap_err();
        assert!(
            e.to_string().contains("offered by the kernel (fuse)"),
            "{e}"
        );
        let e = d.pick(BlockChoice::Only(BlockKind::Ublk)).unwrap_err();
        assert_eq!(e.kind(), BlockErrorKind::Unsupported, "{e}");
        assert_eq!(e.context.kind, BlockKind::Ublk, "{e}");
    }

    #[test]
    fn io_flusher_is_set_where_permitted() {
        std::thread::spawn(|| {
            mark_io_flusher();
            const PR_GET_IO_FLUSHER: libc::c_int = 58;
            // SAFETY: prctl with integer arguments only.
            let got = unsafe { libc::prctl(PR_GET_IO_FLUSHER, 0, 0, 0, 0) };
            if got < 0 {
                // No CAP_SYS_RESOURCE (as on the development machines).
                let e = io::Error::last_os_error();
                assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
            } else {
                assert_eq!(got, 1, "the thread is marked");
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn device_numbers_are_parsed_from_sysfs() {
        assert_eq!(parse_dev_numbers("259:3\n"), Some((259, 3)));
        assert_eq!(parse_dev_numbers("43:0"), Some((43, 0)));
        assert_eq!(parse_dev_numbers("43"), None);
        assert_eq!(parse_dev_numbers("a:b"), None);
        assert_eq!(parse_dev_numbers(""), None);
    }

    #[test]
    fn device_nodes_are_made_only_when_missing() {
        let dir = tempfile::tempdir().unwrap();
        // Present: left alone, sysfs not even read.
        let present = dir.path().join("present");
        std::fs::write(&present, b"").unwrap();
        ensure_device_node(&present, &dir.path().join("nope"), true).unwrap();
        // Missing, with a sysfs file: made (as root, which these tests are
        // run as; else EPERM says so).
        let sys = dir.path().join("dev");
        std::fs::write(&sys, "1:3\n").unwrap();
        let node = dir.path().join("null-again");
        match ensure_device_node(&node, &sys, false) {
            Ok(()) => {
                use std::os::unix::fs::FileTypeExt;
                let m = std::fs::metadata(&node).unwrap();
                assert!(m.file_type().is_char_device());
            }
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}"),
        }
        // Missing without sysfs: the error says so.
        let e =
            ensure_device_node(&dir.path().join("x"), &dir.path().join("nope"), true).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        std::fs::write(&sys, "garbage").unwrap();
        let e = ensure_device_node(&dir.path().join("y"), &sys, true).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn io_errors_map_to_kinds() {
        let ctx = || BlockContext {
            kind: BlockKind::Nbd,
            op: "detach",
            volume: "v".into(),
            device: Some("/dev/nbd0".into()),
        };
        let e = BlockError::io(ctx(), "x", io::Error::from_raw_os_error(libc::EBUSY));
        assert_eq!(e.kind(), BlockErrorKind::Busy);
        let e = BlockError::io(ctx(), "x", io::Error::from_raw_os_error(libc::ENODEV));
        assert_eq!(e.kind(), BlockErrorKind::Gone);
        let e = BlockError::io(
            ctx(),
            "x",
            io::Error::new(io::ErrorKind::Unsupported, "no nbd family"),
        );
        assert_eq!(e.kind(), BlockErrorKind::Unsupported);
        let e = BlockError::io(ctx(), "x", io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(e.kind(), BlockErrorKind::Io);
        let shown = e.to_string();
        assert!(
            shown.contains("nbd detach of volume \"v\" (/dev/nbd0)"),
            "{shown}"
        );
    }
}
