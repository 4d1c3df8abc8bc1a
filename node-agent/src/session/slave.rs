//! The agent's half of a session: each phase step as an idempotent
//! operation the master calls (in-process or over gRPC). The master keeps
//! the phase; this keeps the devices, the dirty map and the quiesce gate,
//! and a local checkpoint so a restarted agent attaches the session again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};
use volmig_api::slave::{
    DirtyBatch, DirtyRun, PassResult, QuiesceResult, SessionState, TerminateResult,
};
use volmig_api::{CopyMode, SessionConfig};

use super::checkpoint::{SlaveRecord, StateDir};
use super::verify::verify_blocking;
use crate::copy::{Copier, CopyConfig, Throttle};
use crate::error::{AgentError, Result};
use crate::interposer::{Interposer, Link, WriteMode};
use crate::monitor::{DirtyMap, MapOrigin};
use crate::volume::{BackingDevice, OpenMode};

/// How long attach/detach/abort may wait for in-flight I/O to drain.
const DRAIN: Duration = Duration::from_secs(30);
/// A quiesce the master does not follow up within this long is released
/// (the workload must not stay frozen because a master died).
const QUIESCE_LEASE: Duration = Duration::from_secs(10);
/// Rate sampling period.
const TICK: Duration = Duration::from_millis(500);

/// The position and totals of the pass in progress.
#[derive(Debug, Default, Clone, Copy)]
struct PassCursor {
    next: u64,
    bytes: u64,
    data_bytes: u64,
    elapsed: Duration,
}

pub struct SlaveSession {
    interposer: Arc<Interposer>,
    state: StateDir,
    record: Mutex<SlaveRecord>,
    link: Arc<Link>,
    copier: Copier,
    /// Set by abort: cut the running pass short.
    stop: AtomicBool,
    cursor: Mutex<PassCursor>,
    quiesced_at: Mutex<Option<Instant>>,
    quiesce_gen: AtomicU64,
    /// How long a quiesce waits for the master's next step, in ms.
    lease_ms: AtomicU64,
    write_rate: AtomicU64,
    copy_rate: AtomicU64,
    /// Monitor-only sessions: grains handed to the master, kept until it
    /// acknowledges their batch.
    shipped: Mutex<Shipped>,
}

/// Dirty grains a monitor-only session handed over and the master has not
/// acknowledged yet (see `take_dirty`).
#[derive(Debug, Default)]
struct Shipped {
    batch: u64,
    words: Vec<u64>,
}

/// Runs of non-zero words of a bitmap, as they go on the wire.
fn word_runs(words: &[u64]) -> Vec<DirtyRun> {
    let mut runs: Vec<DirtyRun> = Vec::new();
    for (i, &w) in words.iter().enumerate() {
        if w == 0 {
            continue;
        }
        match runs.last_mut() {
            Some(r) if r.first_word + r.words.len() as u64 == i as u64 => r.words.push(w),
            _ => runs.push(DirtyRun {
                first_word: i as u64,
                words: vec![w],
            }),
        }
    }
    runs
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update under these locks is a whole assignment: a panic
    // elsewhere cannot leave them half-written.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Task(e.to_string()))?
}

/// Opens a session's target the way the volume's device is open (O_DIRECT
/// or not): a volume served with O_DIRECT keeps it after the cutover.
fn open_target(source: &BackingDevice, path: &std::path::Path) -> Result<BackingDevice> {
    let target = BackingDevice::open(path, OpenMode::ReadWrite, source.is_direct())?;
    if target.same_device(source) {
        return Err(AgentError::SameDevice {
            path: path.to_path_buf(),
        });
    }
    if target.size() < source.size() {
        return Err(AgentError::TargetTooSmall {
            source_path: source.path().to_path_buf(),
            source_size: source.size(),
            target: path.to_path_buf(),
            target_size: target.size(),
        });
    }
    Ok(target)
}

