//! ublk: `/dev/ublkbN` served by the agent through `libublk`.
//!
//! Each device has `nr_queues` queues; each queue is a thread of libublk's
//! (its own io_uring and a small single-threaded executor with one task per
//! tag) that takes requests from the kernel and completes them. The
//! [`VolumeIo`] is async on tokio: every queue hands its requests to a
//! *bridge* thread of its own (a dedicated I/O thread, see
//! [`volmig_api::io::threads`]) that runs them and wakes the queue through
//! an eventfd read on the queue's ring. Data is copied once between the
//! queue's I/O buffer and a per-tag buffer the volume gets by value.
//!
//! An agent restart is a stall: devices are created with
//! `UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE`, so when the agent
//! dies the kernel quiesces the device and keeps its requests; a restarted
//! agent ([`BlockDriver::reattach`]) runs `START_USER_RECOVERY`, serves the
//! same device id again and ends with `END_USER_RECOVERY`; the requests the
//! old agent held are re-issued. The device carries a tag of the volume in
//! `ublksrv_flags` (set at `ADD_DEV`, immutable), checked before recovery so
//! a foreign device is never taken over. A planned hand-over can
//! [`UblkDriver::quiesce`] the device first (`UBLK_F_QUIESCE`, Linux 6.15+).
//!
//! Not runnable on machines without `ublk_drv`; see e2e/ for the kind
//! steps that run it.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::{BufDesc, UblkError, UblkFlags, sys};
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;
use tracing::{debug, info, warn};
use volmig_api::io::VolumeIo;
use volmig_api::io::threads::{self, Slots};

use super::{
    Attached, BlockContext, BlockDriver, BlockError, BlockErrorKind, BlockKind, DeviceRecord,
};

/// The name libublk gives the target (its json export).
const TARGET_NAME: &str = "volmig";
/// Bridge threads per driver (one per queue of every device).
const MAX_BRIDGE_THREADS: usize = 256;
/// How long a queue waits for requests before it lets its buffers' pages go.
const IDLE_SECS: u64 = 20;

/// How devices are set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UblkParams {
    /// Hardware queues (each a thread and a bridge thread in the agent).
    pub nr_queues: u16,
    /// Requests in flight per queue.
    pub queue_depth: u16,
    /// Largest request in bytes (a multiple of the page size).
    pub max_io_bytes: u32,
    /// log2 of the logical block size: 9 (512) or 12 (4096).
    pub logical_block_shift: u8,
}

impl Default for UblkParams {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        UblkParams {
            nr_queues: u16::try_from(cpus.clamp(1, 4)).unwrap_or(1),
            queue_depth: 128,
            max_io_bytes: 1 << 20,
            logical_block_shift: 9,
        }
    }
}

impl UblkParams {
    /// What is wrong with these parameters, if anything.
    pub fn validate(&self) -> Result<(), String> {
        if self.nr_queues == 0 || u32::from(self.nr_queues) > sys::UBLK_MAX_NR_QUEUES {
            return Err(format!(
                "nr_queues must be 1..={}, not {}",
                sys::UBLK_MAX_NR_QUEUES,
                self.nr_queues
            ));
        }
        if self.queue_depth == 0 || u32::from(self.queue_depth) > sys::UBLK_MAX_QUEUE_DEPTH {
            return Err(format!(
                "queue depth must be 1..={}, not {}",
                sys::UBLK_MAX_QUEUE_DEPTH,
                self.queue_depth
            ));
        }
        if self.max_io_bytes < 4096
            || self.max_io_bytes > (32 << 20)
            || !self.max_io_bytes.is_multiple_of(4096)
        {
            return Err(format!(
                "max I/O size must be a multiple of 4096 in 4 KiB..=32 MiB, not {}",
                self.max_io_bytes
            ));
        }
        if self.logical_block_shift != 9 && self.logical_block_shift != 12 {
            return Err(format!(
                "logical block shift must be 9 or 12, not {}",
                self.logical_block_shift
            ));
        }
        Ok(())
    }
}

/// What a ublk [`DeviceRecord`] holds in `detail`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UblkDetail {
    pub dev_id: u32,
    /// The volume's tag in the device's `ublksrv_flags`.
    pub tag: u64,
    pub nr_queues: u16,
    pub queue_depth: u16,
    pub max_io_bytes: u32,
    pub logical_block_shift: u8,
}

