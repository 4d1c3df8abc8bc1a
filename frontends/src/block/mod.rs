//! Kernel block devices for served volumes: the agent *is* the device a
//! pod's filesystem sits on, so every I/O passes through the interposer.
//!
//! One interface, [`BlockDriver`], three kinds ([`BlockKind`]):
//!
//! - **FUSE + loop** (`fuse`): a FUSE file per volume made a block device by
//!   loop (owned by the FUSE frontend);
//! - **kernel NBD over netlink** (`nbd`, [`nbd_netlink`]): the kernel's NBD
//!   client on socketpairs whose other ends the agent serves in the NBD
//!   transmission phase;
//! - **ublk** (`ublk`, [`ublk`], feature `ublk`): the kernel's user-space
//!   block driver, with user recovery.
//!
//! [`available`] tells which kinds this kernel offers, best first;
//! [`BlockChoice`] picks one per volume. A [`DeviceRecord`] is what a
//! restarted agent persists to re-attach the same kernel device
//! ([`BlockDriver::reattach`]): an agent restart is a stall, not an I/O
//! error.

pub mod nbd_netlink;
#[cfg(feature = "ublk")]
pub mod ublk;

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use volmig_api::io::VolumeIo;

/// A kind of kernel block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum BlockKind {
    /// A FUSE file per volume, made a block device by loop.
    #[serde(rename = "fuse")]
    FuseLoop,
    /// The kernel NBD client configured over generic netlink.
    #[serde(rename = "nbd")]
    Nbd,
    /// ublk (`ublk_drv`).
    #[serde(rename = "ublk")]
    Ublk,
}

impl BlockKind {
    /// Every kind, best first.
    pub const ALL: [BlockKind; 3] = [BlockKind::Ublk, BlockKind::Nbd, BlockKind::FuseLoop];

    /// The name used in configuration, the protocol and records.
    pub fn as_str(self) -> &'static str {
        match self {
            BlockKind::FuseLoop => "fuse",
            BlockKind::Nbd => "nbd",
            BlockKind::Ublk => "ublk",
        }
    }
}

impl fmt::Display for BlockKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no [`BlockKind`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown block device kind {0:?} (expected fuse, nbd or ublk)")]
pub struct UnknownBlockKind(pub String);

impl FromStr for BlockKind {
    type Err = UnknownBlockKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fuse" => Ok(BlockKind::FuseLoop),
            "nbd" => Ok(BlockKind::Nbd),
            "ublk" => Ok(BlockKind::Ublk),
            other => Err(UnknownBlockKind(other.to_string())),
        }
    }
}

/// Which kind to use for a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BlockChoice {
    /// The best kind the kernel offers.
    #[default]
    Auto,
    /// This kind or none.
    Only(BlockKind),
}

impl BlockChoice {
    /// The kind to use given what the kernel offers (best first, as
    /// [`available`] returns it); `None` if the choice cannot be met.
    pub fn pick(self, available: &[BlockKind]) -> Option<BlockKind> {
        match self {
            BlockChoice::Auto => available.first().copied(),
            BlockChoice::Only(k) => available.contains(&k).then_some(k),
        }
    }
}

/// What the kernel offers, as [`available_with`] asks it. The system's
/// answers come from [`SystemProbe`]; tests inject their own.
pub trait Probe {
    /// `/dev/ublk-control` exists (the `ublk_drv` module is loaded).
    fn ublk_control(&self) -> bool;
    /// The kernel NBD client can be configured over netlink: the `nbd`
    /// generic-netlink family resolves, or the module is loaded.
    fn nbd_netlink(&self) -> bool;
    /// `/dev/fuse` and `/dev/loop-control` exist.
    fn fuse_loop(&self) -> bool;
}

/// The running system's answers.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemProbe;

impl Probe for SystemProbe {
    fn ublk_control(&self) -> bool {
        Path::new(ublk_paths::CONTROL).exists()
    }

    fn nbd_netlink(&self) -> bool {
        Path::new("/sys/module/nbd").exists() || nbd_netlink::family_available()
    }

    fn fuse_loop(&self) -> bool {
        Path::new("/dev/fuse").exists() && Path::new("/dev/loop-control").exists()
    }
}

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

/// Marks the calling thread an I/O flusher (`PR_SET_IO_FLUSHER`): memory
/// reclaim it enters does not wait for writeback to the devices it serves
/// itself. Best effort: it needs CAP_SYS_RESOURCE (the chart grants it);
/// without, the first failure is logged and the thread runs unmarked.
pub fn mark_io_flusher() {
    use std::sync::atomic::{AtomicBool, Ordering};
    static WARNED: AtomicBool = AtomicBool::new(false);
    const PR_SET_IO_FLUSHER: libc::c_int = 57;
    // SAFETY: prctl with integer arguments only; the result is checked.
    let rc = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    if rc < 0 && !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(error = %io::Error::last_os_error(),
            "cannot mark block I/O threads PR_SET_IO_FLUSHER (needs CAP_SYS_RESOURCE): \
             under memory pressure they may wait on their own writeback");
    }
}

