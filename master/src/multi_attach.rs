//! Multi-attach volumes: one volume served by several agents at once (a
//! ReadWriteMany block volume, or one LUN on several hosts). One agent, the
//! *copying* agent, runs the session as usual; every other one runs a
//! monitor-only session on the same volume: it tracks its own workload's
//! writes and hands the dirty grains over (`TakeDirty`), which the master
//! merges into the copying agent's map (`MergeDirty`) before every copy
//! slice and before synchronize. At cutover every agent quiesces before the
//! copying one measures the residue, all redirect, all resume.
//!
//! [`MultiAttach`] is that fan-out behind the ordinary [`Slave`] contract,
//! so the phase driver, groups and the stores need not know: a volume with
//! no other agent is the copying agent alone.
//!
//! Safety of the hand-over: a secondary keeps the grains it handed over
//! until a later `TakeDirty` acknowledges their batch, which the master
//! only does after merging them; a master that dies in between gets them
//! again. The copy of a grain always starts after the merge that marked it,
//! so a write a secondary's workload made before the hand-over is on the
//! source when the copying agent reads it; one made after it dirties the
//! grain on the secondary again (its monitor marks after writing).
//!
//! Limit: a master that dies between redirecting some agents and the rest,
//! and stays away longer than the agents' quiesce lease, leaves agents
//! writing to different devices. Mirror-back keeps the source complete in
//! that case, and [`MultiAttach::get_state`] reports it as an error that
//! asks for an abort (which fails every agent back to the source).

use std::sync::Mutex;
use std::time::Instant;

use volmig_api::agent::{
    CopyPassRequest, DirtyBatch, MergeDirtyRequest, PassResult, PrepareRequest, QuiesceRequest,
    QuiesceResult, RedirectRequest, ResumeResult, SessionState, SetBandwidthRequest,
    SetMirrorRequest, Step, TakeDirtyRequest, TerminateRequest, TerminateResult, Verify,
};
use volmig_api::{Slave, SlaveError, SlaveResult};

/// Another agent serving the volume.
struct Secondary<S> {
    agent: String,
    slave: S,
    /// Where this agent's node sees the target, when not where the copying
    /// agent's does (in a cluster each node publishes the device under its
    /// own holder pod's directory).
    target: Option<String>,
    /// The last batch of its grains merged into the copying agent.
    merged: Mutex<u64>,
}

/// The copying agent and the secondaries of one volume, as one slave.
pub struct MultiAttach<S> {
    primary: S,
    secondaries: Vec<Secondary<S>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Holds a plain number: a panic elsewhere cannot leave it half-written.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Names the agent in a secondary's error.
fn on(agent: &str, e: SlaveError) -> SlaveError {
    match e {
        SlaveError::Failed(m) => SlaveError::Failed(format!("agent {agent}: {m}")),
        SlaveError::Invalid(m) => SlaveError::Invalid(format!("agent {agent}: {m}")),
        SlaveError::NotFound(m) => SlaveError::NotFound(format!("agent {agent}: {m}")),
        SlaveError::WrongState(m) => SlaveError::WrongState(format!("agent {agent}: {m}")),
        other => other,
    }
}

impl<S: Slave> MultiAttach<S> {
    /// The copying agent alone (an ordinary, single-attach volume).
    pub fn single(primary: S) -> Self {
        Self {
            primary,
            secondaries: Vec::new(),
        }
    }

    /// `secondaries`: (agent address for messages, its slave); every agent
    /// sees the target at the path the copying agent is given.
    pub fn new(primary: S, secondaries: Vec<(String, S)>) -> Self {
        Self::with_targets(
            primary,
            secondaries
                .into_iter()
                .map(|(agent, slave)| (agent, slave, None))
                .collect(),
        )
    }

    /// `secondaries`: (agent address, its slave, the target's path on its
    /// node when it differs from the copying agent's).
    pub fn with_targets(primary: S, secondaries: Vec<(String, S, Option<String>)>) -> Self {
        Self {
            primary,
            secondaries: secondaries
                .into_iter()
                .map(|(agent, slave, target)| Secondary {
                    agent,
                    slave,
                    target,
                    merged: Mutex::new(0),
                })
                .collect(),
        }
    }

