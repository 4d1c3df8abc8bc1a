//! FUSE + loop: the agent serves its own FUSE file system (raw `/dev/fuse`,
//! one mount per agent) in which each attached volume is one regular file,
//! and a loop device with direct I/O makes that file the volume's kernel
//! block device (`/dev/loopN`).
//!
//! - [`proto`]: the wire format; [`fs`]: the file system (INIT, names,
//!   attributes, READ/WRITE/FSYNC/FALLOCATE/LSEEK to the volume's
//!   `VolumeIo`); [`dev`]: `/dev/fuse`, mounting, workers, notifications;
//!   [`splice`]: READ answers spliced from the backing file.
//! - Requests: INIT negotiates 512 KiB requests (max_pages 128: a READ's
//!   answer spliced from the backing file must fit a pipe whole, see
//!   [`splice`]), async direct I/O and 256 requests in flight in the
//!   background (loop's direct I/O is asynchronous); `workers` threads
//!   (default min(8, 2 × CPUs)), each on its own cloned descriptor, each a
//!   dedicated I/O thread (`volmig_api::io::threads`: the interposer may
//!   write inline there).
//! - Restarts: with a [`keeper`](super::keeper), every descriptor of the
//!   connection and the INIT parameters are handed to it after INIT; a
//!   restarted agent takes them back instead of mounting, serves them, and
//!   asks the kernel to re-send what the dead agent had read and not
//!   answered (FUSE_NOTIFY_RESEND): the workload's I/O waited and goes on.
//!   Without a keeper the descriptors die with the agent: the kernel fails
//!   every request of the connection (EIO in the workload's filesystem),
//!   and a restarted agent makes new devices.
//! - FUSE over io_uring is not used: on Linux 6.18 the requests held by a
//!   ring of a dead server are never re-sent, so a restart would hang the
//!   workload (measured in the prototype, see docs/ARCHITECTURE.md).

pub mod dev;
pub mod fs;
mod pool;
pub mod proto;
mod sleepers;
pub mod splice;

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;
use tokio::sync::{oneshot, watch};
use volmig_api::io::VolumeIo;
use volmig_api::io::threads::{self, Slots};

use self::dev::{DevFd, FSTYPE};
use self::fs::Fs;
pub use self::fs::{FsOptions, Params, Stats};
use self::sleepers::Sleepers;
use super::keeper::KeeperClient;
use super::loopdev::{DetachError, Loop};
use super::memsafe;
use super::{Attached, BlockDriver, BlockError, BlockErrorKind, BlockKind, DeviceRecord};

/// The keeper holds this connection under this key.
const KEEPER_KEY: &str = "fuse";
/// How long INIT may take after mounting.
const INIT_TIMEOUT: Duration = Duration::from_secs(20);

/// How the FUSE + loop driver runs.
#[derive(Debug, Clone)]
pub struct FuseOptions {
    /// Where the agent's FUSE file system is mounted (made if missing).
    pub mount: PathBuf,
    /// Worker threads, each on its own `/dev/fuse` descriptor.
    pub workers: usize,
    /// The descriptor keeper's socket: without one, an agent restart
    /// fails the devices' I/O.
    pub keeper: Option<PathBuf>,
    /// How long to wait for the keeper to answer at start-up.
    pub keeper_wait: Duration,
    pub fs: FsOptions,
    /// Loop devices do direct I/O on the volume files (no double caching;
    /// without it loop serves one request at a time).
    pub loop_direct_io: bool,
    /// Loop devices' logical block size (0: 512).
    pub block_size: u32,
    /// After a restart, how long requests for volumes not yet served again
    /// wait before they fail.
    pub restore_grace: Duration,
}

impl FuseOptions {
    pub fn new(mount: &Path) -> Self {
        Self {
            mount: mount.to_path_buf(),
            workers: Self::default_workers(),
            keeper: None,
            keeper_wait: Duration::from_secs(30),
            fs: FsOptions::default(),
            loop_direct_io: true,
            block_size: 0,
            restore_grace: Duration::from_secs(120),
        }
    }

    /// min(8, 2 × CPUs).
    pub fn default_workers() -> usize {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        (2 * cpus).min(8)
    }
}