/// The tag of a new device of `volume` (FNV-1a of the name, mixed with a
/// nonce so a re-created volume of the same name gets another; never 0,
/// which is what devices of other servers usually carry).
pub fn volume_tag(volume: &str, nonce: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in volume.as_bytes().iter().chain(nonce.to_le_bytes().iter()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h.max(1)
}

fn nonce() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 32)
}

/// The control flags of a new device given the driver's features
/// (`None`: a kernel too old to tell, before 6.5): user recovery with
/// re-issue always, quiesce where the driver has it.
pub fn ctrl_flags(features: Option<u64>) -> Result<u64, String> {
    let recovery = u64::from(sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE);
    match features {
        None => Ok(recovery),
        Some(f) if f & recovery != recovery => Err(format!(
            "the ublk driver has no user recovery with re-issue (features {f:#x})"
        )),
        Some(f) => Ok(recovery | (f & u64::from(sys::UBLK_F_QUIESCE))),
    }
}

/// The device's block-layer parameters: volatile cache (flush and FUA
/// reach the volume), discard and write zeroes, requests up to
/// `max_io_bytes`.
pub fn device_params(size: u64, max_io_bytes: u32, logical_block_shift: u8) -> sys::ublk_params {
    sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
        basic: sys::ublk_param_basic {
            attrs: sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
            logical_bs_shift: logical_block_shift,
            physical_bs_shift: 12,
            io_opt_shift: 12,
            io_min_shift: logical_block_shift,
            max_sectors: max_io_bytes >> 9,
            dev_sectors: size >> 9,
            ..Default::default()
        },
        discard: sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: 1 << logical_block_shift,
            max_discard_sectors: u32::MAX >> 9,
            max_write_zeroes_sectors: u32::MAX >> 9,
            max_discard_segments: 1,
            reserved0: 0,
        },
        ..Default::default()
    }
}

/// One request from the kernel, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Read {
        offset: u64,
        len: usize,
    },
    Write {
        offset: u64,
        len: usize,
        fua: bool,
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        may_trim: bool,
    },
    /// An operation volmig does not serve (zones, write same): EOPNOTSUPP.
    Unsupported(u32),
}

/// Decodes an I/O descriptor (`op_flags`, start sector, sector count).
pub fn decode(op_flags: u32, start_sector: u64, nr_sectors: u32) -> Request {
    let offset = start_sector << 9;
    let bytes = u64::from(nr_sectors) << 9;
    let fua = op_flags & sys::UBLK_IO_F_FUA != 0;
    match op_flags & 0xff {
        sys::UBLK_IO_OP_READ => Request::Read {
            offset,
            len: bytes as usize,
        },
        sys::UBLK_IO_OP_WRITE => Request::Write {
            offset,
            len: bytes as usize,
            fua,
        },
        sys::UBLK_IO_OP_FLUSH => Request::Flush,
        sys::UBLK_IO_OP_DISCARD => Request::Discard { offset, len: bytes },
        sys::UBLK_IO_OP_WRITE_ZEROES => Request::WriteZeroes {
            offset,
            len: bytes,
            may_trim: op_flags & sys::UBLK_IO_F_NOUNMAP == 0,
        },
        op => Request::Unsupported(op),
    }
}

/// The negative errno a failed request completes with.
fn errno_of(e: &io::Error) -> i32 {
    -e.raw_os_error().filter(|n| *n > 0).unwrap_or(libc::EIO)
}

/// Runs one request against the volume. `buf` holds a write's data and
/// receives a read's; it comes back for reuse. The result is what the
/// request completes with: the bytes transferred, 0, or a negative errno.
pub async fn execute<V: VolumeIo>(io: &V, req: Request, buf: Vec<u8>) -> (i32, Vec<u8>) {
    let size = io.size();
    let in_range = |offset: u64, len: u64| offset.checked_add(len).is_some_and(|e| e <= size);
    let done = |len: usize| i32::try_from(len).unwrap_or(i32::MAX);
    match req {
        Request::Read { offset, len } | Request::Write { offset, len, .. }
            if !in_range(offset, len as u64) || buf.len() != len =>
        {
            (-libc::EINVAL, buf)
        }
        Request::Read { offset, len } => match io.read(offset, buf).await {
            Ok(b) => (done(len), b),
            Err(e) => (errno_of(&e), Vec::new()),
        },
        Request::Write { offset, len, fua } => match io.write(offset, buf, fua).await {
            Ok(b) => (done(len), b),
            Err(e) => (errno_of(&e), Vec::new()),
        },
        Request::Flush => (io.flush().await.map_or_else(|e| errno_of(&e), |()| 0), buf),
        Request::Discard { offset, len } | Request::WriteZeroes { offset, len, .. }
            if !in_range(offset, len) =>
        {
            (-libc::EINVAL, buf)
        }
        Request::Discard { offset, len } => (
            io.trim(offset, len)
                .await
                .map_or_else(|e| errno_of(&e), |()| 0),
            buf,
        ),
        Request::WriteZeroes {
            offset,
            len,
            may_trim,
        } => (
            io.write_zeroes(offset, len, may_trim)
                .await
                .map_or_else(|e| errno_of(&e), |()| 0),
            buf,
        ),
        Request::Unsupported(_) => (-libc::EOPNOTSUPP, buf),
    }
}

