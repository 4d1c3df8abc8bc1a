//! The interposer: a volume's I/O router. Workload I/O comes in from a
//! frontend, passes the quiesce gate, and goes to the active backing device;
//! while a migration is attached the monitor records every write in the
//! dirty map, and in mirror mode writes to already-copied grains go to both
//! devices.
//!
//! # Why a racing write never leaves stale data on the target
//!
//! The copier copies a grain range as: (1) record the range in a recovery
//! slot, (2) take the range locks, (3) clear the range's dirty bits, (4) read
//! the source, (5) write the target, (6) release, clear the slot.
//!
//! *Tracked write* (background mode: source only): (a) mark dirty, (b) write
//! the source, (c) mark dirty again, (d) acknowledge. Take a grain whose
//! source write (b) overlaps or follows the copier's read (4). Then (b)
//! finishes after (4) started, so (c) happens after (4) started, which is
//! after (3): the bit cleared in (3) is set again in (c), and the next pass
//! copies the grain. If instead (b) finished before (4) started, the copier
//! read the new data. Either way a grain is clean only if the target holds
//! what the source holds. (a) exists for crashes: the bit is in the
//! file-backed map before the source changes, so a write cut short by a
//! crash is re-copied on recovery.
//!
//! *Mirrored write* (mirror mode): under the range locks, (a) note whether the
//! range is clean, mark it dirty, (b) write the source, (c) if it was clean
//! write the target and, if that succeeded, clear the bits. The lock makes
//! (a)-(c) and the copier's (3)-(5) mutually exclusive, so target and source
//! receive the same sequence of writes for clean grains; dirty grains are
//! left to the copier. Two copies of one grain never run at once: a pass
//! hands out each range once and waits for all of them before the next.
//!
//! *After redirect* writes go to the target and, during the failback window,
//! back to the source under the same rules with the roles swapped.
//!
//! Attaching and detaching the monitor and redirecting all happen with the
//! gate held, so no request is in flight while the route changes.
//!
//! *Where a write runs* does not enter the argument: a write is done inline
//! with `RWF_NOWAIT` where the filesystem allows it, else inline on a
//! frontend's dedicated I/O thread (`volmig_api::io::threads`: a thread
//! serving only that frontend's requests, one connection say), else on the
//! shared blocking pool, and each place runs the same steps above under the
//! same locks. The one difference: inline, a mirrored write only *tries* its
//! range locks and, if a copier holds them, does nothing and goes to the
//! pool to wait there, so a dedicated I/O thread never waits for a copier's
//! chunk.

mod gate;
mod range_lock;

pub use gate::{QuiesceGate, QuiesceTimeout};
pub use range_lock::RangeLocks;

use std::io;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use volmig_api::io::{Extent, VolumeIo, threads};

use crate::error::{AgentError, Result};
use crate::metrics::Op;
use crate::monitor::DirtyMap;
use crate::volume::BackingDevice;

/// How writes are handled while a migration is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum WriteMode {
    /// Source only, every write marked dirty (background copy).
    Track = 0,
    /// Writes to clean grains go to source and target (mirror mode).
    Mirror = 1,
    /// After redirect: target is active, writes mirrored back to the source.
    MirrorBack = 2,
    /// After redirect, no failback: target only.
    TargetOnly = 3,
}

impl WriteMode {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => WriteMode::Mirror,
            2 => WriteMode::MirrorBack,
            3 => WriteMode::TargetOnly,
            _ => WriteMode::Track,
        }
    }
}

/// A migration attached to the interposer.
pub struct Link {
    pub source: Arc<BackingDevice>,
    pub target: Arc<BackingDevice>,
    pub dirty: Arc<DirtyMap>,
    pub locks: RangeLocks,
    mode: AtomicU8,
}

impl Link {
    pub fn new(
        source: Arc<BackingDevice>,
        target: Arc<BackingDevice>,
        dirty: Arc<DirtyMap>,
        mode: WriteMode,
    ) -> Self {
        let locks = RangeLocks::new(dirty.grain());
        Self {
            source,
            target,
            dirty,
            locks,
            mode: AtomicU8::new(mode as u8),
        }
    }

