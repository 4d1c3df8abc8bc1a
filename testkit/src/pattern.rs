//! The one oracle of the tests: what a device must hold.
//!
//! - [`fill`]: the block pattern — block `b` at generation `g` always holds
//!   the same bytes, and no two (block, generation) pairs hold the same.
//!   Pattern files are one generation everywhere ([`pattern_file`]).
//! - [`Expected`]: the image a device must hold, byte for byte: it starts
//!   as a file's content (or a pattern) and takes every acknowledged write.
//!   A write cut off by a crash (never acknowledged) may or may not have
//!   landed: either content of its blocks is accepted until a later
//!   acknowledged write settles them.
//! - [`Writer`]: random block writes over NBD (or straight into a volume),
//!   each recorded in an [`Expected`] once acknowledged.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use volmig_api::io::VolumeIo;
use volmig_frontends::nbd::NbdClient;

/// The block of the pattern and of the writers.
pub const BLOCK: u64 = 4096;
pub const MIB: u64 = 1 << 20;

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Fills `buf` (one block, a multiple of 8 bytes) with the content of
/// block `b` at generation `g`: words of a per-(block, generation) seed
/// (cheap enough for hundreds of MiB in unoptimized test builds).
pub fn fill(buf: &mut [u8], b: u64, g: u32) {
    let seed = mix(b ^ mix(u64::from(g) ^ 0x766f_6c6d_6967));
    let mut w = seed;
    for c in buf.chunks_exact_mut(8) {
        c.copy_from_slice(&w.to_le_bytes());
        w = w.wrapping_add(0x9E37_79B9_7F4A_7C15) ^ (w >> 29);
    }
}

/// The bytes `[off, off+len)` of an image holding generation `generation` in every
/// block.
pub fn pattern(off: u64, len: usize, generation: u32) -> Vec<u8> {
    let first = off / BLOCK;
    let last = (off + len as u64).div_ceil(BLOCK);
    let mut out = vec![0u8; ((last - first) * BLOCK) as usize];
    for (i, blk) in out.chunks_exact_mut(BLOCK as usize).enumerate() {
        fill(blk, first + i as u64, generation);
    }
    let skip = (off - first * BLOCK) as usize;
    out.drain(..skip);
    out.truncate(len);
    out
}

/// A sparse file of `size` bytes (reads as zeroes, allocates nothing).
pub fn sparse_file(path: &Path, size: u64) {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(size))
        .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
}

/// A file of `size` bytes holding generation `generation` in every block.
pub fn pattern_file(path: &Path, size: u64, generation: u32) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut off = 0;
    while off < size {
        let n = MIB.min(size - off);
        f.write_all_at(&pattern(off, n as usize, generation), off)
            .unwrap();
        off += n;
    }
    f.sync_all().unwrap();
}

/// A source `source.img` of `size` bytes holding generation 0 and a sparse
/// `target.img` of the same size, in `dir`.
pub fn volume_files(dir: &Path, size: u64) -> (PathBuf, PathBuf) {
    let (src, tgt) = (dir.join("source.img"), dir.join("target.img"));
    pattern_file(&src, size, 0);
    sparse_file(&tgt, size);
    (src, tgt)
}

#[derive(Default)]
struct Image {
    bytes: Vec<u8>,
    /// Other contents a block may hold: writes to it that were cut off
    /// before they were acknowledged.
    maybe: BTreeMap<u64, Vec<Vec<u8>>>,
}

impl Image {
    fn block(&self, b: u64) -> &[u8] {
        let s = (b * BLOCK) as usize;
        &self.bytes[s..(s + BLOCK as usize).min(self.bytes.len())]
    }

    fn blocks(off: u64, len: usize) -> std::ops::Range<u64> {
        off / BLOCK..(off + len as u64).div_ceil(BLOCK)
    }

    /// `data` at `off` applied to a copy of block `b`.
    fn with_write(block: &[u8], b: u64, off: u64, data: &[u8]) -> Vec<u8> {
        let mut out = block.to_vec();
        patch(&mut out, b * BLOCK, off, data);
        out
    }
}

/// Writes the part of `data` (at `off` of the volume) that falls on `dst`
/// (at `dst_off` of the volume).
fn patch(dst: &mut [u8], dst_off: u64, off: u64, data: &[u8]) {
    let start = off.max(dst_off);
    let end = (off + data.len() as u64).min(dst_off + dst.len() as u64);
    if start < end {
        dst[(start - dst_off) as usize..(end - dst_off) as usize]
            .copy_from_slice(&data[(start - off) as usize..(end - off) as usize]);
    }
}