    pub fn secondary_agents(&self) -> Vec<String> {
        self.secondaries.iter().map(|s| s.agent.clone()).collect()
    }

    /// Moves every secondary's dirty grains into the copying agent's map;
    /// the copying agent's state after the last merge, if any merged.
    async fn ship(
        &self,
        fence: &Option<volmig_api::agent::Fence>,
    ) -> SlaveResult<Option<SessionState>> {
        let mut merged = None;
        for s in &self.secondaries {
            let ack = *lock(&s.merged);
            let b = s
                .slave
                .take_dirty(TakeDirtyRequest {
                    fence: fence.clone(),
                    ack,
                })
                .await
                .map_err(|e| on(&s.agent, e))?;
            if !b.runs.is_empty() {
                merged = Some(
                    self.primary
                        .merge_dirty(MergeDirtyRequest {
                            fence: fence.clone(),
                            grain: b.grain,
                            size: b.size,
                            runs: b.runs,
                        })
                        .await?,
                );
            }
            *lock(&s.merged) = b.batch;
        }
        Ok(merged)
    }

    /// Releases the secondaries (after a quiesce that did not go through).
    async fn release_secondaries(&self, fence: &Option<volmig_api::agent::Fence>) {
        for s in &self.secondaries {
            let _ = s
                .slave
                .release(Step {
                    fence: fence.clone(),
                })
                .await;
        }
    }
}

impl<S: Slave> Slave for MultiAttach<S> {
    async fn prepare(&self, r: PrepareRequest) -> SlaveResult<SessionState> {
        // Secondaries first: their monitors must be attached before the
        // copying agent copies anything.
        for s in &self.secondaries {
            let mut req = r.clone();
            req.monitor_only = true;
            if let Some(t) = &s.target {
                req.target = t.clone();
            }
            s.slave.prepare(req).await.map_err(|e| on(&s.agent, e))?;
        }
        self.primary.prepare(r).await
    }

    async fn copy_pass(&self, r: CopyPassRequest) -> SlaveResult<PassResult> {
        let fence = r.fence.clone();
        self.ship(&fence).await?;
        let mut res = self.primary.copy_pass(r).await?;
        // What the other agents' workloads wrote meanwhile is residue too:
        // without it a pass would look converged and the quiesce, which
        // ships it, would find the residue over the goal every time.
        if !res.stopped
            && let Some(st) = self.ship(&fence).await?
        {
            res.dirty_bytes = res.dirty_bytes.max(st.dirty_bytes);
        }
        Ok(res)
    }

    async fn set_mirror(&self, r: SetMirrorRequest) -> SlaveResult<SessionState> {
        self.primary.set_mirror(r).await
    }

    async fn quiesce(&self, r: QuiesceRequest) -> SlaveResult<QuiesceResult> {
        let t0 = Instant::now();
        for s in &self.secondaries {
            let q = s
                .slave
                .quiesce(r.clone())
                .await
                .map_err(|e| on(&s.agent, e))?;
            if !q.quiesced {
                self.release_secondaries(&r.fence).await;
                return Ok(QuiesceResult {
                    quiesced: false,
                    spent_us: t0.elapsed().as_micros() as u64,
                    dirty_bytes: q.dirty_bytes,
                });
            }
        }
        // Every secondary's workload is held: what they wrote is final.
        if let Err(e) = self.ship(&r.fence).await {
            self.release_secondaries(&r.fence).await;
            return Err(e);
        }
        let q = match self.primary.quiesce(r.clone()).await {
            Ok(q) => q,
            Err(e) => {
                self.release_secondaries(&r.fence).await;
                return Err(e);
            }
        };
        if !q.quiesced {
            self.release_secondaries(&r.fence).await;
        }
        Ok(QuiesceResult {
            spent_us: (t0.elapsed().as_micros() as u64).max(q.spent_us),
            ..q
        })
    }

    async fn release(&self, r: Step) -> SlaveResult<SessionState> {
        self.release_secondaries(&r.fence).await;
        self.primary.release(r).await
    }

