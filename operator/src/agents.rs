//! The node agents (slaves): which one serves a node, which volumes it
//! exports, and a slave client of it. The agents run as a DaemonSet in the
//! operator's namespace; each is reached at `https://<pod IP>:<port>` with
//! mutual TLS, its certificate carrying the name `--agent-tls-name`.

use std::future::Future;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::Store;
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

/// Which pods are this operator's agents: the chart's labels of the agent
/// DaemonSet's pods. Name and instance (the Helm release) both, so the
/// agents of another release (another namespace's, or the same one's) are
/// never dialled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentLabels {
    /// `app.kubernetes.io/name` (`--app-name`).
    pub name: String,
    /// `app.kubernetes.io/instance`, the Helm release (`--instance`).
    pub instance: String,
}

/// `app.kubernetes.io/component` of the agent pods.
pub const AGENT_COMPONENT: &str = "node-agent";

impl AgentLabels {
    fn pairs(&self) -> [(&'static str, &str); 3] {
        [
            ("app.kubernetes.io/name", self.name.as_str()),
            ("app.kubernetes.io/instance", self.instance.as_str()),
            ("app.kubernetes.io/component", AGENT_COMPONENT),
        ]
    }

    /// The label selector of the agent pods.
    pub fn selector(&self) -> String {
        self.pairs()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Whether `p` carries every one of the labels.
    pub fn matches(&self, p: &Pod) -> bool {
        let labels = p.metadata.labels.as_ref();
        self.pairs()
            .iter()
            .all(|(k, v)| labels.and_then(|l| l.get(*k)).map(String::as_str) == Some(*v))
    }
}

impl Default for AgentLabels {
    /// The chart installed as release `volmig`.
    fn default() -> Self {
        Self {
            name: "volmig".into(),
            instance: "volmig".into(),
        }
    }
}

/// The endpoint of the ready agent pod (of `labels`, in namespace `ns`)
/// on `node`, if any, from the pod cache.
pub fn agent_on_node(
    pods: &Store<Pod>,
    ns: &str,
    labels: &AgentLabels,
    node: &str,
    port: u16,
) -> Option<String> {
    pods.state_filter(|p| {
        p.metadata.namespace.as_deref() == Some(ns)
            && labels.matches(p)
            && p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
            && ready(p)
    })
    .iter()
    .filter_map(|p| {
        p.status
            .as_ref()?
            .pod_ip
            .as_deref()
            .map(|ip| endpoint(ip, port))
    })
    .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_are_this_release_s_only() {
        let l = AgentLabels {
            name: "volmig".into(),
            instance: "prod".into(),
        };
        assert_eq!(
            l.selector(),
            "app.kubernetes.io/name=volmig,app.kubernetes.io/instance=prod,app.kubernetes.io/component=node-agent"
        );
        let pod = |name: &str, instance: &str, component: &str| -> Pod {
            serde_json::from_value(serde_json::json!({"metadata": {"name": "a", "labels": {
                "app.kubernetes.io/name": name, "app.kubernetes.io/instance": instance,
                "app.kubernetes.io/component": component}}}))
            .unwrap()
        };
        assert!(l.matches(&pod("volmig", "prod", "node-agent")));
        assert!(!l.matches(&pod("volmig", "staging", "node-agent")));
        assert!(!l.matches(&pod("other", "prod", "node-agent")));
        assert!(!l.matches(&pod("volmig", "prod", "operator")));
        let mut bare = pod("volmig", "prod", "node-agent");
        bare.metadata.labels = None;
        assert!(!l.matches(&bare));
    }

    #[test]
    fn endpoints() {
        assert_eq!(endpoint("10.1.2.3", 7443), "https://10.1.2.3:7443");
        assert_eq!(endpoint("fd00::5", 7443), "https://[fd00::5]:7443");
    }
}
