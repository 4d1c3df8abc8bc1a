//! `volmig-operator`: `crd` prints the CRD; `run` is the operator.

use clap::{Parser, Subcommand};

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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Crd => print!("{}", volmig_operator::crd_gen::crd_yaml()?),
    }
    Ok(())
}
