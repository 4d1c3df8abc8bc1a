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
    #[command(flatten)]
    pub conn: Connection,
    /// Namespace (default: the kubeconfig context's namespace).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// How to reach the cluster, as kubectl's flags of the same names say.
#[derive(Args, Debug, Clone, Default)]
pub struct Connection {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config,
    /// then the in-cluster configuration).
    #[arg(long, global = true, value_name = "PATH")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// The kubeconfig context to use (default: the current context).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Act as this user (impersonation).
    #[arg(long = "as", global = true, value_name = "USER")]
    pub as_user: Option<String>,
    /// Act as this group (impersonation; repeatable).
    #[arg(long = "as-group", global = true, value_name = "GROUP")]
    pub as_groups: Vec<String>,
    /// How long to wait for one request to the API server (e.g. 30s, 2m;
    /// 0 waits forever). A `--watch` or `--wait` is one request too.
    #[arg(long, global = true, default_value = "0", value_name = "DURATION",
          value_parser = parse_timeout)]
    pub request_timeout: Timeout,
}

/// `--request-timeout`: `None` waits forever.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeout(pub Option<std::time::Duration>);

fn parse_timeout(s: &str) -> Result<Timeout, String> {
    if s.trim_start_matches('0').is_empty() {
        return Ok(Timeout(None));
    }
    volmig_api::units::parse_duration(s)
        .map(|d| Timeout((!d.is_zero()).then_some(d)))
        .map_err(|e| format!("{s:?} is not a duration (e.g. 30s, 2m, 0 for none): {e}"))
}

/// `--dry-run`: `client` prints the resource without a cluster, `server`
/// has the API server check it and store nothing.
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DryRun {
    #[default]
    None,
    Client,
    Server,
}

/// `-o`: what `migrate` prints of the resource.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Yaml,
    Json,
    Name,
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
        /// Show it again at every change (a watch) until it ends.
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
    /// After `helm upgrade`: move the node agents to the DaemonSet's new
    /// image in place, one node at a time, so that each node's volumes
    /// only stall (a new pod would end the descriptor keeper, and the
    /// FUSE block devices' I/O would fail). -n is the release's namespace.
    UpgradeAgents(UpgradeArgs),
}

#[derive(Args, Debug, Clone)]
pub struct UpgradeArgs {
    /// The agent DaemonSet (default: the only one with the chart's labels).
    #[arg(long)]
    pub daemonset: Option<String>,
    /// Say what would be done; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// How long one node's agent may take to be ready again (e.g. 5m).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub timeout: std::time::Duration,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    volmig_api::units::parse_duration(s).map_err(|e| format!("{s:?} is not a duration: {e}"))
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
    /// Keep the source volume; `false` releases a volmig volume's source
    /// backing claim after the migration (other volumes keep theirs).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub retain_source: bool,
    /// The VolumeMigration's name (default: `<first pvc>-migration`).
    #[arg(long)]
    pub name: Option<String>,
    /// Show progress until the migration ends; exit non-zero unless Completed.
    #[arg(long)]
    pub wait: bool,
    /// Create nothing: `client` (also `--dry-run` alone) builds the
    /// resource without a cluster, `server` has the API server check it.
    #[arg(long, value_enum, default_value = "none", num_args = 0..=1,
          require_equals = true, default_missing_value = "client")]
    pub dry_run: DryRun,
    /// Print the resource (as created, or as it would be) as yaml or json,
    /// or its name only.
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<Output>,
}
