#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! Randomized concurrency: writers hammer a volume through the interposer
//! while a session migrates it through all eight phases (an in-process
//! master driving the in-process agent). After every run the device the
//! workload ends on must hold exactly what the writers wrote.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng, rngs::StdRng};
use volmig_api::io::VolumeIo;
use volmig_api::phase::{CopyMode, Phase};
use volmig_api::{SessionConfig, Verify};
use volmig_node_agent::agent::Agent;
use volmig_node_agent::interposer::Interposer;
use volmig_testkit::Expected;
use volmig_testkit::agent::{in_process, serve};
use volmig_testkit::master::InProcMaster;

const BLOCK: u64 = 64 << 10;

fn make_file(path: &Path, size: u64, fill: Option<u8>) {
    volmig_testkit::pattern::sparse_file(path, size);
    if let Some(b) = fill {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        // a few data regions, the rest sparse
        for i in (0..size).step_by((size / 8) as usize) {
            f.write_all_at(&vec![b; 100_000.min((size - i) as usize)], i)
                .unwrap();
        }
    }
}

/// Writer `id` of `n` owns the 64 KiB blocks with index % n == id, so the
/// expected image is well defined while every grain is shared by writers.
async fn writer(
    vol: Arc<Interposer>,
    expected: Arc<Expected>,
    id: u64,
    n: u64,
    seed: u64,
    hot: bool,
    ctl: Arc<Ctl>,
) -> u64 {
    let (stop, progress) = (&ctl.stop, &ctl.progress);
    let mut rng = StdRng::seed_from_u64(seed);
    let size = vol.size();
    let blocks = size / BLOCK;
    let mut ops = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let span = if hot { blocks.min(64) } else { blocks };
        let mut b = rng.random_range(0..span / n) * n + id;
        if b >= blocks {
            b = id;
        }
        let start = rng.random_range(0..BLOCK - 1);
        let len = rng.random_range(1..=BLOCK - start);
        let off = b * BLOCK + start;
        match rng.random_range(0..10) {
            0 => {
                // zero the whole owned block (write_zeroes, may trim)
                vol.write_zeroes(b * BLOCK, BLOCK, true).await.unwrap();
                expected.fill(b * BLOCK, BLOCK, 0);
            }
            _ => {
                let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                let copy = data.clone();
                vol.write(off, data, rng.random_range(0..50) == 0)
                    .await
                    .unwrap();
                expected.write(off, &copy);
            }
        }
        ops += 1;
        progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if ops.is_multiple_of(64) {
            tokio::task::yield_now().await;
        }
    }
    ops
}

/// Shared by the writers of one run: stop flag and acknowledged-op count.
#[derive(Default)]
struct Ctl {
    stop: std::sync::atomic::AtomicBool,
    progress: std::sync::atomic::AtomicU64,
}

