//! Calls to the API server, and the commands that make them.

use std::io::IsTerminal;

use futures::{StreamExt, TryStreamExt};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::{Api, Client, Config};
use volmig_api::crd::{MigrationPhase, VolumeMigration};

use super::args::{Cli, Cmd, Connection, DryRun, Output};
use super::build::{build_migration, to_yaml};
use super::render::{percent, progress, render_list, render_status};
use super::{Error, Result};

/// The client configuration `conn` asks for: the kubeconfig (`--kubeconfig`,
/// else $KUBECONFIG or ~/.kube/config, else in-cluster) in `--context`, as
/// `--as`/`--as-group`, each request bounded by `--request-timeout`.
pub async fn config(conn: &Connection) -> Result<Config> {
    let opts = KubeConfigOptions {
        context: conn.context.clone(),
        ..KubeConfigOptions::default()
    };
    let cfg_err = |e: &dyn std::fmt::Display| Error::Config(e.to_string());
    let mut cfg = match (&conn.kubeconfig, &conn.context) {
        (Some(path), _) => {
            let kc = Kubeconfig::read_from(path)
                .map_err(|e| Error::Config(format!("--kubeconfig {}: {e}", path.display())))?;
            Config::from_custom_kubeconfig(kc, &opts)
                .await
                .map_err(|e| cfg_err(&e))?
        }
        (None, Some(_)) => Config::from_kubeconfig(&opts)
            .await
            .map_err(|e| cfg_err(&e))?,
        (None, None) => Config::infer().await.map_err(|e| cfg_err(&e))?,
    };
    if let Some(user) = &conn.as_user {
        cfg.auth_info.impersonate = Some(user.clone());
    }
    if !conn.as_groups.is_empty() {
        cfg.auth_info.impersonate_groups = Some(conn.as_groups.clone());
    }
    if let Some(t) = conn.request_timeout.0 {
        cfg.connect_timeout = Some(t);
        cfg.read_timeout = Some(t);
        cfg.write_timeout = Some(t);
    }
    Ok(cfg)
}

/// A client as [`config`] describes it.
pub async fn connect(conn: &Connection) -> Result<Client> {
    Ok(Client::try_from(config(conn).await?)?)
}

/// Creates the migration; returns it as the server stored it.
pub async fn create(client: &Client, ns: &str, vm: &VolumeMigration) -> Result<VolumeMigration> {
    create_with(client, ns, vm, false).await
}

/// Creates the migration, or with `dry_run` has the server check it and
/// store nothing (`dryRun=All`); returns what the server answered.
pub async fn create_with(
    client: &Client,
    ns: &str,
    vm: &VolumeMigration,
    dry_run: bool,
) -> Result<VolumeMigration> {
    let api: Api<VolumeMigration> = Api::namespaced(client.clone(), ns);
    let pp = PostParams {
        dry_run,
        ..PostParams::default()
    };
    Ok(api.create(&pp, vm).await?)
}

/// What `migrate` prints of `vm`: as `-o` says, else kubectl's line.
pub fn printed(vm: &VolumeMigration, output: Option<Output>, dry_run: DryRun) -> Result<String> {
    let name = vm.metadata.name.clone().unwrap_or_default();
    Ok(match output {
        Some(Output::Yaml) => to_yaml(vm)?,
        Some(Output::Json) => {
            let mut j = serde_json::to_string_pretty(vm).map_err(|e| Error::Yaml(e.to_string()))?;
            j.push('\n');
            j
        }
        Some(Output::Name) => format!("volumemigration.volmig.io/{name}\n"),
        None => format!(
            "volumemigration.volmig.io/{name} created{}\n",
            match dry_run {
                DryRun::None => "",
                DryRun::Client => " (dry run)",
                DryRun::Server => " (server dry run)",
            }
        ),
    })
}

pub async fn get(client: &Client, ns: &str, name: &str) -> Result<VolumeMigration> {
    let api: Api<VolumeMigration> = Api::namespaced(client.clone(), ns);
    Ok(api.get(name).await?)
}

/// Sets `spec.abort: true` with a merge patch (the CRD refuses unsetting it,
/// and setting it after the migration ended).
pub async fn abort(client: &Client, ns: &str, name: &str) -> Result<VolumeMigration> {
    let api: Api<VolumeMigration> = Api::namespaced(client.clone(), ns);
    let patch = serde_json::json!({ "spec": { "abort": true } });
    Ok(api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?)
}

/// The migrations of `ns`, or of every namespace when `None`.
pub async fn list(client: &Client, ns: Option<&str>) -> Result<Vec<VolumeMigration>> {
    let api: Api<VolumeMigration> = match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    Ok(api.list(&ListParams::default()).await?.items)
}

/// Ok when the migration completed, the error naming how it ended otherwise.
pub fn outcome(vm: &VolumeMigration) -> Result<()> {
    let st = vm.status.clone().unwrap_or_default();
    if st.phase == MigrationPhase::Completed {
        return Ok(());
    }
    let mut how = st.phase.to_string();
    if let Some(e) = st.error {
        how = format!("{how}: {e}");
    }
    Err(Error::Ended(
        vm.metadata.name.clone().unwrap_or_default(),
        how,
    ))
}

