#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! The reconciler against a mock API server (`tower_test::mock::pair`
//! serving an in-memory cluster, see `volmig_testkit::fake_api`) and an in-process
//! agent on real files: what a new, a progressing, an aborted, a deleted and
//! an invalid VolumeMigration lead to, judged by the objects and requests
//! the API server saw.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::Api;
use kube::api::DeleteParams;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use volmig_api::Slave;
use volmig_api::crd::VolumeMigration;
use volmig_api::slave::{SlaveError, SlaveResult, VolumeInfo};
use volmig_node_agent::agent::Agent;
use volmig_operator::agents::Connector;
use volmig_operator::rbac;
use volmig_operator::reconcile::{Context, FINALIZER, RETRY_FIRST, Settings, reconcile};
use volmig_operator::status_store::Saved;
use volmig_testkit::agent::{in_process, serve};
use volmig_testkit::fake_api::{FakeApi, OPERATOR};
use volmig_testkit::k8s::*;
use volmig_testkit::pattern::volume_files;
use volmig_testkit::{Expected, Writer, WriterOpts};

const SIZE: u64 = 16 << 20;

/// What the test does to an agent's calls (the agent itself is real):
/// refuse a call, fail it after the agent carried it out (a lost reply),
/// or hold it until released.
#[derive(Default)]
struct Faults {
    refuse: Mutex<HashSet<&'static str>>,
    fail_after: Mutex<HashSet<&'static str>>,
    hold: Mutex<HashSet<&'static str>>,
    /// Calls waiting in a hold now.
    waiting: Mutex<HashSet<&'static str>>,
}

impl Faults {
    fn refuse(&self, op: &'static str) {
        self.refuse.lock().unwrap().insert(op);
    }
    fn allow(&self, op: &'static str) {
        self.refuse.lock().unwrap().remove(op);
    }
    fn fail_after(&self, op: &'static str) {
        self.fail_after.lock().unwrap().insert(op);
    }
    fn hold(&self, op: &'static str) {
        self.hold.lock().unwrap().insert(op);
    }
    fn release(&self, op: &'static str) {
        self.hold.lock().unwrap().remove(op);
    }
    /// Waits until a call of `op` waits in its hold.
    async fn until_waiting(&self, op: &'static str) {
        let t = Instant::now();
        while !self.waiting.lock().unwrap().contains(op) {
            assert!(t.elapsed() < Duration::from_secs(60), "no {op} call came");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    async fn before(&self, op: &'static str) -> SlaveResult<()> {
        while self.hold.lock().unwrap().contains(op) {
            self.waiting.lock().unwrap().insert(op);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.waiting.lock().unwrap().remove(op);
        if self.refuse.lock().unwrap().contains(op) {
            return Err(SlaveError::failed(format!("the test refuses {op}")));
        }
        Ok(())
    }
    fn after(&self, op: &'static str) -> SlaveResult<()> {
        if self.fail_after.lock().unwrap().contains(op) {
            return Err(SlaveError::failed(format!(
                "the test lost the reply to {op}"
            )));
        }
        Ok(())
    }
}

/// An in-process agent behind the test's [`Faults`].
struct Faulty {
    agent: Arc<Agent>,
    faults: Arc<Faults>,
}

macro_rules! faulty {
    ($($name:ident($req:ty) -> $res:ty;)*) => {
        impl Slave for Faulty {
            $(async fn $name(&self, r: $req) -> SlaveResult<$res> {
                self.faults.before(stringify!($name)).await?;
                let out = self.agent.$name(r).await?;
                self.faults.after(stringify!($name))?;
                Ok(out)
            })*
        }
    };
}
volmig_api::slave_calls!(faulty);

/// In-process agents as the operator's connector: the agent of node n1
/// (10.0.0.5) and, for groups across nodes, of n2 (10.0.0.6).
struct InProc {
    agents: [Option<Arc<Agent>>; 2],
    faults: [Arc<Faults>; 2],
}

impl InProc {
    fn node(&self, endpoint: &str) -> volmig_operator::Result<(Arc<Agent>, Arc<Faults>)> {
        let i = match endpoint {
            "https://10.0.0.5:7443" => 0,
            "https://10.0.0.6:7443" => 1,
            e => panic!("the operator dialed {e}"),
        };
        let agent = self.agents[i]
            .clone()
            .ok_or_else(|| volmig_operator::Error::Agent {
                endpoint: endpoint.into(),
                reason: "no agent".into(),
            })?;
        Ok((agent, self.faults[i].clone()))
    }
}

impl Connector for InProc {
    type Slave = Faulty;
    fn slave(&self, endpoint: &str) -> volmig_operator::Result<Faulty> {
        let (agent, faults) = self.node(endpoint)?;
        Ok(Faulty { agent, faults })
    }
    async fn volumes(&self, endpoint: &str) -> volmig_operator::Result<Vec<VolumeInfo>> {
        let (agent, faults) = self.node(endpoint)?;
        faults
            .before("list_volumes")
            .await
            .map_err(|e| volmig_operator::Error::Agent {
                endpoint: endpoint.into(),
                reason: e.to_string(),
            })?;
        Ok(agent.list())
    }
}

struct Cluster {
    dir: tempfile::TempDir,
    source: PathBuf,
    target: PathBuf,
    agent: Arc<Agent>,
    /// Faults in the calls to the agents of n1 and n2.
    faults: [Arc<Faults>; 2],
    fake: FakeApi,
    ctx: Arc<Context<InProc>>,
    api: Api<VolumeMigration>,
    saved: mpsc::UnboundedReceiver<Saved>,
}

/// A cluster with claim `data` (volume `pv-data`) used by pod `app-0` on
/// node n1, whose agent serves `exported`; and migration `m` with `spec`.
async fn cluster(spec: Value, exported: &str) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let (source, target) = volume_files(dir.path(), SIZE);
    let agent = in_process(&dir.path().join("agent-state"));
    serve(&agent, exported, &source, false).await;
    let (client, fake) = FakeApi::start();
    fake.put(
        &pvc_path("data"),
        claim("data", Some("pv-data"), "slow", "16Mi", "Filesystem"),
    );
    fake.put(&pv_path("pv-data"), csi_volume("pv-data", "data", "16Mi"));
    fake.put(&pod_path("db", "app-0"), app_pod("app-0", "n1", "data"));
    fake.put(
        &pod_path("volmig-system", "agent-n1"),
        agent_pod("agent-n1", "n1", "10.0.0.5"),
    );
    fake.put(
        &pod_path("volmig-system", "agent-n2"),
        agent_pod("agent-n2", "n2", "10.0.0.6"),
    );
    fake.put(VM_PATH, vm(spec));
    let settings = Settings {
        kubelet_dir: dir.path().join("kubelet").display().to_string(),
        ..Settings::default()
    };
    let (tx, saved) = mpsc::unbounded_channel();
    let faults = [Arc::new(Faults::default()), Arc::new(Faults::default())];
    let ctx = context(
        client.clone(),
        settings,
        InProc {
            agents: [Some(agent.clone()), None],
            faults: faults.clone(),
        },
        tx,
    );
    // what the test itself does (kubectl's part) is not the operator's
    let api = Api::namespaced(fake.client_as("kubectl"), "db");
    Cluster {
        dir,
        source,
        target,
        agent,
        faults,
        fake,
        ctx,
        api,
        saved,
    }
}

/// Waits until `ctx`'s caches hold what the API server holds (what the
/// test just changed there reaches the reconciler through watches, as in a
/// cluster; a controller would be woken by the same events).
async fn settle(fake: &FakeApi, ctx: &Context<InProc>) {
    fn have<K: kube::Resource>(
        objs: Vec<Arc<K>>,
        path: impl Fn(&K) -> String,
    ) -> BTreeMap<String, String> {
        objs.iter()
            .map(|o| {
                (
                    path(o),
                    o.meta().resource_version.clone().unwrap_or_default(),
                )
            })
            .collect()
    }
    fn ns_path(plural: &str, m: &kube::api::ObjectMeta) -> String {
        format!(
            "/api/v1/namespaces/{}/{plural}/{}",
            m.namespace.as_deref().unwrap_or_default(),
            m.name.as_deref().unwrap_or_default()
        )
    }
    ctx.caches.ready().await.unwrap();
    let t = Instant::now();
    loop {
        let caught_up = fake.versions("/api/v1/pods")
            == have(ctx.caches.pods().state(), |p| ns_path("pods", &p.metadata))
            && fake.versions("/api/v1/persistentvolumeclaims")
                == have(ctx.caches.claims().state(), |c| {
                    ns_path("persistentvolumeclaims", &c.metadata)
                })
            && fake.versions("/api/v1/persistentvolumes")
                == have(ctx.caches.volumes().state(), |v| {
                    pv_path(v.metadata.name.as_deref().unwrap_or_default())
                });
        if caught_up {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the caches never caught up with the API server"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// An operator: what `volmig-operator run` builds.
fn context(
    client: kube::Client,
    settings: Settings,
    agents: InProc,
    saved: mpsc::UnboundedSender<Saved>,
) -> Arc<Context<InProc>> {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "volmig-operator".into(),
            instance: None,
        },
    );
    Arc::new(Context::new(client, settings, agents, 1, saved, recorder))
}

fn spec(bandwidth: &str) -> Value {
    json!({
        "volumes": [{"source": {"persistentVolumeClaim": "data"}, "target": {"storageClassName": "fast"}}],
        "bandwidthLimit": bandwidth, "syncGoal": "100ms", "copyMode": "Auto", "verify": "Full",
        "retainSource": true, "abort": false,
    })
}

/// Every request the operator sent is one the chart's RBAC grants (the
/// table in `volmig_operator::rbac`): checked at the end of every test.
impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        assert_within_rbac(&self.fake);
    }
}

fn assert_within_rbac(fake: &FakeApi) {
    let named = rbac::Named::new("volmig-operator", None);
    if let Err(e) = rbac::check(&fake.requests_of(OPERATOR), "volmig-system", &named) {
        panic!("{e}");
    }
}

impl Cluster {
    /// The cluster's context with n2's agent (10.0.0.6) reachable too.
    fn with_second_agent(&self, agent2: Arc<Agent>) -> Arc<Context<InProc>> {
        self.operator(Some(agent2))
    }

