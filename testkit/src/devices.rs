//! Kernel devices and mounts a test sets up (root only): whatever happens,
//! none is left behind — each is undone on drop.

use std::path::{Path, PathBuf};

use crate::tools::{require_bin, retry, run};

/// Is `dir` a mount point now?
pub fn is_mountpoint(dir: &Path) -> bool {
    let Ok(dir) = dir.canonicalize() else {
        return false;
    };
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mounts.lines().any(|l| {
        l.split_whitespace()
            .nth(4)
            .is_some_and(|m| Path::new(m) == dir)
    })
}

/// The id of the topmost mount at `dir` (a mount made again gets a new
/// one), if `dir` is a mount point.
pub fn mount_id(dir: &Path) -> Option<u64> {
    let dir = dir.canonicalize().ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mounts
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(4)
                .is_some_and(|m| Path::new(m) == dir)
        })
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .next_back()
}

/// A loop device over a file (`losetup`, Debian package `mount`); detached
/// on drop.
pub struct LoopDev {
    dev: Option<PathBuf>,
}

impl LoopDev {
    pub fn attach(file: &Path) -> LoopDev {
        let out = run(
            &require_bin("losetup", "mount"),
            &[
                "--find",
                "--show",
                "--direct-io=off",
                file.to_str().unwrap(),
            ],
        );
        assert!(
            out.ok(),
            "losetup failed (loop devices need root):\n{}",
            out.text()
        );
        let dev = out.stdout.trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup said {dev:?}");
        LoopDev {
            dev: Some(dev.into()),
        }
    }

    pub fn path(&self) -> &Path {
        self.dev.as_deref().expect("the loop device was detached")
    }

    pub fn detach(&mut self) {
        if let Some(dev) = self.dev.take() {
            let d = dev.to_str().unwrap();
            assert!(retry("losetup", &["-d", d], 20), "losetup -d {d} failed");
        }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        if let Some(dev) = self.dev.take() {
            let _ = retry("losetup", &["-d", dev.to_str().unwrap_or_default()], 20);
        }
    }
}

/// A mounted filesystem; unmounted on drop.
pub struct Mount {
    dir: PathBuf,
    mounted: bool,
}

impl Mount {
    /// `mount [opts] source dir` (the directory is made if missing).
    pub fn new(source: &Path, dir: &Path, opts: &[&str]) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        let mut args: Vec<&str> = opts.to_vec();
        args.push(source.to_str().unwrap());
        args.push(dir.to_str().unwrap());
        let out = run(&require_bin("mount", "mount"), &args);
        assert!(out.ok(), "mount failed (needs root):\n{}", out.text());
        Mount {
            dir: dir.to_path_buf(),
            mounted: true,
        }
    }

    /// A tmpfs of `size` (e.g. "8m") at `dir`: a filesystem that runs out
    /// of space for real (ENOSPC from the kernel).
    pub fn tmpfs(dir: &Path, size: &str) -> Mount {
        Self::new(
            Path::new("tmpfs"),
            dir,
            &["-t", "tmpfs", "-o", &format!("size={size}")],
        )
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn unmount(&mut self) {
        if self.mounted {
            let d = self.dir.to_str().unwrap();
            let out = run(&require_bin("umount", "mount"), &[d]);
            if !out.ok() {
                // busy for a moment (a process just closed a file)?
                assert!(
                    retry("umount", &[d], 20),
                    "umount {d} failed:\n{}",
                    out.text()
                );
            }
            self.mounted = false;
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            let d = self.dir.to_str().unwrap_or_default().to_string();
            if !retry("umount", &[&d], 20) {
                let _ = retry("umount", &["-l", &d], 1);
            }
        }
    }
}

/// The FUSE connection of the mount at `dir` (its number in
/// /sys/fs/fuse/connections), if `dir` is a FUSE mount.
pub fn fuse_connection(dir: &Path) -> Option<u32> {
    let dir = dir.canonicalize().ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let fstype = l.split(" - ").nth(1)?.split_whitespace().next()?;
        (Path::new(f.get(4)?) == dir && fstype.starts_with("fuse"))
            .then(|| f[2].split_once(':')?.1.parse().ok())
            .flatten()
    })
}

