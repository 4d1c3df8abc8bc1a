//! The node agents (slaves): which one serves a node, which volumes it
//! exports, and a slave client of it. The agents run as a DaemonSet in the
//! operator's namespace; each is reached at `https://<pod IP>:<port>` with
//! mutual TLS, its certificate carrying the name `--agent-tls-name`.

use std::future::Future;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use volmig_api::Slave;
use volmig_api::slave::{ListVolumes, VolumeInfo};
use volmig_master::{ClientTls, GrpcSlave};

use crate::error::{Error, Result};

/// How the operator reaches agents; the gRPC one in a cluster, an
/// in-process one in tests.
pub trait Connector: Send + Sync + 'static {
    type Slave: Slave + Send + Sync + 'static;
    /// A slave client of the agent at `endpoint`.
    fn slave(&self, endpoint: &str) -> Result<Self::Slave>;
    /// The volumes the agent at `endpoint` serves (with the device each
    /// one's I/O goes to now).
    fn volumes(&self, endpoint: &str) -> impl Future<Output = Result<Vec<VolumeInfo>>> + Send;
    /// The names of the volumes the agent at `endpoint` serves without an
    /// error.
    fn exports(&self, endpoint: &str) -> impl Future<Output = Result<Vec<String>>> + Send {
        async move {
            Ok(self
                .volumes(endpoint)
                .await?
                .into_iter()
                .filter(|v| v.error.is_none())
                .map(|v| v.name)
                .collect())
        }
    }
}

/// Agents over gRPC with mutual TLS.
pub struct GrpcConnector {
    tls: ClientTls,
}

impl GrpcConnector {
    /// `dir` holds `ca.pem`, `master.pem`, `master-key.pem` (as `volmig
    /// certs` writes them); `server_name` is the name in the agents'
    /// certificate.
    pub fn new(dir: &std::path::Path, server_name: &str) -> Result<Self> {
        let tls = ClientTls {
            ca: dir.join("ca.pem"),
            cert: dir.join("master.pem"),
            key: dir.join("master-key.pem"),
            domain: server_name.to_string(),
        };
        for p in [&tls.ca, &tls.cert, &tls.key] {
            if !p.is_file() {
                return Err(Error::Tls(format!("{} is missing", p.display())));
            }
        }
        Ok(Self { tls })
    }
}

impl Connector for GrpcConnector {
    type Slave = GrpcSlave;

    fn slave(&self, endpoint: &str) -> Result<GrpcSlave> {
        Ok(GrpcSlave::new(endpoint, Some(&self.tls))?)
    }

    async fn volumes(&self, endpoint: &str) -> Result<Vec<VolumeInfo>> {
        let list = self
            .slave(endpoint)?
            .list_volumes(ListVolumes)
            .await
            .map_err(|e| Error::Agent {
                endpoint: endpoint.to_string(),
                reason: e.to_string(),
            })?;
        Ok(list.volumes)
    }
}

/// `https://<ip>:<port>` (brackets for IPv6).
pub fn endpoint(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("https://[{ip}]:{port}")
    } else {
        format!("https://{ip}:{port}")
    }
}

fn ready(p: &Pod) -> bool {
    p.status.as_ref().is_some_and(|s| {
        s.phase.as_deref() == Some("Running")
            && s.pod_ip.is_some()
            && s.conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// The endpoint of the ready agent pod on `node`, if any.
pub async fn agent_on_node(
    pods: &Api<Pod>,
    selector: &str,
    node: &str,
    port: u16,
) -> Result<Option<String>> {
    let list = pods.list(&ListParams::default().labels(selector)).await?;
    Ok(list
        .items
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
        .find(|p| ready(p))
        .and_then(|p| {
            p.status
                .as_ref()?
                .pod_ip
                .as_deref()
                .map(|ip| endpoint(ip, port))
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(endpoint("10.1.2.3", 7443), "https://10.1.2.3:7443");
        assert_eq!(endpoint("fd00::5", 7443), "https://[fd00::5]:7443");
    }
}
