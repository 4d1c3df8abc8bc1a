//! The session driver: performs each phase's step on the interposer and the
//! copier, turns the outcome into an [`Event`], asks [`transition`] for the
//! next phase and persists the record. Every step is safe to repeat: a
//! restarted agent picks the session up from its record and dirty map.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use super::phase::{Event, Phase, transition};
use super::record::{SessionConfig, SessionRecord, StateDir};
use super::verify::{mismatch, verify_blocking};
use crate::copy::{Copier, Throttle};
use crate::error::{AgentError, Result};
use crate::interposer::{Interposer, Link, WriteMode};
use crate::monitor::{DirtyMap, MapOrigin};
use crate::volume::{BackingDevice, OpenMode};

/// How long attach/detach/abort may wait for in-flight I/O to drain.
const DRAIN: Duration = Duration::from_secs(30);
/// How often progress is sampled and the record saved while copying.
const TICK: Duration = Duration::from_millis(500);

/// A live view of a session, for status calls and progress bars.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionStatus {
    pub record: SessionRecord,
    pub dirty_bytes: u64,
    /// Bytes copied since this agent process took the session up.
    pub copied_this_run: u64,
    /// Workload write rate, bytes/s.
    pub write_rate: f64,
    /// Current copy rate, bytes/s.
    pub copy_rate: f64,
    pub bandwidth: u64,
}

pub struct Session {
    interposer: Arc<Interposer>,
    state: StateDir,
    record: Mutex<SessionRecord>,
    link: Arc<Link>,
    copier: Copier,
    base_copied: u64,
    stop: AtomicBool,
    abort: AtomicBool,
    wake: Notify,
    quiesced_at: Mutex<Option<Instant>>,
    write_rate: AtomicU64,
    live_copy_rate: AtomicU64,
    changes: watch::Sender<Phase>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned record only means a panic elsewhere; the data is whole
    // (every update is a plain assignment), so keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Session {
    /// Activation: validates source and target, creates the dirty map with
    /// every grain dirty and attaches the monitor before any byte is copied.
    pub async fn activate(
        interposer: Arc<Interposer>,
        state: StateDir,
        target_path: &std::path::Path,
        config: SessionConfig,
    ) -> Result<Arc<Self>> {
        if let Some(l) = interposer.link() {
            return Err(AgentError::SessionExists {
                volume: interposer.name().to_string(),
                session: l.target.name(),
            });
        }
        let source = interposer.active();
        let target = open_target(&source, target_path)?;
        let mut record = SessionRecord::new(
            interposer.name(),
            source.path(),
            target.path(),
            source.size(),
            config,
        );
        config_check(&record.config)?;
        state.save(&record)?;
        let (dirty, _) = DirtyMap::open_file(
            &state.dirty_map_path(&record.volume),
            record.size,
            record.config.grain,
            false,
        )?;
        let fresh_zero = target.is_fully_unallocated().unwrap_or(false);
        let mode = if record.config.mode == super::CopyMode::Mirror {
            WriteMode::Mirror
        } else {
            WriteMode::Track
        };
        let link = Arc::new(Link::new(source, Arc::new(target), Arc::new(dirty), mode));
        let session = Self::build(interposer.clone(), state, record.clone(), link.clone(), 0)?;
        session.copier.set_dest_known_zero(fresh_zero);
        interposer.attach(link, DRAIN).await?;
        let t = transition(
            record.phase,
            record.progress,
            &Event::Activated,
            &record.config.policy(),
        )
        .map_err(|e| AgentError::Transition(e.to_string()))?;
        record.progress = t.progress;
        session.commit(|r| {
            r.progress = t.progress;
            r.enter(t.next);
        })?;
        info!(volume = %record.volume, session = %record.session, target = %target_path.display(), "activated");
        Ok(session)
    }

