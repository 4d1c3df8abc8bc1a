//! The agent's error type: every variant carries what failed and where
//! (device, offset, op), so a log line or a CR condition can say it plainly.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot open backing device {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("backing device {path} is not a regular file or block device")]
    NotADevice { path: PathBuf },
    #[error("backing device {path} shrank from {was} to {now} bytes: a volume never shrinks")]
    Shrunk { path: PathBuf, was: u64, now: u64 },
    #[error("backing device {path} is read-only, a migration target must be writable")]
    ReadOnly { path: PathBuf },
    #[error(
        "target {target} ({target_size} bytes) is smaller than source {source_path} ({source_size} bytes)"
    )]
    TargetTooSmall {
        source_path: PathBuf,
        source_size: u64,
        target: PathBuf,
        target_size: u64,
    },
    #[error("source and target are the same device: {path}")]
    SameDevice { path: PathBuf },
    #[error("{op} on {device} at offset {offset} (+{length}): {source}")]
    Io {
        op: &'static str,
        device: String,
        offset: u64,
        length: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {volume} already has a migration in progress (session {session})")]
    SessionExists { volume: String, session: String },
    #[error("unknown volume {0}")]
    UnknownVolume(String),
    #[error(
        "volume {volume} is already served from {backing} with other settings; unserve it first"
    )]
    AlreadyServed { volume: String, backing: PathBuf },
    #[error(
        "volume {volume} is held by migration session {session}: let it finish or abort it first"
    )]
    InUse { volume: String, session: String },
    #[error("another operation is running on volume {0}")]
    Busy(String),
    #[error("no migration session for volume {0}")]
    NoSession(String),
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("illegal phase transition: {0}")]
    Transition(String),
    #[error("state directory {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt state file {path}: {reason}")]
    CorruptState { path: PathBuf, reason: String },
    #[error("session {0} was aborted")]
    Aborted(String),
    #[error("verification failed on {volume}: first difference at offset {offset}")]
    VerifyMismatch { volume: String, offset: u64 },
    #[error("background task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Block(#[from] volmig_frontends::block::BlockError),
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

impl From<crate::state_file::StateFileError> for AgentError {
    fn from(e: crate::state_file::StateFileError) -> Self {
        use crate::state_file::StateFileError;
        match e {
            StateFileError::Io { path, source } => AgentError::State { path, source },
            StateFileError::Corrupt { path, reason } => AgentError::CorruptState { path, reason },
        }
    }
}