/// A libublk error as an I/O error (its errno where it has one).
pub fn io_error(e: UblkError) -> io::Error {
    match e {
        UblkError::OtherError(n) | UblkError::UringIOError(n) if n < 0 => {
            io::Error::from_raw_os_error(-n)
        }
        UblkError::IOError(e) => e,
        UblkError::QueueIsDown => io::Error::from_raw_os_error(libc::ENODEV),
        UblkError::InvalidVal => io::Error::from_raw_os_error(libc::EINVAL),
        other => io::Error::other(other.to_string()),
    }
}

/// What the kernel says about a device (`GET_DEV_INFO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevInfo {
    pub state: u16,
    pub flags: u64,
    pub ublksrv_flags: u64,
    pub nr_hw_queues: u16,
    pub queue_depth: u16,
}

impl From<sys::ublksrv_ctrl_dev_info> for DevInfo {
    fn from(i: sys::ublksrv_ctrl_dev_info) -> Self {
        DevInfo {
            state: i.state,
            flags: i.flags,
            ublksrv_flags: i.ublksrv_flags,
            nr_hw_queues: i.nr_hw_queues,
            queue_depth: i.queue_depth,
        }
    }
}

/// What a reattach does with a recorded device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryPlan {
    /// START_USER_RECOVERY, serve, END_USER_RECOVERY.
    Recover,
    /// Leave it alone.
    Refuse(BlockErrorKind, String),
}

/// The recovery decision: only a device that carries the record's tag, was
/// made recoverable and is still started is recovered. A LIVE one is
/// recovered too: the kernel quiesces it as soon as it notices its old
/// server is gone (START_USER_RECOVERY waits for that).
pub fn plan_recovery(detail: &UblkDetail, info: Option<DevInfo>) -> RecoveryPlan {
    let dev = format!("/dev/ublkb{}", detail.dev_id);
    let Some(info) = info else {
        return RecoveryPlan::Refuse(BlockErrorKind::Gone, format!("{dev} does not exist"));
    };
    if info.ublksrv_flags != detail.tag {
        return RecoveryPlan::Refuse(
            BlockErrorKind::Foreign,
            format!(
                "{dev} carries tag {:#x}, not {:#x}",
                info.ublksrv_flags, detail.tag
            ),
        );
    }
    if info.flags & u64::from(sys::UBLK_F_USER_RECOVERY) == 0 {
        return RecoveryPlan::Refuse(
            BlockErrorKind::Unsupported,
            format!("{dev} was made without user recovery"),
        );
    }
    match u32::from(info.state) {
        sys::UBLK_S_DEV_DEAD => {
            RecoveryPlan::Refuse(BlockErrorKind::Gone, format!("{dev} was stopped"))
        }
        sys::UBLK_S_DEV_LIVE | sys::UBLK_S_DEV_QUIESCED | sys::UBLK_S_DEV_FAIL_IO => {
            RecoveryPlan::Recover
        }
        s => RecoveryPlan::Refuse(BlockErrorKind::Io, format!("{dev} is in unknown state {s}")),
    }
}

/// The block device node of `dev_id`.
pub fn device_path(dev_id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkb{dev_id}"))
}

/// One request handed from a queue to its bridge thread.
struct Job {
    req: Request,
    buf: Vec<u8>,
    done: futures::channel::oneshot::Sender<(i32, Vec<u8>)>,
}

/// Where a queue's requests run.
#[derive(Clone)]
enum Bridge {
    /// The queue's own bridge thread.
    Thread(tokio::sync::mpsc::UnboundedSender<Job>),
    /// The shared runtime (no bridge thread could be had).
    Shared(Handle),
}

/// Wakes a queue thread blocked in its ring: a read of this eventfd is
/// always pending there.
struct Waker(OwnedFd);

