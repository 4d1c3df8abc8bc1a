//! `volmig serve`, `volmig unserve`, `volmig volumes`: what an agent
//! serves, changed at runtime over its gRPC API (the agent persists it and
//! serves the same volumes after a restart).

use std::path::PathBuf;

use volmig_api::Slave;
use volmig_api::slave::{Frontend, ListVolumes, ServeVolume, UnserveVolume, VolumeInfo};
use volmig_node_agent::units::human_bytes;

use crate::local::AgentAddr;

fn frontends(f: &[Frontend]) -> String {
    if f.is_empty() {
        return "-".into();
    }
    f.iter()
        .map(Frontend::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn device(v: &VolumeInfo) -> String {
    v.device
        .as_ref()
        .map_or_else(|| "-".to_string(), |d| d.display().to_string())
}

fn describe(v: &VolumeInfo) -> String {
    match &v.error {
        Some(e) => format!("{} FAILED: {e}", v.name),
        None => format!(
            "{} ({}) served from {} over {}{}{}",
            v.name,
            human_bytes(v.size as f64),
            v.active.display(),
            frontends(&v.frontends),
            v.device
                .as_ref()
                .map(|d| format!(
                    ", device {} ({})",
                    d.display(),
                    v.device_kind.map(|k| k.to_string()).unwrap_or_default()
                ))
                .unwrap_or_default(),
            v.session
                .as_ref()
                .map(|s| format!(", session {s}"))
                .unwrap_or_default()
        ),
    }
}

pub async fn serve(
    agent: &AgentAddr,
    volume: String,
    backing: PathBuf,
    frontends: Vec<Frontend>,
    direct: bool,
) -> anyhow::Result<()> {
    let v = agent
        .slave()?
        .serve_volume(ServeVolume {
            volume,
            backing,
            frontends,
            direct,
        })
        .await?;
    println!("{}", describe(&v));
    Ok(())
}

pub async fn unserve(agent: &AgentAddr, volume: String) -> anyhow::Result<()> {
    let u = agent
        .slave()?
        .unserve_volume(UnserveVolume {
            volume: volume.clone(),
        })
        .await?;
    if u.was_served {
        println!("{volume} is no longer served");
    } else {
        println!("{volume} was not served (nothing to do)");
    }
    Ok(())
}

pub async fn volumes(agent: &AgentAddr, json: bool) -> anyhow::Result<()> {
    let list = agent.slave()?.list_volumes(ListVolumes).await?.volumes;
    if json {
        let rows: Vec<serde_json::Value> = list
            .iter()
            .map(|v| {
                serde_json::json!({
                    "name": v.name,
                    "size": v.size,
                    "backing": v.backing,
                    "active": v.active,
                    "session": v.session,
                    "frontends": v.frontends.iter().map(Frontend::to_string).collect::<Vec<_>>(),
                    "device": v.device,
                    "device_kind": v.device_kind,
                    "error": v.error,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<20} {:>10} {:<10} {:<12} {:<24} ACTIVE",
        "VOLUME", "SIZE", "FRONTENDS", "DEVICE", "SESSION"
    );
    for v in &list {
        match &v.error {
            Some(e) => println!(
                "{:<20} {:>10} {:<10} {:<12} {:<24} FAILED: {e}",
                v.name,
                "-",
                frontends(&v.frontends),
                device(v),
                "-"
            ),
            None => println!(
                "{:<20} {:>10} {:<10} {:<12} {:<24} {}",
                v.name,
                human_bytes(v.size as f64),
                frontends(&v.frontends),
                device(v),
                v.session.as_deref().unwrap_or("-"),
                v.active.display()
            ),
        }
    }
    Ok(())
}
