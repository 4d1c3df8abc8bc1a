#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! The whole chain of `csi.volmig.io` without a cluster: the CSI
//! controller (over its unix socket, as the external-provisioner and
//! -attacher drive it) and the operator's reconciler run against the fake
//! API server; two "nodes" are two real `volmig-agent` processes, each
//! with its own state directory, CSI socket and kubelet paths, serving
//! through FUSE + loop. The test plays the rest of Kubernetes: the backing
//! driver (binds backing claims, their raw devices are files), kubelet
//! (runs holder pods, calls the node plugin) and the scheduler.
//!
//! A volume is provisioned and published on n1; a SQLite database (WAL,
//! synchronous=FULL) commits through ext4 in the pod's path while a
//! VolumeMigration moves the volume live to another backing class; the
//! record then names the target, so after the pod moves (unpublish and
//! unstage on n1, publish and stage on n2) n2 attaches the target and
//! reads every committed transaction, and writes on.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::Api;
use kube::runtime::events::{Recorder, Reporter};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tonic::Code;
use volmig_api::crd::VolumeMigration;
use volmig_api::csi::volume_capability::access_mode::Mode;
use volmig_api::csi::{NodePublishVolumeRequest, NodeStageVolumeRequest, VolumeCapability};
use volmig_api::csi_driver::{BACKING_DEVICE_KEY, DRIVER_NAME};
use volmig_api::slave::VolumeInfo;
use volmig_operator::agents::{Connector, GrpcConnector, endpoint};
use volmig_operator::csi::controller::{backing_claim_name, holder_name};
use volmig_operator::csi::{Controller, Settings as CsiSettings, bind_unix, serve_unix, volume_id};
use volmig_operator::reconcile::volmig::target_claim_name;
use volmig_operator::reconcile::{Context, Settings, reconcile};
use volmig_testkit::agent::AgentProcess;
use volmig_testkit::csi::{
    CsiClient, KubeletMounts, assert_code, controller_publish_req, controller_unpublish_req,
    create_req, mount_cap, unpublish_req, unstage_req,
};
use volmig_testkit::devices::{FuseWatchdog, assert_fsck_clean};
use volmig_testkit::fake_api::FakeApi;
use volmig_testkit::k8s::{
    VM_PATH, agent_pod, app_pod, bind_claim, claim, csi_volume, install_crds, node, node_path,
    pod_path, pv_path, pvc_path, run_pod, vm, volmig_volume_path,
};
use volmig_testkit::pattern::sparse_file;
use volmig_testkit::sqlite::{SqliteWriter, check_rows};
use volmig_testkit::{MIB, certs, require_staging};

const NS: &str = "volmig-system";
const SIZE: u64 = 256 * MIB;
const SNW: Mode = Mode::SingleNodeWriter;

/// The agents as the operator reaches them: each node's agent pod address
/// (what the operator dials) mapped to the real process's gRPC address.
struct Nodes {
    grpc: GrpcConnector,
    urls: HashMap<String, String>,
}

impl Nodes {
    fn url(&self, at: &str) -> volmig_operator::Result<&str> {
        self.urls
            .get(at)
            .map(String::as_str)
            .ok_or_else(|| volmig_operator::Error::Agent {
                endpoint: at.into(),
                reason: "no agent at this address".into(),
            })
    }
}

impl Connector for Nodes {
    type Slave = <GrpcConnector as Connector>::Slave;
    fn slave(&self, at: &str) -> volmig_operator::Result<Self::Slave> {
        self.grpc.slave(self.url(at)?)
    }
    async fn volumes(&self, at: &str) -> volmig_operator::Result<Vec<VolumeInfo>> {
        self.grpc.volumes(self.url(at)?).await
    }
}

