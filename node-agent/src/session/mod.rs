//! A session: one migration of one volume through the eight phases.

mod driver;
pub mod record;
mod verify;

pub use driver::{Session, SessionStatus};
pub use record::{PhaseTime, SessionConfig, SessionRecord, StateDir, Verify};
pub use volmig_api::phase;
pub use volmig_api::phase::{CopyMode, Event, Phase, Policy, Progress, transition};
