//! `volmig-agent serve`: the node agent. Serves volumes through the
//! interposer (NBD), and the agent's gRPC API, its one control surface,
//! for masters: on a local unix socket (`--control`, file permissions
//! instead of certificates) and on TCP with mutual TLS (`--grpc`); with
//! `--csi-socket`, also the CSI node plugin `csi.volmig.io` for kubelet.
//! Migrations are driven by a master: `volmig migrate --agent
//! unix:///run/volmig/agent.sock ...` on the same host, or the operator.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use volmig_agent::agent::Agent;
use volmig_agent::csi::{AgentVolumes, NodeConfig, NodePlugin};
use volmig_agent::grpc::SocketAccess;
use volmig_agent::serving::Frontends;
use volmig_api::slave::{Frontend, ServeVolume};
use volmig_frontends::nbd::NbdServer;

#[derive(Parser)]
#[command(
    name = "volmig-agent",
    version,
    about = "volmig node agent: live volume migration data plane"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve volumes over NBD and the agent's gRPC API for masters.
    Serve(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Where the agent keeps what it serves, session checkpoints and dirty
    /// maps (never on source or target).
    #[arg(long, default_value = "/var/lib/volmig")]
    state_dir: PathBuf,
    /// A volume to serve over NBD: NAME=PATH (a regular file or block
    /// device), the same as a serve call at start-up. Repeatable; none is
    /// allowed (volumes can be served at runtime: `volmig serve`). The
    /// volumes served before a restart are served again without it.
    #[arg(long = "export", value_parser = parse_export)]
    exports: Vec<(String, PathBuf)>,
    /// Serve NBD on this unix socket.
    #[arg(long)]
    nbd_unix: Option<PathBuf>,
    /// Serve NBD on this TCP address (e.g. 127.0.0.1:10809).
    #[arg(long)]
    nbd_tcp: Option<String>,
    /// Serve the agent's gRPC API on this unix socket, for a master on this
    /// host (`volmig migrate --agent unix://PATH`). Mode 0600: only this
    /// user (0660 with --control-group).
    #[arg(long, default_value = "/run/volmig/agent.sock")]
    control: PathBuf,
    /// Let this group (name or number) use the --control socket too.
    #[arg(long, value_parser = parse_group)]
    control_group: Option<u32>,
    /// Serve the agent (slave) gRPC API for masters on this address, e.g. 0.0.0.0:7443.
    #[arg(long)]
    grpc: Option<std::net::SocketAddr>,
    /// The agent's TLS certificate (PEM) for --grpc.
    #[arg(long, requires = "grpc")]
    tls_cert: Option<PathBuf>,
    /// The agent's TLS key (PEM).
    #[arg(long, requires = "grpc")]
    tls_key: Option<PathBuf>,
    /// Masters must present a client certificate signed by this CA (PEM).
    #[arg(long, requires = "grpc")]
    tls_client_ca: Option<PathBuf>,
    /// Serve --grpc in plain text, without client authentication (local development only).
    #[arg(long, requires = "grpc")]
    insecure_grpc: bool,
    /// Open the --export backing devices with O_DIRECT.
    #[arg(long)]
    direct: bool,
    /// Most threads doing blocking device I/O at once.
    #[arg(long, default_value_t = 64)]
    io_threads: usize,
    /// Serve the CSI node plugin (csi.volmig.io: Identity and Node) on this
    /// unix socket, e.g. /var/lib/kubelet/plugins/csi.volmig.io/csi.sock.
    /// Mode 0600 (kubelet runs as root).
    #[arg(long)]
    csi_socket: Option<PathBuf>,
    /// This node's id for CSI (NodeGetInfo, the topology segment
    /// topology.volmig.io/node); default: the host name. In a cluster, the
    /// Kubernetes node name.
    #[arg(long, requires = "csi_socket")]
    node_id: Option<String>,
    /// NodeGetInfo's max_volumes_per_node (0: the CO decides).
    #[arg(long, default_value_t = 0, requires = "csi_socket")]
    csi_max_volumes: u32,
    /// Open the backing devices of CSI volumes buffered (default O_DIRECT:
    /// no page cache between the kernel block device and the backing
    /// device, which a writeback under memory pressure could deadlock on).
    #[arg(long, requires = "csi_socket")]
    csi_buffered: bool,
}

fn parse_export(s: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=PATH"))?;
    Ok((name.to_string(), PathBuf::from(path)))
}

/// A group number, or a name looked up in /etc/group.
fn parse_group(s: &str) -> Result<u32, String> {
    if let Ok(gid) = s.parse() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group")
        .map_err(|e| format!("cannot read /etc/group to look up {s:?}: {e}"))?;
    group_id(&groups, s).ok_or_else(|| format!("no group {s:?} in /etc/group"))
}

fn group_id(etc_group: &str, name: &str) -> Option<u32> {
    etc_group.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next() == Some(name))
            .then(|| f.nth(1).and_then(|gid| gid.parse().ok()))
            .flatten()
    })
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let Cmd::Serve(args) = cli.cmd;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(args.io_threads.max(1))
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(serve(args))
}

/// Validates the --grpc TLS options: mutual TLS, or plain text when asked.
fn grpc_tls(a: &ServeArgs) -> anyhow::Result<Option<volmig_agent::grpc::TlsFiles>> {
    match (&a.tls_cert, &a.tls_key, &a.tls_client_ca, a.insecure_grpc) {
        (Some(cert), Some(key), Some(ca), false) => {
            let files = volmig_agent::grpc::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: ca.clone(),
            };
            // Fail now on unreadable TLS files rather than in the task.
            volmig_agent::grpc::server_tls(&files)?;
            Ok(Some(files))
        }
        (None, None, None, true) => Ok(None),
        _ => bail!(
            "--grpc needs --tls-cert, --tls-key and --tls-client-ca (mutual TLS), or --insecure-grpc alone"
        ),
    }
}