/// Aborts a FUSE connection (its requests fail with ENOTCONN/EIO): what
/// frees a test whose threads wait on a server that is gone. Mounts
/// fusectl if needed.
pub fn fuse_abort(conn: u32) {
    let ctl = Path::new("/sys/fs/fuse/connections");
    if !ctl.join(conn.to_string()).exists() {
        let _ = run(
            &require_bin("mount", "mount"),
            &["-t", "fusectl", "none", ctl.to_str().unwrap()],
        );
    }
    let abort = ctl.join(conn.to_string()).join("abort");
    if let Err(e) = std::fs::write(&abort, "1") {
        eprintln!("cannot abort FUSE connection {conn}: {e}");
    }
}

/// Aborts the FUSE connection mounted at a directory if the test is not
/// done by a deadline (or is failing when this is dropped): a test that
/// hangs on a FUSE request must fail, not leave an unkillable process.
pub struct FuseWatchdog {
    done: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    conn: Option<u32>,
}

impl FuseWatchdog {
    /// Watches the FUSE mount at `dir` (mounted now) for `limit`.
    pub fn new(dir: &Path, limit: std::time::Duration) -> Self {
        let conn = fuse_connection(dir);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let thread = conn.map(|c| {
            std::thread::spawn(move || {
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                    eprintln!(
                        "FUSE watchdog: the test ran over {limit:?}; aborting FUSE connection {c}"
                    );
                    fuse_abort(c);
                }
            })
        });
        Self {
            done: Some(tx),
            thread,
            conn,
        }
    }
}

impl Drop for FuseWatchdog {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(c) = self.conn
        {
            fuse_abort(c);
        }
        drop(self.done.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Ends what an agent's FUSE mount at `mount` left behind (the agent is
/// gone): aborts the connection (so nothing waits on it), detaches the
/// loop devices on its files, unmounts it.
pub fn tear_down_fuse(mount: &Path) {
    let Some(conn) = fuse_connection(mount) else {
        return;
    };
    fuse_abort(conn);
    for lo in loops_under(mount) {
        let _ = retry("losetup", &["-d", lo.to_str().unwrap_or_default()], 4);
    }
    let _ = retry("umount", &["-l", mount.to_str().unwrap_or_default()], 4);
}

/// The loop devices whose backing files are under `dir`.
pub fn loops_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.starts_with("loop").then_some(())?;
            let f = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
            Path::new(f.trim())
                .starts_with(dir)
                .then(|| PathBuf::from(format!("/dev/{name}")))
        })
        .collect()
}

/// A block device's device number (`st_rdev`).
pub fn rdev(dev: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dev)
        .unwrap_or_else(|e| panic!("stat {}: {e}", dev.display()))
        .rdev()
}

/// A mount as /proc/self/mountinfo shows it: its id and device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountIdentity {
    pub id: u64,
    /// `major:minor` of the mounted device.
    pub dev: String,
    pub source: String,
}

/// The mount on top at `dir` now.
pub fn mount_identity(dir: &Path) -> Option<MountIdentity> {
    let dir = dir.canonicalize().ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (Path::new(f.get(4)?) == dir).then_some(())?;
        let source = l
            .split(" - ")
            .nth(1)?
            .split_whitespace()
            .nth(1)?
            .to_string();
        Some(MountIdentity {
            id: f[0].parse().ok()?,
            dev: f[2].to_string(),
            source,
        })
    })
}

/// `mkfs.ext4 -q -F` (Debian package `e2fsprogs`).
pub fn mkfs_ext4(dev: &Path) {
    let out = run(
        &require_bin("mkfs.ext4", "e2fsprogs"),
        &["-q", "-F", dev.to_str().unwrap()],
    );
    assert!(out.ok(), "mkfs.ext4 failed:\n{}", out.text());
}

/// `e2fsck -fn` finds the filesystem in `image` clean.
pub fn assert_fsck_clean(image: &Path) {
    let out = run(
        &require_bin("e2fsck", "e2fsprogs"),
        &["-fn", image.to_str().unwrap()],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "e2fsck finds {} unclean:\n{}",
        image.display(),
        out.text()
    );
}
