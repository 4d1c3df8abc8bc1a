//! Migrating a volume of volmig's own CSI driver (`csi.volmig.io`): the
//! workload's claim and PV never change; what moves is the volume's
//! backing claim, which its record (`VolmigVolume`, named by the volume id,
//! the PV's volume handle) names.
//!
//! - resolution: the record says where the volume is published
//!   (`attachments`); on each of those nodes the agent must serve the
//!   volume under its id (the CSI node plugin does, once staged). The
//!   target is a backing claim `<id>-m<hash of the migration's uid>` of
//!   the migration's `target.storageClassName` in the backing namespace
//!   (`volumeMode: Block`, as large as the current backing claim, the
//!   record's access modes), recorded in the record's `claims` and
//!   `targets` *before* it is created, so a crash never leaks it; a holder
//!   pod on every published node attaches it (named as the CSI
//!   controller names holders: `<target claim>-<hash of node>`), and the
//!   agent sees it where the controller's publish context would say;
//! - Completed (or redirected): the record adopts the target
//!   ([`adopt`]): current claim, class, a history entry, and each
//!   attachment's holder becomes the target's; the old holders go, and the
//!   source backing claim too unless `retainSource`;
//! - rolled back (or never started): the target's holders and claim are
//!   released and the record forgets them ([`release`]); its current
//!   claim never changed.
//!
//! Every step reads the record and the objects first, so each is safe to
//! repeat after an operator restart.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{DeleteParams, ObjectMeta, PostParams, Preconditions};
use kube::{Api, ResourceExt};
use tracing::info;
use volmig_api::crd::{
    MigrationTarget, VolmigVolume, VolmigVolumeStatus, VolumeHistory, VolumeMigration, VolumePair,
    VolumeStatus,
};
use volmig_api::csi_driver::DRIVER_NAME;
use volmig_api::units::parse_size;

use super::Context;
use super::resolve::{
    MANAGED_BY, MIGRATION_LABEL, MIGRATION_UID_LABEL, Plan, Resolved, SELECTED_NODE, holder_pod_in,
    serving_agent, target_devices,
};
use crate::agents::Connector;
use crate::cache::Read;
use crate::csi::controller::{VOLUME_LABEL, backing_claim, holder_name};
use crate::error::Result;

/// The volume id of `pv` if it is a volume of volmig's CSI driver.
pub fn volume_id_of(pv: &PersistentVolume) -> Option<String> {
    let csi = pv.spec.as_ref()?.csi.as_ref()?;
    (csi.driver == DRIVER_NAME).then(|| csi.volume_handle.clone())
}

/// The target backing claim of migration `uid` of volume `id`.
pub fn target_claim_name(id: &str, uid: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, uid.as_bytes());
    let h: String = d.as_ref()[..5].iter().map(|b| format!("{b:02x}")).collect();
    format!("{id}-m{h}")
}

/// `namespace/name` of a migration.
fn key_of(vm: &VolumeMigration) -> String {
    format!("{}/{}", vm.namespace().unwrap_or_default(), vm.name_any())
}

fn records<C: Connector>(ctx: &Context<C>) -> Api<VolmigVolume> {
    Api::all(ctx.client.clone())
}

/// Replaces `rec`'s status with `f`'s change of it under its
/// resourceVersion (a racing writer makes it fail; the reconcile retries).
async fn update_record<C: Connector>(
    ctx: &Context<C>,
    rec: &VolmigVolume,
    f: impl FnOnce(&mut VolmigVolumeStatus),
) -> Result<VolmigVolume> {
    let mut next = rec.clone();
    f(next.status.get_or_insert_default());
    if next.status == rec.status {
        return Ok(next);
    }
    Ok(records(ctx)
        .replace_status(&rec.name_any(), &PostParams::default(), &next)
        .await?)
}

fn claim_bytes(c: &PersistentVolumeClaim) -> Option<u64> {
    let q = c
        .status
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage"))
        .or_else(|| {
            c.spec
                .as_ref()?
                .resources
                .as_ref()?
                .requests
                .as_ref()?
                .get("storage")
        })?;
    parse_size(&q.0).ok()
}