/// What the keeper holds beside the descriptors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct KeptConn {
    mount: PathBuf,
    /// The mount's device (`st_dev`), to know it is still the same one.
    dev: u64,
    params: Params,
}

/// The driver's part of a device record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Detail {
    /// The volume file's inode number (the kernel addresses it by that).
    ino: u64,
    /// `/dev/loopN`.
    #[serde(rename = "loop")]
    lo: u32,
    /// The volume's file in the FUSE mount.
    file: PathBuf,
    /// The FUSE mount's device: the connection it was served on.
    conn_dev: u64,
}

#[derive(Debug, Clone, Copy)]
struct Device {
    ino: u64,
    lo: Loop,
}

/// The FUSE + loop block driver of an agent: one FUSE connection (mount),
/// its workers, and the loop devices of the attached volumes.
pub struct FuseLoop<V: VolumeIo> {
    opts: FuseOptions,
    fs: Arc<Fs<V>>,
    /// Every descriptor of the connection, the mounting one first.
    fds: Vec<Arc<DevFd>>,
    /// The mount's device.
    dev: u64,
    adopted: bool,
    stop: watch::Sender<bool>,
    /// Wakes the workers asleep in a read when they must stop.
    sleepers: Arc<Sleepers>,
    workers: Mutex<Vec<oneshot::Receiver<()>>>,
    devices: Mutex<BTreeMap<String, Device>>,
    /// Attach, reattach, detach and resize one at a time.
    ops: tokio::sync::Mutex<()>,
}

fn io_err(
    op: &'static str,
    volume: &str,
    device: Option<&Path>,
) -> impl FnOnce(std::io::Error) -> BlockError {
    move |e| BlockError::sys(BlockKind::FuseLoop, op, volume, device, e)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BlockError> + Send + 'static,
) -> Result<T, BlockError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(BlockError::sys(
            BlockKind::FuseLoop,
            "a blocking task",
            "",
            None,
            std::io::Error::other(e.to_string()),
        )),
    }
}

/// FNV-1a: a volume's preferred inode number (stable across restarts and
/// re-attaches, so the kernel's cached name never points elsewhere).
fn name_ino(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h >> 1).max(2)
}

fn valid_file_name(volume: &str) -> bool {
    !volume.is_empty()
        && volume.len() <= 255
        && volume != "."
        && volume != ".."
        && !volume.contains(['/', '\0'])
}

impl<V: VolumeIo> FuseLoop<V> {
    /// Mounts the agent's FUSE file system, or (with a keeper that holds
    /// the connection of an agent that ran before) takes that connection
    /// back and asks the kernel to re-send what was in flight. Call inside
    /// the agent's runtime: its blocking pool takes the volumes' long I/O.
    pub async fn start(opts: FuseOptions) -> Result<Self, BlockError> {
        let shared = Handle::current();
        let mount = opts.mount.clone();
        // A FUSE mount there (of an agent that ran before) is not touched:
        // looking at it would wait for its server.
        if dev::find_mount(&mount).is_none() {
            std::fs::create_dir_all(&mount).map_err(io_err(
                "creating the FUSE mount point",
                "",
                Some(&mount),
            ))?;
        }
        let keeper = opts.keeper.as_deref().map(KeeperClient::new);
        if let Some(k) = keeper.clone() {
            let wait = opts.keeper_wait;
            let held = blocking(move || {
                k.wait_ready(wait)?;
                k.get(KEEPER_KEY)
            })
            .await?;
            if let Some((meta, fds)) = held {
                match serde_json::from_value::<KeptConn>(meta) {
                    Ok(kept)
                        if kept.mount == mount
                            && dev::find_mount(&mount)
                                .is_some_and(|m| m.fs_type == FSTYPE && m.st_dev() == kept.dev) =>
                    {
                        return Self::adopt(opts, kept, fds, shared);
                    }
                    Ok(kept) => {
                        tracing::warn!(held = %kept.mount.display(), mount = %mount.display(),
                        "the keeper holds a FUSE connection whose mount is gone; starting a new one")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the keeper holds something unreadable; starting a new FUSE connection")
                    }
                }
                drop(fds);
                if let Some(k) = keeper.clone() {
                    blocking(move || k.drop_key(KEEPER_KEY)).await?;
                }
            }
        }
        Self::fresh(opts, keeper, shared).await
    }

