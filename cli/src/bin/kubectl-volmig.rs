//! `kubectl volmig`: the kubectl plugin (on PATH as `kubectl-volmig`).

use std::process::ExitCode;

use clap::Parser;
use volmig_cli::kubectl::args::Cli;
use volmig_cli::kubectl::client::run;

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}
