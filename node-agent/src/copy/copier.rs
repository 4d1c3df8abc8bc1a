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
    /// Bytes this pass handled (data + sparse).
    pub bytes: u64,
    pub data_bytes: u64,
    pub elapsed: Duration,
    /// True when the pass stopped early because of `stop`.
    pub stopped: bool,
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
        let start = Instant::now();
        let mut set: JoinSet<Result<(u64, u64)>> = JoinSet::new();
        let mut pos = 0u64;
        let mut bytes = 0u64;
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
            data += copy_data(from, to, seg.offset, seg.length, sparse, dest_known_zero)?;
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
        to.write_zeroes(offset, length, true)
    }
}

fn copy_data(
    from: &BackingDevice,
    to: &BackingDevice,
    offset: u64,
    length: u64,
    sparse: bool,
    known_zero: bool,
) -> Result<u64> {
    BUF.with(|cell| {
        let mut buf = cell.borrow_mut();
        let n = length as usize;
        if buf.len() < n {
            buf.resize(n, 0);
        }
        let buf = &mut buf[..n];
        from.read_at(buf, offset)?;
        if sparse && is_zero(buf) {
            zero_range(to, offset, length, known_zero)?;
            Ok(0)
        } else {
            to.write_at(buf, offset)?;
            Ok(length)
        }
    })
}
