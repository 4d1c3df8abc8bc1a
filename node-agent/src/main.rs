//! `volmig-agent serve`: the node agent. Serves volumes through the
//! interposer (NBD, kernel block devices), and the agent's gRPC API, its
//! one control surface, for masters: on a local unix socket (`--control`, file permissions
//! instead of certificates) and on TCP with mutual TLS (`--grpc`); with
//! `--csi-socket`, also the CSI node plugin `csi.volmig.io` for kubelet.
//! Migrations are driven by a master: `volmig migrate --agent
//! unix:///run/volmig/agent.sock ...` on the same host, or the operator.
//! `volmig-agent keeper`: the descriptor keeper beside it.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use volmig_api::io::BlockChoice;
use volmig_api::slave::{Frontend, ServeVolume};
use volmig_frontends::block::fuse::FuseOptions;
use volmig_frontends::block::keeper::KeeperServer;
use volmig_frontends::block::memsafe;
use volmig_frontends::nbd::NbdServer;
use volmig_node_agent::agent::Agent;
use volmig_node_agent::csi::{AgentVolumes, NodeConfig, NodePlugin};
use volmig_node_agent::grpc::SocketAccess;
use volmig_node_agent::serving::{BlockConfig, BlockFrontend, Frontends};

/// Whole-page buffers page-aligned: request buffers reach O_DIRECT
/// backing devices without a bounce copy.
#[global_allocator]
static ALLOC: memsafe::PageAligned = memsafe::PageAligned;

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
    /// Serve volumes (NBD, kernel block devices) and the agent's gRPC API
    /// for masters.
    Serve(Box<ServeArgs>),
    /// Hold the agent's /dev/fuse descriptors across its restarts (run as
    /// a sidecar sharing a socket directory with the agent, which gets
    /// `--fd-keeper` with the same path): while it holds them, an agent
    /// restart is a stall of the kernel block devices' I/O, not an error.
    Keeper(KeeperArgs),
}

#[derive(Args)]
struct KeeperArgs {
    /// The keeper's unix socket (mode 0600).
    #[arg(long, default_value = "/run/volmig/keeper.sock")]
    socket: PathBuf,
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
    /// Serve Prometheus metrics (/metrics) and a liveness probe (/healthz)
    /// on this address, e.g. 0.0.0.0:9090.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Kernel block frontends: `auto` (every kind this node offers: FUSE +
    /// loop here), one kind (`fuse`, `nbd`, `ublk`), or `none`. Volumes
    /// served with the `block` frontend get the best of them.
    #[arg(long, default_value = "auto", value_parser = parse_block)]
    block: BlockArg,
    /// Where the kernel block frontends keep their files (the FUSE mount
    /// is `<DIR>/fuse`); default `<state-dir>/block`.
    #[arg(long)]
    block_dir: Option<PathBuf>,
    /// The descriptor keeper's socket (`volmig-agent keeper`). Without it
    /// the agent holds its /dev/fuse descriptors itself, and an agent
    /// restart fails the I/O of its FUSE block devices.
    #[arg(long)]
    fd_keeper: Option<PathBuf>,
    /// FUSE worker threads (default min(8, 2 x CPUs)).
    #[arg(long)]
    fuse_workers: Option<usize>,
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

/// `--block`: none, or a block choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BlockArg(Option<BlockChoice>);

fn parse_block(s: &str) -> Result<BlockArg, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(BlockArg(None));
    }
    s.parse()
        .map(|c| BlockArg(Some(c)))
        .map_err(|e| format!("{e}, or none"))
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

fn main() -> std::process::ExitCode {
    volmig_api::report::exit(run())
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let args = match cli.cmd {
        Cmd::Serve(args) => *args,
        Cmd::Keeper(k) => {
            let server = KeeperServer::bind(&k.socket)
                .with_context(|| format!("keeper socket {}", k.socket.display()))?;
            server.run()
        }
    };
    // User errors first, before anything starts and logs: they are then
    // the only line the user sees.
    check_serve_args(&args)?;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all().max_blocking_threads(args.io_threads.max(1));
    if args.block.0.is_some() {
        // The threads that do a kernel block device's I/O must not wait in
        // reclaim for writeback to that device (best effort: it needs
        // CAP_SYS_RESOURCE).
        rt.on_thread_start(memsafe::io_flusher_best_effort);
    }
    let rt = rt.build().context("starting the tokio runtime")?;
    rt.block_on(serve(args))
}

