#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! `volmig-operator` ends a user error (here: no cluster to talk to) with
//! one line on stderr and a non-zero exit, also with `RUST_BACKTRACE=1`.

use std::process::Command;

#[test]
fn no_cluster_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_volmig-operator"))
        .args([
            "run",
            "--namespace",
            "volmig-system",
            "--instance",
            "volmig",
        ])
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
    assert_eq!(
        lines[0].matches("no-such-kubeconfig").count(),
        1,
        "the cause is said once: {stderr}"
    );
}