/// Calls `seen` with the migration as it is now and again at every change
/// (one watch, no polling) until it ends; returns it as it ended. A
/// migration that does not exist, or is deleted meanwhile, is an error.
pub async fn follow(
    client: &Client,
    ns: &str,
    name: &str,
    mut seen: impl FnMut(&VolumeMigration),
) -> Result<VolumeMigration> {
    let api: Api<VolumeMigration> = Api::namespaced(client.clone(), ns);
    let mut changes = watcher::watch_object(api, name).boxed();
    let mut last_version = None;
    while let Some(change) = changes.try_next().await? {
        let Some(vm) = change else {
            return Err(Error::Gone(format!("{ns}/{name}")));
        };
        // A watch that starts again lists the object again: show a
        // version once.
        if last_version.is_some() && vm.metadata.resource_version == last_version {
            continue;
        }
        last_version.clone_from(&vm.metadata.resource_version);
        seen(&vm);
        if vm.status.as_ref().is_some_and(|s| s.phase.is_terminal()) {
            return Ok(vm);
        }
    }
    Err(Error::Gone(format!("{ns}/{name}")))
}

/// Progress bars (one per volume), updated at every change of the
/// migration, until it ends.
pub async fn wait(client: &Client, ns: &str, name: &str) -> Result<VolumeMigration> {
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template(
        "{prefix:>20} [{bar:30}] {percent:>3}% {bytes}/{total_bytes} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("#>-");
    let head = multi.add(ProgressBar::new_spinner());
    head.enable_steady_tick(std::time::Duration::from_millis(200));
    let mut bars: Vec<ProgressBar> = Vec::new();
    let done = follow(client, ns, name, |vm| {
        let st = vm.status.clone().unwrap_or_default();
        head.set_message(format!(
            "{name}: {} {}{}",
            st.phase,
            progress(vm),
            st.cutover_stall
                .as_deref()
                .map(|s| format!(" stall {s}"))
                .unwrap_or_default()
        ));
        for (i, v) in st.volumes.iter().enumerate() {
            if bars.len() <= i {
                let b = multi.add(ProgressBar::new(0));
                b.set_style(style.clone());
                b.set_prefix(v.source.clone());
                bars.push(b);
            }
            let b = &bars[i];
            b.set_length(v.bytes_total.max(0) as u64);
            b.set_position(v.bytes_copied.max(0) as u64);
            b.set_message(format!(
                "{}%{}",
                percent(v.bytes_copied, v.bytes_total),
                if v.redirected { " redirected" } else { "" }
            ));
        }
    })
    .await;
    for b in &bars {
        b.finish();
    }
    head.finish();
    done
}

/// `status --watch`: the status rendered into `out` at every change of
/// the migration (a watch), a `---` line between two (the screen cleared
/// instead when `clear`), until it ends.
pub async fn watch_status(
    client: &Client,
    ns: &str,
    name: &str,
    clear: bool,
    mut out: impl std::io::Write,
) -> Result<VolumeMigration> {
    let mut first = true;
    let mut failed = None;
    let vm = follow(client, ns, name, |vm| {
        let mut text = String::new();
        if clear {
            text.push_str("\x1b[2J\x1b[H");
        } else if !first {
            text.push_str("---\n");
        }
        first = false;
        text.push_str(&render_status(vm, Timestamp::now()));
        if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            failed.get_or_insert(e);
        }
    })
    .await?;
    match failed {
        Some(e) => Err(Error::Output(e.to_string())),
        None => Ok(vm),
    }
}

/// Runs a command; `Err` for a migration that ended other than Completed
/// under `--wait`, too.
pub async fn run(cli: Cli) -> Result<()> {
    if let Cmd::Migrate(a) = &cli.cmd
        && a.dry_run == DryRun::Client
    {
        let vm = build_migration(a, cli.namespace.as_deref())?;
        print!("{}", printed(&vm, a.output, a.dry_run)?);
        return Ok(());
    }
    let client = connect(&cli.conn).await?;
    let ns = cli
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    match cli.cmd {
        Cmd::Migrate(a) => {
            let vm = build_migration(&a, Some(&ns))?;
            let server_dry_run = a.dry_run == DryRun::Server;
            let made = create_with(&client, &ns, &vm, server_dry_run).await?;
            print!("{}", printed(&made, a.output, a.dry_run)?);
            let name = made.metadata.name.unwrap_or_default();
            if a.wait && !server_dry_run {
                let done = wait(&client, &ns, &name).await?;
                print!("{}", render_status(&done, Timestamp::now()));
                outcome(&done)?;
            }
        }
        Cmd::Status { name, watch: false } => {
            print!(
                "{}",
                render_status(&get(&client, &ns, &name).await?, Timestamp::now())
            );
        }
        Cmd::Status { name, watch: true } => {
            let stdout = std::io::stdout();
            let clear = stdout.is_terminal();
            watch_status(&client, &ns, &name, clear, stdout.lock()).await?;
        }
        Cmd::Abort { name } => {
            abort(&client, &ns, &name).await?;
            println!("volumemigration.volmig.io/{name} abort requested");
        }
        Cmd::UpgradeAgents(a) => {
            super::upgrade::upgrade_agents(
                &client,
                &ns,
                a.daemonset.as_deref(),
                a.dry_run,
                a.timeout,
                std::io::stdout().lock(),
            )
            .await?;
        }
        Cmd::List { all_namespaces } => {
            let items = list(&client, (!all_namespaces).then_some(ns.as_str())).await?;
            if items.is_empty() {
                if all_namespaces {
                    eprintln!("No resources found");
                } else {
                    eprintln!("No resources found in {ns} namespace.");
                }
            } else {
                print!("{}", render_list(&items, all_namespaces, Timestamp::now()));
            }
        }
    }
    Ok(())
}
