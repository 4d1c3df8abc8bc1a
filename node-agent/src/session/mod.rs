//! A session's agent half: the slave steps, the local checkpoint and
//! verification. The phases themselves are driven by a master (the
//! operator, `volmig migrate`, the demo), over gRPC or in-process.

mod checkpoint;
mod slave;
mod verify;

pub use checkpoint::{SlaveRecord, StateDir};
pub use slave::SlaveSession;
pub use volmig_api::phase;
pub use volmig_api::phase::{CopyMode, Event, Phase, Policy, Progress, transition};
pub use volmig_api::{SessionConfig, Verify};
