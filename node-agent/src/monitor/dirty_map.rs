//! The dirty map: one bit per grain (64 KiB by default) of the volume, set
//! when the grain may differ between source and target.
//!
//! A session starts with every bit set (nothing is copied yet), so the Copy
//! phase is simply the first pass over a full map and Refresh the passes
//! after it. Bits are atomics, so workload writes, the copier and status
//! readers never take a lock.
//!
//! Crash safety. With a state file the words live in a `MAP_SHARED` mapping:
//! a bit set in memory is in the page cache at once and survives a SIGKILL of
//! the agent. The header records the host's boot id; after a host reboot the
//! page cache may have been lost, so the map is not trusted and every bit is
//! set again (full recopy, never a stale target). The header also holds one
//! slot per in-flight copy; a copy records its range there before it clears
//! the bits, so a crash mid-copy re-marks that range on recovery.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use super::mapping::Words;
use crate::error::{AgentError, Result};

/// How many copies may be in flight at once (one recovery slot each).
pub const COPY_SLOTS: usize = 64;
const HEADER_WORDS: usize = 512;
const MAGIC: u64 = u64::from_le_bytes(*b"VOLMIGDM");
const VERSION: u64 = 1;
const H_MAGIC: usize = 0;
const H_VERSION: usize = 1;
const H_SIZE: usize = 2;
const H_GRAIN: usize = 3;
const H_BOOT_LO: usize = 4;
const H_BOOT_HI: usize = 5;
const H_SLOTS: usize = 8;

/// Where the map's contents came from when it was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapOrigin {
    /// A new session: every grain is dirty.
    Fresh,
    /// A checkpoint of this session was loaded.
    Resumed { recovered_slots: usize },
    /// A checkpoint existed but could not be trusted; every grain is dirty.
    Reset { reason: String },
}

/// A grain-aligned run of dirty bytes (clipped to the volume size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyRun {
    pub offset: u64,
    pub length: u64,
}

pub struct DirtyMap {
    size: u64,
    grain_shift: u32,
    grains: u64,
    /// Header words (file-backed maps only) followed by the bitmap.
    words: Words,
    header: usize,
    dirty: AtomicU64,
}

impl std::fmt::Debug for DirtyMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyMap")
            .field("size", &self.size)
            .field("grain", &self.grain())
            .field("dirty_grains", &self.dirty_grains())
            .finish()
    }
}

fn validate(size: u64, grain: u64) -> Result<u32> {
    if !grain.is_power_of_two() || grain < 512 {
        return Err(AgentError::Invalid(format!(
            "dirty-map granularity {grain} must be a power of two of at least 512 bytes"
        )));
    }
    if size == 0 {
        return Err(AgentError::Invalid("volume size is zero".into()));
    }
    Ok(grain.trailing_zeros())
}

impl DirtyMap {
    /// A map in heap memory (no checkpoint), every grain dirty.
    pub fn in_memory(size: u64, grain: u64) -> Result<Self> {
        let shift = validate(size, grain)?;
        let grains = size.div_ceil(grain);
        let map = DirtyMap {
            size,
            grain_shift: shift,
            grains,
            words: Words::heap(grains.div_ceil(64) as usize),
            header: 0,
            dirty: AtomicU64::new(0),
        };
        map.mark_all();
        Ok(map)
    }

    /// Opens (or creates) the checkpoint file at `path`. With `resume` an
    /// existing, valid checkpoint of the same volume is loaded; otherwise
    /// every grain starts dirty.
    pub fn open_file(
        path: &Path,
        size: u64,
        grain: u64,
        resume: bool,
    ) -> Result<(Self, MapOrigin)> {
        let shift = validate(size, grain)?;
        let grains = size.div_ceil(grain);
        let total_words = HEADER_WORDS + grains.div_ceil(64) as usize;
        let state_err = |source| AgentError::State {
            path: path.to_path_buf(),
            source,
        };
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(state_err)?;
        let old_len = file.metadata().map_err(state_err)?.len();
        file.set_len((total_words * 8) as u64).map_err(state_err)?;
        let words = Words::map(file, total_words).map_err(state_err)?;
        let map = DirtyMap {
            size,
            grain_shift: shift,
            grains,
            words,
            header: HEADER_WORDS,
            dirty: AtomicU64::new(0),
        };
        let boot = boot_id();
        let origin = if !resume || !existed {
            MapOrigin::Fresh
        } else {
            match map.check_header(old_len, total_words, boot) {
                Ok(()) => {
                    let recovered = map.recover_slots();
                    map.recount();
                    MapOrigin::Resumed {
                        recovered_slots: recovered,
                    }
                }
                Err(reason) => MapOrigin::Reset { reason },
            }
        };
        if !matches!(origin, MapOrigin::Resumed { .. }) {
            map.write_header(boot);
            map.mark_all();
            // bits left from an old checkpoint were already set: count them
            map.recount();
        }
        Ok((map, origin))
    }

