#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! Local master mode across real processes: `volmig-agent serve` with mTLS,
//! `volmig migrate` as the master, a writer over NBD the whole time.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use volmig_api::Slave;
use volmig_api::{ErrorKind, Fence};
use volmig_frontends::nbd::NbdClient;
use volmig_master::GrpcSlave;

const SIZE: u64 = 128 << 20;
const HOT: u64 = 16 << 20;

/// One agent `a` exporting `vol`.
struct Env {
    lab: Lab,
    agent: Agent,
}

impl Env {
    fn p(&self, n: &str) -> std::path::PathBuf {
        self.lab.p(n)
    }

    fn master(&self, extra: &[&str]) -> std::process::Command {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        self.lab.master(&self.agent, "vol", &extra)
    }

    fn record(&self) -> serde_json::Value {
        self.lab.record("vol")
    }
}

/// `volmig migrate VOLUME TARGET` against the lab's agent.
fn migrate_cmd(env: &Env, volume: &str, target: &std::path::Path) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_volmig"));
    c.args(["migrate", "--quiet", "--state-dir"])
        .arg(env.p("master-state"))
        .arg("--agent")
        .arg(env.agent.url())
        .arg("--tls-dir")
        .arg(env.p("certs"))
        .arg(volume)
        .arg(target);
    c
}

fn setup() -> Env {
    let lab = Lab::new();
    lab.volume("vol", SIZE);
    let agent = lab.start_agent("a", &["vol"], free_port(), &[]);
    Env { lab, agent }
}

#[test]
fn master_sigkilled_mid_copy_continues_under_a_new_epoch() {
    let env = setup();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let w = Writer::start(&rt, env.lab.sock("a"), "vol", HOT, SIZE);

    // First master: killed with SIGKILL in the middle of the copy.
    let mut m1 = Proc(
        env.master(&["--bandwidth", "32Mi"])
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    loop {
        let r = env.record();
        if r["phase"] == "Copying" && r["bytes_copied"].as_u64().unwrap_or(0) > SIZE / 4 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "first master never got into the copy: {r}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    m1.0.kill().unwrap();
    m1.0.wait().unwrap();
    let at_kill = env.record();
    assert_eq!(at_kill["epoch"], 1);

    // The same command again: continues the session (epoch 2), completes.
    let out = env.master(&["--bandwidth", "32Mi"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "second master failed: {stderr}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr.contains("continuing session"), "{stderr}");
    let done = env.record();
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
        let slave = GrpcSlave::new(&env.agent.url(), Some(&env.lab.tls("certs"))).unwrap();
        let e = slave.get_state(fence(1)).await.unwrap_err();
        assert!(e.is(ErrorKind::Fenced), "{e}");
        let st = slave.get_state(fence(2)).await.unwrap();
        assert!(st.finished && st.redirected);
    });

    std::thread::sleep(Duration::from_millis(200)); // writes on the target
    let written = w.finish(&rt);
    assert!(
        written.n > 100,
        "the writer ran through the migration ({} writes)",
        written.n
    );
    check_device(&env.lab.target("vol"), &written);
}

#[test]
fn agent_refuses_masters_without_a_valid_client_certificate() {
    let env = setup();
    // A second CA: its master certificate is not trusted by the agent.
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_volmig"))
        .args(["certs", "--out"])
        .arg(env.p("other"))
        .status()
        .unwrap();
    assert!(st.success());
    let mut mixed = env.lab.tls("other");
    mixed.ca = env.p("certs").join("ca.pem"); // trusts the agent, but presents a foreign cert
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let step = Fence {
            session: "s".into(),
            volume: "vol".into(),
            epoch: 1,
        };
        let foreign = GrpcSlave::new(&env.agent.url(), Some(&mixed)).unwrap();
        let e = foreign.get_state(step.clone()).await.unwrap_err();
        // Reaching the service would answer NotFound (no such session).
        assert!(
            !e.is(ErrorKind::NotFound),
            "a foreign client certificate must not get through: {e}"
        );
        let plain = GrpcSlave::new(&format!("http://127.0.0.1:{}", env.agent.port), None).unwrap();
        let e = plain.get_state(step.clone()).await.unwrap_err();
        assert!(
            !e.is(ErrorKind::NotFound),
            "plain text must not get through: {e}"
        );
        // The right certificate gets an answer (no such session).
        let ok = GrpcSlave::new(&env.agent.url(), Some(&env.lab.tls("certs"))).unwrap();
        let e = ok.get_state(step).await.unwrap_err();
        assert!(e.is(ErrorKind::NotFound), "{e}");
    });
    // Nothing changed on the agent's side: no session was made.
    assert!(!env.p("a-state/vol.slave.json").exists());
}

#[test]
fn bad_requests_are_refused_and_change_nothing() {
    let env = setup();
    // a target smaller than the source: the master fails activation cleanly
    let small = env.p("small.img");
    std::fs::File::create(&small)
        .unwrap()
        .set_len(SIZE / 2)
        .unwrap();
    let out = migrate_cmd(&env, "vol", &small).output().unwrap();
    assert!(!out.status.success());
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("smaller"), "{text}");
    assert_eq!(env.record()["phase"], "Failed");
    // an unknown volume
    let out = migrate_cmd(&env, "nope", &env.lab.target("vol"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("unknown volume"), "{text}");
    // the source is untouched and serves as before
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = NbdClient::connect_unix(env.lab.sock("a"), "vol")
            .await
            .unwrap();
        let got = c.read(0, BLOCK as usize).await.unwrap();
        let mut want = vec![0u8; BLOCK as usize];
        fill(&mut want, 0, 0);
        assert_eq!(got, want);
    });
}
