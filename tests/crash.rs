#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! SIGKILL the agent in the middle of a migration, start it again on the
//! same state directory: it resumes from its checkpoint (without copying
//! everything again) and ends with the target holding every acknowledged
//! write. The master (`volmig migrate`) keeps retrying while the agent is
//! down; a writer keeps writing through NBD the whole time, reconnecting
//! while the agent is down.

use std::time::Duration;

use volmig_testkit::agent::AgentProcess;
use volmig_testkit::pattern::volume_files;
use volmig_testkit::{ChildGuard, Expected, WriterOpts};

const SIZE: u64 = 128 << 20;
/// The writer's hot region: bounded so re-copies stay measurable.
const HOT: u64 = 8 << 20;

/// Runs a migration, kills the agent when `kill_when` holds of the
/// master's record, restarts it, and checks the result. Returns (bytes
/// copied before the kill, bytes the restarted agent copied).
fn crash_and_resume(
    mode: &str,
    extra: &[&str],
    kill_when: impl Fn(&serde_json::Value) -> bool,
    phase_at_kill: &str,
) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let (source, target) = volume_files(dir.path(), SIZE);
    let expected = Expected::pattern(SIZE, 0);
    let mut agent = AgentProcess::builder(dir.path(), "agent")
        .export("vol", &source)
        .start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let w = agent.writer(
        rt.handle(),
        "vol",
        expected.clone(),
        WriterOpts::hot(HOT)
            .pause(Duration::from_micros(300))
            .reconnecting(),
    );
    let master = agent.master();
    let mut args = vec!["--mode", mode];
    args.extend_from_slice(extra);
    let mut m = ChildGuard::new(
        master
            .command(&agent, "vol", &target, &args)
            .spawn()
            .unwrap(),
    );
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
    let at_kill = master.wait_record("vol", "at the kill point", |r| {
        kill_when(r) || rank(r["phase"].as_str().unwrap_or("")) > rank(phase_at_kill)
    });
    assert_eq!(
        at_kill["phase"], phase_at_kill,
        "the session went past the kill point before the test could kill it (machine too loaded?)"
    );
    agent.kill(); // SIGKILL
    let copied_before = at_kill["bytes_copied"].as_u64().unwrap();
    let acked_at_kill = w.acked();
    std::thread::sleep(Duration::from_millis(200));
    agent.start_again(&[]);
    let st = m.wait_timeout("the master", Duration::from_secs(120));
    let done = master.record("vol");
    std::thread::sleep(Duration::from_millis(200)); // write a little on the target
    let (reconnects, acked) = (w.reconnects(), w.acked());
    w.finish_on(&rt);
    assert_eq!(done["phase"], "Completed", "{done}\n{}", agent.log_text());
    assert!(st.success(), "the master failed ({st})");
    assert_eq!(done["resumes"], 1);
    assert_eq!(done["verified"], true);
    assert!(
        reconnects >= 1,
        "the writer must have lived through the crash"
    );
    assert!(
        acked > acked_at_kill + 10,
        "the writer kept writing after the restart"
    );
    let copied_after = agent.session_state(&done).bytes_copied;
    drop(agent);
    // Every write cut off by the crash was written again and acknowledged.
    assert_eq!(expected.uncertain_blocks(), 0);
    expected.check_device(&target);
    (copied_before, copied_after)
}

#[test]
fn sigkill_during_copy_resumes_from_checkpoint() {
    let (before, after) = crash_and_resume(
        "Auto",
        &["--bandwidth", "48Mi"],
        |r| r["phase"] == "Copying" && r["bytes_copied"].as_u64().unwrap_or(0) > SIZE / 2,
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
        |r| r["phase"] == "Refreshing" && r["progress"]["passes"].as_u64().unwrap_or(0) >= 2,
        "Refreshing",
    );
    eprintln!("copied {before} bytes before the kill, {after} after the restart");
    assert!(before >= SIZE);
    assert!(
        after < SIZE / 2,
        "restart copied {after} bytes: it started over"
    );
}