impl Waker {
    fn new() -> io::Result<Self> {
        // SAFETY: eventfd(2) with constant flags; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        Ok(Waker(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64; an eventfd at its
        // maximum count (never reached: the queue reads it) fails harmlessly.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

async fn run_job<V: VolumeIo>(io: Arc<V>, job: Job, waker: Arc<Waker>) {
    let r = execute(&*io, job.req, job.buf).await;
    // The queue may be gone (device stopped): nobody to tell.
    let _ = job.done.send(r);
    waker.wake();
}

impl Bridge {
    fn start<V: VolumeIo>(
        slots: &Arc<Slots>,
        shared: Handle,
        io: Arc<V>,
        waker: Arc<Waker>,
        name: String,
    ) -> Bridge {
        let Some(slot) = slots.take() else {
            return Bridge::Shared(shared);
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
        let spawned =
            threads::spawn_dedicated(name, slot, shared.clone(), (), move |()| async move {
                super::mark_io_flusher();
                // Ends when the queue drops its sender.
                while let Some(job) = rx.recv().await {
                    tokio::spawn(run_job(io.clone(), job, waker.clone()));
                }
            });
        match spawned {
            Ok(_) => Bridge::Thread(tx),
            Err(_) => Bridge::Shared(shared),
        }
    }

    fn submit<V: VolumeIo>(&self, io: &Arc<V>, waker: &Arc<Waker>, job: Job) {
        match self {
            Bridge::Thread(tx) => {
                if let Err(e) = tx.send(job) {
                    // The bridge thread is gone: its runtime ended. Fail
                    // the request rather than hang it.
                    let job = e.0;
                    let _ = job.done.send((-libc::EIO, job.buf));
                    waker.wake();
                }
            }
            Bridge::Shared(h) => {
                h.spawn(run_job(io.clone(), job, waker.clone()));
            }
        }
    }
}

/// Serves one tag of a queue until the queue goes down.
async fn serve_tag<V: VolumeIo>(
    q: &UblkQueue<'_>,
    tag: u16,
    io: Arc<V>,
    bridge: Bridge,
    waker: Arc<Waker>,
) -> Result<(), UblkError> {
    let max = q.dev.dev_info.max_io_buf_bytes as usize;
    let mut iobuf = IoBuf::<u8>::new(max);
    let mut spare: Vec<u8> = Vec::with_capacity(max);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(iobuf.as_slice()), 0, Some(&iobuf))
        .await?;
    loop {
        let iod = *q.get_iod(tag);
        let req = decode(iod.op_flags, iod.start_sector, iod.nr_sectors);
        let mut buf = std::mem::take(&mut spare);
        buf.clear();
        match req {
            Request::Read { len, .. } if len <= max => buf.resize(len, 0),
            Request::Write { len, .. } if len <= max => {
                buf.extend_from_slice(&iobuf.as_slice()[..len]);
            }
            _ => {}
        }
        let res = match req {
            // Larger than the buffer the kernel was told about: a kernel bug.
            Request::Read { len, .. } | Request::Write { len, .. } if len > max => -libc::EINVAL,
            Request::Unsupported(op) => {
                debug!(op, "unsupported ublk operation");
                -libc::EOPNOTSUPP
            }
            _ => {
                let (tx, rx) = futures::channel::oneshot::channel();
                bridge.submit(&io, &waker, Job { req, buf, done: tx });
                match rx.await {
                    Ok((res, back)) => {
                        if let Request::Read { len, .. } = req
                            && res >= 0
                        {
                            iobuf.as_mut_slice()[..len].copy_from_slice(&back[..len]);
                        }
                        spare = back;
                        res
                    }
                    Err(_) => -libc::EIO,
                }
            }
        };
        q.submit_io_commit_cmd(tag, BufDesc::Slice(iobuf.as_slice()), res)
            .await?;
    }
}

/// Keeps a read of the waker's eventfd pending on the queue's ring, so a
/// completed request wakes the queue thread out of its wait.
async fn pump(q: &UblkQueue<'_>, fd: RawFd, buf: *mut u8) {
    loop {
        let sqe = io_uring::opcode::Read::new(io_uring::types::Fd(fd), buf, 8).build();
        let r = q.ublk_submit_sqe(sqe).await;
        if r < 0 && r != -libc::EINTR && r != -libc::EAGAIN {
            warn!(error = r, "ublk queue waker read failed");
            return;
        }
    }
}

/// The body of one queue thread: until the queue goes down (device
/// stopped, quiesced, or deleted).
fn run_queue<V: VolumeIo>(qid: u16, dev: &UblkDev, io: Arc<V>, slots: Arc<Slots>, shared: Handle) {
    let waker = match Waker::new() {
        Ok(w) => Arc::new(w),
        Err(e) => {
            warn!(qid, error = %e, "no eventfd for a ublk queue");
            return;
        }
    };
    // Declared before the queue so it is dropped after the queue's ring,
    // which may still hold the pending read into it.
    let mut wake_buf = Box::new([0u8; 8]);
    let wake_ptr = wake_buf.as_mut_ptr();
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            warn!(qid, error = %e, "cannot set up a ublk queue");
            return;
        }
    };
    let bridge = Bridge::start(
        &slots,
        shared,
        io.clone(),
        waker.clone(),
        format!("ublk-bridge-{}-{qid}", dev.dev_info.dev_id),
    );
    let exe = Rc::new(smol::LocalExecutor::new());
    let mut tasks = Vec::new();
    for tag in q.tags() {
        let q = q.clone();
        let io = io.clone();
        let bridge = bridge.clone();
        let waker = waker.clone();
        tasks.push(exe.spawn(async move {
            match serve_tag(&q, tag, io, bridge, waker).await {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(e) => warn!(tag, error = %e, "ublk tag stopped"),
            }
        }));
    }
    let pq = q.clone();
    let wake_fd = waker.fd();
    let pump_task = exe.spawn(async move { pump(&pq, wake_fd, wake_ptr).await });
    let exe2 = exe.clone();
    smol::block_on(exe.run(async {
        let run_ops = || while exe2.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&q, Some(IDLE_SECS), run_ops, done).await
        {
            warn!(qid, error = %e, "ublk queue failed");
        }
    }));
    drop(pump_task);
    drop(bridge);
    drop(exe);
    drop(q);
    // The ring is gone: nothing can write into the buffer any more.
    drop(wake_buf);
}

