//! A lab for tests across real processes: a temporary directory with
//! volumes (pattern sources and sparse targets), agents serving them, and
//! one `volmig migrate` master whose records live in `master-state/`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use serde_json::Value;

use crate::agent::{AgentBuilder, AgentProcess};
use crate::master::LocalMaster;
use crate::pattern::{Expected, pattern_file, sparse_file};

pub struct Lab {
    dir: tempfile::TempDir,
    certs: Option<PathBuf>,
    master: LocalMaster,
}

impl Lab {
    /// The master dials each agent on its control socket (no TLS).
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let master = LocalMaster::new(&dir.path().join("master-state"));
        Lab {
            dir,
            certs: None,
            master,
        }
    }

    /// Agents serve gRPC with mutual TLS; certificates in `certs/`.
    pub fn with_tls() -> Self {
        let mut lab = Self::new();
        let certs = lab.p("certs");
        crate::certs::make(&certs);
        lab.certs = Some(certs);
        lab
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The certificates' directory (labs made `with_tls`).
    pub fn certs(&self) -> &Path {
        self.certs.as_deref().expect("a lab made with_tls()")
    }

    pub fn source(&self, vol: &str) -> PathBuf {
        self.p(&format!("{vol}.src.img"))
    }

    pub fn target(&self, vol: &str) -> PathBuf {
        self.p(&format!("{vol}.tgt.img"))
    }

    /// A source of `size` bytes holding generation 0 everywhere and an
    /// empty (sparse) target of the same size; what the source holds.
    pub fn volume(&self, vol: &str, size: u64) -> Arc<Expected> {
        pattern_file(&self.source(vol), size, 0);
        sparse_file(&self.target(vol), size);
        Expected::pattern(size, 0)
    }

    /// Agent `name` serving the sources of `volumes`.
    pub fn agent(&self, name: &str, volumes: &[&str]) -> AgentBuilder {
        let mut b = AgentBuilder::new(self.dir(), name);
        if let Some(c) = &self.certs {
            b = b.tls(c);
        }
        for v in volumes {
            b = b.export(v, &self.source(v));
        }
        b
    }

    pub fn master(&self) -> &LocalMaster {
        &self.master
    }

    /// `volmig migrate` of `vol` to its target on `agent`, plus `extra`.
    pub fn migrate(&self, agent: &AgentProcess, vol: &str, extra: &[impl AsRef<OsStr>]) -> Command {
        self.master.command(agent, vol, &self.target(vol), extra)
    }

    /// `--volume VOL=TARGET@AGENT` for one more volume.
    pub fn also(&self, agent: &AgentProcess, vol: &str) -> [String; 2] {
        LocalMaster::also(agent, vol, &self.target(vol))
    }

    /// The master's record of `vol` (Null if none).
    pub fn record(&self, vol: &str) -> Value {
        self.master.record(vol)
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}
