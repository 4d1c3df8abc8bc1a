//! The session record: the communication data set. What a session is and
//! how far it got, kept by the master in its [`SessionStore`](crate::store)
//! (a state file locally, the VolumeMigration status in a cluster), never on
//! source or target, after every phase change and while copying.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use volmig_api::agent;
use volmig_api::phase::{CopyMode, Phase, Policy, Progress};

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

/// What the user asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionConfig {
    pub mode: CopyMode,
    pub sync_goal_ms: u64,
    /// Copy bandwidth limit in bytes per second, 0 = unlimited.
    pub bandwidth: u64,
    pub grain: u64,
    pub chunk_size: u64,
    pub in_flight: usize,
    pub sparse: bool,
    pub verify: Verify,
    /// Keep mirroring writes back to the source this long after redirect.
    pub failback_window_ms: u64,
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

    /// What the slave needs to know of it.
    pub fn to_wire(&self) -> agent::SessionConfig {
        agent::SessionConfig {
            mode: match self.mode {
                CopyMode::Background => agent::CopyMode::Background,
                CopyMode::Mirror => agent::CopyMode::Mirror,
                CopyMode::Auto => agent::CopyMode::Auto,
            } as i32,
            sync_goal_ms: self.sync_goal_ms,
            bandwidth: self.bandwidth,
            grain: self.grain,
            chunk_size: self.chunk_size,
            in_flight: self.in_flight as u32,
            sparse: self.sparse,
        }
    }

    /// Rejects what no slave could run.
    pub fn validate(&self) -> Result<(), String> {
        if self.sync_goal_ms == 0 {
            return Err("sync goal must be positive".into());
        }
        if !self.grain.is_power_of_two() || self.grain < 4096 {
            return Err(format!(
                "granularity {} must be a power of two of at least 4096",
                self.grain
            ));
        }
        if self.chunk_size < self.grain {
            return Err(format!(
                "chunk size {} is smaller than the granularity {}",
                self.chunk_size, self.grain
            ));
        }
        Ok(())
    }
}

