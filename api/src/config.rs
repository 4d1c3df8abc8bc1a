//! What a session is asked to do: the user's settings, defined once and
//! shared by the master (its record), the agent (its checkpoint) and the
//! wire (`PrepareRequest`), with the one set of rules that makes them valid.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::phase::{CopyMode, Policy};

/// Smallest dirty-map grain: one page, the unit of every kernel block
/// frontend's I/O.
pub const MIN_GRAIN: u64 = 4096;
/// Largest dirty-map grain (a coarser map would re-copy too much per write).
pub const MAX_GRAIN: u64 = 64 << 20;

/// How the target is compared with the source at Termination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Verify {
    None,
    /// Compare a random sample of chunks.
    Sample,
    /// Compare every byte.
    #[default]
    Full,
}

impl std::str::FromStr for Verify {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(Verify::None),
            "sample" => Ok(Verify::Sample),
            "full" => Ok(Verify::Full),
            _ => Err(format!("unknown verify mode {s:?} (None, Sample or Full)")),
        }
    }
}

impl std::fmt::Display for Verify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// What the user asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionConfig {
    pub mode: CopyMode,
    pub sync_goal_ms: u64,
    /// Copy bandwidth limit in bytes per second, 0 = unlimited.
    pub bandwidth: u64,
    /// Dirty-map granularity in bytes.
    pub grain: u64,
    /// Bytes one copier request moves.
    pub chunk_size: u64,
    /// Copier requests in flight.
    pub in_flight: usize,
    /// Skip holes and zero ranges.
    pub sparse: bool,
    pub verify: Verify,
    /// Keep mirroring writes back to the source this long after redirect.
    pub failback_window_ms: u64,
    /// Cut over anyway (over the sync goal) after this many refresh passes.
    pub max_passes: u32,
}

impl Default for SessionConfig {
    fn default() -> Self {
        let p = Policy::default();
        Self {
            mode: CopyMode::Auto,
            sync_goal_ms: p.sync_goal.as_millis() as u64,
            bandwidth: 0,
            grain: 64 << 10,
            chunk_size: 1 << 20,
            in_flight: 8,
            sparse: true,
            verify: Verify::Full,
            failback_window_ms: 0,
            max_passes: p.max_passes,
        }
    }
}

impl SessionConfig {
    pub fn policy(&self) -> Policy {
        Policy {
            mode: self.mode,
            sync_goal: Duration::from_millis(self.sync_goal_ms),
            max_passes: self.max_passes,
            ..Policy::default()
        }
    }

    pub fn sync_goal(&self) -> Duration {
        Duration::from_millis(self.sync_goal_ms)
    }

    pub fn failback_window(&self) -> Duration {
        Duration::from_millis(self.failback_window_ms)
    }

    /// Rejects what no agent could run. The one place these rules live.
    pub fn validate(&self) -> Result<(), String> {
        if self.sync_goal_ms == 0 {
            return Err("sync goal must be positive".into());
        }
        validate_grain(self.grain)?;
        if self.chunk_size < self.grain {
            return Err(format!(
                "chunk size {} is smaller than the granularity {}",
                self.chunk_size, self.grain
            ));
        }
        if self.in_flight == 0 {
            return Err("the copier needs at least one request in flight".into());
        }
        Ok(())
    }
}

/// A dirty-map grain: a power of two from [`MIN_GRAIN`] to [`MAX_GRAIN`].
pub fn validate_grain(grain: u64) -> Result<(), String> {
    if !grain.is_power_of_two() || !(MIN_GRAIN..=MAX_GRAIN).contains(&grain) {
        return Err(format!(
            "granularity {grain} must be a power of two from {MIN_GRAIN} to {MAX_GRAIN}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        assert!(SessionConfig::default().validate().is_ok());
        let bad = |f: fn(&mut SessionConfig)| {
            let mut c = SessionConfig::default();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert!(bad(|c| c.sync_goal_ms = 0).contains("sync goal"));
        assert!(bad(|c| c.grain = 3000).contains("power of two"));
        assert!(bad(|c| c.grain = 2048).contains("power of two"));
        assert!(bad(|c| c.grain = 128 << 20).contains("power of two"));
        assert!(bad(|c| c.chunk_size = 4096).contains("chunk size"));
        assert!(bad(|c| c.in_flight = 0).contains("in flight"));
        assert!("sample".parse::<Verify>().unwrap() == Verify::Sample);
        assert!("x".parse::<Verify>().is_err());
    }
}
