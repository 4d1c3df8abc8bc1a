//! The agent: the volumes this node serves and the slave half of the
//! sessions migrating them. It is the slave of whatever master drives a
//! session (see `slave_api`); for the local control path and the demo it
//! also hosts an in-process master whose records live in its state
//! directory. On start it attaches every unfinished session again from its
//! checkpoint, and resumes the in-process masters it finds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{error, info};
use volmig_master::{
    Driver, DriverConfig, FileStore, SessionConfig, SessionRecord, SessionStore, StopSignal,
};

use crate::error::{AgentError, Result};
use crate::interposer::Interposer;
use crate::session::{Phase, SlaveSession, StateDir};
use crate::volume::{BackingDevice, OpenMode};

pub(crate) struct Volume {
    pub(crate) interposer: Arc<Interposer>,
    pub(crate) configured_path: PathBuf,
    pub(crate) slave: Option<Arc<SlaveSession>>,
    /// One slave operation per volume at a time.
    pub(crate) op: Arc<tokio::sync::Mutex<()>>,
}

/// An in-process master driving one volume's session.
struct MasterTask {
    stop: Arc<StopSignal>,
    done: watch::Receiver<bool>,
}

/// A session as `status` shows it: the master's record plus live figures
/// from the slave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionStatus {
    pub record: SessionRecord,
    pub dirty_bytes: u64,
    /// Bytes copied since this agent process took the session up.
    pub copied_this_run: u64,
    /// Workload write rate, bytes/s.
    pub write_rate: f64,
    /// Current copy rate, bytes/s.
    pub copy_rate: f64,
    pub bandwidth: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VolumeInfo {
    pub name: String,
    pub size: u64,
    /// The backing device it was asked to serve.
    pub backing: PathBuf,
    /// The backing device workload I/O goes to now.
    pub active: PathBuf,
    pub phase: Option<Phase>,
    pub session: Option<String>,
}

pub struct Agent {
    state: StateDir,
    store: FileStore,
    pub(crate) volumes: Mutex<BTreeMap<String, Volume>>,
    masters: Mutex<BTreeMap<String, MasterTask>>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The maps are only changed by whole inserts/replacements; a panic
    // elsewhere cannot leave them half-updated.
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

fn master_err(e: volmig_master::MasterError) -> AgentError {
    use volmig_master::MasterError as M;
    match e {
        M::SessionExists { volume, session } => AgentError::SessionExists { volume, session },
        M::NoSession(v) => AgentError::NoSession(v),
        M::Invalid(m) => AgentError::Invalid(m),
        M::Corrupt { path, reason } => AgentError::CorruptState { path, reason },
        M::Store { path, source } => AgentError::State { path, source },
        other => AgentError::Task(other.to_string()),
    }
}

impl Agent {
    pub fn new(state_dir: &Path) -> Result<Arc<Self>> {
        let state = StateDir::open(state_dir)?;
        let store = FileStore::open(state_dir).map_err(|e| AgentError::Task(e.to_string()))?;
        Ok(Arc::new(Self {
            state,
            store,
            volumes: Mutex::new(BTreeMap::new()),
            masters: Mutex::new(BTreeMap::new()),
        }))
    }

    pub fn state(&self) -> &StateDir {
        &self.state
    }

    /// Adds a volume backed by `path`. When the state directory holds a
    /// session checkpoint of this volume, the workload is served from the
    /// device that session made active, and an unfinished session is
    /// attached again.
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
        let checkpoint = self.state.load(name)?;
        let active_path = match &checkpoint {
            Some(r) if r.redirected => r.target.clone(),
            _ => path.to_path_buf(),
        };
        let dev = Arc::new(BackingDevice::open(
            &active_path,
            OpenMode::ReadWrite,
            direct,
        )?);
        let interposer = Arc::new(Interposer::new(name, dev));
        let slave = match checkpoint {
            Some(r) if !r.finished => {
                Some(SlaveSession::reattach(interposer.clone(), self.state.clone(), r).await?)
            }
            _ => None,
        };
        lock(&self.volumes).insert(
            name.to_string(),
            Volume {
                interposer: interposer.clone(),
                configured_path: path.to_path_buf(),
                slave,
                op: Arc::new(tokio::sync::Mutex::new(())),
            },
        );
        if let Ok(Some(rec)) = self.store.load(name).await
            && !rec.phase.is_terminal()
        {
            info!(volume = %name, phase = %rec.phase, "resuming the in-process master");
            self.spawn_master(name, rec.epoch.max(1));
        }
        Ok(interposer)
    }

    pub fn interposer(&self, name: &str) -> Result<Arc<Interposer>> {
        lock(&self.volumes)
            .get(name)
            .map(|v| v.interposer.clone())
            .ok_or_else(|| AgentError::UnknownVolume(name.to_string()))
    }

    pub(crate) fn slave(&self, volume: &str) -> Option<Arc<SlaveSession>> {
        lock(&self.volumes)
            .get(volume)
            .and_then(|v| v.slave.clone())
    }

    fn spawn_master(self: &Arc<Self>, volume: &str, epoch: u64) {
        let stop = Arc::new(StopSignal::default());
        let (tx, rx) = watch::channel(false);
        let driver = Driver::new(
            self.clone(),
            self.store.clone(),
            volume,
            DriverConfig {
                epoch,
                ..DriverConfig::default()
            },
            stop.clone(),
        );
        let vol = volume.to_string();
        tokio::spawn(async move {
            match driver.run().await {
                Ok(rec) => info!(volume = %vol, phase = %rec.phase, "master stopped"),
                Err(e) => error!(volume = %vol, error = %e, "master failed"),
            }
            let _ = tx.send(true);
        });
        lock(&self.masters).insert(volume.to_string(), MasterTask { stop, done: rx });
    }