/// Resolves volume `index` of `vm`, whose source claim `src_name` is bound
/// to `pv`, a volume of volmig's CSI driver with id `id`.
pub async fn resolve<C: Connector>(
    ctx: &Context<C>,
    vm: &VolumeMigration,
    pair: &VolumePair,
    id: &str,
) -> Result<Plan> {
    let src_name = &pair.source.persistent_volume_claim;
    let Some(rec) = records(ctx).get_opt(id).await? else {
        return Ok(Plan::Wait(
            "VolumeRecordNotFound",
            format!(
                "claim {src_name} is a volume of {DRIVER_NAME} ({id}) but its record VolmigVolume {id} does not exist"
            ),
        ));
    };
    let Some(class) = pair.target.storage_class_name.clone() else {
        return Ok(Plan::Wait(
            "TargetClaimUnsuitable",
            format!(
                "claim {src_name} is a volume of {DRIVER_NAME}: it moves to a backing storage class (target.storageClassName), not to a claim"
            ),
        ));
    };
    let uid = vm.metadata.uid.clone().unwrap_or_default();
    let bns = rec.spec.backing_namespace.clone();
    let status = rec.status.clone().unwrap_or_default();
    let Some(current) = status.current_claim.clone() else {
        return Ok(Plan::Wait(
            "VolumeNotPublished",
            format!("volume {id} (claim {src_name}) has no backing claim yet"),
        ));
    };
    if let Some(other) = status.targets.iter().find(|t| t.migration_uid != uid) {
        return Ok(Plan::Wait(
            "VolumeMigrating",
            format!(
                "VolumeMigration {} is moving volume {id} (claim {src_name}) to backing claim {}; this one starts after it",
                other.migration, other.claim
            ),
        ));
    }
    // where it is published: every such node's agent serves it
    let mut nodes: Vec<String> = status.attachments.iter().map(|a| a.node.clone()).collect();
    nodes.sort();
    nodes.dedup();
    if nodes.is_empty() {
        return Ok(Plan::Wait(
            "VolumeNotPublished",
            format!(
                "volume {id} (claim {src_name}) is not published on any node: volmig migrates a volume while a pod uses it, through the agent on that pod's node"
            ),
        ));
    }
    let mut agents = Vec::new();
    for node in &nodes {
        match serving_agent(ctx, node, id, src_name).await? {
            Ok(a) => agents.push(a),
            Err(plan) => return Ok(plan),
        }
    }

    // the target claim: recorded, then made
    let target_name = target_claim_name(id, &uid);
    let rec = if status.targets.iter().any(|t| t.claim == target_name) {
        rec
    } else {
        let t = MigrationTarget {
            claim: target_name.clone(),
            storage_class: class.clone(),
            migration: key_of(vm),
            migration_uid: uid.clone(),
        };
        let rec = update_record(ctx, &rec, |s| {
            if !s.claims.contains(&target_name) {
                s.claims.push(target_name.clone());
            }
            s.targets.push(t);
        })
        .await?;
        info!(migration = %key_of(vm), volume = %id, claim = %target_name, "target backing claim recorded");
        rec
    };
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &bns);
    let target = match ctx.caches.claim(&bns, &target_name, Read::Cached).await? {
        Some(t) => t,
        None => {
            // as large as the current backing claim, and as the volume
            // (an expansion asked for may not have reached the claim yet)
            let size = match ctx.caches.claim(&bns, &current, Read::Cached).await? {
                Some(c) => claim_bytes(&c),
                None => None,
            }
            .unwrap_or(0)
            .max(status.capacity_bytes.unwrap_or(rec.spec.capacity_bytes));
            let mut c = backing_claim(&bns, id, &target_name, &class, size, &rec.spec.access_modes);
            label(&mut c.metadata, vm);
            // the holder bypasses the scheduler (WaitForFirstConsumer)
            c.metadata.annotations = Some([(SELECTED_NODE.to_string(), nodes[0].clone())].into());
            match claims.create(&PostParams::default(), &c).await {
                Ok(c) => {
                    info!(migration = %key_of(vm), volume = %id, claim = %target_name, class = %class, bytes = size, "target backing claim created");
                    c
                }
                Err(kube::Error::Api(ae)) if ae.code == 409 => claims.get(&target_name).await?,
                Err(e) => return Err(e.into()),
            }
        }
    };

    // a holder of the target on every published node, all made before
    // any is waited for
    let mut holders = Vec::new();
    let mut waiting = None;
    for node in &nodes {
        let holder = holder_name(&target_name, node);
        match hold(ctx, vm, id, &bns, &holder, node, &target_name).await? {
            Ok(uid) => holders.push((holder, uid)),
            Err(w) => {
                waiting.get_or_insert(w);
            }
        }
    }
    if let Some(w) = waiting {
        return Ok(w);
    }
    let what = format!("backing claim {bns}/{target_name} (class {class})");
    let (target_pv, attachments) =
        match target_devices(ctx, &bns, &target, &what, nodes, agents, holders).await? {
            Ok(t) => t,
            Err(wait) => return Ok(wait),
        };
    let mut attachments = attachments.into_iter();
    let Some(first) = attachments.next() else {
        return Ok(Plan::Wait(
            "VolumeNotPublished",
            format!("volume {id} is not published on any node"),
        ));
    };
    Ok(Plan::Ready(vec![Resolved {
        source_claim: src_name.clone(),
        volume: id.to_string(),
        backing_namespace: Some(bns),
        node: first.node,
        agent: first.agent,
        target_claim: target_name,
        target_volume: target_pv,
        holder_pod: first.holder_pod,
        target_path: first.target_path,
        shared: attachments.collect(),
    }]))
}

