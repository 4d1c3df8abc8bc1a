//! Local master mode: `volmig migrate` is the master of its sessions, with
//! their records (the communication data set) in state files, driving
//! `volmig-agent`s over gRPC through the master's `Supervisor` (one job per
//! session, or one for a consistency group; admission and the bandwidth
//! pool are the supervisor's). Killed and started again with the same
//! arguments it continues the sessions from the state files, under a newer
//! epoch that fences any older master still alive.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use volmig_master::{
    ClientTls, DriverConfig, FileStore, GrpcSlave, Job, Member, MultiAttach, SessionConfig,
    SessionRecord, SessionStore, Slots, Supervisor,
};
use volmig_node_agent::session::Phase;
use volmig_node_agent::units::human_bytes;

/// How to reach the agent.
#[derive(Clone)]
pub struct AgentAddr {
    pub url: String,
    /// Directory with ca.pem, master.pem, master-key.pem (`volmig certs`).
    pub tls_dir: Option<PathBuf>,
    pub domain: String,
    pub insecure: bool,
}

impl AgentAddr {
    pub fn slave(&self) -> anyhow::Result<GrpcSlave> {
        let tls = match (&self.tls_dir, self.insecure) {
            // The agent's local socket: its file permissions stand in for TLS.
            (None, _) if self.url.starts_with("unix://") => None,
            (Some(d), false) => Some(ClientTls {
                ca: d.join("ca.pem"),
                cert: d.join("master.pem"),
                key: d.join("master-key.pem"),
                domain: self.domain.clone(),
            }),
            (None, true) => None,
            _ => bail!(
                "give --tls-dir (mutual TLS, see `volmig certs`) or --insecure, or reach the agent on its local socket (unix:///run/volmig/agent.sock)"
            ),
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

/// One volume to migrate, and the agent that serves it.
pub struct VolumeSpec {
    pub volume: String,
    pub target: PathBuf,
    /// The agent that copies.
    pub agent: AgentAddr,
    /// Multi-attach: other agents serving the same volume.
    pub shared_with: Vec<AgentAddr>,
}

impl VolumeSpec {
    fn slave(&self) -> anyhow::Result<MultiAttach<GrpcSlave>> {
        let others = self
            .shared_with
            .iter()
            .map(|a| Ok((a.url.clone(), a.slave()?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(MultiAttach::new(self.agent.slave()?, others))
    }

    fn shared_urls(&self) -> Vec<String> {
        self.shared_with.iter().map(|a| a.url.clone()).collect()
    }
}

/// Reads `VOLUME=TARGET`, `VOLUME=TARGET@AGENT_URL` or, for a multi-attach
/// volume, `VOLUME=TARGET@URL1,URL2,...` (the first agent copies); the
/// agent defaults to `default` (the same TLS settings apply to every
/// agent).
pub fn parse_volume_spec(spec: &str, default: &AgentAddr) -> anyhow::Result<VolumeSpec> {
    let Some((volume, rest)) = spec.split_once('=') else {
        bail!("--volume {spec:?}: expected VOLUME=TARGET or VOLUME=TARGET@AGENT_URL");
    };
    let (target, agents) = match rest.rsplit_once('@') {
        Some((t, a))
            if a.starts_with("http://")
                || a.starts_with("https://")
                || a.starts_with("unix://") =>
        {
            (t, a.split(',').collect::<Vec<_>>())
        }
        _ => (rest, Vec::new()),
    };
    if agents.iter().any(|a| a.is_empty()) {
        bail!("--volume {spec:?}: an empty agent address");
    }
    if volume.is_empty() || target.is_empty() {
        bail!("--volume {spec:?}: the volume and the target must not be empty");
    }
    let at = |url: &str| AgentAddr {
        url: url.to_string(),
        ..default.clone()
    };
    Ok(VolumeSpec {
        volume: volume.to_string(),
        target: target.into(),
        agent: agents
            .first()
            .map(|u| at(u))
            .unwrap_or_else(|| default.clone()),
        shared_with: agents.iter().skip(1).map(|u| at(u)).collect(),
    })
}

/// How several volumes are driven.
pub struct Plan {
    /// Cut all volumes over together as this consistency group.
    pub group: Option<String>,
    /// Sessions driven at once per state directory (0 = no limit); the
    /// others queue. A group takes one slot.
    pub max_concurrent: usize,
    /// Copy bandwidth shared fairly by this master's sessions (0 = none).
    pub total_bandwidth: u64,
}

/// The epoch for this run: one above any unfinished record's (a restarted
/// master fences the one before it), and refuses a changed target.
async fn epoch_for(store: &FileStore, volumes: &[VolumeSpec]) -> anyhow::Result<u64> {
    let mut epoch = 1;
    for v in volumes {
        if let Some(rec) = store.load(&v.volume).await?
            && !rec.phase.is_terminal()
        {
            if rec.shared_with != v.shared_urls() {
                bail!(
                    "volume {} has an unfinished session {} shared with [{}]; continue it with the same agents (an agent added mid-session has not tracked its writes), or `volmig abort` it",
                    v.volume,
                    rec.session,
                    rec.shared_with.join(", ")
                );
            }
            if rec.target != v.target {
                bail!(
                    "volume {} has an unfinished session {} to {}; continue it with that target, or `volmig abort` it",
                    v.volume,
                    rec.session,
                    rec.target.display()
                );
            }
            println!(
                "continuing session {} of {} at phase {} (epoch {})",
                rec.session,
                v.volume,
                rec.phase,
                rec.epoch + 1
            );
            epoch = epoch.max(rec.epoch + 1);
        }
    }
    Ok(epoch)
}

/// Runs (or continues) the sessions of `volumes` to their end: one
/// consistency group, or independent sessions under the concurrency limit.
pub async fn migrate(
    state_dir: &Path,
    volumes: Vec<VolumeSpec>,
    plan: Plan,
    config: SessionConfig,
    quiet: bool,
) -> anyhow::Result<()> {
    let store = store(state_dir)?;
    let mut seen = std::collections::HashSet::new();
    for v in &volumes {
        if !seen.insert(v.volume.clone()) {
            bail!("volume {} is given twice", v.volume);
        }
    }
    let epoch = epoch_for(&store, &volumes).await?;
    let fresh: Vec<&VolumeSpec> = {
        let mut f = Vec::new();
        for v in &volumes {
            match store.load(&v.volume).await? {
                Some(rec) if !rec.phase.is_terminal() => {
                    if rec.group != plan.group {
                        bail!(
                            "volume {} has an unfinished session {} ({}); run it with the same grouping",
                            v.volume,
                            rec.session,
                            rec.group
                                .as_ref()
                                .map(|g| format!("in group {g}"))
                                .unwrap_or_else(|| "not in a group".into())
                        );
                    }
                }
                _ => f.push(v),
            }
        }
        f
    };
    if let Some(g) = &plan.group
        && !fresh.is_empty()
        && fresh.len() != volumes.len()
    {
        bail!(
            "group {g}: some volumes have an unfinished session and some do not; abort the group first"
        );
    }
    let mut members = Vec::new();
    for v in &volumes {
        members.push(Member {
            volume: v.volume.clone(),
            target: v.target.clone(),
            agent: v.agent.url.clone(),
            shared_with: v.shared_urls(),
            slave: v.slave()?,
        });
    }
    if let Some(g) = &plan.group {
        if !fresh.is_empty() {
            volmig_master::create_group(&store, g, &members, &config, epoch).await?;
            println!("group {g} started with {} volumes", members.len());
        }
    } else {
        for v in fresh {
            let mut rec =
                volmig_master::create_session(&store, &v.volume, &v.target, config.clone(), epoch)
                    .await?;
            rec.agent = v.agent.url.clone();
            rec.shared_with = v.shared_urls();
            store.save(&v.volume, &mut rec).await?;
            println!("session {} started", rec.session);
        }
    }

    let cfg = DriverConfig {
        epoch,
        ..DriverConfig::default()
    };
    let bars = MultiProgress::with_draw_target(if quiet {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    });
    let watch = show_progress(&bars, store.clone(), &volumes);
    let supervisor = Arc::new(Supervisor::new(
        Slots::in_dir(state_dir, plan.max_concurrent)?,
        plan.total_bandwidth,
    ));
    let keys = start_jobs(&supervisor, plan.group.as_deref(), members, &store, &cfg);
    let interrupted = Arc::new(AtomicBool::new(false));
    let ctrl_c = stop_on_ctrl_c(supervisor.clone(), interrupted.clone());
    let mut results: Vec<volmig_master::Result<SessionRecord>> = Vec::new();
    for k in &keys {
        results.extend(supervisor.wait(k).await.unwrap_or_default());
    }
    watch.abort();
    ctrl_c.abort();
    bars.clear().ok();
    let mut failed = Vec::new();
    let mut unfinished = false;
    for (v, r) in volumes.iter().zip(results.iter()) {
        match r {
            Ok(rec) => {
                print_record(rec);
                unfinished |= !rec.phase.is_terminal();
                if rec.phase != Phase::Completed {
                    // The session's own error says why (the record above
                    // says it too, on stdout).
                    failed.push(match &rec.error {
                        Some(e) => format!("{} {}: {e}", v.volume, rec.phase),
                        None => format!("{} {}", v.volume, rec.phase),
                    });
                }
            }
            Err(e) => failed.push(format!("{}: {e}", v.volume)),
        }
    }
    if interrupted.load(Ordering::SeqCst) || unfinished {
        bail!(
            "stopped before the end ({}); run the same command again to continue",
            failed.join(", ")
        );
    }
    if !failed.is_empty() {
        bail!("migration did not complete: {}", failed.join("; "));
    }
    Ok(())
}

/// Starts one job per session, or one for the whole group; returns their
/// keys, whose outcomes come in volume order.
fn start_jobs(
    supervisor: &Supervisor,
    group: Option<&str>,
    members: Vec<Member<MultiAttach<GrpcSlave>>>,
    store: &FileStore,
    cfg: &DriverConfig,
) -> Vec<String> {
    if let Some(g) = group {
        let job = Job::Group {
            name: g.to_string(),
            members,
        };
        supervisor.start(g, job, store.clone(), cfg.clone());
        return vec![g.to_string()];
    }
    members
        .into_iter()
        .map(|m| {
            let job = Job::Session {
                volume: m.volume.clone(),
                slave: m.slave,
            };
            supervisor.start(&m.volume, job, store.clone(), cfg.clone());
            m.volume
        })
        .collect()
}

/// On Ctrl-C, stops every driver between steps; the sessions stay where
/// they are.
fn stop_on_ctrl_c(
    supervisor: Arc<Supervisor>,
    interrupted: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!(
                "stopping the master; the sessions stay where they are (run the same command to continue, or `volmig abort`)"
            );
            interrupted.store(true, Ordering::SeqCst);
            supervisor.stop_all(Duration::from_secs(30)).await;
        }
    })
}

/// One progress bar per volume, following its record.
fn show_progress(
    bars: &MultiProgress,
    store: FileStore,
    volumes: &[VolumeSpec],
) -> tokio::task::JoinHandle<()> {
    let names: Vec<String> = volumes.iter().map(|v| v.volume.clone()).collect();
    let list: Vec<ProgressBar> = names
        .iter()
        .map(|_| bars.add(ProgressBar::new(0).with_style(bar_style())))
        .collect();
    tokio::spawn(async move {
        loop {
            for (name, bar) in names.iter().zip(&list) {
                if let Ok(Some(r)) = store.load(name).await {
                    bar.set_length(r.size.max(1));
                    bar.set_position(r.bytes_copied.min(r.size));
                    let phase = if r.queued {
                        "queued".to_string()
                    } else {
                        r.phase.to_string()
                    };
                    bar.set_message(format!("{name} {phase}"));
                    bar.set_prefix(human_bytes(r.dirty_bytes as f64));
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{spinner} {msg:<24} [{bar:30}] {bytes}/{total_bytes} copied, dirty {prefix}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ")
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
    println!(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_specs() {
        let d = AgentAddr {
            url: "https://a:1".into(),
            tls_dir: None,
            domain: "localhost".into(),
            insecure: true,
        };
        let v = parse_volume_spec("db=/dev/sdc", &d).unwrap();
        assert_eq!(
            (
                v.volume.as_str(),
                v.target.to_str().unwrap(),
                v.agent.url.as_str()
            ),
            ("db", "/dev/sdc", "https://a:1")
        );
        let v = parse_volume_spec("log=/t/x@y.img@https://b:2", &d).unwrap();
        assert_eq!(
            (v.target.to_str().unwrap(), v.agent.url.as_str()),
            ("/t/x@y.img", "https://b:2")
        );
        let v = parse_volume_spec("log=/t/x@unix:///run/volmig/agent.sock", &d).unwrap();
        assert_eq!(
            (v.target.to_str().unwrap(), v.agent.url.as_str()),
            ("/t/x", "unix:///run/volmig/agent.sock")
        );
        let v = parse_volume_spec("log=/t/x@y.img", &d).unwrap();
        assert_eq!(v.target.to_str().unwrap(), "/t/x@y.img");
        let v =
            parse_volume_spec("rwx=/t/rwx.img@https://a:1,https://b:2,https://c:3", &d).unwrap();
        assert_eq!(v.agent.url, "https://a:1");
        assert_eq!(v.shared_urls(), ["https://b:2", "https://c:3"]);
        assert!(parse_volume_spec("rwx=/t@https://a:1,", &d).is_err());
        assert!(parse_volume_spec("nope", &d).is_err());
        assert!(parse_volume_spec("=/x", &d).is_err());
    }
}