/// The content a device must hold (see the module's description).
pub struct Expected {
    image: Mutex<Image>,
}

impl Expected {
    /// An image starting as `bytes`.
    pub fn new(bytes: Vec<u8>) -> Arc<Self> {
        Arc::new(Self {
            image: Mutex::new(Image {
                bytes,
                maybe: BTreeMap::new(),
            }),
        })
    }

    /// An image starting as `path` holds now.
    pub fn of_file(path: &Path) -> Arc<Self> {
        Self::new(std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display())))
    }

    /// An image of `size` bytes holding generation `generation` everywhere.
    pub fn pattern(size: u64, generation: u32) -> Arc<Self> {
        Self::new(pattern(0, size as usize, generation))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Image> {
        // A writer that panicked mid-update fails its test anyway.
        self.image.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn size(&self) -> u64 {
        self.lock().bytes.len() as u64
    }

    /// An acknowledged write: the device must hold `data` at `off`.
    pub fn write(&self, off: u64, data: &[u8]) {
        let mut im = self.lock();
        let end = off as usize + data.len();
        assert!(
            end <= im.bytes.len(),
            "a write beyond the expected image ({end} > {})",
            im.bytes.len()
        );
        im.bytes[off as usize..end].copy_from_slice(data);
        for b in Image::blocks(off, data.len()) {
            let Some(mut alts) = im.maybe.remove(&b) else {
                continue;
            };
            for alt in &mut alts {
                patch(alt, b * BLOCK, off, data);
            }
            let now = im.block(b).to_vec();
            alts.retain(|a| *a != now);
            if !alts.is_empty() {
                im.maybe.insert(b, alts);
            }
        }
    }

    /// An acknowledged write of `len` bytes of `byte`.
    pub fn fill(&self, off: u64, len: u64, byte: u8) {
        self.write(off, &vec![byte; len as usize]);
    }

    /// A write that was sent but never acknowledged (the server died): its
    /// blocks may hold it or what they held before.
    pub fn unacknowledged(&self, off: u64, data: &[u8]) {
        let mut im = self.lock();
        for b in Image::blocks(off, data.len()) {
            let cur = im.block(b);
            let alt = Image::with_write(cur, b, off, data);
            if alt != cur {
                let alts = im.maybe.entry(b).or_default();
                if !alts.contains(&alt) {
                    alts.push(alt);
                }
            }
        }
    }

    /// Blocks whose content is still open (an unacknowledged write that no
    /// acknowledged one settled).
    pub fn uncertain_blocks(&self) -> usize {
        self.lock().maybe.len()
    }

    /// A copy of the image.
    pub fn image(&self) -> Vec<u8> {
        self.lock().bytes.clone()
    }

    /// Writes the image to `path` (for tools that compare files).
    pub fn save(&self, path: &Path) {
        std::fs::write(path, &self.lock().bytes).unwrap();
    }

    /// Panics unless `got` is the image (an open block may hold either
    /// content). `label` names what was read.
    pub fn check_bytes(&self, label: &str, got: &[u8]) {
        let im = self.lock();
        assert_eq!(
            got.len(),
            im.bytes.len(),
            "{label}: {} bytes instead of {}",
            got.len(),
            im.bytes.len()
        );
        for (b, (g, want)) in got
            .chunks(BLOCK as usize)
            .zip(im.bytes.chunks(BLOCK as usize))
            .enumerate()
        {
            let b = b as u64;
            if g == want
                || im
                    .maybe
                    .get(&b)
                    .is_some_and(|alts| alts.iter().any(|a| a == g))
            {
                continue;
            }
            let i = g.iter().zip(want).position(|(x, y)| x != y).unwrap_or(0);
            panic!(
                "{label}: block {b} does not hold what was acknowledged: first difference at \
                 offset {} (0x{:02x} instead of 0x{:02x})",
                b * BLOCK + i as u64,
                g[i],
                want[i]
            );
        }
    }

    /// Panics unless the file or block device at `path` holds the image.
    pub fn check_device(&self, path: &Path) {
        let f =
            std::fs::File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        let mut got = vec![0u8; self.size() as usize];
        f.read_exact_at(&mut got, 0)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        self.check_bytes(&path.display().to_string(), &got);
    }
}

/// How a [`Writer`] writes.
#[derive(Debug, Clone)]
pub struct WriterOpts {
    /// The blocks of `[lo, hi)` (bytes) ...
    pub lo: u64,
    pub hi: u64,
    /// ... whose number is `phase` modulo `stride` (writers sharing a
    /// volume keep to their own blocks).
    pub stride: u64,
    pub phase: u64,
    /// Pause after each write.
    pub pause: Duration,
    /// When a write fails (the server died), reconnect and send it again;
    /// without, a failed write fails the test.
    pub reconnect: bool,
    pub seed: u64,
}

impl WriterOpts {
    /// Every block of the first `hot` bytes.
    pub fn hot(hot: u64) -> Self {
        Self::range(0, hot)
    }

    /// Every block of `[lo, hi)`.
    pub fn range(lo: u64, hi: u64) -> Self {
        Self {
            lo,
            hi,
            stride: 1,
            phase: 0,
            pause: Duration::from_micros(500),
            reconnect: false,
            seed: 0x9e37_79b9,
        }
    }

    /// Only the blocks `b % stride == phase`.
    pub fn every(mut self, stride: u64, phase: u64) -> Self {
        assert!(stride > 0 && phase < stride);
        self.stride = stride;
        self.phase = phase;
        self
    }

    pub fn pause(mut self, pause: Duration) -> Self {
        self.pause = pause;
        self
    }

    /// Lives through server restarts (see [`WriterOpts::reconnect`]).
    pub fn reconnecting(mut self) -> Self {
        self.reconnect = true;
        self
    }

    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The first block written and how many there are.
    fn blocks(&self) -> (u64, u64) {
        let (lo, hi) = (self.lo / BLOCK, self.hi / BLOCK);
        let first = lo + (self.phase + self.stride - lo % self.stride) % self.stride;
        assert!(first < hi, "a writer with no block to write: {self:?}");
        (first, (hi - first - 1) / self.stride + 1)
    }
}

/// Where a writer's writes go.
trait Sink: Send + 'static {
    fn write(
        &mut self,
        off: u64,
        buf: Vec<u8>,
    ) -> impl Future<Output = Result<Vec<u8>, String>> + Send;
    /// Connects again after a failed write; false: not yet.
    fn reconnect(&mut self) -> impl Future<Output = bool> + Send;
}

