//! The command-line options of a session, shared by `volmig migrate` and
//! `volmig demo` so they read and default the same.

use clap::Args;

use crate::session::{CopyMode, SessionConfig, Verify};
use crate::units::{parse_duration, parse_size};

/// Session options, the same for every command that starts a migration.
#[derive(Args, Clone, Debug)]
pub struct SessionArgs {
    /// Background, Mirror or Auto.
    #[arg(long, default_value = "Auto")]
    pub mode: CopyMode,
    /// Longest acceptable I/O stall at cutover.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub sync_goal: std::time::Duration,
    /// Copy bandwidth limit per second (0 = unlimited), e.g. 200Mi.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub bandwidth: u64,
    /// Dirty-map granularity.
    #[arg(long, default_value = "64Ki", value_parser = parse_size)]
    pub grain: u64,
    /// None, Sample or Full.
    #[arg(long, default_value = "Full")]
    pub verify: Verify,
    /// Keep mirroring writes back to the source this long after cutover.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub failback_window: std::time::Duration,
    /// Background mode: cut over anyway after this many refresh passes.
    #[arg(long, default_value_t = 30)]
    pub max_passes: u32,
}

impl SessionArgs {
    pub fn config(&self) -> SessionConfig {
        SessionConfig {
            mode: self.mode,
            sync_goal_ms: self.sync_goal.as_millis() as u64,
            bandwidth: self.bandwidth,
            grain: self.grain,
            verify: self.verify,
            failback_window_ms: self.failback_window.as_millis() as u64,
            max_passes: self.max_passes,
            ..SessionConfig::default()
        }
    }
}
