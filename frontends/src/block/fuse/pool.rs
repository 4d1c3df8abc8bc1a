//! Request buffers by size class (powers of two from 4 KiB), so READ and
//! WRITE do not allocate in the steady state. A buffer handed out has the
//! length asked for; its contents are stale bytes of earlier requests
//! (always overwritten before use: READ is filled by the volume, WRITE by
//! the request). Bounded in idle buffers per class.

use std::sync::{Mutex, PoisonError};

const MIN_CLASS: usize = 4096;
const CLASSES: usize = 10; // 4 KiB .. 2 MiB
/// Idle buffers kept per class: many small ones, few large ones.
const SMALL_IDLE: usize = 64;
const LARGE_IDLE: usize = 8;
const LARGE: usize = 128 * 1024;

#[derive(Debug, Default)]
pub struct SizePool {
    classes: [Mutex<Vec<Vec<u8>>>; CLASSES],
}

fn class_of(len: usize) -> Option<usize> {
    let c = len.max(MIN_CLASS).next_power_of_two();
    let i = (c / MIN_CLASS).trailing_zeros() as usize;
    (i < CLASSES).then_some(i)
}

fn class_len(i: usize) -> usize {
    MIN_CLASS << i
}

impl SizePool {
    /// A buffer of exactly `len` bytes.
    pub fn get(&self, len: usize) -> Vec<u8> {
        let Some(i) = class_of(len) else {
            return vec![0; len];
        };
        let reused = self.classes[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match reused {
            Some(mut b) => {
                // Idle buffers are kept at their class's length.
                b.truncate(len);
                b
            }
            None => {
                let mut b = vec![0; class_len(i)];
                b.truncate(len);
                b
            }
        }
    }

    /// Takes a buffer back (any buffer: one of another size is dropped).
    /// Growing it back to its class's length zeroes less than `len` bytes
    /// (the class is the next power of two).
    pub fn put(&self, mut b: Vec<u8>) {
        let cap = b.capacity();
        if cap < MIN_CLASS {
            return;
        }
        // The largest class the allocation holds.
        let floor = 1usize << (usize::BITS - 1 - cap.leading_zeros());
        let Some(i) = class_of(floor) else {
            return;
        };
        let mut idle = self.classes[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let max = if class_len(i) >= LARGE {
            LARGE_IDLE
        } else {
            SMALL_IDLE
        };
        if idle.len() < max {
            b.resize(class_len(i), 0);
            idle.push(b);
        }
    }

    #[cfg(test)]
    fn idle(&self, len: usize) -> usize {
        class_of(len).map_or(0, |i| {
            self.classes[i]
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_by_class() {
        let p = SizePool::default();
        let b = p.get(5000);
        assert_eq!(b.len(), 5000);
        assert_eq!(b.capacity(), 8192);
        let ptr = b.as_ptr();
        p.put(b);
        assert_eq!(p.idle(8192), 1);
        let c = p.get(6000);
        assert_eq!((c.len(), c.as_ptr()), (6000, ptr), "the same buffer again");
        assert_eq!(p.idle(8192), 0);
        let big = p.get(1 << 20);
        assert_eq!(big.capacity(), 1 << 20);
        let huge = p.get(64 << 20);
        assert_eq!(huge.len(), 64 << 20, "beyond the classes: plain allocation");
        p.put(huge);
        p.put(vec![0; 100]);
        p.put(big);
        assert_eq!(p.idle(1 << 20), 1);
    }

    #[test]
    fn idle_buffers_are_bounded() {
        let p = SizePool::default();
        let many: Vec<Vec<u8>> = (0..200).map(|_| p.get(4096)).collect();
        for b in many {
            p.put(b);
        }
        assert_eq!(p.idle(4096), SMALL_IDLE);
        let large: Vec<Vec<u8>> = (0..20).map(|_| p.get(1 << 20)).collect();
        for b in large {
            p.put(b);
        }
        assert_eq!(p.idle(1 << 20), LARGE_IDLE);
    }
}
