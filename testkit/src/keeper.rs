//! The descriptor keeper process (`volmig-agent keeper`), the sidecar that
//! holds an agent's /dev/fuse descriptors across its restarts.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::binaries::agent_bin;
use crate::process::ChildGuard;
use crate::tools::wait_until;

/// A running `volmig-agent keeper`; killed when dropped.
pub struct KeeperProcess {
    socket: PathBuf,
    log: PathBuf,
    child: Option<ChildGuard>,
}

impl KeeperProcess {
    /// A keeper with its socket `<dir>/keeper.sock` and log `<dir>/keeper.log`.
    pub fn start(dir: &Path) -> Self {
        let socket = dir.join("keeper.sock");
        let log = dir.join("keeper.log");
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(agent_bin())
            .arg("keeper")
            .arg("--socket")
            .arg(&socket)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawning volmig-agent keeper");
        let mut me = Self {
            socket,
            log,
            child: Some(ChildGuard::new(child)),
        };
        let sock = me.socket.clone();
        wait_until("the keeper's socket", Duration::from_secs(30), || {
            if let Some(st) = me.child.as_mut().and_then(|c| c.try_wait()) {
                panic!("the keeper exited with {st}:\n{}", me.log_text());
            }
            sock.exists()
        });
        me
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.is_running())
    }
}

impl Drop for KeeperProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }
}
