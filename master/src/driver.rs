//! The phase driver: the master's main loop for one session. It asks a
//! [`Slave`] to perform each phase's step, turns the outcome into an
//! [`Event`], asks [`transition`] for the next phase and saves the record
//! in the [`SessionStore`] after every change. A master that dies anywhere
//! can be started again: it reconciles the record with the agent's state and
//! continues; every step it repeats is idempotent on the agent.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tracing::{info, warn};
use volmig_api::phase::{Event, Phase, transition};
use volmig_api::slave::{
    CopyPass, Fence, Prepare, Quiesce, Redirect, SessionState, SetBandwidth, SetMirror, Terminate,
};
use volmig_api::{ErrorKind, Slave, SlaveError, fault};

use crate::bandwidth::BandwidthPool;
use crate::error::{MasterError, Result};
use crate::group::{Barrier, GroupCoord, Verdict};
use crate::record::{SessionRecord, now_ms};
use crate::recovery::recover;
use crate::store::SessionStore;

/// How a driver behaves; defaults suit both local mode and the operator.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// The master's epoch, sent with every call (fencing).
    pub epoch: u64,
    /// Longest single copy call, so aborts and shutdowns are prompt.
    pub slice: Duration,
    /// Give up on an unreachable agent after this long (then fail safely).
    pub unreachable_for: Duration,
    /// How long quiesce may wait for in-flight I/O in a forced cutover.
    pub forced_drain: Duration,
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self {
            epoch: 1,
            slice: Duration::from_millis(500),
            unreachable_for: Duration::from_secs(300),
            forced_drain: Duration::from_secs(30),
        }
    }
}

/// Stops a driver between steps (the session itself goes on: another
/// driver, or this one started again, continues it).
#[derive(Debug, Default)]
pub struct StopSignal {
    flag: AtomicBool,
    notify: Notify,
}

impl StopSignal {
    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub fn is_stopped(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    pub(crate) async fn sleep(&self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.notify.notified() => {}
        }
    }
}

pub struct Driver<S, St> {
    slave: S,
    store: St,
    key: String,
    cfg: DriverConfig,
    stop: Arc<StopSignal>,
    group: Option<Arc<GroupCoord>>,
    pool: Option<Arc<BandwidthPool>>,
}

/// Leaves the bandwidth pool when the driver returns, however it returns.
struct PoolSeat<'a>(Option<&'a BandwidthPool>, &'a str);

impl Drop for PoolSeat<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            p.leave(self.1);
        }
    }
}

/// What the driver keeps between iterations but never persists.
#[derive(Default)]
struct Volatile {
    pass_seen: u64,
    pushed_bandwidth: Option<u64>,
    pushed_mirror: bool,
    need_reconcile: bool,
    last_save: Option<Instant>,
    /// The last group barrier passed in this round (groups only).
    passed: Option<Barrier>,
}

enum Outcome {
    Event(Event),
    /// Nothing to report (a pass cut short by an abort or a stop); go round
    /// again.
    Again,
}

impl<S: Slave, St: SessionStore> Driver<S, St> {
    pub fn new(slave: S, store: St, key: &str, cfg: DriverConfig, stop: Arc<StopSignal>) -> Self {
        Self {
            slave,
            store,
            key: key.to_string(),
            cfg,
            stop,
            group: None,
            pool: None,
        }
    }

    /// Shares `pool`'s total bandwidth fairly with the other sessions in it
    /// (see [`crate::bandwidth`]); the session's own limit stays its cap.
    pub fn sharing(mut self, pool: Arc<BandwidthPool>) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Makes this driver one member of a consistency group: it cuts over
    /// only together with the others (see [`crate::group`]).
    pub fn in_group(mut self, coord: Arc<GroupCoord>) -> Self {
        self.group = Some(coord);
        self
    }

    fn fence(&self, rec: &SessionRecord) -> Fence {
        Fence {
            session: rec.session.clone(),
            volume: rec.volume.clone(),
            epoch: self.cfg.epoch,
        }
    }

