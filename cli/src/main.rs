//! `volmig`: the command line. `volmig demo` runs a self-contained live
//! migration on temporary files; `volmig migrate` is the master of a
//! migration on agents; `volmig serve`/`unserve`/`volumes` change and show
//! what an agent serves.

mod certs;
mod demo;
mod local;
mod pattern;
mod serving;

use std::time::Duration;

use clap::{Parser, Subcommand};
use volmig_node_agent::session_args::SessionArgs;
use volmig_node_agent::units::{parse_duration, parse_size};

#[derive(Parser)]
#[command(
    name = "volmig",
    version,
    about = "Live migration of volumes between storage backends"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Migrate a temporary volume live while writers use it over NBD, then
    /// check the target holds exactly what they wrote.
    Demo {
        /// Volume size.
        #[arg(long, default_value = "512Mi", value_parser = parse_size)]
        size: u64,
        /// Concurrent NBD writer connections.
        #[arg(long, default_value_t = 4)]
        writers: u64,
        /// How long the writers run alone before (and, halved, after) the migration.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        baseline: Duration,
        #[command(flatten)]
        session: SessionArgs,
        /// Keep the files in this directory instead of a temporary one.
        #[arg(long)]
        keep: Option<std::path::PathBuf>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Be the master of a live migration of a volume served by a volmig-agent
    /// (local mode: the session record is a state file). Run again with the
    /// same arguments to continue an interrupted session.
    Migrate {
        #[command(flatten)]
        master: MasterArgs,
        /// The volume, as the agent exports it.
        volume: String,
        /// The target backing device on the agent's host.
        target: std::path::PathBuf,
        /// More volumes: VOLUME=TARGET, or VOLUME=TARGET@AGENT_URL for a
        /// volume another agent serves, or VOLUME=TARGET@URL1,URL2,... for
        /// a multi-attach volume (the first agent copies) (repeatable).
        #[arg(long = "volume", value_name = "VOLUME=TARGET[@AGENT[,AGENT...]]")]
        more: Vec<String>,
        /// Multi-attach: another agent serving VOLUME at the same time
        /// (same volume name and paths on its host). It monitors its
        /// workload's writes for --agent, which copies; all cut over
        /// together (repeatable).
        #[arg(long = "shared-with", value_name = "AGENT_URL")]
        shared_with: Vec<String>,
        /// Cut every volume over together as one consistency group: all or
        /// none switch to their targets.
        #[arg(long)]
        group: Option<String>,
        /// Sessions driven at once per state directory (0 = no limit); the
        /// rest wait in a queue. A group counts as one.
        #[arg(long, default_value_t = 4)]
        max_concurrent: usize,
        /// Copy bandwidth per second shared fairly by these sessions (0 =
        /// none; --bandwidth still caps each one).
        #[arg(long, default_value = "0", value_parser = parse_size)]
        total_bandwidth: u64,
        #[command(flatten)]
        session: SessionArgs,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Show a session from the state directory.
    Status {
        #[arg(long, default_value = "/var/lib/volmig/master")]
        state_dir: std::path::PathBuf,
        volume: String,
        #[arg(long)]
        json: bool,
    },
    /// Ask a session's master to roll it back (the workload stays on a complete device).
    Abort {
        #[arg(long, default_value = "/var/lib/volmig/master")]
        state_dir: std::path::PathBuf,
        volume: String,
    },
    /// List the sessions in the state directory.
    List {
        #[arg(long, default_value = "/var/lib/volmig/master")]
        state_dir: std::path::PathBuf,
    },
    /// Serve a volume on an agent: its backing device through the interposer,
    /// reached through the frontends (the agent persists it and serves it
    /// again after a restart). The same settings again change nothing.
    Serve {
        #[command(flatten)]
        agent: AgentArgs,
        /// The volume's name (the NBD export's name).
        volume: String,
        /// The backing device on the agent's host (regular file or block device).
        backing: std::path::PathBuf,
        /// How workloads reach it (repeatable): `nbd` (an export of the
        /// agent's NBD server), `block` (a kernel block device of the
        /// agent's node, the best kind it offers) or `block:fuse`,
        /// `block:nbd`, `block:ublk`.
        #[arg(long = "frontend", default_value = "nbd")]
        frontends: Vec<volmig_api::slave::Frontend>,
        /// Open the backing device with O_DIRECT (what block volumes should
        /// use: the agent then allocates no page cache for their writes,
        /// which keeps it safe under memory pressure).
        #[arg(long)]
        direct: bool,
    },
    /// Stop serving a volume on an agent (refused while a migration holds it;
    /// a volume not served is no error).
    Unserve {
        #[command(flatten)]
        agent: AgentArgs,
        volume: String,
    },
    /// List what an agent serves, and the volumes it failed to serve.
    Volumes {
        #[command(flatten)]
        agent: AgentArgs,
        #[arg(long)]
        json: bool,
    },
    /// Make a CA and mTLS certificates for agents (server) and masters (client).
    Certs {
        /// Output directory (ca.pem, agent.pem, agent-key.pem, master.pem, master-key.pem).
        #[arg(long)]
        out: std::path::PathBuf,
        /// Names and addresses the agent is reached by (repeatable).
        #[arg(long = "host", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        hosts: Vec<String>,
    },
}

#[derive(clap::Args)]
struct MasterArgs {
    /// Where the master keeps session records.
    #[arg(long, default_value = "/var/lib/volmig/master")]
    state_dir: std::path::PathBuf,
    #[command(flatten)]
    agent: AgentArgs,
}

/// How to reach an agent.
#[derive(clap::Args)]
struct AgentArgs {
    /// The agent's gRPC address: unix:///run/volmig/agent.sock (its local
    /// socket, no TLS) or https://127.0.0.1:7443.
    #[arg(long)]
    agent: String,
    /// Directory with ca.pem, master.pem and master-key.pem (see `volmig certs`).
    #[arg(long)]
    tls_dir: Option<std::path::PathBuf>,
    /// The name the agent's certificate carries.
    #[arg(long, default_value = "localhost")]
    tls_domain: String,
    /// Talk to an agent serving plain text (--insecure-grpc).
    #[arg(long)]
    insecure: bool,
}

impl AgentArgs {
    fn addr(self) -> local::AgentAddr {
        local::AgentAddr {
            url: self.agent,
            tls_dir: self.tls_dir,
            domain: self.tls_domain,
            insecure: self.insecure,
        }
    }
}

fn main() -> std::process::ExitCode {
    volmig_api::report::exit(run())
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(64)
        .build()?;
    match cli.cmd {
        Cmd::Demo {
            size,
            writers,
            baseline,
            session,
            keep,
            quiet,
        } => rt.block_on(demo::run(demo::DemoArgs {
            size,
            writers: writers.max(1),
            baseline,
            config: session.config(),
            keep,
            quiet,
        })),
        Cmd::Migrate {
            master,
            volume,
            target,
            more,
            shared_with,
            group,
            max_concurrent,
            total_bandwidth,
            session,
            quiet,
        } => {
            let addr = master.agent.addr();
            let mut volumes = vec![local::VolumeSpec {
                volume,
                target,
                agent: addr.clone(),
                shared_with: shared_with
                    .into_iter()
                    .map(|url| local::AgentAddr {
                        url,
                        ..addr.clone()
                    })
                    .collect(),
            }];
            for spec in &more {
                volumes.push(local::parse_volume_spec(spec, &addr)?);
            }
            rt.block_on(local::migrate(
                &master.state_dir,
                volumes,
                local::Plan {
                    group,
                    max_concurrent,
                    total_bandwidth,
                },
                session.config(),
                quiet,
            ))
        }
        Cmd::Status {
            state_dir,
            volume,
            json,
        } => rt.block_on(local::status(&state_dir, &volume, json)),
        Cmd::Abort { state_dir, volume } => rt.block_on(local::abort(&state_dir, &volume)),
        Cmd::List { state_dir } => rt.block_on(local::list(&state_dir)),
        Cmd::Serve {
            agent,
            volume,
            backing,
            frontends,
            direct,
        } => rt.block_on(serving::serve(
            &agent.addr(),
            volume,
            backing,
            frontends,
            direct,
        )),
        Cmd::Unserve { agent, volume } => rt.block_on(serving::unserve(&agent.addr(), volume)),
        Cmd::Volumes { agent, json } => rt.block_on(serving::volumes(&agent.addr(), json)),
        Cmd::Certs { out, hosts } => {
            certs::generate(&out, &hosts)?;
            println!(
                "wrote ca.pem, agent.pem, agent-key.pem, master.pem, master-key.pem to {}",
                out.display()
            );
            Ok(())
        }
    }
}
