//! From a VolumeMigration's spec to what a session needs: the source claim's
//! PV (the volume's name on the agent), the node where pods use it, that
//! node's agent, a target claim (created or validated) and the target's raw
//! device on the node (through a holder pod). Each step either goes on or
//! waits with a reason a person (or the cluster catching up: a GitOps tool
//! applies the migration, the claim, the workload and the agents in any
//! order) can act on. Nothing here fails a migration: only an invalid spec
//! does (see [`super::apply`]).

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{
    PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec, Pod,
};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use volmig_api::crd::{VolumeMigration, VolumePair, VolumeStatus};
use volmig_api::units::parse_size;

use super::Context;
use crate::agents::Connector;
use crate::cache::Read;
use crate::error::Result;
use crate::target::device_path;

/// Labels on what the operator creates. Target claims and holder pods
/// carry no owner reference: once the workload runs on a target, nothing
/// may delete it behind the operator's back, and the garbage collector
/// deletes dependents without asking (at once under foreground deletion,
/// as Argo CD deletes). The migration's uid label says whose they are.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "volmig");
pub const MIGRATION_LABEL: &str = "volmig.io/migration";
/// The uid of the migration that created the object: another migration of
/// the same name (after this one was deleted) must not take it for its own.
pub const MIGRATION_UID_LABEL: &str = "volmig.io/migration-uid";
/// The component label of holder pods.
pub const HOLDER_COMPONENT: &str = "target-holder";
/// The scheduler's annotation the provisioner of a WaitForFirstConsumer
/// class waits for; the holder pod bypasses the scheduler (`nodeName`).
pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
/// Where the holder pod's container sees the target (unused by it).
pub const HOLDER_DEVICE: &str = "/dev/volmig-target";

/// Another node of a multi-attach volume: its agent and its view of the
/// target.
#[derive(Debug, Clone, PartialEq)]
pub struct Attachment {
    pub node: String,
    pub agent: String,
    pub holder_pod: String,
    pub target_path: String,
}

/// What a migration's one volume resolved to (node, agent, holder pod and
/// target path: of the node whose agent copies).
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub source_claim: String,
    /// The source PV: the volume's name on the agent (a volmig volume's id).
    pub volume: String,
    /// A volmig volume's backing namespace (see [`super::volmig`]).
    pub backing_namespace: Option<String>,
    pub node: String,
    pub agent: String,
    pub target_claim: String,
    pub target_volume: String,
    pub holder_pod: String,
    pub target_path: String,
    /// The other nodes using it (multi-attach), if any.
    pub shared: Vec<Attachment>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Every volume, in spec order.
    Ready(Vec<Resolved>),
    /// Not there (or not suitable) yet: look again later (reason,
    /// message); nothing was started.
    Wait(&'static str, String),
}

/// `<source>-volmig`, or the claim the spec names.
pub fn target_claim_name(pair: &VolumePair) -> String {
    pair.target
        .persistent_volume_claim
        .clone()
        .unwrap_or_else(|| format!("{}-volmig", pair.source.persistent_volume_claim))
}

/// The holder pod of `vm`'s volume `index` on its `k`th node (k > 0: the
/// other nodes of a multi-attach volume).
pub fn holder_name(vm: &str, index: usize, k: usize) -> String {
    let mut n = format!("volmig-holder-{vm}");
    if index > 0 {
        n.push_str(&format!("-{index}"));
    }
    if k > 0 {
        n.push_str(&format!("-s{k}"));
    }
    n.chars().take(253).collect()
}

/// A volume's holder pods as recorded in its status: its own node's, then
/// the other nodes' of a multi-attach volume.
pub fn holders(v: &VolumeStatus) -> impl Iterator<Item = &String> {
    v.holder_pod
        .iter()
        .chain(v.shared_with.iter().filter_map(|a| a.holder_pod.as_ref()))
}

/// Resolves every volume of `vm`: the first wait makes it wait.
pub async fn resolve<C: Connector>(ctx: &Context<C>, vm: &VolumeMigration) -> Result<Plan> {
    let mut ready = Vec::new();
    let mut wait = None;
    for (i, pair) in vm.spec.volumes.iter().enumerate() {
        match resolve_volume(ctx, vm, i, pair).await? {
            Plan::Ready(mut r) => ready.append(&mut r),
            Plan::Wait(reason, msg) => {
                wait.get_or_insert((reason, msg));
            }
        }
    }
    Ok(match wait {
        Some((reason, msg)) => Plan::Wait(reason, msg),
        None => Plan::Ready(ready),
    })
}

