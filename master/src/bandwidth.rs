//! Fair bandwidth sharing between the sessions one master drives: a total
//! copy bandwidth is divided max-min fairly (water-filling). A session that
//! asks for less than an equal share keeps its own limit; the rest is split
//! evenly among the others, so no session starves and none gets more than
//! it asked for.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Max-min fair shares of `total` bytes/s among sessions whose own limits
/// are `caps` (0 = unlimited). `total` 0 means no shared limit: every
/// session keeps its own cap.
pub fn fair_shares(total: u64, caps: &[u64]) -> Vec<u64> {
    if total == 0 || caps.is_empty() {
        return caps.to_vec();
    }
    let mut shares = vec![0u64; caps.len()];
    let mut open: Vec<usize> = (0..caps.len()).collect();
    let mut left = total;
    // Each round fixes the sessions whose caps are below the equal share.
    loop {
        if open.is_empty() {
            return shares;
        }
        let equal = left / open.len() as u64;
        let (capped, rest): (Vec<usize>, Vec<usize>) = open
            .iter()
            .partition(|&&i| caps[i] != 0 && caps[i] <= equal);
        if capped.is_empty() {
            let mut extra = left - equal * open.len() as u64;
            for i in rest {
                shares[i] = equal + u64::from(extra > 0);
                extra = extra.saturating_sub(1);
            }
            return shares;
        }
        for i in capped {
            shares[i] = caps[i];
            left -= caps[i];
        }
        open = rest;
    }
}

/// The sessions of one master sharing `total` bytes/s.
#[derive(Debug, Default)]
pub struct BandwidthPool {
    total: u64,
    caps: Mutex<BTreeMap<String, u64>>,
}

impl BandwidthPool {
    pub fn new(total: u64) -> Self {
        Self {
            total,
            caps: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u64>> {
        // Plain data: a panic elsewhere cannot leave it inconsistent.
        self.caps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers (or updates) `key`'s own limit and returns its share now.
    pub fn share(&self, key: &str, cap: u64) -> u64 {
        let mut caps = self.lock();
        caps.insert(key.to_string(), cap);
        let keys: Vec<&String> = caps.keys().collect();
        let values: Vec<u64> = caps.values().copied().collect();
        let shares = fair_shares(self.total, &values);
        keys.iter()
            .position(|k| k.as_str() == key)
            .map(|i| shares[i])
            .unwrap_or(cap)
    }

    /// `key` no longer copies; the others get its part.
    pub fn leave(&self, key: &str) {
        self.lock().remove(key);
    }

    /// Sessions sharing the pool now.
    pub fn sessions(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn examples() {
        assert_eq!(fair_shares(300, &[0, 0, 0]), vec![100, 100, 100]);
        assert_eq!(fair_shares(300, &[50, 0, 0]), vec![50, 125, 125]);
        assert_eq!(fair_shares(300, &[50, 400, 0]), vec![50, 125, 125]);
        assert_eq!(fair_shares(300, &[50, 60, 70]), vec![50, 60, 70]);
        assert_eq!(fair_shares(0, &[50, 0]), vec![50, 0]);
        assert_eq!(fair_shares(10, &[0, 0, 0]), vec![4, 3, 3]);
    }

    #[test]
    fn pool_rebalances_when_sessions_come_and_go() {
        let p = BandwidthPool::new(400);
        assert_eq!(p.share("a", 0), 400);
        assert_eq!(p.share("b", 0), 200);
        assert_eq!(p.share("a", 0), 200);
        assert_eq!(p.share("c", 100), 100);
        assert_eq!(p.share("a", 0), 150);
        p.leave("b");
        assert_eq!(p.share("a", 0), 300);
        assert_eq!(p.sessions(), 2);
    }

    proptest! {
        #[test]
        fn shares_are_max_min_fair(total in 1u64..1_000_000, caps in proptest::collection::vec(prop_oneof![Just(0u64), 1u64..500_000], 1..10)) {
            let s = fair_shares(total, &caps);
            // Never more than asked, never more than the total.
            for (share, cap) in s.iter().zip(&caps) {
                prop_assert!(*cap == 0 || share <= cap);
            }
            let sum: u64 = s.iter().sum();
            prop_assert!(sum <= total);
            // Work-conserving: the total is used unless every session is capped below it.
            let all_capped = caps.iter().all(|&c| c != 0);
            let cap_sum: u64 = caps.iter().sum();
            if !(all_capped && cap_sum < total) {
                prop_assert_eq!(sum, total);
            }
            // Max-min: a session below its cap gets at least as much as any other, minus rounding.
            let max = *s.iter().max().unwrap();
            for (share, cap) in s.iter().zip(&caps) {
                if *cap == 0 || share < cap {
                    prop_assert!(share + 1 >= max, "{share} < {max} though not capped");
                }
            }
        }
    }
}
