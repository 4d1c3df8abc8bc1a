//! Text for people: a migration's status and the `list` table (pure).

use std::fmt::Write as _;

use indicatif::HumanBytes;
use k8s_openapi::jiff::Timestamp;
use volmig_api::crd::{VolumeMigration, VolumeStatus};

/// Copied share of a volume, in percent (0 when the size is not known yet).
pub fn percent(copied: i64, total: i64) -> u64 {
    if total <= 0 {
        return 0;
    }
    (copied.clamp(0, total) as u128 * 100 / total as u128) as u64
}

/// `[#######-------------]` for `pct` percent.
pub fn bar(pct: u64, width: usize) -> String {
    let done = (pct.min(100) as usize * width) / 100;
    format!("[{}{}]", "#".repeat(done), "-".repeat(width - done))
}

/// Copied share of all volumes together (`status.progress` when the
/// operator wrote it).
pub fn progress(vm: &VolumeMigration) -> String {
    let Some(st) = &vm.status else {
        return String::new();
    };
    if let Some(p) = &st.progress {
        return p.clone();
    }
    if st.volumes.is_empty() {
        return String::new();
    }
    let copied = st.volumes.iter().map(|v| v.bytes_copied).sum();
    let total = st.volumes.iter().map(|v| v.bytes_total).sum();
    format!("{}%", percent(copied, total))
}

