//! `volmig-operator`: `crd` prints the CRDs; `run` is the operator;
//! `csi-controller` the CSI controller of `csi.volmig.io`.

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
    Crd {
        /// The VolmigVolume CRD instead (the CSI driver's volume records).
        #[arg(long)]
        volumes: bool,
    },
    /// Serve the CSI controller of csi.volmig.io on a unix socket.
    CsiController(Box<volmig_operator::csi::CsiArgs>),
    /// Run the operator (leader-elected).
    Run(Box<volmig_operator::run::RunArgs>),
    /// Print the RBAC rules the operator needs (JSON: cluster and namespace rules).
    Rbac {
        /// The Lease of `run --lease-name`.
        #[arg(long, default_value = "volmig-operator")]
        lease_name: String,
        /// The Secret of `run --tls-secret`, if the operator manages its certificates.
        #[arg(long)]
        tls_secret: Option<String>,
    },
}

fn main() -> std::process::ExitCode {
    volmig_api::report::exit(run())
}

#[tokio::main]
async fn run() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Crd { volumes: false } => print!("{}", volmig_operator::crd_gen::crd_yaml()?),
        Cmd::Crd { volumes: true } => print!("{}", volmig_operator::crd_gen::volume_crd_yaml()?),
        Cmd::Rbac {
            lease_name,
            tls_secret,
        } => {
            let named = volmig_operator::rbac::Named {
                lease: lease_name,
                tls_secret,
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&volmig_operator::rbac::policy_rules(&named))?
            );
        }
        Cmd::CsiController(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
                )
                .init();
            volmig_operator::csi::run(*args).await?;
        }
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
