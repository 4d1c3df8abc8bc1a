//! `kubectl volmig`: the kubectl plugin (on PATH as `kubectl-volmig`).

use std::process::ExitCode;

use clap::Parser;
use volmig_cli::kubectl::args::Cli;
use volmig_cli::kubectl::client::run;

#[tokio::main]
async fn main() -> ExitCode {
    volmig_api::report::exit(run(Cli::parse()).await.map_err(anyhow::Error::from))
}
