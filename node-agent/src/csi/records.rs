//! What the node plugin staged and published, persisted in
//! `<state-dir>/csi/<volume>.json` (written atomically: a temporary file,
//! fsync, rename, fsync of the directory), so a restarted agent answers a
//! repeated call as the first one was answered, and knows which mounts
//! are its own. A record is written before the step it describes, so a
//! crash leaves a record of at most one step more than was done, which
//! the repeated call (or the undoing one) completes or undoes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::capability::Capability;
use super::error::{CsiError, CsiResult};

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
    root: PathBuf,
}

fn state_err(path: &Path, e: impl std::fmt::Display) -> CsiError {
    CsiError::internal(format!("state file {}: {e}", path.display()))
}

impl StagedDir {
    pub fn open(state_dir: &Path) -> CsiResult<Self> {
        let root = state_dir.join("csi");
        std::fs::create_dir_all(&root).map_err(|e| state_err(&root, e))?;
        Ok(Self { root })
    }

    fn path(&self, volume: &str) -> PathBuf {
        self.root.join(format!("{volume}.json"))
    }

    pub fn load(&self, volume: &str) -> CsiResult<Option<Staged>> {
        let path = self.path(volume);
        match std::fs::read(&path) {
            Ok(data) => serde_json::from_slice(&data)
                .map(Some)
                .map_err(|e| state_err(&path, format!("corrupt: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(state_err(&path, e)),
        }
    }

    pub fn save(&self, rec: &Staged) -> CsiResult<()> {
        let path = self.path(&rec.volume);
        let tmp = path.with_extension("json.tmp");
        let data = serde_json::to_vec_pretty(rec).map_err(|e| state_err(&path, e))?;
        let mut f = std::fs::File::create(&tmp).map_err(|e| state_err(&tmp, e))?;
        f.write_all(&data)
            .and_then(|()| f.sync_all())
            .map_err(|e| state_err(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| state_err(&path, e))?;
        self.sync_dir()
    }

    /// Forgets a volume; absent already is fine.
    pub fn remove(&self, volume: &str) -> CsiResult<()> {
        let path = self.path(volume);
        match std::fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(state_err(&path, e)),
        }
    }

    /// Every staged volume's name.
    pub fn volumes(&self) -> CsiResult<Vec<String>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.root).map_err(|e| state_err(&self.root, e))? {
            let entry = entry.map_err(|e| state_err(&self.root, e))?;
            if let Some(v) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
            {
                out.push(v.to_string());
            }
        }
        out.sort();
        Ok(out)
    }

    fn sync_dir(&self) -> CsiResult<()> {
        std::fs::File::open(&self.root)
            .and_then(|d| d.sync_all())
            .map_err(|e| state_err(&self.root, e))
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
        std::fs::write(d.root.join("w.json.tmp"), b"{").unwrap();
        assert_eq!(d.volumes().unwrap(), ["v"]);
        std::fs::write(d.path("w"), b"{").unwrap();
        assert_eq!(
            d.load("w").unwrap_err().code,
            super::super::error::Code::Internal
        );
        d.remove("v").unwrap();
        d.remove("v").unwrap();
        assert_eq!(d.load("v").unwrap(), None);
    }
}