/// How a device thread starts.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Add { tag: u64 },
    Recover { dev_id: u32 },
}

type Ready = Arc<Mutex<Option<tokio::sync::oneshot::Sender<Result<u32, io::Error>>>>>;

fn tell(ready: &Ready, r: Result<u32, io::Error>) {
    if let Some(tx) = ready.lock().unwrap_or_else(PoisonError::into_inner).take() {
        let _ = tx.send(r);
    }
}

/// The body of a device thread: makes (or recovers) the device, runs its
/// queue threads until they end. It never stops or deletes the device:
/// [`UblkDriver::detach`] does that; a device left behind by a dying agent
/// waits, quiesced, for the next one.
fn run_device<V: VolumeIo>(
    mode: Mode,
    params: UblkParams,
    io: Arc<V>,
    slots: Arc<Slots>,
    shared: Handle,
    ready: Ready,
) {
    let made = (|| -> Result<Arc<UblkCtrl>, UblkError> {
        let builder = UblkCtrlBuilder::default()
            .name(TARGET_NAME)
            .nr_queues(params.nr_queues)
            .depth(params.queue_depth)
            .io_buf_bytes(params.max_io_bytes);
        let ctrl = match mode {
            Mode::Add { tag } => {
                let flags = ctrl_flags(UblkCtrl::get_features()).map_err(|e| {
                    warn!(error = %e, "cannot make a ublk device");
                    UblkError::OtherError(-libc::EOPNOTSUPP)
                })?;
                builder
                    .id(-1)
                    .ctrl_flags(flags)
                    .ctrl_target_flags(tag)
                    .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
                    .build()?
            }
            Mode::Recover { dev_id } => {
                let id = i32::try_from(dev_id).map_err(|_| UblkError::InvalidVal)?;
                UblkCtrl::new_simple(id)?.start_user_recover()?;
                builder
                    .id(id)
                    .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
                    .build()?
            }
        };
        // The device outlives this control: only detach deletes it.
        ctrl.disown();
        let id = ctrl.dev_info().dev_id;
        super::ensure_device_node(
            &PathBuf::from(format!("/dev/ublkc{id}")),
            &PathBuf::from(format!("/sys/class/ublk-char/ublkc{id}/dev")),
            false,
        )?;
        Ok(Arc::new(ctrl))
    })();
    let ctrl = match made {
        Ok(c) => c,
        Err(e) => return tell(&ready, Err(io_error(e))),
    };
    let size = io.size();
    let dev = match UblkDev::new(
        TARGET_NAME.to_string(),
        |dev: &mut UblkDev| {
            let depth = dev.dev_info.queue_depth.saturating_add(8);
            dev.tgt.dev_size = size;
            dev.tgt.sq_depth = depth;
            dev.tgt.cq_depth = depth;
            dev.tgt.params = device_params(
                size,
                dev.dev_info.max_io_buf_bytes,
                params.logical_block_shift,
            );
            Ok(())
        },
        &ctrl,
    ) {
        Ok(d) => Arc::new(d),
        Err(e) => return tell(&ready, Err(io_error(e))),
    };
    let dev_id = dev.dev_info.dev_id;
    let nr_queues = dev.dev_info.nr_hw_queues;
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let mut queues = Vec::new();
    for qid in 0..nr_queues {
        let dev = dev.clone();
        let io = io.clone();
        let slots = slots.clone();
        let shared = shared.clone();
        let tid_tx = tid_tx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("ublk-q-{dev_id}-{qid}"))
            .spawn(move || {
                // Also marks the thread PR_SET_IO_FLUSHER (best effort).
                let tid = UblkCtrl::init_queue_thread();
                if tid_tx.send((qid, tid)).is_ok() {
                    run_queue(qid, &dev, io, slots, shared);
                }
            });
        match spawned {
            Ok(h) => queues.push(h),
            Err(e) => return tell(&ready, Err(e)),
        }
    }
    drop(tid_tx);
    for _ in 0..nr_queues {
        let Ok((qid, tid)) = tid_rx.recv() else {
            return tell(&ready, Err(io::Error::other("a ublk queue thread died")));
        };
        ctrl.set_thread_affinity(qid, tid);
        if let Err(e) = ctrl.configure_queue(&dev, qid, tid) {
            warn!(dev_id, qid, error = %e, "cannot configure a ublk queue");
        }
    }
    // START_DEV, or END_USER_RECOVERY for a recovered device.
    if let Err(e) = ctrl.start_dev(&dev) {
        tell(&ready, Err(io_error(e)));
        // The queues wait for requests that will never come: stop them.
        let _ = ctrl.kill_dev();
    } else {
        let node = super::ensure_device_node(
            &device_path(dev_id),
            &PathBuf::from(format!("/sys/class/block/ublkb{dev_id}/dev")),
            true,
        );
        if let Err(e) = node {
            warn!(dev_id, error = %e, "no device node for the ublk device");
        }
        tell(&ready, Ok(dev_id));
    }
    for h in queues {
        let _ = h.join();
    }
    info!(dev_id, "ublk device no longer served");
}

