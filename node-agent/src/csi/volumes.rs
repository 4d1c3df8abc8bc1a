//! What the node plugin needs of the agent that serves its volumes: serve a
//! volume from its backing device as a kernel block device, stop serving
//! it, grow it, and say whether a migration holds it and how it fares.
//! The agent does it through its serving API with a kernel block frontend
//! ([`AgentVolumes`]); the node plugin's logic is written against this
//! trait alone.

use std::future::Future;
use std::path::{Path, PathBuf};

use volmig_api::SlaveResult;

/// A served volume's kernel block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub path: PathBuf,
    /// The volume's size in bytes.
    pub size: u64,
}

/// How a served volume fares (CSI's VolumeCondition).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub abnormal: bool,
    pub message: String,
}

impl Condition {
    pub fn normal(message: impl Into<String>) -> Self {
        Self {
            abnormal: false,
            message: message.into(),
        }
    }

    pub fn abnormal(message: impl Into<String>) -> Self {
        Self {
            abnormal: true,
            message: message.into(),
        }
    }
}

pub trait Volumes: Send + Sync + 'static {
    /// Serves `volume` from `backing` through the interposer as a kernel
    /// block device. Idempotent: the same request again answers the same
    /// device; the volume served otherwise is `AlreadyExists`; a device
    /// that cannot be opened is `Invalid` and leaves nothing served.
    fn attach(
        &self,
        volume: &str,
        backing: &Path,
    ) -> impl Future<Output = SlaveResult<Device>> + Send;

    /// Stops serving `volume` and removes its kernel device. Refused
    /// (`InUse`) while a migration session holds it or the device is still
    /// open; a volume not served is no error.
    fn detach(&self, volume: &str) -> impl Future<Output = SlaveResult<()>> + Send;

    /// The backing device grew: the volume and its kernel device follow.
    /// Returns the size now. `InUse` while a migration holds it.
    fn grow(&self, volume: &str) -> impl Future<Output = SlaveResult<u64>> + Send;

    /// The backing device `volume` is served from now (a migration's
    /// target once one completed), if it is served.
    fn backing(&self, volume: &str) -> Option<PathBuf>;

    /// The unfinished migration session holding `volume`, if any.
    fn migration(&self, volume: &str) -> Option<String>;

    /// How `volume` fares: abnormal when it is not served (its device
    /// failed to open) or its backing device failed requests.
    fn condition(&self, volume: &str) -> Condition;

    /// The agent serves (it served again what it served before a restart).
    fn ready(&self) -> bool {
        true
    }
}

impl crate::agent::Agent {
    /// The backing device `volume` is served from now, if it is served:
    /// what [`Volumes::backing`] answers for a volume this agent serves.
    pub fn backing_of(&self, volume: &str) -> Option<PathBuf> {
        self.list()
            .into_iter()
            .find(|v| v.name == volume && v.error.is_none())
            .map(|v| v.backing)
    }

    /// The unfinished migration session holding `volume`, if any: what
    /// [`Volumes::migration`] answers for a volume this agent serves.
    pub fn migration_of(&self, volume: &str) -> Option<String> {
        self.slave(volume)
            .filter(|s| !s.is_finished())
            .map(|s| s.session_id())
    }

    /// How `volume` fares, as [`Volumes::condition`] reports it: abnormal
    /// when the agent could not serve it (its device failed to open after
    /// a restart...) or its backing device failed workload requests.
    pub fn condition_of(&self, volume: &str) -> Condition {
        use std::sync::atomic::Ordering;
        let Some(info) = self.list().into_iter().find(|v| v.name == volume) else {
            return Condition::abnormal("the agent does not serve the volume");
        };
        if let Some(e) = info.error {
            return Condition::abnormal(format!("the agent cannot serve the volume: {e}"));
        }
        if let Ok(ip) = self.interposer(volume) {
            let failed = ip.counters.io_errors.load(Ordering::Relaxed);
            if failed > 0 {
                return Condition::abnormal(format!(
                    "{failed} requests failed on the backing device {}, the last: {}",
                    info.active.display(),
                    ip.counters.last_error().unwrap_or_default()
                ));
            }
        }
        Condition::normal(format!(
            "served from {}{}",
            info.active.display(),
            match self.migration_of(volume) {
                Some(s) => format!(", migrating (session {s})"),
                None => String::new(),
            }
        ))
    }
}

/// The agent's volumes, as the node plugin needs them: served through the
/// interposer with a kernel block frontend.
pub struct AgentVolumes {
    agent: std::sync::Arc<crate::agent::Agent>,
    /// Open backing devices with O_DIRECT: no page cache between the kernel
    /// block device and the backing device (a user-space block device whose
    /// writeback needs memory can deadlock under memory pressure).
    direct: bool,
}

impl AgentVolumes {
    pub fn new(agent: std::sync::Arc<crate::agent::Agent>, direct: bool) -> Self {
        Self { agent, direct }
    }

    pub fn agent(&self) -> &std::sync::Arc<crate::agent::Agent> {
        &self.agent
    }
}

impl Volumes for AgentVolumes {
    async fn attach(&self, volume: &str, backing: &Path) -> SlaveResult<Device> {
        use volmig_api::Slave;
        use volmig_api::slave::{Frontend, ServeVolume};
        let info = self
            .agent
            .serve_volume(ServeVolume {
                volume: volume.to_string(),
                backing: backing.to_path_buf(),
                frontends: vec![Frontend::Block(volmig_api::io::BlockChoice::Auto)],
                direct: self.direct,
            })
            .await?;
        let path = info.device.ok_or_else(|| {
            volmig_api::SlaveError::failed("the volume was served without a kernel block device")
                .volume(volume)
        })?;
        Ok(Device {
            path,
            size: info.size,
        })
    }

    async fn detach(&self, volume: &str) -> SlaveResult<()> {
        use volmig_api::Slave;
        self.agent
            .unserve_volume(volmig_api::slave::UnserveVolume {
                volume: volume.to_string(),
            })
            .await
            .map(drop)
    }

    async fn grow(&self, volume: &str) -> SlaveResult<u64> {
        self.agent
            .resize(volume)
            .await
            .map_err(|e| volmig_api::SlaveError::from(e).volume(volume))
    }

    fn backing(&self, volume: &str) -> Option<PathBuf> {
        self.agent.backing_of(volume)
    }

    fn migration(&self, volume: &str) -> Option<String> {
        self.agent.migration_of(volume)
    }

    fn condition(&self, volume: &str) -> Condition {
        self.agent.condition_of(volume)
    }
}
