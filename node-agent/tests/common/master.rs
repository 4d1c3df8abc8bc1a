//! A master for the tests that drive migrations: `volmig_master::Driver`
//! over a `FileStore`, with the agent as its slave — in-process
//! (`Arc<Agent>`) or a `volmig-agent serve` process reached over its
//! control socket (`GrpcSlave`, `unix://`). The agent is a slave only; this
//! is the master the agent used to host for these tests.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use volmig_api::Slave;
use volmig_api::phase::Phase;
use volmig_api::slave::{Fence, ListVolumes};
use volmig_master::{
    Driver, DriverConfig, FileStore, GrpcSlave, SessionConfig, SessionRecord, StopSignal,
};

struct Task {
    stop: Arc<StopSignal>,
    done: watch::Receiver<bool>,
}

/// Runs one driver per volume; the records live in `state_dir`.
pub struct Master<S> {
    slave: S,
    store: FileStore,
    tasks: Mutex<HashMap<String, Task>>,
}

impl<S: Slave + Clone + 'static> Master<S> {
    pub fn new(slave: S, state_dir: &Path) -> Self {
        Self {
            slave,
            store: FileStore::open(state_dir).unwrap(),
            tasks: Mutex::new(HashMap::new()),
        }
    }

    pub fn slave(&self) -> &S {
        &self.slave
    }

    /// Starts migrating `volume` to `target` and returns once the session
    /// is activated. An activation that fails (a bad target, an unknown
    /// volume, a session already running) is the error, and leaves no
    /// session behind.
    pub async fn migrate(
        &self,
        volume: &str,
        target: &Path,
        config: SessionConfig,
    ) -> Result<SessionRecord, String> {
        volmig_master::create_session(&self.store, volume, target, config, 1)
            .await
            .map_err(|e| e.to_string())?;
        let stop = Arc::new(StopSignal::default());
        let (tx, rx) = watch::channel(false);
        let driver = Driver::new(
            self.slave.clone(),
            self.store.clone(),
            volume,
            DriverConfig {
                epoch: 1,
                ..DriverConfig::default()
            },
            stop.clone(),
        );
        tokio::spawn(async move {
            let _ = driver.run().await;
            let _ = tx.send(true);
        });
        self.tasks
            .lock()
            .unwrap()
            .insert(volume.to_string(), Task { stop, done: rx });
        loop {
            let rec = self.status(volume)?;
            match rec.phase {
                Phase::Activating => {}
                Phase::Failed if rec.phase_times.len() <= 1 => {
                    let _ = std::fs::remove_file(self.store.path(volume));
                    return Err(rec.error.unwrap_or_default());
                }
                _ => return Ok(rec),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The session's record.
    pub fn status(&self, volume: &str) -> Result<SessionRecord, String> {
        self.store
            .load_now(volume)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no session for volume {volume}"))
    }

    /// Asks the session to roll back (its driver does at its next step),
    /// and has the agent cut the step in progress short: the driver waits
    /// for a step to end before it looks at the request again, and a step
    /// may be long (a failback window).
    pub async fn abort(&self, volume: &str) -> Result<(), String> {
        let rec = volmig_master::request_abort(&self.store, volume)
            .await
            .map_err(|e| e.to_string())?;
        let fence = Fence {
            session: rec.session,
            volume: rec.volume,
            epoch: rec.epoch,
        };
        // Interrupts the running step, then rolls back; the driver finds
        // the session rolled back (abort is idempotent).
        let _ = self.slave.abort(fence).await;
        Ok(())
    }

    /// Waits until the volume's driver has finished; its final record.
    pub async fn wait(&self, volume: &str) -> Result<SessionRecord, String> {
        let rx = self
            .tasks
            .lock()
            .unwrap()
            .get(volume)
            .map(|t| t.done.clone());
        if let Some(mut rx) = rx {
            let _ = rx.wait_for(|d| *d).await;
        }
        self.status(volume)
    }

    /// What the agent says of the session: (dirty bytes, bytes copied by
    /// this agent process); (the record's dirty bytes, 0) when it cannot be
    /// asked. A finished session has nothing dirty.
    pub async fn live(&self, rec: &SessionRecord) -> (u64, u64) {
        let fence = Fence {
            session: rec.session.clone(),
            volume: rec.volume.clone(),
            epoch: rec.epoch,
        };
        match self.slave.get_state(fence).await {
            Ok(s) if s.finished => (0, s.bytes_copied),
            Ok(s) => (rec.dirty_bytes, s.bytes_copied),
            Err(_) => (rec.dirty_bytes, 0),
        }
    }

    /// Stops every driver (sessions stay where they are).
    pub async fn shutdown(&self) {
        let tasks: Vec<Task> = self.tasks.lock().unwrap().drain().map(|(_, t)| t).collect();
        for t in &tasks {
            t.stop.stop();
        }
        for mut t in tasks {
            let _ = t.done.wait_for(|d| *d).await;
        }
    }
}

/// The master of a `volmig-agent serve` process, for synchronous tests:
/// its own runtime, the agent's control socket, records in `state_dir`.
pub struct ProcMaster {
    rt: tokio::runtime::Runtime,
    master: Master<GrpcSlave>,
}

impl ProcMaster {
    pub fn new(control_socket: &Path, state_dir: &Path) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let url = format!("unix://{}", control_socket.display());
        let slave = {
            let _enter = rt.enter();
            GrpcSlave::new(&url, None).unwrap()
        };
        Self {
            master: Master::new(slave, state_dir),
            rt,
        }
    }

    pub fn migrate(
        &self,
        volume: &str,
        target: &Path,
        config: SessionConfig,
    ) -> Result<SessionRecord, String> {
        self.rt
            .block_on(self.master.migrate(volume, target, config))
    }

    /// The agent over its control socket.
    pub fn agent(&self) -> &GrpcSlave {
        self.master.slave()
    }

    /// Runs a call (to [`agent`](Self::agent)) to completion.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    pub fn record(&self, volume: &str) -> Result<SessionRecord, String> {
        self.master.status(volume)
    }

    /// The record with the agent's live figures, as JSON:
    /// `{"record": .., "dirty_bytes": .., "copied_this_run": ..}`.
    pub fn status_json(&self, volume: &str) -> Result<serde_json::Value, String> {
        let rec = self.master.status(volume)?;
        let (dirty, copied) = self.rt.block_on(self.master.live(&rec));
        Ok(serde_json::json!({
            "record": rec,
            "dirty_bytes": dirty,
            "copied_this_run": copied,
        }))
    }

    pub fn wait(&self, volume: &str) -> Result<SessionRecord, String> {
        self.rt.block_on(self.master.wait(volume))
    }

    pub fn abort(&self, volume: &str) -> Result<(), String> {
        self.rt.block_on(self.master.abort(volume))
    }

    /// The backing device the agent serves `volume` from now.
    pub fn active_path(&self, volume: &str) -> String {
        let list = self
            .rt
            .block_on(self.master.slave().list_volumes(ListVolumes))
            .unwrap();
        list.volumes
            .into_iter()
            .find(|v| v.name == volume)
            .unwrap_or_else(|| panic!("{volume} not served"))
            .active
            .display()
            .to_string()
    }
}

impl Drop for ProcMaster {
    fn drop(&mut self) {
        self.rt.block_on(self.master.shutdown());
    }
}

/// Session options as `volmig migrate` reads them (`--mode Auto
/// --bandwidth 16Mi ...`).
pub fn session_config(opts: &[&str]) -> SessionConfig {
    use clap::Parser;
    #[derive(Parser)]
    struct Opts {
        #[command(flatten)]
        session: volmig_agent::session_args::SessionArgs,
    }
    Opts::try_parse_from(std::iter::once("migrate").chain(opts.iter().copied()))
        .unwrap_or_else(|e| panic!("session options {opts:?}: {e}"))
        .session
        .config()
}