fn claim_bytes(pvc: &PersistentVolumeClaim) -> Option<u64> {
    let q = pvc
        .status
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage"))
        .or_else(|| {
            pvc.spec
                .as_ref()?
                .resources
                .as_ref()?
                .requests
                .as_ref()?
                .get("storage")
        })?;
    parse_size(&q.0).ok()
}

fn pv_bytes(pv: &PersistentVolume) -> Option<u64> {
    let q = pv.spec.as_ref()?.capacity.as_ref()?.get("storage")?;
    parse_size(&q.0).ok()
}

fn uses_claim(p: &Pod, claim: &str) -> bool {
    p.spec.as_ref().is_some_and(|s| {
        s.volumes.iter().flatten().any(|v| {
            v.persistent_volume_claim
                .as_ref()
                .is_some_and(|c| c.claim_name == claim)
        })
    })
}

fn live(p: &Pod) -> bool {
    !matches!(
        p.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) && p.metadata.deletion_timestamp.is_none()
}

/// Whether `meta`'s object was created for migration `vm` (this one, not
/// an earlier one of the same name): by its uid label, or by an owner
/// reference as operators before the uid label set them.
pub fn ours(meta: &ObjectMeta, vm: &VolumeMigration) -> bool {
    let Some(uid) = vm.metadata.uid.as_deref() else {
        return false;
    };
    meta.labels
        .as_ref()
        .and_then(|l| l.get(MIGRATION_UID_LABEL))
        .is_some_and(|u| u == uid)
        || meta.owner_references.iter().flatten().any(|r| r.uid == uid)
}

/// The labels of what migration `vm` creates.
fn labels(vm: &VolumeMigration) -> std::collections::BTreeMap<String, String> {
    let mut l: std::collections::BTreeMap<String, String> = [
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
        (MIGRATION_LABEL.to_string(), vm.name_any()),
    ]
    .into();
    if let Some(uid) = &vm.metadata.uid {
        l.insert(MIGRATION_UID_LABEL.to_string(), uid.clone());
    }
    l
}

/// A step of resolution that waits: the plan says why.
type Found<T> = std::result::Result<T, Plan>;

/// Whether `p` is a holder pod (of any migration).
pub fn is_holder(p: &Pod) -> bool {
    p.labels()
        .get("app.kubernetes.io/component")
        .map(String::as_str)
        == Some(HOLDER_COMPONENT)
        && p.labels().contains_key(MIGRATION_LABEL)
}

/// Whether `p` is one of migration `vm`'s holder pods.
fn holder_of(p: &Pod, vm: &VolumeMigration) -> bool {
    is_holder(p) && ours(&p.metadata, vm)
}

