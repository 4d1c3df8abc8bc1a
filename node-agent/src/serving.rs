//! What the agent serves, and how workloads reach it: the record of every
//! volume it was asked to serve (persisted in `<state-dir>/served/`, so a
//! restarted agent serves the same volumes, with the kernel block device
//! it had) and the frontends a served volume is registered with. The calls themselves (`serve`, `unserve`,
//! `list`) are the agent's (`agent.rs`); the interposer knows nothing of
//! any of this.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracing::warn;
use volmig_api::io::{BlockChoice, BlockKind};
use volmig_api::slave::{Frontend, ServeVolume};
use volmig_frontends::block::fuse::{FuseLoop, FuseOptions};
use volmig_frontends::block::nbd_netlink::{NbdNetlinkDriver, NbdParams};
#[cfg(feature = "ublk")]
use volmig_frontends::block::ublk::{UblkDriver, UblkParams};
use volmig_frontends::block::{self, BlockDrivers, BlockErrorKind, DeviceRecord};
use volmig_frontends::nbd::{Export, NbdServer};

use crate::state_file::JsonDir;

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
    /// The kernel block device of a block frontend, as attached: what a
    /// restarted agent serves again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceRecord>,
}

/// Frontends in one order, once each, so requests compare as sets.
pub fn normalize(frontends: &[Frontend]) -> Vec<Frontend> {
    let mut f = frontends.to_vec();
    f.sort_by_key(|f| match f {
        Frontend::Nbd => 0,
        Frontend::Block(_) => 1,
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
            device: None,
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
    dir: JsonDir,
}

impl ServedDir {
    pub fn open(state_dir: &Path) -> Result<Self> {
        Ok(Self {
            dir: JsonDir::open(state_dir.join("served"), ".json")?,
        })
    }

    pub fn path(&self, volume: &str) -> PathBuf {
        self.dir.path(volume)
    }

    pub fn save(&self, rec: &ServedRecord) -> Result<()> {
        Ok(self.dir.save(&rec.volume, rec)?)
    }

    pub fn load(&self, volume: &str) -> Result<Option<ServedRecord>> {
        Ok(self.dir.load(volume)?)
    }

    /// Forgets a volume; absent already is fine.
    pub fn remove(&self, volume: &str) -> Result<()> {
        Ok(self.dir.remove(volume)?)
    }

    /// Every persisted record, by volume name. A file that cannot be read
    /// is reported beside them (the volume fails; the others are served).
    pub fn load_all(&self) -> Result<Vec<(String, Result<ServedRecord>)>> {
        Ok(self
            .dir
            .names()?
            .into_iter()
            .map(|volume| {
                let rec = self.load(&volume).and_then(|r| {
                    r.ok_or_else(|| AgentError::Invalid(format!("{volume}: record vanished")))
                });
                (volume, rec)
            })
            .collect())
    }
}

/// How the agent makes kernel block devices: which kinds (`--block`) and
/// the FUSE driver's settings. The drivers start on first use (or at
/// start-up when a served volume has a device to serve again), so an
/// agent that serves no block volume mounts nothing.
#[derive(Debug, Clone)]
pub struct BlockConfig {
    /// `Auto`: every kind the kernel offers that this build has.
    pub kinds: BlockChoice,
    pub fuse: FuseOptions,
    pub nbd: NbdParams,
    #[cfg(feature = "ublk")]
    pub ublk: UblkParams,
}

/// The agent's kernel block frontend: the configured kinds and the drivers
/// once started.
pub struct BlockFrontend {
    config: BlockConfig,
    /// What may be used here, best first: configured, offered by the
    /// kernel and built.
    kinds: Vec<BlockKind>,
    drivers: tokio::sync::OnceCell<BlockDrivers<Interposer>>,
    /// The agent served again what it served before (see `restored`).
    restored: std::sync::atomic::AtomicBool,
}

/// The kinds this build has drivers for (ublk with the frontends' `ublk`
/// feature, on by default).
const BUILT: &[BlockKind] = if cfg!(feature = "ublk") {
    &[BlockKind::Ublk, BlockKind::Nbd, BlockKind::FuseLoop]
} else {
    &[BlockKind::Nbd, BlockKind::FuseLoop]
};

impl BlockFrontend {
    pub fn new(config: BlockConfig) -> Self {
        Self::with_offered(config, block::available())
    }

    /// With what the kernel offers given (tests).
    pub fn with_offered(config: BlockConfig, offered: Vec<BlockKind>) -> Self {
        let kinds = offered
            .into_iter()
            .filter(|k| BUILT.contains(k))
            .filter(|k| config.kinds == BlockChoice::Auto || config.kinds == BlockChoice::Only(*k))
            .collect();
        Self {
            config,
            kinds,
            drivers: tokio::sync::OnceCell::new(),
            restored: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The kinds this agent can make devices of, best first.
    pub fn kinds(&self) -> &[BlockKind] {
        &self.kinds
    }

    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// The kind a serve call's choice means here.
    pub fn pick(&self, choice: BlockChoice) -> Result<BlockKind> {
        let names = || {
            if self.kinds.is_empty() {
                "none".to_string()
            } else {
                self.kinds
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        match choice {
            BlockChoice::Auto => self.kinds.first().copied().ok_or_else(|| {
                AgentError::Invalid(format!(
                    "this node offers no kernel block frontend this agent runs (--block {}; \
                     FUSE + loop needs /dev/fuse and /dev/loop-control, kernel NBD the nbd \
                     module, ublk the ublk_drv module)",
                    self.config.kinds
                ))
            }),
            BlockChoice::Only(k) if self.kinds.contains(&k) => Ok(k),
            BlockChoice::Only(k) => Err(AgentError::Invalid(format!(
                "this agent cannot make {k} block devices here (it can: {})",
                names()
            ))),
        }
    }

    /// The drivers, started on first use.
    pub async fn drivers(&self) -> Result<&BlockDrivers<Interposer>> {
        self.drivers
            .get_or_try_init(|| async {
                let mut d = BlockDrivers::none().with_offered(self.kinds.clone());
                if self.kinds.contains(&BlockKind::FuseLoop) {
                    d = d.with_fuse(FuseLoop::start(self.config.fuse.clone()).await?);
                }
                if self.kinds.contains(&BlockKind::Nbd) {
                    let nbd = NbdNetlinkDriver::new(self.config.nbd.clone())
                        .map_err(|e| AgentError::Invalid(format!("kernel NBD: {e}")))?;
                    d = d.with_nbd(nbd);
                }
                #[cfg(feature = "ublk")]
                if self.kinds.contains(&BlockKind::Ublk) {
                    let ublk = UblkDriver::new(self.config.ublk.clone())
                        .map_err(|e| AgentError::Invalid(format!("ublk: {e}")))?;
                    d = d.with_ublk(ublk);
                }
                if self.restored.load(std::sync::atomic::Ordering::SeqCst) {
                    d.restored();
                }
                Ok(d)
            })
            .await
    }

    /// The agent served again every volume it served before: requests of
    /// kernel devices nobody claimed fail from now on (they waited).
    pub fn restored(&self) {
        self.restored
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(d) = self.drivers.get() {
            d.restored();
        }
    }

    /// The drivers if they were started.
    pub fn started(&self) -> Option<&BlockDrivers<Interposer>> {
        self.drivers.get()
    }
}

/// The frontends this agent runs: what a served volume can be reached
/// through. Started with the agent (the NBD listeners; block drivers on
/// first use); volumes are added to and removed from them at runtime.
#[derive(Clone, Default)]
pub struct Frontends {
    nbd: Option<NbdServer<Interposer>>,
    block: Option<Arc<BlockFrontend>>,
}

impl Frontends {
    /// No frontend: volumes are used in-process only.
    pub fn none() -> Self {
        Self::default()
    }

    pub fn with_nbd(nbd: NbdServer<Interposer>) -> Self {
        Self {
            nbd: Some(nbd),
            block: None,
        }
    }

    /// Kernel block devices too.
    pub fn with_block(mut self, block: BlockFrontend) -> Self {
        self.block = Some(Arc::new(block));
        self
    }

    pub fn nbd(&self) -> Option<&NbdServer<Interposer>> {
        self.nbd.as_ref()
    }

    pub fn block(&self) -> Option<&Arc<BlockFrontend>> {
        self.block.as_ref()
    }

    fn block_or_refuse(&self) -> Result<&Arc<BlockFrontend>> {
        self.block.as_ref().ok_or_else(|| {
            AgentError::Invalid("this agent runs no kernel block frontend (--block none)".into())
        })
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
                Frontend::Block(c) => {
                    self.block_or_refuse()?.pick(*c)?;
                }
            }
        }
        Ok(())
    }

    /// Makes `volume` reachable through `wanted`, all or none. A block
    /// frontend serves `device` again (after a restart) when it is still
    /// there, else makes a new device; returns the device's record.
    pub async fn attach(
        &self,
        volume: &Arc<Interposer>,
        wanted: &[Frontend],
        device: Option<&DeviceRecord>,
    ) -> Result<Option<DeviceRecord>> {
        self.check(wanted)?;
        let name = volume.name().to_string();
        let mut nbd_added = false;
        let mut record = None;
        for f in wanted {
            match (f, &self.nbd) {
                (Frontend::Nbd, Some(nbd)) => {
                    nbd.add_export(Export::new(name.clone(), volume.clone()))
                        .map_err(|e| AgentError::Invalid(format!("NBD export {name}: {e}")))?;
                    nbd_added = true;
                }
                (Frontend::Nbd, None) => {} // refused by check
                (Frontend::Block(choice), _) => {
                    match self.attach_block(volume, *choice, device).await {
                        Ok(r) => record = Some(r),
                        Err(e) => {
                            if nbd_added && let Some(nbd) = &self.nbd {
                                nbd.remove_export(&name);
                            }
                            return Err(e);
                        }
                    }
                }
            }
        }
        Ok(record)
    }

    /// `volume` grew to `size`: its frontends show the new size (its
    /// kernel block device, `device`, at once; NBD: a connection keeps the
    /// size it was told at its handshake, new connections see the new one).
    pub async fn resize(
        &self,
        volume: &str,
        device: Option<&DeviceRecord>,
        size: u64,
    ) -> Result<()> {
        if let Some(rec) = device {
            let block = self.block_or_refuse()?;
            block
                .drivers()
                .await?
                .resize(rec.kind, volume, size)
                .await?;
        }
        Ok(())
    }

    async fn attach_block(
        &self,
        volume: &Arc<Interposer>,
        choice: BlockChoice,
        device: Option<&DeviceRecord>,
    ) -> Result<DeviceRecord> {
        let block = self.block_or_refuse()?;
        let drivers = block.drivers().await?;
        if let Some(rec) = device {
            match drivers.reattach(rec, volume.clone()).await {
                Ok(a) => return Ok(a.record),
                Err(e)
                    if matches!(
                        e.kind(),
                        BlockErrorKind::Gone
                            | BlockErrorKind::InvalidRecord
                            | BlockErrorKind::Foreign
                    ) =>
                {
                    warn!(volume = %volume.name(), device = %rec.path.display(), error = %e,
                        "the volume's block device cannot be served again; making a new one");
                }
                Err(e) => return Err(e.into()),
            }
        }
        let kind = block.pick(choice)?;
        Ok(drivers
            .attach(BlockChoice::Only(kind), volume.name(), volume.clone())
            .await?
            .record)
    }

    /// Removes `volume`'s block device (first: it may refuse, in use) and
    /// closes it to its other frontends (their connections close).
    pub async fn detach(
        &self,
        volume: &str,
        wanted: &[Frontend],
        device: Option<&DeviceRecord>,
    ) -> Result<()> {
        if let Some(rec) = device
            && let Some(block) = &self.block
        {
            match block.drivers().await?.detach(rec.kind, volume).await {
                Ok(()) => {}
                Err(e) if e.kind() == BlockErrorKind::NotAttached => {}
                Err(e) => return Err(e.into()),
            }
        }
        for f in wanted {
            match (f, &self.nbd) {
                (Frontend::Nbd, Some(nbd)) => {
                    if nbd.remove_export(volume).is_none() {
                        warn!(%volume, "no NBD export to remove");
                    }
                }
                (Frontend::Nbd, None) | (Frontend::Block(_), _) => {}
            }
        }
        Ok(())
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
        std::fs::write(sd.dir.root().join("x.tmp"), b"{").unwrap();
        let all = sd.load_all().unwrap();
        assert_eq!(all.len(), 2, "the temporary file is no record");
        assert_eq!(all[0].0, "v");
        assert!(matches!(all[1].1, Err(AgentError::CorruptState { .. })));
        sd.remove("v").unwrap();
        sd.remove("v").unwrap();
        assert_eq!(sd.load("v").unwrap(), None);
    }

    fn block(kinds: BlockChoice, offered: Vec<BlockKind>) -> BlockFrontend {
        BlockFrontend::with_offered(
            BlockConfig {
                kinds,
                fuse: FuseOptions::new(Path::new("/nonexistent")),
                nbd: NbdParams::default(),
                #[cfg(feature = "ublk")]
                ublk: UblkParams::default(),
            },
            offered,
        )
    }

    #[test]
    fn block_choices_resolve_to_what_the_node_offers_and_this_agent_runs() {
        let all = vec![BlockKind::Ublk, BlockKind::Nbd, BlockKind::FuseLoop];
        let b = block(BlockChoice::Auto, all.clone());
        assert_eq!(b.kinds(), BUILT, "what the node offers and this build has");
        assert_eq!(
            b.pick(BlockChoice::Auto).unwrap(),
            BUILT[0],
            "the best first"
        );
        let fuse_only = block(BlockChoice::Auto, vec![BlockKind::FuseLoop]);
        assert_eq!(
            fuse_only.pick(BlockChoice::Auto).unwrap(),
            BlockKind::FuseLoop
        );
        let e = fuse_only
            .pick(BlockChoice::Only(BlockKind::Ublk))
            .unwrap_err();
        assert!(
            e.to_string().contains("cannot make ublk") && e.to_string().contains("fuse"),
            "{e}"
        );
        let b = fuse_only;
        let none = block(BlockChoice::Auto, vec![]);
        let e = none.pick(BlockChoice::Auto).unwrap_err();
        assert!(e.to_string().contains("/dev/fuse"), "{e}");
        let only = block(BlockChoice::Only(BlockKind::Nbd), all);
        assert_eq!(
            only.kinds(),
            [BlockKind::Nbd],
            "--block nbd leaves FUSE out"
        );
        // Not started by any of this.
        assert!(b.started().is_none());
        let f = Frontends::none().with_block(b);
        f.check(&[Frontend::Block(BlockChoice::Auto)]).unwrap();
        let e = Frontends::none()
            .check(&[Frontend::Block(BlockChoice::Auto)])
            .unwrap_err();
        assert!(e.to_string().contains("no kernel block frontend"), "{e}");
    }

    #[test]
    fn a_record_keeps_its_device() {
        let dir = tempfile::tempdir().unwrap();
        let sd = ServedDir::open(dir.path()).unwrap();
        let mut r = ServedRecord::new(&req("/a", vec![Frontend::Block(BlockChoice::Auto)], true));
        r.device = Some(DeviceRecord {
            kind: BlockKind::FuseLoop,
            volume: "v".into(),
            path: "/dev/loop4".into(),
            detail: serde_json::json!({"ino": 5, "loop": 4}),
        });
        sd.save(&r).unwrap();
        assert_eq!(sd.load("v").unwrap().as_ref(), Some(&r));
        // Records of agents before block frontends have none.
        std::fs::write(
            sd.path("old"),
            br#"{"volume":"old","backing":"/b","requested":"/b","frontends":["Nbd"],"direct":false}"#,
        )
        .unwrap();
        assert_eq!(sd.load("old").unwrap().unwrap().device, None);
    }
}
