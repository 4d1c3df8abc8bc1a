#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! The phase driver with the CR-status store against a real agent on real
//! files, no cluster: the VolumeMigration lives in the fake API server (with
//! resourceVersion checks), the agent is a `volmig-agent serve` process
//! reached over gRPC with mutual TLS under the name `volmig-agent`, and a
//! writer writes over NBD through the whole migration. Afterwards the target
//! holds exactly what the writer was acknowledged for.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::fake_api::FakeApi;
use common::*;
use kube::Api;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use volmig_api::Slave;
use volmig_api::crd::VolumeMigration;
use volmig_api::phase::Phase;
use volmig_master::{
    Driver, DriverConfig, SessionConfig, SessionStore, StopSignal, create_session,
};
use volmig_operator::agents::{Connector, GrpcConnector};
use volmig_operator::status_store::CrStatusStore;

const SIZE: u64 = 64 << 20;
const HOT: u64 = 8 << 20;

struct Setup {
    dir: tempfile::TempDir,
    target: std::path::PathBuf,
    agent: Agent,
    endpoint: String,
    conn: GrpcConnector,
    fake: FakeApi,
    store: CrStatusStore,
    saved: mpsc::UnboundedReceiver<volmig_operator::status_store::Saved>,
}

fn setup(bandwidth: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    certs(&dir.path().join("certs"));
    let (src, target) = volumes(dir.path(), SIZE);
    let agent = start_agent(dir.path(), &src, "pv-data");
    let endpoint = format!("https://127.0.0.1:{}", agent.port);
    let conn = GrpcConnector::new(&dir.path().join("certs"), "volmig-agent").unwrap();
    let (client, fake) = FakeApi::start();
    let mut obj = vm(json!({
        "volumes": [{"source": {"persistentVolumeClaim": "data"}, "target": {"storageClassName": "fast"}}],
        "bandwidthLimit": bandwidth, "syncGoal": "100ms", "copyMode": "Auto", "verify": "Full",
        "retainSource": true, "abort": false,
    }));
    obj["status"] = json!({"phase": "Pending", "volumes": [
        {"source": "data", "target": "data-volmig", "volume": "pv-data", "node": "n1"}]});
    fake.put(VM_PATH, obj);
    let (tx, saved) = mpsc::unbounded_channel();
    let store = CrStatusStore::new(Api::<VolumeMigration>::namespaced(client, "db"), "db", "m")
        .with_observer(tx);
    Setup {
        dir,
        target,
        agent,
        endpoint,
        conn,
        fake,
        store,
        saved,
    }
}

fn status(fake: &FakeApi) -> Value {
    fake.get(VM_PATH).unwrap()["status"].clone()
}

