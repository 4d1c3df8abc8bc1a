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
