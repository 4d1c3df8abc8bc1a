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

use volmig_api::slave::{
    CopyPass, DirtyBatch, Fence, ListVolumes, MergeDirty, PassResult, Prepare, Quiesce,
    QuiesceResult, Redirect, ResumeResult, ServeVolume, SessionState, SetBandwidth, SetMirror,
    TakeDirty, Terminate, TerminateResult, UnserveVolume, Unserved, VolumeInfo, VolumeList,
};
use volmig_api::{ErrorKind, Slave, SlaveError, SlaveResult, Verify};

/// Another agent serving the volume.
struct Secondary<S> {
    agent: String,
    slave: S,
    /// Where this agent's node sees the target, when not where the copying
    /// agent's does (in a cluster each node publishes the device under its
    /// own holder pod's directory).
    target: Option<std::path::PathBuf>,
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
    e.agent(agent)
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
    pub fn with_targets(
        primary: S,
        secondaries: Vec<(String, S, Option<std::path::PathBuf>)>,
    ) -> Self {
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
    async fn ship(&self, fence: &Fence) -> SlaveResult<Option<SessionState>> {
        let mut merged = None;
        for s in &self.secondaries {
            let ack = *lock(&s.merged);
            let b = s
                .slave
                .take_dirty(TakeDirty {
                    fence: fence.clone(),
                    ack,
                })
                .await
                .map_err(|e| on(&s.agent, e))?;
            if !b.runs.is_empty() {
                merged = Some(
                    self.primary
                        .merge_dirty(MergeDirty {
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
    async fn release_secondaries(&self, fence: &Fence) {
        for s in &self.secondaries {
            let _ = s.slave.release(fence.clone()).await;
        }
    }
}

impl<S: Slave> Slave for MultiAttach<S> {
    async fn prepare(&self, r: Prepare) -> SlaveResult<SessionState> {
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

    async fn copy_pass(&self, r: CopyPass) -> SlaveResult<PassResult> {
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

    async fn set_mirror(&self, r: SetMirror) -> SlaveResult<SessionState> {
        self.primary.set_mirror(r).await
    }

    async fn quiesce(&self, r: Quiesce) -> SlaveResult<QuiesceResult> {
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
                    spent: t0.elapsed(),
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
            spent: t0.elapsed().max(q.spent),
            ..q
        })
    }

    async fn release(&self, r: Fence) -> SlaveResult<SessionState> {
        self.release_secondaries(&r).await;
        self.primary.release(r).await
    }

    async fn synchronize(&self, r: Fence) -> SlaveResult<SessionState> {
        // Again, for a master that restarted between quiesce and here.
        self.ship(&r).await?;
        let st = self.primary.synchronize(r.clone()).await?;
        for s in &self.secondaries {
            s.slave
                .synchronize(r.clone())
                .await
                .map_err(|e| on(&s.agent, e))?;
        }
        Ok(st)
    }

    async fn redirect(&self, r: Redirect) -> SlaveResult<SessionState> {
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

    async fn resume(&self, r: Fence) -> SlaveResult<ResumeResult> {
        let mut res = self.primary.resume(r.clone()).await?;
        for s in &self.secondaries {
            let x = s
                .slave
                .resume(r.clone())
                .await
                .map_err(|e| on(&s.agent, e))?;
            res.stall = res.stall.max(x.stall);
        }
        Ok(res)
    }

    async fn terminate(&self, r: Terminate) -> SlaveResult<TerminateResult> {
        // The copying agent verifies (the data is one volume) while the
        // others still mirror back, so the source stays level with the
        // target for their writes too; then they stop and detach.
        let res = self.primary.terminate(r.clone()).await?;
        if res.mismatch_offset.is_some() {
            return Ok(res);
        }
        for s in &self.secondaries {
            let mut req = r.clone();
            req.verify = Verify::None;
            s.slave.terminate(req).await.map_err(|e| on(&s.agent, e))?;
        }
        Ok(res)
    }

    async fn abort(&self, r: Fence) -> SlaveResult<SessionState> {
        // Every agent, whatever the others answer; a secondary that never
        // got the session has nothing to roll back.
        let mut failed = Vec::new();
        for s in &self.secondaries {
            match s.slave.abort(r.clone()).await {
                Ok(_) => {}
                Err(e) if e.is(ErrorKind::NotFound) => {}
                Err(e) => failed.push(on(&s.agent, e).to_string()),
            }
        }
        let st = self.primary.abort(r).await?;
        if failed.is_empty() {
            Ok(st)
        } else {
            Err(
                SlaveError::failed(format!("rollback incomplete: {}", failed.join("; ")))
                    .op("abort"),
            )
        }
    }

    async fn set_bandwidth(&self, r: SetBandwidth) -> SlaveResult<SessionState> {
        self.primary.set_bandwidth(r).await
    }

    /// The copying agent's state, where the cutover flags hold for every
    /// agent: attached, quiesced and redirected only when all are. A
    /// secondary without the session makes the whole session unknown.
    async fn get_state(&self, r: Fence) -> SlaveResult<SessionState> {
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
            return Err(SlaveError::failed(
                "the volume is redirected on some of its agents and not on others, and no longer quiesced: abort the session (every agent fails back to the source, which mirror-back kept complete)",
            ));
        }
        Ok(st)
    }

    async fn take_dirty(&self, r: TakeDirty) -> SlaveResult<DirtyBatch> {
        self.primary.take_dirty(r).await
    }

    async fn merge_dirty(&self, r: MergeDirty) -> SlaveResult<SessionState> {
        self.primary.merge_dirty(r).await
    }

    // Serving is each agent's own business: these reach the copying agent.
    async fn serve_volume(&self, r: ServeVolume) -> SlaveResult<VolumeInfo> {
        self.primary.serve_volume(r).await
    }

    async fn unserve_volume(&self, r: UnserveVolume) -> SlaveResult<Unserved> {
        self.primary.unserve_volume(r).await
    }

    async fn list_volumes(&self, r: ListVolumes) -> SlaveResult<VolumeList> {
        self.primary.list_volumes(r).await
    }
}
