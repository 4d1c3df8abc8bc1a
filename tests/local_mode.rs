#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! Local master mode across real processes: `volmig-agent serve` with mTLS,
//! `volmig migrate` as the master, a writer over NBD the whole time.

use std::process::Stdio;
use std::time::{Duration, Instant};

use volmig_api::Slave;
use volmig_api::{ErrorKind, Fence};
use volmig_frontends::nbd::NbdClient;
use volmig_master::GrpcSlave;
use volmig_testkit::agent::AgentProcess;
use volmig_testkit::lab::Lab;
use volmig_testkit::master::{MIGRATE_TIMEOUT, NO_ARGS};
use volmig_testkit::{BLOCK, ChildGuard, Expected, WriterOpts, certs, fill, run_cmd};

const SIZE: u64 = 128 << 20;
const HOT: u64 = 16 << 20;

/// One agent `a` exporting `vol`, reached with mutual TLS.
fn setup() -> (Lab, AgentProcess, std::sync::Arc<Expected>) {
    let lab = Lab::with_tls();
    let expected = lab.volume("vol", SIZE);
    let agent = lab.agent("a", &["vol"]).start();
    (lab, agent, expected)
}

#[test]
fn master_sigkilled_mid_copy_continues_under_a_new_epoch() {
    let (lab, agent, expected) = setup();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let w = agent.writer(rt.handle(), "vol", expected.clone(), WriterOpts::hot(HOT));
    let args = ["--bandwidth", "32Mi"];

    // First master: killed with SIGKILL in the middle of the copy.
    let mut m1 = ChildGuard::new(
        lab.migrate(&agent, "vol", &args)
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    loop {
        let r = lab.record("vol");
        if r["phase"] == "Copying" && r["bytes_copied"].as_u64().unwrap_or(0) > SIZE / 4 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "first master never got into the copy: {r}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    m1.kill();
    let at_kill = lab.record("vol");
    assert_eq!(at_kill["epoch"], 1);

    // The same command again: continues the session (epoch 2), completes.
    let out = run_cmd(lab.migrate(&agent, "vol", &args), MIGRATE_TIMEOUT);
    assert!(out.ok(), "second master failed:\n{}", out.text());
    assert!(out.stdout.contains("continuing session"), "{}", out.text());
    let done = lab.record("vol");
    assert_eq!(done["phase"], "Completed");
    assert_eq!(done["epoch"], 2);
    assert_eq!(
        done["session"], at_kill["session"],
        "the same session was continued"
    );
    assert_eq!(done["verified"], true);

    // The deposed master's epoch is refused by the agent.
    let fence = |epoch| Fence {
        session: done["session"].as_str().unwrap().to_string(),
        volume: "vol".into(),
        epoch,
    };
    rt.block_on(async {
        let slave = agent.slave();
        let e = slave.get_state(fence(1)).await.unwrap_err();
        assert!(e.is(ErrorKind::Fenced), "{e}");
        let st = slave.get_state(fence(2)).await.unwrap();
        assert!(st.finished && st.redirected);
    });

    std::thread::sleep(Duration::from_millis(200)); // writes on the target
    let written = w.finish_on(&rt);
    assert!(
        written.writes > 100,
        "the writer ran through the migration ({} writes)",
        written.writes
    );
    expected.check_device(&lab.target("vol"));
}

#[test]
fn agent_refuses_masters_without_a_valid_client_certificate() {
    let (lab, agent, _) = setup();
    // A second CA: its master certificate is not trusted by the agent.
    certs::make(&lab.p("other"));
    let mut mixed = certs::client_tls(&lab.p("other"));
    mixed.ca = lab.certs().join("ca.pem"); // trusts the agent, but presents a foreign cert
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let step = Fence {
            session: "s".into(),
            volume: "vol".into(),
            epoch: 1,
        };
        let foreign = GrpcSlave::new(&agent.url(), Some(&mixed)).unwrap();
        let e = foreign.get_state(step.clone()).await.unwrap_err();
        // Reaching the service would answer NotFound (no such session).
        assert!(
            !e.is(ErrorKind::NotFound),
            "a foreign client certificate must not get through: {e}"
        );
        let plain = GrpcSlave::new(&format!("http://127.0.0.1:{}", agent.port()), None).unwrap();
        let e = plain.get_state(step.clone()).await.unwrap_err();
        assert!(
            !e.is(ErrorKind::NotFound),
            "plain text must not get through: {e}"
        );
        // The right certificate gets an answer (no such session).
        let e = agent.slave().get_state(step).await.unwrap_err();
        assert!(e.is(ErrorKind::NotFound), "{e}");
    });
    // Nothing changed on the agent's side: no session was made.
    assert!(!agent.state_dir.join("vol.slave.json").exists());
}

#[test]
fn bad_requests_are_refused_and_change_nothing() {
    let (lab, agent, _) = setup();
    let master = lab.master();
    // a target smaller than the source: the master fails activation cleanly
    let small = lab.p("small.img");
    volmig_testkit::pattern::sparse_file(&small, SIZE / 2);
    let out = run_cmd(
        master.command(&agent, "vol", &small, NO_ARGS),
        MIGRATE_TIMEOUT,
    );
    assert!(!out.ok());
    assert!(out.both().contains("smaller"), "{}", out.text());
    assert_eq!(lab.record("vol")["phase"], "Failed");
    // an unknown volume
    let out = run_cmd(
        master.command(&agent, "nope", &lab.target("vol"), NO_ARGS),
        MIGRATE_TIMEOUT,
    );
    assert!(!out.ok());
    assert!(out.both().contains("unknown volume"), "{}", out.text());
    // the source is untouched and serves as before
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = NbdClient::connect_unix(&agent.nbd_sock, "vol")
            .await
            .unwrap();
        let got = c.read(0, BLOCK as usize).await.unwrap();
        let mut want = vec![0u8; BLOCK as usize];
        fill(&mut want, 0, 0);
        assert_eq!(got, want);
    });
}
