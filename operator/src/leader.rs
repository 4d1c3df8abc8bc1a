//! Leader election with a Kubernetes Lease (kube-lease-manager). Only the
//! leader reconciles and drives sessions. Each acquisition bumps the Lease's
//! `leaseTransitions`, which is the leader's fencing epoch; a driver takes
//! the larger of that and the session's recorded epoch + 1 (see
//! `Context::epoch_for`), so a deposed leader's calls are refused by the
//! agents even if the Lease was recreated.

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;

use crate::error::{Error, Result};

/// Seconds a lease is valid after its last renewal.
pub const LEASE_SECONDS: u64 = 15;
/// Renew this long before it expires.
pub const GRACE_SECONDS: u64 = 5;

/// Starts competing for `lease` in `namespace`; the receiver says whether
/// this process leads. Dropping it releases the lease.
pub async fn elect(
    client: Client,
    namespace: &str,
    lease: &str,
    identity: &str,
) -> Result<watch::Receiver<bool>> {
    let manager = LeaseManagerBuilder::new(client, lease)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(LEASE_SECONDS)
        .with_grace(GRACE_SECONDS)
        .build()
        .await
        .map_err(|e| Error::Finalizer(format!("lease {namespace}/{lease}: {e}")))?;
    let (rx, _task) = manager.watch().await;
    Ok(rx)
}

/// The fencing epoch of the current leadership: the Lease's transitions.
pub async fn epoch(client: Client, namespace: &str, lease: &str) -> Result<u64> {
    let api: Api<Lease> = Api::namespaced(client, namespace);
    let l = api.get(lease).await?;
    let t = l.spec.and_then(|s| s.lease_transitions).unwrap_or(0);
    Ok(u64::try_from(t).unwrap_or(0).max(1))
}
