//! Local master mode: `volmig migrate` is the master of one session, with
//! its record (the communication data set) in a state file, driving a
//! `volmig-agent` over gRPC. Killed and started again with the same
//! arguments it continues the session from the state file, under a newer
//! epoch that fences any older master still alive.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use volmig_agent::session::Phase;
use volmig_agent::units::human_bytes;
use volmig_master::{
    ClientTls, Driver, DriverConfig, FileStore, GrpcSlave, SessionConfig, SessionRecord,
    SessionStore, StopSignal,
};

/// How to reach the agent.
pub struct AgentAddr {
    pub url: String,
    /// Directory with ca.pem, master.pem, master-key.pem (`volmig certs`).
    pub tls_dir: Option<PathBuf>,
    pub domain: String,
    pub insecure: bool,
}

impl AgentAddr {
    fn slave(&self) -> anyhow::Result<GrpcSlave> {
        let tls = match (&self.tls_dir, self.insecure) {
            (Some(d), false) => Some(ClientTls {
                ca: d.join("ca.pem"),
                cert: d.join("master.pem"),
                key: d.join("master-key.pem"),
                domain: self.domain.clone(),
            }),
            (None, true) => None,
            _ => bail!("give --tls-dir (mutual TLS, see `volmig certs`) or --insecure"),
        };
        Ok(GrpcSlave::new(&self.url, tls.as_ref())?)
    }
}

pub fn print_record(r: &SessionRecord) {
    print!("{}", r.render());
}

fn store(dir: &Path) -> anyhow::Result<FileStore> {
    Ok(FileStore::open(dir)?)
}

/// Runs (or continues) the session of `volume` to its end.
pub async fn migrate(
    state_dir: &Path,
    agent: &AgentAddr,
    volume: &str,
    target: &Path,
    config: SessionConfig,
    quiet: bool,
) -> anyhow::Result<()> {
    let store = store(state_dir)?;
    let slave = agent.slave()?;
    let epoch = match store.load(volume).await? {
        Some(rec) if !rec.phase.is_terminal() => {
            if rec.target != target {
                bail!(
                    "volume {volume} has an unfinished session {} to {}; continue it with that target, or `volmig abort` it",
                    rec.session,
                    rec.target.display()
                );
            }
            eprintln!(
                "continuing session {} at phase {} (epoch {})",
                rec.session,
                rec.phase,
                rec.epoch + 1
            );
            rec.epoch + 1
        }
        _ => {
            let rec = volmig_master::create_session(&store, volume, target, config, 1).await?;
            let mut rec = rec;
            rec.agent = agent.url.clone();
            store.save(volume, &mut rec).await?;
            eprintln!("session {} started", rec.session);
            1
        }
    };
    let stop = Arc::new(StopSignal::default());
    let driver = Driver::new(
        slave,
        store.clone(),
        volume,
        DriverConfig {
            epoch,
            ..DriverConfig::default()
        },
        stop.clone(),
    );
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg:<14} [{bar:30}] {bytes}/{total_bytes} copied, dirty {prefix}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let watch = {
        let store = store.clone();
        let bar = bar.clone();
        let volume = volume.to_string();
        tokio::spawn(async move {
            loop {
                if let Ok(Some(r)) = store.load(&volume).await {
                    bar.set_length(r.size.max(1));
                    bar.set_position(r.bytes_copied.min(r.size));
                    bar.set_message(r.phase.to_string());
                    bar.set_prefix(human_bytes(r.dirty_bytes as f64));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let ctrl_c = {
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!(
                    "stopping the master; the session stays where it is (run the same command to continue, or `volmig abort`)"
                );
                stop.stop();
            }
        })
    };
    let result = driver.run().await;
    watch.abort();
    ctrl_c.abort();
    bar.finish_and_clear();
    let rec = result.context("driving the session")?;
    print_record(&rec);
    match rec.phase {
        Phase::Completed => Ok(()),
        p if !p.is_terminal() => {
            bail!("stopped at phase {p}; run the same command again to continue")
        }
        p => bail!("migration ended {p}"),
    }
}

pub async fn status(state_dir: &Path, volume: &str, json: bool) -> anyhow::Result<()> {
    let rec = store(state_dir)?
        .load(volume)
        .await?
        .with_context(|| format!("no session for volume {volume} in {}", state_dir.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rec)?);
    } else {
        print_record(&rec);
    }
    Ok(())
}

pub async fn abort(state_dir: &Path, volume: &str) -> anyhow::Result<()> {
    let rec = volmig_master::request_abort(&store(state_dir)?, volume).await?;
    eprintln!(
        "abort requested for session {}; its master rolls it back at its next step",
        rec.session
    );
    Ok(())
}

pub async fn list(state_dir: &Path) -> anyhow::Result<()> {
    let store = store(state_dir)?;
    println!(
        "{:<20} {:<14} {:>8} {:>10}  TARGET",
        "VOLUME", "PHASE", "PROGRESS", "STALL"
    );
    for key in store.keys().await? {
        if let Some(r) = store.load(&key).await? {
            let pct = if r.size > 0 {
                100.0 * r.bytes_copied.min(r.size) as f64 / r.size as f64
            } else {
                0.0
            };
            let stall = r
                .cutover_stall_ms
                .map(|s| format!("{s:.1} ms"))
                .unwrap_or_else(|| "-".into());
            println!(
                "{:<20} {:<14} {:>7.0}% {:>10}  {}",
                r.volume,
                r.phase.to_string(),
                pct,
                stall,
                r.target.display()
            );
        }
    }
    Ok(())
}
