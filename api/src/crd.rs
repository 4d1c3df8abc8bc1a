//! The `VolumeMigration` custom resource (`volmig.io/v1alpha1`): what a user
//! asks for (spec) and the communication data set of its session (status).
//!
//! Behind the `crd` feature so kube never enters the node agent's build. The
//! CEL rules admission applies are constants in [`rules`]; each has a Rust
//! twin in [`check_spec`]/[`check_update`] that the operator applies too (a
//! cluster without CEL, or an object written before the CRD was updated,
//! still gets the same answer) and the tests compare both.

pub mod volume;
pub use volume::{
    MigrationTarget, VOLUME_CRD_NAME, VolmigVolume, VolmigVolumeSpec, VolmigVolumeStatus,
    VolumeAttachmentRecord, VolumeHistory, WorkloadClaim,
};

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::phase::{CopyMode, Phase};
use crate::units::{parse_duration, parse_size};

pub const GROUP: &str = "volmig.io";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "VolumeMigration";
pub const API_VERSION: &str = "volmig.io/v1alpha1";
/// `kubectl get volmig` (`vm` is KubeVirt's).
pub const SHORT_NAMES: [&str; 2] = ["volmig", "vmig"];
/// The CRD's object name.
pub const CRD_NAME: &str = "volumemigrations.volmig.io";
/// Most volume pairs in one migration (bounds the CEL rules' cost).
pub const MAX_VOLUMES: usize = 16;

/// The CEL rules (`x-kubernetes-validations`) of the CRD with their messages.
pub mod rules {
    pub const VOLUMES_NOT_EMPTY: &str = "size(self) > 0";
    pub const VOLUMES_NOT_EMPTY_MSG: &str = "spec.volumes must name at least one volume";
    pub const UNIQUE_SOURCES: &str = "self.all(v, self.exists_one(w, w.source.persistentVolumeClaim == v.source.persistentVolumeClaim))";
    pub const UNIQUE_SOURCES_MSG: &str = "each source claim may appear only once in spec.volumes";
    pub const TARGET_NOT_A_SOURCE: &str = "self.all(v, !has(v.target.persistentVolumeClaim) || self.all(w, w.source.persistentVolumeClaim != v.target.persistentVolumeClaim))";
    pub const TARGET_NOT_A_SOURCE_MSG: &str =
        "a target claim must differ from every source claim in spec.volumes";
    pub const ONE_TARGET: &str = "has(self.storageClassName) != has(self.persistentVolumeClaim)";
    pub const ONE_TARGET_MSG: &str = "target needs exactly one of storageClassName (a new claim) or persistentVolumeClaim (an existing one)";
    pub const ABORT_STAYS: &str =
        "!has(oldSelf.abort) || !oldSelf.abort || (has(self.abort) && self.abort)";
    pub const ABORT_STAYS_MSG: &str = "spec.abort cannot be unset once set";
    pub const VOLUMES_FIXED: &str = "self.volumes == oldSelf.volumes";
    pub const VOLUMES_FIXED_MSG: &str =
        "spec.volumes cannot change after creation; create another VolumeMigration";
    pub const NO_ABORT_AFTER_END: &str = "!has(self.status) || !has(self.status.phase) || !(self.status.phase in ['Completed', 'Aborted', 'Failed']) || !has(self.spec.abort) || !self.spec.abort || (has(oldSelf.spec.abort) && oldSelf.spec.abort)";
    pub const NO_ABORT_AFTER_END_MSG: &str =
        "spec.abort cannot be set after the migration ended (Completed, Aborted or Failed)";
    /// `syncGoal`: what `volmig_api::units::parse_duration` accepts, less bare numbers.
    pub const DURATION_PATTERN: &str = r"^[0-9]+(\.[0-9]+)?(ms|s|m|h)$";
    /// `bandwidthLimit`: a whole quantity, as `volmig_api::units::parse_size` accepts.
    pub const QUANTITY_PATTERN: &str = r"^[0-9]+(Ki|Mi|Gi|Ti|K|M|G|T|k)?$";
    /// Every rule with its message, for tests and docs.
    pub const ALL: [(&str, &str); 7] = [
        (VOLUMES_NOT_EMPTY, VOLUMES_NOT_EMPTY_MSG),
        (UNIQUE_SOURCES, UNIQUE_SOURCES_MSG),
        (TARGET_NOT_A_SOURCE, TARGET_NOT_A_SOURCE_MSG),
        (ONE_TARGET, ONE_TARGET_MSG),
        (ABORT_STAYS, ABORT_STAYS_MSG),
        (VOLUMES_FIXED, VOLUMES_FIXED_MSG),
        (NO_ABORT_AFTER_END, NO_ABORT_AFTER_END_MSG),
    ];
}

