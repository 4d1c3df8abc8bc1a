//! The supervisor over fake agents: one job per key, admission, the
//! bandwidth pool, stop and wait.

use std::sync::Arc;
use std::time::{Duration, Instant};

use volmig_api::phase::Phase;

use super::*;
use crate::testing::{FakeSlave, dir};

fn cfg() -> DriverConfig {
    DriverConfig {
        slice: Duration::from_millis(20),
        ..DriverConfig::default()
    }
}

fn session(volume: &str, slave: &Arc<FakeSlave>) -> Job<Arc<FakeSlave>> {
    Job::Session {
        volume: volume.into(),
        slave: slave.clone(),
    }
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(20), "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait(sup: &Supervisor, key: &str) -> Vec<SessionRecord> {
    tokio::time::timeout(Duration::from_secs(20), sup.wait(key))
        .await
        .expect("the job never ended")
        .expect("no such job")
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
}

#[tokio::test]
async fn one_job_per_key_and_wait_returns_how_it_ended() {
    let d = dir();
    d.session("v").await;
    let sup = Supervisor::new(Slots::unlimited(), 0);
    let slave = FakeSlave::new().endless_copy();
    assert!(sup.start("v", session("v", &slave), d.store.clone(), cfg()));
    let other = FakeSlave::new();
    assert!(
        !sup.start("v", session("v", &other), d.store.clone(), cfg()),
        "a second job under a running key"
    );
    assert!(sup.is_running("v"));
    assert_eq!(sup.active(), 1);
    until("copying", || slave.called("copy_pass") > 0).await;
    slave.finish_copy();
    let recs = wait(&sup, "v").await;
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].phase, Phase::Completed, "{:?}", recs[0].error);
    assert!(other.calls().is_empty(), "the refused job ran");
    assert!(!sup.is_running("v"));
    assert_eq!(sup.active(), 0);
    assert!(sup.wait("v").await.is_none(), "an outcome is taken once");
}

#[tokio::test]
async fn over_the_limit_a_job_waits_queued_until_a_slot_frees() {
    let d = dir();
    d.session("a").await;
    d.session("b").await;
    let sup = Supervisor::new(Slots::in_process(1), 0);
    let (a, b) = (FakeSlave::new().endless_copy(), FakeSlave::new());
    assert!(sup.start("a", session("a", &a), d.store.clone(), cfg()));
    until("a copies", || a.called("copy_pass") > 0).await;
    assert!(sup.start("b", session("b", &b), d.store.clone(), cfg()));
    assert_eq!(
        sup.admission().unwrap(),
        Admission::Full {
            running: 2,
            limit: 1
        }
    );
    let t = Instant::now();
    while !d.record("b").await.queued {
        assert!(t.elapsed() < Duration::from_secs(20), "b never queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(b.calls().is_empty(), "b ran without a slot");
    a.finish_copy();
    let b_end = wait(&sup, "b").await;
    assert_eq!(b_end[0].phase, Phase::Completed);
    assert!(!b_end[0].queued);
    assert_eq!(wait(&sup, "a").await[0].phase, Phase::Completed);
    assert_eq!(sup.admission().unwrap(), Admission::Open);
}

#[tokio::test]
async fn admission_is_full_while_someone_holds_every_slot() {
    let sup = Supervisor::new(Slots::in_process(2), 0);
    assert_eq!(sup.admission().unwrap(), Admission::Open);
    let held: Vec<_> = (0..2)
        .map(|_| sup.slots().try_acquire().unwrap().unwrap())
        .collect();
    assert_eq!(
        sup.admission().unwrap(),
        Admission::Full {
            running: 2,
            limit: 2
        }
    );
    drop(held);
    assert_eq!(sup.admission().unwrap(), Admission::Open);
    let none = Supervisor::new(Slots::unlimited(), 0);
    assert_eq!(none.admission().unwrap(), Admission::Open);
}

#[tokio::test]
async fn sessions_share_the_pool_fairly() {
    let d = dir();
    d.session("a").await;
    d.session("b").await;
    let sup = Supervisor::new(Slots::unlimited(), 100 << 20);
    let (a, b) = (
        FakeSlave::new().endless_copy(),
        FakeSlave::new().endless_copy(),
    );
    sup.start("a", session("a", &a), d.store.clone(), cfg());
    sup.start("b", session("b", &b), d.store.clone(), cfg());
    let half = 50 << 20;
    until("both get half", || {
        a.bandwidth().last() == Some(&half) && b.bandwidth().last() == Some(&half)
    })
    .await;
    // b leaves the pool: a gets all of it.
    sup.stop("b");
    until("a gets it all", || {
        a.bandwidth().last() == Some(&(100 << 20))
    })
    .await;
    a.finish_copy();
    assert_eq!(wait(&sup, "a").await[0].phase, Phase::Completed);
    let b_end = wait(&sup, "b").await;
    assert_eq!(b_end[0].phase, Phase::Copying, "stopping ends no session");
}

#[tokio::test]
async fn stop_all_stops_every_job_between_steps() {
    let d = dir();
    let sup = Supervisor::new(Slots::in_process(1), 0);
    for v in ["a", "b"] {
        d.session(v).await;
        sup.start(
            v,
            session(v, &FakeSlave::new().endless_copy()),
            d.store.clone(),
            cfg(),
        );
    }
    until("b queued", || {
        d.store.load_now("b").unwrap().is_some_and(|r| r.queued)
    })
    .await;
    tokio::time::timeout(
        Duration::from_secs(20),
        sup.stop_all(Duration::from_secs(10)),
    )
    .await
    .unwrap();
    assert_eq!(sup.active(), 0);
    for v in ["a", "b"] {
        let end = wait(&sup, v).await;
        let r = d.record(v).await;
        assert_eq!(end[0].phase, r.phase, "{v}: its outcome stays for wait");
        assert!(!r.phase.is_terminal(), "{v}: {}", r.phase);
        assert!(!r.queued, "{v}: a stopped job is no longer queued");
    }
}

#[tokio::test]
async fn a_group_is_one_job_in_one_slot() {
    let d = dir();
    let slaves = [FakeSlave::new(), FakeSlave::new()];
    let members: Vec<_> = ["a", "b"]
        .iter()
        .zip(&slaves)
        .map(|(v, s)| Member {
            volume: v.to_string(),
            target: format!("/t/{v}").into(),
            agent: String::new(),
            shared_with: Vec::new(),
            slave: s.clone(),
        })
        .collect();
    crate::create_group(&d.store, "g", &members, &Default::default(), 1)
        .await
        .unwrap();
    let sup = Supervisor::new(Slots::in_process(1), 0);
    let job = Job::Group {
        name: "g".into(),
        members,
    };
    assert_eq!(job.volumes(), ["a", "b"]);
    assert!(sup.start("g", job, d.store.clone(), cfg()));
    let recs = wait(&sup, "g").await;
    let phases: Vec<_> = recs.iter().map(|r| (r.volume.as_str(), r.phase)).collect();
    assert_eq!(phases, [("a", Phase::Completed), ("b", Phase::Completed)]);
}
