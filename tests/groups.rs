#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! Several sessions from one master, across real processes: a consistency
//! group of three volumes on two agents (all switch or none), and eight
//! concurrent sessions with a ninth queued by the concurrency limit, every
//! volume with a writer over NBD the whole time.

use std::sync::Arc;
use std::time::Duration;

use volmig_testkit::agent::AgentProcess;
use volmig_testkit::devices::Mount;
use volmig_testkit::lab::Lab;
use volmig_testkit::master::MIGRATE_TIMEOUT;
use volmig_testkit::pattern::sparse_file;
use volmig_testkit::{ChildGuard, Expected, Writer, WriterOpts, require_root, run_cmd};

const SIZE: u64 = 32 << 20;
const HOT: u64 = 8 << 20;

fn ms(r: &serde_json::Value, phase: &str) -> u64 {
    r["phase_times"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["phase"] == phase)
        .unwrap_or_else(|| panic!("no {phase} in {r}"))["start_ms"]
        .as_u64()
        .unwrap()
}

/// A writer over NBD on each of a1 and a2 (agent a) and b1 (agent b).
fn group_writers(
    rt: &tokio::runtime::Runtime,
    a: &AgentProcess,
    b: &AgentProcess,
    expected: &[Arc<Expected>; 3],
) -> Vec<Writer> {
    [("a1", a), ("a2", a), ("b1", b)]
        .into_iter()
        .zip(expected)
        .map(|((v, agent), e)| agent.writer(rt.handle(), v, e.clone(), WriterOpts::hot(HOT)))
        .collect()
}

#[test]
fn group_of_three_on_two_agents_cuts_over_together() {
    let lab = Lab::with_tls();
    let expected = ["a1", "a2", "b1"].map(|v| lab.volume(v, SIZE));
    let a = lab.agent("a", &["a1", "a2"]).start();
    // Agent b takes 400 ms to answer a redirect: the volumes on agent a
    // must stay quiesced until b1 is redirected too.
    let b = lab
        .agent("b", &["b1"])
        .env("VOLMIG_FAULT_DELAY", "agent:done:redirect=400")
        .start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let writers = group_writers(&rt, &a, &b, &expected);
    std::thread::sleep(Duration::from_millis(200));

    let mut extra = lab.also(&a, "a2").to_vec();
    extra.extend(lab.also(&b, "b1"));
    extra.extend(["--group".into(), "g".into()]);
    let out = run_cmd(lab.migrate(&a, "a1", &extra), MIGRATE_TIMEOUT);
    assert!(out.ok(), "group migration failed:\n{}", out.text());
    let recs: Vec<_> = ["a1", "a2", "b1"].iter().map(|v| lab.record(v)).collect();
    for r in &recs {
        assert_eq!(r["phase"], "Completed", "{r}");
        assert_eq!(r["group"], "g");
        assert_eq!(r["redirected"], true);
        assert_eq!(r["verified"], true);
    }
    // One cut: no member resumed before every member was redirected, so
    // a1 and a2 stayed quiesced through b1's slow redirect (their stall,
    // measured by their agent, covers it).
    let last_redirect = recs.iter().map(|r| ms(r, "Redirecting")).max().unwrap();
    let first_resume = recs.iter().map(|r| ms(r, "Resuming")).min().unwrap();
    assert!(
        last_redirect <= first_resume,
        "a member resumed ({first_resume}) before another was redirected ({last_redirect})"
    );
    for (v, r) in ["a1", "a2"].iter().zip(&recs) {
        let stall = r["cutover_stall_ms"].as_f64().unwrap();
        assert!(
            stall >= 400.0,
            "{v} resumed {stall} ms after quiescing, before b1's redirect (400 ms) was done"
        );
    }
    std::thread::sleep(Duration::from_millis(200)); // writes land on the targets
    for ((w, v), e) in writers.into_iter().zip(["a1", "a2", "b1"]).zip(&expected) {
        let written = w.finish_on(&rt);
        assert!(
            written.writes > 100,
            "{v}: the writer ran through the migration"
        );
        e.check_device(&lab.target(v));
    }
}

