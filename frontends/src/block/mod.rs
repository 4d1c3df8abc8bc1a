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

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use volmig_api::io::VolumeIo;
pub use volmig_api::io::{BlockChoice, BlockKind};

/// What this kernel offers, best first (ublk, then NBD, then FUSE + loop).
pub fn available() -> Vec<BlockKind> {
    available_with(|p| Path::new(p).exists())
}

/// [`available`] with the file probe injected (tests).
pub fn available_with(exists: impl Fn(&str) -> bool) -> Vec<BlockKind> {
    BlockKind::BEST_FIRST
        .into_iter()
        .filter(|k| match k {
            BlockKind::Ublk => exists("/dev/ublk-control"),
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

/// What went wrong with a kernel block device; every variant says which
/// volume (and device, where there is one).
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The kind cannot be used here (no kernel support, not configured).
    #[error("{kind} block devices are not available on this node: {reason}")]
    Unavailable { kind: BlockKind, reason: String },
    /// A system call failed.
    #[error("{op} for volume {volume}{}: {source}", on_device(device))]
    Io {
        op: &'static str,
        volume: String,
        device: Option<PathBuf>,
        #[source]
        source: io::Error,
    },
    /// Detaching a device that is still mounted or open.
    #[error(
        "the block device {} of volume {volume} is in use (mounted or open): unmount it first",
        device.display()
    )]
    Busy { volume: String, device: PathBuf },
    /// The volume has a device of this driver already.
    #[error("volume {volume} has a block device already: {}", device.display())]
    Exists { volume: String, device: PathBuf },
    /// The volume has no device of this driver.
    #[error("volume {volume} has no {kind} block device")]
    NotAttached { volume: String, kind: BlockKind },
    /// A recorded device is not there any more (reattach).
    #[error("the block device {} of volume {volume} is gone: {reason}", device.display())]
    Gone {
        volume: String,
        device: PathBuf,
        reason: String,
    },
    /// A persisted record this driver cannot read.
    #[error("bad {kind} device record of volume {volume}: {reason}")]
    BadRecord {
        volume: String,
        kind: BlockKind,
        reason: String,
    },
    /// The descriptor keeper failed or answered nonsense.
    #[error("descriptor keeper {}: {reason}", socket.display())]
    Keeper { socket: PathBuf, reason: String },
}

fn on_device(device: &Option<PathBuf>) -> String {
    device
        .as_ref()
        .map(|d| format!(" ({})", d.display()))
        .unwrap_or_default()
}

impl BlockError {
    pub(crate) fn io(
        op: &'static str,
        volume: &str,
        device: Option<&Path>,
        source: io::Error,
    ) -> Self {
        BlockError::Io {
            op,
            volume: volume.to_string(),
            device: device.map(Path::to_path_buf),
            source,
        }
    }

    /// A device in use (the agent reports it as such, never as a failure).
    pub fn is_busy(&self) -> bool {
        matches!(self, BlockError::Busy { .. })
    }
}

/// The block drivers an agent runs, one per kind at most: picks the driver
/// for a [`BlockChoice`] and forwards to it. (The trait's methods return
/// futures of their own types, so the registry dispatches by kind.)
pub struct BlockDrivers<V: VolumeIo> {
    fuse: Option<Arc<fuse::FuseLoop<V>>>,
    /// What the kernel offers, best first (probed once).
    offered: Vec<BlockKind>,
}

impl<V: VolumeIo> Clone for BlockDrivers<V> {
    fn clone(&self) -> Self {
        Self {
            fuse: self.fuse.clone(),
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

impl<V: VolumeIo> BlockDrivers<V> {
    /// No driver: block frontends are refused.
    pub fn none() -> Self {
        Self {
            fuse: None,
            offered: available(),
        }
    }

    pub fn with_fuse(mut self, d: fuse::FuseLoop<V>) -> Self {
        self.fuse = Some(Arc::new(d));
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

    /// The kinds this agent runs a driver for, best first.
    pub fn kinds(&self) -> Vec<BlockKind> {
        BlockKind::BEST_FIRST
            .into_iter()
            .filter(|k| self.has(*k))
            .collect()
    }

    fn has(&self, k: BlockKind) -> bool {
        match k {
            BlockKind::FuseLoop => self.fuse.is_some(),
            BlockKind::Nbd | BlockKind::Ublk => false,
        }
    }

    /// The kind `choice` means here: `Auto` is the best kind the kernel
    /// offers that this agent runs.
    pub fn pick(&self, choice: BlockChoice) -> Result<BlockKind, BlockError> {
        match choice {
            BlockChoice::Only(k) if self.has(k) => Ok(k),
            BlockChoice::Only(k) => Err(BlockError::Unavailable {
                kind: k,
                reason: format!(
                    "this agent runs no {k} block driver (it runs: {})",
                    names(&self.kinds())
                ),
            }),
            BlockChoice::Auto => self
                .offered
                .iter()
                .copied()
                .find(|k| self.has(*k))
                .ok_or_else(|| BlockError::Unavailable {
                    kind: BlockKind::FuseLoop,
                    reason: format!(
                        "no kind both offered by the kernel ({}) and run by this agent ({})",
                        names(&self.offered),
                        names(&self.kinds())
                    ),
                }),
        }
    }

    fn fuse_or(&self, kind: BlockKind) -> Result<&Arc<fuse::FuseLoop<V>>, BlockError> {
        match kind {
            BlockKind::FuseLoop => self.fuse.as_ref().ok_or(BlockError::Unavailable {
                kind,
                reason: "this agent runs no FUSE block driver".into(),
            }),
            other => Err(BlockError::Unavailable {
                kind: other,
                reason: format!("this agent runs no {other} block driver"),
            }),
        }
    }

    /// Creates the kernel device of `volume` with the driver `choice` picks.
    pub async fn attach(
        &self,
        choice: BlockChoice,
        volume: &str,
        io: Arc<V>,
    ) -> Result<Attached, BlockError> {
        let kind = self.pick(choice)?;
        self.fuse_or(kind)?.attach(volume, io).await
    }

    /// Serves a recorded device again (after a restart).
    pub async fn reattach(
        &self,
        record: &DeviceRecord,
        io: Arc<V>,
    ) -> Result<Attached, BlockError> {
        self.fuse_or(record.kind)?.reattach(record, io).await
    }

    pub async fn detach(&self, kind: BlockKind, volume: &str) -> Result<(), BlockError> {
        self.fuse_or(kind)?.detach(volume).await
    }

    pub async fn resize(&self, kind: BlockKind, volume: &str, size: u64) -> Result<(), BlockError> {
        self.fuse_or(kind)?.resize(volume, size).await
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
        assert_eq!(all, [BlockKind::Ublk, BlockKind::Nbd, BlockKind::FuseLoop]);
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
        assert!(
            matches!(
                e,
                BlockError::Unavailable {
                    kind: BlockKind::Ublk,
                    ..
                }
            ),
            "{e}"
        );
    }
}
