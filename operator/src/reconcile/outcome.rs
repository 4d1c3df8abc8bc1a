//! Where each volume's newest data is once its session is over (or never
//! began), and so what may be let go: the one rule every release of a
//! target goes through, per volume (the members of a group and the nodes
//! of a multi-attach volume each by their own record).
//!
//! | the volume's record | newest data on | the target claim, PV and holder pods |
//! |---|---|---|
//! | no session (resolution only) | source | released |
//! | Completed, or `redirected` | target | rebound (kept, PV `Retain`) |
//! | Aborted (the agent confirmed the rollback) | source | released |
//! | Failed before the redirect | source | released |
//! | Failed during or after it, not `redirected` | ask the agents | as they answer; kept (PV `Retain`) while none can |
//!
//! "Released": the holder pods are deleted when the session ends, the
//! target claim (if this migration created it) when the migration is
//! deleted. Nothing is released on a guess: when the record cannot tell
//! (the redirect's reply was lost and the rollback failed) and no agent
//! answers, the target is kept and an Event says so.

use std::path::Path;

use volmig_api::crd::{MigrationPhase, VolumeStatus};

use super::Context;
use crate::agents::Connector;
use crate::error::Result;

/// Where a volume's newest data is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    Source,
    Target,
    /// Cannot tell (why).
    Unknown(String),
}

/// Whether the session went as far as the redirect.
fn reached_redirect(v: &VolumeStatus) -> bool {
    v.session
        .iter()
        .flat_map(|s| s.phase_times.iter())
        .any(|p| {
            matches!(
                p.phase,
                MigrationPhase::Redirecting
                    | MigrationPhase::Resuming
                    | MigrationPhase::Terminating
            )
        })
}

/// What the record of volume `v` says (see the module docs).
pub fn recorded(v: &VolumeStatus) -> Place {
    let Some(s) = &v.session else {
        return Place::Source;
    };
    if v.redirected || s.phase == MigrationPhase::Completed {
        return Place::Target;
    }
    match s.phase {
        MigrationPhase::Aborted => Place::Source,
        MigrationPhase::Failed if reached_redirect(v) => Place::Unknown(format!(
            "its session failed at or after the redirect ({}) and the record cannot tell which device the workload uses",
            s.error.as_deref().unwrap_or("no error recorded")
        )),
        MigrationPhase::Failed => Place::Source,
        p => Place::Unknown(format!("its session is still {p}")),
    }
}

/// Where volume `v`'s newest data is: its record, or where the agents
/// serve it from when the record cannot tell. An agent that cannot be
/// asked leaves it Unknown.
pub async fn place<C: Connector>(ctx: &Context<C>, v: &VolumeStatus) -> Result<Place> {
    let why = match recorded(v) {
        Place::Unknown(why) if v.session.as_ref().is_some_and(|s| s.phase.is_terminal()) => why,
        p => return Ok(p),
    };
    // (node, that node's view of the target) for every node using it
    let mut views = vec![(v.node.clone().unwrap_or_default(), v.target_path.clone())];
    views.extend(
        v.shared_with
            .iter()
            .map(|a| (a.node.clone(), a.target_path.clone())),
    );
    for (node, target_path) in views {
        let Some(agent) = ctx.agent_on(&node).await? else {
            return Ok(Place::Unknown(format!(
                "{why}, and no ready agent on node {node} can say"
            )));
        };
        let volumes = match ctx.connector.volumes(&agent).await {
            Ok(vs) => vs,
            Err(e) => {
                return Ok(Place::Unknown(format!(
                    "{why}, and the agent on node {node} cannot say: {e}"
                )));
            }
        };
        let Some(info) = volumes.iter().find(|i| i.name == v.volume) else {
            return Ok(Place::Unknown(format!(
                "{why}, and the agent on node {node} does not serve volume {}",
                v.volume
            )));
        };
        if target_path
            .as_deref()
            .is_some_and(|t| info.active == Path::new(t))
        {
            return Ok(Place::Target);
        }
    }
    Ok(Place::Source)
}

#[cfg(test)]
mod tests {
    use super::*;
    use volmig_api::crd::{PhaseTimeStatus, VolumeSessionStatus};

    fn volume(phase: MigrationPhase, reached: &[MigrationPhase], redirected: bool) -> VolumeStatus {
        VolumeStatus {
            redirected,
            session: Some(VolumeSessionStatus {
                id: "s".into(),
                phase,
                phase_times: reached
                    .iter()
                    .map(|p| PhaseTimeStatus {
                        phase: *p,
                        start: "2026-01-01T00:00:00.000Z".into(),
                        end: None,
                    })
                    .collect(),
                ..VolumeSessionStatus::default()
            }),
            ..VolumeStatus::default()
        }
    }

    #[test]
    fn the_record_says_where_the_data_is_or_that_it_cannot() {
        use MigrationPhase::*;
        let cut = [Activating, Copying, Quiescing, Synchronizing, Redirecting];
        assert_eq!(recorded(&VolumeStatus::default()), Place::Source);
        assert_eq!(recorded(&volume(Completed, &cut, true)), Place::Target);
        assert_eq!(recorded(&volume(Aborted, &cut, false)), Place::Source);
        assert_eq!(
            recorded(&volume(Failed, &cut, true)),
            Place::Target,
            "the rollback failed: the workload stays on the target"
        );
        assert_eq!(
            recorded(&volume(Failed, &cut[..3], false)),
            Place::Source,
            "failed before the redirect"
        );
        assert!(matches!(
            recorded(&volume(Failed, &cut, false)),
            Place::Unknown(_)
        ));
        assert!(matches!(
            recorded(&volume(Terminating, &cut, true)),
            Place::Target
        ));
        assert!(matches!(
            recorded(&volume(Copying, &cut[..2], false)),
            Place::Unknown(_)
        ));
    }
}