async fn resolve_volume<C: Connector>(
    ctx: &Context<C>,
    vm: &VolumeMigration,
    index: usize,
    pair: &VolumePair,
) -> Result<Plan> {
    let ns = vm.namespace().unwrap_or_default();
    let name = vm.name_any();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let cache = &ctx.caches;
    let src_name = &pair.source.persistent_volume_claim;

    // the source claim and its volume
    let Some(src) = cache.claim(&ns, src_name, Read::Cached).await? else {
        return Ok(Plan::Wait(
            "SourceClaimNotFound",
            format!("claim {ns}/{src_name} does not exist"),
        ));
    };
    let Some(pv_name) = src.spec.as_ref().and_then(|s| s.volume_name.clone()) else {
        return Ok(Plan::Wait(
            "SourceClaimNotBound",
            format!("claim {src_name} is not bound to a volume yet"),
        ));
    };
    let Some(pv) = cache.volume(&pv_name, Read::Cached).await? else {
        return Ok(Plan::Wait(
            "SourceVolumeNotFound",
            format!("claim {src_name} names volume {pv_name}, which does not exist"),
        ));
    };
    if let Some(id) = super::volmig::volume_id_of(&pv) {
        return super::volmig::resolve(ctx, vm, pair, &id).await;
    }
    if !vm.spec.retain_source {
        return Ok(Plan::Wait(
            "RetainSourceUnsupported",
            format!(
                "claim {src_name} is not a volume of {}: its source volume is always kept (retainSource: false applies to volmig volumes only)",
                volmig_api::csi_driver::DRIVER_NAME
            ),
        ));
    }
    let size = pv_bytes(&pv).or_else(|| claim_bytes(&src)).unwrap_or(0);

    // where it is used: one node, or several for a multi-attach volume
    // (the first, by name, copies; the others track their pods' writes)
    let all_pods = cache.pods_in(&ns);
    let nodes: Vec<String> = all_pods
        .iter()
        .filter(|p| live(p) && uses_claim(p, src_name) && !holder_of(p, vm))
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect::<BTreeSet<String>>()
        .into_iter()
        .collect();
    if nodes.is_empty() {
        return Ok(Plan::Wait(
            "NoConsumerPod",
            format!(
                "no running pod uses claim {src_name}: volmig migrates volumes while a pod uses them, through the agent on that pod's node"
            ),
        ));
    }

    // the agent on each node, and whether it serves the volume
    let mut agents = Vec::new();
    for node in &nodes {
        match serving_agent(ctx, node, &pv_name, src_name).await? {
            Err(Plan::Wait("VolumeNotServed", _)) => {
                return Ok(Plan::Wait(
                    "NotAVolmigVolume",
                    format!(
                        "claim {src_name} (volume {pv_name}) is not a volume of {} and the agent on node {node} does not serve it: import it first \
                         (or serve it through the agent: volmig-agent --export {pv_name}=<device>); this migration starts once an agent serves it",
                        volmig_api::csi_driver::DRIVER_NAME
                    ),
                ));
            }
            Ok(a) => agents.push(a),
            Err(plan) => return Ok(plan),
        }
    }

    // the target claim
    let target_name = target_claim_name(pair);
    let target = match cache.claim(&ns, &target_name, Read::Cached).await? {
        Some(t) => {
            let ours = ours(&t.metadata, vm);
            if pair.target.storage_class_name.is_some() && !ours {
                return Ok(Plan::Wait(
                    "TargetClaimExists",
                    format!(
                        "claim {target_name} already exists and was not created for this migration; name it as target.persistentVolumeClaim to use it"
                    ),
                ));
            }
            if !ours
                && let Some(why) = unsuitable_target(&t, size, all_pods.iter().map(|p| &**p), vm)
            {
                return Ok(Plan::Wait(
                    "TargetClaimUnsuitable",
                    format!("claim {target_name}: {why}"),
                ));
            }
            if nodes.len() > 1 && !shareable(&t) {
                return Ok(Plan::Wait(
                    "TargetClaimUnsuitable",
                    format!(
                        "claim {src_name} is used on nodes {}, so its target must be attachable to all of them, but claim {target_name} is not ReadWriteMany",
                        nodes.join(", ")
                    ),
                ));
            }
            t
        }
        None => {
            let Some(class) = pair.target.storage_class_name.clone() else {
                return Ok(Plan::Wait(
                    "TargetClaimNotFound",
                    format!("target claim {ns}/{target_name} does not exist"),
                ));
            };
            let pvc = new_target_claim(vm, &src, &target_name, &class, size, &nodes[0]);
            match claims.create(&PostParams::default(), &pvc).await {
                Ok(c) => c,
                // created by an earlier pass the cache has not seen yet
                Err(kube::Error::Api(ae)) if ae.code == 409 => claims.get(&target_name).await?,
                Err(e) => return Err(e.into()),
            }
        }
    };

    // a holder pod that attaches the target on each node (all of them
    // created before waiting for any)
    let mut holders = Vec::new();
    let mut waiting = None;
    for (k, node) in nodes.iter().enumerate() {
        let holder = holder_name(&name, index, k);
        match hold_target(ctx, vm, &pods, &holder, node, &target_name).await? {
            Ok(uid) => holders.push((holder, uid)),
            Err(wait) => {
                waiting.get_or_insert(wait);
            }
        }
    }
    if let Some(wait) = waiting {
        return Ok(wait);
    }
    let what = format!("claim {target_name}");
    let (target_pv, attachments) =
        match target_devices(ctx, &ns, &target, &what, nodes, agents, holders).await? {
            Ok(t) => t,
            Err(wait) => return Ok(wait),
        };
    let mut attachments = attachments.into_iter();
    let Some(first) = attachments.next() else {
        // One attachment per node, and `nodes` is not empty (checked above).
        return Ok(Plan::Wait(
            "NoConsumerPod",
            format!("no node uses claim {src_name}"),
        ));
    };
    Ok(Plan::Ready(vec![Resolved {
        source_claim: src_name.clone(),
        volume: pv_name,
        backing_namespace: None,
        node: first.node,
        agent: first.agent,
        target_claim: target_name,
        target_volume: target_pv,
        holder_pod: first.holder_pod,
        target_path: first.target_path,
        shared: attachments.collect(),
    }]))
}

