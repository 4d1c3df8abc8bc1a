#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! Leader election over the fake API server: one holder at a time, and each
//! new leadership gets a larger fencing epoch from the Lease's transitions.

use std::time::Duration;

use volmig_operator::leader::{elect, epoch};
use volmig_operator::rbac;
use volmig_testkit::fake_api::{FakeApi, OPERATOR};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_and_epochs_grow() {
    let (client, fake) = FakeApi::start();
    let mut a = elect(client.clone(), "volmig-system", "volmig-operator", "a")
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), a.wait_for(|l| *l))
        .await
        .unwrap()
        .unwrap();
    let e1 = epoch(client.clone(), "volmig-system", "volmig-operator")
        .await
        .unwrap();
    let lease = fake
        .get("/apis/coordination.k8s.io/v1/namespaces/volmig-system/leases/volmig-operator")
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "a", "{lease}");

    let mut b = elect(client.clone(), "volmig-system", "volmig-operator", "b")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!*b.borrow(), "b must not lead while a holds the lease");
    assert!(*a.borrow());

    drop(a); // releases the lease
    tokio::time::timeout(Duration::from_secs(40), b.wait_for(|l| *l))
        .await
        .unwrap()
        .unwrap();
    let e2 = epoch(client.clone(), "volmig-system", "volmig-operator")
        .await
        .unwrap();
    assert!(
        e2 > e1,
        "a new leadership has a newer epoch ({e1} then {e2})"
    );

    // leader election stays within the chart's RBAC (its Lease, by name)
    let named = rbac::Named::new("volmig-operator", None);
    rbac::check(&fake.requests_of(OPERATOR), "volmig-system", &named).unwrap();
}
