//! The concurrency limit: at most `limit` sessions are driven at once per
//! state directory; the others wait in a queue (their records say
//! `queued`). A slot is an exclusive `flock` on `<dir>/slots/<i>.lock`, so
//! it works between the sessions of one master process and between
//! several `volmig migrate` processes alike, and a master that dies (even
//! by SIGKILL) frees its slots with its file descriptors.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::StopSignal;
use crate::error::{MasterError, Result};
use crate::store::SessionStore;

#[derive(Debug, Clone)]
pub struct Slots {
    dir: PathBuf,
    limit: usize,
}

/// A held slot; dropping it (or dying) frees it.
#[derive(Debug)]
pub struct Slot {
    _file: File,
    pub index: usize,
}

impl Slots {
    /// `limit` 0 means no limit.
    pub fn new(state_dir: &Path, limit: usize) -> Result<Self> {
        let dir = state_dir.join("slots");
        std::fs::create_dir_all(&dir).map_err(|source| MasterError::Store {
            path: dir.clone(),
            source,
        })?;
        Ok(Self { dir, limit })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A free slot now, if any.
    pub fn try_acquire(&self) -> Result<Option<Slot>> {
        for index in 0..self.limit {
            let path = self.dir.join(format!("{index}.lock"));
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|source| MasterError::Store {
                    path: path.clone(),
                    source,
                })?;
            // SAFETY: flock on a file descriptor we own for the duration of
            // the call; LOCK_NB never blocks.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r == 0 {
                return Ok(Some(Slot { _file: file, index }));
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(MasterError::Store { path, source: err });
            }
        }
        Ok(None)
    }

    /// Waits for a slot, marking `key`'s record queued meanwhile. `None`
    /// when stopped first, or without a limit (then nothing is held).
    pub async fn acquire<St: SessionStore>(
        &self,
        store: &St,
        key: &str,
        stop: &StopSignal,
    ) -> Result<Option<Slot>> {
        if self.limit == 0 {
            return Ok(None);
        }
        let mut marked = false;
        loop {
            if let Some(slot) = self.try_acquire()? {
                if marked {
                    set_queued(store, key, false).await?;
                }
                return Ok(Some(slot));
            }
            if !marked {
                set_queued(store, key, true).await?;
                marked = true;
                tracing::info!(
                    volume = key,
                    limit = self.limit,
                    "all session slots busy; queued"
                );
            }
            if stop.is_stopped() {
                return Ok(None);
            }
            stop.sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn set_queued<St: SessionStore>(store: &St, key: &str, queued: bool) -> Result<()> {
    let r = crate::store::update(store, key, |rec| {
        let change = rec.queued != queued;
        rec.queued = queued;
        Ok(change)
    })
    .await;
    match r {
        // The flag is for people watching; a record that keeps changing
        // under us must not keep its session from running.
        Err(MasterError::Invalid(_)) => Ok(()),
        r => r.map(|_| ()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_holds_and_a_dropped_slot_frees() {
        let d = tempfile::tempdir().unwrap();
        let s = Slots::new(d.path(), 2).unwrap();
        let a = s.try_acquire().unwrap().unwrap();
        let b = s.try_acquire().unwrap().unwrap();
        assert_ne!(a.index, b.index);
        assert!(
            s.try_acquire().unwrap().is_none(),
            "a third slot was granted"
        );
        // Another master process sees the same slots.
        let other = Slots::new(d.path(), 2).unwrap();
        assert!(other.try_acquire().unwrap().is_none());
        drop(a);
        assert!(other.try_acquire().unwrap().is_some());
    }
}
