//! What the operator checks before it competes for leadership, and the
//! CSI controller before it answers: the CRDs served by the cluster
//! (VolumeMigration, and VolmigVolume for the CSI driver's records) are the
//! ones this build was made for. An older CRD would let the API server drop fields the operator
//! writes (its structural schema prunes unknown ones) and miss rules the
//! operator relies on; a newer one holds fields this operator does not know.
//! So the operator refuses to run (it stays unready and looks again every
//! [`CRD_RECHECK`], so updating the CRD is enough, no restart needed), with
//! a message saying how to update it.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Api, Client};
use tracing::{error, info};

use crate::crd_gen::{Crd, SCHEMA_HASH, crd_names};

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

/// How to install or update `crd`.
fn how(crd: Crd) -> String {
    format!(
        "Update it to this operator's version: `helm upgrade <release> charts/volmig --reuse-values` (the chart renders the CRDs from templates with crds.enabled=true, the default), \
         or `volmig-operator crd{} | kubectl apply --server-side -f -` (the same as {} of volmig {}); volmig starts once it is current",
        crd.print_args(),
        crd.file(),
        env!("CARGO_PKG_VERSION")
    )
}

/// Whether the CRDs served by the cluster (VolumeMigration's, then the
/// CSI driver's VolmigVolume records') carry this build's schema hashes.
pub async fn check_crd(client: &Client) -> Result<(), CrdMismatch> {
    for crd in Crd::ALL {
        check_one(client, crd).await?;
    }
    Ok(())
}

async fn check_one(client: &Client, crd: Crd) -> Result<(), CrdMismatch> {
    let name = crd.name().to_string();
    let wanted = crd.schema_hash().map_err(|e| CrdMismatch::Unreadable {
        name: name.clone(),
        reason: e.to_string(),
    })?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let served = match api.get_opt(&name).await {
        Ok(Some(served)) => served,
        Ok(None) => {
            return Err(CrdMismatch::Missing {
                name,
                how: how(crd),
            });
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
            how: how(crd),
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
                info!(crds = ?crd_names(), "the CRDs are current");
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
