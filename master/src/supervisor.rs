//! The supervisor: runs a master's drivers, one job per key (a session, or
//! the members of a consistency group), for the operator and the local
//! master alike. A job it starts is admitted first (a slot of the
//! concurrency limit; its records say `queued` while it waits) and its
//! drivers share the master's bandwidth pool, so a caller never wires
//! either. Stopping a job only stops its drivers, between steps: the
//! sessions go on under the next driver started for them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::watch;
use tracing::{info, warn};
use volmig_api::Slave;

use crate::admission::Slots;
use crate::bandwidth::BandwidthPool;
use crate::driver::{Driver, DriverConfig, StopSignal};
use crate::error::{MasterError, Result};
use crate::group_run::{Member, run_group};
use crate::record::SessionRecord;
use crate::store::SessionStore;

/// What a supervisor runs under one key.
#[derive(Debug, Clone)]
pub enum Job<S> {
    /// One session: the record under `volume`, driven through `slave`.
    Session { volume: String, slave: S },
    /// A consistency group: every member's driver, cutting over together.
    /// It takes one slot.
    Group {
        name: String,
        members: Vec<Member<S>>,
    },
}

impl<S> Job<S> {
    /// The keys of the job's records, in member order.
    pub fn volumes(&self) -> Vec<String> {
        match self {
            Job::Session { volume, .. } => vec![volume.clone()],
            Job::Group { members, .. } => members.iter().map(|m| m.volume.clone()).collect(),
        }
    }
}

/// How a job ended: each member's final record (or why its driver
/// stopped), in member order. A record that is not terminal was stopped.
pub type Ended = Vec<Result<SessionRecord>>;

/// Whether a new job would start at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Open,
    /// `running` jobs hold or wait for the `limit` slots.
    Full {
        running: usize,
        limit: usize,
    },
}

struct Entry {
    stop: Arc<StopSignal>,
    done: watch::Receiver<bool>,
    ended: Arc<Mutex<Option<Ended>>>,
}

impl Entry {
    fn is_done(&self) -> bool {
        *self.done.borrow()
    }
}

/// Runs drivers (see the module's documentation).
pub struct Supervisor {
    slots: Slots,
    pool: Arc<BandwidthPool>,
    jobs: Mutex<HashMap<String, Entry>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Entries are inserted, updated and removed whole; a panic cannot tear
    // one.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Supervisor {
    /// At most `slots.limit()` jobs run at once; their drivers share
    /// `total_bandwidth` bytes/s fairly (0: each keeps its own limit).
    pub fn new(slots: Slots, total_bandwidth: u64) -> Self {
        Self {
            slots,
            pool: Arc::new(BandwidthPool::new(total_bandwidth)),
            jobs: Mutex::default(),
        }
    }

    /// The concurrency limit's slots.
    pub fn slots(&self) -> &Slots {
        &self.slots
    }

    /// Runs `job` under `key` with its records in `store`. One job per key:
    /// while one runs, another start is refused (false) and the running one
    /// kept. The outcome of an earlier job under `key` that nobody waited
    /// for is dropped.
    pub fn start<S, St>(&self, key: &str, job: Job<S>, store: St, cfg: DriverConfig) -> bool
    where
        S: Slave + 'static,
        St: SessionStore + Clone + 'static,
    {
        let mut jobs = lock(&self.jobs);
        if jobs.get(key).is_some_and(|e| !e.is_done()) {
            return false;
        }
        let stop = Arc::new(StopSignal::default());
        let (tx, done) = watch::channel(false);
        let ended = Arc::new(Mutex::new(None));
        let run = run_job(
            key.to_string(),
            job,
            store,
            cfg,
            stop.clone(),
            self.slots.clone(),
            self.pool.clone(),
        );
        let (slot, task_key) = (ended.clone(), key.to_string());
        tokio::spawn(async move {
            let out = std::panic::AssertUnwindSafe(run)
                .catch_unwind()
                .await
                .unwrap_or_else(|panic| {
                    let reason = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    warn!(key = %task_key, reason, "a driver panicked");
                    vec![Err(MasterError::Panicked {
                        key: task_key,
                        reason,
                    })]
                });
            *lock(&slot) = Some(out);
            let _ = tx.send(true);
        });
        jobs.insert(key.to_string(), Entry { stop, done, ended });
        true
    }

