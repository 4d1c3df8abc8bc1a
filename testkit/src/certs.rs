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