    async fn synchronize(&self, r: Step) -> SlaveResult<SessionState> {
        // Again, for a master that restarted between quiesce and here.
        self.ship(&r.fence).await?;
        let st = self.primary.synchronize(r.clone()).await?;
        for s in &self.secondaries {
            s.slave
                .synchronize(r.clone())
                .await
                .map_err(|e| on(&s.agent, e))?;
        }
        Ok(st)
    }

    async fn redirect(&self, r: RedirectRequest) -> SlaveResult<SessionState> {
        let mut st = self.primary.redirect(r.clone()).await?;
        for s in &self.secondaries {
            let ss = s
                .slave
                .redirect(r.clone())
                .await
                .map_err(|e| on(&s.agent, e))?;
            st.redirected &= ss.redirected;
        }
        Ok(st)
    }

    async fn resume(&self, r: Step) -> SlaveResult<ResumeResult> {
        let mut res = self.primary.resume(r.clone()).await?;
        for s in &self.secondaries {
            let x = s
                .slave
                .resume(r.clone())
                .await
                .map_err(|e| on(&s.agent, e))?;
            res.stall_us = res.stall_us.max(x.stall_us);
        }
        Ok(res)
    }

    async fn terminate(&self, r: TerminateRequest) -> SlaveResult<TerminateResult> {
        // The copying agent verifies (the data is one volume) while the
        // others still mirror back, so the source stays level with the
        // target for their writes too; then they stop and detach.
        let res = self.primary.terminate(r.clone()).await?;
        if res.mismatch_offset.is_some() {
            return Ok(res);
        }
        for s in &self.secondaries {
            let mut req = r.clone();
            req.verify = Verify::None as i32;
            s.slave.terminate(req).await.map_err(|e| on(&s.agent, e))?;
        }
        Ok(res)
    }

    async fn abort(&self, r: Step) -> SlaveResult<SessionState> {
        // Every agent, whatever the others answer; a secondary that never
        // got the session has nothing to roll back.
        let mut failed = Vec::new();
        for s in &self.secondaries {
            match s.slave.abort(r.clone()).await {
                Ok(_) | Err(SlaveError::NotFound(_)) => {}
                Err(e) => failed.push(format!("agent {}: {e}", s.agent)),
            }
        }
        let st = self.primary.abort(r).await?;
        if failed.is_empty() {
            Ok(st)
        } else {
            Err(SlaveError::Failed(format!(
                "rollback incomplete: {}",
                failed.join("; ")
            )))
        }
    }

    async fn set_bandwidth(&self, r: SetBandwidthRequest) -> SlaveResult<SessionState> {
        self.primary.set_bandwidth(r).await
    }

    /// The copying agent's state, where the cutover flags hold for every
    /// agent: attached, quiesced and redirected only when all are. A
    /// secondary without the session makes the whole session unknown.
    async fn get_state(&self, r: Step) -> SlaveResult<SessionState> {
        let mut st = self.primary.get_state(r.clone()).await?;
        let mut any_redirected = st.redirected;
        for s in &self.secondaries {
            let ss = s
                .slave
                .get_state(r.clone())
                .await
                .map_err(|e| on(&s.agent, e))?;
            st.attached &= ss.attached;
            st.quiesced &= ss.quiesced;
            st.finished &= ss.finished;
            any_redirected |= ss.redirected;
            st.redirected &= ss.redirected;
        }
        if any_redirected && !st.redirected && !st.quiesced && !st.finished {
            return Err(SlaveError::Failed(
                "the volume is redirected on some of its agents and not on others, and no longer quiesced: abort the session (every agent fails back to the source, which mirror-back kept complete)".into(),
            ));
        }
        Ok(st)
    }

    async fn take_dirty(&self, r: TakeDirtyRequest) -> SlaveResult<DirtyBatch> {
        self.primary.take_dirty(r).await
    }

    async fn merge_dirty(&self, r: MergeDirtyRequest) -> SlaveResult<SessionState> {
        self.primary.merge_dirty(r).await
    }
}