/// A live migration of one or more persistent volumes to other storage.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[kube(
    group = "volmig.io",
    version = "v1alpha1",
    kind = "VolumeMigration",
    namespaced,
    status = "VolumeMigrationStatus",
    shortname = "volmig",
    shortname = "vmig",
    category = "volmig",
    derive = "PartialEq",
    doc = "A live migration of persistent volumes to other storage while their pods keep running",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Progress", type_ = "string", json_path = ".status.progress"),
    printcolumn(name = "Stall", type_ = "string", json_path = ".status.cutoverStall"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(
        name = "Source",
        type_ = "string",
        priority = 1,
        description = "The (first) source claim",
        json_path = ".spec.volumes[*].source.persistentVolumeClaim"
    ),
    printcolumn(
        name = "Target",
        type_ = "string",
        priority = 1,
        description = "The (first) target claim",
        json_path = ".status.volumes[*].target"
    ),
    printcolumn(
        name = "Node",
        type_ = "string",
        priority = 1,
        description = "The node whose agent copies the (first) volume",
        json_path = ".status.volumes[*].node"
    ),
    validation = Rule::new(rules::NO_ABORT_AFTER_END).message(rules::NO_ABORT_AFTER_END_MSG)
)]
#[cfg_attr(feature = "cel", kube(cel))]
#[x_kube(
    validation = Rule::new(rules::ABORT_STAYS).message(rules::ABORT_STAYS_MSG),
    validation = Rule::new(rules::VOLUMES_FIXED).message(rules::VOLUMES_FIXED_MSG)
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMigrationSpec {
    /// The volumes to migrate; several are cut over together (one quiesce, one redirect).
    #[x_kube(
        validation = Rule::new(rules::VOLUMES_NOT_EMPTY).message(rules::VOLUMES_NOT_EMPTY_MSG),
        validation = Rule::new(rules::UNIQUE_SOURCES).message(rules::UNIQUE_SOURCES_MSG),
        validation = Rule::new(rules::TARGET_NOT_A_SOURCE).message(rules::TARGET_NOT_A_SOURCE_MSG)
    )]
    #[schemars(length(max = 16))]
    pub volumes: Vec<VolumePair>,
    /// Background (copy and refresh passes), Mirror (mirror writes from the start) or Auto
    /// (background, mirroring when refresh does not converge).
    #[serde(default)]
    pub copy_mode: CopyModeSpec,
    /// Longest acceptable I/O stall at cutover, e.g. 100ms.
    #[serde(default = "default_sync_goal")]
    #[schemars(regex(pattern = rules::DURATION_PATTERN))]
    pub sync_goal: String,
    /// Copy bandwidth per second and volume (e.g. 200Mi); changeable while the migration runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = rules::QUANTITY_PATTERN))]
    pub bandwidth_limit: Option<String>,
    /// Compare source and target after cutover: None, Sample or Full.
    #[serde(default)]
    pub verify: VerifySpec,
    /// Keep the source volume after the migration. False releases the
    /// source backing claim of a volume of volmig's CSI driver once the
    /// migration completed; other volumes always keep their source.
    #[serde(default = "default_true")]
    pub retain_source: bool,
    /// Roll the migration back; cannot be unset once set.
    #[serde(default)]
    pub abort: bool,
}

fn default_sync_goal() -> String {
    "100ms".into()
}

fn default_true() -> bool {
    true
}