struct Device {
    dev_id: u32,
    logical_block_shift: u8,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The ublk block driver.
pub struct UblkDriver {
    params: UblkParams,
    slots: Arc<Slots>,
    devices: Mutex<HashMap<String, Device>>,
}

impl UblkDriver {
    pub fn new(params: UblkParams) -> Result<Self, String> {
        params.validate()?;
        Ok(UblkDriver {
            params,
            slots: Arc::new(Slots::new(MAX_BRIDGE_THREADS)),
            devices: Mutex::new(HashMap::new()),
        })
    }

    pub fn params(&self) -> &UblkParams {
        &self.params
    }

    fn ctx(op: &'static str, volume: &str, dev_id: Option<u32>) -> BlockContext {
        BlockContext {
            kind: BlockKind::Ublk,
            op,
            volume: volume.to_string(),
            device: dev_id.map(device_path),
        }
    }

    fn devices(&self) -> std::sync::MutexGuard<'_, HashMap<String, Device>> {
        self.devices.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn dev_id(&self, op: &'static str, volume: &str) -> Result<u32, BlockError> {
        self.devices().get(volume).map(|d| d.dev_id).ok_or_else(|| {
            BlockError::new(
                BlockErrorKind::NotAttached,
                Self::ctx(op, volume, None),
                "no ublk device",
            )
        })
    }

