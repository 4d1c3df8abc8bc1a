//! The agent as a slave: the [`Slave`] contract over its volumes. Checks
//! every call's fence (session and epoch), runs one operation per volume at
//! a time (a concurrent one is `Busy`), and maps agent errors to the
//! contract's kinds, with the volume and session as context. The gRPC
//! service and in-process masters both come through here, and so do the
//! serving calls (`agent.rs` holds their logic).

use std::sync::Arc;

use volmig_api::fault;
use volmig_api::slave::{
    CopyPass, DirtyBatch, Fence, ListVolumes, MergeDirty, PassResult, Prepare, Quiesce,
    QuiesceResult, Redirect, ResumeResult, ServeVolume, SessionState, SetBandwidth, SetMirror,
    TakeDirty, Terminate, TerminateResult, UnserveVolume, Unserved, VolumeInfo, VolumeList,
};
use volmig_api::{ErrorKind, Slave, SlaveError, SlaveResult};
use volmig_frontends::block::BlockErrorKind;

use crate::agent::{Agent, lock};
use crate::error::AgentError;
use crate::session::SlaveSession;

impl From<AgentError> for SlaveError {
    fn from(e: AgentError) -> Self {
        let kind = match &e {
            AgentError::Open { .. }
            | AgentError::NotADevice { .. }
            | AgentError::ReadOnly { .. }
            | AgentError::Shrunk { .. }
            | AgentError::TargetTooSmall { .. }
            | AgentError::SameDevice { .. }
            | AgentError::Invalid(_) => ErrorKind::Invalid,
            AgentError::SessionExists { .. } | AgentError::AlreadyServed { .. } => {
                ErrorKind::AlreadyExists
            }
            AgentError::InUse { .. } => ErrorKind::InUse,
            AgentError::Block(b) => match b.kind() {
                BlockErrorKind::Busy => ErrorKind::InUse,
                BlockErrorKind::Unsupported | BlockErrorKind::InvalidArgument => ErrorKind::Invalid,
                BlockErrorKind::AlreadyAttached => ErrorKind::AlreadyExists,
                BlockErrorKind::NotAttached | BlockErrorKind::Gone => ErrorKind::NotFound,
                _ => ErrorKind::Failed,
            },
            AgentError::Busy(_) => ErrorKind::Busy,
            AgentError::UnknownVolume(_) | AgentError::NoSession(_) => ErrorKind::NotFound,
            AgentError::Transition(_) => ErrorKind::WrongState,
            _ => ErrorKind::Failed,
        };
        SlaveError::new(kind, e.to_string())
    }
}

/// The operation lock of a volume, taken without waiting.
type OpGuard = tokio::sync::OwnedMutexGuard<()>;

fn busy(volume: &str) -> SlaveError {
    SlaveError::new(
        ErrorKind::Busy,
        "another operation is running on this volume",
    )
    .volume(volume)
}

fn fenced(f: &Fence, newer: u64) -> SlaveError {
    SlaveError::new(
        ErrorKind::Fenced,
        format!("epoch {} is older than {newer}", f.epoch),
    )
    .volume(&f.volume)
    .session(&f.session)
}

/// Names the call's volume and session in an error.
fn within<T>(op: &'static str, f: &Fence, r: Result<T, AgentError>) -> SlaveResult<T> {
    r.map_err(|e| {
        SlaveError::from(e)
            .op(op)
            .volume(&f.volume)
            .session(&f.session)
    })
}

impl Agent {
    /// The fenced session of a call, and (with `exclusive`) the volume's
    /// operation lock.
    fn session_for(
        &self,
        fence: &Fence,
        exclusive: bool,
    ) -> SlaveResult<(Arc<SlaveSession>, Option<OpGuard>)> {
        let (slave, op) = {
            let vols = lock(&self.volumes);
            let v = vols.get(&fence.volume).ok_or_else(|| {
                SlaveError::not_found("unknown volume: this agent does not serve it")
                    .volume(&fence.volume)
            })?;
            (v.slave.clone(), v.op.clone())
        };
        let slave = slave
            .filter(|s| s.session_id() == fence.session)
            .ok_or_else(|| {
                SlaveError::not_found("no such session on this volume")
                    .volume(&fence.volume)
                    .session(&fence.session)
            })?;
        slave
            .fence(fence.epoch)
            .map_err(|newer| fenced(fence, newer))?;
        let guard = if exclusive {
            Some(op.try_lock_owned().map_err(|_| busy(&fence.volume))?)
        } else {
            None
        };
        Ok((slave, guard))
    }
}

