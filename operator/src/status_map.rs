//! The session record (`volmig_master::SessionRecord`) as the
//! VolumeMigration status and back: pure functions. A record lives in its
//! volume's `status.volumes[i]` (found by the volume's name on the agent,
//! the source PV's name, which is the record's key): paths, sizes, counters
//! and progress flags as fields of the entry, the session's id, phase,
//! epoch, timeline, stall, error and settings in its `session`. The
//! top-level fields sum the volumes up (one volume: the same values; a
//! consistency group: the least advanced phase, the largest stall...).
//!
//! Lossless for what the driver needs, with two roundings people never
//! notice: rates are whole bytes per second, the stall whole microseconds.

use std::path::PathBuf;

use k8s_openapi::jiff::Timestamp;
use volmig_api::crd::{
    Condition, ConditionStatus, MigrationPhase, PhaseTimeStatus, SessionConfigStatus, VerifySpec,
    VolumeMigrationStatus, VolumeSessionStatus, VolumeStatus, condition,
};
use volmig_api::phase::{Phase, Progress};
use volmig_master::{PhaseTime, SessionConfig, SessionRecord, Verify};

/// Why a status cannot be read as a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("status of the session is unreadable: {0}")]
pub struct MapError(pub String);

fn i(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn u(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// Milliseconds since the Unix epoch as RFC 3339 with milliseconds.
pub fn format_ms(ms: u64) -> String {
    match Timestamp::from_millisecond(i(ms)) {
        Ok(t) => t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        Err(_) => "1970-01-01T00:00:00.000Z".into(),
    }
}

pub fn parse_ms(s: &str) -> Result<u64, MapError> {
    let t: Timestamp = s
        .parse()
        .map_err(|e| MapError(format!("time {s:?}: {e}")))?;
    Ok(u(t.as_millisecond()))
}

/// `12.345ms`: the stall in whole microseconds.
pub fn format_stall(ms: f64) -> String {
    let us = (ms * 1e3).round().max(0.0) as u64;
    format!("{}.{:03}ms", us / 1000, us % 1000)
}

pub fn parse_stall(s: &str) -> Result<f64, MapError> {
    let bad = || MapError(format!("stall {s:?} is not <ms>.<µs>ms"));
    let (whole, frac) = s
        .strip_suffix("ms")
        .and_then(|n| n.split_once('.'))
        .ok_or_else(bad)?;
    let whole: u64 = whole.parse().map_err(|_| bad())?;
    if frac.len() != 3 {
        return Err(bad());
    }
    let frac: u64 = frac.parse().map_err(|_| bad())?;
    Ok((whole * 1000 + frac) as f64 / 1e3)
}

fn verify_to(v: Verify) -> VerifySpec {
    match v {
        Verify::None => VerifySpec::None,
        Verify::Sample => VerifySpec::Sample,
        Verify::Full => VerifySpec::Full,
    }
}

pub fn verify_from(v: VerifySpec) -> Verify {
    match v {
        VerifySpec::None => Verify::None,
        VerifySpec::Sample => Verify::Sample,
        VerifySpec::Full => Verify::Full,
    }
}

fn config_to(c: &SessionConfig) -> SessionConfigStatus {
    SessionConfigStatus {
        copy_mode: c.mode.into(),
        sync_goal_ms: i(c.sync_goal_ms),
        bandwidth: i(c.bandwidth),
        grain: i(c.grain),
        chunk_size: i(c.chunk_size),
        in_flight: i(c.in_flight as u64),
        sparse: c.sparse,
        verify: verify_to(c.verify),
        failback_window_ms: i(c.failback_window_ms),
        max_passes: c.max_passes as i64,
    }
}

fn config_from(c: &SessionConfigStatus) -> SessionConfig {
    SessionConfig {
        mode: c.copy_mode.into(),
        sync_goal_ms: u(c.sync_goal_ms),
        bandwidth: u(c.bandwidth),
        grain: u(c.grain),
        chunk_size: u(c.chunk_size),
        in_flight: u(c.in_flight) as usize,
        sparse: c.sparse,
        verify: verify_from(c.verify),
        failback_window_ms: u(c.failback_window_ms),
        max_passes: u32::try_from(c.max_passes).unwrap_or(u32::MAX),
    }
}

/// Whether the status holds a session record for `key`.
pub fn has_record(status: &VolumeMigrationStatus, key: &str) -> bool {
    status
        .volumes
        .iter()
        .any(|v| v.volume == key && v.session.is_some())
}

/// The record revision of `key` in `status`, without the generation.
pub fn volume_revision(status: &VolumeMigrationStatus, key: &str) -> u64 {
    status
        .volumes
        .iter()
        .find(|v| v.volume == key)
        .and_then(|v| v.session.as_ref())
        .map(|s| u(s.revision))
        .unwrap_or(0)
}

fn phase_times_to(rec: &SessionRecord) -> Vec<PhaseTimeStatus> {
    rec.phase_times
        .iter()
        .map(|p| PhaseTimeStatus {
            phase: p.phase.into(),
            start: format_ms(p.start_ms),
            end: p.end_ms.map(format_ms),
        })
        .collect()
}

/// Writes `rec` into its volume's entry of `status` (created if missing)
/// and sums the volumes up at the top. Leaves what the record does not own
/// (conditions, claim names, node, holder pod) alone; the volume's record
/// revision is the store's business.
pub fn write_record(status: &mut VolumeMigrationStatus, rec: &SessionRecord) {
    let idx = match status.volumes.iter().position(|v| v.volume == rec.volume) {
        Some(i) => i,
        None => {
            status.volumes.push(VolumeStatus {
                volume: rec.volume.clone(),
                ..VolumeStatus::default()
            });
            status.volumes.len() - 1
        }
    };
    let v = &mut status.volumes[idx];
    let revision = v.session.as_ref().map(|s| s.revision).unwrap_or(0);
    v.session = Some(VolumeSessionStatus {
        id: rec.session.clone(),
        phase: rec.phase.into(),
        epoch: i(rec.epoch),
        revision,
        abort_requested: rec.abort_requested,
        group: rec.group.clone(),
        queued: rec.queued,
        cutover_stall: rec.cutover_stall_ms.map(format_stall),
        error: rec.error.clone(),
        config: Some(config_to(&rec.config)),
        phase_times: phase_times_to(rec),
    });
    let path = |p: &PathBuf| (!p.as_os_str().is_empty()).then(|| p.display().to_string());
    // The reconciler records the agent it found; a record without one keeps it.
    if !rec.agent.is_empty() {
        v.agent = Some(rec.agent.clone());
    }
    v.source_path = path(&rec.source);
    v.target_path = path(&rec.target);
    v.bytes_total = i(rec.size);
    v.bytes_copied = i(rec.bytes_copied);
    v.dirty_bytes = i(rec.dirty_bytes);
    v.passes = rec.progress.passes as i64;
    v.stalled_passes = rec.progress.stalled_passes as i64;
    v.last_dirty = rec.progress.last_dirty.map(i);
    v.mirror = rec.progress.mirror;
    v.converged = rec.progress.converged;
    v.redirected = rec.redirected;
    v.write_rate = rec.write_rate.round() as i64;
    v.copy_rate = rec.copy_rate.round() as i64;
    v.resumes = rec.resumes as i64;
    v.verified = rec.verified;
    summarize(status);
}

fn order(p: MigrationPhase) -> usize {
    [
        MigrationPhase::Pending,
        MigrationPhase::Activating,
        MigrationPhase::Copying,
        MigrationPhase::Refreshing,
        MigrationPhase::Quiescing,
        MigrationPhase::Synchronizing,
        MigrationPhase::Redirecting,
        MigrationPhase::Resuming,
        MigrationPhase::Terminating,
    ]
    .iter()
    .position(|x| *x == p)
    .unwrap_or(usize::MAX)
}

/// The migration's phase from its volumes' sessions: the least advanced
/// running one; once all ended, Completed if all completed, else Failed if
/// any failed, else Aborted.
pub fn overall_phase(phases: &[MigrationPhase]) -> MigrationPhase {
    if let Some(p) = phases
        .iter()
        .filter(|p| !p.is_terminal())
        .min_by_key(|p| order(**p))
    {
        return *p;
    }
    if phases.is_empty() {
        MigrationPhase::Pending
    } else if phases.iter().all(|p| *p == MigrationPhase::Completed) {
        MigrationPhase::Completed
    } else if phases.contains(&MigrationPhase::Failed) {
        MigrationPhase::Failed
    } else {
        MigrationPhase::Aborted
    }
}

/// The top-level fields from the volumes' sessions (what `kubectl get`,
/// the conditions and people read).
pub fn summarize(status: &mut VolumeMigrationStatus) {
    let sessions: Vec<VolumeSessionStatus> = status
        .volumes
        .iter()
        .filter_map(|v| v.session.clone())
        .collect();
    let Some(first) = sessions.first() else {
        return;
    };
    status.session_id = Some(first.group.clone().unwrap_or_else(|| first.id.clone()));
    status.phase = overall_phase(&sessions.iter().map(|s| s.phase).collect::<Vec<_>>());
    status.epoch = sessions.iter().map(|s| s.epoch).max().unwrap_or(0);
    status.abort_requested = sessions.iter().any(|s| s.abort_requested);
    status.group = first.group.clone();
    status.queued = sessions.iter().any(|s| s.queued);
    status.cutover_stall = sessions
        .iter()
        .filter_map(|s| s.cutover_stall.clone())
        .max_by(|a, b| {
            let (x, y) = (parse_stall(a).unwrap_or(0.0), parse_stall(b).unwrap_or(0.0));
            x.total_cmp(&y)
        });
    status.error = sessions.iter().find_map(|s| s.error.clone());
    status.config = first.config.clone();
    status.phase_times = first.phase_times.clone();
    status.progress = Some(progress_text(status));
}

/// `42%` of all volumes' bytes.
pub fn progress_text(status: &VolumeMigrationStatus) -> String {
    let total: i64 = status.volumes.iter().map(|v| v.bytes_total).sum();
    let copied: i64 = status
        .volumes
        .iter()
        .map(|v| v.bytes_copied.min(v.bytes_total))
        .sum();
    if status.phase == MigrationPhase::Completed {
        return "100%".into();
    }
    if total <= 0 {
        return "0%".into();
    }
    format!("{}%", (copied as i128 * 100 / total as i128).min(100))
}

/// The record of `key` in `status`, if the status holds one. `revision`
/// is the store's (generation + the volume's record revision).
pub fn read_record(
    status: &VolumeMigrationStatus,
    key: &str,
    revision: u64,
) -> Result<Option<SessionRecord>, MapError> {
    let Some(v) = status.volumes.iter().find(|v| v.volume == key) else {
        return Ok(None);
    };
    let Some(s) = &v.session else {
        return Ok(None);
    };
    let session = s.id.clone();
    let phase = s.phase.session_phase().ok_or_else(|| {
        MapError(format!(
            "session {session} exists but its phase is {}",
            s.phase
        ))
    })?;
    let config = s
        .config
        .as_ref()
        .map(config_from)
        .ok_or_else(|| MapError(format!("session {session} has no settings")))?;
    let phase_times = s
        .phase_times
        .iter()
        .map(|p| {
            Ok(PhaseTime {
                phase: p
                    .phase
                    .session_phase()
                    .ok_or_else(|| MapError("Pending in the phase timeline".into()))?,
                start_ms: parse_ms(&p.start)?,
                end_ms: p.end.as_deref().map(parse_ms).transpose()?,
            })
        })
        .collect::<Result<Vec<_>, MapError>>()?;
    let path = |p: &Option<String>| p.as_deref().map(PathBuf::from).unwrap_or_default();
    Ok(Some(SessionRecord {
        revision,
        epoch: u(s.epoch),
        session,
        volume: key.to_string(),
        agent: v.agent.clone().unwrap_or_default(),
        source: path(&v.source_path),
        target: path(&v.target_path),
        size: u(v.bytes_total),
        config,
        phase,
        progress: Progress {
            passes: u32::try_from(v.passes).unwrap_or(0),
            stalled_passes: u32::try_from(v.stalled_passes).unwrap_or(0),
            last_dirty: v.last_dirty.map(u),
            mirror: v.mirror,
            converged: v.converged,
        },
        redirected: v.redirected,
        abort_requested: s.abort_requested,
        bytes_copied: u(v.bytes_copied),
        copy_rate: v.copy_rate as f64,
        dirty_bytes: u(v.dirty_bytes),
        write_rate: v.write_rate as f64,
        phase_times,
        cutover_stall_ms: s.cutover_stall.as_deref().map(parse_stall).transpose()?,
        resumes: u32::try_from(v.resumes).unwrap_or(0),
        error: s.error.clone(),
        verified: v.verified,
        group: s.group.clone(),
        queued: s.queued,
        // The other nodes of a multi-attach volume (the reconciler records
        // them with their agents before the session starts).
        shared_with: v.shared_with.iter().map(|a| a.node.clone()).collect(),
    }))
}

/// Sets a condition, keeping its transition time when its status stays.
pub fn set_condition(
    conds: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now_ms: u64,
) {
    let st = ConditionStatus::from(status);
    let fresh = Condition {
        type_: type_.to_string(),
        status: st,
        reason: reason.to_string(),
        message: message.to_string(),
        last_transition_time: format_ms(now_ms),
        observed_generation: generation,
    };
    match conds.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            let time = if c.status == st {
                c.last_transition_time.clone()
            } else {
                fresh.last_transition_time.clone()
            };
            *c = Condition {
                last_transition_time: time,
                ..fresh
            };
        }
        None => conds.push(fresh),
    }
}