#[test]
fn a_target_failure_in_one_member_rolls_the_whole_group_back() {
    let lab = Lab::with_tls();
    let expected = ["a1", "a2", "b1"].map(|v| lab.volume(v, SIZE));
    // A small tmpfs: a target file on it claims the volume's size but runs
    // out of space partway through the copy (a real ENOSPC from the
    // kernel).
    require_root("it injects a target failure with a small tmpfs");
    let small = Mount::tmpfs(&lab.p("small"), "8m");
    let bad_target = small.dir().join("b1.img");
    sparse_file(&bad_target, SIZE);
    let a = lab.agent("a", &["a1", "a2"]).start();
    let b = lab.agent("b", &["b1"]).start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let writers = group_writers(&rt, &a, &b, &expected);

    let mut extra = lab.also(&a, "a2").to_vec();
    extra.extend([
        "--volume".into(),
        format!("b1={}@{}", bad_target.display(), b.url()),
        "--group".into(),
        "g".into(),
    ]);
    let out = run_cmd(lab.migrate(&a, "a1", &extra), MIGRATE_TIMEOUT);
    assert!(!out.ok(), "the group must not complete: {}", out.text());
    let b1 = lab.record("b1");
    assert_eq!(b1["phase"], "Failed", "{b1}");
    let err = b1["error"].as_str().unwrap();
    assert!(err.contains("space"), "b1 fails for lack of space: {err}");
    for v in ["a1", "a2"] {
        let r = lab.record(v);
        assert_eq!(r["phase"], "Aborted", "{v}: {r}");
        assert_eq!(r["redirected"], false, "{v} stays on its source");
        let e = r["error"].as_str().unwrap_or_default();
        assert!(
            e.contains("rolled back with its group") && e.contains("b1"),
            "{v}: {e}"
        );
    }
    // Every workload kept running on its source, which holds every write.
    std::thread::sleep(Duration::from_millis(200));
    for ((w, v), e) in writers.into_iter().zip(["a1", "a2", "b1"]).zip(&expected) {
        let written = w.finish_on(&rt);
        assert!(written.writes > 50, "{v}: the writer kept going");
        e.check_device(&lab.source(v));
    }
}

#[test]
fn eight_sessions_under_writers_all_complete_and_the_ninth_waits_in_the_queue() {
    const N: usize = 9;
    const SMALL: u64 = 16 << 20;
    let lab = Lab::with_tls();
    let names: Vec<String> = (0..N).map(|i| format!("v{i}")).collect();
    let expected: Vec<_> = names.iter().map(|v| lab.volume(v, SMALL)).collect();
    let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    let a = lab.agent("a", &refs).start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let writers: Vec<Writer> = names
        .iter()
        .zip(&expected)
        .map(|(v, e)| a.writer(rt.handle(), v, e.clone(), WriterOpts::hot(4 << 20)))
        .collect();

    let mut extra = vec![
        "--max-concurrent".to_string(),
        "8".into(),
        // Slow enough that the ninth has to wait for a slot.
        "--bandwidth".into(),
        "8Mi".into(),
    ];
    for v in &names[1..] {
        extra.extend(lab.also(&a, v));
    }
    let mut master = ChildGuard::new(lab.migrate(&a, "v0", &extra).spawn().unwrap());
    // Watch the records: never more than eight sessions past the queue at
    // once, and one of them queued while eight run.
    let (mut saw_queued, mut max_running) = (false, 0);
    let status = loop {
        let recs: Vec<_> = names.iter().map(|v| lab.record(v)).collect();
        let queued = recs.iter().filter(|r| r["queued"] == true).count();
        let running = recs
            .iter()
            .filter(|r| {
                r["queued"] != true
                    && !r.is_null()
                    && !["Completed", "Aborted", "Failed"]
                        .contains(&r["phase"].as_str().unwrap_or(""))
                    && r["phase"] != "Activating"
            })
            .count();
        saw_queued |= queued == 1 && running == 8;
        max_running = max_running.max(running);
        if let Some(st) = master.try_wait() {
            break st;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "the master failed");
    assert!(
        max_running <= 8,
        "{max_running} sessions ran at once with a limit of 8"
    );
    assert!(
        saw_queued,
        "the ninth session never showed as queued while eight ran"
    );
    for v in &names {
        let r = lab.record(v);
        assert_eq!(r["phase"], "Completed", "{r}");
        assert_eq!(r["verified"], true);
        assert_eq!(r["queued"], false);
    }
    std::thread::sleep(Duration::from_millis(100));
    for ((w, v), e) in writers.into_iter().zip(&names).zip(&expected) {
        w.finish_on(&rt);
        e.check_device(&lab.target(v));
    }
}