impl SlaveSession {
    /// Activation: validate the target, create the dirty map with every
    /// grain dirty, attach the monitor before any byte is copied.
    pub async fn prepare(
        interposer: Arc<Interposer>,
        state: StateDir,
        session_id: &str,
        epoch: u64,
        target_path: &std::path::Path,
        config: SessionConfig,
        monitor_only: bool,
    ) -> Result<Arc<Self>> {
        if let Some(l) = interposer.link() {
            return Err(AgentError::SessionExists {
                volume: interposer.name().to_string(),
                session: l.target.name(),
            });
        }
        config.validate().map_err(AgentError::Invalid)?;
        let source = interposer.active();
        let target = open_target(&source, target_path)?;
        let record = SlaveRecord {
            session_id: session_id.to_string(),
            epoch,
            volume: interposer.name().to_string(),
            source: source.path().to_path_buf(),
            target: target.path().to_path_buf(),
            size: source.size(),
            mirror: config.mode == CopyMode::Mirror && !monitor_only,
            config,
            monitor_only,
            redirected: false,
            finished: false,
            verified: None,
            mismatch_offset: None,
            resumes: 0,
        };
        let (dirty, _) = DirtyMap::open_file(
            &state.dirty_map_path(&record.volume),
            record.size,
            record.config.grain,
            false,
        )?;
        if record.monitor_only {
            // Nothing to copy here: only what this agent's workload writes
            // from the attach on, handed to the copying agent.
            dirty.clear(0, record.size);
        }
        let fresh_zero = target.is_fully_unallocated().unwrap_or(false);
        let mode = if record.mirror {
            WriteMode::Mirror
        } else {
            WriteMode::Track
        };
        let link = Arc::new(Link::new(source, Arc::new(target), Arc::new(dirty), mode));
        let session = Self::build(interposer.clone(), state, record, link.clone())?;
        session.copier.set_dest_known_zero(fresh_zero);
        session.save()?;
        interposer.attach(link, DRAIN).await?;
        info!(volume = %interposer.name(), session = %session_id, target = %target_path.display(), "prepared: monitor attached");
        Ok(session)
    }

    /// Attaches a checkpointed session again after an agent restart.
    /// `interposer` serves the device the checkpoint says is active.
    pub async fn reattach(
        interposer: Arc<Interposer>,
        state: StateDir,
        mut record: SlaveRecord,
    ) -> Result<Arc<Self>> {
        // As the volume is served: O_DIRECT or not.
        let direct = interposer.active().is_direct();
        let source = Arc::new(BackingDevice::open(
            &record.source,
            OpenMode::ReadWrite,
            direct,
        )?);
        let target = Arc::new(BackingDevice::open(
            &record.target,
            OpenMode::ReadWrite,
            direct,
        )?);
        let (dirty, origin) = DirtyMap::open_file(
            &state.dirty_map_path(&record.volume),
            record.size,
            record.config.grain,
            true,
        )?;
        if let MapOrigin::Reset { reason } = &origin {
            warn!(volume = %record.volume, %reason, "checkpoint not trusted: copying everything again");
        }
        let mode = if record.redirected {
            WriteMode::MirrorBack
        } else if record.mirror {
            WriteMode::Mirror
        } else {
            WriteMode::Track
        };
        if record.monitor_only && !record.redirected {
            // Grains handed over but not acknowledged were only in memory:
            // hand everything over again (the copying agent re-copies the
            // volume; nothing is lost).
            dirty.mark_all();
        }
        record.resumes += 1;
        let link = Arc::new(Link::new(source, target, Arc::new(dirty), mode));
        let session = Self::build(interposer.clone(), state, record, link.clone())?;
        session.save()?;
        interposer.attach(link, DRAIN).await?;
        info!(volume = %interposer.name(), ?origin, "session attached again from its checkpoint");
        Ok(session)
    }

    fn build(
        interposer: Arc<Interposer>,
        state: StateDir,
        record: SlaveRecord,
        link: Arc<Link>,
    ) -> Result<Arc<Self>> {
        let throttle = Arc::new(Throttle::new(record.config.bandwidth));
        let cfg = CopyConfig {
            chunk_size: record.config.chunk_size,
            in_flight: record.config.in_flight,
            sparse: record.config.sparse,
        };
        let copier = Copier::new(link.clone(), cfg, throttle)?;
        let s = Arc::new(Self {
            interposer,
            state,
            record: Mutex::new(record),
            link,
            copier,
            stop: AtomicBool::new(false),
            cursor: Mutex::new(PassCursor::default()),
            quiesced_at: Mutex::new(None),
            quiesce_gen: AtomicU64::new(0),
            lease_ms: AtomicU64::new(QUIESCE_LEASE.as_millis() as u64),
            write_rate: AtomicU64::new(0),
            copy_rate: AtomicU64::new(0),
            shipped: Mutex::new(Shipped::default()),
        });
        tokio::spawn(s.clone().tick());
        Ok(s)
    }

