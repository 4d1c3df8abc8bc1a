//! `volmig-agent`: serves volumes over NBD through the interposer and
//! migrates them live. `serve` runs the agent; the other subcommands talk
//! to a running agent over its control socket.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use volmig_agent::agent::Agent;
use volmig_agent::control::{self, ControlClient, Reply, Request};
use volmig_agent::session_args::SessionArgs;
use volmig_agent::units::{human_bytes, parse_size};
use volmig_frontends::nbd::{Export, NbdServer};

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
    /// Serve volumes over NBD and accept migrations on the control socket.
    Serve(ServeArgs),
    /// Start migrating a served volume to a target device.
    Migrate(MigrateArgs),
    /// Show a volume's migration status.
    Status {
        #[arg(long, default_value = "/run/volmig/agent.sock")]
        control: PathBuf,
        volume: String,
        /// Print the raw status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Abort a volume's migration (the workload stays on a complete device).
    Abort {
        #[arg(long, default_value = "/run/volmig/agent.sock")]
        control: PathBuf,
        volume: String,
    },
    /// Change a running migration's bandwidth limit (0 = unlimited).
    Bandwidth {
        #[arg(long, default_value = "/run/volmig/agent.sock")]
        control: PathBuf,
        volume: String,
        /// Bytes per second, e.g. 200Mi.
        #[arg(value_parser = parse_size)]
        rate: u64,
    },
    /// List served volumes.
    List {
        #[arg(long, default_value = "/run/volmig/agent.sock")]
        control: PathBuf,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// Where sessions keep their records and dirty maps (never on source or target).
    #[arg(long, default_value = "/var/lib/volmig")]
    state_dir: PathBuf,
    /// A volume to serve: NAME=PATH (a regular file or block device).
    /// Repeatable; none is allowed (a DaemonSet pod on a node without
    /// volmig volumes still answers the master).
    #[arg(long = "export", value_parser = parse_export)]
    exports: Vec<(String, PathBuf)>,
    /// Serve NBD on this unix socket.
    #[arg(long)]
    nbd_unix: Option<PathBuf>,
    /// Serve NBD on this TCP address (e.g. 127.0.0.1:10809).
    #[arg(long)]
    nbd_tcp: Option<String>,
    /// Control socket.
    #[arg(long, default_value = "/run/volmig/agent.sock")]
    control: PathBuf,
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
    /// Open backing devices with O_DIRECT.
    #[arg(long)]
    direct: bool,
    /// Most threads doing blocking device I/O at once.
    #[arg(long, default_value_t = 64)]
    io_threads: usize,
}

#[derive(Args)]
struct MigrateArgs {
    #[arg(long, default_value = "/run/volmig/agent.sock")]
    control: PathBuf,
    /// The served volume to migrate.
    volume: String,
    /// The target backing device (file or block device, at least as large).
    target: PathBuf,
    #[command(flatten)]
    opts: SessionArgs,
    /// Wait until the migration ends and print the result.
    #[arg(long)]
    wait: bool,
}

fn parse_export(s: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=PATH"))?;
    Ok((name.to_string(), PathBuf::from(path)))
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
    let io_threads = match &cli.cmd {
        Cmd::Serve(a) => a.io_threads.max(1),
        _ => 1,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(io_threads)
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Serve(a) => serve(a).await,
        Cmd::Migrate(a) => {
            let mut c = connect(&a.control).await?;
            let req = Request::Migrate {
                volume: a.volume.clone(),
                target: a.target,
                config: a.opts.config(),
            };
            expect_status(c.call(&req).await?)?;
            eprintln!("migration of {} started", a.volume);
            if a.wait {
                let st = expect_status(c.call(&Request::Wait { volume: a.volume }).await?)?;
                print_status(&st);
                if st.record.phase != volmig_agent::session::Phase::Completed {
                    bail!("migration ended {}", st.record.phase);
                }
            }
            Ok(())
        }
        Cmd::Status {
            control,
            volume,
            json,
        } => {
            let st = expect_status(
                connect(&control)
                    .await?
                    .call(&Request::Status { volume })
                    .await?,
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                print_status(&st);
            }
            Ok(())
        }
        Cmd::Abort { control, volume } => expect_done(
            connect(&control)
                .await?
                .call(&Request::Abort { volume })
                .await?,
        ),
        Cmd::Bandwidth {
            control,
            volume,
            rate,
        } => expect_done(
            connect(&control)
                .await?
                .call(&Request::SetBandwidth {
                    volume,
                    bytes_per_sec: rate,
                })
                .await?,
        ),
        Cmd::List { control } => match connect(&control).await?.call(&Request::List).await? {
            Reply::Volumes { volumes } => {
                println!("{:<20} {:>12} {:<14} ACTIVE", "VOLUME", "SIZE", "PHASE");
                for v in volumes {
                    let phase = v.phase.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
                    println!(
                        "{:<20} {:>12} {:<14} {}",
                        v.name,
                        human_bytes(v.size as f64),
                        phase,
                        v.active.display()
                    );
                }
                Ok(())
            }
            Reply::Error { message } => bail!(message),
            other => bail!("unexpected reply {other:?}"),
        },
    }
}

async fn connect(path: &std::path::Path) -> anyhow::Result<ControlClient> {
    ControlClient::connect(path)
        .await
        .with_context(|| format!("is volmig-agent serving on {}?", path.display()))
}

fn expect_status(r: Reply) -> anyhow::Result<volmig_agent::session::SessionStatus> {
    match r {
        Reply::Status(s) => Ok(*s),
        Reply::Error { message } => bail!(message),
        other => bail!("unexpected reply {other:?}"),
    }
}

fn expect_done(r: Reply) -> anyhow::Result<()> {
    match r {
        Reply::Done => Ok(()),
        Reply::Error { message } => bail!(message),
        other => bail!("unexpected reply {other:?}"),
    }
}

fn print_status(st: &volmig_agent::session::SessionStatus) {
    print!("{}", st.record.render());
    println!(
        "live        copy {}/s, workload writes {}/s, bandwidth limit {}",
        human_bytes(st.copy_rate),
        human_bytes(st.write_rate),
        if st.bandwidth == 0 {
            "none".to_string()
        } else {
            format!("{}/s", human_bytes(st.bandwidth as f64))
        }
    );
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    if a.nbd_unix.is_none() && a.nbd_tcp.is_none() {
        bail!("nothing to serve on: give --nbd-unix and/or --nbd-tcp");
    }
    let agent = Agent::new(&a.state_dir)?;
    let server: NbdServer<volmig_agent::interposer::Interposer> = NbdServer::new();
    for (name, path) in &a.exports {
        let ip = agent
            .add_volume(name, path, a.direct)
            .await
            .with_context(|| format!("export {name}"))?;
        server.add_export(Export::new(name.clone(), ip))?;
        tracing::info!(volume = %name, path = %path.display(), "serving");
    }
    if a.exports.is_empty() {
        tracing::warn!("no --export given: this agent serves no volume yet");
    }
    let mut handles = Vec::new();
    if let Some(p) = &a.nbd_unix {
        let _ = std::fs::remove_file(p);
        handles.push(server.serve_unix(p).await?);
    }
    if let Some(addr) = &a.nbd_tcp {
        handles.push(server.serve_tcp(addr.as_str()).await?);
    }
    let (grpc_stop, grpc_stopped) = tokio::sync::oneshot::channel::<()>();
    let grpc_task = match a.grpc {
        None => None,
        Some(addr) => {
            let tls = match (&a.tls_cert, &a.tls_key, &a.tls_client_ca, a.insecure_grpc) {
                (Some(cert), Some(key), Some(ca), false) => Some(volmig_agent::grpc::TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: ca.clone(),
                }),
                (None, None, None, true) => {
                    tracing::warn!(%addr, "gRPC API in PLAIN TEXT without client authentication (--insecure-grpc)");
                    None
                }
                _ => bail!(
                    "--grpc needs --tls-cert, --tls-key and --tls-client-ca (mutual TLS), or --insecure-grpc alone"
                ),
            };
            // Fail now on unreadable TLS files rather than in the task.
            if let Some(t) = &tls {
                volmig_agent::grpc::server_tls(t)?;
            }
            let agent = agent.clone();
            tracing::info!(%addr, tls = tls.is_some(), "agent gRPC API listening");
            Some(tokio::spawn(async move {
                volmig_agent::grpc::serve(agent, addr, tls.as_ref(), async {
                    let _ = grpc_stopped.await;
                })
                .await
            }))
        }
    };
    if let Some(dir) = a.control.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    let ctl_agent = agent.clone();
    let ctl_path = a.control.clone();
    let control_task = tokio::spawn(async move { control::serve(ctl_agent, &ctl_path).await });
    for h in &handles {
        tracing::info!(addr = %h.local_addr(), "NBD listening");
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
        r = control_task => { r??; }
    }
    tracing::info!("shutting down; unfinished sessions resume at next start");
    agent.shutdown().await;
    let _ = grpc_stop.send(());
    if let Some(t) = grpc_task {
        let _ = t.await;
    }
    for h in handles {
        let _ = h.shutdown().await;
    }
    Ok(())
}
