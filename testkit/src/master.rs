//! Masters driving a migration in tests: the `volmig migrate` process
//! ([`LocalMaster`], [`Migration`]) for process agents, and an in-process
//! `volmig_master::Driver` over a `FileStore` ([`InProcMaster`]) for an
//! in-process agent.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use volmig_api::Slave;
use volmig_api::phase::Phase;
use volmig_master::{
    Driver, DriverConfig, FileStore, SessionConfig, SessionRecord, StopSignal, create_session,
    request_abort,
};

use crate::agent::AgentProcess;
use crate::binaries::volmig_bin;
use crate::process::ChildGuard;
use crate::tools::{Out, run_cmd};

/// The phases a session ends in, as records spell them.
pub const TERMINAL: [&str; 3] = ["Completed", "Aborted", "Failed"];

/// No extra arguments, for the calls that take some.
pub const NO_ARGS: &[&str] = &[];

/// How long a `volmig migrate` run to its end may take.
pub const MIGRATE_TIMEOUT: Duration = Duration::from_secs(900);

/// `volmig migrate` with its state (session records) in one directory.
#[derive(Clone, Debug)]
pub struct LocalMaster {
    state_dir: PathBuf,
}

impl LocalMaster {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            state_dir: state_dir.to_path_buf(),
        }
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// `volmig migrate --quiet --state-dir S <reach agent> VOLUME TARGET
    /// extra...`, to run as the test likes.
    pub fn command(
        &self,
        agent: &AgentProcess,
        volume: &str,
        target: &Path,
        extra: &[impl AsRef<OsStr>],
    ) -> Command {
        let mut c = Command::new(volmig_bin());
        c.args(["migrate", "--quiet", "--state-dir"])
            .arg(&self.state_dir)
            .args(agent.master_args())
            .arg(volume)
            .arg(target)
            .args(extra)
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "0");
        c
    }

    /// `--volume VOLUME=TARGET@URL`: one more volume, on `agent`.
    pub fn also(agent: &AgentProcess, volume: &str, target: &Path) -> [String; 2] {
        [
            "--volume".into(),
            format!("{volume}={}@{}", target.display(), agent.url()),
        ]
    }

    /// Runs `command` to its end (exit 0 only when every migration
    /// completed).
    pub fn run(
        &self,
        agent: &AgentProcess,
        volume: &str,
        target: &Path,
        extra: &[impl AsRef<OsStr>],
    ) -> Out {
        run_cmd(self.command(agent, volume, target, extra), MIGRATE_TIMEOUT)
    }

    /// Starts `command` in the background; returns once the session is
    /// past activation (fails the test when activation failed).
    pub fn start(
        &self,
        agent: &AgentProcess,
        volume: &str,
        target: &Path,
        extra: &[impl AsRef<OsStr>],
    ) -> Migration {
        let name = self
            .state_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let log = self
            .state_dir
            .with_file_name(format!("{name}-{volume}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = self
            .command(agent, volume, target, extra)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawning volmig migrate");
        let mut m = Migration {
            child: ChildGuard::new(child),
            master: self.clone(),
            volume: volume.to_string(),
            log,
        };
        let t = Instant::now();
        loop {
            let r = m.record();
            let phase = r["phase"].as_str().unwrap_or("");
            if phase == "Failed" && r["phase_times"].as_array().is_some_and(|p| p.len() <= 1) {
                panic!(
                    "the migration of {volume} failed to activate: {r}\n{}",
                    m.log_text()
                );
            }
            if !phase.is_empty() && phase != "Activating" {
                return m;
            }
            if let Some(st) = m.child.try_wait() {
                panic!(
                    "volmig migrate ended ({st}) before the session got going: {r}\n{}",
                    m.log_text()
                );
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the migration of {volume} never got past activation: {r}\n{}",
                m.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The record of `volume` (Null if none), read from the state file as
    /// `volmig status --json` prints it.
    pub fn record(&self, volume: &str) -> Value {
        match std::fs::read(self.state_dir.join(format!("{volume}.session.json"))) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    }

    /// Waits until `f` holds of `volume`'s record (90 s at most).
    pub fn wait_record(&self, volume: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let t = Instant::now();
        loop {
            let r = self.record(volume);
            if f(&r) {
                return r;
            }
            assert!(
                t.elapsed() < Duration::from_secs(90),
                "{volume}: never {what}: {r}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A `volmig migrate` running in the background; killed when dropped.
pub struct Migration {
    child: ChildGuard,
    master: LocalMaster,
    volume: String,
    log: PathBuf,
}

impl Migration {
    pub fn record(&self) -> Value {
        self.master.record(&self.volume)
    }

    pub fn phase(&self) -> String {
        self.record()["phase"].as_str().unwrap_or("?").to_string()
    }

    /// What the master printed.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls the record until the session ends, then waits for the master
    /// to exit; returns the final record.
    pub fn wait_terminal(&mut self, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.record();
            if TERMINAL.contains(&r["phase"].as_str().unwrap_or("?")) {
                self.child
                    .wait_timeout("volmig migrate", Duration::from_secs(60));
                return self.record();
            }
            assert!(
                Instant::now() < deadline,
                "the migration of {} did not end within {timeout:?}; last record:\n{r:#}\n{}",
                self.volume,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A driver per volume in the test's process, the slave `S` (an
/// `Arc<Agent>`, a `GrpcSlave`...), records in a `FileStore`.
pub struct InProcMaster<S> {
    slave: S,
    store: FileStore,
    drivers: Mutex<HashMap<String, Running>>,
}

struct Running {
    stop: Arc<StopSignal>,
    task: tokio::task::JoinHandle<SessionRecord>,
}

impl<S: Slave + Clone + 'static> InProcMaster<S> {
    pub fn new(slave: S, state_dir: &Path) -> Self {
        Self {
            slave,
            store: FileStore::open(state_dir).unwrap(),
            drivers: Mutex::default(),
        }
    }

    /// Starts a driver of `volume`'s record under `epoch`.
    fn drive(&self, volume: &str, epoch: u64) {
        let stop = Arc::new(StopSignal::default());
        let driver = Driver::new(
            self.slave.clone(),
            self.store.clone(),
            volume,
            DriverConfig {
                epoch,
                ..DriverConfig::default()
            },
            stop.clone(),
        );
        let task = tokio::spawn(async move { driver.run().await.expect("the driver failed") });
        let old = self
            .drivers
            .lock()
            .unwrap()
            .insert(volume.to_string(), Running { stop, task });
        assert!(old.is_none(), "{volume} had a driver already");
    }

    /// Starts migrating `volume` to `target` (epoch 1); returns once the
    /// session is past activation. Err: why it could not start (the record
    /// is removed, as if it never was).
    pub async fn migrate(
        &self,
        volume: &str,
        target: &Path,
        config: SessionConfig,
    ) -> Result<SessionRecord, String> {
        create_session(&self.store, volume, target, config, 1)
            .await
            .map_err(|e| e.to_string())?;
        self.drive(volume, 1);
        let t = Instant::now();
        loop {
            let rec = self.record(volume).expect("the session's record");
            match rec.phase {
                Phase::Activating => {}
                Phase::Failed if rec.phase_times.len() <= 1 => {
                    self.wait(volume).await;
                    let _ = std::fs::remove_file(self.store.path(volume));
                    return Err(rec.error.unwrap_or_default());
                }
                _ => return Ok(rec),
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{volume} never got past activation: {rec:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for `volume`'s driver to end; the final record.
    pub async fn wait(&self, volume: &str) -> SessionRecord {
        let running = self.drivers.lock().unwrap().remove(volume);
        match running {
            Some(r) => r
                .task
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())),
            None => self.record(volume).expect("no session of that volume"),
        }
    }

    /// Stops `volume`'s driver between two steps, as a master going away
    /// does: the session stays where it is on the agent.
    pub async fn stop(&self, volume: &str) -> SessionRecord {
        if let Some(r) = self.drivers.lock().unwrap().get(volume) {
            r.stop.stop();
        }
        self.wait(volume).await
    }

    /// Drives `volume`'s session again, as a restarted master does (one
    /// epoch up).
    pub fn restart(&self, volume: &str) {
        let rec = self.record(volume).expect("no session of that volume");
        self.drive(volume, rec.epoch + 1);
    }

    /// The record as it is now.
    pub fn record(&self, volume: &str) -> Option<SessionRecord> {
        self.store.load_now(volume).unwrap()
    }

    /// Rolls `volume`'s session back as `volmig abort` does: records the
    /// abort request, which the driver acts on (during a long step too: it
    /// interrupts the agent).
    pub async fn abort(&self, volume: &str) {
        request_abort(&self.store, volume).await.unwrap();
    }
}