    fn tick(self: Arc<Self>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let weak = Arc::downgrade(&self);
        drop(self);
        Box::pin(async move {
            let mut last: Option<(u64, u64, Instant)> = None;
            loop {
                tokio::time::sleep(TICK).await;
                let Some(s) = weak.upgrade() else { return };
                if lock(&s.record).finished {
                    return;
                }
                let w = s.interposer.counters.bytes_written.load(Ordering::Relaxed);
                let c = s.copier.stats.bytes_total();
                if let Some((lw, lc, t)) = last {
                    let dt = t.elapsed().as_secs_f64().max(1e-3);
                    s.write_rate
                        .store(((w - lw) as f64 / dt).to_bits(), Ordering::Relaxed);
                    s.copy_rate
                        .store(((c - lc) as f64 / dt).to_bits(), Ordering::Relaxed);
                }
                last = Some((w, c, Instant::now()));
            }
        })
    }

    fn save(&self) -> Result<()> {
        self.state.save(&lock(&self.record))
    }

    pub fn record(&self) -> SlaveRecord {
        lock(&self.record).clone()
    }

    pub fn session_id(&self) -> String {
        lock(&self.record).session_id.clone()
    }

    /// Records a newer master epoch; refuses an older one.
    pub fn fence(&self, epoch: u64) -> Result<(), u64> {
        let mut r = lock(&self.record);
        if epoch < r.epoch {
            return Err(r.epoch);
        }
        if epoch > r.epoch {
            r.epoch = epoch;
            drop(r);
            let _ = self.save();
        }
        Ok(())
    }

    /// Bytes copied by this agent process (all passes).
    pub fn copied(&self) -> u64 {
        self.copier.stats.bytes_total()
    }

    /// (workload write rate, copy rate), bytes/s.
    pub fn rates(&self) -> (f64, f64) {
        (
            f64::from_bits(self.write_rate.load(Ordering::Relaxed)),
            f64::from_bits(self.copy_rate.load(Ordering::Relaxed)),
        )
    }

    pub fn is_finished(&self) -> bool {
        lock(&self.record).finished
    }

    pub async fn state(&self) -> SessionState {
        let r = self.record();
        SessionState {
            session: r.session_id,
            volume: r.volume,
            epoch: r.epoch,
            size: r.size,
            source: r.source,
            target: r.target,
            attached: !r.finished,
            mirror: r.mirror,
            quiesced: self.interposer.gate().is_held().await,
            redirected: r.redirected,
            dirty_bytes: if r.finished {
                0
            } else {
                self.link.dirty.dirty_bytes()
            },
            bytes_copied: self.copier.stats.bytes_total(),
            finished: r.finished,
            copy_rate: f64::from_bits(self.copy_rate.load(Ordering::Relaxed)),
            write_rate: f64::from_bits(self.write_rate.load(Ordering::Relaxed)),
            resumes: r.resumes,
        }
    }

    fn require_active(&self, op: &str) -> Result<()> {
        if self.is_finished() {
            return Err(AgentError::Transition(format!(
                "{op}: the session has ended"
            )));
        }
        Ok(())
    }

    /// Refuses `op` unless this session has the role it needs: the copying
    /// agent's (`monitor_only` false) or a multi-attach secondary's.
    fn require_role(&self, op: &str, monitor_only: bool) -> Result<()> {
        match (lock(&self.record).monitor_only, monitor_only) {
            (true, false) => Err(AgentError::Invalid(format!(
                "{op}: this agent only monitors the volume (multi-attach secondary); the copying agent copies"
            ))),
            (false, true) => Err(AgentError::Invalid(format!(
                "{op}: this agent copies the volume; only monitor-only sessions hand over dirty grains"
            ))),
            _ => Ok(()),
        }
    }

