#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! The backing-device suite: the same cases over every backend a volume
//! can live on — a regular file and a loop device (a real block device:
//! `BLKGETSIZE64`, `BLKDISCARD`, `BLKZEROOUT`), each opened buffered and
//! with O_DIRECT. Positional I/O and its bounds, holes and allocation
//! runs, trim and write-zeroes, odd offsets and lengths (O_DIRECT's bounce
//! buffer), inline (`RWF_NOWAIT`) I/O, the same through the interposer,
//! and a live migration to a backend of the other kind under NBD writes.
//!
//! Loop devices need root and `losetup` (Debian package `mount`): without,
//! those cases fail, never skip.

use std::path::{Path, PathBuf};
use std::time::Duration;

use volmig_api::SessionConfig;
use volmig_api::io::VolumeIo;
use volmig_api::phase::Phase;
use volmig_node_agent::error::AgentError;
use volmig_node_agent::volume::{BackingDevice, DeviceKind, OpenMode};
use volmig_testkit::agent::{InProcAgent, in_process, serve};
use volmig_testkit::devices::LoopDev;
use volmig_testkit::master::InProcMaster;
use volmig_testkit::pattern::{pattern_file, sparse_file};
use volmig_testkit::{Expected, MIB, Writer, WriterOpts, require_root};

/// Where a volume's bytes live, and how they are opened.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Backend {
    File,
    FileDirect,
    Loop,
    LoopDirect,
}

impl Backend {
    fn direct(self) -> bool {
        matches!(self, Backend::FileDirect | Backend::LoopDirect)
    }

    fn kind(self) -> DeviceKind {
        match self {
            Backend::File | Backend::FileDirect => DeviceKind::File,
            Backend::Loop | Backend::LoopDirect => DeviceKind::Block,
        }
    }

    /// The backend of the other kind opened the same way: where a
    /// migration from this one goes.
    fn other(self) -> Backend {
        match self {
            Backend::File => Backend::Loop,
            Backend::Loop => Backend::File,
            Backend::FileDirect => Backend::LoopDirect,
            Backend::LoopDirect => Backend::FileDirect,
        }
    }
}

/// A device of some backend; a loop device is detached on drop.
struct Dev {
    path: PathBuf,
    /// The file under it (the device itself for files).
    file: PathBuf,
    _loop: Option<LoopDev>,
}

/// How a new device starts.
enum Content {
    /// Sparse: reads as zeroes, nothing allocated.
    Sparse,
    /// The pattern at generation 0 everywhere.
    Pattern,
    /// Every byte this value.
    Byte(u8),
}

impl Dev {
    fn new(b: Backend, dir: &Path, name: &str, size: u64, content: Content) -> Dev {
        let file = dir.join(name);
        match content {
            Content::Sparse => sparse_file(&file, size),
            Content::Pattern => pattern_file(&file, size, 0),
            Content::Byte(x) => std::fs::write(&file, vec![x; size as usize]).unwrap(),
        }
        match b.kind() {
            DeviceKind::File => Dev {
                path: file.clone(),
                file,
                _loop: None,
            },
            DeviceKind::Block => {
                require_root("it sets up loop devices");
                let lo = LoopDev::attach(&file);
                Dev {
                    path: lo.path().to_path_buf(),
                    file,
                    _loop: Some(lo),
                }
            }
        }
    }

    fn open(&self, b: Backend) -> BackingDevice {
        BackingDevice::open(&self.path, OpenMode::ReadWrite, b.direct())
            .unwrap_or_else(|e| panic!("opening {} ({b:?}): {e}", self.path.display()))
    }
}

fn read(d: &BackingDevice, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0xa5u8; len];
    d.read_at(&mut b, off).unwrap();
    b
}

fn roundtrip_kind_size_and_bounds(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::new(b, dir.path(), "a", MIB, Content::Sparse);
    let d = dev.open(b);
    assert_eq!(d.kind(), b.kind());
    assert_eq!(d.size(), MIB, "size (BLKGETSIZE64 for a block device)");
    d.write_at(&[7u8; 4096], 8192).unwrap();
    assert_eq!(read(&d, 8192, 4096), vec![7u8; 4096]);
    d.flush().unwrap();
    let err = d.write_at(&[1u8; 10], MIB - 5).unwrap_err();
    assert!(err.to_string().contains("beyond end"), "{err}");
    let mut buf = [0u8; 10];
    let err = d.read_at(&mut buf, MIB - 5).unwrap_err();
    assert!(err.to_string().contains("beyond end"), "{err}");
    let err = d.trim(MIB - 4096, 8192).unwrap_err();
    assert!(err.to_string().contains("beyond end"), "{err}");
    drop(d);
    // what was written is on the device for anyone
    let f = std::fs::read(&dev.file).unwrap();
    assert_eq!(&f[8192..8192 + 4096], &[7u8; 4096][..]);
}

