//! A file writer for tests of a mounted filesystem: it creates,
//! overwrites, appends, truncates, renames and deletes files in a
//! directory until stopped, keeps a model of what every file must hold,
//! and syncs regularly; [`check_tree`] then compares a directory with the
//! model (SHA-256 of every file). Any error of the filesystem fails the
//! writer (it panics; [`FileWriter::stop`] passes the panic on), and the
//! slowest operation is measured (a stall shows there).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng, rngs::StdRng};

// ---------------------------------------------------------------------------
// SHA-256 (FIPS 180-4), to fingerprint file contents
// ---------------------------------------------------------------------------

const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, c) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 32];
    for (o, x) in out.chunks_exact_mut(4).zip(h) {
        o.copy_from_slice(&x.to_be_bytes());
    }
    out
}

pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// What every file should hold, by path relative to the directory.
pub type Model = BTreeMap<String, Vec<u8>>;

const DIRS: [&str; 3] = ["a", "b", "c/deep"];
const MAX_FILE: usize = 1 << 20;

/// How a [`FileWriter`] writes.
#[derive(Debug, Clone)]
pub struct FileWriterOpts {
    pub seed: u64,
    /// `fdatasync` after every write (creates, overwrites, appends): each
    /// write is durable when the operation ends.
    pub datasync: bool,
    /// Run `sync` every this many operations (0: never).
    pub sync_every: u32,
}

impl Default for FileWriterOpts {
    fn default() -> Self {
        Self {
            seed: 0x5eed,
            datasync: false,
            sync_every: 25,
        }
    }
}

#[derive(Default)]
struct Shared {
    model: Mutex<Model>,
    stop: AtomicBool,
    ops: AtomicU64,
    syncs: AtomicU64,
    /// Slowest operation, microseconds.
    max_us: AtomicU64,
}

/// A writer thread in a directory (see the module docs).
pub struct FileWriter {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn random_bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill(&mut v[..]);
    v
}

impl FileWriter {
    pub fn start(root: &Path, opts: FileWriterOpts) -> Self {
        let shared = Arc::new(Shared::default());
        let (s, root) = (shared.clone(), root.to_path_buf());
        let thread = std::thread::Builder::new()
            .name("file-writer".into())
            .spawn(move || write_loop(root, opts, &s))
            .unwrap();
        Self {
            shared,
            thread: Some(thread),
        }
    }

    pub fn ops(&self) -> u64 {
        self.shared.ops.load(Ordering::SeqCst)
    }

    pub fn syncs(&self) -> u64 {
        self.shared.syncs.load(Ordering::SeqCst)
    }

    /// The slowest operation so far.
    pub fn max_latency(&self) -> Duration {
        Duration::from_micros(self.shared.max_us.load(Ordering::SeqCst))
    }

    /// Fails the test if the writer died (its panic is passed on).
    pub fn check_alive(&mut self) {
        if self.thread.as_ref().is_some_and(|t| t.is_finished())
            && let Some(t) = self.thread.take()
            && let Err(e) = t.join()
        {
            std::panic::resume_unwind(e);
        }
    }