/// One source claim and where its data goes.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumePair {
    pub source: SourceRef,
    pub target: TargetRef,
}

#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SourceRef {
    /// The claim (in the migration's namespace) whose volume moves.
    #[schemars(length(min = 1, max = 253))]
    pub persistent_volume_claim: String,
}

/// Either a storage class (volmig creates the target claim) or an existing claim.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[x_kube(validation = Rule::new(rules::ONE_TARGET).message(rules::ONE_TARGET_MSG))]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// Create the target claim `<source>-volmig` with this storage class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,
    /// Use this existing claim (raw block, at least the source's size, unused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub persistent_volume_claim: Option<String>,
}

#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyModeSpec {
    Background,
    Mirror,
    #[default]
    Auto,
}

/// The OpenAPI v3 schema of the CRD's one version (what the API server
/// validates a VolumeMigration against), as JSON; None if the generated
/// CRD carries none.
pub fn openapi_schema() -> Option<serde_json::Value> {
    use kube::CustomResourceExt;
    let crd = VolumeMigration::crd();
    let schema = crd.spec.versions.first()?.schema.as_ref()?;
    serde_json::to_value(schema.open_api_v3_schema.as_ref()?).ok()
}

impl From<CopyModeSpec> for CopyMode {
    fn from(m: CopyModeSpec) -> Self {
        match m {
            CopyModeSpec::Background => CopyMode::Background,
            CopyModeSpec::Mirror => CopyMode::Mirror,
            CopyModeSpec::Auto => CopyMode::Auto,
        }
    }
}