/// Where bound target claim `target` (`what`, for messages) is on each
/// node: its PV's name, and one attachment per node (`nodes`, their
/// `agents`, and the `holders` (pod, uid) attaching the target there) with
/// the raw device's path. `Err`: what the migration waits for.
pub(super) async fn target_devices<C: Connector>(
    ctx: &Context<C>,
    ns: &str,
    target: &PersistentVolumeClaim,
    what: &str,
    nodes: Vec<String>,
    agents: Vec<String>,
    holders: Vec<(String, String)>,
) -> Result<std::result::Result<(String, Vec<Attachment>), Plan>> {
    let name = target.name_any();
    // What the cache says is not there yet may be there already: the
    // event that woke this reconcile may be ahead of the cache.
    let bound = |c: &PersistentVolumeClaim| c.spec.as_ref().and_then(|s| s.volume_name.clone());
    let mut target_pv = bound(target);
    if target_pv.is_none()
        && let Some(t) = ctx.caches.claim(ns, &name, Read::Live).await?
    {
        target_pv = bound(&t);
    }
    let Some(target_pv) = target_pv else {
        return Ok(Err(Plan::Wait(
            "WaitingForTarget",
            format!("waiting for {what} to be bound"),
        )));
    };
    let tpv = match ctx.caches.volume(&target_pv, Read::Cached).await? {
        Some(v) => Some(v),
        None => ctx.caches.volume(&target_pv, Read::Live).await?,
    };
    let Some(tpv) = tpv else {
        return Ok(Err(Plan::Wait(
            "WaitingForTarget",
            format!("{what} names volume {target_pv}, which does not exist yet"),
        )));
    };
    let mut attachments = Vec::new();
    for ((node, agent), (holder_pod, uid)) in nodes.into_iter().zip(agents).zip(holders) {
        let target_path = match device_path(&ctx.settings.kubelet_dir, &uid, &tpv) {
            Ok(p) => p,
            Err(e) => return Ok(Err(Plan::Wait("TargetNotBlockPublishable", e.to_string()))),
        };
        attachments.push(Attachment {
            node,
            agent,
            holder_pod,
            target_path,
        });
    }
    Ok(Ok((target_pv, attachments)))
}

/// Whether a claim can be attached to several nodes at once.
fn shareable(c: &PersistentVolumeClaim) -> bool {
    c.spec
        .as_ref()
        .and_then(|s| s.access_modes.as_ref())
        .is_some_and(|m| m.iter().any(|m| m == "ReadWriteMany"))
}

/// The ready agent on `node`, if it serves volume `pv_name`.
pub(crate) async fn serving_agent<C: Connector>(
    ctx: &Context<C>,
    node: &str,
    pv_name: &str,
    claim: &str,
) -> Result<Found<String>> {
    let Some(agent) = ctx.agent_on(node).await? else {
        return Ok(Err(Plan::Wait(
            "AgentNotReady",
            format!(
                "no ready volmig agent (pods {} in namespace {}) on node {node}",
                ctx.settings.agent_labels.selector(),
                ctx.settings.namespace
            ),
        )));
    };
    let exports = match ctx.connector.exports(&agent).await {
        Ok(e) => e,
        Err(e) => return Ok(Err(Plan::Wait("AgentUnreachable", e.to_string()))),
    };
    if !exports.iter().any(|v| v == pv_name) {
        return Ok(Err(Plan::Wait(
            "VolumeNotServed",
            format!(
                "volume {pv_name} (claim {claim}) is not served through volmig's interposer on node {node}: its agent exports {}. \
                 Only volumes the node agent serves (volmig-agent --export {pv_name}=<device>, or volumes of volmig's CSI driver) can move live; \
                 this migration starts once the agent serves it",
                if exports.is_empty() {
                    "no volumes".to_string()
                } else {
                    exports.join(", ")
                }
            ),
        )));
    }
    Ok(Ok(agent))
}

