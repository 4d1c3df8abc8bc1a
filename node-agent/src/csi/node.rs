//! The Node service's logic: every call checks its request in the order
//! csi-sanity does (each required field, then whether the volume exists),
//! takes the volume's operation slot (a concurrent call for the same
//! volume is `ABORTED`, as the spec allows), and is idempotent: it brings
//! the node to the state the call describes, whatever part of that a
//! crashed or repeated earlier call already did. The persisted records
//! ([`StagedDir`]) say what the plugin staged and published, so a
//! restarted agent answers the same way.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing::{info, warn};
use volmig_api::ErrorKind;
use volmig_api::csi::{
    NodeExpandVolumeRequest, NodeGetVolumeStatsRequest, NodePublishVolumeRequest,
    NodeStageVolumeRequest, NodeUnpublishVolumeRequest, NodeUnstageVolumeRequest,
};

use super::capability::{Access, Capability, DEFAULT_FS, FILESYSTEMS};
use super::error::{Code, CsiError, CsiResult};
use super::records::{Publication, Staged, StagedDir};
use super::system::{self, Signature, Usage};
use super::volumes::{Condition, Volumes};
use super::{BACKING_DEVICE_KEY, SIZE_KEY};

/// The node plugin's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// This node's id (NodeGetInfo; the topology segment's value).
    pub node_id: String,
    /// NodeGetInfo's max_volumes_per_node (0: the CO decides).
    pub max_volumes_per_node: i64,
}

/// What NodeGetVolumeStats reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Mount access: the filesystem's usage; block access: only the
    /// device's size (`bytes_total`); `None` when nothing is mounted where
    /// a filesystem should be (the condition says so).
    pub usage: Option<Usage>,
    pub block: bool,
    pub condition: Condition,
}

pub struct NodePlugin<V> {
    volumes: V,
    config: NodeConfig,
    records: StagedDir,
    /// Volumes with a call in flight.
    busy: Mutex<HashSet<String>>,
}

/// A volume's operation slot, given back on drop.
struct Slot<'a> {
    busy: &'a Mutex<HashSet<String>>,
    volume: String,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        lock(self.busy).remove(&self.volume);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The set is changed by single inserts and removes only.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn required<'a>(value: &'a str, field: &str) -> CsiResult<&'a str> {
    if value.is_empty() {
        Err(CsiError::missing(field))
    } else {
        Ok(value)
    }
}

/// A required absolute path.
fn required_path(value: &str, field: &str) -> CsiResult<PathBuf> {
    let p = PathBuf::from(required(value, field)?);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(CsiError::invalid(format!(
            "{field} {value:?} must be an absolute path"
        )))
    }
}

/// The agent volume a CSI volume id names: the id itself. An id no volmig
/// volume can have (volume names are 1-128 of `[A-Za-z0-9._-]`, not
/// starting with a dot) names no volume: `NOT_FOUND`.
fn volume_of(id: &str) -> CsiResult<&str> {
    let ok = id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(id)
    } else {
        Err(CsiError::not_found(format!(
            "no volmig volume has the id {id:?}"
        )))
    }
}

/// The volume's size, when its volume context says it.
fn volume_size(ctx: &std::collections::HashMap<String, String>) -> CsiResult<Option<u64>> {
    ctx.get(SIZE_KEY)
        .map(|s| {
            s.trim().parse::<u64>().map_err(|_| {
                CsiError::invalid(format!(
                    "volume_context {SIZE_KEY}={s:?} is not a number of bytes"
                ))
            })
        })
        .transpose()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> CsiResult<T> + Send + 'static,
) -> CsiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CsiError::internal(format!("task failed: {e}")))?
}

async fn mounted_at(path: &Path) -> CsiResult<Option<system::MountEntry>> {
    let path = path.to_path_buf();
    blocking(move || system::mounted_at(&path)).await
}

/// Unmounts everything mounted at `path` (a repeated bind may have stacked
/// mounts there).
async fn unmount_all(path: &Path) -> CsiResult<()> {
    for _ in 0..16 {
        if mounted_at(path).await?.is_none() {
            return Ok(());
        }
        system::umount(path).await?;
    }
    Err(CsiError::internal(format!(
        "{} is still mounted after 16 unmounts",
        path.display()
    )))
}