/// Waits (without a deadline on speed) until the writers did `n` ops.
async fn wait_ops(progress: &std::sync::atomic::AtomicU64, n: u64) {
    while progress.load(std::sync::atomic::Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

struct Run {
    dir: tempfile::TempDir,
    source: PathBuf,
    target: PathBuf,
    agent: Arc<Agent>,
    master: InProcMaster<Arc<Agent>>,
    vol: Arc<Interposer>,
    expected: Arc<Expected>,
}

async fn setup(size: u64) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.img");
    let target = dir.path().join("target.img");
    make_file(&source, size, Some(0x5a));
    make_file(&target, size, None);
    let expected = Expected::of_file(&source);
    let agent = in_process(&dir.path().join("state"));
    let vol = serve(&agent, "vol", &source, false).await;
    let master = InProcMaster::new(agent.clone(), &dir.path().join("master"));
    Run {
        dir,
        source,
        target,
        agent,
        master,
        vol,
        expected,
    }
}

async fn migrate_under_writers(seed: u64, mode: CopyMode, hot: bool, grain: u64) {
    let size = 8 << 20;
    let r = setup(size).await;
    let ctl = Arc::new(Ctl::default());
    let (stop, progress) = (&ctl.stop, &ctl.progress);
    let n = 4;
    let writers: Vec<_> = (0..n)
        .map(|i| {
            tokio::spawn(writer(
                r.vol.clone(),
                r.expected.clone(),
                i,
                n,
                seed * 31 + i,
                hot,
                ctl.clone(),
            ))
        })
        .collect();
    wait_ops(progress, 100).await;
    let config = SessionConfig {
        mode,
        grain,
        chunk_size: grain * 4,
        in_flight: 4,
        sync_goal_ms: 50,
        bandwidth: 64 << 20,
        max_passes: 8,
        verify: Verify::Full,
        failback_window_ms: 100,
        ..SessionConfig::default()
    };
    r.master.migrate("vol", &r.target, config).await.unwrap();
    let st = tokio::time::timeout(Duration::from_secs(60), r.master.wait("vol"))
        .await
        .expect("migration hung");
    // keep writing a little on the target, then stop
    let at_end = progress.load(std::sync::atomic::Ordering::Relaxed);
    wait_ops(progress, at_end + 50).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut ops = 0;
    for w in writers {
        ops += w.await.unwrap();
    }
    assert_eq!(
        st.phase,
        Phase::Completed,
        "seed {seed} {mode:?}: {:?}",
        st.error
    );
    assert_eq!(st.verified, Some(true));
    assert!(ops >= 150, "writers must really have run ({ops} ops)");
    assert_eq!(
        r.vol.active().path(),
        r.target.as_path(),
        "workload ends on the target"
    );
    eprintln!("seed {seed} {mode:?} hot={hot}: {ops} writes");
    r.expected.check_device(&r.target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn background_mode_races() {
    for seed in 0..4 {
        migrate_under_writers(seed, CopyMode::Background, seed % 2 == 0, 4096).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mirror_mode_races() {
    for seed in 10..14 {
        migrate_under_writers(seed, CopyMode::Mirror, seed % 2 == 0, 4096).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_mode_races_with_default_grain() {
    for seed in 20..24 {
        migrate_under_writers(seed, CopyMode::Auto, seed % 2 == 1, 64 << 10).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn abort_mid_copy_leaves_workload_on_complete_source() {
    let r = setup(8 << 20).await;
    let ctl = Arc::new(Ctl::default());
    let (stop, progress) = (&ctl.stop, &ctl.progress);
    let w = tokio::spawn(writer(
        r.vol.clone(),
        r.expected.clone(),
        0,
        1,
        7,
        false,
        ctl.clone(),
    ));
    wait_ops(progress, 20).await;
    let config = SessionConfig {
        bandwidth: 2 << 20,
        ..SessionConfig::default()
    };
    r.master.migrate("vol", &r.target, config).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(r.master.record("vol").unwrap().phase, Phase::Copying);
    r.master.abort("vol").await;
    let st = r.master.wait("vol").await;
    assert_eq!(st.phase, Phase::Aborted);
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    w.await.unwrap();
    assert_eq!(r.vol.active().path(), r.source.as_path());
    assert!(r.vol.link().is_none(), "monitor detached");
    // the source holds every write
    r.expected.check_device(&r.source);
    // a new migration may start after an abort
    r.master
        .migrate("vol", &r.target, SessionConfig::default())
        .await
        .unwrap();
    assert_eq!(r.master.wait("vol").await.phase, Phase::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_redirect_fails_back_to_source() {
    let r = setup(4 << 20).await;
    let config = SessionConfig {
        failback_window_ms: 5_000,
        ..SessionConfig::default()
    };
    r.master.migrate("vol", &r.target, config).await.unwrap();
    for _ in 0..200 {
        if r.master.record("vol").unwrap().phase == Phase::Terminating {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(r.master.record("vol").unwrap().phase, Phase::Terminating);
    assert_eq!(r.vol.active().path(), r.target.as_path());
    r.vol.write(4096, vec![0xee; 8192], false).await.unwrap(); // mirrored back
    r.master.abort("vol").await;
    let st = r.master.wait("vol").await;
    assert_eq!(st.phase, Phase::Aborted, "{:?}", st.error);
    assert_eq!(r.vol.active().path(), r.source.as_path());
    let src = std::fs::read(&r.source).unwrap();
    assert!(
        src[4096..4096 + 8192].iter().all(|&b| b == 0xee),
        "write made on the target reached the source"
    );
}

/// An abort in the failback window while writers keep writing (each
/// mirrored write slowed between target and source): a mirrored write
/// marks its range dirty until the source has it too, so an abort that
/// looked at the dirty map before draining the writes in flight refused to
/// fail back ("the source is not current") and left the workload on the
/// target. It fails back, every time, with every acknowledged write on the
/// source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_redirect_under_writes_fails_back_to_source() {
    // Every mirrored write dwells between its two devices, so the abort
    // always comes while one is half done.
    // SAFETY: set before anything of this test's process reads the
    // environment (nextest runs each test in a process of its own).
    unsafe { std::env::set_var("VOLMIG_FAULT_DELAY", "agent:mirrored-write=20") };
    for round in 0..3u64 {
        let r = setup(4 << 20).await;
        let config = SessionConfig {
            failback_window_ms: 10_000,
            ..SessionConfig::default()
        };
        r.master.migrate("vol", &r.target, config).await.unwrap();
        let t = std::time::Instant::now();
        while r.master.record("vol").unwrap().phase != Phase::Terminating {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{:?}",
                r.master.record("vol")
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(r.vol.active().path(), r.target.as_path());
        let ctl = Arc::new(Ctl::default());
        let writers: Vec<_> = (0..2)
            .map(|i| {
                tokio::spawn(writer(
                    r.vol.clone(),
                    r.expected.clone(),
                    i,
                    2,
                    round * 7 + i,
                    true,
                    ctl.clone(),
                ))
            })
            .collect();
        wait_ops(&ctl.progress, 200).await;
        r.master.abort("vol").await;
        let st = r.master.wait("vol").await;
        ctl.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for w in writers {
            w.await.unwrap();
        }
        assert_eq!(st.phase, Phase::Aborted, "round {round}: {:?}", st.error);
        assert_eq!(
            r.vol.active().path(),
            r.source.as_path(),
            "round {round}: failed back"
        );
        r.expected.check_device(&r.source);
    }
}

#[tokio::test]
async fn bad_requests_change_nothing() {
    let r = setup(4 << 20).await;
    let before = std::fs::read(&r.source).unwrap();
    // target smaller than source
    let small = r.dir.path().join("small.img");
    make_file(&small, 1 << 20, None);
    let e = r
        .master
        .migrate("vol", &small, SessionConfig::default())
        .await
        .unwrap_err();
    assert!(e.contains("smaller"), "{e}");
    // same device
    let e = r
        .master
        .migrate("vol", &r.source, SessionConfig::default())
        .await
        .unwrap_err();
    assert!(e.contains("same device"), "{e}");
    // missing target
    let e = r
        .master
        .migrate("vol", &r.dir.path().join("nope"), SessionConfig::default())
        .await
        .unwrap_err();
    assert!(e.contains("nope"), "{e}");
    // unknown volume
    let e = r
        .master
        .migrate("other", &r.target, SessionConfig::default())
        .await
        .unwrap_err();
    assert!(e.contains("unknown volume"), "{e}");
    assert!(r.vol.link().is_none());
    // failed activations leave no session behind, on either side
    assert!(r.master.record("vol").is_none());
    assert!(r.agent.list()[0].session.is_none());
    // two migrations at once: refused by the master that runs one ...
    let cfg = SessionConfig {
        // slow: the session is still copying when the second one comes
        bandwidth: 256 << 10,
        ..SessionConfig::default()
    };
    r.master
        .migrate("vol", &r.target, cfg.clone())
        .await
        .unwrap();
    let t2 = r.dir.path().join("t2.img");
    make_file(&t2, 4 << 20, None);
    let e = r.master.migrate("vol", &t2, cfg.clone()).await.unwrap_err();
    assert!(e.contains("already has a session"), "{e}");
    // ... and by the agent to any other master (the first one gone, so no
    // step of it holds the volume)
    let st = r.master.stop("vol").await;
    assert!(!st.phase.is_terminal(), "{st:?}");
    let other = InProcMaster::new(r.agent.clone(), &r.dir.path().join("other-master"));
    let e = other.migrate("vol", &t2, cfg).await.unwrap_err();
    assert!(e.contains("already has a migration"), "{e}");
    r.master.abort("vol").await;
    r.master.restart("vol");
    assert_eq!(r.master.wait("vol").await.phase, Phase::Aborted);
    assert_eq!(std::fs::read(&r.source).unwrap(), before);
}