fn holes_and_segments(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let dev = Dev::new(b, dir.path(), "s", size, Content::Sparse);
    let d = dev.open(b);
    d.write_at(&[1u8; 65536], MIB).unwrap();
    let segs = d.segments(0, size).unwrap();
    // contiguous runs covering exactly the range asked for
    let mut pos = 0;
    for s in &segs {
        assert_eq!(s.offset, pos, "{segs:?}");
        pos += s.length;
    }
    assert_eq!(pos, size, "{segs:?}");
    let data: u64 = segs.iter().filter(|s| !s.hole).map(|s| s.length).sum();
    match b.kind() {
        // a file knows its holes: the data run holds the write, no more
        // than the filesystem's allocation around it
        DeviceKind::File => {
            assert!((65536..size).contains(&data), "{segs:?}");
            let fresh = Dev::new(b, dir.path(), "fresh", size, Content::Sparse);
            assert!(fresh.open(b).is_fully_unallocated().unwrap());
            assert!(!d.is_fully_unallocated().unwrap());
        }
        // a block device reports one data run, and is never known to be
        // unallocated
        DeviceKind::Block => {
            assert_eq!(data, size, "{segs:?}");
            assert!(!d.is_fully_unallocated().unwrap());
        }
    }
    let part = d.segments(MIB + 4096, 8192).unwrap();
    assert_eq!(part.iter().map(|s| s.length).sum::<u64>(), 8192, "{part:?}");
    assert!(part.iter().all(|s| !s.hole), "{part:?}");
}

fn trim_and_write_zeroes_leave_zeroes(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let dev = Dev::new(b, dir.path(), "z", size, Content::Byte(0x33));
    let d = dev.open(b);
    // trim (punch hole / BLKDISCARD): reads as zeroes
    d.trim(MIB, MIB).unwrap();
    assert!(read(&d, MIB, MIB as usize).iter().all(|&x| x == 0));
    // write-zeroes without and with trimming (ZERO_RANGE, PUNCH_HOLE /
    // BLKZEROOUT)
    d.write_zeroes(4096, 8192, false).unwrap();
    assert!(read(&d, 4096, 8192).iter().all(|&x| x == 0));
    d.write_at(&[9u8; 65536], 2 * MIB).unwrap();
    d.write_zeroes(2 * MIB, 65536, true).unwrap();
    assert!(read(&d, 2 * MIB, 65536).iter().all(|&x| x == 0));
    // and nothing around them changed
    for (off, len) in [
        (0, 4096),
        (12288, 4096),
        (MIB - 4096, 4096),
        (2 * MIB + 65536, 4096),
    ] {
        assert!(
            read(&d, off, len).iter().all(|&x| x == 0x33),
            "{b:?}: bytes at {off} changed"
        );
    }
    d.flush().unwrap();
    let f = std::fs::read(&dev.file).unwrap();
    assert!(f[MIB as usize..2 * MIB as usize].iter().all(|&x| x == 0));
}

fn odd_offsets_read_back(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::new(b, dir.path(), "d", MIB, Content::Pattern);
    let expected = Expected::pattern(MIB, 0);
    let d = dev.open(b);
    // within a block, across a block boundary, many blocks at odd ends,
    // one byte at each end of the device
    let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
    let writes: [(u64, &[u8]); 5] = [
        (4093, b"hello"),
        (8190, b"across"),
        (65536 + 4093, &payload),
        (0, b"a"),
        (MIB - 1, b"z"),
    ];
    for (off, data) in writes {
        d.write_at(data, off).unwrap();
        expected.write(off, data);
        assert_eq!(read(&d, off, data.len()), data, "{b:?} at {off}");
    }
    // reads at odd offsets see the writes and the pattern around them
    let image = expected.image();
    for (off, len) in [(4090, 20), (65536 + 4000, 10_200), (MIB - 3, 3), (1, 4095)] {
        assert_eq!(
            read(&d, off, len),
            &image[off as usize..off as usize + len],
            "{b:?}: read at {off}+{len}"
        );
    }
    d.flush().unwrap();
    expected.check_device(&dev.path);
}

