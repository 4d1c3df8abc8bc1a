//! The gRPC face of the node plugin: CSI's Identity and Node services on
//! a unix socket (kubelet's plugin directory). Requests go to
//! [`NodePlugin`] as they are (its checks follow the spec's order), and
//! answers and errors are converted here, once; every call is logged with
//! its volume.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::{debug, warn};
use volmig_api::csi::identity_server::{Identity, IdentityServer};
use volmig_api::csi::node_server::{Node, NodeServer};
use volmig_api::csi::plugin_capability::{self, volume_expansion};
use volmig_api::csi::{self as pb, node_service_capability, volume_usage};

use super::error::CsiError;
use super::node::NodePlugin;
use super::volumes::Volumes;
use super::{DRIVER_NAME, TOPOLOGY_KEY};

type Rpc<T> = Result<Response<T>, Status>;

/// The plugin's Identity and Node services over one [`NodePlugin`].
pub struct CsiService<V>(pub Arc<NodePlugin<V>>);

impl<V> Clone for CsiService<V> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

/// An error as gRPC status, with the call and volume named, logged.
fn fail(op: &'static str, volume: &str, e: CsiError) -> Status {
    let e = if volume.is_empty() {
        e.op(op)
    } else {
        e.op(op).volume(volume)
    };
    warn!(op, volume, code = ?e.code, error = %e.message, "CSI call failed");
    e.into()
}

#[tonic::async_trait]
impl<V: Volumes> Identity for CsiService<V> {
    async fn get_plugin_info(
        &self,
        _: Request<pb::GetPluginInfoRequest>,
    ) -> Rpc<pb::GetPluginInfoResponse> {
        Ok(Response::new(pb::GetPluginInfoResponse {
            name: DRIVER_NAME.to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: HashMap::new(),
        }))
    }

    /// Volumes are reachable from the node serving them only (topology),
    /// and grow while published (online expansion). The controller
    /// service is the operator's, not this plugin instance's.
    async fn get_plugin_capabilities(
        &self,
        _: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Rpc<pb::GetPluginCapabilitiesResponse> {
        let service = |t: plugin_capability::service::Type| pb::PluginCapability {
            r#type: Some(plugin_capability::Type::Service(
                plugin_capability::Service { r#type: t as i32 },
            )),
        };
        Ok(Response::new(pb::GetPluginCapabilitiesResponse {
            capabilities: vec![
                service(plugin_capability::service::Type::VolumeAccessibilityConstraints),
                pb::PluginCapability {
                    r#type: Some(plugin_capability::Type::VolumeExpansion(
                        plugin_capability::VolumeExpansion {
                            r#type: volume_expansion::Type::Online as i32,
                        },
                    )),
                },
            ],
        }))
    }

    /// Ready once the agent serves again what it served before a restart.
    async fn probe(&self, _: Request<pb::ProbeRequest>) -> Rpc<pb::ProbeResponse> {
        Ok(Response::new(pb::ProbeResponse {
            ready: Some(self.0.ready()),
        }))
    }
}

