//! The agent's local control path: JSON lines over a unix socket, one
//! request and one reply per line. Enough to drive migrations on one host;
//! the gRPC master/slave API replaces it for clusters.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use crate::agent::{Agent, VolumeInfo};
use crate::error::{AgentError, Result};
use crate::session::{SessionConfig, SessionStatus};

/// Largest request line accepted.
const MAX_LINE: usize = 64 << 10;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Migrate {
        volume: String,
        target: PathBuf,
        #[serde(default)]
        config: SessionConfig,
    },
    Status {
        volume: String,
    },
    Wait {
        volume: String,
    },
    Abort {
        volume: String,
    },
    SetBandwidth {
        volume: String,
        bytes_per_sec: u64,
    },
    List,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Reply {
    Status(Box<SessionStatus>),
    Volumes { volumes: Vec<VolumeInfo> },
    Done,
    Error { message: String },
}

async fn handle(agent: &Arc<Agent>, req: Request) -> Reply {
    let r: Result<Reply> = async {
        Ok(match req {
            Request::Migrate {
                volume,
                target,
                config,
            } => Reply::Status(Box::new(agent.migrate(&volume, &target, config).await?)),
            Request::Status { volume } => Reply::Status(Box::new(agent.status(&volume)?)),
            Request::Wait { volume } => Reply::Status(Box::new(agent.wait(&volume).await?)),
            Request::Abort { volume } => {
                agent.abort(&volume).await?;
                Reply::Done
            }
            Request::SetBandwidth {
                volume,
                bytes_per_sec,
            } => {
                agent.set_bandwidth(&volume, bytes_per_sec).await?;
                Reply::Done
            }
            Request::List => Reply::Volumes {
                volumes: agent.list(),
            },
        })
    }
    .await;
    r.unwrap_or_else(|e| Reply::Error {
        message: e.to_string(),
    })
}

/// Serves the control socket until the task is dropped.
pub async fn serve(agent: Arc<Agent>, path: &Path) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|source| AgentError::State {
        path: path.to_path_buf(),
        source,
    })?;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "control accept failed");
                continue;
            }
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut lines = BufReader::new(rd);
            let mut line = String::new();
            loop {
                line.clear();
                match (&mut lines)
                    .take(MAX_LINE as u64)
                    .read_line(&mut line)
                    .await
                {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let reply = match serde_json::from_str::<Request>(line.trim()) {
                    Ok(req) => {
                        debug!(?req, "control request");
                        handle(&agent, req).await
                    }
                    Err(e) => Reply::Error {
                        message: format!("malformed control request: {e}"),
                    },
                };
                let mut out = serde_json::to_vec(&reply).unwrap_or_default();
                out.push(b'\n');
                if wr.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// A client of the control socket.
pub struct ControlClient {
    stream: BufReader<UnixStream>,
}

impl ControlClient {
    pub async fn connect(path: &Path) -> Result<Self> {
        let s = UnixStream::connect(path)
            .await
            .map_err(|source| AgentError::State {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            stream: BufReader::new(s),
        })
    }

    pub async fn call(&mut self, req: &Request) -> Result<Reply> {
        let io = |e: std::io::Error| AgentError::Task(format!("control socket: {e}"));
        let mut out = serde_json::to_vec(req).map_err(|e| AgentError::Task(e.to_string()))?;
        out.push(b'\n');
        self.stream.get_mut().write_all(&out).await.map_err(io)?;
        let mut line = String::new();
        if self.stream.read_line(&mut line).await.map_err(io)? == 0 {
            return Err(AgentError::Task("agent closed the control socket".into()));
        }
        serde_json::from_str(&line).map_err(|e| AgentError::Task(format!("bad control reply: {e}")))
    }
}
