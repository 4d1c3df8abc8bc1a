#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! The phase driver with the CR-status store against a real agent on real
//! files, no cluster: the VolumeMigration lives in the fake API server (with
//! resourceVersion checks), the agent is a `volmig-agent serve` process
//! reached over gRPC with mutual TLS under the name `volmig-agent`, and a
//! writer writes over NBD through the whole migration. Afterwards the target
//! holds exactly what the writer was acknowledged for.

use std::sync::Arc;
use std::time::{Duration, Instant};

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
use volmig_testkit::agent::AgentProcess;
use volmig_testkit::fake_api::FakeApi;
use volmig_testkit::k8s::{VM_PATH, vm};
use volmig_testkit::pattern::volume_files;
use volmig_testkit::{Expected, Writer, WriterOpts, certs};

const SIZE: u64 = 64 << 20;
const HOT: u64 = 8 << 20;

struct Setup {
    dir: tempfile::TempDir,
    target: std::path::PathBuf,
    /// What the source holds; the writer's writes go in too.
    expected: Arc<Expected>,
    agent: AgentProcess,
    endpoint: String,
    conn: GrpcConnector,
    fake: FakeApi,
    store: CrStatusStore,
    saved: mpsc::UnboundedReceiver<volmig_operator::status_store::Saved>,
}

fn setup(bandwidth: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    certs::make(&dir.path().join("certs"));
    let (src, target) = volume_files(dir.path(), SIZE);
    let expected = Expected::of_file(&src);
    let agent = AgentProcess::builder(dir.path(), "agent")
        .export("pv-data", &src)
        .tls(&dir.path().join("certs"))
        .start();
    let endpoint = agent.url();
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
        expected,
        agent,
        endpoint,
        conn,
        fake,
        store,
        saved,
    }
}

impl Setup {
    /// The workload: writes over NBD through the whole migration.
    fn writer(&self) -> Writer {
        self.agent.writer(
            &tokio::runtime::Handle::current(),
            "pv-data",
            self.expected.clone(),
            WriterOpts::hot(HOT).pause(Duration::from_micros(300)),
        )
    }

    /// A driver of the session under `epoch`.
    fn driver(
        &self,
        epoch: u64,
        stop: Arc<StopSignal>,
    ) -> Driver<volmig_master::GrpcSlave, CrStatusStore> {
        Driver::new(
            self.conn.slave(&self.endpoint).unwrap(),
            self.store.clone(),
            "pv-data",
            DriverConfig {
                epoch,
                ..DriverConfig::default()
            },
            stop,
        )
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

        let w = s.writer();

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
        let driver = s.driver(1, stop);
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
        let n = w.finish().await.writes;
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
        s.expected.check_device(&s.target);
    });
    drop(s.dir);
}

#[test]
fn a_new_leader_continues_the_session_under_a_newer_epoch() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_rt = rt.enter();
    let s = setup("8Mi");
    rt.block_on(async {
        let w = s.writer();
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
        let d1 = s.driver(1, stop1.clone());
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
        let d2 = s.driver(2, Arc::new(StopSignal::default()));
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
        w.finish().await;
        s.expected.check_device(&s.target);
    });
}