    async fn fresh(
        opts: FuseOptions,
        keeper: Option<KeeperClient>,
        shared: Handle,
    ) -> Result<Self, BlockError> {
        let mount = opts.mount.clone();
        let n = opts.workers.clamp(1, super::keeper::MAX_FDS);
        let (fds, dev) = {
            let mount = mount.clone();
            blocking(move || {
                let err = |op| io_err(op, "", Some(&mount));
                if dev::find_mount(&mount).is_some_and(|m| m.fs_type == FSTYPE) {
                    // The dead mount of an agent that ran before without a keeper.
                    tracing::warn!(mount = %mount.display(), "unmounting the FUSE mount of an earlier agent (its devices' I/O fails)");
                    dev::unmount_lazy(&mount).map_err(err("unmounting a stale FUSE mount"))?;
                }
                let master = DevFd::open().map_err(err("opening /dev/fuse"))?;
                dev::mount(&master, &mount).map_err(err("mounting the FUSE file system"))?;
                let dev = dev::find_mount(&mount)
                    .filter(|m| m.fs_type == FSTYPE)
                    .map(|m| m.st_dev())
                    .ok_or_else(|| BlockError::sys(BlockKind::FuseLoop, "finding the new FUSE mount", "", Some(&mount), std::io::Error::other("not in /proc/self/mountinfo")))?;
                let mut fds = vec![master];
                while fds.len() < n {
                    let c = DevFd::clone_of(&fds[0]).map_err(err("cloning /dev/fuse descriptors"))?;
                    fds.push(c);
                }
                for f in &fds {
                    f.set_blocking(false).map_err(err("making /dev/fuse non-blocking"))?;
                }
                Ok((fds.into_iter().map(Arc::new).collect::<Vec<_>>(), dev))
            })
            .await?
        };
        let me = Self::with(opts, fds, dev, false, None, None, shared)?;
        let params = tokio::time::timeout(INIT_TIMEOUT, me.fs.initialized())
            .await
            .map_err(|_| {
                BlockError::sys(
                    BlockKind::FuseLoop,
                    "waiting for FUSE INIT",
                    "",
                    Some(&mount),
                    std::io::Error::from(std::io::ErrorKind::TimedOut),
                )
            })?;
        if !params.kernel_resends() {
            tracing::warn!(
                "this kernel cannot re-send FUSE requests (Linux 6.9+): an agent restart fails the devices' I/O in flight"
            );
        }
        if let Some(k) = keeper {
            let kept = KeptConn {
                mount: mount.clone(),
                dev,
                params,
            };
            let meta = serde_json::to_value(&kept).unwrap_or_default();
            let fds: Vec<Arc<DevFd>> = me.fds.clone();
            blocking(move || {
                let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.owned().as_fd()).collect();
                k.put(KEEPER_KEY, meta, &borrowed)
            })
            .await?;
            tracing::info!(keeper = %me.opts.keeper.as_deref().unwrap_or(Path::new("")).display(), descriptors = me.fds.len(),
                "the keeper holds the FUSE connection: an agent restart is a stall");
        }
        tracing::info!(mount = %mount.display(), workers = me.fds.len(), "FUSE block driver mounted");
        Ok(me)
    }

    fn adopt(
        opts: FuseOptions,
        kept: KeptConn,
        fds: Vec<std::os::fd::OwnedFd>,
        shared: Handle,
    ) -> Result<Self, BlockError> {
        let mount = opts.mount.clone();
        if fds.is_empty() {
            return Err(BlockError::at(
                BlockErrorKind::Keeper,
                BlockKind::FuseLoop,
                "adopting the keeper's FUSE connection",
                "",
                opts.keeper.as_deref(),
                "it holds the FUSE connection without descriptors",
            ));
        }
        let fds: Vec<Arc<DevFd>> = fds.into_iter().map(|f| Arc::new(DevFd::from(f))).collect();
        for f in &fds {
            f.set_blocking(false).map_err(io_err(
                "making /dev/fuse non-blocking",
                "",
                Some(&mount),
            ))?;
        }
        // The requests the dead agent read and never answered come again.
        // Before any worker of ours reads: the kernel re-queues *every*
        // request read and not answered, so a request one of our workers
        // had read already would be served twice, and the first copy's
        // write could land after a newer write to the same blocks (a lost
        // write; tests/blockdev.rs's restarts caught requests served twice
        // when this came after the workers started).
        if let Err(e) = fds[0].notify_resend() {
            tracing::warn!(error = %e, "FUSE_NOTIFY_RESEND failed: requests in flight at the restart may hang");
        }
        let grace = opts.restore_grace;
        let me = Self::with(
            opts,
            fds,
            kept.dev,
            true,
            Some(kept.params),
            Some(grace),
            shared,
        )?;
        tracing::info!(mount = %mount.display(), descriptors = me.fds.len(),
            "took the FUSE connection back from the keeper; the kernel re-sends what was in flight");
        Ok(me)
    }

    fn with(
        opts: FuseOptions,
        fds: Vec<Arc<DevFd>>,
        dev: u64,
        adopted: bool,
        params: Option<Params>,
        restoring: Option<Duration>,
        shared: Handle,
    ) -> Result<Self, BlockError> {
        let fs = Arc::new(Fs::new(opts.fs.clone()));
        if let Some(p) = params {
            fs.adopt(p);
        }
        // Before any worker reads a request of a volume not served again yet.
        if let Some(grace) = restoring {
            fs.start_restoring(grace);
        }
        let (stop, stopped) = watch::channel(false);
        let sleepers = Sleepers::new();
        let slots = Arc::new(Slots::new(fds.len()));
        let mut workers = Vec::new();
        for (i, fd) in fds.iter().enumerate() {
            let slot = slots.take().ok_or_else(|| {
                BlockError::sys(
                    BlockKind::FuseLoop,
                    "starting FUSE workers",
                    "",
                    None,
                    std::io::Error::other("no thread slot"),
                )
            })?;
            let input = (fs.clone(), fd.clone(), stopped.clone(), sleepers.clone());
            let done = threads::spawn_dedicated(
                format!("fuse-{i}"),
                slot,
                shared.clone(),
                input,
                |(fs, fd, stop, sleepers)| async move {
                    memsafe::io_flusher_best_effort();
                    // The connection's other workers read its queue while
                    // this one flushes.
                    threads::share_queue();
                    if let Err(e) = dev::serve(fs, fd, stop, sleepers).await {
                        tracing::error!(error = %e, "a FUSE worker failed");
                    }
                },
            )
            .map_err(|(_, e)| {
                BlockError::sys(BlockKind::FuseLoop, "starting FUSE workers", "", None, e)
            })?;
            workers.push(done);
        }
        // Tests: the workers read requests for a while before this agent
        // goes on (a loaded machine's scheduling, made certain). Blocks this
        // thread, which only starts the agent.
        if let Some(d) = volmig_api::fault::delay("agent:fuse-workers-started") {
            std::thread::sleep(d);
        }
        Ok(Self {
            opts,
            fs,
            fds,
            dev,
            adopted,
            stop,
            sleepers,
            workers: Mutex::new(workers),
            devices: Mutex::new(BTreeMap::new()),
            ops: tokio::sync::Mutex::new(()),
        })
    }

    pub fn mount_point(&self) -> &Path {
        &self.opts.mount
    }

    /// This connection was taken back from the keeper (a restart).
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// A keeper holds the connection: a restart is a stall.
    pub fn kept(&self) -> bool {
        self.opts.keeper.is_some()
    }

    pub fn stats(&self) -> &Stats {
        &self.fs.stats
    }

    /// What INIT negotiated.
    pub fn params(&self) -> Option<Params> {
        self.fs.params()
    }

    /// Requests for volumes not reattached fail from now on.
    pub fn restored(&self) {
        self.fs.restored();
    }

    fn device(&self, volume: &str) -> Option<Device> {
        self.devices
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(volume)
            .copied()
    }

    fn pick_ino(&self, volume: &str) -> u64 {
        let mut ino = name_ino(volume);
        while !self.fs.ino_free(ino) {
            ino = ino.wrapping_add(1).max(2);
        }
        ino
    }

    fn record(&self, volume: &str, d: Device) -> Attached {
        let detail = Detail {
            ino: d.ino,
            lo: d.lo.0,
            file: self.opts.mount.join(volume),
            conn_dev: self.dev,
        };
        let path = d.lo.path();
        Attached {
            path: path.clone(),
            record: DeviceRecord {
                kind: BlockKind::FuseLoop,
                volume: volume.to_string(),
                path,
                detail: serde_json::to_value(detail).unwrap_or_default(),
            },
        }
    }

    fn forget_name(&self, volume: &str) {
        if let Err(e) = self.fds[0].notify_inval_entry(volume)
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            tracing::debug!(%volume, error = %e, "FUSE entry invalidation failed");
        }
    }

    /// Unmounts the FUSE file system (no device may be attached) and lets
    /// the keeper drop the connection.
    pub async fn unmount(&self) -> Result<(), BlockError> {
        let _one = self.ops.lock().await;
        if let Some((v, d)) = self
            .devices
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .next()
        {
            return Err(BlockError::at(
                BlockErrorKind::Busy,
                BlockKind::FuseLoop,
                "unmount",
                v,
                Some(&d.lo.path()),
                "a volume still has its block device",
            ));
        }
        if let Some(k) = self.opts.keeper.as_deref().map(KeeperClient::new) {
            blocking(move || k.drop_key(KEEPER_KEY)).await?;
        }
        let mount = self.opts.mount.clone();
        blocking(move || {
            dev::unmount_lazy(&mount).map_err(io_err("unmounting the FUSE file system", "", None))
        })
        .await?;
        self.stop_workers().await;
        Ok(())
    }

    /// Stops serving and leaves the mount and its devices to the next
    /// agent (a graceful stop with devices attached): the workers stop
    /// reading, answer what they hold and end, while this process can
    /// still do I/O. What the kernel queues afterwards waits for the next
    /// agent, which takes the connection back from the keeper. (Left
    /// running, they would go on serving while the process winds down its
    /// runtime, and a request needing the blocking pool would fail: EIO in
    /// the workload.)
    pub async fn suspend(&self) {
        let _one = self.ops.lock().await;
        self.stop_workers().await;
    }

    async fn stop_workers(&self) {
        let _ = self.stop.send(true);
        self.sleepers.wake_until_gone();
        let workers: Vec<_> =
            std::mem::take(&mut *self.workers.lock().unwrap_or_else(PoisonError::into_inner));
        for w in workers {
            let _ = tokio::time::timeout(Duration::from_secs(15), w).await;
        }
    }
}