/// The labels of what migration `vm` makes for a volmig volume (beside the
/// volume's own): whose it is, by uid.
fn label(meta: &mut ObjectMeta, vm: &VolumeMigration) {
    let l = meta.labels.get_or_insert_default();
    l.insert(MIGRATION_LABEL.to_string(), vm.name_any());
    if let Some(uid) = &vm.metadata.uid {
        l.insert(MIGRATION_UID_LABEL.to_string(), uid.clone());
    }
}

/// The holder pod `name` of the target claim on `node` (made if missing):
/// its uid once it runs there.
#[allow(clippy::too_many_arguments)]
async fn hold<C: Connector>(
    ctx: &Context<C>,
    vm: &VolumeMigration,
    id: &str,
    ns: &str,
    name: &str,
    node: &str,
    claim: &str,
) -> Result<std::result::Result<String, Plan>> {
    let running = |p: &Pod| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    let found = match ctx.caches.pod(ns, name, Read::Cached).await? {
        Some(p) if running(&p) => Some(p),
        _ => ctx.caches.pod(ns, name, Read::Live).await?,
    };
    let pod = match found {
        Some(p) => p,
        None => {
            let mut p = holder_pod_in(ns, name, node, claim, &ctx.settings.holder_image)?;
            let l = p.metadata.labels.get_or_insert_default();
            l.insert(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string());
            l.insert(VOLUME_LABEL.to_string(), id.to_string());
            label(&mut p.metadata, vm);
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
            match pods.create(&PostParams::default(), &p).await {
                Ok(p) => {
                    info!(migration = %key_of(vm), volume = %id, node, pod = %name, claim, "target holder pod created");
                    p
                }
                Err(kube::Error::Api(ae)) if ae.code == 409 => pods.get(name).await?,
                Err(e) => return Err(e.into()),
            }
        }
    };
    if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(node) {
        return Ok(Err(Plan::Wait(
            "HolderOnWrongNode",
            format!("pod {ns}/{name} exists on another node than {node}; delete it"),
        )));
    }
    if !running(&pod) {
        return Ok(Err(Plan::Wait(
            "WaitingForTarget",
            format!("waiting for pod {ns}/{name} to attach backing claim {claim} on node {node}"),
        )));
    }
    Ok(Ok(pod.metadata.uid.clone().unwrap_or_default()))
}

/// The nodes volume `v` was migrated on.
fn nodes_of(v: &VolumeStatus) -> Vec<String> {
    v.node
        .iter()
        .cloned()
        .chain(v.shared_with.iter().map(|a| a.node.clone()))
        .collect()
}