/// `major:minor` as in a sysfs `dev` file.
pub fn parse_dev_numbers(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// What this kernel offers, best first (ublk > nbd > fuse).
pub fn available() -> Vec<BlockKind> {
    available_with(&SystemProbe)
}

/// [`available`] with the answers of `probe`. ublk counts only when this
/// build has the `ublk` feature.
pub fn available_with(probe: &impl Probe) -> Vec<BlockKind> {
    BlockKind::ALL
        .into_iter()
        .filter(|k| match k {
            BlockKind::Ublk => cfg!(feature = "ublk") && probe.ublk_control(),
            BlockKind::Nbd => probe.nbd_netlink(),
            BlockKind::FuseLoop => probe.fuse_loop(),
        })
        .collect()
}

/// What a restarted agent needs to attach the same kernel device again
/// (persisted by the agent). `detail` is the driver's own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub kind: BlockKind,
    pub volume: String,
    pub path: PathBuf,
    pub detail: serde_json::Value,
}

/// A volume's kernel block device.
#[derive(Debug, Clone, PartialEq)]
pub struct Attached {
    pub path: PathBuf,
    pub record: DeviceRecord,
}

/// Turns served volumes into kernel block devices of one kind.
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
        write!(f, "{} {} of volume {:?}", self.kind, self.op, self.volume)?;
        if let Some(d) = &self.device {
            write!(f, " ({})", d.display())?;
        }
        Ok(())
    }
}

/// A block frontend's error: kind, context, what exactly.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {kind}: {detail}{}", source.as_ref().map(|s| format!(": {s}")).unwrap_or_default())]
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
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeProbe {
        ublk: bool,
        nbd: bool,
        fuse: bool,
    }

    impl Probe for FakeProbe {
        fn ublk_control(&self) -> bool {
            self.ublk
        }
        fn nbd_netlink(&self) -> bool {
            self.nbd
        }
        fn fuse_loop(&self) -> bool {
            self.fuse
        }
    }

    #[test]
    fn kinds_round_trip_through_text_and_serde() {
        for k in BlockKind::ALL {
            assert_eq!(k.as_str().parse::<BlockKind>(), Ok(k));
            assert_eq!(k.to_string(), k.as_str());
            let j = serde_json::to_string(&k).unwrap();
            assert_eq!(j, format!("\"{}\"", k.as_str()));
            assert_eq!(serde_json::from_str::<BlockKind>(&j).unwrap(), k);
        }
        assert!("loop".parse::<BlockKind>().is_err());
        assert!("".parse::<BlockKind>().is_err());
    }

    #[test]
    fn available_is_best_first_and_only_what_the_probe_finds() {
        let all = FakeProbe {
            ublk: true,
            nbd: true,
            fuse: true,
        };
        let got = available_with(&all);
        if cfg!(feature = "ublk") {
            assert_eq!(
                got,
                vec![BlockKind::Ublk, BlockKind::Nbd, BlockKind::FuseLoop]
            );
        } else {
            assert_eq!(got, vec![BlockKind::Nbd, BlockKind::FuseLoop]);
        }
        let here = FakeProbe {
            ublk: false,
            nbd: false,
            fuse: true,
        };
        assert_eq!(available_with(&here), vec![BlockKind::FuseLoop]);
        let nbd_only = FakeProbe {
            ublk: false,
            nbd: true,
            fuse: false,
        };
        assert_eq!(available_with(&nbd_only), vec![BlockKind::Nbd]);
        let none = FakeProbe {
            ublk: false,
            nbd: false,
            fuse: false,
        };
        assert!(available_with(&none).is_empty());
    }

    #[test]
    fn choices_pick_the_best_or_exactly_the_one_asked() {
        let avail = [BlockKind::Nbd, BlockKind::FuseLoop];
        assert_eq!(BlockChoice::Auto.pick(&avail), Some(BlockKind::Nbd));
        assert_eq!(
            BlockChoice::Only(BlockKind::FuseLoop).pick(&avail),
            Some(BlockKind::FuseLoop)
        );
        assert_eq!(BlockChoice::Only(BlockKind::Ublk).pick(&avail), None);
        assert_eq!(BlockChoice::Auto.pick(&[]), None);
    }

    #[test]
    fn records_round_trip() {
        let r = DeviceRecord {
            kind: BlockKind::Nbd,
            volume: "v1".into(),
            path: "/dev/nbd3".into(),
            detail: serde_json::json!({"index": 3}),
        };
        let j = serde_json::to_string(&r).unwrap();
        assert!(j.contains("\"kind\":\"nbd\""), "{j}");
        assert_eq!(serde_json::from_str::<DeviceRecord>(&j).unwrap(), r);
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
