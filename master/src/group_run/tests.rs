//! Groups of drivers against fake agents: all members end on their
//! targets, or none does.

use std::sync::Arc;
use std::time::Duration;

use volmig_api::phase::Phase::{self, *};

use super::*;
use crate::store::FileStore;
use crate::testing::{Agent, FakeSlave, dir, timeline};

fn member(volume: &str, slave: &Arc<FakeSlave>) -> Member<Arc<FakeSlave>> {
    Member {
        volume: volume.into(),
        target: format!("/t/{volume}").into(),
        agent: String::new(),
        shared_with: Vec::new(),
        slave: slave.clone(),
    }
}

async fn group(store: &FileStore, members: &[(&str, &Arc<FakeSlave>)]) -> Vec<SessionRecord> {
    let members = members.iter().map(|(v, s)| member(v, s)).collect();
    let cfg = DriverConfig {
        slice: Duration::from_millis(20),
        ..DriverConfig::default()
    };
    let run = run_group(
        "g",
        members,
        store.clone(),
        cfg,
        Arc::new(StopSignal::default()),
        Arc::new(BandwidthPool::new(0)),
    );
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the group never ended")
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
}

async fn new_group(store: &FileStore, volumes: &[&str]) {
    let members: Vec<_> = volumes
        .iter()
        .map(|v| member(v, &FakeSlave::new()))
        .collect();
    create_group(store, "g", &members, &SessionConfig::default(), 1)
        .await
        .unwrap();
}

#[tokio::test]
async fn members_cut_over_together_and_complete() {
    let d = dir();
    new_group(&d.store, &["a", "b"]).await;
    let (a, b) = (FakeSlave::new(), FakeSlave::new());
    let recs = group(&d.store, &[("a", &a), ("b", &b)]).await;
    for r in &recs {
        assert_eq!(r.phase, Completed, "{}: {:?}", r.volume, r.error);
        assert_eq!(r.group.as_deref(), Some("g"));
    }
}

#[tokio::test]
async fn an_aborted_member_rolls_the_waiting_ones_back() {
    let d = dir();
    new_group(&d.store, &["a", "b"]).await;
    let (a, b) = (FakeSlave::new(), FakeSlave::new().endless_copy());
    let run = tokio::spawn({
        let (store, a, b) = (d.store.clone(), a.clone(), b.clone());
        async move { group(&store, &[("a", &a), ("b", &b)]).await }
    });
    // a waits at the first barrier while b copies on.
    while a.called("copy_pass") == 0 || b.called("copy_pass") < 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    crate::session::request_abort(&d.store, "b").await.unwrap();
    let recs = run.await.unwrap();
    assert_eq!((recs[0].phase, recs[1].phase), (Aborted, Aborted));
    assert_eq!(
        recs[0].error.as_deref(),
        Some("rolled back with its group: group member b: abort requested")
    );
    assert_eq!(recs[1].error, None, "b's abort was asked for");
    assert_eq!(a.called("quiesce"), 0, "a never quiesced alone");
    assert_eq!((a.called("abort"), b.called("abort")), (1, 1));
}

#[tokio::test]
async fn one_member_not_ready_sends_every_member_back_to_refresh() {
    let d = dir();
    new_group(&d.store, &["a", "b"]).await;
    let (a, b) = (FakeSlave::new(), FakeSlave::new().quiesce_timeouts(1));
    let recs = group(&d.store, &[("a", &a), ("b", &b)]).await;
    for r in &recs {
        assert_eq!(r.phase, Completed, "{}: {:?}", r.volume, r.error);
        let tl = timeline(r);
        let q = tl.iter().position(|p| *p == Quiescing).unwrap();
        assert_eq!(tl[q + 1], Refreshing, "{}: {tl:?}", r.volume);
    }
    assert!(a.called("release") >= 1, "a's quiesce was released");
}

#[tokio::test]
async fn a_member_waiting_at_the_last_barrier_rolls_back_when_another_ended_failed() {
    // A restarted master finds a redirected, not yet terminated, and b
    // failed: a rolls back too (it used to wait at the barrier forever).
    let d = dir();
    new_group(&d.store, &["a", "b"]).await;
    d.at("a", Terminating).await;
    let mut b_rec = d.at("b", Failed).await;
    b_rec.error = Some("target write failed".into());
    d.store.save("b", &mut b_rec).await.unwrap();
    let a = FakeSlave::new().with_session(Agent {
        attached: true,
        redirected: true,
        ..Agent::default()
    });
    let recs = group(&d.store, &[("a", &a), ("b", &FakeSlave::new())]).await;
    assert_eq!(recs[0].phase, Aborted, "{:?}", recs[0].error);
    assert_eq!(
        recs[0].error.as_deref(),
        Some("rolled back with its group: group member b: target write failed")
    );
    assert_eq!(a.called("terminate"), 0);
    assert!(!recs[0].redirected, "back on its source");
}

#[tokio::test]
async fn a_member_whose_driver_errs_out_fails_the_group() {
    let d = dir();
    new_group(&d.store, &["a", "b"]).await;
    // b is driven by a newer master already.
    let mut b_rec = d.record("b").await;
    b_rec.epoch = 7;
    d.store.save("b", &mut b_rec).await.unwrap();
    let members = vec![
        member("a", &FakeSlave::new()),
        member("b", &FakeSlave::new()),
    ];
    let ends = run_group(
        "g",
        members,
        d.store.clone(),
        DriverConfig::default(),
        Arc::new(StopSignal::default()),
        Arc::new(BandwidthPool::new(0)),
    )
    .await;
    assert!(matches!(ends[1], Err(crate::MasterError::Deposed(_))));
    let a = ends[0].as_ref().unwrap();
    assert_eq!(a.phase, Aborted);
    assert!(
        a.error.as_deref().unwrap().contains("group member b"),
        "{:?}",
        a.error
    );
}

#[tokio::test]
async fn past_the_last_barrier_a_member_ends_on_its_own() {
    // b's target does not verify after the cut: b fails, a stays completed
    // (every member passed the last barrier together).
    let d = dir();
    new_group(&d.store, &["a", "b"]).await;
    let (a, b) = (FakeSlave::new(), FakeSlave::new().mismatch_at(0));
    let recs = group(&d.store, &[("a", &a), ("b", &b)]).await;
    let phases: Vec<Phase> = recs.iter().map(|r| r.phase).collect();
    assert_eq!(phases, [Completed, Failed]);
    assert_eq!(a.called("abort"), 0);
}
