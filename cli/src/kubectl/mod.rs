//! `kubectl volmig`: create, watch, abort and list `VolumeMigration`s, and
//! upgrade the node agents in place.
//!
//! [`args`] is the command line, [`build`] turns `migrate` arguments into a
//! resource (no cluster needed), [`render`] formats status and lists, and
//! [`client`] talks to the API server; [`upgrade`] moves the node agents
//! to a new image in place.

pub mod args;
pub mod build;
pub mod client;
pub mod render;
pub mod upgrade;

/// Errors of the plugin; each message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid arguments: {0}")]
    Args(String),
    #[error("the migration would be refused: {}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error("cannot write YAML: {0}")]
    Yaml(String),
    #[error("kubeconfig: {0}")]
    Config(String),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("migration {0} ended {1}")]
    Ended(String, String),
    #[error("watching the migration: {0}")]
    Watch(#[from] kube::runtime::watcher::Error),
    #[error("migration {0} not found (or deleted)")]
    Gone(String),
    #[error("writing the output: {0}")]
    Output(String),
    #[error("upgrade-agents: {0}")]
    Upgrade(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
