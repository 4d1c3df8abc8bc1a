//! The workspace's binaries for tests that run them as processes: one way
//! to find them. They are built by one `cargo build` ([`BUILD_ARGS`]) in
//! the profile and target directory of the running test, once per test
//! process: cheap when they are up to date, and a test never runs a stale
//! binary. (`scripts/test` runs the same build before the tests, so a cold
//! build does not count against a test's time.)

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// `cargo build` arguments building every binary the tests run, at once
/// (one build, one feature resolution for both).
pub const BUILD_ARGS: [&str; 9] = [
    "build",
    "--package",
    "volmig-node-agent",
    "--package",
    "volmig",
    "--bin",
    "volmig-agent",
    "--bin",
    "volmig",
];

/// The variables cargo sets for a crate it compiles or runs (besides
/// `CARGO_PKG_*` and `CARGO_BIN_EXE_*`).
const CRATE_ENV: [&str; 8] = [
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "CARGO_RUSTC_CURRENT_DIR",
    "OUT_DIR",
];

/// `volmig-agent`, the node agent.
pub fn agent_bin() -> PathBuf {
    built().join("volmig-agent")
}

/// `volmig`, the command line (local master, certificates, demo).
pub fn volmig_bin() -> PathBuf {
    built().join("volmig")
}

/// The directory of the freshly built binaries.
fn built() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(build).clone()
}

/// The target directory and profile of the running test binary:
/// `<target>/<profile>/deps/<test>` (or `<target>/<profile>/<test>`).
fn target_and_profile() -> (PathBuf, String) {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut dir = exe.parent().expect("the test binary's directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("the profile directory");
    }
    let profile = dir
        .file_name()
        .expect("a profile directory name")
        .to_string_lossy()
        .into_owned();
    let target = dir.parent().expect("the target directory").to_path_buf();
    (target, profile)
}

fn build() -> PathBuf {
    let (target, profile) = target_and_profile();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let mut cmd = Command::new(cargo);
    cmd.args(BUILD_ARGS)
        .arg("--quiet")
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target);
    // What cargo sets for the running test describes the test's crate, not
    // this build: a build script that watches one of them (ring watches
    // CARGO_MANIFEST_DIR) would see it "changed", rebuild here, and again in
    // the next ordinary build.
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if CRATE_ENV.contains(&k.as_ref())
            || k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_BIN_EXE_")
        {
            cmd.env_remove(&key);
        }
    }
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let st = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the binaries: {e}"));
    assert!(
        st.success(),
        "building the binaries for the test failed ({st})"
    );
    let dir = target.join(&profile);
    for bin in ["volmig-agent", "volmig"] {
        let path = dir.join(bin);
        assert!(path.is_file(), "{} missing after the build", path.display());
    }
    dir
}
