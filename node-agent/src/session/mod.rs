//! A session's agent half: the slave steps, the local checkpoint and
//! verification. The phases themselves are driven by the master
//! (`volmig-master`), in this process or over gRPC.

mod checkpoint;
mod slave;
mod verify;

pub use crate::agent::SessionStatus;
pub use checkpoint::{SlaveRecord, StateDir};
pub use slave::SlaveSession;
pub use volmig_api::phase;
pub use volmig_api::phase::{CopyMode, Event, Phase, Policy, Progress, transition};
pub use volmig_api::{SessionConfig, Verify};
pub use volmig_master::{PhaseTime, SessionRecord};
