//! One pass of the copier: hand out each dirty run once, copy up to
//! `in_flight` of them at once on the blocking pool, wait for all of them.
//! A pass never hands out the same range twice, and the next pass starts only
//! when this one is drained, so two copies of one grain never race (the
//! ordering argument is in `interposer`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::Throttle;
use crate::error::{AgentError, Result};
use crate::interposer::Link;
use crate::monitor::COPY_SLOTS;
use crate::volume::BackingDevice;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyConfig {
    /// Largest range one copy moves (multiple of the grain is best).
    pub chunk_size: u64,
    /// Copies in flight at once (at most `COPY_SLOTS`).
    pub in_flight: usize,
    /// Skip holes and all-zero chunks (write zeroes / punch instead).
    pub sparse: bool,
}

impl Default for CopyConfig {
    fn default() -> Self {
        Self {
            chunk_size: 1 << 20,
            in_flight: 8,
            sparse: true,
        }
    }
}

/// Cumulative counters (all passes of a session).
#[derive(Debug, Default)]
pub struct CopyStats {
    /// Bytes read from the source and written as data.
    pub bytes_data: AtomicU64,
    /// Bytes handled as holes or zeroes (not copied as data).
    pub bytes_sparse: AtomicU64,
    pub runs: AtomicU64,
}

