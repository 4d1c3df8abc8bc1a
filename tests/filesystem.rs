//! System test: an ext4 filesystem in active use migrates live.
//!
//! The agent serves a volume over NBD; nbdfuse turns the export into a file,
//! a loop device turns that into a block device, ext4 goes on top and a writer
//! creates, overwrites, appends, renames and deletes files while the volume
//! migrates to a target file. Afterwards every file must read back exactly as
//! written, through the mount and straight from the target file, and e2fsck
//! must find the target's filesystem clean.
//!
//! Needs root, /dev/fuse and loop devices; missing tools fail the test with
//! the Debian package to install.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng, rngs::StdRng};
use volmig_testkit::agent::AgentProcess;
use volmig_testkit::devices::{LoopDev, Mount, is_mountpoint};
use volmig_testkit::pattern::sparse_file;
use volmig_testkit::tools::retry;
use volmig_testkit::{MIB, require_bin, require_fuse, require_root, run, wait_until};

const MIGRATION_TIMEOUT: Duration = Duration::from_secs(900);

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

fn sha256(data: &[u8]) -> [u8; 32] {
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

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

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

// ---------------------------------------------------------------------------
// Cleanup guards (with the test kit's loop devices and mounts): whatever
// happens, no mount, loop device or FUSE mount is left behind.
// ---------------------------------------------------------------------------

/// nbdfuse serving an NBD export as the file `dir/nbd`; unmounted and
/// stopped on drop.
struct NbdFuse {
    dir: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl NbdFuse {
    fn start(uri: &str, dir: &Path, size: u64) -> NbdFuse {
        let bin = require_bin("nbdfuse", "nbdfuse");
        require_bin("fusermount3", "fuse3");
        std::fs::create_dir_all(dir).unwrap();
        let log = dir.with_extension("log");
        let child = Command::new(bin)
            .arg(dir.join("nbd"))
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn nbdfuse");
        let mut me = NbdFuse {
            dir: dir.to_path_buf(),
            child: Some(child),
            log,
        };
        let file = me.file();
        wait_until("nbdfuse's file", Duration::from_secs(60), || {
            if let Some(st) = me.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "nbdfuse exited with {st}:\n{}",
                    std::fs::read_to_string(&me.log).unwrap_or_default()
                );
            }
            std::fs::metadata(&file).is_ok_and(|m| m.len() == size)
        });
        me
    }

    fn file(&self) -> PathBuf {
        self.dir.join("nbd")
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let d = self.dir.to_str().unwrap();
            assert!(
                retry("fusermount3", &["-u", d], 20),
                "fusermount3 -u {d} failed"
            );
            let mut exited = false;
            wait_until("nbdfuse to exit", Duration::from_secs(60), || {
                exited = child.try_wait().unwrap().is_some();
                exited
            });
        }
    }
}

impl Drop for NbdFuse {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let d = self.dir.to_str().unwrap_or_default().to_string();
            if is_mountpoint(&self.dir) && !retry("fusermount3", &["-u", &d], 10) {
                let _ = retry("umount", &["-l", &d], 1);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sets a flag on drop (stops the writer when the test fails).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
        // give the writer a moment to leave the mount
        std::thread::sleep(Duration::from_millis(300));
    }
}

// ---------------------------------------------------------------------------
// The writer and the checks
// ---------------------------------------------------------------------------

/// What every file should hold, by path relative to the mount.
type Model = BTreeMap<String, Vec<u8>>;

const DIRS: [&str; 3] = ["a", "b", "c/deep"];
const MAX_FILE: usize = 1 << 20;

fn random_bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill(&mut v[..]);
    v
}