    /// Starts migrating `volume` to `target`, driven by an in-process master.
    pub async fn migrate(
        self: &Arc<Self>,
        volume: &str,
        target: &Path,
        config: SessionConfig,
    ) -> Result<SessionStatus> {
        {
            let vols = lock(&self.volumes);
            let v = vols
                .get(volume)
                .ok_or_else(|| AgentError::UnknownVolume(volume.to_string()))?;
            if let Some(s) = &v.slave
                && !s.is_finished()
            {
                return Err(AgentError::SessionExists {
                    volume: volume.to_string(),
                    session: s.session_id(),
                });
            }
        }
        volmig_master::create_session(&self.store, volume, target, config, 1)
            .await
            .map_err(master_err)?;
        self.spawn_master(volume, 1);
        // Activation errors (a bad target...) are the caller's to see now.
        let mut rx = lock(&self.masters).get(volume).map(|m| m.done.clone());
        loop {
            let st = self.status(volume)?;
            match st.record.phase {
                Phase::Activating => {}
                Phase::Failed if st.record.phase_times.len() <= 1 => {
                    let msg = st.record.error.unwrap_or_default();
                    let _ = std::fs::remove_file(self.store.path(volume));
                    return Err(AgentError::Invalid(
                        msg.trim_start_matches("Activating: ").to_string(),
                    ));
                }
                _ => return Ok(st),
            }
            match rx.as_mut() {
                Some(rx) => {
                    let _ =
                        tokio::time::timeout(std::time::Duration::from_millis(20), rx.changed())
                            .await;
                }
                None => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    }

    /// The session's record (the in-process master's) with live figures.
    pub fn status(&self, volume: &str) -> Result<SessionStatus> {
        let Some(record) = self.store.load_now(volume).map_err(master_err)? else {
            if lock(&self.volumes).contains_key(volume) {
                return Err(AgentError::NoSession(volume.to_string()));
            }
            return Err(AgentError::UnknownVolume(volume.to_string()));
        };
        let slave = self
            .slave(volume)
            .filter(|s| s.session_id() == record.session);
        let (dirty, copied, rate, bw) = match &slave {
            Some(s) => {
                let r = s.record();
                (
                    if r.finished { 0 } else { record.dirty_bytes },
                    s.copied(),
                    s.rates(),
                    r.config.bandwidth,
                )
            }
            None => (0, 0, (0.0, 0.0), record.config.bandwidth),
        };
        Ok(SessionStatus {
            dirty_bytes: dirty,
            copied_this_run: copied,
            write_rate: rate.0,
            copy_rate: rate.1,
            bandwidth: bw,
            record,
        })
    }

    /// Asks the volume's session to abort.
    pub async fn abort(&self, volume: &str) -> Result<()> {
        volmig_master::request_abort(&self.store, volume)
            .await
            .map_err(master_err)?;
        if let Some(s) = self.slave(volume) {
            s.interrupt();
        }
        Ok(())
    }

    pub async fn set_bandwidth(&self, volume: &str, bytes_per_sec: u64) -> Result<()> {
        volmig_master::set_bandwidth(&self.store, volume, bytes_per_sec)
            .await
            .map_err(master_err)?;
        if let Some(s) = self.slave(volume) {
            s.set_bandwidth(bytes_per_sec)?;
        }
        Ok(())
    }

    /// Waits until the volume's in-process master has finished.
    pub async fn wait(&self, volume: &str) -> Result<SessionStatus> {
        let rx = lock(&self.masters).get(volume).map(|m| m.done.clone());
        if let Some(mut rx) = rx {
            while !*rx.borrow_and_update() {
                if rx.changed().await.is_err() {
                    break;
                }
            }
        }
        self.status(volume)
    }

    pub fn list(&self) -> Vec<VolumeInfo> {
        type Entry = (String, PathBuf, Arc<Interposer>, Option<Arc<SlaveSession>>);
        let vols: Vec<Entry> = lock(&self.volumes)
            .iter()
            .map(|(n, v)| {
                (
                    n.clone(),
                    v.configured_path.clone(),
                    v.interposer.clone(),
                    v.slave.clone(),
                )
            })
            .collect();
        vols.into_iter()
            .map(|(name, backing, ip, slave)| {
                let phase = self.status(&name).ok().map(|s| s.record.phase);
                VolumeInfo {
                    backing,
                    size: ip.size(),
                    active: ip.active().path().to_path_buf(),
                    phase,
                    session: slave.map(|s| s.session_id()),
                    name,
                }
            })
            .collect()
    }

    /// The path the volume was configured with.
    pub fn configured_path(&self, volume: &str) -> Option<PathBuf> {
        lock(&self.volumes)
            .get(volume)
            .map(|v| v.configured_path.clone())
    }

    /// Stops the in-process masters; sessions stay for the next start.
    pub async fn shutdown(&self) {
        let tasks: Vec<MasterTask> = std::mem::take(&mut *lock(&self.masters))
            .into_values()
            .collect();
        for t in &tasks {
            t.stop.stop();
        }
        for mut t in tasks {
            while !*t.done.borrow_and_update() {
                if t.done.changed().await.is_err() {
                    break;
                }
            }
        }
    }
}