    pub fn mode(&self) -> WriteMode {
        WriteMode::from_u8(self.mode.load(Ordering::SeqCst))
    }

    /// Switching between Track and Mirror is safe at any moment (see the
    /// module docs: a tracked write in flight still marks after itself).
    pub fn set_mode(&self, mode: WriteMode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// Devices in copy direction: (from, to).
    pub fn direction(&self) -> (&Arc<BackingDevice>, &Arc<BackingDevice>) {
        match self.mode() {
            WriteMode::MirrorBack | WriteMode::TargetOnly => (&self.target, &self.source),
            _ => (&self.source, &self.target),
        }
    }
}

#[derive(Clone)]
struct Route {
    active: Arc<BackingDevice>,
    link: Option<Arc<Link>>,
}

/// Whether a mirrored write waits for its range locks (on the pool) or
/// gives up when they are held (on a dedicated I/O thread, which must not
/// wait for a copier's chunk).
#[derive(Clone, Copy, PartialEq, Eq)]
enum LockWait {
    Block,
    Try,
}

/// One kind of write, applied to a device.
#[derive(Clone, Copy)]
enum Mutation<'a> {
    Data(&'a [u8]),
    Zeroes { may_trim: bool },
    Trim,
}

impl Mutation<'_> {
    fn apply(&self, dev: &BackingDevice, offset: u64, length: u64) -> Result<()> {
        match *self {
            Mutation::Data(buf) => dev.write_at(buf, offset),
            Mutation::Zeroes { may_trim } => dev.write_zeroes(offset, length, may_trim),
            Mutation::Trim => dev.trim(offset, length),
        }
    }
}

/// Workload counters, read by the session for rates.
#[derive(Debug, Default)]
pub struct IoCounters {
    pub bytes_written: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub reads: AtomicU64,
    /// Mirrored writes whose target half failed (grain left dirty).
    pub mirror_errors: AtomicU64,
    /// Latencies and stalls, for the agent's metrics.
    pub metrics: crate::metrics::VolumeMetrics,
    /// Workload requests that failed (the backing device answered an
    /// error): the volume's condition, as the CSI node reports it.
    pub io_errors: AtomicU64,
    /// The newest of those errors, for people.
    last_error: std::sync::Mutex<Option<String>>,
}

impl IoCounters {
    /// A read of `len` bytes done.
    fn read_done(&self, len: u64) {
        self.bytes_read.fetch_add(len, Ordering::Relaxed);
        self.reads.fetch_add(1, Ordering::Relaxed);
    }

    /// A write (data, zeroes or trim) of `len` bytes done.
    fn write_done(&self, len: u64) {
        self.bytes_written.fetch_add(len, Ordering::Relaxed);
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    fn note_error(&self, op: &str, offset: u64, e: &io::Error) {
        self.io_errors.fetch_add(1, Ordering::Relaxed);
        let msg = format!("{op} at offset {offset}: {e}");
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg);
    }

    /// The newest failed workload request, if any failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

pub struct Interposer {
    name: String,
    /// Grows with [`Interposer::grow`].
    size: AtomicU64,
    gate: QuiesceGate,
    route: RwLock<Route>,
    pub counters: Arc<IoCounters>,
}

fn to_io(e: AgentError) -> io::Error {
    match e {
        AgentError::Io { source, .. } => source,
        other => io::Error::other(other.to_string()),
    }
}

/// Runs device I/O on the shared blocking pool (from any thread, see
/// `volmig_api::io::threads`).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> io::Result<T> {
    match threads::spawn_blocking(f).await {
        Ok(r) => r.map_err(to_io),
        Err(e) => Err(io::Error::other(format!("I/O task failed: {e}"))),
    }
}

