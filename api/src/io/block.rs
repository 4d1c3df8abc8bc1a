//! Kernel block frontends, as the serving contract names them: which kind
//! of kernel block device a volume is served as. The drivers themselves
//! live in `volmig_frontends::block` (which re-exports these); the agent's
//! serve call carries a [`BlockChoice`] and reports a [`BlockKind`].

use std::fmt;
use std::str::FromStr;

/// A kind of kernel block device the agent can make of a volume.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    /// The agent's FUSE file system serves the volume as a file, and a
    /// loop device makes that file a block device (`/dev/loopN`).
    #[serde(rename = "fuse")]
    FuseLoop,
    /// The kernel NBD client, configured over netlink (`/dev/nbdN`).
    Nbd,
    /// A ublk device (`/dev/ublkbN`).
    Ublk,
}

impl BlockKind {
    /// Every kind, best first (the order `Auto` prefers them in).
    pub const BEST_FIRST: [BlockKind; 3] = [BlockKind::Ublk, BlockKind::Nbd, BlockKind::FuseLoop];

    /// The name used on command lines and in records.
    pub fn as_str(self) -> &'static str {
        match self {
            BlockKind::FuseLoop => "fuse",
            BlockKind::Nbd => "nbd",
            BlockKind::Ublk => "ublk",
        }
    }
}

impl fmt::Display for BlockKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BlockKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "fuse" | "fuse+loop" | "fuseloop" | "loop" => Ok(BlockKind::FuseLoop),
            "nbd" => Ok(BlockKind::Nbd),
            "ublk" => Ok(BlockKind::Ublk),
            _ => Err(format!(
                "unknown kernel block frontend {s:?} (fuse, nbd or ublk)"
            )),
        }
    }
}

/// Which kind of kernel block device to make of a volume.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum BlockChoice {
    /// The best kind this node offers (ublk, then NBD, then FUSE + loop).
    #[default]
    Auto,
    /// This kind or nothing.
    Only(BlockKind),
}

impl fmt::Display for BlockChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockChoice::Auto => f.write_str("auto"),
            BlockChoice::Only(k) => k.fmt(f),
        }
    }
}

impl FromStr for BlockChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("auto") {
            return Ok(BlockChoice::Auto);
        }
        s.parse()
            .map(BlockChoice::Only)
            .map_err(|e| format!("{e}, or auto"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_roundtrip() {
        for k in BlockKind::BEST_FIRST {
            assert_eq!(k.to_string().parse::<BlockKind>(), Ok(k));
            let c = BlockChoice::Only(k);
            assert_eq!(c.to_string().parse::<BlockChoice>(), Ok(c));
        }
        assert_eq!("AUTO".parse::<BlockChoice>(), Ok(BlockChoice::Auto));
        assert_eq!("fuse".parse::<BlockKind>(), Ok(BlockKind::FuseLoop));
        assert!("scsi".parse::<BlockChoice>().is_err());
    }
}