    /// Waits until the writer did `n` more operations (fails the test
    /// after `timeout`, or when the writer died).
    pub fn wait_ops(&mut self, n: u64, timeout: Duration) {
        let until = self.ops() + n;
        let t = Instant::now();
        while self.ops() < until {
            self.check_alive();
            assert!(
                t.elapsed() < timeout,
                "the writer did {} of {n} operations in {timeout:?}",
                n + self.ops() - until
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the writer synced `n` times in all.
    pub fn wait_syncs(&mut self, n: u64, timeout: Duration) {
        let shared = self.shared.clone();
        let done = || shared.syncs.load(Ordering::SeqCst) >= n;
        let t = Instant::now();
        while !done() {
            self.check_alive();
            assert!(
                t.elapsed() < timeout,
                "the writer's syncs: fewer than {n} in {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the writer; what every file must hold. A writer that failed
    /// fails the test here.
    pub fn stop(mut self) -> Model {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take()
            && let Err(e) = t.join()
        {
            std::panic::resume_unwind(e);
        }
        self.shared.model.lock().unwrap().clone()
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        // A failing test: let the writer leave the mount.
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write_loop(root: PathBuf, opts: FileWriterOpts, s: &Shared) {
    use std::os::unix::fs::FileExt;
    let mut rng = StdRng::seed_from_u64(opts.seed);
    for d in DIRS {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let mut until_sync = opts.sync_every;
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    while !s.stop.load(Ordering::SeqCst) {
        let name = format!(
            "{}/f{:03}",
            DIRS[rng.random_range(0..DIRS.len())],
            rng.random_range(0..60)
        );
        let path = root.join(&name);
        let started = Instant::now();
        let mut m = s.model.lock().unwrap();
        let exists = m.contains_key(&name);
        let op = rng.random_range(0..100);
        let what = match op {
            _ if !exists || op < 25 => {
                let len = match rng.random_range(0..4) {
                    0 => rng.random_range(0..4096),
                    _ => rng.random_range(0..256 * 1024),
                };
                let data = random_bytes(&mut rng, len);
                let mut f =
                    std::fs::File::create(&path).unwrap_or_else(|e| panic!("create {name}: {e}"));
                f.write_all(&data)
                    .unwrap_or_else(|e| panic!("write {name}: {e}"));
                if opts.datasync || rng.random_range(0..8) == 0 {
                    f.sync_data()
                        .unwrap_or_else(|e| panic!("fdatasync {name}: {e}"));
                }
                m.insert(name.clone(), data);
                "create"
            }
            25..50 => {
                let cur = m.get_mut(&name).unwrap();
                let off = rng.random_range(0..=cur.len());
                let len = rng.random_range(1..64 * 1024);
                let data = random_bytes(&mut rng, len);
                let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                f.write_all_at(&data, off as u64)
                    .unwrap_or_else(|e| panic!("overwrite {name}: {e}"));
                if opts.datasync {
                    f.sync_data()
                        .unwrap_or_else(|e| panic!("fdatasync {name}: {e}"));
                }
                if cur.len() < off + len {
                    cur.resize(off + len, 0);
                }
                cur[off..off + len].copy_from_slice(&data);
                "overwrite"
            }
            50..75 => {
                let cur = m.get_mut(&name).unwrap();
                if cur.len() > MAX_FILE {
                    std::fs::remove_file(&path).unwrap();
                    m.remove(&name);
                    "delete (full)"
                } else {
                    let len = rng.random_range(1..128 * 1024);
                    let data = random_bytes(&mut rng, len);
                    let mut f = std::fs::OpenOptions::new()
                        .append(true)
                        .open(&path)
                        .unwrap();
                    f.write_all(&data)
                        .unwrap_or_else(|e| panic!("append {name}: {e}"));
                    if opts.datasync {
                        f.sync_data()
                            .unwrap_or_else(|e| panic!("fdatasync {name}: {e}"));
                    }
                    cur.extend_from_slice(&data);
                    "append"
                }
            }
            75..85 => {
                std::fs::remove_file(&path).unwrap();
                m.remove(&name);
                "delete"
            }
            85..92 => {
                // truncate to a shorter length
                let cur = m.get_mut(&name).unwrap();
                let len = rng.random_range(0..=cur.len());
                let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                f.set_len(len as u64).unwrap();
                cur.truncate(len);
                "truncate"
            }
            _ => {
                let to = format!(
                    "{}/f{:03}",
                    DIRS[rng.random_range(0..DIRS.len())],
                    rng.random_range(0..60)
                );
                std::fs::rename(&path, root.join(&to)).unwrap();
                let data = m.remove(&name).unwrap();
                m.insert(to, data);
                "rename"
            }
        };
        drop(m);
        *counts.entry(what).or_default() += 1;
        s.ops.fetch_add(1, Ordering::SeqCst);
        if opts.sync_every > 0 {
            until_sync -= 1;
            if until_sync == 0 {
                until_sync = opts.sync_every;
                let st = Command::new("sync").status().unwrap();
                assert!(st.success(), "sync failed");
                s.syncs.fetch_add(1, Ordering::SeqCst);
            }
        }
        s.max_us
            .fetch_max(started.elapsed().as_micros() as u64, Ordering::SeqCst);
    }
    eprintln!("writer operations: {counts:?}");
}

/// Every file under `root` is in `model` with the same SHA-256 and vice
/// versa. Returns the number of files and bytes checked.
pub fn check_tree(root: &Path, model: &Model, label: &str) -> (usize, u64) {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            let rel = e
                .path()
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if ft.is_dir() {
                if rel != "lost+found" && !rel.starts_with("fio") {
                    stack.push(e.path());
                }
            } else {
                assert!(ft.is_file(), "{label}: unexpected entry {rel}");
                found.push(rel);
            }
        }
    }
    found.sort();
    let want: Vec<&String> = model.keys().collect();
    assert_eq!(
        found.iter().collect::<Vec<_>>(),
        want,
        "{label}: the set of files differs"
    );
    let mut bytes = 0;
    for (name, content) in model {
        let got = std::fs::read(root.join(name)).unwrap();
        if sha256(&got) != sha256(content) {
            let at = got
                .iter()
                .zip(content)
                .position(|(a, b)| a != b)
                .unwrap_or(got.len().min(content.len()));
            panic!(
                "{label}: {name} has sha256 {} instead of {} ({} bytes, expected {}; first \
                 difference at offset {at})",
                hex(&sha256(&got)),
                hex(&sha256(content)),
                got.len(),
                content.len()
            );
        }
        bytes += got.len() as u64;
    }
    (model.len(), bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_known_answers() {
        assert_eq!(
            hex(&sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(&sha256(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
    }
}
