//! The driver against a fake agent: every way a phase changes, and that
//! each ends in the record the way the transition function says.

use std::sync::Arc;
use std::time::Duration;

use volmig_api::ErrorKind;
use volmig_api::phase::Phase::{self, *};

use super::*;
use crate::store::FileStore;
use crate::testing::{Agent, FakeSlave, dir, timeline};

fn cfg() -> DriverConfig {
    DriverConfig {
        slice: Duration::from_millis(20),
        unreachable_for: Duration::from_secs(30),
        ..DriverConfig::default()
    }
}

fn driver(
    slave: &Arc<FakeSlave>,
    store: &FileStore,
    volume: &str,
) -> Driver<Arc<FakeSlave>, FileStore> {
    Driver::new(
        slave.clone(),
        store.clone(),
        volume,
        cfg(),
        Arc::new(StopSignal::default()),
    )
}

async fn run(slave: &Arc<FakeSlave>, d: &crate::testing::Dir, volume: &str) -> SessionRecord {
    tokio::time::timeout(
        Duration::from_secs(20),
        driver(slave, &d.store, volume).run(),
    )
    .await
    .expect("the driver never returned")
    .unwrap()
}

#[tokio::test]
async fn a_session_walks_every_phase_and_is_saved_completed() {
    let d = dir();
    d.session("v").await;
    let slave = FakeSlave::new();
    let rec = run(&slave, &d, "v").await;
    assert_eq!(rec.phase, Completed, "{:?}", rec.error);
    assert_eq!(
        timeline(&rec),
        [
            Activating,
            Copying,
            Quiescing,
            Synchronizing,
            Redirecting,
            Resuming,
            Terminating
        ]
    );
    assert!(rec.phase_times.iter().all(|p| p.end_ms.is_some()));
    assert_eq!((rec.verified, rec.redirected), (Some(true), true));
    assert_eq!(rec.error, None);
    assert_eq!(d.record("v").await, rec, "the end is saved");
    assert_eq!(slave.called("abort"), 0);
}

#[tokio::test]
async fn a_failed_step_rolls_back_and_ends_failed_with_its_reason() {
    let d = dir();
    d.session("v").await;
    let slave = FakeSlave::new().fail("synchronize", ErrorKind::Failed);
    let rec = run(&slave, &d, "v").await;
    assert_eq!(rec.phase, Failed);
    let e = rec.error.unwrap();
    assert!(
        e.starts_with("Synchronizing: ") && e.contains("refused by the fake"),
        "{e}"
    );
    assert_eq!(slave.called("abort"), 1, "{:?}", slave.calls());
    assert!(!rec.redirected);
    assert!(slave.agent().unwrap().finished);
}

#[tokio::test]
async fn a_target_that_does_not_verify_fails_the_session_and_rolls_back() {
    let d = dir();
    d.session("v").await;
    let slave = FakeSlave::new().mismatch_at(4096);
    let rec = run(&slave, &d, "v").await;
    assert_eq!(rec.phase, Failed);
    assert_eq!(
        rec.error.as_deref(),
        Some("verification failed: first difference at offset 4096")
    );
    assert_eq!(rec.verified, Some(false));
    assert_eq!(slave.called("abort"), 1);
}

#[tokio::test]
async fn an_abort_request_rolls_back_to_aborted_without_an_error() {
    let d = dir();
    d.session("v").await;
    let slave = FakeSlave::new().endless_copy();
    let drv = driver(&slave, &d.store, "v");
    let run = tokio::spawn(async move { drv.run().await });
    while slave.called("copy_pass") < 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    crate::session::request_abort(&d.store, "v").await.unwrap();
    let rec = run.await.unwrap().unwrap();
    assert_eq!(rec.phase, Aborted);
    assert_eq!(rec.error, None);
    assert_eq!(slave.called("abort"), 1);
    assert!(!rec.redirected);
}

#[tokio::test]
async fn an_abort_request_interrupts_a_long_termination() {
    // A failback window (or a long verification) runs inside one
    // terminate call: an abort asked for meanwhile must reach the agent
    // then, not after the window, when the session would be Completed.
    let d = dir();
    d.session("v").await;
    let slave = FakeSlave::new().long_terminate();
    let drv = driver(&slave, &d.store, "v");
    let run = tokio::spawn(async move { drv.run().await });
    while slave.called("terminate") < 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    crate::session::request_abort(&d.store, "v").await.unwrap();
    let rec = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the abort never reached the running termination")
        .unwrap()
        .unwrap();
    assert_eq!(rec.phase, Aborted, "{:?}", rec.error);
    assert_eq!(rec.error, None);
    assert!(slave.called("abort") >= 1);
}

#[tokio::test]
async fn an_abort_the_agent_cannot_carry_out_ends_failed() {
    let d = dir();
    d.session("v").await;
    crate::session::request_abort(&d.store, "v").await.unwrap();
    let slave = FakeSlave::new().fail("abort", ErrorKind::Failed);
    let rec = run(&slave, &d, "v").await;
    assert_eq!(rec.phase, Failed);
    let e = rec.error.unwrap();
    assert!(e.starts_with("abort: ") && e.contains("refused"), "{e}");
}