    /// Picks up a persisted, unfinished session after an agent restart.
    /// `interposer` must serve the device the record says is active.
    pub async fn resume(
        interposer: Arc<Interposer>,
        state: StateDir,
        mut record: SessionRecord,
    ) -> Result<Arc<Self>> {
        let source = Arc::new(BackingDevice::open(
            &record.source,
            OpenMode::ReadWrite,
            false,
        )?);
        let target = Arc::new(BackingDevice::open(
            &record.target,
            OpenMode::ReadWrite,
            false,
        )?);
        let restart_activation = record.phase == Phase::Activating;
        let (dirty, origin) = DirtyMap::open_file(
            &state.dirty_map_path(&record.volume),
            record.size,
            record.config.grain,
            !restart_activation,
        )?;
        if let MapOrigin::Reset { reason } = &origin {
            warn!(volume = %record.volume, %reason, "checkpoint not trusted: copying everything again");
        }
        // Phases whose effect died with the old process fall back.
        let resume_phase = match record.phase {
            Phase::Activating => Phase::Copying,
            Phase::Quiescing | Phase::Synchronizing => Phase::Refreshing,
            Phase::Redirecting if !record.redirected => Phase::Refreshing,
            Phase::Redirecting => Phase::Resuming,
            p => p,
        };
        let mode = if record.redirected {
            WriteMode::MirrorBack
        } else if record.progress.mirror {
            WriteMode::Mirror
        } else {
            WriteMode::Track
        };
        let link = Arc::new(Link::new(source, target, Arc::new(dirty), mode));
        record.resumes += 1;
        let base = record.bytes_copied;
        let session = Self::build(
            interposer.clone(),
            state,
            record.clone(),
            link.clone(),
            base,
        )?;
        interposer.attach(link, DRAIN).await?;
        session.commit(|r| {
            r.resumes = record.resumes;
            if r.phase != resume_phase {
                r.enter(resume_phase);
            }
        })?;
        info!(volume = %record.volume, session = %record.session, phase = %resume_phase, ?origin, "resumed from checkpoint");
        Ok(session)
    }

    fn build(
        interposer: Arc<Interposer>,
        state: StateDir,
        record: SessionRecord,
        link: Arc<Link>,
        base: u64,
    ) -> Result<Arc<Self>> {
        let throttle = Arc::new(Throttle::new(record.config.bandwidth));
        let copier = Copier::new(link.clone(), record.config.copy(), throttle)?;
        let (changes, _) = watch::channel(record.phase);
        Ok(Arc::new(Self {
            interposer,
            state,
            record: Mutex::new(record),
            link,
            copier,
            base_copied: base,
            stop: AtomicBool::new(false),
            abort: AtomicBool::new(false),
            wake: Notify::new(),
            quiesced_at: Mutex::new(None),
            write_rate: AtomicU64::new(0),
            live_copy_rate: AtomicU64::new(0),
            changes,
        }))
    }

    pub fn volume(&self) -> String {
        lock(&self.record).volume.clone()
    }

    pub fn phase(&self) -> Phase {
        lock(&self.record).phase
    }

    /// Subscribe to phase changes.
    pub fn watch(&self) -> watch::Receiver<Phase> {
        self.changes.subscribe()
    }

    pub fn status(&self) -> SessionStatus {
        let mut record = lock(&self.record).clone();
        let copied = self.copier.stats.bytes_total();
        record.bytes_copied = self.base_copied + copied;
        SessionStatus {
            record,
            dirty_bytes: self.link.dirty.dirty_bytes(),
            copied_this_run: copied,
            write_rate: f64::from_bits(self.write_rate.load(Ordering::Relaxed)),
            copy_rate: f64::from_bits(self.live_copy_rate.load(Ordering::Relaxed)),
            bandwidth: self.copier.throttle.rate(),
        }
    }

    pub fn set_bandwidth(&self, bytes_per_sec: u64) -> Result<()> {
        self.copier.throttle.set_rate(bytes_per_sec);
        self.commit(|r| r.config.bandwidth = bytes_per_sec)
    }

