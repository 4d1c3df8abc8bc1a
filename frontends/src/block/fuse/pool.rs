//! Request data buffers, all made (and their memory touched) when the
//! file system starts, and bounded: the server never allocates memory to
//! serve a READ or a WRITE. Under memory pressure an allocation (a page
//! fault) on the I/O path may wait in reclaim for writeback, and that
//! writeback may go through this very server: a deadlock (seen in a
//! memory cgroup with buffers allocated on demand). With every buffer
//! taken, the next request waits for one to come back; the kernel queues
//! its requests meanwhile.
//!
//! Two tiers: small buffers (up to [`SMALL`]) for the many small requests,
//! large ones (`max_write`) for the rest. A buffer handed out has the
//! length asked for; its contents are stale bytes of earlier requests
//! (READ is filled by the volume, WRITE by the request).

use std::sync::{Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The small tier's buffer size.
pub const SMALL: usize = 64 * 1024;

/// Touches every page of `v` (writes it), so using it later faults in no
/// memory.
pub fn prefault(v: &mut [u8]) {
    v.iter_mut().step_by(4096).for_each(|b| *b = 1);
    std::hint::black_box(&*v);
}

#[derive(Debug)]
struct Tier {
    len: usize,
    count: usize,
    free: Mutex<Vec<Vec<u8>>>,
    slots: std::sync::Arc<Semaphore>,
}

impl Tier {
    fn new(len: usize, count: usize) -> Self {
        let free = (0..count)
            .map(|_| {
                let mut b = vec![0u8; len];
                prefault(&mut b);
                b
            })
            .collect();
        Self {
            len,
            count,
            free: Mutex::new(free),
            slots: std::sync::Arc::new(Semaphore::new(count)),
        }
    }

    fn take(&self, len: usize) -> Vec<u8> {
        let b = self
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        // A slot guarantees a buffer, unless a volume gave back another
        // (smaller) one than it got: then a new one is made.
        let mut b = b.unwrap_or_else(|| vec![0u8; self.len]);
        if b.len() >= len {
            b.truncate(len);
        } else {
            // Within capacity: zeroes only what a shorter use cut off.
            b.resize(len, 0);
        }
        b
    }
}

/// A buffer's place in its tier, given back when the request is done.
#[derive(Debug)]
pub struct Slot(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

#[derive(Debug)]
pub struct Buffers {
    small: Tier,
    large: Tier,
}

impl Buffers {
    /// `small` buffers of [`SMALL`] bytes and `large` ones of `max_len`.
    pub fn new(small: usize, large: usize, max_len: usize) -> Self {
        Self {
            small: Tier::new(SMALL, small.max(1)),
            large: Tier::new(max_len.max(SMALL), large.max(1)),
        }
    }

    fn tier(&self, len: usize) -> &Tier {
        if len <= SMALL {
            &self.small
        } else {
            &self.large
        }
    }

    /// The largest buffer there is.
    pub fn max_len(&self) -> usize {
        self.large.len
    }

    /// A buffer of exactly `len` bytes (at most [`Buffers::max_len`]),
    /// waiting for one to come back if all are in use.
    pub async fn get(&self, len: usize) -> (Vec<u8>, Slot) {
        let t = self.tier(len);
        // The semaphore is never closed: a permit always comes.
        let permit = t.slots.clone().acquire_owned().await.ok();
        (t.take(len), Slot(permit))
    }

    /// Gives a buffer back (before its slot: see [`Slot`]).
    pub fn put(&self, b: Vec<u8>) {
        let t = if b.capacity() >= self.large.len {
            &self.large
        } else if b.capacity() >= SMALL {
            &self.small
        } else {
            return;
        };
        let mut free = t.free.lock().unwrap_or_else(PoisonError::into_inner);
        if free.len() < t.count {
            free.push(b);
        }
    }

    #[cfg(test)]
    fn idle(&self, len: usize) -> usize {
        self.tier(len)
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn buffers_are_made_up_front_and_bounded() {
        let p = Buffers::new(2, 1, 1 << 20);
        assert_eq!((p.idle(4096), p.idle(1 << 20)), (2, 1));
        let (a, sa) = p.get(4096).await;
        assert_eq!((a.len(), a[0]), (4096, 1), "made and touched before");
        let (b, _sb) = p.get(100).await;
        assert_eq!(b.len(), 100);
        // All small ones taken: the next waits until one comes back.
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), p.get(10)).await;
        assert!(waiting.is_err(), "no third small buffer");
        let ptr = a.as_ptr();
        p.put(a);
        drop(sa);
        let (c, _sc) = p.get(60000).await;
        assert_eq!((c.len(), c.as_ptr()), (60000, ptr), "the same buffer again");
        let (d, _sd) = p.get(1 << 20).await;
        assert_eq!(d.len(), 1 << 20);
        assert_eq!(p.max_len(), 1 << 20);
    }
}
