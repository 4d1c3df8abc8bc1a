//! What the node plugin asks of the host: the mount table, the tools that
//! probe, make, mount and grow filesystems (util-linux, e2fsprogs,
//! xfsprogs, as kubelet's own mount code uses them), filesystem usage,
//! device sizes. A tool that fails is `INTERNAL` with its stderr; a tool
//! that is missing says which package brings it.

use std::ffi::OsStr;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Stdio;

use super::error::{CsiError, CsiResult};
use crate::volume::{BackingDevice, OpenMode};

pub use volmig_frontends::block::mountinfo::{MountEntry, mountinfo, parse_mountinfo};

/// The topmost mount at `path`, if `path` is a mount point.
pub fn mounted_at(path: &Path) -> CsiResult<Option<MountEntry>> {
    let table =
        mountinfo().map_err(|e| CsiError::internal(format!("reading the mount table: {e}")))?;
    // A path given with a trailing slash or through a symlink names the
    // same mount point.
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    Ok(table
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path || m.mount_point == canon))
}

/// The (major, minor) of a block device node.
pub fn device_number(device: &Path) -> CsiResult<(u32, u32)> {
    let meta = std::fs::metadata(device)
        .map_err(|e| CsiError::internal(format!("device {}: {e}", device.display())))?;
    if !meta.file_type().is_block_device() {
        return Err(CsiError::internal(format!(
            "{} is not a block device",
            device.display()
        )));
    }
    let rdev = meta.rdev();
    Ok((libc::major(rdev), libc::minor(rdev)))
}

/// The size of a regular file or block device, in bytes.
pub fn device_size(path: &Path) -> Result<u64, crate::AgentError> {
    BackingDevice::open(path, OpenMode::ReadOnly, false).map(|d| d.size())
}

/// Filesystem usage of the filesystem holding `path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub bytes_total: u64,
    pub bytes_available: u64,
    pub bytes_used: u64,
    pub inodes_total: u64,
    pub inodes_available: u64,
    pub inodes_used: u64,
}

pub fn usage(path: &Path) -> io::Result<Usage> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))?;
    // SAFETY: statvfs is plain old data; all-zeroes is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a live statvfs the call
    // fills.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let frsize = st.f_frsize as u64;
    Ok(Usage {
        bytes_total: st.f_blocks as u64 * frsize,
        bytes_available: st.f_bavail as u64 * frsize,
        bytes_used: (st.f_blocks as u64).saturating_sub(st.f_bfree as u64) * frsize,
        inodes_total: st.f_files as u64,
        inodes_available: st.f_favail as u64,
        inodes_used: (st.f_files as u64).saturating_sub(st.f_ffree as u64),
    })
}

/// CAP_SYS_RESOURCE: ext4 resizes a mounted filesystem only for it.
pub const CAP_SYS_RESOURCE: u32 = 24;

/// This process has capability `cap` in its effective set.
pub fn has_capability(cap: u32) -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|eff| eff & (1 << cap) != 0)
}

/// The Debian package that brings a tool.
fn package_of(tool: &str) -> &'static str {
    match tool {
        "mount" | "umount" => "mount",
        "blkid" => "util-linux",
        "mkfs.xfs" | "xfs_growfs" => "xfsprogs",
        _ => "e2fsprogs",
    }
}

/// Runs a tool to completion; a failure carries its stderr.
async fn run(tool: &str, args: &[&OsStr]) -> CsiResult<std::process::Output> {
    let out = tokio::process::Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| {
            CsiError::internal(if e.kind() == io::ErrorKind::NotFound {
                format!(
                    "{tool} is not installed (Debian package {})",
                    package_of(tool)
                )
            } else {
                format!("running {tool}: {e}")
            })
        })?;
    Ok(out)
}