/// kubectl's short ages: `45s`, `12m`, `5h`, `3d`.
pub fn age(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..120 => format!("{s}s"),
        120..10_800 => format!("{}m", s / 60),
        10_800..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn span(start: &str, end: Option<&str>, now: Timestamp) -> String {
    let Ok(s) = start.parse::<Timestamp>() else {
        return String::new();
    };
    let e = match end.map(str::parse::<Timestamp>) {
        Some(Ok(e)) => e,
        Some(Err(_)) => return String::new(),
        None => now,
    };
    let ms = e.duration_since(s).as_millis().max(0);
    let d = format!("{}.{:03}s", ms / 1000, ms % 1000);
    if end.is_none() {
        format!("{d} so far")
    } else {
        d
    }
}

fn volume_line(v: &VolumeStatus) -> String {
    let pct = percent(v.bytes_copied, v.bytes_total);
    let mut flags = Vec::new();
    if let Some(sess) = &v.session {
        flags.push(sess.phase.to_string());
        if let Some(e) = &sess.error {
            flags.push(format!("error: {e}"));
        }
    }
    if v.mirror {
        flags.push("mirror".to_string());
    }
    if v.redirected {
        flags.push("redirected".to_string());
    }
    if let Some(ok) = v.verified {
        flags.push(if ok { "verified" } else { "VERIFY FAILED" }.to_string());
    }
    if v.resumes > 0 {
        flags.push(format!("resumed {}x", v.resumes));
    }
    let target = if v.target.is_empty() { "?" } else { &v.target };
    let mut line = format!(
        "  {} -> {target}  {} {pct:>3}%  {} / {}  dirty {}  passes {}",
        v.source,
        bar(pct, 20),
        HumanBytes(v.bytes_copied.max(0) as u64),
        HumanBytes(v.bytes_total.max(0) as u64),
        HumanBytes(v.dirty_bytes.max(0) as u64),
        v.passes,
    );
    if let Some(node) = &v.node {
        let _ = write!(line, "  node {node}");
        // a multi-attach volume: the other nodes cut over with it
        let others: Vec<&str> = v.shared_with.iter().map(|a| a.node.as_str()).collect();
        if !others.is_empty() {
            let _ = write!(line, " (also {})", others.join(", "));
        }
    }
    if !flags.is_empty() {
        let _ = write!(line, "  ({})", flags.join(", "));
    }
    line
}

/// `status NAME`: phase, per-volume progress, cutover stall, phase timeline
/// and conditions with their messages. `now` ends the running phase's span.
pub fn render_status(vm: &VolumeMigration, now: Timestamp) -> String {
    let mut o = String::new();
    let name = vm.metadata.name.as_deref().unwrap_or("?");
    let ns = vm.metadata.namespace.as_deref().unwrap_or("?");
    let _ = writeln!(o, "Name:       {name}");
    let _ = writeln!(o, "Namespace:  {ns}");
    let targets: Vec<String> = vm
        .spec
        .volumes
        .iter()
        .map(|p| {
            let t = match (
                &p.target.storage_class_name,
                &p.target.persistent_volume_claim,
            ) {
                (Some(sc), _) => format!("storage class {sc}"),
                (None, Some(c)) => format!("claim {c}"),
                (None, None) => "?".into(),
            };
            format!("{} -> {t}", p.source.persistent_volume_claim)
        })
        .collect();
    let _ = writeln!(o, "Volumes:    {}", targets.join(", "));
    let _ = writeln!(
        o,
        "Mode:       {:?}, sync goal {}, bandwidth {}, verify {:?}{}",
        vm.spec.copy_mode,
        vm.spec.sync_goal,
        vm.spec.bandwidth_limit.as_deref().unwrap_or("unlimited"),
        vm.spec.verify,
        if vm.spec.abort {
            ", abort requested"
        } else {
            ""
        }
    );
    let Some(st) = &vm.status else {
        let _ = writeln!(
            o,
            "Phase:      Pending (no status yet: is the operator running?)"
        );
        return o;
    };
    let mut phase = format!("Phase:      {}", st.phase);
    if st.queued {
        phase.push_str(" (queued for a session slot)");
    }
    if st.abort_requested && !st.phase.is_terminal() {
        phase.push_str(" (abort requested)");
    }
    let _ = writeln!(o, "{phase}");
    let _ = writeln!(o, "Progress:   {}", progress(vm));
    let _ = writeln!(
        o,
        "Stall:      {}",
        st.cutover_stall
            .as_deref()
            .unwrap_or("- (not cut over yet)")
    );
    if let Some(g) = &st.group {
        let _ = writeln!(o, "Group:      {g}");
    }
    if let Some(e) = &st.error {
        let _ = writeln!(o, "Error:      {e}");
    }
    if !st.volumes.is_empty() {
        let _ = writeln!(o, "Progress by volume:");
        for v in &st.volumes {
            let _ = writeln!(o, "{}", volume_line(v));
        }
    }
    if !st.phase_times.is_empty() {
        let _ = writeln!(o, "Timeline:");
        for t in &st.phase_times {
            let _ = writeln!(
                o,
                "  {:<14} {}  {}",
                t.phase.to_string(),
                t.start,
                span(&t.start, t.end.as_deref(), now)
            );
        }
    }
    if !st.conditions.is_empty() {
        let _ = writeln!(o, "Conditions:");
        for c in &st.conditions {
            let _ = writeln!(
                o,
                "  {}={}  {}: {}  (since {})",
                c.type_, c.status, c.reason, c.message, c.last_transition_time
            );
        }
    }
    o
}

/// The `list` table, columns like `kubectl get volmig` (NAMESPACE first with `-A`).
pub fn render_list(items: &[VolumeMigration], all_namespaces: bool, now: Timestamp) -> String {
    let mut rows = vec![{
        let mut h = vec!["NAME", "PHASE", "PROGRESS", "STALL", "AGE"];
        if all_namespaces {
            h.insert(0, "NAMESPACE");
        }
        h.into_iter().map(String::from).collect::<Vec<_>>()
    }];
    for vm in items {
        let st = vm.status.as_ref();
        let created = vm
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| age(now.duration_since(t.0).as_secs()))
            .unwrap_or_else(|| "<unknown>".into());
        let mut r = vec![
            vm.metadata.name.clone().unwrap_or_default(),
            st.map(|s| s.phase.to_string())
                .unwrap_or_else(|| "Pending".into()),
            Some(progress(vm))
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "-".into()),
            st.and_then(|s| s.cutover_stall.clone())
                .unwrap_or_else(|| "-".into()),
            created,
        ];
        if all_namespaces {
            r.insert(0, vm.metadata.namespace.clone().unwrap_or_default());
        }
        rows.push(r);
    }
    let cols = rows[0].len();
    let widths: Vec<usize> = (0..cols)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut o = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(o, "{}", line.join("   ").trim_end());
    }
    o
}