    /// Monitor-only sessions: hands the grains dirtied since the last call
    /// (and any batch not acknowledged yet) to the master. `ack` is the
    /// batch the master merged into the copying agent; only then are those
    /// grains forgotten here.
    pub fn take_dirty(&self, ack: u64) -> Result<DirtyBatch> {
        self.require_active("take_dirty")?;
        self.require_role("take_dirty", true)?;
        let (size, grain) = {
            let r = lock(&self.record);
            (r.size, r.config.grain)
        };
        let mut sh = lock(&self.shipped);
        if sh.words.len() != self.link.dirty.word_count() {
            sh.words = vec![0; self.link.dirty.word_count()];
        }
        if ack != 0 && ack == sh.batch {
            sh.words.iter_mut().for_each(|w| *w = 0);
        }
        self.link.dirty.take_into(&mut sh.words);
        sh.batch += 1;
        let grains: u64 = sh.words.iter().map(|w| w.count_ones() as u64).sum();
        Ok(DirtyBatch {
            batch: sh.batch,
            grain,
            size,
            runs: word_runs(&sh.words),
            dirty_bytes: (grains * grain).min(size),
        })
    }

    /// The copying agent: marks grains another agent's workload dirtied.
    pub fn merge_dirty(&self, grain: u64, size: u64, runs: &[DirtyRun]) -> Result<()> {
        self.require_active("merge_dirty")?;
        self.require_role("merge_dirty", false)?;
        let r = lock(&self.record);
        if r.config.grain != grain || r.size != size {
            return Err(AgentError::Invalid(format!(
                "merge_dirty: a map of {size} B in {grain} B grains does not match this session's {} B in {} B grains",
                r.size, r.config.grain
            )));
        }
        if r.redirected {
            return Err(AgentError::Transition(
                "merge_dirty: already redirected".into(),
            ));
        }
        drop(r);
        for run in runs {
            self.link.dirty.merge_words(run.first_word, &run.words);
        }
        Ok(())
    }

    /// Continues the current pass for at most `slice` (None: to its end).
    /// At the end of a pass the target is flushed, while the workload runs,
    /// so the flush inside the cutover window only covers the residue.
    pub async fn copy_pass(&self, slice: Option<Duration>) -> Result<PassResult> {
        self.require_active("copy")?;
        self.require_role("copy", false)?;
        if lock(&self.record).redirected {
            return Err(AgentError::Transition("copy: already redirected".into()));
        }
        let cur = *lock(&self.cursor);
        let deadline = slice.map(|d| Instant::now() + d);
        let r = self
            .copier
            .run_slice(cur.next, deadline, &self.stop)
            .await?;
        let mut c = PassCursor {
            next: r.next.unwrap_or(0),
            bytes: cur.bytes + r.bytes,
            data_bytes: cur.data_bytes + r.data_bytes,
            elapsed: cur.elapsed + r.elapsed,
        };
        let complete = r.next.is_none() && !r.stopped;
        if complete {
            self.copier.set_dest_known_zero(false);
            let t = Instant::now();
            let tgt = self.link.target.clone();
            run_blocking(move || tgt.flush()).await?;
            c.elapsed += t.elapsed();
        }
        *lock(&self.cursor) = if complete { PassCursor::default() } else { c };
        // The cursor: where the next dirty run not yet handled starts.
        let walked = r.next.unwrap_or_else(|| self.link.dirty.size());
        Ok(PassResult {
            walked,
            redirtied_bytes: self.link.dirty.dirty_bytes_in(0, walked),
            complete,
            bytes: c.bytes,
            data_bytes: c.data_bytes,
            elapsed: c.elapsed,
            dirty_bytes: self.link.dirty.dirty_bytes(),
            stopped: r.stopped,
        })
    }

    /// Mirror mode on or off (before redirect). Safe at any moment: see the
    /// ordering argument in `interposer`.
    pub fn set_mirror(&self, on: bool) -> Result<()> {
        self.require_active("set_mirror")?;
        self.require_role("set_mirror", false)?;
        let mut r = lock(&self.record);
        if r.redirected {
            return Err(AgentError::Transition(
                "set_mirror: already redirected".into(),
            ));
        }
        self.link.set_mode(if on {
            WriteMode::Mirror
        } else {
            WriteMode::Track
        });
        if r.mirror != on {
            r.mirror = on;
            drop(r);
            self.save()?;
        }
        Ok(())
    }

    pub fn set_bandwidth(&self, bytes_per_sec: u64) -> Result<()> {
        self.copier.throttle.set_rate(bytes_per_sec);
        let mut r = lock(&self.record);
        if r.config.bandwidth != bytes_per_sec {
            r.config.bandwidth = bytes_per_sec;
            drop(r);
            self.save()?;
        }
        Ok(())
    }

