//! What the agent serves, and how workloads reach it: the record of every
//! volume it was asked to serve (persisted in `<state-dir>/served/`, so a
//! restarted agent serves the same volumes) and the frontends a served
//! volume is registered with. The calls themselves (`serve`, `unserve`,
//! `list`) are the agent's (`agent.rs`); the interposer knows nothing of
//! any of this.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracing::warn;
use volmig_api::slave::{Frontend, ServeVolume};
use volmig_frontends::nbd::{Export, NbdServer};

use crate::error::{AgentError, Result};
use crate::interposer::Interposer;

/// A volume the agent was asked to serve, as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedRecord {
    pub volume: String,
    /// The backing device the volume is served from: the one it was asked
    /// to serve, or the target of the migration that completed last.
    pub backing: PathBuf,
    /// The backing device the serve call named.
    pub requested: PathBuf,
    /// Sorted, no duplicates.
    pub frontends: Vec<Frontend>,
    /// O_DIRECT.
    pub direct: bool,
}

/// Frontends in one order, once each, so requests compare as sets.
pub fn normalize(frontends: &[Frontend]) -> Vec<Frontend> {
    let mut f = frontends.to_vec();
    f.sort_by_key(|f| match f {
        Frontend::Nbd => 0,
    });
    f.dedup();
    f
}

impl ServedRecord {
    pub fn new(r: &ServeVolume) -> Self {
        Self {
            volume: r.volume.clone(),
            backing: r.backing.clone(),
            requested: r.backing.clone(),
            frontends: normalize(&r.frontends),
            direct: r.direct,
        }
    }

    /// The request asks for what this record serves: the same device (the
    /// one first asked for, or the one a migration moved it to), the same
    /// frontends, the same O_DIRECT setting. Serving it again is a no-op.
    pub fn same_as(&self, r: &ServeVolume) -> bool {
        (r.backing == self.requested || r.backing == self.backing)
            && normalize(&r.frontends) == self.frontends
            && r.direct == self.direct
    }
}

/// `<state-dir>/served/<volume>.json`, one file per served volume, written
/// atomically (a temporary file renamed over it, then the directory synced)
/// so a crash leaves either the old record or the new one.
#[derive(Debug, Clone)]
pub struct ServedDir {
    root: PathBuf,
}

fn state_err(path: &Path) -> impl FnOnce(std::io::Error) -> AgentError + '_ {
    move |source| AgentError::State {
        path: path.to_path_buf(),
        source,
    }
}

impl ServedDir {
    pub fn open(state_dir: &Path) -> Result<Self> {
        let root = state_dir.join("served");
        std::fs::create_dir_all(&root).map_err(state_err(&root))?;
        Ok(Self { root })
    }

    pub fn path(&self, volume: &str) -> PathBuf {
        self.root.join(format!("{volume}.json"))
    }

    fn sync_dir(&self) -> Result<()> {
        std::fs::File::open(&self.root)
            .and_then(|d| d.sync_all())
            .map_err(state_err(&self.root))
    }

