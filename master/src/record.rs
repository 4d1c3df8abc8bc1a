//! The session record: the communication data set. What a session is and
//! how far it got, kept by the master in its [`SessionStore`](crate::store)
//! (a state file locally, the VolumeMigration status in a cluster), never on
//! source or target, after every phase change and while copying.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
pub use volmig_api::config::{SessionConfig, Verify};
use volmig_api::phase::{Phase, Progress};

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
}