/// What can be told wrong from the command line alone: the state directory
/// cannot be made, nothing to serve on, half a TLS configuration.
fn check_serve_args(a: &ServeArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.state_dir)
        .with_context(|| format!("state directory {}", a.state_dir.display()))?;
    if a.nbd_unix.is_none() && a.nbd_tcp.is_none() && a.block.0.is_none() {
        bail!("nothing to serve on: give --nbd-unix and/or --nbd-tcp, or --block");
    }
    if a.grpc.is_some() {
        grpc_tls(a)?;
    }
    Ok(())
}

/// The kernel block frontend `a` asks for.
fn block_frontend(a: &ServeArgs) -> Option<BlockFrontend> {
    let kinds = a.block.0?;
    let dir = a
        .block_dir
        .clone()
        .unwrap_or_else(|| a.state_dir.join("block"));
    let mut fuse = FuseOptions::new(&dir.join("fuse"));
    fuse.keeper = a.fd_keeper.clone();
    if let Some(n) = a.fuse_workers {
        fuse.workers = n.max(1);
    }
    let b = BlockFrontend::new(BlockConfig {
        kinds,
        fuse,
        nbd: Default::default(),
        #[cfg(feature = "ublk")]
        ublk: Default::default(),
    });
    if b.kinds().is_empty() {
        tracing::warn!(block = %kinds, "this node offers no kernel block frontend this agent runs");
    } else {
        tracing::info!(kinds = ?b.kinds(), dir = %dir.display(), keeper = ?a.fd_keeper,
            "kernel block frontends (started on first use)");
    }
    if a.fd_keeper.is_none() {
        tracing::warn!(
            "no --fd-keeper: an agent restart fails the I/O of its FUSE block devices \
            (EIO in the filesystems on them); run `volmig-agent keeper` beside it to make a restart a stall"
        );
    }
    Some(b)
}

