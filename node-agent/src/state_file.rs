//! The agent's state files: one JSON document per name in a directory of
//! its state directory (served volumes, session checkpoints, the CSI node
//! plugin's records). Written atomically and durably: a temporary file,
//! fsync, rename over the old one, fsync of the directory; so a crash
//! leaves either the old document or the new one, and a document a call
//! returned from survives a power loss.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// What went wrong with a state file.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// A system call failed on `path`.
    #[error("state file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `path` is there but is not the document it should be.
    #[error("state file {} is corrupt: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateFileError + '_ {
    move |source| StateFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A directory of JSON documents named `<name><suffix>`.
#[derive(Debug, Clone)]
pub struct JsonDir {
    root: PathBuf,
    suffix: &'static str,
}

impl JsonDir {
    /// Opens (making it if needed) `root`, whose documents end in `suffix`
    /// (e.g. `.json`).
    pub fn open(root: PathBuf, suffix: &'static str) -> Result<Self, StateFileError> {
        std::fs::create_dir_all(&root).map_err(io_err(&root))?;
        Ok(Self { root, suffix })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}{}", self.suffix))
    }

    /// Writes `doc` as `name`, atomically and durably.
    pub fn save<T: Serialize>(&self, name: &str, doc: &T) -> Result<(), StateFileError> {
        let path = self.path(name);
        let tmp = path.with_extension("tmp");
        let data = serde_json::to_vec_pretty(doc).map_err(|e| StateFileError::Corrupt {
            path: path.clone(),
            reason: format!("cannot serialize: {e}"),
        })?;
        let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(&data)
            .and_then(|()| f.sync_all())
            .map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        self.sync_dir()
    }

    /// The document `name`, or None if there is none.
    pub fn load<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StateFileError> {
        let path = self.path(name);
        match std::fs::read(&path) {
            Ok(data) => {
                serde_json::from_slice(&data)
                    .map(Some)
                    .map_err(|e| StateFileError::Corrupt {
                        path,
                        reason: e.to_string(),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateFileError::Io { path, source }),
        }
    }

    /// Forgets `name`; absent already is fine.
    pub fn remove(&self, name: &str) -> Result<(), StateFileError> {
        let path = self.path(name);
        match std::fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateFileError::Io { path, source }),
        }
    }

    /// The names of every document, sorted (temporary files left by a
    /// crash are not documents).
    pub fn names(&self) -> Result<Vec<String>, StateFileError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.root).map_err(io_err(&self.root))? {
            let entry = entry.map_err(io_err(&self.root))?;
            if let Some(name) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(self.suffix))
            {
                out.push(name.to_string());
            }
        }
        out.sort();
        Ok(out)
    }

    fn sync_dir(&self) -> Result<(), StateFileError> {
        std::fs::File::open(&self.root)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.root))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Doc {
        n: u32,
    }

    #[test]
    fn documents_roundtrip_replace_and_go() {
        let t = tempfile::tempdir().unwrap();
        let d = JsonDir::open(t.path().join("x"), ".slave.json").unwrap();
        assert_eq!(d.load::<Doc>("a").unwrap(), None);
        d.save("a", &Doc { n: 1 }).unwrap();
        d.save("a", &Doc { n: 2 }).unwrap();
        d.save("b", &Doc { n: 3 }).unwrap();
        assert_eq!(d.load::<Doc>("a").unwrap(), Some(Doc { n: 2 }));
        // A crash between write and rename leaves a temporary file: not a document.
        std::fs::write(d.root().join("c.slave.tmp"), b"{").unwrap();
        std::fs::write(d.root().join("c.dirty"), b"").unwrap();
        assert_eq!(d.names().unwrap(), ["a", "b"]);
        d.remove("a").unwrap();
        d.remove("a").unwrap();
        assert_eq!(d.load::<Doc>("a").unwrap(), None);
        std::fs::write(d.path("b"), b"{nope").unwrap();
        let e = d.load::<Doc>("b").unwrap_err();
        assert!(matches!(e, StateFileError::Corrupt { .. }), "{e}");
    }
}
