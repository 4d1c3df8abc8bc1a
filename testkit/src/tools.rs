//! External tools: found or the test fails naming the Debian package to
//! install (never a silent pass); run with a timeout; conditions polled
//! with a deadline.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long one external command may run by default.
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
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .expect("Uid line in /proc/self/status");
    assert_eq!(
        euid, "0",
        "this test must run as root ({why}); run `sudo -E cargo nextest run ...`"
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

/// Fails the test unless it can stage a volume as kubelet would: root,
/// /dev/fuse, and the tools the CSI node plugin runs (loop devices,
/// mounts, blkid, mkfs.ext4 and e2fsck).
pub fn require_staging() {
    require_root("loop devices, FUSE and mounts");
    require_fuse();
    for (tool, pkg) in [
        ("losetup", "mount"),
        ("mount", "mount"),
        ("blkid", "util-linux"),
        ("mkfs.ext4", "e2fsprogs"),
        ("e2fsck", "e2fsprogs"),
    ] {
        require_bin(tool, pkg);
    }
}

/// What an external command did.
#[derive(Debug)]
pub struct Out {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// The command line, for messages.
    pub what: String,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.status.success()
    }

    /// stdout and stderr together.
    pub fn both(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
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

fn describe(prog: &std::ffi::OsStr, args: std::process::CommandArgs<'_>) -> String {
    let mut s = prog.to_string_lossy().into_owned();
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion (stdin empty, output captured), killing it and
/// failing the test after `timeout`.
pub fn run_cmd(mut cmd: Command, timeout: Duration) -> Out {
    let what = describe(cmd.get_program(), cmd.get_args());
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        })
    };
    let to = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let te = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("waitpid") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let (stdout, stderr) = (to.join().unwrap(), te.join().unwrap());
            panic!("{what} timed out after {timeout:?}\nstdout:\n{stdout}\nstderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Out {
        status,
        stdout: to.join().unwrap(),
        stderr: te.join().unwrap(),
        what,
    }
}

/// `run_cmd` for async tests whose servers run on the test's own runtime:
/// waits without blocking it.
pub async fn run_cmd_async(mut cmd: tokio::process::Command, timeout: Duration) -> Out {
    let what = describe(cmd.as_std().get_program(), cmd.as_std().get_args());
    let out = tokio::time::timeout(
        timeout,
        cmd.stdin(Stdio::null()).kill_on_drop(true).output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{what} timed out after {timeout:?}"))
    .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    Out {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
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

/// `run` for async tests (see [`run_cmd_async`]).
pub async fn run_async(prog: &Path, args: &[&str]) -> Out {
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args);
    run_cmd_async(cmd, CMD_TIMEOUT).await
}

/// `run_ok` for async tests.
pub async fn run_ok_async(prog: &Path, args: &[&str]) -> String {
    run_async(prog, args).await.assert_ok().stdout
}

/// `qemu-img compare` of two raw images (files or NBD URIs): exit 0 when
/// identical, 1 when they differ (Debian package `qemu-utils`).
pub fn qemu_img_compare<'a>(a: &'a str, b: &'a str) -> [&'a str; 7] {
    ["compare", "-f", "raw", "-F", "raw", a, b]
}

/// Polls `cond` every 50 ms until it holds; fails the test after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a cleanup command up to `tries` times until it succeeds (a mount
/// may be busy for a moment after its last user closed a file).
pub fn retry(prog: &str, args: &[&str], tries: u32) -> bool {
    for i in 0..tries {
        let ok = Command::new(prog)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return true;
        }
        if i + 1 < tries {
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    false
}
