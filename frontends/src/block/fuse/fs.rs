//! The file system the agent serves over FUSE: a root directory with one
//! regular file per volume (named like the volume), whose reads and writes
//! are the volume's [`VolumeIo`]. Transport-neutral: [`Fs::dispatch`]
//! answers one request; `dev.rs` reads requests from `/dev/fuse` and
//! writes the answers.
//!
//! A volume's file keeps its inode number across agent restarts (it is in
//! the volume's device record): the loop device holds the file open, and
//! the kernel addresses its requests by that number. While a restarted
//! agent serves its volumes again, a request for a number nobody has
//! claimed yet waits (see [`Fs::restoring`]) instead of failing.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use serde::{Deserialize, Serialize};
use volmig_api::io::VolumeIo;

use super::dev::{Answer, DevFd};
use super::pool::{Buffers, Slot};
use super::proto::{self, *};
use super::splice::{self, ReplyPipe};

/// How long the kernel may cache names and attributes (they change only
/// through the agent, which tells the kernel).
const TTL: u64 = 3600;
/// The block size files and the file system report.
const BLOCK: u32 = 4096;

/// What INIT negotiated. The kernel sends INIT once per connection, so a
/// restarted agent cannot negotiate again: these travel to the keeper with
/// the descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Params {
    pub minor: u32,
    /// Negotiated flags (`flags | flags2 << 32`).
    pub flags: u64,
    /// What the kernel offered.
    pub kernel_flags: u64,
    pub max_write: u32,
    pub max_pages: u16,
    pub max_background: u16,
}

impl Params {
    /// The kernel can re-send requests in flight (FUSE_NOTIFY_RESEND).
    pub fn kernel_resends(&self) -> bool {
        self.kernel_flags & HAS_RESEND != 0
    }
}

/// Settings of the file system.
#[derive(Debug, Clone)]
pub struct FsOptions {
    /// Largest request data (READ and WRITE), a multiple of 4 KiB up to
    /// 1 MiB. 512 KiB by default: a spliced READ answer must fit a pipe
    /// whole, header included, and an unprivileged pipe holds 1 MiB at
    /// most (`splice`); loop's 1 MiB requests become two, served at once.
    pub max_write: u32,
    /// Most asynchronous requests the kernel keeps in flight (loop's
    /// direct I/O is asynchronous).
    pub max_background: u16,
    /// FOPEN_DIRECT_IO on open: no FUSE page cache at all for volume
    /// files (loop's own direct I/O bypasses it either way).
    pub direct_io_open: bool,
    /// Request buffers made at start (see `pool`): of 64 KiB, for small
    /// requests, and of `max_write`. Every READ and WRITE in flight holds
    /// one.
    pub small_buffers: usize,
    pub large_buffers: usize,
}

impl Default for FsOptions {
    fn default() -> Self {
        Self {
            max_write: 512 << 10,
            max_background: 256,
            direct_io_open: false,
            small_buffers: 128,
            large_buffers: 24,
        }
    }
}

/// One volume's file.
pub struct Vol<V> {
    pub name: String,
    pub ino: u64,
    size: AtomicU64,
    pub io: Arc<V>,
    created: u64,
}

impl<V> Vol<V> {
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
}

impl<V: VolumeIo> Vol<V> {
    /// Where requests may reach: the smaller of the file's size and the
    /// volume's.
    fn served_size(&self) -> u64 {
        self.size().min(self.io.size())
    }

    /// The bytes of a READ of `size` at `offset` that lie inside (0 at or
    /// past the end).
    fn read_len(&self, offset: u64, size: u32) -> usize {
        self.served_size()
            .saturating_sub(offset)
            .min(u64::from(size)) as usize
    }
}

/// Counters of the file system.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    /// Requests the kernel re-sent (FUSE_NOTIFY_RESEND after a restart).
    pub resent: AtomicU64,
    /// Requests answered with an error.
    pub errors: AtomicU64,
    /// Answers the kernel no longer waited for (see `dev::Answer`).
    pub orphaned: AtomicU64,
    /// READs answered by splicing from the backing file.
    pub spliced: AtomicU64,
}

/// What became of a READ answered by splicing.
#[derive(Debug)]
pub enum Spliced {
    /// Written to the kernel (or failed there).
    Answered(io::Result<Answer>),
    /// The volume's read failed: this is the answer to write.
    Failed(Out),
}

/// The answer to a request.
#[derive(Debug)]
pub enum Out {
    /// No answer (FORGET, INTERRUPT).
    None,
    /// This (positive) errno.
    Err(i32),
    /// Reply arguments (at most 128 bytes).
    Small([u8; 128], usize),
    /// Reply bytes in a buffer of the pool (read data) and its place
    /// there, or (directory entries) a buffer of its own.
    Data(Vec<u8>, Option<Slot>),
}