/// The Ready/Progressing/Degraded conditions a session's phase implies.
pub fn session_conditions(
    status: &mut VolumeMigrationStatus,
    generation: Option<i64>,
    now_ms: u64,
) {
    let phase = status.phase;
    let progress = status.progress.clone().unwrap_or_default();
    let error = status.error.clone().unwrap_or_default();
    let (ready, progressing, degraded) = match phase {
        MigrationPhase::Completed => (
            (
                true,
                "Completed",
                format!(
                    "the workload runs on the target{}",
                    status
                        .cutover_stall
                        .as_ref()
                        .map(|s| format!(" (cutover stall {s})"))
                        .unwrap_or_default()
                ),
            ),
            (false, "Completed", "the migration completed".to_string()),
            (false, "Completed", String::new()),
        ),
        MigrationPhase::Aborted => (
            (
                false,
                "Aborted",
                "rolled back: the workload runs on the source".to_string(),
            ),
            (false, "Aborted", "the migration was aborted".to_string()),
            (false, "Aborted", String::new()),
        ),
        MigrationPhase::Failed => (
            (false, "Failed", format!("the migration failed: {error}")),
            (false, "Failed", "the migration stopped".to_string()),
            (
                true,
                "SessionFailed",
                format!(
                    "{error}; the workload runs on a complete device (the source unless it was already redirected)"
                ),
            ),
        ),
        MigrationPhase::Pending => return end_conditions(status, generation, now_ms),
        p => (
            (false, "InProgress", format!("{p}: {progress} copied")),
            (true, &*p.to_string(), format!("{p}: {progress} copied")),
            (false, "Healthy", String::new()),
        ),
    };
    let c = &mut status.conditions;
    set_condition(c, "Ready", ready.0, ready.1, &ready.2, generation, now_ms);
    set_condition(
        c,
        "Progressing",
        progressing.0,
        progressing.1,
        &progressing.2,
        generation,
        now_ms,
    );
    set_condition(
        c,
        "Degraded",
        degraded.0,
        degraded.1,
        &degraded.2,
        generation,
        now_ms,
    );
    end_conditions(status, generation, now_ms);
}

