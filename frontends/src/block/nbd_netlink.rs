//! Kernel NBD over generic netlink: `/dev/nbdN` served by the agent.
//!
//! The agent makes one socketpair per connection, hands one end of each to
//! the kernel's NBD client (`NBD_CMD_CONNECT` with `NBD_ATTR_SOCKETS`) and
//! serves the other in the NBD transmission phase (the kernel never
//! negotiates: [`NbdServer::serve_transmission`]). The device is configured
//! so that an agent restart is a stall:
//!
//! - `NBD_ATTR_TIMEOUT` 0 by default: no I/O timeout, the kernel never
//!   gives up on a slow request (a request in flight on a connection that
//!   died is re-queued by the block layer's timer, every 30 s, once the
//!   connection was replaced);
//! - `NBD_ATTR_DEAD_CONN_TIMEOUT`: when every connection is dead the kernel
//!   holds new I/O that long for a new socket instead of failing it;
//! - `NBD_ATTR_BACKEND_IDENTIFIER`: a stable id of the volume's device
//!   (`volmig:<volume>:<nonce>`), persisted in the [`DeviceRecord`]. A
//!   restarted agent checks it (`/sys/block/nbdN/backend`) before it
//!   touches the device, so it never reconfigures a foreign one; the
//!   kernel checks it again on `NBD_CMD_RECONFIGURE`.
//!
//! A connection the kernel drops while the agent lives (an I/O timeout,
//! when one is set) is replaced by the task that served it: one
//! `NBD_CMD_RECONFIGURE` with a new socket.
//!
//! After a restart, [`BlockDriver::reattach`] gives the kernel new sockets
//! with `NBD_CMD_RECONFIGURE`, one per message (each replaces one dead
//! connection; while the kernel has not noticed a death yet it answers
//! ENOSPC and the agent retries). Detach claims the device exclusively
//! (EBUSY while mounted), then sends `NBD_CMD_DISCONNECT`. Resize is
//! `NBD_CMD_RECONFIGURE` with `NBD_ATTR_SIZE_BYTES`.
//!
//! Not runnable on machines without the `nbd` module; see e2e/ for the
//! kind steps that run it.

pub mod genl;
mod kernel;

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tracing::{info, warn};
use volmig_api::io::VolumeIo;

pub use genl::{Connect, DeviceStatus, Reconfigure, server_flags};
pub use kernel::{NbdKernel, Netlink, device_path, family_available};

use super::{
    Attached, BlockContext, BlockDriver, BlockError, BlockErrorKind, BlockKind, DeviceRecord,
};
use crate::nbd::{Export, NbdError, NbdServer};

/// Most connections (socketpairs, kernel hardware queues) per device.
pub const MAX_CONNECTIONS: usize = 16;

/// How a device is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdParams {
    /// Connections (socketpairs) per device; each is a hardware queue in
    /// the kernel and a dedicated I/O thread in the agent.
    pub connections: usize,
    /// Preferred logical block size (512..=4096, a power of two); a volume
    /// whose size it does not divide gets 512.
    pub block_size: u64,
    /// The kernel's I/O timeout; zero: none (see the module doc). With
    /// one, the kernel drops a connection whose request takes longer and
    /// re-sends the request on another (the driver gives it a new
    /// connection in place of the dropped one): a short timeout bounds the
    /// stall of requests in flight when the agent dies, which with none
    /// wait for the block layer's 30 s timer.
    pub io_timeout: Duration,
    /// How long the kernel holds I/O while every connection is dead.
    pub dead_conn_timeout: Duration,
    /// How long a reattach waits for the kernel to notice that the old
    /// connections died.
    pub reconnect_wait: Duration,
}

impl Default for NbdParams {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        NbdParams {
            connections: cpus.clamp(1, 4),
            block_size: 4096,
            io_timeout: Duration::ZERO,
            dead_conn_timeout: Duration::from_secs(600),
            reconnect_wait: Duration::from_secs(10),
        }
    }
}

impl NbdParams {
    /// What is wrong with these parameters, if anything.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_CONNECTIONS).contains(&self.connections) {
            return Err(format!(
                "connections must be 1..={MAX_CONNECTIONS}, not {}",
                self.connections
            ));
        }
        if !self.block_size.is_power_of_two() || !(512..=4096).contains(&self.block_size) {
            return Err(format!(
                "block size must be a power of two in 512..=4096, not {}",
                self.block_size
            ));
        }
        if self.dead_conn_timeout.is_zero() {
            return Err(
                "a zero dead-connection timeout turns an agent restart into I/O errors".into(),
            );
        }
        Ok(())
    }
}