/// The holder pod `holder` of claim `claim` on `node` (created if missing):
/// its uid once it runs there.
async fn hold_target<C: Connector>(
    ctx: &Context<C>,
    vm: &VolumeMigration,
    pods: &Api<Pod>,
    holder: &str,
    node: &str,
    claim: &str,
) -> Result<Found<String>> {
    let ns = vm.namespace().unwrap_or_default();
    let running = |p: &Pod| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    let cached = ctx.caches.pod(&ns, holder, Read::Cached).await?;
    let found = match cached {
        Some(p) if running(&p) => Some(p),
        // not there or not running yet in the cache: it may be already
        _ => ctx.caches.pod(&ns, holder, Read::Live).await?,
    };
    let holder_pod = match found {
        Some(p) if !ours(&p.metadata, vm) => {
            return Ok(Err(Plan::Wait(
                "HolderPodExists",
                format!(
                    "pod {holder} exists but was not created for this migration (an earlier VolumeMigration {} may keep its target attached through it); give this migration another name",
                    vm.name_any()
                ),
            )));
        }
        Some(p) => p,
        None => {
            let p = holder_pod(vm, holder, node, claim, &ctx.settings.holder_image)?;
            match pods.create(&PostParams::default(), &p).await {
                Ok(p) => p,
                // created by an earlier pass the cache has not seen yet
                Err(kube::Error::Api(ae)) if ae.code == 409 => pods.get(holder).await?,
                Err(e) => return Err(e.into()),
            }
        }
    };
    if holder_pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        != Some(node)
    {
        return Ok(Err(Plan::Wait(
            "HolderOnWrongNode",
            format!("pod {holder} exists on another node than {node}; delete it"),
        )));
    }
    if holder_pod.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Running") {
        return Ok(Err(Plan::Wait(
            "WaitingForTarget",
            format!("waiting for pod {holder} to attach claim {claim} on node {node}"),
        )));
    }
    Ok(Ok(holder_pod.metadata.uid.clone().unwrap_or_default()))
}

/// Why an existing claim cannot be a target, if it cannot.
pub fn unsuitable_target<'a>(
    t: &PersistentVolumeClaim,
    size: u64,
    pods: impl IntoIterator<Item = &'a Pod>,
    vm: &VolumeMigration,
) -> Option<String> {
    let mode = t.spec.as_ref().and_then(|s| s.volume_mode.as_deref());
    if mode != Some("Block") {
        return Some(format!(
            "volumeMode is {}, volmig needs Block (the raw device)",
            mode.unwrap_or("Filesystem")
        ));
    }
    match claim_bytes(t) {
        Some(b) if b < size => {
            return Some(format!(
                "it holds {b} bytes, smaller than the source's {size}"
            ));
        }
        None => return Some("its size is unknown".into()),
        _ => {}
    }
    let name = t.name_any();
    let users: Vec<String> = pods
        .into_iter()
        .filter(|p| live(p) && uses_claim(p, &name) && !holder_of(p, vm))
        .map(|p| p.name_any())
        .collect();
    if !users.is_empty() {
        return Some(format!("it is in use by pod(s) {}", users.join(", ")));
    }
    None
}

