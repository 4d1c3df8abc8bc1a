//! A lab of real processes for the local-mode tests: `volmig-agent serve`
//! processes with mTLS and NBD, `volmig migrate` masters, writers over NBD
//! that remember every acknowledged write, and checks of the devices.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // each test binary uses a part

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use volmig_frontends::nbd::NbdClient;
use volmig_master::ClientTls;

pub const BLOCK: u64 = 4096;

pub fn agent_bin() -> PathBuf {
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

/// A child process killed when the test drops it.
pub struct Proc(pub Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The content of block `b` at generation `g` (0: as the source started).
pub fn fill(buf: &mut [u8], b: u64, g: u32) {
    for (i, c) in buf.chunks_exact_mut(8).enumerate() {
        c.copy_from_slice(&((b << 32) ^ ((g as u64) << 16) ^ i as u64 ^ 0x7777).to_le_bytes());
    }
}

/// Did the process die of SIGKILL (a fault point)?
pub fn killed(st: &ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    st.signal() == Some(libc::SIGKILL)
}

/// A running agent.
pub struct Agent {
    pub name: String,
    pub port: u16,
    pub proc: Option<Proc>,
}

impl Agent {
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}

pub struct Lab {
    pub dir: tempfile::TempDir,
}

impl Lab {
    /// A temporary directory with certificates (`certs/`).
    pub fn new() -> Self {
        let lab = Lab {
            dir: tempfile::tempdir().unwrap(),
        };
        let st = Command::new(env!("CARGO_BIN_EXE_volmig"))
            .args(["certs", "--out"])
            .arg(lab.p("certs"))
            .status()
            .unwrap();
        assert!(st.success());
        lab
    }

    pub fn p(&self, n: &str) -> PathBuf {
        self.dir.path().join(n)
    }

    pub fn source(&self, vol: &str) -> PathBuf {
        self.p(&format!("{vol}.src.img"))
    }

    pub fn target(&self, vol: &str) -> PathBuf {
        self.p(&format!("{vol}.tgt.img"))
    }

    pub fn sock(&self, agent: &str) -> PathBuf {
        self.p(&format!("{agent}.nbd.sock"))
    }

    /// A source volume of `size` bytes holding generation 0 everywhere, and
    /// an empty (sparse) target of the same size.
    pub fn volume(&self, vol: &str, size: u64) {
        let f = std::fs::File::create(self.source(vol)).unwrap();
        f.set_len(size).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        for mb in 0..size >> 20 {
            for (i, c) in buf.chunks_exact_mut(BLOCK as usize).enumerate() {
                fill(c, (mb << 8) + i as u64, 0);
            }
            f.write_all_at(&buf, mb << 20).unwrap();
        }
        std::fs::File::create(self.target(vol))
            .unwrap()
            .set_len(size)
            .unwrap();
    }

    /// Starts agent `name` exporting `volumes`, with extra environment
    /// (`VOLMIG_FAULT`...). Its state lives in `<name>-state/`.
    pub fn start_agent(
        &self,
        name: &str,
        volumes: &[&str],
        port: u16,
        env: &[(&str, &str)],
    ) -> Agent {
        let certs = self.p("certs");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.p(&format!("{name}.log")))
            .unwrap();
        let mut c = Command::new(agent_bin());
        c.args(["serve", "--state-dir"])
            .arg(self.p(&format!("{name}-state")))
            .arg("--nbd-unix")
            .arg(self.sock(name))
            .arg("--control")
            .arg(self.p(&format!("{name}.ctl.sock")))
            .arg("--grpc")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--tls-cert")
            .arg(certs.join("agent.pem"))
            .arg("--tls-key")
            .arg(certs.join("agent-key.pem"))
            .arg("--tls-client-ca")
            .arg(certs.join("ca.pem"))
            .envs(env.iter().copied())
            .stderr(log);
        for v in volumes {
            c.arg("--export")
                .arg(format!("{v}={}", self.source(v).display()));
        }
        let _ = std::fs::remove_file(self.sock(name));
        let child = c.spawn().unwrap();
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
            || !self.sock(name).exists()
        {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "agent {name} did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Agent {
            name: name.to_string(),
            port,
            proc: Some(Proc(child)),
        }
    }

    /// `volmig migrate` of `vol` to its target on `agent`, plus `extra`.
    pub fn master(&self, agent: &Agent, vol: &str, extra: &[String]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_volmig"));
        c.args(["migrate", "--quiet", "--state-dir"])
            .arg(self.p("master-state"))
            .arg("--agent")
            .arg(agent.url())
            .arg("--tls-dir")
            .arg(self.p("certs"))
            .arg(vol)
            .arg(self.target(vol))
            .args(extra);
        c
    }

    /// `--volume VOL=TARGET@AGENT` for one more volume.
    pub fn also(&self, agent: &Agent, vol: &str) -> Vec<String> {
        vec![
            "--volume".into(),
            format!("{vol}={}@{}", self.target(vol).display(), agent.url()),
        ]
    }

    /// The master's record of `vol` (Null if none), read from its state
    /// file as `volmig status --json` would print it.
    pub fn record(&self, vol: &str) -> serde_json::Value {
        match std::fs::read(self.p(&format!("master-state/{vol}.session.json"))) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or(serde_json::Value::Null),
            Err(_) => serde_json::Value::Null,
        }
    }

    pub fn tls(&self, certs: &str) -> ClientTls {
        let d = self.p(certs);
        ClientTls {
            ca: d.join("ca.pem"),
            cert: d.join("master.pem"),
            key: d.join("master-key.pem"),
            domain: "localhost".into(),
        }
    }

    /// Waits until `f` holds of `vol`'s record.
    pub fn wait_record(
        &self,
        vol: &str,
        what: &str,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let t = Instant::now();
        loop {
            let r = self.record(vol);
            if f(&r) {
                return r;
            }
            assert!(
                t.elapsed() < Duration::from_secs(90),
                "{vol}: never {what}: {r}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A writer on one export: random 4 KiB blocks in the first `hot` bytes,
/// each write's generation remembered once acknowledged.
pub struct Writer {
    pub gens: Arc<Vec<AtomicU32>>,
    maybe: Arc<Mutex<HashMap<u64, u32>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
    pub size: u64,
}

impl Writer {
    pub fn start(
        rt: &tokio::runtime::Runtime,
        sock: PathBuf,
        export: &str,
        hot: u64,
        size: u64,
    ) -> Writer {
        Self::start_in(rt, sock, export, 0, hot, size)
    }

    /// A writer on the blocks of `[lo, hi)` only (several writers on one
    /// volume through several agents keep to their own ranges).
    pub fn start_in(
        rt: &tokio::runtime::Runtime,
        sock: PathBuf,
        export: &str,
        lo: u64,
        hi: u64,
        size: u64,
    ) -> Writer {
        let first = lo / BLOCK;
        let gens: Arc<Vec<AtomicU32>> =
            Arc::new((0..hi / BLOCK).map(|_| AtomicU32::new(0)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let maybe: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
        let export = export.to_string();
        let task = rt.spawn({
            let (gens, stop, maybe) = (gens.clone(), stop.clone(), maybe.clone());
            async move {
                let mut c = NbdClient::connect_unix(&sock, &export).await.unwrap();
                let mut buf = vec![0u8; BLOCK as usize];
                let mut x = 0x9e37_79b9u64 ^ export.len() as u64 ^ first;
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let b = first + x % (hi / BLOCK - first);
                    let g = gens[b as usize].load(Ordering::Relaxed) + 1;
                    fill(&mut buf, b, g);
                    match c.write(b * BLOCK, &buf, false).await {
                        Ok(()) => {
                            gens[b as usize].store(g, Ordering::Relaxed);
                            maybe.lock().unwrap().remove(&b);
                        }
                        // The agent was killed: reconnect when it is back.
                        // The write was not acknowledged, so the device may
                        // hold it or the one before.
                        Err(_) => loop {
                            maybe.lock().unwrap().insert(b, g);
                            if stop.load(Ordering::Relaxed) {
                                return n;
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            if let Ok(nc) = NbdClient::connect_unix(&sock, &export).await {
                                c = nc;
                                break;
                            }
                        },
                    }
                    n += 1;
                    tokio::time::sleep(Duration::from_micros(500)).await;
                }
                n
            }
        });
        Writer {
            gens,
            maybe,
            stop,
            task,
            size,
        }
    }

    /// Stops the writer; returns what it wrote.
    pub fn finish(self, rt: &tokio::runtime::Runtime) -> Written {
        self.stop.store(true, Ordering::Relaxed);
        let n = rt.block_on(self.task).unwrap();
        let maybe = self.maybe.lock().unwrap().clone();
        Written {
            gens: self.gens,
            maybe,
            n,
            size: self.size,
        }
    }
}

impl Written {
    /// What two writers on disjoint ranges of one volume wrote together.
    pub fn merge(self, other: Written) -> Written {
        let (long, short) = if self.gens.len() >= other.gens.len() {
            (self, other)
        } else {
            (other, self)
        };
        let gens: Vec<AtomicU32> = long
            .gens
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let o = short.gens.get(i).map(|g| g.load(Ordering::Relaxed));
                AtomicU32::new(g.load(Ordering::Relaxed).max(o.unwrap_or(0)))
            })
            .collect();
        let mut maybe = long.maybe;
        maybe.extend(short.maybe);
        Written {
            gens: Arc::new(gens),
            maybe,
            n: long.n + short.n,
            size: long.size,
        }
    }
}

/// What a writer was acknowledged for.
pub struct Written {
    pub gens: Arc<Vec<AtomicU32>>,
    /// Blocks whose last write was cut off by a crash: either generation.
    pub maybe: HashMap<u64, u32>,
    /// Acknowledged writes.
    pub n: u64,
    pub size: u64,
}

/// Asserts `path` holds every acknowledged generation (and generation 0
/// outside the hot region).
pub fn check_device(path: &Path, w: &Written) {
    let f = std::fs::File::open(path).unwrap();
    let (mut got, mut want) = (vec![0u8; BLOCK as usize], vec![0u8; BLOCK as usize]);
    for b in 0..w.size / BLOCK {
        let g = w
            .gens
            .get(b as usize)
            .map(|g| g.load(Ordering::Relaxed))
            .unwrap_or(0);
        fill(&mut want, b, g);
        f.read_exact_at(&mut got, b * BLOCK).unwrap();
        if got != want
            && let Some(&m) = w.maybe.get(&b)
        {
            fill(&mut want, b, m);
        }
        assert!(
            got == want,
            "{}: block {b} does not hold acknowledged generation {g}",
            path.display()
        );
    }
}