#[test]
fn driver_migrates_under_writes_with_the_cr_status_as_its_store() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_rt = rt.enter();
    let mut s = setup("16Mi");
    rt.block_on(async {
        // The agent lists the volume; the operator's "is it served" check.
        assert_eq!(
            s.conn.exports(&s.endpoint).await.unwrap(),
            vec!["pv-data".to_string()]
        );

        let gens: Arc<Vec<AtomicU32>> =
            Arc::new((0..HOT / BLOCK).map(|_| AtomicU32::new(0)).collect());
        let stop_w = Arc::new(AtomicBool::new(false));
        let w = tokio::spawn(writer(
            s.agent.nbd.clone(),
            "pv-data".into(),
            gens.clone(),
            stop_w.clone(),
        ));

        let cfg = SessionConfig {
            bandwidth: 16 << 20,
            ..SessionConfig::default()
        };
        let rec = create_session(&s.store, "pv-data", &s.target, cfg, 1)
            .await
            .unwrap();
        assert_eq!(rec.phase, Phase::Activating);
        assert_eq!(status(&s.fake)["phase"], "Activating");
        // a status write that loses a race is retried by the driver
        s.fake.conflict_next("volumemigrations/m/status", 1);

        let stop = Arc::new(StopSignal::default());
        let driver = Driver::new(
            s.conn.slave(&s.endpoint).unwrap(),
            s.store.clone(),
            "pv-data",
            DriverConfig {
                epoch: 1,
                ..DriverConfig::default()
            },
            stop,
        );
        let run = tokio::spawn(async move { driver.run().await });

        // Progress shows in the status while copying; then a user raises the
        // bandwidth limit in the spec, live.
        let t = Instant::now();
        loop {
            let st = status(&s.fake);
            if st["phase"] == "Copying" && st["volumes"][0]["bytesCopied"].as_i64().unwrap_or(0) > 0
            {
                assert!(st["progress"].as_str().unwrap().ends_with('%'));
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no copy progress in the status: {st}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s.fake
            .edit(VM_PATH, |o| o["spec"]["bandwidthLimit"] = json!("512Mi"));

        let done = tokio::time::timeout(Duration::from_secs(120), run)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(done.phase, Phase::Completed, "{:?}", done.error);
        tokio::time::sleep(Duration::from_millis(200)).await; // writes land on the target
        stop_w.store(true, Ordering::Relaxed);
        let n = w.await.unwrap();
        assert!(n > 100, "the writer ran through the migration ({n} writes)");

        let st = status(&s.fake);
        assert_eq!(st["phase"], "Completed");
        assert_eq!(
            st["config"]["bandwidth"],
            512 << 20,
            "the new limit reached the record: {st}"
        );
        assert_eq!(st["volumes"][0]["redirected"], true);
        assert_eq!(st["volumes"][0]["verified"], true);
        assert_eq!(st["volumes"][0]["bytesTotal"], SIZE);
        assert_eq!(
            st["volumes"][0]["source"], "data",
            "the reconciler's fields survive"
        );
        assert!(st["cutoverStall"].as_str().unwrap().ends_with("ms"));
        let phases: Vec<&str> = st["phaseTimes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["phase"].as_str().unwrap())
            .collect();
        for p in [
            "Activating",
            "Copying",
            "Quiescing",
            "Synchronizing",
            "Redirecting",
            "Resuming",
            "Terminating",
        ] {
            assert!(phases.contains(&p), "{p} missing in {phases:?}");
        }
        let ready = st["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap();
        assert_eq!(ready["status"], "True");
        // every save was observed, phase changes in order
        let mut seen = Vec::new();
        while let Ok(x) = s.saved.try_recv() {
            if x.before != Some(x.record.phase) {
                seen.push(x.record.phase);
            }
        }
        assert_eq!(seen.first(), Some(&Phase::Activating));
        assert_eq!(seen.last(), Some(&Phase::Completed));
        assert!(
            s.fake
                .writes()
                .iter()
                .filter(|w| w.ends_with("/status"))
                .count()
                > 5
        );
        check_volume(&s.target, SIZE, &gens);
    });
    drop(s.dir);
}

#[test]
fn a_new_leader_continues_the_session_under_a_newer_epoch() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_rt = rt.enter();
    let s = setup("8Mi");
    rt.block_on(async {
        let gens: Arc<Vec<AtomicU32>> =
            Arc::new((0..HOT / BLOCK).map(|_| AtomicU32::new(0)).collect());
        let stop_w = Arc::new(AtomicBool::new(false));
        let w = tokio::spawn(writer(
            s.agent.nbd.clone(),
            "pv-data".into(),
            gens.clone(),
            stop_w.clone(),
        ));
        let cfg = SessionConfig {
            bandwidth: 8 << 20,
            ..SessionConfig::default()
        };
        create_session(&s.store, "pv-data", &s.target, cfg, 1)
            .await
            .unwrap();

        // Leader 1 drives until a quarter is copied, then is stopped (as on
        // SIGTERM or a lost lease).
        let stop1 = Arc::new(StopSignal::default());
        let d1 = Driver::new(
            s.conn.slave(&s.endpoint).unwrap(),
            s.store.clone(),
            "pv-data",
            DriverConfig {
                epoch: 1,
                ..DriverConfig::default()
            },
            stop1.clone(),
        );
        let run1 = tokio::spawn(async move { d1.run().await });
        let t = Instant::now();
        while status(&s.fake)["volumes"][0]["bytesCopied"]
            .as_u64()
            .unwrap_or(0)
            < SIZE / 4
        {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "no progress: {}",
                status(&s.fake)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop1.stop();
        let r1 = run1.await.unwrap().unwrap();
        assert!(
            !r1.phase.is_terminal(),
            "stopping a driver does not end the session"
        );
        let session = r1.session.clone();
        assert_eq!(status(&s.fake)["epoch"], 1);

        // Leader 2: the store's record, a newer epoch, same session.
        s.fake
            .edit(VM_PATH, |o| o["spec"]["bandwidthLimit"] = json!("1Gi"));
        let loaded = s.store.load("pv-data").await.unwrap().unwrap();
        assert_eq!(loaded.session, session);
        let d2 = Driver::new(
            s.conn.slave(&s.endpoint).unwrap(),
            s.store.clone(),
            "pv-data",
            DriverConfig {
                epoch: 2,
                ..DriverConfig::default()
            },
            Arc::new(StopSignal::default()),
        );
        let done = tokio::time::timeout(Duration::from_secs(120), d2.run())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(done.phase, Phase::Completed, "{:?}", done.error);
        assert_eq!(done.session, session);
        assert_eq!(status(&s.fake)["epoch"], 2);

        // The old leader's epoch is refused by the agent.
        let old = volmig_api::Fence {
            session: session.clone(),
            volume: "pv-data".into(),
            epoch: 1,
        };
        let e = s
            .conn
            .slave(&s.endpoint)
            .unwrap()
            .get_state(old)
            .await
            .unwrap_err();
        assert!(e.is(volmig_api::ErrorKind::Fenced), "{e}");

        tokio::time::sleep(Duration::from_millis(200)).await;
        stop_w.store(true, Ordering::Relaxed);
        w.await.unwrap();
        check_volume(&s.target, SIZE, &gens);
    });
}
