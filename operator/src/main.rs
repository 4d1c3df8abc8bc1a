//! `volmig-operator`: `crd` prints the CRD; `run` is the operator.

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "volmig-operator",
    version,
    about = "volmig operator: migrates persistent volumes live"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the VolumeMigration CRD as YAML.
    Crd,
    /// Run the operator (leader-elected).
    Run(Box<volmig_operator::run::RunArgs>),
}

fn main() -> std::process::ExitCode {
    volmig_api::report::exit(run())
}

#[tokio::main]
async fn run() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Crd => print!("{}", volmig_operator::crd_gen::crd_yaml()?),
        Cmd::Run(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
                )
                .init();
            volmig_operator::run::run(*args).await?;
        }
    }
    Ok(())
}