struct NbdSink {
    sock: PathBuf,
    export: String,
    client: Option<NbdClient>,
}

impl Sink for NbdSink {
    async fn write(&mut self, off: u64, buf: Vec<u8>) -> Result<Vec<u8>, String> {
        if self.client.is_none() {
            self.client = Some(
                NbdClient::connect_unix(&self.sock, &self.export)
                    .await
                    .map_err(|e| format!("connecting to {}: {e}", self.sock.display()))?,
            );
        }
        let c = self.client.as_mut().expect("connected above");
        match c.write(off, &buf, false).await {
            Ok(()) => Ok(buf),
            Err(e) => {
                self.client = None;
                Err(e.to_string())
            }
        }
    }

    async fn reconnect(&mut self) -> bool {
        match NbdClient::connect_unix(&self.sock, &self.export).await {
            Ok(c) => {
                self.client = Some(c);
                true
            }
            Err(_) => false,
        }
    }
}

struct VolumeSink<V>(Arc<V>);

impl<V: VolumeIo> Sink for VolumeSink<V> {
    async fn write(&mut self, off: u64, buf: Vec<u8>) -> Result<Vec<u8>, String> {
        self.0
            .write(off, buf, false)
            .await
            .map_err(|e| e.to_string())
    }

    async fn reconnect(&mut self) -> bool {
        true
    }
}

/// What a writer did.
#[derive(Debug, Clone, Copy)]
pub struct WriterStats {
    /// Acknowledged writes.
    pub writes: u64,
    /// Writes that failed and were sent again after reconnecting.
    pub reconnects: u64,
}

