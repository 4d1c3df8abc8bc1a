//! The concurrency limit: at most `limit` sessions (or groups) are driven
//! at once; the others wait in a queue (their records say `queued`). The
//! [`Supervisor`](crate::Supervisor) takes a slot for each job it runs.
//!
//! Slots live either in a state directory, where a slot is an exclusive
//! `flock` on `<dir>/slots/<i>.lock`, so the limit holds between the
//! sessions of one master process and between several `volmig migrate`
//! processes alike, and a master that dies (even by SIGKILL) frees its
//! slots with its file descriptors; or in the memory of the one master
//! process that drives every session (the operator).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::driver::StopSignal;
use crate::error::{MasterError, Result};
use crate::store::SessionStore;

#[derive(Debug, Clone)]
pub struct Slots {
    place: Place,
    limit: usize,
}

#[derive(Debug, Clone)]
enum Place {
    Dir(PathBuf),
    /// Which slots are taken.
    Memory(Arc<Mutex<Vec<bool>>>),
}

/// A held slot; dropping it (or dying) frees it.
#[derive(Debug)]
pub struct Slot {
    _hold: Hold,
    pub index: usize,
}

#[derive(Debug)]
enum Hold {
    /// Held while the descriptor stays open.
    File { _file: File },
    /// Held until dropped.
    Memory { _seat: MemorySeat },
}

#[derive(Debug)]
struct MemorySeat {
    taken: Arc<Mutex<Vec<bool>>>,
    index: usize,
}

impl Drop for MemorySeat {
    fn drop(&mut self) {
        if let Some(t) = lock(&self.taken).get_mut(self.index) {
            *t = false;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain flags: a panic elsewhere cannot leave them torn.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Slots {
    /// Slots in `state_dir`, shared by every master process using it.
    /// `limit` 0 means no limit.
    pub fn in_dir(state_dir: &Path, limit: usize) -> Result<Self> {
        let dir = state_dir.join("slots");
        std::fs::create_dir_all(&dir).map_err(|source| MasterError::Store {
            path: dir.clone(),
            source,
        })?;
        Ok(Self {
            place: Place::Dir(dir),
            limit,
        })
    }

    /// Slots in this process's memory. `limit` 0 means no limit.
    pub fn in_process(limit: usize) -> Self {
        Self {
            place: Place::Memory(Arc::new(Mutex::new(vec![false; limit]))),
            limit,
        }
    }

    /// No limit.
    pub fn unlimited() -> Self {
        Self::in_process(0)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A free slot now, if any.
    pub fn try_acquire(&self) -> Result<Option<Slot>> {
        match &self.place {
            Place::Dir(dir) => self.try_lock_file(dir),
            Place::Memory(taken) => {
                let mut t = lock(taken);
                let Some(index) = t.iter().position(|&b| !b) else {
                    return Ok(None);
                };
                t[index] = true;
                Ok(Some(Slot {
                    _hold: Hold::Memory {
                        _seat: MemorySeat {
                            taken: taken.clone(),
                            index,
                        },
                    },
                    index,
                }))
            }
        }
    }

    fn try_lock_file(&self, dir: &Path) -> Result<Option<Slot>> {
        for index in 0..self.limit {
            let path = dir.join(format!("{index}.lock"));
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
                return Ok(Some(Slot {
                    _hold: Hold::File { _file: file },
                    index,
                }));
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(MasterError::Store { path, source: err });
            }
        }
        Ok(None)
    }

    /// Slots held now (by anyone).
    pub fn held(&self) -> Result<usize> {
        match &self.place {
            Place::Memory(taken) => Ok(lock(taken).iter().filter(|&&b| b).count()),
            Place::Dir(_) => {
                // Take every free one for a moment: the rest are held.
                let mut free = Vec::new();
                while let Some(s) = self.try_acquire()? {
                    free.push(s);
                }
                Ok(self.limit - free.len())
            }
        }
    }

    /// Waits for a slot, marking the records of `keys` (one session, or the
    /// members of a group) queued meanwhile. `None` when stopped first, or
    /// without a limit (then nothing is held).
    pub async fn acquire<St: SessionStore>(
        &self,
        store: &St,
        keys: &[String],
        stop: &StopSignal,
    ) -> Result<Option<Slot>> {
        if self.limit == 0 {
            return Ok(None);
        }
        let mut marked = false;
        loop {
            if let Some(slot) = self.try_acquire()? {
                if marked {
                    set_queued(store, keys, false).await?;
                }
                return Ok(Some(slot));
            }
            if !marked {
                set_queued(store, keys, true).await?;
                marked = true;
                tracing::info!(
                    volumes = keys.join(","),
                    limit = self.limit,
                    "all session slots busy; queued"
                );
            }
            if stop.is_stopped() {
                set_queued(store, keys, false).await?;
                return Ok(None);
            }
            stop.sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn set_queued<St: SessionStore>(store: &St, keys: &[String], queued: bool) -> Result<()> {
    for key in keys {
        let r = crate::store::update(store, key, |rec| {
            let change = rec.queued != queued;
            rec.queued = queued;
            Ok(change)
        })
        .await;
        match r {
            // The flag is for people watching; a record that keeps changing
            // under us must not keep its session from running.
            Err(MasterError::Invalid(_)) | Ok(_) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_holds_and_a_dropped_slot_frees() {
        let d = tempfile::tempdir().unwrap();
        let s = Slots::in_dir(d.path(), 2).unwrap();
        let a = s.try_acquire().unwrap().unwrap();
        let b = s.try_acquire().unwrap().unwrap();
        assert_ne!(a.index, b.index);
        assert!(
            s.try_acquire().unwrap().is_none(),
            "a third slot was granted"
        );
        // Another master process sees the same slots.
        let other = Slots::in_dir(d.path(), 2).unwrap();
        assert!(other.try_acquire().unwrap().is_none());
        assert_eq!(other.held().unwrap(), 2);
        drop(a);
        assert_eq!(other.held().unwrap(), 1);
        assert!(other.try_acquire().unwrap().is_some());
    }

    #[test]
    fn in_process_slots_hold_their_limit_across_clones() {
        let s = Slots::in_process(2);
        let clone = s.clone();
        let a = s.try_acquire().unwrap().unwrap();
        let _b = clone.try_acquire().unwrap().unwrap();
        assert!(s.try_acquire().unwrap().is_none());
        assert_eq!(clone.held().unwrap(), 2);
        drop(a);
        assert_eq!(s.held().unwrap(), 1);
        assert!(clone.try_acquire().unwrap().is_some());
        // No limit: nothing to take, nothing held.
        let none = Slots::unlimited();
        assert!(none.try_acquire().unwrap().is_none());
        assert_eq!(none.limit(), 0);
    }
}
