//! After a restart of the master or of an agent, the record's phase and the
//! agent's actual state may disagree (the agent lost its quiesce when it
//! restarted; the master died after the agent finished a step). This pure
//! function says where the session really is; the driver takes the move to
//! the phase machine as an `Event::Recovered`.

use volmig_api::phase::Phase;
use volmig_api::slave::SessionState;

/// Where to continue from `phase`, given the agent's view (`None`: the agent
/// has no such session).
pub fn recover(phase: Phase, state: Option<&SessionState>) -> (Phase, &'static str) {
    use Phase::*;
    if phase.is_terminal() {
        return (phase, "terminal");
    }
    let Some(st) = state else {
        return if phase == Activating {
            (Activating, "not prepared yet")
        } else {
            (Failed, "the agent has no record of this session")
        };
    };
    if st.finished {
        return if st.redirected {
            // Terminate again: the agent answers with the result it kept
            // (verification included), which the record must not lose.
            (
                Terminating,
                "the agent already terminated the session; collecting its result",
            )
        } else {
            (Aborted, "the agent already rolled the session back")
        };
    }
    match phase {
        Quiescing | Synchronizing | Redirecting if st.redirected => (
            Resuming,
            "the agent redirected before the master recorded it",
        ),
        Quiescing | Synchronizing | Redirecting if !st.quiesced => (
            Refreshing,
            "the agent is no longer quiesced (it restarted or released)",
        ),
        Activating if st.attached => (Copying, "the agent already activated the session"),
        p => (p, "consistent"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(quiesced: bool, redirected: bool, finished: bool) -> SessionState {
        SessionState {
            attached: !finished,
            quiesced,
            redirected,
            finished,
            ..SessionState::default()
        }
    }

    #[test]
    fn cases() {
        use Phase::*;
        assert_eq!(
            recover(Synchronizing, Some(&st(false, false, false))).0,
            Refreshing
        );
        assert_eq!(
            recover(Synchronizing, Some(&st(true, false, false))).0,
            Synchronizing
        );
        assert_eq!(
            recover(Redirecting, Some(&st(true, true, false))).0,
            Resuming
        );
        assert_eq!(
            recover(Quiescing, Some(&st(false, true, false))).0,
            Resuming
        );
        assert_eq!(
            recover(Terminating, Some(&st(false, true, true))).0,
            Terminating
        );
        assert_eq!(
            recover(Resuming, Some(&st(false, true, true))).0,
            Terminating
        );
        assert_eq!(recover(Copying, Some(&st(false, false, true))).0, Aborted);
        assert_eq!(recover(Refreshing, None).0, Failed);
        assert_eq!(recover(Activating, None).0, Activating);
        assert_eq!(
            recover(Activating, Some(&st(false, false, false))).0,
            Copying
        );
        assert_eq!(recover(Completed, None).0, Completed);
    }

    #[test]
    fn every_move_is_one_the_phase_machine_accepts() {
        let bools = [false, true];
        for phase in Phase::ALL.into_iter().filter(|p| !p.is_terminal()) {
            let mut views = vec![None];
            for q in bools {
                for r in bools {
                    for f in bools {
                        views.push(Some(st(q, r, f)));
                    }
                }
            }
            for view in views {
                let (to, _) = recover(phase, view.as_ref());
                assert!(
                    to == phase || volmig_api::phase::recovery_allowed(phase, to),
                    "{phase} -> {to} for {view:?}"
                );
            }
        }
    }
}
