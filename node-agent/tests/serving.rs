#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! Volumes served at runtime, over the agent's gRPC API on its control
//! socket, against a real `volmig-agent serve` process and real NBD
//! clients: serving and unserving while a client uses another volume,
//! unserve refused while a migration holds the volume, a restarted agent
//! serving what it served (a migrated volume from its target), and a
//! device that cannot be opened failing only its volume.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{Agent, MIB, pattern, pattern_file, sparse_file, wait_until};
use volmig_api::slave::{Frontend, ListVolumes, ServeVolume, UnserveVolume, Unserved, VolumeInfo};
use volmig_api::{ErrorKind, Slave, SlaveResult};
use volmig_frontends::nbd::NbdClient;

const SIZE: u64 = 16 * MIB;
const BLOCK: u64 = 4096;

fn serve_req(volume: &str, backing: &Path) -> ServeVolume {
    ServeVolume {
        volume: volume.into(),
        backing: backing.into(),
        frontends: vec![Frontend::Nbd],
        direct: false,
    }
}

fn serve(a: &Agent, volume: &str, backing: &Path) -> SlaveResult<VolumeInfo> {
    a.master
        .block_on(a.master.agent().serve_volume(serve_req(volume, backing)))
}

fn unserve(a: &Agent, volume: &str) -> SlaveResult<Unserved> {
    a.master
        .block_on(a.master.agent().unserve_volume(UnserveVolume {
            volume: volume.into(),
        }))
}

fn list(a: &Agent) -> Vec<VolumeInfo> {
    a.master
        .block_on(a.master.agent().list_volumes(ListVolumes))
        .unwrap()
        .volumes
}

