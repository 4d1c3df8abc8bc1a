#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! Multi-attach volumes across real processes: one volume file served by
//! two agents at once (as a ReadWriteMany block volume is served on two
//! hosts), a writer on each agent's NBD export the whole time, each on its
//! own range. Agent a copies; agent b monitors its writes and hands them
//! over through the master; both quiesce, redirect and resume together.

use std::sync::Arc;
use std::time::Duration;

use volmig_testkit::agent::AgentProcess;
use volmig_testkit::lab::Lab;
use volmig_testkit::master::MIGRATE_TIMEOUT;
use volmig_testkit::{Expected, Writer, WriterOpts, killed, run_cmd};

const SIZE: u64 = 32 << 20;
const A_RANGE: (u64, u64) = (0, 8 << 20);
const B_RANGE: (u64, u64) = (8 << 20, 16 << 20);

struct Setup {
    lab: Lab,
    a: AgentProcess,
    b: AgentProcess,
    rt: tokio::runtime::Runtime,
    wa: Writer,
    wb: Writer,
    /// What both writers wrote, together.
    expected: Arc<Expected>,
}

/// Both agents export volume `rwx` from the same source file.
fn setup() -> Setup {
    let lab = Lab::with_tls();
    let expected = lab.volume("rwx", SIZE);
    let a = lab.agent("a", &["rwx"]).start();
    let b = lab.agent("b", &["rwx"]).start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let writer = |agent: &AgentProcess, (lo, hi)| {
        let opts = WriterOpts::range(lo, hi).seed(0x9e37_79b9 ^ lo);
        agent.writer(rt.handle(), "rwx", expected.clone(), opts)
    };
    let (wa, wb) = (writer(&a, A_RANGE), writer(&b, B_RANGE));
    std::thread::sleep(Duration::from_millis(200));
    Setup {
        lab,
        a,
        b,
        rt,
        wa,
        wb,
        expected,
    }
}

fn shared(b: &AgentProcess) -> Vec<String> {
    // A small bandwidth limit keeps the copy long enough for both writers
    // to dirty copied grains, so b's hand-overs matter.
    vec![
        "--shared-with".into(),
        b.url(),
        "--bandwidth".into(),
        "32Mi".into(),
    ]
}

fn finish(s: Setup) -> (Lab, Arc<Expected>) {
    // Writes after the cutover must land on the target through both agents.
    std::thread::sleep(Duration::from_millis(200));
    let wa = s.wa.finish_on(&s.rt);
    let wb = s.wb.finish_on(&s.rt);
    assert!(
        wa.writes > 100 && wb.writes > 100,
        "both writers ran throughout"
    );
    drop((s.a, s.b));
    (s.lab, s.expected)
}

#[test]
fn a_volume_on_two_agents_migrates_with_every_write_of_both() {
    let s = setup();
    let out = run_cmd(s.lab.migrate(&s.a, "rwx", &shared(&s.b)), MIGRATE_TIMEOUT);
    assert!(out.ok(), "multi-attach migration failed:\n{}", out.text());
    assert!(
        out.stdout.contains("shared by"),
        "status names the sharing agent: {}",
        out.stdout
    );
    let r = s.lab.record("rwx");
    assert_eq!(r["phase"], "Completed", "{r}");
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["shared_with"][0], s.b.url(), "{r}");
    let (lab, expected) = finish(s);
    expected.check_device(&lab.target("rwx"));
}

#[test]
fn the_master_killed_mid_migration_loses_none_of_the_handed_over_writes() {
    // Killed right after a copy slice (grains of b taken and merged, the
    // batch not acknowledged yet) and again entering Synchronizing (b
    // quiesced, its last grains merged): each restart continues under a
    // newer epoch, b hands over again what was not acknowledged.
    let s = setup();
    for (i, point) in ["master:done:Copying", "master:enter:Synchronizing"]
        .iter()
        .enumerate()
    {
        let mut cmd = s.lab.migrate(&s.a, "rwx", &shared(&s.b));
        cmd.env("VOLMIG_FAULT", point);
        let out = run_cmd(cmd, MIGRATE_TIMEOUT);
        assert!(
            killed(&out.status),
            "{point}: not killed there ({})",
            out.status
        );
        assert_eq!(s.lab.record("rwx")["epoch"], i as u64 + 1);
    }
    let out = run_cmd(s.lab.migrate(&s.a, "rwx", &shared(&s.b)), MIGRATE_TIMEOUT);
    assert!(out.ok(), "the restarted master failed:\n{}", out.text());
    let r = s.lab.record("rwx");
    assert_eq!(r["phase"], "Completed", "{r}");
    assert_eq!(r["verified"], true, "{r}");
    let (lab, expected) = finish(s);
    expected.check_device(&lab.target("rwx"));
}

#[test]
fn continuing_with_a_different_set_of_agents_is_refused() {
    let s = setup();
    let mut cmd = s.lab.migrate(&s.a, "rwx", &shared(&s.b));
    cmd.env("VOLMIG_FAULT", "master:done:Copying");
    let out = run_cmd(cmd, MIGRATE_TIMEOUT);
    assert!(killed(&out.status));
    // b has tracked its writes since activation; dropping it would lose
    // them, adding a new agent would miss its earlier ones.
    let out = run_cmd(
        s.lab.migrate(&s.a, "rwx", &["--bandwidth", "32Mi"]),
        MIGRATE_TIMEOUT,
    );
    assert!(!out.ok());
    assert!(out.stderr.contains("same agents"), "{}", out.stderr);
    // Continued as it was started, it completes.
    let out = run_cmd(s.lab.migrate(&s.a, "rwx", &shared(&s.b)), MIGRATE_TIMEOUT);
    assert!(out.ok(), "{}", out.text());
    let (lab, expected) = finish(s);
    expected.check_device(&lab.target("rwx"));
}

/// The control: the same two writers with agent b left out of the
/// session. b's writes are neither tracked nor redirected, so the target
/// misses some of them: Terminate's verification finds the difference and
/// the session rolls back (the workload stays on the complete source). A
/// multi-attach that forgot b's writes would fail the tests above the same
/// way.
#[test]
fn without_shared_with_the_other_agents_writes_are_missed() {
    let s = setup();
    let out = run_cmd(
        s.lab.migrate(&s.a, "rwx", &["--bandwidth", "32Mi"]),
        MIGRATE_TIMEOUT,
    );
    assert!(!out.ok(), "completed without b's writes: {}", out.stderr);
    assert!(out.stderr.contains("verification failed"), "{}", out.stderr);
    let r = s.lab.record("rwx");
    assert_eq!(r["phase"], "Failed", "{r}");
    let log = s.a.log_text();
    assert!(
        log.contains("rolled back: the workload is on the source"),
        "agent a failed back to the complete source: {log}"
    );
    let _ = finish(s);
}
