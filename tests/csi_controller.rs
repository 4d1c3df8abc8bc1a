#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! The CSI controller of `csi.volmig.io` (`volmig_operator::csi`) over its
//! unix socket, driven as the external-provisioner, -attacher and -resizer
//! drive it, against the fake Kubernetes API server (the test plays the
//! volume controller, the backing driver and kubelet: it binds claims and
//! runs pods). What each call did is judged by the objects the API server
//! holds; the error codes are the CSI spec's and csi-sanity's controller
//! cases that apply (no snapshots, no cloning, no ListVolumes).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tonic::Code;
use volmig_api::csi::volume_capability::access_mode::Mode;
use volmig_api::csi::{
    CapacityRange, ControllerExpandVolumeRequest, ControllerGetCapabilitiesRequest,
    ControllerModifyVolumeRequest, DeleteVolumeRequest, GetPluginCapabilitiesRequest,
    GetPluginInfoRequest, ValidateVolumeCapabilitiesRequest, VolumeContentSource,
};
use volmig_api::csi_driver::{BACKING_CLASS_PARAM, BACKING_DEVICE_KEY, DRIVER_NAME, SIZE_KEY};
use volmig_operator::csi::controller::{backing_claim_name, holder_name, modify_migration_name};
use volmig_operator::csi::{Controller, Settings, bind_unix, serve_unix, volume_id};
use volmig_operator::reconcile::volmig::target_claim_name;
use volmig_testkit::csi::{
    CsiClient, assert_code, block_cap, controller_publish_req, controller_unpublish_req,
    create_req, mount_cap,
};
use volmig_testkit::fake_api::FakeApi;
use volmig_testkit::k8s::{
    bind_claim, install_crds, node, node_path, pod_path, run_pod, volmig_volume_path,
};

const NS: &str = "volmig-system";
const GIB: i64 = 1 << 30;

struct Ctl {
    fake: FakeApi,
    csi: CsiClient,
    _dir: tempfile::TempDir,
}

/// The controller on a socket in a fresh directory, over a fake API
/// server with nodes n1 and n2.
async fn start() -> Ctl {
    let dir = tempfile::tempdir().unwrap();
    let (client, fake) = FakeApi::start();
    install_crds(&fake);
    fake.put(&node_path("n1"), node("n1"));
    fake.put(&node_path("n2"), node("n2"));
    let controller = Arc::new(Controller::new(
        client,
        Settings {
            namespace: NS.into(),
            holder_image: "registry.k8s.io/pause:3.10".into(),
            kubelet_dir: "/var/lib/kubelet".into(),
            publish_wait: Duration::ZERO,
            default_bytes: 1 << 30,
        },
    ));
    let sock = dir.path().join("csi.sock");
    let listener = bind_unix(&sock).unwrap();
    let path = sock.clone();
    tokio::spawn(async move {
        serve_unix(controller, listener, &path, std::future::pending())
            .await
            .unwrap()
    });
    Ctl {
        fake,
        csi: CsiClient::new(&sock),
        _dir: dir,
    }
}

fn claim_path(name: &str) -> String {
    format!("/api/v1/namespaces/{NS}/persistentvolumeclaims/{name}")
}

fn mount() -> volmig_api::csi::VolumeCapability {
    mount_cap("ext4", &[], Mode::SingleNodeWriter)
}

impl Ctl {
    /// The record of volume `id`.
    fn record(&self, id: &str) -> Value {
        self.fake
            .get(&volmig_volume_path(id))
            .unwrap_or_else(|| panic!("no record of {id}"))
    }

    /// Creates volume `name` (claim `db/data`) of 1 GiB on backing class
    /// `fast`, binding its backing claim: its id.
    async fn provisioned(&mut self, name: &str) -> String {
        let r = self
            .csi
            .controller
            .create_volume(create_req(name, Some("fast"), GIB, mount(), "data"))
            .await;
        assert_code(
            r,
            Code::Aborted,
            "CreateVolume before the backing claim is bound",
        );
        let id = volume_id(name);
        bind_claim(&self.fake, NS, &backing_claim_name(&id, 0));
        let v = self
            .csi
            .controller
            .create_volume(create_req(name, Some("fast"), GIB, mount(), "data"))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(v.volume_id, id);
        id
    }

