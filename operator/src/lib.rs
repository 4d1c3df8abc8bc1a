//! volmig operator: the master of the node agents in a cluster. It
//! reconciles VolumeMigration resources, keeps each session's record (the
//! communication data set) in the resource's status and drives the phases
//! through the master's `volmig_master::Supervisor`.

pub mod agents;
pub mod cache;
pub mod crd_gen;
pub mod csi;
pub mod error;
pub mod health;
pub mod holder_policy;
pub mod leader;
pub mod metrics;
pub mod observe;
pub mod rbac;
pub mod reconcile;
pub mod run;
pub mod startup;
pub mod status_map;
pub mod status_store;
pub mod target;
pub mod tls_issuer;

pub use error::{Error, Result};
