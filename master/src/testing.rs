//! A fake agent for the master's unit tests: one session's state kept in
//! memory, every call recorded, and knobs to make a step fail, the copy
//! never end, or the agent unreachable.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use volmig_api::slave::*;
use volmig_api::{ErrorKind, Slave, SlaveError, SlaveResult};

use crate::record::{SessionConfig, SessionRecord};
use crate::store::{FileStore, SessionStore};

#[derive(Debug, Default, Clone)]
pub struct Agent {
    pub attached: bool,
    pub mirror: bool,
    pub quiesced: bool,
    pub redirected: bool,
    pub finished: bool,
}

#[derive(Debug, Default)]
struct State {
    session: Option<Agent>,
    calls: Vec<&'static str>,
    /// Calls that fail with this kind (always).
    fail: HashMap<&'static str, ErrorKind>,
    /// Calls that fail with this kind once.
    fail_once: HashMap<&'static str, ErrorKind>,
    /// Copy passes never complete.
    endless_copy: bool,
    /// Quiesce calls that time out before one succeeds.
    quiesce_timeouts: u32,
    /// Terminate finds the target different at this offset.
    mismatch: Option<u64>,
    /// Terminate runs until an abort interrupts it (a long failback window).
    long_terminate: bool,
    /// An abort came (it interrupts a running step, as the agent's does).
    interrupted: bool,
    bandwidth: Vec<u64>,
}

#[derive(Debug, Default)]
pub struct FakeSlave {
    st: Mutex<State>,
}

pub const SIZE: u64 = 1 << 20;

impl FakeSlave {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap()
    }

    /// The agent already holds the session in this state.
    pub fn with_session(self: Arc<Self>, agent: Agent) -> Arc<Self> {
        self.lock().session = Some(agent);
        self
    }

    pub fn fail(self: Arc<Self>, op: &'static str, kind: ErrorKind) -> Arc<Self> {
        self.lock().fail.insert(op, kind);
        self
    }

    pub fn fail_once(self: Arc<Self>, op: &'static str, kind: ErrorKind) -> Arc<Self> {
        self.lock().fail_once.insert(op, kind);
        self
    }

    pub fn endless_copy(self: Arc<Self>) -> Arc<Self> {
        self.lock().endless_copy = true;
        self
    }

    pub fn finish_copy(&self) {
        self.lock().endless_copy = false;
    }

    pub fn quiesce_timeouts(self: Arc<Self>, n: u32) -> Arc<Self> {
        self.lock().quiesce_timeouts = n;
        self
    }

    pub fn mismatch_at(self: Arc<Self>, offset: u64) -> Arc<Self> {
        self.lock().mismatch = Some(offset);
        self
    }

    /// Terminate runs (a failback window) until an abort interrupts it.
    pub fn long_terminate(self: Arc<Self>) -> Arc<Self> {
        self.lock().long_terminate = true;
        self
    }

    pub fn calls(&self) -> Vec<&'static str> {
        self.lock().calls.clone()
    }

    pub fn called(&self, op: &str) -> usize {
        self.lock().calls.iter().filter(|c| **c == op).count()
    }

    pub fn agent(&self) -> Option<Agent> {
        self.lock().session.clone()
    }

    pub fn bandwidth(&self) -> Vec<u64> {
        self.lock().bandwidth.clone()
    }

    /// Records the call, fails it if told to, else runs `f` on the session.
    fn op<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut State) -> SlaveResult<T>,
    ) -> SlaveResult<T> {
        let mut st = self.lock();
        st.calls.push(op);
        if let Some(kind) = st.fail.get(op).copied().or_else(|| st.fail_once.remove(op)) {
            return Err(SlaveError::new(kind, format!("{op} refused by the fake")).op(op));
        }
        f(&mut st)
    }

    fn state(st: &State) -> SlaveResult<SessionState> {
        let a = st
            .session
            .as_ref()
            .ok_or_else(|| SlaveError::not_found("no session"))?;
        Ok(SessionState {
            size: SIZE,
            attached: a.attached,
            mirror: a.mirror,
            quiesced: a.quiesced,
            redirected: a.redirected,
            finished: a.finished,
            ..SessionState::default()
        })
    }

    fn session(st: &mut State) -> SlaveResult<&mut Agent> {
        st.session
            .as_mut()
            .ok_or_else(|| SlaveError::not_found("no session"))
    }

    fn change(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut Agent) -> SlaveResult<()>,
    ) -> SlaveResult<SessionState> {
        self.op(op, |st| {
            f(Self::session(st)?)?;
            Self::state(st)
        })
    }
}

fn wrong(what: &str) -> SlaveError {
    SlaveError::new(ErrorKind::WrongState, what.to_string())
}

fn unused<T>(op: &str) -> SlaveResult<T> {
    Err(SlaveError::failed(format!("{op} is not part of the fake")))
}

impl Slave for FakeSlave {
    async fn prepare(&self, _: Prepare) -> SlaveResult<SessionState> {
        self.op("prepare", |st| {
            st.session.get_or_insert(Agent {
                attached: true,
                ..Agent::default()
            });
            Self::state(st)
        })
    }

