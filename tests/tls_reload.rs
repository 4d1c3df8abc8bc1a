#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! The certificates the operator issues (`volmig_operator::tls_issuer`),
//! between a real `volmig-agent` process and real masters: the agent and
//! the masters read them again for every connection, so renewed files are
//! used without a restart; during a CA rotation an agent and a master that
//! see different versions of the Secret (kubelet updates pods one by one)
//! still reach each other; files that are not there yet are waited for;
//! foreign certificates are refused. The files are put in place the way
//! kubelet updates a mounted Secret (`volmig_testkit::certs::project`).

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use volmig_api::Slave;
use volmig_api::slave::ListVolumes;
use volmig_master::{ClientTls, GrpcSlave};
use volmig_operator::tls_issuer::{
    AGENT, AGENT_KEY, CA, MASTER, MASTER_KEY, Material, Next, Policy, next,
};
use volmig_testkit::agent::AgentProcess;
use volmig_testkit::certs::project;
use volmig_testkit::pattern::volume_files;

const HOUR: i64 = 3600;

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn written(n: Next) -> (Material, String) {
    match n {
        Next::Write { material, step } => (material, step),
        Next::Wait(t) => panic!("nothing to do until {t}"),
    }
}

/// The Secret's versions through one CA rotation that is due now: created
/// 7 hours ago with a 10-hour CA, the new CA trusted, the certificates
/// issued by it, the old CA dropped. (No propagation delay here: the test
/// plays kubelet and decides who sees which version when.)
fn rotation() -> Vec<Material> {
    let p = Policy {
        agent_name: "volmig-agent".into(),
        ca_validity: Duration::from_secs(10 * HOUR as u64),
        cert_validity: Duration::from_secs(10 * HOUR as u64),
        propagation: Duration::ZERO,
    };
    let t = now();
    let (m0, _) = written(next(t - 7 * HOUR, None, &p).unwrap());
    let (m1, s1) = written(next(t, Some(&m0), &p).unwrap());
    let (m2, s2) = written(next(t, Some(&m1), &p).unwrap());
    let (m3, s3) = written(next(t, Some(&m2), &p).unwrap());
    assert!(s1.starts_with("CA rotation 1/3"), "{s1}");
    assert!(s2.starts_with("CA rotation 2/3"), "{s2}");
    assert!(s3.starts_with("CA rotation 3/3"), "{s3}");
    vec![m0, m1, m2, m3]
}

/// A fresh Secret of its own (another release, another CA).
fn other() -> Material {
    written(next(now(), None, &Policy::new("volmig-agent")).unwrap()).0
}

/// Kubelet updates the agent pod's files to `m`.
fn to_agent(dir: &Path, m: &Material) {
    project(
        dir,
        [CA, AGENT, AGENT_KEY].map(|k| (k, m.files[k].as_str())),
    );
}

/// Kubelet updates the operator pod's files to `m`.
fn to_master(dir: &Path, m: &Material) {
    project(
        dir,
        [CA, MASTER, MASTER_KEY].map(|k| (k, m.files[k].as_str())),
    );
}

fn client(dir: &Path, domain: &str) -> ClientTls {
    ClientTls {
        ca: dir.join("ca.pem"),
        cert: dir.join("master.pem"),
        key: dir.join("master-key.pem"),
        domain: domain.into(),
    }
}