async fn delete_pod<C: Connector>(ctx: &Context<C>, ns: &str, name: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    match pods.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(ae)) if ae.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Deletes backing claim `ns/name` (only one volmig made for volume `id`).
async fn delete_claim<C: Connector>(
    ctx: &Context<C>,
    ns: &str,
    id: &str,
    name: &str,
) -> Result<()> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let Some(c) = claims.get_opt(name).await? else {
        return Ok(());
    };
    if c.labels().get(VOLUME_LABEL).map(String::as_str) != Some(id) {
        return Ok(());
    }
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: c.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    match claims.delete(name, &dp).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(ae)) if ae.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The migration completed (or its workload runs on the target): the
/// record names the target as the volume's current backing claim, every
/// attachment the target's holder; then the source's holders go, and the
/// source backing claim unless `retainSource`. Each step is skipped once
/// done. True when the record changed now.
pub async fn adopt<C: Connector>(
    ctx: &Context<C>,
    vm: &VolumeMigration,
    v: &VolumeStatus,
) -> Result<bool> {
    let Some(rec) = records(ctx).get_opt(&v.volume).await? else {
        return Ok(false);
    };
    let changed =
        rec.status.as_ref().and_then(|s| s.current_claim.as_deref()) != Some(v.target.as_str());
    let id = v.volume.clone();
    let bns = rec.spec.backing_namespace.clone();
    let status = rec.status.clone().unwrap_or_default();
    let migration = key_of(vm);
    let nodes = nodes_of(v);
    let rec = if status.current_claim.as_deref() == Some(v.target.as_str()) {
        rec
    } else {
        let class = status
            .targets
            .iter()
            .find(|t| t.claim == v.target)
            .map(|t| t.storage_class.clone())
            .or_else(|| {
                vm.spec
                    .volumes
                    .iter()
                    .find(|p| p.source.persistent_volume_claim == v.source)
                    .and_then(|p| p.target.storage_class_name.clone())
            })
            .unwrap_or_default();
        let from = status.current_claim.clone();
        let to = v.target.clone();
        let rec = update_record(ctx, &rec, |s| {
            s.current_claim = Some(to.clone());
            s.storage_class = Some(class.clone());
            if !s.claims.contains(&to) {
                s.claims.push(to.clone());
            }
            s.targets.retain(|t| t.claim != to);
            for a in s.attachments.iter_mut().filter(|a| nodes.contains(&a.node)) {
                a.holder_pod = holder_name(&to, &a.node);
                a.claim = to.clone();
            }
            s.history.push(VolumeHistory {
                time: k8s_openapi::jiff::Timestamp::now().to_string(),
                event: "Migrated".into(),
                from_claim: from.clone(),
                to_claim: to.clone(),
                storage_class: class.clone(),
                migration: Some(migration.clone()),
            });
        })
        .await?;
        info!(migration = %migration, volume = %id, claim = %v.target, "the volume's record names its new backing claim");
        rec
    };
    let status = rec.status.clone().unwrap_or_default();
    // the source: the claim the history says this migration moved from
    let Some(from) = status
        .history
        .iter()
        .rev()
        .find(|h| h.migration.as_deref() == Some(migration.as_str()) && h.to_claim == v.target)
        .and_then(|h| h.from_claim.clone())
    else {
        return Ok(changed);
    };
    // the source's holders: pods of the volume attaching it, no
    // attachment's any more
    let attached: Vec<&str> = status
        .attachments
        .iter()
        .map(|a| a.holder_pod.as_str())
        .collect();
    for p in ctx.caches.pods_in(&bns) {
        let of_volume = p.labels().get(VOLUME_LABEL) == Some(&id);
        let on_source = p.spec.as_ref().is_some_and(|s| {
            s.volumes.iter().flatten().any(|vol| {
                vol.persistent_volume_claim
                    .as_ref()
                    .is_some_and(|c| c.claim_name == from)
            })
        });
        let name = p.name_any();
        if of_volume && on_source && !attached.contains(&name.as_str()) {
            delete_pod(ctx, &bns, &name).await?;
            info!(migration = %migration, volume = %id, pod = %name, "source holder pod deleted");
        }
    }
    let source_used = status.current_claim.as_deref() == Some(from.as_str())
        || status.attachments.iter().any(|a| a.claim == from);
    if !vm.spec.retain_source && !source_used && status.claims.contains(&from) {
        delete_claim(ctx, &bns, &id, &from).await?;
        update_record(ctx, &rec, |s| s.claims.retain(|c| c != &from)).await?;
        info!(migration = %migration, volume = %id, claim = %from, "source backing claim released (retainSource: false)");
    }
    Ok(changed)
}