    /// Holds new I/O and drains in-flight I/O within `budget`. Idempotent.
    /// A lease releases it if the master does not follow up.
    pub async fn quiesce(self: &Arc<Self>, budget: Duration) -> Result<QuiesceResult> {
        self.require_active("quiesce")?;
        let t0 = Instant::now();
        if self.interposer.gate().hold(budget).await.is_err() {
            return Ok(QuiesceResult {
                quiesced: false,
                spent: t0.elapsed(),
                dirty_bytes: self.link.dirty.dirty_bytes(),
            });
        }
        lock(&self.quiesced_at).get_or_insert(t0);
        self.arm_lease();
        Ok(QuiesceResult {
            quiesced: true,
            spent: t0.elapsed(),
            dirty_bytes: self.link.dirty.dirty_bytes(),
        })
    }

    /// (Re)starts the quiesce lease: every step of the cutover renews it.
    fn arm_lease(self: &Arc<Self>) {
        let generation = self.quiesce_gen.fetch_add(1, Ordering::SeqCst) + 1;
        let lease = Duration::from_millis(self.lease_ms.load(Ordering::Relaxed));
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(lease).await;
            let Some(s) = weak.upgrade() else { return };
            if s.quiesce_gen.load(Ordering::SeqCst) == generation
                && s.interposer.gate().release().await
            {
                *lock(&s.quiesced_at) = None;
                warn!(volume = %s.interposer.name(), "quiesce lease expired (master gone?): workload I/O released");
            }
        });
    }

    /// Changes how long a quiesce waits for the master's next step before
    /// the agent releases the workload's I/O on its own.
    pub fn set_quiesce_lease(&self, lease: Duration) {
        self.lease_ms
            .store(lease.as_millis() as u64, Ordering::Relaxed);
    }

    fn disarm_lease(&self) {
        self.quiesce_gen.fetch_add(1, Ordering::SeqCst);
    }

    /// Releases held I/O without redirect (back to refresh). Idempotent.
    pub async fn release(&self) -> Result<()> {
        self.disarm_lease();
        if !lock(&self.record).redirected {
            self.interposer.gate().release().await;
            *lock(&self.quiesced_at) = None;
        }
        Ok(())
    }

    /// Copies the last dirty grains with I/O held, then flushes the target.
    pub async fn synchronize(self: &Arc<Self>) -> Result<()> {
        self.require_active("synchronize")?;
        if lock(&self.record).redirected {
            return Ok(());
        }
        if !self.interposer.gate().is_held().await {
            return Err(AgentError::Transition(
                "synchronize needs the volume quiesced".into(),
            ));
        }
        self.arm_lease();
        let never = AtomicBool::new(false);
        for _ in 0..3 {
            if self.link.dirty.is_empty() {
                break;
            }
            self.copier.run_pass(&never).await?;
        }
        if !self.link.dirty.is_empty() {
            return Err(AgentError::Task(format!(
                "{} bytes still dirty after synchronize with I/O held",
                self.link.dirty.dirty_bytes()
            )));
        }
        let tgt = self.link.target.clone();
        run_blocking(move || tgt.flush()).await?;
        *lock(&self.cursor) = PassCursor::default();
        Ok(())
    }

    /// Switches the active device to the target (mirror-back on), or back
    /// to the source while mirror-back kept it current. Idempotent.
    pub async fn redirect(self: &Arc<Self>, to_source: bool) -> Result<()> {
        self.require_active("redirect")?;
        let redirected = lock(&self.record).redirected;
        if redirected != to_source {
            return Ok(()); // already there
        }
        if !self.interposer.gate().is_held().await {
            return Err(AgentError::Transition(
                "redirect needs the volume quiesced".into(),
            ));
        }
        self.arm_lease();
        if to_source {
            if self.link.mode() != WriteMode::MirrorBack || !self.link.dirty.is_empty() {
                return Err(AgentError::Task(
                    "cannot redirect back: the source is not current".into(),
                ));
            }
            self.interposer.redirect(false, WriteMode::Track).await?;
        } else {
            if !self.link.dirty.is_empty() {
                return Err(AgentError::Transition(
                    "redirect: the target is not in sync (synchronize first)".into(),
                ));
            }
            self.interposer
                .redirect(true, WriteMode::MirrorBack)
                .await?;
        }
        lock(&self.record).redirected = !to_source;
        self.save()
    }

    /// Releases held I/O after redirect; returns the stall (quiesce to now)
    /// the first time. Idempotent.
    pub async fn resume(&self) -> Result<Option<Duration>> {
        self.disarm_lease();
        self.interposer.gate().release().await;
        Ok(lock(&self.quiesced_at).take().map(|t| t.elapsed()))
    }

    /// Verify (under range locks, mirror-back keeping both sides equal),
    /// wait the failback window, stop mirroring back, detach. Idempotent.
    pub async fn terminate(
        &self,
        verify: volmig_api::Verify,
        failback: Duration,
    ) -> Result<TerminateResult> {
        {
            let r = lock(&self.record);
            if r.finished {
                return Ok(TerminateResult {
                    verified: r.verified.unwrap_or(true),
                    mismatch_offset: r.mismatch_offset,
                });
            }
            if !r.redirected {
                return Err(AgentError::Transition(
                    "terminate: not redirected yet".into(),
                ));
            }
        }
        // Mirror-back writes cut short by a crash left grains dirty: bring
        // the source level with the target first (copy direction is target
        // to source now).
        let never = AtomicBool::new(false);
        for _ in 0..3 {
            if self.link.dirty.is_empty() {
                break;
            }
            self.copier.run_pass(&never).await?;
        }
        let verified = lock(&self.record).verified;
        if verify != volmig_api::Verify::None && verified.is_none() {
            let link = self.link.clone();
            let diff = run_blocking(move || verify_blocking(&link, verify)).await?;
            {
                let mut r = lock(&self.record);
                r.verified = Some(diff.is_none());
                r.mismatch_offset = diff;
            }
            self.save()?;
            if let Some(off) = diff {
                return Ok(TerminateResult {
                    verified: false,
                    mismatch_offset: Some(off),
                });
            }
        }
        if !failback.is_zero() {
            let stop = &self.stop;
            let t = Instant::now();
            while t.elapsed() < failback {
                if stop.load(Ordering::SeqCst) {
                    return Err(AgentError::Aborted(self.session_id()));
                }
                tokio::time::sleep(Duration::from_millis(20).min(failback)).await;
            }
        }
        self.link.set_mode(WriteMode::TargetOnly);
        self.interposer
            .detach(self.link.target.clone(), DRAIN)
            .await?;
        let _ = self.link.dirty.sync();
        let volume = {
            let mut r = lock(&self.record);
            r.finished = true;
            r.volume.clone()
        };
        self.save()?;
        self.state.remove_dirty_map(&volume);
        info!(%volume, "terminated: the workload runs on the target");
        Ok(TerminateResult {
            verified: true,
            mismatch_offset: None,
        })
    }

    /// Cuts a running pass short (abort is on its way).
    pub fn interrupt(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Puts the workload back on a complete device: the source before
    /// redirect; after redirect the source too while mirror-back kept it
    /// current, else it stays on the target (an error). Idempotent.
    pub async fn abort(&self) -> Result<()> {
        self.interrupt();
        self.disarm_lease();
        if self.is_finished() {
            return if lock(&self.record).redirected {
                Err(AgentError::Task(
                    "the session was terminated; the workload is on the target".into(),
                ))
            } else {
                Ok(())
            };
        }
        let volume = self.record().volume;
        let gate = self.interposer.gate();
        let redirected = lock(&self.record).redirected;
        if redirected {
            let not_current = || {
                AgentError::Task(
                    "cannot roll back: the source is not current; the workload stays on the target"
                        .into(),
                )
            };
            if self.link.mode() != WriteMode::MirrorBack {
                gate.release().await;
                return Err(not_current());
            }
            gate.hold(DRAIN)
                .await
                .map_err(|_| AgentError::Task("in-flight I/O did not drain for failback".into()))?;
            // Only now, with no write in flight: a mirrored write marks its
            // range dirty until the source has it too, so a look before the
            // drain mistook a write in progress for a source left behind.
            if !self.link.dirty.is_empty() {
                gate.release().await;
                return Err(not_current());
            }
            self.interposer.redirect(false, WriteMode::Track).await?;
            lock(&self.record).redirected = false;
        }
        self.link.set_mode(WriteMode::Track);
        self.interposer
            .detach(self.link.source.clone(), DRAIN)
            .await?;
        gate.release().await;
        *lock(&self.quiesced_at) = None;
        lock(&self.record).finished = true;
        self.save()?;
        self.state.remove_dirty_map(&volume);
        info!(%volume, "rolled back: the workload is on the source");
        Ok(())
    }
}