/// Writes to neighbouring parts of one O_DIRECT span at once (ext4 with 1
/// KiB blocks on a device of 4 KiB alignment does that): each is a
/// read-modify-write of the span. None may undo another, nor writes and
/// zeroing next to them: each writer owns 100 bytes of one 512-byte sector
/// (inside a span whatever the device's alignment) and reads back what it
/// wrote, every time. Two handles of the same device (a resumed session
/// opens it again).
fn concurrent_partial_writes_are_all_kept(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::new(b, dir.path(), "d", MIB, Content::Sparse);
    let (one, two) = (
        std::sync::Arc::new(dev.open(b)),
        std::sync::Arc::new(dev.open(b)),
    );
    const ROUNDS: u32 = 1500;
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let d = if w % 2 == 0 { one.clone() } else { two.clone() };
            std::thread::spawn(move || {
                let off = 8192 + 16 + w * 120;
                for i in 1..=ROUNDS {
                    let tag = [w as u8 + 1; 4].into_iter().chain(i.to_le_bytes());
                    let part: Vec<u8> = tag.cycle().take(100).collect();
                    d.write_at(&part, off).unwrap();
                    assert_eq!(
                        read(&d, off, 100),
                        part,
                        "{b:?}: writer {w}, round {i}: its write was undone"
                    );
                }
            })
        })
        .collect();
    // Meanwhile whole-span writes and zeroing in the neighbouring spans.
    for i in 0..ROUNDS / 10 {
        one.write_at(&[i as u8; 4096], 4096).unwrap();
        two.write_zeroes(12288, 4096, i % 2 == 0).unwrap();
    }
    for w in writers {
        w.join().unwrap();
    }
}

fn nowait_io(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::new(b, dir.path(), "n", MIB, Content::Sparse);
    let d = dev.open(b);
    d.write_at(&[5u8; 4096], 0).unwrap();
    let mut buf = [0u8; 4096];
    // out of range is never tried inline
    assert!(d.try_read_nowait(&mut buf, MIB - 1).is_none());
    if b.direct() {
        // O_DIRECT never goes inline: the page cache is not used
        assert!(d.try_read_nowait(&mut buf, 0).is_none());
        assert!(d.try_write_nowait(&[6u8; 4096], 4096).is_none());
        return;
    }
    // just written: in the page cache, so the read cannot block
    match d.try_read_nowait(&mut buf, 0) {
        Some(r) => {
            r.unwrap();
            assert_eq!(buf, [5u8; 4096]);
        }
        None => panic!("{b:?}: a page-cache read must not need the blocking pool"),
    }
    if let Some(r) = d.try_write_nowait(&[6u8; 4096], 4096) {
        r.unwrap();
        assert_eq!(read(&d, 4096, 4096), vec![6u8; 4096]);
    }
}

async fn interposer_io_at_odd_offsets(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let dev = Dev::new(b, dir.path(), "v", size, Content::Pattern);
    let expected = Expected::pattern(size, 0);
    let agent = in_process(&dir.path().join("state"));
    let vol = serve(&agent, "vol", &dev.path, b.direct()).await;
    assert_eq!(vol.size(), size);
    let payload: Vec<u8> = (0..70_001u32).map(|i| (i % 251) as u8).collect();
    for (off, data) in [
        (1u64, &b"x"[..]),
        (4095, &payload[..4097]),
        (MIB + 511, &payload[..]),
        (size - 3, b"end"),
    ] {
        vol.write(off, data.to_vec(), false).await.unwrap();
        expected.write(off, data);
        let back = vol.read(off, vec![0u8; data.len()]).await.unwrap();
        assert_eq!(back, data, "{b:?}: read back at {off}");
    }
    // durable on return with FUA
    vol.write(3 * MIB + 7, vec![0xfe; 300], true).await.unwrap();
    expected.fill(3 * MIB + 7, 300, 0xfe);
    vol.trim(2 * MIB, MIB).await.unwrap();
    expected.fill(2 * MIB, MIB, 0);
    vol.write_zeroes(8192, 8192, false).await.unwrap();
    expected.fill(8192, 8192, 0);
    vol.write_zeroes(MIB + 65536, 65536, true).await.unwrap();
    expected.fill(MIB + 65536, 65536, 0);
    let back = vol.read(2 * MIB - 100, vec![0u8; 200]).await.unwrap();
    assert_eq!(
        back,
        &expected.image()[(2 * MIB - 100) as usize..(2 * MIB + 100) as usize]
    );
    // the allocation map covers what was asked, from the offset asked
    let ext = vol.block_status(4095, 3 * MIB).await.unwrap();
    assert!(!ext.is_empty());
    assert!(
        ext.iter().map(|e| e.length).sum::<u64>() <= 3 * MIB,
        "{ext:?}"
    );
    vol.flush().await.unwrap();
    expected.check_device(&dev.path);
}