    /// Asks the session to abort; it rolls back at its next step.
    pub fn request_abort(&self) -> Result<()> {
        let phase = self.phase();
        if phase.is_terminal() {
            return Err(AgentError::Transition(format!("session already {phase}")));
        }
        if phase == Phase::Terminating && self.link.mode() == WriteMode::TargetOnly {
            return Err(AgentError::Transition(
                "the failback window is over: the source is no longer current, abort is not possible".into(),
            ));
        }
        self.abort.store(true, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        self.wake.notify_waiters();
        self.commit(|r| r.abort_requested = true)
    }

    /// Stops driving (agent shutdown) without changing the session: the
    /// next agent resumes it from the checkpoint.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake.notify_waiters();
    }

    fn commit(&self, f: impl FnOnce(&mut SessionRecord)) -> Result<()> {
        let mut r = lock(&self.record);
        f(&mut r);
        r.bytes_copied = self.base_copied + self.copier.stats.bytes_total();
        self.state.save(&r)?;
        let _ = self.changes.send(r.phase);
        Ok(())
    }

    /// Drives the session to a terminal phase (or until `shutdown`).
    pub async fn run(self: Arc<Self>) -> Result<Phase> {
        let ticker = tokio::spawn(self.clone().tick());
        let out = self.drive().await;
        ticker.abort();
        out
    }

    async fn tick(self: Arc<Self>) {
        let mut last_w = self
            .interposer
            .counters
            .bytes_written
            .load(Ordering::Relaxed);
        let mut last_c = self.copier.stats.bytes_total();
        let mut last_t = Instant::now();
        loop {
            tokio::time::sleep(TICK).await;
            let w = self
                .interposer
                .counters
                .bytes_written
                .load(Ordering::Relaxed);
            let c = self.copier.stats.bytes_total();
            let dt = last_t.elapsed().as_secs_f64().max(1e-3);
            self.write_rate
                .store(((w - last_w) as f64 / dt).to_bits(), Ordering::Relaxed);
            self.live_copy_rate
                .store(((c - last_c) as f64 / dt).to_bits(), Ordering::Relaxed);
            (last_w, last_c, last_t) = (w, c, Instant::now());
            if let Err(e) = self.commit(|_| {}) {
                warn!(error = %e, "could not save session progress");
            }
        }
    }

    async fn drive(&self) -> Result<Phase> {
        let policy = lock(&self.record).config.policy();
        loop {
            let (phase, progress, volume) = {
                let r = lock(&self.record);
                (r.phase, r.progress, r.volume.clone())
            };
            if phase.is_terminal() {
                return Ok(phase);
            }
            if self.abort.load(Ordering::SeqCst) || lock(&self.record).abort_requested {
                self.rollback().await?;
                self.finish(Phase::Aborted, None)?;
                info!(%volume, "aborted; workload is on the source");
                continue;
            }
            if self.stop.load(Ordering::SeqCst) {
                return Ok(phase);
            }
            let event = match self.step(phase, &policy).await {
                Ok(Some(e)) => e,
                Ok(None) => continue,
                Err(e) => Event::Failed(e.to_string()),
            };
            if let Event::Failed(msg) = &event {
                warn!(%volume, %phase, error = %msg, "phase failed; rolling back");
                if let Err(e) = self.rollback().await {
                    warn!(%volume, error = %e, "rollback incomplete");
                }
                self.finish(Phase::Failed, Some(msg.clone()))?;
                continue;
            }
            let t = match transition(phase, progress, &event, &policy) {
                Ok(t) => t,
                Err(e) => {
                    self.rollback().await?;
                    self.finish(Phase::Failed, Some(e.to_string()))?;
                    continue;
                }
            };
            if phase == Phase::Quiescing && t.next == Phase::Refreshing {
                self.interposer.gate().release().await;
            }
            if t.progress.mirror && !progress.mirror && self.link.mode() == WriteMode::Track {
                self.link.set_mode(WriteMode::Mirror);
            }
            if t.next != phase || t.next == Phase::Refreshing {
                info!(%volume, from = %phase, to = %t.next, why = %t.why, "phase");
            }
            self.commit(|r| {
                r.progress = t.progress;
                if t.next != r.phase {
                    r.enter(t.next);
                }
            })?;
        }
    }

