//! `/metrics` (Prometheus, OpenMetrics text): bytes copied and dirty per
//! volume, phase durations, the cutover stall, sessions by phase. Fed by the
//! CR-status store's saves.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use volmig_api::phase::Phase;

use crate::status_store::Saved;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VolumeLabels {
    pub namespace: String,
    pub name: String,
    pub volume: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MigrationLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

pub struct Metrics {
    registry: Registry,
    bytes_copied: Family<VolumeLabels, Gauge>,
    dirty_bytes: Family<VolumeLabels, Gauge>,
    phase_seconds: Family<PhaseLabels, Histogram>,
    stall_seconds: Family<MigrationLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    sessions: Family<PhaseLabels, Gauge>,
    reconcile_errors: Counter,
    /// Each migration's phase, for `sessions`.
    phases: Mutex<HashMap<(String, String), Phase>>,
}

fn phase_hist() -> Histogram {
    // 10 ms .. ~1.5 days
    Histogram::new(exponential_buckets(0.01, 4.0, 12))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("volmig");
        let bytes_copied = Family::<VolumeLabels, Gauge>::default();
        let dirty_bytes = Family::<VolumeLabels, Gauge>::default();
        let phase_seconds =
            Family::<PhaseLabels, Histogram>::new_with_constructor(phase_hist as fn() -> Histogram);
        let stall_seconds = Family::default();
        let sessions = Family::<PhaseLabels, Gauge>::default();
        let reconcile_errors = Counter::default();
        registry.register(
            "bytes_copied",
            "Bytes copied to the target so far, per volume",
            bytes_copied.clone(),
        );
        registry.register(
            "dirty_bytes",
            "Bytes written since they were last copied, per volume",
            dirty_bytes.clone(),
        );
        registry.register(
            "phase_duration_seconds",
            "How long sessions spent in each phase",
            phase_seconds.clone(),
        );
        registry.register(
            "cutover_stall_seconds",
            "Measured I/O stall at cutover, per migration",
            stall_seconds.clone(),
        );
        registry.register(
            "sessions",
            "Migrations this operator knows, by phase",
            sessions.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed (and were retried)",
            reconcile_errors.clone(),
        );
        for p in Phase::ALL {
            sessions
                .get_or_create(&PhaseLabels {
                    phase: p.to_string(),
                })
                .set(0);
        }
        Self {
            registry,
            bytes_copied,
            dirty_bytes,
            phase_seconds,
            stall_seconds,
            sessions,
            reconcile_errors,
            phases: Mutex::default(),
        }
    }
}

fn g(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Metrics {
    /// Takes in a saved record.
    pub fn observe(&self, s: &Saved) {
        let r = &s.record;
        let vl = VolumeLabels {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
            volume: r.volume.clone(),
        };
        self.bytes_copied.get_or_create(&vl).set(g(r.bytes_copied));
        self.dirty_bytes.get_or_create(&vl).set(g(r.dirty_bytes));
        if let Some(ms) = r.cutover_stall_ms {
            self.stall_seconds
                .get_or_create(&MigrationLabels {
                    namespace: s.namespace.clone(),
                    name: s.name.clone(),
                })
                .set(ms / 1e3);
        }
        if s.before.is_some_and(|b| b != r.phase) {
            // the phase that just ended is the last closed one
            if let Some(pt) = r.phase_times.iter().rev().find(|p| p.end_ms.is_some())
                && let Some(end) = pt.end_ms
            {
                self.phase_seconds
                    .get_or_create(&PhaseLabels {
                        phase: pt.phase.to_string(),
                    })
                    .observe(end.saturating_sub(pt.start_ms) as f64 / 1e3);
            }
        }
        let mut phases = self.phases.lock().unwrap_or_else(|p| p.into_inner());
        phases.insert((s.namespace.clone(), s.name.clone()), r.phase);
        self.publish_sessions(&phases);
    }

    /// Forgets a deleted migration.
    pub fn forget(&self, namespace: &str, name: &str) {
        let mut phases = self.phases.lock().unwrap_or_else(|p| p.into_inner());
        phases.remove(&(namespace.to_string(), name.to_string()));
        self.publish_sessions(&phases);
    }

    /// Sets the sessions-by-phase gauges from `phases` (every phase, so a
    /// phase nobody is in any more reads 0).
    fn publish_sessions(&self, phases: &HashMap<(String, String), Phase>) {
        for p in Phase::ALL {
            let n = phases.values().filter(|x| **x == p).count();
            self.sessions
                .get_or_create(&PhaseLabels {
                    phase: p.to_string(),
                })
                .set(n as i64);
        }
    }

    pub fn reconcile_failed(&self) {
        self.reconcile_errors.inc();
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use volmig_master::{SessionConfig, SessionRecord};

    #[test]
    fn saves_become_metrics() {
        let m = Metrics::default();
        let mut r = SessionRecord::new(
            "pv-1",
            Path::new(""),
            Path::new("/t"),
            100,
            SessionConfig::default(),
        );
        r.bytes_copied = 4096;
        r.dirty_bytes = 512;
        r.phase_times[0].start_ms = 1000;
        r.enter(Phase::Copying);
        r.phase_times[0].end_ms = Some(3500);
        r.cutover_stall_ms = Some(12.5);
        m.observe(&Saved {
            namespace: "db".into(),
            name: "m".into(),
            uid: None,
            before: Some(Phase::Activating),
            record: r,
        });
        let text = m.encode();
        assert!(
            text.contains(r#"volmig_bytes_copied{namespace="db",name="m",volume="pv-1"} 4096"#),
            "{text}"
        );
        assert!(
            text.contains(r#"volmig_dirty_bytes{namespace="db",name="m",volume="pv-1"} 512"#),
            "{text}"
        );
        assert!(
            text.contains(r#"volmig_phase_duration_seconds_sum{phase="Activating"} 2.5"#),
            "{text}"
        );
        assert!(
            text.contains(r#"volmig_cutover_stall_seconds{namespace="db",name="m"} 0.0125"#),
            "{text}"
        );
        assert!(
            text.contains(r#"volmig_sessions{phase="Copying"} 1"#),
            "{text}"
        );
        m.forget("db", "m");
        assert!(m.encode().contains(r#"volmig_sessions{phase="Copying"} 0"#));
    }
}
