//! A slave reached over gRPC (mutual TLS, or plain text when explicitly
//! allowed). Every call has a deadline so a hung agent looks unreachable
//! (and is retried) rather than stalling the master forever.

use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use volmig_api::agent::agent_client::AgentClient;
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

fn read(p: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(p).map_err(|source| MasterError::Store {
        path: p.clone(),
        source,
    })
}

/// Largest message either way: a dirty map handed between agents of a
/// multi-attach volume is 2 MiB per TiB at the default 64 KiB grain.
pub const MAX_MESSAGE: usize = 64 << 20;

/// Longest any single call may take (a full pass is cut in slices).
const CALL_DEADLINE: Duration = Duration::from_secs(120);

impl GrpcSlave {
    /// A lazily connecting client of the agent at `url` (`https://host:port`
    /// with `tls`, `http://` without).
    pub fn new(url: &str, tls: Option<&ClientTls>) -> Result<Self> {
        let mut ep = Endpoint::from_shared(url.to_string())
            .map_err(|e| MasterError::Invalid(format!("agent address {url}: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(CALL_DEADLINE);
        match tls {
            Some(t) => {
                let cfg = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(read(&t.ca)?))
                    .identity(Identity::from_pem(read(&t.cert)?, read(&t.key)?))
                    .domain_name(t.domain.clone());
                ep = ep
                    .tls_config(cfg)
                    .map_err(|e| MasterError::Invalid(format!("TLS configuration: {e}")))?;
            }
            None if url.starts_with("https://") => {
                return Err(MasterError::Invalid(
                    "an https:// agent address needs TLS files".into(),
                ));
            }
            None => {}
        }
        Ok(Self {
            client: AgentClient::new(ep.connect_lazy())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        })
    }
}

macro_rules! rpc {
    ($($name:ident($req:ty) -> $res:ty;)*) => {
        impl Slave for GrpcSlave {
            $(async fn $name(&self, r: $req) -> SlaveResult<$res> {
                let mut c = self.client.clone();
                c.$name(r).await.map(|x| x.into_inner()).map_err(SlaveError::from)
            })*
        }
    };
}

volmig_api::slave_calls!(rpc);