impl Interposer {
    pub fn new(name: impl Into<String>, active: Arc<BackingDevice>) -> Self {
        Self {
            name: name.into(),
            size: AtomicU64::new(active.size()),
            gate: QuiesceGate::new(),
            route: RwLock::new(Route { active, link: None }),
            counters: Arc::new(IoCounters::default()),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The active backing device grew (a volume expanded underneath): reads
    /// its size again and serves the new size. Refused while a migration is
    /// attached (its dirty map and target are sized for the volume as it
    /// was). Runs with the gate held, so no request is in flight while the
    /// size changes. Returns the size now.
    pub async fn grow(&self, drain: Duration) -> Result<u64> {
        let was_held = self.gate.is_held().await;
        self.gate.hold(drain).await.map_err(|_| {
            AgentError::Invalid(format!(
                "{}: in-flight I/O did not drain in {drain:?}",
                self.name
            ))
        })?;
        let route = self.route();
        let grown = match route.link {
            Some(_) => Err(AgentError::Transition(format!(
                "{}: cannot grow while a migration is attached",
                self.name
            ))),
            None => {
                let dev = route.active.clone();
                match threads::spawn_blocking(move || dev.refresh_size()).await {
                    Ok(r) => r,
                    Err(e) => Err(AgentError::Task(e.to_string())),
                }
            }
        };
        if let Ok(size) = grown {
            self.size.fetch_max(size, Ordering::AcqRel);
        }
        if !was_held {
            self.gate.release().await;
        }
        grown.map(|_| self.size())
    }

    fn route(&self) -> Route {
        // Poisoning cannot leave Route half-written (assignments are whole).
        self.route.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_route(&self, f: impl FnOnce(&mut Route)) {
        let mut r = self.route.write().unwrap_or_else(|p| p.into_inner());
        f(&mut r);
    }

    pub fn active(&self) -> Arc<BackingDevice> {
        self.route().active
    }

    pub fn link(&self) -> Option<Arc<Link>> {
        self.route().link
    }

    pub fn gate(&self) -> &QuiesceGate {
        &self.gate
    }

    /// Attaches a migration: from now on every write is recorded. Runs with
    /// the gate held so no write in flight escapes the monitor.
    pub async fn attach(&self, link: Arc<Link>, drain: Duration) -> Result<()> {
        let was_held = self.gate.is_held().await;
        self.gate.hold(drain).await.map_err(|_| {
            AgentError::Invalid(format!(
                "{}: in-flight I/O did not drain in {drain:?}",
                self.name
            ))
        })?;
        self.set_route(|r| r.link = Some(link));
        if !was_held {
            self.gate.release().await;
        }
        Ok(())
    }

    /// Detaches the migration and makes `active` the device I/O goes to.
    pub async fn detach(&self, active: Arc<BackingDevice>, drain: Duration) -> Result<()> {
        let was_held = self.gate.is_held().await;
        self.gate.hold(drain).await.map_err(|_| {
            AgentError::Invalid(format!(
                "{}: in-flight I/O did not drain in {drain:?}",
                self.name
            ))
        })?;
        self.set_route(|r| {
            r.link = None;
            r.active = active;
        });
        if !was_held {
            self.gate.release().await;
        }
        Ok(())
    }

    /// Switches the active device to the link's target (or back to its
    /// source). The caller must hold the gate (quiesced).
    pub async fn redirect(&self, to_target: bool, mode_after: WriteMode) -> Result<()> {
        if !self.gate.is_held().await {
            return Err(AgentError::Transition(format!(
                "{}: redirect needs the volume quiesced",
                self.name
            )));
        }
        let link = self.link().ok_or_else(|| {
            AgentError::Transition(format!("{}: no migration attached", self.name))
        })?;
        link.set_mode(mode_after);
        let dev = if to_target {
            link.target.clone()
        } else {
            link.source.clone()
        };
        self.set_route(|r| r.active = dev);
        Ok(())
    }

    /// A write on the pool: waits for range locks as long as it takes.
    fn write_blocking(
        route: &Route,
        counters: &IoCounters,
        offset: u64,
        length: u64,
        m: Mutation<'_>,
    ) -> Result<()> {
        Self::write_routed(route, counters, offset, length, m, LockWait::Block).unwrap_or_else(
            || {
                // write_routed returns None only for LockWait::Try.
                Err(AgentError::Invalid(
                    "a blocking write gave up on its range lock".into(),
                ))
            },
        )
    }

    /// Applies a write along the route (see the module docs for each
    /// mode). `None` only with [`LockWait::Try`], when a mirrored write's
    /// range is locked: nothing was done, and the caller retries on the
    /// pool.
    fn write_routed(
        route: &Route,
        counters: &IoCounters,
        offset: u64,
        length: u64,
        m: Mutation<'_>,
        wait: LockWait,
    ) -> Option<Result<()>> {
        let Some(link) = &route.link else {
            return Some(m.apply(&route.active, offset, length));
        };
        match link.mode() {
            WriteMode::Track => Some(tracked_write(&link.dirty, offset, length, || {
                m.apply(&link.source, offset, length)
            })),
            WriteMode::TargetOnly => Some(m.apply(&link.target, offset, length)),
            mode @ (WriteMode::Mirror | WriteMode::MirrorBack) => {
                let locked = match wait {
                    LockWait::Block => link.locks.lock(offset, length),
                    LockWait::Try => link.locks.try_lock(offset, length)?,
                };
                let r = mirrored_write(link, mode, counters, offset, length, m);
                drop(locked);
                Some(r)
            }
        }
    }

    /// A zero or trim request: through the gate, on the blocking pool.
    async fn mutate(&self, offset: u64, length: u64, m: Mutation<'static>) -> io::Result<()> {
        let _pass = self.gate.enter().await;
        let route = self.route();
        let counters = self.counters.clone();
        blocking(move || Interposer::write_blocking(&route, &counters, offset, length, m)).await?;
        self.counters.write_done(length);
        Ok(())
    }

    /// A write that takes no lock and cannot block (page cache, see
    /// `try_write_nowait`), done on the calling task. `None`: it must go to
    /// the blocking pool (mirror modes take range locks; the page cache
    /// would block). A tracked write keeps its full protocol: the second
    /// mark follows the source write here as on the pool.
    fn try_write_inline(route: &Route, offset: u64, buf: &[u8]) -> Option<Result<()>> {
        let len = buf.len() as u64;
        match &route.link {
            None => route.active.try_write_nowait(buf, offset),
            Some(link) => match link.mode() {
                WriteMode::TargetOnly => link.target.try_write_nowait(buf, offset),
                WriteMode::Track => {
                    link.dirty.mark(offset, len);
                    let r = link.source.try_write_nowait(buf, offset)?;
                    link.dirty.mark(offset, len);
                    Some(r)
                }
                WriteMode::Mirror | WriteMode::MirrorBack => None,
            },
        }
    }

    /// Makes the route's writes durable: the active device, and the other
    /// one too while writes are mirrored to it.
    fn flush_blocking(route: &Route) -> Result<()> {
        route.active.flush()?;
        if let Some(link) = &route.link {
            match link.mode() {
                WriteMode::Mirror => link.target.flush()?,
                WriteMode::MirrorBack => link.source.flush()?,
                _ => {}
            }
        }
        Ok(())
    }
}

/// The tracked-write protocol (see the module docs): mark, write, mark
/// again. `write` is the source write; whatever a copier does while it runs
/// is caught by the second mark.
fn tracked_write(
    dirty: &DirtyMap,
    offset: u64,
    length: u64,
    write: impl FnOnce() -> Result<()>,
) -> Result<()> {
    dirty.mark(offset, length);
    write()?;
    dirty.mark(offset, length);
    Ok(())
}

/// The mirrored-write protocol (see the module docs); the caller holds the
/// range's locks for the whole call.
fn mirrored_write(
    link: &Link,
    mode: WriteMode,
    counters: &IoCounters,
    offset: u64,
    length: u64,
    m: Mutation<'_>,
) -> Result<()> {
    let (primary, secondary) = if mode == WriteMode::Mirror {
        (&link.source, &link.target)
    } else {
        (&link.target, &link.source)
    };
    let dirty = &link.dirty;
    let was_clean = dirty.is_clean(offset, length);
    dirty.mark(offset, length);
    m.apply(primary, offset, length)?;
    // A slow secondary, for tests of what sees a mirrored write half done.
    if let Some(d) = volmig_api::fault::delay("agent:mirrored-write") {
        std::thread::sleep(d);
    }
    if was_clean {
        match m.apply(secondary, offset, length) {
            Ok(()) => {
                dirty.clear(offset, length);
            }
            Err(e) => {
                counters.mirror_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "mirrored write failed on the secondary device; range left dirty");
            }
        }
    }
    Ok(())
}

/// A frontend's view of an interposer.
impl VolumeIo for Interposer {
    fn size(&self) -> u64 {
        Interposer::size(self)
    }

    async fn read(&self, offset: u64, buf: Vec<u8>) -> io::Result<Vec<u8>> {
        let _timer = self.counters.metrics.time(Op::Read);
        self.read_inner(offset, buf)
            .await
            .inspect_err(|e| self.counters.note_error("read", offset, e))
    }

    async fn write(&self, offset: u64, buf: Vec<u8>, fua: bool) -> io::Result<Vec<u8>> {
        let _timer = self.counters.metrics.time(Op::Write);
        self.write_inner(offset, buf, fua)
            .await
            .inspect_err(|e| self.counters.note_error("write", offset, e))
    }

    async fn flush(&self) -> io::Result<()> {
        let _timer = self.counters.metrics.time(Op::Flush);
        let _pass = self.gate.enter().await;
        let route = self.route();
        let flushed = if threads::may_wait_long() {
            // A kernel queue's worker: flush here, no hand-off to the pool
            // and back (the queue's other workers serve meanwhile).
            Interposer::flush_blocking(&route).map_err(to_io)
        } else {
            blocking(move || Interposer::flush_blocking(&route)).await
        };
        flushed.inspect_err(|e| self.counters.note_error("flush", 0, e))
    }

    async fn trim(&self, offset: u64, length: u64) -> io::Result<()> {
        let _timer = self.counters.metrics.time(Op::Trim);
        self.mutate(offset, length, Mutation::Trim)
            .await
            .inspect_err(|e| self.counters.note_error("trim", offset, e))
    }

    async fn write_zeroes(&self, offset: u64, length: u64, may_trim: bool) -> io::Result<()> {
        let _timer = self.counters.metrics.time(Op::WriteZeroes);
        self.mutate(offset, length, Mutation::Zeroes { may_trim })
            .await
            .inspect_err(|e| self.counters.note_error("write zeroes", offset, e))
    }

    async fn read_by_fd<R, F>(&self, offset: u64, length: u64, f: F) -> Option<io::Result<R>>
    where
        R: Send,
        F: FnOnce(std::os::fd::BorrowedFd<'_>, u64) -> io::Result<R> + Send,
    {
        // A read that misses the page cache waits for the disk right here.
        if !threads::may_wait_long() {
            return None;
        }
        let _timer = self.counters.metrics.time(Op::Read);
        // Held until `f` returns: no cutover moves the range meanwhile.
        let _pass = self.gate.enter().await;
        let dev = self.route().active;
        let fd = dev.plain_fd(offset, length)?;
        let r = f(fd, offset);
        match &r {
            Ok(_) => self.counters.read_done(length),
            Err(e) => self.counters.note_error("read", offset, e),
        }
        Some(r)
    }

    async fn block_status(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        let _timer = self.counters.metrics.time(Op::BlockStatus);
        let _pass = self.gate.enter().await;
        let dev = self.route().active;
        let segs = blocking(move || dev.segments(offset, length)).await?;
        Ok(segs
            .into_iter()
            .map(|s| Extent {
                length: s.length,
                hole: s.hole,
                zero: s.hole,
            })
            .collect())
    }
}

impl Interposer {
    async fn read_inner(&self, offset: u64, mut buf: Vec<u8>) -> io::Result<Vec<u8>> {
        let _pass = self.gate.enter().await;
        let dev = self.route().active;
        let len = buf.len() as u64;
        let buf = match dev.try_read_nowait(&mut buf, offset) {
            Some(r) => r.map(|_| buf).map_err(to_io)?,
            None => blocking(move || dev.read_at(&mut buf, offset).map(|_| buf)).await?,
        };
        self.counters.read_done(len);
        Ok(buf)
    }

    async fn write_inner(&self, offset: u64, buf: Vec<u8>, fua: bool) -> io::Result<Vec<u8>> {
        let _pass = self.gate.enter().await;
        let route = self.route();
        let counters = self.counters.clone();
        let len = buf.len() as u64;
        if !fua {
            // First a write that cannot block (any thread); then, on a
            // dedicated I/O thread, the write itself unless it would wait for
            // a range lock. Either way the same protocol as on the pool.
            let inline = Interposer::try_write_inline(&route, offset, &buf).or_else(|| {
                threads::may_block()
                    .then(|| {
                        let m = Mutation::Data(&buf);
                        Interposer::write_routed(&route, &counters, offset, len, m, LockWait::Try)
                    })
                    .flatten()
            });
            if let Some(r) = inline {
                r.map_err(to_io)?;
                self.counters.write_done(len);
                return Ok(buf);
            }
        }
        let write = move || {
            Interposer::write_blocking(&route, &counters, offset, len, Mutation::Data(&buf))?;
            if fua {
                Interposer::flush_blocking(&route)?;
            }
            Ok(buf)
        };
        let buf = if fua && threads::may_wait_long() {
            // As a flush: on a kernel queue's worker, right here.
            write().map_err(to_io)?
        } else {
            blocking(write).await?
        };
        self.counters.write_done(len);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::OpenMode;

    fn dev(dir: &tempfile::TempDir, name: &str) -> Arc<BackingDevice> {
        let p = dir.path().join(name);
        std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
        Arc::new(BackingDevice::open(&p, OpenMode::ReadWrite, false).unwrap())
    }

    /// The copier clears and reads the grain *while* the workload's source
    /// write is in progress (before it lands): the grain must end dirty.
    #[test]
    fn tracked_write_racing_a_copy_stays_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let (src, tgt) = (dev(&dir, "s"), dev(&dir, "t"));
        let dirty = DirtyMap::in_memory(1 << 20, 4096).unwrap();
        dirty.clear(0, 1 << 20);
        tracked_write(&dirty, 8192, 100, || {
            // copier: clear, read (old data), write target
            dirty.clear(8192, 4096);
            let mut buf = vec![0u8; 4096];
            src.read_at(&mut buf, 8192).unwrap();
            tgt.write_at(&buf, 8192).unwrap();
            // now the workload's write lands on the source
            src.write_at(&[1u8; 100], 8192)
        })
        .unwrap();
        assert!(
            !dirty.is_clean(8192, 4096),
            "a stale target grain was left clean"
        );
    }

    /// The copier cleared the grain after the write's data landed but
    /// before it marked: the copier read the new data, the grain may stay
    /// dirty (a redundant copy), never stale.
    #[test]
    fn tracked_write_marks_before_the_source_changes() {
        let dirty = DirtyMap::in_memory(1 << 20, 4096).unwrap();
        dirty.clear(0, 1 << 20);
        tracked_write(&dirty, 0, 10, || {
            assert!(
                !dirty.is_clean(0, 10),
                "intent must be recorded before the write (crash safety)"
            );
            Ok(())
        })
        .unwrap();
    }

    /// A mirrored write holds the grain's range lock across both device
    /// writes: a copier cannot interleave.
    #[test]
    fn mirrored_write_excludes_the_copier() {
        let dir = tempfile::tempdir().unwrap();
        let (src, tgt) = (dev(&dir, "s"), dev(&dir, "t"));
        let dirty = Arc::new(DirtyMap::in_memory(1 << 20, 4096).unwrap());
        dirty.clear(0, 1 << 20);
        let link = Arc::new(Link::new(
            src.clone(),
            tgt.clone(),
            dirty.clone(),
            WriteMode::Mirror,
        ));
        let route = Route {
            active: src.clone(),
            link: Some(link.clone()),
        };
        let counters = IoCounters::default();
        let _held = link.locks.lock(0, 4096);
        let l2 = link.clone();
        let t = std::thread::spawn(move || {
            let route = Route {
                active: l2.source.clone(),
                link: Some(l2.clone()),
            };
            Interposer::write_blocking(
                &route,
                &IoCounters::default(),
                100,
                10,
                Mutation::Data(&[7u8; 10]),
            )
            .unwrap();
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut b = [0u8; 10];
        src.read_at(&mut b, 100).unwrap();
        assert_eq!(
            b, [0u8; 10],
            "the mirrored write must wait for the copier's lock"
        );
        drop(_held);
        t.join().unwrap();
        tgt.read_at(&mut b, 100).unwrap();
        assert_eq!(
            b, [7u8; 10],
            "clean grain: the write reached the target too"
        );
        assert!(dirty.is_clean(0, 4096));
        // a dirty grain is left to the copier: source only
        dirty.mark(8192, 1);
        Interposer::write_blocking(&route, &counters, 8192, 4, Mutation::Data(&[9u8; 4])).unwrap();
        let mut c = [0u8; 4];
        tgt.read_at(&mut c, 8192).unwrap();
        assert_eq!(c, [0u8; 4]);
        assert!(!dirty.is_clean(8192, 1));
    }

    /// A frontend reads straight from the active device's descriptor only
    /// where that may wait (a kernel queue's worker) and only from a
    /// buffered device; the read is counted like any other.
    #[tokio::test]
    async fn reads_by_descriptor_come_from_the_active_buffered_device() {
        async fn read_fd(ip: &Interposer, off: u64, len: u64) -> Option<(u64, Vec<u8>)> {
            use std::os::fd::AsRawFd;
            use volmig_api::io::VolumeIo;
            let mut buf = vec![0u8; len as usize];
            let at = ip
                .read_by_fd(off, len, |fd, at| {
                    // SAFETY: buf is live and len bytes long; fd is
                    // borrowed for the call.
                    let n = unsafe {
                        libc::pread(
                            fd.as_raw_fd(),
                            buf.as_mut_ptr().cast(),
                            buf.len(),
                            at as i64,
                        )
                    };
                    assert_eq!(n, len as isize);
                    Ok(at)
                })
                .await?
                .unwrap();
            Some((at, buf))
        }
        /// Runs `f` on a kernel queue's worker thread.
        async fn on_worker<T: Send + 'static>(
            slots: &Arc<threads::Slots>,
            f: impl AsyncFnOnce() -> T + Send + 'static,
        ) -> T {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let shared = tokio::runtime::Handle::current();
            threads::spawn_dedicated(
                "t",
                slots.take().unwrap(),
                shared,
                (),
                move |()| async move {
                    threads::share_queue();
                    let _ = tx.send(f().await);
                },
            )
            .map_err(|(_, e)| e)
            .unwrap();
            rx.await.unwrap()
        }
        let dir = tempfile::tempdir().unwrap();
        let src = dev(&dir, "s");
        src.write_at(&[7u8; 8192], 4096).unwrap();
        let ip = Arc::new(Interposer::new("v", src));
        assert!(
            read_fd(&ip, 4096, 8192).await.is_none(),
            "not on a thread that must not wait"
        );
        let slots = Arc::new(threads::Slots::new(2));
        let ip2 = ip.clone();
        let (inside, beyond) = on_worker(&slots, async move || {
            (
                read_fd(&ip2, 4096, 8192).await,
                read_fd(&ip2, (1 << 20) - 4096, 8192).await,
            )
        })
        .await;
        let (at, buf) = inside.expect("a buffered device offers its descriptor");
        assert_eq!((at, buf), (4096, vec![7u8; 8192]));
        assert!(beyond.is_none(), "not beyond the device's end");
        assert_eq!(ip.counters.reads.load(Ordering::Relaxed), 1);
        assert_eq!(ip.counters.bytes_read.load(Ordering::Relaxed), 8192);

        let p = dir.path().join("d");
        std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
        let direct = Arc::new(Interposer::new(
            "d",
            Arc::new(BackingDevice::open(&p, OpenMode::ReadWrite, true).unwrap()),
        ));
        let offered = on_worker(&slots, async move || {
            read_fd(&direct, 0, 4096).await.is_some()
        })
        .await;
        assert!(!offered, "an O_DIRECT device is read through buffers");
    }
}
