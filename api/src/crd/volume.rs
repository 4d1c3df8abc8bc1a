//! The `VolmigVolume` custom resource (`volmig.io/v1alpha1`, cluster
//! scoped): the record of one volume of the CSI driver `csi.volmig.io`,
//! named by its CSI volume id. The controller writes it; it is the
//! volume's communication data set: which backing claim holds its bytes
//! now (a migration changes that, never the volume id), on which nodes it
//! is published and through which holder pod, and what happened to it.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const VOLUME_KIND: &str = "VolmigVolume";
/// The CRD's object name.
pub const VOLUME_CRD_NAME: &str = "volmigvolumes.volmig.io";

/// What CreateVolume was asked for; fixed once created (a repeated
/// CreateVolume is compared with it).
// clippy reads the printer columns' repeated `type_ = "string"` as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[kube(
    group = "volmig.io",
    version = "v1alpha1",
    kind = "VolmigVolume",
    status = "VolmigVolumeStatus",
    category = "volmig",
    derive = "PartialEq",
    doc = "A volume of the CSI driver csi.volmig.io: its current backing claim, attachments and history",
    printcolumn(name = "Claim", type_ = "string", json_path = ".status.currentClaim"),
    printcolumn(name = "Class", type_ = "string", json_path = ".status.storageClass"),
    printcolumn(name = "Workload", type_ = "string", json_path = ".spec.claim.name"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct VolmigVolumeSpec {
    /// CreateVolume's name (the PersistentVolume's name the provisioner chose).
    pub request_name: String,
    /// Bytes the volume was created with (rounded as the controller rounds).
    pub capacity_bytes: u64,
    /// The storage class of the first backing claim.
    pub backing_storage_class: String,
    /// The namespace of the backing claims and holder pods (volmig's).
    pub backing_namespace: String,
    /// Kubernetes access modes of the backing claims.
    pub access_modes: Vec<String>,
    /// Whether the volume is used as a raw block device (else mounted).
    #[serde(default)]
    pub block: bool,
    /// The filesystem (`fsType` parameter), if one was named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_type: Option<String>,
    /// CreateVolume's parameters, less the provisioner's own
    /// (`csi.storage.k8s.io/...`).
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    /// The workload's claim (from the provisioner's `--extra-create-metadata`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<WorkloadClaim>,
}

#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WorkloadClaim {
    pub namespace: String,
    pub name: String,
}

/// The volume as it is now.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VolmigVolumeStatus {
    /// The backing claim (in `spec.backingNamespace`) holding the volume's
    /// bytes: every publish attaches this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_claim: Option<String>,
    /// The storage class of the current backing claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class: Option<String>,
    /// The volume's size now (after expansions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_bytes: Option<u64>,
    /// Every backing claim volmig created for this volume and has not
    /// released: DeleteVolume deletes these.
    #[serde(default)]
    pub claims: Vec<String>,
    /// Where the volume is published: one holder pod per node.
    #[serde(default)]
    pub attachments: Vec<VolumeAttachmentRecord>,
    /// What changed the current backing claim, oldest first.
    #[serde(default)]
    pub history: Vec<VolumeHistory>,
    /// Backing claims of migrations under way (each also in `claims`,
    /// recorded before it is created): the target of a VolumeMigration
    /// until it completes (then it is `currentClaim`) or is rolled back
    /// (then it is released).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<MigrationTarget>,
}

/// A backing claim a VolumeMigration moves the volume to.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MigrationTarget {
    pub claim: String,
    pub storage_class: String,
    /// `namespace/name` of the VolumeMigration.
    pub migration: String,
    /// Its uid: a later migration of the same name is another one.
    pub migration_uid: String,
}

/// A node the volume is published to.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeAttachmentRecord {
    pub node: String,
    /// The pod attaching the backing claim on the node as a raw device.
    pub holder_pod: String,
    /// The backing claim that holder attaches.
    pub claim: String,
    #[serde(default)]
    pub readonly: bool,
}

/// A change of the current backing claim.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeHistory {
    /// RFC 3339.
    pub time: String,
    /// `Created` or `Migrated`.
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_claim: Option<String>,
    pub to_claim: String,
    pub storage_class: String,
    /// `namespace/name` of the VolumeMigration that moved it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<String>,
}