/// The target of migration `vm` of volume `id` in namespace `bns` is not
/// the volume's (rolled back, failed before the redirect, never started):
/// its holders on `nodes` and its claim are released, and the record
/// forgets it. The current claim is never touched.
async fn release_target<C: Connector>(
    ctx: &Context<C>,
    vm: &VolumeMigration,
    rec: &VolmigVolume,
    target: &str,
    nodes: &[String],
) -> Result<()> {
    let id = rec.name_any();
    let bns = rec.spec.backing_namespace.clone();
    let status = rec.status.clone().unwrap_or_default();
    if status.current_claim.as_deref() == Some(target)
        || status.attachments.iter().any(|a| a.claim == target)
    {
        return Ok(()); // the volume's: never released here
    }
    let mut nodes: Vec<String> = nodes.to_vec();
    // holders made before the session recorded its nodes: every pod of
    // the volume attaching the target
    for p in ctx.caches.pods_in(&bns) {
        if p.labels().get(VOLUME_LABEL) == Some(&id)
            && let Some(n) = p.spec.as_ref().and_then(|s| s.node_name.clone())
            && p.name_any() == holder_name(target, &n)
        {
            nodes.push(n);
        }
    }
    for n in &nodes {
        delete_pod(ctx, &bns, &holder_name(target, n)).await?;
    }
    delete_claim(ctx, &bns, &id, target).await?;
    if status.claims.iter().any(|c| c == target) || status.targets.iter().any(|t| t.claim == target)
    {
        let t = target.to_string();
        update_record(ctx, rec, |s| {
            s.claims.retain(|c| c != &t);
            s.targets.retain(|x| x.claim != t);
        })
        .await?;
        info!(migration = %key_of(vm), volume = %id, claim = %target, "target backing claim released; the volume stays on its source");
    }
    Ok(())
}

/// Volume `v` of `vm` stays on its source: its target is released.
pub async fn release<C: Connector>(
    ctx: &Context<C>,
    vm: &VolumeMigration,
    v: &VolumeStatus,
) -> Result<()> {
    let Some(rec) = records(ctx).get_opt(&v.volume).await? else {
        return Ok(());
    };
    release_target(ctx, vm, &rec, &v.target, &nodes_of(v)).await
}

/// A migration that never got a session: whatever its resolution made for
/// volmig volumes (found in the records by its uid) is released.
pub async fn release_unstarted<C: Connector>(ctx: &Context<C>, vm: &VolumeMigration) -> Result<()> {
    let Some(uid) = vm.metadata.uid.clone() else {
        return Ok(());
    };
    let ns = vm.namespace().unwrap_or_default();
    let mut ids = BTreeMap::new();
    for pair in &vm.spec.volumes {
        let Some(src) = ctx
            .caches
            .claim(&ns, &pair.source.persistent_volume_claim, Read::Cached)
            .await?
        else {
            continue;
        };
        let Some(pv_name) = src.spec.as_ref().and_then(|s| s.volume_name.clone()) else {
            continue;
        };
        if let Some(pv) = ctx.caches.volume(&pv_name, Read::Cached).await?
            && let Some(id) = volume_id_of(&pv)
        {
            ids.insert(id, ());
        }
    }
    for id in ids.keys() {
        let Some(rec) = records(ctx).get_opt(id).await? else {
            continue;
        };
        let targets: Vec<String> = rec
            .status
            .iter()
            .flat_map(|s| s.targets.iter())
            .filter(|t| t.migration_uid == uid)
            .map(|t| t.claim.clone())
            .collect();
        for t in targets {
            let rec = records(ctx).get(id).await?;
            release_target(ctx, vm, &rec, &t, &[]).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_names_are_stable_distinct_and_short_enough() {
        let id = crate::csi::volume_id("pvc-1");
        let a = target_claim_name(&id, "uid-1");
        assert_eq!(a, target_claim_name(&id, "uid-1"));
        assert_ne!(a, target_claim_name(&id, "uid-2"));
        assert!(a.starts_with(&format!("{id}-m")));
        // its holders are pod names and label values: at most 63
        assert!(holder_name(&a, &"n".repeat(253)).len() <= 63);
    }

    #[test]
    fn only_volumes_of_volmig_s_driver_have_an_id() {
        let pv = |driver: &str| -> PersistentVolume {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "pvc-1"},
                "spec": {"csi": {"driver": driver, "volumeHandle": "vm-1"}},
            }))
            .unwrap()
        };
        assert_eq!(volume_id_of(&pv(DRIVER_NAME)).as_deref(), Some("vm-1"));
        assert_eq!(volume_id_of(&pv("csi.example.com")), None);
        assert_eq!(volume_id_of(&PersistentVolume::default()), None);
    }
}
