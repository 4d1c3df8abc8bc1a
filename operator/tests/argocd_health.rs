#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! docs/argocd-health.lua, Argo CD's health check for VolumeMigrations, run
//! by a real Lua (Debian's `lua5.4`) over the statuses the operator writes
//! (made by the operator's own status functions): Progressing while it
//! waits or runs, Healthy once Completed, Degraded once Failed or Aborted.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use volmig_api::crd::{MigrationPhase, VolumeMigrationStatus};
use volmig_operator::reconcile::status::{mark_failed_before_start, mark_pending};
use volmig_operator::status_map::{end_conditions, session_conditions};
use volmig_testkit::require_bin;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/argocd-health.lua")
}

/// A JSON value as a Lua table constructor (null: nil, as Argo CD's
/// conversion does).
fn lua(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let mut out = String::from("\"");
            for c in s.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    c if (c as u32) < 0x20 => out.push_str(&format!("\\{}", c as u32)),
                    c => out.push(c),
                }
            }
            out.push('"');
            out
        }
        Value::Array(a) => format!("{{{}}}", a.iter().map(lua).collect::<Vec<_>>().join(", ")),
        Value::Object(o) => format!(
            "{{{}}}",
            o.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| format!("[{}] = {}", lua(&Value::String(k.clone())), lua(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// What the health check says of `obj`: (status, message).
fn health(obj: &Value) -> (String, String) {
    let bin = require_bin("lua5.4", "lua5.4");
    let program = format!(
        "obj = {}\nlocal hs = dofile({})\nio.write(hs.status, \"\\n\", hs.message or \"\", \"\\n\")\n",
        lua(obj),
        lua(&Value::String(script().display().to_string()))
    );
    let mut child = Command::new(bin)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(program.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "lua failed: {}\n{program}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = stdout.lines();
    (
        lines.next().unwrap_or_default().to_string(),
        lines.next().unwrap_or_default().to_string(),
    )
}

/// A migration of generation 1 with `status` (None: no status yet).
fn migration(status: Option<VolumeMigrationStatus>) -> Value {
    let mut v = json!({
        "apiVersion": "volmig.io/v1alpha1",
        "kind": "VolumeMigration",
        "metadata": {"name": "m", "namespace": "db", "generation": 1},
        "spec": {"volumes": [{"source": {"persistentVolumeClaim": "data"},
                               "target": {"storageClassName": "fast"}}]},
    });
    if let Some(s) = status {
        v["status"] = serde_json::to_value(s).unwrap();
    }
    v
}

/// The status a driver's save writes in `phase`.
fn session(phase: MigrationPhase, error: Option<&str>) -> VolumeMigrationStatus {
    let mut s = VolumeMigrationStatus {
        phase,
        observed_generation: Some(1),
        session_id: Some("db/m".into()),
        progress: Some("40%".into()),
        cutover_stall: (phase == MigrationPhase::Completed).then(|| "12.000ms".into()),
        error: error.map(str::to_string),
        ..Default::default()
    };
    session_conditions(&mut s, Some(1), 1_000);
    s
}

/// What the reconciler writes while it waits (`update_status` adds the
/// end conditions to every write).
fn waiting(reason: &str, message: &str) -> VolumeMigrationStatus {
    let mut s = VolumeMigrationStatus::default();
    mark_pending(&mut s, Some(1), reason, message);
    s.observed_generation = Some(1);
    end_conditions(&mut s, Some(1), 1_000);
    s
}

fn assert_health(obj: &Value, status: &str, message_has: &str) {
    let (got, message) = health(obj);
    assert_eq!(got, status, "{message}\n{obj}");
    assert!(
        message.contains(message_has),
        "{message:?} lacks {message_has:?}"
    );
}

#[test]
fn waiting_and_running_migrations_are_progressing() {
    assert_health(&migration(None), "Progressing", "operator");
    assert_health(
        &migration(Some(waiting(
            "VolumeNotServed",
            "no agent on n1 serves pv-data",
        ))),
        "Progressing",
        "VolumeNotServed: no agent on n1 serves pv-data",
    );
    for phase in [
        MigrationPhase::Activating,
        MigrationPhase::Copying,
        MigrationPhase::Refreshing,
        MigrationPhase::Quiescing,
        MigrationPhase::Redirecting,
        MigrationPhase::Terminating,
    ] {
        assert_health(
            &migration(Some(session(phase, None))),
            "Progressing",
            &format!("{phase}: 40% copied"),
        );
    }
}

#[test]
fn a_completed_migration_is_healthy() {
    assert_health(
        &migration(Some(session(MigrationPhase::Completed, None))),
        "Healthy",
        "the workload runs on the target",
    );
}

#[test]
fn failed_and_aborted_migrations_are_degraded() {
    assert_health(
        &migration(Some(session(
            MigrationPhase::Failed,
            Some("Copying: EIO on the target"),
        ))),
        "Degraded",
        "EIO on the target",
    );
    assert_health(
        &migration(Some(session(MigrationPhase::Aborted, None))),
        "Degraded",
        "Aborted",
    );
    // An invalid spec fails before any session.
    let mut s = VolumeMigrationStatus::default();
    mark_failed_before_start(&mut s, Some(1), "InvalidSpec", "invalid spec: syncGoal");
    s.observed_generation = Some(1);
    end_conditions(&mut s, Some(1), 1_000);
    assert_health(&migration(Some(s)), "Degraded", "invalid spec");
}

#[test]
fn a_status_older_than_the_spec_is_progressing() {
    let mut obj = migration(Some(session(MigrationPhase::Completed, None)));
    obj["metadata"]["generation"] = json!(2);
    assert_health(&obj, "Progressing", "latest spec");
}