impl Agent {
    /// What prepare answers when the volume has a session already: its
    /// state (the same session: prepare is idempotent), or AlreadyExists
    /// (another one in progress). None: a finished one, to be replaced.
    async fn prepared_already(
        s: &Arc<SlaveSession>,
        fence: &Fence,
    ) -> Option<SlaveResult<SessionState>> {
        if s.session_id() == fence.session {
            return Some(match s.fence(fence.epoch) {
                Ok(()) => Ok(s.state().await),
                Err(n) => Err(fenced(fence, n)),
            });
        }
        (!s.is_finished()).then(|| {
            Err(SlaveError::new(
                ErrorKind::AlreadyExists,
                format!(
                    "the volume already has a migration in progress (session {})",
                    s.session_id()
                ),
            )
            .op("prepare")
            .volume(&fence.volume))
        })
    }
}

impl Slave for Agent {
    async fn prepare(&self, r: Prepare) -> SlaveResult<SessionState> {
        let fence = r.fence;
        let (interposer, existing, op) = {
            let vols = lock(&self.volumes);
            let v = vols.get(&fence.volume).ok_or_else(|| {
                SlaveError::not_found("unknown volume: this agent does not serve it")
                    .op("prepare")
                    .volume(&fence.volume)
            })?;
            (v.interposer.clone(), v.slave.clone(), v.op.clone())
        };
        // Another session's refusal and this one's idempotent answer need
        // no lock: a second master must hear AlreadyExists, not Busy, while
        // the first one copies.
        if let Some(s) = existing.as_ref()
            && let Some(answer) = Self::prepared_already(s, &fence).await
        {
            return answer;
        }
        let _guard = op.try_lock_owned().map_err(|_| busy(&fence.volume))?;
        // Under the lock: nobody prepared meanwhile.
        let now = lock(&self.volumes)
            .get(&fence.volume)
            .and_then(|v| v.slave.clone());
        if let Some(s) = now.as_ref()
            && let Some(answer) = Self::prepared_already(s, &fence).await
        {
            return answer;
        }
        let s = within(
            "prepare",
            &fence,
            SlaveSession::prepare(
                interposer,
                self.state().clone(),
                &fence.session,
                fence.epoch,
                &r.target,
                r.config,
                r.monitor_only,
            )
            .await,
        )?;
        if let Some(v) = lock(&self.volumes).get_mut(&fence.volume) {
            v.slave = Some(s.clone());
        }
        Ok(s.state().await)
    }

    async fn copy_pass(&self, r: CopyPass) -> SlaveResult<PassResult> {
        let (s, _g) = self.session_for(&r.fence, true)?;
        within("copy", &r.fence, s.copy_pass(r.slice).await)
    }

    async fn set_mirror(&self, r: SetMirror) -> SlaveResult<SessionState> {
        let (s, _g) = self.session_for(&r.fence, false)?;
        within("set mirror", &r.fence, s.set_mirror(r.on))?;
        Ok(s.state().await)
    }

    async fn quiesce(&self, r: Quiesce) -> SlaveResult<QuiesceResult> {
        let (s, _g) = self.session_for(&r.fence, true)?;
        let q = within("quiesce", &r.fence, s.quiesce(r.budget).await)?;
        fault::point("agent:done:quiesce");
        Ok(q)
    }

    async fn release(&self, f: Fence) -> SlaveResult<SessionState> {
        let (s, _g) = self.session_for(&f, true)?;
        within("release", &f, s.release().await)?;
        Ok(s.state().await)
    }

    async fn synchronize(&self, f: Fence) -> SlaveResult<SessionState> {
        let (s, _g) = self.session_for(&f, true)?;
        within("synchronize", &f, s.synchronize().await)?;
        fault::point("agent:done:synchronize");
        Ok(s.state().await)
    }

    async fn redirect(&self, r: Redirect) -> SlaveResult<SessionState> {
        let (s, _g) = self.session_for(&r.fence, true)?;
        within("redirect", &r.fence, s.redirect(r.to_source).await)?;
        if let Some(d) = fault::delay("agent:done:redirect") {
            tokio::time::sleep(d).await;
        }
        fault::point("agent:done:redirect");
        Ok(s.state().await)
    }

