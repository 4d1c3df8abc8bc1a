//! The agent: the volumes this node serves and the sessions migrating them.
//! On start it picks up every unfinished session found in its state
//! directory; one session per volume at a time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tracing::{error, info};

use crate::error::{AgentError, Result};
use crate::interposer::Interposer;
use crate::session::{Phase, Session, SessionConfig, SessionStatus, StateDir};
use crate::volume::{BackingDevice, OpenMode};

struct Volume {
    interposer: Arc<Interposer>,
    configured_path: PathBuf,
    session: Option<(Arc<Session>, JoinHandle<()>)>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VolumeInfo {
    pub name: String,
    pub size: u64,
    /// The backing device workload I/O goes to now.
    pub active: PathBuf,
    pub phase: Option<Phase>,
}

pub struct Agent {
    state: StateDir,
    volumes: Mutex<BTreeMap<String, Volume>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The map is only changed by whole inserts/replacements; a panic
    // elsewhere cannot leave it half-updated.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn valid_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(AgentError::Invalid(format!(
            "volume name {name:?} must be 1-128 characters of [A-Za-z0-9._-]"
        )))
    }
}

impl Agent {
    pub fn new(state_dir: &Path) -> Result<Arc<Self>> {
        Ok(Arc::new(Self {
            state: StateDir::open(state_dir)?,
            volumes: Mutex::new(BTreeMap::new()),
        }))
    }

    pub fn state(&self) -> &StateDir {
        &self.state
    }

    /// Adds a volume backed by `path`. When the state directory holds a
    /// session of this volume, the workload is served from the device that
    /// session made active, and an unfinished session is resumed.
    pub async fn add_volume(
        self: &Arc<Self>,
        name: &str,
        path: &Path,
        direct: bool,
    ) -> Result<Arc<Interposer>> {
        valid_name(name)?;
        if lock(&self.volumes).contains_key(name) {
            return Err(AgentError::Invalid(format!(
                "volume {name} is already served"
            )));
        }
        let record = self.state.load(name)?;
        let active_path = match &record {
            Some(r) if r.redirected && r.phase != Phase::Aborted => r.target.clone(),
            _ => path.to_path_buf(),
        };
        let dev = Arc::new(BackingDevice::open(
            &active_path,
            OpenMode::ReadWrite,
            direct,
        )?);
        let interposer = Arc::new(Interposer::new(name, dev));
        lock(&self.volumes).insert(
            name.to_string(),
            Volume {
                interposer: interposer.clone(),
                configured_path: path.to_path_buf(),
                session: None,
            },
        );
        if let Some(r) = record
            && !r.phase.is_terminal()
        {
            let session = Session::resume(interposer.clone(), self.state.clone(), r).await?;
            self.spawn(name, session);
        }
        Ok(interposer)
    }

    pub fn interposer(&self, name: &str) -> Result<Arc<Interposer>> {
        lock(&self.volumes)
            .get(name)
            .map(|v| v.interposer.clone())
            .ok_or_else(|| AgentError::UnknownVolume(name.to_string()))
    }

    fn spawn(self: &Arc<Self>, name: &str, session: Arc<Session>) {
        let s = session.clone();
        let vol = name.to_string();
        let handle = tokio::spawn(async move {
            match s.run().await {
                Ok(p) => info!(volume = %vol, phase = %p, "session driver stopped"),
                Err(e) => error!(volume = %vol, error = %e, "session driver failed"),
            }
        });
        if let Some(v) = lock(&self.volumes).get_mut(name) {
            v.session = Some((session, handle));
        }
    }

    /// Starts migrating `volume` to `target`.
    pub async fn migrate(
        self: &Arc<Self>,
        volume: &str,
        target: &Path,
        config: SessionConfig,
    ) -> Result<SessionStatus> {
        let interposer = {
            let vols = lock(&self.volumes);
            let v = vols
                .get(volume)
                .ok_or_else(|| AgentError::UnknownVolume(volume.to_string()))?;
            if let Some((s, _)) = &v.session
                && !s.phase().is_terminal()
            {
                return Err(AgentError::SessionExists {
                    volume: volume.to_string(),
                    session: s.status().record.session,
                });
            }
            v.interposer.clone()
        };
        let session = match Session::activate(interposer, self.state.clone(), target, config).await
        {
            Ok(s) => s,
            Err(e) => {
                // Nothing was attached: forget the half-made record unless it
                // belongs to a session that is still running.
                if !matches!(e, AgentError::SessionExists { .. }) {
                    let _ = std::fs::remove_file(self.state.record_path(volume));
                    self.state.remove_dirty_map(volume);
                }
                return Err(e);
            }
        };
        let status = session.status();
        self.spawn(volume, session);
        Ok(status)
    }

    fn session(&self, volume: &str) -> Result<Arc<Session>> {
        let vols = lock(&self.volumes);
        let v = vols
            .get(volume)
            .ok_or_else(|| AgentError::UnknownVolume(volume.to_string()))?;
        v.session
            .as_ref()
            .map(|(s, _)| s.clone())
            .ok_or_else(|| AgentError::NoSession(volume.to_string()))
    }

    /// The live session's status, or the last persisted record.
    pub fn status(&self, volume: &str) -> Result<SessionStatus> {
        match self.session(volume) {
            Ok(s) => Ok(s.status()),
            Err(AgentError::NoSession(_)) => {
                let r = self
                    .state
                    .load(volume)?
                    .ok_or_else(|| AgentError::NoSession(volume.to_string()))?;
                Ok(SessionStatus {
                    record: r,
                    dirty_bytes: 0,
                    copied_this_run: 0,
                    write_rate: 0.0,
                    copy_rate: 0.0,
                    bandwidth: 0,
                })
            }
            Err(e) => Err(e),
        }
    }

    pub fn abort(&self, volume: &str) -> Result<()> {
        self.session(volume)?.request_abort()
    }

    pub fn set_bandwidth(&self, volume: &str, bytes_per_sec: u64) -> Result<()> {
        self.session(volume)?.set_bandwidth(bytes_per_sec)
    }

    /// Waits until the volume's session reaches a terminal phase.
    pub async fn wait(&self, volume: &str) -> Result<SessionStatus> {
        let s = self.session(volume)?;
        let mut rx = s.watch();
        while !rx.borrow_and_update().is_terminal() {
            if rx.changed().await.is_err() {
                break;
            }
        }
        Ok(s.status())
    }

    pub fn list(&self) -> Vec<VolumeInfo> {
        lock(&self.volumes)
            .iter()
            .map(|(name, v)| VolumeInfo {
                name: name.clone(),
                size: v.interposer.size(),
                active: v.interposer.active().path().to_path_buf(),
                phase: v.session.as_ref().map(|(s, _)| s.phase()),
            })
            .collect()
    }

    /// The path the volume was configured with.
    pub fn configured_path(&self, volume: &str) -> Option<PathBuf> {
        lock(&self.volumes)
            .get(volume)
            .map(|v| v.configured_path.clone())
    }

    /// Stops every session driver; their state stays for the next start.
    pub async fn shutdown(&self) {
        let handles: Vec<_> = lock(&self.volumes)
            .values_mut()
            .filter_map(|v| v.session.take())
            .collect();
        for (s, h) in handles {
            s.shutdown();
            let _ = h.await;
        }
    }
}
