#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! Volumes served at runtime, over the agent's gRPC API on its control
//! socket, against a real `volmig-agent serve` process and real NBD
//! clients: serving and unserving while a client writes to another volume,
//! unserve refused while a migration holds the volume, a restarted agent
//! serving what it served (a migrated volume from its target), and a
//! device that cannot be opened failing only its volume.

use std::path::Path;
use std::time::Duration;

use volmig_api::slave::{Frontend, ServeVolume, UnserveVolume, Unserved, VolumeInfo};
use volmig_api::{ErrorKind, Slave, SlaveResult};
use volmig_frontends::nbd::NbdClient;
use volmig_testkit::agent::AgentProcess;
use volmig_testkit::pattern::{pattern, pattern_file, sparse_file};
use volmig_testkit::{Expected, MIB, WriterOpts, wait_until};

const SIZE: u64 = 16 * MIB;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn serve_req(volume: &str, backing: &Path) -> ServeVolume {
    ServeVolume {
        volume: volume.into(),
        backing: backing.into(),
        frontends: vec![Frontend::Nbd],
        direct: false,
    }
}

fn serve(
    rt: &tokio::runtime::Runtime,
    a: &AgentProcess,
    volume: &str,
    backing: &Path,
) -> SlaveResult<VolumeInfo> {
    rt.block_on(async { a.slave().serve_volume(serve_req(volume, backing)).await })
}

fn unserve(rt: &tokio::runtime::Runtime, a: &AgentProcess, volume: &str) -> SlaveResult<Unserved> {
    rt.block_on(async {
        a.slave()
            .unserve_volume(UnserveVolume {
                volume: volume.into(),
            })
            .await
    })
}

fn listed(a: &AgentProcess, volume: &str) -> Option<VolumeInfo> {
    a.volumes().into_iter().find(|v| v.name == volume)
}

async fn read(a: &AgentProcess, volume: &str, off: u64) -> Vec<u8> {
    let mut c = NbdClient::connect_unix(&a.nbd_sock, volume).await.unwrap();
    c.read(off, 4096).await.unwrap()
}

async fn write(a: &AgentProcess, volume: &str, off: u64, byte: u8) {
    let mut c = NbdClient::connect_unix(&a.nbd_sock, volume).await.unwrap();
    c.write(off, &[byte; 4096], true).await.unwrap();
}

#[test]
fn serve_and_unserve_while_a_client_writes_to_another_volume() {
    let dir = tempfile::tempdir().unwrap();
    let (a_img, b_img) = (dir.path().join("a.img"), dir.path().join("b.img"));
    sparse_file(&a_img, SIZE);
    pattern_file(&b_img, SIZE, 7);
    let agent = AgentProcess::builder(dir.path(), "n1")
        .export("a", &a_img)
        .start();
    let rt = rt();
    let expected = Expected::of_file(&a_img);
    let w = agent.writer(
        rt.handle(),
        "a",
        expected.clone(),
        WriterOpts::range(0, SIZE),
    );
    wait_until("the writer on a", Duration::from_secs(30), || {
        w.acked() > 50
    });

    // b is served at runtime, reachable over NBD at once, and serving it
    // again with the same settings changes nothing.
    let info = serve(&rt, &agent, "b", &b_img).unwrap();
    assert_eq!(
        (info.size, info.active.as_path(), info.error.as_deref()),
        (SIZE, b_img.as_path(), None)
    );
    assert_eq!(info.frontends, [Frontend::Nbd]);
    assert_eq!(serve(&rt, &agent, "b", &b_img).unwrap(), info);
    let other = dir.path().join("other.img");
    sparse_file(&other, SIZE);
    let e = serve(&rt, &agent, "b", &other).unwrap_err();
    assert_eq!(e.kind, ErrorKind::AlreadyExists, "{e}");
    let e = serve(&rt, &agent, "../x", &other).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
    let mut b = rt
        .block_on(NbdClient::connect_unix(&agent.nbd_sock, "b"))
        .unwrap();
    assert_eq!(
        rt.block_on(b.read(3 * MIB, 4096)).unwrap(),
        pattern(3 * MIB, 4096, 7)
    );
    rt.block_on(b.write(0, &[0xb0; 4096], false)).unwrap();
    let names: Vec<String> = agent.volumes().into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["a", "b"]);

    // Unserved: its connection closes, new ones are refused, and the
    // volume is forgotten; a second unserve is no error.
    let before = w.acked();
    assert!(unserve(&rt, &agent, "b").unwrap().was_served);
    assert!(
        rt.block_on(b.read(0, 4096)).is_err(),
        "an unserved volume's connection must be closed"
    );
    assert!(
        rt.block_on(NbdClient::connect_unix(&agent.nbd_sock, "b"))
            .is_err()
    );
    assert!(listed(&agent, "b").is_none());
    assert!(!unserve(&rt, &agent, "b").unwrap().was_served);
    let mut data = vec![0u8; 4096];
    {
        use std::os::unix::fs::FileExt;
        std::fs::File::open(&b_img)
            .unwrap()
            .read_exact_at(&mut data, 0)
            .unwrap();
    }
    assert_eq!(data, [0xb0; 4096], "b's write reached its device");

    // a's writer never saw an error (it fails the test if it does), and
    // every write it was acknowledged is on a's device.
    wait_until("the writer going on", Duration::from_secs(30), || {
        w.acked() > before + 50
    });
    w.finish_on(&rt);
    expected.check_device(&a_img);
}