/// One node: its agent (node plugin on its CSI socket) and kubelet's
/// paths for the volume's PV and the pod.
struct NodeHost {
    /// First: kubelet's mounts are undone while the agent still serves.
    _mounts: KubeletMounts,
    name: &'static str,
    agent: AgentProcess,
    csi: CsiClient,
    staging: PathBuf,
    pod: PathBuf,
}

impl NodeHost {
    fn start(dir: &Path, name: &'static str, certs: &Path) -> Self {
        let agent = AgentProcess::builder(dir, name)
            .csi(Some(name))
            .block()
            .tls(certs)
            .start();
        let kubelet = dir.join(format!("{name}-kubelet"));
        let staging = kubelet.join("plugins/kubernetes.io/csi/csi.volmig.io/pvc-1/globalmount");
        let pod = kubelet.join("pods/app-0/volumes/kubernetes.io~csi/pvc-1/mount");
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::create_dir_all(pod.parent().unwrap()).unwrap();
        Self {
            name,
            csi: agent.csi(),
            _mounts: KubeletMounts::new(&agent.state_dir),
            agent,
            staging,
            pod,
        }
    }

    /// kubelet's NodeStage and NodePublish with what the controller said.
    async fn stage_and_publish(
        &self,
        id: &str,
        cap: &VolumeCapability,
        volume_context: &HashMap<String, String>,
        publish_context: &HashMap<String, String>,
    ) {
        let mut n = self.csi.node.clone();
        let r = n
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: id.into(),
                publish_context: publish_context.clone(),
                staging_target_path: self.staging.display().to_string(),
                volume_capability: Some(cap.clone()),
                secrets: HashMap::new(),
                volume_context: volume_context.clone(),
            })
            .await;
        assert_code(r, Code::Ok, &format!("NodeStage on {}", self.name));
        let r = n
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: id.into(),
                publish_context: publish_context.clone(),
                staging_target_path: self.staging.display().to_string(),
                target_path: self.pod.display().to_string(),
                volume_capability: Some(cap.clone()),
                readonly: false,
                secrets: HashMap::new(),
                volume_context: volume_context.clone(),
            })
            .await;
        assert_code(r, Code::Ok, &format!("NodePublish on {}", self.name));
    }

    /// kubelet's NodeUnpublish and NodeUnstage.
    async fn unpublish_and_unstage(&self, id: &str) {
        let mut n = self.csi.node.clone();
        let r = n.node_unpublish_volume(unpublish_req(id, &self.pod)).await;
        assert_code(r, Code::Ok, &format!("NodeUnpublish on {}", self.name));
        let r = n.node_unstage_volume(unstage_req(id, &self.staging)).await;
        assert_code(r, Code::Ok, &format!("NodeUnstage on {}", self.name));
    }
}

/// kubelet on `node` attached claim `pv`'s raw device for holder pod
/// `holder`: the device at the path the controller names is `file`.
fn attach(fake: &FakeApi, kubelet: &Path, holder: &str, pv: &str, file: &Path) {
    let uid = run_pod(fake, NS, holder);
    let dev = kubelet.join(format!("pods/{uid}/volumeDevices/kubernetes.io~csi"));
    std::fs::create_dir_all(&dev).unwrap();
    std::os::unix::fs::symlink(file, dev.join(pv)).unwrap();
}

/// ControllerPublish of `id` on `node` as the external-attacher repeats it:
/// ABORTED until the holder pod runs (`attach` it with the `file` behind
/// backing PV `pv`), then the publish context.
async fn controller_publish(
    csi: &CsiClient,
    fake: &FakeApi,
    kubelet: &Path,
    (id, node): (&str, &str),
    cap: &VolumeCapability,
    (pv, file): (&str, &Path),
) -> HashMap<String, String> {
    let mut c = csi.controller.clone();
    let r = c
        .controller_publish_volume(controller_publish_req(id, node, cap.clone(), false))
        .await;
    assert_code(r, Code::Aborted, "ControllerPublish before the holder runs");
    attach(fake, kubelet, &holder_name(id, node), pv, file);
    let ctx = c
        .controller_publish_volume(controller_publish_req(id, node, cap.clone(), false))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert!(
        ctx[BACKING_DEVICE_KEY].ends_with(&format!("/{pv}")),
        "{ctx:?}"
    );
    ctx
}

