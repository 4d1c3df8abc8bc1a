//! System tests of the agent's kernel block devices (FUSE + loop): what a
//! pod's filesystem sits on.
//!
//! - ext4 on the device of a served volume, written by a file writer and by
//!   fio (crc32c verify) while the volume migrates live to another file:
//!   afterwards the device and the mount are the same objects, every file
//!   reads back right, the device reads what the target holds, the target
//!   file alone is a clean filesystem, and the device is not removed while
//!   mounted. Once with O_DIRECT backing, once buffered (large reads are
//!   then spliced from the backing file: the agent's metrics count them).
//! - The agent SIGKILLed and started again (with the descriptor keeper)
//!   under that mounted, written filesystem, once idle and once in the
//!   middle of a migration: the writers (fdatasync included) see no error,
//!   nothing is lost, the migration completes.
//! - Large reads (spliced from buffered backing) through a live
//!   migration: each returns the volume's data, before and after the
//!   cutover.
//! - Memory pressure: a writer filling a memory cgroup with dirty pages of
//!   ext4 on the device, the agent in the same cgroup (O_DIRECT backing):
//!   it completes, no deadlock.
//!
//! Root, /dev/fuse and loop devices needed; missing tools fail the test
//! with the Debian package to install. A FUSE watchdog aborts the
//! connection of a test that hangs (it fails instead of wedging).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use volmig_api::ErrorKind;
use volmig_api::io::BlockKind;
use volmig_testkit::agent::AgentProcess;
use volmig_testkit::cgroup::MemCgroup;
use volmig_testkit::devices::{
    FuseWatchdog, Mount, assert_fsck_clean, loops_under, mkfs_ext4, mount_identity, rdev,
};
use volmig_testkit::fio::FioLoop;
use volmig_testkit::fswriter::{FileWriter, FileWriterOpts, check_tree};
use volmig_testkit::keeper::KeeperProcess;
use volmig_testkit::pattern::{pattern, pattern_file, sparse_file};
use volmig_testkit::tools::run_cmd;
use volmig_testkit::{MIB, require_bin, require_fuse, require_root};

const SIZE: u64 = 512 * MIB;
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(240);
/// A hung test is aborted after this (see the module docs), before
/// nextest's limit (five minutes) kills it and leaves its mounts behind.
const WATCHDOG: Duration = Duration::from_secs(270);

fn require_tools() {
    require_root("it mounts filesystems on loop devices over FUSE");
    require_fuse();
    for (bin, pkg) in [
        ("losetup", "mount"),
        ("mount", "mount"),
        ("umount", "mount"),
        ("mkfs.ext4", "e2fsprogs"),
        ("e2fsck", "e2fsprogs"),
        ("fio", "fio"),
        ("sync", "coreutils"),
        ("dd", "coreutils"),
    ] {
        require_bin(bin, pkg);
    }
}

fn sync() {
    assert!(
        Command::new("sync").status().unwrap().success(),
        "sync failed"
    );
}

/// A volume of `size` served as a kernel block device with O_DIRECT
/// backing, ext4 made on it and mounted at `<dir>/mnt`.
fn block_ext4(agent: &AgentProcess, dir: &Path, backing: &Path) -> (std::path::PathBuf, Mount) {
    block_ext4_with(agent, dir, backing, true)
}

fn block_ext4_with(
    agent: &AgentProcess,
    dir: &Path,
    backing: &Path,
    direct: bool,
) -> (std::path::PathBuf, Mount) {
    let v = agent.serve_block("vol", backing, direct);
    assert_eq!(v.device_kind, Some(BlockKind::FuseLoop));
    let dev = v.device.unwrap();
    assert!(dev.to_string_lossy().starts_with("/dev/loop"), "{dev:?}");
    mkfs_ext4(&dev);
    let mnt = dir.join("mnt");
    let fs = Mount::new(&dev, &mnt, &[]);
    (dev, fs)
}

#[test]
fn ext4_on_a_block_device_of_the_agent_migrates_live() {
    ext4_migrates_live(true);
}

/// Buffered backing: large reads are spliced from the backing file, and
/// after the cutover from the target's.
#[test]
fn ext4_on_a_block_device_with_buffered_backing_migrates_live() {
    ext4_migrates_live(false);
}

/// The agent's count of READs spliced from the backing file.
fn spliced(agent: &AgentProcess) -> f64 {
    agent
        .metric("volmig_agent_fuse_spliced_reads_total")
        .expect("the FUSE driver's counters are exported")
}

