//! After cutover, the workload runs on the target through the agent: its
//! claim still names the source PV, whose export on the agent now writes to
//! the target. Rebinding makes that outcome durable and visible:
//!
//! - the target PV's reclaim policy becomes `Retain` (deleting its claim
//!   must never destroy the data the workload now uses) and it is annotated
//!   `volmig.io/backs: <source PV>`;
//! - the source PV is annotated `volmig.io/backed-by: <target PV>`: whatever
//!   stages the source PV for a later pod start (the agent's export, and
//!   volmig's CSI node plugin once it exists) serves the target instead;
//! - the target claim and the holder pods carry no owner reference to a
//!   VolumeMigration (operators before the uid label set them), so nothing
//!   deleting the VolumeMigration takes the target from under the workload.
//!
//! The finalizer rebinds before it lets a deleted migration go, whatever
//! happened before (see [`super::outcome`]). The source PV and claim are
//! never deleted (`retainSource`).

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use volmig_api::crd::{VolumeMigration, VolumeStatus};

use super::Context;
use crate::agents::Connector;
use crate::cache::Read;
use crate::error::Result;

pub const BACKED_BY: &str = "volmig.io/backed-by";
pub const BACKS: &str = "volmig.io/backs";

/// Rebinds volume `v` of a migration in namespace `ns`; true when it
/// changed something (false: already done).
pub async fn rebind_volume<C: Connector>(
    ctx: &Context<C>,
    ns: &str,
    v: &VolumeStatus,
    read: Read,
) -> Result<bool> {
    let Some(target_pv) = v.target_volume.clone() else {
        return Ok(false);
    };
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let pp = PatchParams::default();
    let mut changed = retain(ctx, &target_pv, Some(&v.volume), read).await?;
    if let Some(s) = ctx.caches.volume(&v.volume, read).await?
        && s.annotations().get(BACKED_BY) != Some(&target_pv)
    {
        let p = json!({"metadata": {"annotations": {BACKED_BY: target_pv}}});
        pvs.patch(&v.volume, &pp, &Patch::Merge(&p)).await?;
        changed = true;
    }
    changed |= disown(ctx, ns, v, read).await?;
    Ok(changed)
}

/// Reclaim policy `Retain` on PV `name` (and `volmig.io/backs: <backs>`),
/// unless it has them; true when it changed something.
pub async fn retain<C: Connector>(
    ctx: &Context<C>,
    name: &str,
    backs: Option<&String>,
    read: Read,
) -> Result<bool> {
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let Some(t) = ctx.caches.volume(name, read).await? else {
        return Ok(false);
    };
    let retained = t
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
        == Some("Retain");
    let annotated = backs.is_none_or(|b| t.annotations().get(BACKS) == Some(b));
    if retained && annotated {
        return Ok(false);
    }
    let mut p = json!({"spec": {"persistentVolumeReclaimPolicy": "Retain"}});
    if let Some(b) = backs {
        p["metadata"] = json!({"annotations": {BACKS: b}});
    }
    pvs.patch(name, &PatchParams::default(), &Patch::Merge(&p))
        .await?;
    Ok(true)
}

/// Keeps a target that may hold the newest data: its PV is retained; its
/// claim and holder pods lose any owner reference to a migration.
pub async fn protect<C: Connector>(
    ctx: &Context<C>,
    ns: &str,
    v: &VolumeStatus,
    read: Read,
) -> Result<bool> {
    let mut changed = false;
    if let Some(pv) = &v.target_volume {
        changed |= retain(ctx, pv, None, read).await?;
    }
    changed |= disown(ctx, ns, v, read).await?;
    Ok(changed)
}

/// Whether an owner reference names a VolumeMigration.
fn to_migration(r: &OwnerReference) -> bool {
    r.kind == VolumeMigration::kind(&()) && r.api_version == VolumeMigration::api_version(&())
}

/// The merge patch that drops `meta`'s owner references to migrations,
/// if it has any (checked against its resourceVersion).
fn disowning(meta: &ObjectMeta) -> Option<serde_json::Value> {
    let refs = meta.owner_references.as_ref()?;
    if !refs.iter().any(to_migration) {
        return None;
    }
    let kept: Vec<&OwnerReference> = refs.iter().filter(|r| !to_migration(r)).collect();
    Some(json!({"metadata": {
        "ownerReferences": kept,
        "resourceVersion": meta.resource_version,
    }}))
}

/// Drops the owner references to migrations from volume `v`'s target claim
/// and holder pods (every node's); true when it changed something.
pub async fn disown<C: Connector>(
    ctx: &Context<C>,
    ns: &str,
    v: &VolumeStatus,
    read: Read,
) -> Result<bool> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let pp = PatchParams::default();
    let mut changed = false;
    if !v.target.is_empty()
        && let Some(c) = ctx.caches.claim(ns, &v.target, read).await?
        && let Some(p) = disowning(&c.metadata)
    {
        claims.patch(&v.target, &pp, &Patch::Merge(&p)).await?;
        changed = true;
    }
    for h in super::resolve::holders(v) {
        if let Some(pod) = ctx.caches.pod(ns, h, read).await?
            && let Some(p) = disowning(&pod.metadata)
        {
            pods.patch(h, &pp, &Patch::Merge(&p)).await?;
            changed = true;
        }
    }
    Ok(changed)
}

/// Disowns the targets of every volume of `vm` (see [`disown`]).
pub async fn disown_all<C: Connector>(
    ctx: &Context<C>,
    vm: &VolumeMigration,
    read: Read,
) -> Result<bool> {
    let ns = vm.namespace().unwrap_or_default();
    let mut changed = false;
    for v in vm.status.iter().flat_map(|s| s.volumes.iter()) {
        changed |= disown(ctx, &ns, v, read).await?;
    }
    Ok(changed)
}
