//! `volmig`: the command line. `volmig demo` runs a self-contained live
//! migration on temporary files.

mod demo;
mod pattern;

use std::time::Duration;

use clap::{Parser, Subcommand};
use volmig_agent::session::{CopyMode, SessionConfig, Verify};
use volmig_agent::units::{parse_duration, parse_size};

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
        /// Background, Mirror or Auto.
        #[arg(long, default_value = "Auto")]
        mode: CopyMode,
        /// Longest acceptable I/O stall at cutover.
        #[arg(long, default_value = "100ms", value_parser = parse_duration)]
        sync_goal: Duration,
        /// Copy bandwidth limit per second (0 = unlimited).
        #[arg(long, default_value = "0", value_parser = parse_size)]
        bandwidth: u64,
        /// Dirty-map granularity.
        #[arg(long, default_value = "64Ki", value_parser = parse_size)]
        grain: u64,
        /// None, Sample or Full.
        #[arg(long, default_value = "Full")]
        verify: Verify,
        /// Keep the files in this directory instead of a temporary one.
        #[arg(long)]
        keep: Option<std::path::PathBuf>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
}

fn main() -> anyhow::Result<()> {
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
            mode,
            sync_goal,
            bandwidth,
            grain,
            verify,
            keep,
            quiet,
        } => {
            let config = SessionConfig {
                mode,
                sync_goal_ms: sync_goal.as_millis() as u64,
                bandwidth,
                grain,
                verify,
                ..SessionConfig::default()
            };
            rt.block_on(demo::run(demo::DemoArgs {
                size,
                writers: writers.max(1),
                baseline,
                config,
                keep,
                quiet,
            }))
        }
    }
}
