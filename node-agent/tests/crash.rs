#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! SIGKILL the agent in the middle of a migration, start it again on the
//! same state directory: it resumes from its checkpoint (without copying
//! everything again) and ends with the target holding every acknowledged
//! write. A writer keeps writing through NBD the whole time, reconnecting
//! while the agent is down.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::master::{ProcMaster, session_config};
use volmig_frontends::nbd::NbdClient;

const BLOCK: u64 = 4096;
const SIZE: u64 = 128 << 20;
/// The writer's hot region: bounded so re-copies stay measurable.
const HOT: u64 = 8 << 20;

struct Agent {
    child: Child,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Env {
    /// Drives the migration over the agent's control socket; it outlives
    /// the agent's crash (its calls are retried until the agent is back).
    master: ProcMaster,
    dir: tempfile::TempDir,
}

impl Env {
    fn p(&self, n: &str) -> PathBuf {
        self.dir.path().join(n)
    }

    fn start(&self) -> Agent {
        let _ = std::fs::remove_file(self.p("nbd.sock"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.p("agent.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_volmig-agent"))
            .args(["serve", "--state-dir"])
            .arg(self.p("state"))
            .arg("--export")
            .arg(format!("vol={}", self.p("source.img").display()))
            .arg("--nbd-unix")
            .arg(self.p("nbd.sock"))
            .arg("--control")
            .arg(self.p("ctl.sock"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let t = Instant::now();
        while !self.p("nbd.sock").exists() || !self.p("ctl.sock").exists() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "agent did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Agent { child }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.p("agent.log")).unwrap_or_default()
    }

    fn status(&self) -> serde_json::Value {
        self.master
            .status_json("vol")
            .unwrap_or_else(|e| panic!("status failed: {e}"))
    }

    fn wait_until(&self, what: &str, f: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let t = Instant::now();
        loop {
            let s = self.status();
            if f(&s) {
                return s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "timed out waiting for {what}: {s}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

fn fill(buf: &mut [u8], b: u64, g: u32) {
    for (i, c) in buf.chunks_exact_mut(8).enumerate() {
        c.copy_from_slice(
            &((b << 32) ^ ((g as u64) << 16) ^ i as u64 ^ 0x5555_0000_0000_0000).to_le_bytes(),
        );
    }
}

struct Expected {
    gens: Vec<AtomicU32>,
    acked: AtomicU64,
    reconnects: AtomicU64,
}

/// Writes random blocks of the hot region; a write that fails because the
/// agent died is written again after reconnecting, so every block's
/// expected generation is known.
async fn writer(sock: PathBuf, exp: Arc<Expected>, stop: Arc<AtomicBool>) {
    let mut buf = vec![0u8; BLOCK as usize];
    let mut rng = 0x1234_5678u64;
    let mut pending: Option<(u64, u32)> = None;
    'outer: while !stop.load(Ordering::Relaxed) {
        let mut c = loop {
            match NbdClient::connect_unix(&sock, "vol").await {
                Ok(c) => break c,
                Err(_) if !stop.load(Ordering::Relaxed) => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(_) => break 'outer,
            }
        };
        while !stop.load(Ordering::Relaxed) {
            let (b, g) = pending.take().unwrap_or_else(|| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let b = rng % (HOT / BLOCK);
                (b, exp.gens[b as usize].load(Ordering::Relaxed) + 1)
            });
            fill(&mut buf, b, g);
            match c.write(b * BLOCK, &buf, false).await {
                Ok(()) => {
                    exp.gens[b as usize].store(g, Ordering::Relaxed);
                    exp.acked.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    // unacknowledged: the block may hold either version
                    // until it is written again, which happens first thing
                    pending = Some((b, g));
                    exp.reconnects.fetch_add(1, Ordering::Relaxed);
                    continue 'outer;
                }
            }
            tokio::time::sleep(Duration::from_micros(300)).await;
        }
    }
}

fn make_source(path: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(SIZE).unwrap();
    let mut buf = vec![0u8; (1 << 20) as usize];
    for mb in 0..SIZE >> 20 {
        for (i, c) in buf.chunks_exact_mut(BLOCK as usize).enumerate() {
            fill(c, (mb << 8) + i as u64, 0);
        }
        f.write_all_at(&buf, mb << 20).unwrap();
    }
}

fn check_target(target: &Path, exp: &Expected) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(target).unwrap();
    let (mut got, mut want) = (vec![0u8; BLOCK as usize], vec![0u8; BLOCK as usize]);
    for b in 0..SIZE / BLOCK {
        let g = if b < HOT / BLOCK {
            exp.gens[b as usize].load(Ordering::Relaxed)
        } else {
            0
        };
        fill(&mut want, b, g);
        f.read_exact_at(&mut got, b * BLOCK).unwrap();
        assert!(
            got == want,
            "target block {b} does not hold acknowledged generation {g}"
        );
    }
}

/// Runs a migration, kills the agent when `kill_when` holds, restarts it,
/// and checks the result. Returns (bytes copied before the kill, bytes the
/// restarted agent copied).
fn crash_and_resume(
    mode: &str,
    extra: &[&str],
    kill_when: impl Fn(&serde_json::Value) -> bool,
    phase_at_kill: &str,
) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let env = Env {
        master: ProcMaster::new(&dir.path().join("ctl.sock"), &dir.path().join("master")),
        dir,
    };
    make_source(&env.p("source.img"));
    std::fs::File::create(env.p("target.img"))
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let exp = Arc::new(Expected {
        gens: (0..HOT / BLOCK).map(|_| AtomicU32::new(0)).collect(),
        acked: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let mut agent = env.start();
    let w = rt.spawn(writer(env.p("nbd.sock"), exp.clone(), stop.clone()));
    let target = env.p("target.img");
    let mut args = vec!["--mode", mode];
    args.extend_from_slice(extra);
    env.master
        .migrate("vol", &target, session_config(&args))
        .unwrap();
    // Stop waiting as soon as the session is past the kill point: then the
    // assertion below says so at once instead of timing out.
    let order = [
        "Activating",
        "Copying",
        "Refreshing",
        "Quiescing",
        "Synchronizing",
        "Redirecting",
        "Resuming",
        "Terminating",
        "Completed",
        "Aborted",
        "Failed",
    ];
    let rank = |p: &str| order.iter().position(|x| *x == p).unwrap_or(0);
    let at_kill = env.wait_until("the kill point", |s| {
        kill_when(s) || rank(s["record"]["phase"].as_str().unwrap_or("")) > rank(phase_at_kill)
    });
    assert_eq!(
        at_kill["record"]["phase"], phase_at_kill,
        "the session went past the kill point before the test could kill it (machine too loaded?)"
    );
    agent.child.kill().unwrap(); // SIGKILL
    agent.child.wait().unwrap();
    let copied_before = at_kill["record"]["bytes_copied"].as_u64().unwrap();
    let acked_at_kill = exp.acked.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(200));
    let _agent2 = env.start();
    let done = env.wait_until("the end", |s| {
        let p = s["record"]["phase"].as_str().unwrap_or("");
        matches!(p, "Completed" | "Failed" | "Aborted")
    });
    std::thread::sleep(Duration::from_millis(200)); // write a little on the target
    stop.store(true, Ordering::Relaxed);
    rt.block_on(w).unwrap();
    assert_eq!(
        done["record"]["phase"],
        "Completed",
        "{done}\n{}",
        env.log()
    );
    assert_eq!(done["record"]["resumes"], 1);
    assert_eq!(done["record"]["verified"], true);
    assert!(
        exp.reconnects.load(Ordering::Relaxed) >= 1,
        "the writer must have lived through the crash"
    );
    assert!(
        exp.acked.load(Ordering::Relaxed) > acked_at_kill + 10,
        "the writer kept writing after the restart"
    );
    let copied_after = done["copied_this_run"].as_u64().unwrap();
    drop(_agent2);
    check_target(&target, &exp);
    (copied_before, copied_after)
}

#[test]
fn sigkill_during_copy_resumes_from_checkpoint() {
    let (before, after) = crash_and_resume(
        "Auto",
        &["--bandwidth", "48Mi"],
        |s| {
            s["record"]["phase"] == "Copying"
                && s["record"]["bytes_copied"].as_u64().unwrap_or(0) > SIZE / 2
        },
        "Copying",
    );
    eprintln!("copied {before} bytes before the kill, {after} after the restart");
    assert!(before > SIZE / 2);
    // Starting over would copy the whole volume again; the restarted agent
    // copies what was left plus re-copies of the writer's hot region.
    assert!(
        after < SIZE - before / 2,
        "restart copied {after} bytes: it started over"
    );
}

#[test]
fn sigkill_during_refresh_resumes_from_checkpoint() {
    let (before, after) = crash_and_resume(
        "Background",
        // slow enough that the refresh phase lasts seconds even under load
        &[
            "--bandwidth",
            "24Mi",
            "--sync-goal",
            "1ms",
            "--max-passes",
            "4",
        ],
        |s| {
            s["record"]["phase"] == "Refreshing"
                && s["record"]["progress"]["passes"].as_u64().unwrap_or(0) >= 2
        },
        "Refreshing",
    );
    eprintln!("copied {before} bytes before the kill, {after} after the restart");
    assert!(before >= SIZE);
    assert!(
        after < SIZE / 2,
        "restart copied {after} bytes: it started over"
    );
}