async fn migration_under_writes(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let size = 32 * MIB;
    let to = b.other();
    let src = Dev::new(b, dir.path(), "source", size, Content::Pattern);
    // the target holds other bytes: the copy must leave none of them
    let tgt = Dev::new(to, dir.path(), "target", size, Content::Byte(0x77));
    let expected = Expected::pattern(size, 0);
    let agent = InProcAgent::start(dir.path(), "agent").await;
    let vol = agent.serve("vol", &src.path, b.direct()).await;
    let w = Writer::nbd(
        &tokio::runtime::Handle::current(),
        agent.nbd_sock(),
        "vol",
        expected.clone(),
        WriterOpts::hot(8 * MIB).pause(Duration::from_micros(200)),
    );
    let t = std::time::Instant::now();
    while w.acked() < 20 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the writer does not write"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = w.acked();
    let master = InProcMaster::new(agent.agent.clone(), &dir.path().join("master"));
    let cfg = SessionConfig {
        bandwidth: 64 << 20,
        ..SessionConfig::default()
    };
    master.migrate("vol", &tgt.path, cfg).await.unwrap();
    let st = master.wait("vol").await;
    tokio::time::sleep(Duration::from_millis(100)).await; // writes on the target
    let written = w.finish().await;
    assert_eq!(
        st.phase,
        Phase::Completed,
        "{b:?} -> {to:?}: {:?}",
        st.error
    );
    assert_eq!(st.verified, Some(true));
    assert!(
        written.writes > before,
        "the writer ran through the migration ({} writes, {before} before it)",
        written.writes
    );
    assert_eq!(vol.active().path(), tgt.path.as_path());
    assert_eq!(vol.active().kind(), to.kind());
    expected.check_device(&tgt.path);
}

/// The suite for each backend: module `backend`, a test per case.
macro_rules! suite {
    ($($module:ident: $backend:expr;)*) => {$(
        mod $module {
            use super::*;

            #[test]
            fn roundtrip_kind_size_and_bounds() {
                super::roundtrip_kind_size_and_bounds($backend);
            }

            #[test]
            fn holes_and_segments() {
                super::holes_and_segments($backend);
            }

            #[test]
            fn trim_and_write_zeroes_leave_zeroes() {
                super::trim_and_write_zeroes_leave_zeroes($backend);
            }

            #[test]
            fn odd_offsets_read_back() {
                super::odd_offsets_read_back($backend);
            }

            #[test]
            fn concurrent_partial_writes_are_all_kept() {
                super::concurrent_partial_writes_are_all_kept($backend);
            }

            #[test]
            fn nowait_io() {
                super::nowait_io($backend);
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn interposer_io_at_odd_offsets() {
                super::interposer_io_at_odd_offsets($backend).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn migration_under_writes() {
                super::migration_under_writes($backend).await;
            }
        }
    )*};
}

suite! {
    file: Backend::File;
    file_direct: Backend::FileDirect;
    loop_device: Backend::Loop;
    loop_device_direct: Backend::LoopDirect;
}

/// Not a backend: opening what is none fails with a clear error.
#[test]
fn errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let err =
        BackingDevice::open(&dir.path().join("missing"), OpenMode::ReadWrite, false).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
    let err = BackingDevice::open(dir.path(), OpenMode::ReadOnly, false).unwrap_err();
    assert!(matches!(err, AgentError::NotADevice { .. }), "{err}");
}