#[test]
fn unserve_is_refused_while_a_migration_holds_the_volume() {
    let dir = tempfile::tempdir().unwrap();
    let (src, tgt) = (dir.path().join("src.img"), dir.path().join("tgt.img"));
    pattern_file(&src, SIZE, 3);
    sparse_file(&tgt, SIZE);
    let agent = AgentProcess::builder(dir.path(), "n1")
        .export("vol", &src)
        .start();
    let rt = rt();
    // Slow enough to still be copying when unserve comes.
    let mut m = agent.migrate("vol", &tgt, &["--bandwidth", "4Mi"]);
    let e = unserve(&rt, &agent, "vol").unwrap_err();
    assert_eq!(e.kind, ErrorKind::InUse, "{e}");
    let session = m.record()["session"].as_str().unwrap().to_string();
    assert!(e.message.contains(&session), "{e}");
    assert_eq!(listed(&agent, "vol").unwrap().session, Some(session));
    let rec = m.wait_terminal(Duration::from_secs(120));
    agent.assert_completed(&rec);
    // Finished: unserve is allowed, and forgets the session too.
    assert!(unserve(&rt, &agent, "vol").unwrap().was_served);
    assert!(listed(&agent, "vol").is_none());
    assert!(!agent.state_dir.join("vol.slave.json").exists());
    assert!(!agent.state_dir.join("served").join("vol.json").exists());
}

#[test]
fn a_restarted_agent_serves_what_it_served() {
    let dir = tempfile::tempdir().unwrap();
    let img = |n: &str| dir.path().join(n);
    pattern_file(&img("a.img"), SIZE, 1);
    pattern_file(&img("b.img"), SIZE, 2);
    sparse_file(&img("a-new.img"), SIZE);
    let rt = rt();
    let mut agent = AgentProcess::builder(dir.path(), "n1")
        .export("a", &img("a.img"))
        .start();
    serve(&rt, &agent, "b", &img("b.img")).unwrap();
    let out = agent.migrate_wait("a", &img("a-new.img"), &["--verify", "Full"]);
    assert!(out.ok(), "{}", out.text());
    assert_eq!(listed(&agent, "a").unwrap().backing, img("a-new.img"));
    rt.block_on(write(&agent, "a", MIB, 0xa1));
    rt.block_on(write(&agent, "b", MIB, 0xb1));

    // SIGKILL, then started again with no --export at all.
    agent.kill();
    let mut agent = AgentProcess::builder(dir.path(), "n1").start();
    let (a, b) = (listed(&agent, "a").unwrap(), listed(&agent, "b").unwrap());
    assert_eq!(
        a.active,
        img("a-new.img"),
        "a migrated volume from its target"
    );
    assert_eq!(b.active, img("b.img"));
    assert_eq!(rt.block_on(read(&agent, "a", MIB)), [0xa1; 4096]);
    assert_eq!(rt.block_on(read(&agent, "b", MIB)), [0xb1; 4096]);

    // Without the session's checkpoint, the persisted backing device says
    // where the volume lives now.
    std::fs::remove_file(agent.state_dir.join("a.slave.json")).unwrap();
    agent.kill();
    agent.start_again(&[]);
    assert_eq!(listed(&agent, "a").unwrap().active, img("a-new.img"));
    assert_eq!(rt.block_on(read(&agent, "a", MIB)), [0xa1; 4096]);

    // The --export that first served it is the same request again, not a
    // conflict with the device it lives on now.
    agent.kill();
    let agent = AgentProcess::builder(dir.path(), "n1")
        .export("a", &img("a.img"))
        .start();
    assert_eq!(listed(&agent, "a").unwrap().active, img("a-new.img"));
    assert_eq!(agent.volumes().len(), 2);
}

#[test]
fn a_device_that_cannot_be_opened_fails_only_its_volume() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.img");
    let missing = dir.path().join("missing.img");
    pattern_file(&good, SIZE, 5);
    // Started with a missing device: the agent and its other volume live.
    let agent = AgentProcess::builder(dir.path(), "n1")
        .export("good", &good)
        .export("bad", &missing)
        .start();
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
    let e = serve(&rt, &agent, "bad", &missing).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
    assert!(e.to_string().contains(missing.to_str().unwrap()), "{e}");
    let dirpath = dir.path().join("a-directory");
    std::fs::create_dir(&dirpath).unwrap();
    let e = serve(&rt, &agent, "other", &dirpath).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
    assert!(listed(&agent, "other").unwrap().error.is_some());
    rt.block_on(c.write(0, &[9; 4096], false)).unwrap();
    assert_eq!(rt.block_on(c.read(0, 4096)).unwrap(), [9; 4096]);

    // Once the device exists, serving it again succeeds.
    pattern_file(&missing, SIZE, 6);
    let info = serve(&rt, &agent, "bad", &missing).unwrap();
    assert_eq!(info.error, None);
    assert_eq!(rt.block_on(read(&agent, "bad", 0)), pattern(0, 4096, 6));
    // A failed volume can be unserved (forgotten) too.
    assert!(unserve(&rt, &agent, "other").unwrap().was_served);
    assert!(listed(&agent, "other").is_none());
}