    async fn resume(&self, f: Fence) -> SlaveResult<ResumeResult> {
        let (s, _g) = self.session_for(&f, true)?;
        let stall = within("resume", &f, s.resume().await)?;
        if let (Some(d), Ok(i)) = (stall, self.interposer(&f.volume)) {
            i.counters.metrics.stalled(d);
        }
        Ok(ResumeResult { stall })
    }

    async fn terminate(&self, r: Terminate) -> SlaveResult<TerminateResult> {
        let (s, _g) = self.session_for(&r.fence, true)?;
        let done = within(
            "terminate",
            &r.fence,
            s.terminate(r.verify, r.failback_window).await,
        )?;
        self.note_terminated(&r.fence.volume);
        Ok(done)
    }

    async fn abort(&self, f: Fence) -> SlaveResult<SessionState> {
        let (s, _) = self.session_for(&f, false)?;
        // Stop a running pass, then wait for the volume's operation.
        s.interrupt();
        let op = lock(&self.volumes).get(&f.volume).map(|v| v.op.clone());
        let _g = match op {
            Some(op) => Some(op.lock_owned().await),
            None => None,
        };
        within("abort", &f, s.abort().await)?;
        Ok(s.state().await)
    }

    async fn set_bandwidth(&self, r: SetBandwidth) -> SlaveResult<SessionState> {
        let (s, _) = self.session_for(&r.fence, false)?;
        within("set bandwidth", &r.fence, s.set_bandwidth(r.bytes_per_sec))?;
        Ok(s.state().await)
    }

    async fn get_state(&self, f: Fence) -> SlaveResult<SessionState> {
        let (s, _) = self.session_for(&f, false)?;
        Ok(s.state().await)
    }

    async fn take_dirty(&self, r: TakeDirty) -> SlaveResult<DirtyBatch> {
        let (s, _) = self.session_for(&r.fence, false)?;
        within("take dirty", &r.fence, s.take_dirty(r.ack))
    }

    async fn merge_dirty(&self, r: MergeDirty) -> SlaveResult<SessionState> {
        let (s, _) = self.session_for(&r.fence, false)?;
        within(
            "merge dirty",
            &r.fence,
            s.merge_dirty(r.grain, r.size, &r.runs),
        )?;
        Ok(s.state().await)
    }

    async fn serve_volume(&self, r: ServeVolume) -> SlaveResult<VolumeInfo> {
        let volume = r.volume.clone();
        self.serve(r)
            .await
            .map_err(|e| SlaveError::from(e).op("serve").volume(volume))
    }

    async fn unserve_volume(&self, r: UnserveVolume) -> SlaveResult<Unserved> {
        let was_served = self
            .unserve(&r.volume)
            .await
            .map_err(|e| SlaveError::from(e).op("unserve").volume(&r.volume))?;
        Ok(Unserved { was_served })
    }

