//! The CSI node plugin `csi.volmig.io`, served by the agent on a unix
//! socket (`volmig-agent serve --csi-socket`, kubelet's plugin directory):
//! CSI's Identity and Node services. A staged volume is always served
//! through the interposer as a kernel block device (so every volmig volume
//! can be migrated live under its pod's mount); kubelet mounts it through
//! the plugin:
//!
//! - NodeStageVolume serves the volume from the backing device the
//!   controller's publish context names ([`BACKING_DEVICE_KEY`]), makes a
//!   filesystem only when the device is blank, and mounts it at the
//!   staging path (block access: the device itself);
//! - NodePublishVolume bind-mounts it at the pod's target path;
//! - NodeUnpublishVolume / NodeUnstageVolume undo them (refused while a
//!   migration session holds the volume);
//! - NodeGetVolumeStats and NodeExpandVolume report and grow it.
//!
//! [`node`] is the logic (against the [`Volumes`] seam, served by the
//! agent), [`service`] its gRPC face, [`records`] what it persists in
//! `<state-dir>/csi/`, [`system`] the mount table and tools it uses.

mod capability;
mod error;
pub mod node;
pub mod records;
pub mod service;
pub mod system;
pub mod volumes;

pub use capability::{Access, AccessMode, Capability, DEFAULT_FS, FILESYSTEMS};
pub use error::{Code, CsiError, CsiResult};
pub use node::{NodeConfig, NodePlugin, Stats};
pub use service::{CsiService, serve_unix};
pub use volumes::{AgentVolumes, Condition, Device, Volumes};

/// The names the controller and this plugin agree on (one definition,
/// in `volmig_api::csi_driver`).
pub use volmig_api::csi_driver::{BACKING_DEVICE_KEY, DRIVER_NAME, SIZE_KEY, TOPOLOGY_KEY};