    pub fn save(&self, rec: &ServedRecord) -> Result<()> {
        use std::io::Write;
        let path = self.path(&rec.volume);
        let tmp = path.with_extension("json.tmp");
        let data = serde_json::to_vec_pretty(rec).map_err(|e| AgentError::State {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        let mut f = std::fs::File::create(&tmp).map_err(state_err(&tmp))?;
        f.write_all(&data)
            .and_then(|()| f.sync_all())
            .map_err(state_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(state_err(&path))?;
        self.sync_dir()
    }

    pub fn load(&self, volume: &str) -> Result<Option<ServedRecord>> {
        let path = self.path(volume);
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

    /// Forgets a volume; absent already is fine.
    pub fn remove(&self, volume: &str) -> Result<()> {
        let path = self.path(volume);
        match std::fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(AgentError::State { path, source }),
        }
    }

    /// Every persisted record, by volume name. A file that cannot be read
    /// is reported beside them (the volume fails; the others are served).
    pub fn load_all(&self) -> Result<Vec<(String, Result<ServedRecord>)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.root).map_err(state_err(&self.root))? {
            let entry = entry.map_err(state_err(&self.root))?;
            let name = entry.file_name();
            let Some(volume) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue; // a leftover temporary file
            };
            let rec = self.load(volume).and_then(|r| {
                r.ok_or_else(|| AgentError::Invalid(format!("{volume}: record vanished")))
            });
            out.push((volume.to_string(), rec));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

/// The frontends this agent runs: what a served volume can be reached
/// through. Started with the agent (the NBD listeners); volumes are added
/// to and removed from them at runtime.
#[derive(Clone, Default)]
pub struct Frontends {
    nbd: Option<NbdServer<Interposer>>,
}

impl Frontends {
    /// No frontend: volumes are used in-process only.
    pub fn none() -> Self {
        Self::default()
    }

    pub fn with_nbd(nbd: NbdServer<Interposer>) -> Self {
        Self { nbd: Some(nbd) }
    }

    pub fn nbd(&self) -> Option<&NbdServer<Interposer>> {
        self.nbd.as_ref()
    }

    /// Refuses frontends this agent does not run.
    pub fn check(&self, wanted: &[Frontend]) -> Result<()> {
        for f in wanted {
            match f {
                Frontend::Nbd if self.nbd.is_none() => {
                    return Err(AgentError::Invalid(
                        "this agent runs no NBD server (start it with --nbd-unix or --nbd-tcp)"
                            .into(),
                    ));
                }
                Frontend::Nbd => {}
            }
        }
        Ok(())
    }

    /// Makes `volume` reachable through `wanted`; all or none.
    pub fn attach(&self, volume: &Arc<Interposer>, wanted: &[Frontend]) -> Result<()> {
        self.check(wanted)?;
        for f in wanted {
            match (f, &self.nbd) {
                (Frontend::Nbd, Some(nbd)) => {
                    let name = volume.name().to_string();
                    nbd.add_export(Export::new(name.clone(), volume.clone()))
                        .map_err(|e| AgentError::Invalid(format!("NBD export {name}: {e}")))?;
                }
                (Frontend::Nbd, None) => {} // refused by check
            }
        }
        Ok(())
    }

    /// `volume` grew to `size`: its frontends show the new size. (NBD: a
    /// connection keeps the size it was told at its handshake; new
    /// connections see the new one.)
    pub async fn resize(&self, volume: &str, wanted: &[Frontend], size: u64) -> Result<()> {
        for f in wanted {
            match f {
                Frontend::Nbd => {
                    tracing::debug!(%volume, size, "NBD: new connections see the new size")
                }
            }
        }
        Ok(())
    }

    /// Closes `volume` to its frontends (their connections close).
    pub fn detach(&self, volume: &str, wanted: &[Frontend]) {
        for f in wanted {
            match (f, &self.nbd) {
                (Frontend::Nbd, Some(nbd)) => {
                    if nbd.remove_export(volume).is_none() {
                        warn!(%volume, "no NBD export to remove");
                    }
                }
                (Frontend::Nbd, None) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(backing: &str, frontends: Vec<Frontend>, direct: bool) -> ServeVolume {
        ServeVolume {
            volume: "v".into(),
            backing: backing.into(),
            frontends,
            direct,
        }
    }

    #[test]
    fn records_roundtrip_and_compare_as_sets() {
        let dir = tempfile::tempdir().unwrap();
        let sd = ServedDir::open(dir.path()).unwrap();
        assert_eq!(sd.load("v").unwrap(), None);
        let mut r = ServedRecord::new(&req("/a", vec![Frontend::Nbd, Frontend::Nbd], false));
        assert_eq!(r.frontends, [Frontend::Nbd]);
        sd.save(&r).unwrap();
        assert_eq!(sd.load("v").unwrap().as_ref(), Some(&r));
        assert!(r.same_as(&req("/a", vec![Frontend::Nbd], false)));
        assert!(!r.same_as(&req("/a", vec![], false)));
        assert!(!r.same_as(&req("/a", vec![Frontend::Nbd], true)));
        assert!(!r.same_as(&req("/b", vec![Frontend::Nbd], false)));
        // After a migration: both the device asked for and the current one
        // are the same request.
        r.backing = "/b".into();
        assert!(r.same_as(&req("/a", vec![Frontend::Nbd], false)));
        assert!(r.same_as(&req("/b", vec![Frontend::Nbd], false)));
        std::fs::write(sd.path("w"), b"{").unwrap();
        std::fs::write(sd.root.join("x.json.tmp"), b"{").unwrap();
        let all = sd.load_all().unwrap();
        assert_eq!(all.len(), 2, "the temporary file is no record");
        assert_eq!(all[0].0, "v");
        assert!(matches!(all[1].1, Err(AgentError::CorruptState { .. })));
        sd.remove("v").unwrap();
        sd.remove("v").unwrap();
        assert_eq!(sd.load("v").unwrap(), None);
    }
}
