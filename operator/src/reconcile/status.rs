//! Status writes of the reconciler itself (before a session exists, and
//! the claim/node/holder facts of each volume). Each replaces the status
//! with the object's resourceVersion, so it never overwrites a driver's
//! save it did not see (a 409 makes the reconcile retry).

use kube::Api;
use kube::api::PostParams;
use volmig_api::crd::{MigrationPhase, VolumeMigration, VolumeMigrationStatus};
use volmig_master::now_ms;

use crate::error::Result;
use crate::status_map::{end_conditions, set_condition};

/// A condition to set: type, status, reason, message.
pub type Cond<'a> = (&'a str, bool, &'a str, &'a str);

/// Replaces the status with `f(status)` unless that changes nothing.
pub async fn update_status(
    api: &Api<VolumeMigration>,
    vm: &VolumeMigration,
    f: impl FnOnce(&mut VolumeMigrationStatus),
) -> Result<bool> {
    let before = vm.status.clone().unwrap_or_default();
    let mut next = before.clone();
    f(&mut next);
    next.observed_generation = vm.metadata.generation;
    end_conditions(&mut next, vm.metadata.generation, now_ms());
    if next == before {
        return Ok(false);
    }
    let mut obj = vm.clone();
    obj.status = Some(next);
    let name = vm.metadata.name.clone().unwrap_or_default();
    api.replace_status(&name, &PostParams::default(), &obj)
        .await?;
    Ok(true)
}

pub fn apply_conditions(
    s: &mut VolumeMigrationStatus,
    generation: Option<i64>,
    conds: &[Cond<'_>],
) {
    let now = now_ms();
    for (t, st, reason, msg) in conds {
        set_condition(&mut s.conditions, t, *st, reason, msg, generation, now);
    }
}

/// The migration waits (no session yet): phase Pending, Ready and
/// Progressing False with the reason; not Degraded (it goes on once the
/// cluster catches up), and an earlier failure's error is gone.
pub fn mark_pending(
    s: &mut VolumeMigrationStatus,
    generation: Option<i64>,
    reason: &str,
    message: &str,
) {
    s.phase = MigrationPhase::Pending;
    s.error = None;
    let mut conds = vec![
        ("Ready", false, reason, message),
        ("Progressing", false, reason, message),
    ];
    if s.conditions.iter().any(|c| c.type_ == "Degraded") {
        conds.push(("Degraded", false, reason, message));
    }
    apply_conditions(s, generation, &conds);
}

pub async fn pending(
    api: &Api<VolumeMigration>,
    vm: &VolumeMigration,
    reason: &str,
    message: &str,
) -> Result<bool> {
    let g = vm.metadata.generation;
    update_status(api, vm, |s| mark_pending(s, g, reason, message)).await
}

/// The migration fails before a session exists (an invalid spec): phase
/// Failed, nothing on any agent was touched.
pub fn mark_failed_before_start(
    s: &mut VolumeMigrationStatus,
    generation: Option<i64>,
    reason: &str,
    message: &str,
) {
    s.phase = MigrationPhase::Failed;
    s.error = Some(message.to_string());
    apply_conditions(
        s,
        generation,
        &[
            ("Ready", false, reason, message),
            ("Progressing", false, reason, message),
            ("Degraded", true, reason, message),
        ],
    );
}

pub async fn failed_before_start(
    api: &Api<VolumeMigration>,
    vm: &VolumeMigration,
    reason: &str,
    message: &str,
) -> Result<bool> {
    let g = vm.metadata.generation;
    update_status(api, vm, |s| mark_failed_before_start(s, g, reason, message)).await
}