/// The block size for a volume of `size` bytes: `preferred` if it divides
/// the size, else 512; `None` if not even 512 does (the kernel would cut
/// the end off) or the volume is empty.
pub fn block_size_for(size: u64, preferred: u64) -> Option<u64> {
    if size == 0 {
        None
    } else if size.is_multiple_of(preferred) {
        Some(preferred)
    } else if size.is_multiple_of(512) {
        Some(512)
    } else {
        None
    }
}

/// The backend identifier of a new device of `volume`.
pub fn identifier(volume: &str, nonce: u64) -> String {
    format!("volmig:{volume}:{nonce:016x}")
}

fn nonce() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 32)
}

/// What an NBD [`DeviceRecord`] holds in `detail`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NbdDetail {
    pub index: u32,
    pub identifier: String,
    pub connections: usize,
    pub block_size: u64,
}

/// What a reattach does with a recorded device, given what the kernel says
/// about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReattachPlan {
    /// Give it new sockets.
    Reconfigure,
    /// Leave it alone.
    Refuse(BlockErrorKind, String),
}

/// The reattach decision: only a configured device that carries the
/// record's identifier is reconfigured.
pub fn plan_reattach(
    detail: &NbdDetail,
    status: Option<DeviceStatus>,
    backend: Option<&str>,
) -> ReattachPlan {
    let dev = format!("/dev/nbd{}", detail.index);
    let Some(status) = status else {
        return ReattachPlan::Refuse(BlockErrorKind::Gone, format!("{dev} does not exist"));
    };
    if !status.connected {
        return ReattachPlan::Refuse(
            BlockErrorKind::Gone,
            format!("{dev} is no longer configured"),
        );
    }
    match backend {
        None => ReattachPlan::Refuse(
            BlockErrorKind::Foreign,
            format!(
                "{dev} has no backend identifier (expected {:?})",
                detail.identifier
            ),
        ),
        Some(b) if b != detail.identifier => ReattachPlan::Refuse(
            BlockErrorKind::Foreign,
            format!("{dev} serves {b:?}, not {:?}", detail.identifier),
        ),
        Some(_) => ReattachPlan::Reconfigure,
    }
}

/// Errors of a RECONFIGURE that may pass once the kernel has noticed the
/// old connections died (no dead slot yet: ENOSPC) or finished a
/// concurrent change (EBUSY).
pub fn reconfigure_retryable(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EBUSY))
}

struct Device {
    index: u32,
    identifier: String,
    block_size: u64,
    link: Arc<Link>,
    serving: Vec<JoinHandle<()>>,
}

/// What a volume's connection tasks know of its device.
#[derive(Debug, Default)]
struct Link {
    /// Set once the kernel configured the device: from then on a
    /// connection that ends is replaced.
    device: OnceLock<(u32, String)>,
    /// Set before the agent closes connections on purpose (detach, a
    /// failed attach): they are not replaced.
    closing: AtomicBool,
}

/// The kernel NBD block driver.
pub struct NbdNetlinkDriver<V: VolumeIo, K: NbdKernel = Netlink> {
    kernel: Arc<K>,
    params: NbdParams,
    server: NbdServer<V>,
    devices: Mutex<HashMap<String, Device>>,
}

impl<V: VolumeIo> NbdNetlinkDriver<V, Netlink> {
    /// A driver for the running kernel.
    pub fn new(params: NbdParams) -> Result<Self, String> {
        Self::with_kernel(Arc::new(Netlink::new()), params)
    }
}

impl<V: VolumeIo, K: NbdKernel> NbdNetlinkDriver<V, K> {
    /// A driver over `kernel` (tests pass a fake).
    pub fn with_kernel(kernel: Arc<K>, params: NbdParams) -> Result<Self, String> {
        params.validate()?;
        Ok(NbdNetlinkDriver {
            kernel,
            params,
            server: NbdServer::new(),
            devices: Mutex::new(HashMap::new()),
        })
    }

    pub fn params(&self) -> &NbdParams {
        &self.params
    }

    fn ctx(op: &'static str, volume: &str, index: Option<u32>) -> BlockContext {
        BlockContext {
            kind: BlockKind::Nbd,
            op,
            volume: volume.to_string(),
            device: index.map(device_path),
        }
    }

