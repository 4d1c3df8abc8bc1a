//! The phase driver: the master's main loop for one session. It asks a
//! [`Slave`] to perform each phase's step, turns the outcome into an
//! [`Event`], asks [`transition`] for the next phase and records it in one
//! place ([`Driver::apply`]), which also performs what the move implies on
//! the agent (the rollback when it goes to Aborted or Failed, the release
//! of a quiesce that goes back to refresh) and saves the record in the
//! [`SessionStore`]. Every phase change goes that way: steps, aborts,
//! failures, group rollbacks and the recovery moves after a restart.
//!
//! A master that dies anywhere can be started again: it recovers the
//! session's phase from the agent's state and continues; every step it
//! repeats is idempotent on the agent. Whether the cutover waits for other
//! sessions is the [`Cutover`] hook's business, not the driver's.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tracing::{info, warn};
use volmig_api::phase::{Event, Phase, Policy, Transition, transition};
use volmig_api::slave::{
    CopyPass, Fence, Prepare, Quiesce, Redirect, SessionState, SetBandwidth, SetMirror, Terminate,
};
use volmig_api::{ErrorKind, Slave, SlaveError, SlaveResult, fault};

use crate::bandwidth::BandwidthPool;
use crate::cutover::{Cutover, Gate, MidCutover, Solo};
use crate::error::{MasterError, Result};
use crate::group::{GroupCoord, InGroup};
use crate::record::SessionRecord;
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

/// Drives one session (see the module's documentation). `C` is how its
/// cutover is coordinated: on its own ([`Solo`]) or with a group.
pub struct Driver<S, St, C = Solo> {
    slave: S,
    store: St,
    key: String,
    cfg: DriverConfig,
    stop: Arc<StopSignal>,
    cutover: C,
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
    /// Ask the agent where the session really is before the next step (at
    /// start, and after the agent was unreachable or disagreed).
    must_recover: bool,
    last_save: Option<Instant>,
}

/// What a phase's step on the slave came to.
enum Outcome {
    Event(Event),
    /// Nothing to report (a pass cut short by an abort or a stop); go round
    /// again.
    Again,
}

impl<S: Slave, St: SessionStore> Driver<S, St, Solo> {
    /// A driver of the session recorded under `key`, cutting over on its
    /// own.
    pub fn new(slave: S, store: St, key: &str, cfg: DriverConfig, stop: Arc<StopSignal>) -> Self {
        Self {
            slave,
            store,
            key: key.to_string(),
            cfg,
            stop,
            cutover: Solo,
            pool: None,
        }
    }

    /// Makes this driver one member of a consistency group: it cuts over
    /// only together with the others (see [`crate::group`]).
    pub fn in_group(self, coord: Arc<GroupCoord>) -> Driver<S, St, InGroup> {
        let member = InGroup::new(coord, &self.key);
        self.with_cutover(member)
    }
}

impl<S: Slave, St: SessionStore, C: Cutover> Driver<S, St, C> {
    /// Coordinates this driver's cutover through `cutover`.
    pub fn with_cutover<C2: Cutover>(self, cutover: C2) -> Driver<S, St, C2> {
        Driver {
            slave: self.slave,
            store: self.store,
            key: self.key,
            cfg: self.cfg,
            stop: self.stop,
            cutover,
            pool: self.pool,
        }
    }

    /// Shares `pool`'s total bandwidth fairly with the other sessions in it
    /// (see [`crate::bandwidth`]); the session's own limit stays its cap.
    pub fn sharing(mut self, pool: Arc<BandwidthPool>) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Drives the session until it ends, or until stopped.
    pub async fn run(&self) -> Result<SessionRecord> {
        let result = self.drive().await;
        self.cutover.end(&result);
        result
    }

    /// The loop: each round either stops, recovers, rolls back or performs
    /// the phase's step, and hands the resulting event to [`Self::advance`].
    async fn drive(&self) -> Result<SessionRecord> {
        let mut rec = self.load().await?;
        let policy = rec.config.policy();
        let mut v = Volatile {
            must_recover: rec.phase != Phase::Activating,
            ..Volatile::default()
        };
        let _seat = PoolSeat(self.pool.as_deref(), &self.key);
        self.cutover.begin(rec.phase, rec.error.as_deref());
        loop {
            if rec.phase.is_terminal() {
                return Ok(rec);
            }
            if self.stop.is_stopped() {
                self.save(&mut rec).await?;
                return Ok(rec);
            }
            self.read_requests(&mut rec).await?;
            let event = if v.must_recover {
                self.recover(&mut rec, &mut v).await?
            } else if let Some(cause) = self.rollback_cause(&rec) {
                Some(cause)
            } else {
                self.push_bandwidth(&rec, &mut v).await;
                self.step(&mut rec, &mut v, &policy).await?
            };
            if let Some(event) = event {
                self.advance(&mut rec, &mut v, &policy, event).await?;
            }
        }
    }

