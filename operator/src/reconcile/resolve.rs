//! From a VolumeMigration's spec to what a session needs: the source claim's
//! PV (the volume's name on the agent), the node where pods use it, that
//! node's agent, a target claim (created or validated) and the target's raw
//! device on the node (through a holder pod). Each step either goes on,
//! waits (something is not there *yet*), or fails with a reason a person
//! can act on.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{
    PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec, Pod,
};
use kube::api::{ListParams, ObjectMeta, PostParams};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use volmig_api::crd::{VolumeMigration, VolumePair};
use volmig_api::units::parse_size;

use super::Context;
use crate::agents::{Connector, agent_on_node};
use crate::error::Result;
use crate::target::device_path;

/// Labels on what the operator creates.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "volmig");
pub const MIGRATION_LABEL: &str = "volmig.io/migration";
/// The scheduler's annotation the provisioner of a WaitForFirstConsumer
/// class waits for; the holder pod bypasses the scheduler (`nodeName`).
pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
/// Where the holder pod's container sees the target (unused by it).
pub const HOLDER_DEVICE: &str = "/dev/volmig-target";

/// What a migration's one volume resolved to.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub source_claim: String,
    /// The source PV: the volume's name on the agent.
    pub volume: String,
    pub node: String,
    pub agent: String,
    pub target_claim: String,
    pub target_volume: String,
    pub holder_pod: String,
    pub target_path: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Every volume, in spec order.
    Ready(Vec<Resolved>),
    /// Not there yet: look again later (reason, message).
    Wait(&'static str, String),
    /// Cannot work as asked (reason, message); nothing was started.
    Fail(&'static str, String),
}

/// `<source>-volmig`, or the claim the spec names.
pub fn target_claim_name(pair: &VolumePair) -> String {
    pair.target
        .persistent_volume_claim
        .clone()
        .unwrap_or_else(|| format!("{}-volmig", pair.source.persistent_volume_claim))
}

/// The holder pod of `vm`'s volume `index`.
pub fn holder_name(vm: &str, index: usize) -> String {
    let n = if index == 0 {
        format!("volmig-holder-{vm}")
    } else {
        format!("volmig-holder-{vm}-{index}")
    };
    n.chars().take(253).collect()
}

/// Resolves every volume of `vm`: the first failure fails the migration,
/// else the first wait makes it wait.
pub async fn resolve<C: Connector>(ctx: &Context<C>, vm: &VolumeMigration) -> Result<Plan> {
    let mut ready = Vec::new();
    let mut wait = None;
    for (i, pair) in vm.spec.volumes.iter().enumerate() {
        match resolve_volume(ctx, vm, i, pair).await? {
            Plan::Ready(mut r) => ready.append(&mut r),
            Plan::Wait(reason, msg) => {
                wait.get_or_insert((reason, msg));
            }
            fail @ Plan::Fail(..) => return Ok(fail),
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

fn owner(
    vm: &VolumeMigration,
) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference> {
    vm.controller_owner_ref(&()).into_iter().collect()
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
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let src_name = &pair.source.persistent_volume_claim;

    // the source claim and its volume
    let Some(src) = claims.get_opt(src_name).await? else {
        return Ok(Plan::Fail(
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
    let Some(pv) = pvs.get_opt(&pv_name).await? else {
        return Ok(Plan::Wait(
            "SourceVolumeNotFound",
            format!("claim {src_name} names volume {pv_name}, which does not exist"),
        ));
    };
    let size = pv_bytes(&pv).or_else(|| claim_bytes(&src)).unwrap_or(0);

    // where it is used
    let holder = holder_name(&name, index);
    let all_pods = pods.list(&ListParams::default()).await?;
    let nodes: BTreeSet<String> = all_pods
        .items
        .iter()
        .filter(|p| live(p) && uses_claim(p, src_name) && p.name_any() != holder)
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect();
    let node = match nodes.len() {
        0 => {
            return Ok(Plan::Fail(
                "NoConsumerPod",
                format!(
                    "no running pod uses claim {src_name}: volmig migrates volumes while a pod uses them, through the agent on that pod's node"
                ),
            ));
        }
        1 => nodes.into_iter().next().unwrap_or_default(),
        _ => {
            return Ok(Plan::Fail(
                "MultiAttachUnsupported",
                format!(
                    "claim {src_name} is used by pods on several nodes ({}); volmig migrates a volume attached to one node only",
                    nodes.into_iter().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
    };

    // the agent on that node, and whether it serves the volume
    let agent_pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let Some(agent) = agent_on_node(
        &agent_pods,
        &ctx.settings.agent_selector,
        &node,
        ctx.settings.agent_port,
    )
    .await?
    else {
        return Ok(Plan::Wait(
            "AgentNotReady",
            format!(
                "no ready volmig agent (pods {} in namespace {}) on node {node}",
                ctx.settings.agent_selector, ctx.settings.namespace
            ),
        ));
    };
    let exports = match ctx.connector.exports(&agent).await {
        Ok(e) => e,
        Err(e) => return Ok(Plan::Wait("AgentUnreachable", e.to_string())),
    };
    if !exports.iter().any(|v| v == &pv_name) {
        return Ok(Plan::Fail(
            "VolumeNotServed",
            format!(
                "volume {pv_name} (claim {src_name}) is not served through volmig's interposer on node {node}: its agent exports {}. \
                 Only volumes the node agent serves (volmig-agent --export {pv_name}=<device>, or volumes of volmig's CSI driver) can move live; \
                 export it and restart the pod on that device, then create this migration again",
                if exports.is_empty() {
                    "no volumes".to_string()
                } else {
                    exports.join(", ")
                }
            ),
        ));
    }

    // the target claim
    let target_name = target_claim_name(pair);
    let target = match claims.get_opt(&target_name).await? {
        Some(t) => {
            let ours = t.labels().get(MIGRATION_LABEL) == Some(&name);
            if pair.target.storage_class_name.is_some() && !ours {
                return Ok(Plan::Fail(
                    "TargetClaimExists",
                    format!(
                        "claim {target_name} already exists and was not created for this migration; name it as target.persistentVolumeClaim to use it"
                    ),
                ));
            }
            if !ours && let Some(why) = unsuitable_target(&t, size, &all_pods.items, &holder) {
                return Ok(Plan::Fail(
                    "TargetClaimUnsuitable",
                    format!("claim {target_name}: {why}"),
                ));
            }
            t
        }
        None => {
            let Some(class) = pair.target.storage_class_name.clone() else {
                return Ok(Plan::Fail(
                    "TargetClaimNotFound",
                    format!("target claim {ns}/{target_name} does not exist"),
                ));
            };
            let pvc = new_target_claim(vm, &src, &target_name, &class, size, &node);
            claims.create(&PostParams::default(), &pvc).await?
        }
    };

    // the holder pod that attaches the target on the node
    let holder_pod = match pods.get_opt(&holder).await? {
        Some(p) => p,
        None => {
            let p = holder_pod(vm, &holder, &node, &target_name, &ctx.settings.holder_image)?;
            pods.create(&PostParams::default(), &p).await?
        }
    };
    if holder_pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        != Some(node.as_str())
    {
        return Ok(Plan::Fail(
            "HolderOnWrongNode",
            format!("pod {holder} exists on another node than {node}; delete it"),
        ));
    }
    let running = holder_pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    let target_pv = target.spec.as_ref().and_then(|s| s.volume_name.clone());
    let (true, Some(target_pv)) = (running, target_pv) else {
        return Ok(Plan::Wait(
            "WaitingForTarget",
            format!("waiting for pod {holder} to attach claim {target_name} on node {node}"),
        ));
    };
    let Some(tpv) = pvs.get_opt(&target_pv).await? else {
        return Ok(Plan::Wait(
            "WaitingForTarget",
            format!("claim {target_name} names volume {target_pv}, which does not exist yet"),
        ));
    };
    let uid = holder_pod.metadata.uid.clone().unwrap_or_default();
    let target_path = match device_path(&ctx.settings.kubelet_dir, &uid, &tpv) {
        Ok(p) => p,
        Err(e) => return Ok(Plan::Fail("TargetNotBlockPublishable", e.to_string())),
    };
    Ok(Plan::Ready(vec![Resolved {
        source_claim: src_name.clone(),
        volume: pv_name,
        node,
        agent,
        target_claim: target_name,
        target_volume: target_pv,
        holder_pod: holder,
        target_path,
    }]))
}

/// Why an existing claim cannot be a target, if it cannot.
pub fn unsuitable_target(
    t: &PersistentVolumeClaim,
    size: u64,
    pods: &[Pod],
    holder: &str,
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
        .iter()
        .filter(|p| live(p) && uses_claim(p, &name) && p.name_any() != holder)
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
            labels: Some(
                [
                    (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
                    (MIGRATION_LABEL.to_string(), vm.name_any()),
                ]
                .into(),
            ),
            annotations: Some([(SELECTED_NODE.to_string(), node.to_string())].into()),
            owner_references: Some(owner(vm)),
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

fn holder_pod(
    vm: &VolumeMigration,
    name: &str,
    node: &str,
    claim: &str,
    image: &str,
) -> Result<Pod> {
    let mut pod: Pod = serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": {
                MANAGED_BY.0: MANAGED_BY.1,
                MIGRATION_LABEL: vm.name_any(),
                "app.kubernetes.io/component": "target-holder",
            },
        },
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
    pod.metadata.namespace = vm.namespace();
    pod.metadata.owner_references = Some(owner(vm));
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

    #[test]
    fn target_validation() {
        assert!(unsuitable_target(&claim(Some("Block"), "10Gi"), 10 << 30, &[], "h").is_none());
        assert!(
            unsuitable_target(&claim(None, "10Gi"), 1, &[], "h")
                .unwrap()
                .contains("Block")
        );
        assert!(
            unsuitable_target(&claim(Some("Block"), "1Gi"), 10 << 30, &[], "h")
                .unwrap()
                .contains("smaller")
        );
        let users = [pod_using("app-0", "t"), pod_using("h", "t")];
        assert!(
            unsuitable_target(&claim(Some("Block"), "10Gi"), 1, &users, "h")
                .unwrap()
                .contains("app-0")
        );
        assert!(
            unsuitable_target(&claim(Some("Block"), "10Gi"), 1, &users[1..], "h").is_none(),
            "our holder pod does not count"
        );
    }
}