    fn devices(&self) -> std::sync::MutexGuard<'_, HashMap<String, Device>> {
        self.devices.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers the volume's export with the internal server.
    fn add_export(&self, op: &'static str, volume: &str, io: Arc<V>) -> Result<(), BlockError> {
        if self.devices().contains_key(volume) {
            return Err(BlockError::new(
                BlockErrorKind::AlreadyAttached,
                Self::ctx(op, volume, None),
                "the volume already has an NBD device",
            ));
        }
        self.server
            .add_export(Export::new(volume, io))
            .map_err(|e| match e {
                NbdError::DuplicateExport { .. } => BlockError::new(
                    BlockErrorKind::AlreadyAttached,
                    Self::ctx(op, volume, None),
                    "the volume is being attached",
                ),
                e => BlockError::new(
                    BlockErrorKind::InvalidArgument,
                    Self::ctx(op, volume, None),
                    e.to_string(),
                ),
            })
    }

    /// One socketpair: our end served in the transmission phase, the
    /// kernel's end returned. When our end's connection ends while the
    /// device lives (the kernel dropped it: an I/O timeout when one is
    /// set, or a connection error), the task gives the kernel a new one in
    /// its place.
    fn open_connection(
        &self,
        volume: &str,
        n: usize,
        link: &Arc<Link>,
    ) -> io::Result<(UnixStream, JoinHandle<()>)> {
        let (ours, theirs) = UnixStream::pair()?;
        let server = self.server.clone();
        let kernel = self.kernel.clone();
        let wait = self.params.reconnect_wait;
        let link = link.clone();
        let volume = volume.to_string();
        let task = tokio::spawn(async move {
            let peer = format!("kernel-nbd#{n}");
            let mut ours = ours;
            loop {
                if let Err(e) = server.serve_transmission(ours, &volume, &peer).await {
                    warn!(volume = %volume, error = %e, "cannot serve a kernel NBD connection");
                    return;
                }
                if link.closing.load(Ordering::SeqCst) {
                    return;
                }
                let Some((index, identifier)) = link.device.get().cloned() else {
                    return;
                };
                warn!(volume = %volume, device = %device_path(index).display(), connection = n,
                      "the kernel dropped an NBD connection; giving it a new one");
                match replace_connection(kernel.clone(), index, identifier, wait).await {
                    Ok(s) => ours = s,
                    Err(e) => {
                        warn!(volume = %volume, device = %device_path(index).display(),
                              error = %e, "cannot replace an NBD connection");
                        return;
                    }
                }
            }
        });
        Ok((theirs, task))
    }

    /// Undoes a failed attach: closes our ends (the kernel sees the
    /// connections die) and forgets the export.
    async fn abandon(&self, volume: &str, link: &Link, serving: Vec<JoinHandle<()>>) {
        link.closing.store(true, Ordering::SeqCst);
        self.server.remove_export(volume);
        for t in serving {
            let _ = t.await;
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        ctx: impl Fn() -> BlockContext,
        what: &str,
        f: impl FnOnce(&K) -> io::Result<T> + Send + 'static,
    ) -> Result<T, BlockError> {
        let kernel = self.kernel.clone();
        match tokio::task::spawn_blocking(move || f(&kernel)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(BlockError::io(ctx(), what.to_string(), e)),
            Err(e) => Err(BlockError::io(
                ctx(),
                what.to_string(),
                io::Error::other(e.to_string()),
            )),
        }
    }

    /// For tests: the agent dies without a word. Our ends of every
    /// connection close, the devices stay configured in the kernel.
    #[cfg(test)]
    async fn crash(&self) {
        let gone: Vec<(String, Device)> = self.devices().drain().collect();
        for (volume, dev) in gone {
            self.abandon(&volume, &dev.link, dev.serving).await;
        }
    }
}

impl<V: VolumeIo, K: NbdKernel> BlockDriver<V> for NbdNetlinkDriver<V, K> {
    fn kind(&self) -> BlockKind {
        BlockKind::Nbd
    }