impl From<CopyMode> for CopyModeSpec {
    fn from(m: CopyMode) -> Self {
        match m {
            CopyMode::Background => CopyModeSpec::Background,
            CopyMode::Mirror => CopyModeSpec::Mirror,
            CopyMode::Auto => CopyModeSpec::Auto,
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VerifySpec {
    None,
    Sample,
    #[default]
    Full,
}

/// Where a migration is. `Pending` until its session exists (waiting for a
/// slot, the agent, the target claim); then the session's phase.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MigrationPhase {
    #[default]
    Pending,
    Activating,
    Copying,
    Refreshing,
    Quiescing,
    Synchronizing,
    Redirecting,
    Resuming,
    Terminating,
    Completed,
    Aborted,
    Failed,
}

impl From<Phase> for MigrationPhase {
    fn from(p: Phase) -> Self {
        match p {
            Phase::Activating => Self::Activating,
            Phase::Copying => Self::Copying,
            Phase::Refreshing => Self::Refreshing,
            Phase::Quiescing => Self::Quiescing,
            Phase::Synchronizing => Self::Synchronizing,
            Phase::Redirecting => Self::Redirecting,
            Phase::Resuming => Self::Resuming,
            Phase::Terminating => Self::Terminating,
            Phase::Completed => Self::Completed,
            Phase::Aborted => Self::Aborted,
            Phase::Failed => Self::Failed,
        }
    }
}

impl MigrationPhase {
    /// The session phase, `None` for `Pending`.
    pub fn session_phase(self) -> Option<Phase> {
        Some(match self {
            Self::Pending => return None,
            Self::Activating => Phase::Activating,
            Self::Copying => Phase::Copying,
            Self::Refreshing => Phase::Refreshing,
            Self::Quiescing => Phase::Quiescing,
            Self::Synchronizing => Phase::Synchronizing,
            Self::Redirecting => Phase::Redirecting,
            Self::Resuming => Phase::Resuming,
            Self::Terminating => Phase::Terminating,
            Self::Completed => Phase::Completed,
            Self::Aborted => Phase::Aborted,
            Self::Failed => Phase::Failed,
        })
    }

    pub fn is_terminal(self) -> bool {
        self.session_phase().is_some_and(Phase::is_terminal)
    }
}

impl std::fmt::Display for MigrationPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// The communication data set: everything a master needs to continue the
/// session after a restart, plus what people read.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMigrationStatus {
    #[serde(default)]
    pub phase: MigrationPhase,
    /// The spec generation this status reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Fencing epoch of the master driving the session (the newest of its volumes').
    #[serde(default)]
    pub epoch: i64,
    /// The session id agents know the session by (a group's name for several volumes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Saves of session records so far.
    #[serde(default)]
    pub revision: i64,
    /// An abort was requested (spec.abort, or the migration was deleted).
    #[serde(default)]
    pub abort_requested: bool,
    /// The consistency group the session cuts over with, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Waiting for a free session slot.
    #[serde(default)]
    pub queued: bool,
    /// Copied share of the volumes, e.g. `42%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Measured I/O stall at cutover, e.g. `12.345ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cutover_stall: Option<String>,
    /// The session's error, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The effective session settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<SessionConfigStatus>,
    #[serde(default)]
    pub volumes: Vec<VolumeStatus>,
    #[serde(default)]
    pub phase_times: Vec<PhaseTimeStatus>,
    /// `Ready` (True once Completed: the workload runs on the target),
    /// `Progressing`, `Degraded`, and the Job-like pair `Complete` and
    /// `Failed` (one of them True once the migration ended; Failed also
    /// for Aborted), one of each type.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// One volume of the migration: where it is and how far it got.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStatus {
    /// Source claim.
    pub source: String,
    /// Target claim.
    #[serde(default)]
    pub target: String,
    /// The source persistent volume: the volume's name on the agent (for
    /// a volume of volmig's CSI driver, its volume id).
    #[serde(default)]
    pub volume: String,
    /// Set for a volume of volmig's CSI driver (`csi.volmig.io`): the
    /// namespace of its backing claims, where the target claim and the
    /// holder pods are; its record is the VolmigVolume named `volume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_namespace: Option<String>,
    /// The target persistent volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_volume: Option<String>,
    /// The node whose agent serves the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The agent's gRPC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The pod that keeps the target attached to the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder_pod: Option<String>,
    /// The source's backing device on the node (as the agent reports it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_path: Option<String>,
    /// The target's raw device on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_path: Option<String>,
    /// A multi-attach volume (pods on several nodes use it): the other
    /// nodes, whose agents track their pods' writes for the agent above
    /// (which copies) and cut over with it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_with: Vec<SharedAttachment>,
    #[serde(default)]
    pub bytes_total: i64,
    #[serde(default)]
    pub bytes_copied: i64,
    #[serde(default)]
    pub dirty_bytes: i64,
    /// Refresh passes (the first copy pass is not counted).
    #[serde(default)]
    pub passes: i64,
    /// Consecutive refresh passes whose residue did not shrink.
    #[serde(default)]
    pub stalled_passes: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_dirty: Option<i64>,
    #[serde(default)]
    pub mirror: bool,
    /// False when a cutover was forced without convergence.
    #[serde(default)]
    pub converged: bool,
    /// The workload's active device is the target.
    #[serde(default)]
    pub redirected: bool,
    /// Workload writes, bytes/s.
    #[serde(default)]
    pub write_rate: i64,
    /// Copy rate (data, flush included), bytes/s.
    #[serde(default)]
    pub copy_rate: i64,
    /// Times an agent picked the session up again after a restart.
    #[serde(default)]
    pub resumes: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
    /// This volume's session (several in a consistency group; the
    /// top-level fields sum them up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<VolumeSessionStatus>,
}

/// Another node using a multi-attach volume: its agent, and where that
/// node sees the target.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SharedAttachment {
    pub node: String,
    /// The agent's gRPC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The pod that keeps the target attached to this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder_pod: Option<String>,
    /// The target's raw device on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_path: Option<String>,
}

/// One volume's session: what its master needs to continue it.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSessionStatus {
    pub id: String,
    #[serde(default)]
    pub phase: MigrationPhase,
    #[serde(default)]
    pub epoch: i64,
    /// Saves of this volume's record (optimistic concurrency, with the generation).
    #[serde(default)]
    pub revision: i64,
    #[serde(default)]
    pub abort_requested: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default)]
    pub queued: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cutover_stall: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<SessionConfigStatus>,
    #[serde(default)]
    pub phase_times: Vec<PhaseTimeStatus>,
}

