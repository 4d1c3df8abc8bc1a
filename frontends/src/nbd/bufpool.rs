//! A small pool of data buffers so READ/WRITE don't allocate a fresh large
//! `Vec` per request in the steady state.
//!
//! Bounded in the number of idle buffers, in the capacity of any one pooled
//! buffer and in the total idle capacity. Buffers handed out have the
//! requested length; their contents are unspecified (stale data from an
//! earlier request may remain), so users must overwrite all of them before
//! sending them anywhere: READ hands the whole buffer to the backend to fill,
//! WRITE fills it from the socket.

use std::sync::{Mutex, PoisonError};

/// Default limits used by the server.
pub const DEFAULT_MAX_BUFFERS: usize = 32;
pub const DEFAULT_MAX_BUFFER_SIZE: usize = 8 * 1024 * 1024;
pub const DEFAULT_MAX_TOTAL_BYTES: usize = 128 * 1024 * 1024;

#[derive(Debug)]
pub struct BufPool {
    state: Mutex<State>,
    max_buffers: usize,
    max_buffer_size: usize,
    max_total_bytes: usize,
}

#[derive(Debug, Default)]
struct State {
    free: Vec<Vec<u8>>,
    /// Sum of the capacities of `free`.
    total: usize,
}

impl Default for BufPool {
    fn default() -> Self {
        BufPool::new(
            DEFAULT_MAX_BUFFERS,
            DEFAULT_MAX_BUFFER_SIZE,
            DEFAULT_MAX_TOTAL_BYTES,
        )
    }
}

impl BufPool {
    pub fn new(max_buffers: usize, max_buffer_size: usize, max_total_bytes: usize) -> Self {
        BufPool {
            state: Mutex::new(State::default()),
            max_buffers,
            max_buffer_size,
            max_total_bytes,
        }
    }

    /// A buffer of exactly `len` bytes (contents unspecified).
    pub fn get(&self, len: usize) -> Vec<u8> {
        let reused = {
            let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            // Best fit: the smallest idle buffer that is large enough.
            let best = st
                .free
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i);
            best.map(|i| {
                let b = st.free.swap_remove(i);
                st.total -= b.capacity();
                b
            })
        };
        match reused {
            Some(mut b) => {
                if b.len() >= len {
                    b.truncate(len);
                } else {
                    // Within capacity: no reallocation, only the tail is zeroed.
                    b.resize(len, 0);
                }
                b
            }
            None => vec![0u8; len],
        }
    }

    /// Give a buffer back; it is dropped if the pool is full or it is too big.
    pub fn put(&self, buf: Vec<u8>) {
        let cap = buf.capacity();
        if cap == 0 || cap > self.max_buffer_size {
            return;
        }
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if st.free.len() >= self.max_buffers || st.total + cap > self.max_total_bytes {
            return;
        }
        st.total += cap;
        st.free.push(buf);
    }

    /// Number of idle buffers.
    pub fn idle(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .free
            .len()
    }

    /// Total capacity of the idle buffers.
    pub fn idle_bytes(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_buffers_without_reallocating() {
        let pool = BufPool::new(4, 1 << 20, 4 << 20);
        let b = pool.get(4096);
        assert_eq!(b.len(), 4096);
        let ptr = b.as_ptr();
        pool.put(b);
        assert_eq!(pool.idle(), 1);
        let b = pool.get(1000);
        assert_eq!(b.len(), 1000);
        assert_eq!(b.as_ptr(), ptr, "same allocation reused");
        pool.put(b);
        // Growing back within capacity keeps the allocation.
        let b = pool.get(4096);
        assert_eq!(b.len(), 4096);
        assert_eq!(b.as_ptr(), ptr);
    }

    #[test]
    fn best_fit_is_chosen() {
        let pool = BufPool::new(4, 1 << 20, 4 << 20);
        pool.put(vec![0; 65536]);
        pool.put(vec![0; 4096]);
        let b = pool.get(100);
        assert!(b.capacity() < 65536);
        assert_eq!(pool.idle(), 1);
    }

    #[test]
    fn bounded_in_count_size_and_total() {
        let pool = BufPool::new(2, 1024, 1536);
        pool.put(vec![0; 2048]); // too big
        assert_eq!(pool.idle(), 0);
        pool.put(vec![0; 1024]);
        pool.put(vec![0; 1024]); // would exceed the total
        assert_eq!(pool.idle(), 1);
        pool.put(vec![0; 512]);
        pool.put(vec![0; 8]); // count limit
        assert_eq!(pool.idle(), 2);
        assert!(pool.idle_bytes() <= 1536);
    }

    #[test]
    fn too_small_buffers_are_not_used() {
        let pool = BufPool::new(2, 1 << 20, 4 << 20);
        pool.put(vec![0; 16]);
        let b = pool.get(4096);
        assert_eq!(b.len(), 4096);
        assert_eq!(pool.idle(), 1);
    }
}