    async fn attach(&self, volume: &str, io: Arc<V>) -> Result<Attached, BlockError> {
        let size = io.size();
        let block_size = block_size_for(size, self.params.block_size).ok_or_else(|| {
            BlockError::new(
                BlockErrorKind::InvalidArgument,
                Self::ctx("attach", volume, None),
                format!("a volume of {size} bytes is not a whole number of 512-byte blocks"),
            )
        })?;
        self.add_export("attach", volume, io)?;
        let link = Arc::new(Link::default());
        let mut kernel_ends = Vec::new();
        let mut serving = Vec::new();
        for n in 0..self.params.connections {
            match self.open_connection(volume, n, &link) {
                Ok((theirs, task)) => {
                    kernel_ends.push(theirs);
                    serving.push(task);
                }
                Err(e) => {
                    self.abandon(volume, &link, serving).await;
                    return Err(BlockError::io(
                        Self::ctx("attach", volume, None),
                        "socketpair",
                        e,
                    ));
                }
            }
        }
        let identifier = identifier(volume, nonce());
        let req = Connect {
            index: None,
            size,
            block_size,
            timeout: self.params.io_timeout.as_secs(),
            dead_conn_timeout: self.params.dead_conn_timeout.as_secs(),
            server_flags: server_flags(),
            client_flags: 0,
            identifier: identifier.clone(),
            sockets: kernel_ends.iter().map(|s| s.as_raw_fd()).collect(),
        };
        // The kernel takes its own reference to each socket during the
        // call; our copies of its ends close right after.
        let connected = self
            .blocking(
                || Self::ctx("attach", volume, None),
                "NBD_CMD_CONNECT",
                move |k| {
                    let r = k.connect(&req);
                    drop(kernel_ends);
                    r
                },
            )
            .await;
        let index = match connected {
            Ok(i) => i,
            Err(e) => {
                self.abandon(volume, &link, serving).await;
                return Err(e);
            }
        };
        let _ = link.device.set((index, identifier.clone()));
        let path = device_path(index);
        if let Err(e) = super::ensure_device_node(
            &path,
            &PathBuf::from(format!("/sys/class/block/nbd{index}/dev")),
            true,
        ) {
            warn!(volume = %volume, device = %path.display(), error = %e,
                  "no device node for the NBD device");
        }
        info!(volume = %volume, device = %path.display(), size, block_size,
              connections = self.params.connections, "NBD device attached");
        let detail = NbdDetail {
            index,
            identifier: identifier.clone(),
            connections: self.params.connections,
            block_size,
        };
        self.devices().insert(
            volume.to_string(),
            Device {
                index,
                identifier,
                block_size,
                link,
                serving,
            },
        );
        Ok(attached(volume, path, &detail))
    }

    async fn reattach(&self, record: &DeviceRecord, io: Arc<V>) -> Result<Attached, BlockError> {
        let volume = record.volume.as_str();
        let bad = |detail: String| {
            BlockError::new(
                BlockErrorKind::InvalidRecord,
                Self::ctx("reattach", volume, None),
                detail,
            )
        };
        if record.kind != BlockKind::Nbd {
            return Err(bad(format!("a {} record", record.kind)));
        }
        let detail: NbdDetail = serde_json::from_value(record.detail.clone())
            .map_err(|e| bad(format!("detail: {e}")))?;
        if detail.connections == 0 || detail.connections > MAX_CONNECTIONS {
            return Err(bad(format!("{} connections", detail.connections)));
        }
        let index = detail.index;
        let ctx = || Self::ctx("reattach", volume, Some(index));
        let (status, backend) = self
            .blocking(ctx, "NBD_CMD_STATUS", move |k| {
                let status = k.status(index)?;
                let backend = match status {
                    Some(_) => k.backend(index)?,
                    None => None,
                };
                Ok((status, backend))
            })
            .await?;
        if let ReattachPlan::Refuse(kind, why) = plan_reattach(&detail, status, backend.as_deref())
        {
            return Err(BlockError::new(kind, ctx(), why));
        }
        self.add_export("reattach", volume, io)?;
        let link = Arc::new(Link::default());
        let mut serving = Vec::new();
        let deadline = Instant::now() + self.params.reconnect_wait;
        for n in 0..detail.connections {
            let (theirs, task) = match self.open_connection(volume, n, &link) {
                Ok(c) => c,
                Err(e) => {
                    self.abandon(volume, &link, serving).await;
                    return Err(BlockError::io(ctx(), "socketpair", e));
                }
            };
            serving.push(task);
            let req = Reconfigure {
                index,
                identifier: detail.identifier.clone(),
                sockets: vec![theirs.as_raw_fd()],
                size: None,
                timeout: None,
                dead_conn_timeout: None,
            };
            let done = self
                .blocking(ctx, "NBD_CMD_RECONFIGURE", move |k| {
                    let _keep = theirs;
                    loop {
                        match k.reconfigure(&req) {
                            Err(e) if reconfigure_retryable(&e) && Instant::now() < deadline => {
                                std::thread::sleep(Duration::from_millis(50));
                            }
                            r => return r,
                        }
                    }
                })
                .await;
            if let Err(e) = done {
                self.abandon(volume, &link, serving).await;
                return Err(e);
            }
        }
        let _ = link.device.set((index, detail.identifier.clone()));
        let path = device_path(index);
        info!(volume = %volume, device = %path.display(), connections = detail.connections,
              "NBD device reattached");
        self.devices().insert(
            volume.to_string(),
            Device {
                index,
                identifier: detail.identifier.clone(),
                block_size: detail.block_size,
                link,
                serving,
            },
        );
        Ok(attached(volume, path, &detail))
    }