/// Validates the --grpc TLS options: mutual TLS, or plain text when asked.
fn grpc_tls(a: &ServeArgs) -> anyhow::Result<Option<volmig_node_agent::grpc::TlsFiles>> {
    match (&a.tls_cert, &a.tls_key, &a.tls_client_ca, a.insecure_grpc) {
        (Some(cert), Some(key), Some(ca), false) => {
            // Files not there yet are waited for (a cluster's Secret may
            // not exist yet); they are read again for every connection.
            Ok(Some(volmig_node_agent::grpc::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: ca.clone(),
            }))
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
    let block = block_frontend(&a);
    if a.nbd_unix.is_none() && a.nbd_tcp.is_none() && block.is_none() {
        bail!("nothing to serve on: give --nbd-unix and/or --nbd-tcp, or --block");
    }
    let tls = match a.grpc {
        Some(_) => grpc_tls(&a)?,
        None => None,
    };
    let server: NbdServer<volmig_node_agent::interposer::Interposer> = NbdServer::new();
    let mut frontends = if a.nbd_unix.is_some() || a.nbd_tcp.is_some() {
        Frontends::with_nbd(server.clone())
    } else {
        Frontends::none()
    };
    if let Some(b) = block {
        frontends = frontends.with_block(b);
    }
    let agent = Agent::with_frontends(&a.state_dir, frontends)?;
    serve_volumes(&agent, &a).await?;
    if let Some(addr) = a.metrics {
        volmig_node_agent::metrics::serve(addr, agent.clone())
            .await
            .with_context(|| format!("--metrics {addr}"))?;
    }
    if let Some(drivers) = agent.frontends().block().and_then(|b| b.started()) {
        tracing::info!(kinds = ?drivers.kinds(), "kernel block devices served");
        // Serving a block device never waits for its own pages to come back.
        if let Err(e) = memsafe::lock_memory() {
            tracing::warn!(error = %e, "cannot lock the agent's memory (mlockall)");
        }
    }
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
            tracing::info!(%addr, "agent gRPC API listening");
        }
        let (agent, stopped) = (agent.clone(), until_stopped());
        grpc.spawn(async move {
            volmig_node_agent::grpc::serve(agent, addr, tls.as_ref(), stopped).await
        });
    }
    let control = control_socket(&a.control, a.control_group)?;
    tracing::info!(socket = %a.control.display(), group = ?a.control_group,
        "agent gRPC API listening on the control socket (unix://{})", a.control.display());
    {
        let (agent, path, stopped) = (agent.clone(), a.control.clone(), until_stopped());
        grpc.spawn(async move {
            volmig_node_agent::grpc::serve_unix(agent, control, &path, stopped).await
        });
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
        let listener = volmig_node_agent::grpc::bind_unix(path, SocketAccess::default())
            .with_context(|| format!("CSI socket {}", path.display()))?;
        tracing::info!(socket = %path.display(), node = %node_id,
            "CSI node plugin {} listening", volmig_node_agent::csi::DRIVER_NAME);
        let (path, stopped) = (path.clone(), until_stopped());
        grpc.spawn(async move {
            volmig_node_agent::csi::serve_unix(plugin, listener, &path, stopped).await
        });
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
    if let Some(fuse) = agent
        .frontends()
        .block()
        .and_then(|b| b.started())
        .and_then(|d| d.fuse())
    {
        // No device left: nothing to keep mounted. With devices, the mount
        // stays for the next agent (the keeper holds the connection), and
        // the workers stop now, while I/O can still be served: left to the
        // runtime's shutdown, their requests would fail.
        match fuse.unmount().await {
            Ok(()) => tracing::info!("FUSE block driver unmounted"),
            Err(e) => {
                fuse.suspend().await;
                tracing::info!(error = %e, kept = fuse.kept(),
                    "FUSE block driver stays mounted for the next agent; its workers stopped");
            }
        }
    }
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
    volmig_node_agent::grpc::bind_unix(path, SocketAccess { group })
        .with_context(|| format!("control socket {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent_and_block_choices_parse() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let serve = |extra: &[&str]| {
            let mut args = vec!["volmig-agent", "serve"];
            args.extend_from_slice(extra);
            match Cli::try_parse_from(args).unwrap().cmd {
                Cmd::Serve(a) => a,
                Cmd::Keeper(_) => panic!("not serve"),
            }
        };
        assert_eq!(serve(&[]).block, BlockArg(Some(BlockChoice::Auto)));
        assert_eq!(serve(&["--block", "none"]).block, BlockArg(None));
        let a = serve(&["--block", "fuse", "--fd-keeper", "/run/k.sock"]);
        assert_eq!(
            a.block,
            BlockArg(Some(BlockChoice::Only(volmig_api::io::BlockKind::FuseLoop)))
        );
        assert_eq!(a.fd_keeper.as_deref(), Some(Path::new("/run/k.sock")));
        assert!(Cli::try_parse_from(["volmig-agent", "serve", "--block", "scsi"]).is_err());
        match Cli::try_parse_from(["volmig-agent", "keeper", "--socket", "/k"])
            .unwrap()
            .cmd
        {
            Cmd::Keeper(k) => assert_eq!(k.socket, Path::new("/k")),
            Cmd::Serve(_) => panic!("not keeper"),
        }
    }

    #[test]
    fn groups_by_name_or_number() {
        let etc = "root:x:0:\ndisk:x:6:\nvolmig:x:990:alice,bob\n";
        assert_eq!(group_id(etc, "volmig"), Some(990));
        assert_eq!(group_id(etc, "disk"), Some(6));
        assert_eq!(group_id(etc, "nope"), None);
        assert_eq!(parse_group("1234"), Ok(1234));
    }
}
