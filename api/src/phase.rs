//! The eight phases as one enum and one transition function. Pure: no I/O,
//! no clock; the driver performs each phase's step, turns its outcome into an
//! [`Event`] and asks [`transition`] where to go next.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    Activating,
    Copying,
    Refreshing,
    Quiescing,
    Synchronizing,
    Redirecting,
    Resuming,
    Terminating,
    Completed,
    Aborted,
    Failed,
}

impl Phase {
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Completed | Phase::Aborted | Phase::Failed)
    }

    /// True once the workload runs on the target.
    pub fn is_after_redirect(self) -> bool {
        matches!(
            self,
            Phase::Resuming | Phase::Terminating | Phase::Completed
        )
    }

    pub const ALL: [Phase; 11] = [
        Phase::Activating,
        Phase::Copying,
        Phase::Refreshing,
        Phase::Quiescing,
        Phase::Synchronizing,
        Phase::Redirecting,
        Phase::Resuming,
        Phase::Terminating,
        Phase::Completed,
        Phase::Aborted,
        Phase::Failed,
    ];
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum CopyMode {
    /// Copy + refresh passes; never mirrors.
    Background,
    /// Mirror writes from the start.
    Mirror,
    /// Background, switching to mirror when refresh does not converge.
    #[default]
    Auto,
}

impl std::str::FromStr for CopyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "background" => Ok(CopyMode::Background),
            "mirror" => Ok(CopyMode::Mirror),
            "auto" => Ok(CopyMode::Auto),
            _ => Err(format!(
                "unknown copy mode {s:?} (Background, Mirror or Auto)"
            )),
        }
    }
}

/// Knobs of the convergence decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub mode: CopyMode,
    /// Longest acceptable I/O stall at cutover.
    pub sync_goal: Duration,
    /// After this many refresh passes cut over anyway, with a stall longer
    /// than the goal (`converged` false). Background reaches it when the
    /// workload outruns the copy; Auto only once it mirrors; Mirror
    /// practically never, unless writes the mirror cannot cover keep the
    /// residue up (the other agents of a multi-attach volume).
    pub max_passes: u32,
    /// Auto mode: passes whose residue did not halve before mirroring.
    pub stall_passes: u32,
    /// Auto mode, during the copy pass: when the workload, at the rate it
    /// re-dirties what was copied, is projected to write each grain more
    /// than this many times over the whole pass, refresh passes cannot
    /// halve the residue (see [`projected_hits`]): mirror from here on.
    pub redirty_hits: f64,
    /// The share is judged only once the copy pass has walked this share of
    /// the volume (a few early writes say little).
    pub redirty_min_walked: f64,
}

/// The share of the sync goal a residue's estimated copy time may take.
/// The rate comes from the pass's mostly sequential copy; a residue of
/// scattered grains copies slower, so aiming at the whole goal put
/// stalls right at it (85-100 ms for a 100 ms goal under random writes).
pub const SYNC_AIM: f64 = 0.8;

impl Policy {
    /// The estimated synchronize time a cutover may start with.
    pub fn aim(&self) -> Duration {
        self.sync_goal.mul_f64(SYNC_AIM)
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            mode: CopyMode::Auto,
            sync_goal: Duration::from_millis(100),
            max_passes: 30,
            stall_passes: 1,
            redirty_hits: 1.0,
            redirty_min_walked: 1.0 / 32.0,
        }
    }
}

/// The part of a session's state the decision reads.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Progress {
    /// Refresh passes done (the copy pass is not counted).
    pub passes: u32,
    /// Consecutive passes whose residue did not shrink.
    pub stalled_passes: u32,
    pub last_dirty: Option<u64>,
    /// Mirror mode is on.
    pub mirror: bool,
    /// False when a cutover was forced without convergence.
    pub converged: bool,
}