    /// Performs one step of `phase`. `Ok(None)`: nothing to report (stopped).
    async fn step(&self, phase: Phase, policy: &super::Policy) -> Result<Option<Event>> {
        match phase {
            Phase::Activating => Ok(Some(Event::Activated)),
            Phase::Copying | Phase::Refreshing => {
                let pass = self.copier.run_pass(&self.stop).await?;
                self.copier.set_dest_known_zero(false);
                if pass.stopped {
                    return Ok(None);
                }
                // Write the copied data back now, while the workload runs,
                // so the flush inside the cutover window only covers the
                // residue.
                let flush_start = Instant::now();
                let tgt = self.link.target.clone();
                run_blocking(move || tgt.flush()).await?;
                // The residue is data that must also be flushed at cutover:
                // estimate with the data rate, flush included (holes cost
                // next to nothing and would make the estimate optimistic).
                let secs = (pass.elapsed + flush_start.elapsed())
                    .as_secs_f64()
                    .max(1e-6);
                let rate = self.update_rate(pass.data_bytes, pass.data_bytes as f64 / secs);
                Ok(Some(Event::PassDone {
                    dirty_bytes: self.link.dirty.dirty_bytes(),
                    copy_rate: rate,
                }))
            }
            Phase::Quiescing => {
                let forced = !lock(&self.record).progress.converged;
                let budget = if forced { DRAIN } else { policy.sync_goal / 2 };
                let t0 = Instant::now();
                if self.interposer.gate().hold(budget).await.is_err() {
                    return Ok(Some(Event::QuiesceTimedOut));
                }
                // No source flush here: every FLUSH/FUA the workload asked
                // for already reached the source, and what it did not ask to
                // be durable becomes durable on the target in Synchronizing.
                *lock(&self.quiesced_at) = Some(t0);
                Ok(Some(Event::Quiesced {
                    dirty_bytes: self.link.dirty.dirty_bytes(),
                    copy_rate: lock(&self.record).copy_rate,
                    spent: t0.elapsed(),
                }))
            }
            Phase::Synchronizing => {
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
                Ok(Some(Event::Synchronized))
            }
            Phase::Redirecting => {
                if self.quiesced_at_missing() {
                    // Crash recovery lands here only with `redirected` set,
                    // mapped to Resuming; reaching it unquiesced is a bug.
                    return Err(AgentError::Transition("redirect without quiesce".into()));
                }
                self.interposer
                    .redirect(true, WriteMode::MirrorBack)
                    .await?;
                self.commit(|r| r.redirected = true)?;
                Ok(Some(Event::Redirected))
            }
            Phase::Resuming => {
                self.interposer.gate().release().await;
                let stall = lock(&self.quiesced_at).take().map(|t| t.elapsed());
                if let Some(stall) = stall {
                    self.commit(|r| r.cutover_stall_ms = Some(stall.as_secs_f64() * 1e3))?;
                }
                Ok(Some(Event::Resumed))
            }
            Phase::Terminating => self.terminate().await,
            Phase::Completed | Phase::Aborted | Phase::Failed => Ok(None),
        }
    }

    fn quiesced_at_missing(&self) -> bool {
        lock(&self.quiesced_at).is_none()
    }