/// Creates, overwrites, appends, renames and deletes files under `root`
/// until `stop`; keeps `model` up to date; runs `sync` every 25 operations.
fn writer(
    root: PathBuf,
    model: Arc<Mutex<Model>>,
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    syncs: Arc<AtomicU64>,
) {
    use std::os::unix::fs::FileExt;
    let mut rng = StdRng::seed_from_u64(0x5eed);
    for d in DIRS {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let mut until_sync = 25u32;
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    while !stop.load(Ordering::SeqCst) {
        let name = format!(
            "{}/f{:03}",
            DIRS[rng.random_range(0..DIRS.len())],
            rng.random_range(0..60)
        );
        let path = root.join(&name);
        let mut m = model.lock().unwrap();
        let exists = m.contains_key(&name);
        let op = rng.random_range(0..100);
        let what = match op {
            _ if !exists || op < 25 => {
                let len = match rng.random_range(0..4) {
                    0 => rng.random_range(0..4096),
                    _ => rng.random_range(0..256 * 1024),
                };
                let data = random_bytes(&mut rng, len);
                let mut f = std::fs::File::create(&path).unwrap();
                f.write_all(&data).unwrap();
                if rng.random_range(0..8) == 0 {
                    f.sync_all().unwrap();
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
                f.write_all_at(&data, off as u64).unwrap();
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
                    f.write_all(&data).unwrap();
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
        until_sync -= 1;
        ops.fetch_add(1, Ordering::SeqCst);
        if until_sync == 0 {
            until_sync = 25;
            let st = Command::new("sync").status().unwrap();
            assert!(st.success(), "sync failed");
            syncs.fetch_add(1, Ordering::SeqCst);
        }
    }
    eprintln!("writer operations: {counts:?}");
}

/// Every file under `root` is in `model` with the same SHA-256 and vice
/// versa. Returns the number of files and bytes checked.
fn check_tree(root: &Path, model: &Model, label: &str) -> (usize, u64) {
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
                if rel != "lost+found" {
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

#[test]
fn ext4_in_use_migrates_live_and_stays_consistent() {
    require_root("it mounts filesystems and sets up loop devices");
    require_fuse();
    for (bin, pkg) in [
        ("nbdfuse", "nbdfuse"),
        ("fusermount3", "fuse3"),
        ("losetup", "mount"),
        ("mount", "mount"),
        ("umount", "mount"),
        ("mkfs.ext4", "e2fsprogs"),
        ("e2fsck", "e2fsprogs"),
        ("sync", "coreutils"),
    ] {
        require_bin(bin, pkg);
    }

    let size = 512 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("source.img");
    let tgt = dir.path().join("target.img");
    sparse_file(&src, size);
    sparse_file(&tgt, size);
    let mut agent = AgentProcess::builder(dir.path(), "agent")
        .export("vol", &src)
        .start();

    let mut fuse = NbdFuse::start(&agent.unix_uri("vol"), &dir.path().join("fuse"), size);
    let mut lo = LoopDev::attach(&fuse.file());
    let out = run(
        &require_bin("mkfs.ext4", "e2fsprogs"),
        &["-q", "-F", lo.path().to_str().unwrap()],
    );
    assert!(out.ok(), "mkfs.ext4 failed:\n{}", out.text());
    let mnt = dir.path().join("mnt");
    let mut fs = Mount::new(lo.path(), &mnt, &[]);

    let model = Arc::new(Mutex::new(Model::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let syncs = Arc::new(AtomicU64::new(0));
    let stop_guard = StopOnDrop(stop.clone());
    let w = {
        let (root, model, stop, ops, syncs) = (
            mnt.clone(),
            model.clone(),
            stop.clone(),
            ops.clone(),
            syncs.clone(),
        );
        std::thread::spawn(move || writer(root, model, stop, ops, syncs))
    };
    // some files exist before the migration starts
    wait_until("the writer's first syncs", Duration::from_secs(300), || {
        syncs.load(Ordering::SeqCst) >= 2 || w.is_finished()
    });

    let mut m = agent.migrate("vol", &tgt, &["--bandwidth", "64Mi"]);
    let st = m.wait_terminal(MIGRATION_TIMEOUT);
    let ops_at_cutover = ops.load(Ordering::SeqCst);
    let syncs_at_cutover = syncs.load(Ordering::SeqCst);
    // keep writing on the target for a few syncs
    wait_until(
        "writes after the migration",
        Duration::from_secs(300),
        || syncs.load(Ordering::SeqCst) >= syncs_at_cutover + 4 || w.is_finished(),
    );
    stop.store(true, Ordering::SeqCst);
    if let Err(e) = w.join() {
        std::panic::resume_unwind(e);
    }
    drop(stop_guard);
    agent.assert_completed(&st);
    assert_eq!(agent.active_path("vol"), tgt);
    let total_ops = ops.load(Ordering::SeqCst);
    assert!(
        syncs_at_cutover >= 2,
        "too few writes before the cutover ({ops_at_cutover} ops)"
    );

    // Through the mount (the page cache, backed by the target now).
    assert!(Command::new("sync").status().unwrap().success());
    let model = model.lock().unwrap().clone();
    let (files, bytes) = check_tree(&mnt, &model, "through the mount");
    eprintln!(
        "writer: {total_ops} operations ({ops_at_cutover} before the migration ended), \
         {files} files / {bytes} bytes at the end; copied {} bytes, stall {} ms",
        st["bytes_copied"], st["cutover_stall_ms"]
    );

    // Tear the stack down in order, then look at the target file alone.
    fs.unmount();
    lo.detach();
    fuse.stop();
    agent.stop();

    let out = run(
        &require_bin("e2fsck", "e2fsprogs"),
        &["-fn", tgt.to_str().unwrap()],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "e2fsck finds the target's filesystem unclean:\n{}",
        out.text()
    );

    let ro = dir.path().join("ro");
    let mut ro_mount = Mount::new(&tgt, &ro, &["-o", "ro,loop"]);
    let (files2, bytes2) = check_tree(&ro, &model, "straight from the target file");
    assert_eq!((files2, bytes2), (files, bytes));
    ro_mount.unmount();
}