/// A call over a new connection with the master files in `dir`.
async fn call(agent: &AgentProcess, dir: &Path, domain: &str) -> Result<usize, String> {
    let s = GrpcSlave::new(
        &format!("https://127.0.0.1:{}", agent.port()),
        Some(&client(dir, domain)),
    )
    .map_err(|e| e.to_string())?;
    s.list_volumes(ListVolumes)
        .await
        .map(|l| l.volumes.len())
        .map_err(|e| format!("{e} ({e:?})"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_and_masters_follow_a_ca_rotation_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (source, _) = volume_files(dir.path(), 1 << 20);
    let v = rotation();
    let (agent_dir, master_dir) = (dir.path().join("agent-tls"), dir.path().join("master-tls"));
    to_agent(&agent_dir, &v[0]);
    to_master(&master_dir, &v[0]);
    let agent = AgentProcess::builder(dir.path(), "a")
        .tls(&agent_dir)
        .export("data", &source)
        .start();
    let pid = agent.pid();
    assert_eq!(call(&agent, &master_dir, "volmig-agent").await, Ok(1));
    // A master made now, before the rotation: it connects (lazily) only
    // after it, with whatever files are there then.
    let early = GrpcSlave::new(
        &format!("https://127.0.0.1:{}", agent.port()),
        Some(&client(&master_dir, "volmig-agent")),
    )
    .unwrap();

    // Kubelet updates the two pods at different moments: at every step the
    // agent and the master hold adjacent versions, in either order.
    let steps: [(&str, usize, usize); 6] = [
        ("the agent trusts the new CA, the master not yet", 1, 0),
        (
            "the master has a certificate of the new CA, the agent's is of the old",
            1,
            2,
        ),
        ("both have certificates of the new CA", 2, 2),
        ("the master trusts the new CA only", 2, 3),
        ("both trust the new CA only", 3, 3),
        ("(and the agent first)", 3, 3),
    ];
    for (what, a, m) in steps {
        to_agent(&agent_dir, &v[a]);
        to_master(&master_dir, &v[m]);
        assert_eq!(
            call(&agent, &master_dir, "volmig-agent").await,
            Ok(1),
            "{what}: agent at version {a}, master at {m}\n{}",
            agent.log_text()
        );
    }
    // the master made before the rotation read its files when it connected
    assert_eq!(
        early
            .list_volumes(ListVolumes)
            .await
            .map(|l| l.volumes.len()),
        Ok(1),
        "a master must read renewed files when it connects"
    );
    // The agent really uses the new files: a master with the very first
    // ones (the old CA only) is refused now; the same agent process.
    let old = dir.path().join("old-master");
    to_master(&old, &v[0]);
    let e = call(&agent, &old, "volmig-agent").await.unwrap_err();
    assert!(e.contains("invalid peer certificate"), "{e}");
    assert_eq!(agent.pid(), pid, "the agent was not restarted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_waits_for_its_certificates_and_serves_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let (source, _) = volume_files(dir.path(), 1 << 20);
    let agent_dir = dir.path().join("agent-tls");
    let master_dir = dir.path().join("master-tls");
    std::fs::create_dir_all(&agent_dir).unwrap(); // an optional Secret not there yet: empty
    let agent = AgentProcess::builder(dir.path(), "a")
        .tls(&agent_dir)
        .tls_later()
        .export("data", &source)
        .start();
    // NBD and the control socket serve while the gRPC port waits
    assert!(agent.nbd_sock.exists() && agent.ctl_sock.exists());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", agent.port())).is_err(),
        "the gRPC port must stay closed without certificates"
    );
    assert!(
        agent.log_text().contains("waiting for the TLS files"),
        "{}",
        agent.log_text()
    );

    // the Secret appears
    let m = other();
    to_agent(&agent_dir, &m);
    to_master(&master_dir, &m);
    let t = Instant::now();
    loop {
        match call(&agent, &master_dir, "volmig-agent").await {
            Ok(n) => {
                assert_eq!(n, 1);
                break;
            }
            Err(e) => assert!(
                t.elapsed() < Duration::from_secs(20),
                "the agent did not take its certificates: {e}\n{}",
                agent.log_text()
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_certificates_are_refused_and_the_issued_ones_migrate() {
    let dir = tempfile::tempdir().unwrap();
    let (source, target) = volume_files(dir.path(), 8 << 20);
    let ours = other();
    let theirs = other();
    let certs = dir.path().join("tls");
    // one directory with both sides' files, as `volmig migrate --tls-dir` reads
    project(
        &certs,
        [CA, AGENT, AGENT_KEY, MASTER, MASTER_KEY].map(|k| (k, ours.files[k].as_str())),
    );
    let agent = AgentProcess::builder(dir.path(), "a")
        .tls(&certs)
        .export("data", &source)
        .start();

    // another release's CA: the master distrusts the agent
    let foreign = dir.path().join("foreign");
    to_master(&foreign, &theirs);
    let e = call(&agent, &foreign, "volmig-agent").await.unwrap_err();
    assert!(e.contains("invalid peer certificate"), "{e}");
    // our CA, but a client certificate of another: the agent refuses it
    let mixed = dir.path().join("mixed");
    project(
        &mixed,
        [
            (CA, ours.files[CA].as_str()),
            (MASTER, theirs.files[MASTER].as_str()),
            (MASTER_KEY, theirs.files[MASTER_KEY].as_str()),
        ],
    );
    call(&agent, &mixed, "volmig-agent").await.unwrap_err();
    // the wrong name for the agent
    let e = call(&agent, &certs, "not-volmig-agent").await.unwrap_err();
    assert!(e.contains("not valid for name"), "{e}");

    // and the operator's certificates carry a whole migration (volmig
    // migrate over mutual TLS), every block on the target
    let out = agent.migrate_wait(
        "data",
        &target,
        &["--tls-domain", "volmig-agent", "--verify", "Full"],
    );
    assert!(out.ok(), "{out:?}");
    assert_eq!(
        std::fs::read(&source).unwrap(),
        std::fs::read(&target).unwrap()
    );
}
