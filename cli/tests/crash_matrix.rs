#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! SIGKILL at every step, across real processes, a writer on NBD the whole
//! time: the master in every phase (before the step, and after the agent
//! did it but before the master recorded it), the agent right after it
//! quiesced and right after it redirected. Started again, each session
//! completes (or rolls back), and the device the writer ends up on holds
//! every acknowledged write.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use volmig_api::phase::Phase;

const SIZE: u64 = 16 << 20;
const HOT: u64 = 4 << 20;

/// Runs `vol`'s migration with `VOLMIG_FAULT=point` on the master, checks
/// the master died of it, runs it again and checks the outcome.
fn master_killed_at(lab: &Lab, agent: &Agent, vol: &str, point: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let w = Writer::start(&rt, lab.sock(&agent.name), vol, HOT, SIZE);
    std::thread::sleep(Duration::from_millis(100));
    // A small bandwidth limit keeps Copying long enough for writes to
    // dirty copied regions, and Background mode (Auto may mirror during the
    // copy pass and skip refresh) makes sure there is a refresh pass.
    let args: Vec<String> = ["--bandwidth", "16Mi", "--mode", "Background"]
        .map(String::from)
        .to_vec();
    let st = lab
        .master(agent, vol, &args)
        .env("VOLMIG_FAULT", point)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(
        killed(&st),
        "{point}: the master was not killed there ({st}); the step never happened? record: {}",
        lab.record(vol)
    );
    let out = lab.master(agent, vol, &args).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{point}: the restarted master failed: {text}"
    );
    let r = lab.record(vol);
    assert_eq!(r["phase"], "Completed", "{point}: {r}");
    assert_eq!(r["epoch"], 2, "{point}: continued under a new epoch");
    assert_eq!(r["verified"], true, "{point}");
    std::thread::sleep(Duration::from_millis(100));
    let written = w.finish(&rt);
    assert!(written.n > 20, "{point}: the writer ran");
    check_device(&lab.target(vol), &written);
}

#[test]
fn master_sigkilled_in_every_phase_continues_and_completes() {
    let lab = Lab::new();
    let mut cases = Vec::new();
    // Every phase a session passes through (the terminal ones have no step).
    let phases = Phase::ALL.into_iter().filter(|p| !p.is_terminal());
    for (i, phase) in phases.enumerate() {
        for when in ["enter", "done"] {
            cases.push((format!("v{i}{when}"), format!("master:{when}:{phase}")));
        }
    }
    for (vol, _) in &cases {
        lab.volume(vol, SIZE);
    }
    let vols: Vec<&str> = cases.iter().map(|(v, _)| v.as_str()).collect();
    let agent = lab.start_agent("a", &vols, free_port(), &[]);
    // Four at a time: each case is its own session on its own volume.
    for chunk in cases.chunks(4) {
        std::thread::scope(|s| {
            for (vol, point) in chunk {
                let (lab, agent) = (&lab, &agent);
                s.spawn(move || master_killed_at(lab, agent, vol, point));
            }
        });
    }
}

/// The agent dies right after `point`; it is started again on the same
/// state directory while the master keeps retrying.
fn agent_killed_at(point: &str) {
    let lab = Lab::new();
    lab.volume("vol", SIZE);
    let port = free_port();
    let mut agent = lab.start_agent("a", &["vol"], port, &[("VOLMIG_FAULT", point)]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let w = Writer::start(&rt, lab.sock("a"), "vol", HOT, SIZE);
    std::thread::sleep(Duration::from_millis(100));
    let args: Vec<String> = ["--bandwidth", "32Mi"].map(String::from).to_vec();
    let mut master = Proc(lab.master(&agent, "vol", &args).spawn().unwrap());
    // Wait for the agent to die at the point, then bring it back.
    let t = Instant::now();
    let mut proc = agent.proc.take().unwrap();
    let st = loop {
        if let Some(st) = proc.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{point}: the agent never got there: {}",
            lab.record("vol")
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(killed(&st), "{point}: the agent ended otherwise: {st}");
    let _agent = lab.start_agent("a", &["vol"], port, &[]);
    let t = Instant::now();
    let st = loop {
        if let Some(st) = master.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "{point}: the master never finished"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let r = lab.record("vol");
    std::thread::sleep(Duration::from_millis(200));
    let written = w.finish(&rt);
    assert!(written.n > 20, "{point}: the writer ran");
    // Completed: the workload is on the target; rolled back: on the source.
    // Either way that device holds every acknowledged write.
    match r["phase"].as_str().unwrap() {
        "Completed" => {
            assert!(st.success(), "{point}: {r}");
            assert_eq!(r["verified"], true);
            check_device(&lab.target("vol"), &written);
        }
        "Aborted" | "Failed" => {
            assert_eq!(r["redirected"], false, "{point}: {r}");
            check_device(&lab.source("vol"), &written);
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
