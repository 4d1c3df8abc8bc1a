//! The gRPC face of the controller: CSI's Identity and Controller
//! services on a unix socket (the sidecars' shared socket). Requests are
//! converted to the controller's terms here, once; answers and errors are
//! converted back here, once; every call is logged with its volume.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::{debug, warn};
use volmig_api::csi::controller_server::{Controller as CsiController, ControllerServer};
use volmig_api::csi::identity_server::{Identity, IdentityServer};
use volmig_api::csi::plugin_capability::{self, volume_expansion};
use volmig_api::csi::volume_capability::AccessType;
use volmig_api::csi::volume_capability::access_mode::Mode;
use volmig_api::csi::{self as pb, controller_service_capability};
use volmig_api::csi_driver::DRIVER_NAME;

use super::controller::{AccessMode, Cap, Controller, CreateVolume};
use super::error::{ControllerError, ControllerResult};

type Rpc<T> = Result<Response<T>, Status>;

/// The Identity and Controller services over one [`Controller`].
#[derive(Clone)]
pub struct ControllerService(pub Arc<Controller>);

/// An error as gRPC status, with the call and volume named, logged.
fn fail(op: &'static str, volume: &str, e: ControllerError) -> Status {
    let e = e.op(op).volume(volume);
    warn!(op, volume, kind = ?e.kind, error = %e.message, "CSI call failed");
    e.into()
}

fn cap_of(c: &pb::VolumeCapability) -> ControllerResult<Cap> {
    let m = c
        .access_mode
        .as_ref()
        .ok_or_else(|| ControllerError::missing("volume_capability.access_mode"))?;
    let mode = match Mode::try_from(m.mode) {
        Ok(Mode::SingleNodeWriter) => AccessMode::SingleNodeWriter,
        Ok(Mode::SingleNodeReaderOnly) => AccessMode::SingleNodeReaderOnly,
        Ok(Mode::MultiNodeReaderOnly) => AccessMode::MultiNodeReaderOnly,
        Ok(Mode::MultiNodeSingleWriter) => AccessMode::MultiNodeSingleWriter,
        Ok(Mode::MultiNodeMultiWriter) => AccessMode::MultiNodeMultiWriter,
        Ok(Mode::SingleNodeSingleWriter) => AccessMode::SingleNodeSingleWriter,
        Ok(Mode::SingleNodeMultiWriter) => AccessMode::SingleNodeMultiWriter,
        Ok(Mode::Unknown) | Err(_) => {
            return Err(ControllerError::invalid(format!(
                "volume_capability.access_mode {} is not a known access mode",
                m.mode
            )));
        }
    };
    match &c.access_type {
        None => Err(ControllerError::missing("volume_capability.access_type")),
        Some(AccessType::Block(_)) => Ok(Cap {
            block: true,
            fs_type: String::new(),
            mode,
        }),
        Some(AccessType::Mount(m)) => Ok(Cap {
            block: false,
            fs_type: m.fs_type.trim().to_ascii_lowercase(),
            mode,
        }),
    }
}

fn caps_of(caps: &[pb::VolumeCapability]) -> ControllerResult<Vec<Cap>> {
    caps.iter().map(cap_of).collect()
}

fn sorted(m: &HashMap<String, String>) -> BTreeMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn bytes(n: i64, field: &str) -> ControllerResult<u64> {
    u64::try_from(n).map_err(|_| ControllerError::invalid(format!("{field} must not be negative")))
}

fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn create_of(r: &pb::CreateVolumeRequest) -> ControllerResult<CreateVolume> {
    let (required_bytes, limit_bytes) = match &r.capacity_range {
        Some(c) => (
            bytes(c.required_bytes, "capacity_range.required_bytes")?,
            bytes(c.limit_bytes, "capacity_range.limit_bytes")?,
        ),
        None => (0, 0),
    };
    Ok(CreateVolume {
        name: r.name.clone(),
        required_bytes,
        limit_bytes,
        caps: caps_of(&r.volume_capabilities)?,
        parameters: sorted(&r.parameters),
        mutable_parameters: sorted(&r.mutable_parameters),
        content_source: r.volume_content_source.is_some(),
    })
}

#[tonic::async_trait]
impl Identity for ControllerService {
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

