//! A CSI volume capability in domain terms: how a volume is accessed (a
//! block device, or a filesystem with its type and mount flags) and by
//! whom (the access mode). Converted from the request once, checked for
//! what this plugin can do, persisted with a staged volume, and compared
//! when a call is repeated.

use serde::{Deserialize, Serialize};
use volmig_api::csi::VolumeCapability;
use volmig_api::csi::volume_capability::access_mode::Mode;
use volmig_api::csi::volume_capability::{AccessMode as WireMode, AccessType};

use super::error::{CsiError, CsiResult};

/// Filesystems this plugin makes and mounts; the first is the default.
pub const FILESYSTEMS: [&str; 4] = ["ext4", "xfs", "ext3", "ext2"];

/// The filesystem made on a blank device when the capability names none.
pub const DEFAULT_FS: &str = FILESYSTEMS[0];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    MultiNodeReaderOnly,
    MultiNodeSingleWriter,
    MultiNodeMultiWriter,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
}

impl AccessMode {
    fn from_wire(m: Option<&WireMode>) -> CsiResult<Self> {
        let m = m.ok_or_else(|| CsiError::missing("volume_capability.access_mode"))?;
        Ok(match Mode::try_from(m.mode) {
            Ok(Mode::SingleNodeWriter) => AccessMode::SingleNodeWriter,
            Ok(Mode::SingleNodeReaderOnly) => AccessMode::SingleNodeReaderOnly,
            Ok(Mode::MultiNodeReaderOnly) => AccessMode::MultiNodeReaderOnly,
            Ok(Mode::MultiNodeSingleWriter) => AccessMode::MultiNodeSingleWriter,
            Ok(Mode::MultiNodeMultiWriter) => AccessMode::MultiNodeMultiWriter,
            Ok(Mode::SingleNodeSingleWriter) => AccessMode::SingleNodeSingleWriter,
            Ok(Mode::SingleNodeMultiWriter) => AccessMode::SingleNodeMultiWriter,
            Ok(Mode::Unknown) | Err(_) => {
                return Err(CsiError::invalid(format!(
                    "volume_capability.access_mode {} is not a known access mode",
                    m.mode
                )));
            }
        })
    }

    /// Nobody writes.
    pub fn read_only(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeReaderOnly | AccessMode::MultiNodeReaderOnly
        )
    }

    /// Writers on several nodes at once.
    fn multi_node_writers(self) -> bool {
        matches!(
            self,
            AccessMode::MultiNodeSingleWriter | AccessMode::MultiNodeMultiWriter
        )
    }

    /// The volume may be published at several target paths of one node
    /// (the spec's second NodePublishVolume table, which applies since the
    /// plugin has SINGLE_NODE_MULTI_WRITER): MULTI_NODE_... and
    /// SINGLE_NODE_MULTI_WRITER yes; SINGLE_NODE_SINGLE_WRITER and the
    /// older SINGLE_NODE_WRITER / SINGLE_NODE_READER_ONLY no.
    pub fn several_targets(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeMultiWriter
                | AccessMode::MultiNodeReaderOnly
                | AccessMode::MultiNodeSingleWriter
                | AccessMode::MultiNodeMultiWriter
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// The kernel block device itself.
    Block,
    /// A filesystem on it.
    Mount {
        /// As asked ("" = the one the device has, or the default).
        fs_type: String,
        /// As asked, sorted, no duplicates.
        flags: Vec<String>,
    },
}

/// How the CO means to use a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capability {
    pub access: Access,
    pub mode: AccessMode,
}

impl Capability {
    /// Converts and checks a request's capability: a missing or unknown
    /// part is `INVALID_ARGUMENT`; what this plugin cannot do with a volume
    /// (a filesystem it does not make, a filesystem written from several
    /// nodes) is `FAILED_PRECONDITION`, the spec's "exceeds capabilities".
    pub fn from_wire(c: Option<&VolumeCapability>) -> CsiResult<Self> {
        let c = c.ok_or_else(|| CsiError::missing("volume_capability"))?;
        let mode = AccessMode::from_wire(c.access_mode.as_ref())?;
        let access = match &c.access_type {
            None => return Err(CsiError::missing("volume_capability.access_type")),
            Some(AccessType::Block(_)) => Access::Block,
            Some(AccessType::Mount(m)) => {
                if !m.volume_mount_group.is_empty() {
                    return Err(CsiError::invalid(
                        "volume_capability.mount.volume_mount_group is not supported (no VOLUME_MOUNT_GROUP capability)",
                    ));
                }
                let fs_type = m.fs_type.trim().to_ascii_lowercase();
                if !fs_type.is_empty() && !FILESYSTEMS.contains(&fs_type.as_str()) {
                    return Err(CsiError::precondition(format!(
                        "filesystem {fs_type:?} is not supported (one of {})",
                        FILESYSTEMS.join(", ")
                    )));
                }
                if mode.multi_node_writers() {
                    return Err(CsiError::precondition(format!(
                        "a filesystem cannot be written from several nodes ({mode:?}): use block access"
                    )));
                }
                let mut flags = Vec::new();
                for f in &m.mount_flags {
                    let f = f.trim();
                    if f.is_empty() {
                        continue;
                    }
                    if f.contains(',') || f.chars().any(char::is_whitespace) {
                        return Err(CsiError::invalid(format!(
                            "mount flag {f:?}: one flag per entry, no commas or spaces"
                        )));
                    }
                    flags.push(f.to_string());
                }
                flags.sort();
                flags.dedup();
                Access::Mount { fs_type, flags }
            }
        };
        Ok(Self { access, mode })
    }

