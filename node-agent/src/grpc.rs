//! The agent's gRPC service, its one control surface: the [`Slave`]
//! contract over TCP with mutual TLS (the agent requires a client
//! certificate from its CA; plain text only when explicitly asked for, for
//! local development), and the same service on a local unix socket, where
//! the socket's file permissions decide who may connect (a local master:
//! `volmig migrate --agent unix:///run/volmig/agent.sock`). Requests are
//! converted to domain types here, once (`FromWire`), and answers back
//! (`IntoWire`).

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::Stream;
use tonic::transport::Server;
use tonic::{Request, Response, Status};
use volmig_api::Slave;
use volmig_api::limits::MAX_MESSAGE;
use volmig_api::slave::wire::{FromWire, IntoWire};
use volmig_api::slave::{self as dom, Fence};
use volmig_api::wire::agent_server::{Agent as AgentRpc, AgentServer};
use volmig_api::wire::{self as pb, Progress};

use crate::agent::Agent;
use crate::error::{AgentError, Result};

/// Files of the agent's TLS identity and the CA its clients must come from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub client_ca: std::path::PathBuf,
}

/// The agent's TLS, read again for every connection: certificates renewed
/// in place (a Secret kubelet updates) are used without a restart.
pub fn server_tls(files: &TlsFiles) -> volmig_api::tls::ServerTls {
    volmig_api::tls::ServerTls::server(volmig_api::tls::TlsFiles {
        ca: files.client_ca.clone(),
        cert: files.cert.clone(),
        key: files.key.clone(),
    })
}

struct Service(Arc<Agent>);

type Rpc<T> = std::result::Result<Response<T>, Status>;

/// Generates the unary methods from the one list of slave calls: the
/// request converted and checked, the agent's answer converted back.
macro_rules! unary {
    ($($name:ident($req:ty) -> $res:ty;)*) => {
        impl Service {
            $(async fn $name(
                &self,
                r: Request<<$req as FromWire>::Wire>,
            ) -> Rpc<<$res as IntoWire>::Wire> {
                let req = <$req>::from_wire(r.into_inner())?;
                let answer = self.0.$name(req).await?;
                Ok(Response::new(answer.into_wire()))
            })*
        }
    };
}

volmig_api::slave_calls!(unary);

#[tonic::async_trait]
impl AgentRpc for Service {
    async fn prepare(&self, r: Request<pb::PrepareRequest>) -> Rpc<pb::SessionState> {
        Service::prepare(self, r).await
    }
    async fn copy_pass(&self, r: Request<pb::CopyPassRequest>) -> Rpc<pb::PassResult> {
        Service::copy_pass(self, r).await
    }
    async fn set_mirror(&self, r: Request<pb::SetMirrorRequest>) -> Rpc<pb::SessionState> {
        Service::set_mirror(self, r).await
    }
    async fn quiesce(&self, r: Request<pb::QuiesceRequest>) -> Rpc<pb::QuiesceResult> {
        Service::quiesce(self, r).await
    }
    async fn release(&self, r: Request<pb::Step>) -> Rpc<pb::SessionState> {
        Service::release(self, r).await
    }
    async fn synchronize(&self, r: Request<pb::Step>) -> Rpc<pb::SessionState> {
        Service::synchronize(self, r).await
    }
    async fn redirect(&self, r: Request<pb::RedirectRequest>) -> Rpc<pb::SessionState> {
        Service::redirect(self, r).await
    }
    async fn resume(&self, r: Request<pb::Step>) -> Rpc<pb::ResumeResult> {
        Service::resume(self, r).await
    }
    async fn terminate(&self, r: Request<pb::TerminateRequest>) -> Rpc<pb::TerminateResult> {
        Service::terminate(self, r).await
    }
    async fn abort(&self, r: Request<pb::Step>) -> Rpc<pb::SessionState> {
        Service::abort(self, r).await
    }
    async fn set_bandwidth(&self, r: Request<pb::SetBandwidthRequest>) -> Rpc<pb::SessionState> {
        Service::set_bandwidth(self, r).await
    }
    async fn get_state(&self, r: Request<pb::Step>) -> Rpc<pb::SessionState> {
        Service::get_state(self, r).await
    }
    async fn take_dirty(&self, r: Request<pb::TakeDirtyRequest>) -> Rpc<pb::DirtyBatch> {
        Service::take_dirty(self, r).await
    }
    async fn merge_dirty(&self, r: Request<pb::MergeDirtyRequest>) -> Rpc<pb::SessionState> {
        Service::merge_dirty(self, r).await
    }
    async fn serve_volume(&self, r: Request<pb::ServeVolumeRequest>) -> Rpc<pb::VolumeInfo> {
        Service::serve_volume(self, r).await
    }
    async fn unserve_volume(
        &self,
        r: Request<pb::UnserveVolumeRequest>,
    ) -> Rpc<pb::UnserveVolumeResponse> {
        Service::unserve_volume(self, r).await
    }
    async fn list_volumes(
        &self,
        r: Request<pb::ListVolumesRequest>,
    ) -> Rpc<pb::ListVolumesResponse> {
        Service::list_volumes(self, r).await
    }

