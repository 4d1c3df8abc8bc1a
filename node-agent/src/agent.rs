//! The agent: the volumes this node serves and the slave half of the
//! sessions migrating them. It is a slave only: masters (the operator,
//! `volmig migrate`, the demo) drive sessions through the [`Slave`]
//! contract (`slave_api`), over gRPC or in-process.
//!
//! Volumes are served at runtime ([`Agent::serve`], [`Agent::unserve`]):
//! each request is persisted in the state directory before the device is
//! opened, so a restarted agent serves the same volumes ([`Agent::restore`])
//! and attaches their unfinished sessions again from their checkpoints. A
//! device that cannot be opened fails that volume only: it is listed with
//! its error, and serving it again retries.
//!
//! [`Slave`]: volmig_api::Slave

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};
use volmig_api::slave::{ServeVolume, VolumeInfo};

use crate::error::{AgentError, Result};
use crate::interposer::Interposer;
use crate::serving::{Frontends, ServedDir, ServedRecord};
use crate::session::{SlaveRecord, SlaveSession, StateDir};
use crate::volume::{BackingDevice, OpenMode};

/// How long `unserve` waits for the volume's last users (connections that
/// are closing, calls in flight) to let go of its device.
const RELEASE_WAIT: Duration = Duration::from_secs(10);

/// How long `resize` waits for the volume's requests in flight to finish
/// before it changes the volume's size.
const GROW_DRAIN: Duration = Duration::from_secs(10);

pub(crate) struct Volume {
    pub(crate) interposer: Arc<Interposer>,
    /// What it was asked to serve (persisted).
    pub(crate) served: ServedRecord,
    pub(crate) slave: Option<Arc<SlaveSession>>,
    /// One slave operation per volume at a time.
    pub(crate) op: Arc<tokio::sync::Mutex<()>>,
}

/// A volume the agent was asked to serve and could not.
struct Failed {
    served: ServedRecord,
    error: String,
}

pub struct Agent {
    state: StateDir,
    served: ServedDir,
    frontends: Frontends,
    pub(crate) volumes: Mutex<BTreeMap<String, Volume>>,
    failed: Mutex<BTreeMap<String, Failed>>,
    /// Serve and unserve calls run one at a time.
    serving: tokio::sync::Mutex<()>,
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

impl Volume {
    fn info(&self) -> VolumeInfo {
        VolumeInfo {
            name: self.served.volume.clone(),
            size: self.interposer.size(),
            backing: self.served.backing.clone(),
            active: self.interposer.active().path().to_path_buf(),
            session: self.slave.as_ref().map(|s| s.session_id()),
            frontends: self.served.frontends.clone(),
            device: self.served.device.as_ref().map(|d| d.path.clone()),
            device_kind: self.served.device.as_ref().map(|d| d.kind),
            error: None,
        }
    }
}

impl Failed {
    fn info(&self) -> VolumeInfo {
        VolumeInfo {
            name: self.served.volume.clone(),
            size: 0,
            backing: self.served.backing.clone(),
            active: PathBuf::new(),
            session: None,
            frontends: self.served.frontends.clone(),
            device: self.served.device.as_ref().map(|d| d.path.clone()),
            device_kind: self.served.device.as_ref().map(|d| d.kind),
            error: Some(self.error.clone()),
        }
    }
}

/// The device a volume is served from, given its session checkpoint: the
/// target once a session redirected to it. Refuses a checkpoint of an
/// unfinished session that another device was the source of (serving
/// that device would hide the session's writes from it).
fn active_device(rec: &ServedRecord, checkpoint: Option<&SlaveRecord>) -> Result<PathBuf> {
    Ok(match checkpoint {
        Some(c) if !c.finished && c.source != rec.backing => {
            return Err(AgentError::Invalid(format!(
                "volume {} has an unfinished migration session {} from {}; serve it from that device",
                rec.volume,
                c.session_id,
                c.source.display()
            )));
        }
        Some(c) if c.redirected && (!c.finished || c.source == rec.backing) => c.target.clone(),
        _ => rec.backing.clone(),
    })
}

impl Agent {
    /// An agent whose volumes are used in-process only (no frontend).
    pub fn new(state_dir: &Path) -> Result<Arc<Self>> {
        Self::with_frontends(state_dir, Frontends::none())
    }

