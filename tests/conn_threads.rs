#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! NBD connections on their own threads (`volmig_api::io::threads`) in the
//! agent: writes done inline on connection threads keep the write-ordering
//! argument of the interposer (many concurrent fio writers, each verifying
//! its own region, through a Mirror and then a Background migration). The
//! bound on threads is tested with the NBD server alone, in
//! `frontends/tests/conn_threads.rs`.

use std::path::Path;
use std::time::Duration;

use volmig_testkit::agent::AgentProcess;
use volmig_testkit::fio::{assert_clean as assert_fio_clean, require_fio_nbd, run_fio};
use volmig_testkit::pattern::{pattern_file, sparse_file};
use volmig_testkit::{MIB, Out};

const JOBS: u64 = 4;
const REGION: u64 = 16 * MIB;

/// fio with `JOBS` jobs, each its own NBD connection (its own connection
/// thread) and its own region, writing 4 KiB blocks at queue depth 8 and
/// verifying them all at the end.
fn fio_writers(dir: &Path, uri: &str, seed: u64) -> Out {
    let args = [
        "--name=conn",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=8",
        &format!("--numjobs={JOBS}"),
        &format!("--size={}", REGION),
        &format!("--offset_increment={}", REGION),
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
        &format!("--randseed={seed}"),
        // 4 jobs x 4 MiB/s: about 4 s of writes, so they span the
        // migration of the 64 MiB volume at 32 MiB/s (2 s).
        "--rate=4m",
        "--group_reporting",
    ]
    .map(String::from);
    run_fio(dir, &args, Duration::from_secs(300))
}

fn migrate_under_writers(agent: &AgentProcess, dir: &Path, target: &Path, mode: &str, seed: u64) {
    let uri = agent.unix_uri("vol");
    let fio_dir = dir.to_path_buf();
    let writers = std::thread::spawn(move || fio_writers(&fio_dir, &uri, seed));
    std::thread::sleep(Duration::from_millis(500));
    let m = agent.migrate_wait(
        "vol",
        target,
        &["--mode", mode, "--bandwidth", "32Mi", "--verify", "Full"],
    );
    assert!(
        m.ok(),
        "{mode} migration failed:\n{}\nagent log:\n{}",
        m.text(),
        agent.log_text()
    );
    assert!(
        m.stdout.contains("verified    yes"),
        "{mode}: target differs from source:\n{}",
        m.text()
    );
    let out = writers.join().unwrap();
    assert_fio_clean(&out);
    assert_eq!(agent.active_path("vol"), target);
}

/// Concurrent writers on connection threads (inline writes: tracked in
/// Background mode, mirrored under `try_lock` in Mirror mode, the pool when
/// a copier holds the range) through two migrations: the agent's full
/// verify and fio's own verify of every block it wrote (read back from the
/// target after cutover) must both pass.
#[test]
fn concurrent_writers_on_connection_threads_verify_through_migrations() {
    require_fio_nbd();

    let size = JOBS * REGION;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("source.img");
    let t1 = dir.path().join("t1.img");
    let t2 = dir.path().join("t2.img");
    pattern_file(&src, size, 3);
    sparse_file(&t1, size);
    sparse_file(&t2, size);
    let agent = AgentProcess::builder(dir.path(), "agent")
        .export("vol", &src)
        .start();

    migrate_under_writers(&agent, dir.path(), &t1, "Mirror", 11);
    migrate_under_writers(&agent, dir.path(), &t2, "Background", 12);
}
