//! A memory cgroup for a test (root only): a child of this process's own
//! memory cgroup, on cgroup v1 (`memory.limit_in_bytes`) or v2
//! (`memory.max`), whichever this machine has. Processes put in it are
//! moved back out and the group removed on drop. A machine without a
//! memory controller fails the test, saying so.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// A memory cgroup with a limit.
pub struct MemCgroup {
    dir: PathBuf,
    parent: PathBuf,
    v2: bool,
}

/// Where this process's memory cgroup is: (directory, v2?).
fn own_memory_cgroup() -> Option<(PathBuf, bool)> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount_of = |want_v2: bool| {
        mounts.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let tail: Vec<&str> = l.split(" - ").nth(1)?.split_whitespace().collect();
            let ok = if want_v2 {
                tail.first() == Some(&"cgroup2")
            } else {
                tail.first() == Some(&"cgroup") && tail.get(2)?.split(',').any(|o| o == "memory")
            };
            // The mount's root inside the hierarchy, and where it is.
            ok.then(|| (f[3].to_string(), PathBuf::from(f[4])))
        })
    };
    // v1: "N:memory:/path"
    if let Some(rel) = cg.lines().find_map(|l| {
        let mut p = l.splitn(3, ':');
        let (_, ctl, path) = (p.next()?, p.next()?, p.next()?);
        ctl.split(',')
            .any(|c| c == "memory")
            .then(|| path.to_string())
    }) && let Some((root, at)) = mount_of(false)
    {
        let rel = rel
            .strip_prefix(&root)
            .unwrap_or(&rel)
            .trim_start_matches('/');
        return Some((at.join(rel), false));
    }
    // v2: "0::/path", with the memory controller enabled there.
    let rel = cg.lines().find_map(|l| l.strip_prefix("0::"))?.to_string();
    let (root, at) = mount_of(true)?;
    let rel = rel
        .strip_prefix(&root)
        .unwrap_or(&rel)
        .trim_start_matches('/');
    let dir = at.join(rel);
    let ctl = std::fs::read_to_string(dir.join("cgroup.controllers")).ok()?;
    ctl.split_whitespace()
        .any(|c| c == "memory")
        .then_some((dir, true))
}

fn write(path: &Path, value: &str) {
    std::fs::write(path, value)
        .unwrap_or_else(|e| panic!("writing {value:?} to {}: {e}", path.display()));
}

impl MemCgroup {
    /// A new memory cgroup named `name` (under this process's own) with
    /// `limit` bytes of memory.
    pub fn create(name: &str, limit: u64) -> Self {
        let (parent, v2) = own_memory_cgroup().unwrap_or_else(|| {
            panic!(
                "no memory cgroup controller here (neither cgroup v1 `memory` nor v2 with \
                 `memory` in cgroup.controllers): this test needs one"
            )
        });
        let dir = parent.join(format!("{name}-{}", std::process::id()));
        if dir.exists() {
            let _ = std::fs::remove_dir(&dir);
        }
        std::fs::create_dir(&dir).unwrap_or_else(|e| {
            panic!(
                "cannot create the memory cgroup {}: {e} (root needed)",
                dir.display()
            )
        });
        let me = Self { dir, parent, v2 };
        if v2 {
            write(&me.dir.join("memory.max"), &limit.to_string());
            let _ = std::fs::write(me.dir.join("memory.swap.max"), "0");
        } else {
            write(&me.dir.join("memory.limit_in_bytes"), &limit.to_string());
        }
        me
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn is_v2(&self) -> bool {
        self.v2
    }

    /// Puts process `pid` (all its threads) in the group.
    pub fn add(&self, pid: u32) {
        write(&self.dir.join("cgroup.procs"), &pid.to_string());
    }

    /// How often the limit was hit (v1 `memory.failcnt`, v2 `max` events).
    pub fn limit_hits(&self) -> u64 {
        if self.v2 {
            std::fs::read_to_string(self.dir.join("memory.events"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("max ").and_then(|n| n.trim().parse().ok()))
                })
                .unwrap_or(0)
        } else {
            std::fs::read_to_string(self.dir.join("memory.failcnt"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        }
    }

    /// The most memory the group used (v1 `max_usage_in_bytes`, v2 `peak`).
    pub fn peak(&self) -> u64 {
        let f = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        std::fs::read_to_string(self.dir.join(f))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        let procs = std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.split_whitespace() {
            let _ = std::fs::write(self.parent.join("cgroup.procs"), pid);
        }
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("cannot remove the memory cgroup {}", self.dir.display());
    }
}
