//! The session record: what a session is and how far it got, persisted in the
//! agent's state directory (never on source or target) after every phase
//! change and periodically while copying. Written atomically (temp + rename).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::phase::{CopyMode, Phase, Policy, Progress};
use crate::copy::CopyConfig;
use crate::error::{AgentError, Result};

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
        let c = CopyConfig::default();
        let p = Policy::default();
        Self {
            mode: CopyMode::Auto,
            sync_goal_ms: p.sync_goal.as_millis() as u64,
            bandwidth: 0,
            grain: 64 << 10,
            chunk_size: c.chunk_size,
            in_flight: c.in_flight,
            sparse: c.sparse,
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

    pub fn copy(&self) -> CopyConfig {
        CopyConfig {
            chunk_size: self.chunk_size,
            in_flight: self.in_flight,
            sparse: self.sparse,
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
    pub session: String,
    pub volume: String,
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
    pub copy_rate: f64,
    pub phase_times: Vec<PhaseTime>,
    pub cutover_stall_ms: Option<f64>,
    /// Times the agent picked the session up again after a restart.
    pub resumes: u32,
    pub error: Option<String>,
    pub verified: Option<bool>,
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
            session,
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
            phase_times: vec![PhaseTime {
                phase: Phase::Activating,
                start_ms: now_ms(),
                end_ms: None,
            }],
            cutover_stall_ms: None,
            resumes: 0,
            error: None,
            verified: None,
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

/// The session files of one agent.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn open(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root).map_err(|source| AgentError::State {
            path: root.to_path_buf(),
            source,
        })?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn record_path(&self, volume: &str) -> PathBuf {
        self.root.join(format!("{volume}.session.json"))
    }

    pub fn dirty_map_path(&self, volume: &str) -> PathBuf {
        self.root.join(format!("{volume}.dirty"))
    }

    pub fn save(&self, rec: &SessionRecord) -> Result<()> {
        let path = self.record_path(&rec.volume);
        let tmp = path.with_extension("json.tmp");
        let err = |source| AgentError::State {
            path: path.clone(),
            source,
        };
        let data = serde_json::to_vec_pretty(rec).map_err(|e| err(std::io::Error::other(e)))?;
        std::fs::write(&tmp, data).map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)?;
        Ok(())
    }

    pub fn load(&self, volume: &str) -> Result<Option<SessionRecord>> {
        let path = self.record_path(volume);
        match std::fs::read(&path) {
            Ok(data) => {
                serde_json::from_slice(&data)
                    .map(Some)
                    .map_err(|e| AgentError::CorruptState {
                        path,
                        reason: e.to_string(),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(AgentError::State { path, source }),
        }
    }

    pub fn remove_dirty_map(&self, volume: &str) {
        let _ = std::fs::remove_file(self.dirty_map_path(volume));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_roundtrip_and_timeline() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::open(dir.path()).unwrap();
        assert_eq!(sd.load("v").unwrap(), None);
        let mut r = SessionRecord::new(
            "v",
            Path::new("/a"),
            Path::new("/b"),
            100,
            SessionConfig::default(),
        );
        r.enter(Phase::Copying);
        r.enter(Phase::Completed);
        sd.save(&r).unwrap();
        let back = sd.load("v").unwrap().unwrap();
        assert_eq!(back, r);
        assert_eq!(back.phase_times.len(), 2);
        assert!(back.phase_times.iter().all(|p| p.end_ms.is_some()));
        std::fs::write(sd.record_path("w"), b"{not json").unwrap();
        assert!(matches!(sd.load("w"), Err(AgentError::CorruptState { .. })));
    }
}
