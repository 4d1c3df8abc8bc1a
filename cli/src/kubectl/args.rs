//! Command line of `kubectl volmig`.

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "kubectl-volmig",
    bin_name = "kubectl volmig",
    version,
    about = "Live-migrate persistent volumes with VolumeMigration resources"
)]
pub struct Cli {
    /// The kubeconfig context to use (default: the current context).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Namespace (default: the kubeconfig context's namespace).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Create a VolumeMigration; several claims are cut over together (one
    /// consistency group).
    Migrate(MigrateArgs),
    /// Show a migration: phase, per-volume progress, cutover stall,
    /// phase timeline and conditions.
    Status {
        name: String,
        /// Refresh until the migration ends.
        #[arg(long, short = 'w')]
        watch: bool,
    },
    /// Roll a migration back (sets spec.abort: true).
    Abort { name: String },
    /// List migrations.
    List {
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
}

#[derive(Args, Debug, Clone, Default)]
pub struct MigrateArgs {
    /// The source persistent volume claims.
    #[arg(value_name = "PVC")]
    pub pvcs: Vec<String>,
    /// Create target claims (`<pvc>-volmig`) with this storage class.
    #[arg(long, value_name = "SC")]
    pub to_storage_class: Option<String>,
    /// Migrate into this existing claim (repeat once per PVC, in order).
    #[arg(long, value_name = "NAME")]
    pub to_pvc: Vec<String>,
    /// Auto, Background or Mirror.
    #[arg(long, default_value = "Auto")]
    pub mode: String,
    /// Longest acceptable I/O stall at cutover.
    #[arg(long, default_value = "100ms")]
    pub sync_goal: String,
    /// Copy bandwidth per second, e.g. 200Mi (default: unlimited).
    #[arg(long)]
    pub bandwidth: Option<String>,
    /// None, Sample or Full.
    #[arg(long, default_value = "Full")]
    pub verify: String,
    /// Keep the source volume (only `true` is supported).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub retain_source: bool,
    /// The VolumeMigration's name (default: `<first pvc>-migration`).
    #[arg(long)]
    pub name: Option<String>,
    /// Show progress until the migration ends; exit non-zero unless Completed.
    #[arg(long)]
    pub wait: bool,
    /// Print the resource as YAML instead of creating it (needs no cluster).
    #[arg(long)]
    pub dry_run: bool,
}