    /// An agent that serves its volumes through `frontends`.
    pub fn with_frontends(state_dir: &Path, frontends: Frontends) -> Result<Arc<Self>> {
        Ok(Arc::new(Self {
            state: StateDir::open(state_dir)?,
            served: ServedDir::open(state_dir)?,
            frontends,
            volumes: Mutex::new(BTreeMap::new()),
            failed: Mutex::new(BTreeMap::new()),
            serving: tokio::sync::Mutex::new(()),
        }))
    }

    pub fn state(&self) -> &StateDir {
        &self.state
    }

    pub fn frontends(&self) -> &Frontends {
        &self.frontends
    }

    /// Serves every volume persisted in the state directory again (at
    /// start-up). A volume that fails is logged and listed with its error;
    /// the others are served. Returns how many are served.
    pub async fn restore(&self) -> Result<usize> {
        let _one = self.serving.lock().await;
        let mut served = 0;
        for (volume, rec) in self.served.load_all()? {
            if lock(&self.volumes).contains_key(&volume) {
                served += 1;
                continue;
            }
            let rec = match rec {
                Ok(r) => r,
                Err(e) => {
                    warn!(%volume, error = %e, "cannot read what this volume was served as");
                    let served = ServedRecord {
                        volume: volume.clone(),
                        backing: PathBuf::new(),
                        requested: PathBuf::new(),
                        frontends: Vec::new(),
                        direct: false,
                        device: None,
                    };
                    let error = e.to_string();
                    lock(&self.failed).insert(volume, Failed { served, error });
                    continue;
                }
            };
            if self.open(rec).await.is_ok() {
                served += 1;
            }
        }
        // Requests of kernel devices nobody served again fail from now on.
        if let Some(b) = self.frontends.block() {
            b.restored();
        }
        Ok(served)
    }

    /// Serves a volume: persists the request, opens the backing device (the
    /// target of a session that redirected to it), attaches an unfinished
    /// session again, and registers the volume with its frontends.
    /// Idempotent for the same settings; other settings for a served
    /// volume are refused. A device that cannot be opened leaves the volume
    /// failed (listed with the error) and changes nothing else.
    pub async fn serve(&self, r: ServeVolume) -> Result<VolumeInfo> {
        valid_name(&r.volume)?;
        self.frontends.check(&r.frontends)?;
        let _one = self.serving.lock().await;
        if let Some(v) = lock(&self.volumes).get(&r.volume) {
            return if v.served.same_as(&r) {
                Ok(v.info())
            } else {
                Err(AgentError::AlreadyServed {
                    volume: r.volume.clone(),
                    backing: v.served.backing.clone(),
                })
            };
        }
        // A restarted agent asked again for what it served: keep the record
        // (its backing may be a migration's target).
        let rec = match self.served.load(&r.volume) {
            Ok(Some(p)) if p.same_as(&r) => p,
            _ => ServedRecord::new(&r),
        };
        self.served.save(&rec)?;
        self.open(rec).await
    }

    /// Opens a persisted volume; a failure is recorded beside the served
    /// volumes (and returned).
    async fn open(&self, rec: ServedRecord) -> Result<VolumeInfo> {
        let volume = rec.volume.clone();
        match self.open_volume(rec.clone()).await {
            Ok(info) => {
                lock(&self.failed).remove(&volume);
                info!(%volume, backing = %info.backing.display(), active = %info.active.display(),
                      frontends = ?info.frontends, session = ?info.session, "serving");
                Ok(info)
            }
            Err(e) => {
                warn!(%volume, backing = %rec.backing.display(), error = %e, "cannot serve the volume");
                let error = e.to_string();
                lock(&self.failed).insert(volume, Failed { served: rec, error });
                Err(e)
            }
        }
    }