    /// A step that only names the session.
    fn step(&self, rec: &SessionRecord) -> Fence {
        self.fence(rec)
    }

    /// Calls the slave, retrying while it is unreachable or busy.
    async fn call<T, F, Fut>(&self, v: &mut Volatile, f: F) -> std::result::Result<T, SlaveError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, SlaveError>>,
    {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(50);
        loop {
            match f().await {
                Ok(t) => return Ok(t),
                Err(e) if e.is_transient() && start.elapsed() < self.cfg.unreachable_for => {
                    if e.is(ErrorKind::Unavailable) {
                        v.need_reconcile = true;
                    }
                    if self.stop.is_stopped() {
                        return Err(e);
                    }
                    warn!(volume = %self.key, error = %e, "agent call failed; retrying");
                    self.stop.sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Refuses to drive a record a newer master has taken over.
    fn check_epoch(&self, rec: &SessionRecord) -> Result<()> {
        if rec.epoch > self.cfg.epoch {
            return Err(MasterError::Deposed(format!(
                "{} is driven by epoch {}",
                self.key, rec.epoch
            )));
        }
        Ok(())
    }

    /// Takes from `fresh` the fields others may change (abort request,
    /// bandwidth limit); refuses when a newer epoch drives the session.
    fn merge_requests(&self, rec: &mut SessionRecord, fresh: &SessionRecord) -> Result<()> {
        self.check_epoch(fresh)?;
        rec.abort_requested |= fresh.abort_requested;
        rec.config.bandwidth = fresh.config.bandwidth;
        Ok(())
    }

    /// Saves, merging what others may have changed meanwhile (an abort
    /// request, a new bandwidth limit): those fields are theirs.
    async fn save(&self, rec: &mut SessionRecord) -> Result<()> {
        rec.epoch = self.cfg.epoch;
        for _ in 0..5 {
            match self.store.save(&self.key, rec).await {
                Ok(()) => return Ok(()),
                Err(MasterError::Conflict { .. }) => {
                    let fresh = self
                        .store
                        .load(&self.key)
                        .await?
                        .ok_or_else(|| MasterError::NoSession(self.key.clone()))?;
                    self.merge_requests(rec, &fresh)?;
                    rec.revision = fresh.revision;
                }
                Err(e) => return Err(e),
            }
        }
        Err(MasterError::Conflict {
            key: self.key.clone(),
            expected: rec.revision,
            found: 0,
        })
    }

    /// Takes in what others asked for since we last looked (abort, a new
    /// bandwidth limit). Returns true when an abort is requested.
    async fn refresh_requests(&self, rec: &mut SessionRecord) -> Result<bool> {
        if let Some(fresh) = self.store.load(&self.key).await?
            && fresh.revision != rec.revision
        {
            self.merge_requests(rec, &fresh)?;
        }
        Ok(rec.abort_requested)
    }

    fn absorb(rec: &mut SessionRecord, st: &SessionState) {
        rec.dirty_bytes = st.dirty_bytes;
        rec.write_rate = st.write_rate;
        rec.resumes = st.resumes;
        if rec.size == 0 {
            rec.size = st.size;
        }
    }

    /// Drives the session until it ends, or until stopped.
    pub async fn run(&self) -> Result<SessionRecord> {
        let mut rec = self
            .store
            .load(&self.key)
            .await?
            .ok_or_else(|| MasterError::NoSession(self.key.clone()))?;
        self.check_epoch(&rec)?;
        let policy = rec.config.policy();
        let mut v = Volatile {
            need_reconcile: rec.phase != Phase::Activating,
            ..Volatile::default()
        };
        let _seat = PoolSeat(self.pool.as_deref(), &self.key);
        if let Some(g) = &self.group {
            match rec.phase {
                Phase::Terminating | Phase::Completed => g.leave(&self.key),
                Phase::Aborted | Phase::Failed => g.fail(
                    &self.key,
                    rec.error
                        .as_deref()
                        .unwrap_or("ended before the group cut over"),
                ),
                _ => {}
            }
        }
        loop {
            if rec.phase.is_terminal() {
                return Ok(rec);
            }
            if self.stop.is_stopped() {
                self.save(&mut rec).await?;
                return Ok(rec);
            }
            self.refresh_requests(&mut rec).await?;
            if v.need_reconcile {
                v.need_reconcile = false;
                let st = match self
                    .call(&mut v, || self.slave.get_state(self.step(&rec)))
                    .await
                {
                    Ok(s) => Some(s),
                    Err(e) if e.is(ErrorKind::NotFound) => None,
                    Err(e) if e.is(ErrorKind::Fenced) => {
                        return Err(MasterError::Deposed(e.to_string()));
                    }
                    Err(e) if e.is_transient() => continue,
                    Err(e) => return Err(e.into()),
                };
                if let Some(st) = &st {
                    Self::absorb(&mut rec, st);
                    v.pushed_mirror = st.mirror;
                    rec.redirected = st.redirected;
                }
                let (mut phase, mut why) = recover(rec.phase, st.as_ref());
                if let Some(g) = &self.group
                    && matches!(
                        phase,
                        Phase::Quiescing | Phase::Synchronizing | Phase::Redirecting
                    )
                    && !rec.redirected
                {
                    if v.passed.is_some() {
                        // Mid-cutover in this very process: the agent lost
                        // its quiesce (restart, lease). The others may be
                        // quiesced and waiting; all roll back together.
                        g.fail(&self.key, "the agent lost its quiesce during the cutover");
                        continue;
                    }
                    // A restarted master: the group quiesces again, together.
                    let _ = self.slave.release(self.step(&rec)).await;
                    phase = Phase::Refreshing;
                    why = "group members quiesce together: refresh and meet the others again";
                }
                if phase != rec.phase {
                    info!(volume = %rec.volume, from = %rec.phase, to = %phase, why, "reconciled with the agent");
                    rec.enter(phase);
                    if phase == Phase::Failed {
                        rec.error = Some(why.to_string());
                    }
                    self.save(&mut rec).await?;
                }
                continue;
            }
            let group_failure = self
                .group
                .as_ref()
                .filter(|_| rec.phase != Phase::Terminating)
                .and_then(|g| {
                    if rec.abort_requested {
                        g.fail(&self.key, "abort requested");
                    }
                    g.failed()
                });
            if rec.abort_requested || group_failure.is_some() {
                let r = self
                    .call(&mut v, || self.slave.abort(self.step(&rec)))
                    .await;
                match r {
                    Ok(st) => {
                        rec.redirected = st.redirected;
                        rec.enter(Phase::Aborted);
                        if let Some(f) = group_failure.filter(|_| !rec.abort_requested) {
                            rec.error = Some(format!("rolled back with its group: {f}"));
                        }
                        info!(volume = %rec.volume, "aborted; the workload is on the source");
                    }
                    Err(e) if e.is(ErrorKind::Fenced) => {
                        return Err(MasterError::Deposed(e.to_string()));
                    }
                    Err(e) => {
                        rec.error = Some(format!("abort: {e}"));
                        rec.enter(Phase::Failed);
                    }
                }
                self.save(&mut rec).await?;
                continue;
            }
            let bandwidth = match &self.pool {
                Some(p) => p.share(&self.key, rec.config.bandwidth),
                None => rec.config.bandwidth,
            };
            if v.pushed_bandwidth != Some(bandwidth) && rec.phase != Phase::Activating {
                let req = SetBandwidth {
                    fence: self.fence(&rec),
                    bytes_per_sec: bandwidth,
                };
                if self
                    .call(&mut v, || self.slave.set_bandwidth(req.clone()))
                    .await
                    .is_ok()
                {
                    v.pushed_bandwidth = Some(bandwidth);
                }
            }
            if let Some(g) = &self.group {
                let due = match rec.phase {
                    Phase::Quiescing => Some(Barrier::Quiesce),
                    Phase::Redirecting => Some(Barrier::Synchronized),
                    Phase::Resuming => Some(Barrier::Redirected),
                    Phase::Terminating => Some(Barrier::Resumed),
                    _ => None,
                };
                if let Some(b) = due
                    && v.passed.is_none_or(|p| p < b)
                {
                    match g.arrive(&self.key, b, true, &self.stop).await {
                        Some(Verdict::Go) => {
                            v.passed = Some(b);
                            if b == Barrier::Resumed {
                                g.leave(&self.key);
                            }
                        }
                        // Stopped, or the group failed: the loop's top
                        // saves and returns, or rolls back.
                        _ => continue,
                    }
                }
            }
            let phase = rec.phase;
            fault::point(&format!("master:enter:{phase}"));
            let outcome = match self.perform(&mut rec, &mut v, &policy).await {
                Ok(o) => o,
                Err(e) if e.is(ErrorKind::Fenced) => {
                    return Err(MasterError::Deposed(e.to_string()));
                }
                Err(e) if e.is_transient() => {
                    if self.stop.is_stopped() {
                        continue;
                    }
                    Outcome::Event(Event::Failed(format!(
                        "agent unreachable for {:?}: {e}",
                        self.cfg.unreachable_for
                    )))
                }
                Err(e) if e.is(ErrorKind::WrongState) => {
                    warn!(volume = %rec.volume, %phase, reason = %e, "agent is not where the record says; recovering");
                    v.need_reconcile = true;
                    Outcome::Again
                }
                // A step cut short by an abort is not a failure.
                Err(_) if self.refresh_requests(&mut rec).await? => continue,
                Err(e) => Outcome::Event(Event::Failed(format!("{phase}: {e}"))),
            };
            let event = match outcome {
                Outcome::Event(e) => {
                    if !matches!(e, Event::SliceDone { .. }) {
                        fault::point(&format!("master:done:{phase}"));
                    }
                    e
                }
                Outcome::Again => {
                    self.save_progress(&mut rec, &mut v).await?;
                    continue;
                }
            };
            if let Event::Failed(msg) = &event {
                warn!(volume = %rec.volume, %phase, error = %msg, "step failed; rolling back");
                if let Some(g) = self.group.as_ref().filter(|_| phase != Phase::Terminating) {
                    g.fail(&self.key, msg);
                }
                match self
                    .call(&mut v, || self.slave.abort(self.step(&rec)))
                    .await
                {
                    // The record says where the workload ended up.
                    Ok(st) => rec.redirected = st.redirected,
                    Err(e) => warn!(volume = %rec.volume, error = %e, "rollback incomplete"),
                }
                rec.error = Some(msg.clone());
                rec.enter(Phase::Failed);
                self.save(&mut rec).await?;
                continue;
            }
            let mut t = match transition(phase, rec.progress, &event, &policy) {
                Ok(t) => t,
                Err(e) => {
                    rec.error = Some(e.to_string());
                    if let Some(g) = &self.group {
                        g.fail(&self.key, &e.to_string());
                    }
                    let _ = self
                        .call(&mut v, || self.slave.abort(self.step(&rec)))
                        .await;
                    rec.enter(Phase::Failed);
                    self.save(&mut rec).await?;
                    continue;
                }
            };
            // A slice that changed nothing is progress, not a step.
            if matches!(event, Event::SliceDone { .. })
                && t.next == phase
                && t.progress == rec.progress
            {
                self.save_progress(&mut rec, &mut v).await?;
                continue;
            }
            if phase == Phase::Quiescing
                && let Some(g) = &self.group
            {
                let vote = t.next == Phase::Synchronizing;
                match g
                    .arrive(&self.key, Barrier::Quiesced, vote, &self.stop)
                    .await
                {
                    Some(Verdict::Go) => v.passed = Some(Barrier::Quiesced),
                    Some(Verdict::Retry) => {
                        v.passed = None;
                        if vote {
                            t.next = Phase::Refreshing;
                            t.why = "another member of the group cannot cut over yet".into();
                        }
                    }
                    _ => continue,
                }
            }
            if phase == Phase::Quiescing && t.next == Phase::Refreshing {
                self.call(&mut v, || self.slave.release(self.step(&rec)))
                    .await?;
            }
            if t.next != phase
                || t.next == Phase::Refreshing
                || t.progress.mirror != rec.progress.mirror
            {
                info!(volume = %rec.volume, session = %rec.session, from = %phase, to = %t.next, why = %t.why, "phase");
            }
            rec.progress = t.progress;
            if t.next != rec.phase {
                rec.enter(t.next);
            }
            self.save(&mut rec).await?;
            v.last_save = Some(Instant::now());
        }
    }

    /// How long the next copy call may run. Auto mode's copy pass reports
    /// more often until it has decided on mirroring: the decision is worth
    /// most early (see `phase::after_slice`).
    fn slice_for(&self, rec: &SessionRecord, policy: &volmig_api::Policy) -> Duration {
        if rec.phase == Phase::Copying
            && policy.mode == volmig_api::CopyMode::Auto
            && !rec.progress.mirror
        {
            self.cfg.slice.min(Duration::from_millis(100))
        } else {
            self.cfg.slice
        }
    }

    /// Saves progress within a phase, at most once a second (a CR status
    /// write per copy slice would load the API server for nothing).
    async fn save_progress(&self, rec: &mut SessionRecord, v: &mut Volatile) -> Result<()> {
        if v.last_save
            .is_none_or(|t| t.elapsed() > Duration::from_secs(1))
        {
            if let Ok(st) = self.slave.get_state(self.step(rec)).await {
                Self::absorb(rec, &st);
            }
            self.save(rec).await?;
            v.last_save = Some(Instant::now());
        }
        Ok(())
    }

    /// One step of the record's phase on the slave.
    async fn perform(
        &self,
        rec: &mut SessionRecord,
        v: &mut Volatile,
        policy: &volmig_api::Policy,
    ) -> std::result::Result<Outcome, SlaveError> {
        let fence = self.fence(rec);
        Ok(Outcome::Event(match rec.phase {
            Phase::Activating => {
                let req = Prepare {
                    fence: fence.clone(),
                    target: rec.target.clone(),
                    config: rec.config.clone(),
                    monitor_only: false,
                };
                let st = self.call(v, || self.slave.prepare(req.clone())).await?;
                rec.size = st.size;
                rec.source = st.source.clone();
                Self::absorb(rec, &st);
                Event::Activated
            }
            Phase::Copying | Phase::Refreshing => {
                if rec.progress.mirror && !v.pushed_mirror {
                    let req = SetMirror {
                        fence: fence.clone(),
                        on: true,
                    };
                    self.call(v, || self.slave.set_mirror(req.clone())).await?;
                    v.pushed_mirror = true;
                }
                let req = CopyPass {
                    fence: fence.clone(),
                    slice: Some(self.slice_for(rec, policy)),
                };
                let r = self.call(v, || self.slave.copy_pass(req.clone())).await?;
                rec.bytes_copied += r.bytes.saturating_sub(v.pass_seen);
                v.pass_seen = if r.complete { 0 } else { r.bytes };
                rec.dirty_bytes = r.dirty_bytes;
                if r.stopped {
                    return Ok(Outcome::Again);
                }
                if !r.complete {
                    return Ok(Outcome::Event(Event::SliceDone {
                        walked: r.walked,
                        redirtied: r.redirtied_bytes,
                        size: rec.size,
                    }));
                }
                let secs = r.elapsed.as_secs_f64().max(1e-6);
                // Small passes are latency bound: keep the estimate of a
                // real one. The data rate, flush included, is what the
                // residue costs at cutover (holes are nearly free).
                if r.data_bytes >= 4 << 20 || rec.copy_rate == 0.0 {
                    let rate = r.data_bytes as f64 / secs;
                    rec.copy_rate = if rec.copy_rate == 0.0 {
                        rate
                    } else {
                        0.5 * rec.copy_rate + 0.5 * rate
                    };
                }
                Event::PassDone {
                    dirty_bytes: r.dirty_bytes,
                    copy_rate: rec.copy_rate,
                }
            }
            Phase::Quiescing => {
                let budget = if rec.progress.converged {
                    policy.sync_goal / 2
                } else {
                    self.cfg.forced_drain
                };
                let req = Quiesce {
                    fence: fence.clone(),
                    budget,
                };
                let q = self.call(v, || self.slave.quiesce(req.clone())).await?;
                if !q.quiesced {
                    Event::QuiesceTimedOut
                } else {
                    rec.dirty_bytes = q.dirty_bytes;
                    Event::Quiesced {
                        dirty_bytes: q.dirty_bytes,
                        copy_rate: rec.copy_rate,
                        spent: q.spent,
                    }
                }
            }
            Phase::Synchronizing => {
                self.call(v, || self.slave.synchronize(fence.clone()))
                    .await?;
                rec.dirty_bytes = 0;
                Event::Synchronized
            }
            Phase::Redirecting => {
                let req = Redirect {
                    fence: fence.clone(),
                    to_source: false,
                };
                let st = self.call(v, || self.slave.redirect(req.clone())).await?;
                rec.redirected = st.redirected;
                Event::Redirected
            }
            Phase::Resuming => {
                let r = self.call(v, || self.slave.resume(fence.clone())).await?;
                if let Some(stall) = r.stall {
                    rec.cutover_stall_ms = Some(stall.as_secs_f64() * 1e3);
                }
                Event::Resumed
            }
            Phase::Terminating => {
                let req = Terminate {
                    fence: fence.clone(),
                    verify: rec.config.verify,
                    failback_window: rec.config.failback_window(),
                };
                let t = self.call(v, || self.slave.terminate(req.clone())).await?;
                rec.verified = Some(t.verified);
                if let Some(off) = t.mismatch_offset {
                    Event::Failed(format!(
                        "verification failed: first difference at offset {off}"
                    ))
                } else {
                    Event::Terminated
                }
            }
            Phase::Completed | Phase::Aborted | Phase::Failed => return Ok(Outcome::Again),
        }))
    }
}

/// Creates a session's record (phase Activating) for a driver to run.
pub async fn create_session<St: SessionStore>(
    store: &St,
    volume: &str,
    target: &std::path::Path,
    config: crate::record::SessionConfig,
    epoch: u64,
) -> Result<SessionRecord> {
    config.validate().map_err(MasterError::Invalid)?;
    let mut rec = SessionRecord::new(volume, std::path::Path::new(""), target, 0, config);
    rec.epoch = epoch;
    if let Some(old) = store.load(volume).await? {
        if !old.phase.is_terminal() {
            return Err(MasterError::SessionExists {
                volume: volume.to_string(),
                session: old.session,
            });
        }
        rec.revision = old.revision;
    }
    rec.phase_times[0].start_ms = now_ms();
    store.save(volume, &mut rec).await?;
    Ok(rec)
}

/// Records an abort request; the driver acts on it at its next step.
pub async fn request_abort<St: SessionStore>(store: &St, volume: &str) -> Result<SessionRecord> {
    crate::store::update(store, volume, |rec| {
        if rec.phase.is_terminal() {
            return Err(MasterError::Invalid(format!(
                "session {} already {}",
                rec.session, rec.phase
            )));
        }
        rec.abort_requested = true;
        Ok(true)
    })
    .await
}

/// Changes a running session's bandwidth limit; the driver pushes it.
pub async fn set_bandwidth<St: SessionStore>(
    store: &St,
    volume: &str,
    bytes_per_sec: u64,
) -> Result<SessionRecord> {
    crate::store::update(store, volume, |rec| {
        rec.config.bandwidth = bytes_per_sec;
        Ok(true)
    })
    .await
}
