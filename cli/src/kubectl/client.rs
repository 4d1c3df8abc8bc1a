//! Calls to the API server, and the commands that make them.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use volmig_api::crd::{MigrationPhase, VolumeMigration};

use super::args::{Cli, Cmd};
use super::build::{build_migration, to_yaml};
use super::render::{percent, progress, render_list, render_status};
use super::{Error, Result};

/// How often `--wait` and `--watch` read the migration again.
const POLL: Duration = Duration::from_secs(2);

/// A client from the kubeconfig (or the in-cluster config), in `context`
/// when given.
pub async fn connect(context: Option<&str>) -> Result<Client> {
    let Some(ctx) = context else {
        return Ok(Client::try_default().await?);
    };
    let kc = Kubeconfig::read().map_err(|e| Error::Config(e.to_string()))?;
    let opts = KubeConfigOptions {
        context: Some(ctx.to_string()),
        ..KubeConfigOptions::default()
    };
    let cfg = Config::from_custom_kubeconfig(kc, &opts)
        .await
        .map_err(|e| Error::Config(e.to_string()))?;
    Ok(Client::try_from(cfg)?)
}

/// Creates the migration; returns it as the server stored it.
pub async fn create(client: &Client, ns: &str, vm: &VolumeMigration) -> Result<VolumeMigration> {
    let api: Api<VolumeMigration> = Api::namespaced(client.clone(), ns);
    Ok(api.create(&PostParams::default(), vm).await?)
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

/// Progress bars (one per volume) until the migration ends.
pub async fn wait(client: &Client, ns: &str, name: &str) -> Result<VolumeMigration> {
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template(
        "{prefix:>20} [{bar:30}] {percent:>3}% {bytes}/{total_bytes} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("#>-");
    let head = multi.add(ProgressBar::new_spinner());
    let mut bars: Vec<ProgressBar> = Vec::new();
    loop {
        let vm = get(client, ns, name).await?;
        let st = vm.status.clone().unwrap_or_default();
        head.set_message(format!(
            "{name}: {} {}{}",
            st.phase,
            progress(&vm),
            st.cutover_stall
                .as_deref()
                .map(|s| format!(" stall {s}"))
                .unwrap_or_default()
        ));
        head.tick();
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
        if st.phase.is_terminal() {
            for b in &bars {
                b.finish();
            }
            head.finish();
            return Ok(vm);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Runs a command; `Err` for a migration that ended other than Completed
/// under `--wait`, too.
pub async fn run(cli: Cli) -> Result<()> {
    if let Cmd::Migrate(a) = &cli.cmd
        && a.dry_run
    {
        let vm = build_migration(a, cli.namespace.as_deref())?;
        print!("{}", to_yaml(&vm)?);
        return Ok(());
    }
    let client = connect(cli.context.as_deref()).await?;
    let ns = cli
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    match cli.cmd {
        Cmd::Migrate(a) => {
            let vm = build_migration(&a, Some(&ns))?;
            let made = create(&client, &ns, &vm).await?;
            let name = made.metadata.name.unwrap_or_default();
            println!("volumemigration.volmig.io/{name} created");
            if a.wait {
                let done = wait(&client, &ns, &name).await?;
                print!("{}", render_status(&done, Timestamp::now()));
                outcome(&done)?;
            }
        }
        Cmd::Status { name, watch } => loop {
            let vm = get(&client, &ns, &name).await?;
            let text = render_status(&vm, Timestamp::now());
            if watch && std::io::stdout().is_terminal() {
                print!("\x1b[2J\x1b[H");
            }
            print!("{text}");
            let ended = vm.status.as_ref().is_some_and(|s| s.phase.is_terminal());
            if !watch || ended {
                break;
            }
            if !std::io::stdout().is_terminal() {
                println!("---");
            }
            tokio::time::sleep(POLL).await;
        },
        Cmd::Abort { name } => {
            abort(&client, &ns, &name).await?;
            println!("volumemigration.volmig.io/{name} abort requested");
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