    async fn copy_pass(&self, r: CopyPass) -> SlaveResult<PassResult> {
        let endless = self.op("copy_pass", |st| {
            Self::session(st)?;
            Ok(st.endless_copy)
        })?;
        if endless {
            tokio::time::sleep(r.slice.unwrap_or_default().min(Duration::from_millis(10))).await;
            return Ok(PassResult {
                complete: false,
                walked: 4096,
                ..PassResult::default()
            });
        }
        Ok(PassResult {
            complete: true,
            bytes: SIZE,
            data_bytes: SIZE,
            elapsed: Duration::from_millis(10),
            walked: SIZE,
            ..PassResult::default()
        })
    }

    async fn set_mirror(&self, r: SetMirror) -> SlaveResult<SessionState> {
        self.change("set_mirror", |a| {
            a.mirror = r.on;
            Ok(())
        })
    }

    async fn quiesce(&self, _: Quiesce) -> SlaveResult<QuiesceResult> {
        self.op("quiesce", |st| {
            if st.quiesce_timeouts > 0 {
                st.quiesce_timeouts -= 1;
                return Ok(QuiesceResult::default());
            }
            Self::session(st)?.quiesced = true;
            Ok(QuiesceResult {
                quiesced: true,
                spent: Duration::from_millis(1),
                dirty_bytes: 0,
            })
        })
    }

    async fn release(&self, _: Fence) -> SlaveResult<SessionState> {
        self.change("release", |a| {
            a.quiesced = false;
            Ok(())
        })
    }

    async fn synchronize(&self, _: Fence) -> SlaveResult<SessionState> {
        self.change("synchronize", |a| {
            if a.quiesced {
                Ok(())
            } else {
                Err(wrong("not quiesced"))
            }
        })
    }

    async fn redirect(&self, r: Redirect) -> SlaveResult<SessionState> {
        self.change("redirect", |a| {
            a.redirected = !r.to_source;
            Ok(())
        })
    }

    async fn resume(&self, _: Fence) -> SlaveResult<ResumeResult> {
        self.change("resume", |a| {
            a.quiesced = false;
            Ok(())
        })?;
        Ok(ResumeResult {
            stall: Some(Duration::from_millis(2)),
        })
    }

    async fn terminate(&self, _: Terminate) -> SlaveResult<TerminateResult> {
        if self.lock().long_terminate {
            self.lock().calls.push("terminate");
            while !self.lock().interrupted {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            return Err(SlaveError::failed("the session was aborted"));
        }
        self.op("terminate", |st| {
            let mismatch = st.mismatch;
            let a = Self::session(st)?;
            if !a.redirected {
                return Err(wrong("not redirected"));
            }
            a.finished = true;
            a.attached = false;
            Ok(TerminateResult {
                verified: mismatch.is_none(),
                mismatch_offset: mismatch,
            })
        })
    }

    async fn abort(&self, _: Fence) -> SlaveResult<SessionState> {
        self.lock().interrupted = true;
        self.change("abort", |a| {
            if !a.finished {
                *a = Agent {
                    finished: true,
                    ..Agent::default()
                };
            }
            Ok(())
        })
    }

    async fn set_bandwidth(&self, r: SetBandwidth) -> SlaveResult<SessionState> {
        self.op("set_bandwidth", |st| {
            st.bandwidth.push(r.bytes_per_sec);
            Self::state(st)
        })
    }

    async fn get_state(&self, _: Fence) -> SlaveResult<SessionState> {
        self.op("get_state", |st| Self::state(st))
    }

    async fn take_dirty(&self, _: TakeDirty) -> SlaveResult<DirtyBatch> {
        unused("take_dirty")
    }

    async fn merge_dirty(&self, _: MergeDirty) -> SlaveResult<SessionState> {
        unused("merge_dirty")
    }

    async fn serve_volume(&self, _: ServeVolume) -> SlaveResult<VolumeInfo> {
        unused("serve_volume")
    }

    async fn unserve_volume(&self, _: UnserveVolume) -> SlaveResult<Unserved> {
        unused("unserve_volume")
    }

    async fn list_volumes(&self, _: ListVolumes) -> SlaveResult<VolumeList> {
        unused("list_volumes")
    }
}

/// A state directory with a store.
pub struct Dir {
    pub dir: tempfile::TempDir,
    pub store: FileStore,
}

pub fn dir() -> Dir {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    Dir { dir, store }
}

impl Dir {
    /// A new session's record for `volume` (phase Activating).
    pub async fn session(&self, volume: &str) -> SessionRecord {
        let target = self.dir.path().join(format!("{volume}.target"));
        crate::session::create_session(&self.store, volume, &target, SessionConfig::default(), 1)
            .await
            .unwrap()
    }

    /// Moves `volume`'s record to `phase` as a master that died there left
    /// it.
    pub async fn at(&self, volume: &str, phase: volmig_api::Phase) -> SessionRecord {
        let mut rec = self.store.load(volume).await.unwrap().unwrap();
        rec.enter(phase);
        if phase.is_after_redirect() {
            rec.redirected = true;
        }
        self.store.save(volume, &mut rec).await.unwrap();
        rec
    }

    pub async fn record(&self, volume: &str) -> SessionRecord {
        self.store.load(volume).await.unwrap().unwrap()
    }
}

/// The phases a record went through, from its timeline.
pub fn timeline(rec: &SessionRecord) -> Vec<volmig_api::Phase> {
    rec.phase_times.iter().map(|p| p.phase).collect()
}