    type WatchProgressStream =
        Pin<Box<dyn Stream<Item = std::result::Result<Progress, Status>> + Send>>;

    async fn watch_progress(&self, r: Request<pb::Step>) -> Rpc<Self::WatchProgressStream> {
        let fence = Fence::from_wire(r.into_inner())?;
        self.0.get_state(fence.clone()).await?; // fenced, exists
        let agent = self.0.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let item: std::result::Result<dom::SessionState, Status> =
                    agent.get_state(fence.clone()).await.map_err(Status::from);
                let done = item.as_ref().map(|s| s.finished).unwrap_or(true);
                let item = item.map(|s| Progress {
                    bytes_copied: s.bytes_copied,
                    dirty_bytes: s.dirty_bytes,
                    copy_rate: s.copy_rate,
                    write_rate: s.write_rate,
                });
                if tx.send(item).await.is_err() || done {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

fn service(agent: Arc<Agent>) -> AgentServer<Service> {
    AgentServer::new(Service(agent))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// Serves the agent API on `addr` until `shutdown` resolves. Without `tls`
/// the service is plain text (only for an explicit insecure flag).
pub async fn serve(
    agent: Arc<Agent>,
    addr: SocketAddr,
    tls: Option<&TlsFiles>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let Some(files) = tls else {
        return Server::builder()
            .add_service(service(agent))
            .serve_with_shutdown(addr, shutdown)
            .await
            .map_err(|e| AgentError::Task(format!("gRPC server on {addr}: {e}")));
    };
    // Until the TLS files exist (in a cluster: the Secret the operator
    // creates, projected by kubelet) the port stays closed; volumes are
    // served meanwhile.
    let tls = Arc::new(server_tls(files));
    let mut shutdown = Box::pin(shutdown);
    tokio::select! {
        _ = tls.ready(Duration::from_secs(2)) => {}
        _ = &mut shutdown => return Ok(()),
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| AgentError::Task(format!("gRPC server on {addr}: {e}")))?;
    tracing::info!(%addr, "agent gRPC API listening (mutual TLS, certificates reloaded when they change)");
    Server::builder()
        .add_service(service(agent))
        .serve_with_incoming_shutdown(volmig_api::tls::incoming(listener, tls), shutdown)
        .await
        .map_err(|e| AgentError::Task(format!("gRPC server on {addr}: {e}")))
}

/// Who may connect to the agent's unix socket: its owner (mode 0600), or
/// also a group (0660).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketAccess {
    pub group: Option<u32>,
}

/// Binds the agent's unix socket at `path` with the permissions of
/// `access`. A stale socket of an earlier run is replaced; any other file
/// there is an error. The socket is bound inside a fresh directory only
/// this process can enter, given its mode (and group), then moved into
/// place, so nobody can connect before its permissions are right.
pub fn bind_unix(path: &Path, access: SocketAccess) -> Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    let err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| AgentError::State { path: p, source }
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let file = path.file_name().ok_or_else(|| {
        AgentError::Invalid(format!("socket path {} names no file", path.display()))
    })?;
    std::fs::create_dir_all(parent).map_err(err(parent))?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(err(path))?,
        Ok(_) => {
            return Err(AgentError::Invalid(format!(
                "{} exists and is not a socket",
                path.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(path)(e)),
    }
    let private = parent.join(format!(
        ".{}.{}.tmp",
        file.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&private); // a crashed run's
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(err(&private))?;
    let bound = (|| {
        let tmp = private.join("agent.sock");
        let listener = std::os::unix::net::UnixListener::bind(&tmp).map_err(err(&tmp))?;
        let mode = if access.group.is_some() { 0o660 } else { 0o600 };
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(err(&tmp))?;
        if let Some(gid) = access.group {
            std::os::unix::fs::chown(&tmp, None, Some(gid)).map_err(err(&tmp))?;
        }
        std::fs::rename(&tmp, path).map_err(err(path))?;
        listener.set_nonblocking(true).map_err(err(path))?;
        tokio::net::UnixListener::from_std(listener).map_err(err(path))
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound
}

/// Serves the agent API on `listener` (bound at `path` by [`bind_unix`])
/// until `shutdown` resolves, then removes the socket file.
pub async fn serve_unix(
    agent: Arc<Agent>,
    listener: tokio::net::UnixListener,
    path: &Path,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let served = Server::builder()
        .add_service(service(agent))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await;
    let _ = std::fs::remove_file(path);
    served.map_err(|e| AgentError::Task(format!("gRPC server on {}: {e}", path.display())))
}
