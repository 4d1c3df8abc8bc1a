#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! The CSI node plugin's conformance suite, over its unix socket as
//! kubelet drives it: csi-sanity's Identity and Node cases (every "should
//! fail when no X is provided", NodeGetInfo/NodeGetCapabilities, stats on a
//! wrong path, unpublish removing the target, expand after publish), for
//! mount and block access, with idempotency (stage, publish, unpublish,
//! unstage twice), and ours: an unknown volume, a missing staging path, a
//! mismatched capability, a backing device too small or missing, unstage
//! during a migration, NodeStage repeated with no NodeUnstage (kubelet
//! after its restart) and after the plugin's restart, never a mkfs over
//! data, read-only publishing, the volume's condition when its backing
//! device fails. Each call's answer is checked for its exact gRPC code,
//! and a refused call for having changed nothing. Real ext4 and xfs on
//! real loop devices (root).

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use tonic::Code;
use volmig_api::csi::node_service_capability::rpc::Type as NodeCap;
use volmig_api::csi::plugin_capability::service::Type as PluginCap;
use volmig_api::csi::volume_capability::access_mode::Mode;
use volmig_api::csi::volume_usage::Unit;
use volmig_api::csi::{
    GetPluginCapabilitiesRequest, GetPluginInfoRequest, NodeExpandVolumeRequest,
    NodeGetCapabilitiesRequest, NodeGetInfoRequest, NodeGetVolumeStatsRequest,
    NodePublishVolumeRequest, NodeStageVolumeRequest, NodeUnpublishVolumeRequest,
    NodeUnstageVolumeRequest, ProbeRequest, plugin_capability,
};
use volmig_api::slave::{Fence, Prepare};
use volmig_api::{SessionConfig, Slave};
use volmig_testkit::csi::{
    CsiClient, CsiNode, DRIVER_NAME, SIZE_KEY, TOPOLOGY_KEY, assert_code, block_cap, expand_req,
    mount_cap, publish_req, stage_req, stats_req, unpublish_req, unstage_req,
};
use volmig_testkit::devices::{is_mountpoint, mount_id};
use volmig_testkit::pattern::sparse_file;
use volmig_testkit::{MIB, require_bin, require_root, run, run_ok};

const SNW: Mode = Mode::SingleNodeWriter;
const SIZE: u64 = 64 * MIB;

/// kubelet on a node whose agent serves the plugin, in a fresh directory.
struct Kubelet {
    dir: tempfile::TempDir,
    node: Option<CsiNode>,
    c: CsiClient,
}

impl Kubelet {
    async fn start() -> Self {
        require_root("loop devices and mounts");
        for (tool, pkg) in [
            ("losetup", "mount"),
            ("mount", "mount"),
            ("blkid", "util-linux"),
            ("mkfs.ext4", "e2fsprogs"),
            ("resize2fs", "e2fsprogs"),
        ] {
            require_bin(tool, pkg);
        }
        let dir = tempfile::tempdir().unwrap();
        let node = CsiNode::start_loop(dir.path(), "n1").await;
        let c = node.client();
        Self {
            dir,
            node: Some(node),
            c,
        }
    }

    fn node(&self) -> &CsiNode {
        self.node.as_ref().unwrap()
    }

    /// A blank (sparse) backing device of `size` bytes, as the
    /// controller's holder pod would expose it.
    fn backing(&self, name: &str, size: u64) -> PathBuf {
        let p = self.dir.path().join(format!("{name}.img"));
        sparse_file(&p, size);
        p
    }

