#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! The FUSE + loop block driver with real kernel devices (root, /dev/fuse,
//! loop devices): a volume in memory becomes /dev/loopN; reads, writes,
//! flushes, discards and zeroing through the device reach the volume; a
//! device in use is not detached; the device grows with the volume; large
//! reads are spliced from a volume that offers a descriptor; and a
//! driver that stops and starts again with a descriptor keeper serves the
//! same device, the workload's I/O waiting meanwhile.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use volmig_frontends::block::fuse::{FuseLoop, FuseOptions};
use volmig_frontends::block::keeper::KeeperServer;
use volmig_frontends::block::loopdev::Loop;
use volmig_frontends::block::{BlockDriver, BlockErrorKind, BlockKind};
use volmig_testkit::devices::FuseWatchdog;
use volmig_testkit::mem::MemVolume;
use volmig_testkit::{fill, require_fuse, require_root};

const MIB: u64 = 1 << 20;
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// A 4 KiB-aligned buffer for O_DIRECT.
struct Aligned {
    v: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let v = vec![0u8; len + 4096];
        let off = (4096 - v.as_ptr() as usize % 4096) % 4096;
        Self { v, off, len }
    }
    fn get(&mut self) -> &mut [u8] {
        &mut self.v[self.off..self.off + self.len]
    }
}

fn open_direct(dev: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .unwrap_or_else(|e| panic!("opening {}: {e}", dev.display()))
}

fn range_ioctl(f: &File, op: libc::c_ulong, off: u64, len: u64) {
    let range = [off, len];
    // SAFETY: the block range ioctls read two u64s from the pointer.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), op, range.as_ptr()) };
    assert_eq!(r, 0, "ioctl {op:#x}: {}", std::io::Error::last_os_error());
}

