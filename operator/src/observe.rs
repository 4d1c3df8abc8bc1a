//! Turns session saves into Kubernetes Events (every phase change, every
//! failure) and metrics.

use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};
use tokio::sync::mpsc;
use tracing::{info, warn};
use volmig_api::crd::{API_VERSION, KIND};
use volmig_api::phase::Phase;

use crate::metrics::Metrics;
use crate::status_store::Saved;

/// The Event a save deserves, if any: (type, reason, note).
pub fn event_for(s: &Saved) -> Option<(EventType, String, String)> {
    let r = &s.record;
    let changed = s.before != Some(r.phase);
    if !changed {
        return None;
    }
    let from = s
        .before
        .map(|p| p.to_string())
        .unwrap_or_else(|| "Pending".into());
    Some(match r.phase {
        Phase::Failed => (
            EventType::Warning,
            "MigrationFailed".into(),
            format!(
                "{from} -> Failed: {}; the workload runs on a complete device",
                r.error.as_deref().unwrap_or("unknown error")
            ),
        ),
        Phase::Completed => (
            EventType::Normal,
            "Completed".into(),
            format!(
                "the workload runs on the target{}",
                r.cutover_stall_ms
                    .map(|s| format!("; cutover stall {s:.3} ms"))
                    .unwrap_or_default()
            ),
        ),
        p => (
            EventType::Normal,
            p.to_string(),
            format!("{from} -> {p} (volume {}, session {})", r.volume, r.session),
        ),
    })
}

/// The migration a save belongs to, as its Events name it: with its uid,
/// which `kubectl describe` selects Events by.
pub fn reference(s: &Saved) -> ObjectReference {
    ObjectReference {
        api_version: Some(API_VERSION.into()),
        kind: Some(KIND.into()),
        name: Some(s.name.clone()),
        namespace: Some(s.namespace.clone()),
        uid: s.uid.clone(),
        ..ObjectReference::default()
    }
}

/// Consumes saves until the channel closes.
pub async fn run(
    mut rx: mpsc::UnboundedReceiver<Saved>,
    recorder: Recorder,
    metrics: Arc<Metrics>,
) {
    while let Some(s) = rx.recv().await {
        metrics.observe(&s);
        let Some((type_, reason, note)) = event_for(&s) else {
            continue;
        };
        info!(migration = %format!("{}/{}", s.namespace, s.name), session = %s.record.session,
              volume = %s.record.volume, phase = %s.record.phase, "{note}");
        let reference = reference(&s);
        let ev = Event {
            type_,
            reason,
            note: Some(note),
            action: "Migrate".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&ev, &reference).await {
            warn!(error = %e, "publishing an event failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use volmig_master::{SessionConfig, SessionRecord};

    fn saved(before: Option<Phase>, phase: Phase, error: Option<&str>) -> Saved {
        let mut record = SessionRecord::new(
            "pv-1",
            Path::new(""),
            Path::new("/t"),
            1,
            SessionConfig::default(),
        );
        record.phase = phase;
        record.error = error.map(str::to_string);
        Saved {
            namespace: "db".into(),
            name: "m".into(),
            uid: Some("u-1".into()),
            before,
            record,
        }
    }

    #[test]
    fn every_phase_change_and_failure_is_an_event() {
        let (t, reason, note) = event_for(&saved(None, Phase::Activating, None)).unwrap();
        assert_eq!((t, reason.as_str()), (EventType::Normal, "Activating"));
        assert!(note.starts_with("Pending -> Activating"), "{note}");
        assert!(
            event_for(&saved(Some(Phase::Copying), Phase::Copying, None)).is_none(),
            "progress is no event"
        );
        let (t, reason, note) = event_for(&saved(
            Some(Phase::Copying),
            Phase::Failed,
            Some("Copying: failed: EIO"),
        ))
        .unwrap();
        assert_eq!(
            (t, reason.as_str()),
            (EventType::Warning, "MigrationFailed")
        );
        assert!(note.contains("EIO"), "{note}");
        let (_, reason, _) =
            event_for(&saved(Some(Phase::Terminating), Phase::Completed, None)).unwrap();
        assert_eq!(reason, "Completed");
    }

    #[test]
    fn events_name_the_migration_by_uid() {
        let r = reference(&saved(None, Phase::Activating, None));
        assert_eq!(r.uid.as_deref(), Some("u-1"));
        assert_eq!(
            (r.kind.as_deref(), r.name.as_deref(), r.namespace.as_deref()),
            (Some(KIND), Some("m"), Some("db"))
        );
    }
}
