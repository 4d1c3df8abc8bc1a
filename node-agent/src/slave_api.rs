//! The agent as a slave: the [`Slave`] contract over its volumes. Checks
//! every call's fence (session and epoch), runs one operation per volume at
//! a time (a concurrent one is `Busy`), and maps agent errors to the
//! contract's kinds. The gRPC service and the in-process master both come
//! through here.

use std::sync::Arc;
use std::time::Duration;

use volmig_api::agent::{
    CopyMode, CopyPassRequest, DirtyBatch, Fence, MergeDirtyRequest, PassResult, PrepareRequest,
    QuiesceRequest, QuiesceResult, RedirectRequest, ResumeResult, SessionState,
    SetBandwidthRequest, SetMirrorRequest, Step, TakeDirtyRequest, TerminateRequest,
    TerminateResult, Verify as WireVerify,
};
use volmig_api::{Slave, SlaveError, SlaveResult};
use volmig_master::Verify;

use crate::agent::{Agent, lock};
use crate::error::AgentError;
use crate::session::{SlaveConfig, SlaveSession};

impl From<AgentError> for SlaveError {
    fn from(e: AgentError) -> Self {
        let m = e.to_string();
        match e {
            AgentError::Open { .. }
            | AgentError::NotADevice { .. }
            | AgentError::ReadOnly { .. }
            | AgentError::TargetTooSmall { .. }
            | AgentError::SameDevice { .. }
            | AgentError::Invalid(_) => SlaveError::Invalid(m),
            AgentError::SessionExists { .. } => SlaveError::AlreadyExists(m),
            AgentError::UnknownVolume(_) | AgentError::NoSession(_) => SlaveError::NotFound(m),
            AgentError::Transition(_) => SlaveError::WrongState(m),
            _ => SlaveError::Failed(m),
        }
    }
}

fn fence_of(f: &Option<Fence>) -> SlaveResult<&Fence> {
    f.as_ref()
        .filter(|f| !f.volume.is_empty() && !f.session_id.is_empty())
        .ok_or_else(|| {
            SlaveError::Invalid("the call carries no fence (session, volume, epoch)".into())
        })
}

/// The operation lock of a volume, taken without waiting.
type OpGuard = tokio::sync::OwnedMutexGuard<()>;

impl Agent {
    /// The fenced session of a call, and (with `exclusive`) the volume's
    /// operation lock.
    fn session_for(
        &self,
        f: &Option<Fence>,
        exclusive: bool,
    ) -> SlaveResult<(Arc<SlaveSession>, Option<OpGuard>)> {
        let fence = fence_of(f)?;
        let (slave, op) = {
            let vols = lock(&self.volumes);
            let v = vols
                .get(&fence.volume)
                .ok_or_else(|| SlaveError::NotFound(format!("unknown volume {}", fence.volume)))?;
            (v.slave.clone(), v.op.clone())
        };
        let slave = slave
            .filter(|s| s.session_id() == fence.session_id)
            .ok_or_else(|| {
                SlaveError::NotFound(format!(
                    "no session {} on volume {}",
                    fence.session_id, fence.volume
                ))
            })?;
        slave.fence(fence.epoch).map_err(|newer| {
            SlaveError::Fenced(format!("epoch {} is older than {newer}", fence.epoch))
        })?;
        let guard = if exclusive {
            Some(op.try_lock_owned().map_err(|_| {
                SlaveError::Busy(format!(
                    "another operation is running on volume {}",
                    fence.volume
                ))
            })?)
        } else {
            None
        };
        Ok((slave, guard))
    }
}

