//! The operator's error type.

use volmig_master::MasterError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("session: {0}")]
    Master(#[from] MasterError),
    #[error("agent {endpoint}: {reason}")]
    Agent { endpoint: String, reason: String },
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("VolumeMigration {0} has no namespace or name")]
    Unnamed(String),
    #[error("waiting for the session of {0} to roll back before removing the finalizer")]
    WaitingForRollback(String),
    #[error("TLS files: {0}")]
    Tls(String),
    #[error("the cache of {0} stopped")]
    CacheGone(&'static str),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