/// What a phase step reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Activated,
    /// A slice of a pass ended: the pass has walked `walked` bytes of a
    /// `size`-byte volume, and `redirtied` of those are dirty again.
    SliceDone {
        walked: u64,
        redirtied: u64,
        size: u64,
    },
    /// A copy or refresh pass ended with `dirty_bytes` left; the copier moves
    /// `copy_rate` bytes per second.
    PassDone {
        dirty_bytes: u64,
        copy_rate: f64,
    },
    Quiesced {
        dirty_bytes: u64,
        copy_rate: f64,
        spent: Duration,
    },
    QuiesceTimedOut,
    Synchronized,
    Redirected,
    Resumed,
    Terminated,
    /// Someone asked for the session to be rolled back.
    AbortRequested,
    /// Another member of the session's consistency group failed or was
    /// aborted: this one rolls back with it.
    GroupFailed(String),
    /// Quiesced and ready, but another member of the group is not: release
    /// and refresh again, together.
    Outvoted,
    /// A step failed (or the agent stayed unreachable, or the target did
    /// not verify): roll back and end Failed.
    Failed(String),
    /// Rolling back for an abort failed on the agent: the session ends
    /// Failed instead of Aborted.
    RollbackFailed(String),
    /// After a restart (of the master or the agent) the agent's state says
    /// the session is really at `to` (see [`recovery_allowed`]).
    Recovered {
        to: Phase,
        why: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub next: Phase,
    pub progress: Progress,
    /// Human-readable reason, for logs and events.
    pub why: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event {event} is not valid in phase {phase}")]
pub struct BadTransition {
    pub phase: Phase,
    pub event: String,
}

/// Estimated time to copy `bytes` at `rate` bytes/s.
pub fn estimate(bytes: u64, rate: f64) -> Duration {
    if bytes == 0 {
        Duration::ZERO
    } else if rate <= 0.0 {
        Duration::MAX
    } else {
        Duration::from_secs_f64(bytes as f64 / rate)
    }
}

/// The moves a recovery may make: where a session can really be when the
/// record says `from`. The agent may have ended it (failed, rolled back,
/// terminated) at any time; a cutover may have lost its quiesce or been
/// redirected before the master recorded it; a prepare may have happened.
/// Never into Quiescing, Synchronizing or Redirecting: those only by steps.
pub fn recovery_allowed(from: Phase, to: Phase) -> bool {
    use Phase::*;
    let cutover = matches!(from, Quiescing | Synchronizing | Redirecting);
    from != to
        && !from.is_terminal()
        && match to {
            Failed | Aborted | Terminating => true,
            Refreshing | Resuming => cutover,
            Copying => from == Activating,
            _ => false,
        }
}

/// The single transition function of the phase machine.
pub fn transition(
    phase: Phase,
    progress: Progress,
    event: &Event,
    policy: &Policy,
) -> Result<Transition, BadTransition> {
    use Phase::*;
    let bad = || BadTransition {
        phase,
        event: format!("{event:?}"),
    };
    let to = |next: Phase, progress: Progress, why: &str| Transition {
        next,
        progress,
        why: why.to_string(),
    };
    if phase.is_terminal() {
        return Err(bad());
    }
    match (phase, event) {
        (_, Event::Failed(msg)) => Ok(to(Failed, progress, msg)),
        (_, Event::RollbackFailed(e)) => Ok(to(Failed, progress, &format!("abort: {e}"))),
        (_, Event::AbortRequested) => Ok(to(Aborted, progress, "abort requested")),
        (_, Event::GroupFailed(f)) => Ok(to(
            Aborted,
            progress,
            &format!("rolled back with its group: {f}"),
        )),
        (_, Event::Recovered { to: next, why }) if recovery_allowed(phase, *next) => {
            Ok(to(*next, progress, why))
        }
        (Quiescing, Event::Outvoted) => Ok(to(
            Refreshing,
            progress,
            "another member of the group cannot cut over yet",
        )),
        (Activating, Event::Activated) => {
            let mut p = progress;
            p.mirror = policy.mode == CopyMode::Mirror;
            Ok(to(Copying, p, "monitor attached"))
        }
        (
            Copying | Refreshing,
            Event::SliceDone {
                walked,
                redirtied,
                size,
            },
        ) => Ok(after_slice(
            phase,
            progress,
            (*walked, *redirtied, *size),
            policy,
        )),
        (
            Copying | Refreshing,
            Event::PassDone {
                dirty_bytes,
                copy_rate,
            },
        ) => Ok(after_pass(
            phase,
            progress,
            *dirty_bytes,
            *copy_rate,
            policy,
        )),
        (Quiescing, Event::QuiesceTimedOut) => Ok(to(
            Refreshing,
            progress,
            "in-flight I/O did not drain within the sync goal; back to refresh",
        )),
        (
            Quiescing,
            Event::Quiesced {
                dirty_bytes,
                copy_rate,
                spent,
            },
        ) => {
            let left = policy.aim().saturating_sub(*spent);
            let forced = !progress.converged;
            if forced || estimate(*dirty_bytes, *copy_rate) <= left {
                Ok(to(Synchronizing, progress, "residue fits the sync goal"))
            } else {
                Ok(to(
                    Refreshing,
                    progress,
                    "residue grew while quiescing; released, back to refresh",
                ))
            }
        }
        (Synchronizing, Event::Synchronized) => Ok(to(Redirecting, progress, "target in sync")),
        (Redirecting, Event::Redirected) => {
            Ok(to(Resuming, progress, "workload switched to target"))
        }
        (Resuming, Event::Resumed) => Ok(to(Terminating, progress, "workload I/O released")),
        (Terminating, Event::Terminated) => Ok(to(Completed, progress, "migration complete")),
        _ => Err(bad()),
    }
}

/// Share of the walked part of a pass that is dirty again when each grain
/// is written `x` times per pass duration (uniform random writes, Poisson
/// arrivals, a constant copy rate: a grain copied at time u of t has been
/// hit with probability 1 - e^(-x(t-u)/t); averaged over u).
fn redirtied_share(x: f64) -> f64 {
    if x < 1e-9 {
        x / 2.0
    } else {
        1.0 - (1.0 - (-x).exp()) / x
    }
}

/// How many times the workload will have written each grain by the end of
/// the copy pass, projected from the share of the walked part written
/// again so far: the hits per grain over the time so far (the inverse of
/// [`redirtied_share`]), scaled by the pass's length (`size / walked` of
/// the time so far, the copy rate being constant).
///
/// Under 1, each refresh pass copies less than half of the one before
/// (the residue `r` of a pass is re-dirtied by about `x * r / 2` while it
/// is copied): refresh converges. Above it, it cannot.
pub fn projected_hits(walked: u64, redirtied: u64, size: u64) -> f64 {
    if walked == 0 {
        return 0.0;
    }
    let share = (redirtied as f64 / walked as f64).clamp(0.0, 0.999);
    // Bisection: redirtied_share is increasing, from 0 towards 1.
    let (mut lo, mut hi) = (0.0f64, 1e4f64);
    for _ in 0..100 {
        let mid = (lo + hi) / 2.0;
        if redirtied_share(mid) < share {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo * size as f64 / walked as f64
}

/// Mid-pass: Auto mode gives up on background copying as soon as the copy
/// pass shows the workload re-dirtying what it copied faster than refresh
/// passes could catch up; waiting for the pass's end and a refresh pass to
/// prove it would copy the volume twice more.
fn after_slice(
    phase: Phase,
    progress: Progress,
    (walked, redirtied, size): (u64, u64, u64),
    policy: &Policy,
) -> Transition {
    let mut p = progress;
    let judged = walked > 0 && walked as f64 >= policy.redirty_min_walked * size as f64;
    if policy.mode == CopyMode::Auto && phase == Phase::Copying && !p.mirror && judged {
        let hits = projected_hits(walked, redirtied, size);
        if hits > policy.redirty_hits {
            p.mirror = true;
            return Transition {
                next: phase,
                progress: p,
                why: format!(
                    "{redirtied} B of the {walked} B copied so far was written again: about {hits:.1} writes per grain by the end of the pass, more than refresh can catch up with; switching to mirror mode"
                ),
            };
        }
    }
    Transition {
        next: phase,
        progress: p,
        why: String::new(),
    }
}

fn after_pass(
    phase: Phase,
    progress: Progress,
    dirty: u64,
    rate: f64,
    policy: &Policy,
) -> Transition {
    let mut p = progress;
    if phase == Phase::Refreshing {
        p.passes += 1;
    }
    // A residue that does not at least halve per pass will not fit the sync
    // goal in any useful number of passes: writes are outrunning the copy.
    let shrinking = p.last_dirty.is_none_or(|last| dirty < last / 2);
    p.stalled_passes = if shrinking { 0 } else { p.stalled_passes + 1 };
    p.last_dirty = Some(dirty);
    p.converged = true;
    let fits = estimate(dirty, rate) <= policy.aim();
    let next = |next, p, why: String| Transition {
        next,
        progress: p,
        why,
    };
    if fits {
        return next(
            Phase::Quiescing,
            p,
            format!("residue {dirty} B fits the sync goal"),
        );
    }
    match policy.mode {
        CopyMode::Auto if !p.mirror && p.stalled_passes >= policy.stall_passes => {
            p.mirror = true;
            p.stalled_passes = 0;
            next(
                Phase::Refreshing,
                p,
                format!("residue {dirty} B stopped shrinking; switching to mirror mode"),
            )
        }
        _ if p.passes >= policy.max_passes && (p.mirror || policy.mode == CopyMode::Background) => {
            p.converged = false;
            next(
                Phase::Quiescing,
                p,
                format!("no convergence after {} passes; forcing cutover", p.passes),
            )
        }
        _ => next(
            Phase::Refreshing,
            p,
            format!("residue {dirty} B; refreshing"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pol(mode: CopyMode) -> Policy {
        Policy {
            mode,
            ..Policy::default()
        }
    }

    #[test]
    fn happy_path_walks_all_eight_phases() {
        let p = pol(CopyMode::Auto);
        let mut ph = Phase::Activating;
        let mut pr = Progress::default();
        let events = [
            Event::Activated,
            Event::PassDone {
                dirty_bytes: 100 << 20,
                copy_rate: 100e6,
            },
            Event::PassDone {
                dirty_bytes: 1 << 20,
                copy_rate: 100e6,
            },
            Event::Quiesced {
                dirty_bytes: 1 << 20,
                copy_rate: 100e6,
                spent: Duration::from_millis(1),
            },
            Event::Synchronized,
            Event::Redirected,
            Event::Resumed,
            Event::Terminated,
        ];
        let mut seen = vec![ph];
        for e in &events {
            let t = transition(ph, pr, e, &p).unwrap();
            ph = t.next;
            pr = t.progress;
            seen.push(ph);
        }
        use Phase::*;
        assert_eq!(
            seen,
            vec![
                Activating,
                Copying,
                Refreshing,
                Quiescing,
                Synchronizing,
                Redirecting,
                Resuming,
                Terminating,
                Completed
            ]
        );
        assert!(transition(Completed, pr, &Event::AbortRequested, &p).is_err());
    }

    #[test]
    fn auto_switches_to_mirror_when_residue_stalls() {
        let p = pol(CopyMode::Auto);
        let mut pr = Progress::default();
        let ev = Event::PassDone {
            dirty_bytes: 500 << 20,
            copy_rate: 100e6,
        };
        let mut mirrored_at = None;
        for i in 0..5 {
            let t = transition(Phase::Refreshing, pr, &ev, &p).unwrap();
            assert_eq!(t.next, Phase::Refreshing);
            pr = t.progress;
            if pr.mirror && mirrored_at.is_none() {
                mirrored_at = Some(i);
            }
        }
        assert_eq!(
            mirrored_at,
            Some(1),
            "first pass sets the baseline, one pass that does not halve switches"
        );
    }

    #[test]
    fn auto_stays_in_background_while_the_residue_halves() {
        let p = pol(CopyMode::Auto);
        let mut pr = Progress::default();
        let mut dirty = 1u64 << 30;
        for _ in 0..6 {
            let ev = Event::PassDone {
                dirty_bytes: dirty,
                copy_rate: 1e6,
            };
            pr = transition(Phase::Refreshing, pr, &ev, &p).unwrap().progress;
            assert!(!pr.mirror, "a converging refresh needs no mirror");
            dirty /= 3;
        }
    }

    #[test]
    fn background_forces_cutover_after_max_passes_and_mirror_mode_starts_mirrored() {
        let p = Policy {
            max_passes: 3,
            ..pol(CopyMode::Background)
        };
        let mut pr = Progress::default();
        let ev = Event::PassDone {
            dirty_bytes: 500 << 20,
            copy_rate: 100e6,
        };
        let mut ph = Phase::Refreshing;
        for _ in 0..3 {
            let t = transition(ph, pr, &ev, &p).unwrap();
            ph = t.next;
            pr = t.progress;
            assert!(!pr.mirror);
        }
        assert_eq!(ph, Phase::Quiescing);
        assert!(!pr.converged);
        let t = transition(
            Phase::Quiescing,
            pr,
            &Event::Quiesced {
                dirty_bytes: 500 << 20,
                copy_rate: 100e6,
                spent: Duration::ZERO,
            },
            &p,
        )
        .unwrap();
        assert_eq!(
            t.next,
            Phase::Synchronizing,
            "forced cutover does not bounce back"
        );
        let t = transition(
            Phase::Activating,
            Progress::default(),
            &Event::Activated,
            &pol(CopyMode::Mirror),
        )
        .unwrap();
        assert!(t.progress.mirror);
    }

    #[test]
    fn mirroring_modes_force_cutover_after_max_passes_too() {
        // Writes the mirror cannot cover (another agent's, on a multi-attach
        // volume) can keep the residue above the goal forever.
        for mode in [CopyMode::Auto, CopyMode::Mirror] {
            let p = Policy {
                max_passes: 3,
                ..pol(mode)
            };
            let mut pr = Progress {
                mirror: true,
                ..Progress::default()
            };
            let ev = Event::PassDone {
                dirty_bytes: 500 << 20,
                copy_rate: 100e6,
            };
            let mut ph = Phase::Refreshing;
            for _ in 0..3 {
                let t = transition(ph, pr, &ev, &p).unwrap();
                (ph, pr) = (t.next, t.progress);
            }
            assert_eq!((ph, pr.converged), (Phase::Quiescing, false), "{mode:?}");
            let t = transition(
                ph,
                pr,
                &Event::Quiesced {
                    dirty_bytes: 500 << 20,
                    copy_rate: 100e6,
                    spent: Duration::ZERO,
                },
                &p,
            )
            .unwrap();
            assert_eq!(t.next, Phase::Synchronizing, "{mode:?}");
        }
        // Auto that has not mirrored yet tries mirroring first.
        let p = Policy {
            max_passes: 1,
            ..pol(CopyMode::Auto)
        };
        let t = transition(
            Phase::Refreshing,
            Progress {
                last_dirty: Some(500 << 20),
                ..Progress::default()
            },
            &Event::PassDone {
                dirty_bytes: 500 << 20,
                copy_rate: 100e6,
            },
            &p,
        )
        .unwrap();
        assert_eq!((t.next, t.progress.mirror), (Phase::Refreshing, true));
    }

    #[test]
    fn a_residue_is_cut_over_only_within_the_aim_not_the_whole_goal() {
        let p = pol(CopyMode::Background); // goal 100 ms, aim 80 ms
        let at = |ms: f64| Event::PassDone {
            dirty_bytes: (ms * 1e6) as u64, // at 1e9 B/s: `ms` milliseconds
            copy_rate: 1e9,
        };
        let t = transition(Phase::Refreshing, Progress::default(), &at(79.0), &p).unwrap();
        assert_eq!(t.next, Phase::Quiescing);
        let t = transition(Phase::Refreshing, Progress::default(), &at(90.0), &p).unwrap();
        assert_eq!(
            t.next,
            Phase::Refreshing,
            "90 ms fits the goal but not the aim"
        );
        let quiesced = |ms: f64| Event::Quiesced {
            dirty_bytes: (ms * 1e6) as u64,
            copy_rate: 1e9,
            spent: Duration::from_millis(10),
        };
        let conv = Progress {
            converged: true,
            ..Progress::default()
        };
        let t = transition(Phase::Quiescing, conv, &quiesced(65.0), &p).unwrap();
        assert_eq!(t.next, Phase::Synchronizing);
        let t = transition(Phase::Quiescing, conv, &quiesced(75.0), &p).unwrap();
        assert_eq!(
            t.next,
            Phase::Refreshing,
            "10 ms spent + 75 ms > the 80 ms aim"
        );
    }

    #[test]
    fn quiesce_over_budget_goes_back_to_refresh() {
        let p = pol(CopyMode::Auto);
        let pr = Progress {
            converged: true,
            ..Progress::default()
        };
        let t = transition(
            Phase::Quiescing,
            pr,
            &Event::Quiesced {
                dirty_bytes: 50 << 20,
                copy_rate: 100e6,
                spent: Duration::from_millis(10),
            },
            &p,
        )
        .unwrap();
        assert_eq!(t.next, Phase::Refreshing);
        let t = transition(Phase::Quiescing, pr, &Event::QuiesceTimedOut, &p).unwrap();
        assert_eq!(t.next, Phase::Refreshing);
    }

    #[test]
    fn auto_mirrors_mid_copy_when_the_workload_redirties_what_was_copied() {
        let slice = |walked: u64, redirtied: u64, mode| {
            transition(
                Phase::Copying,
                Progress::default(),
                &Event::SliceDone {
                    walked,
                    redirtied,
                    size: 1 << 30,
                },
                &pol(mode),
            )
            .unwrap()
        };
        // 10% of the first 128 MiB written again: about 1.9 hits per grain
        // over the whole pass. Mirror now, still copying.
        let t = slice(128 << 20, 13 << 20, CopyMode::Auto);
        assert_eq!(t.next, Phase::Copying);
        assert!(t.progress.mirror, "{}", t.why);
        // 2% of it: about 0.3 hits; refresh passes can catch up.
        let t = slice(128 << 20, 2_700_000, CopyMode::Auto);
        assert!(!t.progress.mirror);
        // Most of the volume walked and most of it dirty again: mirror.
        let t = slice(900 << 20, 600 << 20, CopyMode::Auto);
        assert!(t.progress.mirror);
        // Too little walked to judge (under 1/32 of the volume).
        let t = slice(16 << 20, 16 << 20, CopyMode::Auto);
        assert!(!t.progress.mirror);
        // Background never mirrors.
        let t = slice(256 << 20, 256 << 20, CopyMode::Background);
        assert!(!t.progress.mirror);
        // In a refresh pass the walked part holds clean grains never
        // copied: the share means nothing there.
        let t = transition(
            Phase::Refreshing,
            Progress::default(),
            &Event::SliceDone {
                walked: 256 << 20,
                redirtied: 256 << 20,
                size: 1 << 30,
            },
            &pol(CopyMode::Auto),
        )
        .unwrap();
        assert!(!t.progress.mirror);
        assert_eq!(t.next, Phase::Refreshing);
        // Not a phase event elsewhere.
        assert!(
            transition(
                Phase::Quiescing,
                Progress::default(),
                &Event::SliceDone {
                    walked: 1,
                    redirtied: 1,
                    size: 1
                },
                &pol(CopyMode::Auto)
            )
            .is_err()
        );
    }

    #[test]
    fn projected_hits_inverts_the_share_model() {
        for x in [0.01, 0.3, 1.0, 2.5, 8.0] {
            let share = redirtied_share(x);
            // Walked the whole volume: the projection is x itself.
            let got = projected_hits(1 << 30, (share * (1u64 << 30) as f64) as u64, 1 << 30);
            assert!((got - x).abs() < 1e-3 * x.max(1.0), "x {x}: got {got}");
            // A quarter walked with the same share: four times the time left.
            let got = projected_hits(1 << 28, (share * (1u64 << 28) as f64) as u64, 1 << 30);
            assert!(
                (got - 4.0 * x).abs() < 4e-3 * x.max(1.0),
                "x {x}: got {got}"
            );
        }
        assert_eq!(projected_hits(0, 0, 1 << 30), 0.0);
        assert_eq!(projected_hits(1 << 20, 0, 1 << 30), 0.0);
    }

    fn any_event() -> impl Strategy<Value = Event> {
        prop_oneof![
            Just(Event::Activated),
            (0u64..1 << 30, 0u64..1 << 30).prop_map(|(w, r)| Event::SliceDone {
                walked: w,
                redirtied: r.min(w),
                size: 1 << 30,
            }),
            (0u64..1 << 32, 0.0f64..1e9).prop_map(|(d, r)| Event::PassDone {
                dirty_bytes: d,
                copy_rate: r
            }),
            (0u64..1 << 32, 0.0f64..1e9, 0u64..200).prop_map(|(d, r, s)| Event::Quiesced {
                dirty_bytes: d,
                copy_rate: r,
                spent: Duration::from_millis(s)
            }),
            Just(Event::QuiesceTimedOut),
            Just(Event::Synchronized),
            Just(Event::Redirected),
            Just(Event::Resumed),
            Just(Event::Terminated),
            Just(Event::AbortRequested),
            Just(Event::GroupFailed("a member failed".into())),
            Just(Event::Outvoted),
            Just(Event::Failed("a step failed".into())),
            Just(Event::RollbackFailed("agent gone".into())),
            proptest::sample::select(Phase::ALL.to_vec()).prop_map(|to| Event::Recovered {
                to,
                why: "the agent says so".into()
            }),
        ]
    }

    #[test]
    fn recovery_moves_only_where_a_session_can_really_be() {
        use Phase::*;
        let rec = |from: Phase, to: Phase| {
            transition(
                from,
                Progress::default(),
                &Event::Recovered {
                    to,
                    why: "agent".into(),
                },
                &pol(CopyMode::Auto),
            )
            .map(|t| t.next)
        };
        // The agent ended the session: from anywhere.
        for from in [Activating, Copying, Quiescing, Resuming, Terminating] {
            assert_eq!(rec(from, Failed), Ok(Failed));
            assert_eq!(rec(from, Aborted), Ok(Aborted));
        }
        assert_eq!(rec(Resuming, Terminating), Ok(Terminating));
        // A cutover that lost its quiesce, or was redirected unrecorded.
        for from in [Quiescing, Synchronizing, Redirecting] {
            assert_eq!(rec(from, Refreshing), Ok(Refreshing));
            assert_eq!(rec(from, Resuming), Ok(Resuming));
        }
        assert_eq!(rec(Activating, Copying), Ok(Copying));
        // Never into a cutover step, never without a move, never backwards
        // from a copy, never out of an end.
        assert!(rec(Refreshing, Redirecting).is_err());
        assert!(rec(Refreshing, Quiescing).is_err());
        assert!(rec(Copying, Resuming).is_err());
        assert!(rec(Copying, Copying).is_err());
        assert!(rec(Refreshing, Activating).is_err());
        assert!(rec(Completed, Failed).is_err());
    }

    #[test]
    fn rollbacks_end_aborted_or_failed_with_their_reason() {
        let p = pol(CopyMode::Auto);
        let go = |ph, e: Event| transition(ph, Progress::default(), &e, &p).unwrap();
        let t = go(
            Phase::Redirecting,
            Event::GroupFailed("member b: gone".into()),
        );
        assert_eq!(t.next, Phase::Aborted);
        assert_eq!(t.why, "rolled back with its group: member b: gone");
        let t = go(Phase::Copying, Event::RollbackFailed("agent gone".into()));
        assert_eq!(
            (t.next, t.why.as_str()),
            (Phase::Failed, "abort: agent gone")
        );
        let t = go(Phase::Quiescing, Event::Outvoted);
        assert_eq!(t.next, Phase::Refreshing);
        assert!(
            transition(Phase::Refreshing, Progress::default(), &Event::Outvoted, &p).is_err(),
            "only a quiesced session is outvoted"
        );
    }

    proptest! {
        /// Whatever happens: Redirecting is only reached from Synchronizing,
        /// terminal phases accept nothing, abort is always possible before
        /// the end, and the workload never reaches Resuming without a
        /// Redirect (its own step, or the agent's found by a recovery
        /// mid-cutover). Failures and rollbacks always end the session.
        #[test]
        fn invariants(events in proptest::collection::vec(any_event(), 0..60), mode in prop_oneof![Just(CopyMode::Auto), Just(CopyMode::Mirror), Just(CopyMode::Background)]) {
            let p = Policy { mode, max_passes: 4, ..Policy::default() };
            let mut ph = Phase::Activating;
            let mut pr = Progress::default();
            for e in events {
                let abort_ok = transition(ph, pr, &Event::AbortRequested, &p);
                prop_assert_eq!(abort_ok.is_ok(), !ph.is_terminal());
                let r = transition(ph, pr, &e, &p);
                if let Event::Recovered { to, .. } = &e {
                    prop_assert_eq!(r.is_ok(), recovery_allowed(ph, *to));
                }
                if let Ok(t) = r {
                        let recovered = matches!(e, Event::Recovered { .. });
                        let cutover = matches!(ph, Phase::Quiescing | Phase::Synchronizing | Phase::Redirecting);
                        if t.next == Phase::Redirecting { prop_assert_eq!(ph, Phase::Synchronizing); }
                        if t.next == Phase::Resuming { prop_assert!(ph == Phase::Redirecting || (recovered && cutover)); }
                        if t.next == Phase::Synchronizing { prop_assert_eq!(ph, Phase::Quiescing); }
                        if mode == CopyMode::Background { prop_assert!(!t.progress.mirror); }
                        match &e {
                            Event::Failed(_) | Event::RollbackFailed(_) => prop_assert_eq!(t.next, Phase::Failed),
                            Event::AbortRequested | Event::GroupFailed(_) => prop_assert_eq!(t.next, Phase::Aborted),
                            Event::Outvoted => prop_assert_eq!((ph, t.next), (Phase::Quiescing, Phase::Refreshing)),
                            _ => {}
                        }
                        ph = t.next; pr = t.progress;
                }
            }
        }
    }
}