    pub fn is_block(&self) -> bool {
        self.access == Access::Block
    }

    /// The mount flags (none for block access).
    pub fn flags(&self) -> &[String] {
        match &self.access {
            Access::Mount { flags, .. } => flags,
            Access::Block => &[],
        }
    }

    /// A repeated NodeStageVolume with `asked` may stand for this staged
    /// capability (`in_use`: the filesystem found or made): same access
    /// type, mode and mount flags, and a filesystem type that is unsaid or
    /// the one in use.
    pub fn stage_compatible(&self, asked: &Capability, in_use: Option<&str>) -> bool {
        if self.mode != asked.mode {
            return false;
        }
        match (&self.access, &asked.access) {
            (Access::Block, Access::Block) => true,
            (
                Access::Mount { fs_type, flags },
                Access::Mount {
                    fs_type: asked_fs,
                    flags: asked_flags,
                },
            ) => {
                flags == asked_flags
                    && (asked_fs.is_empty()
                        || asked_fs == fs_type
                        || Some(asked_fs.as_str()) == in_use)
            }
            _ => false,
        }
    }

    /// NodePublishVolume with `asked` can be served by a volume staged with
    /// this capability: the same access type, and no writer on a volume
    /// staged read-only.
    pub fn publishable_as(&self, asked: &Capability) -> bool {
        self.is_block() == asked.is_block() && (asked.mode.read_only() || !self.mode.read_only())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use volmig_api::csi::volume_capability::{BlockVolume, MountVolume};

    fn wire(access: Option<AccessType>, mode: Option<i32>) -> VolumeCapability {
        VolumeCapability {
            access_mode: mode.map(|mode| WireMode { mode }),
            access_type: access,
        }
    }

    fn mount(fs: &str, flags: &[&str]) -> Option<AccessType> {
        Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: flags.iter().map(|s| s.to_string()).collect(),
            volume_mount_group: String::new(),
        }))
    }

    const SNW: i32 = Mode::SingleNodeWriter as i32;

    #[test]
    fn requests_convert_and_bad_ones_get_the_spec_codes() {
        use super::super::error::Code;
        let c = Capability::from_wire(Some(&wire(
            mount("EXT4", &["noatime", "discard", "noatime"]),
            Some(SNW),
        )))
        .unwrap();
        assert_eq!(
            c.access,
            Access::Mount {
                fs_type: "ext4".into(),
                flags: vec!["discard".into(), "noatime".into()]
            }
        );
        let code =
            |w: Option<VolumeCapability>| Capability::from_wire(w.as_ref()).unwrap_err().code;
        assert_eq!(code(None), Code::InvalidArgument);
        assert_eq!(code(Some(wire(None, Some(SNW)))), Code::InvalidArgument);
        assert_eq!(
            code(Some(wire(mount("", &[]), None))),
            Code::InvalidArgument
        );
        assert_eq!(
            code(Some(wire(mount("", &[]), Some(0)))),
            Code::InvalidArgument
        );
        assert_eq!(
            code(Some(wire(mount("", &[]), Some(99)))),
            Code::InvalidArgument
        );
        assert_eq!(
            code(Some(wire(mount("", &["a,b"]), Some(SNW)))),
            Code::InvalidArgument
        );
        assert_eq!(
            code(Some(wire(mount("zfs", &[]), Some(SNW)))),
            Code::FailedPrecondition
        );
        let multi = Mode::MultiNodeMultiWriter as i32;
        assert_eq!(
            code(Some(wire(mount("", &[]), Some(multi)))),
            Code::FailedPrecondition
        );
        let b = Capability::from_wire(Some(&wire(
            Some(AccessType::Block(BlockVolume {})),
            Some(multi),
        )))
        .unwrap();
        assert!(b.is_block() && b.mode.several_targets());
    }

    #[test]
    fn restaging_compares_what_matters() {
        let cap = |fs: &str, flags: &[&str], mode: i32| {
            Capability::from_wire(Some(&wire(mount(fs, flags), Some(mode)))).unwrap()
        };
        let staged = cap("", &["noatime"], SNW);
        assert!(staged.stage_compatible(&cap("", &["noatime"], SNW), Some("ext4")));
        assert!(staged.stage_compatible(&cap("ext4", &["noatime"], SNW), Some("ext4")));
        assert!(!staged.stage_compatible(&cap("xfs", &["noatime"], SNW), Some("ext4")));
        assert!(!staged.stage_compatible(&cap("", &[], SNW), Some("ext4")));
        let ro = Mode::SingleNodeReaderOnly as i32;
        assert!(!staged.stage_compatible(&cap("", &["noatime"], ro), Some("ext4")));
        let block = Capability::from_wire(Some(&wire(
            Some(AccessType::Block(BlockVolume {})),
            Some(SNW),
        )))
        .unwrap();
        assert!(!staged.stage_compatible(&block, None));
        assert!(!staged.publishable_as(&block));
        assert!(staged.publishable_as(&cap("", &[], ro)));
        assert!(
            !cap("", &[], ro).publishable_as(&staged),
            "no writer on a read-only stage"
        );
    }
}
