//! A slave reached over gRPC: over TCP with mutual TLS (or plain text when
//! explicitly allowed), or over the agent's local unix socket (`unix:///path`),
//! where the socket's file permissions stand in for client certificates.
//! Every call has a deadline so a hung agent looks unreachable (and is
//! retried) rather than stalling the master forever. Requests and answers
//! are converted between domain types and protobuf here and nowhere else.

use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use std::sync::Arc;

use tonic::transport::{Channel, Endpoint};
use volmig_api::limits::MAX_MESSAGE;
use volmig_api::slave::wire::{FromWire, IntoWire};
use volmig_api::tls::{ClientTls as ReloadingTls, TlsFiles};
use volmig_api::wire::agent_client::AgentClient;
use volmig_api::{Slave, SlaveError, SlaveResult};

use crate::error::{MasterError, Result};

/// The master's client identity and the CA the agent's certificate must
/// come from; `domain` is the name the agent's certificate must carry.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub domain: String,
}

#[derive(Clone)]
pub struct GrpcSlave {
    client: AgentClient<Channel>,
}

/// Longest any single call may take (a full pass is cut in slices).
const CALL_DEADLINE: Duration = Duration::from_secs(120);

/// The socket path of a `unix://` agent address.
pub fn unix_path(url: &str) -> Option<PathBuf> {
    url.strip_prefix("unix://").map(PathBuf::from)
}

impl GrpcSlave {
    /// A lazily connecting client of the agent at `url`: `https://host:port`
    /// with `tls`, `http://host:port` without, or `unix:///path/agent.sock`
    /// (the agent's local socket; no TLS).
    pub fn new(url: &str, tls: Option<&ClientTls>) -> Result<Self> {
        let channel = if let Some(path) = unix_path(url) {
            if path.as_os_str().is_empty() || !path.is_absolute() {
                return Err(MasterError::Invalid(format!(
                    "agent address {url}: a unix socket address is unix:///absolute/path"
                )));
            }
            if tls.is_some() {
                return Err(MasterError::Invalid(format!(
                    "agent address {url}: a unix socket takes no TLS (its file permissions decide who may connect)"
                )));
            }
            // The URI is a placeholder: the connector dials the socket.
            Endpoint::from_static("http://agent.local")
                .connect_timeout(Duration::from_secs(5))
                .timeout(CALL_DEADLINE)
                .connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
                    let path = path.clone();
                    async move {
                        tokio::net::UnixStream::connect(path)
                            .await
                            .map(TokioIo::new)
                    }
                }))
        } else {
            let ep = Endpoint::from_shared(url.to_string())
                .map_err(|e| MasterError::Invalid(format!("agent address {url}: {e}")))?
                .connect_timeout(Duration::from_secs(5))
                .timeout(CALL_DEADLINE);
            match tls {
                Some(t) => {
                    // TLS under the files as they are at each connection:
                    // renewed certificates are used without a restart.
                    let files = TlsFiles {
                        ca: t.ca.clone(),
                        cert: t.cert.clone(),
                        key: t.key.clone(),
                    };
                    let tls = Arc::new(ReloadingTls::client(files));
                    tls.check()
                        .map_err(|e| MasterError::Invalid(format!("TLS configuration: {e}")))?;
                    let uri = ep.uri();
                    let host = uri.host().ok_or_else(|| {
                        MasterError::Invalid(format!("agent address {url}: no host"))
                    })?;
                    let addr = format!("{host}:{}", uri.port_u16().unwrap_or(443));
                    let domain = t.domain.clone();
                    // tonic speaks HTTP/2 over the connector's TLS stream
                    let plain = url.replacen("https://", "http://", 1);
                    return Ok(Self::over(
                        Endpoint::from_shared(plain)
                            .map_err(|e| MasterError::Invalid(format!("agent address {url}: {e}")))?
                            .connect_timeout(Duration::from_secs(5))
                            .timeout(CALL_DEADLINE)
                            .connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
                                let (tls, addr, domain) =
                                    (tls.clone(), addr.clone(), domain.clone());
                                async move { tls.connect(&addr, &domain).await.map(TokioIo::new) }
                            })),
                    ));
                }
                None if url.starts_with("https://") => {
                    return Err(MasterError::Invalid(
                        "an https:// agent address needs TLS files".into(),
                    ));
                }
                None => {}
            }
            ep.connect_lazy()
        };
        Ok(Self::over(channel))
    }

    fn over(channel: Channel) -> Self {
        Self {
            client: AgentClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        }
    }
}

macro_rules! rpc {
    ($($name:ident($req:ty) -> $res:ty;)*) => {
        impl Slave for GrpcSlave {
            $(async fn $name(&self, r: $req) -> SlaveResult<$res> {
                let mut c = self.client.clone();
                let answer = c.$name(r.into_wire()).await.map_err(SlaveError::from)?;
                <$res>::from_wire(answer.into_inner())
            })*
        }
    };
}

volmig_api::slave_calls!(rpc);
