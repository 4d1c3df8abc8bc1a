//! The agent's gRPC service: the [`Slave`] contract over the network, with
//! mutual TLS (the agent requires a client certificate from its CA; plain
//! text only when explicitly asked for, for local development).

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::Stream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};
use volmig_api::Slave;
use volmig_api::agent::agent_server::{Agent as AgentRpc, AgentServer};
use volmig_api::agent::{
    CopyPassRequest, DirtyBatch, ListVolumesRequest, ListVolumesResponse, MergeDirtyRequest,
    PassResult, PrepareRequest, Progress, QuiesceRequest, QuiesceResult, RedirectRequest,
    ResumeResult, SessionState, SetBandwidthRequest, SetMirrorRequest, Step, TakeDirtyRequest,
    TerminateRequest, TerminateResult, VolumeInfo,
};

use crate::agent::Agent;
use crate::error::{AgentError, Result};

/// Files of the agent's TLS identity and the CA its clients must come from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub client_ca: std::path::PathBuf,
}

fn read(p: &Path) -> Result<Vec<u8>> {
    std::fs::read(p).map_err(|source| AgentError::Open {
        path: p.to_path_buf(),
        source,
    })
}

pub fn server_tls(files: &TlsFiles) -> Result<ServerTlsConfig> {
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?))
        .client_ca_root(Certificate::from_pem(read(&files.client_ca)?)))
}

struct Service(Arc<Agent>);

type Rpc<T> = std::result::Result<Response<T>, Status>;

#[tonic::async_trait]
impl AgentRpc for Service {
    async fn prepare(&self, r: Request<PrepareRequest>) -> Rpc<SessionState> {
        Ok(Response::new(self.0.prepare(r.into_inner()).await?))
    }
    async fn copy_pass(&self, r: Request<CopyPassRequest>) -> Rpc<PassResult> {
        Ok(Response::new(self.0.copy_pass(r.into_inner()).await?))
    }
    async fn set_mirror(&self, r: Request<SetMirrorRequest>) -> Rpc<SessionState> {
        Ok(Response::new(self.0.set_mirror(r.into_inner()).await?))
    }
    async fn quiesce(&self, r: Request<QuiesceRequest>) -> Rpc<QuiesceResult> {
        Ok(Response::new(self.0.quiesce(r.into_inner()).await?))
    }
    async fn release(&self, r: Request<Step>) -> Rpc<SessionState> {
        Ok(Response::new(self.0.release(r.into_inner()).await?))
    }
    async fn synchronize(&self, r: Request<Step>) -> Rpc<SessionState> {
        Ok(Response::new(self.0.synchronize(r.into_inner()).await?))
    }
    async fn redirect(&self, r: Request<RedirectRequest>) -> Rpc<SessionState> {
        Ok(Response::new(self.0.redirect(r.into_inner()).await?))
    }
    async fn resume(&self, r: Request<Step>) -> Rpc<ResumeResult> {
        Ok(Response::new(self.0.resume(r.into_inner()).await?))
    }
    async fn terminate(&self, r: Request<TerminateRequest>) -> Rpc<TerminateResult> {
        Ok(Response::new(self.0.terminate(r.into_inner()).await?))
    }
    async fn abort(&self, r: Request<Step>) -> Rpc<SessionState> {
        Ok(Response::new(self.0.abort(r.into_inner()).await?))
    }
    async fn set_bandwidth(&self, r: Request<SetBandwidthRequest>) -> Rpc<SessionState> {
        Ok(Response::new(self.0.set_bandwidth(r.into_inner()).await?))
    }
    async fn get_state(&self, r: Request<Step>) -> Rpc<SessionState> {
        Ok(Response::new(self.0.get_state(r.into_inner()).await?))
    }

    async fn take_dirty(&self, r: Request<TakeDirtyRequest>) -> Rpc<DirtyBatch> {
        Ok(Response::new(self.0.take_dirty(r.into_inner()).await?))
    }

    async fn merge_dirty(&self, r: Request<MergeDirtyRequest>) -> Rpc<SessionState> {
        Ok(Response::new(self.0.merge_dirty(r.into_inner()).await?))
    }

    type WatchProgressStream =
        Pin<Box<dyn Stream<Item = std::result::Result<Progress, Status>> + Send>>;

    async fn watch_progress(&self, r: Request<Step>) -> Rpc<Self::WatchProgressStream> {
        let step = r.into_inner();
        self.0.get_state(step.clone()).await?; // fenced, exists
        let agent = self.0.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let item = agent.get_state(step.clone()).await.map_err(Status::from);
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

    async fn list_volumes(&self, _r: Request<ListVolumesRequest>) -> Rpc<ListVolumesResponse> {
        let volumes = self
            .0
            .list()
            .into_iter()
            .map(|v| VolumeInfo {
                name: v.name,
                size: v.size,
                active: v.active.display().to_string(),
                session_id: v.session.unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(ListVolumesResponse { volumes }))
    }
}

/// Serves the agent API on `addr` until `shutdown` resolves. Without `tls`
/// the service is plain text (only for an explicit insecure flag).
pub async fn serve(
    agent: Arc<Agent>,
    addr: SocketAddr,
    tls: Option<&TlsFiles>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let mut builder = Server::builder();
    if let Some(files) = tls {
        builder = builder
            .tls_config(server_tls(files)?)
            .map_err(|e| AgentError::Invalid(format!("TLS configuration: {e}")))?;
    }
    builder
        .add_service(
            AgentServer::new(Service(agent))
                .max_decoding_message_size(volmig_master::grpc_slave::MAX_MESSAGE)
                .max_encoding_message_size(volmig_master::grpc_slave::MAX_MESSAGE),
        )
        .serve_with_shutdown(addr, shutdown)
        .await
        .map_err(|e| AgentError::Task(format!("gRPC server on {addr}: {e}")))
}