impl CopyStats {
    pub fn bytes_total(&self) -> u64 {
        self.bytes_data.load(Ordering::Relaxed) + self.bytes_sparse.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PassReport {
    /// Bytes this pass (or slice) handled (data + sparse).
    pub bytes: u64,
    pub data_bytes: u64,
    pub elapsed: Duration,
    /// True when the pass stopped early because of `stop`.
    pub stopped: bool,
    /// Where the next slice of this pass starts; `None` when the pass
    /// reached the end of the volume.
    pub next: Option<u64>,
}

impl PassReport {
    pub fn rate(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 { self.bytes as f64 / s } else { 0.0 }
    }
}

pub struct Copier {
    link: Arc<Link>,
    cfg: CopyConfig,
    pub throttle: Arc<Throttle>,
    pub stats: Arc<CopyStats>,
    /// The destination is known to read as zeroes wherever not yet copied
    /// (fresh sparse target, first pass only): holes need no write at all.
    dest_known_zero: AtomicBool,
    slots: Arc<Mutex<Vec<usize>>>,
}

impl Copier {
    pub fn new(link: Arc<Link>, cfg: CopyConfig, throttle: Arc<Throttle>) -> Result<Self> {
        if cfg.in_flight == 0 || cfg.in_flight > COPY_SLOTS {
            return Err(AgentError::Invalid(format!(
                "copy in-flight count {} must be between 1 and {COPY_SLOTS}",
                cfg.in_flight
            )));
        }
        if cfg.chunk_size < link.dirty.grain() || cfg.chunk_size > (64 << 20) {
            return Err(AgentError::Invalid(format!(
                "copy chunk size {} must be between the grain ({}) and 64 MiB",
                cfg.chunk_size,
                link.dirty.grain()
            )));
        }
        Ok(Self {
            link,
            cfg,
            throttle,
            stats: Arc::new(CopyStats::default()),
            dest_known_zero: AtomicBool::new(false),
            slots: Arc::new(Mutex::new((0..cfg.in_flight).collect())),
        })
    }

    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }

    pub fn set_dest_known_zero(&self, v: bool) {
        self.dest_known_zero.store(v, Ordering::Relaxed);
    }

    /// Copies every range that is dirty when the pass reaches it. Returns
    /// early (after draining in-flight copies) once `stop` is set.
    pub async fn run_pass(&self, stop: &AtomicBool) -> Result<PassReport> {
        self.run_slice(0, None, stop).await
    }

    /// Continues a pass from byte `from` until its end or `deadline`,
    /// whichever comes first; in-flight copies are always drained.
    pub async fn run_slice(
        &self,
        from: u64,
        deadline: Option<Instant>,
        stop: &AtomicBool,
    ) -> Result<PassReport> {
        let start = Instant::now();
        let mut set: JoinSet<Result<(u64, u64)>> = JoinSet::new();
        let mut pos = from;
        let mut bytes = 0u64;
        let mut next = None;
        let mut data_bytes = 0u64;
        let mut stopped = false;
        let mut first_err: Option<AgentError> = None;
        let mut absorb = |r: std::result::Result<Result<(u64, u64)>, tokio::task::JoinError>,
                          first_err: &mut Option<AgentError>| match r {
            Ok(Ok((b, d))) => {
                bytes += b;
                data_bytes += d;
            }
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(AgentError::Task(e.to_string()));
            }
        };
        while let Some(run) = self.link.dirty.next_run(pos, self.cfg.chunk_size) {
            if stop.load(Ordering::SeqCst) || first_err.is_some() {
                stopped = true;
                next = Some(run.offset);
                break;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                next = Some(run.offset);
                break;
            }
            pos = run.offset + run.length;
            self.throttle.acquire(run.length).await;
            while set.len() >= self.cfg.in_flight {
                if let Some(r) = set.join_next().await {
                    absorb(r, &mut first_err);
                }
            }
            let slot = self.take_slot();
            let link = self.link.clone();
            let stats = self.stats.clone();
            let slots = self.slots.clone();
            let sparse = self.cfg.sparse;
            let known_zero = self.dest_known_zero.load(Ordering::Relaxed);
            set.spawn_blocking(move || {
                let r = copy_run(
                    &link, slot, run.offset, run.length, sparse, known_zero, &stats,
                );
                slots.lock().unwrap_or_else(|p| p.into_inner()).push(slot);
                r
            });
        }
        while let Some(r) = set.join_next().await {
            absorb(r, &mut first_err);
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        Ok(PassReport {
            bytes,
            data_bytes,
            elapsed: start.elapsed(),
            stopped,
            next,
        })
    }

    fn take_slot(&self) -> usize {
        // The pass keeps at most `in_flight` copies and each returns its slot
        // before its task ends, so a free slot always exists here.
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or(0)
    }
}

thread_local! {
    static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn is_zero(buf: &[u8]) -> bool {
    let (pre, mid, post) = {
        // SAFETY: u8 -> u128 reinterpretation is valid for any bit pattern;
        // align_to only yields the aligned middle part as u128s.
        unsafe { buf.align_to::<u128>() }
    };
    pre.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

/// Copies one dirty run in the link's copy direction. Returns (bytes
/// handled, bytes copied as data).
fn copy_run(
    link: &Link,
    slot: usize,
    offset: u64,
    length: u64,
    sparse: bool,
    dest_known_zero: bool,
    stats: &CopyStats,
) -> Result<(u64, u64)> {
    let dirty = &link.dirty;
    dirty.set_slot(slot, offset, length);
    let result = (|| {
        let _locked = link.locks.lock(offset, length);
        let (from, to) = link.direction();
        dirty.clear(offset, length);
        let mut data = 0u64;
        let segments = if sparse {
            from.segments(offset, length)?
        } else {
            vec![crate::volume::Segment {
                offset,
                length,
                hole: false,
            }]
        };
        for seg in segments {
            if seg.hole {
                zero_range(to, seg.offset, seg.length, dest_known_zero)?;
                continue;
            }
            data += copy_data(
                from,
                to,
                seg.offset,
                seg.length,
                sparse,
                dest_known_zero,
                dirty.grain(),
            )?;
        }
        Ok::<_, AgentError>(data)
    })();
    match result {
        Ok(data) => {
            dirty.clear_slot(slot);
            stats.bytes_data.fetch_add(data, Ordering::Relaxed);
            stats
                .bytes_sparse
                .fetch_add(length - data, Ordering::Relaxed);
            stats.runs.fetch_add(1, Ordering::Relaxed);
            Ok((length, data))
        }
        Err(e) => {
            // Not copied: make sure the next pass tries again.
            dirty.mark(offset, length);
            dirty.clear_slot(slot);
            Err(e)
        }
    }
}

fn zero_range(to: &BackingDevice, offset: u64, length: u64, known_zero: bool) -> Result<()> {
    if known_zero {
        Ok(())
    } else {
        to.write_zeroes_bulk(offset, length, true)
    }
}

/// Copies a data segment. With `sparse`, each grain-sized piece that reads
/// as zeroes is written as zeroes (punched) instead of data; consecutive
/// pieces of one kind go out as one request.
fn copy_data(
    from: &BackingDevice,
    to: &BackingDevice,
    offset: u64,
    length: u64,
    sparse: bool,
    known_zero: bool,
    grain: u64,
) -> Result<u64> {
    BUF.with(|cell| {
        let mut buf = cell.borrow_mut();
        let n = length as usize;
        if buf.len() < n {
            buf.resize(n, 0);
        }
        let buf = &mut buf[..n];
        from.read_at(buf, offset)?;
        if !sparse {
            to.write_bulk(buf, offset)?;
            return Ok(length);
        }
        let buf: &[u8] = buf;
        let mut data = 0u64;
        // Runs of grain-aligned pieces of one kind: (start, end, zero).
        let mut run: Option<(usize, usize, bool)> = None;
        let mut pos = 0usize;
        loop {
            let piece = if pos < n {
                let abs = offset + pos as u64;
                let next = ((abs / grain + 1) * grain - offset).min(length) as usize;
                Some((pos, next, is_zero(&buf[pos..next])))
            } else {
                None
            };
            match (run, piece) {
                (Some((s, _, z)), Some((_, e, pz))) if z == pz => run = Some((s, e, z)),
                (prev, next) => {
                    if let Some((s, e, zero)) = prev {
                        let off = offset + s as u64;
                        if zero {
                            zero_range(to, off, (e - s) as u64, known_zero)?;
                        } else {
                            to.write_bulk(&buf[s..e], off)?;
                            data += (e - s) as u64;
                        }
                    }
                    run = next;
                }
            }
            match piece {
                Some((_, e, _)) => pos = e,
                None => break,
            }
        }
        Ok(data)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interposer::WriteMode;
    use crate::monitor::DirtyMap;
    use crate::volume::OpenMode;
    use proptest::prelude::*;

    const G: u64 = 4096;
    const SIZE: u64 = 256 * G;

    fn files(dir: &tempfile::TempDir) -> (Arc<BackingDevice>, Arc<BackingDevice>) {
        let open = |n: &str| {
            let p = dir.path().join(n);
            std::fs::File::create(&p).unwrap().set_len(SIZE).unwrap();
            Arc::new(BackingDevice::open(&p, OpenMode::ReadWrite, false).unwrap())
        };
        (open("s"), open("t"))
    }

    fn copier(
        src: &Arc<BackingDevice>,
        tgt: &Arc<BackingDevice>,
        chunk: u64,
        in_flight: usize,
    ) -> Copier {
        let dirty = Arc::new(DirtyMap::in_memory(SIZE, G).unwrap());
        let link = Arc::new(Link::new(src.clone(), tgt.clone(), dirty, WriteMode::Track));
        Copier::new(
            link,
            CopyConfig {
                chunk_size: chunk,
                in_flight,
                sparse: true,
            },
            Arc::new(Throttle::new(0)),
        )
        .unwrap()
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// A pass copies exactly the dirty grains: the target matches the
        /// source there and is untouched (still its marker) elsewhere; the
        /// map ends empty; holes and zero chunks are not counted as data.
        #[test]
        fn pass_copies_exactly_the_dirty_ranges(
            dirty in proptest::collection::vec(any::<bool>(), 256),
            data in proptest::collection::vec(0u8..3, 256),
            chunk_grains in 1u64..9,
            in_flight in 1usize..6,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (src, tgt) = files(&dir);
            // source: per grain a hole (0), zero-filled data (1) or data (2)
            for (g, kind) in data.iter().enumerate() {
                match kind {
                    1 => src.write_at(&[0u8; G as usize], g as u64 * G).unwrap(),
                    2 => src.write_at(&[g as u8 | 1; G as usize], g as u64 * G).unwrap(),
                    _ => {}
                }
            }
            // target: a marker everywhere, so untouched grains are visible
            for g in 0..256u64 { tgt.write_at(&[0xEE; G as usize], g * G).unwrap(); }
            let c = copier(&src, &tgt, chunk_grains * G, in_flight);
            c.link().dirty.clear(0, SIZE);
            for (g, d) in dirty.iter().enumerate() { if *d { c.link().dirty.mark(g as u64 * G, 1); } }
            let report = rt().block_on(c.run_pass(&AtomicBool::new(false))).unwrap();
            prop_assert!(c.link().dirty.is_empty());
            let n_dirty = dirty.iter().filter(|d| **d).count() as u64;
            prop_assert_eq!(report.bytes, n_dirty * G);
            let n_data = dirty.iter().zip(&data).filter(|(d, k)| **d && **k == 2).count() as u64;
            prop_assert_eq!(report.data_bytes, n_data * G, "only non-zero data is copied as data");
            prop_assert!(c.stats.runs.load(Ordering::Relaxed) >= n_dirty.div_ceil(chunk_grains));
            let (mut a, mut b) = (vec![0u8; G as usize], vec![0u8; G as usize]);
            for g in 0..256u64 {
                src.read_at(&mut a, g * G).unwrap();
                tgt.read_at(&mut b, g * G).unwrap();
                if dirty[g as usize] { prop_assert_eq!(&a, &b, "grain {} copied", g); }
                else { prop_assert!(b.iter().all(|&x| x == 0xEE), "grain {} untouched", g); }
            }
        }
    }

    #[test]
    fn fresh_sparse_target_gets_no_writes_for_holes() {
        let dir = tempfile::tempdir().unwrap();
        let (src, tgt) = files(&dir);
        src.write_at(&[7u8; 3 * G as usize], 100 * G).unwrap();
        let c = copier(&src, &tgt, 16 * G, 4);
        c.set_dest_known_zero(true);
        let r = rt().block_on(c.run_pass(&AtomicBool::new(false))).unwrap();
        assert_eq!(r.bytes, SIZE);
        assert_eq!(r.data_bytes, 3 * G);
        let segs = tgt.segments(0, SIZE).unwrap();
        let allocated: u64 = segs.iter().filter(|s| !s.hole).map(|s| s.length).sum();
        assert!(
            allocated <= 16 * G,
            "target stays sparse: {allocated} bytes allocated"
        );
        let mut b = vec![0u8; 3 * G as usize];
        tgt.read_at(&mut b, 100 * G).unwrap();
        assert!(b.iter().all(|&x| x == 7));
    }

    #[test]
    fn stop_ends_a_pass_early_and_failed_copies_stay_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let (src, tgt) = files(&dir);
        let c = copier(&src, &tgt, G, 1);
        let r = rt().block_on(c.run_pass(&AtomicBool::new(true))).unwrap();
        assert!(r.stopped);
        assert_eq!(c.link().dirty.dirty_bytes(), SIZE, "nothing was cleared");
        // a target that cannot be written: the copy fails, the range stays dirty
        let ro = Arc::new(
            BackingDevice::open(&dir.path().join("t"), OpenMode::ReadOnly, false).unwrap(),
        );
        let c = copier(&src, &ro, 4 * G, 2);
        src.write_at(&[1u8; G as usize], 0).unwrap();
        let e = rt()
            .block_on(c.run_pass(&AtomicBool::new(false)))
            .unwrap_err();
        assert!(e.to_string().contains("write"), "{e}");
        assert!(
            !c.link().dirty.is_clean(0, G),
            "the failed range is dirty again"
        );
    }

    #[test]
    fn rejects_bad_config() {
        let dir = tempfile::tempdir().unwrap();
        let (src, tgt) = files(&dir);
        let dirty = Arc::new(DirtyMap::in_memory(SIZE, G).unwrap());
        let link = Arc::new(Link::new(src, tgt, dirty, WriteMode::Track));
        for cfg in [
            CopyConfig {
                in_flight: 0,
                ..CopyConfig::default()
            },
            CopyConfig {
                in_flight: COPY_SLOTS + 1,
                ..CopyConfig::default()
            },
            CopyConfig {
                chunk_size: 512,
                ..CopyConfig::default()
            },
        ] {
            assert!(Copier::new(link.clone(), cfg, Arc::new(Throttle::new(0))).is_err());
        }
    }
}
