//! Shared helpers of the system tests (`live_clients`, `filesystem`): the
//! agent as a child process with a master driving its migrations over its
//! control socket ([`master`]), external tools run with timeouts, image
//! files with known content.
//!
//! External tools are required: a missing one fails the test with the name of
//! the Debian package to install, it never passes silently.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod master;

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const MIB: u64 = 1 << 20;

/// How long one external command may run before the test fails.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(300);

/// Path of a required external binary; panics with the package to install.
pub fn require_bin(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/bin", "/usr/sbin", "/bin", "/sbin"].map(PathBuf::from);
    for dir in std::env::split_paths(&path).chain(extra) {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "required binary `{name}` not found in PATH or /usr/bin, /usr/sbin: \
         install the Debian package `{package}` (apt-get install {package})"
    );
}

/// Fails the test unless it runs as root.
pub fn require_root(why: &str) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .expect("Uid line in /proc/self/status");
    assert_eq!(
        euid, "0",
        "this test must run as root ({why}); run `sudo -E cargo test ...`"
    );
}

/// Fails the test unless /dev/fuse exists.
pub fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: load the fuse module (`modprobe fuse`) and install \
         the Debian packages `fuse3` and `nbdfuse`"
    );
}

/// What an external command did.
pub struct Out {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub what: String,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.status.success()
    }

    /// Everything, for assertion messages.
    pub fn text(&self) -> String {
        format!(
            "$ {}\nstatus: {}\nstdout:\n{}\nstderr:\n{}",
            self.what, self.status, self.stdout, self.stderr
        )
    }

    /// Panics unless the command exited 0.
    pub fn assert_ok(self) -> Self {
        assert!(self.ok(), "command failed:\n{}", self.text());
        self
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion (stdin empty), killing it and failing the test
/// after `timeout`.
pub fn run_cmd(mut cmd: Command, timeout: Duration) -> Out {
    let what = describe(&cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let to = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let te = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = String::from_utf8_lossy(&to.join().unwrap()).into_owned();
            let stderr = String::from_utf8_lossy(&te.join().unwrap()).into_owned();
            panic!("{what} timed out after {timeout:?}\nstdout:\n{stdout}\nstderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Out {
        status,
        stdout: String::from_utf8_lossy(&to.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&te.join().unwrap()).into_owned(),
        what,
    }
}

/// Runs `prog args` with the default timeout.
pub fn run(prog: &Path, args: &[&str]) -> Out {
    let mut cmd = Command::new(prog);
    cmd.args(args);
    run_cmd(cmd, CMD_TIMEOUT)
}

/// Runs `prog args`, panics unless it exits 0, returns stdout.
pub fn run_ok(prog: &Path, args: &[&str]) -> String {
    run(prog, args).assert_ok().stdout
}

/// Polls `cond` every 50 ms until it holds; fails the test after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Deterministic, position-dependent bytes: `pattern(off, len, seed)` is the
/// content of an image filled with seed `seed` at offset `off`.
pub fn pattern(off: u64, len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let first = off / 8;
    let last = (off + len as u64).div_ceil(8);
    for w in first..last {
        let mut x =
            w.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed.wrapping_mul(0xd1b5_4a32_d192_ed03);
        x ^= x >> 29;
        x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x ^= x >> 32;
        out.extend_from_slice(&x.to_le_bytes());
    }
    let skip = (off - first * 8) as usize;
    out.drain(..skip);
    out.truncate(len);
    out
}

/// A sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

/// A file of `size` bytes filled with `pattern(.., seed)` everywhere.
pub fn pattern_file(path: &Path, size: u64, seed: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let chunk = 4 * MIB;
    let mut off = 0;
    while off < size {
        let n = chunk.min(size - off);
        f.write_all_at(&pattern(off, n as usize, seed), off)
            .unwrap();
        off += n;
    }
    f.sync_all().unwrap();
}

/// Terminal phases of a migration session.
pub const TERMINAL: [&str; 3] = ["Completed", "Aborted", "Failed"];

/// A `volmig-agent serve` child process, and a master for its migrations.
/// Dropping it kills the agent; when the test is failing, the agent's log
/// is printed.
pub struct Agent {
    child: Option<Child>,
    pub nbd_sock: PathBuf,
    pub ctl_sock: PathBuf,
    pub log: PathBuf,
    pub tcp: Option<SocketAddr>,
    pub master: master::ProcMaster,
}

pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_volmig-agent"))
}

fn free_tcp_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

impl Agent {
    /// Serves `exports` (NAME, PATH) on a unix socket in `dir`.
    pub fn start(dir: &Path, exports: &[(&str, &Path)]) -> Agent {
        Self::start_inner(dir, exports, false)
    }

    /// Serves `exports` on a unix socket and on a TCP port of 127.0.0.1.
    pub fn start_with_tcp(dir: &Path, exports: &[(&str, &Path)]) -> Agent {
        Self::start_inner(dir, exports, true)
    }

    fn start_inner(dir: &Path, exports: &[(&str, &Path)], tcp: bool) -> Agent {
        // A port picked free may be taken before the agent binds it: retry.
        for attempt in 0.. {
            let mut a = Agent {
                child: None,
                nbd_sock: dir.join("nbd.sock"),
                ctl_sock: dir.join("ctl.sock"),
                log: dir.join(format!("agent-{attempt}.log")),
                tcp: tcp.then(free_tcp_port),
                master: master::ProcMaster::new(&dir.join("ctl.sock"), &dir.join("master-state")),
            };
            let log = std::fs::File::create(&a.log).unwrap();
            let mut cmd = Command::new(agent_bin());
            cmd.arg("serve")
                .arg("--state-dir")
                .arg(dir.join("state"))
                .arg("--nbd-unix")
                .arg(&a.nbd_sock)
                .arg("--control")
                .arg(&a.ctl_sock);
            for (name, path) in exports {
                cmd.arg("--export")
                    .arg(format!("{name}={}", path.display()));
            }
            if let Some(addr) = a.tcp {
                cmd.arg("--nbd-tcp").arg(addr.to_string());
            }
            cmd.env("NO_COLOR", "1")
                .env("RUST_BACKTRACE", "0")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log);
            a.child = Some(cmd.spawn().expect("spawn volmig-agent serve"));
            match a.wait_ready() {
                Ok(()) => return a,
                Err(log) if tcp && attempt < 5 && log.contains("in use") => continue,
                Err(log) => panic!("volmig-agent serve did not come up:\n{log}"),
            }
        }
        unreachable!()
    }

    /// Waits until the NBD socket(s) accept connections and the control
    /// socket exists. Err(log) when the agent exited.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!("agent exited with {st}\n{}", self.log_text()));
            }
            let unix_ok = UnixStream::connect(&self.nbd_sock).is_ok();
            let tcp_ok = self.tcp.is_none_or(|a| TcpStream::connect(a).is_ok());
            if unix_ok && tcp_ok && self.ctl_sock.exists() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "agent not ready after 60 s (nbd socket {unix_ok}, tcp {tcp_ok})\n{}",
                    self.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// `nbd+unix:///NAME?socket=SOCK`
    pub fn unix_uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.nbd_sock.display())
    }

    /// `nbd://127.0.0.1:PORT/NAME`
    pub fn tcp_uri(&self, name: &str) -> String {
        let a = self.tcp.expect("agent started with TCP");
        format!("nbd://{}:{}/{name}", a.ip(), a.port())
    }

    /// Starts migrating `volume` to `target` (does not wait); `opts` are
    /// `volmig migrate`'s session options.
    pub fn migrate(&self, volume: &str, target: &Path, opts: &[&str]) {
        if let Err(e) = self
            .master
            .migrate(volume, target, master::session_config(opts))
        {
            panic!("migrate failed: {e}\nagent log:\n{}", self.log_text());
        }
    }

    /// Migrates and waits for the end, like `volmig migrate`: the result
    /// (success only when the migration Completed) with the final record
    /// printed on stdout.
    pub fn migrate_wait(&self, volume: &str, target: &Path, opts: &[&str]) -> Out {
        let what = format!(
            "migrate {volume} {} {} (master over {})",
            target.display(),
            opts.join(" "),
            self.ctl_sock.display()
        );
        let failed = |stdout: String, stderr: String| Out {
            status: ExitStatus::from_raw(1 << 8),
            stdout,
            stderr,
            what: what.clone(),
        };
        if let Err(e) = self
            .master
            .migrate(volume, target, master::session_config(opts))
        {
            return failed(String::new(), e);
        }
        match self.master.wait(volume) {
            Ok(rec) if rec.phase == volmig_api::phase::Phase::Completed => Out {
                status: ExitStatus::from_raw(0),
                stdout: rec.render(),
                stderr: String::new(),
                what,
            },
            Ok(rec) => failed(rec.render(), format!("migration ended {}", rec.phase)),
            Err(e) => failed(String::new(), e),
        }
    }

    /// The session's record with the agent's live figures:
    /// `{"record": .., "dirty_bytes": .., "copied_this_run": ..}`.
    pub fn status(&self, volume: &str) -> serde_json::Value {
        self.master
            .status_json(volume)
            .unwrap_or_else(|e| panic!("status failed: {e}\nagent log:\n{}", self.log_text()))
    }

    pub fn phase(&self, volume: &str) -> String {
        self.status(volume)["record"]["phase"]
            .as_str()
            .expect("record.phase")
            .to_string()
    }

    /// Polls the session until it reaches a terminal phase; returns the
    /// final status.
    pub fn wait_terminal(&self, volume: &str, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.status(volume);
            let phase = st["record"]["phase"].as_str().unwrap_or("?");
            if TERMINAL.contains(&phase) {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "migration of {volume} did not finish within {timeout:?}; last status:\n{st:#}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Asserts a final status is Completed and verified, with a cutover
    /// stall recorded.
    pub fn assert_completed(&self, st: &serde_json::Value) {
        let r = &st["record"];
        assert_eq!(
            r["phase"],
            "Completed",
            "migration did not complete: {st:#}\nagent log:\n{}",
            self.log_text()
        );
        assert_eq!(r["verified"], true, "target not verified: {st:#}");
        assert!(
            r["cutover_stall_ms"].as_f64().is_some(),
            "no cutover stall recorded: {st:#}"
        );
        assert!(r["redirected"] == true, "workload not redirected: {st:#}");
        assert_eq!(st["dirty_bytes"], 0, "dirty bytes left: {st:#}");
    }

    /// The backing file the agent serves `volume` from now (`ListVolumes`).
    pub fn active_path(&self, volume: &str) -> String {
        self.master.active_path(volume)
    }

    /// Stops the agent with SIGTERM (SIGKILL after 30 s); returns how it
    /// exited.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let log = self.log_text();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            eprintln!(
                "---- volmig-agent log ({}), last {} lines ----\n{}",
                self.log.display(),
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// Kills a child process when dropped.
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    pub fn id(&self) -> u32 {
        self.0.as_ref().expect("child").id()
    }

    pub fn is_running(&mut self) -> bool {
        self.0
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