    /// kubelet's staging path of `pv` (made by kubelet, as the spec says).
    fn staging(&self, pv: &str) -> PathBuf {
        let p = self.dir.path().join(format!(
            "kubelet/plugins/kubernetes.io/csi/{DRIVER_NAME}/{pv}/globalmount"
        ));
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// kubelet's publish target of `pv` in pod `pod` (its parent made by
    /// kubelet; the target itself is the plugin's to make).
    fn target(&self, pod: &str, pv: &str) -> PathBuf {
        let parent = self
            .dir
            .path()
            .join(format!("kubelet/pods/{pod}/volumes/kubernetes.io~csi/{pv}"));
        std::fs::create_dir_all(&parent).unwrap();
        parent.join("mount")
    }

    async fn stage(&self, r: NodeStageVolumeRequest, want: Code, what: &str) -> String {
        assert_code(self.c.node.clone().node_stage_volume(r).await, want, what)
    }

    async fn unstage(&self, r: NodeUnstageVolumeRequest, want: Code, what: &str) -> String {
        assert_code(self.c.node.clone().node_unstage_volume(r).await, want, what)
    }

    async fn publish(&self, r: NodePublishVolumeRequest, want: Code, what: &str) -> String {
        assert_code(self.c.node.clone().node_publish_volume(r).await, want, what)
    }

    async fn unpublish(&self, r: NodeUnpublishVolumeRequest, want: Code, what: &str) -> String {
        assert_code(
            self.c.node.clone().node_unpublish_volume(r).await,
            want,
            what,
        )
    }

    async fn stats(
        &self,
        r: NodeGetVolumeStatsRequest,
    ) -> Result<volmig_api::csi::NodeGetVolumeStatsResponse, tonic::Status> {
        self.c
            .node
            .clone()
            .node_get_volume_stats(r)
            .await
            .map(|r| r.into_inner())
    }

    async fn expand(&self, r: NodeExpandVolumeRequest) -> Result<i64, tonic::Status> {
        self.c
            .node
            .clone()
            .node_expand_volume(r)
            .await
            .map(|r| r.into_inner().capacity_bytes)
    }

    /// The agent serves `volume` now.
    fn served(&self, volume: &str) -> bool {
        self.node().agent().list().iter().any(|v| v.name == volume)
    }

    /// The plugin has a record of `volume`.
    fn recorded(&self, volume: &str) -> bool {
        self.node().plugin.staged().unwrap().contains_key(volume)
    }
}

/// The filesystem blkid finds ("" for none: its exit status 2).
fn fs_type(device_or_file: &Path) -> String {
    let out = run(
        &require_bin("blkid", "util-linux"),
        &[
            "-p",
            "-o",
            "value",
            "-s",
            "TYPE",
            device_or_file.to_str().unwrap(),
        ],
    );
    match out.status.code() {
        Some(0) => out.stdout.trim().to_string(),
        Some(2) => String::new(),
        _ => panic!("blkid failed: {}", out.text()),
    }
}

fn device_of(k: &Kubelet, volume: &str) -> PathBuf {
    k.node().plugin.staged().unwrap()[volume]
        .device
        .clone()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_names_the_plugin_its_capabilities_and_readiness() {
    let k = Kubelet::start().await;
    let mut id = k.c.identity.clone();
    let info = id
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.volmig.io");
    // csi-sanity: at most 63 characters of domain-name notation.
    assert!(info.name.len() <= 63);
    assert!(
        info.name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
    );
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let caps = id
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let services: Vec<i32> = caps
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(plugin_capability::Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    assert_eq!(
        services,
        [PluginCap::VolumeAccessibilityConstraints as i32],
        "the node plugin reports topology, and serves no controller"
    );
    assert!(caps.iter().any(|c| matches!(
        &c.r#type,
        Some(plugin_capability::Type::VolumeExpansion(e))
            if e.r#type == plugin_capability::volume_expansion::Type::Online as i32
    )));
    let probe = id.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_info_and_capabilities() {
    let k = Kubelet::start().await;
    let mut n = k.c.node.clone();
    let caps: Vec<i32> = n
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .map(|c| match c.r#type {
            Some(volmig_api::csi::node_service_capability::Type::Rpc(r)) => r.r#type,
            None => panic!("a capability without its RPC"),
        })
        .collect();
    assert_eq!(
        caps,
        [
            NodeCap::StageUnstageVolume as i32,
            NodeCap::GetVolumeStats as i32,
            NodeCap::ExpandVolume as i32,
            NodeCap::VolumeCondition as i32,
            NodeCap::SingleNodeMultiWriter as i32,
        ]
    );
    let info = n
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "n1");
    assert!(info.max_volumes_per_node >= 0);
    let topo = info
        .accessible_topology
        .expect("topology (the plugin says it has constraints)");
    assert_eq!(
        topo.segments.get(TOPOLOGY_KEY).map(String::as_str),
        Some("n1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_missing_field_is_invalid_argument_and_changes_nothing() {
    let k = Kubelet::start().await;
    let backing = k.backing("v", SIZE);
    let staging = k.staging("pv-v");
    let target = k.target("pod1", "pv-v");
    let cap = mount_cap("", &[], SNW);
    let ok = stage_req("v", &staging, &backing, cap.clone());
    let inv = Code::InvalidArgument;

    // NodeStageVolume (csi-sanity: no volume id, no staging path, no
    // capability), and ours: no backing device, relative paths, a
    // capability without access type or mode.
    let mut r = ok.clone();
    r.volume_id.clear();
    k.stage(r, inv, "stage without volume id").await;
    let mut r = ok.clone();
    r.staging_target_path.clear();
    k.stage(r, inv, "stage without staging path").await;
    let mut r = ok.clone();
    r.volume_capability = None;
    k.stage(r, inv, "stage without capability").await;
    let mut r = ok.clone();
    r.volume_capability.as_mut().unwrap().access_type = None;
    k.stage(r, inv, "stage without access type").await;
    let mut r = ok.clone();
    r.volume_capability.as_mut().unwrap().access_mode = None;
    k.stage(r, inv, "stage without access mode").await;
    let mut r = ok.clone();
    r.publish_context.clear();
    r.publish_context
        .insert("device".into(), "/dev/mock".into());
    let msg = k.stage(r, inv, "stage without the backing device").await;
    assert!(msg.contains("volmig.io/backing-device"), "{msg}");
    let mut r = ok.clone();
    r.staging_target_path = "relative/staging".into();
    k.stage(r, inv, "stage at a relative path").await;
    let mut r = ok.clone();
    r.volume_context.insert(SIZE_KEY.into(), "lots".into());
    k.stage(r, inv, "stage with a size that is no number").await;

    // NodeUnstageVolume.
    k.unstage(unstage_req("", &staging), inv, "unstage without volume id")
        .await;
    let mut r = unstage_req("v", &staging);
    r.staging_target_path.clear();
    k.unstage(r, inv, "unstage without staging path").await;

    // NodePublishVolume (csi-sanity: no volume id, no target, no
    // capability); and without the staging path: FAILED_PRECONDITION, the
    // spec's "staging target path not set".
    let okp = publish_req("v", &staging, &target, cap.clone(), false);
    let mut r = okp.clone();
    r.volume_id.clear();
    k.publish(r, inv, "publish without volume id").await;
    let mut r = okp.clone();
    r.target_path.clear();
    k.publish(r, inv, "publish without target").await;
    let mut r = okp.clone();
    r.volume_capability = None;
    k.publish(r, inv, "publish without capability").await;
    let mut r = okp.clone();
    r.staging_target_path.clear();
    k.publish(r, Code::FailedPrecondition, "publish without staging path")
        .await;

    // NodeUnpublishVolume.
    k.unpublish(
        unpublish_req("", &target),
        inv,
        "unpublish without volume id",
    )
    .await;
    let mut r = unpublish_req("v", &target);
    r.target_path.clear();
    k.unpublish(r, inv, "unpublish without target").await;

    // NodeGetVolumeStats and NodeExpandVolume.
    let e = k.stats(stats_req("", "some/path")).await.unwrap_err();
    assert_eq!(e.code(), inv, "stats without volume id: {e}");
    let e = k.stats(stats_req("v", "")).await.unwrap_err();
    assert_eq!(e.code(), inv, "stats without volume path: {e}");
    let mut r = expand_req("", &target, 0);
    r.volume_capability = Some(cap.clone());
    assert_eq!(
        k.expand(r).await.unwrap_err().code(),
        inv,
        "expand without volume id"
    );
    let mut r = expand_req("v", &target, 0);
    r.volume_path.clear();
    assert_eq!(
        k.expand(r).await.unwrap_err().code(),
        inv,
        "expand without volume path"
    );

    assert!(!k.served("v") && !k.recorded("v"), "nothing changed");
    assert!(!is_mountpoint(&staging));
    assert!(!target.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_volumes_are_not_found_and_undoing_them_is_no_error() {
    let k = Kubelet::start().await;
    let staging = k.staging("pv-x");
    let target = k.target("pod1", "pv-x");
    let nf = Code::NotFound;
    // csi-sanity: stats and expand of a volume that does not exist.
    let e = k
        .stats(stats_req("fake-vol-id-1", "some/path"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), nf, "{e}");
    let e = k
        .expand(expand_req("fake-vol-id-1", Path::new("some/path"), 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), nf, "{e}");
    k.publish(
        publish_req(
            "fake-vol-id-1",
            &staging,
            &target,
            mount_cap("", &[], SNW),
            false,
        ),
        nf,
        "publish of a volume never staged",
    )
    .await;
    // An id no volmig volume can have.
    k.stage(
        stage_req(
            "bad/id",
            &staging,
            Path::new("/dev/null"),
            mount_cap("", &[], SNW),
        ),
        nf,
        "stage of an id no volume can have",
    )
    .await;
    // Undoing what was never done: the spec's idempotency (kubelet retries
    // after a success it did not hear).
    k.unpublish(
        unpublish_req("fake-vol-id-1", &target),
        Code::Ok,
        "unpublish, never published",
    )
    .await;
    k.unstage(
        unstage_req("fake-vol-id-1", &staging),
        Code::Ok,
        "unstage, never staged",
    )
    .await;
    // Something mounted at a target, of a volume this node does not know:
    // not found, and left alone.
    std::fs::create_dir_all(&target).unwrap();
    let mut m = volmig_testkit::devices::Mount::tmpfs(&target, "1m");
    k.unpublish(
        unpublish_req("fake-vol-id-1", &target),
        nf,
        "unpublish of a stranger's mount",
    )
    .await;
    assert!(is_mountpoint(&target), "not ours: left mounted");
    m.unmount();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mounted_volume_stages_publishes_and_goes_idempotently() {
    let k = Kubelet::start().await;
    let backing = k.backing("v", SIZE);
    let staging = k.staging("pv-v");
    let target = k.target("pod1", "pv-v");
    let cap = mount_cap("", &["noatime"], SNW);

    k.stage(
        stage_req("v", &staging, &backing, cap.clone()),
        Code::Ok,
        "stage",
    )
    .await;
    assert!(is_mountpoint(&staging));
    assert_eq!(
        fs_type(&backing),
        "ext4",
        "a blank device gets the default filesystem"
    );
    assert!(k.served("v"));
    let staged_mount = mount_id(&staging).unwrap();
    // kubelet stages again (after its restart, with no unstage): a no-op.
    k.stage(
        stage_req("v", &staging, &backing, cap.clone()),
        Code::Ok,
        "stage again",
    )
    .await;
    assert_eq!(mount_id(&staging), Some(staged_mount), "not mounted again");
    // The same, naming the filesystem now in use.
    k.stage(
        stage_req(
            "v",
            &staging,
            &backing,
            mount_cap("ext4", &["noatime"], SNW),
        ),
        Code::Ok,
        "stage again naming ext4",
    )
    .await;

    k.publish(
        publish_req("v", &staging, &target, cap.clone(), false),
        Code::Ok,
        "publish",
    )
    .await;
    assert!(is_mountpoint(&target));
    let published_mount = mount_id(&target).unwrap();
    k.publish(
        publish_req("v", &staging, &target, cap.clone(), false),
        Code::Ok,
        "publish again",
    )
    .await;
    assert_eq!(
        mount_id(&target),
        Some(published_mount),
        "not mounted again"
    );
    std::fs::write(target.join("hello"), b"through the bind mount").unwrap();
    assert_eq!(
        std::fs::read(staging.join("hello")).unwrap(),
        b"through the bind mount"
    );

    // Stats at the target (csi-sanity) and at the staging path: bytes and
    // inodes of the filesystem, the volume normal; elsewhere: not found.
    for path in [&target, &staging] {
        let s = k
            .stats(stats_req("v", path.to_str().unwrap()))
            .await
            .unwrap();
        let bytes = s
            .usage
            .iter()
            .find(|u| u.unit == Unit::Bytes as i32)
            .unwrap();
        let inodes = s
            .usage
            .iter()
            .find(|u| u.unit == Unit::Inodes as i32)
            .unwrap();
        assert!(
            bytes.total > 50 * MIB as i64 && bytes.total <= SIZE as i64,
            "{bytes:?}"
        );
        assert!(bytes.used > 0 && bytes.available > 0 && bytes.available < bytes.total);
        assert!(inodes.total > 0 && inodes.used > 0);
        let cond = s.volume_condition.unwrap();
        assert!(!cond.abnormal, "{cond:?}");
    }
    let e = k.stats(stats_req("v", "some/path")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "csi-sanity: not at the path: {e}");
    let other = k.dir.path().join("elsewhere");
    let e = k
        .stats(stats_req("v", other.to_str().unwrap()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");

    // Unpublish removes the target (csi-sanity), twice is fine.
    k.unpublish(unpublish_req("v", &target), Code::Ok, "unpublish")
        .await;
    assert!(!target.exists(), "the target is removed");
    k.unpublish(unpublish_req("v", &target), Code::Ok, "unpublish again")
        .await;
    k.unstage(unstage_req("v", &staging), Code::Ok, "unstage")
        .await;
    assert!(!is_mountpoint(&staging));
    assert!(
        !k.served("v") && !k.recorded("v"),
        "the agent serves it no more"
    );
    k.unstage(unstage_req("v", &staging), Code::Ok, "unstage again")
        .await;

    // Staged again later: the filesystem is the volume's, never remade.
    k.stage(
        stage_req("v", &staging, &backing, cap.clone()),
        Code::Ok,
        "stage after unstage",
    )
    .await;
    assert_eq!(
        std::fs::read(staging.join("hello")).unwrap(),
        b"through the bind mount"
    );
    k.unstage(unstage_req("v", &staging), Code::Ok, "unstage")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfs_when_asked_and_never_a_mkfs_over_data() {
    let k = Kubelet::start().await;
    require_bin("mkfs.xfs", "xfsprogs");
    // xfs needs 300 MiB at least.
    let backing = k.backing("x", 320 * MIB);
    let staging = k.staging("pv-x");
    k.stage(
        stage_req("x", &staging, &backing, mount_cap("xfs", &[], SNW)),
        Code::Ok,
        "stage as xfs",
    )
    .await;
    assert_eq!(fs_type(&device_of(&k, "x")), "xfs");
    std::fs::write(staging.join("data"), b"keep me").unwrap();
    k.unstage(unstage_req("x", &staging), Code::Ok, "unstage")
        .await;

    // The device holds xfs: asked for ext4 it is refused, not reformatted,
    // and nothing is left staged or served.
    let msg = k
        .stage(
            stage_req("x", &staging, &backing, mount_cap("ext4", &[], SNW)),
            Code::FailedPrecondition,
            "ext4 asked, xfs found",
        )
        .await;
    assert!(msg.contains("xfs"), "{msg}");
    assert!(!is_mountpoint(&staging));
    assert!(!k.served("x") && !k.recorded("x"), "nothing changed");
    assert_eq!(fs_type(&backing), "xfs");
    // No type asked: the one found is mounted.
    k.stage(
        stage_req("x", &staging, &backing, mount_cap("", &[], SNW)),
        Code::Ok,
        "stage, any filesystem",
    )
    .await;
    assert_eq!(std::fs::read(staging.join("data")).unwrap(), b"keep me");
    k.unstage(unstage_req("x", &staging), Code::Ok, "unstage")
        .await;

    // A filesystem this plugin does not make is a capability it lacks.
    k.stage(
        stage_req("x", &staging, &backing, mount_cap("zfs", &[], SNW)),
        Code::FailedPrecondition,
        "zfs",
    )
    .await;
    // A blank device is not mounted read-only (nothing to read).
    let blank = k.backing("b", SIZE);
    let st = k.staging("pv-b");
    k.stage(
        stage_req(
            "b",
            &st,
            &blank,
            mount_cap("", &[], Mode::SingleNodeReaderOnly),
        ),
        Code::FailedPrecondition,
        "a blank device read-only",
    )
    .await;
    assert_eq!(fs_type(&blank), "", "not formatted");
    assert!(!k.served("b") && !k.recorded("b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incompatible_stage_is_already_exists_and_changes_nothing() {
    let k = Kubelet::start().await;
    let backing = k.backing("v", SIZE);
    let staging = k.staging("pv-v");
    let cap = mount_cap("", &["noatime"], SNW);
    k.stage(
        stage_req("v", &staging, &backing, cap.clone()),
        Code::Ok,
        "stage",
    )
    .await;
    let mount = mount_id(&staging).unwrap();
    let exists = Code::AlreadyExists;
    for (what, r) in [
        (
            "block access",
            stage_req("v", &staging, &backing, block_cap(SNW)),
        ),
        (
            "other flags",
            stage_req("v", &staging, &backing, mount_cap("", &[], SNW)),
        ),
        (
            "another filesystem",
            stage_req("v", &staging, &backing, mount_cap("xfs", &["noatime"], SNW)),
        ),
        (
            "another access mode",
            stage_req(
                "v",
                &staging,
                &backing,
                mount_cap("", &["noatime"], Mode::SingleNodeReaderOnly),
            ),
        ),
        (
            "another staging path",
            stage_req("v", &k.staging("pv-v2"), &backing, cap.clone()),
        ),
        (
            "another backing device",
            stage_req("v", &staging, &k.backing("w", SIZE), cap.clone()),
        ),
    ] {
        k.stage(r, exists, what).await;
        assert_eq!(mount_id(&staging), Some(mount), "{what}: nothing changed");
        assert!(k.served("v") && k.recorded("v"));
    }
    assert!(!is_mountpoint(&k.staging("pv-v2")));
    k.unstage(unstage_req("v", &staging), Code::Ok, "unstage")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_follows_the_spec_tables_and_read_only_is_read_only() {
    let k = Kubelet::start().await;
    let backing = k.backing("v", SIZE);
    let staging = k.staging("pv-v");
    let t1 = k.target("pod1", "pv-v");
    let t2 = k.target("pod2", "pv-v");
    let single = mount_cap("", &[], Mode::SingleNodeSingleWriter);
    k.stage(
        stage_req("v", &staging, &backing, single.clone()),
        Code::Ok,
        "stage",
    )
    .await;
    k.publish(
        publish_req("v", &staging, &t1, single.clone(), false),
        Code::Ok,
        "publish",
    )
    .await;
    // Same target, other arguments: ALREADY_EXISTS.
    k.publish(
        publish_req("v", &staging, &t1, single.clone(), true),
        Code::AlreadyExists,
        "the same target read-only now",
    )
    .await;
    // Another target of a single-writer volume: FAILED_PRECONDITION
    // (csi-sanity's single node single writer case).
    k.publish(
        publish_req("v", &staging, &t2, single.clone(), false),
        Code::FailedPrecondition,
        "a second target, single writer",
    )
    .await;
    assert!(!t2.exists(), "nothing made at the refused target");
    // Published as a block device from a filesystem stage: a capability
    // the staged volume does not have.
    k.publish(
        publish_req(
            "v",
            &staging,
            &t2,
            block_cap(Mode::SingleNodeSingleWriter),
            false,
        ),
        Code::FailedPrecondition,
        "block from a mount stage",
    )
    .await;
    // Staged elsewhere than the call says.
    k.publish(
        publish_req("v", &k.staging("pv-other"), &t1, single.clone(), false),
        Code::FailedPrecondition,
        "the wrong staging path",
    )
    .await;
    k.unpublish(unpublish_req("v", &t1), Code::Ok, "unpublish")
        .await;
    k.unstage(unstage_req("v", &staging), Code::Ok, "unstage")
        .await;

    // SINGLE_NODE_MULTI_WRITER: two pods on the node, one read-only.
    let multi = mount_cap("", &[], Mode::SingleNodeMultiWriter);
    k.stage(
        stage_req("v", &staging, &backing, multi.clone()),
        Code::Ok,
        "stage multi",
    )
    .await;
    k.publish(
        publish_req("v", &staging, &t1, multi.clone(), false),
        Code::Ok,
        "publish 1",
    )
    .await;
    k.publish(
        publish_req("v", &staging, &t2, multi.clone(), true),
        Code::Ok,
        "publish 2 read-only",
    )
    .await;
    std::fs::write(t1.join("w"), b"rw").unwrap();
    assert_eq!(std::fs::read(t2.join("w")).unwrap(), b"rw");
    let e = std::fs::write(t2.join("x"), b"ro").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    // Unstage while published: FAILED_PRECONDITION, nothing changed.
    k.unstage(
        unstage_req("v", &staging),
        Code::FailedPrecondition,
        "unstage while published",
    )
    .await;
    assert!(is_mountpoint(&staging) && is_mountpoint(&t1) && is_mountpoint(&t2));
    for t in [&t1, &t2] {
        k.unpublish(unpublish_req("v", t), Code::Ok, "unpublish")
            .await;
        assert!(!t.exists());
    }
    k.unstage(unstage_req("v", &staging), Code::Ok, "unstage")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_volume_is_the_device_at_the_target() {
    let k = Kubelet::start().await;
    let backing = k.backing("b", SIZE);
    let staging = k.staging("pv-b");
    let target = k.target("pod1", "pv-b");
    let cap = block_cap(SNW);
    k.stage(
        stage_req("b", &staging, &backing, cap.clone()),
        Code::Ok,
        "stage",
    )
    .await;
    k.stage(
        stage_req("b", &staging, &backing, cap.clone()),
        Code::Ok,
        "stage again",
    )
    .await;
    assert!(
        !is_mountpoint(&staging),
        "block access mounts nothing at staging"
    );
    assert_eq!(fs_type(&backing), "", "and makes no filesystem");
    k.publish(
        publish_req("b", &staging, &target, cap.clone(), false),
        Code::Ok,
        "publish",
    )
    .await;
    k.publish(
        publish_req("b", &staging, &target, cap.clone(), false),
        Code::Ok,
        "publish again",
    )
    .await;
    let meta = std::fs::metadata(&target).unwrap();
    assert!(
        meta.file_type().is_block_device(),
        "the target is the device"
    );
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&target)
            .unwrap();
        f.write_all_at(&[0x5a; 4096], 8192).unwrap();
        f.sync_all().unwrap();
    }
    let mut back = vec![0u8; 4096];
    {
        use std::os::unix::fs::FileExt;
        std::fs::File::open(&backing)
            .unwrap()
            .read_exact_at(&mut back, 8192)
            .unwrap();
    }
    assert_eq!(
        back,
        vec![0x5a; 4096],
        "written through to the backing device"
    );
    let s = k
        .stats(stats_req("b", target.to_str().unwrap()))
        .await
        .unwrap();
    assert_eq!(s.usage.len(), 1);
    assert_eq!(
        (s.usage[0].unit, s.usage[0].total),
        (Unit::Bytes as i32, SIZE as i64)
    );
    k.unpublish(unpublish_req("b", &target), Code::Ok, "unpublish")
        .await;
    assert!(!target.exists(), "the target file is removed");
    k.unstage(unstage_req("b", &staging), Code::Ok, "unstage")
        .await;
    assert!(!k.served("b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backing_device_too_small_or_missing_is_refused_and_changes_nothing() {
    let k = Kubelet::start().await;
    let backing = k.backing("v", SIZE);
    let staging = k.staging("pv-v");
    let mut r = stage_req("v", &staging, &backing, mount_cap("", &[], SNW));
    r.volume_context
        .insert(SIZE_KEY.into(), (2 * SIZE).to_string());
    let msg = k
        .stage(
            r,
            Code::FailedPrecondition,
            "a backing device half the volume",
        )
        .await;
    assert!(msg.contains("smaller than the volume"), "{msg}");
    let missing = k.dir.path().join("no-such-device");
    k.stage(
        stage_req("v", &staging, &missing, mount_cap("", &[], SNW)),
        Code::FailedPrecondition,
        "a backing device that is not there",
    )
    .await;
    assert!(!k.served("v") && !k.recorded("v") && !is_mountpoint(&staging));
    assert_eq!(fs_type(&backing), "", "not formatted");
    // The same size is fine.
    let mut r = stage_req("v", &staging, &backing, mount_cap("", &[], SNW));
    r.volume_context.insert(SIZE_KEY.into(), SIZE.to_string());
    k.stage(r, Code::Ok, "a backing device of the volume's size")
        .await;
    k.unstage(unstage_req("v", &staging), Code::Ok, "unstage")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstage_during_a_migration_is_refused_until_it_ends() {
    let k = Kubelet::start().await;
    let backing = k.backing("v", SIZE);
    let target_dev = k.backing("v-target", SIZE);
    let staging = k.staging("pv-v");
    k.stage(
        stage_req("v", &staging, &backing, mount_cap("", &[], SNW)),
        Code::Ok,
        "stage",
    )
    .await;
    let fence = Fence {
        session: "mig-1".into(),
        volume: "v".into(),
        epoch: 1,
    };
    let agent = k.node().agent().clone();
    agent
        .prepare(Prepare {
            fence: fence.clone(),
            target: target_dev.clone(),
            config: SessionConfig::default(),
            monitor_only: false,
        })
        .await
        .unwrap();
    let msg = k
        .unstage(
            unstage_req("v", &staging),
            Code::FailedPrecondition,
            "unstage during a migration",
        )
        .await;
    assert!(msg.contains("mig-1"), "names the session: {msg}");
    assert!(
        is_mountpoint(&staging) && k.served("v") && k.recorded("v"),
        "nothing changed"
    );
    // Its condition says it migrates; expand waits for the migration.
    let s = k
        .stats(stats_req("v", staging.to_str().unwrap()))
        .await
        .unwrap();
    let cond = s.volume_condition.unwrap();
    assert!(!cond.abnormal && cond.message.contains("mig-1"), "{cond:?}");
    let e = k.expand(expand_req("v", &staging, 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e}");
    agent.abort(fence).await.unwrap();
    k.unstage(
        unstage_req("v", &staging),
        Code::Ok,
        "unstage after the migration",
    )
    .await;
    assert!(!k.served("v"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_plugin_answers_as_before() {
    let mut k = Kubelet::start().await;
    let backing = k.backing("v", SIZE);
    let staging = k.staging("pv-v");
    let target = k.target("pod1", "pv-v");
    let cap = mount_cap("", &[], SNW);
    k.stage(
        stage_req("v", &staging, &backing, cap.clone()),
        Code::Ok,
        "stage",
    )
    .await;
    k.publish(
        publish_req("v", &staging, &target, cap.clone(), false),
        Code::Ok,
        "publish",
    )
    .await;
    let (sm, tm) = (mount_id(&staging).unwrap(), mount_id(&target).unwrap());
    // The agent (and so the plugin) restarts; the mounts stay, as they do
    // in the kernel.
    let agent = k.node.take().unwrap().stop().await;
    drop(agent);
    let agent =
        volmig_node_agent::agent::Agent::new(&CsiNode::state_dir(k.dir.path(), "n1")).unwrap();
    assert_eq!(
        agent.restore().await.unwrap(),
        1,
        "the agent serves the volume again"
    );
    k.node = Some(CsiNode::start_with(k.dir.path(), "n1", agent));
    k.c = k.node().client();
    k.stage(
        stage_req("v", &staging, &backing, cap.clone()),
        Code::Ok,
        "stage after the restart",
    )
    .await;
    k.publish(
        publish_req("v", &staging, &target, cap.clone(), false),
        Code::Ok,
        "publish after the restart",
    )
    .await;
    assert_eq!(
        (mount_id(&staging), mount_id(&target)),
        (Some(sm), Some(tm)),
        "nothing remounted"
    );
    k.stage(
        stage_req("v", &staging, &backing, block_cap(SNW)),
        Code::AlreadyExists,
        "still knows how it was staged",
    )
    .await;
    k.unpublish(unpublish_req("v", &target), Code::Ok, "unpublish")
        .await;
    k.unstage(unstage_req("v", &staging), Code::Ok, "unstage")
        .await;
    assert!(!k.served("v") && !is_mountpoint(&staging));
}

fn bytes_total(s: &volmig_api::csi::NodeGetVolumeStatsResponse) -> i64 {
    s.usage
        .iter()
        .find(|u| u.unit == Unit::Bytes as i32)
        .unwrap()
        .total
}

fn grow_file(path: &Path, size: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(size)
        .unwrap();
}

/// csi-sanity's "should work if node-expand is called after node-publish",
/// on xfs (growing it online needs CAP_SYS_ADMIN only, which mounting
/// needs anyway).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expand_after_publish_grows_the_mounted_filesystem() {
    let k = Kubelet::start().await;
    require_bin("xfs_growfs", "xfsprogs");
    let size = 320 * MIB;
    let backing = k.backing("v", size);
    let staging = k.staging("pv-v");
    let target = k.target("pod1", "pv-v");
    let cap = mount_cap("xfs", &[], SNW);
    k.stage(
        stage_req("v", &staging, &backing, cap.clone()),
        Code::Ok,
        "stage",
    )
    .await;
    k.publish(
        publish_req("v", &staging, &target, cap.clone(), false),
        Code::Ok,
        "publish",
    )
    .await;
    std::fs::write(target.join("before"), b"kept").unwrap();
    let before = bytes_total(
        &k.stats(stats_req("v", target.to_str().unwrap()))
            .await
            .unwrap(),
    );
    // The controller expanded the backing device.
    grow_file(&backing, 2 * size);
    let grown = k
        .expand(expand_req("v", &target, 2 * size as i64))
        .await
        .unwrap();
    assert_eq!(grown, 2 * size as i64);
    let after = bytes_total(
        &k.stats(stats_req("v", target.to_str().unwrap()))
            .await
            .unwrap(),
    );
    assert!(
        after > before + (size as i64) * 9 / 10,
        "the filesystem grew: {before} -> {after}"
    );
    assert_eq!(std::fs::read(target.join("before")).unwrap(), b"kept");
    assert_eq!(
        volmig_node_agent::csi::system::device_size(&device_of(&k, "v")).unwrap(),
        2 * size,
        "the kernel device shows the new size"
    );
    // Again, at the staging path: already that big, OK.
    let again = k
        .expand(expand_req("v", &staging, 2 * size as i64))
        .await
        .unwrap();
    assert_eq!(again, 2 * size as i64);
    // More than the backing device has: OUT_OF_RANGE.
    let e = k
        .expand(expand_req("v", &target, 4 * size as i64))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e}");
    // Not where the volume is: NOT_FOUND.
    let e = k
        .expand(expand_req("v", Path::new("some/path"), 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    // A capability of another access type: INVALID_ARGUMENT.
    let mut r = expand_req("v", &target, 0);
    r.volume_capability = Some(block_cap(SNW));
    assert_eq!(k.expand(r).await.unwrap_err().code(), Code::InvalidArgument);
    k.unpublish(unpublish_req("v", &target), Code::Ok, "unpublish")
        .await;
    k.unstage(unstage_req("v", &staging), Code::Ok, "unstage")
        .await;
    run_ok(
        &require_bin("xfs_repair", "xfsprogs"),
        &["-n", backing.to_str().unwrap()],
    );
}

/// ext4 grows online only for an agent with CAP_SYS_RESOURCE (the chart
/// gives it); without, the call says so and nothing grows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_grows_online_where_the_agent_may() {
    let k = Kubelet::start().await;
    let backing = k.backing("v", SIZE);
    let staging = k.staging("pv-v");
    let target = k.target("pod1", "pv-v");
    let cap = mount_cap("ext4", &[], SNW);
    k.stage(
        stage_req("v", &staging, &backing, cap.clone()),
        Code::Ok,
        "stage",
    )
    .await;
    k.publish(
        publish_req("v", &staging, &target, cap.clone(), false),
        Code::Ok,
        "publish",
    )
    .await;
    let before = bytes_total(
        &k.stats(stats_req("v", target.to_str().unwrap()))
            .await
            .unwrap(),
    );
    grow_file(&backing, 2 * SIZE);
    let r = k.expand(expand_req("v", &target, 2 * SIZE as i64)).await;
    let after = bytes_total(
        &k.stats(stats_req("v", target.to_str().unwrap()))
            .await
            .unwrap(),
    );
    let dev_size = volmig_node_agent::csi::system::device_size(&device_of(&k, "v")).unwrap();
    if volmig_node_agent::csi::system::has_capability(
        volmig_node_agent::csi::system::CAP_SYS_RESOURCE,
    ) {
        assert_eq!(r.unwrap(), 2 * SIZE as i64);
        assert!(
            after > before + (SIZE as i64) * 9 / 10,
            "grew: {before} -> {after}"
        );
        assert_eq!(dev_size, 2 * SIZE);
    } else {
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
        assert!(e.message().contains("CAP_SYS_RESOURCE"), "{e}");
        assert_eq!((after, dev_size), (before, SIZE), "nothing grew");
    }
    k.unpublish(unpublish_req("v", &target), Code::Ok, "unpublish")
        .await;
    k.unstage(unstage_req("v", &staging), Code::Ok, "unstage")
        .await;
    run_ok(
        &require_bin("e2fsck", "e2fsprogs"),
        &["-fn", backing.to_str().unwrap()],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_volume_grows_with_its_backing_device() {
    let k = Kubelet::start().await;
    let b = k.backing("b", SIZE);
    let st = k.staging("pv-b");
    let target = k.target("pod1", "pv-b");
    k.stage(
        stage_req("b", &st, &b, block_cap(SNW)),
        Code::Ok,
        "stage block",
    )
    .await;
    k.publish(
        publish_req("b", &st, &target, block_cap(SNW), false),
        Code::Ok,
        "publish",
    )
    .await;
    grow_file(&b, 3 * SIZE);
    assert_eq!(
        k.expand(expand_req("b", &target, 0)).await.unwrap(),
        3 * SIZE as i64
    );
    assert_eq!(
        volmig_node_agent::csi::system::device_size(&device_of(&k, "b")).unwrap(),
        3 * SIZE
    );
    let s = k
        .stats(stats_req("b", target.to_str().unwrap()))
        .await
        .unwrap();
    assert_eq!(bytes_total(&s), 3 * SIZE as i64);
    // A device that shrank is never a smaller volume.
    grow_file(&b, SIZE);
    let e = k.expand(expand_req("b", &target, 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    grow_file(&b, 3 * SIZE);
    k.unpublish(unpublish_req("b", &target), Code::Ok, "unpublish")
        .await;
    k.unstage(unstage_req("b", &st), Code::Ok, "unstage block")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_backing_device_makes_the_volume_abnormal() {
    let mut k = Kubelet::start().await;
    let backing = k.backing("v", SIZE);
    let staging = k.staging("pv-v");
    let cap = block_cap(SNW);
    k.stage(
        stage_req("v", &staging, &backing, cap.clone()),
        Code::Ok,
        "stage",
    )
    .await;
    let s = k
        .stats(stats_req("v", staging.to_str().unwrap()))
        .await
        .unwrap();
    assert!(!s.volume_condition.unwrap().abnormal);
    // The backing device is gone when the agent restarts: the volume
    // cannot be served, and its condition says why.
    let agent = k.node.take().unwrap().stop().await;
    drop(agent);
    let moved = k.dir.path().join("v.img.away");
    std::fs::rename(&backing, &moved).unwrap();
    let agent =
        volmig_node_agent::agent::Agent::new(&CsiNode::state_dir(k.dir.path(), "n1")).unwrap();
    assert_eq!(agent.restore().await.unwrap(), 0);
    k.node = Some(CsiNode::start_with(k.dir.path(), "n1", agent));
    k.c = k.node().client();
    let s = k
        .stats(stats_req("v", staging.to_str().unwrap()))
        .await
        .unwrap();
    let cond = s.volume_condition.unwrap();
    assert!(cond.abnormal, "{cond:?}");
    assert!(cond.message.contains("v.img"), "names the device: {cond:?}");
    // Back again: staging again serves it, and it is normal.
    std::fs::rename(&moved, &backing).unwrap();
    k.stage(
        stage_req("v", &staging, &backing, cap.clone()),
        Code::Ok,
        "stage again",
    )
    .await;
    let s = k
        .stats(stats_req("v", staging.to_str().unwrap()))
        .await
        .unwrap();
    assert!(!s.volume_condition.unwrap().abnormal);
    k.unstage(unstage_req("v", &staging), Code::Ok, "unstage")
        .await;
}

/// The product binary: `volmig-agent serve --csi-socket --node-id` serves
/// the plugin on its socket, next to its other sockets; without
/// `--node-id` the node is the host's name.
#[test]
fn the_agent_serves_the_plugin_on_its_csi_socket() {
    let dir = tempfile::tempdir().unwrap();
    let named = volmig_testkit::agent::AgentProcess::builder(dir.path(), "a1")
        .csi(Some("node-a"))
        .start();
    let plain = volmig_testkit::agent::AgentProcess::builder(dir.path(), "a2")
        .csi(None)
        .start();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for (agent, node) in [(&named, "node-a"), (&plain, host.trim())] {
            let c = agent.csi();
            let info = c
                .identity
                .clone()
                .get_plugin_info(GetPluginInfoRequest {})
                .await
                .unwrap()
                .into_inner();
            assert_eq!(info.name, DRIVER_NAME);
            let probe = c.identity.clone().probe(ProbeRequest {}).await.unwrap();
            assert_eq!(probe.into_inner().ready, Some(true));
            let ni = c
                .node
                .clone()
                .node_get_info(NodeGetInfoRequest {})
                .await
                .unwrap()
                .into_inner();
            assert_eq!(ni.node_id, node);
            assert_eq!(ni.accessible_topology.unwrap().segments[TOPOLOGY_KEY], node);
            let e = c
                .node
                .clone()
                .node_get_volume_stats(stats_req("nope", "/x"))
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::NotFound, "{e}");
        }
    });
    assert!(
        named
            .log_text()
            .contains("CSI node plugin csi.volmig.io listening")
    );
}