    fn h(&self, i: usize) -> &AtomicU64 {
        &self.words.as_slice()[i]
    }

    fn check_header(
        &self,
        old_len: u64,
        total_words: usize,
        boot: (u64, u64),
    ) -> Result<(), String> {
        if old_len != (total_words * 8) as u64 {
            return Err(format!(
                "checkpoint has {old_len} bytes, expected {}",
                total_words * 8
            ));
        }
        let ld = |i| self.h(i).load(Ordering::Acquire);
        if ld(H_MAGIC) != MAGIC || ld(H_VERSION) != VERSION {
            return Err("checkpoint header is not a volmig dirty map".into());
        }
        if ld(H_SIZE) != self.size || ld(H_GRAIN) != self.grain() {
            return Err("checkpoint was made for another volume size or granularity".into());
        }
        if (ld(H_BOOT_LO), ld(H_BOOT_HI)) != boot {
            return Err("the host rebooted since the checkpoint (page cache may be lost)".into());
        }
        Ok(())
    }

    fn write_header(&self, boot: (u64, u64)) {
        for i in H_SLOTS..H_SLOTS + 2 * COPY_SLOTS {
            self.h(i).store(0, Ordering::Relaxed);
        }
        self.h(H_SIZE).store(self.size, Ordering::Relaxed);
        self.h(H_GRAIN).store(self.grain(), Ordering::Relaxed);
        self.h(H_BOOT_LO).store(boot.0, Ordering::Relaxed);
        self.h(H_BOOT_HI).store(boot.1, Ordering::Relaxed);
        self.h(H_VERSION).store(VERSION, Ordering::Relaxed);
        self.h(H_MAGIC).store(MAGIC, Ordering::Release);
    }

    fn recover_slots(&self) -> usize {
        let mut n = 0;
        for i in 0..COPY_SLOTS {
            let (off, len) = self.slot(i);
            if len > 0 {
                self.mark(off.min(self.size), len.min(self.size.saturating_sub(off)));
                self.clear_slot(i);
                n += 1;
            }
        }
        n
    }

    fn bits(&self) -> &[AtomicU64] {
        &self.words.as_slice()[self.header..]
    }