    async fn open_volume(&self, mut rec: ServedRecord) -> Result<VolumeInfo> {
        self.frontends.check(&rec.frontends)?;
        let checkpoint = self.state.load(&rec.volume)?;
        if let Some(c) = &checkpoint
            && c.finished
            && c.redirected
            && c.source == rec.backing
        {
            // The migration completed before the agent could record its
            // target as the volume's backing device.
            rec.backing = c.target.clone();
            self.served.save(&rec)?;
        }
        let path = active_device(&rec, checkpoint.as_ref())?;
        let direct = rec.direct;
        let dev = tokio::task::spawn_blocking(move || {
            BackingDevice::open(&path, OpenMode::ReadWrite, direct)
        })
        .await
        .map_err(|e| AgentError::Task(e.to_string()))??;
        let interposer = Arc::new(Interposer::new(&rec.volume, Arc::new(dev)));
        // The session's monitor is attached before any frontend can write.
        let slave = match checkpoint {
            Some(c) if !c.finished => {
                Some(SlaveSession::reattach(interposer.clone(), self.state.clone(), c).await?)
            }
            _ => None,
        };
        let device = self
            .frontends
            .attach(&interposer, &rec.frontends, rec.device.as_ref())
            .await?;
        if device != rec.device {
            rec.device = device;
            self.served.save(&rec)?;
        }
        let v = Volume {
            interposer,
            served: rec,
            slave,
            op: Arc::new(tokio::sync::Mutex::new(())),
        };
        let info = v.info();
        lock(&self.volumes).insert(info.name.clone(), v);
        Ok(info)
    }