/// Random block writes of the pattern until stopped, each recorded in an
/// [`Expected`] once acknowledged.
pub struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    reconnects: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    /// Writes over NBD to `export` of the server on unix socket `sock`.
    pub fn nbd(
        rt: &tokio::runtime::Handle,
        sock: &Path,
        export: &str,
        expected: Arc<Expected>,
        opts: WriterOpts,
    ) -> Writer {
        let sink = NbdSink {
            sock: sock.to_path_buf(),
            export: export.to_string(),
            client: None,
        };
        Self::start(rt, sink, expected, opts)
    }

    /// Writes straight into a volume (what a frontend does for a workload).
    pub fn volume<V: VolumeIo>(
        rt: &tokio::runtime::Handle,
        vol: Arc<V>,
        expected: Arc<Expected>,
        opts: WriterOpts,
    ) -> Writer {
        Self::start(rt, VolumeSink(vol), expected, opts)
    }

    fn start(
        rt: &tokio::runtime::Handle,
        mut sink: impl Sink,
        expected: Arc<Expected>,
        opts: WriterOpts,
    ) -> Writer {
        let (first, count) = opts.blocks();
        assert!(
            opts.hi <= expected.size(),
            "the writer's range ends beyond the expected image"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let reconnects = Arc::new(AtomicU64::new(0));
        let task = rt.spawn({
            let (stop, acked, reconnects) = (stop.clone(), acked.clone(), reconnects.clone());
            async move {
                let mut gens = vec![0u32; (opts.hi / BLOCK) as usize];
                let mut x = opts.seed | 1;
                let mut pending: Option<(u64, u32)> = None;
                let mut buf = vec![0u8; BLOCK as usize];
                while !stop.load(Ordering::Relaxed) {
                    let (b, g) = pending.take().unwrap_or_else(|| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let b = first + (x % count) * opts.stride;
                        (b, gens[b as usize] + 1)
                    });
                    buf.resize(BLOCK as usize, 0);
                    fill(&mut buf, b, g);
                    match sink.write(b * BLOCK, buf).await {
                        Ok(back) => {
                            buf = back;
                            expected.write(b * BLOCK, &buf);
                            gens[b as usize] = g;
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            assert!(opts.reconnect, "write of block {b} failed: {e}");
                            // Not acknowledged: the block may hold it or
                            // what it held; it is sent again first thing.
                            buf = vec![0u8; BLOCK as usize];
                            fill(&mut buf, b, g);
                            expected.unacknowledged(b * BLOCK, &buf);
                            reconnects.fetch_add(1, Ordering::Relaxed);
                            loop {
                                if stop.load(Ordering::Relaxed) {
                                    return;
                                }
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                if sink.reconnect().await {
                                    break;
                                }
                            }
                            pending = Some((b, g));
                            continue;
                        }
                    }
                    tokio::time::sleep(opts.pause).await;
                }
            }
        });
        Writer {
            stop,
            acked,
            reconnects,
            task,
        }
    }

    /// Acknowledged writes so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Failed writes so far (each sent again after reconnecting).
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Stops the writer and waits for it (a panic in it fails the test).
    pub async fn finish(self) -> WriterStats {
        self.stop.store(true, Ordering::Relaxed);
        if let Err(e) = self.task.await {
            std::panic::resume_unwind(e.into_panic());
        }
        WriterStats {
            writes: self.acked.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
        }
    }

    /// `finish` from outside the runtime.
    pub fn finish_on(self, rt: &tokio::runtime::Runtime) -> WriterStats {
        rt.block_on(self.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_blocks_are_distinct_and_repeatable() {
        let mut a = vec![0u8; BLOCK as usize];
        let mut b = vec![0u8; BLOCK as usize];
        fill(&mut a, 1, 1);
        fill(&mut b, 1, 1);
        assert_eq!(a, b);
        for (blk, g) in [(1, 2), (2, 1), (0, 0)] {
            fill(&mut b, blk, g);
            assert_ne!(a, b, "block {blk} generation {g}");
        }
        assert_eq!(pattern(4096 + 100, 50, 1), a[100..150].to_vec());
    }

    #[test]
    fn expected_accepts_either_content_of_an_unacknowledged_write_until_settled() {
        let e = Expected::new(vec![0u8; 3 * BLOCK as usize]);
        e.write(10, &[1, 2, 3]);
        let mut dev = e.image();
        e.check_bytes("image", &dev);
        e.unacknowledged(BLOCK - 2, &[7u8; 4]);
        assert_eq!(e.uncertain_blocks(), 2);
        e.check_bytes("without the cut-off write", &dev);
        dev[(BLOCK - 2) as usize..(BLOCK + 2) as usize].fill(7);
        e.check_bytes("with it", &dev);
        // an acknowledged write over block 1 settles it
        e.write(BLOCK, &[9u8; BLOCK as usize]);
        assert_eq!(e.uncertain_blocks(), 1);
        let r = std::panic::catch_unwind(|| e.check_bytes("stale", &dev));
        assert!(r.is_err(), "block 1 must hold the acknowledged write");
        dev[BLOCK as usize..2 * BLOCK as usize].fill(9);
        e.check_bytes("settled", &dev);
        let mut other = dev.clone();
        other[0] = 5;
        let r = std::panic::catch_unwind(|| e.check_bytes("other", &other));
        assert!(r.is_err(), "a byte nobody wrote must be caught");
    }
}