    /// Publishes `id` on `node`, running the holder pod: the publish
    /// context's backing device.
    async fn published(&mut self, id: &str, node: &str) -> String {
        let r = self
            .csi
            .controller
            .controller_publish_volume(controller_publish_req(id, node, mount(), false))
            .await;
        assert_code(r, Code::Aborted, "publish before the holder pod runs");
        let uid = run_pod(&self.fake, NS, &holder_name(id, node));
        let ctx = self
            .csi
            .controller
            .controller_publish_volume(controller_publish_req(id, node, mount(), false))
            .await
            .unwrap()
            .into_inner()
            .publish_context;
        let dev = ctx[BACKING_DEVICE_KEY].clone();
        assert!(
            dev.starts_with(&format!(
                "/var/lib/kubelet/pods/{uid}/volumeDevices/kubernetes.io~csi/"
            )),
            "{dev}"
        );
        dev
    }
}

#[tokio::test]
async fn identity_and_capabilities() {
    let mut c = start().await;
    let info = c
        .csi
        .identity
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, DRIVER_NAME);
    let caps = c
        .csi
        .identity
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    use volmig_api::csi::plugin_capability::{Type as P, service::Type as S};
    let services: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(P::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    assert_eq!(
        services,
        [S::ControllerService as i32],
        "no VOLUME_ACCESSIBILITY_CONSTRAINTS: volumes follow their pods to any node"
    );
    let ctl = c
        .csi
        .controller
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    use volmig_api::csi::controller_service_capability::{Type, rpc::Type as Rpc};
    let mut have: Vec<i32> = ctl
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(Type::Rpc(r)) => Some(r.r#type),
            _ => None,
        })
        .collect();
    have.sort();
    let mut want = vec![
        Rpc::CreateDeleteVolume as i32,
        Rpc::PublishUnpublishVolume as i32,
        Rpc::ExpandVolume as i32,
        Rpc::ModifyVolume as i32,
    ];
    want.sort();
    assert_eq!(have, want);
}