fn listed(a: &Agent, volume: &str) -> Option<VolumeInfo> {
    list(a).into_iter().find(|v| v.name == volume)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// What a writer did: blocks written with their generation, and the first
/// error it saw.
#[derive(Default)]
struct Writes {
    ops: AtomicU64,
    error: std::sync::Mutex<Option<String>>,
}

/// Writes block after block of `volume` (generation = pass number) until
/// stopped, reading each one back; the first failure is recorded.
async fn writer(sock: PathBuf, volume: String, w: Arc<Writes>, stop: Arc<AtomicBool>) {
    let fail = |e: String| *w.error.lock().unwrap() = Some(e);
    let mut c = match NbdClient::connect_unix(&sock, &volume).await {
        Ok(c) => c,
        Err(e) => return fail(format!("connect: {e}")),
    };
    let blocks = c.size() / BLOCK;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let (b, g) = (n % blocks, n / blocks + 1);
        let data = pattern(b * BLOCK, BLOCK as usize, g);
        if let Err(e) = c.write(b * BLOCK, &data, false).await {
            return fail(format!("write of block {b}: {e}"));
        }
        match c.read(b * BLOCK, BLOCK as usize).await {
            Ok(got) if got == data => {}
            Ok(_) => return fail(format!("block {b} read back other data")),
            Err(e) => return fail(format!("read of block {b}: {e}")),
        }
        n += 1;
        w.ops.store(n, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    if let Err(e) = c.flush().await {
        fail(format!("flush: {e}"));
    }
}

#[test]
fn serve_and_unserve_while_a_client_uses_another_volume() {
    let dir = tempfile::tempdir().unwrap();
    let (a_img, b_img) = (dir.path().join("a.img"), dir.path().join("b.img"));
    sparse_file(&a_img, SIZE);
    pattern_file(&b_img, SIZE, 7);
    let agent = Agent::start(dir.path(), &[("a", &a_img)]);
    let rt = rt();
    let (w, stop) = (
        Arc::new(Writes::default()),
        Arc::new(AtomicBool::new(false)),
    );
    let task = rt.spawn(writer(
        agent.nbd_sock.clone(),
        "a".into(),
        w.clone(),
        stop.clone(),
    ));
    wait_until("the writer on a", Duration::from_secs(30), || {
        w.ops.load(Ordering::Relaxed) > 50
    });

    // b is served at runtime, reachable over NBD at once, and serving it
    // again with the same settings changes nothing.
    let info = serve(&agent, "b", &b_img).unwrap();
    assert_eq!(
        (info.size, info.active.as_path(), info.error.as_deref()),
        (SIZE, b_img.as_path(), None)
    );
    assert_eq!(info.frontends, [Frontend::Nbd]);
    assert_eq!(serve(&agent, "b", &b_img).unwrap(), info);
    let other = dir.path().join("other.img");
    sparse_file(&other, SIZE);
    let e = serve(&agent, "b", &other).unwrap_err();
    assert_eq!(e.kind, ErrorKind::AlreadyExists, "{e}");
    let e = serve(&agent, "../x", &other).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
    let mut b = rt
        .block_on(NbdClient::connect_unix(&agent.nbd_sock, "b"))
        .unwrap();
    assert_eq!(
        rt.block_on(b.read(3 * MIB, 4096)).unwrap(),
        pattern(3 * MIB, 4096, 7)
    );
    rt.block_on(b.write(0, &[0xb0; 4096], false)).unwrap();
    let names: Vec<String> = list(&agent).into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["a", "b"]);

    // Unserved: its connection closes, new ones are refused, and the
    // volume is forgotten; a second unserve is no error.
    let before = w.ops.load(Ordering::Relaxed);
    assert!(unserve(&agent, "b").unwrap().was_served);
    assert!(
        rt.block_on(b.read(0, 4096)).is_err(),
        "an unserved volume's connection must be closed"
    );
    assert!(
        rt.block_on(NbdClient::connect_unix(&agent.nbd_sock, "b"))
            .is_err()
    );
    assert!(listed(&agent, "b").is_none());
    assert!(!unserve(&agent, "b").unwrap().was_served);
    let mut data = vec![0u8; 4096];
    {
        use std::os::unix::fs::FileExt;
        std::fs::File::open(&b_img)
            .unwrap()
            .read_exact_at(&mut data, 0)
            .unwrap();
    }
    assert_eq!(data, [0xb0; 4096], "b's write reached its device");

    // a's client never noticed.
    wait_until("the writer going on", Duration::from_secs(30), || {
        w.ops.load(Ordering::Relaxed) > before + 50
    });
    stop.store(true, Ordering::Relaxed);
    rt.block_on(task).unwrap();
    assert_eq!(*w.error.lock().unwrap(), None, "a's I/O was interrupted");
}

#[test]
fn unserve_is_refused_while_a_migration_holds_the_volume() {
    let dir = tempfile::tempdir().unwrap();
    let (src, tgt) = (dir.path().join("src.img"), dir.path().join("tgt.img"));
    pattern_file(&src, SIZE, 3);
    sparse_file(&tgt, SIZE);
    let agent = Agent::start(dir.path(), &[("vol", &src)]);
    // Slow enough to still be copying when unserve comes.
    agent.migrate("vol", &tgt, &["--bandwidth", "4Mi"]);
    let e = unserve(&agent, "vol").unwrap_err();
    assert_eq!(e.kind, ErrorKind::InUse, "{e}");
    let session = agent.status("vol")["record"]["session"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(e.message.contains(&session), "{e}");
    assert_eq!(listed(&agent, "vol").unwrap().session, Some(session));
    let st = agent.wait_terminal("vol", Duration::from_secs(120));
    agent.assert_completed(&st);
    // Finished: unserve is allowed, and forgets the session too.
    assert!(unserve(&agent, "vol").unwrap().was_served);
    assert!(listed(&agent, "vol").is_none());
    let state = dir.path().join("state");
    assert!(!state.join("vol.slave.json").exists());
    assert!(!state.join("served").join("vol.json").exists());
}

#[test]
fn a_restarted_agent_serves_what_it_served() {
    let dir = tempfile::tempdir().unwrap();
    let img = |n: &str| dir.path().join(n);
    pattern_file(&img("a.img"), SIZE, 1);
    pattern_file(&img("b.img"), SIZE, 2);
    sparse_file(&img("a-new.img"), SIZE);
    let agent = Agent::start(dir.path(), &[("a", &img("a.img"))]);
    serve(&agent, "b", &img("b.img")).unwrap();
    let out = agent.migrate_wait("a", &img("a-new.img"), &["--verify", "Full"]);
    assert!(out.ok(), "{}", out.text());
    assert_eq!(listed(&agent, "a").unwrap().backing, img("a-new.img"));
    let rt = rt();
    let write = |agent: &Agent, vol: &str, byte: u8| {
        let mut c = rt
            .block_on(NbdClient::connect_unix(&agent.nbd_sock, vol))
            .unwrap();
        rt.block_on(c.write(MIB, &[byte; 4096], true)).unwrap();
    };
    let read = |agent: &Agent, vol: &str| {
        let mut c = rt
            .block_on(NbdClient::connect_unix(&agent.nbd_sock, vol))
            .unwrap();
        rt.block_on(c.read(MIB, 4096)).unwrap()
    };
    write(&agent, "a", 0xa1);
    write(&agent, "b", 0xb1);
    // SIGKILL, then started again with no --export at all.
    drop(agent);
    let agent = Agent::start(dir.path(), &[]);
    let (a, b) = (listed(&agent, "a").unwrap(), listed(&agent, "b").unwrap());
    assert_eq!(
        a.active,
        img("a-new.img"),
        "a migrated volume from its target"
    );
    assert_eq!(b.active, img("b.img"));
    assert_eq!(read(&agent, "a"), [0xa1; 4096]);
    assert_eq!(read(&agent, "b"), [0xb1; 4096]);

    // Without the session's checkpoint, the persisted backing device says
    // where the volume lives now.
    std::fs::remove_file(dir.path().join("state").join("a.slave.json")).unwrap();
    drop(agent);
    let agent = Agent::start(dir.path(), &[]);
    assert_eq!(listed(&agent, "a").unwrap().active, img("a-new.img"));
    assert_eq!(read(&agent, "a"), [0xa1; 4096]);

    // The --export that first served it is the same request again, not a
    // conflict with the device it lives on now.
    drop(agent);
    let agent = Agent::start(dir.path(), &[("a", &img("a.img"))]);
    assert_eq!(listed(&agent, "a").unwrap().active, img("a-new.img"));
    assert_eq!(list(&agent).len(), 2);
}

#[test]
fn a_device_that_cannot_be_opened_fails_only_its_volume() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.img");
    let missing = dir.path().join("missing.img");
    pattern_file(&good, SIZE, 5);
    // Started with a missing device: the agent and its other volume live.
    let agent = Agent::start(dir.path(), &[("good", &good), ("bad", &missing)]);
    let bad = listed(&agent, "bad").expect("the failed volume is listed");
    let err = bad.error.clone().expect("with its error");
    assert!(
        err.contains(missing.to_str().unwrap()) && err.contains("No such file"),
        "{err}"
    );
    assert_eq!(listed(&agent, "good").unwrap().error, None);
    let rt = rt();
    let mut c = rt
        .block_on(NbdClient::connect_unix(&agent.nbd_sock, "good"))
        .unwrap();
    assert_eq!(rt.block_on(c.read(0, 4096)).unwrap(), pattern(0, 4096, 5));
    assert!(
        rt.block_on(NbdClient::connect_unix(&agent.nbd_sock, "bad"))
            .is_err()
    );

    // At runtime: a clear error naming the device, nothing else changes.
    let e = serve(&agent, "bad", &missing).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
    assert!(e.to_string().contains(missing.to_str().unwrap()), "{e}");
    let dirpath = dir.path().join("a-directory");
    std::fs::create_dir(&dirpath).unwrap();
    let e = serve(&agent, "other", &dirpath).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
    assert!(listed(&agent, "other").unwrap().error.is_some());
    rt.block_on(c.write(0, &[9; 4096], false)).unwrap();
    assert_eq!(rt.block_on(c.read(0, 4096)).unwrap(), [9; 4096]);

    // Once the device exists, serving it again succeeds.
    pattern_file(&missing, SIZE, 6);
    let info = serve(&agent, "bad", &missing).unwrap();
    assert_eq!(info.error, None);
    let mut c2 = rt
        .block_on(NbdClient::connect_unix(&agent.nbd_sock, "bad"))
        .unwrap();
    assert_eq!(rt.block_on(c2.read(0, 4096)).unwrap(), pattern(0, 4096, 6));
    // A failed volume can be unserved (forgotten) too.
    assert!(unserve(&agent, "other").unwrap().was_served);
    assert!(listed(&agent, "other").is_none());
}