impl<V: VolumeIo> Drop for FuseLoop<V> {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.sleepers.wake_until_gone();
    }
}

impl<V: VolumeIo> BlockDriver<V> for FuseLoop<V> {
    fn kind(&self) -> BlockKind {
        BlockKind::FuseLoop
    }

    async fn attach(&self, volume: &str, io: Arc<V>) -> Result<Attached, BlockError> {
        if !valid_file_name(volume) {
            return Err(BlockError::sys(
                BlockKind::FuseLoop,
                "attach",
                volume,
                None,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a valid file name"),
            ));
        }
        let _one = self.ops.lock().await;
        if let Some(d) = self.device(volume) {
            return Err(BlockError::at(
                BlockErrorKind::AlreadyAttached,
                BlockKind::FuseLoop,
                "attach",
                volume,
                Some(&d.lo.path()),
                "",
            ));
        }
        let ino = self.pick_ino(volume);
        let size = io.size();
        self.fs.register(volume, ino, size, io);
        let file = self.opts.mount.join(volume);
        let (direct, block_size) = (self.opts.loop_direct_io, self.opts.block_size);
        let name = volume.to_string();
        let attached = blocking(move || {
            use std::os::unix::fs::OpenOptionsExt;
            let mut o = std::fs::OpenOptions::new();
            o.read(true).write(true).custom_flags(libc::O_CLOEXEC);
            if direct {
                o.custom_flags(libc::O_CLOEXEC | libc::O_DIRECT);
            }
            let f = o.open(&file).map_err(io_err("opening the volume's FUSE file", &name, Some(&file)))?;
            let lo = Loop::configure(&f, &file, block_size, direct).map_err(io_err("attaching a loop device", &name, Some(&file)))?;
            if direct && !lo.dio() {
                tracing::warn!(volume = %name, device = %lo.path().display(), "the loop device runs without direct I/O (slower, and caches twice)");
            }
            Ok(lo)
        })
        .await;
        let lo = match attached {
            Ok(lo) => lo,
            Err(e) => {
                self.fs.unregister(ino);
                self.forget_name(volume);
                return Err(e);
            }
        };
        let d = Device { ino, lo };
        self.devices
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(volume.to_string(), d);
        tracing::info!(%volume, device = %lo.path().display(), size, "block device attached (FUSE + loop)");
        Ok(self.record(volume, d))
    }