    fn recount(&self) {
        let n: u64 = self
            .bits()
            .iter()
            .map(|w| w.load(Ordering::Acquire).count_ones() as u64)
            .sum();
        self.dirty.store(n, Ordering::Release);
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn grain(&self) -> u64 {
        1 << self.grain_shift
    }

    pub fn grains(&self) -> u64 {
        self.grains
    }

    pub fn dirty_grains(&self) -> u64 {
        self.dirty.load(Ordering::Acquire)
    }

    /// Bytes the dirty grains cover (the last grain counted whole).
    pub fn dirty_bytes(&self) -> u64 {
        (self.dirty_grains() << self.grain_shift).min(self.size)
    }

    pub fn is_empty(&self) -> bool {
        self.dirty_grains() == 0
    }

    /// Grain index range `[first, last]` touched by a byte range.
    fn grain_range(&self, offset: u64, length: u64) -> Option<(u64, u64)> {
        if length == 0 || offset >= self.size {
            return None;
        }
        let end = offset.saturating_add(length).min(self.size);
        Some((offset >> self.grain_shift, (end - 1) >> self.grain_shift))
    }

    /// Calls `f(word_index, mask)` for each bitmap word the grains touch.
    fn for_words(first: u64, last: u64, mut f: impl FnMut(usize, u64)) {
        let mut g = first;
        while g <= last {
            let w = g / 64;
            let lo = g % 64;
            let hi = if last / 64 == w { last % 64 } else { 63 };
            let mask = if hi - lo == 63 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo + 1)) - 1) << lo
            };
            f(w as usize, mask);
            g = w * 64 + hi + 1;
        }
    }

    /// Sets the bits of `mask` in word `w`, counting the grains that
    /// became dirty.
    fn set_bits(&self, w: usize, mask: u64) {
        let old = self.bits()[w].fetch_or(mask, Ordering::SeqCst);
        let new = (!old & mask).count_ones() as u64;
        if new > 0 {
            self.dirty.fetch_add(new, Ordering::AcqRel);
        }
    }

    /// Clears the bits of `mask` in word `w`; returns those that were set
    /// (and no longer counted).
    fn clear_bits(&self, w: usize, mask: u64) -> u64 {
        let was = self.bits()[w].fetch_and(!mask, Ordering::SeqCst) & mask;
        if was != 0 {
            self.dirty
                .fetch_sub(was.count_ones() as u64, Ordering::AcqRel);
        }
        was
    }

    /// Marks every grain the byte range touches.
    pub fn mark(&self, offset: u64, length: u64) {
        let Some((first, last)) = self.grain_range(offset, length) else {
            return;
        };
        Self::for_words(first, last, |w, mask| self.set_bits(w, mask));
    }

    /// Clears every grain the byte range touches; returns how many were set.
    pub fn clear(&self, offset: u64, length: u64) -> u64 {
        let Some((first, last)) = self.grain_range(offset, length) else {
            return 0;
        };
        let mut cleared = 0;
        Self::for_words(first, last, |w, mask| {
            cleared += self.clear_bits(w, mask).count_ones() as u64;
        });
        cleared
    }

    /// True when no grain the range touches is dirty.
    pub fn is_clean(&self, offset: u64, length: u64) -> bool {
        let Some((first, last)) = self.grain_range(offset, length) else {
            return true;
        };
        let bits = self.bits();
        let mut clean = true;
        Self::for_words(first, last, |w, mask| {
            clean &= bits[w].load(Ordering::SeqCst) & mask == 0;
        });
        clean
    }

    /// Bytes the dirty grains in `[offset, offset + length)` cover (grains
    /// the range touches counted whole). A read of racing bits: a count for
    /// decisions, not a promise.
    pub fn dirty_bytes_in(&self, offset: u64, length: u64) -> u64 {
        let Some((first, last)) = self.grain_range(offset, length) else {
            return 0;
        };
        let bits = self.bits();
        let mut n = 0u64;
        Self::for_words(first, last, |w, mask| {
            n += (bits[w].load(Ordering::Relaxed) & mask).count_ones() as u64;
        });
        (n << self.grain_shift).min(self.size)
    }

    /// Moves every dirty grain into `pending` (a bitmap of the same
    /// shape, OR-ed in) and clears it here, one word at a time with an
    /// atomic swap: a write's second mark after the swap dirties its grain
    /// here again, so nothing written after the hand-over is lost. Returns
    /// the grains moved.
    pub fn take_into(&self, pending: &mut [u64]) -> u64 {
        let bits = self.bits();
        let mut moved = 0u64;
        for (w, p) in pending.iter_mut().enumerate().take(bits.len()) {
            if bits[w].load(Ordering::Relaxed) == 0 {
                continue;
            }
            let taken = self.clear_bits(w, u64::MAX);
            *p |= taken;
            moved += taken.count_ones() as u64;
        }
        moved
    }

    /// Marks the grains of `words` (bitmap words from `first_word` on, as
    /// `take_into` hands them over); bits past the last grain are ignored.
    pub fn merge_words(&self, first_word: u64, words: &[u64]) {
        for (i, &word) in words.iter().enumerate() {
            let first = first_word.saturating_add(i as u64).saturating_mul(64);
            if first >= self.grains || word == 0 {
                continue;
            }
            let last = (first + 63).min(self.grains - 1);
            Self::for_words(first, last, |w, valid| self.set_bits(w, word & valid));
        }
    }

    /// Bitmap words a map of this shape has.
    pub fn word_count(&self) -> usize {
        self.bits().len()
    }

    /// Marks the whole volume dirty.
    pub fn mark_all(&self) {
        self.mark(0, self.size);
    }

    /// The first dirty run at or after byte `from`, at most `max_len` bytes
    /// long (rounded up to one grain), grain aligned and clipped to the size.
    pub fn next_run(&self, from: u64, max_len: u64) -> Option<DirtyRun> {
        if from >= self.size {
            return None;
        }
        let bits = self.bits();
        let mut g = from >> self.grain_shift;
        // find first set bit >= g
        let start = loop {
            if g >= self.grains {
                return None;
            }
            let w = (g / 64) as usize;
            let word = bits[w].load(Ordering::SeqCst) & (u64::MAX << (g % 64));
            if word != 0 {
                let s = (w as u64) * 64 + word.trailing_zeros() as u64;
                if s >= self.grains {
                    return None;
                }
                break s;
            }
            g = (w as u64 + 1) * 64;
        };
        let max_grains = (max_len >> self.grain_shift).max(1);
        let mut end = start + 1;
        while end < self.grains && end - start < max_grains {
            let w = (end / 64) as usize;
            if bits[w].load(Ordering::SeqCst) & (1u64 << (end % 64)) == 0 {
                break;
            }
            end += 1;
        }
        let offset = start << self.grain_shift;
        let stop = (end << self.grain_shift).min(self.size);
        Some(DirtyRun {
            offset,
            length: stop - offset,
        })
    }

    /// Records an in-flight copy of a range in recovery slot `i`.
    pub fn set_slot(&self, i: usize, offset: u64, length: u64) {
        if self.header == 0 || i >= COPY_SLOTS {
            return;
        }
        self.h(H_SLOTS + 2 * i).store(offset, Ordering::SeqCst);
        self.h(H_SLOTS + 2 * i + 1).store(length, Ordering::SeqCst);
    }

    pub fn clear_slot(&self, i: usize) {
        if self.header == 0 || i >= COPY_SLOTS {
            return;
        }
        self.h(H_SLOTS + 2 * i + 1).store(0, Ordering::SeqCst);
    }

    fn slot(&self, i: usize) -> (u64, u64) {
        (
            self.h(H_SLOTS + 2 * i).load(Ordering::SeqCst),
            self.h(H_SLOTS + 2 * i + 1).load(Ordering::SeqCst),
        )
    }

    /// Writes the mapping back to disk (host-crash durability).
    pub fn sync(&self) -> std::io::Result<()> {
        self.words.sync()
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`) as two words.
fn boot_id() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let hex: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    let v = u128::from_str_radix(&hex, 16).unwrap_or(0);
    (v as u64, (v >> 64) as u64)
}

#[cfg(test)]
mod tests {

    #[test]
    fn take_into_and_merge_words_move_grains_between_maps() {
        let size = 100 * 4096 + 1; // 101 grains: the last word is partial
        let a = DirtyMap::in_memory(size, 4096).unwrap();
        a.clear(0, size);
        let b = DirtyMap::in_memory(size, 4096).unwrap();
        b.clear(0, size);
        a.mark(0, 1);
        a.mark(70 * 4096, 4096);
        a.mark(size - 1, 1);
        let mut pending = vec![0u64; a.word_count()];
        assert_eq!(a.take_into(&mut pending), 3);
        assert!(a.is_empty(), "taken grains leave the map");
        // A write after the hand-over dirties its grain here again.
        a.mark(70 * 4096, 1);
        assert_eq!(a.take_into(&mut pending), 1);
        assert_eq!(pending.iter().map(|w| w.count_ones()).sum::<u32>(), 3);
        // Bits past the end are ignored on merge.
        let mut words = pending.clone();
        words[1] |= 1 << 63;
        b.merge_words(0, &words);
        assert_eq!(b.dirty_grains(), 3);
        assert!(!b.is_clean(70 * 4096, 1) && !b.is_clean(0, 1) && !b.is_clean(size - 1, 1));
        b.merge_words(0, &words);
        assert_eq!(b.dirty_grains(), 3, "merging twice changes nothing");
        b.merge_words(1000, &[u64::MAX]);
        assert_eq!(b.dirty_grains(), 3, "words past the map are ignored");
    }

    #[test]
    fn dirty_bytes_in_counts_the_grains_a_range_touches() {
        let m = DirtyMap::in_memory(1 << 20, 4096).unwrap();
        m.clear(0, 1 << 20);
        m.mark(0, 4096);
        m.mark(100 * 4096, 3 * 4096);
        m.mark((1 << 20) - 1, 1);
        assert_eq!(m.dirty_bytes_in(0, 1 << 20), 5 * 4096);
        assert_eq!(m.dirty_bytes_in(0, 100 * 4096), 4096);
        assert_eq!(
            m.dirty_bytes_in(4096, 100 * 4096),
            4096,
            "grain 100 touched by the last byte"
        );
        assert_eq!(m.dirty_bytes_in(101 * 4096, 1), 4096);
        assert_eq!(m.dirty_bytes_in(1 << 20, 4096), 0, "past the end");
        assert_eq!(m.dirty_bytes_in(0, 0), 0);
    }

    use super::*;
    use proptest::prelude::*;

    #[test]
    fn starts_full_and_drains_by_runs() {
        let m = DirtyMap::in_memory(1_000_000, 65536).unwrap();
        assert_eq!(m.grains(), 16);
        assert_eq!(m.dirty_grains(), 16);
        assert_eq!(m.dirty_bytes(), 1_000_000);
        let r = m.next_run(0, 4 * 65536).unwrap();
        assert_eq!(
            r,
            DirtyRun {
                offset: 0,
                length: 4 * 65536
            }
        );
        assert_eq!(m.clear(r.offset, r.length), 4);
        let last = m.next_run(15 * 65536, 1 << 30).unwrap();
        assert_eq!(
            last.offset + last.length,
            1_000_000,
            "last run clipped to size"
        );
        m.clear(0, 1_000_000);
        assert!(m.is_empty());
        assert_eq!(m.next_run(0, 1 << 20), None);
    }

    #[test]
    fn mark_partial_grains_and_word_boundaries() {
        let m = DirtyMap::in_memory(200 * 4096, 4096).unwrap();
        m.clear(0, m.size());
        m.mark(63 * 4096 + 100, 4096); // grains 63 and 64: across a word
        assert_eq!(m.dirty_grains(), 2);
        assert!(!m.is_clean(64 * 4096, 1));
        assert!(m.is_clean(65 * 4096, 4096 * 10));
        assert_eq!(
            m.next_run(0, 1 << 20),
            Some(DirtyRun {
                offset: 63 * 4096,
                length: 2 * 4096
            })
        );
        m.mark(63 * 4096, 1); // already set: count unchanged
        assert_eq!(m.dirty_grains(), 2);
        m.mark(m.size() + 10, 100); // beyond the end: ignored
        assert_eq!(m.dirty_grains(), 2);
    }

    #[test]
    fn rejects_bad_granularity() {
        assert!(DirtyMap::in_memory(1 << 20, 3000).is_err());
        assert!(DirtyMap::in_memory(0, 4096).is_err());
    }

    #[test]
    fn checkpoint_file_survives_reopen_and_recovers_slots() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.dirty");
        {
            let (m, origin) = DirtyMap::open_file(&p, 1 << 20, 65536, true).unwrap();
            assert_eq!(origin, MapOrigin::Fresh);
            assert_eq!(m.dirty_grains(), 16);
            m.clear(0, 1 << 20);
            m.mark(3 * 65536, 1);
            m.set_slot(5, 8 * 65536, 2 * 65536); // a copy "in flight" at crash
            // dropped without any explicit save: the mapping is the checkpoint
        }
        let (m, origin) = DirtyMap::open_file(&p, 1 << 20, 65536, true).unwrap();
        assert_eq!(origin, MapOrigin::Resumed { recovered_slots: 1 });
        assert_eq!(m.dirty_grains(), 3);
        assert!(
            !m.is_clean(8 * 65536, 1) && !m.is_clean(9 * 65536, 1) && !m.is_clean(3 * 65536, 1)
        );
        // a different geometry is not trusted
        drop(m);
        let (m, origin) = DirtyMap::open_file(&p, 2 << 20, 65536, true).unwrap();
        assert!(matches!(origin, MapOrigin::Reset { .. }), "{origin:?}");
        assert_eq!(m.dirty_grains(), 32);
        // resume=false always starts over
        let (_m, origin) = DirtyMap::open_file(&p, 2 << 20, 65536, false).unwrap();
        assert_eq!(origin, MapOrigin::Fresh);
    }

    proptest! {
        /// The map agrees with a model (a Vec<bool>) under any sequence of
        /// marks and clears, and next_run enumerates exactly the set grains.
        #[test]
        fn matches_model(ops in proptest::collection::vec((any::<bool>(), 0u64..300_000, 0u64..70_000), 0..60)) {
            let size = 260_000u64;
            let g = 4096u64;
            let m = DirtyMap::in_memory(size, g).unwrap();
            m.clear(0, size);
            let n = size.div_ceil(g) as usize;
            let mut model = vec![false; n];
            for (set, off, len) in ops {
                if len == 0 || off >= size { if set { m.mark(off, len) } else { m.clear(off, len); } continue; }
                let end = (off + len).min(size);
                for gi in (off / g)..=((end - 1) / g) { model[gi as usize] = set; }
                if set { m.mark(off, len); } else { m.clear(off, len); }
            }
            prop_assert_eq!(m.dirty_grains(), model.iter().filter(|b| **b).count() as u64);
            let mut seen = vec![false; n];
            let mut pos = 0;
            while let Some(r) = m.next_run(pos, 5 * g) {
                prop_assert!(r.length <= 5 * g && r.length > 0);
                for gi in (r.offset / g)..((r.offset + r.length).div_ceil(g)) { seen[gi as usize] = true; }
                pos = r.offset + r.length;
            }
            prop_assert_eq!(seen, model);
        }
    }
}
