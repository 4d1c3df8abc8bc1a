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

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use volmig_testkit::agent::AgentProcess;
use volmig_testkit::devices::{LoopDev, Mount, is_mountpoint};
use volmig_testkit::fswriter::{FileWriter, FileWriterOpts, check_tree};
use volmig_testkit::pattern::sparse_file;
use volmig_testkit::tools::retry;
use volmig_testkit::{MIB, require_bin, require_fuse, require_root, run, wait_until};

const MIGRATION_TIMEOUT: Duration = Duration::from_secs(900);

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

    let mut w = FileWriter::start(&mnt, FileWriterOpts::default());
    // some files exist before the migration starts
    w.wait_syncs(2, Duration::from_secs(300));

    let mut m = agent.migrate("vol", &tgt, &["--bandwidth", "64Mi"]);
    let st = m.wait_terminal(MIGRATION_TIMEOUT);
    let ops_at_cutover = w.ops();
    let syncs_at_cutover = w.syncs();
    // keep writing on the target for a few syncs
    w.wait_syncs(syncs_at_cutover + 4, Duration::from_secs(300));
    let total_ops = w.ops();
    let model = w.stop();
    agent.assert_completed(&st);
    assert_eq!(agent.active_path("vol"), tgt);
    assert!(
        syncs_at_cutover >= 2,
        "too few writes before the cutover ({ops_at_cutover} ops)"
    );

    // Through the mount (the page cache, backed by the target now).
    assert!(Command::new("sync").status().unwrap().success());
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
