//! What the node plugin staged and published, persisted in
//! `<state-dir>/csi/<volume>.json` (written atomically: a temporary file,
//! fsync, rename, fsync of the directory), so a restarted agent answers a
//! repeated call as the first one was answered, and knows which mounts
//! are its own. A record is written before the step it describes, so a
//! crash leaves a record of at most one step more than was done, which
//! the repeated call (or the undoing one) completes or undoes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::capability::Capability;
use super::error::{CsiError, CsiResult};
use crate::state_file::{JsonDir, StateFileError};

/// A volume published at a target path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publication {
    pub capability: Capability,
    pub readonly: bool,
}

/// A volume staged on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staged {
    pub volume: String,
    pub staging_path: PathBuf,
    pub capability: Capability,
    /// The backing device the publish context named.
    pub backing: PathBuf,
    /// The volume's kernel block device, once it is served.
    #[serde(default)]
    pub device: Option<PathBuf>,
    /// Mount access: the filesystem found or made, once mounted.
    #[serde(default)]
    pub fs: Option<String>,
    /// By target path.
    #[serde(default)]
    pub published: BTreeMap<PathBuf, Publication>,
}

impl Staged {
    /// `path` is where this volume is staged or published.
    pub fn is_at(&self, path: &Path) -> bool {
        self.staging_path == path || self.published.contains_key(path)
    }
}

/// `<state-dir>/csi/`.
#[derive(Debug, Clone)]
pub struct StagedDir {
    dir: JsonDir,
}

fn state_err(e: StateFileError) -> CsiError {
    CsiError::internal(e.to_string())
}

impl StagedDir {
    pub fn open(state_dir: &Path) -> CsiResult<Self> {
        Ok(Self {
            dir: JsonDir::open(state_dir.join("csi"), ".json").map_err(state_err)?,
        })
    }

    pub fn load(&self, volume: &str) -> CsiResult<Option<Staged>> {
        self.dir.load(volume).map_err(state_err)
    }

    pub fn save(&self, rec: &Staged) -> CsiResult<()> {
        self.dir.save(&rec.volume, rec).map_err(state_err)
    }

    /// Forgets a volume; absent already is fine.
    pub fn remove(&self, volume: &str) -> CsiResult<()> {
        self.dir.remove(volume).map_err(state_err)
    }

    /// Every staged volume's name.
    pub fn volumes(&self) -> CsiResult<Vec<String>> {
        self.dir.names().map_err(state_err)
    }
}

#[cfg(test)]
mod tests {
    use super::super::capability::{Access, AccessMode};
    use super::*;

    #[test]
    fn records_roundtrip_and_go() {
        let dir = tempfile::tempdir().unwrap();
        let d = StagedDir::open(dir.path()).unwrap();
        assert_eq!(d.load("v").unwrap(), None);
        let mut rec = Staged {
            volume: "v".into(),
            staging_path: "/st".into(),
            capability: Capability {
                access: Access::Mount {
                    fs_type: String::new(),
                    flags: vec!["noatime".into()],
                },
                mode: AccessMode::SingleNodeWriter,
            },
            backing: "/dev/sdb".into(),
            device: None,
            fs: None,
            published: BTreeMap::new(),
        };
        d.save(&rec).unwrap();
        rec.device = Some("/dev/loop3".into());
        rec.published.insert(
            "/t".into(),
            Publication {
                capability: rec.capability.clone(),
                readonly: true,
            },
        );
        d.save(&rec).unwrap();
        assert_eq!(d.load("v").unwrap().as_ref(), Some(&rec));
        assert!(rec.is_at(Path::new("/t")) && rec.is_at(Path::new("/st")));
        assert!(!rec.is_at(Path::new("/x")));
        std::fs::write(d.dir.root().join("w.tmp"), b"{").unwrap();
        assert_eq!(d.volumes().unwrap(), ["v"]);
        std::fs::write(d.dir.path("w"), b"{").unwrap();
        assert_eq!(
            d.load("w").unwrap_err().code,
            super::super::error::Code::Internal
        );
        d.remove("v").unwrap();
        d.remove("v").unwrap();
        assert_eq!(d.load("v").unwrap(), None);
    }
}