/// The Job-like pair every status carries: `Complete` True once the
/// migration completed, `Failed` True once it failed or was aborted (the
/// reason says which); both False, with the phase as the reason, before.
/// What `kubectl wait --for=condition=Complete` and Argo CD's health check
/// (docs/argocd-health.lua) read.
pub fn end_conditions(status: &mut VolumeMigrationStatus, generation: Option<i64>, now_ms: u64) {
    let phase = status.phase;
    let reason = phase.to_string();
    let error = status.error.clone().unwrap_or_default();
    let (complete, complete_msg) = match phase {
        MigrationPhase::Completed => (true, "the workload runs on the target".to_string()),
        p if p.is_terminal() => (false, format!("the migration ended {p}")),
        p => (false, format!("{p}: not complete yet")),
    };
    let (failed, failed_msg) = match phase {
        MigrationPhase::Failed => (
            true,
            format!("the migration failed: {error}; the workload runs on a complete device"),
        ),
        MigrationPhase::Aborted => (
            true,
            "the migration was aborted: the workload runs on the source".to_string(),
        ),
        MigrationPhase::Completed => (false, "the migration completed".to_string()),
        p => (false, format!("{p}: not failed")),
    };
    let c = &mut status.conditions;
    set_condition(
        c,
        condition::COMPLETE,
        complete,
        &reason,
        &complete_msg,
        generation,
        now_ms,
    );
    set_condition(
        c,
        condition::FAILED,
        failed,
        &reason,
        &failed_msg,
        generation,
        now_ms,
    );
}

