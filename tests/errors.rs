#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! A user error ends `volmig` and `volmig-agent` with one clear line on
//! stderr (`error: ...`, each cause said once) and a non-zero exit, also
//! with `RUST_BACKTRACE=1` set (anyhow would print a backtrace under it).
//! `kubectl-volmig` and `volmig-operator` have theirs in their crates'
//! tests (cli/tests/errors.rs, operator/tests/errors.rs).

use std::process::Command;
use std::time::Duration;

use volmig_testkit::binaries::{agent_bin, volmig_bin};
use volmig_testkit::lab::Lab;
use volmig_testkit::master::NO_ARGS;
use volmig_testkit::pattern::sparse_file;
use volmig_testkit::tools::{Out, run_cmd};

const TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `cmd` with `RUST_BACKTRACE=1`; asserts it failed with one line on
/// stderr, `error: ` and every part of `want`, no part said twice; returns
/// the line.
fn one_line_error(mut cmd: Command, want: &[&str]) -> String {
    cmd.env("RUST_BACKTRACE", "1")
        .env("RUST_LIB_BACKTRACE", "1");
    let out: Out = run_cmd(cmd, TIMEOUT);
    assert!(!out.ok(), "succeeded:\n{}", out.text());
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "stderr is not one line:\n{}", out.text());
    let line = lines[0];
    assert!(line.starts_with("error: "), "{}", out.text());
    for w in want {
        assert!(line.contains(w), "{w:?} missing:\n{}", out.text());
        assert_eq!(line.matches(w).count(), 1, "{w:?} said twice: {line}");
    }
    line.to_string()
}

#[test]
fn migrate_to_a_too_small_target_is_one_line() {
    let lab = Lab::new();
    lab.volume("vol", 8 << 20);
    let agent = lab.agent("a", &["vol"]).start();
    sparse_file(&lab.target("vol"), 4 << 20);
    let line = one_line_error(
        lab.migrate(&agent, "vol", NO_ARGS),
        &[
            "migration did not complete",
            "is smaller than source",
            "(4194304 bytes)",
        ],
    );
    assert!(line.contains("vol Failed"), "{line}");
}

#[test]
fn volmig_user_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut status = Command::new(volmig_bin());
    status
        .arg("status")
        .arg("--state-dir")
        .arg(dir.path())
        .arg("nope");
    one_line_error(status, &["no session for volume nope"]);

    let mut certs = Command::new(volmig_bin());
    certs.args(["certs", "--out", "/proc/volmig-certs"]);
    one_line_error(certs, &["creating /proc/volmig-certs"]);

    let mut more = Command::new(volmig_bin());
    more.arg("migrate")
        .arg("--state-dir")
        .arg(dir.path())
        .args([
            "--agent",
            "unix:///nowhere.sock",
            "vol",
            "/tmp/t",
            "--volume",
            "bad",
        ]);
    one_line_error(more, &["--volume \"bad\": expected VOLUME=TARGET"]);
}

#[test]
fn agent_user_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let serve = |state: &str| {
        let mut c = Command::new(agent_bin());
        c.args(["serve", "--state-dir", state])
            .arg("--nbd-unix")
            .arg(dir.path().join("nbd.sock"))
            .arg("--control")
            .arg(dir.path().join("agent.sock"));
        c
    };
    // A state directory that cannot be made: the I/O error is said once.
    let line = one_line_error(
        serve("/proc/volmig-state"),
        &["/proc/volmig-state", "No such file or directory"],
    );
    assert!(!line.contains("Caused by"), "{line}");
    let mut nothing = Command::new(agent_bin());
    nothing
        .args(["serve", "--block", "none", "--state-dir"])
        .arg(dir.path().join("state"));
    one_line_error(nothing, &["nothing to serve on"]);
    // Missing TLS files are waited for (kubelet projects the Secret later,
    // see tests/tls_reload.rs); half a TLS configuration is a user error.
    let mut tls = serve(&dir.path().join("s2").display().to_string());
    tls.args(["--grpc", "127.0.0.1:0", "--tls-cert", "/nope.pem"]);
    one_line_error(
        tls,
        &["--grpc needs --tls-cert, --tls-key and --tls-client-ca"],
    );
}