    async fn reattach(&self, record: &DeviceRecord, io: Arc<V>) -> Result<Attached, BlockError> {
        let volume = record.volume.as_str();
        let bad = |reason: String| {
            BlockError::at(
                BlockErrorKind::InvalidRecord,
                BlockKind::FuseLoop,
                "reattach",
                volume,
                Some(&record.path),
                reason,
            )
        };
        if record.kind != BlockKind::FuseLoop {
            return Err(bad(format!("it is a {} device", record.kind)));
        }
        let d: Detail =
            serde_json::from_value(record.detail.clone()).map_err(|e| bad(e.to_string()))?;
        let lo = Loop(d.lo);
        let gone = |reason: &str| {
            BlockError::at(
                BlockErrorKind::Gone,
                BlockKind::FuseLoop,
                "reattach",
                volume,
                Some(&lo.path()),
                reason,
            )
        };
        let _one = self.ops.lock().await;
        if let Some(have) = self.device(volume) {
            return if have.lo == lo && have.ino == d.ino {
                Ok(self.record(volume, have))
            } else {
                Err(BlockError::at(
                    BlockErrorKind::AlreadyAttached,
                    BlockKind::FuseLoop,
                    "reattach",
                    volume,
                    Some(&have.lo.path()),
                    "another device",
                ))
            };
        }
        if d.conn_dev != self.dev || !self.adopted {
            return Err(gone(
                "its FUSE connection ended with the agent that served it (no descriptor keeper held it)",
            ));
        }
        let file = self.opts.mount.join(volume);
        if lo.backing_file().as_deref() != Some(file.as_path()) {
            return Err(gone(
                "the loop device is not attached to the volume's file any more",
            ));
        }
        if !self.fs.register(volume, d.ino, io.size(), io) {
            return Err(gone("its inode number is taken by another volume"));
        }
        let dev = self.dev;
        let status = blocking(move || {
            lo.status().map_err(io_err(
                "reading the loop device's status",
                "",
                Some(&lo.path()),
            ))
        })
        .await;
        match status {
            Ok(s) if s.lo_inode == d.ino && s.lo_device == dev => {}
            Ok(_) => {
                self.fs.unregister(d.ino);
                return Err(gone("the loop device serves another file"));
            }
            Err(e) => {
                self.fs.unregister(d.ino);
                return Err(e);
            }
        }
        let dv = Device { ino: d.ino, lo };
        self.devices
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(volume.to_string(), dv);
        tracing::info!(%volume, device = %lo.path().display(), "block device served again (FUSE + loop)");
        Ok(self.record(volume, dv))
    }