/// Serves the volumes persisted in the state directory, then the
/// `--export`s (a serve call each: the same settings again are a no-op).
/// A volume that cannot be served is logged and listed, never fatal.
async fn serve_volumes(agent: &Agent, a: &ServeArgs) -> anyhow::Result<()> {
    let restored = agent.restore().await?;
    if restored > 0 {
        tracing::info!(volumes = restored, "served again what was served before");
    }
    for (name, path) in &a.exports {
        let r = ServeVolume {
            volume: name.clone(),
            backing: path.clone(),
            frontends: vec![Frontend::Nbd],
            direct: a.direct,
        };
        if let Err(e) = agent.serve(r).await {
            tracing::error!(volume = %name, path = %path.display(), error = %e,
                "cannot serve --export; the agent serves its other volumes");
        }
    }
    if agent.list().is_empty() {
        tracing::warn!("this agent serves no volume yet");
    }
    Ok(())
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    if a.nbd_unix.is_none() && a.nbd_tcp.is_none() {
        bail!("nothing to serve on: give --nbd-unix and/or --nbd-tcp");
    }
    let tls = match a.grpc {
        Some(_) => grpc_tls(&a)?,
        None => None,
    };
    let server: NbdServer<volmig_agent::interposer::Interposer> = NbdServer::new();
    let agent = Agent::with_frontends(&a.state_dir, Frontends::with_nbd(server.clone()))?;
    serve_volumes(&agent, &a).await?;
    // The API first: once NBD answers, so does the control socket.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = move || {
        let mut rx = stopped.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut grpc = tokio::task::JoinSet::new();
    if let Some(addr) = a.grpc {
        if tls.is_none() {
            tracing::warn!(%addr, "gRPC API in PLAIN TEXT without client authentication (--insecure-grpc)");
        }
        tracing::info!(%addr, tls = tls.is_some(), "agent gRPC API listening");
        let (agent, stopped) = (agent.clone(), until_stopped());
        grpc.spawn(
            async move { volmig_agent::grpc::serve(agent, addr, tls.as_ref(), stopped).await },
        );
    }
    let control = control_socket(&a.control, a.control_group)?;
    tracing::info!(socket = %a.control.display(), group = ?a.control_group,
        "agent gRPC API listening on the control socket (unix://{})", a.control.display());
    {
        let (agent, path, stopped) = (agent.clone(), a.control.clone(), until_stopped());
        grpc.spawn(
            async move { volmig_agent::grpc::serve_unix(agent, control, &path, stopped).await },
        );
    }
    if let Some(path) = &a.csi_socket {
        let node_id = match &a.node_id {
            Some(id) => id.clone(),
            None => host_name()?,
        };
        let plugin = std::sync::Arc::new(NodePlugin::new(
            AgentVolumes::new(agent.clone(), !a.csi_buffered),
            NodeConfig {
                node_id: node_id.clone(),
                max_volumes_per_node: i64::from(a.csi_max_volumes),
            },
            &a.state_dir,
        )?);
        let listener = volmig_agent::grpc::bind_unix(path, SocketAccess::default())
            .with_context(|| format!("CSI socket {}", path.display()))?;
        tracing::info!(socket = %path.display(), node = %node_id,
            "CSI node plugin {} listening", volmig_agent::csi::DRIVER_NAME);
        let (path, stopped) = (path.clone(), until_stopped());
        grpc.spawn(
            async move { volmig_agent::csi::serve_unix(plugin, listener, &path, stopped).await },
        );
    }
    let mut handles = Vec::new();
    if let Some(p) = &a.nbd_unix {
        let _ = std::fs::remove_file(p);
        handles.push(server.serve_unix(p).await?);
    }
    if let Some(addr) = &a.nbd_tcp {
        handles.push(server.serve_tcp(addr.as_str()).await?);
    }
    for h in &handles {
        tracing::info!(addr = %h.local_addr(), "NBD listening");
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let failed = tokio::select! {
        _ = tokio::signal::ctrl_c() => None,
        _ = term.recv() => None,
        Some(r) = grpc.join_next() => Some(r),
    };
    tracing::info!("shutting down; unfinished sessions resume at next start");
    let _ = stop.send(true);
    while grpc.join_next().await.is_some() {}
    for h in handles {
        let _ = h.shutdown().await;
    }
    match failed {
        Some(r) => {
            r??;
            bail!("a gRPC server stopped on its own")
        }
        None => Ok(()),
    }
}

/// This host's name (the default CSI node id).
fn host_name() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading the host name (/proc/sys/kernel/hostname); give --node-id")?;
    let name = name.trim();
    if name.is_empty() {
        bail!("the host has no name; give --node-id");
    }
    Ok(name.to_string())
}

fn control_socket(path: &Path, group: Option<u32>) -> anyhow::Result<tokio::net::UnixListener> {
    volmig_agent::grpc::bind_unix(path, SocketAccess { group })
        .with_context(|| format!("control socket {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_name_or_number() {
        let etc = "root:x:0:\ndisk:x:6:\nvolmig:x:990:alice,bob\n";
        assert_eq!(group_id(etc, "volmig"), Some(990));
        assert_eq!(group_id(etc, "disk"), Some(6));
        assert_eq!(group_id(etc, "nope"), None);
        assert_eq!(parse_group("1234"), Ok(1234));
    }
}
