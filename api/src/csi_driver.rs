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

/// The CSI error codes volmig's CSI services answer with, chosen where the
/// condition is detected (never from a message's text) and mapped to gRPC
/// once, at the service boundary ([`CsiCode::grpc`]). The node plugin's
/// and the controller's errors carry one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CsiCode {
    /// A required field is missing, or a field is invalid or unsupported.
    InvalidArgument,
    /// No such volume (or node, or volume at the path given).
    NotFound,
    /// The volume (staged, published, created) exists, incompatibly.
    AlreadyExists,
    /// The call cannot succeed in the volume's state (a migration holds
    /// it, still published, capabilities it cannot have...).
    FailedPrecondition,
    /// Not yet, or another call for the volume is in flight: the caller
    /// retries (external-provisioner keeps provisioning "in progress" on
    /// ABORTED as on UNAVAILABLE).
    Aborted,
    /// The capacity range cannot be met.
    OutOfRange,
    /// The service, or what it depends on (the agent, the Kubernetes API),
    /// is not ready: retry.
    Unavailable,
    /// Anything else.
    Internal,
}

impl CsiCode {
    pub fn grpc(self) -> tonic::Code {
        match self {
            CsiCode::InvalidArgument => tonic::Code::InvalidArgument,
            CsiCode::NotFound => tonic::Code::NotFound,
            CsiCode::AlreadyExists => tonic::Code::AlreadyExists,
            CsiCode::FailedPrecondition => tonic::Code::FailedPrecondition,
            CsiCode::Aborted => tonic::Code::Aborted,
            CsiCode::OutOfRange => tonic::Code::OutOfRange,
            CsiCode::Unavailable => tonic::Code::Unavailable,
            CsiCode::Internal => tonic::Code::Internal,
        }
    }
}

/// What a CSI error's message starts with: the call and the volume, where
/// known (`"NodeStageVolume of volume v: "`).
pub fn error_context(op: Option<&str>, volume: Option<&str>) -> String {
    match (op, volume) {
        (Some(op), Some(v)) => format!("{op} of volume {v}: "),
        (Some(op), None) => format!("{op}: "),
        (None, Some(v)) => format!("volume {v}: "),
        (None, None) => String::new(),
    }
}