    /// Starts a device thread and waits until the device is served.
    async fn start<V: VolumeIo>(
        &self,
        op: &'static str,
        volume: &str,
        mode: Mode,
        params: UblkParams,
        io: Arc<V>,
    ) -> Result<(u32, std::thread::JoinHandle<()>), BlockError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let ready: Ready = Arc::new(Mutex::new(Some(tx)));
        let slots = self.slots.clone();
        let shared = Handle::current();
        let thread = std::thread::Builder::new()
            .name(format!("ublk-dev-{volume}"))
            .spawn(move || run_device(mode, params, io, slots, shared, ready))
            .map_err(|e| BlockError::io(Self::ctx(op, volume, None), "device thread", e))?;
        match rx.await {
            Ok(Ok(dev_id)) => Ok((dev_id, thread)),
            Ok(Err(e)) => Err(BlockError::io(
                Self::ctx(op, volume, None),
                "making the ublk device",
                e,
            )),
            Err(_) => Err(BlockError::new(
                BlockErrorKind::Io,
                Self::ctx(op, volume, None),
                "the device thread ended without a word",
            )),
        }
    }

    /// Runs a control command on the blocking pool.
    async fn control<T: Send + 'static>(
        ctx: BlockContext,
        what: &'static str,
        f: impl FnOnce() -> Result<T, UblkError> + Send + 'static,
    ) -> Result<T, BlockError> {
        match tokio::task::spawn_blocking(f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(BlockError::io(ctx, what, io_error(e))),
            Err(e) => Err(BlockError::io(ctx, what, io::Error::other(e.to_string()))),
        }
    }

    /// For a planned hand-over: stops the device's queues without failing
    /// I/O; the device waits, quiesced, for the next agent's
    /// [`BlockDriver::reattach`]. Needs `UBLK_F_QUIESCE` (Linux 6.15+:
    /// Unsupported otherwise; a SIGKILLed agent's device is quiesced by the
    /// kernel anyway).
    pub async fn quiesce(&self, volume: &str, timeout: Duration) -> Result<(), BlockError> {
        let dev_id = self.dev_id("quiesce", volume)?;
        let ctx = Self::ctx("quiesce", volume, Some(dev_id));
        let ms = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        Self::control(ctx, "UBLK_CMD_QUIESCE_DEV", move || {
            UblkCtrl::new_simple(dev_id as i32)?.quiesce_dev(ms)
        })
        .await?;
        let thread = self.devices().remove(volume).and_then(|d| d.thread);
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        info!(volume = %volume, dev_id, "ublk device quiesced for a hand-over");
        Ok(())
    }
}

fn attached(volume: &str, detail: &UblkDetail) -> Attached {
    let path = device_path(detail.dev_id);
    Attached {
        path: path.clone(),
        record: DeviceRecord {
            kind: BlockKind::Ublk,
            volume: volume.to_string(),
            path,
            // A plain struct of integers always serializes.
            detail: serde_json::to_value(detail).unwrap_or(serde_json::Value::Null),
        },
    }
}

impl<V: VolumeIo> BlockDriver<V> for UblkDriver {
    fn kind(&self) -> BlockKind {
        BlockKind::Ublk
    }

