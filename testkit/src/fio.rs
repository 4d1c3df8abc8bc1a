//! fio (Debian package `fio`), the real NBD client that verifies what it
//! wrote: its nbd ioengine and what its output says.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::tools::{Out, require_bin, run, run_cmd};

/// fio, with its nbd ioengine (built with libnbd); fails the test without.
pub fn require_fio_nbd() -> PathBuf {
    let fio = require_bin("fio", "fio");
    let eng = run(&fio, &["--enghelp=nbd"]);
    assert!(
        eng.ok() && eng.stdout.contains("uri"),
        "fio lacks the nbd ioengine (install the Debian package `fio`, built with libnbd):\n{}",
        eng.text()
    );
    fio
}

/// Runs fio in `dir` (where it keeps its verify state files), failing the
/// test after `timeout`.
pub fn run_fio(dir: &Path, args: &[String], timeout: Duration) -> Out {
    let mut cmd = Command::new(require_bin("fio", "fio"));
    cmd.current_dir(dir).args(args);
    run_cmd(cmd, timeout)
}

/// fio exited 0, reported `err= 0` and no verification failure.
pub fn assert_clean(out: &Out) {
    assert!(out.ok(), "fio failed:\n{}", out.text());
    assert!(
        out.stdout.contains("err= 0"),
        "fio job error:\n{}",
        out.text()
    );
    for bad in ["verify:", "bad magic", "crc32c: wanted", "io_u error"] {
        assert!(
            !out.stdout.contains(bad) && !out.stderr.contains(bad),
            "fio reported {bad:?}:\n{}",
            out.text()
        );
    }
}

/// fio's `issued rwts: total=R,W,...` counts: (reads, writes).
pub fn issued(out: &Out) -> (u64, u64) {
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains("issued rwts: total="))
        .unwrap_or_else(|| panic!("no issued counts in fio output:\n{}", out.text()));
    let nums: Vec<u64> = line
        .split("total=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .split(',')
        .map(|n| n.parse().unwrap())
        .collect();
    (nums[0], nums[1])
}

/// fio writing and verifying files in a directory (a mounted filesystem)
/// over and over until stopped: 4 KiB random writes with O_DIRECT and
/// libaio, every block checked with crc32c after each pass. Any error or
/// bad block fails the test (at [`FioLoop::stop`]).
pub struct FioLoop {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    runs: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FioLoop {
    /// Passes over a file of `size` (fio's syntax: "32M") in `dir`.
    pub fn start(dir: &Path, size: &str) -> Self {
        use std::sync::atomic::Ordering;
        let fio = require_bin("fio", "fio");
        std::fs::create_dir_all(dir).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let runs = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (s, r, dir, size) = (
            stop.clone(),
            runs.clone(),
            dir.to_path_buf(),
            size.to_string(),
        );
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let mut cmd = Command::new(&fio);
                cmd.current_dir(&dir).args([
                    "--name=pass",
                    "--filename=fio.data",
                    &format!("--size={size}"),
                    "--rw=randwrite",
                    "--bs=4k",
                    "--ioengine=libaio",
                    "--iodepth=8",
                    "--direct=1",
                    "--verify=crc32c",
                    "--do_verify=1",
                    "--verify_fatal=1",
                    "--end_fsync=1",
                    &format!("--randseed={}", r.load(Ordering::SeqCst) + 1),
                ]);
                let out = run_cmd(cmd, Duration::from_secs(600));
                assert_clean(&out);
                r.fetch_add(1, Ordering::SeqCst);
            }
        });
        Self {
            stop,
            runs,
            thread: Some(thread),
        }
    }

    /// Passes completed so far.
    pub fn runs(&self) -> u64 {
        self.runs.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Lets the pass in progress end; the passes done. A failed pass
    /// fails the test here.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take()
            && let Err(e) = t.join()
        {
            std::panic::resume_unwind(e);
        }
        self.runs()
    }
}

impl Drop for FioLoop {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