    async fn detach(&self, volume: &str) -> Result<(), BlockError> {
        let (index, link) = self
            .devices()
            .get(volume)
            .map(|d| (d.index, d.link.clone()))
            .ok_or_else(|| {
                BlockError::new(
                    BlockErrorKind::NotAttached,
                    Self::ctx("detach", volume, None),
                    "no NBD device",
                )
            })?;
        let ctx = || Self::ctx("detach", volume, Some(index));
        // The kernel ends every connection on disconnect: none is replaced.
        link.closing.store(true, Ordering::SeqCst);
        let claimed = self
            .blocking(ctx, "claiming the device", move |k| {
                let claim = match k.claim(index) {
                    Ok(c) => Some(c),
                    // No device node here (a container without it): nothing
                    // can hold it open through this path either.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
                    Err(e) => return Err(e),
                };
                // Held across the disconnect so that nobody mounts it meanwhile.
                let r = k.disconnect(index);
                drop(claim);
                r
            })
            .await;
        if let Err(e) = claimed {
            // Still attached (busy, or the kernel refused): keep healing.
            link.closing.store(false, Ordering::SeqCst);
            return Err(e);
        }
        let dev = self.devices().remove(volume);
        if let Some(dev) = dev {
            self.abandon(volume, &dev.link, dev.serving).await;
        }
        info!(volume = %volume, device = %device_path(index).display(), "NBD device detached");
        Ok(())
    }

    async fn resize(&self, volume: &str, size: u64) -> Result<(), BlockError> {
        let (index, identifier, block_size) = self
            .devices()
            .get(volume)
            .map(|d| (d.index, d.identifier.clone(), d.block_size))
            .ok_or_else(|| {
                BlockError::new(
                    BlockErrorKind::NotAttached,
                    Self::ctx("resize", volume, None),
                    "no NBD device",
                )
            })?;
        let ctx = || Self::ctx("resize", volume, Some(index));
        if size == 0 || !size.is_multiple_of(block_size) {
            return Err(BlockError::new(
                BlockErrorKind::InvalidArgument,
                ctx(),
                format!("{size} bytes is not a whole number of {block_size}-byte blocks"),
            ));
        }
        let req = Reconfigure {
            index,
            identifier,
            sockets: vec![],
            size: Some(size),
            timeout: None,
            dead_conn_timeout: None,
        };
        self.blocking(ctx, "NBD_CMD_RECONFIGURE", move |k| k.reconfigure(&req))
            .await?;
        info!(volume = %volume, device = %device_path(index).display(), size, "NBD device resized");
        Ok(())
    }
}

/// Gives the kernel a new socket in place of a dead connection of device
/// `index` (retried while the kernel has not noticed the death yet);
/// returns our end.
async fn replace_connection<K: NbdKernel>(
    kernel: Arc<K>,
    index: u32,
    identifier: String,
    wait: Duration,
) -> io::Result<UnixStream> {
    let (ours, theirs) = UnixStream::pair()?;
    let deadline = Instant::now() + wait;
    let req = Reconfigure {
        index,
        identifier,
        sockets: vec![theirs.as_raw_fd()],
        size: None,
        timeout: None,
        dead_conn_timeout: None,
    };
    tokio::task::spawn_blocking(move || {
        let _keep = theirs;
        loop {
            match kernel.reconfigure(&req) {
                Err(e) if reconfigure_retryable(&e) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                r => return r,
            }
        }
    })
    .await
    .map_err(io::Error::other)??;
    Ok(ours)
}

fn attached(volume: &str, path: PathBuf, detail: &NbdDetail) -> Attached {
    Attached {
        path: path.clone(),
        record: DeviceRecord {
            kind: BlockKind::Nbd,
            volume: volume.to_string(),
            path,
            // A plain struct of strings and integers always serializes.
            detail: serde_json::to_value(detail).unwrap_or(serde_json::Value::Null),
        },
    }
}

#[cfg(test)]
mod tests;
