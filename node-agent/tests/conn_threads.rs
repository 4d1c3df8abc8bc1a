#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! Connections on their own threads (`volmig_api::io::threads`): the bound on
//! threads falls back to the shared runtime, and writes done inline on
//! connection threads keep the write-ordering argument of the interposer
//! (many concurrent fio writers, each verifying its own region, through a
//! Mirror and then a Background migration).

mod common;

use std::io;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Agent, MIB, Out, pattern_file, require_bin, run, run_cmd, sparse_file};
use volmig_agent::nbd::{Export, NbdClient, NbdServer};
use volmig_api::io::threads::may_block;
use volmig_api::io::{Extent, VolumeIo};

/// Remembers, per write offset, whether the write ran where it may block.
struct Probe {
    size: u64,
    data: Mutex<Vec<u8>>,
    seen: Mutex<Vec<(u64, bool)>>,
}

impl VolumeIo for Probe {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read(&self, offset: u64, mut buf: Vec<u8>) -> io::Result<Vec<u8>> {
        let d = self.data.lock().unwrap();
        let o = offset as usize;
        let n = buf.len();
        buf.copy_from_slice(&d[o..o + n]);
        Ok(buf)
    }

    async fn write(&self, offset: u64, buf: Vec<u8>, _fua: bool) -> io::Result<Vec<u8>> {
        self.seen.lock().unwrap().push((offset, may_block()));
        let o = offset as usize;
        self.data.lock().unwrap()[o..o + buf.len()].copy_from_slice(&buf);
        Ok(buf)
    }

    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    async fn trim(&self, _offset: u64, _length: u64) -> io::Result<()> {
        Ok(())
    }

    async fn write_zeroes(&self, _offset: u64, _length: u64, _may_trim: bool) -> io::Result<()> {
        Ok(())
    }

    async fn block_status(&self, _offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent {
            length,
            hole: false,
            zero: false,
        }])
    }
}

/// With room for two connection threads, four open connections: two run on
/// threads (their backend calls may block), two on the shared runtime
/// (they may not), and all four are served correctly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_thread_bound_run_on_the_shared_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let probe = Arc::new(Probe {
        size: 1 << 20,
        data: Mutex::new(vec![0; 1 << 20]),
        seen: Mutex::new(Vec::new()),
    });
    let server = NbdServer::new();
    server.set_connection_threads(2);
    server.add_export(Export::new("p", probe.clone())).unwrap();
    let handle = server.serve_unix(&sock).await.unwrap();

    let mut clients = Vec::new();
    for i in 0..4u64 {
        let mut c = NbdClient::connect_unix(&sock, "p").await.unwrap();
        let data = vec![i as u8 + 1; 4096];
        c.write(i * 4096, &data, false).await.unwrap();
        assert_eq!(c.read(i * 4096, 4096).await.unwrap(), data);
        clients.push(c);
    }
    let mut seen = probe.seen.lock().unwrap().clone();
    seen.sort_unstable();
    assert_eq!(
        seen,
        vec![(0, true), (4096, true), (8192, false), (12288, false)],
        "the first two connections get threads, the others the shared runtime"
    );
    for c in clients {
        c.disconnect().await.unwrap();
    }
    // Threads are returned: a new connection gets one again.
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let mut c = NbdClient::connect_unix(&sock, "p").await.unwrap();
            c.write(16384, &[9; 512], false).await.unwrap();
            c.disconnect().await.unwrap();
            let last = *probe.seen.lock().unwrap().last().unwrap();
            if last == (16384, true) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("connection threads were not returned");
    handle.shutdown().await.unwrap();
}

const JOBS: u64 = 4;
const REGION: u64 = 16 * MIB;

/// fio with `JOBS` jobs, each its own NBD connection (its own connection
/// thread) and its own region, writing 4 KiB blocks at queue depth 8 and
/// verifying them all at the end.
fn fio_writers(dir: &Path, uri: &str, seed: u64) -> Out {
    let mut cmd = Command::new(require_bin("fio", "fio"));
    cmd.current_dir(dir).args([
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
    ]);
    run_cmd(cmd, Duration::from_secs(300))
}

fn assert_fio_clean(out: &Out) {
    assert!(out.ok(), "fio failed:\n{}", out.text());
    assert!(out.stdout.contains("err= 0"), "fio error:\n{}", out.text());
    for bad in ["verify:", "bad magic", "crc32c: wanted", "io_u error"] {
        assert!(
            !out.stdout.contains(bad) && !out.stderr.contains(bad),
            "fio reported {bad:?}:\n{}",
            out.text()
        );
    }
}

fn migrate_under_writers(agent: &Agent, dir: &Path, target: &Path, mode: &str, seed: u64) {
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
    assert_eq!(agent.active_path("vol"), target.to_str().unwrap());
}

/// Concurrent writers on connection threads (inline writes: tracked in
/// Background mode, mirrored under `try_lock` in Mirror mode, the pool when
/// a copier holds the range) through two migrations: the agent's full
/// verify and fio's own verify of every block it wrote (read back from the
/// target after cutover) must both pass.
#[test]
fn concurrent_writers_on_connection_threads_verify_through_migrations() {
    let fio = require_bin("fio", "fio");
    let eng = run(&fio, &["--enghelp=nbd"]);
    assert!(eng.ok(), "fio lacks the nbd ioengine:\n{}", eng.text());

    let size = JOBS * REGION;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("source.img");
    let t1 = dir.path().join("t1.img");
    let t2 = dir.path().join("t2.img");
    pattern_file(&src, size, 3);
    sparse_file(&t1, size);
    sparse_file(&t2, size);
    let agent = Agent::start(dir.path(), &[("vol", &src)]);

    migrate_under_writers(&agent, dir.path(), &t1, "Mirror", 11);
    migrate_under_writers(&agent, dir.path(), &t2, "Background", 12);
}
