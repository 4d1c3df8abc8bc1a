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
//! - the target claim and the holder pods lose their owner reference to the
//!   migration, so deleting the VolumeMigration does not detach the target
//!   under the running workload.
//!
//! The source PV and claim are never deleted (`retainSource`).

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use volmig_api::crd::{VolumeMigration, VolumeStatus};

use super::Context;
use crate::agents::Connector;
use crate::error::Result;

pub const BACKED_BY: &str = "volmig.io/backed-by";
pub const BACKS: &str = "volmig.io/backs";

/// Rebinds every volume of `vm`; true when it changed something (false:
/// already done).
pub async fn rebind<C: Connector>(ctx: &Context<C>, vm: &VolumeMigration) -> Result<bool> {
    let mut changed = false;
    for v in vm.status.iter().flat_map(|s| s.volumes.iter()) {
        changed |= rebind_volume(ctx, &vm.namespace().unwrap_or_default(), v).await?;
    }
    Ok(changed)
}

async fn rebind_volume<C: Connector>(ctx: &Context<C>, ns: &str, v: &VolumeStatus) -> Result<bool> {
    let Some(target_pv) = v.target_volume.clone() else {
        return Ok(false);
    };
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let pp = PatchParams::default();
    let mut changed = false;

    if let Some(t) = pvs.get_opt(&target_pv).await? {
        let retained = t
            .spec
            .as_ref()
            .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
            == Some("Retain");
        if !retained || t.annotations().get(BACKS) != Some(&v.volume) {
            let p = json!({
                "metadata": {"annotations": {BACKS: v.volume}},
                "spec": {"persistentVolumeReclaimPolicy": "Retain"},
            });
            pvs.patch(&target_pv, &pp, &Patch::Merge(&p)).await?;
            changed = true;
        }
    }
    if let Some(s) = pvs.get_opt(&v.volume).await?
        && s.annotations().get(BACKED_BY) != Some(&target_pv)
    {
        let p = json!({"metadata": {"annotations": {BACKED_BY: target_pv}}});
        pvs.patch(&v.volume, &pp, &Patch::Merge(&p)).await?;
        changed = true;
    }
    let orphan = json!({"metadata": {"ownerReferences": null}});
    if let Some(c) = claims.get_opt(&v.target).await?
        && c.metadata
            .owner_references
            .as_ref()
            .is_some_and(|o| !o.is_empty())
    {
        claims.patch(&v.target, &pp, &Patch::Merge(&orphan)).await?;
        changed = true;
    }
    // every node's holder pod (several for a multi-attach volume)
    for h in super::resolve::holders(v) {
        if let Some(p) = pods.get_opt(h).await?
            && p.metadata
                .owner_references
                .as_ref()
                .is_some_and(|o| !o.is_empty())
        {
            pods.patch(h, &pp, &Patch::Merge(&orphan)).await?;
            changed = true;
        }
    }
    Ok(changed)
}
