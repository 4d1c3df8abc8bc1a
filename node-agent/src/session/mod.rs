//! A session: one migration of one volume through the eight phases.

mod driver;
pub mod phase;
pub mod record;
mod verify;

pub use driver::{Session, SessionStatus};
pub use phase::{CopyMode, Event, Phase, Policy, Progress, transition};
pub use record::{PhaseTime, SessionConfig, SessionRecord, StateDir, Verify};
