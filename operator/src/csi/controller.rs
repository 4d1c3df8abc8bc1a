//! The controller service's logic, over the Kubernetes API (the
//! `VolmigVolume` records, backing claims and holder pods in volmig's
//! namespace). Every call reads what is there and brings the cluster to
//! the state the call describes, whatever part of it a crashed or
//! repeated earlier call already did; writes of a record carry its
//! resourceVersion, so two calls racing on one volume cannot lose each
//! other's change (the loser gets UNAVAILABLE and is retried).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tracing::info;
use volmig_api::crd::{
    MigrationPhase, VolmigVolume, VolmigVolumeSpec, VolmigVolumeStatus, VolumeAttachmentRecord,
    VolumeHistory, VolumeMigration, WorkloadClaim,
};
use volmig_api::csi_driver::{BACKING_CLASS_PARAM, BACKING_DEVICE_KEY, FS_TYPE_PARAM, SIZE_KEY};
use volmig_api::units::parse_size;

use super::error::{ControllerError, ControllerResult, Kind};
use crate::reconcile::resolve::{MANAGED_BY, holder_pod_in};
use crate::target::device_path;

/// The label naming the volume (its id) on everything made for it.
pub const VOLUME_LABEL: &str = "volmig.io/volume";

/// Filesystems the node plugin makes (`volmig_node_agent::csi::FILESYSTEMS`).
pub const FILESYSTEMS: [&str; 4] = ["ext4", "xfs", "ext3", "ext2"];

/// The provisioner's own parameters (`--extra-create-metadata`).
const PROVISIONER_PREFIX: &str = "csi.storage.k8s.io/";
const PVC_NAME: &str = "csi.storage.k8s.io/pvc/name";
const PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";

/// Sizes are whole MiB (every backing class takes those).
const ROUND: u64 = 1 << 20;

/// The controller's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// volmig's namespace: the backing claims and holder pods live here.
    pub namespace: String,
    /// The holder pods' image.
    pub holder_image: String,
    /// kubelet's directory on the nodes, as the agents mount it.
    pub kubelet_dir: String,
    /// How long ControllerPublishVolume waits for its holder pod to run
    /// before answering ABORTED (the attacher calls again).
    pub publish_wait: Duration,
    /// The size of a volume whose request names none.
    pub default_bytes: u64,
}

/// How a CO means to use a volume, in the controller's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    /// The Kubernetes access mode of a backing claim serving it.
    pub fn kube(self) -> &'static str {
        match self {
            AccessMode::MultiNodeReaderOnly => "ReadOnlyMany",
            AccessMode::MultiNodeSingleWriter | AccessMode::MultiNodeMultiWriter => "ReadWriteMany",
            _ => "ReadWriteOnce",
        }
    }

    fn multi_node(self) -> bool {
        matches!(
            self,
            AccessMode::MultiNodeReaderOnly
                | AccessMode::MultiNodeSingleWriter
                | AccessMode::MultiNodeMultiWriter
        )
    }
}

/// A volume capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cap {
    pub block: bool,
    /// Mount access: the filesystem asked for ("" = any).
    pub fs_type: String,
    pub mode: AccessMode,
}

impl Cap {
    /// Why the driver cannot serve a volume so, if it cannot.
    fn unsupported(&self) -> Option<String> {
        if self.block {
            return None;
        }
        if !self.fs_type.is_empty() && !FILESYSTEMS.contains(&self.fs_type.as_str()) {
            return Some(format!(
                "filesystem {:?} is not supported (one of {})",
                self.fs_type,
                FILESYSTEMS.join(", ")
            ));
        }
        if matches!(
            self.mode,
            AccessMode::MultiNodeSingleWriter | AccessMode::MultiNodeMultiWriter
        ) {
            return Some(format!(
                "a filesystem cannot be written from several nodes ({:?}): use block access",
                self.mode
            ));
        }
        None
    }
}

/// CreateVolume, converted from the request.
#[derive(Debug, Clone, Default)]
pub struct CreateVolume {
    pub name: String,
    pub required_bytes: u64,
    pub limit_bytes: u64,
    pub caps: Vec<Cap>,
    pub parameters: BTreeMap<String, String>,
    pub mutable_parameters: BTreeMap<String, String>,
    /// A snapshot or volume to copy from (not supported).
    pub content_source: bool,
}

