//! Locks over the O_DIRECT alignment spans of one file or block device.
//!
//! O_DIRECT moves whole aligned spans, so a write smaller than a span is a
//! read-modify-write: read the span, patch the request in, write the span
//! back. Two such writes to different parts of one span (ext4 with 1 KiB
//! blocks writes neighbouring blocks at once) must not interleave, or the
//! second write-back puts back what the first one changed: an acknowledged
//! write lost. Nor may a plain write land between a read-modify-write's read
//! and its write-back. So a read-modify-write holds its spans exclusively,
//! and every other write of the device (data, zeroes, discard) holds its
//! spans shared: writes that need no read-modify-write never wait for each
//! other.
//!
//! Spans map onto [`STRIPES`] locks (span index modulo the count), taken in
//! ascending order, so two writers never wait for each other in a cycle.
//! One set of locks per device *identity*: every handle of the same file in
//! this process shares them (a restarted session opens the source again
//! beside the handle the volume was served with).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

/// The locks of every device open with O_DIRECT in this process.
type Registry = HashMap<(u64, u64), Weak<SpanLocks>>;

/// Locks per device; a write of this many spans or more takes them all.
const STRIPES: usize = 64;

pub(super) struct SpanLocks {
    span: u64,
    stripes: [RwLock<()>; STRIPES],
}

impl std::fmt::Debug for SpanLocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpanLocks")
            .field("span", &self.span)
            .finish()
    }
}

/// The locks a write holds until it is done (dropped: released).
pub(super) struct SpanGuard<'a> {
    _shared: Vec<RwLockReadGuard<'a, ()>>,
    _exclusive: Vec<RwLockWriteGuard<'a, ()>>,
}

impl SpanLocks {
    /// The locks of the device `identity` (see `BackingDevice::same_device`)
    /// with spans of `span` bytes, shared with its other handles.
    pub(super) fn of(identity: (u64, u64), span: u64) -> Arc<SpanLocks> {
        static DEVICES: Mutex<Option<Registry>> = Mutex::new(None);
        // The map holds no invariant a panic could break: a poisoned one
        // is as good.
        let mut devices = DEVICES.lock().unwrap_or_else(|p| p.into_inner());
        let map = devices.get_or_insert_with(HashMap::new);
        map.retain(|_, w| w.strong_count() > 0);
        if let Some(l) = map.get(&identity).and_then(Weak::upgrade)
            && l.span == span
        {
            return l;
        }
        let l = Arc::new(SpanLocks {
            span,
            stripes: std::array::from_fn(|_| RwLock::new(())),
        });
        map.insert(identity, Arc::downgrade(&l));
        l
    }

    /// Which stripes the bytes `[offset, offset + length)` touch, as a mask.
    fn stripes_of(&self, offset: u64, length: u64) -> u64 {
        if length == 0 {
            return 0;
        }
        let first = offset / self.span;
        let last = (offset + length - 1) / self.span;
        if last - first + 1 >= STRIPES as u64 {
            return u64::MAX;
        }
        (first..=last).fold(0u64, |m, s| m | 1 << (s % STRIPES as u64))
    }

    fn each(mask: u64) -> impl Iterator<Item = usize> {
        (0..STRIPES).filter(move |i| mask & (1 << i) != 0)
    }

    /// For a write that needs no read-modify-write.
    pub(super) fn shared(&self, offset: u64, length: u64) -> SpanGuard<'_> {
        let mask = self.stripes_of(offset, length);
        SpanGuard {
            _shared: Self::each(mask)
                // The locks guard no data: a poisoned one is as good.
                .map(|i| self.stripes[i].read().unwrap_or_else(|p| p.into_inner()))
                .collect(),
            _exclusive: Vec::new(),
        }
    }

    /// For a read-modify-write of the spans around the bytes.
    pub(super) fn exclusive(&self, offset: u64, length: u64) -> SpanGuard<'_> {
        let mask = self.stripes_of(offset, length);
        SpanGuard {
            _shared: Vec::new(),
            _exclusive: Self::each(mask)
                .map(|i| self.stripes[i].write().unwrap_or_else(|p| p.into_inner()))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripes_wrap_and_saturate() {
        let l = SpanLocks::of((u64::MAX, 1), 4096);
        assert_eq!(l.stripes_of(0, 0), 0);
        assert_eq!(l.stripes_of(0, 1), 1);
        assert_eq!(l.stripes_of(4095, 2), 0b11, "two spans");
        assert_eq!(l.stripes_of(64 * 4096, 1024), 1, "span 64 is stripe 0");
        assert_eq!(l.stripes_of(63 * 4096, 4097), 1 | 1 << 63, "wraps");
        assert_eq!(l.stripes_of(0, 64 * 4096), u64::MAX);
        assert_eq!(l.stripes_of(100, 1 << 30), u64::MAX);
    }

    #[test]
    fn handles_of_one_device_share_their_locks() {
        let a = SpanLocks::of((u64::MAX, 2), 4096);
        let b = SpanLocks::of((u64::MAX, 2), 4096);
        assert!(Arc::ptr_eq(&a, &b));
        let c = SpanLocks::of((u64::MAX, 3), 4096);
        assert!(!Arc::ptr_eq(&a, &c));
    }

    #[test]
    fn an_exclusive_span_waits_for_shared_holders() {
        let l = SpanLocks::of((u64::MAX, 4), 4096);
        let held = l.shared(0, 1 << 20);
        let l2 = l.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let _g = l2.exclusive(8192 + 512, 1024);
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(200))
                .is_err(),
            "the read-modify-write waited"
        );
        drop(held);
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("it went on once the write was done");
        t.join().unwrap();
    }
}
