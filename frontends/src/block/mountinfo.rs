//! The mount table as `/proc/self/mountinfo` shows it (proc(5)): what the
//! FUSE driver looks for its own mount in, and what the CSI node plugin
//! checks its staging and target paths against.

use std::io;
use std::path::{Path, PathBuf};

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// st_dev of the mounted filesystem: the device of a block filesystem.
    pub dev: (u32, u32),
    /// The path inside that filesystem mounted here (a bind mount's source).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
    /// The per-mount options (ro/rw, nosuid...).
    pub options: Vec<String>,
}

impl MountEntry {
    /// The device number as `st_dev` has it.
    pub fn st_dev(&self) -> u64 {
        libc::makedev(self.dev.0, self.dev.1)
    }

    pub fn read_only(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text (see proc(5)); lines it cannot read are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if f.len() < 6 || r.len() < 2 {
                return None;
            }
            let (maj, min) = f[2].split_once(':')?;
            Some(MountEntry {
                dev: (maj.parse().ok()?, min.parse().ok()?),
                root: PathBuf::from(unescape(f[3])),
                mount_point: PathBuf::from(unescape(f[4])),
                options: f[5].split(',').map(str::to_string).collect(),
                fs_type: r[0].to_string(),
                source: unescape(r[1]),
            })
        })
        .collect()
}

/// The mount table of this process's mount namespace.
pub fn mountinfo() -> io::Result<Vec<MountEntry>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// The mount on top at `at` (the last line for it) now.
pub fn find(at: &Path) -> Option<MountEntry> {
    mountinfo()
        .ok()?
        .into_iter()
        .rev()
        .find(|m| m.mount_point == at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse_with_escapes_and_optional_fields() {
        let text = "\
36 35 98:0 /mnt1 /mnt/my\\040dir rw,noatime master:1 - ext3 /dev/root rw,errors=continue
120 29 7:3 / /var/lib/kubelet/staging/pv1 ro,relatime shared:60 - ext4 /dev/loop3 ro
121 29 0:5 /loop3 /var/lib/kubelet/pods/x/dev rw,nosuid - devtmpfs udev rw,size=10k
garbage line
";
        let t = parse_mountinfo(text);
        assert_eq!(t.len(), 3);
        assert_eq!(t[0].mount_point, Path::new("/mnt/my dir"));
        assert_eq!(t[0].root, Path::new("/mnt1"));
        assert_eq!(t[0].dev, (98, 0));
        assert_eq!(t[0].fs_type, "ext3");
        assert!(!t[0].read_only());
        assert_eq!(t[1].dev, (7, 3));
        assert_eq!(t[1].source, "/dev/loop3");
        assert!(t[1].read_only());
        assert_eq!(t[2].root, Path::new("/loop3"));
    }

    #[test]
    fn the_mount_on_top_is_found() {
        assert!(find(Path::new("/")).is_some());
        let text = "\
98 30 0:53 / /b/fuse rw - fuse.volmig volmig rw
99 30 0:54 / /b/fuse rw - fuse.volmig volmig rw
";
        let top = parse_mountinfo(text)
            .into_iter()
            .rev()
            .find(|m| m.mount_point == Path::new("/b/fuse"));
        assert_eq!(top.map(|m| m.st_dev()), Some(libc::makedev(0, 54)));
    }
}