/// The settings the session runs with (copied from the spec at creation;
/// the bandwidth follows spec.bandwidthLimit).
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SessionConfigStatus {
    pub copy_mode: CopyModeSpec,
    pub sync_goal_ms: i64,
    /// Bytes per second, 0 = unlimited.
    pub bandwidth: i64,
    pub grain: i64,
    pub chunk_size: i64,
    pub in_flight: i64,
    pub sparse: bool,
    pub verify: VerifySpec,
    pub failback_window_ms: i64,
    pub max_passes: i64,
}

/// When the session entered a phase and left it (RFC 3339, milliseconds).
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PhaseTimeStatus {
    pub phase: MigrationPhase,
    #[schemars(extend("format" = "date-time"))]
    pub start: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub end: Option<String>,
}

/// The condition types a VolumeMigration carries.
pub mod condition {
    /// True once the migration completed: the workload runs on the target.
    pub const READY: &str = "Ready";
    /// True while a session runs; False with the reason while it waits
    /// (Pending) and once it ended.
    pub const PROGRESSING: &str = "Progressing";
    /// True when the migration failed.
    pub const DEGRADED: &str = "Degraded";
    /// Job-like: True once Completed.
    pub const COMPLETE: &str = "Complete";
    /// Job-like: True once Failed or Aborted (the workload stays on a
    /// complete device; the reason says which).
    pub const FAILED: &str = "Failed";
    /// Every type, in the order the operator adds them.
    pub const ALL: [&str; 5] = [READY, PROGRESSING, DEGRADED, COMPLETE, FAILED];
    /// A condition reason (as metav1.Condition's).
    pub const REASON_PATTERN: &str = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$";
    /// A condition type (as metav1.Condition's).
    pub const TYPE_PATTERN: &str = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$";
}

/// A condition's status, as the API conventions spell it.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConditionStatus {
    True,
    False,
    #[default]
    Unknown,
}

impl From<bool> for ConditionStatus {
    fn from(b: bool) -> Self {
        if b { Self::True } else { Self::False }
    }
}

impl std::fmt::Display for ConditionStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// A condition as metav1.Condition has it; one of each type.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    #[schemars(length(min = 1, max = 316), regex(pattern = condition::TYPE_PATTERN))]
    pub type_: String,
    pub status: ConditionStatus,
    /// CamelCase, for programs.
    #[schemars(length(min = 1, max = 1024), regex(pattern = condition::REASON_PATTERN))]
    pub reason: String,
    /// For people.
    #[schemars(length(max = 32768))]
    pub message: String,
    /// When the status last changed (RFC 3339).
    #[schemars(extend("format" = "date-time"))]
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub observed_generation: Option<i64>,
}

/// What the spec asks for, parsed. The twin of the CEL rules, plus what CEL
/// cannot say (parsing the quantities); admission and operator agree.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedSpec {
    pub mode: CopyMode,
    pub sync_goal_ms: u64,
    pub bandwidth: u64,
    pub verify: VerifySpec,
}

