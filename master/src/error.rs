//! The master's error type.

use std::path::PathBuf;

use volmig_api::SlaveError;
use volmig_api::phase::BadTransition;

#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error("session store {path}: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt session record {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("session record {key} changed under us (revision {expected} expected, {found} found)")]
    Conflict {
        key: String,
        expected: u64,
        found: u64,
    },
    #[error("no session {0}")]
    NoSession(String),
    #[error("volume {volume} already has a session in progress ({session})")]
    SessionExists { volume: String, session: String },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("slave: {0}")]
    Slave(#[from] SlaveError),
    #[error("this master was deposed (a newer epoch drives the session): {0}")]
    Deposed(String),
    #[error("phase machine: {0}")]
    Phase(#[from] BadTransition),
    #[error("driver of {key} panicked: {reason}")]
    Panicked { key: String, reason: String },
}

pub type Result<T, E = MasterError> = std::result::Result<T, E>;