#[tokio::test]
async fn a_stop_while_the_rollback_waits_for_the_agent_ends_nothing() {
    // The agent is unreachable while an abort is due: a stop leaves the
    // session to the next master instead of marking it failed.
    let d = dir();
    d.session("v").await;
    d.at("v", Copying).await;
    crate::session::request_abort(&d.store, "v").await.unwrap();
    let slave = FakeSlave::new()
        .with_session(Agent {
            attached: true,
            ..Agent::default()
        })
        .fail("abort", ErrorKind::Unavailable);
    let stop = Arc::new(StopSignal::default());
    let drv = Driver::new(slave.clone(), d.store.clone(), "v", cfg(), stop.clone());
    let run = tokio::spawn(async move { drv.run().await });
    while slave.called("abort") < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.stop();
    let rec = run.await.unwrap().unwrap();
    assert_eq!(rec.phase, Copying, "{:?}", rec.error);
    assert_eq!(rec.error, None);
    assert!(rec.abort_requested);
    assert_eq!(d.record("v").await.phase, Copying);
}

#[tokio::test]
async fn an_agent_unreachable_too_long_fails_the_session() {
    let d = dir();
    d.session("v").await;
    let slave = FakeSlave::new().fail("quiesce", ErrorKind::Unavailable);
    let drv = Driver::new(
        slave.clone(),
        d.store.clone(),
        "v",
        DriverConfig {
            unreachable_for: Duration::from_millis(100),
            ..cfg()
        },
        Arc::new(StopSignal::default()),
    );
    let rec = drv.run().await.unwrap();
    assert_eq!(rec.phase, Failed);
    assert!(
        rec.error
            .as_deref()
            .unwrap()
            .starts_with("agent unreachable for"),
        "{:?}",
        rec.error
    );
}

#[tokio::test]
async fn a_restart_recovers_the_phase_from_the_agent() {
    let at = |quiesced: bool, redirected: bool, finished: bool| Agent {
        attached: !finished,
        quiesced,
        redirected,
        finished,
        ..Agent::default()
    };
    // (record's phase, agent, the phase recovered, where it ends)
    let cases: [(Phase, Option<Agent>, Phase, Phase); 6] = [
        // Quiesce lost (the agent restarted): refresh again, then complete.
        (
            Quiescing,
            Some(at(false, false, false)),
            Refreshing,
            Completed,
        ),
        (
            Synchronizing,
            Some(at(false, false, false)),
            Refreshing,
            Completed,
        ),
        // Redirected before the master recorded it.
        (
            Redirecting,
            Some(at(true, true, false)),
            Resuming,
            Completed,
        ),
        // The agent ended it: collect the result, or it was rolled back.
        (
            Resuming,
            Some(at(false, true, true)),
            Terminating,
            Completed,
        ),
        (Copying, Some(at(false, false, true)), Aborted, Aborted),
        // The agent knows nothing of it.
        (Refreshing, None, Failed, Failed),
    ];
    for (i, (phase, agent, recovered, end)) in cases.into_iter().enumerate() {
        let d = dir();
        let v = format!("v{i}");
        d.session(&v).await;
        d.at(&v, phase).await;
        let slave = FakeSlave::new();
        let slave = match agent {
            Some(a) => slave.with_session(a),
            None => slave,
        };
        let rec = run(&slave, &d, &v).await;
        assert_eq!(rec.phase, end, "{phase}: {:?}", rec.error);
        let tl = timeline(&rec);
        if !recovered.is_terminal() {
            assert_eq!(
                tl[tl.iter().position(|p| *p == phase).unwrap() + 1],
                recovered
            );
        }
        // A recovery does nothing on the agent: it follows what the agent
        // did (no release of a quiesce it lost, no rollback of a session
        // it ended).
        assert_eq!(slave.called("release"), 0, "{phase}: {:?}", slave.calls());
        if end != Completed {
            assert_eq!(slave.called("abort"), 0, "{phase}: {:?}", slave.calls());
        }
        if end == Failed {
            assert_eq!(
                rec.error.as_deref(),
                Some("the agent has no record of this session")
            );
        }
    }
}

#[tokio::test]
async fn a_driver_never_drives_a_record_of_a_newer_epoch() {
    let d = dir();
    d.session("v").await;
    let mut rec = d.record("v").await;
    rec.epoch = 5;
    d.store.save("v", &mut rec).await.unwrap();
    let r = driver(&FakeSlave::new(), &d.store, "v").run().await;
    assert!(matches!(r, Err(MasterError::Deposed(_))), "{r:?}");
}

#[tokio::test]
async fn an_agent_that_disagrees_or_blips_is_asked_again_not_failed() {
    let d = dir();
    d.session("v").await;
    let slave = FakeSlave::new()
        .fail_once("synchronize", ErrorKind::WrongState)
        .fail_once("redirect", ErrorKind::Unavailable);
    let rec = run(&slave, &d, "v").await;
    assert_eq!(rec.phase, Completed, "{:?}", rec.error);
    assert_eq!(slave.called("synchronize"), 2);
    assert_eq!(slave.called("redirect"), 2);
    // A disagreement sends the driver to the agent's state first; a blip
    // is retried in place.
    let calls = slave.calls();
    let after = |op: &str| {
        let i = calls.iter().position(|c| *c == op).unwrap();
        calls[i + 1]
    };
    assert_eq!(
        (after("synchronize"), after("redirect")),
        ("get_state", "redirect")
    );
}