/// [`spliced`] once it is at least `want`, or after a few seconds: a
/// worker counts an answer after the kernel took it, so the count may
/// trail the reader by a moment.
fn spliced_at_least(agent: &AgentProcess, want: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = spliced(agent);
        if now >= want || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `len` bytes of `path` from `offset`, read with O_DIRECT in 1 MiB reads.
fn read_direct(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    // An aligned buffer: a page-aligned 1 MiB slice of a larger one.
    let mut raw = vec![0u8; MIB as usize + 4096];
    let skew = raw.as_ptr().align_offset(4096);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let n = (len - out.len()).min(MIB as usize);
        let buf = &mut raw[skew..skew + n];
        f.read_exact_at(buf, offset + out.len() as u64).unwrap();
        out.extend_from_slice(buf);
    }
    out
}

fn ext4_migrates_live(direct: bool) {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let (src, tgt) = (dir.path().join("source.img"), dir.path().join("target.img"));
    sparse_file(&src, SIZE);
    sparse_file(&tgt, SIZE);
    let agent = AgentProcess::builder(dir.path(), "agent")
        .block()
        .metrics()
        .start();
    let (dev, mut fs) = block_ext4_with(&agent, dir.path(), &src, direct);
    let _watchdog = FuseWatchdog::new(&agent.fuse_mount(), WATCHDOG);
    let mnt = fs.dir().to_path_buf();
    let (dev_before, mount_before) = (rdev(&dev), mount_identity(&mnt).unwrap());

    let mut w = FileWriter::start(&mnt.join("files"), FileWriterOpts::default());
    let fio = FioLoop::start(&mnt.join("fio"), "32M");
    w.wait_syncs(2, Duration::from_secs(300));
    let mut m = agent.migrate("vol", &tgt, &["--bandwidth", "64Mi"]);
    let st = m.wait_terminal(MIGRATION_TIMEOUT);
    // Keep writing on the target for a while.
    w.wait_syncs(w.syncs() + 3, Duration::from_secs(300));
    let model = w.stop();
    let passes = fio.stop();
    agent.assert_completed(&st);
    assert_eq!(agent.active_path("vol"), tgt);
    assert!(passes >= 1, "fio completed no verified pass");

    // The same device and the same mount, never remounted.
    assert_eq!(agent.device("vol"), dev);
    assert_eq!(rdev(&dev), dev_before, "the device changed");
    assert_eq!(
        mount_identity(&mnt).unwrap(),
        mount_before,
        "the filesystem was remounted"
    );
    sync();
    let (files, bytes) = check_tree(&mnt.join("files"), &model, "through the mount");
    eprintln!(
        "{files} files / {bytes} bytes, {passes} fio passes; copied {} bytes, stall {} ms",
        st["bytes_copied"], st["cutover_stall_ms"]
    );

    // Mounted: the device is not removed, nothing changes.
    let e = agent.unserve("vol").unwrap_err();
    assert_eq!(e.kind, ErrorKind::InUse, "{e}");
    assert!(e.message.contains("unmount"), "{e}");
    assert_eq!(agent.device("vol"), dev, "still served");
    assert!(mount_identity(&mnt).is_some());

    fs.unmount();
    // Unmounted, still served: what the device reads is the target's
    // (1 MiB direct reads: spliced from the target file when the backing
    // is buffered).
    let before = spliced(&agent);
    let head = 32 * MIB as usize;
    let through_device = read_direct(&dev, 0, head);
    let mut on_target = vec![0u8; head];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(&tgt).unwrap(),
        &mut on_target,
        0,
    )
    .unwrap();
    assert!(
        through_device == on_target,
        "the device does not read what the target holds"
    );
    if direct {
        assert_eq!(
            spliced(&agent),
            before,
            "O_DIRECT backing: reads are copied"
        );
    } else {
        let now = spliced_at_least(&agent, before + 64.0);
        assert!(
            now >= before + 64.0,
            "32 MiB in 512 KiB requests: spliced {before} -> {now}"
        );
    }
    assert!(agent.unserve("vol").unwrap().was_served);
    assert!(
        loops_under(&agent.fuse_mount()).is_empty(),
        "the loop device is free"
    );
    let mut agent = agent;
    agent.stop();

    // The target alone: a clean filesystem holding every file.
    assert_fsck_clean(&tgt);
    let ro = dir.path().join("ro");
    let mut ro_mount = Mount::new(&tgt, &ro, &["-o", "ro,loop"]);
    assert_eq!(
        check_tree(&ro.join("files"), &model, "straight from the target"),
        (files, bytes)
    );
    ro_mount.unmount();
}