    /// Asks `key`'s job to stop between steps.
    pub fn stop(&self, key: &str) {
        if let Some(e) = lock(&self.jobs).get(key) {
            e.stop.stop();
        }
    }

    /// Stops every job and waits up to `timeout` for them to end (their
    /// outcomes stay for [`Self::wait`]).
    pub async fn stop_all(&self, timeout: Duration) {
        let waits: Vec<watch::Receiver<bool>> = {
            let jobs = lock(&self.jobs);
            jobs.values()
                .map(|e| {
                    e.stop.stop();
                    e.done.clone()
                })
                .collect()
        };
        let all = futures::future::join_all(waits.into_iter().map(ended));
        if tokio::time::timeout(timeout, all).await.is_err() {
            warn!(?timeout, "some drivers did not stop in time");
        }
    }

    /// Waits for `key`'s job to end and takes its outcome; `None` when no
    /// job ran under `key` (or its outcome was taken already).
    pub async fn wait(&self, key: &str) -> Option<Ended> {
        let done = lock(&self.jobs).get(key)?.done.clone();
        ended(done).await;
        let entry = lock(&self.jobs).remove(key)?;
        lock(&entry.ended).take()
    }

    /// Drops the outcome of `key`'s ended job, which nobody will wait for;
    /// a running job is kept.
    pub fn forget(&self, key: &str) {
        let mut jobs = lock(&self.jobs);
        if jobs.get(key).is_some_and(Entry::is_done) {
            jobs.remove(key);
        }
    }

    /// A job runs (or waits for a slot) under `key`.
    pub fn is_running(&self, key: &str) -> bool {
        lock(&self.jobs).get(key).is_some_and(|e| !e.is_done())
    }

    /// Jobs running (or waiting for a slot) now.
    pub fn active(&self) -> usize {
        lock(&self.jobs).values().filter(|e| !e.is_done()).count()
    }

    /// Whether a job started now would run at once.
    pub fn admission(&self) -> Result<Admission> {
        let limit = self.slots.limit();
        if limit == 0 {
            return Ok(Admission::Open);
        }
        let running = self.active().max(self.slots.held()?);
        Ok(if running < limit {
            Admission::Open
        } else {
            Admission::Full { running, limit }
        })
    }
}

/// Resolves once the job behind `done` has ended (or its task is gone).
async fn ended(mut done: watch::Receiver<bool>) {
    let _ = done.wait_for(|d| *d).await;
}

/// A job's whole life: admission, then its drivers to their end.
async fn run_job<S, St>(
    key: String,
    job: Job<S>,
    store: St,
    cfg: DriverConfig,
    stop: Arc<StopSignal>,
    slots: Slots,
    pool: Arc<BandwidthPool>,
) -> Ended
where
    S: Slave,
    St: SessionStore + Clone,
{
    let volumes = job.volumes();
    // Stopped while queued, the drivers still start: they save and return
    // their records at once.
    let _slot = match slots.acquire(&store, &volumes, &stop).await {
        Ok(slot) => slot,
        Err(e) => {
            warn!(%key, error = %e, "admission failed");
            let others = format!("admission of {key} failed: {e}");
            let mut ended = vec![Err(e)];
            ended.extend(
                volumes
                    .iter()
                    .skip(1)
                    .map(|_| Err(MasterError::Invalid(others.clone()))),
            );
            return ended;
        }
    };
    let ended = match job {
        Job::Session { volume, slave } => {
            let driver = Driver::new(slave, store, &volume, cfg, stop).sharing(pool);
            vec![driver.run().await]
        }
        Job::Group { name, members } => run_group(&name, members, store, cfg, stop, pool).await,
    };
    for (volume, r) in volumes.iter().zip(&ended) {
        match r {
            Ok(rec) => info!(%key, %volume, phase = %rec.phase, "driver ended"),
            Err(MasterError::Deposed(why)) => {
                info!(%key, %volume, why, "driver deposed by a newer epoch")
            }
            Err(e) => warn!(%key, %volume, error = %e, "driver stopped on an error"),
        }
    }
    ended
}

#[cfg(test)]
mod tests;