    /// A controller service, and online expansion. No topology: a volume
    /// can be published on any node (its backing claim follows it through
    /// a holder pod), which is what lets a pod be rescheduled anywhere.
    async fn get_plugin_capabilities(
        &self,
        _: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Rpc<pb::GetPluginCapabilitiesResponse> {
        Ok(Response::new(pb::GetPluginCapabilitiesResponse {
            capabilities: vec![
                pb::PluginCapability {
                    r#type: Some(plugin_capability::Type::Service(
                        plugin_capability::Service {
                            r#type: plugin_capability::service::Type::ControllerService as i32,
                        },
                    )),
                },
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

    async fn probe(&self, _: Request<pb::ProbeRequest>) -> Rpc<pb::ProbeResponse> {
        Ok(Response::new(pb::ProbeResponse { ready: Some(true) }))
    }
}

#[tonic::async_trait]
impl CsiController for ControllerService {
    async fn create_volume(
        &self,
        r: Request<pb::CreateVolumeRequest>,
    ) -> Rpc<pb::CreateVolumeResponse> {
        let r = r.into_inner();
        debug!(name = %r.name, "CreateVolume");
        let name = r.name.clone();
        let req = create_of(&r).map_err(|e| fail("CreateVolume", "", e))?;
        let c = self.0.create(req).await.map_err(|e| {
            let e = if e.volume.is_none() && !name.is_empty() {
                e.volume(&super::controller::volume_id(&name))
            } else {
                e
            };
            fail("CreateVolume", "", e)
        })?;
        Ok(Response::new(pb::CreateVolumeResponse {
            volume: Some(pb::Volume {
                capacity_bytes: int(c.capacity_bytes),
                volume_id: c.volume_id,
                volume_context: c.volume_context.into_iter().collect(),
                content_source: None,
                accessible_topology: Vec::new(),
            }),
        }))
    }

    async fn delete_volume(
        &self,
        r: Request<pb::DeleteVolumeRequest>,
    ) -> Rpc<pb::DeleteVolumeResponse> {
        let r = r.into_inner();
        debug!(volume = %r.volume_id, "DeleteVolume");
        self.0
            .delete(&r.volume_id)
            .await
            .map_err(|e| fail("DeleteVolume", &r.volume_id, e))?;
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        r: Request<pb::ControllerPublishVolumeRequest>,
    ) -> Rpc<pb::ControllerPublishVolumeResponse> {
        let r = r.into_inner();
        debug!(volume = %r.volume_id, node = %r.node_id, "ControllerPublishVolume");
        let op = "ControllerPublishVolume";
        let cap = r
            .volume_capability
            .as_ref()
            .map(cap_of)
            .transpose()
            .map_err(|e| fail(op, &r.volume_id, e))?;
        let ctx = self
            .0
            .publish(&r.volume_id, &r.node_id, cap, r.readonly)
            .await
            .map_err(|e| fail(op, &r.volume_id, e))?;
        Ok(Response::new(pb::ControllerPublishVolumeResponse {
            publish_context: ctx.into_iter().collect(),
        }))
    }

    async fn controller_unpublish_volume(
        &self,
        r: Request<pb::ControllerUnpublishVolumeRequest>,
    ) -> Rpc<pb::ControllerUnpublishVolumeResponse> {
        let r = r.into_inner();
        debug!(volume = %r.volume_id, node = %r.node_id, "ControllerUnpublishVolume");
        self.0
            .unpublish(&r.volume_id, &r.node_id)
            .await
            .map_err(|e| fail("ControllerUnpublishVolume", &r.volume_id, e))?;
        Ok(Response::new(pb::ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        r: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Rpc<pb::ValidateVolumeCapabilitiesResponse> {
        let r = r.into_inner();
        let op = "ValidateVolumeCapabilities";
        let caps = caps_of(&r.volume_capabilities).map_err(|e| fail(op, &r.volume_id, e))?;
        let why = self
            .0
            .validate(&r.volume_id, &caps)
            .await
            .map_err(|e| fail(op, &r.volume_id, e))?;
        Ok(Response::new(match why {
            None => pb::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: r.mutable_parameters,
                }),
                message: String::new(),
            },
            Some(message) => pb::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message,
            },
        }))
    }

    async fn list_volumes(
        &self,
        _: Request<pb::ListVolumesRequest>,
    ) -> Rpc<pb::ListVolumesResponse> {
        Err(Status::unimplemented("ListVolumes is not offered"))
    }

    async fn get_capacity(
        &self,
        _: Request<pb::GetCapacityRequest>,
    ) -> Rpc<pb::GetCapacityResponse> {
        Err(Status::unimplemented("GetCapacity is not offered"))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Rpc<pb::ControllerGetCapabilitiesResponse> {
        use controller_service_capability::rpc::Type;
        let rpc = |t: Type| pb::ControllerServiceCapability {
            r#type: Some(controller_service_capability::Type::Rpc(
                controller_service_capability::Rpc { r#type: t as i32 },
            )),
        };
        Ok(Response::new(pb::ControllerGetCapabilitiesResponse {
            capabilities: vec![
                rpc(Type::CreateDeleteVolume),
                rpc(Type::PublishUnpublishVolume),
                rpc(Type::ExpandVolume),
                rpc(Type::ModifyVolume),
            ],
        }))
    }

    async fn create_snapshot(
        &self,
        _: Request<pb::CreateSnapshotRequest>,
    ) -> Rpc<pb::CreateSnapshotResponse> {
        Err(Status::unimplemented("snapshots are not offered"))
    }

    async fn delete_snapshot(
        &self,
        _: Request<pb::DeleteSnapshotRequest>,
    ) -> Rpc<pb::DeleteSnapshotResponse> {
        Err(Status::unimplemented("snapshots are not offered"))
    }

    async fn list_snapshots(
        &self,
        _: Request<pb::ListSnapshotsRequest>,
    ) -> Rpc<pb::ListSnapshotsResponse> {
        Err(Status::unimplemented("snapshots are not offered"))
    }

    async fn controller_expand_volume(
        &self,
        r: Request<pb::ControllerExpandVolumeRequest>,
    ) -> Rpc<pb::ControllerExpandVolumeResponse> {
        let r = r.into_inner();
        let op = "ControllerExpandVolume";
        debug!(volume = %r.volume_id, "ControllerExpandVolume");
        let (req, lim) = match &r.capacity_range {
            Some(c) => (
                bytes(c.required_bytes, "capacity_range.required_bytes")
                    .map_err(|e| fail(op, &r.volume_id, e))?,
                bytes(c.limit_bytes, "capacity_range.limit_bytes")
                    .map_err(|e| fail(op, &r.volume_id, e))?,
            ),
            None => (0, 0),
        };
        let size = self
            .0
            .expand(&r.volume_id, req, lim)
            .await
            .map_err(|e| fail(op, &r.volume_id, e))?;
        Ok(Response::new(pb::ControllerExpandVolumeResponse {
            capacity_bytes: int(size),
            node_expansion_required: true,
        }))
    }

    async fn controller_get_volume(
        &self,
        _: Request<pb::ControllerGetVolumeRequest>,
    ) -> Rpc<pb::ControllerGetVolumeResponse> {
        Err(Status::unimplemented("ControllerGetVolume is not offered"))
    }

    async fn controller_modify_volume(
        &self,
        r: Request<pb::ControllerModifyVolumeRequest>,
    ) -> Rpc<pb::ControllerModifyVolumeResponse> {
        let r = r.into_inner();
        debug!(volume = %r.volume_id, "ControllerModifyVolume");
        self.0
            .modify(&r.volume_id, &sorted(&r.mutable_parameters))
            .await
            .map_err(|e| fail("ControllerModifyVolume", &r.volume_id, e))?;
        Ok(Response::new(pb::ControllerModifyVolumeResponse {}))
    }
}

/// Binds the controller's socket at `path` (a stale socket file of an
/// earlier run is replaced).
pub fn bind_unix(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    tokio::net::UnixListener::bind(path)
}

/// Serves the Identity and Controller services on `listener` (bound at
/// `path`) until `shutdown` resolves, then removes the socket file.
pub async fn serve_unix(
    controller: Arc<Controller>,
    listener: tokio::net::UnixListener,
    path: &Path,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let svc = ControllerService(controller);
    let served = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(svc.clone()))
        .add_service(ControllerServer::new(svc))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await;
    let _ = std::fs::remove_file(path);
    served
}