fn pattern(len: usize, generation: u32) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill(&mut v, 0, generation);
    v
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// A driver started with `opts`, and a watchdog on its mount.
async fn start(opts: FuseOptions) -> (FuseLoop<MemVolume>, FuseWatchdog) {
    let mnt = opts.mount.clone();
    let driver = FuseLoop::<MemVolume>::start(opts).await.unwrap();
    (driver, FuseWatchdog::new(&mnt, Duration::from_secs(120)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_becomes_a_loop_device_and_every_request_reaches_it() {
    require_root("it mounts FUSE and attaches loop devices");
    require_fuse();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("fuse");
    let (driver, _watchdog) = start(FuseOptions::new(&mnt)).await;
    let params = driver.params().expect("INIT answered");
    assert_eq!(
        (params.max_write, params.max_pages),
        (MIB as u32 / 2, 128),
        "512 KiB requests: a spliced answer fits a pipe"
    );

    let vol = Arc::new(MemVolume::with_data(pattern(64 * MIB as usize, 1), true));
    let att = driver.attach("vol", vol.clone()).await.unwrap();
    assert_eq!(att.record.kind, BlockKind::FuseLoop);
    assert_eq!(att.record.path, att.path);
    let lo = Loop::from_path(&att.path).expect("a /dev/loopN");
    assert!(lo.dio(), "loop runs with direct I/O");
    assert_eq!(lo.size().unwrap(), 64 * MIB);
    assert_eq!(lo.backing_file().unwrap(), mnt.join("vol"));
    let again = driver.attach("vol", vol.clone()).await.unwrap_err();
    assert!(again.kind() == BlockErrorKind::AlreadyAttached, "{again}");

    let dev = att.path.clone();
    let vol2 = vol.clone();
    blocking(move || {
        let f = open_direct(&dev);
        // Reads: small and 1 MiB, what the volume holds.
        let mut b = Aligned::new(MIB as usize);
        f.read_exact_at(&mut b.get()[..4096], 12 * MIB).unwrap();
        assert_eq!(&b.get()[..4096], &vol2.bytes(12 * MIB, 4096)[..]);
        f.read_exact_at(b.get(), 3 * MIB).unwrap();
        assert_eq!(b.get(), &vol2.bytes(3 * MIB, MIB as usize)[..]);
        // Writes land in the volume; fsync flushes it.
        let data = pattern(MIB as usize, 7);
        b.get().copy_from_slice(&data);
        f.write_all_at(b.get(), 5 * MIB + 4096).unwrap();
        f.sync_all().unwrap();
        assert_eq!(vol2.bytes(5 * MIB + 4096, MIB as usize), data);
        assert!(
            vol2.counters.flushes.load(Ordering::Relaxed) >= 1,
            "fsync reached the volume"
        );
        // Discard and zero-out become trim and write_zeroes.
        range_ioctl(&f, BLKDISCARD, 8 * MIB, MIB);
        assert!(
            vol2.counters.trims.load(Ordering::Relaxed) >= 1,
            "discard reached the volume"
        );
        assert_eq!(vol2.bytes(8 * MIB, MIB as usize), vec![0; MIB as usize]);
        range_ioctl(&f, BLKZEROOUT, 10 * MIB, 64 * 1024);
        assert_eq!(vol2.bytes(10 * MIB, 64 * 1024), vec![0; 64 * 1024]);
        f.read_exact_at(&mut b.get()[..4096], 10 * MIB).unwrap();
        assert_eq!(&b.get()[..4096], &[0; 4096][..]);
    })
    .await;

    // A device in use (a mount holds it exclusively) is not detached.
    let held = {
        let dev = att.path.clone();
        blocking(move || {
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_EXCL)
                .open(dev)
                .unwrap()
        })
        .await
    };
    let e = driver.detach("vol").await.unwrap_err();
    assert!(e.is_busy(), "{e}");
    assert_eq!(
        lo.backing_file().unwrap(),
        mnt.join("vol"),
        "still attached"
    );
    // So is one that someone merely has open.
    drop(held);
    let open = {
        let dev = att.path.clone();
        blocking(move || File::open(dev).unwrap()).await
    };
    let e = driver.detach("vol").await.unwrap_err();
    assert!(e.is_busy(), "{e}");
    let st = lo.status().expect("still bound");
    assert_eq!(st.lo_flags & 4, 0, "not left to clear itself on last close");
    drop(open);

    // The device grows with the volume.
    vol.grow(96 * MIB);
    driver.resize("vol", 96 * MIB).await.unwrap();
    assert_eq!(lo.size().unwrap(), 96 * MIB);
    {
        let dev = att.path.clone();
        let vol = vol.clone();
        blocking(move || {
            let f = open_direct(&dev);
            let mut b = Aligned::new(4096);
            b.get().copy_from_slice(&pattern(4096, 9));
            f.write_all_at(b.get(), 95 * MIB).unwrap();
            assert_eq!(vol.bytes(95 * MIB, 4096), pattern(4096, 9));
        })
        .await;
    }

    driver.detach("vol").await.unwrap();
    assert_eq!(lo.backing_file(), None, "the loop device is free");
    assert!(!mnt.join("vol").exists(), "the volume's file is gone");
    let e = driver.detach("vol").await.unwrap_err();
    assert!(e.kind() == BlockErrorKind::NotAttached, "{e}");
    driver.unmount().await.unwrap();
    assert!(
        volmig_frontends::block::fuse::dev::find_mount(&mnt).is_none(),
        "unmounted"
    );
}

/// Large reads are answered by splicing from the volume's descriptor (one
/// copy instead of two); small ones, and volumes that offer no descriptor,
/// the buffered way; the data is the volume's either way, writes included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_reads_are_spliced_from_the_volumes_descriptor() {
    require_root("it mounts FUSE and attaches loop devices");
    require_fuse();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("fuse");
    let (driver, _watchdog) = start(FuseOptions::new(&mnt)).await;
    let vol = Arc::new(MemVolume::with_data(pattern(16 * MIB as usize, 3), true).offering_fd());
    let att = driver.attach("vol", vol.clone()).await.unwrap();
    let dev = att.path.clone();
    let vol2 = vol.clone();
    blocking(move || {
        let f = open_direct(&dev);
        let mut b = Aligned::new(MIB as usize);
        // 1 MiB: two 512 KiB requests (or more), spliced.
        f.read_exact_at(b.get(), 3 * MIB).unwrap();
        assert_eq!(b.get(), &vol2.bytes(3 * MIB, MIB as usize)[..]);
        // Not on a page boundary (the answer spans one page more).
        f.read_exact_at(&mut b.get()[..256 << 10], 5 * MIB + 512)
            .unwrap();
        assert_eq!(
            &b.get()[..256 << 10],
            &vol2.bytes(5 * MIB + 512, 256 << 10)[..]
        );
        // (Counted by range, at least: udev may probe the new device
        // meanwhile, and the kernel may cut a read into more requests.)
        assert!(vol2.fd_reads_in(3 * MIB, 4 * MIB) >= 2);
        assert!(vol2.fd_reads_in(5 * MIB, 6 * MIB) >= 1);
        // A small read is copied.
        f.read_exact_at(&mut b.get()[..4096], 7 * MIB).unwrap();
        assert_eq!(&b.get()[..4096], &vol2.bytes(7 * MIB, 4096)[..]);
        assert_eq!(vol2.fd_reads_in(7 * MIB, 8 * MIB), 0, "4 KiB: copied");
        // What was written is what a spliced read returns.
        let data = pattern(MIB as usize, 8);
        b.get().copy_from_slice(&data);
        f.write_all_at(b.get(), 9 * MIB).unwrap();
        b.get().fill(0);
        f.read_exact_at(b.get(), 9 * MIB).unwrap();
        assert_eq!(b.get(), &data[..]);
        assert!(vol2.fd_reads_in(9 * MIB, 10 * MIB) >= 2);
    })
    .await;
    // A worker counts its answer after the kernel took it (and the reader
    // may have gone on already).
    let spliced = || driver.stats().spliced.load(Ordering::Relaxed);
    for _ in 0..500 {
        if spliced() >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(spliced() >= 5, "every large read spliced: {}", spliced());

    // A volume with no descriptor to offer: the same reads, copied.
    let plain = Arc::new(MemVolume::with_data(pattern(4 * MIB as usize, 4), true));
    let att2 = driver.attach("plain", plain.clone()).await.unwrap();
    let dev = att2.path.clone();
    let plain2 = plain.clone();
    blocking(move || {
        let f = open_direct(&dev);
        let mut b = Aligned::new(MIB as usize);
        f.read_exact_at(b.get(), MIB).unwrap();
        assert_eq!(b.get(), &plain2.bytes(MIB, MIB as usize)[..]);
    })
    .await;
    // Every splice came from the descriptor of `vol`: none from `plain`.
    let fd_reads = vol.counters.fd_reads.load(Ordering::Relaxed);
    assert!(
        driver.stats().spliced.load(Ordering::Relaxed) <= fd_reads,
        "a read of a volume without a descriptor was spliced"
    );
    assert!(plain.counters.reads.load(Ordering::Relaxed) > 0);

    driver.detach("plain").await.unwrap();
    driver.detach("vol").await.unwrap();
    driver.unmount().await.unwrap();
}

/// A keeper on a thread of this process (it serves forever; the thread
/// ends with the test process).
fn keeper(dir: &Path) -> PathBuf {
    let path = dir.join("keeper.sock");
    let mut k = KeeperServer::bind(&path).unwrap();
    std::thread::spawn(move || {
        loop {
            let _ = k.serve_one();
        }
    });
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_started_again_with_a_keeper_serves_the_same_device() {
    require_root("it mounts FUSE and attaches loop devices");
    require_fuse();
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("info")
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("fuse");
    let mut opts = FuseOptions::new(&mnt);
    opts.keeper = Some(keeper(dir.path()));
    opts.workers = 3;

    let vol = Arc::new(MemVolume::new(32 * MIB));
    let (first, _watchdog) = start(opts.clone()).await;
    assert!(!first.adopted());
    let att = first.attach("vol", vol.clone()).await.unwrap();
    let dev = att.path.clone();
    let f = Arc::new(blocking(move || open_direct(&dev)).await);
    {
        let f = f.clone();
        blocking(move || {
            let mut b = Aligned::new(4096);
            b.get().copy_from_slice(&pattern(4096, 1));
            f.write_all_at(b.get(), 0).unwrap();
        })
        .await;
    }
    // The agent stops (SIGTERM): its workers stop while the process is
    // still there, and serve nothing more; the keeper holds the connection.
    first.suspend().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The workload writes meanwhile: the write waits.
    let writing = {
        let f = f.clone();
        std::thread::spawn(move || {
            let mut b = Aligned::new(4096);
            b.get().copy_from_slice(&pattern(4096, 2));
            f.write_all_at(b.get(), 8192).unwrap();
            f.sync_data().unwrap();
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !writing.is_finished(),
        "a suspended driver serves nothing: the write waits"
    );
    // The process goes away.
    drop(first);

    let second = FuseLoop::<MemVolume>::start(opts).await.unwrap();
    assert!(second.adopted(), "the connection came back from the keeper");
    let again = second.reattach(&att.record, vol.clone()).await.unwrap();
    assert_eq!(again.path, att.path, "the same device");
    second.restored();
    blocking(move || writing.join().unwrap()).await;
    assert_eq!(vol.bytes(0, 4096), pattern(4096, 1));
    assert_eq!(
        vol.bytes(8192, 4096),
        pattern(4096, 2),
        "the waiting write landed"
    );
    // A record of another connection or device is refused.
    let mut forged = att.record.clone();
    forged.detail["conn_dev"] = serde_json::json!(1);
    forged.volume = "other".into();
    let e = second.reattach(&forged, vol.clone()).await.unwrap_err();
    assert!(e.kind() == BlockErrorKind::Gone, "{e}");

    drop(f);
    second.detach("vol").await.unwrap();
    second.unmount().await.unwrap();
}