    /// Stops serving a volume: refused while an unfinished migration
    /// session holds it (or another operation runs on it). Its frontends
    /// close their connections, the agent forgets it (the persisted record,
    /// a finished session's checkpoint) and waits briefly for its device
    /// to be released. Returns false when the volume was not served
    /// (nothing to do: unserve is idempotent).
    pub async fn unserve(&self, volume: &str) -> Result<bool> {
        let _one = self.serving.lock().await;
        if lock(&self.failed).contains_key(volume) {
            self.served.remove(volume)?;
            lock(&self.failed).remove(volume);
            info!(%volume, "forgot the failed volume");
            return Ok(true);
        }
        let in_use = |slave: Option<Arc<SlaveSession>>| match slave {
            Some(s) if !s.is_finished() => Err(AgentError::InUse {
                volume: volume.to_string(),
                session: s.session_id(),
            }),
            _ => Ok(()),
        };
        let found = lock(&self.volumes).get(volume).map(|v| {
            (
                v.interposer.clone(),
                v.slave.clone(),
                v.op.clone(),
                v.served.frontends.clone(),
                v.served.device.clone(),
            )
        });
        let Some((interposer, slave, op, frontends, device)) = found else {
            self.served.remove(volume)?;
            return Ok(false);
        };
        in_use(slave)?;
        // No session step may start (a prepare) while it goes away.
        let _op = op
            .try_lock_owned()
            .map_err(|_| AgentError::Busy(volume.to_string()))?;
        in_use(self.slave(volume))?;
        // The kernel device goes first: in use (mounted), nothing changes.
        self.frontends
            .detach(volume, &frontends, device.as_ref())
            .await?;
        self.served.remove(volume)?;
        lock(&self.volumes).remove(volume);
        if let Ok(Some(c)) = self.state.load(volume)
            && c.finished
        {
            self.state.remove_checkpoint(volume);
        }
        let t = Instant::now();
        while Arc::strong_count(&interposer) > 1 && t.elapsed() < RELEASE_WAIT {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if Arc::strong_count(&interposer) > 1 {
            warn!(%volume, "unserved, but the device is still in use by calls in flight");
        }
        info!(%volume, "unserved");
        Ok(true)
    }

    /// The volume's backing device grew (expanded underneath, e.g. by the
    /// CSI controller): serves the new size, first in the interposer, then
    /// through its frontends (a kernel block device shows it). Refused
    /// (`InUse`) while an unfinished migration session holds the volume,
    /// whose dirty map and target are sized for the volume as it was;
    /// `Busy` while another operation runs on it. Idempotent: a device that
    /// did not grow leaves the size as it is. Returns the size now.
    pub async fn resize(&self, volume: &str) -> Result<u64> {
        let in_use = |slave: Option<Arc<SlaveSession>>| match slave {
            Some(s) if !s.is_finished() => Err(AgentError::InUse {
                volume: volume.to_string(),
                session: s.session_id(),
            }),
            _ => Ok(()),
        };
        let found = lock(&self.volumes).get(volume).map(|v| {
            (
                v.interposer.clone(),
                v.slave.clone(),
                v.op.clone(),
                v.served.device.clone(),
            )
        });
        let (interposer, slave, op, device) =
            found.ok_or_else(|| AgentError::UnknownVolume(volume.to_string()))?;
        in_use(slave)?;
        // No session may start (a prepare) while the size changes.
        let _op = op
            .try_lock_owned()
            .map_err(|_| AgentError::Busy(volume.to_string()))?;
        in_use(self.slave(volume))?;
        let was = interposer.size();
        let size = interposer.grow(GROW_DRAIN).await?;
        self.frontends.resize(volume, device.as_ref(), size).await?;
        if size != was {
            info!(%volume, was, size, "the volume grew");
        }
        Ok(size)
    }

    /// Serves `name` from `path` for in-process use (no frontend) and
    /// returns its interposer: `serve` with no frontends.
    pub async fn add_volume(
        &self,
        name: &str,
        path: &Path,
        direct: bool,
    ) -> Result<Arc<Interposer>> {
        self.serve(ServeVolume {
            volume: name.to_string(),
            backing: path.to_path_buf(),
            frontends: Vec::new(),
            direct,
        })
        .await?;
        self.interposer(name)
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

    /// Every served volume, and every volume that failed (with its error),
    /// by name.
    pub fn list(&self) -> Vec<VolumeInfo> {
        let mut out: Vec<VolumeInfo> = lock(&self.volumes).values().map(Volume::info).collect();
        out.extend(lock(&self.failed).values().map(Failed::info));
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// After a session terminated on the target: the target becomes the
    /// volume's persisted backing device, so a restart serves it even once
    /// the session's checkpoint is gone. (Until this is saved, the
    /// checkpoint says the same.)
    pub(crate) fn note_terminated(&self, volume: &str) {
        let rec = {
            let mut vols = lock(&self.volumes);
            let Some(v) = vols.get_mut(volume) else {
                return;
            };
            let Some(r) = v.slave.as_ref().map(|s| s.record()) else {
                return;
            };
            if !(r.finished && r.redirected) || v.served.backing == r.target {
                return;
            }
            v.served.backing = r.target;
            v.served.clone()
        };
        match self.served.save(&rec) {
            Ok(()) => {
                info!(%volume, backing = %rec.backing.display(), "the volume's backing device is now the migration's target")
            }
            Err(e) => {
                warn!(%volume, error = %e, "cannot record the new backing device; the session checkpoint still names it")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use volmig_api::SessionConfig;

    fn checkpoint(dir: &Path, finished: bool) -> SlaveRecord {
        SlaveRecord {
            session_id: "s1".into(),
            epoch: 1,
            volume: "v".into(),
            source: dir.join("src"),
            target: dir.join("tgt"),
            size: 1 << 20,
            config: SessionConfig::default(),
            monitor_only: false,
            mirror: false,
            redirected: true,
            finished,
            verified: Some(true),
            mismatch_offset: None,
            resumes: 0,
        }
    }

    fn files(dir: &Path) {
        for f in ["src", "tgt", "other"] {
            std::fs::File::create(dir.join(f))
                .unwrap()
                .set_len(1 << 20)
                .unwrap();
        }
    }

    #[tokio::test]
    async fn a_migration_that_ended_before_its_target_was_recorded_is_served_from_it() {
        let dir = tempfile::tempdir().unwrap();
        files(dir.path());
        let state = dir.path().join("state");
        let agent = Agent::new(&state).unwrap();
        agent
            .add_volume("v", &dir.path().join("src"), false)
            .await
            .unwrap();
        drop(agent);
        // The crash came after the session's checkpoint said it terminated
        // on the target, before the served record said so.
        StateDir::open(&state)
            .unwrap()
            .save(&checkpoint(dir.path(), true))
            .unwrap();
        let agent = Agent::new(&state).unwrap();
        assert_eq!(agent.restore().await.unwrap(), 1);
        let v = &agent.list()[0];
        assert_eq!(v.active, dir.path().join("tgt"));
        assert_eq!(v.backing, dir.path().join("tgt"));
        let rec = ServedDir::open(&state).unwrap().load("v").unwrap().unwrap();
        assert_eq!(rec.backing, dir.path().join("tgt"));
        assert_eq!(rec.requested, dir.path().join("src"));
    }

    #[tokio::test]
    async fn a_grown_backing_device_grows_the_volume_never_a_shrunk_one() {
        use volmig_api::io::VolumeIo;
        let dir = tempfile::tempdir().unwrap();
        files(dir.path());
        let src = dir.path().join("src");
        let agent = Agent::new(&dir.path().join("state")).unwrap();
        let ip = agent.add_volume("v", &src, false).await.unwrap();
        assert_eq!(
            agent.resize("v").await.unwrap(),
            1 << 20,
            "no growth: no-op"
        );
        let file = std::fs::File::options().write(true).open(&src).unwrap();
        file.set_len(3 << 20).unwrap();
        assert_eq!(agent.resize("v").await.unwrap(), 3 << 20);
        assert_eq!(ip.size(), 3 << 20);
        assert_eq!(agent.list()[0].size, 3 << 20);
        // The new end is the volume's.
        ip.write((3 << 20) - 4096, vec![7u8; 4096], false)
            .await
            .unwrap();
        let back = ip.read((3 << 20) - 4096, vec![0u8; 4096]).await.unwrap();
        assert_eq!(back, vec![7u8; 4096]);
        assert_eq!(ip.counters.last_error(), None);
        // A request the device fails is counted, for the volume's condition.
        assert!(ip.read(3 << 20, vec![0u8; 4096]).await.is_err());
        assert_eq!(
            ip.counters
                .io_errors
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        assert!(
            ip.counters
                .last_error()
                .is_some_and(|e| e.contains("read at offset"))
        );
        file.set_len(2 << 20).unwrap();
        let e = agent.resize("v").await.unwrap_err();
        assert!(matches!(e, AgentError::Shrunk { .. }), "{e}");
        assert_eq!(
            ip.size(),
            3 << 20,
            "a shrunk device keeps the volume's size"
        );
        let e = agent.resize("nope").await.unwrap_err();
        assert!(matches!(e, AgentError::UnknownVolume(_)), "{e}");
    }

    #[tokio::test]
    async fn an_unfinished_session_of_another_device_fails_the_volume() {
        let dir = tempfile::tempdir().unwrap();
        files(dir.path());
        let state = dir.path().join("state");
        StateDir::open(&state)
            .unwrap()
            .save(&checkpoint(dir.path(), false))
            .unwrap();
        let agent = Agent::new(&state).unwrap();
        let e = agent
            .add_volume("v", &dir.path().join("other"), false)
            .await
            .err()
            .expect("serving another device under the session is refused");
        assert!(
            e.to_string().contains("unfinished migration session s1"),
            "{e}"
        );
        let v = &agent.list()[0];
        assert!(
            v.error.as_deref().is_some_and(|e| e.contains("s1")),
            "{v:?}"
        );
        assert!(agent.interposer("v").is_err());
    }
}