#[tonic::async_trait]
impl<V: Volumes> Node for CsiService<V> {
    async fn node_stage_volume(
        &self,
        r: Request<pb::NodeStageVolumeRequest>,
    ) -> Rpc<pb::NodeStageVolumeResponse> {
        let r = r.into_inner();
        let volume = r.volume_id.clone();
        debug!(%volume, staging = %r.staging_target_path, "NodeStageVolume");
        self.0
            .stage(r)
            .await
            .map_err(|e| fail("NodeStageVolume", &volume, e))?;
        Ok(Response::new(pb::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        r: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Rpc<pb::NodeUnstageVolumeResponse> {
        let r = r.into_inner();
        let volume = r.volume_id.clone();
        debug!(%volume, staging = %r.staging_target_path, "NodeUnstageVolume");
        self.0
            .unstage(r)
            .await
            .map_err(|e| fail("NodeUnstageVolume", &volume, e))?;
        Ok(Response::new(pb::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        r: Request<pb::NodePublishVolumeRequest>,
    ) -> Rpc<pb::NodePublishVolumeResponse> {
        let r = r.into_inner();
        let volume = r.volume_id.clone();
        debug!(%volume, target = %r.target_path, readonly = r.readonly, "NodePublishVolume");
        self.0
            .publish(r)
            .await
            .map_err(|e| fail("NodePublishVolume", &volume, e))?;
        Ok(Response::new(pb::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        r: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Rpc<pb::NodeUnpublishVolumeResponse> {
        let r = r.into_inner();
        let volume = r.volume_id.clone();
        debug!(%volume, target = %r.target_path, "NodeUnpublishVolume");
        self.0
            .unpublish(r)
            .await
            .map_err(|e| fail("NodeUnpublishVolume", &volume, e))?;
        Ok(Response::new(pb::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        r: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Rpc<pb::NodeGetVolumeStatsResponse> {
        let r = r.into_inner();
        let volume = r.volume_id.clone();
        let s = self
            .0
            .stats(r)
            .await
            .map_err(|e| fail("NodeGetVolumeStats", &volume, e))?;
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let mut usage = Vec::new();
        if let Some(u) = s.usage {
            if s.block {
                usage.push(pb::VolumeUsage {
                    available: 0,
                    total: n(u.bytes_total),
                    used: 0,
                    unit: volume_usage::Unit::Bytes as i32,
                });
            } else {
                usage.push(pb::VolumeUsage {
                    available: n(u.bytes_available),
                    total: n(u.bytes_total),
                    used: n(u.bytes_used),
                    unit: volume_usage::Unit::Bytes as i32,
                });
                usage.push(pb::VolumeUsage {
                    available: n(u.inodes_available),
                    total: n(u.inodes_total),
                    used: n(u.inodes_used),
                    unit: volume_usage::Unit::Inodes as i32,
                });
            }
        }
        Ok(Response::new(pb::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(pb::VolumeCondition {
                abnormal: s.condition.abnormal,
                message: s.condition.message,
            }),
        }))
    }

    async fn node_expand_volume(
        &self,
        r: Request<pb::NodeExpandVolumeRequest>,
    ) -> Rpc<pb::NodeExpandVolumeResponse> {
        let r = r.into_inner();
        let volume = r.volume_id.clone();
        let size = self
            .0
            .expand(r)
            .await
            .map_err(|e| fail("NodeExpandVolume", &volume, e))?;
        Ok(Response::new(pb::NodeExpandVolumeResponse {
            capacity_bytes: i64::try_from(size).unwrap_or(i64::MAX),
        }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Rpc<pb::NodeGetCapabilitiesResponse> {
        use node_service_capability::rpc::Type;
        let rpc = |t: Type| pb::NodeServiceCapability {
            r#type: Some(node_service_capability::Type::Rpc(
                node_service_capability::Rpc { r#type: t as i32 },
            )),
        };
        Ok(Response::new(pb::NodeGetCapabilitiesResponse {
            capabilities: vec![
                rpc(Type::StageUnstageVolume),
                rpc(Type::GetVolumeStats),
                rpc(Type::ExpandVolume),
                rpc(Type::VolumeCondition),
                rpc(Type::SingleNodeMultiWriter),
            ],
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<pb::NodeGetInfoRequest>,
    ) -> Rpc<pb::NodeGetInfoResponse> {
        let c = self.0.config();
        Ok(Response::new(pb::NodeGetInfoResponse {
            node_id: c.node_id.clone(),
            max_volumes_per_node: c.max_volumes_per_node,
            accessible_topology: Some(pb::Topology {
                segments: HashMap::from([(TOPOLOGY_KEY.to_string(), c.node_id.clone())]),
            }),
        }))
    }
}

/// Serves the plugin's Identity and Node services on `listener` (bound at
/// `path`, e.g. by `grpc::bind_unix`) until `shutdown` resolves, then
/// removes the socket file.
pub async fn serve_unix<V: Volumes>(
    plugin: Arc<NodePlugin<V>>,
    listener: tokio::net::UnixListener,
    path: &Path,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), crate::AgentError> {
    let svc = CsiService(plugin);
    let served = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(svc.clone()))
        .add_service(NodeServer::new(svc))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await;
    let _ = std::fs::remove_file(path);
    served.map_err(|e| crate::AgentError::Task(format!("CSI server on {}: {e}", path.display())))
}
