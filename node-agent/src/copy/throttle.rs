//! Bandwidth limit for the copier, changeable while a pass runs (a GCRA
//! token bucket: each acquire pushes a virtual clock forward by n / rate).
//! Written here rather than with `leaky-bucket` because that crate's rate is
//! fixed at construction and `bandwidthLimit` must change live.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// How far ahead of the rate a burst may run.
const BURST: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub struct Throttle {
    /// Bytes per second; 0 means unlimited.
    rate: AtomicU64,
    next: Mutex<Option<Instant>>,
}

impl Throttle {
    pub fn new(bytes_per_sec: u64) -> Self {
        Self {
            rate: AtomicU64::new(bytes_per_sec),
            next: Mutex::new(None),
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Takes effect for the next acquire.
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// Waits until `bytes` may be sent.
    pub async fn acquire(&self, bytes: u64) {
        let rate = self.rate();
        if rate == 0 {
            return;
        }
        let mut next = self.next.lock().await;
        let now = Instant::now();
        let start = match *next {
            Some(t) if t + BURST > now => t,
            _ => now.checked_sub(BURST).unwrap_or(now),
        };
        let due = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
        *next = Some(due);
        drop(next);
        if due > now {
            tokio::time::sleep_until(due).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn limits_and_changes_live() {
        let t = Throttle::new(1 << 20); // 1 MiB/s
        let start = Instant::now();
        for _ in 0..20 {
            t.acquire(256 << 10).await; // 5 MiB in all
        }
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(4800) && took <= Duration::from_millis(5100),
            "{took:?}"
        );
        t.set_rate(10 << 20);
        let start = Instant::now();
        for _ in 0..20 {
            t.acquire(256 << 10).await;
        }
        let took = start.elapsed();
        assert!(took <= Duration::from_millis(600), "{took:?}");
        t.set_rate(0);
        let start = Instant::now();
        t.acquire(1 << 40).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