    /// A new operator process (its drivers, slots and memory fresh), with
    /// n2's agent if given.
    fn operator(&self, agent2: Option<Arc<Agent>>) -> Arc<Context<InProc>> {
        context(
            self.ctx.client.clone(),
            self.ctx.settings.clone(),
            InProc {
                agents: [Some(self.agent.clone()), agent2],
                faults: self.faults.clone(),
            },
            self.ctx.saved.clone(),
        )
    }

    async fn reconcile(&self) -> volmig_operator::Result<kube::runtime::controller::Action> {
        self.reconcile_with(&self.ctx).await
    }

    /// One reconcile of migration `m` under `ctx`.
    async fn reconcile_with(
        &self,
        ctx: &Arc<Context<InProc>>,
    ) -> volmig_operator::Result<kube::runtime::controller::Action> {
        settle(&self.fake, ctx).await;
        let vm = self.api.get("m").await.unwrap();
        reconcile(Arc::new(vm), ctx.clone()).await
    }

    fn vm(&self) -> Value {
        self.fake.get(VM_PATH).unwrap_or(Value::Null)
    }

    fn condition(&self, type_: &str) -> Value {
        self.vm()["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == type_).cloned())
            .unwrap_or(Value::Null)
    }

    /// What the provisioner, the scheduler-less kubelet and the CSI node
    /// plugin do for the holder pod: bind the target claim, run the pod,
    /// publish the raw device under the pod's directory.
    fn attach_target(&self) {
        attach(
            &self.fake,
            self.dir.path(),
            "data-volmig",
            "pv-target",
            "volmig-holder-m",
            &self.target,
        );
    }

    /// Reconciles until the migration's session exists (phase past Pending).
    async fn start(&self) {
        self.reconcile().await.unwrap(); // finalizer
        assert_eq!(self.vm()["metadata"]["finalizers"], json!([FINALIZER]));
        self.reconcile().await.unwrap(); // target claim + holder pod, waits for them
        assert_eq!(self.vm()["status"]["phase"], "Pending");
        assert_eq!(self.condition("Progressing")["reason"], "WaitingForTarget");
        self.attach_target();
        self.reconcile().await.unwrap(); // session + driver
        assert!(
            self.vm()["status"]["sessionId"].is_string(),
            "{}",
            self.vm()
        );
    }

    /// Waits until the status satisfies `f`; returns it.
    async fn wait_for(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let t = Instant::now();
        loop {
            let st = self.vm()["status"].clone();
            if f(&st) {
                return st;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "never {what}: {st}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Where `agent` sends volume `name`'s I/O now.
    fn active(agent: &Agent, name: &str) -> PathBuf {
        agent
            .list()
            .into_iter()
            .find(|v| v.name == name)
            .unwrap()
            .active
    }

    /// The target claim `claim`, its volume `pv` (reclaim policy Retain,
    /// annotated as backing `source_pv`, which names it back) and the
    /// `holders` are there, none owned by a migration.
    fn assert_kept(&self, claim: &str, pv: &str, source_pv: &str, holders: &[&str]) {
        let unowned = |o: &Value| {
            o["metadata"]["ownerReferences"]
                .as_array()
                .is_none_or(|r| r.is_empty())
        };
        let c = self
            .fake
            .get(&pvc_path(claim))
            .unwrap_or_else(|| panic!("target claim {claim} was deleted"));
        assert!(unowned(&c), "{c}");
        let v = self
            .fake
            .get(&pv_path(pv))
            .unwrap_or_else(|| panic!("target volume {pv} was deleted"));
        assert_eq!(v["spec"]["persistentVolumeReclaimPolicy"], "Retain", "{v}");
        assert_eq!(v["metadata"]["annotations"]["volmig.io/backs"], source_pv);
        assert_eq!(
            self.fake.get(&pv_path(source_pv)).unwrap()["metadata"]["annotations"]["volmig.io/backed-by"],
            pv
        );
        for h in holders {
            let p = self
                .fake
                .get(&pod_path("db", h))
                .unwrap_or_else(|| panic!("holder pod {h} was deleted"));
            assert!(unowned(&p), "{p}");
        }
    }

    async fn wait_phase(&self, phases: &[&str], secs: u64) -> Value {
        let t = Instant::now();
        loop {
            let st = self.vm()["status"].clone();
            if phases.iter().any(|p| st["phase"] == *p) {
                return st;
            }
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "never reached {phases:?}: {st}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn events(&self) -> Vec<String> {
        self.fake
            .paths()
            .into_iter()
            .filter(|p| p.starts_with("/apis/events.k8s.io/v1/namespaces/db/events/"))
            .map(|p| {
                self.fake.get(&p).unwrap()["reason"]
                    .as_str()
                    .unwrap_or("")
                    .to_string()
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_migration_gets_finalizer_target_claim_activating_then_completes() {
    let mut c = cluster(spec("8Mi"), "pv-data").await;
    c.start().await;

    // The target claim: same size and access modes, raw block, the class asked
    // for, labelled with the migration's uid (no owner reference: the garbage
    // collector must never take a target), placed on the node.
    let pvc = c.fake.get(&pvc_path("data-volmig")).unwrap();
    assert_eq!(pvc["spec"]["volumeMode"], "Block");
    assert_eq!(pvc["spec"]["storageClassName"], "fast");
    assert_eq!(pvc["spec"]["accessModes"], json!(["ReadWriteOnce"]));
    assert_eq!(
        pvc["spec"]["resources"]["requests"]["storage"],
        (SIZE).to_string()
    );
    assert!(pvc["metadata"]["ownerReferences"].is_null(), "{pvc}");
    assert_eq!(
        pvc["metadata"]["labels"]["volmig.io/migration-uid"],
        c.vm()["metadata"]["uid"]
    );
    assert_eq!(
        pvc["metadata"]["annotations"]["volume.kubernetes.io/selected-node"],
        "n1"
    );
    let holder = c.fake.get(&pod_path("db", "volmig-holder-m")).unwrap();
    assert_eq!(holder["spec"]["nodeName"], "n1");
    assert_eq!(
        holder["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
        "data-volmig"
    );
    assert_eq!(
        holder["spec"]["containers"][0]["volumeDevices"][0]["name"],
        "target"
    );

    // The session's first save is phase Activating, with the device path.
    let first = c
        .fake
        .log()
        .into_iter()
        .find(|l| l.path.ends_with("/m/status") && l.body["status"]["sessionId"].is_string())
        .unwrap();
    assert_eq!(first.body["status"]["phase"], "Activating");
    let v = &first.body["status"]["volumes"][0];
    assert_eq!(v["volume"], "pv-data");
    assert_eq!(v["node"], "n1");
    assert_eq!(
        v["agent"], "https://10.0.0.5:7443",
        "the agent on the pod's node, not n2's"
    );
    assert!(
        v["targetPath"]
            .as_str()
            .unwrap()
            .ends_with("/volumeDevices/kubernetes.io~csi/pv-target")
    );
    let first_save = c.saved.recv().await.unwrap();
    assert_eq!(
        (first_save.before, first_save.record.phase),
        (None, volmig_api::phase::Phase::Activating)
    );

    // Progress becomes status writes, then the migration completes.
    let st = c.wait_phase(&["Completed", "Failed", "Aborted"], 60).await;
    assert_eq!(st["phase"], "Completed", "{st}");
    let copied: Vec<i64> = c
        .fake
        .log()
        .iter()
        .filter(|l| l.path.ends_with("/m/status") && l.body["status"]["phase"] == "Copying")
        .map(|l| {
            l.body["status"]["volumes"][0]["bytesCopied"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert!(
        copied.len() >= 2
            && copied.windows(2).all(|w| w[0] <= w[1])
            && copied.last() > copied.first(),
        "copy progress was written as it went: {copied:?}"
    );
    assert_eq!(c.condition("Ready")["status"], "True");
    Expected::pattern(SIZE, 0).check_device(&c.target);
    let active = c
        .agent
        .list()
        .into_iter()
        .find(|v| v.name == "pv-data")
        .unwrap()
        .active;
    assert_eq!(
        std::fs::canonicalize(&active).unwrap(),
        std::fs::canonicalize(&c.target).unwrap(),
        "the agent serves the volume from the target (through the published device path) now"
    );
    assert!(
        active.ends_with("volumeDevices/kubernetes.io~csi/pv-target"),
        "{}",
        active.display()
    );

    // After completion: the rebinding is made durable.
    c.reconcile().await.unwrap();
    let tpv = c.fake.get(&pv_path("pv-target")).unwrap();
    assert_eq!(tpv["spec"]["persistentVolumeReclaimPolicy"], "Retain");
    assert_eq!(tpv["metadata"]["annotations"]["volmig.io/backs"], "pv-data");
    let spv = c.fake.get(&pv_path("pv-data")).unwrap();
    assert_eq!(
        spv["metadata"]["annotations"]["volmig.io/backed-by"],
        "pv-target"
    );
    assert!(c.fake.get(&pvc_path("data-volmig")).unwrap()["metadata"]["ownerReferences"].is_null());
    assert!(
        c.fake.get(&pod_path("db", "volmig-holder-m")).unwrap()["metadata"]["ownerReferences"]
            .is_null(),
        "the holder keeps the target attached under the workload"
    );
    assert!(
        c.fake.get(&pvc_path("data")).is_some() && c.fake.get(&pv_path("pv-data")).is_some(),
        "source kept"
    );
    assert!(
        c.events().iter().any(|e| e == "Started"),
        "{:?}",
        c.events()
    );
    assert!(
        c.events().iter().any(|e| e == "Rebound"),
        "{:?}",
        c.events()
    );
    // Deleting the completed migration leaves the workload's devices alone.
    c.api.delete("m", &DeleteParams::default()).await.unwrap();
    c.reconcile().await.unwrap();
    assert!(c.fake.get(VM_PATH).is_none(), "finalizer released");
    assert!(c.fake.get(&pod_path("db", "volmig-holder-m")).is_some());
    assert!(Path::new(&c.source).exists());
}

/// Every Event about a migration, the reconciler's and those of its
/// sessions' saves (`observe`), names it by uid as well as by name:
/// `kubectl describe` selects Events by the object's uid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_name_the_migration_by_uid() {
    let mut c = cluster(spec("1Mi"), "pv-data").await;
    let (_, empty) = mpsc::unbounded_channel();
    let saved = std::mem::replace(&mut c.saved, empty);
    let recorder = Recorder::new(
        c.ctx.client.clone(),
        Reporter {
            controller: "volmig-operator".into(),
            instance: None,
        },
    );
    tokio::spawn(volmig_operator::observe::run(
        saved,
        recorder,
        Arc::new(volmig_operator::metrics::Metrics::default()),
    ));
    c.start().await;
    c.wait_phase(&["Copying", "Refreshing", "Terminating", "Completed"], 30)
        .await;
    let uid = c.vm()["metadata"]["uid"].as_str().unwrap().to_string();
    let t = Instant::now();
    loop {
        let events: Vec<Value> = c
            .fake
            .paths()
            .into_iter()
            .filter(|p| p.starts_with("/apis/events.k8s.io/v1/namespaces/db/events/"))
            .map(|p| c.fake.get(&p).unwrap())
            .collect();
        let reasons: Vec<&str> = events.iter().filter_map(|e| e["reason"].as_str()).collect();
        // The reconciler's (Started) and a save's (Activating).
        if reasons.contains(&"Started") && reasons.contains(&"Activating") {
            for e in &events {
                assert_eq!(e["regarding"]["uid"], uid.as_str(), "{e}");
                assert_eq!(e["regarding"]["name"], "m", "{e}");
                assert_eq!(e["regarding"]["kind"], "VolumeMigration", "{e}");
            }
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "events: {reasons:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_abort_rolls_back_and_releases_the_target() {
    let c = cluster(spec("1Mi"), "pv-data").await;
    c.start().await;
    c.wait_phase(&["Copying"], 30).await;
    c.fake.edit(VM_PATH, |o| o["spec"]["abort"] = json!(true));
    let st = c.wait_phase(&["Aborted", "Failed", "Completed"], 30).await;
    assert_eq!(st["phase"], "Aborted", "{st}");
    assert_eq!(st["abortRequested"], true);
    let active = c
        .agent
        .list()
        .into_iter()
        .find(|v| v.name == "pv-data")
        .unwrap()
        .active;
    assert_eq!(active, c.source, "the workload stays on the source");
    c.reconcile().await.unwrap();
    assert!(
        c.fake.get(&pod_path("db", "volmig-holder-m")).is_none(),
        "holder pod removed"
    );
    assert_eq!(c.condition("Ready")["reason"], "Aborted");
    assert!(
        c.fake.get(&pv_path("pv-target")).unwrap()["metadata"]["annotations"].is_null(),
        "no rebinding"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_mid_migration_rolls_back_before_the_finalizer_goes() {
    let c = cluster(spec("1Mi"), "pv-data").await;
    c.start().await;
    c.wait_phase(&["Copying"], 30).await;
    c.api.delete("m", &DeleteParams::default()).await.unwrap();
    assert!(c.vm()["metadata"]["deletionTimestamp"].is_string());
    let e = c.reconcile().await.unwrap_err();
    assert!(
        matches!(e, volmig_operator::Error::WaitingForRollback(_)),
        "{e}"
    );
    assert!(
        c.fake.get(VM_PATH).is_some(),
        "the finalizer holds until the rollback is done"
    );
    let st = c.wait_phase(&["Aborted", "Failed"], 30).await;
    assert_eq!(st["phase"], "Aborted", "{st}");
    c.reconcile().await.unwrap();
    assert!(
        c.fake.get(VM_PATH).is_none(),
        "finalizer removed, object gone"
    );
    assert!(c.fake.get(&pod_path("db", "volmig-holder-m")).is_none());
    let active = c
        .agent
        .list()
        .into_iter()
        .find(|v| v.name == "pv-data")
        .unwrap()
        .active;
    assert_eq!(active, c.source);
}

/// What the provisioner, kubelet and the CSI node plugin do for a holder
/// pod: bind its claim to a new PV, run the pod, publish the raw device.
fn attach(fake: &FakeApi, dir: &Path, claim_name: &str, pv: &str, holder: &str, file: &Path) {
    fake.put(&pv_path(pv), csi_volume(pv, claim_name, "16Mi"));
    fake.edit(&pvc_path(claim_name), |c| {
        c["spec"]["volumeName"] = json!(pv);
        c["status"] = json!({"phase": "Bound", "capacity": {"storage": "16Mi"}});
    });
    let holder = pod_path("db", holder);
    fake.edit(&holder, |p| p["status"] = json!({"phase": "Running"}));
    let uid = fake.get(&holder).unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let dev = dir.join(format!(
        "kubelet/pods/{uid}/volumeDevices/kubernetes.io~csi"
    ));
    std::fs::create_dir_all(&dev).unwrap();
    std::os::unix::fs::symlink(file, dev.join(pv)).unwrap();
}

/// Writes other than the finalizer, the status and events.
fn creations(fake: &FakeApi) -> Vec<String> {
    fake.writes()
        .into_iter()
        .filter(|w| {
            !w.ends_with("/status")
                && !w.contains("events.k8s.io")
                && !w.starts_with("PATCH /apis/volmig.io")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_spec_fails_with_a_clear_message_and_creates_nothing() {
    let mut bad = spec("8Mi");
    bad["syncGoal"] = json!("fast"); // admission would refuse it; a stale CRD might not
    bad["volumes"][0]["target"]["persistentVolumeClaim"] = json!("other");
    let c = cluster(bad, "pv-data").await;
    c.reconcile().await.unwrap();
    c.reconcile().await.unwrap();
    let st = c.vm()["status"].clone();
    assert_eq!(st["phase"], "Failed");
    let d = c.condition("Degraded");
    assert_eq!(
        (d["status"].as_str(), d["reason"].as_str()),
        (Some("True"), Some("InvalidSpec"))
    );
    let msg = d["message"].as_str().unwrap();
    assert!(
        msg.contains("spec.syncGoal \"fast\" is not a duration"),
        "{msg}"
    );
    assert!(msg.contains("exactly one of storageClassName"), "{msg}");
    assert!(creations(&c.fake).is_empty(), "{:?}", creations(&c.fake));
    assert!(c.events().contains(&"InvalidSpec".to_string()));
    // nothing on the agent either
    assert!(c.agent.list()[0].session.is_none());
    // and a second pass changes nothing more
    let n = c.fake.writes().len();
    c.reconcile().await.unwrap();
    assert_eq!(c.fake.writes().len(), n);
    // a corrected spec starts
    c.fake.edit(VM_PATH, |o| {
        o["spec"]["syncGoal"] = json!("100ms");
        o["spec"]["volumes"][0]["target"] = json!({"storageClassName": "fast"});
    });
    c.reconcile().await.unwrap();
    assert_eq!(c.vm()["status"]["phase"], "Pending");
    assert_eq!(c.condition("Progressing")["reason"], "WaitingForTarget");
    assert_eq!(c.condition("Degraded")["status"], "False");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_the_agent_does_not_serve_waits_until_it_is_served() {
    // another driver's volume (csi.example.com) that no agent serves
    let c = cluster(spec("8Mi"), "some-other-volume").await;
    c.reconcile().await.unwrap();
    let first = c.reconcile().await.unwrap();
    assert_eq!(c.vm()["status"]["phase"], "Pending");
    let p = c.condition("Progressing");
    assert_eq!(p["reason"], "NotAVolmigVolume");
    let msg = p["message"].as_str().unwrap();
    assert!(
        msg.contains("pv-data")
            && msg.contains("import it first")
            && msg.contains("volmig-agent --export pv-data="),
        "{msg}"
    );
    assert_eq!(c.condition("Ready")["reason"], "NotAVolmigVolume");
    assert!(
        !c.fake
            .log()
            .iter()
            .any(|l| l.path.contains("volmigvolumes")),
        "another driver's volume has no record to look for"
    );
    assert!(c.condition("Degraded").is_null(), "waiting is not degraded");
    assert!(creations(&c.fake).is_empty(), "{:?}", creations(&c.fake));
    // it looks again, less often each time
    let second = c.reconcile().await.unwrap();
    assert_eq!(first, Action::requeue(RETRY_FIRST));
    assert_eq!(second, Action::requeue(RETRY_FIRST * 2));
    // once the agent serves the volume, the migration goes on
    serve(&c.agent, "pv-data", &c.source, false).await;
    c.reconcile().await.unwrap();
    assert_eq!(c.condition("Progressing")["reason"], "WaitingForTarget");
    c.attach_target();
    c.reconcile().await.unwrap();
    let st = c.wait_phase(&["Completed", "Failed", "Aborted"], 60).await;
    assert_eq!(st["phase"], "Completed", "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_applied_before_the_cluster_is_ready_starts_once_it_is() {
    // What a GitOps tool applies in one go arrives in any order: here the
    // migration first, then the claim, the workload, the agent, the export.
    let c = cluster(spec("64Mi"), "some-other-volume").await;
    let claim_obj = c.fake.get(&pvc_path("data")).unwrap();
    let pv_obj = c.fake.get(&pv_path("pv-data")).unwrap();
    let pod_obj = c.fake.get(&pod_path("db", "app-0")).unwrap();
    c.fake.delete(&pvc_path("data"), "Background"); // and its volume
    c.fake.delete(&pod_path("db", "app-0"), "Background");
    let agent_n1 = pod_path("volmig-system", "agent-n1");
    c.fake.edit(&agent_n1, |p| {
        p["status"]["conditions"] = json!([{"type": "Ready", "status": "False"}]);
    });
    let mut waited = Vec::new();
    let mut step = |c: &Cluster| {
        let p = c.condition("Progressing");
        assert_eq!(c.vm()["status"]["phase"], "Pending", "{}", c.vm());
        waited.push(p["reason"].as_str().unwrap().to_string());
    };
    c.reconcile().await.unwrap(); // finalizer
    c.reconcile().await.unwrap();
    step(&c);
    c.fake.put(&pv_path("pv-data"), pv_obj);
    c.fake.put(&pvc_path("data"), claim_obj);
    c.reconcile().await.unwrap();
    step(&c);
    c.fake.put(&pod_path("db", "app-0"), pod_obj);
    c.reconcile().await.unwrap();
    step(&c);
    c.fake.edit(&agent_n1, |p| {
        p["status"]["conditions"] = json!([{"type": "Ready", "status": "True"}]);
    });
    c.reconcile().await.unwrap();
    step(&c);
    serve(&c.agent, "pv-data", &c.source, false).await;
    c.reconcile().await.unwrap();
    step(&c); // the target claim is created, not bound yet
    assert_eq!(
        waited,
        [
            "SourceClaimNotFound",
            "NoConsumerPod",
            "AgentNotReady",
            "NotAVolmigVolume",
            "WaitingForTarget"
        ]
    );
    c.attach_target();
    c.reconcile().await.unwrap();
    let st = c.wait_phase(&["Completed", "Failed", "Aborted"], 60).await;
    assert_eq!(st["phase"], "Completed", "{st}");
    assert!(
        !c.fake
            .log()
            .iter()
            .any(|l| l.path.ends_with("/m/status") && l.body["status"]["phase"] == "Failed"),
        "never Failed on the way"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_an_older_operator_failed_before_it_started_is_retried() {
    let c = cluster(spec("64Mi"), "pv-data").await;
    c.fake.edit(VM_PATH, |o| {
        o["metadata"]["finalizers"] = json!([FINALIZER]);
        o["status"] = json!({"phase": "Failed", "error": "no running pod uses claim data",
            "conditions": [{"type": "Degraded", "status": "True", "reason": "NoConsumerPod",
                            "message": "no running pod uses claim data",
                            "lastTransitionTime": "2026-01-01T00:00:00.000Z"}]});
    });
    c.reconcile().await.unwrap();
    let st = c.vm()["status"].clone();
    assert_eq!(st["phase"], "Pending", "{st}");
    assert!(st["error"].is_null(), "{st}");
    assert_eq!(c.condition("Degraded")["status"], "False");
    assert_eq!(c.condition("Progressing")["reason"], "WaitingForTarget");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_used_on_two_nodes_moves_with_both_agents_and_loses_no_write() {
    // fast enough a copy that n2's writes (which no mirror covers) fit the
    // sync goal; see phase::tests for the forced cutover when they do not
    let c = cluster(spec("64Mi"), "pv-data").await;
    // claim `data` is ReadWriteMany and also used by app-1 on node n2,
    // whose agent serves the same volume (one source device, two hosts)
    c.fake.edit(&pvc_path("data"), |p| {
        p["spec"]["accessModes"] = json!(["ReadWriteMany"]);
    });
    c.fake
        .put(&pod_path("db", "app-1"), app_pod("app-1", "n2", "data"));
    let agent2 = in_process(&c.dir.path().join("agent2-state"));
    serve(&agent2, "pv-data", &c.source, false).await;
    let ctx = c.with_second_agent(agent2.clone());
    c.reconcile_with(&ctx).await.unwrap(); // finalizer
    c.reconcile_with(&ctx).await.unwrap(); // target claim, a holder pod per node
    let pvc = c.fake.get(&pvc_path("data-volmig")).unwrap();
    assert_eq!(
        pvc["spec"]["accessModes"],
        json!(["ReadWriteMany"]),
        "the target can be attached on both nodes"
    );
    let h2 = c.fake.get(&pod_path("db", "volmig-holder-m-s1")).unwrap();
    assert_eq!(h2["spec"]["nodeName"], "n2");
    assert_eq!(
        h2["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
        "data-volmig"
    );
    for holder in ["volmig-holder-m", "volmig-holder-m-s1"] {
        attach(
            &c.fake,
            c.dir.path(),
            "data-volmig",
            "pv-target",
            holder,
            &c.target,
        );
        c.reconcile_with(&ctx).await.unwrap();
    }

    // writers on both nodes from before the session starts until after it:
    // 4 KiB writes straight into each agent's interposer (what its NBD
    // export does for a pod), each on every other block of the first
    // quarter
    let expected = Expected::pattern(SIZE, 0);
    let writer = |agent: &Arc<Agent>, parity| {
        Writer::volume(
            &tokio::runtime::Handle::current(),
            agent.interposer("pv-data").unwrap(),
            expected.clone(),
            WriterOpts::hot(SIZE / 4)
                .every(2, parity)
                .seed(0x9e37_79b9 + parity),
        )
    };
    let (w1, w2) = (writer(&c.agent, 0), writer(&agent2, 1));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let st = c.vm()["status"].clone();
    assert!(st["sessionId"].is_string(), "{st}");
    let v = &st["volumes"][0];
    assert_eq!(v["node"], "n1", "the first node by name copies");
    let shared = &v["sharedWith"][0];
    assert_eq!(
        (&shared["node"], &shared["agent"], &shared["holderPod"]),
        (
            &json!("n2"),
            &json!("https://10.0.0.6:7443"),
            &json!("volmig-holder-m-s1")
        ),
        "{v}"
    );
    let uid2 = h2["metadata"]["uid"].as_str().unwrap();
    assert!(
        shared["targetPath"].as_str().unwrap().contains(uid2),
        "n2 sees the target under its own holder pod: {shared}"
    );

    let st = c.wait_phase(&["Completed", "Failed", "Aborted"], 60).await;
    assert_eq!(st["phase"], "Completed", "{st}");
    assert_eq!(st["volumes"][0]["verified"], true);
    tokio::time::sleep(Duration::from_millis(200)).await; // writes on the target
    let (n1, n2) = (w1.finish().await.writes, w2.finish().await.writes);
    assert!(n1 > 100 && n2 > 100, "both nodes wrote: {n1}, {n2}");
    expected.check_device(&c.target);
    for (agent, uid) in [
        (
            &c.agent,
            c.fake.get(&pod_path("db", "volmig-holder-m")).unwrap()["metadata"]["uid"].clone(),
        ),
        (&agent2, json!(uid2)),
    ] {
        let active = agent.list()[0].active.display().to_string();
        assert!(
            active.contains(uid.as_str().unwrap()) && active.ends_with("/pv-target"),
            "each agent serves the volume from the target through its own node's device: {active}"
        );
    }

    // Deleted right away, before a reconcile rebound it: the target and
    // both nodes' holder pods stay under the workload.
    c.fake.delete(VM_PATH, "Foreground");
    c.reconcile_with(&ctx).await.unwrap();
    assert!(c.fake.get(VM_PATH).is_none(), "finalizer released");
    c.assert_kept(
        "data-volmig",
        "pv-target",
        "pv-data",
        &["volmig-holder-m", "volmig-holder-m-s1"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_used_on_two_nodes_needs_a_read_write_many_target() {
    let c = cluster(spec("8Mi"), "pv-data").await;
    c.fake
        .put(&pod_path("db", "app-1"), app_pod("app-1", "n2", "data"));
    c.fake.put(
        &pvc_path("given"),
        claim("given", None, "fast", "16Mi", "Block"),
    );
    c.fake.edit(VM_PATH, |o| {
        o["spec"]["volumes"][0]["target"] = json!({"persistentVolumeClaim": "given"});
    });
    let agent2 = in_process(&c.dir.path().join("agent2-state"));
    serve(&agent2, "pv-data", &c.source, false).await;
    let ctx = c.with_second_agent(agent2);
    for _ in 0..2 {
        c.reconcile_with(&ctx).await.unwrap();
    }
    assert_eq!(c.vm()["status"]["phase"], "Pending");
    let p = c.condition("Progressing");
    assert_eq!(p["reason"], "TargetClaimUnsuitable", "{p}");
    let msg = p["message"].as_str().unwrap();
    assert!(
        msg.contains("n1, n2") && msg.contains("ReadWriteMany"),
        "{msg}"
    );
    assert!(creations(&c.fake).is_empty(), "{:?}", creations(&c.fake));
    // a claim the spec named is the user's: deleting the migration leaves it
    c.fake.delete(VM_PATH, "Background");
    c.reconcile_with(&ctx).await.unwrap();
    assert!(c.fake.get(VM_PATH).is_none());
    assert!(c.fake.get(&pvc_path("given")).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_migration_that_never_started_releases_what_it_made() {
    let c = cluster(spec("8Mi"), "pv-data").await;
    c.reconcile().await.unwrap();
    c.reconcile().await.unwrap(); // target claim and holder pod, waiting for them
    assert!(c.fake.get(&pvc_path("data-volmig")).is_some());
    assert!(c.fake.get(&pod_path("db", "volmig-holder-m")).is_some());
    c.fake.delete(VM_PATH, "Background");
    c.reconcile().await.unwrap();
    assert!(c.fake.get(VM_PATH).is_none());
    assert!(
        c.fake.get(&pod_path("db", "volmig-holder-m")).is_none()
            && c.fake.get(&pvc_path("data-volmig")).is_none(),
        "no data was copied: what the migration made goes (no owner reference does it for it)"
    );
    assert!(c.fake.get(&pvc_path("data")).is_some() && c.fake.get(&pv_path("pv-data")).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_concurrency_limit_a_migration_waits_in_pending() {
    let c = cluster(spec("8Mi"), "pv-data").await;
    // Other migrations' drivers hold every slot.
    let slots = c.ctx.supervisor.slots();
    let held: Vec<_> = (0..c.ctx.settings.max_concurrent)
        .map(|_| slots.try_acquire().unwrap().expect("a free slot"))
        .collect();
    c.reconcile().await.unwrap();
    let action = c.reconcile().await.unwrap();
    assert_eq!(c.vm()["status"]["phase"], "Pending");
    assert_eq!(c.condition("Progressing")["reason"], "WaitingForSlot");
    assert!(format!("{action:?}").contains("requeue"), "{action:?}");
    assert!(creations(&c.fake).is_empty());
    drop(held);
    c.reconcile().await.unwrap();
    assert_eq!(
        c.condition("Progressing")["reason"],
        "WaitingForTarget",
        "a slot came free"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_volumes_on_two_nodes_cut_over_as_one_group() {
    let c = cluster(spec("8Mi"), "pv-data").await;
    // a second volume, used on node n2, served by n2's agent
    let logs_dir = c.dir.path().join("logs");
    std::fs::create_dir_all(&logs_dir).unwrap();
    let (logs_src, logs_dst) = volume_files(&logs_dir, SIZE);
    let agent2 = in_process(&c.dir.path().join("agent2-state"));
    serve(&agent2, "pv-logs", &logs_src, false).await;
    c.fake.put(
        &pvc_path("logs"),
        claim("logs", Some("pv-logs"), "slow", "16Mi", "Filesystem"),
    );
    c.fake
        .put(&pv_path("pv-logs"), csi_volume("pv-logs", "logs", "16Mi"));
    c.fake
        .put(&pod_path("db", "app-1"), app_pod("app-1", "n2", "logs"));
    c.fake.edit(VM_PATH, |o| {
        o["spec"]["volumes"] = json!([
            {"source": {"persistentVolumeClaim": "data"}, "target": {"storageClassName": "fast"}},
            {"source": {"persistentVolumeClaim": "logs"}, "target": {"storageClassName": "fast"}},
        ]);
    });
    let ctx = c.with_second_agent(agent2.clone());
    c.reconcile_with(&ctx).await.unwrap(); // finalizer
    c.reconcile_with(&ctx).await.unwrap(); // claims, holders
    let h1 = c.fake.get(&pod_path("db", "volmig-holder-m-1")).unwrap();
    assert_eq!(
        h1["spec"]["nodeName"], "n2",
        "each volume's holder on its own node"
    );
    assert!(c.fake.get(&pvc_path("logs-volmig")).is_some());
    attach(
        &c.fake,
        c.dir.path(),
        "data-volmig",
        "pv-target",
        "volmig-holder-m",
        &c.target,
    );
    c.reconcile_with(&ctx).await.unwrap();
    assert!(
        c.vm()["status"]["sessionId"].is_null(),
        "no session while one volume still waits"
    );
    attach(
        &c.fake,
        c.dir.path(),
        "logs-volmig",
        "pv-logs-target",
        "volmig-holder-m-1",
        &logs_dst,
    );
    c.reconcile_with(&ctx).await.unwrap();
    let st = c.vm()["status"].clone();
    assert_eq!(st["sessionId"], "m", "the group's name: {st}");
    assert_eq!(st["volumes"][1]["agent"], "https://10.0.0.6:7443");

    let st = c.wait_phase(&["Completed", "Failed", "Aborted"], 60).await;
    assert_eq!(st["phase"], "Completed", "{st}");
    for v in st["volumes"].as_array().unwrap() {
        assert_eq!(v["session"]["phase"], "Completed", "{v}");
        assert_eq!(v["session"]["group"], "m");
        assert_eq!(v["redirected"], true);
    }
    Expected::pattern(SIZE, 0).check_device(&c.target);
    Expected::pattern(SIZE, 0).check_device(&logs_dst);
    c.reconcile_with(&ctx).await.unwrap(); // rebinding, both volumes
    for (src, tgt) in [("pv-data", "pv-target"), ("pv-logs", "pv-logs-target")] {
        assert_eq!(
            c.fake.get(&pv_path(src)).unwrap()["metadata"]["annotations"]["volmig.io/backed-by"],
            tgt
        );
        assert_eq!(
            c.fake.get(&pv_path(tgt)).unwrap()["spec"]["persistentVolumeReclaimPolicy"],
            "Retain"
        );
    }
}

/// A migration runs to Completed; then, before any reconcile saw that, it
/// is deleted with `policy` (what `kubectl wait --for=...Completed &&
/// kubectl delete` does; Argo CD deletes with foreground propagation).
async fn deleted_right_after_completed(policy: &str) {
    let c = cluster(spec("64Mi"), "pv-data").await;
    c.start().await;
    let st = c.wait_phase(&["Completed", "Failed", "Aborted"], 60).await;
    assert_eq!(st["phase"], "Completed", "{st}");
    c.fake.delete(VM_PATH, policy);
    c.reconcile().await.unwrap();
    assert!(c.fake.get(VM_PATH).is_none(), "finalizer released");
    c.assert_kept("data-volmig", "pv-target", "pv-data", &["volmig-holder-m"]);
    assert!(Cluster::active(&c.agent, "pv-data").ends_with("pv-target"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_completed_migration_before_rebinding_keeps_the_target() {
    deleted_right_after_completed("Background").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreground_deletion_of_a_completed_migration_keeps_the_target() {
    deleted_right_after_completed("Foreground").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_restarted_between_completed_and_rebinding_keeps_the_target() {
    let c = cluster(spec("64Mi"), "pv-data").await;
    c.start().await;
    let st = c.wait_phase(&["Completed", "Failed", "Aborted"], 60).await;
    assert_eq!(st["phase"], "Completed", "{st}");
    // The operator goes away before it reconciles the completed migration,
    // which is deleted while none runs; a new operator process finds it.
    c.ctx.supervisor.stop_all(Duration::from_secs(5)).await;
    c.fake.delete(VM_PATH, "Background");
    let restarted = c.operator(None);
    c.reconcile_with(&restarted).await.unwrap();
    assert!(c.fake.get(VM_PATH).is_none(), "finalizer released");
    c.assert_kept("data-volmig", "pv-target", "pv-data", &["volmig-holder-m"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_redirect_puts_the_workload_back_before_the_target_goes() {
    let c = cluster(spec("64Mi"), "pv-data").await;
    c.faults[0].hold("terminate");
    c.start().await;
    let expected = Expected::pattern(SIZE, 0);
    let w = Writer::volume(
        &tokio::runtime::Handle::current(),
        c.agent.interposer("pv-data").unwrap(),
        expected.clone(),
        WriterOpts::hot(SIZE / 4),
    );
    c.faults[0].until_waiting("terminate").await;
    assert!(Cluster::active(&c.agent, "pv-data").ends_with("pv-target"));
    tokio::time::sleep(Duration::from_millis(100)).await; // writes on the target
    c.fake.edit(VM_PATH, |o| o["spec"]["abort"] = json!(true));
    // the held call comes back as a step cut short by the abort
    c.faults[0].refuse("terminate");
    c.faults[0].release("terminate");
    let st = c.wait_phase(&["Aborted", "Failed", "Completed"], 60).await;
    assert_eq!(st["phase"], "Aborted", "{st}");
    assert_eq!(st["volumes"][0]["redirected"], false);
    assert_eq!(Cluster::active(&c.agent, "pv-data"), c.source);
    assert!(w.finish().await.writes > 10);
    expected.check_device(&c.source);

    c.reconcile().await.unwrap();
    assert!(c.fake.get(&pod_path("db", "volmig-holder-m")).is_none());
    c.fake.delete(VM_PATH, "Foreground");
    c.reconcile().await.unwrap();
    assert!(c.fake.get(VM_PATH).is_none());
    assert!(
        c.fake.get(&pvc_path("data-volmig")).is_none(),
        "the source is current: the target claim this migration created goes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_failed_after_redirect_keeps_the_target_it_runs_on() {
    let c = cluster(spec("64Mi"), "pv-data").await;
    // terminate fails, and so does the rollback: the workload stays on the target
    c.faults[0].refuse("terminate");
    c.faults[0].refuse("abort");
    c.start().await;
    let st = c.wait_phase(&["Completed", "Failed", "Aborted"], 60).await;
    assert_eq!(st["phase"], "Failed", "{st}");
    assert_eq!(st["volumes"][0]["redirected"], true);
    assert!(Cluster::active(&c.agent, "pv-data").ends_with("pv-target"));
    c.reconcile().await.unwrap();
    c.assert_kept("data-volmig", "pv-target", "pv-data", &["volmig-holder-m"]);
    c.fake.delete(VM_PATH, "Foreground");
    c.reconcile().await.unwrap();
    assert!(c.fake.get(VM_PATH).is_none(), "finalizer released");
    c.assert_kept("data-volmig", "pv-target", "pv-data", &["volmig-holder-m"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_redirect_reply_keeps_the_target_until_the_agent_says_where_the_workload_is() {
    let c = cluster(spec("64Mi"), "pv-data").await;
    // the agent redirects but the reply is lost; the rollback fails; and
    // for a while the agent cannot be asked where the volume's I/O goes
    c.faults[0].fail_after("redirect");
    c.faults[0].refuse("abort");
    c.start().await;
    c.faults[0].refuse("list_volumes");
    let st = c.wait_phase(&["Completed", "Failed", "Aborted"], 60).await;
    assert_eq!(st["phase"], "Failed", "{st}");
    assert_eq!(
        st["volumes"][0]["redirected"], false,
        "the record cannot tell"
    );
    assert!(Cluster::active(&c.agent, "pv-data").ends_with("pv-target"));
    let action = c.reconcile().await.unwrap();
    assert!(format!("{action:?}").contains("requeue"), "{action:?}");
    assert!(
        c.fake.get(&pod_path("db", "volmig-holder-m")).is_some(),
        "not released on a guess"
    );
    assert_eq!(
        c.fake.get(&pv_path("pv-target")).unwrap()["spec"]["persistentVolumeReclaimPolicy"],
        "Retain"
    );
    assert!(
        c.events().contains(&"TargetKept".to_string()),
        "{:?}",
        c.events()
    );
    // the agent answers: the workload runs on the target
    c.faults[0].allow("list_volumes");
    c.reconcile().await.unwrap();
    c.assert_kept("data-volmig", "pv-target", "pv-data", &["volmig-holder-m"]);
    c.fake.delete(VM_PATH, "Background");
    c.reconcile().await.unwrap();
    assert!(c.fake.get(VM_PATH).is_none());
    c.assert_kept("data-volmig", "pv-target", "pv-data", &["volmig-holder-m"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_migration_of_the_same_name_leaves_the_old_target_alone() {
    let c = cluster(spec("64Mi"), "pv-data").await;
    c.start().await;
    let st = c.wait_phase(&["Completed", "Failed", "Aborted"], 60).await;
    assert_eq!(st["phase"], "Completed", "{st}");
    c.reconcile().await.unwrap();
    c.fake.delete(VM_PATH, "Background");
    c.reconcile().await.unwrap();
    assert!(c.fake.get(VM_PATH).is_none());
    let holder_uid =
        c.fake.get(&pod_path("db", "volmig-holder-m")).unwrap()["metadata"]["uid"].clone();
    // The same manifest again: a new object. Claim data-volmig and pod
    // volmig-holder-m are the workload's device now, not a new target.
    c.fake.put(VM_PATH, vm(spec("64Mi")));
    for _ in 0..3 {
        c.reconcile().await.unwrap();
    }
    let st = c.vm()["status"].clone();
    assert!(st["sessionId"].is_null(), "{st}");
    assert_eq!(
        c.condition("Progressing")["reason"],
        "TargetClaimExists",
        "{st}"
    );
    assert_eq!(
        c.fake.get(&pod_path("db", "volmig-holder-m")).unwrap()["metadata"]["uid"],
        holder_uid
    );
    assert!(Cluster::active(&c.agent, "pv-data").ends_with("pv-target"));
    c.assert_kept("data-volmig", "pv-target", "pv-data", &["volmig-holder-m"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_member_left_on_its_target_keeps_it_when_the_group_fails() {
    let c = cluster(spec("64Mi"), "pv-data").await;
    let logs_dir = c.dir.path().join("logs");
    std::fs::create_dir_all(&logs_dir).unwrap();
    let (logs_src, logs_dst) = volume_files(&logs_dir, SIZE);
    let agent2 = in_process(&c.dir.path().join("agent2-state"));
    serve(&agent2, "pv-logs", &logs_src, false).await;
    c.fake.put(
        &pvc_path("logs"),
        claim("logs", Some("pv-logs"), "slow", "16Mi", "Filesystem"),
    );
    c.fake
        .put(&pv_path("pv-logs"), csi_volume("pv-logs", "logs", "16Mi"));
    c.fake
        .put(&pod_path("db", "app-1"), app_pod("app-1", "n2", "logs"));
    c.fake.edit(VM_PATH, |o| {
        o["spec"]["volumes"] = json!([
            {"source": {"persistentVolumeClaim": "data"}, "target": {"storageClassName": "fast"}},
            {"source": {"persistentVolumeClaim": "logs"}, "target": {"storageClassName": "fast"}},
        ]);
    });
    let ctx = c.with_second_agent(agent2.clone());
    c.faults[0].hold("terminate");
    c.faults[1].hold("terminate");
    c.reconcile_with(&ctx).await.unwrap();
    c.reconcile_with(&ctx).await.unwrap();
    attach(
        &c.fake,
        c.dir.path(),
        "data-volmig",
        "pv-target",
        "volmig-holder-m",
        &c.target,
    );
    attach(
        &c.fake,
        c.dir.path(),
        "logs-volmig",
        "pv-logs-target",
        "volmig-holder-m-1",
        &logs_dst,
    );
    c.reconcile_with(&ctx).await.unwrap();
    assert_eq!(c.vm()["status"]["sessionId"], "m");
    // Both members cut over; then logs fails to terminate and to roll back
    // (it stays on its target), while data terminates.
    c.faults[0].until_waiting("terminate").await;
    c.faults[1].until_waiting("terminate").await;
    c.faults[1].refuse("terminate");
    c.faults[1].refuse("abort");
    c.faults[1].release("terminate");
    c.wait_for("logs failed", |st| {
        st["volumes"][1]["session"]["phase"] == "Failed"
    })
    .await;
    c.faults[0].release("terminate");
    let st = c.wait_phase(&["Completed", "Failed", "Aborted"], 60).await;
    assert_eq!(st["phase"], "Failed", "{st}");
    assert_eq!(st["volumes"][0]["session"]["phase"], "Completed", "{st}");
    assert_eq!(st["volumes"][1]["redirected"], true, "{st}");
    assert!(Cluster::active(&agent2, "pv-logs").ends_with("pv-logs-target"));

    c.reconcile_with(&ctx).await.unwrap();
    c.assert_kept("data-volmig", "pv-target", "pv-data", &["volmig-holder-m"]);
    c.assert_kept(
        "logs-volmig",
        "pv-logs-target",
        "pv-logs",
        &["volmig-holder-m-1"],
    );
    c.fake.delete(VM_PATH, "Foreground");
    c.reconcile_with(&ctx).await.unwrap();
    assert!(c.fake.get(VM_PATH).is_none());
    c.assert_kept("data-volmig", "pv-target", "pv-data", &["volmig-holder-m"]);
    c.assert_kept(
        "logs-volmig",
        "pv-logs-target",
        "pv-logs",
        &["volmig-holder-m-1"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_release_s_agents_are_never_dialled() {
    let c = cluster(spec("64Mi"), "pv-data").await;
    // A second installation of the chart (release "staging") in the same
    // namespace: its ready agent on n1 is listed first. Dialling it (the
    // connector knows no 10.0.0.7) panics the test.
    c.fake.put(
        &pod_path("volmig-system", "agent-a-n1"),
        release_agent_pod("staging", "agent-a-n1", "n1", "10.0.0.7"),
    );
    c.start().await;
    assert_eq!(
        c.vm()["status"]["volumes"][0]["agent"],
        "https://10.0.0.5:7443"
    );
    let st = c.wait_phase(&["Completed", "Failed", "Aborted"], 60).await;
    assert_eq!(st["phase"], "Completed", "{st}");
    c.reconcile().await.unwrap();
    // with only the other release's agent on the node, the migration waits
    c.fake
        .delete(&pod_path("volmig-system", "agent-n1"), "Background");
    c.fake.put(VM_PATH.replace("/m", "/m2").as_str(), {
        let mut o = vm(spec("64Mi"));
        o["metadata"]["name"] = json!("m2");
        o
    });
    for _ in 0..2 {
        settle(&c.fake, &c.ctx).await;
        let m2 = c.api.get("m2").await.unwrap();
        reconcile(Arc::new(m2), c.ctx.clone()).await.unwrap();
    }
    let m2 = c.fake.get(&VM_PATH.replace("/m", "/m2")).unwrap();
    let reasons: Vec<&Value> = m2["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["type"] == "Ready" || c["type"] == "Progressing")
        .map(|c| &c["reason"])
        .collect();
    assert_eq!(reasons.len(), 2, "{m2}");
    assert!(reasons.iter().all(|r| *r == "AgentNotReady"), "{m2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_migration_is_reconciled_from_caches_not_lists() {
    let c = cluster(spec("4Mi"), "pv-data").await;
    c.start().await;
    c.wait_phase(&["Copying"], 30).await;
    c.fake.clear_log();
    // A controller reconciles the migration on every save of its status
    // (and the driver saves at least once a second while copying).
    let mut reconciles = 0;
    loop {
        let phase = c.vm()["status"]["phase"].clone();
        c.reconcile().await.unwrap();
        reconciles += 1;
        if ["Completed", "Failed", "Aborted"]
            .iter()
            .any(|p| phase == *p)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.vm()["status"]["phase"], "Completed");
    let saves = c
        .fake
        .writes()
        .iter()
        .filter(|w| w.ends_with("/m/status"))
        .count();
    assert!(
        reconciles >= 10 && saves >= 3,
        "{reconciles} reconciles, {saves} saves"
    );
    assert_eq!(
        c.fake.lists(),
        Vec::<String>::new(),
        "pods, claims and volumes come from the caches"
    );
    // the completed migration's rebinding reads them there too
    assert_eq!(
        c.fake.get(&pv_path("pv-target")).unwrap()["spec"]["persistentVolumeReclaimPolicy"],
        "Retain"
    );
}

// ---- volumes of volmig's CSI driver ---------------------------------------

mod volmig_volume {
    //! A VolumeMigration of a claim whose PV is a volume of volmig's own CSI
    //! driver: the CSI controller (`volmig_operator::csi::Controller`, in
    //! the test's process, under its own client) created and published it;
    //! the reconciler moves its backing claim, and the record says so.

    use super::*;
    use volmig_api::csi_driver::{BACKING_CLASS_PARAM, DRIVER_NAME};
    use volmig_operator::csi::controller::{
        AccessMode, Cap, CreateVolume, Modified, backing_claim_name, holder_name,
        modify_migration_name,
    };
    use volmig_operator::csi::{Controller, Kind, Settings as CsiSettings, volume_id};
    use volmig_operator::reconcile::volmig::target_claim_name;

    pub const NS: &str = "volmig-system";

    pub fn claim_path(name: &str) -> String {
        format!("/api/v1/namespaces/{NS}/persistentvolumeclaims/{name}")
    }

    pub fn cap() -> Cap {
        Cap {
            block: false,
            fs_type: "ext4".into(),
            mode: AccessMode::SingleNodeWriter,
        }
    }

    pub struct Volmig {
        pub c: Cluster,
        pub ctl: Controller,
        /// The volume id.
        pub id: String,
        /// The migration's target backing claim.
        pub target: String,
    }

    /// Volume `pvc-1` of volmig's driver (backing class `slow`, claim
    /// `db/data`, used by pod app-0) created and published on n1 by the
    /// CSI controller, served by n1's agent under its id; migration `m`
    /// (`spec`) moves it.
    pub async fn volmig_cluster(spec: Value) -> Volmig {
        volmig_cluster_with(spec, cap()).await
    }

    /// As [`volmig_cluster`], the volume created for capability `cap`.
    pub async fn volmig_cluster_with(spec: Value, cap: Cap) -> Volmig {
        let dir = tempfile::tempdir().unwrap();
        let (source, target) = volume_files(dir.path(), SIZE);
        let id = volume_id("pvc-1");
        let agent = in_process(&dir.path().join("agent-state"));
        serve(&agent, &id, &source, false).await;
        let (client, fake) = FakeApi::start();
        install_crds(&fake);
        fake.put(&node_path("n1"), node("n1"));
        fake.put(&node_path("n2"), node("n2"));
        let ctl = Controller::new(
            fake.client_as("csi-controller"),
            CsiSettings {
                namespace: NS.into(),
                holder_image: "registry.k8s.io/pause:3.10".into(),
                kubelet_dir: dir.path().join("kubelet").display().to_string(),
                publish_wait: Duration::ZERO,
                default_bytes: SIZE,
            },
        );
        let create = || CreateVolume {
            name: "pvc-1".into(),
            required_bytes: SIZE,
            caps: vec![cap.clone()],
            parameters: [
                (BACKING_CLASS_PARAM.to_string(), "slow".to_string()),
                ("csi.storage.k8s.io/pvc/name".into(), "data".into()),
                ("csi.storage.k8s.io/pvc/namespace".into(), "db".into()),
            ]
            .into(),
            ..CreateVolume::default()
        };
        assert_eq!(
            ctl.create(create()).await.unwrap_err().kind,
            Kind::Aborted,
            "pending"
        );
        bind_claim(&fake, NS, &backing_claim_name(&id, 0));
        ctl.create(create()).await.unwrap();
        // the workload's claim and PV (the provisioner's)
        fake.put(
            &pvc_path("data"),
            claim("data", Some("pvc-1"), "volmig", "16Mi", "Filesystem"),
        );
        let mut pv = csi_volume("pvc-1", "data", "16Mi");
        pv["spec"]["csi"] = json!({"driver": DRIVER_NAME, "volumeHandle": id});
        pv["spec"]["volumeMode"] = json!("Filesystem");
        fake.put(&pv_path("pvc-1"), pv);
        fake.put(&pod_path("db", "app-0"), app_pod("app-0", "n1", "data"));
        fake.put(
            &pod_path(NS, "agent-n1"),
            agent_pod("agent-n1", "n1", "10.0.0.5"),
        );
        fake.put(
            &pod_path(NS, "agent-n2"),
            agent_pod("agent-n2", "n2", "10.0.0.6"),
        );
        // ControllerPublish on n1: the holder of the first backing claim
        assert_eq!(
            ctl.publish(&id, "n1", Some(cap.clone()), false)
                .await
                .unwrap_err()
                .kind,
            Kind::Aborted
        );
        run_pod(&fake, NS, &holder_name(&id, "n1"));
        ctl.publish(&id, "n1", Some(cap), false).await.unwrap();
        fake.put(VM_PATH, vm(spec));
        let settings = Settings {
            kubelet_dir: dir.path().join("kubelet").display().to_string(),
            ..Settings::default()
        };
        let (tx, saved) = mpsc::unbounded_channel();
        let faults = [Arc::new(Faults::default()), Arc::new(Faults::default())];
        let ctx = context(
            client.clone(),
            settings,
            InProc {
                agents: [Some(agent.clone()), None],
                faults: faults.clone(),
            },
            tx,
        );
        let api = Api::namespaced(fake.client_as("kubectl"), "db");
        let uid = fake.get(VM_PATH).unwrap()["metadata"]["uid"]
            .as_str()
            .unwrap()
            .to_string();
        Volmig {
            c: Cluster {
                dir,
                source,
                target,
                agent,
                faults,
                fake,
                ctx,
                api,
                saved,
            },
            ctl,
            target: target_claim_name(&id, &uid),
            id,
        }
    }

    impl Volmig {
        pub fn record(&self) -> Value {
            self.c.fake.get(&volmig_volume_path(&self.id)).unwrap()
        }

        pub fn holder(&self, node: &str) -> String {
            holder_name(&self.target, node)
        }

        /// The backing driver binds the target claim, kubelet runs its
        /// holder on n1 and publishes the raw device (the target file).
        pub fn attach_target(&self) {
            let pv = bind_claim(&self.c.fake, NS, &self.target);
            self.attach_target_on("n1", &pv);
        }

        /// kubelet runs the target's holder on `node` and publishes its
        /// raw device (PV `pv`, the target file).
        pub fn attach_target_on(&self, node: &str, pv: &str) {
            let uid = run_pod(&self.c.fake, NS, &self.holder(node));
            let dev = self.c.dir.path().join(format!(
                "kubelet/pods/{uid}/volumeDevices/kubernetes.io~csi"
            ));
            std::fs::create_dir_all(&dev).unwrap();
            std::os::unix::fs::symlink(&self.c.target, dev.join(pv)).unwrap();
        }

        /// The target claim and its holder are there, recorded first.
        pub fn assert_target_made(&self) {
            let t = self
                .c
                .fake
                .get(&claim_path(&self.target))
                .expect("the target backing claim");
            assert_eq!(t["spec"]["volumeMode"], "Block");
            assert_eq!(t["spec"]["storageClassName"], "fast");
            assert_eq!(t["spec"]["accessModes"], json!(["ReadWriteOnce"]));
            assert_eq!(
                t["spec"]["resources"]["requests"]["storage"],
                SIZE.to_string()
            );
            assert_eq!(
                t["metadata"]["labels"]["volmig.io/volume"],
                self.id.as_str()
            );
            let r = self.record();
            assert!(
                r["status"]["claims"]
                    .as_array()
                    .unwrap()
                    .contains(&json!(self.target)),
                "{r}"
            );
            assert_eq!(r["status"]["targets"][0]["claim"], self.target.as_str());
            assert_eq!(r["status"]["targets"][0]["migration"], "db/m");
            assert_eq!(
                r["status"]["currentClaim"],
                backing_claim_name(&self.id, 0).as_str(),
                "the volume is still on its source"
            );
            // the record names the target before the claim is created
            let log = self.c.fake.log();
            let recorded = log
                .iter()
                .position(|l| {
                    l.path
                        .ends_with(&format!("/volmigvolumes/{}/status", self.id))
                        && l.body["status"]["targets"].is_array()
                })
                .expect("the record was updated");
            let created = log
                .iter()
                .position(|l| {
                    l.method == "POST"
                        && l.path.ends_with("/persistentvolumeclaims")
                        && l.body["metadata"]["name"] == self.target.as_str()
                })
                .expect("the target claim was created");
            assert!(recorded < created, "recorded before it was created");
            let h = self
                .c
                .fake
                .get(&pod_path(NS, &self.holder("n1")))
                .expect("the target's holder pod on n1");
            assert_eq!(h["spec"]["nodeName"], "n1");
            assert_eq!(
                h["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
                self.target.as_str()
            );
        }

        /// The record names the target as the volume's backing claim, with
        /// a history entry; n1's attachment holds the target through its
        /// holder; the source's holder is gone; the workload's claim and
        /// PV are as they were (`workload`).
        pub fn assert_adopted(&self, workload: &(Value, Value)) {
            let r = self.record();
            let st = &r["status"];
            assert_eq!(st["currentClaim"], self.target.as_str(), "{r}");
            assert_eq!(st["storageClass"], "fast");
            let last = st["history"].as_array().unwrap().last().unwrap().clone();
            assert_eq!(last["event"], "Migrated");
            assert_eq!(last["migration"], "db/m");
            assert_eq!(last["toClaim"], self.target.as_str());
            assert_eq!(last["fromClaim"], backing_claim_name(&self.id, 0).as_str());
            assert!(last["time"].is_string());
            assert!(st["targets"].is_null(), "{r}");
            assert_eq!(
                st["attachments"],
                json!([{"node": "n1", "holderPod": self.holder("n1"), "claim": self.target, "readonly": false}])
            );
            assert!(
                self.c
                    .fake
                    .get(&pod_path(NS, &holder_name(&self.id, "n1")))
                    .is_none(),
                "the source's holder is gone"
            );
            assert!(
                self.c.fake.get(&pod_path(NS, &self.holder("n1"))).is_some(),
                "the target's holder stays: it is the attachment's now"
            );
            assert_ne!(
                Cluster::active(&self.c.agent, &self.id),
                self.c.source,
                "the agent serves the volume from the target"
            );
            let now = (
                self.c.fake.get(&pvc_path("data")).unwrap(),
                self.c.fake.get(&pv_path("pvc-1")).unwrap(),
            );
            assert_eq!(&now, workload, "the workload's claim and PV never change");
            let vms: Vec<String> = self.c.fake.writes();
            assert!(
                !vms.iter().any(|w| w.contains("/persistentvolumes/pvc-1")
                    || w.ends_with("/persistentvolumeclaims/data")),
                "{vms:?}"
            );
        }

        pub fn workload(&self) -> (Value, Value) {
            (
                self.c.fake.get(&pvc_path("data")).unwrap(),
                self.c.fake.get(&pv_path("pvc-1")).unwrap(),
            )
        }
    }

    /// Migration to `fast`; `retain`: its retainSource.
    pub fn volmig_spec(retain: bool) -> Value {
        let mut s = spec("8Mi");
        s["retainSource"] = json!(retain);
        s
    }

    async fn moves(retain: bool) {
        let v = volmig_cluster(volmig_spec(retain)).await;
        let c = &v.c;
        let workload = v.workload();
        c.reconcile().await.unwrap(); // finalizer
        c.reconcile().await.unwrap(); // target claim + holder, waits for them
        assert_eq!(c.vm()["status"]["phase"], "Pending");
        assert_eq!(c.condition("Progressing")["reason"], "WaitingForTarget");
        v.assert_target_made();
        c.reconcile().await.unwrap();
        assert_eq!(
            c.condition("Progressing")["reason"],
            "WaitingForTarget",
            "still Pending while the target claim is"
        );
        v.attach_target();
        c.reconcile().await.unwrap(); // session + driver
        let st = c.wait_phase(&["Completed", "Failed", "Aborted"], 60).await;
        assert_eq!(st["phase"], "Completed", "{st}");
        assert_eq!(st["volumes"][0]["volume"], v.id.as_str());
        assert_eq!(st["volumes"][0]["backingNamespace"], NS);
        c.reconcile().await.unwrap(); // the record adopts the target
        v.assert_adopted(&workload);
        assert!(
            c.events().iter().any(|e| e == "BackingClaimChanged"),
            "{:?}",
            c.events()
        );
        let b0 = backing_claim_name(&v.id, 0);
        let claims = v.record()["status"]["claims"].clone();
        if retain {
            assert!(c.fake.get(&claim_path(&b0)).is_some());
            assert_eq!(claims, json!([b0, v.target]));
        } else {
            assert!(c.fake.get(&claim_path(&b0)).is_none(), "source released");
            assert_eq!(claims, json!([v.target]));
        }
        // again: nothing changes
        let before = v.record();
        c.reconcile().await.unwrap();
        assert_eq!(v.record(), before);

        // reschedule: unpublished on n1, published on n2 attaches the target
        v.ctl.unpublish(&v.id, "n1").await.unwrap();
        assert!(c.fake.get(&pod_path(NS, &v.holder("n1"))).is_none());
        assert_eq!(
            v.ctl
                .publish(&v.id, "n2", Some(cap()), false)
                .await
                .unwrap_err()
                .kind,
            Kind::Aborted
        );
        let h = c
            .fake
            .get(&pod_path(NS, &holder_name(&v.id, "n2")))
            .unwrap();
        assert_eq!(
            h["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
            v.target.as_str()
        );
        run_pod(&c.fake, NS, &holder_name(&v.id, "n2"));
        let ctx = v
            .ctl
            .publish(&v.id, "n2", Some(cap()), false)
            .await
            .unwrap();
        let dev = &ctx[volmig_api::csi_driver::BACKING_DEVICE_KEY];
        assert!(dev.ends_with(&format!("/pv-{}", v.target)), "{dev}");

        // deleting the completed migration changes nothing of the volume's
        let before = v.record();
        c.api.delete("m", &DeleteParams::default()).await.unwrap();
        c.reconcile().await.unwrap();
        assert!(c.fake.get(VM_PATH).is_none(), "finalizer removed");
        assert_eq!(v.record(), before);
        assert!(c.fake.get(&claim_path(&v.target)).is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deleting_a_migration_that_never_started_releases_its_target_backing_claim() {
        let v = volmig_cluster(volmig_spec(true)).await;
        let c = &v.c;
        let before = v.record()["status"].clone();
        c.reconcile().await.unwrap();
        c.reconcile().await.unwrap();
        v.assert_target_made();
        c.api.delete("m", &DeleteParams::default()).await.unwrap();
        c.reconcile().await.unwrap();
        assert!(c.fake.get(VM_PATH).is_none(), "finalizer removed");
        assert!(c.fake.get(&claim_path(&v.target)).is_none());
        assert!(c.fake.get(&pod_path(NS, &v.holder("n1"))).is_none());
        assert_eq!(v.record()["status"], before, "the record is as it was");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_volmig_volume_moves_to_a_new_backing_claim_keeping_the_source() {
        Box::pin(moves(true)).await; // a large future: on the heap
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_volmig_volume_moves_to_a_new_backing_claim_releasing_the_source() {
        Box::pin(moves(false)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_volmig_volume_published_on_two_nodes_moves_on_both() {
        let block_rwx = Cap {
            block: true,
            fs_type: String::new(),
            mode: AccessMode::MultiNodeMultiWriter,
        };
        let v = volmig_cluster_with(volmig_spec(true), block_rwx.clone()).await;
        let c = &v.c;
        // published on n2 too, whose agent serves the volume as well
        assert!(
            v.ctl
                .publish(&v.id, "n2", Some(block_rwx.clone()), false)
                .await
                .is_err()
        );
        run_pod(&c.fake, NS, &holder_name(&v.id, "n2"));
        v.ctl
            .publish(&v.id, "n2", Some(block_rwx), false)
            .await
            .unwrap();
        let agent2 = in_process(&c.dir.path().join("agent2-state"));
        serve(&agent2, &v.id, &c.source, false).await;
        let ctx = c.with_second_agent(agent2.clone());
        c.reconcile_with(&ctx).await.unwrap();
        c.reconcile_with(&ctx).await.unwrap();
        let t = c.fake.get(&claim_path(&v.target)).unwrap();
        assert_eq!(t["spec"]["accessModes"], json!(["ReadWriteMany"]));
        for node in ["n1", "n2"] {
            let h = c.fake.get(&pod_path(NS, &v.holder(node))).unwrap();
            assert_eq!(h["spec"]["nodeName"], node);
        }
        let pv = bind_claim(&c.fake, NS, &v.target);
        v.attach_target_on("n1", &pv);
        v.attach_target_on("n2", &pv);
        c.reconcile_with(&ctx).await.unwrap();
        let st = c.wait_phase(&["Completed", "Failed", "Aborted"], 60).await;
        assert_eq!(st["phase"], "Completed", "{st}");
        assert_eq!(st["volumes"][0]["sharedWith"][0]["node"], "n2");
        c.reconcile_with(&ctx).await.unwrap();
        let r = v.record();
        assert_eq!(r["status"]["currentClaim"], v.target.as_str());
        for (i, node) in ["n1", "n2"].iter().enumerate() {
            let a = &r["status"]["attachments"][i];
            assert_eq!(a["node"], *node);
            assert_eq!(a["claim"], v.target.as_str());
            assert_eq!(a["holderPod"], v.holder(node).as_str());
            assert!(
                c.fake
                    .get(&pod_path(NS, &holder_name(&v.id, node)))
                    .is_none()
            );
        }
        assert_ne!(Cluster::active(&agent2, &v.id), c.source, "n2 moved too");
        assert_ne!(Cluster::active(&c.agent, &v.id), c.source);
    }

    /// A node that joins a multi-node volume while a migration moves it
    /// waits (ABORTED, the attacher retries): the session runs on the
    /// agents of the nodes published when it started, and another node's
    /// writes to the source would be lost at the cutover. Once the record
    /// names the target, the node joins on the target.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_joining_during_a_migration_is_attached_after_it() {
        let block_rwx = Cap {
            block: true,
            fs_type: String::new(),
            mode: AccessMode::MultiNodeMultiWriter,
        };
        let v = volmig_cluster_with(volmig_spec(true), block_rwx.clone()).await;
        let c = &v.c;
        let join = || v.ctl.publish(&v.id, "n2", Some(block_rwx.clone()), false);
        c.reconcile().await.unwrap();
        c.reconcile().await.unwrap();
        assert_eq!(
            v.record()["status"]["targets"][0]["claim"],
            v.target.as_str(),
            "the migration recorded its target"
        );
        let e = join().await.unwrap_err();
        assert_eq!(e.kind, Kind::Aborted, "{e}");
        assert!(e.message.contains("db/m"), "names the migration: {e}");
        assert!(
            c.fake
                .get(&pod_path(NS, &holder_name(&v.id, "n2")))
                .is_none(),
            "no holder on n2 meanwhile"
        );
        assert_eq!(
            v.record()["status"]["attachments"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        v.attach_target();
        c.reconcile().await.unwrap();
        let st = c.wait_phase(&["Completed", "Failed", "Aborted"], 60).await;
        assert_eq!(st["phase"], "Completed", "{st}");
        assert_eq!(
            join().await.unwrap_err().kind,
            Kind::Aborted,
            "until the record names the target"
        );
        c.reconcile().await.unwrap();
        assert_eq!(v.record()["status"]["currentClaim"], v.target.as_str());
        assert_eq!(
            join().await.unwrap_err().kind,
            Kind::Aborted,
            "its holder does not run yet"
        );
        let h = c
            .fake
            .get(&pod_path(NS, &holder_name(&v.id, "n2")))
            .expect("n2's holder");
        assert_eq!(
            h["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
            v.target.as_str(),
            "n2 attaches the target"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_operator_restarted_mid_way_makes_the_same_end_state() {
        let v = volmig_cluster(volmig_spec(true)).await;
        let c = &v.c;
        let workload = v.workload();
        c.reconcile().await.unwrap();
        c.reconcile().await.unwrap();
        v.assert_target_made();
        // as if the operator died after creating the claim, before the holder
        c.fake.delete(&pod_path(NS, &v.holder("n1")), "Background");
        let op2 = c.operator(None);
        c.reconcile_with(&op2).await.unwrap();
        v.assert_target_made();
        assert_eq!(
            v.record()["status"]["targets"].as_array().unwrap().len(),
            1,
            "one target"
        );
        v.attach_target();
        c.reconcile_with(&op2).await.unwrap();
        let st = c.wait_phase(&["Completed", "Failed", "Aborted"], 60).await;
        assert_eq!(st["phase"], "Completed", "{st}");
        // the operator restarts between Completed and the record's update
        let op3 = c.operator(None);
        c.reconcile_with(&op3).await.unwrap();
        v.assert_adopted(&workload);
        let made: Vec<String> = c
            .fake
            .paths()
            .into_iter()
            .filter(|p| p.starts_with(&format!("/api/v1/namespaces/{NS}/")))
            .filter(|p| p.contains(&v.id))
            .collect();
        let b0 = backing_claim_name(&v.id, 0);
        let mut want = vec![
            claim_path(&b0),
            claim_path(&v.target),
            pod_path(NS, &v.holder("n1")),
        ];
        want.sort();
        let mut made = made;
        made.sort();
        assert_eq!(made, want, "nothing leaked");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_abort_before_the_redirect_releases_the_target_and_keeps_the_record() {
        let mut slow = volmig_spec(true);
        slow["bandwidthLimit"] = json!("1Mi");
        let v = volmig_cluster(slow).await;
        let c = &v.c;
        let before = v.record()["status"].clone();
        c.reconcile().await.unwrap();
        c.reconcile().await.unwrap();
        v.attach_target();
        c.reconcile().await.unwrap();
        c.wait_phase(&["Copying"], 30).await;
        c.fake.edit(VM_PATH, |o| o["spec"]["abort"] = json!(true));
        let st = c.wait_phase(&["Aborted", "Failed", "Completed"], 60).await;
        assert_eq!(st["phase"], "Aborted", "{st}");
        c.reconcile().await.unwrap();
        assert!(
            c.fake.get(&claim_path(&v.target)).is_none(),
            "target claim released"
        );
        assert!(
            c.fake.get(&pod_path(NS, &v.holder("n1"))).is_none(),
            "its holder too"
        );
        assert_eq!(v.record()["status"], before, "the record is as it was");
        assert_eq!(Cluster::active(&c.agent, &v.id), c.source);
        assert!(
            c.fake
                .get(&pod_path(NS, &holder_name(&v.id, "n1")))
                .is_some()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_modified_volume_attributes_class_moves_the_volume_the_same_way() {
        let v = volmig_cluster(volmig_spec(true)).await;
        let c = &v.c;
        c.fake.delete(VM_PATH, "Background");
        let params: BTreeMap<String, String> =
            [(BACKING_CLASS_PARAM.to_string(), "fast".to_string())].into();
        assert_eq!(
            v.ctl.modify(&v.id, &params).await.unwrap_err().kind,
            Kind::Aborted
        );
        let name = modify_migration_name(&v.id, "fast");
        let path = format!("/apis/volmig.io/v1alpha1/namespaces/db/volumemigrations/{name}");
        let uid = c.fake.get(&path).unwrap()["metadata"]["uid"]
            .as_str()
            .unwrap()
            .to_string();
        let target = target_claim_name(&v.id, &uid);
        let once = || async {
            settle(&c.fake, &c.ctx).await;
            let vm = c.api.get(&name).await.unwrap();
            reconcile(Arc::new(vm), c.ctx.clone()).await.unwrap()
        };
        once().await;
        once().await;
        let pv = bind_claim(&c.fake, NS, &target);
        let huid = run_pod(&c.fake, NS, &holder_name(&target, "n1"));
        let dev = c.dir.path().join(format!(
            "kubelet/pods/{huid}/volumeDevices/kubernetes.io~csi"
        ));
        std::fs::create_dir_all(&dev).unwrap();
        std::os::unix::fs::symlink(&c.target, dev.join(pv)).unwrap();
        once().await;
        let t = Instant::now();
        while c.fake.get(&path).unwrap()["status"]["phase"] != "Completed" {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{}",
                c.fake.get(&path).unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        once().await;
        let r = v.record();
        assert_eq!(r["status"]["currentClaim"], target.as_str(), "{r}");
        assert_eq!(r["status"]["storageClass"], "fast");
        assert_eq!(
            r["status"]["history"].as_array().unwrap().last().unwrap()["migration"],
            format!("db/{name}")
        );
        assert_eq!(v.ctl.modify(&v.id, &params).await.unwrap(), Modified::Done);
        assert_ne!(Cluster::active(&c.agent, &v.id), c.source);
    }
}
