//! Range locks for mirror mode: a mirrored write and a copy of the same grain
//! must not interleave (write source, write target vs read source, write
//! target), so both hold the grain's lock across their I/O. Locks are striped
//! by grain index; a range takes its stripes in ascending order, which makes
//! deadlock impossible. Only mirror mode and the copier take them: plain
//! tracked writes never do.

use std::sync::{Mutex, MutexGuard};

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

    /// Locks every grain the byte range touches.
    pub fn lock(&self, offset: u64, length: u64) -> RangeGuard<'_> {
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
        let guards = idx
            .into_iter()
            // A poisoned stripe only means another thread panicked while
            // holding it; the lock protects no data, so go on.
            .map(|i| self.stripes[i].lock().unwrap_or_else(|p| p.into_inner()))
            .collect();
        RangeGuard { _guards: guards }
    }
}
