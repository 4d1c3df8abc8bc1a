#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! Several sessions from one master, across real processes: a consistency
//! group of three volumes on two agents (all switch or none), and eight
//! concurrent sessions with a ninth queued by the concurrency limit, every
//! volume with a writer over NBD the whole time.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

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

#[test]
fn group_of_three_on_two_agents_cuts_over_together() {
    let lab = Lab::new();
    for v in ["a1", "a2", "b1"] {
        lab.volume(v, SIZE);
    }
    let a = lab.start_agent("a", &["a1", "a2"], free_port(), &[]);
    // Agent b takes 400 ms to answer a redirect: the volumes on agent a
    // must stay quiesced until b1 is redirected too.
    let b = lab.start_agent(
        "b",
        &["b1"],
        free_port(),
        &[("VOLMIG_FAULT_DELAY", "agent:done:redirect=400")],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let writers = [("a1", "a"), ("a2", "a"), ("b1", "b")]
        .map(|(v, ag)| Writer::start(&rt, lab.sock(ag), v, HOT, SIZE));
    std::thread::sleep(Duration::from_millis(200));

    let mut extra = lab.also(&a, "a2");
    extra.extend(lab.also(&b, "b1"));
    extra.extend(["--group".into(), "g".into()]);
    let out = lab.master(&a, "a1", &extra).output().unwrap();
    assert!(
        out.status.success(),
        "group migration failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
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
    for (w, v) in writers.into_iter().zip(["a1", "a2", "b1"]) {
        let written = w.finish(&rt);
        assert!(written.n > 100, "{v}: the writer ran through the migration");
        check_device(&lab.target(v), &written);
    }
}

/// A small tmpfs: a target file on it claims the volume's size but runs
/// out of space partway through the copy (a real ENOSPC from the kernel).
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(dir: std::path::PathBuf) -> SmallFs {
        std::fs::create_dir_all(&dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
            .arg(&dir)
            .status()
            .expect("running mount(8)");
        assert!(
            st.success(),
            "this test injects a target failure with a small tmpfs and needs root to mount it"
        );
        SmallFs(dir)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_target_failure_in_one_member_rolls_the_whole_group_back() {
    let lab = Lab::new();
    for v in ["a1", "a2", "b1"] {
        lab.volume(v, SIZE);
    }
    let small = SmallFs::mount(lab.p("small"));
    let bad_target = small.0.join("b1.img");
    std::fs::File::create(&bad_target)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let a = lab.start_agent("a", &["a1", "a2"], free_port(), &[]);
    let b = lab.start_agent("b", &["b1"], free_port(), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let writers = [("a1", "a"), ("a2", "a"), ("b1", "b")]
        .map(|(v, ag)| Writer::start(&rt, lab.sock(ag), v, HOT, SIZE));

    let mut extra = lab.also(&a, "a2");
    extra.extend([
        "--volume".into(),
        format!("b1={}@{}", bad_target.display(), b.url()),
        "--group".into(),
        "g".into(),
    ]);
    let out = lab.master(&a, "a1", &extra).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "the group must not complete: {text}");
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
    for (w, v) in writers.into_iter().zip(["a1", "a2", "b1"]) {
        let written = w.finish(&rt);
        assert!(written.n > 50, "{v}: the writer kept going");
        check_device(&lab.source(v), &written);
    }
}

#[test]
fn eight_sessions_under_writers_all_complete_and_the_ninth_waits_in_the_queue() {
    const N: usize = 9;
    const SMALL: u64 = 16 << 20;
    let lab = Lab::new();
    let names: Vec<String> = (0..N).map(|i| format!("v{i}")).collect();
    for v in &names {
        lab.volume(v, SMALL);
    }
    let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    let a = lab.start_agent("a", &refs, free_port(), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let writers: Vec<Writer> = names
        .iter()
        .map(|v| Writer::start(&rt, lab.sock("a"), v, 4 << 20, SMALL))
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
    let mut master = Proc(lab.master(&a, "v0", &extra).spawn().unwrap());
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
        if let Some(st) = master.0.try_wait().unwrap() {
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
    for (w, v) in writers.into_iter().zip(&names) {
        let written = w.finish(&rt);
        check_device(&lab.target(v), &written);
    }
}