impl Slave for Agent {
    async fn prepare(&self, r: PrepareRequest) -> SlaveResult<SessionState> {
        let fence = fence_of(&r.fence)?.clone();
        let cfg = r.config.unwrap_or_default();
        let (interposer, existing, op) = {
            let vols = lock(&self.volumes);
            let v = vols
                .get(&fence.volume)
                .ok_or_else(|| SlaveError::NotFound(format!("unknown volume {}", fence.volume)))?;
            (v.interposer.clone(), v.slave.clone(), v.op.clone())
        };
        let _guard = op.try_lock_owned().map_err(|_| {
            SlaveError::Busy(format!(
                "another operation is running on volume {}",
                fence.volume
            ))
        })?;
        if let Some(s) = existing {
            if s.session_id() == fence.session_id {
                s.fence(fence.epoch).map_err(|n| {
                    SlaveError::Fenced(format!("epoch {} is older than {n}", fence.epoch))
                })?;
                return Ok(s.state().await); // prepared already: idempotent
            }
            if !s.is_finished() {
                return Err(SlaveError::AlreadyExists(format!(
                    "volume {} already has a migration in progress (session {})",
                    fence.volume,
                    s.session_id()
                )));
            }
        }
        let defaults = SlaveConfig::default();
        let config = SlaveConfig {
            mirror_from_start: cfg.mode == CopyMode::Mirror as i32,
            bandwidth: cfg.bandwidth,
            grain: if cfg.grain == 0 {
                defaults.grain
            } else {
                cfg.grain
            },
            chunk_size: if cfg.chunk_size == 0 {
                defaults.chunk_size
            } else {
                cfg.chunk_size
            },
            in_flight: if cfg.in_flight == 0 {
                defaults.in_flight
            } else {
                cfg.in_flight as usize
            },
            sparse: cfg.sparse,
            monitor_only: r.monitor_only,
        };
        let s = SlaveSession::prepare(
            interposer,
            self.state().clone(),
            &fence.session_id,
            fence.epoch,
            std::path::Path::new(&r.target),
            config,
        )
        .await?;
        if let Some(v) = lock(&self.volumes).get_mut(&fence.volume) {
            v.slave = Some(s.clone());
        }
        Ok(s.state().await)
    }

    async fn copy_pass(&self, r: CopyPassRequest) -> SlaveResult<PassResult> {
        let (s, _g) = self.session_for(&r.fence, true)?;
        let slice = (r.slice_ms > 0).then(|| Duration::from_millis(r.slice_ms));
        Ok(s.copy_pass(slice).await?)
    }

    async fn set_mirror(&self, r: SetMirrorRequest) -> SlaveResult<SessionState> {
        let (s, _g) = self.session_for(&r.fence, false)?;
        s.set_mirror(r.on)?;
        Ok(s.state().await)
    }

    async fn quiesce(&self, r: QuiesceRequest) -> SlaveResult<QuiesceResult> {
        let (s, _g) = self.session_for(&r.fence, true)?;
        let q = s.quiesce(Duration::from_millis(r.budget_ms)).await?;
        volmig_master::fault::point("agent:done:quiesce");
        Ok(q)
    }

    async fn release(&self, r: Step) -> SlaveResult<SessionState> {
        let (s, _g) = self.session_for(&r.fence, true)?;
        s.release().await?;
        Ok(s.state().await)
    }

    async fn synchronize(&self, r: Step) -> SlaveResult<SessionState> {
        let (s, _g) = self.session_for(&r.fence, true)?;
        s.synchronize().await?;
        volmig_master::fault::point("agent:done:synchronize");
        Ok(s.state().await)
    }

    async fn redirect(&self, r: RedirectRequest) -> SlaveResult<SessionState> {
        let (s, _g) = self.session_for(&r.fence, true)?;
        s.redirect(r.to_source).await?;
        if let Some(d) = volmig_master::fault::delay("agent:done:redirect") {
            tokio::time::sleep(d).await;
        }
        volmig_master::fault::point("agent:done:redirect");
        Ok(s.state().await)
    }

    async fn resume(&self, r: Step) -> SlaveResult<ResumeResult> {
        let (s, _g) = self.session_for(&r.fence, true)?;
        let stall = s.resume().await?;
        Ok(ResumeResult {
            stall_us: stall.map(|d| d.as_micros() as u64).unwrap_or(0),
        })
    }

    async fn terminate(&self, r: TerminateRequest) -> SlaveResult<TerminateResult> {
        let (s, _g) = self.session_for(&r.fence, true)?;
        let verify = match WireVerify::try_from(r.verify).unwrap_or(WireVerify::Full) {
            WireVerify::None => Verify::None,
            WireVerify::Sample => Verify::Sample,
            WireVerify::Full | WireVerify::Unspecified => Verify::Full,
        };
        Ok(
            s.terminate(verify, Duration::from_millis(r.failback_window_ms))
                .await?,
        )
    }