/// Large reads of a volume on buffered backing (spliced from the backing
/// file) running through a live migration: every read returns the
/// volume's data, from the source before the cutover and from the target
/// after it, and the agent's metrics count them spliced.
#[test]
fn spliced_reads_through_a_cutover_return_the_volumes_data() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let size = 128 * MIB;
    let (src, tgt) = (dir.path().join("source.img"), dir.path().join("target.img"));
    pattern_file(&src, size, 5);
    sparse_file(&tgt, size);
    let agent = AgentProcess::builder(dir.path(), "agent")
        .block()
        .metrics()
        .start();
    let dev = agent.serve_block("vol", &src, false).device.unwrap();
    let _watchdog = FuseWatchdog::new(&agent.fuse_mount(), WATCHDOG);
    let before = spliced(&agent);
    // Cold: the first reads of each range splice from the disk.
    {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(&src).unwrap();
        // SAFETY: an advice call on a descriptor we own.
        let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(r, 0, "posix_fadvise");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (dev, stop, reads) = (dev.clone(), stop.clone(), reads.clone());
        std::thread::spawn(move || {
            // 1 MiB, 512 KiB and 300 KiB reads at 512-byte aligned offsets.
            let mut x: u64 = 0x9E37_79B9;
            while !stop.load(Ordering::Relaxed) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let len = [MIB as usize, 512 << 10, 300 << 10][(x >> 60) as usize % 3];
                let off = (x >> 20) % ((size - MIB) / 512) * 512;
                if read_direct(&dev, off, len) != pattern(off, len, 5) {
                    return Err((off, len));
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    };
    let wait_reads = |n: u64| {
        let deadline = Instant::now() + Duration::from_secs(120);
        while reads.load(Ordering::Relaxed) < n && !reader.is_finished() {
            assert!(Instant::now() < deadline, "the reader is stuck");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_reads(20);
    let mut m = agent.migrate("vol", &tgt, &["--bandwidth", "32Mi"]);
    let st = m.wait_terminal(MIGRATION_TIMEOUT);
    let during = reads.load(Ordering::Relaxed);
    wait_reads(during + 20);
    stop.store(true, Ordering::Relaxed);
    let result = reader.join().unwrap();
    assert_eq!(result, Ok(()), "a read returned other data");
    agent.assert_completed(&st);
    assert_eq!(agent.active_path("vol"), tgt);
    let n = reads.load(Ordering::Relaxed);
    assert!(
        during >= 40,
        "only {during} reads before the migration ended (test not meaningful)"
    );
    let now = spliced_at_least(&agent, before + n as f64);
    assert!(
        now - before >= n as f64,
        "{n} reads of 300 KiB and more, {} spliced",
        now - before
    );
    eprintln!("{n} reads, {during} of them before the migration ended");
}

/// SIGKILL, a moment down, start again: the restarted agent serves the
/// device again from the keeper's descriptors. Its FUSE workers read the
/// requests queued meanwhile for a while before it goes on (see
/// [`assert_each_request_served_once`]).
fn restart(agent: &mut AgentProcess, how: Stop) -> Duration {
    let t = Instant::now();
    match how {
        Stop::Kill => {
            agent.kill();
        }
        Stop::Term => {
            let st = agent.stop().expect("the agent was running");
            assert!(st.success(), "SIGTERM: the agent exited with {st:?}");
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    agent.start_again(&[(
        "VOLMIG_FAULT_DELAY",
        volmig_testkit::agent::WORKERS_READ_FIRST,
    )]);
    t.elapsed()
}

/// How the agent goes down before it starts again.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// A crash.
    Kill,
    /// What kubelet does to a container whose image changed (an upgrade
    /// in place, `kubectl volmig upgrade-agents`): SIGTERM, the agent
    /// finishes what it has in flight and exits.
    Term,
}

fn restart_under_a_mounted_filesystem(mid_migration: bool, how: Stop) {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let (src, tgt) = (dir.path().join("source.img"), dir.path().join("target.img"));
    sparse_file(&src, SIZE);
    sparse_file(&tgt, SIZE);
    let keeper = KeeperProcess::start(dir.path());
    let mut agent = AgentProcess::builder(dir.path(), "agent")
        .block()
        .keeper(&keeper)
        .start();
    let (dev, mut fs) = block_ext4(&agent, dir.path(), &src);
    let _watchdog = FuseWatchdog::new(&agent.fuse_mount(), WATCHDOG);
    let mnt = fs.dir().to_path_buf();
    let (dev_before, mount_before) = (rdev(&dev), mount_identity(&mnt).unwrap());
    let opts = FileWriterOpts {
        datasync: true,
        ..FileWriterOpts::default()
    };
    let mut w = FileWriter::start(&mnt.join("files"), opts);
    let fio = FioLoop::start(&mnt.join("fio"), "16M");
    w.wait_ops(30, Duration::from_secs(300));

    let down = if mid_migration {
        let mut m = agent.migrate("vol", &tgt, &["--bandwidth", "16Mi"]);
        let master = agent.master();
        let at = master.wait_record("vol", "copying", |r| {
            r["bytes_copied"].as_u64().unwrap_or(0) > 0 || r["phase"] == "Refreshing"
        });
        assert!(
            matches!(at["phase"].as_str(), Some("Copying" | "Refreshing")),
            "the session went past copying before the kill: {at}"
        );
        let down = restart(&mut agent, how);
        w.wait_ops(30, Duration::from_secs(300));
        let st = m.wait_terminal(MIGRATION_TIMEOUT);
        agent.assert_completed(&st);
        assert_eq!(agent.active_path("vol"), tgt);
        assert!(
            agent.session_state(&st).resumes >= 1,
            "the session resumed after the restart"
        );
        down
    } else {
        let down = restart(&mut agent, how);
        w.wait_ops(30, Duration::from_secs(300));
        down
    };
    let passes = fio.stop();
    let stall = w.max_latency();
    let model = w.stop();
    eprintln!(
        "agent down {down:?}; the writer's slowest operation {stall:?}; {passes} fio passes, \
         {} files",
        model.len()
    );
    assert!(
        agent
            .log_text()
            .contains("took the FUSE connection back from the keeper"),
        "{}",
        agent.log_text()
    );
    agent.assert_each_request_served_once();
    assert_eq!(agent.device("vol"), dev);
    assert_eq!(rdev(&dev), dev_before, "the device changed");
    assert_eq!(
        mount_identity(&mnt).unwrap(),
        mount_before,
        "the filesystem was remounted"
    );
    sync();
    check_tree(&mnt.join("files"), &model, "through the mount");
    fs.unmount();
    assert!(agent.unserve("vol").unwrap().was_served);
    agent.stop();
    let image = if mid_migration { &tgt } else { &src };
    assert_fsck_clean(image);
    let ro = dir.path().join("ro");
    let mut ro_mount = Mount::new(image, &ro, &["-o", "ro,loop"]);
    check_tree(&ro.join("files"), &model, "straight from the backing file");
    ro_mount.unmount();
    drop(keeper);
}

#[test]
fn an_agent_restart_under_a_mounted_filesystem_is_a_stall() {
    restart_under_a_mounted_filesystem(false, Stop::Kill);
}

#[test]
fn an_agent_restart_in_the_middle_of_a_migration_is_a_stall() {
    restart_under_a_mounted_filesystem(true, Stop::Kill);
}

/// An upgrade in place: kubelet stops the agent container with SIGTERM and
/// starts the new image in the same pod, beside the same keeper.
#[test]
fn an_agent_stopped_and_started_again_under_a_mounted_filesystem_is_a_stall() {
    restart_under_a_mounted_filesystem(false, Stop::Term);
}

/// The same in the middle of a migration: the session resumes.
#[test]
fn an_agent_stopped_and_started_again_in_the_middle_of_a_migration_is_a_stall() {
    restart_under_a_mounted_filesystem(true, Stop::Term);
}

#[test]
fn dirty_pages_filling_a_memory_cgroup_do_not_deadlock_the_device() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("source.img");
    sparse_file(&src, 2048 * MIB);
    let agent = AgentProcess::builder(dir.path(), "agent").block().start();
    // The agent and the writer share one memory cgroup: reclaim for the
    // writer's dirty pages runs while the agent serves their writeback.
    let cg = MemCgroup::create("volmig-mem", 256 * MIB);
    cg.add(agent.pid());
    let (_dev, mut fs) = block_ext4(&agent, dir.path(), &src);
    let _watchdog = FuseWatchdog::new(&agent.fuse_mount(), Duration::from_secs(200));
    let mnt = fs.dir().to_path_buf();
    let t = Instant::now();
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!(
        "echo $$ > {procs} && dd if=/dev/zero of={file} bs=1M count=1200 status=none && sync",
        procs = cg.path().join("cgroup.procs").display(),
        file = mnt.join("big").display(),
    ));
    // A deadlock shows as this command never ending (then the watchdog
    // frees the mount).
    let out = run_cmd(cmd, Duration::from_secs(180));
    assert!(out.ok(), "the writer failed:\n{}", out.text());
    eprintln!(
        "1200 MiB written and synced in {:?} inside a 256 MiB memory cgroup (limit hit {} times, peak {} MiB)",
        t.elapsed(),
        cg.limit_hits(),
        cg.peak() / MIB
    );
    assert!(
        cg.limit_hits() > 0,
        "the writer never reached the cgroup's limit: no pressure was tested"
    );
    assert_eq!(
        std::fs::metadata(mnt.join("big")).unwrap().len(),
        1200 * MIB
    );
    fs.unmount();
    assert!(agent.unserve("vol").unwrap().was_served);
    let mut agent = agent;
    agent.stop();
    drop(cg);
    assert_fsck_clean(&src);
}
