//! Mutual-TLS certificates, made the one way users make them: `volmig
//! certs` (a CA; `agent.pem` for the names [`AGENT_NAMES`]; `master.pem`
//! for masters).

use std::path::Path;
use std::process::Command;

use volmig_master::ClientTls;

use crate::binaries::volmig_bin;
use crate::tools::{CMD_TIMEOUT, run_cmd};

/// The names the agent's certificate carries: the operator dials agents as
/// `volmig-agent`, local masters as `localhost` or 127.0.0.1.
pub const AGENT_NAMES: [&str; 3] = ["volmig-agent", "localhost", "127.0.0.1"];

/// Writes ca.pem, agent.pem, agent-key.pem, master.pem and master-key.pem
/// into `dir`.
pub fn make(dir: &Path) {
    let mut cmd = Command::new(volmig_bin());
    cmd.args(["certs", "--out"]).arg(dir);
    for h in AGENT_NAMES {
        cmd.args(["--host", h]);
    }
    run_cmd(cmd, CMD_TIMEOUT).assert_ok();
}

/// A master's client identity from a directory `make` wrote, for an agent
/// reached as `localhost` or 127.0.0.1.
pub fn client_tls(dir: &Path) -> ClientTls {
    ClientTls {
        ca: dir.join("ca.pem"),
        cert: dir.join("master.pem"),
        key: dir.join("master-key.pem"),
        domain: "localhost".into(),
    }
}

/// Puts `files` (name, content) into `dir` the way kubelet updates a
/// mounted Secret: the files are symlinks into `..data`, itself a symlink
/// to a directory of this version, swapped atomically; so a reader sees
/// the old set or the new one, never a mix.
pub fn project<'a>(dir: &Path, files: impl IntoIterator<Item = (&'a str, &'a str)>) {
    use std::os::unix::fs::symlink;
    std::fs::create_dir_all(dir).unwrap();
    let version = dir.join(format!(
        "..{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir(&version).unwrap();
    let mut names = Vec::new();
    for (name, content) in files {
        std::fs::write(version.join(name), content).unwrap();
        names.push(name.to_string());
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(version.file_name().unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for name in names {
        let link = dir.join(&name);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(format!("..data/{name}"), &link).unwrap();
        }
    }
}