/// Removes a publish target the plugin made: an empty directory, or the
/// empty file a block device was bind-mounted onto. Anything else is left
/// (and is an error: it is not what the plugin made).
fn remove_target(target: &Path) -> CsiResult<()> {
    let meta = match std::fs::symlink_metadata(target) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(CsiError::internal(format!("{}: {e}", target.display())));
        }
    };
    let r = if meta.is_dir() {
        std::fs::remove_dir(target)
    } else if meta.is_file() && meta.len() == 0 {
        std::fs::remove_file(target)
    } else {
        return Err(CsiError::internal(format!(
            "{} is not the empty directory or file this plugin publishes on; left in place",
            target.display()
        )));
    };
    r.map_err(|e| {
        CsiError::internal(format!(
            "removing {} after unmounting it: {e}",
            target.display()
        ))
    })
}

impl<V: Volumes> NodePlugin<V> {
    pub fn new(volumes: V, config: NodeConfig, state_dir: &Path) -> CsiResult<Self> {
        Ok(Self {
            volumes,
            config,
            records: StagedDir::open(state_dir)?,
            busy: Mutex::new(HashSet::new()),
        })
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    pub fn volumes(&self) -> &V {
        &self.volumes
    }

    pub fn ready(&self) -> bool {
        self.volumes.ready()
    }

    /// Takes `volume`'s operation slot: `ABORTED` while another call for it
    /// runs ("operation pending for volume").
    fn slot(&self, volume: &str) -> CsiResult<Slot<'_>> {
        if !lock(&self.busy).insert(volume.to_string()) {
            return Err(CsiError::new(
                Code::Aborted,
                "another call for this volume is in progress",
            ));
        }
        Ok(Slot {
            busy: &self.busy,
            volume: volume.to_string(),
        })
    }

    /// The staged volumes, by name.
    pub fn staged(&self) -> CsiResult<BTreeMap<String, Staged>> {
        let mut out = BTreeMap::new();
        for v in self.records.volumes()? {
            if let Some(rec) = self.records.load(&v)? {
                out.insert(v, rec);
            }
        }
        Ok(out)
    }

