#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! Randomized concurrency: writers hammer a volume through the interposer
//! while a session migrates it through all eight phases. After every run the
//! device the workload ends on must hold exactly what the writers wrote.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::master::Master;

use rand::{Rng, SeedableRng, rngs::StdRng};
use volmig_agent::agent::Agent;
use volmig_agent::interposer::Interposer;
use volmig_agent::session::{CopyMode, Phase, SessionConfig, Verify};
use volmig_api::io::VolumeIo;

const BLOCK: u64 = 64 << 10;

fn make_file(path: &Path, size: u64, fill: Option<u8>) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    if let Some(b) = fill {
        use std::os::unix::fs::FileExt;
        // a few data regions, the rest sparse
        for i in (0..size).step_by((size / 8) as usize) {
            f.write_all_at(&vec![b; 100_000.min((size - i) as usize)], i)
                .unwrap();
        }
    }
}

struct Shadow(Mutex<Vec<u8>>);

/// Writer `id` of `n` owns the 64 KiB blocks with index % n == id, so the
/// expected image is well defined while every grain is shared by writers.
async fn writer(
    vol: Arc<Interposer>,
    shadow: Arc<Shadow>,
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
                shadow.0.lock().unwrap()[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize].fill(0);
            }
            _ => {
                let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                let copy = data.clone();
                vol.write(off, data, rng.random_range(0..50) == 0)
                    .await
                    .unwrap();
                shadow.0.lock().unwrap()[off as usize..(off + len) as usize].copy_from_slice(&copy);
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
    _dir: tempfile::TempDir,
    source: PathBuf,
    target: PathBuf,
    /// Drives the migrations, the agent its slave.
    master: Master<Arc<Agent>>,
    vol: Arc<Interposer>,
    shadow: Arc<Shadow>,
}

async fn setup(size: u64) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.img");
    let target = dir.path().join("target.img");
    make_file(&source, size, Some(0x5a));
    make_file(&target, size, None);
    let image = std::fs::read(&source).unwrap();
    let agent = Agent::new(&dir.path().join("state")).unwrap();
    let vol = agent.add_volume("vol", &source, false).await.unwrap();
    let master = Master::new(agent.clone(), &dir.path().join("master"));
    Run {
        _dir: dir,
        source,
        target,
        master,
        vol,
        shadow: Arc::new(Shadow(Mutex::new(image))),
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
                r.shadow.clone(),
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
        .expect("migration hung")
        .unwrap();
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
    let target = std::fs::read(&r.target).unwrap();
    let expect = r.shadow.0.lock().unwrap();
    if let Some(i) = target.iter().zip(expect.iter()).position(|(a, b)| a != b) {
        panic!(
            "seed {seed} {mode:?} hot={hot}: target differs from what the writers wrote at offset {i}"
        );
    }
    let _ = &r.source;
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
        r.shadow.clone(),
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
    assert_eq!(r.master.status("vol").unwrap().phase, Phase::Copying);
    r.master.abort("vol").await.unwrap();
    let st = r.master.wait("vol").await.unwrap();
    assert_eq!(st.phase, Phase::Aborted);
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    w.await.unwrap();
    assert_eq!(r.vol.active().path(), r.source.as_path());
    assert!(r.vol.link().is_none(), "monitor detached");
    let src = std::fs::read(&r.source).unwrap();
    assert!(
        src == *r.shadow.0.lock().unwrap(),
        "source holds every write"
    );
    // a new migration may start after an abort
    r.master
        .migrate("vol", &r.target, SessionConfig::default())
        .await
        .unwrap();
    assert_eq!(r.master.wait("vol").await.unwrap().phase, Phase::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_redirect_fails_back_to_source() {
    let r = setup(4 << 20).await;
    let config = SessionConfig {
        failback_window_ms: 5_000,
        ..SessionConfig::default()
    };
    r.master.migrate("vol", &r.target, config).await.unwrap();
    let s = r.master.status("vol").unwrap();
    let _ = s;
    for _ in 0..200 {
        if r.master.status("vol").unwrap().phase == Phase::Terminating {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(r.master.status("vol").unwrap().phase, Phase::Terminating);
    assert_eq!(r.vol.active().path(), r.target.as_path());
    r.vol.write(4096, vec![0xee; 8192], false).await.unwrap(); // mirrored back
    r.master.abort("vol").await.unwrap();
    let st = r.master.wait("vol").await.unwrap();
    assert_eq!(st.phase, Phase::Aborted, "{:?}", st.error);
    assert_eq!(r.vol.active().path(), r.source.as_path());
    let src = std::fs::read(&r.source).unwrap();
    assert!(
        src[4096..4096 + 8192].iter().all(|&b| b == 0xee),
        "write made on the target reached the source"
    );
}

#[tokio::test]
async fn bad_requests_change_nothing() {
    let r = setup(4 << 20).await;
    let before = std::fs::read(&r.source).unwrap();
    // target smaller than source
    let small = r._dir.path().join("small.img");
    make_file(&small, 1 << 20, None);
    let e = r
        .master
        .migrate("vol", &small, SessionConfig::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("smaller"), "{e}");
    // same device
    let e = r
        .master
        .migrate("vol", &r.source, SessionConfig::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("same device"), "{e}");
    // missing target
    let e = r
        .master
        .migrate("vol", &r._dir.path().join("nope"), SessionConfig::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
    // unknown volume
    let e = r
        .master
        .migrate("other", &r.target, SessionConfig::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("unknown volume"), "{e}");
    assert!(r.vol.link().is_none());
    assert!(
        r.master.status("vol").is_err(),
        "failed activations leave no session behind"
    );
    // two migrations at once
    let cfg = SessionConfig {
        bandwidth: 1 << 20,
        ..SessionConfig::default()
    };
    r.master
        .migrate("vol", &r.target, cfg.clone())
        .await
        .unwrap();
    let t2 = r._dir.path().join("t2.img");
    make_file(&t2, 4 << 20, None);
    let e = r.master.migrate("vol", &t2, cfg).await.unwrap_err();
    assert!(e.contains("already has a session in progress"), "{e}");
    r.master.abort("vol").await.unwrap();
    r.master.wait("vol").await.unwrap();
    assert_eq!(std::fs::read(&r.source).unwrap(), before);
}
