#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! SIGKILL at every step, across real processes, a writer on NBD the whole
//! time: the master in every phase (before the step, and after the agent
//! did it but before the master recorded it), the agent right after it
//! quiesced and right after it redirected. Started again, each session
//! completes (or rolls back), and the device the writer ends up on holds
//! every acknowledged write.

use std::sync::Arc;
use std::time::Duration;

use volmig_api::phase::Phase;
use volmig_testkit::agent::AgentProcess;
use volmig_testkit::lab::Lab;
use volmig_testkit::master::MIGRATE_TIMEOUT;
use volmig_testkit::{ChildGuard, Expected, WriterOpts, killed, run_cmd};

const SIZE: u64 = 16 << 20;
const HOT: u64 = 4 << 20;

/// Runs `vol`'s migration with `VOLMIG_FAULT=point` on the master, checks
/// the master died of it, runs it again and checks the outcome.
fn master_killed_at(
    lab: &Lab,
    agent: &AgentProcess,
    vol: &str,
    expected: Arc<Expected>,
    point: &str,
) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let w = agent.writer(rt.handle(), vol, expected.clone(), WriterOpts::hot(HOT));
    std::thread::sleep(Duration::from_millis(100));
    // A small bandwidth limit keeps Copying long enough for writes to
    // dirty copied regions, and Background mode (Auto may mirror during the
    // copy pass and skip refresh) makes sure there is a refresh pass.
    let args = ["--bandwidth", "16Mi", "--mode", "Background"];
    let mut cmd = lab.migrate(agent, vol, &args);
    cmd.env("VOLMIG_FAULT", point);
    let out = run_cmd(cmd, MIGRATE_TIMEOUT);
    assert!(
        killed(&out.status),
        "{point}: the master was not killed there ({}); the step never happened? record: {}",
        out.status,
        lab.record(vol)
    );
    let out = run_cmd(lab.migrate(agent, vol, &args), MIGRATE_TIMEOUT);
    assert!(
        out.ok(),
        "{point}: the restarted master failed: {}",
        out.text()
    );
    let r = lab.record(vol);
    assert_eq!(r["phase"], "Completed", "{point}: {r}");
    assert_eq!(r["epoch"], 2, "{point}: continued under a new epoch");
    assert_eq!(r["verified"], true, "{point}");
    std::thread::sleep(Duration::from_millis(100));
    let written = w.finish_on(&rt);
    assert!(written.writes > 20, "{point}: the writer ran");
    expected.check_device(&lab.target(vol));
}

#[test]
fn master_sigkilled_in_every_phase_continues_and_completes() {
    let lab = Lab::with_tls();
    let mut cases = Vec::new();
    // Every phase a session passes through (the terminal ones have no step).
    let phases = Phase::ALL.into_iter().filter(|p| !p.is_terminal());
    for (i, phase) in phases.enumerate() {
        for when in ["enter", "done"] {
            cases.push((format!("v{i}{when}"), format!("master:{when}:{phase}")));
        }
    }
    let expected: Vec<Arc<Expected>> = cases.iter().map(|(v, _)| lab.volume(v, SIZE)).collect();
    let vols: Vec<&str> = cases.iter().map(|(v, _)| v.as_str()).collect();
    let agent = lab.agent("a", &vols).start();
    // Four at a time: each case is its own session on its own volume.
    let cases: Vec<_> = cases.into_iter().zip(expected).collect();
    for chunk in cases.chunks(4) {
        std::thread::scope(|s| {
            for ((vol, point), expected) in chunk {
                let (lab, agent) = (&lab, &agent);
                s.spawn(move || master_killed_at(lab, agent, vol, expected.clone(), point));
            }
        });
    }
}

/// The agent dies right after `point`; it is started again on the same
/// state directory while the master keeps retrying.
fn agent_killed_at(point: &str) {
    let lab = Lab::with_tls();
    let expected = lab.volume("vol", SIZE);
    let mut agent = lab.agent("a", &["vol"]).env("VOLMIG_FAULT", point).start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let w = agent.writer(
        rt.handle(),
        "vol",
        expected.clone(),
        WriterOpts::hot(HOT).reconnecting(),
    );
    std::thread::sleep(Duration::from_millis(100));
    let mut master = ChildGuard::new(
        lab.migrate(&agent, "vol", &["--bandwidth", "32Mi"])
            .spawn()
            .unwrap(),
    );
    // Wait for the agent to die at the point, then bring it back.
    let st = agent.wait_exit(Duration::from_secs(60));
    assert!(killed(&st), "{point}: the agent ended otherwise: {st}");
    agent.start_again(&[]);
    let st = master.wait_timeout(&format!("{point}: the master"), Duration::from_secs(120));
    let r = lab.record("vol");
    std::thread::sleep(Duration::from_millis(200));
    let written = w.finish_on(&rt);
    assert!(written.writes > 20, "{point}: the writer ran");
    // Completed: the workload is on the target; rolled back: on the source.
    // Either way that device holds every acknowledged write.
    match r["phase"].as_str().unwrap() {
        "Completed" => {
            assert!(st.success(), "{point}: {r}");
            assert_eq!(r["verified"], true);
            expected.check_device(&lab.target("vol"));
        }
        "Aborted" | "Failed" => {
            assert_eq!(r["redirected"], false, "{point}: {r}");
            expected.check_device(&lab.source("vol"));
        }
        p => panic!("{point}: the session ended in {p}: {r}"),
    }
    eprintln!(
        "{point}: the session ended {} after the agent restart",
        r["phase"]
    );
    // The agent was picked up again after its restart.
    assert!(
        r["resumes"].as_u64().unwrap_or(0) >= 1 || r["phase"] != "Completed",
        "{r}"
    );
}

#[test]
fn agent_sigkilled_right_after_quiescing() {
    agent_killed_at("agent:done:quiesce");
}

#[test]
fn agent_sigkilled_right_after_redirecting() {
    agent_killed_at("agent:done:redirect");
}
