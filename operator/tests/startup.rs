#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! The operator refuses to run against a CRD it was not built for (missing,
//! or with another schema hash), saying how to update it, and starts once
//! the CRD is current, without a restart.

use std::time::Duration;

use serde_json::json;
use volmig_operator::crd_gen::{self, SCHEMA_HASH};
use volmig_operator::rbac;
use volmig_operator::startup::{CrdMismatch, check_crd, wait_for_current_crd};
use volmig_testkit::fake_api::{FakeApi, OPERATOR};

const CRD_PATH: &str =
    "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/volumemigrations.volmig.io";
const VOLUME_CRD_PATH: &str =
    "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/volmigvolumes.volmig.io";

/// The CSI driver's record CRD as this build makes it.
fn volume_crd() -> serde_json::Value {
    serde_json::to_value(crd_gen::volume_crd().unwrap()).unwrap()
}

fn served(hash: Option<&str>) -> serde_json::Value {
    let mut crd = serde_json::to_value(crd_gen::crd().unwrap()).unwrap();
    match hash {
        Some(h) => crd["metadata"]["annotations"][SCHEMA_HASH] = json!(h),
        None => {
            crd["metadata"]["annotations"]
                .as_object_mut()
                .unwrap()
                .remove(SCHEMA_HASH);
        }
    }
    crd
}

fn says_how_to_update(msg: &str) {
    assert!(
        msg.contains("helm upgrade")
            && msg.contains("volmig-operator crd | kubectl apply --server-side"),
        "the message must say how to update the CRD: {msg}"
    );
}

#[tokio::test]
async fn a_missing_or_stale_crd_is_refused_with_how_to_update_it() {
    let (client, fake) = FakeApi::start();
    fake.put(VOLUME_CRD_PATH, volume_crd());
    let e = check_crd(&client).await.unwrap_err();
    assert!(matches!(e, CrdMismatch::Missing { .. }), "{e:?}");
    says_how_to_update(&e.to_string());

    // an older chart's CRD: no hash at all
    fake.put(CRD_PATH, served(None));
    let e = check_crd(&client).await.unwrap_err();
    assert!(matches!(e, CrdMismatch::Stale { .. }), "{e:?}");
    assert!(
        e.to_string()
            .contains("no volmig.io/schema-hash annotation"),
        "{e}"
    );
    says_how_to_update(&e.to_string());

    // another version's schema
    fake.put(CRD_PATH, served(Some("sha256:0123")));
    let e = check_crd(&client).await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, CrdMismatch::Stale { .. }), "{e:?}");
    assert!(
        msg.contains("sha256:0123") && msg.contains(&crd_gen::schema_hash().unwrap()),
        "the message names both schemas: {msg}"
    );
    says_how_to_update(&msg);

    // the CRD this build generates
    fake.put(CRD_PATH, served(Some(&crd_gen::schema_hash().unwrap())));
    check_crd(&client).await.unwrap();
    // and exactly the checked-in file (what helm and kubectl apply install)
    let file: serde_json::Value = serde_saphyr::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../crds/volumemigrations.volmig.io.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    fake.put(CRD_PATH, file);
    check_crd(&client).await.unwrap();

    // reading the CRD is within the chart's RBAC (by name)
    let named = rbac::Named::new("volmig-operator", None);
    rbac::check(&fake.requests_of(OPERATOR), "volmig-system", &named).unwrap();
}

#[tokio::test]
async fn a_refused_operator_starts_once_the_crd_is_updated() {
    let (client, fake) = FakeApi::start();
    fake.put(VOLUME_CRD_PATH, volume_crd());
    fake.put(CRD_PATH, served(Some("sha256:old")));
    let c = client.clone();
    let waiting = tokio::spawn(async move {
        wait_for_current_crd(&c, Duration::from_millis(50), std::future::pending()).await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "the operator must not run with a stale CRD"
    );
    fake.put(CRD_PATH, served(Some(&crd_gen::schema_hash().unwrap())));
    let started = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("started once the CRD was updated")
        .unwrap();
    assert!(started);

    // and a stop while refused ends the wait
    fake.put(CRD_PATH, served(None));
    let stopped = wait_for_current_crd(&client, Duration::from_secs(60), async {
        tokio::time::sleep(Duration::from_millis(100)).await
    })
    .await;
    assert!(!stopped);
}

/// The CSI driver's record CRD is checked as well: a stale one would let
/// the API server drop the fields of a volume's record this build writes
/// (a migration's target, the attachments).
#[tokio::test]
async fn a_stale_volume_record_crd_is_refused_too() {
    let (client, fake) = FakeApi::start();
    fake.put(CRD_PATH, served(Some(&crd_gen::schema_hash().unwrap())));
    let e = check_crd(&client).await.unwrap_err();
    assert!(
        matches!(&e, CrdMismatch::Missing { name, .. } if name == "volmigvolumes.volmig.io"),
        "{e:?}"
    );
    let mut stale = volume_crd();
    stale["metadata"]["annotations"][SCHEMA_HASH] = json!("sha256:old");
    fake.put(VOLUME_CRD_PATH, stale);
    let msg = check_crd(&client).await.unwrap_err().to_string();
    assert!(
        msg.contains("volmigvolumes.volmig.io")
            && msg.contains("sha256:old")
            && msg.contains("volmig-operator crd --volumes | kubectl apply --server-side")
            && msg.contains("crds/volmigvolumes.volmig.io.yaml"),
        "{msg}"
    );
    fake.put(VOLUME_CRD_PATH, volume_crd());
    check_crd(&client).await.unwrap();
    let named = rbac::Named::new("volmig-operator", None);
    rbac::check(&fake.requests_of(OPERATOR), "volmig-system", &named).unwrap();
}