#[tokio::test]
async fn create_volume_makes_a_block_backing_claim_and_a_record() {
    let mut c = start().await;
    let ctl = &mut c.csi.controller;
    // the required fields, in csi-sanity's order
    let mut r = create_req("", Some("fast"), GIB, mount(), "data");
    assert_code(
        ctl.create_volume(r.clone()).await,
        Code::InvalidArgument,
        "no name",
    );
    r.name = "pvc-1".into();
    r.volume_capabilities.clear();
    assert_code(
        ctl.create_volume(r).await,
        Code::InvalidArgument,
        "no capabilities",
    );
    let msg = assert_code(
        ctl.create_volume(create_req("pvc-1", None, GIB, mount(), "data"))
            .await,
        Code::InvalidArgument,
        "no backingStorageClass",
    );
    assert!(msg.contains(BACKING_CLASS_PARAM), "{msg}");
    let mut r = create_req("pvc-1", Some("fast"), GIB, mount(), "data");
    r.parameters.insert("replicas".into(), "3".into());
    let msg = assert_code(
        ctl.create_volume(r).await,
        Code::InvalidArgument,
        "unknown parameter",
    );
    assert!(msg.contains("replicas"), "{msg}");
    let mut r = create_req("pvc-1", Some("fast"), GIB, mount(), "data");
    r.volume_content_source = Some(VolumeContentSource::default());
    assert_code(
        ctl.create_volume(r).await,
        Code::InvalidArgument,
        "a content source",
    );
    let mut r = create_req("pvc-1", Some("fast"), GIB + 1, mount(), "data");
    r.capacity_range = Some(CapacityRange {
        required_bytes: GIB + 1,
        limit_bytes: GIB + 1,
    });
    assert_code(
        ctl.create_volume(r).await,
        Code::OutOfRange,
        "a range MiB rounding misses",
    );
    assert_code(
        ctl.create_volume(create_req(
            "pvc-1",
            Some("fast"),
            GIB,
            mount_cap("zfs", &[], Mode::SingleNodeWriter),
            "data",
        ))
        .await,
        Code::InvalidArgument,
        "a filesystem the node plugin does not make",
    );
    assert!(
        c.fake.writes().is_empty(),
        "a refused CreateVolume changes nothing: {:?}",
        c.fake.writes()
    );

    // Pending backing claim: the provisioner retries
    for _ in 0..2 {
        let msg = assert_code(
            ctl.create_volume(create_req("pvc-1", Some("fast"), GIB, mount(), "data"))
                .await,
            Code::Aborted,
            "backing claim Pending",
        );
        assert!(msg.contains("Pending"), "{msg}");
    }
    let id = volume_id("pvc-1");
    let b0 = backing_claim_name(&id, 0);
    let claim = c.fake.get(&claim_path(&b0)).expect("the backing claim");
    assert_eq!(claim["spec"]["volumeMode"], "Block");
    assert_eq!(claim["spec"]["storageClassName"], "fast");
    assert_eq!(claim["spec"]["accessModes"], json!(["ReadWriteOnce"]));
    assert_eq!(
        claim["spec"]["resources"]["requests"]["storage"],
        GIB.to_string()
    );
    assert_eq!(claim["metadata"]["labels"]["volmig.io/volume"], id.as_str());
    assert!(claim["metadata"]["ownerReferences"].is_null());
    let rec = c.record(&id);
    assert_eq!(rec["spec"]["requestName"], "pvc-1");
    assert_eq!(
        rec["spec"]["claim"],
        json!({"namespace": "db", "name": "data"})
    );
    assert_eq!(rec["status"]["currentClaim"], b0.as_str());
    assert_eq!(rec["status"]["claims"], json!([b0]));
    assert_eq!(rec["status"]["history"][0]["event"], "Created");
    let claims = c
        .fake
        .paths()
        .into_iter()
        .filter(|p| p.contains("/persistentvolumeclaims/"))
        .count();
    assert_eq!(claims, 1, "repeats make one backing claim");

    // bound: the volume
    bind_claim(&c.fake, NS, &b0);
    let ctl = &mut c.csi.controller;
    let v = ctl
        .create_volume(create_req("pvc-1", Some("fast"), GIB, mount(), "data"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.volume_id, id);
    assert!(v.capacity_bytes >= GIB);
    assert_eq!(v.volume_context[SIZE_KEY], GIB.to_string());
    assert!(v.accessible_topology.is_empty());
    // idempotent on the name; an incompatible repeat is ALREADY_EXISTS
    let again = ctl
        .create_volume(create_req("pvc-1", Some("fast"), GIB, mount(), "data"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again, v);
    assert_code(
        ctl.create_volume(create_req("pvc-1", Some("fast"), 2 * GIB, mount(), "data"))
            .await,
        Code::AlreadyExists,
        "another capacity",
    );
    assert_code(
        ctl.create_volume(create_req("pvc-1", Some("slow"), GIB, mount(), "data"))
            .await,
        Code::AlreadyExists,
        "another backing class",
    );
    assert_code(
        ctl.create_volume(create_req(
            "pvc-1",
            Some("fast"),
            GIB,
            block_cap(Mode::SingleNodeWriter),
            "data",
        ))
        .await,
        Code::AlreadyExists,
        "block access",
    );

    // no capacity asked: the default; a name of 128 characters is fine
    let long = "p".repeat(128);
    let r = c
        .csi
        .controller
        .create_volume(create_req(&long, Some("fast"), 0, mount(), "other"))
        .await;
    assert_code(r, Code::Aborted, "pending");
    let id2 = volume_id(&long);
    assert_eq!(
        c.fake
            .get(&claim_path(&backing_claim_name(&id2, 0)))
            .unwrap()["spec"]["resources"]["requests"]["storage"],
        (1u64 << 30).to_string()
    );
}

#[tokio::test]
async fn publish_runs_a_holder_of_the_current_backing_claim_on_the_node() {
    let mut c = start().await;
    let id = c.provisioned("pvc-1").await;
    let ctl = &mut c.csi.controller;
    // the required fields, then the volume, then the node
    assert_code(
        ctl.controller_publish_volume(controller_publish_req("", "n1", mount(), false))
            .await,
        Code::InvalidArgument,
        "no volume id",
    );
    assert_code(
        ctl.controller_publish_volume(controller_publish_req(&id, "", mount(), false))
            .await,
        Code::InvalidArgument,
        "no node id",
    );
    let mut r = controller_publish_req(&id, "n1", mount(), false);
    r.volume_capability = None;
    assert_code(
        ctl.controller_publish_volume(r).await,
        Code::InvalidArgument,
        "no capability",
    );
    assert_code(
        ctl.controller_publish_volume(controller_publish_req("vm-nope", "n1", mount(), false))
            .await,
        Code::NotFound,
        "unknown volume",
    );
    assert_code(
        ctl.controller_publish_volume(controller_publish_req(&id, "n9", mount(), false))
            .await,
        Code::NotFound,
        "unknown node",
    );

    let dev = c.published(&id, "n1").await;
    let b0 = backing_claim_name(&id, 0);
    assert!(dev.ends_with(&format!("/pv-{b0}")), "{dev}");
    let holder = c
        .fake
        .get(&pod_path(NS, &holder_name(&id, "n1")))
        .expect("the holder pod");
    assert_eq!(holder["spec"]["nodeName"], "n1");
    assert_eq!(
        holder["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
        b0.as_str()
    );
    assert!(!holder["spec"]["containers"][0]["volumeDevices"].is_null());
    assert_eq!(
        holder["metadata"]["labels"]["app.kubernetes.io/component"],
        "target-holder"
    );
    assert_eq!(c.record(&id)["status"]["attachments"][0]["node"], "n1");

    let ctl = &mut c.csi.controller;
    // idempotent; read-only is another publication
    let again = ctl
        .controller_publish_volume(controller_publish_req(&id, "n1", mount(), false))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(again[BACKING_DEVICE_KEY], dev);
    assert_code(
        ctl.controller_publish_volume(controller_publish_req(&id, "n1", mount(), true))
            .await,
        Code::AlreadyExists,
        "read-only on the same node",
    );
    assert_code(
        ctl.controller_publish_volume(controller_publish_req(&id, "n2", mount(), false))
            .await,
        Code::FailedPrecondition,
        "a single-node volume on a second node",
    );
    assert_code(
        ctl.delete_volume(DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await,
        Code::FailedPrecondition,
        "delete while published",
    );

    // unpublish: the holder goes; repeats are fine; unknown volume NOT_FOUND
    for _ in 0..2 {
        ctl.controller_unpublish_volume(controller_unpublish_req(&id, "n1"))
            .await
            .unwrap();
    }
    assert!(c.fake.get(&pod_path(NS, &holder_name(&id, "n1"))).is_none());
    assert_eq!(c.record(&id)["status"]["attachments"], json!([]));
    let ctl = &mut c.csi.controller;
    assert_code(
        ctl.controller_unpublish_volume(controller_unpublish_req("", "n1"))
            .await,
        Code::InvalidArgument,
        "no volume id",
    );
    assert_code(
        ctl.controller_unpublish_volume(controller_unpublish_req("vm-nope", "n1"))
            .await,
        Code::NotFound,
        "unknown volume",
    );
    // now n2 may have it
    c.published(&id, "n2").await;
}

#[tokio::test]
async fn delete_releases_the_backing_claims_never_a_migrating_one() {
    let mut c = start().await;
    let id = c.provisioned("pvc-1").await;
    let ctl = &mut c.csi.controller;
    let del = |id: &str| DeleteVolumeRequest {
        volume_id: id.into(),
        ..Default::default()
    };
    assert_code(
        ctl.delete_volume(del("")).await,
        Code::InvalidArgument,
        "no id",
    );
    ctl.delete_volume(del("vm-unknown")).await.unwrap();

    // a migration of the workload's claim is running: refused
    c.fake.put(
        "/apis/volmig.io/v1alpha1/namespaces/db/volumemigrations/move",
        json!({"apiVersion": "volmig.io/v1alpha1", "kind": "VolumeMigration",
               "metadata": {"name": "move", "namespace": "db"},
               "spec": {"volumes": [{"source": {"persistentVolumeClaim": "data"},
                                     "target": {"storageClassName": "slow"}}]},
               "status": {"phase": "Copying"}}),
    );
    let msg = assert_code(
        c.csi.controller.delete_volume(del(&id)).await,
        Code::FailedPrecondition,
        "delete while migrating",
    );
    assert!(msg.contains("db/move"), "{msg}");
    assert!(
        c.fake
            .get(&claim_path(&backing_claim_name(&id, 0)))
            .is_some()
    );
    c.fake.edit(
        "/apis/volmig.io/v1alpha1/namespaces/db/volumemigrations/move",
        |vm| vm["status"]["phase"] = json!("Completed"),
    );
    for _ in 0..2 {
        c.csi.controller.delete_volume(del(&id)).await.unwrap();
    }
    assert!(
        c.fake
            .get(&claim_path(&backing_claim_name(&id, 0)))
            .is_none()
    );
    assert!(c.fake.get(&volmig_volume_path(&id)).is_none());
}

#[tokio::test]
async fn expand_grows_the_backing_claim_then_the_node_expands() {
    let mut c = start().await;
    let id = c.provisioned("pvc-1").await;
    let req = |bytes: i64| ControllerExpandVolumeRequest {
        volume_id: id.clone(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    let ctl = &mut c.csi.controller;
    assert_code(
        ctl.controller_expand_volume(req(2 * GIB)).await,
        Code::Aborted,
        "backing grows",
    );
    let path = claim_path(&backing_claim_name(&id, 0));
    assert_eq!(
        c.fake.get(&path).unwrap()["spec"]["resources"]["requests"]["storage"],
        (2 * GIB).to_string()
    );
    // the backing driver grew it
    c.fake.edit(&path, |c| {
        c["status"]["capacity"]["storage"] = json!((2 * GIB).to_string())
    });
    let r = c
        .csi
        .controller
        .controller_expand_volume(req(2 * GIB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 2 * GIB);
    assert!(r.node_expansion_required);
    // while a migration moves the volume (its target sized from the
    // current claim), growing waits for it
    c.fake.edit(&volmig_volume_path(&id), |r| {
        r["status"]["targets"] = json!([{"claim": "t", "storageClass": "slow",
                                         "migration": "db/m", "migrationUid": "u"}]);
    });
    let msg = assert_code(
        c.csi
            .controller
            .controller_expand_volume(req(3 * GIB))
            .await,
        Code::Aborted,
        "a migration runs",
    );
    assert!(msg.contains("db/m"), "{msg}");
    assert_eq!(
        c.fake.get(&path).unwrap()["spec"]["resources"]["requests"]["storage"],
        (2 * GIB).to_string()
    );
    assert_code(
        c.csi
            .controller
            .controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: "vm-nope".into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: GIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "unknown volume",
    );
}

#[tokio::test]
async fn validate_volume_capabilities() {
    let mut c = start().await;
    let id = c.provisioned("pvc-1").await;
    let req = |id: &str, caps| ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: caps,
        ..Default::default()
    };
    let ctl = &mut c.csi.controller;
    assert_code(
        ctl.validate_volume_capabilities(req("", vec![mount()]))
            .await,
        Code::InvalidArgument,
        "no id",
    );
    assert_code(
        ctl.validate_volume_capabilities(req(&id, vec![])).await,
        Code::InvalidArgument,
        "no caps",
    );
    assert_code(
        ctl.validate_volume_capabilities(req("vm-nope", vec![mount()]))
            .await,
        Code::NotFound,
        "unknown",
    );
    let ok = ctl
        .validate_volume_capabilities(req(&id, vec![mount()]))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some(), "{ok:?}");
    let no = ctl
        .validate_volume_capabilities(req(
            &id,
            vec![mount_cap("ext4", &[], Mode::MultiNodeMultiWriter)],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none() && !no.message.is_empty(), "{no:?}");
}

/// A VolumeAttributesClass with another backing class: a VolumeMigration
/// of the workload's claim; once it completed and the record names the
/// target, the change is done and the next publish, on another node,
/// attaches the target claim.
#[tokio::test]
async fn modify_starts_a_migration_and_later_publishes_attach_the_target() {
    let mut c = start().await;
    let id = c.provisioned("pvc-1").await;
    c.published(&id, "n1").await;
    let modify = |params: &[(&str, &str)]| ControllerModifyVolumeRequest {
        volume_id: id.clone(),
        mutable_parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    let ctl = &mut c.csi.controller;
    assert_code(
        ctl.controller_modify_volume(modify(&[("iops", "3000")]))
            .await,
        Code::InvalidArgument,
        "an unknown mutable parameter",
    );
    // the class it is on: nothing to do
    ctl.controller_modify_volume(modify(&[(BACKING_CLASS_PARAM, "fast")]))
        .await
        .unwrap();
    for _ in 0..2 {
        let msg = assert_code(
            ctl.controller_modify_volume(modify(&[(BACKING_CLASS_PARAM, "slow")]))
                .await,
            Code::Aborted,
            "the migration runs",
        );
        assert!(msg.contains("slow"), "{msg}");
    }
    let name = modify_migration_name(&id, "slow");
    let vm_path = format!("/apis/volmig.io/v1alpha1/namespaces/db/volumemigrations/{name}");
    let vm = c.fake.get(&vm_path).expect("the VolumeMigration");
    assert_eq!(
        vm["spec"]["volumes"],
        json!([{"source": {"persistentVolumeClaim": "data"}, "target": {"storageClassName": "slow"}}])
    );
    assert_eq!(vm["metadata"]["labels"]["volmig.io/volume"], id.as_str());
    assert!(vm["metadata"]["ownerReferences"].is_null());
    let vms = c
        .fake
        .paths()
        .into_iter()
        .filter(|p| p.contains("/volumemigrations/"))
        .count();
    assert_eq!(vms, 1, "one migration, however often the resizer asks");

    // the reconciler's end of a migration (operator/tests/reconcile.rs runs
    // it for real): the record names the target
    let b1 = target_claim_name(&id, vm["metadata"]["uid"].as_str().unwrap());
    c.fake.put(
        &claim_path(&b1),
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
               "metadata": {"name": b1, "namespace": NS},
               "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "slow", "volumeMode": "Block",
                        "resources": {"requests": {"storage": GIB.to_string()}}}}),
    );
    bind_claim(&c.fake, NS, &b1);
    c.fake
        .edit(&vm_path, |vm| vm["status"] = json!({"phase": "Completed"}));
    c.fake.edit(&volmig_volume_path(&id), |r| {
        r["status"]["currentClaim"] = json!(b1);
        r["status"]["storageClass"] = json!("slow");
    });
    c.csi
        .controller
        .controller_modify_volume(modify(&[(BACKING_CLASS_PARAM, "slow")]))
        .await
        .unwrap();

    // reschedule: unpublish from n1, publish on n2 attaches the target
    c.csi
        .controller
        .controller_unpublish_volume(controller_unpublish_req(&id, "n1"))
        .await
        .unwrap();
    let dev = c.published(&id, "n2").await;
    assert!(dev.ends_with(&format!("/pv-{b1}")), "{dev}");
    let holder = c.fake.get(&pod_path(NS, &holder_name(&id, "n2"))).unwrap();
    assert_eq!(
        holder["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
        b1.as_str()
    );
}

/// While the cluster serves a record CRD of another version (a `helm
/// upgrade` that kept the old CRDs), every call that reads or writes a
/// record is UNAVAILABLE with how to update it (the sidecars retry, and
/// the claim's events say why); once the CRD is updated, calls go on.
#[tokio::test]
async fn a_stale_crd_makes_calls_unavailable_saying_how_to_update_it() {
    let mut c = start().await;
    let path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/volmigvolumes.volmig.io";
    c.fake.edit(path, |crd| {
        crd["metadata"]["annotations"]["volmig.io/schema-hash"] = json!("sha256:old")
    });
    let r = c
        .csi
        .controller
        .create_volume(create_req("pvc-1", Some("fast"), GIB, mount(), "data"))
        .await;
    let e = r.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("stale") && e.message().contains("helm upgrade"),
        "{}",
        e.message()
    );
    let id = volume_id("pvc-1");
    assert!(c.fake.get(&volmig_volume_path(&id)).is_none(), "no record");
    assert!(
        c.fake
            .get(&claim_path(&backing_claim_name(&id, 0)))
            .is_none(),
        "no backing claim"
    );
    let r = c
        .csi
        .controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: id.clone(),
            secrets: Default::default(),
        })
        .await;
    assert_code(r, Code::Unavailable, "DeleteVolume with a stale CRD");
    install_crds(&c.fake);
    c.provisioned("pvc-1").await;
}
