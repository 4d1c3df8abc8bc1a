//! The agent's local checkpoint of a session, beside its dirty map in the
//! state directory (never on source or target): what a restarted agent
//! needs to attach the session again. Phase and progress are the master's
//! business (its session record); this is the node's.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use volmig_api::SessionConfig;

use crate::error::Result;
use crate::state_file::JsonDir;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlaveRecord {
    pub session_id: String,
    /// Newest master epoch seen for this volume (fencing).
    pub epoch: u64,
    pub volume: String,
    pub source: PathBuf,
    pub target: PathBuf,
    pub size: u64,
    pub config: SessionConfig,
    /// A secondary agent of a multi-attach volume: tracks its workload's
    /// writes for the copying agent, never copies.
    #[serde(default)]
    pub monitor_only: bool,
    pub mirror: bool,
    /// The workload's active device is the target.
    pub redirected: bool,
    /// Terminated or rolled back: nothing attached any more.
    pub finished: bool,
    /// Result of Terminate's verification, once run.
    pub verified: Option<bool>,
    pub mismatch_offset: Option<u64>,
    pub resumes: u32,
}

/// The checkpoint files of one agent.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: JsonDir,
}

impl StateDir {
    pub fn open(root: &Path) -> Result<Self> {
        Ok(Self {
            dir: JsonDir::open(root.to_path_buf(), ".slave.json")?,
        })
    }

    pub fn root(&self) -> &Path {
        self.dir.root()
    }

    pub fn record_path(&self, volume: &str) -> PathBuf {
        self.dir.path(volume)
    }

    pub fn dirty_map_path(&self, volume: &str) -> PathBuf {
        self.root().join(format!("{volume}.dirty"))
    }

    /// Writes the checkpoint, durably (fsync of the file and directory).
    pub fn save(&self, rec: &SlaveRecord) -> Result<()> {
        Ok(self.dir.save(&rec.volume, rec)?)
    }

    pub fn load(&self, volume: &str) -> Result<Option<SlaveRecord>> {
        Ok(self.dir.load(volume)?)
    }

    pub fn remove_dirty_map(&self, volume: &str) {
        let _ = std::fs::remove_file(self.dirty_map_path(volume));
    }

    /// Forgets a volume's (finished) session: its record and dirty map.
    pub fn remove_checkpoint(&self, volume: &str) {
        let _ = self.dir.remove(volume);
        self.remove_dirty_map(volume);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::open(dir.path()).unwrap();
        assert_eq!(sd.load("v").unwrap(), None);
        let r = SlaveRecord {
            session_id: "s".into(),
            epoch: 3,
            volume: "v".into(),
            source: "/a".into(),
            target: "/b".into(),
            size: 10,
            config: SessionConfig::default(),
            monitor_only: false,
            mirror: false,
            redirected: true,
            finished: false,
            verified: None,
            mismatch_offset: None,
            resumes: 0,
        };
        sd.save(&r).unwrap();
        assert_eq!(sd.load("v").unwrap(), Some(r));
        std::fs::write(sd.record_path("w"), b"[").unwrap();
        assert!(matches!(
            sd.load("w"),
            Err(crate::AgentError::CorruptState { .. })
        ));
    }
}