    async fn abort(&self, r: Step) -> SlaveResult<SessionState> {
        let (s, _) = self.session_for(&r.fence, false)?;
        // Stop a running pass, then wait for the volume's operation.
        s.interrupt();
        let op = {
            let fence = fence_of(&r.fence)?;
            lock(&self.volumes).get(&fence.volume).map(|v| v.op.clone())
        };
        let _g = match op {
            Some(op) => Some(op.lock_owned().await),
            None => None,
        };
        s.abort().await?;
        Ok(s.state().await)
    }

    async fn set_bandwidth(&self, r: SetBandwidthRequest) -> SlaveResult<SessionState> {
        let (s, _) = self.session_for(&r.fence, false)?;
        s.set_bandwidth(r.bytes_per_sec)?;
        Ok(s.state().await)
    }

    async fn get_state(&self, r: Step) -> SlaveResult<SessionState> {
        let (s, _) = self.session_for(&r.fence, false)?;
        Ok(s.state().await)
    }

    async fn take_dirty(&self, r: TakeDirtyRequest) -> SlaveResult<DirtyBatch> {
        let (s, _) = self.session_for(&r.fence, false)?;
        Ok(s.take_dirty(r.ack)?)
    }

    async fn merge_dirty(&self, r: MergeDirtyRequest) -> SlaveResult<SessionState> {
        let (s, _) = self.session_for(&r.fence, false)?;
        s.merge_dirty(r.grain, r.size, &r.runs)?;
        Ok(s.state().await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use volmig_api::agent::SessionConfig as WireConfig;
    use volmig_api::io::VolumeIo;

    fn fence(epoch: u64) -> Option<Fence> {
        Some(Fence {
            session_id: "s1".into(),
            volume: "v".into(),
            epoch,
        })
    }

    async fn prepared() -> (
        tempfile::TempDir,
        Arc<Agent>,
        Arc<crate::interposer::Interposer>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        for f in ["src", "tgt"] {
            std::fs::File::create(dir.path().join(f))
                .unwrap()
                .set_len(4 << 20)
                .unwrap();
        }
        let agent = Agent::new(&dir.path().join("state")).unwrap();
        let ip = agent
            .add_volume("v", &dir.path().join("src"), false)
            .await
            .unwrap();
        let st = agent
            .prepare(PrepareRequest {
                fence: fence(2),
                target: dir.path().join("tgt").display().to_string(),
                config: Some(WireConfig {
                    grain: 65536,
                    chunk_size: 1 << 20,
                    in_flight: 2,
                    sparse: true,
                    ..WireConfig::default()
                }),
                monitor_only: false,
            })
            .await
            .unwrap();
        assert!(st.attached && !st.finished);
        (dir, agent, ip)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_monitor_only_session_hands_over_its_writes_until_acknowledged() {
        let (dir, primary, _) = prepared().await;
        // A second agent serving the same volume file.
        let second = Agent::new(&dir.path().join("state2")).unwrap();
        let ip2 = second
            .add_volume("v", &dir.path().join("src"), false)
            .await
            .unwrap();
        let prep = |monitor_only| PrepareRequest {
            fence: fence(2),
            target: dir.path().join("tgt").display().to_string(),
            config: Some(WireConfig {
                grain: 65536,
                ..WireConfig::default()
            }),
            monitor_only,
        };
        let st = second.prepare(prep(true)).await.unwrap();
        assert_eq!(st.dirty_bytes, 0, "a monitor starts with nothing dirty");
        let take = |ack| TakeDirtyRequest {
            fence: fence(2),
            ack,
        };
        ip2.write(3 << 16, vec![7u8; 4096], false).await.unwrap();
        ip2.write(40 << 16, vec![7u8; 4096], false).await.unwrap();
        let b1 = second.take_dirty(take(0)).await.unwrap();
        assert_eq!(b1.dirty_bytes, 2 << 16);
        assert_eq!((b1.grain, b1.size), (65536, 4 << 20));
        // Not acknowledged (a master that died before merging): handed
        // over again, with what was written since.
        ip2.write(50 << 16, vec![7u8; 4096], false).await.unwrap();
        let b2 = second.take_dirty(take(0)).await.unwrap();
        assert_eq!(b2.dirty_bytes, 3 << 16);
        assert!(b2.batch > b1.batch);
        // Merged into the copying agent's map, and acknowledged.
        let before = primary.get_state(Step { fence: fence(2) }).await.unwrap();
        primary
            .copy_pass(CopyPassRequest {
                fence: fence(2),
                slice_ms: 0,
            })
            .await
            .unwrap();
        let clean = primary.get_state(Step { fence: fence(2) }).await.unwrap();
        assert!(clean.dirty_bytes < before.dirty_bytes);
        let merged = primary
            .merge_dirty(MergeDirtyRequest {
                fence: fence(2),
                grain: b2.grain,
                size: b2.size,
                runs: b2.runs.clone(),
            })
            .await
            .unwrap();
        assert_eq!(merged.dirty_bytes, clean.dirty_bytes + (3 << 16));
        let b3 = second.take_dirty(take(b2.batch)).await.unwrap();
        assert_eq!(b3.dirty_bytes, 0, "acknowledged grains are forgotten");
        // A map of another shape is refused; the secondary never copies.
        let e = primary
            .merge_dirty(MergeDirtyRequest {
                fence: fence(2),
                grain: 4096,
                size: b2.size,
                runs: b2.runs,
            })
            .await
            .unwrap_err();
        assert!(matches!(e, SlaveError::Invalid(_)), "{e}");
        let e = second
            .copy_pass(CopyPassRequest {
                fence: fence(2),
                slice_ms: 0,
            })
            .await
            .unwrap_err();
        assert!(matches!(e, SlaveError::Invalid(_)), "{e}");
        let e = primary.take_dirty(take(0)).await.unwrap_err();
        assert!(matches!(e, SlaveError::Invalid(_)), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_quiesce_the_master_abandons_is_released_by_the_agent() {
        let (_dir, agent, ip) = prepared().await;
        agent
            .slave("v")
            .unwrap()
            .set_quiesce_lease(Duration::from_millis(300));
        let q = agent
            .quiesce(QuiesceRequest {
                fence: fence(2),
                budget_ms: 2000,
            })
            .await
            .unwrap();
        assert!(q.quiesced);
        let ip2 = ip.clone();
        let w = tokio::spawn(async move { ip2.write(0, vec![1u8; 4096], false).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !w.is_finished(),
            "the workload's write must wait while quiesced"
        );
        // no further call from the master: the lease releases the write
        tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .expect("the lease never released the I/O")
            .unwrap()
            .unwrap();
        let st = agent.get_state(Step { fence: fence(2) }).await.unwrap();
        assert!(!st.quiesced && !st.redirected);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stale_epochs_and_foreign_sessions_are_refused() {
        let (dir, agent, _ip) = prepared().await;
        let e = agent.get_state(Step { fence: fence(1) }).await.unwrap_err();
        assert!(matches!(e, SlaveError::Fenced(_)), "{e}");
        // a newer epoch takes over, after which the old one is refused too
        agent.get_state(Step { fence: fence(3) }).await.unwrap();
        let e = agent.get_state(Step { fence: fence(2) }).await.unwrap_err();
        assert!(matches!(e, SlaveError::Fenced(_)), "{e}");
        // another session on the same volume
        let other = Some(Fence {
            session_id: "s2".into(),
            volume: "v".into(),
            epoch: 9,
        });
        let e = agent
            .prepare(PrepareRequest {
                fence: other.clone(),
                target: dir.path().join("tgt").display().to_string(),
                config: None,
                monitor_only: false,
            })
            .await
            .unwrap_err();
        assert!(matches!(e, SlaveError::AlreadyExists(_)), "{e}");
        let e = agent.get_state(Step { fence: other }).await.unwrap_err();
        assert!(matches!(e, SlaveError::NotFound(_)), "{e}");
        // no fence at all
        let e = agent.get_state(Step { fence: None }).await.unwrap_err();
        assert!(matches!(e, SlaveError::Invalid(_)), "{e}");
    }
}