    async fn detach(&self, volume: &str) -> Result<(), BlockError> {
        let _one = self.ops.lock().await;
        let Some(d) = self.device(volume) else {
            return Err(BlockError::at(
                BlockErrorKind::NotAttached,
                BlockKind::FuseLoop,
                "detach",
                volume,
                None,
                "",
            ));
        };
        let lo = d.lo;
        let name = volume.to_string();
        blocking(move || match lo.detach() {
            Ok(()) => Ok(()),
            Err(DetachError::Busy) => Err(BlockError::at(
                BlockErrorKind::Busy,
                BlockKind::FuseLoop,
                "detach",
                &name,
                Some(&lo.path()),
                "mounted or open: unmount it first",
            )),
            Err(DetachError::Io(e)) => Err(BlockError::sys(
                BlockKind::FuseLoop,
                "detaching the loop device",
                &name,
                Some(&lo.path()),
                e,
            )),
        })
        .await?;
        self.devices
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(volume);
        self.fs.unregister(d.ino);
        self.forget_name(volume);
        tracing::info!(%volume, device = %lo.path().display(), "block device detached");
        Ok(())
    }

    async fn resize(&self, volume: &str, size: u64) -> Result<(), BlockError> {
        let _one = self.ops.lock().await;
        let Some(d) = self.device(volume) else {
            return Err(BlockError::at(
                BlockErrorKind::NotAttached,
                BlockKind::FuseLoop,
                "resize",
                volume,
                None,
                "",
            ));
        };
        self.fs.set_size(d.ino, size);
        if let Err(e) = self.fds[0].notify_inval_inode(d.ino)
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            return Err(BlockError::sys(
                BlockKind::FuseLoop,
                "invalidating the FUSE file's size",
                volume,
                Some(&d.lo.path()),
                e,
            ));
        }
        let file = self.opts.mount.join(volume);
        let name = volume.to_string();
        blocking(move || {
            let lo = d.lo;
            let err = |op| io_err(op, &name, Some(&file));
            refresh_size(&file).map_err(err("reading the FUSE file's new size"))?;
            lo.set_capacity().map_err(err("LOOP_SET_CAPACITY"))?;
            let now = lo.size().map_err(err("reading the loop device's size"))?;
            if now != size / 512 * 512 {
                return Err(BlockError::sys(
                    BlockKind::FuseLoop,
                    "resizing the loop device",
                    &name,
                    Some(&lo.path()),
                    std::io::Error::other(format!("it shows {now} bytes, not {size}")),
                ));
            }
            Ok(())
        })
        .await?;
        tracing::info!(%volume, size, "block device resized");
        Ok(())
    }
}

