//! The slave contract's messages as domain types: paths are paths, times
//! are durations, enums are enums, absent is `Option`. They are converted
//! from and to protobuf once, at the gRPC boundary (`super::wire`).

use std::path::PathBuf;
use std::time::Duration;

use crate::config::{SessionConfig, Verify};
use crate::io::{BlockChoice, BlockKind};

/// Names a session and fences the caller: an agent refuses a call whose
/// epoch is older than the newest it has seen for the session.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fence {
    pub session: String,
    pub volume: String,
    pub epoch: u64,
}

/// Activation: open and validate the target, create the dirty map, attach
/// the monitor.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepare {
    pub fence: Fence,
    /// The target backing device, as the agent's node sees it.
    pub target: PathBuf,
    pub config: SessionConfig,
    /// A secondary agent of a multi-attach volume: monitor only.
    pub monitor_only: bool,
}

/// Continue the current pass for at most `slice` (None: to its end).
#[derive(Debug, Clone, PartialEq)]
pub struct CopyPass {
    pub fence: Fence,
    pub slice: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SetMirror {
    pub fence: Fence,
    pub on: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Quiesce {
    pub fence: Fence,
    /// How long in-flight I/O may take to drain.
    pub budget: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Redirect {
    pub fence: Fence,
    /// Back to the source (a rollback after redirect).
    pub to_source: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Terminate {
    pub fence: Fence,
    pub verify: Verify,
    pub failback_window: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SetBandwidth {
    pub fence: Fence,
    /// 0 = unlimited.
    pub bytes_per_sec: u64,
}

/// Multi-attach: a secondary hands over the grains its workload dirtied;
/// `ack` is the last batch the master merged (0: none).
#[derive(Debug, Clone, PartialEq)]
pub struct TakeDirty {
    pub fence: Fence,
    pub ack: u64,
}

/// Multi-attach: the copying agent marks grains another agent's workload
/// dirtied.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeDirty {
    pub fence: Fence,
    pub grain: u64,
    pub size: u64,
    pub runs: Vec<DirtyRun>,
}

/// Consecutive bitmap words of a dirty map (bit i of word w = grain 64w+i).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyRun {
    pub first_word: u64,
    pub words: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DirtyBatch {
    /// Acknowledge it in the next `TakeDirty`.
    pub batch: u64,
    pub grain: u64,
    pub size: u64,
    pub runs: Vec<DirtyRun>,
    /// Bytes the runs cover.
    pub dirty_bytes: u64,
}

/// A session as its agent sees it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SessionState {
    pub session: String,
    pub volume: String,
    pub epoch: u64,
    pub size: u64,
    pub source: PathBuf,
    pub target: PathBuf,
    /// The monitor is attached.
    pub attached: bool,
    pub mirror: bool,
    pub quiesced: bool,
    /// The workload's active device is the target.
    pub redirected: bool,
    pub dirty_bytes: u64,
    /// All passes, this agent process.
    pub bytes_copied: u64,
    /// Terminated or aborted: nothing attached.
    pub finished: bool,
    /// Bytes per second, recent.
    pub copy_rate: f64,
    /// Workload writes, bytes per second, recent.
    pub write_rate: f64,
    /// Times this agent re-attached the session after a restart.
    pub resumes: u32,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct PassResult {
    /// The pass reached the end (the fields below are the whole pass's).
    pub complete: bool,
    /// Handled so far this pass (data + holes/zeroes).
    pub bytes: u64,
    pub data_bytes: u64,
    /// Pass time so far, the target's flush included when complete.
    pub elapsed: Duration,
    pub dirty_bytes: u64,
    /// Cut short by an abort.
    pub stopped: bool,
    /// Bytes of the volume behind the pass's cursor.
    pub walked: u64,
    /// Dirty bytes behind the cursor: written again since the pass went by.
    pub redirtied_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct QuiesceResult {
    /// False: in-flight I/O did not drain within the budget.
    pub quiesced: bool,
    pub spent: Duration,
    pub dirty_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResumeResult {
    /// Quiesce start to resume, when this call resumed I/O.
    pub stall: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct TerminateResult {
    /// True when verify was None or matched.
    pub verified: bool,
    pub mismatch_offset: Option<u64>,
}

/// How workloads reach a served volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Frontend {
    /// An export of the agent's NBD server(s), named like the volume.
    Nbd,
    /// A kernel block device of the agent's node (FUSE + loop, kernel
    /// NBD or ublk): what the CSI node plugin mounts for a pod.
    Block(BlockChoice),
}

impl std::fmt::Display for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Frontend::Nbd => f.write_str("nbd"),
            Frontend::Block(BlockChoice::Auto) => f.write_str("block"),
            Frontend::Block(c) => write!(f, "block:{c}"),
        }
    }
}

impl std::str::FromStr for Frontend {
    type Err = String;
    /// `nbd`, `block` (the best kind the node has) or `block:KIND` (`fuse`,
    /// `nbd`, `ublk`, `auto`).
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.to_ascii_lowercase();
        match lower.split_once(':') {
            None if lower == "nbd" => Ok(Frontend::Nbd),
            None if lower == "block" => Ok(Frontend::Block(BlockChoice::Auto)),
            Some(("block", kind)) => kind.parse().map(Frontend::Block),
            _ => Err(format!(
                "unknown frontend {s:?} (nbd, block, block:fuse, block:nbd or block:ublk)"
            )),
        }
    }
}

/// Serve a volume: its interposer over the backing device, reached through
/// `frontends`. Idempotent for the same settings; persisted by the agent,
/// which serves it again after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeVolume {
    pub volume: String,
    pub backing: PathBuf,
    pub frontends: Vec<Frontend>,
    /// Open the backing device with O_DIRECT.
    pub direct: bool,
}

/// Stop serving a volume: its frontends close, its backing device is
/// released and the agent forgets it. Refused (`InUse`) while an unfinished
/// migration session holds it; a volume that is not served is no error
/// (idempotent, as CSI's NodeUnstage needs): [`Unserved::was_served`] says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnserveVolume {
    pub volume: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ListVolumes;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Unserved {
    /// False: the agent did not serve the volume (nothing was done).
    pub was_served: bool,
}

/// A volume an agent serves, or was asked to serve and could not.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VolumeInfo {
    pub name: String,
    pub size: u64,
    /// The backing device it was asked to serve (the current one after a
    /// completed migration).
    pub backing: PathBuf,
    /// The backing device workload I/O goes to now.
    pub active: PathBuf,
    /// The migration session attached, if any (finished or not).
    pub session: Option<String>,
    pub frontends: Vec<Frontend>,
    /// The kernel block device of a `Frontend::Block` volume
    /// (`/dev/loop3`...), and its kind.
    pub device: Option<PathBuf>,
    pub device_kind: Option<BlockKind>,
    /// Why it is not served (the device could not be opened...).
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VolumeList {
    pub volumes: Vec<VolumeInfo>,
}
