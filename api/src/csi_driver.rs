//! The names both halves of the CSI driver `csi.volmig.io` agree on: the
//! controller (operator) writes them, the node plugin (agent) reads them.
//! One definition here; `volmig_node_agent::csi` re-exports them.

/// The driver's name (GetPluginInfo; the `driver` of a PV and the
/// `provisioner` of a StorageClass).
pub const DRIVER_NAME: &str = "csi.volmig.io";

/// The publish-context key naming the backing device a volume is served
/// from on the node (the device of the controller's holder pod).
pub const BACKING_DEVICE_KEY: &str = "volmig.io/backing-device";

/// The volume-context key with the volume's size in bytes: a backing
/// device smaller than it is refused.
pub const SIZE_KEY: &str = "volmig.io/size-bytes";

/// The topology segment of a node: volumes are reachable from the node
/// whose agent serves them.
pub const TOPOLOGY_KEY: &str = "topology.volmig.io/node";

/// The StorageClass (and VolumeAttributesClass) parameter naming the
/// storage class of a volume's backing claim.
pub const BACKING_CLASS_PARAM: &str = "backingStorageClass";

/// The StorageClass parameter with the filesystem the node plugin makes.
pub const FS_TYPE_PARAM: &str = "fsType";