    async fn attach(&self, volume: &str, io: Arc<V>) -> Result<Attached, BlockError> {
        if self.devices().contains_key(volume) {
            return Err(BlockError::new(
                BlockErrorKind::AlreadyAttached,
                Self::ctx("attach", volume, None),
                "the volume already has a ublk device",
            ));
        }
        let size = io.size();
        let block = 1u64 << self.params.logical_block_shift;
        if size == 0 || !size.is_multiple_of(block) {
            return Err(BlockError::new(
                BlockErrorKind::InvalidArgument,
                Self::ctx("attach", volume, None),
                format!("a volume of {size} bytes is not a whole number of {block}-byte blocks"),
            ));
        }
        if !std::path::Path::new(super::ublk_paths::CONTROL).exists() {
            return Err(BlockError::new(
                BlockErrorKind::Unsupported,
                Self::ctx("attach", volume, None),
                format!("no {} (modprobe ublk_drv)", super::ublk_paths::CONTROL),
            ));
        }
        let tag = volume_tag(volume, nonce());
        let (dev_id, thread) = self
            .start("attach", volume, Mode::Add { tag }, self.params.clone(), io)
            .await?;
        let detail = UblkDetail {
            dev_id,
            tag,
            nr_queues: self.params.nr_queues,
            queue_depth: self.params.queue_depth,
            max_io_bytes: self.params.max_io_bytes,
            logical_block_shift: self.params.logical_block_shift,
        };
        self.devices().insert(
            volume.to_string(),
            Device {
                dev_id,
                logical_block_shift: detail.logical_block_shift,
                thread: Some(thread),
            },
        );
        info!(volume = %volume, device = %device_path(dev_id).display(), size, "ublk device attached");
        Ok(attached(volume, &detail))
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
        if record.kind != BlockKind::Ublk {
            return Err(bad(format!("a {} record", record.kind)));
        }
        let detail: UblkDetail = serde_json::from_value(record.detail.clone())
            .map_err(|e| bad(format!("detail: {e}")))?;
        if self.devices().contains_key(volume) {
            return Err(BlockError::new(
                BlockErrorKind::AlreadyAttached,
                Self::ctx("reattach", volume, None),
                "the volume already has a ublk device",
            ));
        }
        let dev_id = detail.dev_id;
        let ctx = || Self::ctx("reattach", volume, Some(dev_id));
        let info = Self::control(ctx(), "UBLK_CMD_GET_DEV_INFO", move || {
            let id = i32::try_from(dev_id).map_err(|_| UblkError::InvalidVal)?;
            match UblkCtrl::new_simple(id) {
                Ok(c) => Ok(Some(DevInfo::from(c.dev_info()))),
                Err(UblkError::OtherError(e)) if e == -libc::ENODEV || e == -libc::ENOENT => {
                    Ok(None)
                }
                Err(e) => Err(e),
            }
        })
        .await?;
        if let RecoveryPlan::Refuse(kind, why) = plan_recovery(&detail, info) {
            return Err(BlockError::new(kind, ctx(), why));
        }
        let params = UblkParams {
            nr_queues: detail.nr_queues,
            queue_depth: detail.queue_depth,
            max_io_bytes: detail.max_io_bytes,
            logical_block_shift: detail.logical_block_shift,
        };
        let (got, thread) = self
            .start("reattach", volume, Mode::Recover { dev_id }, params, io)
            .await?;
        if got != dev_id {
            warn!(volume = %volume, expected = dev_id, got, "ublk recovery served another id");
        }
        self.devices().insert(
            volume.to_string(),
            Device {
                dev_id,
                logical_block_shift: detail.logical_block_shift,
                thread: Some(thread),
            },
        );
        info!(volume = %volume, device = %device_path(dev_id).display(), "ublk device recovered");
        Ok(attached(volume, &detail))
    }

    async fn detach(&self, volume: &str) -> Result<(), BlockError> {
        let dev_id = self.dev_id("detach", volume)?;
        let ctx = Self::ctx("detach", volume, Some(dev_id));
        Self::control(ctx, "UBLK_CMD_STOP_DEV", move || {
            use std::os::unix::fs::OpenOptionsExt;
            // Exclusive: EBUSY while mounted or held; kept across the stop
            // so nobody mounts it meanwhile.
            let claim = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
                .open(device_path(dev_id));
            let claim = match claim {
                Ok(f) => Some(f),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
                Err(e) => return Err(UblkError::IOError(e)),
            };
            let ctrl = UblkCtrl::new_simple(dev_id as i32)?;
            ctrl.kill_dev()?;
            drop(claim);
            Ok(())
        })
        .await?;
        let thread = self.devices().remove(volume).and_then(|d| d.thread);
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        let ctx = Self::ctx("detach", volume, Some(dev_id));
        Self::control(ctx, "UBLK_CMD_DEL_DEV", move || {
            UblkCtrl::new_simple(dev_id as i32)?.del_dev().map(drop)
        })
        .await?;
        info!(volume = %volume, device = %device_path(dev_id).display(), "ublk device detached");
        Ok(())
    }

    async fn resize(&self, volume: &str, size: u64) -> Result<(), BlockError> {
        let (dev_id, shift) = self
            .devices()
            .get(volume)
            .map(|d| (d.dev_id, d.logical_block_shift))
            .ok_or_else(|| {
                BlockError::new(
                    BlockErrorKind::NotAttached,
                    Self::ctx("resize", volume, None),
                    "no ublk device",
                )
            })?;
        let block = 1u64 << shift;
        if size == 0 || !size.is_multiple_of(block) {
            return Err(BlockError::new(
                BlockErrorKind::InvalidArgument,
                Self::ctx("resize", volume, Some(dev_id)),
                format!("{size} bytes is not a whole number of {block}-byte blocks"),
            ));
        }
        let ctx = Self::ctx("resize", volume, Some(dev_id));
        Self::control(ctx, "UBLK_CMD_UPDATE_SIZE", move || {
            UblkCtrl::new_simple(dev_id as i32)?
                .update_size(size)
                .map(drop)
        })
        .await?;
        info!(volume = %volume, device = %device_path(dev_id).display(), size, "ublk device resized");
        Ok(())
    }
}

#[cfg(test)]
mod tests;