impl Out {
    fn small<T: Pod>(v: &T) -> Out {
        let b = proto::bytes(v);
        let mut a = [0u8; 128];
        a[..b.len()].copy_from_slice(b);
        Out::Small(a, b.len())
    }

    /// The reply's bytes after the header.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Out::Small(a, n) => &a[..*n],
            Out::Data(v, _) => v,
            Out::None | Out::Err(_) => &[],
        }
    }
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

pub struct Fs<V> {
    vols: RwLock<BTreeMap<u64, Arc<Vol<V>>>>,
    /// Bumped whenever a volume comes or restoring ends.
    changed: tokio::sync::watch::Sender<u64>,
    /// While set: a restarted agent is reattaching its volumes; requests
    /// for volumes nobody has claimed yet wait until then.
    restoring: Mutex<Option<Instant>>,
    params: tokio::sync::watch::Sender<Option<Params>>,
    opts: FsOptions,
    pub pool: Buffers,
    pub stats: Stats,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl<V: VolumeIo> Fs<V> {
    pub fn new(opts: FsOptions) -> Self {
        Self {
            vols: RwLock::new(BTreeMap::new()),
            changed: tokio::sync::watch::Sender::new(0),
            restoring: Mutex::new(None),
            params: tokio::sync::watch::Sender::new(None),
            pool: Buffers::new(
                opts.small_buffers,
                opts.large_buffers,
                opts.max_write as usize,
            ),
            opts,
            stats: Stats::default(),
        }
    }

    /// The connection is initialized already (adopted from the keeper).
    pub fn adopt(&self, p: Params) {
        self.params.send_replace(Some(p));
    }

    pub fn params(&self) -> Option<Params> {
        *self.params.borrow()
    }

    /// Waits until INIT was answered.
    pub async fn initialized(&self) -> Params {
        let mut rx = self.params.subscribe();
        loop {
            if let Some(p) = *rx.borrow_and_update() {
                return p;
            }
            if rx.changed().await.is_err() {
                // The sender lives in self: unreachable while we borrow it.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Requests for unclaimed volumes wait up to `grace` from now.
    pub fn start_restoring(&self, grace: Duration) {
        *self
            .restoring
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + grace);
    }

    /// Restoring is over: requests for unclaimed volumes fail from now on.
    pub fn restored(&self) {
        *self
            .restoring
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        self.changed.send_modify(|g| *g += 1);
    }

    fn restore_deadline(&self) -> Option<Instant> {
        let mut r = self
            .restoring
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if r.is_some_and(|d| Instant::now() >= d) {
            *r = None;
        }
        *r
    }

    /// Adds a volume's file with inode `ino`; false if the number is taken.
    pub fn register(&self, name: &str, ino: u64, size: u64, io: Arc<V>) -> bool {
        {
            let mut vols = self.vols.write().unwrap_or_else(PoisonError::into_inner);
            if ino <= ROOT_ID || vols.contains_key(&ino) {
                return false;
            }
            vols.insert(
                ino,
                Arc::new(Vol {
                    name: name.to_string(),
                    ino,
                    size: AtomicU64::new(size),
                    io,
                    created: now_secs(),
                }),
            );
        }
        self.changed.send_modify(|g| *g += 1);
        true
    }

    pub fn unregister(&self, ino: u64) -> Option<Arc<Vol<V>>> {
        self.vols
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&ino)
    }

    pub fn set_size(&self, ino: u64, size: u64) -> bool {
        match self.get(ino) {
            Some(v) => {
                v.size.store(size, Ordering::Release);
                true
            }
            None => false,
        }
    }

    pub fn get(&self, ino: u64) -> Option<Arc<Vol<V>>> {
        self.vols
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&ino)
            .cloned()
    }

    fn by_name(&self, name: &[u8]) -> Option<Arc<Vol<V>>> {
        self.vols
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .find(|v| v.name.as_bytes() == name)
            .cloned()
    }

    /// Is `ino` free for a new volume?
    pub fn ino_free(&self, ino: u64) -> bool {
        ino > ROOT_ID
            && !self
                .vols
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .contains_key(&ino)
    }

    /// `find`, waiting while restoring for someone to claim it.
    async fn wait_for(&self, find: impl Fn() -> Option<Arc<Vol<V>>>) -> Option<Arc<Vol<V>>> {
        loop {
            let mut rx = self.changed.subscribe();
            if let Some(v) = find() {
                return Some(v);
            }
            let deadline = self.restore_deadline()?;
            let _ = tokio::time::timeout_at(deadline, rx.changed()).await;
        }
    }

    async fn vol(&self, ino: u64) -> Option<Arc<Vol<V>>> {
        self.wait_for(|| self.get(ino)).await
    }

    fn attr(&self, v: &Vol<V>) -> Attr {
        let size = v.size();
        Attr {
            ino: v.ino,
            size,
            blocks: size.div_ceil(512),
            atime: v.created,
            mtime: v.created,
            ctime: v.created,
            mode: libc::S_IFREG | 0o600,
            nlink: 1,
            blksize: BLOCK,
            ..Default::default()
        }
    }

    fn root_attr(&self) -> Attr {
        Attr {
            ino: ROOT_ID,
            mode: libc::S_IFDIR | 0o755,
            nlink: 2,
            blksize: BLOCK,
            ..Default::default()
        }
    }

    /// Answers INIT; the parameters are published (see [`Fs::adopt`]) by
    /// the transport once the answer is written.
    pub fn init(&self, arg: &[u8]) -> (Out, Option<Params>) {
        let Some(i) = proto::read::<InitIn>(arg) else {
            return (Out::Err(libc::EINVAL), None);
        };
        if i.major < KERNEL_VERSION {
            return (Out::Err(libc::EPROTO), None);
        }
        if i.major > KERNEL_VERSION {
            // Our major only: the kernel sends INIT again in our version.
            let o = InitOut {
                major: KERNEL_VERSION,
                minor: KERNEL_MINOR_VERSION,
                ..Default::default()
            };
            return (Out::small(&o), None);
        }
        let mut offered = u64::from(i.flags);
        if offered & INIT_EXT != 0 {
            offered |= u64::from(i.flags2) << 32;
        }
        let want = ASYNC_READ | BIG_WRITES | ASYNC_DIO | PARALLEL_DIROPS | MAX_PAGES | INIT_EXT;
        let flags = want & offered;
        let max_pages = (self.opts.max_write / 4096).clamp(1, 256) as u16;
        let max_write = u32::from(max_pages) * 4096;
        let bg = self.opts.max_background.max(1);
        let o = InitOut {
            major: KERNEL_VERSION,
            minor: i.minor.min(KERNEL_MINOR_VERSION),
            max_readahead: i.max_readahead,
            flags: flags as u32,
            flags2: (flags >> 32) as u32,
            max_background: bg,
            congestion_threshold: (bg / 4 * 3).max(1),
            max_write,
            time_gran: 1,
            max_pages,
            ..Default::default()
        };
        let p = Params {
            minor: o.minor,
            flags,
            kernel_flags: offered,
            max_write,
            max_pages,
            max_background: bg,
        };
        (Out::small(&o), Some(p))
    }

    /// Answers one request. `arg` is what follows the request header (for
    /// WRITE: `fuse_write_in` only), `data` a WRITE's data (a pool buffer).
    pub async fn dispatch(&self, h: &InHeader, arg: &[u8], data: Option<Vec<u8>>) -> Out {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        if h.unique & UNIQUE_RESEND != 0 {
            self.stats.resent.fetch_add(1, Ordering::Relaxed);
        }
        let out = self.answer(h, arg, data).await;
        if matches!(out, Out::Err(_)) {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        out
    }

    /// Answers a large READ by splicing its data from the volume's
    /// backing descriptor onto `dev` (see [`splice`](super::splice)).
    /// `None`: not here (small, no pipe, the volume offers no descriptor,
    /// the volume not served yet): [`dispatch`](Self::dispatch) answers.
    pub async fn read_spliced(&self, h: &InHeader, arg: &[u8], dev: &DevFd) -> Option<Spliced> {
        let r = proto::read::<ReadIn>(arg)?;
        let v = self.get(h.nodeid)?;
        let len = v.read_len(r.offset, r.size);
        if len < splice::MIN_LEN {
            return None;
        }
        if !ReplyPipe::this_thread().is_some_and(|p| p.fits(r.offset, len)) {
            return None;
        }
        let unique = h.unique;
        // The pipe is the thread's that runs the closure (the request's
        // task could in principle have moved since).
        let done =
            v.io.read_by_fd(
                r.offset,
                len as u64,
                |src, off| match ReplyPipe::this_thread() {
                    Some(p) if p.fits(off, len) => p.answer(dev, unique, src, off, len).map(Some),
                    _ => Ok(None),
                },
            )
            .await?;
        let done = match done {
            Ok(None) => return None,
            Ok(Some(a)) => Ok(a),
            Err(e) => Err(e),
        };
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        if h.unique & UNIQUE_RESEND != 0 {
            self.stats.resent.fetch_add(1, Ordering::Relaxed);
        }
        Some(match done {
            Ok(answer) => {
                self.stats.spliced.fetch_add(1, Ordering::Relaxed);
                Spliced::Answered(answer)
            }
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                Spliced::Failed(Out::Err(errno(&e)))
            }
        })
    }

    async fn answer(&self, h: &InHeader, arg: &[u8], data: Option<Vec<u8>>) -> Out {
        match h.opcode {
            READ => self.read(h, arg).await,
            WRITE => self.write(h, arg, data).await,
            FSYNC => match self.vol(h.nodeid).await {
                Some(v) => match v.io.flush().await {
                    Ok(()) => Out::Small([0; 128], 0),
                    Err(e) => Out::Err(errno(&e)),
                },
                None if h.nodeid == ROOT_ID => Out::Small([0; 128], 0),
                None => Out::Err(libc::EIO),
            },
            FALLOCATE => self.fallocate(h, arg).await,
            LSEEK => self.lseek(h, arg).await,
            LOOKUP => self.lookup(h, arg).await,
            GETATTR => {
                let attr = if h.nodeid == ROOT_ID {
                    Some(self.root_attr())
                } else {
                    self.vol(h.nodeid).await.map(|v| self.attr(&v))
                };
                match attr {
                    Some(attr) => Out::small(&AttrOut {
                        attr_valid: TTL,
                        attr,
                        ..Default::default()
                    }),
                    None => Out::Err(libc::ENOENT),
                }
            }
            SETATTR => {
                let Some(s) = proto::read::<SetattrIn>(arg) else {
                    return Out::Err(libc::EINVAL);
                };
                let attr = if h.nodeid == ROOT_ID {
                    self.root_attr()
                } else {
                    match self.vol(h.nodeid).await {
                        Some(v) => self.attr(&v),
                        None => return Out::Err(libc::ENOENT),
                    }
                };
                if s.valid & FATTR_SIZE != 0 && s.size != attr.size {
                    // A volume's size changes through the agent only.
                    return Out::Err(libc::EPERM);
                }
                Out::small(&AttrOut {
                    attr_valid: TTL,
                    attr,
                    ..Default::default()
                })
            }
            OPEN => {
                if h.nodeid == ROOT_ID {
                    return Out::Err(libc::EISDIR);
                }
                if self.vol(h.nodeid).await.is_none() {
                    return Out::Err(libc::ENOENT);
                }
                let mut flags = 0;
                if self.opts.direct_io_open {
                    flags |= FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES;
                }
                Out::small(&OpenOut {
                    fh: h.nodeid,
                    open_flags: flags,
                    backing_id: 0,
                })
            }
            OPENDIR if h.nodeid == ROOT_ID => Out::small(&OpenOut::default()),
            OPENDIR => Out::Err(libc::ENOTDIR),
            READDIR => self.readdir(h, arg),
            STATFS => {
                let total: u64 = self
                    .vols
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .values()
                    .map(|v| v.size())
                    .sum();
                Out::small(&Kstatfs {
                    blocks: total / u64::from(BLOCK),
                    files: self
                        .vols
                        .read()
                        .unwrap_or_else(PoisonError::into_inner)
                        .len() as u64
                        + 1,
                    bsize: BLOCK,
                    frsize: BLOCK,
                    namelen: 255,
                    ..Default::default()
                })
            }
            FLUSH | RELEASE | RELEASEDIR | FSYNCDIR | ACCESS | SYNCFS | DESTROY => {
                Out::Small([0; 128], 0)
            }
            FORGET | BATCH_FORGET | INTERRUPT => Out::None,
            // The names are the agent's: nothing is created, renamed or
            // removed through the mount.
            CREATE | MKNOD | MKDIR | UNLINK | RMDIR | RENAME | RENAME2 | LINK | SYMLINK
            | TMPFILE | SETXATTR | REMOVEXATTR => Out::Err(libc::EPERM),
            READLINK => Out::Err(libc::EINVAL),
            // STATX, xattrs, locks, ioctl, poll, copy_file_range...: the
            // kernel falls back or reports them unsupported.
            _ => Out::Err(libc::ENOSYS),
        }
    }

    async fn lookup(&self, h: &InHeader, arg: &[u8]) -> Out {
        if h.nodeid != ROOT_ID {
            return Out::Err(libc::ENOTDIR);
        }
        let name = arg.split(|&c| c == 0).next().unwrap_or_default();
        match self.wait_for(|| self.by_name(name)).await {
            Some(v) => Out::small(&EntryOut {
                nodeid: v.ino,
                generation: 1,
                entry_valid: TTL,
                attr_valid: TTL,
                attr: self.attr(&v),
                ..Default::default()
            }),
            None => Out::Err(libc::ENOENT),
        }
    }

    async fn read(&self, h: &InHeader, arg: &[u8]) -> Out {
        let Some(r) = proto::read::<ReadIn>(arg) else {
            return Out::Err(libc::EINVAL);
        };
        let Some(v) = self.vol(h.nodeid).await else {
            return Out::Err(libc::EIO);
        };
        let len = v.read_len(r.offset, r.size).min(self.pool.max_len());
        if len == 0 {
            return Out::Small([0; 128], 0);
        }
        let (buf, slot) = self.pool.get(len).await;
        match v.io.read(r.offset, buf).await {
            Ok(buf) => Out::Data(buf, Some(slot)),
            Err(e) => Out::Err(errno(&e)),
        }
    }

    async fn write(&self, h: &InHeader, arg: &[u8], data: Option<Vec<u8>>) -> Out {
        let (Some(w), Some(data)) = (proto::read::<WriteIn>(arg), data) else {
            return Out::Err(libc::EINVAL);
        };
        let Some(v) = self.vol(h.nodeid).await else {
            self.pool.put(data);
            return Out::Err(libc::EIO);
        };
        let len = data.len() as u64;
        let end = w.offset.checked_add(len);
        if end.is_none_or(|e| e > v.served_size()) {
            self.pool.put(data);
            return Out::Err(libc::ENOSPC);
        }
        if len == 0 {
            return Out::small(&WriteOut::default());
        }
        match v.io.write(w.offset, data, false).await {
            Ok(buf) => {
                self.pool.put(buf);
                Out::small(&WriteOut {
                    size: len as u32,
                    padding: 0,
                })
            }
            Err(e) => Out::Err(errno(&e)),
        }
    }

    async fn fallocate(&self, h: &InHeader, arg: &[u8]) -> Out {
        let Some(f) = proto::read::<FallocateIn>(arg) else {
            return Out::Err(libc::EINVAL);
        };
        let Some(v) = self.vol(h.nodeid).await else {
            return Out::Err(libc::EIO);
        };
        let keep = f.mode & libc::FALLOC_FL_KEEP_SIZE as u32 != 0;
        let size = v.served_size();
        let Some(end) = f.offset.checked_add(f.length) else {
            return Out::Err(libc::EINVAL);
        };
        if end > size && !keep {
            // Volumes grow through the agent only.
            return Out::Err(libc::EOPNOTSUPP);
        }
        let (off, len) = (f.offset, end.min(size).saturating_sub(f.offset));
        const PUNCH: u32 = libc::FALLOC_FL_PUNCH_HOLE as u32;
        const ZERO: u32 = libc::FALLOC_FL_ZERO_RANGE as u32;
        const KEEP: u32 = libc::FALLOC_FL_KEEP_SIZE as u32;
        let r = match f.mode & !KEEP {
            _ if len == 0 => Ok(()),
            // Allocation: a volume's bytes are always there.
            0 => Ok(()),
            PUNCH if keep => v.io.trim(off, len).await,
            ZERO => v.io.write_zeroes(off, len, false).await,
            _ => return Out::Err(libc::EOPNOTSUPP),
        };
        match r {
            Ok(()) => Out::Small([0; 128], 0),
            Err(e) => Out::Err(errno(&e)),
        }
    }

    /// SEEK_DATA / SEEK_HOLE from the volume's allocation map (the kernel
    /// answers the other kinds of seek itself).
    async fn lseek(&self, h: &InHeader, arg: &[u8]) -> Out {
        let Some(l) = proto::read::<LseekIn>(arg) else {
            return Out::Err(libc::EINVAL);
        };
        let Some(v) = self.vol(h.nodeid).await else {
            return Out::Err(libc::EIO);
        };
        let want_data = match l.whence as i32 {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return Out::Err(libc::EINVAL),
        };
        let size = v.served_size();
        if l.offset >= size {
            return Out::Err(libc::ENXIO);
        }
        let mut pos = l.offset;
        while pos < size {
            let exts = match v.io.block_status(pos, size - pos).await {
                Ok(e) => e,
                Err(e) => return Out::Err(errno(&e)),
            };
            if exts.is_empty() {
                break;
            }
            for e in exts {
                if e.hole != want_data {
                    return Out::small(&LseekOut { offset: pos });
                }
                pos = pos.saturating_add(e.length);
                if e.length == 0 || pos >= size {
                    break;
                }
            }
        }
        if want_data {
            Out::Err(libc::ENXIO)
        } else {
            Out::small(&LseekOut { offset: size })
        }
    }

    fn readdir(&self, h: &InHeader, arg: &[u8]) -> Out {
        if h.nodeid != ROOT_ID {
            return Out::Err(libc::ENOTDIR);
        }
        let Some(r) = proto::read::<ReadIn>(arg) else {
            return Out::Err(libc::EINVAL);
        };
        let mut ents: Vec<(u64, Vec<u8>, u32)> =
            vec![(ROOT_ID, b".".to_vec(), 4), (ROOT_ID, b"..".to_vec(), 4)];
        let mut vols: Vec<_> = self
            .vols
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|v| (v.ino, v.name.as_bytes().to_vec(), 8))
            .collect();
        vols.sort_by(|a, b| a.1.cmp(&b.1));
        ents.extend(vols);
        let mut out = vec![0u8; (r.size as usize).min(1 << 20)];
        let mut n = 0;
        for (i, (ino, name, typ)) in ents.iter().enumerate().skip(r.offset as usize) {
            match proto::put_dirent(&mut out[n..], *ino, i as u64 + 1, *typ, name) {
                Some(l) => n += l,
                None => break,
            }
        }
        out.truncate(n);
        Out::Data(out, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use volmig_api::io::Extent;

    /// A volume in memory with a hole map by 4 KiB blocks (a block is a
    /// hole until written).
    struct Mem {
        data: Mutex<Vec<u8>>,
        written: Mutex<Vec<bool>>,
        flushes: AtomicU64,
    }

    impl Mem {
        fn new(size: usize) -> Arc<Self> {
            Arc::new(Self {
                data: Mutex::new(vec![0; size]),
                written: Mutex::new(vec![false; size / 4096]),
                flushes: AtomicU64::new(0),
            })
        }
    }

    impl VolumeIo for Mem {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        async fn read(&self, offset: u64, mut buf: Vec<u8>) -> io::Result<Vec<u8>> {
            let d = self.data.lock().unwrap();
            let o = offset as usize;
            let n = buf.len();
            buf.copy_from_slice(&d[o..o + n]);
            Ok(buf)
        }
        async fn write(&self, offset: u64, buf: Vec<u8>, _fua: bool) -> io::Result<Vec<u8>> {
            let o = offset as usize;
            self.data.lock().unwrap()[o..o + buf.len()].copy_from_slice(&buf);
            for b in o / 4096..(o + buf.len()).div_ceil(4096) {
                self.written.lock().unwrap()[b] = true;
            }
            Ok(buf)
        }
        async fn flush(&self) -> io::Result<()> {
            self.flushes.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        async fn trim(&self, offset: u64, length: u64) -> io::Result<()> {
            self.write_zeroes(offset, length, true).await
        }
        async fn write_zeroes(&self, offset: u64, length: u64, may_trim: bool) -> io::Result<()> {
            let (o, l) = (offset as usize, length as usize);
            self.data.lock().unwrap()[o..o + l].fill(0);
            if may_trim {
                for b in o / 4096..(o + l) / 4096 {
                    self.written.lock().unwrap()[b] = false;
                }
            }
            Ok(())
        }
        async fn block_status(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
            let w = self.written.lock().unwrap();
            let first = offset as usize / 4096;
            let last = (offset + length).div_ceil(4096) as usize;
            let mut out: Vec<Extent> = Vec::new();
            for (i, &wr) in w.iter().enumerate().take(last).skip(first) {
                let start = (i as u64 * 4096).max(offset);
                let len = ((i as u64 + 1) * 4096).min(offset + length) - start;
                match out.last_mut() {
                    Some(e) if e.hole != wr => e.length += len,
                    _ => out.push(Extent {
                        length: len,
                        hole: !wr,
                        zero: !wr,
                    }),
                }
            }
            Ok(out)
        }
    }

    fn hdr(opcode: u32, nodeid: u64) -> InHeader {
        InHeader {
            opcode,
            nodeid,
            unique: 7,
            ..Default::default()
        }
    }

    fn fs_with(vol: &Arc<Mem>) -> Fs<Mem> {
        let fs = Fs::new(FsOptions::default());
        assert!(fs.register("vol", 42, vol.size(), vol.clone()));
        fs
    }

    fn small<T: Pod>(out: &Out) -> T {
        match out {
            Out::Small(a, n) => {
                assert_eq!(*n, size_of::<T>(), "reply size");
                proto::read(&a[..*n]).unwrap()
            }
            other => panic!("expected a small reply, got {other:?}"),
        }
    }

    fn assert_empty(out: &Out) {
        assert!(
            matches!(out, Out::Small(_, 0)),
            "expected an empty reply, got {out:?}"
        );
    }

    #[test]
    fn init_negotiates_large_requests_and_async_dio() {
        let fs: Fs<Mem> = Fs::new(FsOptions::default());
        let i = InitIn {
            major: 7,
            minor: 45,
            max_readahead: 131072,
            flags: (ASYNC_READ | ASYNC_DIO | MAX_PAGES | INIT_EXT | (1 << 16)) as u32,
            flags2: (HAS_RESEND >> 32) as u32,
            ..Default::default()
        };
        let (out, p) = fs.init(proto::bytes(&i));
        let o: InitOut = small(&out);
        assert_eq!((o.major, o.minor), (7, 45));
        assert_eq!((o.max_write, o.max_pages), (512 << 10, 128));
        assert_eq!(o.max_background, 256);
        let flags = u64::from(o.flags) | u64::from(o.flags2) << 32;
        assert_eq!(
            flags,
            ASYNC_READ | ASYNC_DIO | MAX_PAGES | INIT_EXT,
            "only what both want"
        );
        assert_eq!(flags & (1 << 16), 0, "never the writeback cache");
        let p = p.unwrap();
        assert!(p.kernel_resends());
        assert_eq!(p.max_write, 512 << 10);
        // An older major is refused, a newer one answered with ours.
        let (out, p) = fs.init(proto::bytes(&InitIn { major: 6, ..i }));
        assert!(matches!(out, Out::Err(libc::EPROTO)) && p.is_none());
        let (out, p) = fs.init(proto::bytes(&InitIn { major: 8, ..i }));
        assert_eq!(small::<InitOut>(&out).major, 7);
        assert!(p.is_none());
    }

    #[tokio::test]
    async fn reads_and_writes_reach_the_volume_and_stay_in_range() {
        let vol = Mem::new(1 << 20);
        let fs = fs_with(&vol);
        let w = WriteIn {
            offset: 8192,
            size: 5,
            ..Default::default()
        };
        let out = fs
            .dispatch(&hdr(WRITE, 42), proto::bytes(&w), Some(b"hello".to_vec()))
            .await;
        assert_eq!(small::<WriteOut>(&out).size, 5);
        let r = ReadIn {
            offset: 8190,
            size: 9,
            ..Default::default()
        };
        match fs.dispatch(&hdr(READ, 42), proto::bytes(&r), None).await {
            Out::Data(d, _) => assert_eq!(d, b"\0\0hello\0\0"),
            other => panic!("{other:?}"),
        }
        // Reads past the end are short, writes past it refused.
        let r = ReadIn {
            offset: (1 << 20) - 2,
            size: 4096,
            ..Default::default()
        };
        assert_eq!(
            fs.dispatch(&hdr(READ, 42), proto::bytes(&r), None)
                .await
                .bytes()
                .len(),
            2
        );
        let w = WriteIn {
            offset: (1 << 20) - 2,
            size: 4,
            ..Default::default()
        };
        let out = fs
            .dispatch(&hdr(WRITE, 42), proto::bytes(&w), Some(vec![1; 4]))
            .await;
        assert!(matches!(out, Out::Err(libc::ENOSPC)), "{out:?}");
        // Unknown inodes fail (not restoring).
        let out = fs.dispatch(&hdr(READ, 43), proto::bytes(&r), None).await;
        assert!(matches!(out, Out::Err(libc::EIO)), "{out:?}");
        let fsync = FsyncIn::default();
        fs.dispatch(&hdr(FSYNC, 42), proto::bytes(&fsync), None)
            .await;
        assert_eq!(
            vol.flushes.load(Ordering::Relaxed),
            1,
            "FSYNC flushes the volume"
        );
        assert_eq!(fs.stats.errors.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn names_attributes_and_directory() {
        let vol = Mem::new(1 << 20);
        let fs = fs_with(&vol);
        let e: EntryOut = small(&fs.dispatch(&hdr(LOOKUP, ROOT_ID), b"vol\0", None).await);
        assert_eq!((e.nodeid, e.attr.size), (42, 1 << 20));
        assert_eq!(e.attr.mode, libc::S_IFREG | 0o600);
        let out = fs.dispatch(&hdr(LOOKUP, ROOT_ID), b"nope\0", None).await;
        assert!(matches!(out, Out::Err(libc::ENOENT)));
        let a: AttrOut = small(&fs.dispatch(&hdr(GETATTR, 42), &[0; 16], None).await);
        assert_eq!(a.attr.blocks, (1 << 20) / 512);
        // Truncating a volume's file is refused; other attributes are no-ops.
        let s = SetattrIn {
            valid: FATTR_SIZE,
            size: 4096,
            ..Default::default()
        };
        let out = fs.dispatch(&hdr(SETATTR, 42), proto::bytes(&s), None).await;
        assert!(matches!(out, Out::Err(libc::EPERM)));
        let s = SetattrIn {
            valid: FATTR_SIZE,
            size: 1 << 20,
            ..Default::default()
        };
        small::<AttrOut>(&fs.dispatch(&hdr(SETATTR, 42), proto::bytes(&s), None).await);
        let o: OpenOut = small(&fs.dispatch(&hdr(OPEN, 42), &[0; 8], None).await);
        assert_eq!((o.fh, o.open_flags), (42, 0));
        let out = fs.dispatch(&hdr(CREATE, ROOT_ID), b"x\0", None).await;
        assert!(matches!(out, Out::Err(libc::EPERM)));
        let r = ReadIn {
            size: 4096,
            ..Default::default()
        };
        let d = fs
            .dispatch(&hdr(READDIR, ROOT_ID), proto::bytes(&r), None)
            .await;
        let b = d.bytes();
        let mut names = Vec::new();
        let mut at = 0;
        while at < b.len() {
            let h: DirentHead = proto::read(&b[at..]).unwrap();
            names.push(
                String::from_utf8(b[at + 24..at + 24 + h.namelen as usize].to_vec()).unwrap(),
            );
            at += (24 + h.namelen as usize + 7) & !7;
        }
        assert_eq!(names, [".", "..", "vol"]);
        assert!(matches!(
            fs.dispatch(&hdr(FORGET, 42), &[0; 8], None).await,
            Out::None
        ));
        assert!(matches!(
            fs.dispatch(&hdr(INTERRUPT, 0), &[0; 8], None).await,
            Out::None
        ));
    }

    #[tokio::test]
    async fn fallocate_and_seek_use_the_allocation_map() {
        let vol = Mem::new(1 << 20);
        let fs = fs_with(&vol);
        let w = WriteIn {
            offset: 65536,
            size: 8192,
            ..Default::default()
        };
        fs.dispatch(&hdr(WRITE, 42), proto::bytes(&w), Some(vec![7; 8192]))
            .await;
        let seek = |off: u64, whence: i32| LseekIn {
            offset: off,
            whence: whence as u32,
            ..Default::default()
        };
        let s: LseekOut = small(
            &fs.dispatch(
                &hdr(LSEEK, 42),
                proto::bytes(&seek(0, libc::SEEK_DATA)),
                None,
            )
            .await,
        );
        assert_eq!(s.offset, 65536);
        let s: LseekOut = small(
            &fs.dispatch(
                &hdr(LSEEK, 42),
                proto::bytes(&seek(65536, libc::SEEK_HOLE)),
                None,
            )
            .await,
        );
        assert_eq!(s.offset, 65536 + 8192);
        let out = fs
            .dispatch(
                &hdr(LSEEK, 42),
                proto::bytes(&seek(80000, libc::SEEK_DATA)),
                None,
            )
            .await;
        assert!(
            matches!(out, Out::Err(libc::ENXIO)),
            "no data after the last extent"
        );
        // Punch the hole back (discard) and zero a range.
        let punch = FallocateIn {
            offset: 65536,
            length: 4096,
            mode: (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u32,
            ..Default::default()
        };
        assert_empty(
            &fs.dispatch(&hdr(FALLOCATE, 42), proto::bytes(&punch), None)
                .await,
        );
        let s: LseekOut = small(
            &fs.dispatch(
                &hdr(LSEEK, 42),
                proto::bytes(&seek(0, libc::SEEK_DATA)),
                None,
            )
            .await,
        );
        assert_eq!(s.offset, 65536 + 4096);
        let zero = FallocateIn {
            offset: 65536 + 4096,
            length: 100,
            mode: (libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE) as u32,
            ..Default::default()
        };
        assert_empty(
            &fs.dispatch(&hdr(FALLOCATE, 42), proto::bytes(&zero), None)
                .await,
        );
        assert_eq!(
            &vol.data.lock().unwrap()[65536 + 4096..65536 + 4196],
            &[0; 100]
        );
        assert_eq!(vol.data.lock().unwrap()[65536 + 4196], 7);
        // Growing the file is not for FUSE clients.
        let grow = FallocateIn {
            offset: 1 << 20,
            length: 4096,
            ..Default::default()
        };
        let out = fs
            .dispatch(&hdr(FALLOCATE, 42), proto::bytes(&grow), None)
            .await;
        assert!(matches!(out, Out::Err(libc::EOPNOTSUPP)));
    }

    #[tokio::test(start_paused = true)]
    async fn while_restoring_requests_wait_for_their_volume() {
        let vol = Mem::new(1 << 20);
        let fs = Arc::new(Fs::<Mem>::new(FsOptions::default()));
        fs.start_restoring(Duration::from_secs(60));
        let r = ReadIn {
            offset: 0,
            size: 4096,
            ..Default::default()
        };
        let waiting = {
            let fs = fs.clone();
            tokio::spawn(async move { fs.dispatch(&hdr(READ, 42), proto::bytes(&r), None).await })
        };
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiting.is_finished(), "the request waits for its volume");
        assert!(fs.register("vol", 42, 1 << 20, vol.clone()));
        let out = waiting.await.unwrap();
        assert_eq!(out.bytes().len(), 4096, "{out:?}");
        // A volume nobody claims fails once restoring ends.
        let lost = {
            let fs = fs.clone();
            tokio::spawn(async move { fs.dispatch(&hdr(READ, 99), proto::bytes(&r), None).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!lost.is_finished());
        fs.restored();
        assert!(matches!(lost.await.unwrap(), Out::Err(libc::EIO)));
        // And with the grace period over, nothing waits either.
        fs.start_restoring(Duration::from_secs(2));
        let out = fs.dispatch(&hdr(GETATTR, 98), &[0; 16], None).await;
        assert!(matches!(out, Out::Err(libc::ENOENT)), "{out:?}");
    }
}