    fn update_rate(&self, bytes: u64, rate: f64) -> f64 {
        let mut r = lock(&self.record);
        // Small passes are latency bound: keep the estimate of a real pass.
        if bytes >= 4 << 20 || r.copy_rate == 0.0 {
            r.copy_rate = if r.copy_rate == 0.0 {
                rate
            } else {
                0.5 * r.copy_rate + 0.5 * rate
            };
        }
        r.copy_rate
    }

    async fn terminate(&self) -> Result<Option<Event>> {
        let (verify, window, volume) = {
            let r = lock(&self.record);
            (
                r.config.verify,
                Duration::from_millis(r.config.failback_window_ms),
                r.volume.clone(),
            )
        };
        // Mirror-back writes cut short by a crash left grains dirty: bring
        // the source level with the target first (copy direction is
        // target -> source now).
        let never = AtomicBool::new(false);
        for _ in 0..3 {
            if self.link.dirty.is_empty() {
                break;
            }
            self.copier.run_pass(&never).await?;
        }
        if verify != super::Verify::None && lock(&self.record).verified.is_none() {
            let link = self.link.clone();
            let diff = run_blocking(move || verify_blocking(&link, verify)).await?;
            self.commit(|r| r.verified = Some(diff.is_none()))?;
            if let Some(off) = diff {
                return Err(mismatch(&volume, off));
            }
        }
        if !window.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(window) => {}
                _ = self.wake.notified() => return Ok(None),
            }
        }
        if self.stop.load(Ordering::SeqCst) {
            return Ok(None);
        }
        self.link.set_mode(WriteMode::TargetOnly);
        self.interposer
            .detach(self.link.target.clone(), DRAIN)
            .await?;
        let _ = self.link.dirty.sync();
        self.state.remove_dirty_map(&volume);
        Ok(Some(Event::Terminated))
    }

    /// Puts the workload back on a complete device: the source before
    /// redirect; after redirect the source too while mirror-back kept it
    /// current, else it stays on the target. Idempotent.
    async fn rollback(&self) -> Result<()> {
        let redirected = lock(&self.record).redirected;
        let gate = self.interposer.gate();
        if !redirected {
            self.link.set_mode(WriteMode::Track);
            self.interposer
                .detach(self.link.source.clone(), DRAIN)
                .await?;
            gate.release().await;
            self.state.remove_dirty_map(&self.volume());
            return Ok(());
        }
        if self.link.mode() == WriteMode::MirrorBack && self.link.dirty.is_empty() {
            gate.hold(DRAIN)
                .await
                .map_err(|_| AgentError::Task("in-flight I/O did not drain for failback".into()))?;
            self.interposer.redirect(false, WriteMode::Track).await?;
            self.commit(|r| r.redirected = false)?;
            self.interposer
                .detach(self.link.source.clone(), DRAIN)
                .await?;
            gate.release().await;
            self.state.remove_dirty_map(&self.volume());
            return Ok(());
        }
        // The source may be behind: the target is the complete device.
        gate.release().await;
        self.interposer
            .detach(self.link.target.clone(), DRAIN)
            .await?;
        Err(AgentError::Task(
            "cannot roll back: the source is not current; the workload stays on the target".into(),
        ))
    }

    fn finish(&self, phase: Phase, error: Option<String>) -> Result<()> {
        self.commit(|r| {
            if error.is_some() {
                r.error = error;
            }
            r.enter(phase);
        })
    }
}

fn open_target(source: &BackingDevice, path: &std::path::Path) -> Result<BackingDevice> {
    let target = BackingDevice::open(path, OpenMode::ReadWrite, false)?;
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

fn config_check(c: &SessionConfig) -> Result<()> {
    if c.sync_goal_ms == 0 {
        return Err(AgentError::Invalid("sync goal must be positive".into()));
    }
    if !c.grain.is_power_of_two() || c.grain < 4096 {
        return Err(AgentError::Invalid(format!(
            "granularity {} must be a power of two of at least 4096",
            c.grain
        )));
    }
    Ok(())
}

async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Task(e.to_string()))?
}