/// Phase of the record as the status shows it.
pub fn phase_of(status: &VolumeMigrationStatus) -> Option<Phase> {
    status.phase.session_phase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::Path;
    use volmig_api::phase::CopyMode;

    fn phase() -> impl Strategy<Value = Phase> {
        proptest::sample::select(Phase::ALL.to_vec())
    }

    prop_compose! {
        fn record()(
            epoch in 0u64..1 << 40,
            phase in phase(),
            size in 0u64..1 << 50,
            copied in 0u64..1 << 50,
            dirty in 0u64..1 << 40,
            passes in 0u32..1000,
            stalled in 0u32..10,
            last_dirty in proptest::option::of(0u64..1 << 40),
            flags in proptest::array::uniform5(any::<bool>()),
            rates in (0u64..1 << 40, 0u64..1 << 40),
            times in proptest::collection::vec((0u64..1 << 42, proptest::option::of(0u64..100_000), phase()), 0..9),
            stall_us in proptest::option::of(0u64..10_000_000),
            resumes in 0u32..100,
            error in proptest::option::of("[a-z :]{0,20}"),
            verified in proptest::option::of(any::<bool>()),
            mode in proptest::sample::select(vec![CopyMode::Background, CopyMode::Mirror, CopyMode::Auto]),
            bw in 0u64..1 << 40,
            verify in proptest::sample::select(vec![Verify::None, Verify::Sample, Verify::Full]),
        ) -> SessionRecord {
            SessionRecord {
                revision: 7,
                epoch,
                session: format!("pv-1-{epoch}"),
                volume: "pv-1".into(),
                agent: if flags[0] { "https://10.0.0.7:7443".into() } else { String::new() },
                source: PathBuf::from("/dev/source"),
                target: if flags[1] { PathBuf::from("/var/lib/kubelet/pods/u/volumeDevices/kubernetes.io~csi/pv-2") } else { PathBuf::new() },
                size,
                config: SessionConfig { mode, bandwidth: bw, verify, sync_goal_ms: 1 + bw % 5000, ..SessionConfig::default() },
                phase,
                progress: Progress { passes, stalled_passes: stalled, last_dirty, mirror: flags[2], converged: flags[3] },
                redirected: flags[4],
                abort_requested: flags[0] && flags[4],
                bytes_copied: copied,
                copy_rate: rates.0 as f64,
                dirty_bytes: dirty,
                write_rate: rates.1 as f64,
                phase_times: times.into_iter().map(|(s, d, p)| PhaseTime { phase: p, start_ms: s, end_ms: d.map(|d| s + d) }).collect(),
                cutover_stall_ms: stall_us.map(|us| us as f64 / 1e3),
                resumes,
                error,
                verified,
                group: flags[3].then(|| "db/pg".to_string()),
                queued: flags[2] && !flags[1],
                shared_with: Vec::new(),
            }
        }
    }

    proptest! {
        #[test]
        fn record_status_record_roundtrip(rec in record()) {
            let mut status = VolumeMigrationStatus {
                volumes: vec![VolumeStatus { source: "data".into(), target: "data-volmig".into(), volume: "other".into(), ..VolumeStatus::default() }],
                ..VolumeMigrationStatus::default()
            };
            write_record(&mut status, &rec);
            // through JSON, as the API server stores it
            let json = serde_json::to_string(&status).unwrap();
            let status: VolumeMigrationStatus = serde_json::from_str(&json).unwrap();
            let back = read_record(&status, "pv-1", rec.revision).unwrap().unwrap();
            prop_assert_eq!(&back, &rec);
            // the other volume's entry is untouched, and has no record of its own
            prop_assert_eq!(status.volumes.len(), 2);
            prop_assert_eq!(&status.volumes[0].source, "data");
            prop_assert!(read_record(&status, "nope", 0).unwrap().is_none());
        }
    }

    #[test]
    fn stall_and_time_formats() {
        assert_eq!(format_stall(12.3456), "12.346ms");
        assert_eq!(parse_stall("12.346ms").unwrap(), 12.346);
        assert!(parse_stall("12ms").is_err() && parse_stall("1.5ms").is_err());
        assert_eq!(format_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(
            parse_ms("2023-11-14T22:13:20.123Z").unwrap(),
            1_700_000_000_123
        );
    }

    #[test]
    fn no_record_without_a_session() {
        let status = VolumeMigrationStatus {
            volumes: vec![VolumeStatus {
                volume: "pv-1".into(),
                ..VolumeStatus::default()
            }],
            ..VolumeMigrationStatus::default()
        };
        assert!(read_record(&status, "pv-1", 0).unwrap().is_none());
        assert!(!has_record(&status, "pv-1"));
        let mut bad = status.clone();
        bad.volumes[0].session = Some(VolumeSessionStatus {
            id: "s".into(),
            ..Default::default()
        });
        assert!(
            read_record(&bad, "pv-1", 0).is_err(),
            "a session in phase Pending is corrupt"
        );
    }

    #[test]
    fn a_group_sums_up_at_the_top() {
        use MigrationPhase::*;
        assert_eq!(overall_phase(&[Copying, Refreshing]), Copying);
        assert_eq!(overall_phase(&[Completed, Terminating]), Terminating);
        assert_eq!(overall_phase(&[Completed, Completed]), Completed);
        assert_eq!(overall_phase(&[Aborted, Failed]), Failed);
        assert_eq!(overall_phase(&[Aborted, Completed]), Aborted);
        assert_eq!(overall_phase(&[]), Pending);
        let mut st = VolumeMigrationStatus::default();
        for (vol, phase, stall, size, copied) in [
            ("a", Phase::Resuming, 3.0, 100, 100),
            ("b", Phase::Redirecting, 7.5, 300, 100),
        ] {
            let mut r = SessionRecord::new(
                vol,
                Path::new("/s"),
                Path::new("/t"),
                size,
                SessionConfig::default(),
            );
            r.group = Some("db/m".into());
            r.enter(phase);
            r.cutover_stall_ms = Some(stall);
            r.bytes_copied = copied;
            r.epoch = if vol == "a" { 3 } else { 4 };
            write_record(&mut st, &r);
        }
        assert_eq!(st.phase, MigrationPhase::Redirecting);
        assert_eq!(st.session_id.as_deref(), Some("db/m"));
        assert_eq!(st.cutover_stall.as_deref(), Some("7.500ms"));
        assert_eq!(st.epoch, 4);
        assert_eq!(st.progress.as_deref(), Some("50%"));
        assert_eq!(
            read_record(&st, "b", 0).unwrap().unwrap().phase,
            Phase::Redirecting
        );
    }

    #[test]
    fn conditions_follow_the_phase_and_keep_transition_times() {
        let mut s = VolumeMigrationStatus {
            phase: MigrationPhase::Copying,
            progress: Some("10%".into()),
            ..Default::default()
        };
        session_conditions(&mut s, Some(1), 1000);
        let get = |s: &VolumeMigrationStatus, t: &str| {
            s.conditions.iter().find(|c| c.type_ == t).cloned().unwrap()
        };
        assert_eq!(get(&s, "Progressing").status, ConditionStatus::True);
        assert_eq!(get(&s, "Progressing").reason, "Copying");
        s.phase = MigrationPhase::Refreshing;
        session_conditions(&mut s, Some(1), 2000);
        assert_eq!(
            get(&s, "Progressing").last_transition_time,
            format_ms(1000),
            "still progressing"
        );
        s.phase = MigrationPhase::Failed;
        s.error = Some("Copying: failed: I/O error".into());
        session_conditions(&mut s, Some(1), 3000);
        let d = get(&s, "Degraded");
        assert_eq!(
            (d.status, d.reason.as_str()),
            (ConditionStatus::True, "SessionFailed")
        );
        assert!(d.message.contains("I/O error"));
        assert_eq!(get(&s, "Progressing").last_transition_time, format_ms(3000));
    }

    #[test]
    fn complete_and_failed_say_how_it_ended_like_a_job() {
        use MigrationPhase::*;
        for (phase, complete, failed) in [
            (Pending, false, false),
            (Copying, false, false),
            (Terminating, false, false),
            (Completed, true, false),
            (Failed, false, true),
            (Aborted, false, true),
        ] {
            let mut s = VolumeMigrationStatus {
                phase,
                ..Default::default()
            };
            session_conditions(&mut s, Some(2), 1000);
            let get = |t: &str| {
                s.conditions
                    .iter()
                    .find(|c| c.type_ == t)
                    .cloned()
                    .unwrap_or_else(|| panic!("{phase}: no {t} condition"))
            };
            let (c, f) = (get(condition::COMPLETE), get(condition::FAILED));
            assert_eq!(c.status, ConditionStatus::from(complete), "{phase}");
            assert_eq!(f.status, ConditionStatus::from(failed), "{phase}");
            assert_eq!(c.reason, phase.to_string());
            assert_eq!(f.observed_generation, Some(2));
            // One condition per type (the CRD's list is a map keyed by type).
            let mut types: Vec<&str> = s.conditions.iter().map(|c| c.type_.as_str()).collect();
            types.sort();
            types.dedup();
            assert_eq!(types.len(), s.conditions.len(), "{phase}");
        }
    }
}
