//! Fault injection for crash tests: `VOLMIG_FAULT=<point>[,<point>...]`
//! makes the process SIGKILL itself when it reaches a named point, so a
//! test can kill a master or an agent at an exact step (after the agent
//! acted, before the master recorded it...) instead of racing a timer.
//! Points: `master:enter:<Phase>` (the record says Phase, nothing done yet),
//! `master:done:<Phase>` (the agent did the step, its outcome not yet
//! saved), and the agent's `agent:done:<call>` (the step is applied, the
//! reply not yet sent). Unset, a point costs one environment lookup, once.

use std::sync::OnceLock;

fn points() -> &'static [String] {
    static POINTS: OnceLock<Vec<String>> = OnceLock::new();
    POINTS.get_or_init(|| {
        std::env::var("VOLMIG_FAULT")
            .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
            .unwrap_or_default()
    })
}

/// Kills this process with SIGKILL if `VOLMIG_FAULT` names `point`.
pub fn point(point: &str) {
    if points().iter().any(|p| p == point) {
        tracing::warn!(point, "VOLMIG_FAULT: killing this process");
        // SAFETY: kill(2) on our own pid with a valid signal number.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// `VOLMIG_FAULT_DELAY=<point>=<ms>[,...]`: how long to stall at `point`
/// (a slow agent, to show what waits for whom), if named. Points: the
/// agent's `agent:done:redirect`, `agent:mirrored-write` (between a
/// mirrored write's two devices), and `agent:fuse-workers-started` (the FUSE
/// workers read requests for that long before the agent goes on).
pub fn delay(point: &str) -> Option<std::time::Duration> {
    static DELAYS: OnceLock<Vec<(String, u64)>> = OnceLock::new();
    DELAYS
        .get_or_init(|| {
            std::env::var("VOLMIG_FAULT_DELAY")
                .map(|v| {
                    v.split(',')
                        .filter_map(|p| {
                            let (name, ms) = p.trim().rsplit_once('=')?;
                            Some((name.to_string(), ms.parse().ok()?))
                        })
                        .collect()
                })
                .unwrap_or_default()
        })
        .iter()
        .find(|(p, _)| p == point)
        .map(|(_, ms)| std::time::Duration::from_millis(*ms))
}