    /// NodeStageVolume: serves the volume from the backing device the
    /// publish context names, as a kernel block device; mount access makes
    /// a filesystem if (and only if) the device is blank and mounts it at
    /// the staging path. The same volume staged at the same path with a
    /// compatible capability is `OK` (kubelet stages again after its own
    /// restart); at another path or incompatibly, `ALREADY_EXISTS`.
    pub async fn stage(&self, r: NodeStageVolumeRequest) -> CsiResult<()> {
        let id = required(&r.volume_id, "volume_id")?;
        let staging = required_path(&r.staging_target_path, "staging_target_path")?;
        let cap = Capability::from_wire(r.volume_capability.as_ref())?;
        let volume = volume_of(id)?;
        let backing = r
            .publish_context
            .get(BACKING_DEVICE_KEY)
            .filter(|b| !b.is_empty())
            .ok_or_else(|| {
                CsiError::invalid(format!(
                    "publish_context has no {BACKING_DEVICE_KEY}: the backing device to serve the volume from (ControllerPublishVolume sets it)"
                ))
            })?;
        let backing = PathBuf::from(backing);
        let backing_asked = backing.clone();
        if !backing.is_absolute() {
            return Err(CsiError::invalid(format!(
                "publish_context {BACKING_DEVICE_KEY}={} must be an absolute path",
                backing.display()
            )));
        }
        let size = volume_size(&r.volume_context)?;
        let _slot = self.slot(volume)?;
        let (rec, created) = match self.records.load(volume)? {
            Some(rec) => {
                if rec.staging_path != staging {
                    return Err(CsiError::exists(format!(
                        "staged at {} already (asked: {}); unstage it first",
                        rec.staging_path.display(),
                        staging.display()
                    )));
                }
                if backing != rec.backing && self.volumes.backing(volume).as_ref() != Some(&backing)
                {
                    return Err(CsiError::exists(format!(
                        "staged from the backing device {} (asked: {})",
                        rec.backing.display(),
                        backing.display()
                    )));
                }
                if !rec.capability.stage_compatible(&cap, rec.fs.as_deref()) {
                    return Err(CsiError::exists(format!(
                        "staged at {} with capability {:?} (filesystem {:?}), incompatible with {:?}",
                        staging.display(),
                        rec.capability,
                        rec.fs,
                        cap
                    )));
                }
                (rec, false)
            }
            None => {
                // A request that cannot succeed changes nothing.
                check_backing(&backing, size).await?;
                let rec = Staged {
                    volume: volume.to_string(),
                    staging_path: staging,
                    capability: cap,
                    backing,
                    device: None,
                    fs: None,
                    published: BTreeMap::new(),
                };
                self.records.save(&rec)?;
                (rec, true)
            }
        };
        match self.complete_stage(rec, &backing_asked).await {
            Ok(rec) => {
                info!(%volume, staging = %rec.staging_path.display(), device = ?rec.device,
                      fs = ?rec.fs, "staged");
                Ok(())
            }
            Err(e) if created => {
                // Nothing of a first stage that failed stays behind.
                if let Err(d) = self.volumes.detach(volume).await {
                    warn!(%volume, error = %d, "cannot undo a failed stage; NodeUnstageVolume will");
                } else {
                    self.records.remove(volume)?;
                }
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// The steps of a stage that are not done yet (all of them the first
    /// time; the ones a crash cut off when the call is repeated).
    /// `backing` is the device this call names: the agent serves the
    /// volume from it, or answers whether it is the one it serves the
    /// volume from (the one first staged, or a migration's target).
    async fn complete_stage(&self, mut rec: Staged, backing: &Path) -> CsiResult<Staged> {
        let dev = self
            .volumes
            .attach(&rec.volume, backing)
            .await
            .map_err(CsiError::from_agent)?;
        if rec.device.as_ref() != Some(&dev.path) {
            rec.device = Some(dev.path.clone());
            self.records.save(&rec)?;
        }
        if let Access::Mount { fs_type, flags } = &rec.capability.access {
            let fs = mount_staging(
                &dev.path,
                &rec.staging_path,
                fs_type,
                flags,
                rec.capability.mode.read_only(),
            )
            .await?;
            if rec.fs.as_deref() != Some(fs.as_str()) {
                rec.fs = Some(fs);
                self.records.save(&rec)?;
            }
        }
        Ok(rec)
    }

    /// NodeUnstageVolume: unmounts the staging path, removes the kernel
    /// device and stops serving the volume. A volume not staged at that
    /// path is `OK` (nothing to undo); one still published, or held by a
    /// migration session, is `FAILED_PRECONDITION` and nothing changes.
    pub async fn unstage(&self, r: NodeUnstageVolumeRequest) -> CsiResult<()> {
        let id = required(&r.volume_id, "volume_id")?;
        let staging = required_path(&r.staging_target_path, "staging_target_path")?;
        let volume = volume_of(id)?;
        let _slot = self.slot(volume)?;
        let Some(mut rec) = self.records.load(volume)? else {
            return Ok(());
        };
        if rec.staging_path != staging {
            return Ok(());
        }
        if let Some(session) = self.volumes.migration(volume) {
            return Err(CsiError::precondition(format!(
                "migration session {session} holds the volume: let it finish or abort it, then unstage"
            )));
        }
        let mut still = Vec::new();
        for target in rec.published.keys() {
            if mounted_at(target).await?.is_some() {
                still.push(target.display().to_string());
            }
        }
        if !still.is_empty() {
            return Err(CsiError::precondition(format!(
                "still published at {}: NodeUnpublishVolume first",
                still.join(", ")
            )));
        }
        if !rec.published.is_empty() {
            rec.published.clear();
            self.records.save(&rec)?;
        }
        if !rec.capability.is_block() {
            unmount_all(&staging).await?;
        }
        self.volumes
            .detach(volume)
            .await
            .map_err(CsiError::from_agent)?;
        self.records.remove(volume)?;
        info!(%volume, staging = %staging.display(), "unstaged");
        Ok(())
    }

    /// NodePublishVolume: bind-mounts the staged filesystem at the target
    /// directory (mount access) or the kernel device onto a target file
    /// (block access), read-only when asked. Repeated with the same
    /// arguments `OK`, with others `ALREADY_EXISTS`; another target of an
    /// access mode that allows one is `FAILED_PRECONDITION` (the spec's
    /// second table).
    pub async fn publish(&self, r: NodePublishVolumeRequest) -> CsiResult<()> {
        let id = required(&r.volume_id, "volume_id")?;
        let target = required_path(&r.target_path, "target_path")?;
        let cap = Capability::from_wire(r.volume_capability.as_ref())?;
        if r.staging_target_path.is_empty() {
            return Err(CsiError::precondition(
                "staging_target_path is not set: this plugin stages volumes (STAGE_UNSTAGE_VOLUME), NodeStageVolume first",
            ));
        }
        let staging = required_path(&r.staging_target_path, "staging_target_path")?;
        let volume = volume_of(id)?;
        let _slot = self.slot(volume)?;
        let mut rec = self.records.load(volume)?.ok_or_else(|| {
            CsiError::not_found("the volume is not staged on this node: NodeStageVolume first")
        })?;
        if rec.staging_path != staging {
            return Err(CsiError::precondition(format!(
                "the volume is staged at {}, not {}",
                rec.staging_path.display(),
                staging.display()
            )));
        }
        if !rec.capability.publishable_as(&cap) {
            return Err(CsiError::precondition(format!(
                "the volume is staged as {:?}, which cannot be published as {:?}",
                rec.capability, cap
            )));
        }
        let publication = Publication {
            capability: cap.clone(),
            readonly: r.readonly,
        };
        let new = match rec.published.get(&target) {
            Some(p) if *p == publication => false,
            Some(p) => {
                return Err(CsiError::exists(format!(
                    "published at {} already with other arguments ({:?}, readonly {})",
                    target.display(),
                    p.capability,
                    p.readonly
                )));
            }
            None => {
                if let Some(other) = rec.published.keys().next()
                    && !cap.mode.several_targets()
                {
                    return Err(CsiError::precondition(format!(
                        "published at {} already; access mode {:?} allows one target",
                        other.display(),
                        cap.mode
                    )));
                }
                rec.published.insert(target.clone(), publication);
                self.records.save(&rec)?;
                true
            }
        };
        let readonly = r.readonly || cap.mode.read_only();
        match self.bind_target(&rec, &target, readonly, &cap).await {
            Ok(()) => {
                info!(%volume, target = %target.display(), readonly, "published");
                Ok(())
            }
            Err(e) => {
                if new {
                    let _ = remove_target(&target);
                    rec.published.remove(&target);
                    self.records.save(&rec)?;
                }
                Err(e)
            }
        }
    }

    async fn bind_target(
        &self,
        rec: &Staged,
        target: &Path,
        readonly: bool,
        cap: &Capability,
    ) -> CsiResult<()> {
        if mounted_at(target).await?.is_some() {
            return Ok(()); // published by an earlier call
        }
        if rec.capability.is_block() {
            let device = rec.device.clone().ok_or_else(|| {
                CsiError::precondition("the volume's stage did not complete: NodeStageVolume again")
            })?;
            let t = target.to_path_buf();
            blocking(move || {
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&t)
                    .map(drop)
                    .map_err(|e| CsiError::internal(format!("creating {}: {e}", t.display())))
            })
            .await?;
            system::bind(&device, target, readonly, &[]).await
        } else {
            if mounted_at(&rec.staging_path).await?.is_none() {
                return Err(CsiError::precondition(format!(
                    "nothing is mounted at the staging path {}: NodeStageVolume again",
                    rec.staging_path.display()
                )));
            }
            let t = target.to_path_buf();
            blocking(move || {
                std::fs::create_dir_all(&t)
                    .map_err(|e| CsiError::internal(format!("creating {}: {e}", t.display())))
            })
            .await?;
            system::bind(&rec.staging_path, target, readonly, cap.flags()).await
        }
    }

    /// NodeUnpublishVolume: unmounts the target and removes what was made
    /// there. Nothing published there is `OK`; a mount at the target of a
    /// volume this node does not know is `NOT_FOUND` (and left alone).
    pub async fn unpublish(&self, r: NodeUnpublishVolumeRequest) -> CsiResult<()> {
        let id = required(&r.volume_id, "volume_id")?;
        let target = required_path(&r.target_path, "target_path")?;
        let volume = volume_of(id)?;
        let _slot = self.slot(volume)?;
        let rec = self.records.load(volume)?;
        let mounted = mounted_at(&target).await?.is_some();
        match rec {
            None if mounted => Err(CsiError::not_found(format!(
                "the volume is not staged on this node, and what is mounted at {} is not its",
                target.display()
            ))),
            None => {
                let t = target.clone();
                blocking(move || remove_target(&t)).await
            }
            Some(mut rec) => {
                if mounted {
                    unmount_all(&target).await?;
                }
                let t = target.clone();
                blocking(move || remove_target(&t)).await?;
                if rec.published.remove(&target).is_some() {
                    self.records.save(&rec)?;
                }
                info!(%volume, target = %target.display(), "unpublished");
                Ok(())
            }
        }
    }

    /// NodeGetVolumeStats: usage of the filesystem at `volume_path` (bytes
    /// and inodes), or the device's size for block access, and the volume's
    /// condition. `NOT_FOUND` unless the volume is staged or published at
    /// that path.
    pub async fn stats(&self, r: NodeGetVolumeStatsRequest) -> CsiResult<Stats> {
        let id = required(&r.volume_id, "volume_id")?;
        let path = PathBuf::from(required(&r.volume_path, "volume_path")?);
        let volume = volume_of(id)?;
        let rec = self
            .records
            .load(volume)?
            .ok_or_else(|| CsiError::not_found("the volume is not staged on this node"))?;
        if !rec.is_at(&path) {
            return Err(CsiError::not_found(format!(
                "the volume is not at {} (staged at {})",
                path.display(),
                rec.staging_path.display()
            )));
        }
        let condition = self.volumes.condition(volume);
        if rec.capability.is_block() {
            let device = rec.device.clone();
            let size = blocking(move || {
                let d = device.ok_or_else(|| CsiError::precondition("no device yet"))?;
                system::device_size(&d).map_err(|e| CsiError::internal(e.to_string()))
            })
            .await;
            return Ok(match size {
                Ok(total) => Stats {
                    usage: Some(Usage {
                        bytes_total: total,
                        bytes_available: 0,
                        bytes_used: 0,
                        inodes_total: 0,
                        inodes_available: 0,
                        inodes_used: 0,
                    }),
                    block: true,
                    condition,
                },
                Err(e) => Stats {
                    usage: None,
                    block: true,
                    condition: Condition::abnormal(format!("the kernel device: {}", e.message)),
                },
            });
        }
        if mounted_at(&path).await?.is_none() {
            return Ok(Stats {
                usage: None,
                block: false,
                condition: Condition::abnormal(format!(
                    "the volume's filesystem is not mounted at {}",
                    path.display()
                )),
            });
        }
        let p = path.clone();
        let usage = blocking(move || {
            system::usage(&p)
                .map_err(|e| CsiError::internal(format!("statvfs {}: {e}", p.display())))
        })
        .await?;
        Ok(Stats {
            usage: Some(usage),
            block: false,
            condition,
        })
    }

    /// NodeExpandVolume: the backing device grew (the controller expanded
    /// it): the interposer, the kernel device and then, online, the
    /// filesystem follow. Returns the capacity now. `OUT_OF_RANGE` when the
    /// backing device is smaller than the required bytes; `ABORTED` (retry)
    /// while a migration holds the volume.
    pub async fn expand(&self, r: NodeExpandVolumeRequest) -> CsiResult<u64> {
        let id = required(&r.volume_id, "volume_id")?;
        let path = PathBuf::from(required(&r.volume_path, "volume_path")?);
        let asked = r
            .volume_capability
            .as_ref()
            .map(|c| Capability::from_wire(Some(c)))
            .transpose()
            .map_err(|e| CsiError::invalid(e.message))?;
        let required_bytes = r.capacity_range.map(|c| c.required_bytes).unwrap_or(0);
        if required_bytes < 0 {
            return Err(CsiError::invalid(
                "capacity_range.required_bytes is negative",
            ));
        }
        let volume = volume_of(id)?;
        let _slot = self.slot(volume)?;
        let rec = self
            .records
            .load(volume)?
            .ok_or_else(|| CsiError::not_found("the volume is not staged on this node"))?;
        if !rec.is_at(&path) {
            return Err(CsiError::not_found(format!(
                "the volume is not at {} (staged at {})",
                path.display(),
                rec.staging_path.display()
            )));
        }
        if let Some(a) = asked
            && a.is_block() != rec.capability.is_block()
        {
            return Err(CsiError::invalid(format!(
                "the volume is staged as {:?}, not {:?}",
                rec.capability.access, a.access
            )));
        }
        if let Some(session) = self.volumes.migration(volume) {
            return Err(CsiError::new(
                Code::Aborted,
                format!(
                    "migration session {session} holds the volume: expand it after the migration"
                ),
            ));
        }
        let fs = match (&rec.capability.access, &rec.fs) {
            (Access::Mount { .. }, Some(fs)) => Some(fs.clone()),
            _ => None,
        };
        if fs.as_deref().is_some_and(|f| f.starts_with("ext"))
            && !system::has_capability(system::CAP_SYS_RESOURCE)
        {
            // Checked before anything grows: the kernel refuses (EPERM) an
            // online ext4 resize without it.
            return Err(CsiError::precondition(
                "growing a mounted ext4 filesystem needs CAP_SYS_RESOURCE, which this agent lacks (give the agent's container that capability)",
            ));
        }
        let size = self.volumes.grow(volume).await.map_err(|e| match e.kind {
            ErrorKind::InUse => CsiError::new(Code::Aborted, e.message),
            _ => CsiError::from_agent(e),
        })?;
        if size < required_bytes as u64 {
            return Err(CsiError::new(
                Code::OutOfRange,
                format!(
                    "the backing device has {size} bytes, {required_bytes} were asked for: expand the backing device first"
                ),
            ));
        }
        if let (Some(fs), Some(device)) = (&fs, &rec.device) {
            if mounted_at(&rec.staging_path).await?.is_none() {
                return Err(CsiError::precondition(format!(
                    "nothing is mounted at the staging path {}: NodeStageVolume again",
                    rec.staging_path.display()
                )));
            }
            system::grow_fs(fs, device, &rec.staging_path).await?;
        }
        info!(%volume, size, "expanded");
        Ok(size)
    }
}

/// The backing device can be served and is not smaller than the volume.
async fn check_backing(backing: &Path, volume_size: Option<u64>) -> CsiResult<()> {
    let b = backing.to_path_buf();
    let size = blocking(move || {
        system::device_size(&b).map_err(|e| {
            CsiError::precondition(format!("the backing device cannot be served: {e}"))
        })
    })
    .await?;
    match volume_size {
        Some(want) if size < want => Err(CsiError::precondition(format!(
            "the backing device {} has {size} bytes, smaller than the volume ({want} bytes)",
            backing.display()
        ))),
        _ => Ok(()),
    }
}

/// Mounts the volume's filesystem at the staging path, made first if the
/// device is blank (never over anything a probe finds). Returns the
/// filesystem's type. Already mounted there: nothing to do.
async fn mount_staging(
    device: &Path,
    staging: &Path,
    fs_type: &str,
    flags: &[String],
    read_only: bool,
) -> CsiResult<String> {
    let dev_no = {
        let d = device.to_path_buf();
        blocking(move || system::device_number(&d)).await?
    };
    if let Some(m) = mounted_at(staging).await? {
        if m.dev == dev_no {
            return Ok(m.fs_type);
        }
        return Err(CsiError::precondition(format!(
            "{} is a mount point of another device ({})",
            staging.display(),
            m.source
        )));
    }
    let fs = match system::probe(device).await? {
        Some(Signature::Filesystem(found)) => {
            if !fs_type.is_empty() && found != fs_type {
                return Err(CsiError::precondition(format!(
                    "the volume holds a {found} filesystem, not {fs_type}; it is never reformatted"
                )));
            }
            if !FILESYSTEMS.contains(&found.as_str()) {
                return Err(CsiError::precondition(format!(
                    "the volume holds {found}, which this plugin does not mount"
                )));
            }
            found
        }
        Some(Signature::PartitionTable(pt)) => {
            return Err(CsiError::precondition(format!(
                "the volume holds a {pt} partition table; it is never reformatted"
            )));
        }
        None if read_only => {
            return Err(CsiError::precondition(
                "the volume is blank: there is no filesystem to mount read-only",
            ));
        }
        None => {
            let fs = if fs_type.is_empty() {
                DEFAULT_FS
            } else {
                fs_type
            };
            info!(device = %device.display(), fs, "the volume is blank: making a filesystem");
            system::mkfs(fs, device).await?;
            fs.to_string()
        }
    };
    let s = staging.to_path_buf();
    blocking(move || {
        std::fs::create_dir_all(&s)
            .map_err(|e| CsiError::internal(format!("creating {}: {e}", s.display())))
    })
    .await?;
    let mut opts = flags.to_vec();
    if read_only {
        opts.push("ro".into());
    }
    system::mount(device, staging, &fs, &opts).await?;
    Ok(fs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Arc;
    use volmig_api::csi::VolumeCapability;
    use volmig_api::csi::volume_capability::access_mode::Mode;
    use volmig_api::csi::volume_capability::{AccessMode, AccessType, BlockVolume};
    use volmig_api::{SlaveError, SlaveResult};

    use crate::csi::volumes::Device;

    /// Volumes whose attach waits for the test to let it go, then fails
    /// or succeeds as told; block access needs no mount.
    #[derive(Default)]
    struct Gate {
        go: tokio::sync::Notify,
        fail: std::sync::atomic::AtomicBool,
        attached: std::sync::atomic::AtomicU32,
        detached: std::sync::atomic::AtomicU32,
    }

    struct Fake(Arc<Gate>);

    impl Volumes for Fake {
        async fn attach(&self, _: &str, backing: &Path) -> SlaveResult<Device> {
            self.0.go.notified().await;
            self.0
                .attached
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self.0.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(SlaveError::invalid("the device went away"));
            }
            Ok(Device {
                path: backing.to_path_buf(),
                size: 1 << 20,
            })
        }
        async fn detach(&self, _: &str) -> SlaveResult<()> {
            self.0
                .detached
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
        async fn grow(&self, _: &str) -> SlaveResult<u64> {
            Ok(1 << 20)
        }
        fn backing(&self, _: &str) -> Option<PathBuf> {
            None
        }
        fn migration(&self, _: &str) -> Option<String> {
            None
        }
        fn condition(&self, _: &str) -> Condition {
            Condition::normal("fine")
        }
    }

    fn block_stage(dir: &Path) -> NodeStageVolumeRequest {
        let backing = dir.join("b.img");
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        NodeStageVolumeRequest {
            volume_id: "v".into(),
            publish_context: HashMap::from([(
                BACKING_DEVICE_KEY.to_string(),
                backing.to_str().unwrap().to_string(),
            )]),
            staging_target_path: dir.join("staging").to_str().unwrap().into(),
            volume_capability: Some(VolumeCapability {
                access_mode: Some(AccessMode {
                    mode: Mode::SingleNodeWriter as i32,
                }),
                access_type: Some(AccessType::Block(BlockVolume {})),
            }),
            secrets: HashMap::new(),
            volume_context: HashMap::new(),
        }
    }

    fn plugin(dir: &Path, gate: &Arc<Gate>) -> Arc<NodePlugin<Fake>> {
        let config = NodeConfig {
            node_id: "n".into(),
            max_volumes_per_node: 0,
        };
        Arc::new(NodePlugin::new(Fake(gate.clone()), config, &dir.join("state")).unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_call_for_a_busy_volume_is_aborted() {
        let dir = tempfile::tempdir().unwrap();
        let gate = Arc::new(Gate::default());
        let p = plugin(dir.path(), &gate);
        let r = block_stage(dir.path());
        let first = tokio::spawn({
            let (p, r) = (p.clone(), r.clone());
            async move { p.stage(r).await }
        });
        // The first call holds the volume's slot while it attaches.
        while !p.records.volumes().unwrap().contains(&"v".to_string()) {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let e = p.stage(r.clone()).await.unwrap_err();
        assert_eq!(e.code, Code::Aborted, "{e}");
        let e = p
            .unstage(NodeUnstageVolumeRequest {
                volume_id: "v".into(),
                staging_target_path: r.staging_target_path.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::Aborted, "{e}");
        gate.go.notify_one();
        first.await.unwrap().unwrap();
        // Free again: the same stage is a no-op success.
        gate.go.notify_one();
        p.stage(r).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_first_stage_that_fails_leaves_nothing_a_repeated_one_keeps_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let gate = Arc::new(Gate::default());
        gate.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        let p = plugin(dir.path(), &gate);
        let r = block_stage(dir.path());
        gate.go.notify_one();
        let e = p.stage(r.clone()).await.unwrap_err();
        assert_eq!(e.code, Code::FailedPrecondition, "{e}");
        assert!(
            p.staged().unwrap().is_empty(),
            "no record of a failed stage"
        );
        assert_eq!(gate.detached.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Staged once; the device fails when kubelet stages again: the
        // volume stays staged (unstage undoes it), nothing is detached.
        gate.fail.store(false, std::sync::atomic::Ordering::SeqCst);
        gate.go.notify_one();
        p.stage(r.clone()).await.unwrap();
        gate.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        gate.go.notify_one();
        p.stage(r).await.unwrap_err();
        assert!(p.staged().unwrap().contains_key("v"));
        assert_eq!(gate.detached.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