fn new_target_claim(
    vm: &VolumeMigration,
    src: &PersistentVolumeClaim,
    name: &str,
    class: &str,
    size: u64,
    node: &str,
) -> PersistentVolumeClaim {
    let access = src
        .spec
        .as_ref()
        .and_then(|s| s.access_modes.clone())
        .unwrap_or_else(|| vec!["ReadWriteOnce".into()]);
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: vm.namespace(),
            labels: Some(labels(vm)),
            annotations: Some([(SELECTED_NODE.to_string(), node.to_string())].into()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(access),
            volume_mode: Some("Block".into()),
            storage_class_name: Some(class.to_string()),
            resources: Some(k8s_openapi::api::core::v1::VolumeResourceRequirements {
                requests: Some(
                    [(
                        "storage".to_string(),
                        k8s_openapi::apimachinery::pkg::api::resource::Quantity(size.to_string()),
                    )]
                    .into(),
                ),
                limits: None,
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    }
}

/// The holder pod `name` of migration `vm` on `node`, attaching `claim` as
/// a raw block device (the chart's admission policy, `holder_policy`,
/// admits the operator's pods only if they are like this).
pub fn holder_pod(
    vm: &VolumeMigration,
    name: &str,
    node: &str,
    claim: &str,
    image: &str,
) -> Result<Pod> {
    let mut pod = holder_pod_in(
        &vm.namespace().unwrap_or_default(),
        name,
        node,
        claim,
        image,
    )?;
    pod.metadata
        .labels
        .get_or_insert_default()
        .extend(labels(vm));
    Ok(pod)
}

/// A holder pod `ns/name` on `node` attaching `claim` as a raw block device
/// at [`HOLDER_DEVICE`], labelled as a holder made by volmig (the admission
/// policy's terms); the migration's holders and the CSI controller's
/// (which attach a volume's backing claim) are the same pod.
pub fn holder_pod_in(ns: &str, name: &str, node: &str, claim: &str, image: &str) -> Result<Pod> {
    let mut pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "terminationGracePeriodSeconds": 5,
            "tolerations": [{"operator": "Exists"}],
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65535, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "hold",
                "image": image,
                "volumeDevices": [{"name": "target", "devicePath": HOLDER_DEVICE}],
                "resources": {"requests": {"cpu": "1m", "memory": "8Mi"}, "limits": {"memory": "32Mi"}},
                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                                    "capabilities": {"drop": ["ALL"]}},
            }],
            "volumes": [{"name": "target", "persistentVolumeClaim": {"claimName": claim}}],
        },
    }))
    .map_err(|e| crate::error::Error::Finalizer(format!("holder pod spec: {e}")))?;
    pod.metadata.labels = Some(
        [
            (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
            (
                "app.kubernetes.io/component".to_string(),
                HOLDER_COMPONENT.to_string(),
            ),
        ]
        .into(),
    );
    pod.metadata.namespace = Some(ns.to_string());
    Ok(pod)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(mode: Option<&str>, size: &str) -> PersistentVolumeClaim {
        serde_json::from_value(json!({
            "metadata": {"name": "t"},
            "spec": {"volumeMode": mode, "resources": {"requests": {"storage": size}}},
        }))
        .unwrap()
    }

    fn pod_using(name: &str, claim: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"containers": [], "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": claim}}]},
            "status": {"phase": "Running"},
        }))
        .unwrap()
    }

    /// Migration `name` with uid `uid`.
    fn migration(name: &str, uid: &str) -> VolumeMigration {
        serde_json::from_value(json!({
            "apiVersion": "volmig.io/v1alpha1", "kind": "VolumeMigration",
            "metadata": {"name": name, "namespace": "db", "uid": uid},
            "spec": {"volumes": []},
        }))
        .unwrap()
    }

    /// A holder pod of migration `vm` (uid `uid`).
    fn holder(name: &str, vm: &str, uid: &str, claim: &str) -> Pod {
        let mut p = pod_using(name, claim);
        p.metadata.labels = Some(
            [
                (MIGRATION_LABEL.to_string(), vm.to_string()),
                (MIGRATION_UID_LABEL.to_string(), uid.to_string()),
                (
                    "app.kubernetes.io/component".to_string(),
                    HOLDER_COMPONENT.to_string(),
                ),
            ]
            .into(),
        );
        p
    }

    #[test]
    fn target_validation() {
        let m = migration("m", "u-1");
        assert!(unsuitable_target(&claim(Some("Block"), "10Gi"), 10 << 30, [], &m).is_none());
        assert!(
            unsuitable_target(&claim(None, "10Gi"), 1, [], &m)
                .unwrap()
                .contains("Block")
        );
        assert!(
            unsuitable_target(&claim(Some("Block"), "1Gi"), 10 << 30, [], &m)
                .unwrap()
                .contains("smaller")
        );
        let users = [
            pod_using("app-0", "t"),
            holder("volmig-holder-m", "m", "u-1", "t"),
            holder("volmig-holder-m-s1", "m", "u-1", "t"),
        ];
        assert!(
            unsuitable_target(&claim(Some("Block"), "10Gi"), 1, &users, &m)
                .unwrap()
                .contains("app-0")
        );
        assert!(
            unsuitable_target(&claim(Some("Block"), "10Gi"), 1, &users[1..], &m).is_none(),
            "our holder pods (one per node) do not count"
        );
        assert!(
            unsuitable_target(
                &claim(Some("Block"), "10Gi"),
                1,
                &users[1..],
                &migration("other", "u-2")
            )
            .unwrap()
            .contains("volmig-holder-m"),
            "another migration's holder pod does"
        );
        assert!(
            unsuitable_target(
                &claim(Some("Block"), "10Gi"),
                1,
                &users[1..],
                &migration("m", "u-3")
            )
            .unwrap()
            .contains("volmig-holder-m"),
            "and so does the holder of an earlier migration of the same name"
        );
    }

    #[test]
    fn holder_names_never_collide() {
        let names: BTreeSet<String> = (0..3)
            .flat_map(|i| (0..3).map(move |k| holder_name("m", i, k)))
            .collect();
        assert_eq!(names.len(), 9, "{names:?}");
        assert_eq!(holder_name("m", 0, 0), "volmig-holder-m");
        assert_eq!(holder_name("m", 1, 0), "volmig-holder-m-1");
        assert_eq!(holder_name("m", 0, 2), "volmig-holder-m-s2");
    }
}
