//! Running a consistency group: one driver per member volume (each may be
//! on another agent), all meeting at the barriers of one [`GroupCoord`].
//! A [`Supervisor`](crate::Supervisor) runs it as one job.

use std::path::PathBuf;
use std::sync::Arc;

use volmig_api::Slave;

use crate::bandwidth::BandwidthPool;
use crate::driver::{Driver, DriverConfig, StopSignal};
use crate::error::{MasterError, Result};
use crate::group::GroupCoord;
use crate::record::{SessionConfig, SessionRecord};
use crate::store::SessionStore;

/// One volume of a group.
#[derive(Debug, Clone)]
pub struct Member<S> {
    pub volume: String,
    pub target: PathBuf,
    /// Where its agent is reached (recorded for status; empty in-process).
    pub agent: String,
    /// Multi-attach: the other agents serving it (recorded; the slave is
    /// then a [`MultiAttach`](crate::MultiAttach) over all of them).
    pub shared_with: Vec<String>,
    pub slave: S,
}

/// Creates the records of a new group (or finds them all unfinished, for
/// a restart). Mixing a fresh volume into a running group is refused.
pub async fn create_group<S, St: SessionStore>(
    store: &St,
    name: &str,
    members: &[Member<S>],
    config: &SessionConfig,
    epoch: u64,
) -> Result<()> {
    if members.is_empty() {
        return Err(MasterError::Invalid(format!("group {name} has no volumes")));
    }
    let mut seen = std::collections::HashSet::new();
    for m in members {
        if !seen.insert(&m.volume) {
            return Err(MasterError::Invalid(format!(
                "volume {} appears twice in group {name}",
                m.volume
            )));
        }
    }
    for m in members {
        let mut rec =
            crate::session::create_session(store, &m.volume, &m.target, config.clone(), epoch)
                .await?;
        rec.group = Some(name.to_string());
        rec.agent = m.agent.clone();
        rec.shared_with = m.shared_with.clone();
        store.save(&m.volume, &mut rec).await?;
    }
    Ok(())
}

/// Drives every member to the end (or until stopped), sharing `pool`; the
/// results are in member order. All end Completed, or none is left on its
/// target. A member whose driver errs out fails the group (see
/// [`InGroup`](crate::group::InGroup)), so no other waits at a barrier for
/// it forever.
pub(crate) async fn run_group<S, St>(
    name: &str,
    members: Vec<Member<S>>,
    store: St,
    cfg: DriverConfig,
    stop: Arc<StopSignal>,
    pool: Arc<BandwidthPool>,
) -> Vec<Result<SessionRecord>>
where
    S: Slave,
    St: SessionStore + Clone,
{
    let names: Vec<String> = members.iter().map(|m| m.volume.clone()).collect();
    let coord = Arc::new(GroupCoord::new(name, &names));
    let runs = members.into_iter().map(|m| {
        let driver = Driver::new(m.slave, store.clone(), &m.volume, cfg.clone(), stop.clone())
            .sharing(pool.clone())
            .in_group(coord.clone());
        async move { driver.run().await }
    });
    futures::future::join_all(runs).await
}

#[cfg(test)]
mod tests;