    async fn list_volumes(&self, _r: ListVolumes) -> SlaveResult<VolumeList> {
        Ok(VolumeList {
            volumes: self.list(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use volmig_api::SessionConfig;
    use volmig_api::io::VolumeIo;

    fn fence(epoch: u64) -> Fence {
        Fence {
            session: "s1".into(),
            volume: "v".into(),
            epoch,
        }
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
            .prepare(Prepare {
                fence: fence(2),
                target: dir.path().join("tgt"),
                config: SessionConfig {
                    grain: 65536,
                    chunk_size: 1 << 20,
                    in_flight: 2,
                    sparse: true,
                    ..SessionConfig::default()
                },
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
        let prep = |monitor_only| Prepare {
            fence: fence(2),
            target: dir.path().join("tgt"),
            config: SessionConfig {
                grain: 65536,
                ..SessionConfig::default()
            },
            monitor_only,
        };
        let st = second.prepare(prep(true)).await.unwrap();
        assert_eq!(st.dirty_bytes, 0, "a monitor starts with nothing dirty");
        let take = |ack| TakeDirty {
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
        let before = primary.get_state(fence(2)).await.unwrap();
        primary
            .copy_pass(CopyPass {
                fence: fence(2),
                slice: None,
            })
            .await
            .unwrap();
        let clean = primary.get_state(fence(2)).await.unwrap();
        assert!(clean.dirty_bytes < before.dirty_bytes);
        let merged = primary
            .merge_dirty(MergeDirty {
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
            .merge_dirty(MergeDirty {
                fence: fence(2),
                grain: 4096,
                size: b2.size,
                runs: b2.runs,
            })
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
        let e = second
            .copy_pass(CopyPass {
                fence: fence(2),
                slice: None,
            })
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
        let e = primary.take_dirty(take(0)).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_volume_under_migration_does_not_grow() {
        let (dir, agent, ip) = prepared().await;
        std::fs::File::options()
            .write(true)
            .open(dir.path().join("src"))
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let e = agent.resize("v").await.unwrap_err();
        assert!(matches!(e, AgentError::InUse { .. }), "{e}");
        assert_eq!(ip.size(), 4 << 20, "nothing changed");
        agent.abort(fence(2)).await.unwrap();
        assert_eq!(agent.resize("v").await.unwrap(), 8 << 20);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_quiesce_the_master_abandons_is_released_by_the_agent() {
        let (_dir, agent, ip) = prepared().await;
        agent
            .slave("v")
            .unwrap()
            .set_quiesce_lease(Duration::from_millis(300));
        let q = agent
            .quiesce(Quiesce {
                fence: fence(2),
                budget: Duration::from_secs(2),
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
        let st = agent.get_state(fence(2)).await.unwrap();
        assert!(!st.quiesced && !st.redirected);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_session_is_refused_as_such_while_the_first_one_copies() {
        let (dir, agent, _ip) = prepared().await;
        // The first session's copy pass holds the volume's operation lock.
        let op = lock(&agent.volumes).get("v").unwrap().op.clone();
        let _running = op.lock_owned().await;
        let other = Fence {
            session: "s2".into(),
            volume: "v".into(),
            epoch: 1,
        };
        let e = agent
            .prepare(Prepare {
                fence: other,
                target: dir.path().join("tgt"),
                config: SessionConfig::default(),
                monitor_only: false,
            })
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::AlreadyExists, "{e}");
        // The first master repeating its prepare is answered too.
        let st = agent
            .prepare(Prepare {
                fence: fence(2),
                target: dir.path().join("tgt"),
                config: SessionConfig::default(),
                monitor_only: false,
            })
            .await
            .unwrap();
        assert_eq!(st.session, "s1");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stale_epochs_and_foreign_sessions_are_refused() {
        let (dir, agent, _ip) = prepared().await;
        let e = agent.get_state(fence(1)).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Fenced, "{e}");
        // a newer epoch takes over, after which the old one is refused too
        agent.get_state(fence(3)).await.unwrap();
        let e = agent.get_state(fence(2)).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Fenced, "{e}");
        // another session on the same volume
        let other = Fence {
            session: "s2".into(),
            volume: "v".into(),
            epoch: 9,
        };
        let e = agent
            .prepare(Prepare {
                fence: other.clone(),
                target: dir.path().join("tgt"),
                config: SessionConfig::default(),
                monitor_only: false,
            })
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::AlreadyExists, "{e}");
        let e = agent.get_state(other).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    }

    /// A volume served with O_DIRECT migrates with O_DIRECT: the session's
    /// target (the device after the cutover) and, after a restart, both
    /// devices are opened the same way (they were opened buffered).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_direct_volume_keeps_o_direct_on_its_target() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["src", "tgt"] {
            std::fs::File::create(dir.path().join(f))
                .unwrap()
                .set_len(4 << 20)
                .unwrap();
        }
        let state = dir.path().join("state");
        let agent = Agent::new(&state).unwrap();
        let ip = agent
            .add_volume("v", &dir.path().join("src"), true)
            .await
            .unwrap();
        assert!(ip.active().is_direct());
        agent
            .prepare(Prepare {
                fence: fence(2),
                target: dir.path().join("tgt"),
                config: SessionConfig::default(),
                monitor_only: false,
            })
            .await
            .unwrap();
        let link = ip.link().expect("a session attached");
        assert!(
            link.target.is_direct(),
            "the target is opened with O_DIRECT"
        );
        drop((link, ip, agent));
        let again = Agent::new(&state).unwrap();
        assert_eq!(again.restore().await.unwrap(), 1);
        let link = again.interposer("v").unwrap().link().expect("reattached");
        assert!(
            link.source.is_direct() && link.target.is_direct(),
            "after a restart too"
        );
    }
}
