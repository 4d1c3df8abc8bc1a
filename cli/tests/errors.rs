#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! `kubectl-volmig` ends a user error with one line on stderr and a
//! non-zero exit, also with `RUST_BACKTRACE=1`; a cause it nests (kube's
//! configuration errors say theirs four times over) is said once.

use std::process::Command;

/// Runs kubectl-volmig with `args` and `RUST_BACKTRACE=1`, no cluster and
/// a kubeconfig that does not exist; asserts one line, `error: `, each of
/// `want` exactly once; returns the line.
#[cfg(feature = "kubectl")]
fn one_line_error(args: &[&str], want: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kubectl-volmig"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LIB_BACKTRACE", "1")
        .env("HOME", dir.path())
        .env("KUBECONFIG", dir.path().join("no-such-kubeconfig"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "succeeded: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "stderr is not one line:\n{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for w in want {
        assert_eq!(
            lines[0].matches(w).count(),
            1,
            "{w:?} not said once: {stderr}"
        );
    }
    lines[0].to_string()
}

#[cfg(feature = "kubectl")]
#[test]
fn no_kubeconfig_is_said_once() {
    one_line_error(&["status", "m"], &["no-such-kubeconfig"]);
    one_line_error(&["list", "-A"], &["no-such-kubeconfig"]);
}

#[cfg(feature = "kubectl")]
#[test]
fn invalid_arguments_are_one_line() {
    one_line_error(
        &["migrate", "data", "--dry-run"],
        &["say where the data goes"],
    );
    one_line_error(
        &[
            "migrate",
            "data",
            "--to-storage-class",
            "x",
            "--sync-goal",
            "0ms",
            "--dry-run",
        ],
        &["must be at least 1ms"],
    );
}