/// Reconciles migration `m` as the controller's requeues do, until `done`
/// holds of the API server's objects.
async fn reconcile_until(
    fake: &FakeApi,
    api: &Api<VolumeMigration>,
    ctx: &Arc<Context<Nodes>>,
    what: &str,
    secs: u64,
    done: impl Fn(&FakeApi) -> bool,
) {
    let t = Instant::now();
    while !done(fake) {
        if let Ok(vm) = api.get("m").await {
            // An error is retried, as the controller's error policy does.
            if let Err(e) = reconcile(Arc::new(vm), ctx.clone()).await {
                eprintln!("reconcile (retried): {e}");
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "never {what}: migration {}",
            fake.get(VM_PATH).unwrap_or(Value::Null)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn a_volume_is_provisioned_migrated_live_under_a_database_and_rescheduled_to_another_node() {
    require_staging();
    let dir = tempfile::tempdir().unwrap();
    let certs_dir = dir.path().join("certs");
    certs::make(&certs_dir);
    // The backing driver's raw devices: class `slow`'s and class `fast`'s.
    let (source, target) = (dir.path().join("slow.img"), dir.path().join("fast.img"));
    sparse_file(&source, SIZE);
    sparse_file(&target, SIZE);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _in_rt = rt.enter(); // the clients' channels live on it
    let n1 = NodeHost::start(dir.path(), "n1", &certs_dir);
    let n2 = NodeHost::start(dir.path(), "n2", &certs_dir);
    let _watchdogs = [
        FuseWatchdog::new(&n1.agent.fuse_mount(), Duration::from_secs(300)),
        FuseWatchdog::new(&n2.agent.fuse_mount(), Duration::from_secs(300)),
    ];
    // kubelet's root as the controller and the operator see it (one host).
    let kubelet = dir.path().join("kubelet");
    let (client, fake) = FakeApi::start();
    install_crds(&fake);
    fake.put(&node_path("n1"), node("n1"));
    fake.put(&node_path("n2"), node("n2"));
    let sock = dir.path().join("controller.sock");
    let controller = Arc::new(Controller::new(
        fake.client_as("csi-controller"),
        CsiSettings {
            namespace: NS.into(),
            holder_image: "registry.k8s.io/pause:3.10".into(),
            kubelet_dir: kubelet.display().to_string(),
            publish_wait: Duration::ZERO,
            default_bytes: SIZE,
        },
    ));
    let listener = bind_unix(&sock).unwrap();
    let path = sock.clone();
    rt.spawn(async move {
        serve_unix(controller, listener, &path, std::future::pending())
            .await
            .unwrap()
    });
    let csi = CsiClient::new(&sock);
    let cap = mount_cap("ext4", &[], SNW);
    let id = volume_id("pvc-1");

    // The provisioner: CreateVolume, retried while the backing claim is
    // Pending; the backing driver binds it to the `slow` device.
    let volume = rt.block_on(async {
        let mut c = csi.controller.clone();
        let req = || create_req("pvc-1", Some("slow"), SIZE as i64, cap.clone(), "data");
        let r = c.create_volume(req()).await;
        assert_code(
            r,
            Code::Aborted,
            "CreateVolume while the backing claim is Pending",
        );
        bind_claim(&fake, NS, &backing_claim_name(&id, 0));
        c.create_volume(req())
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
    });
    assert_eq!(volume.volume_id, id);
    let source_pv = format!("pv-{}", backing_claim_name(&id, 0));
    // What the provisioner and the scheduler made of it: the workload's
    // claim and PV, the pod on n1; and the agents' pods.
    fake.put(
        &pvc_path("data"),
        claim("data", Some("pvc-1"), "volmig", "256Mi", "Filesystem"),
    );
    let mut pv = csi_volume("pvc-1", "data", "256Mi");
    pv["spec"]["csi"] = json!({"driver": DRIVER_NAME, "volumeHandle": id});
    pv["spec"]["volumeMode"] = json!("Filesystem");
    fake.put(&pv_path("pvc-1"), pv);
    fake.put(&pod_path("db", "app-0"), app_pod("app-0", "n1", "data"));
    let (ip1, ip2) = ("10.0.0.5", "10.0.0.6");
    fake.put(&pod_path(NS, "agent-n1"), agent_pod("agent-n1", "n1", ip1));
    fake.put(&pod_path(NS, "agent-n2"), agent_pod("agent-n2", "n2", ip2));
    let workload = (
        fake.get(&pvc_path("data")).unwrap(),
        fake.get(&pv_path("pvc-1")).unwrap(),
    );

    // The attacher publishes on n1; kubelet stages and publishes there.
    let ctx1 = rt.block_on(controller_publish(
        &csi,
        &fake,
        &kubelet,
        (&id, "n1"),
        &cap,
        (&source_pv, &source),
    ));
    rt.block_on(n1.stage_and_publish(&id, &cap, &volume.volume_context, &ctx1));
    let mut db = SqliteWriter::start(&n1.pod.join("db.sqlite"));
    db.wait_commits(50, Duration::from_secs(120));

    // The operator, dialling the agents' pods.
    let settings = Settings {
        kubelet_dir: kubelet.display().to_string(),
        ..Settings::default()
    };
    let nodes = Nodes {
        grpc: GrpcConnector::new(&certs_dir, "volmig-agent").unwrap(),
        urls: HashMap::from([
            (endpoint(ip1, settings.agent_port), n1.agent.url()),
            (endpoint(ip2, settings.agent_port), n2.agent.url()),
        ]),
    };
    let (saved, _saved) = mpsc::unbounded_channel();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "volmig-operator".into(),
            instance: None,
        },
    );
    let operator = Arc::new(Context::new(
        client.clone(),
        settings,
        nodes,
        1,
        saved,
        recorder,
    ));
    let spec = json!({
        "volumes": [{"source": {"persistentVolumeClaim": "data"}, "target": {"storageClassName": "fast"}}],
        "bandwidthLimit": "32Mi", "syncGoal": "100ms", "copyMode": "Auto", "verify": "Full",
        "retainSource": false, "abort": false,
    });
    fake.put(VM_PATH, vm(spec));
    let api: Api<VolumeMigration> = Api::namespaced(fake.client_as("kubectl"), "db");
    let uid = fake.get(VM_PATH).unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let target_claim = target_claim_name(&id, &uid);
    let claim_path = |name: &str| format!("/api/v1/namespaces/{NS}/persistentvolumeclaims/{name}");

    // The migration makes the target backing claim and its holder on n1;
    // the backing driver binds it to the `fast` device, kubelet attaches.
    rt.block_on(reconcile_until(
        &fake,
        &api,
        &operator,
        "made the target claim and its holder",
        60,
        |f| {
            f.get(&claim_path(&target_claim)).is_some()
                && f.get(&pod_path(NS, &holder_name(&target_claim, "n1")))
                    .is_some()
        },
    ));
    let target_pv = bind_claim(&fake, NS, &target_claim);
    attach(
        &fake,
        &kubelet,
        &holder_name(&target_claim, "n1"),
        &target_pv,
        &target,
    );
    db.wait_commits(20, Duration::from_secs(120));
    let before = db.committed();
    rt.block_on(reconcile_until(
        &fake,
        &api,
        &operator,
        "completed",
        300,
        |f| {
            let phase = f.get(VM_PATH).unwrap()["status"]["phase"].clone();
            assert!(
                !["Failed", "Aborted"].contains(&phase.as_str().unwrap_or_default()),
                "{}",
                f.get(VM_PATH).unwrap()
            );
            phase == "Completed"
        },
    ));
    let during = db.committed() - before;
    assert!(during > 0, "no transaction while the session ran");
    eprintln!("{during} transactions while the session ran");
    db.wait_commits(50, Duration::from_secs(120));
    // The record names the target: every later publish attaches it.
    rt.block_on(reconcile_until(
        &fake,
        &api,
        &operator,
        "adopted the target in the volume's record",
        60,
        |f| f.get(&volmig_volume_path(&id)).unwrap()["status"]["currentClaim"] == target_claim,
    ));
    assert_eq!(
        std::fs::canonicalize(n1.agent.active_path(&id)).unwrap(),
        std::fs::canonicalize(&target).unwrap(),
        "n1's agent serves the volume from the target's device"
    );
    db.wait_commits(50, Duration::from_secs(120));
    let stall = db.max_latency();
    let committed = db.stop();
    eprintln!("{committed} transactions through the migration (slowest commit {stall:?})");
    let record = fake.get(&volmig_volume_path(&id)).unwrap();
    assert_eq!(record["status"]["storageClass"], "fast", "{record}");
    assert_eq!(
        record["status"]["claims"],
        json!([target_claim]),
        "the source released (retainSource: false): {record}"
    );
    assert!(
        fake.get(&claim_path(&backing_claim_name(&id, 0))).is_none(),
        "the source backing claim is released"
    );

    // The pod moves: kubelet on n1 unpublishes and unstages, the attacher
    // unpublishes n1 and publishes n2, which attaches the target.
    rt.block_on(n1.unpublish_and_unstage(&id));
    assert!(
        n1.agent.volumes().is_empty(),
        "n1's agent stopped serving the volume: {:?}",
        n1.agent.volumes()
    );
    rt.block_on(async {
        let r = csi
            .controller
            .clone()
            .controller_unpublish_volume(controller_unpublish_req(&id, "n1"))
            .await;
        assert_code(r, Code::Ok, "ControllerUnpublish on n1");
    });
    assert!(
        fake.get(&pod_path(NS, &holder_name(&target_claim, "n1")))
            .is_none(),
        "n1's holder is gone"
    );
    fake.delete(&pod_path("db", "app-0"), "Background");
    fake.put(&pod_path("db", "app-0"), app_pod("app-0", "n2", "data"));
    let ctx2 = rt.block_on(controller_publish(
        &csi,
        &fake,
        &kubelet,
        (&id, "n2"),
        &cap,
        (&target_pv, &target),
    ));
    let holder2 = fake.get(&pod_path(NS, &holder_name(&id, "n2"))).unwrap();
    assert_eq!(
        holder2["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
        target_claim.as_str(),
        "n2 attaches the target backing claim"
    );
    rt.block_on(n2.stage_and_publish(&id, &cap, &volume.volume_context, &ctx2));
    assert_eq!(
        check_rows(&n2.pod.join("db.sqlite"), committed, false),
        committed + 1,
        "every committed transaction, on n2"
    );
    // and the database goes on there
    let mut db = SqliteWriter::resume(&n2.pod.join("db.sqlite"), committed);
    db.wait_commits(50, Duration::from_secs(120));
    let more = db.stop();
    assert_eq!(
        check_rows(&n2.pod.join("db.sqlite"), more, false),
        more + 1,
        "the rows of both nodes"
    );
    assert_eq!(
        (
            fake.get(&pvc_path("data")).unwrap(),
            fake.get(&pv_path("pvc-1")).unwrap(),
        ),
        workload,
        "the workload's claim and PV never changed"
    );
    rt.block_on(n2.unpublish_and_unstage(&id));
    // The target alone holds a clean filesystem.
    assert_fsck_clean(&target);
}
