#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! Multi-attach volumes across real processes: one volume file served by
//! two agents at once (as a ReadWriteMany block volume is served on two
//! hosts), a writer on each agent's NBD export the whole time, each on its
//! own range. Agent a copies; agent b monitors its writes and hands them
//! over through the master; both quiesce, redirect and resume together.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;

const SIZE: u64 = 32 << 20;
const A_RANGE: (u64, u64) = (0, 8 << 20);
const B_RANGE: (u64, u64) = (8 << 20, 16 << 20);

struct Setup {
    lab: Lab,
    a: Agent,
    b: Agent,
    rt: tokio::runtime::Runtime,
    wa: Writer,
    wb: Writer,
}

/// Both agents export volume `rwx` from the same source file.
fn setup() -> Setup {
    let lab = Lab::new();
    lab.volume("rwx", SIZE);
    let a = lab.start_agent("a", &["rwx"], free_port(), &[]);
    let b = lab.start_agent("b", &["rwx"], free_port(), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let wa = Writer::start_in(&rt, lab.sock("a"), "rwx", A_RANGE.0, A_RANGE.1, SIZE);
    let wb = Writer::start_in(&rt, lab.sock("b"), "rwx", B_RANGE.0, B_RANGE.1, SIZE);
    std::thread::sleep(Duration::from_millis(200));
    Setup {
        lab,
        a,
        b,
        rt,
        wa,
        wb,
    }
}

fn shared(b: &Agent) -> Vec<String> {
    // A small bandwidth limit keeps the copy long enough for both writers
    // to dirty copied grains, so b's hand-overs matter.
    vec![
        "--shared-with".into(),
        b.url(),
        "--bandwidth".into(),
        "32Mi".into(),
    ]
}

fn finish(s: Setup) -> (Lab, Written) {
    // Writes after the cutover must land on the target through both agents.
    std::thread::sleep(Duration::from_millis(200));
    let wa = s.wa.finish(&s.rt);
    let wb = s.wb.finish(&s.rt);
    assert!(wa.n > 100 && wb.n > 100, "both writers ran throughout");
    drop((s.a, s.b));
    (s.lab, wa.merge(wb))
}

#[test]
fn a_volume_on_two_agents_migrates_with_every_write_of_both() {
    let s = setup();
    let out = s.lab.master(&s.a, "rwx", &shared(&s.b)).output().unwrap();
    assert!(
        out.status.success(),
        "multi-attach migration failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("shared by"),
        "status names the sharing agent: {text}"
    );
    let r = s.lab.record("rwx");
    assert_eq!(r["phase"], "Completed", "{r}");
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["shared_with"][0], s.b.url(), "{r}");
    let (lab, written) = finish(s);
    check_device(&lab.target("rwx"), &written);
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
        let st = s
            .lab
            .master(&s.a, "rwx", &shared(&s.b))
            .env("VOLMIG_FAULT", point)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(killed(&st), "{point}: not killed there ({st})");
        assert_eq!(s.lab.record("rwx")["epoch"], i as u64 + 1);
    }
    let out = s.lab.master(&s.a, "rwx", &shared(&s.b)).output().unwrap();
    assert!(
        out.status.success(),
        "the restarted master failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = s.lab.record("rwx");
    assert_eq!(r["phase"], "Completed", "{r}");
    assert_eq!(r["verified"], true, "{r}");
    let (lab, written) = finish(s);
    check_device(&lab.target("rwx"), &written);
}

#[test]
fn continuing_with_a_different_set_of_agents_is_refused() {
    let s = setup();
    let st = s
        .lab
        .master(&s.a, "rwx", &shared(&s.b))
        .env("VOLMIG_FAULT", "master:done:Copying")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(killed(&st));
    // b has tracked its writes since activation; dropping it would lose
    // them, adding a new agent would miss its earlier ones.
    let out = s
        .lab
        .master(&s.a, "rwx", &["--bandwidth".into(), "32Mi".into()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("same agents"), "{err}");
    // Continued as it was started, it completes.
    let out = s.lab.master(&s.a, "rwx", &shared(&s.b)).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (lab, written) = finish(s);
    check_device(&lab.target("rwx"), &written);
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
    let out = s
        .lab
        .master(&s.a, "rwx", &["--bandwidth".into(), "32Mi".into()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "completed without b's writes: {err}");
    assert!(err.contains("verification failed"), "{err}");
    let r = s.lab.record("rwx");
    assert_eq!(r["phase"], "Failed", "{r}");
    let log = std::fs::read_to_string(s.lab.p("a.log")).unwrap();
    assert!(
        log.contains("rolled back: the workload is on the source"),
        "agent a failed back to the complete source: {log}"
    );
    let _ = finish(s);
}