fn show(args: &[&OsStr]) -> String {
    args.iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

async fn run_ok(tool: &str, args: &[&OsStr]) -> CsiResult<()> {
    let out = run(tool, args).await?;
    if out.status.success() {
        return Ok(());
    }
    Err(CsiError::internal(format!(
        "{tool} {} failed ({}): {}",
        show(args),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

/// What a device holds, as blkid's low-level probe sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signature {
    /// A filesystem (or other content) of this type.
    Filesystem(String),
    /// A partition table of this type.
    PartitionTable(String),
}

/// Probes `device`'s content, bypassing blkid's cache: `None` when no
/// signature is found (a blank device, the only one ever formatted).
pub async fn probe(device: &Path) -> CsiResult<Option<Signature>> {
    let args = [
        OsStr::new("-p"),
        OsStr::new("-o"),
        OsStr::new("export"),
        device.as_os_str(),
    ];
    let out = run("blkid", &args).await?;
    match out.status.code() {
        // blkid -p: 2 = nothing was found.
        Some(2) => Ok(None),
        Some(0) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let get = |key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(key).map(str::to_string))
            };
            Ok(Some(match (get("TYPE="), get("PTTYPE=")) {
                (Some(t), _) => Signature::Filesystem(t),
                (None, Some(pt)) => Signature::PartitionTable(pt),
                (None, None) => Signature::Filesystem("unknown".into()),
            }))
        }
        _ => Err(CsiError::internal(format!(
            "blkid {} failed ({}): {}",
            show(&args),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}

/// Makes a filesystem of type `fs` on `device`. Never forced: the tools
/// refuse a device that holds a filesystem already, a second guard behind
/// the probe.
pub async fn mkfs(fs: &str, device: &Path) -> CsiResult<()> {
    let tool = format!("mkfs.{fs}");
    run_ok(&tool, &[OsStr::new("-q"), device.as_os_str()]).await
}

/// Mounts `device` (a filesystem of type `fs`) at `target` with `options`.
pub async fn mount(device: &Path, target: &Path, fs: &str, options: &[String]) -> CsiResult<()> {
    let mut args = vec![OsStr::new("-t"), OsStr::new(fs)];
    let opts = options.join(",");
    if !opts.is_empty() {
        args.extend([OsStr::new("-o"), OsStr::new(&opts)]);
    }
    args.extend([device.as_os_str(), target.as_os_str()]);
    run_ok("mount", &args).await
}

/// The options a bind mount can change (per mount point, not per
/// filesystem): the rest of a publish call's mount flags were applied when
/// the filesystem was mounted at staging.
const BIND_OPTIONS: [&str; 16] = [
    "ro",
    "rw",
    "nosuid",
    "suid",
    "nodev",
    "dev",
    "noexec",
    "exec",
    "noatime",
    "atime",
    "nodiratime",
    "diratime",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
];

/// Bind-mounts `source` (a directory, or a device node onto a file) at
/// `target`, then makes it read-only and applies the per-mount flags
/// among `flags`.
pub async fn bind(source: &Path, target: &Path, readonly: bool, flags: &[String]) -> CsiResult<()> {
    run_ok(
        "mount",
        &[OsStr::new("--bind"), source.as_os_str(), target.as_os_str()],
    )
    .await?;
    let mut opts: Vec<&str> = flags
        .iter()
        .map(String::as_str)
        .filter(|f| BIND_OPTIONS.contains(f) && *f != "rw" && *f != "ro")
        .collect();
    if readonly || flags.iter().any(|f| f == "ro") {
        opts.push("ro");
    }
    if opts.is_empty() {
        return Ok(());
    }
    let remount = format!("remount,bind,{}", opts.join(","));
    let r = run_ok(
        "mount",
        &[OsStr::new("-o"), OsStr::new(&remount), target.as_os_str()],
    )
    .await;
    if r.is_err() {
        // Leave nothing half-done: a writable bind mount where a read-only
        // one was asked for is worse than none.
        let _ = umount(target).await;
    }
    r
}

/// Unmounts `target` (its topmost mount).
pub async fn umount(target: &Path) -> CsiResult<()> {
    run_ok("umount", &[target.as_os_str()]).await
}

/// Grows the filesystem on `device` (mounted at `mount_point`) to the
/// device's size, online.
pub async fn grow_fs(fs: &str, device: &Path, mount_point: &Path) -> CsiResult<()> {
    match fs {
        "xfs" => run_ok("xfs_growfs", &[mount_point.as_os_str()]).await,
        _ => run_ok("resize2fs", &[device.as_os_str()]).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_mount_table_with_a_root() {
        let t = mountinfo().unwrap();
        assert!(t.iter().any(|m| m.mount_point == Path::new("/")));
        assert!(mounted_at(Path::new("/")).unwrap().is_some());
        let dir = tempfile::tempdir().unwrap();
        assert!(mounted_at(dir.path()).unwrap().is_none());
        // Root in a container may lack some; CAP_CHOWN (0) is near certain.
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        assert_eq!(has_capability(0), root);
        let u = usage(dir.path()).unwrap();
        assert!(u.bytes_total >= u.bytes_available && u.bytes_total > 0);
    }
}