impl Verify {
    pub fn to_wire(self) -> agent::Verify {
        match self {
            Verify::None => agent::Verify::None,
            Verify::Sample => agent::Verify::Sample,
            Verify::Full => agent::Verify::Full,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseTime {
    pub phase: Phase,
    /// Milliseconds since the Unix epoch.
    pub start_ms: u64,
    pub end_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Bumped by every save; a save expecting another revision fails
    /// (optimistic concurrency between masters and `abort` requests).
    #[serde(default)]
    pub revision: u64,
    /// The epoch of the master driving it (fencing).
    #[serde(default)]
    pub epoch: u64,
    pub session: String,
    pub volume: String,
    /// Where the slave agent is reached (local mode; empty in-process).
    #[serde(default)]
    pub agent: String,
    pub source: PathBuf,
    pub target: PathBuf,
    pub size: u64,
    pub config: SessionConfig,
    pub phase: Phase,
    pub progress: Progress,
    /// The workload's active device is the target (set in Redirecting,
    /// before I/O is released).
    pub redirected: bool,
    pub abort_requested: bool,
    pub bytes_copied: u64,
    /// Estimated copy rate (data, flush included), bytes/s.
    pub copy_rate: f64,
    #[serde(default)]
    pub dirty_bytes: u64,
    /// Workload writes, bytes/s (latest sample).
    #[serde(default)]
    pub write_rate: f64,
    pub phase_times: Vec<PhaseTime>,
    pub cutover_stall_ms: Option<f64>,
    /// Times the agent picked the session up again after a restart.
    pub resumes: u32,
    pub error: Option<String>,
    pub verified: Option<bool>,
    /// The consistency group this session cuts over with, if any.
    #[serde(default)]
    pub group: Option<String>,
    /// Waiting for a free session slot (the concurrency limit).
    #[serde(default)]
    pub queued: bool,
    /// Multi-attach volumes: the other agents serving the volume, which
    /// monitor their writes for the copying agent (`agent`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_with: Vec<String>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl SessionRecord {
    pub fn new(
        volume: &str,
        source: &Path,
        target: &Path,
        size: u64,
        config: SessionConfig,
    ) -> Self {
        let session = format!("{volume}-{}", now_ms());
        Self {
            revision: 0,
            epoch: 0,
            session,
            agent: String::new(),
            volume: volume.to_string(),
            source: source.to_path_buf(),
            target: target.to_path_buf(),
            size,
            config,
            phase: Phase::Activating,
            progress: Progress::default(),
            redirected: false,
            abort_requested: false,
            bytes_copied: 0,
            copy_rate: 0.0,
            dirty_bytes: 0,
            write_rate: 0.0,
            phase_times: vec![PhaseTime {
                phase: Phase::Activating,
                start_ms: now_ms(),
                end_ms: None,
            }],
            cutover_stall_ms: None,
            resumes: 0,
            error: None,
            verified: None,
            group: None,
            queued: false,
            shared_with: Vec::new(),
        }
    }

    /// Records entering `next` in the phase timeline.
    pub fn enter(&mut self, next: Phase) {
        let t = now_ms();
        if let Some(last) = self.phase_times.last_mut()
            && last.end_ms.is_none()
        {
            last.end_ms = Some(t);
        }
        self.phase = next;
        if !next.is_terminal() {
            self.phase_times.push(PhaseTime {
                phase: next,
                start_ms: t,
                end_ms: None,
            });
        }
    }
}

impl SessionRecord {
    /// The human-readable status: where, how far, the phase timeline.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        use volmig_api::units::human_bytes;
        let r = self;
        let mut o = String::new();
        let pct = if r.size > 0 {
            100.0 * r.bytes_copied.min(r.size) as f64 / r.size as f64
        } else {
            0.0
        };
        let via = if r.agent.is_empty() {
            "the local agent"
        } else {
            r.agent.as_str()
        };
        let _ = writeln!(
            o,
            "volume      {}  ({} -> {}) via {via}",
            r.volume,
            r.source.display(),
            r.target.display()
        );
        if !r.shared_with.is_empty() {
            let _ = writeln!(
                o,
                "shared by   {} (multi-attach: they monitor, {via} copies)",
                r.shared_with.join(", ")
            );
        }
        let _ = writeln!(o, "session     {} (epoch {})", r.session, r.epoch);
        let err = r
            .error
            .as_ref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        let queued = if r.queued {
            " (queued: waiting for a free session slot)"
        } else {
            ""
        };
        let _ = writeln!(o, "phase       {}{queued}{err}", r.phase);
        if let Some(g) = &r.group {
            let _ = writeln!(
                o,
                "group       {g} (cuts over together with its other volumes)"
            );
        }
        let _ = writeln!(
            o,
            "copied      {} ({pct:.0}% of {}), {} refresh passes, mirror {}",
            human_bytes(r.bytes_copied as f64),
            human_bytes(r.size as f64),
            r.progress.passes,
            if r.progress.mirror { "on" } else { "off" }
        );
        let _ = writeln!(o, "dirty       {}", human_bytes(r.dirty_bytes as f64));
        if let Some(s) = r.cutover_stall_ms {
            let _ = writeln!(
                o,
                "stall       {s:.1} ms (sync goal {} ms)",
                r.config.sync_goal_ms
            );
        }
        if let Some(v) = r.verified {
            let _ = writeln!(o, "verified    {}", if v { "yes" } else { "NO" });
        }
        let t0 = r.phase_times.first().map(|p| p.start_ms).unwrap_or(0);
        for p in &r.phase_times {
            let d = p
                .end_ms
                .map(|e| format!("{} ms", e.saturating_sub(p.start_ms)))
                .unwrap_or_else(|| "running".into());
            let _ = writeln!(
                o,
                "  {:>7.3}s  {:<14} {d}",
                p.start_ms.saturating_sub(t0) as f64 / 1e3,
                p.phase.to_string()
            );
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_closes_phases() {
        let mut r = SessionRecord::new(
            "v",
            Path::new("/a"),
            Path::new("/b"),
            100,
            SessionConfig::default(),
        );
        r.enter(Phase::Copying);
        r.enter(Phase::Completed);
        assert_eq!(r.phase_times.len(), 2);
        assert!(r.phase_times.iter().all(|p| p.end_ms.is_some()));
        assert_eq!(r.phase, Phase::Completed);
    }

    #[test]
    fn config_validation() {
        assert!(SessionConfig::default().validate().is_ok());
        assert!(
            SessionConfig {
                sync_goal_ms: 0,
                ..SessionConfig::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            SessionConfig {
                grain: 3000,
                ..SessionConfig::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            SessionConfig {
                chunk_size: 4096,
                ..SessionConfig::default()
            }
            .validate()
            .is_err()
        );
    }
}