/// A created volume.
#[derive(Debug, Clone, PartialEq)]
pub struct Created {
    pub volume_id: String,
    pub capacity_bytes: u64,
    pub volume_context: BTreeMap<String, String>,
}

/// What ControllerModifyVolume came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Modified {
    /// The volume is on the class asked for.
    Done,
}

/// The stable id of the volume CreateVolume `name` makes: `vm-` and 32
/// hex digits of the name's SHA-256 (what no migration changes; a valid
/// agent volume name and object name).
pub fn volume_id(name: &str) -> String {
    format!("vm-{}", &hex(name)[..32])
}

fn hex(s: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The `n`th backing claim of volume `id` (0: CreateVolume's).
pub fn backing_claim_name(id: &str, n: usize) -> String {
    format!("{id}-b{n}")
}

/// The holder pod of volume `id` on `node`.
pub fn holder_name(id: &str, node: &str) -> String {
    format!("{id}-{}", &hex(node)[..10])
}

/// The VolumeMigration ControllerModifyVolume makes to move volume `id`
/// to backing class `class`.
pub fn modify_migration_name(id: &str, class: &str) -> String {
    format!("{id}-to-{}", &hex(class)[..10])
}

fn round_up(n: u64) -> u64 {
    n.div_ceil(ROUND).saturating_mul(ROUND)
}

fn required(v: &str, field: &str) -> ControllerResult<()> {
    if v.is_empty() {
        Err(ControllerError::missing(field))
    } else {
        Ok(())
    }
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

fn claim_bytes(c: &PersistentVolumeClaim) -> Option<u64> {
    let q = c.status.as_ref()?.capacity.as_ref()?.get("storage")?;
    parse_size(&q.0).ok()
}

fn bound(c: &PersistentVolumeClaim) -> bool {
    c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
        && c.spec
            .as_ref()
            .and_then(|s| s.volume_name.as_ref())
            .is_some()
}

/// Whether a migration is in one of its end phases.
fn ended(vm: &VolumeMigration) -> Option<MigrationPhase> {
    let p = vm.status.as_ref()?.phase;
    matches!(
        p,
        MigrationPhase::Completed | MigrationPhase::Aborted | MigrationPhase::Failed
    )
    .then_some(p)
}

/// The labels of what is made for volume `id`.
fn volume_labels(id: &str) -> BTreeMap<String, String> {
    [
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
        (VOLUME_LABEL.to_string(), id.to_string()),
    ]
    .into()
}

/// The holder pod of attachment `a` of volume `id` (in `namespace`, of
/// `image`): a target holder (the chart's admission policy admits exactly
/// these) labelled with the volume.
pub fn attachment_holder(
    namespace: &str,
    id: &str,
    a: &VolumeAttachmentRecord,
    image: &str,
) -> ControllerResult<Pod> {
    let mut p = holder_pod_in(namespace, &a.holder_pod, &a.node, &a.claim, image)
        .map_err(|e| ControllerError::internal(e.to_string()))?;
    p.metadata
        .labels
        .get_or_insert_default()
        .extend(volume_labels(id));
    Ok(p)
}

pub struct Controller {
    client: Client,
    settings: Settings,
    /// The served CRDs were found current (checked until they are).
    crds_current: AtomicBool,
}

impl Controller {
    pub fn new(client: Client, settings: Settings) -> Self {
        Self {
            client,
            settings,
            crds_current: AtomicBool::new(false),
        }
    }

    /// UNAVAILABLE (the sidecars retry, and the claim's events say why)
    /// while the cluster serves CRDs of another version than this build's:
    /// the API server would drop the record's fields it does not know.
    async fn crds_current(&self) -> ControllerResult<()> {
        if self.crds_current.load(Ordering::Acquire) {
            return Ok(());
        }
        match crate::startup::check_crd(&self.client).await {
            Ok(()) => {
                self.crds_current.store(true, Ordering::Release);
                info!("the CRDs are current");
                Ok(())
            }
            Err(e) => Err(ControllerError::new(Kind::Unavailable, e.to_string())),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn records(&self) -> Api<VolmigVolume> {
        Api::all(self.client.clone())
    }

    fn claims(&self) -> Api<PersistentVolumeClaim> {
        Api::namespaced(self.client.clone(), &self.settings.namespace)
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.settings.namespace)
    }

    /// The record of volume `id`; NOT_FOUND if there is none.
    async fn record(&self, id: &str) -> ControllerResult<VolmigVolume> {
        self.crds_current().await?;
        self.records()
            .get_opt(id)
            .await?
            .ok_or_else(|| ControllerError::not_found(format!("no volmig volume has the id {id}")))
    }

    /// Replaces `rec`'s status with `f`'s change of it, under `rec`'s
    /// resourceVersion (a concurrent change fails it: UNAVAILABLE, retry).
    async fn update_status(
        &self,
        rec: &VolmigVolume,
        f: impl FnOnce(&mut VolmigVolumeStatus),
    ) -> ControllerResult<VolmigVolume> {
        let mut next = rec.clone();
        f(next.status.get_or_insert_default());
        if next.status == rec.status {
            return Ok(next);
        }
        Ok(self
            .records()
            .replace_status(&rec.name_any(), &PostParams::default(), &next)
            .await?)
    }

    // ---- CreateVolume ----------------------------------------------------

    pub async fn create(&self, r: CreateVolume) -> ControllerResult<Created> {
        required(&r.name, "name")?;
        if r.caps.is_empty() {
            return Err(ControllerError::missing("volume_capabilities"));
        }
        if r.content_source {
            return Err(ControllerError::invalid(
                "volume_content_source is not supported: volmig volumes are created empty (no CLONE_VOLUME, no snapshots)",
            ));
        }
        if let Some(why) = r.caps.iter().find_map(Cap::unsupported) {
            return Err(ControllerError::invalid(why));
        }
        // parameters: ours, and the provisioner's metadata
        let mut parameters = BTreeMap::new();
        for (k, v) in &r.parameters {
            if k.starts_with(PROVISIONER_PREFIX) {
                continue;
            }
            if k != BACKING_CLASS_PARAM && k != FS_TYPE_PARAM {
                return Err(ControllerError::invalid(format!(
                    "unknown parameter {k:?}: volmig's StorageClass parameters are {BACKING_CLASS_PARAM} and {FS_TYPE_PARAM}"
                )));
            }
            parameters.insert(k.clone(), v.clone());
        }
        if let Some(k) = r
            .mutable_parameters
            .keys()
            .find(|k| k.as_str() != BACKING_CLASS_PARAM)
        {
            return Err(ControllerError::invalid(format!(
                "unknown mutable parameter {k:?}: a VolumeAttributesClass of volmig can set {BACKING_CLASS_PARAM} only"
            )));
        }
        let class = r
            .mutable_parameters
            .get(BACKING_CLASS_PARAM)
            .or_else(|| parameters.get(BACKING_CLASS_PARAM))
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                ControllerError::invalid(format!(
                    "parameter {BACKING_CLASS_PARAM} is required: the StorageClass (of a driver with raw block volumes) that holds the volume's bytes"
                ))
            })?;
        let fs_type = match parameters.get(FS_TYPE_PARAM) {
            Some(fs) => {
                let fs = fs.trim().to_ascii_lowercase();
                if !FILESYSTEMS.contains(&fs.as_str()) {
                    return Err(ControllerError::invalid(format!(
                        "parameter {FS_TYPE_PARAM}={fs:?} is not supported (one of {})",
                        FILESYSTEMS.join(", ")
                    )));
                }
                Some(fs)
            }
            None => None,
        };
        let size = {
            let want = if r.required_bytes > 0 {
                r.required_bytes
            } else if r.limit_bytes > 0 {
                self.settings.default_bytes.min(r.limit_bytes)
            } else {
                self.settings.default_bytes
            };
            round_up(want)
        };
        if r.limit_bytes > 0 && size > r.limit_bytes {
            return Err(ControllerError::new(
                super::error::Kind::OutOfRange,
                format!(
                    "capacity: {} bytes rounded up to whole MiB is {size}, above the limit of {}",
                    r.required_bytes, r.limit_bytes
                ),
            ));
        }
        let mut access_modes: Vec<String> =
            r.caps.iter().map(|c| c.mode.kube().to_string()).collect();
        access_modes.sort();
        access_modes.dedup();
        let claim = match (r.parameters.get(PVC_NAMESPACE), r.parameters.get(PVC_NAME)) {
            (Some(ns), Some(name)) => Some(WorkloadClaim {
                namespace: ns.clone(),
                name: name.clone(),
            }),
            _ => None,
        };
        let id = volume_id(&r.name);
        let spec = VolmigVolumeSpec {
            request_name: r.name.clone(),
            capacity_bytes: size,
            backing_storage_class: class.clone(),
            backing_namespace: self.settings.namespace.clone(),
            access_modes,
            block: r.caps.iter().any(|c| c.block),
            fs_type,
            parameters,
            claim,
        };

        // the record, first: whatever is made after it, it says
        self.crds_current().await?;
        let rec = match self.records().get_opt(&id).await? {
            Some(rec) => rec,
            None => {
                let rec = VolmigVolume {
                    metadata: ObjectMeta {
                        name: Some(id.clone()),
                        labels: Some(volume_labels(&id)),
                        ..ObjectMeta::default()
                    },
                    spec: spec.clone(),
                    status: None,
                };
                match self.records().create(&PostParams::default(), &rec).await {
                    Ok(rec) => {
                        info!(volume = %id, name = %r.name, class = %class, bytes = size, "volume recorded");
                        rec
                    }
                    Err(kube::Error::Api(ae)) if ae.code == 409 => self.record(&id).await?,
                    Err(e) => return Err(e.into()),
                }
            }
        };
        if let Some(why) = incompatible(&rec.spec, &spec) {
            return Err(ControllerError::exists(format!(
                "a volume named {} exists with {why}",
                r.name
            )));
        }

        // the backing claim, recorded before it is made
        let rec = match rec.status.as_ref().and_then(|s| s.current_claim.clone()) {
            Some(_) => rec,
            None => {
                let name = backing_claim_name(&id, 0);
                self.update_status(&rec, |s| {
                    s.current_claim = Some(name.clone());
                    s.storage_class = Some(class.clone());
                    s.capacity_bytes = Some(size);
                    if !s.claims.contains(&name) {
                        s.claims.push(name.clone());
                    }
                    s.history.push(VolumeHistory {
                        time: now(),
                        event: "Created".into(),
                        from_claim: None,
                        to_claim: name.clone(),
                        storage_class: class.clone(),
                        migration: None,
                    });
                })
                .await?
            }
        };
        let status = rec.status.clone().unwrap_or_default();
        let claim_name = status.current_claim.clone().unwrap_or_default();
        let claim_class = status.storage_class.clone().unwrap_or(class);
        let claim = match self.claims().get_opt(&claim_name).await? {
            Some(c) => c,
            None => {
                let c = self.backing_claim(&id, &claim_name, &claim_class, &rec.spec);
                match self.claims().create(&PostParams::default(), &c).await {
                    Ok(c) => {
                        info!(volume = %id, claim = %claim_name, class = %claim_class, "backing claim created");
                        c
                    }
                    Err(kube::Error::Api(ae)) if ae.code == 409 => {
                        self.claims().get(&claim_name).await?
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        if !bound(&claim) {
            return Err(ControllerError::pending(format!(
                "backing claim {}/{claim_name} (class {claim_class}) is {}: the volume is ready once it is bound",
                self.settings.namespace,
                claim
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.as_deref())
                    .unwrap_or("Pending"),
            ))
            .volume(&id));
        }
        let capacity = claim_bytes(&claim)
            .unwrap_or(size)
            .max(status.capacity_bytes.unwrap_or(size));
        Ok(Created {
            volume_id: id,
            capacity_bytes: capacity,
            volume_context: [(SIZE_KEY.to_string(), rec.spec.capacity_bytes.to_string())].into(),
        })
    }

    /// A backing claim `name` of volume `id`: a raw block device of
    /// `class` as large as the volume, with the volume's access modes.
    fn backing_claim(
        &self,
        id: &str,
        name: &str,
        class: &str,
        spec: &VolmigVolumeSpec,
    ) -> PersistentVolumeClaim {
        backing_claim(
            &self.settings.namespace,
            id,
            name,
            class,
            spec.capacity_bytes,
            &spec.access_modes,
        )
    }

    // ---- DeleteVolume ----------------------------------------------------

    pub async fn delete(&self, id: &str) -> ControllerResult<()> {
        required(id, "volume_id")?;
        self.crds_current().await?;
        let Some(rec) = self.records().get_opt(id).await? else {
            return Ok(());
        };
        let status = rec.status.clone().unwrap_or_default();
        if !status.attachments.is_empty() {
            return Err(ControllerError::precondition(format!(
                "the volume is still published on node(s) {}",
                status
                    .attachments
                    .iter()
                    .map(|a| a.node.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if let Some(m) = self.running_migration(&rec).await? {
            return Err(ControllerError::precondition(format!(
                "VolumeMigration {m} is moving the volume; delete it (the migration rolls back) or wait for it to end"
            )));
        }
        for c in &status.claims {
            match self.claims().delete(c, &DeleteParams::background()).await {
                Ok(_) => info!(volume = %id, claim = %c, "backing claim released"),
                Err(kube::Error::Api(ae)) if ae.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        match self.records().delete(id, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(ae)) if ae.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        info!(volume = %id, "volume deleted");
        Ok(())
    }

    /// The VolumeMigration (`namespace/name`) moving volume `rec` now, if
    /// one does: the one of the workload's claim that has not ended.
    async fn running_migration(&self, rec: &VolmigVolume) -> ControllerResult<Option<String>> {
        let Some(claim) = &rec.spec.claim else {
            return Ok(None);
        };
        let vms: Api<VolumeMigration> = Api::namespaced(self.client.clone(), &claim.namespace);
        let list = vms.list(&Default::default()).await?;
        Ok(list
            .items
            .iter()
            .filter(|vm| ended(vm).is_none())
            .find(|vm| {
                vm.spec
                    .volumes
                    .iter()
                    .any(|p| p.source.persistent_volume_claim == claim.name)
            })
            .map(|vm| format!("{}/{}", claim.namespace, vm.name_any())))
    }

    // ---- ControllerPublishVolume / ControllerUnpublishVolume ---------------

    pub async fn publish(
        &self,
        id: &str,
        node: &str,
        cap: Option<Cap>,
        readonly: bool,
    ) -> ControllerResult<BTreeMap<String, String>> {
        required(id, "volume_id")?;
        required(node, "node_id")?;
        let cap = cap.ok_or_else(|| ControllerError::missing("volume_capability"))?;
        if let Some(why) = cap.unsupported() {
            return Err(ControllerError::invalid(why));
        }
        let rec = self.record(id).await?;
        let nodes: Api<Node> = Api::all(self.client.clone());
        if nodes.get_opt(node).await?.is_none() {
            return Err(ControllerError::not_found(format!(
                "node {node} does not exist"
            )));
        }
        let status = rec.status.clone().unwrap_or_default();
        let Some(claim) = status.current_claim.clone() else {
            return Err(ControllerError::pending(
                "the volume has no backing claim yet (CreateVolume has not finished)",
            ));
        };
        let rec = match status.attachments.iter().find(|a| a.node == node) {
            Some(a) if a.readonly != readonly => {
                return Err(ControllerError::exists(format!(
                    "the volume is published on node {node} {}",
                    if a.readonly {
                        "read-only"
                    } else {
                        "read-write"
                    }
                )));
            }
            Some(_) => rec,
            None => {
                if !cap.mode.multi_node()
                    && let Some(other) = status.attachments.first()
                {
                    return Err(ControllerError::precondition(format!(
                        "the volume is published on node {}, and its access mode ({:?}) allows one node",
                        other.node, cap.mode
                    )));
                }
                // A session runs on the agents of the nodes published when
                // it started; a node joining mid-way would write to the
                // source beside it, and those writes would be lost at the
                // cutover. It joins when the migration has ended.
                if let Some(t) = status.targets.first() {
                    return Err(ControllerError::pending(format!(
                        "VolumeMigration {} is moving the volume to backing claim {}; node {node} is attached when it ends",
                        t.migration, t.claim
                    )));
                }
                let holder = holder_name(id, node);
                self.update_status(&rec, |s| {
                    s.attachments.push(VolumeAttachmentRecord {
                        node: node.to_string(),
                        holder_pod: holder,
                        claim: claim.clone(),
                        readonly,
                    });
                })
                .await?
            }
        };
        let a = rec
            .status
            .as_ref()
            .and_then(|s| s.attachments.iter().find(|a| a.node == node))
            .cloned()
            .ok_or_else(|| ControllerError::internal("the attachment just recorded is gone"))?;
        let path = self.hold(id, &a).await?;
        Ok([(BACKING_DEVICE_KEY.to_string(), path)].into())
    }

    /// Makes attachment `a`'s holder pod (if missing) and waits for it to
    /// run: the raw device's path on the node, where the agent (which
    /// mounts kubelet's directory) opens it.
    async fn hold(&self, id: &str, a: &VolumeAttachmentRecord) -> ControllerResult<String> {
        let pod = match self.pods().get_opt(&a.holder_pod).await? {
            Some(p) => p,
            None => {
                let p = attachment_holder(
                    &self.settings.namespace,
                    id,
                    a,
                    &self.settings.holder_image,
                )?;
                match self.pods().create(&PostParams::default(), &p).await {
                    Ok(p) => {
                        info!(volume = %id, node = %a.node, pod = %a.holder_pod, claim = %a.claim, "holder pod created");
                        p
                    }
                    Err(kube::Error::Api(ae)) if ae.code == 409 => {
                        self.pods().get(&a.holder_pod).await?
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(a.node.as_str()) {
            return Err(ControllerError::precondition(format!(
                "pod {}/{} is not on node {}; delete it",
                self.settings.namespace, a.holder_pod, a.node
            )));
        }
        let running =
            |p: &Pod| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        let deadline = tokio::time::Instant::now() + self.settings.publish_wait;
        let mut pod = pod;
        while !running(&pod) {
            if tokio::time::Instant::now() >= deadline {
                return Err(ControllerError::pending(format!(
                    "holder pod {}/{} is not running yet on node {} (it attaches backing claim {})",
                    self.settings.namespace, a.holder_pod, a.node, a.claim
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            pod = self.pods().get(&a.holder_pod).await?;
        }
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let claim = self.claims().get(&a.claim).await?;
        let Some(pv_name) = claim.spec.as_ref().and_then(|s| s.volume_name.clone()) else {
            return Err(ControllerError::pending(format!(
                "backing claim {} is not bound",
                a.claim
            )));
        };
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        let pv = pvs.get(&pv_name).await?;
        device_path(&self.settings.kubelet_dir, &uid, &pv)
            .map_err(|e| ControllerError::precondition(e.to_string()))
    }

    /// Removes the holder pod on `node` (every node if empty).
    pub async fn unpublish(&self, id: &str, node: &str) -> ControllerResult<()> {
        required(id, "volume_id")?;
        let rec = self.record(id).await?;
        let status = rec.status.clone().unwrap_or_default();
        let gone: Vec<VolumeAttachmentRecord> = status
            .attachments
            .iter()
            .filter(|a| node.is_empty() || a.node == node)
            .cloned()
            .collect();
        for a in &gone {
            match self
                .pods()
                .delete(&a.holder_pod, &DeleteParams::default())
                .await
            {
                Ok(_) => {
                    info!(volume = %id, node = %a.node, pod = %a.holder_pod, "holder pod deleted")
                }
                Err(kube::Error::Api(ae)) if ae.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        if !gone.is_empty() {
            self.update_status(&rec, |s| {
                s.attachments.retain(|a| !gone.contains(a));
            })
            .await?;
        }
        Ok(())
    }

    // ---- ControllerExpandVolume ------------------------------------------

    /// Grows the current backing claim to `required` bytes (rounded);
    /// ABORTED until the backing claim has that much.
    pub async fn expand(
        &self,
        id: &str,
        required_bytes: u64,
        limit_bytes: u64,
    ) -> ControllerResult<u64> {
        required(id, "volume_id")?;
        if required_bytes == 0 && limit_bytes == 0 {
            return Err(ControllerError::missing("capacity_range"));
        }
        let rec = self.record(id).await?;
        let want = round_up(required_bytes.max(1));
        if limit_bytes > 0 && want > limit_bytes {
            return Err(ControllerError::new(
                super::error::Kind::OutOfRange,
                format!(
                    "{required_bytes} bytes rounded up to whole MiB is {want}, above the limit of {limit_bytes}"
                ),
            ));
        }
        let status = rec.status.clone().unwrap_or_default();
        let Some(claim_name) = status.current_claim.clone() else {
            return Err(ControllerError::pending(
                "the volume has no backing claim yet",
            ));
        };
        let have = status.capacity_bytes.unwrap_or(rec.spec.capacity_bytes);
        let want = want.max(have);
        let claim = self.claims().get(&claim_name).await?;
        let asked = claim
            .spec
            .as_ref()
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"))
            .and_then(|q| parse_size(&q.0).ok())
            .unwrap_or(0);
        if asked < want
            && let Some(t) = status.targets.first()
        {
            // the target was sized from the current claim: grow after the move
            return Err(ControllerError::pending(format!(
                "VolumeMigration {} is moving the volume to backing claim {}; the expansion to {want} bytes waits for it",
                t.migration, t.claim
            )));
        }
        if asked < want {
            let patch = json!({"spec": {"resources": {"requests": {"storage": want.to_string()}}}});
            self.claims()
                .patch(&claim_name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            info!(volume = %id, claim = %claim_name, bytes = want, "backing claim grows");
        }
        if status.capacity_bytes != Some(want) {
            self.update_status(&rec, |s| s.capacity_bytes = Some(want))
                .await?;
        }
        match claim_bytes(&claim) {
            Some(b) if b >= want => Ok(b),
            b => Err(ControllerError::pending(format!(
                "backing claim {claim_name} holds {} bytes; waiting for {want}",
                b.unwrap_or(0)
            ))),
        }
    }

    // ---- ControllerModifyVolume ------------------------------------------

    /// A new `backingStorageClass`: a VolumeMigration of the workload's
    /// claim to that class, made once; ABORTED while it runs, done when
    /// the record says the volume is on that class.
    pub async fn modify(
        &self,
        id: &str,
        mutable: &BTreeMap<String, String>,
    ) -> ControllerResult<Modified> {
        required(id, "volume_id")?;
        if let Some(k) = mutable.keys().find(|k| k.as_str() != BACKING_CLASS_PARAM) {
            return Err(ControllerError::invalid(format!(
                "unknown mutable parameter {k:?}: a VolumeAttributesClass of volmig can set {BACKING_CLASS_PARAM} only"
            )));
        }
        let rec = self.record(id).await?;
        let Some(class) = mutable
            .get(BACKING_CLASS_PARAM)
            .map(|c| c.trim().to_string())
        else {
            return Ok(Modified::Done);
        };
        if class.is_empty() {
            return Err(ControllerError::invalid(format!(
                "{BACKING_CLASS_PARAM} must name a storage class"
            )));
        }
        let status = rec.status.clone().unwrap_or_default();
        if status.storage_class.as_deref() == Some(class.as_str()) {
            return Ok(Modified::Done);
        }
        let Some(claim) = rec.spec.claim.clone() else {
            return Err(ControllerError::precondition(
                "the volume's claim is unknown (the provisioner ran without --extra-create-metadata): create a VolumeMigration of the claim instead",
            ));
        };
        let name = modify_migration_name(id, &class);
        let vms: Api<VolumeMigration> = Api::namespaced(self.client.clone(), &claim.namespace);
        if let Some(other) = self.running_migration(&rec).await?
            && other != format!("{}/{name}", claim.namespace)
        {
            return Err(ControllerError::pending(format!(
                "VolumeMigration {other} is moving the volume; the change to {class} waits for it"
            )));
        }
        let vm = match vms.get_opt(&name).await? {
            Some(vm) => vm,
            None => {
                let vm: VolumeMigration = serde_json::from_value(json!({
                    "apiVersion": "volmig.io/v1alpha1", "kind": "VolumeMigration",
                    "metadata": {"name": name, "namespace": claim.namespace, "labels": volume_labels(id)},
                    "spec": {"volumes": [{"source": {"persistentVolumeClaim": claim.name},
                                          "target": {"storageClassName": class}}]},
                }))
                .map_err(|e| ControllerError::internal(format!("VolumeMigration: {e}")))?;
                match vms.create(&PostParams::default(), &vm).await {
                    Ok(vm) => {
                        info!(volume = %id, migration = %name, class = %class, "migration to a new backing class created");
                        vm
                    }
                    Err(kube::Error::Api(ae)) if ae.code == 409 => vms.get(&name).await?,
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let phase = vm.status.as_ref().map(|s| s.phase);
        match ended(&vm) {
            Some(MigrationPhase::Completed) => Err(ControllerError::pending(format!(
                "VolumeMigration {}/{name} completed; waiting for the volume's record to name class {class}",
                claim.namespace
            ))),
            Some(p) => Err(ControllerError::precondition(format!(
                "VolumeMigration {}/{name} to class {class} ended {p:?}; delete it to try again",
                claim.namespace
            ))),
            None => Err(ControllerError::pending(format!(
                "VolumeMigration {}/{name} moves the volume to class {class} ({})",
                claim.namespace,
                phase.map_or("starting".to_string(), |p| format!("{p:?}"))
            ))),
        }
    }

    // ---- ValidateVolumeCapabilities --------------------------------------

    /// Whether volume `id` can be used with every one of `caps` (None:
    /// not, and why).
    pub async fn validate(&self, id: &str, caps: &[Cap]) -> ControllerResult<Option<String>> {
        required(id, "volume_id")?;
        if caps.is_empty() {
            return Err(ControllerError::missing("volume_capabilities"));
        }
        let rec = self.record(id).await?;
        for c in caps {
            if let Some(why) = c.unsupported() {
                return Ok(Some(why));
            }
            if !rec.spec.access_modes.iter().any(|m| m == c.mode.kube()) {
                return Ok(Some(format!(
                    "the volume was created for {}, not {:?}",
                    rec.spec.access_modes.join(", "),
                    c.mode
                )));
            }
        }
        Ok(None)
    }
}

/// How `have` differs from what a repeated CreateVolume asks (`want`), if
/// it does.
fn incompatible(have: &VolmigVolumeSpec, want: &VolmigVolumeSpec) -> Option<String> {
    if have.capacity_bytes != want.capacity_bytes {
        return Some(format!(
            "{} bytes, not {}",
            have.capacity_bytes, want.capacity_bytes
        ));
    }
    if have.backing_storage_class != want.backing_storage_class {
        return Some(format!(
            "backing class {}, not {}",
            have.backing_storage_class, want.backing_storage_class
        ));
    }
    if have.parameters != want.parameters {
        return Some(format!(
            "parameters {:?}, not {:?}",
            have.parameters, want.parameters
        ));
    }
    if have.access_modes != want.access_modes || have.block != want.block {
        return Some(format!(
            "access {:?} {}, not {:?} {}",
            have.access_modes,
            if have.block { "block" } else { "mount" },
            want.access_modes,
            if want.block { "block" } else { "mount" }
        ));
    }
    None
}

/// Backing claim `ns/name` of volume `id`: `bytes` of `class` as a raw
/// block device, labelled with the volume.
pub fn backing_claim(
    ns: &str,
    id: &str,
    name: &str,
    class: &str,
    bytes: u64,
    access_modes: &[String],
) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(ns.to_string()),
            labels: Some(
                [
                    (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
                    (VOLUME_LABEL.to_string(), id.to_string()),
                ]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(k8s_openapi::api::core::v1::PersistentVolumeClaimSpec {
            access_modes: Some(access_modes.to_vec()),
            volume_mode: Some("Block".into()),
            storage_class_name: Some(class.to_string()),
            resources: Some(k8s_openapi::api::core::v1::VolumeResourceRequirements {
                requests: Some([("storage".to_string(), Quantity(bytes.to_string()))].into()),
                limits: None,
            }),
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_valid_and_distinct() {
        let a = volume_id("pvc-1");
        assert_eq!(a, volume_id("pvc-1"));
        assert_ne!(a, volume_id("pvc-2"));
        assert_eq!(a.len(), 35);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
        assert_ne!(holder_name(&a, "n1"), holder_name(&a, "n2"));
        assert!(holder_name(&a, &"n".repeat(253)).len() < 63);
        assert_eq!(round_up(1), 1 << 20);
        assert_eq!(round_up(1 << 20), 1 << 20);
    }
}
