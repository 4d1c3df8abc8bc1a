//! What the operator checks before it competes for leadership: the
//! VolumeMigration CRD served by the cluster is the one this build was made
//! for. An older CRD would let the API server drop fields the operator
//! writes (its structural schema prunes unknown ones) and miss rules the
//! operator relies on; a newer one holds fields this operator does not know.
//! So the operator refuses to run (it stays unready and looks again every
//! [`CRD_RECHECK`], so updating the CRD is enough, no restart needed), with
//! a message saying how to update it.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Api, Client};
use tracing::{error, info};

use crate::crd_gen::{CRD_FILE, SCHEMA_HASH, crd_name, schema_hash};

/// How often a refused operator looks at the CRD again.
pub const CRD_RECHECK: Duration = Duration::from_secs(30);

/// Why the served CRD is not the operator's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CrdMismatch {
    #[error("the CRD {name} is not installed. {how}")]
    Missing { name: String, how: String },
    #[error(
        "the CRD {name} in the cluster is stale: its schema is {served}, this operator (volmig {version}) needs {wanted}. {how}"
    )]
    Stale {
        name: String,
        served: String,
        wanted: String,
        version: String,
        how: String,
    },
    #[error("cannot read the CRD {name}: {reason}")]
    Unreadable { name: String, reason: String },
}

/// How to install or update the CRD.
fn how() -> String {
    format!(
        "Update it to this operator's version: `helm upgrade <release> charts/volmig --reuse-values` (the chart renders the CRD from a template with crds.enabled=true, the default), \
         or `volmig-operator crd | kubectl apply --server-side -f -` (the same file as {CRD_FILE} of volmig {}); the operator starts once it is current",
        env!("CARGO_PKG_VERSION")
    )
}

/// Whether the CRD served by the cluster carries this build's schema hash.
pub async fn check_crd(client: &Client) -> Result<(), CrdMismatch> {
    let name = crd_name();
    let wanted = schema_hash().map_err(|e| CrdMismatch::Unreadable {
        name: name.clone(),
        reason: e.to_string(),
    })?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let served = match api.get_opt(&name).await {
        Ok(Some(crd)) => crd,
        Ok(None) => {
            return Err(CrdMismatch::Missing { name, how: how() });
        }
        Err(e) => {
            return Err(CrdMismatch::Unreadable {
                name,
                reason: e.to_string(),
            });
        }
    };
    let hash = served
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SCHEMA_HASH))
        .cloned();
    match hash {
        Some(h) if h == wanted => Ok(()),
        other => Err(CrdMismatch::Stale {
            name,
            served: other.unwrap_or_else(|| format!("unknown (no {SCHEMA_HASH} annotation)")),
            wanted,
            version: env!("CARGO_PKG_VERSION").into(),
            how: how(),
        }),
    }
}

/// Waits until the served CRD is current, saying why not every
/// [`CRD_RECHECK`]; false if `stop` resolved first.
pub async fn wait_for_current_crd(
    client: &Client,
    every: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> bool {
    let mut stop = std::pin::pin!(stop);
    loop {
        match check_crd(client).await {
            Ok(()) => {
                info!(crd = %crd_name(), "the CRD is current");
                return true;
            }
            Err(e) => error!("refusing to run: {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = &mut stop => return false,
        }
    }
}
