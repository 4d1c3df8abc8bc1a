//! Where the master keeps session records. `FileStore` is the local-mode
//! communication data set: one JSON file per volume, written atomically,
//! with optimistic concurrency on the record's revision. The CR-status store
//! of the operator implements the same trait.

use std::future::Future;
use std::path::{Path, PathBuf};

use crate::error::{MasterError, Result};
use crate::record::SessionRecord;

pub trait SessionStore: Send + Sync {
    /// The record of `key` (a volume name locally), if any.
    fn load(&self, key: &str) -> impl Future<Output = Result<Option<SessionRecord>>> + Send;
    /// Saves `rec` if the stored revision is still `rec.revision`; bumps it.
    fn save(&self, key: &str, rec: &mut SessionRecord) -> impl Future<Output = Result<()>> + Send;
    /// Every key with a record.
    fn keys(&self) -> impl Future<Output = Result<Vec<String>>> + Send;
}

/// Why [`update`] gave up: other writers saved `key` five times in a row.
fn kept_changing() -> MasterError {
    MasterError::Invalid("the record kept changing; try again".into())
}

/// Loads `key`'s record, lets `change` edit it and saves it, loading again
/// when another writer saved in between (optimistic concurrency). `change`
/// returns whether there is anything to save.
pub async fn update<St: SessionStore>(
    store: &St,
    key: &str,
    mut change: impl FnMut(&mut SessionRecord) -> Result<bool>,
) -> Result<SessionRecord> {
    for _ in 0..5 {
        let mut rec = store
            .load(key)
            .await?
            .ok_or_else(|| MasterError::NoSession(key.to_string()))?;
        if !change(&mut rec)? {
            return Ok(rec);
        }
        match store.save(key, &mut rec).await {
            Ok(()) => return Ok(rec),
            Err(MasterError::Conflict { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(kept_changing())
}

#[derive(Debug, Clone)]
pub struct FileStore {
    root: PathBuf,
}

impl FileStore {
    pub fn open(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root).map_err(|source| MasterError::Store {
            path: root.to_path_buf(),
            source,
        })?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, key: &str) -> PathBuf {
        self.root.join(format!("{key}.session.json"))
    }

    /// `load` without a runtime: the record is one small file, read at once.
    pub fn load_now(&self, key: &str) -> Result<Option<SessionRecord>> {
        let path = self.path(key);
        match std::fs::read(&path) {
            Ok(data) => serde_json::from_slice(&data)
                .map(Some)
                .map_err(|e| MasterError::Corrupt {
                    path,
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(MasterError::Store { path, source }),
        }
    }
}

/// Serializes read-check-write within this process; across processes the
/// revision check still catches a lost update in all but a narrow window
/// (two masters of one local state directory are not a supported setup;
/// the epoch fences the agents regardless).
static SAVE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl SessionStore for FileStore {
    async fn load(&self, key: &str) -> Result<Option<SessionRecord>> {
        self.load_now(key)
    }

    async fn save(&self, key: &str, rec: &mut SessionRecord) -> Result<()> {
        let _g = SAVE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let found = self.load_now(key)?.map(|r| r.revision).unwrap_or(0);
        if found != rec.revision {
            return Err(MasterError::Conflict {
                key: key.to_string(),
                expected: rec.revision,
                found,
            });
        }
        rec.revision += 1;
        let path = self.path(key);
        let tmp = path.with_extension("json.tmp");
        let err = |source| MasterError::Store {
            path: path.clone(),
            source,
        };
        let data = serde_json::to_vec_pretty(&rec).map_err(|e| err(std::io::Error::other(e)))?;
        let r = std::fs::write(&tmp, data).and_then(|_| std::fs::rename(&tmp, &path));
        if let Err(e) = r {
            rec.revision -= 1;
            return Err(err(e));
        }
        Ok(())
    }

    async fn keys(&self) -> Result<Vec<String>> {
        let rd = std::fs::read_dir(&self.root).map_err(|source| MasterError::Store {
            path: self.root.clone(),
            source,
        })?;
        let mut keys: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".session.json"))
                    .map(str::to_string)
            })
            .collect();
        keys.sort();
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::SessionConfig;

    #[tokio::test]
    async fn optimistic_concurrency() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::open(dir.path()).unwrap();
        assert!(s.load("v").await.unwrap().is_none());
        let mut a = SessionRecord::new(
            "v",
            Path::new("/a"),
            Path::new("/b"),
            1,
            SessionConfig::default(),
        );
        s.save("v", &mut a).await.unwrap();
        assert_eq!(a.revision, 1);
        let mut b = s.load("v").await.unwrap().unwrap();
        b.abort_requested = true;
        s.save("v", &mut b).await.unwrap();
        // `a` is stale now
        a.bytes_copied = 5;
        assert!(matches!(
            s.save("v", &mut a).await,
            Err(MasterError::Conflict { .. })
        ));
        assert_eq!(a.revision, 1, "a failed save leaves the revision alone");
        assert!(s.load("v").await.unwrap().unwrap().abort_requested);
        assert_eq!(s.keys().await.unwrap(), vec!["v".to_string()]);
        std::fs::write(s.path("w"), b"{").unwrap();
        assert!(matches!(
            s.load("w").await,
            Err(MasterError::Corrupt { .. })
        ));
    }
}