/// Makes the kernel ask the file system for the file's attributes now
/// (its cached size is what loop reads).
fn refresh_size(file: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(file.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: statx is plain data; all-zero is valid.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: c is NUL-terminated, st a live, writable statx.
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_STATX_FORCE_SYNC,
            libc::STATX_SIZE,
            &mut st,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.stx_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_numbers_are_stable_and_never_the_root() {
        assert_eq!(name_ino("pg-data"), name_ino("pg-data"));
        assert_ne!(name_ino("a"), name_ino("b"));
        assert!(name_ino("") >= 2);
        assert!(
            name_ino("x") < 1 << 63,
            "never looks like a re-sent request's bit"
        );
    }

    #[test]
    fn records_keep_what_reattach_needs() {
        let d = Detail {
            ino: 77,
            lo: 3,
            file: "/var/lib/volmig/block/fuse/v".into(),
            conn_dev: 54,
        };
        let j = serde_json::to_value(&d).unwrap();
        assert_eq!(j["loop"], 3);
        assert_eq!(serde_json::from_value::<Detail>(j).unwrap(), d);
        let k = KeptConn {
            mount: "/m".into(),
            dev: 9,
            params: Params {
                minor: 45,
                max_write: 1 << 20,
                ..Default::default()
            },
        };
        assert_eq!(
            serde_json::from_value::<KeptConn>(serde_json::to_value(&k).unwrap()).unwrap(),
            k
        );
    }

    /// An agent upgraded in place (`kubectl volmig upgrade-agents`) takes
    /// the connection back from a keeper that an older agent filled: the
    /// record as agents write it today must stay readable. A change that
    /// breaks this literal breaks in-place upgrades.
    #[test]
    fn a_connection_kept_by_an_older_agent_is_read() {
        let old = serde_json::json!({
            "mount": "/var/lib/volmig/block/fuse",
            "dev": 54,
            "params": {"minor": 41, "flags": 8421385, "kernel_flags": 2147483647,
                       "max_write": 1048576, "max_pages": 256, "max_background": 256},
        });
        let k: KeptConn = serde_json::from_value(old).unwrap();
        assert_eq!(k.mount, Path::new("/var/lib/volmig/block/fuse"));
        assert_eq!(
            (k.dev, k.params.minor, k.params.max_write),
            (54, 41, 1 << 20)
        );
        assert_eq!(k.params.max_pages, 256);
        let old_detail = serde_json::json!({"ino": 77, "loop": 3,
            "file": "/var/lib/volmig/block/fuse/v", "conn_dev": 54});
        assert_eq!(serde_json::from_value::<Detail>(old_detail).unwrap().lo, 3);
    }

    #[test]
    fn file_names_are_checked() {
        assert!(valid_file_name("pg-0.data_1"));
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert!(!valid_file_name(bad), "{bad:?}");
        }
    }
}