/// Checks a spec as the CRD's creation rules do (and parses it). Each
/// message is the rule's.
pub fn check_spec(spec: &VolumeMigrationSpec) -> Result<ParsedSpec, Vec<String>> {
    let mut errs = Vec::new();
    let v = &spec.volumes;
    if v.is_empty() {
        errs.push(rules::VOLUMES_NOT_EMPTY_MSG.to_string());
    }
    if v.len() > MAX_VOLUMES {
        errs.push(format!(
            "spec.volumes may hold at most {MAX_VOLUMES} entries"
        ));
    }
    let src = |p: &VolumePair| p.source.persistent_volume_claim.clone();
    if !v
        .iter()
        .all(|a| v.iter().filter(|b| src(b) == src(a)).count() == 1)
    {
        errs.push(rules::UNIQUE_SOURCES_MSG.to_string());
    }
    if !v.iter().all(|a| {
        a.target
            .persistent_volume_claim
            .as_ref()
            .is_none_or(|t| v.iter().all(|b| &src(b) != t))
    }) {
        errs.push(rules::TARGET_NOT_A_SOURCE_MSG.to_string());
    }
    for p in v {
        if p.target.storage_class_name.is_some() == p.target.persistent_volume_claim.is_some() {
            errs.push(rules::ONE_TARGET_MSG.to_string());
        }
        for name in [
            Some(&p.source.persistent_volume_claim),
            p.target.storage_class_name.as_ref(),
            p.target.persistent_volume_claim.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            if name.is_empty() || name.len() > 253 {
                errs.push(format!(
                    "{name:?} is not a valid name (1 to 253 characters)"
                ));
            }
        }
    }
    let sync_goal_ms = match parse_duration(&spec.sync_goal) {
        Ok(d) if d.as_millis() > 0 && pattern_duration(&spec.sync_goal) => d.as_millis() as u64,
        Ok(_) if pattern_duration(&spec.sync_goal) => {
            errs.push(format!(
                "spec.syncGoal {:?} must be at least 1ms",
                spec.sync_goal
            ));
            0
        }
        _ => {
            errs.push(format!(
                "spec.syncGoal {:?} is not a duration (e.g. 100ms, 2s)",
                spec.sync_goal
            ));
            0
        }
    };
    let bandwidth = match &spec.bandwidth_limit {
        None => 0,
        Some(q) => match parse_size(q) {
            Ok(n) if pattern_quantity(q) => n,
            _ => {
                errs.push(format!(
                    "spec.bandwidthLimit {q:?} is not a whole quantity (e.g. 200Mi, 1G)"
                ));
                0
            }
        },
    };
    errs.dedup();
    if errs.is_empty() {
        Ok(ParsedSpec {
            mode: spec.copy_mode.into(),
            sync_goal_ms,
            bandwidth,
            verify: spec.verify,
        })
    } else {
        Err(errs)
    }
}

/// The transition rules (an update from `old` to `new`).
pub fn check_update(
    old: &VolumeMigrationSpec,
    new: &VolumeMigrationSpec,
    ended: bool,
) -> Result<(), Vec<String>> {
    let mut errs = Vec::new();
    if old.abort && !new.abort {
        errs.push(rules::ABORT_STAYS_MSG.to_string());
    }
    if old.volumes != new.volumes {
        errs.push(rules::VOLUMES_FIXED_MSG.to_string());
    }
    if ended && new.abort && !old.abort {
        errs.push(rules::NO_ABORT_AFTER_END_MSG.to_string());
    }
    if errs.is_empty() { Ok(()) } else { Err(errs) }
}

/// `rules::DURATION_PATTERN`, without a regex engine.
fn pattern_duration(s: &str) -> bool {
    let Some(num) = ["ms", "s", "m", "h"].iter().find_map(|u| s.strip_suffix(u)) else {
        return false;
    };
    let mut parts = num.splitn(2, '.');
    let int = parts.next().unwrap_or("");
    let digits = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
    digits(int) && parts.next().is_none_or(digits)
}

/// `rules::QUANTITY_PATTERN`, without a regex engine.
fn pattern_quantity(s: &str) -> bool {
    let num = ["Ki", "Mi", "Gi", "Ti", "K", "M", "G", "T", "k"]
        .iter()
        .find_map(|u| s.strip_suffix(u))
        .unwrap_or(s);
    !num.is_empty() && num.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_the_parsers() {
        for ok in ["100ms", "2s", "1.5m", "1h"] {
            assert!(pattern_duration(ok) && parse_duration(ok).is_ok(), "{ok}");
        }
        for bad in ["", "ms", "1", "1.s", "-1s", "1 s", "1d"] {
            assert!(!pattern_duration(bad), "{bad}");
        }
        for ok in ["200Mi", "1G", "4096", "10k"] {
            assert!(pattern_quantity(ok) && parse_size(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Mi", "1.5Gi", "200MB", "-1"] {
            assert!(!pattern_quantity(bad), "{bad}");
        }
    }

    #[test]
    fn phases_convert_both_ways() {
        for p in Phase::ALL {
            assert_eq!(MigrationPhase::from(p).session_phase(), Some(p));
        }
        assert_eq!(MigrationPhase::Pending.session_phase(), None);
    }
}
