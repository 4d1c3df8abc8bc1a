//! Range locks for mirror mode: a mirrored write and a copy of the same grain
//! must not interleave (write source, write target vs read source, write
//! target), so both hold the grain's lock across their I/O. Locks are striped
//! by grain index; a range takes its stripes in ascending order, which makes
//! deadlock impossible. Only mirror mode and the copier take them: plain
//! tracked writes never do.

use std::sync::{Mutex, MutexGuard, TryLockError};

const STRIPES: usize = 1024;

pub struct RangeLocks {
    shift: u32,
    stripes: Box<[Mutex<()>]>,
}

pub struct RangeGuard<'a> {
    _guards: Vec<MutexGuard<'a, ()>>,
}

impl RangeLocks {
    pub fn new(grain: u64) -> Self {
        Self {
            shift: grain.trailing_zeros(),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    /// Stripe indices of a byte range, ascending, no duplicates.
    fn stripes_of(&self, offset: u64, length: u64) -> Vec<usize> {
        let first = offset >> self.shift;
        let last = (offset + length.max(1) - 1) >> self.shift;
        let mut idx: Vec<usize> = if last - first + 1 >= STRIPES as u64 {
            (0..STRIPES).collect()
        } else {
            (first..=last)
                .map(|g| (g % STRIPES as u64) as usize)
                .collect()
        };
        idx.sort_unstable();
        idx.dedup();
        idx
    }

    /// Locks every grain the byte range touches.
    pub fn lock(&self, offset: u64, length: u64) -> RangeGuard<'_> {
        let guards = self
            .stripes_of(offset, length)
            .into_iter()
            // A poisoned stripe only means another thread panicked while
            // holding it; the lock protects no data, so go on.
            .map(|i| self.stripes[i].lock().unwrap_or_else(|p| p.into_inner()))
            .collect();
        RangeGuard { _guards: guards }
    }

    /// Locks the range only if no stripe of it is held (by a copier or a
    /// mirrored write); `None` leaves nothing locked.
    pub fn try_lock(&self, offset: u64, length: u64) -> Option<RangeGuard<'_>> {
        let mut guards = Vec::new();
        for i in self.stripes_of(offset, length) {
            match self.stripes[i].try_lock() {
                Ok(g) => guards.push(g),
                // As in `lock`: poisoning protects nothing here.
                Err(TryLockError::Poisoned(p)) => guards.push(p.into_inner()),
                Err(TryLockError::WouldBlock) => return None,
            }
        }
        Some(RangeGuard { _guards: guards })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn try_lock_fails_only_on_a_held_stripe() {
        let locks = RangeLocks::new(65536);
        let held = locks.lock(65536, 1);
        assert!(locks.try_lock(0, 65536).is_some(), "grain 0 is free");
        assert!(
            locks.try_lock(0, 65537).is_none(),
            "grain 1 is held: the whole range must fail"
        );
        // the failed attempt left grain 0 unlocked
        assert!(locks.try_lock(0, 1).is_some());
        drop(held);
        assert!(locks.try_lock(0, 1 << 20).is_some());
    }
}