    async fn load(&self) -> Result<SessionRecord> {
        let rec = self
            .store
            .load(&self.key)
            .await?
            .ok_or_else(|| MasterError::NoSession(self.key.clone()))?;
        self.check_epoch(&rec)?;
        Ok(rec)
    }

    fn fence(&self, rec: &SessionRecord) -> Fence {
        Fence {
            session: rec.session.clone(),
            volume: rec.volume.clone(),
            epoch: self.cfg.epoch,
        }
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
                        v.must_recover = true;
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
    async fn read_requests(&self, rec: &mut SessionRecord) -> Result<bool> {
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

    /// Asks the agent where the session really is (see [`recover`]); the
    /// move, if any, is a [`Event::Recovered`]. `None` when there is
    /// nothing to record, or the agent could not be asked (a later round
    /// asks again if it was unreachable).
    async fn recover(&self, rec: &mut SessionRecord, v: &mut Volatile) -> Result<Option<Event>> {
        v.must_recover = false;
        let st = match self.call(v, || self.slave.get_state(self.fence(rec))).await {
            Ok(s) => Some(s),
            Err(e) if e.is(ErrorKind::NotFound) => None,
            Err(e) if e.is(ErrorKind::Fenced) => return Err(MasterError::Deposed(e.to_string())),
            Err(e) if e.is_transient() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if let Some(st) = &st {
            Self::absorb(rec, st);
            v.pushed_mirror = st.mirror;
            rec.redirected = st.redirected;
        }
        let (mut to, mut why) = recover(rec.phase, st.as_ref());
        let mid_cutover = matches!(
            to,
            Phase::Quiescing | Phase::Synchronizing | Phase::Redirecting
        ) && !rec.redirected;
        if mid_cutover {
            match self.cutover.mid_cutover() {
                MidCutover::Continue => {}
                MidCutover::Fail(reason) => {
                    // The next round rolls back with the others.
                    self.cutover.fail(&reason);
                    return Ok(None);
                }
                MidCutover::Requiesce => {
                    let _ = self.slave.release(self.fence(rec)).await;
                    to = Phase::Refreshing;
                    why = "group members quiesce together: refresh and meet the others again";
                }
            }
        }
        Ok((to != rec.phase).then(|| Event::Recovered {
            to,
            why: why.to_string(),
        }))
    }

    /// An abort requested, or the others of the session's group failed.
    fn rollback_cause(&self, rec: &SessionRecord) -> Option<Event> {
        if rec.abort_requested {
            return Some(Event::AbortRequested);
        }
        self.cutover.failed().map(Event::GroupFailed)
    }

    /// Pushes the session's bandwidth (its share of the pool, if it shares
    /// one) to the agent when it changed.
    async fn push_bandwidth(&self, rec: &SessionRecord, v: &mut Volatile) {
        let bandwidth = match &self.pool {
            Some(p) => p.share(&self.key, rec.config.bandwidth),
            None => rec.config.bandwidth,
        };
        if v.pushed_bandwidth == Some(bandwidth) || rec.phase == Phase::Activating {
            return;
        }
        let req = SetBandwidth {
            fence: self.fence(rec),
            bytes_per_sec: bandwidth,
        };
        if self
            .call(v, || self.slave.set_bandwidth(req.clone()))
            .await
            .is_ok()
        {
            v.pushed_bandwidth = Some(bandwidth);
        }
    }

    /// Performs the phase's step once the cutover hook lets it, and says
    /// what came of it. `None`: nothing to record this round.
    async fn step(
        &self,
        rec: &mut SessionRecord,
        v: &mut Volatile,
        policy: &Policy,
    ) -> Result<Option<Event>> {
        if self.cutover.before(rec.phase, &self.stop).await != Gate::Go {
            // Stopped, or the group failed: the loop's top saves and
            // returns, or rolls back.
            return Ok(None);
        }
        let phase = rec.phase;
        fault::point(&format!("master:enter:{phase}"));
        let outcome = match self.perform(rec, v, policy).await {
            Ok(o) => o,
            Err(e) if e.is(ErrorKind::Fenced) => {
                return Err(MasterError::Deposed(e.to_string()));
            }
            Err(e) if e.is_transient() => {
                if self.stop.is_stopped() {
                    return Ok(None);
                }
                Outcome::Event(Event::Failed(format!(
                    "agent unreachable for {:?}: {e}",
                    self.cfg.unreachable_for
                )))
            }
            Err(e) if e.is(ErrorKind::WrongState) => {
                warn!(volume = %rec.volume, %phase, reason = %e, "agent is not where the record says; recovering");
                v.must_recover = true;
                Outcome::Again
            }
            // A step cut short by an abort is not a failure.
            Err(_) if self.read_requests(rec).await? => return Ok(None),
            Err(e) => Outcome::Event(Event::Failed(format!("{phase}: {e}"))),
        };
        match outcome {
            Outcome::Event(e) => {
                if !matches!(e, Event::SliceDone { .. }) {
                    fault::point(&format!("master:done:{phase}"));
                }
                Ok(Some(e))
            }
            Outcome::Again => {
                self.save_progress(rec, v).await?;
                Ok(None)
            }
        }
    }

    /// Takes `event` to the transition function (an event it refuses fails
    /// the session) and records where it leads.
    async fn advance(
        &self,
        rec: &mut SessionRecord,
        v: &mut Volatile,
        policy: &Policy,
        event: Event,
    ) -> Result<()> {
        let (event, t) = match transition(rec.phase, rec.progress, &event, policy) {
            Ok(t) => (event, t),
            Err(bad) => {
                let failed = Event::Failed(bad.to_string());
                let t = transition(rec.phase, rec.progress, &failed, policy)?;
                (failed, t)
            }
        };
        // A slice that changed nothing is progress, not a step.
        if matches!(event, Event::SliceDone { .. })
            && t.next == rec.phase
            && t.progress == rec.progress
        {
            return self.save_progress(rec, v).await;
        }
        let voted = match event {
            Event::Quiesced { .. } | Event::QuiesceTimedOut => {
                self.vote(rec, policy, event, t).await?
            }
            _ => Some((event, t)),
        };
        match voted {
            Some((event, t)) => self.apply(rec, v, policy, &event, t).await,
            // Stopped, or the group failed: next round.
            None => Ok(()),
        }
    }

    /// Quiesced: the cutover hook hears whether this session can cut over
    /// and may send it back to refresh (then the event is
    /// [`Event::Outvoted`]). `None`: stopped or failed meanwhile.
    async fn vote(
        &self,
        rec: &SessionRecord,
        policy: &Policy,
        event: Event,
        t: Transition,
    ) -> Result<Option<(Event, Transition)>> {
        let ready = t.next == Phase::Synchronizing;
        Ok(match self.cutover.quiesced(ready, &self.stop).await {
            Gate::Go => Some((event, t)),
            Gate::Retry if ready => {
                let t = transition(rec.phase, rec.progress, &Event::Outvoted, policy)?;
                Some((Event::Outvoted, t))
            }
            Gate::Retry => Some((event, t)),
            Gate::Hold => None,
        })
    }

    /// The one place a transition is recorded: performs what it implies on
    /// the agent, enters the new phase, logs and saves.
    async fn apply(
        &self,
        rec: &mut SessionRecord,
        v: &mut Volatile,
        policy: &Policy,
        event: &Event,
        t: Transition,
    ) -> Result<()> {
        let from = rec.phase;
        let Some(t) = self.carry_out(rec, v, policy, event, t).await? else {
            // Interrupted by a stop: the next driver decides again.
            return Ok(());
        };
        if t.next != from || t.next == Phase::Refreshing || t.progress.mirror != rec.progress.mirror
        {
            info!(volume = %rec.volume, session = %rec.session, %from, to = %t.next, why = %t.why, "phase");
        }
        rec.progress = t.progress;
        if t.next != from {
            rec.enter(t.next);
        }
        if let Some(error) = error_of(event, &t) {
            rec.error = Some(error);
        }
        self.save(rec).await?;
        v.last_save = Some(Instant::now());
        Ok(())
    }

    /// What a transition implies on the agent before it is recorded: a
    /// quiesce going back to refresh is released; a session going to
    /// Aborted or Failed is rolled back, and its group hears of it. A
    /// rollback that fails turns an abort into a failure. A recovery's move
    /// follows what the agent did already: nothing to do there. `None`: a
    /// stop interrupted the rollback; nothing is recorded.
    async fn carry_out(
        &self,
        rec: &mut SessionRecord,
        v: &mut Volatile,
        policy: &Policy,
        event: &Event,
        t: Transition,
    ) -> Result<Option<Transition>> {
        let ends = matches!(t.next, Phase::Aborted | Phase::Failed);
        if ends {
            self.cutover.fail(&t.why);
        }
        if matches!(event, Event::Recovered { .. }) {
            return Ok(Some(t));
        }
        if rec.phase == Phase::Quiescing && t.next == Phase::Refreshing {
            self.call(v, || self.slave.release(self.fence(rec))).await?;
        }
        if !ends {
            return Ok(Some(t));
        }
        if t.next == Phase::Failed {
            // The record (and so its master's report) carries the error;
            // a warning here would say it twice.
            info!(volume = %rec.volume, phase = %rec.phase, error = %t.why, "step failed; rolling back");
        }
        match self.call(v, || self.slave.abort(self.fence(rec))).await {
            // The record says where the workload ended up.
            Ok(st) => rec.redirected = st.redirected,
            Err(e) if e.is(ErrorKind::Fenced) => return Err(MasterError::Deposed(e.to_string())),
            Err(e) if e.is_transient() && self.stop.is_stopped() => return Ok(None),
            Err(e) if t.next == Phase::Aborted => {
                let failed = Event::RollbackFailed(e.to_string());
                return Ok(Some(transition(rec.phase, rec.progress, &failed, policy)?));
            }
            // Activation failed before the agent made the session: there
            // is nothing to roll back.
            Err(e) if e.is(ErrorKind::NotFound) && rec.phase == Phase::Activating => {}
            Err(e) => warn!(volume = %rec.volume, error = %e, "rollback incomplete"),
        }
        Ok(Some(t))
    }

    /// How long the next copy call may run. Auto mode's copy pass reports
    /// more often until it has decided on mirroring: the decision is worth
    /// most early (see `phase::after_slice`).
    fn slice_for(&self, rec: &SessionRecord, policy: &Policy) -> Duration {
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
            if let Ok(st) = self.slave.get_state(self.fence(rec)).await {
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
        policy: &Policy,
    ) -> SlaveResult<Outcome> {
        let event = match rec.phase {
            Phase::Activating => self.activate(rec, v).await?,
            Phase::Copying | Phase::Refreshing => return self.copy(rec, v, policy).await,
            Phase::Quiescing => self.quiesce(rec, v, policy).await?,
            Phase::Synchronizing => {
                self.call(v, || self.slave.synchronize(self.fence(rec)))
                    .await?;
                rec.dirty_bytes = 0;
                Event::Synchronized
            }
            Phase::Redirecting => {
                let req = Redirect {
                    fence: self.fence(rec),
                    to_source: false,
                };
                let st = self.call(v, || self.slave.redirect(req.clone())).await?;
                rec.redirected = st.redirected;
                Event::Redirected
            }
            Phase::Resuming => {
                let r = self.call(v, || self.slave.resume(self.fence(rec))).await?;
                if let Some(stall) = r.stall {
                    rec.cutover_stall_ms = Some(stall.as_secs_f64() * 1e3);
                }
                Event::Resumed
            }
            Phase::Terminating => self.terminate(rec, v).await?,
            Phase::Completed | Phase::Aborted | Phase::Failed => return Ok(Outcome::Again),
        };
        Ok(Outcome::Event(event))
    }

    /// Activating: the agent opens the target and starts the monitor.
    async fn activate(&self, rec: &mut SessionRecord, v: &mut Volatile) -> SlaveResult<Event> {
        let req = Prepare {
            fence: self.fence(rec),
            target: rec.target.clone(),
            config: rec.config.clone(),
            monitor_only: false,
        };
        let st = self.call(v, || self.slave.prepare(req.clone())).await?;
        rec.size = st.size;
        rec.source = st.source.clone();
        Self::absorb(rec, &st);
        Ok(Event::Activated)
    }

    /// Copying or Refreshing: one slice of a pass (mirroring first, if the
    /// session mirrors and the agent does not know yet).
    async fn copy(
        &self,
        rec: &mut SessionRecord,
        v: &mut Volatile,
        policy: &Policy,
    ) -> SlaveResult<Outcome> {
        if rec.progress.mirror && !v.pushed_mirror {
            let req = SetMirror {
                fence: self.fence(rec),
                on: true,
            };
            self.call(v, || self.slave.set_mirror(req.clone())).await?;
            v.pushed_mirror = true;
        }
        let req = CopyPass {
            fence: self.fence(rec),
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
        // Small passes are latency bound: keep the estimate of a real one.
        // The data rate, flush included, is what the residue costs at
        // cutover (holes are nearly free).
        if r.data_bytes >= 4 << 20 || rec.copy_rate == 0.0 {
            let rate = r.data_bytes as f64 / secs;
            rec.copy_rate = if rec.copy_rate == 0.0 {
                rate
            } else {
                0.5 * rec.copy_rate + 0.5 * rate
            };
        }
        Ok(Outcome::Event(Event::PassDone {
            dirty_bytes: r.dirty_bytes,
            copy_rate: rec.copy_rate,
        }))
    }

    /// Quiescing: hold the workload's I/O within the budget (the sync goal,
    /// or a longer drain when the cutover is forced).
    async fn quiesce(
        &self,
        rec: &mut SessionRecord,
        v: &mut Volatile,
        policy: &Policy,
    ) -> SlaveResult<Event> {
        let budget = if rec.progress.converged {
            policy.sync_goal / 2
        } else {
            self.cfg.forced_drain
        };
        let req = Quiesce {
            fence: self.fence(rec),
            budget,
        };
        let q = self.call(v, || self.slave.quiesce(req.clone())).await?;
        if !q.quiesced {
            return Ok(Event::QuiesceTimedOut);
        }
        rec.dirty_bytes = q.dirty_bytes;
        Ok(Event::Quiesced {
            dirty_bytes: q.dirty_bytes,
            copy_rate: rec.copy_rate,
            spent: q.spent,
        })
    }

    /// Terminating: stop monitoring, verify, release the source; a target
    /// that does not verify fails the session.
    async fn terminate(&self, rec: &mut SessionRecord, v: &mut Volatile) -> SlaveResult<Event> {
        let req = Terminate {
            fence: self.fence(rec),
            verify: rec.config.verify,
            failback_window: rec.config.failback_window(),
        };
        let t = self
            .abortable(rec, self.call(v, || self.slave.terminate(req.clone())))
            .await?;
        rec.verified = Some(t.verified);
        Ok(match t.mismatch_offset {
            Some(off) => Event::Failed(format!(
                "verification failed: first difference at offset {off}"
            )),
            None => Event::Terminated,
        })
    }
}

impl<S: Slave, St: SessionStore, C: Cutover> Driver<S, St, C> {
    /// Runs a step that may take long (Termination's verification and
    /// failback window) while watching the record for an abort request:
    /// one interrupts the agent, whose abort cuts the step short and rolls
    /// back, so an abort is possible until Termination ends. The step's
    /// error then goes the usual way (the abort request wins).
    async fn abortable<T>(
        &self,
        rec: &SessionRecord,
        step: impl Future<Output = SlaveResult<T>>,
    ) -> SlaveResult<T> {
        let mut step = std::pin::pin!(step);
        loop {
            tokio::select! {
                r = &mut step => return r,
                _ = tokio::time::sleep(ABORT_WATCH) => {
                    let asked = matches!(
                        self.store.load(&self.key).await,
                        Ok(Some(fresh)) if fresh.abort_requested
                    );
                    if asked {
                        info!(volume = %rec.volume, phase = %rec.phase, "abort requested: interrupting the step");
                        let (r, _) = tokio::join!(&mut step, self.slave.abort(self.fence(rec)));
                        return r;
                    }
                }
            }
        }
    }
}

/// How often a long step looks for an abort request.
const ABORT_WATCH: Duration = Duration::from_millis(200);

/// The error a transition records: why the session failed, or the group
/// failure it was rolled back for (an abort someone asked for, or a
/// rollback the agent had done already, is no error).
fn error_of(event: &Event, t: &Transition) -> Option<String> {
    match (t.next, event) {
        (Phase::Failed, _) | (Phase::Aborted, Event::GroupFailed(_)) => Some(t.why.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
