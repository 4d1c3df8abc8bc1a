#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! Local master mode across real processes: `volmig-agent serve` with mTLS,
//! `volmig migrate` as the master, a writer over NBD the whole time.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use volmig_agent::nbd::NbdClient;
use volmig_api::agent::{Fence, Step};
use volmig_api::{Slave, SlaveError};
use volmig_master::{ClientTls, GrpcSlave};

const SIZE: u64 = 128 << 20;
const BLOCK: u64 = 4096;
const HOT: u64 = 16 << 20;

fn agent_bin() -> PathBuf {
    let volmig = PathBuf::from(env!("CARGO_BIN_EXE_volmig"));
    let agent = volmig.with_file_name("volmig-agent");
    if !agent.exists() {
        let profile = if volmig.parent().unwrap().ends_with("release") {
            vec!["--release"]
        } else {
            vec![]
        };
        let st = Command::new(env!("CARGO"))
            .args(["build", "-p", "volmig-agent"])
            .args(profile)
            .status()
            .unwrap();
        assert!(st.success(), "building volmig-agent for the test failed");
    }
    agent
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn fill(buf: &mut [u8], b: u64, g: u32) {
    for (i, c) in buf.chunks_exact_mut(8).enumerate() {
        c.copy_from_slice(&((b << 32) ^ ((g as u64) << 16) ^ i as u64 ^ 0x7777).to_le_bytes());
    }
}

struct Env {
    dir: tempfile::TempDir,
    port: u16,
}

impl Env {
    fn p(&self, n: &str) -> PathBuf {
        self.dir.path().join(n)
    }

    fn start_agent(&self) -> Proc {
        let certs = self.p("certs");
        let log = std::fs::File::create(self.p("agent.log")).unwrap();
        let child = Command::new(agent_bin())
            .args(["serve", "--state-dir"])
            .arg(self.p("agent-state"))
            .arg("--export")
            .arg(format!("vol={}", self.p("source.img").display()))
            .arg("--nbd-unix")
            .arg(self.p("nbd.sock"))
            .arg("--control")
            .arg(self.p("ctl.sock"))
            .arg("--grpc")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--tls-cert")
            .arg(certs.join("agent.pem"))
            .arg("--tls-key")
            .arg(certs.join("agent-key.pem"))
            .arg("--tls-client-ca")
            .arg(certs.join("ca.pem"))
            .stderr(log)
            .spawn()
            .unwrap();
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err()
            || !self.p("nbd.sock").exists()
        {
            assert!(t.elapsed() < Duration::from_secs(20), "agent did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Proc(child)
    }

    fn master(&self, extra: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_volmig"));
        c.args(["migrate", "--quiet", "--state-dir"])
            .arg(self.p("master-state"))
            .arg("--agent")
            .arg(format!("https://127.0.0.1:{}", self.port))
            .arg("--tls-dir")
            .arg(self.p("certs"))
            .args(["vol"])
            .arg(self.p("target.img"))
            .args(extra);
        c
    }

    fn record(&self) -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_volmig"))
            .args(["status", "--json", "--state-dir"])
            .arg(self.p("master-state"))
            .arg("vol")
            .output()
            .unwrap();
        if !out.status.success() {
            return serde_json::Value::Null;
        }
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn tls(&self, certs: &str) -> ClientTls {
        let d = self.p(certs);
        ClientTls {
            ca: d.join("ca.pem"),
            cert: d.join("master.pem"),
            key: d.join("master-key.pem"),
            domain: "localhost".into(),
        }
    }
}

fn setup() -> Env {
    let env = Env {
        dir: tempfile::tempdir().unwrap(),
        port: free_port(),
    };
    let st = Command::new(env!("CARGO_BIN_EXE_volmig"))
        .args(["certs", "--out"])
        .arg(env.p("certs"))
        .status()
        .unwrap();
    assert!(st.success());
    let f = std::fs::File::create(env.p("source.img")).unwrap();
    f.set_len(SIZE).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; 1 << 20];
        for mb in 0..SIZE >> 20 {
            for (i, c) in buf.chunks_exact_mut(BLOCK as usize).enumerate() {
                fill(c, (mb << 8) + i as u64, 0);
            }
            f.write_all_at(&buf, mb << 20).unwrap();
        }
    }
    std::fs::File::create(env.p("target.img"))
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    env
}

async fn writer(sock: PathBuf, gens: Arc<Vec<AtomicU32>>, stop: Arc<AtomicBool>) -> u64 {
    let mut c = NbdClient::connect_unix(&sock, "vol").await.unwrap();
    let mut buf = vec![0u8; BLOCK as usize];
    let mut x = 0x9e37_79b9u64;
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x % (HOT / BLOCK);
        let g = gens[b as usize].load(Ordering::Relaxed) + 1;
        fill(&mut buf, b, g);
        c.write(b * BLOCK, &buf, false).await.unwrap();
        gens[b as usize].store(g, Ordering::Relaxed);
        n += 1;
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    n
}

fn check_target(path: &Path, gens: &[AtomicU32]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let (mut got, mut want) = (vec![0u8; BLOCK as usize], vec![0u8; BLOCK as usize]);
    for b in 0..SIZE / BLOCK {
        let g = if b < HOT / BLOCK {
            gens[b as usize].load(Ordering::Relaxed)
        } else {
            0
        };
        fill(&mut want, b, g);
        f.read_exact_at(&mut got, b * BLOCK).unwrap();
        assert!(
            got == want,
            "target block {b} does not hold acknowledged generation {g}"
        );
    }
}

#[test]
fn master_sigkilled_mid_copy_continues_under_a_new_epoch() {
    let env = setup();
    let _agent = env.start_agent();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let gens: Arc<Vec<AtomicU32>> = Arc::new((0..HOT / BLOCK).map(|_| AtomicU32::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let w = rt.spawn(writer(env.p("nbd.sock"), gens.clone(), stop.clone()));

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
    let fence = |epoch| Step {
        fence: Some(Fence {
            session_id: done["session"].as_str().unwrap().to_string(),
            volume: "vol".into(),
            epoch,
        }),
    };
    rt.block_on(async {
        let slave = GrpcSlave::new(
            &format!("https://127.0.0.1:{}", env.port),
            Some(&env.tls("certs")),
        )
        .unwrap();
        let e = slave.get_state(fence(1)).await.unwrap_err();
        assert!(matches!(e, SlaveError::Fenced(_)), "{e}");
        let st = slave.get_state(fence(2)).await.unwrap();
        assert!(st.finished && st.redirected);
    });

    std::thread::sleep(Duration::from_millis(200)); // writes on the target
    stop.store(true, Ordering::Relaxed);
    let n = rt.block_on(w).unwrap();
    assert!(n > 100, "the writer ran through the migration ({n} writes)");
    check_target(&env.p("target.img"), &gens);
}

#[test]
fn agent_refuses_masters_without_a_valid_client_certificate() {
    let env = setup();
    let _agent = env.start_agent();
    // A second CA: its master certificate is not trusted by the agent.
    let st = Command::new(env!("CARGO_BIN_EXE_volmig"))
        .args(["certs", "--out"])
        .arg(env.p("other"))
        .status()
        .unwrap();
    assert!(st.success());
    let mut mixed = env.tls("other");
    mixed.ca = env.p("certs").join("ca.pem"); // trusts the agent, but presents a foreign cert
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let step = Step {
            fence: Some(Fence {
                session_id: "s".into(),
                volume: "vol".into(),
                epoch: 1,
            }),
        };
        let foreign =
            GrpcSlave::new(&format!("https://127.0.0.1:{}", env.port), Some(&mixed)).unwrap();
        let e = foreign.get_state(step.clone()).await.unwrap_err();
        // Reaching the service would answer NotFound (no such session).
        assert!(
            !matches!(e, SlaveError::NotFound(_)),
            "a foreign client certificate must not get through: {e}"
        );
        let plain = GrpcSlave::new(&format!("http://127.0.0.1:{}", env.port), None).unwrap();
        let e = plain.get_state(step.clone()).await.unwrap_err();
        assert!(
            !matches!(e, SlaveError::NotFound(_)),
            "plain text must not get through: {e}"
        );
        // The right certificate gets an answer (no such session).
        let ok = GrpcSlave::new(
            &format!("https://127.0.0.1:{}", env.port),
            Some(&env.tls("certs")),
        )
        .unwrap();
        let e = ok.get_state(step).await.unwrap_err();
        assert!(matches!(e, SlaveError::NotFound(_)), "{e}");
    });
    // Nothing changed on the agent's side: no session was made.
    assert!(!env.p("agent-state/vol.slave.json").exists());
}

#[test]
fn bad_requests_are_refused_and_change_nothing() {
    let env = setup();
    let _agent = env.start_agent();
    // a target smaller than the source: the master fails activation cleanly
    let small = env.p("small.img");
    std::fs::File::create(&small)
        .unwrap()
        .set_len(SIZE / 2)
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_volmig"))
        .args(["migrate", "--quiet", "--state-dir"])
        .arg(env.p("master-state"))
        .arg("--agent")
        .arg(format!("https://127.0.0.1:{}", env.port))
        .arg("--tls-dir")
        .arg(env.p("certs"))
        .arg("vol")
        .arg(&small)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("smaller"), "{text}");
    assert_eq!(env.record()["phase"], "Failed");
    // an unknown volume
    let out = Command::new(env!("CARGO_BIN_EXE_volmig"))
        .args(["migrate", "--quiet", "--state-dir"])
        .arg(env.p("master-state"))
        .arg("--agent")
        .arg(format!("https://127.0.0.1:{}", env.port))
        .arg("--tls-dir")
        .arg(env.p("certs"))
        .arg("nope")
        .arg(env.p("target.img"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("unknown volume"), "{text}");
    // the source is untouched and serves as before
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = NbdClient::connect_unix(env.p("nbd.sock"), "vol")
            .await
            .unwrap();
        let got = c.read(0, BLOCK as usize).await.unwrap();
        let mut want = vec![0u8; BLOCK as usize];
        fill(&mut want, 0, 0);
        assert_eq!(got, want);
    });
}
