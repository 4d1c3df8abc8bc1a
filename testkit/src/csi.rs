//! The CSI node plugin as kubelet drives it: [`CsiClient`], a client of its
//! Identity and Node services over the plugin's unix socket; builders of
//! kubelet's requests; and [`CsiNode`], a node plugin to drive (an agent
//! in the test's process serving `csi.volmig.io` on a socket in the test's
//! directory), whose mounts and devices are undone on drop.
//!
//! [`CsiNode::start_loop`] runs the plugin over [`LoopVolumes`]: the agent
//! serves the volume, and a loop device straight on the backing file
//! stands in for the kernel block frontend. Its I/O bypasses the
//! interposer, so it is for the CSI protocol (fields, codes, idempotency,
//! mounts, expansion), never for data through a migration.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use volmig_api::csi::controller_client::ControllerClient;
use volmig_api::csi::identity_client::IdentityClient;
use volmig_api::csi::node_client::NodeClient;
use volmig_api::csi::volume_capability::access_mode::Mode;
use volmig_api::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use volmig_api::csi::{
    CapacityRange, NodeExpandVolumeRequest, NodeGetVolumeStatsRequest, NodePublishVolumeRequest,
    NodeStageVolumeRequest, NodeUnpublishVolumeRequest, NodeUnstageVolumeRequest, VolumeCapability,
};
use volmig_api::slave::ServeVolume;
use volmig_api::{SlaveError, SlaveResult};
use volmig_node_agent::agent::Agent;
use volmig_node_agent::csi::{Condition, Device, NodeConfig, NodePlugin, Volumes};

use crate::tools::{require_bin, retry};

pub use volmig_node_agent::csi::{BACKING_DEVICE_KEY, DRIVER_NAME, SIZE_KEY, TOPOLOGY_KEY};

/// A client of a CSI plugin's unix socket, as kubelet is (identity and
/// node) or as the controller sidecars are (identity and controller).
#[derive(Clone)]
pub struct CsiClient {
    pub identity: IdentityClient<Channel>,
    pub node: NodeClient<Channel>,
    pub controller: ControllerClient<Channel>,
}

impl CsiClient {
    /// Connects (lazily) to the plugin at `sock`; call inside a tokio
    /// runtime (or with one entered), where the channel then lives.
    pub fn new(sock: &Path) -> Self {
        let sock = sock.to_path_buf();
        let channel = Endpoint::from_static("http://csi.local")
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(300))
            .connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
                let sock = sock.clone();
                async move {
                    tokio::net::UnixStream::connect(sock)
                        .await
                        .map(hyper_util::rt::TokioIo::new)
                }
            }));
        Self {
            identity: IdentityClient::new(channel.clone()),
            node: NodeClient::new(channel.clone()),
            controller: ControllerClient::new(channel),
        }
    }
}

/// Mount access with filesystem `fs` ("" = the plugin's choice) and
/// `flags`.
pub fn mount_cap(fs: &str, flags: &[&str], mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.to_string(),
            mount_flags: flags.iter().map(|f| f.to_string()).collect(),
            volume_mount_group: String::new(),
        })),
    }
}

/// Block access.
pub fn block_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

fn text(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// NodeStageVolume of `volume` from `backing` at `staging`, as kubelet
/// sends it after ControllerPublishVolume.
pub fn stage_req(
    volume: &str,
    staging: &Path,
    backing: &Path,
    cap: VolumeCapability,
) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: volume.to_string(),
        publish_context: HashMap::from([(BACKING_DEVICE_KEY.to_string(), text(backing))]),
        staging_target_path: text(staging),
        volume_capability: Some(cap),
        secrets: HashMap::new(),
        volume_context: HashMap::new(),
    }
}

pub fn unstage_req(volume: &str, staging: &Path) -> NodeUnstageVolumeRequest {
    NodeUnstageVolumeRequest {
        volume_id: volume.to_string(),
        staging_target_path: text(staging),
    }
}

pub fn publish_req(
    volume: &str,
    staging: &Path,
    target: &Path,
    cap: VolumeCapability,
    readonly: bool,
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: volume.to_string(),
        publish_context: HashMap::new(),
        staging_target_path: text(staging),
        target_path: text(target),
        volume_capability: Some(cap),
        readonly,
        secrets: HashMap::new(),
        volume_context: HashMap::new(),
    }
}

pub fn unpublish_req(volume: &str, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest {
        volume_id: volume.to_string(),
        target_path: text(target),
    }
}

pub fn stats_req(volume: &str, path: &str) -> NodeGetVolumeStatsRequest {
    NodeGetVolumeStatsRequest {
        volume_id: volume.to_string(),
        volume_path: path.to_string(),
        staging_target_path: String::new(),
    }
}

pub fn expand_req(volume: &str, path: &Path, required_bytes: i64) -> NodeExpandVolumeRequest {
    NodeExpandVolumeRequest {
        volume_id: volume.to_string(),
        volume_path: text(path),
        capacity_range: Some(CapacityRange {
            required_bytes,
            limit_bytes: 0,
        }),
        staging_target_path: String::new(),
        volume_capability: None,
        secrets: HashMap::new(),
    }
}

/// The gRPC code of a call's answer (`Ok` for a success).
pub fn code<T>(r: &Result<tonic::Response<T>, tonic::Status>) -> tonic::Code {
    match r {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}

/// Asserts a call answered `want`; returns the status message.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(
    r: Result<tonic::Response<T>, tonic::Status>,
    want: tonic::Code,
    what: &str,
) -> String {
    match r {
        Ok(resp) => {
            assert_eq!(want, tonic::Code::Ok, "{what}: answered OK: {resp:?}");
            String::new()
        }
        Err(s) => {
            assert_eq!(
                s.code(),
                want,
                "{what}: answered {:?}: {}",
                s.code(),
                s.message()
            );
            s.message().to_string()
        }
    }
}

/// A loop device straight on each volume's backing file, standing in for
/// the agent's kernel block frontend (see the module docs); the agent
/// serves the volume itself (no frontend), so serving, unserving, sessions,
/// growing and conditions are the agent's own.
pub struct LoopVolumes {
    pub agent: Arc<Agent>,
    devices: Mutex<HashMap<String, PathBuf>>,
}

fn losetup(args: &[&str]) -> Result<String, String> {
    let out = Command::new(require_bin("losetup", "mount"))
        .args(args)
        .output()
        .map_err(|e| format!("losetup: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "losetup {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl LoopVolumes {
    pub fn new(agent: Arc<Agent>) -> Self {
        Self {
            agent,
            devices: Mutex::new(HashMap::new()),
        }
    }

    /// The loop device over `backing`, if one exists.
    fn loop_of(backing: &Path) -> Result<Option<PathBuf>, String> {
        let out = losetup(&["-j", backing.to_str().unwrap()])?;
        Ok(out
            .lines()
            .next()
            .and_then(|l| l.split(':').next())
            .filter(|d| d.starts_with("/dev/loop"))
            .map(PathBuf::from))
    }

    /// Every loop device it made (for clean-up).
    pub fn devices(&self) -> Vec<PathBuf> {
        self.devices.lock().unwrap().values().cloned().collect()
    }

    /// The loop device of `volume`: made by this shim, or (after a plugin
    /// restart) the one over the file the agent serves it from.
    fn device_of(&self, volume: &str) -> Option<PathBuf> {
        if let Some(d) = self.devices.lock().unwrap().get(volume) {
            return Some(d.clone());
        }
        let info = self.agent.list().into_iter().find(|v| v.name == volume)?;
        LoopVolumes::loop_of(&info.active).ok().flatten()
    }
}

impl Volumes for LoopVolumes {
    async fn attach(&self, volume: &str, backing: &Path) -> SlaveResult<Device> {
        let info = self
            .agent
            .serve(ServeVolume {
                volume: volume.to_string(),
                backing: backing.to_path_buf(),
                frontends: Vec::new(),
                direct: false,
            })
            .await
            .map_err(SlaveError::from)?;
        let file = info.active.clone();
        let dev = tokio::task::spawn_blocking(move || match LoopVolumes::loop_of(&file)? {
            Some(d) => Ok(d),
            None => losetup(&["--find", "--show", file.to_str().unwrap()]).map(PathBuf::from),
        })
        .await
        .unwrap()
        .map_err(SlaveError::failed)?;
        self.devices
            .lock()
            .unwrap()
            .insert(volume.to_string(), dev.clone());
        Ok(Device {
            path: dev,
            size: info.size,
        })
    }

    async fn detach(&self, volume: &str) -> SlaveResult<()> {
        if let Some(s) = self.agent.migration_of(volume) {
            return Err(SlaveError::new(
                volmig_api::ErrorKind::InUse,
                format!("held by migration session {s}"),
            ));
        }
        let dev = self.device_of(volume);
        self.devices.lock().unwrap().remove(volume);
        if let Some(dev) = dev {
            let d = dev.to_str().unwrap().to_string();
            tokio::task::spawn_blocking(move || retry("losetup", &["-d", &d], 20))
                .await
                .unwrap();
        }
        self.agent.unserve(volume).await.map_err(SlaveError::from)?;
        Ok(())
    }

    async fn grow(&self, volume: &str) -> SlaveResult<u64> {
        let size = self.agent.resize(volume).await.map_err(SlaveError::from)?;
        let dev = self.device_of(volume);
        if let Some(dev) = dev {
            let d = dev.to_str().unwrap().to_string();
            tokio::task::spawn_blocking(move || losetup(&["-c", &d]))
                .await
                .unwrap()
                .map_err(SlaveError::failed)?;
        }
        Ok(size)
    }

    fn backing(&self, volume: &str) -> Option<PathBuf> {
        self.agent.backing_of(volume)
    }

    fn migration(&self, volume: &str) -> Option<String> {
        self.agent.migration_of(volume)
    }

    fn condition(&self, volume: &str) -> Condition {
        self.agent.condition_of(volume)
    }
}

/// A CSI node plugin in the test's process, on `<dir>/<name>.csi.sock`,
/// with its agent's state in `<dir>/<name>-state`. On drop it stops, and
/// every mount and loop device its volumes left is undone.
pub struct CsiNode {
    pub dir: PathBuf,
    pub name: String,
    pub sock: PathBuf,
    pub plugin: Arc<NodePlugin<LoopVolumes>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// Stopped to be started again: leave the mounts and devices.
    keep: bool,
}

impl CsiNode {
    pub fn state_dir(dir: &Path, name: &str) -> PathBuf {
        dir.join(format!("{name}-state"))
    }

    /// Node `name` (its node id too) over [`LoopVolumes`] (call inside a
    /// tokio runtime; needs root).
    pub async fn start_loop(dir: &Path, name: &str) -> Self {
        let state = Self::state_dir(dir, name);
        let agent = Agent::new(&state).unwrap();
        agent.restore().await.unwrap();
        Self::start_with(dir, name, agent)
    }

    /// The plugin over an agent of the test's (e.g. one restarted on the
    /// same state directory).
    pub fn start_with(dir: &Path, name: &str, agent: Arc<Agent>) -> Self {
        let state = Self::state_dir(dir, name);
        let plugin = Arc::new(
            NodePlugin::new(
                LoopVolumes::new(agent),
                NodeConfig {
                    node_id: name.to_string(),
                    max_volumes_per_node: 0,
                },
                &state,
            )
            .unwrap(),
        );
        let sock = dir.join(format!("{name}.csi.sock"));
        let listener = volmig_node_agent::grpc::bind_unix(
            &sock,
            volmig_node_agent::grpc::SocketAccess::default(),
        )
        .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (p, s) = (plugin.clone(), sock.clone());
        let task = tokio::spawn(async move {
            volmig_node_agent::csi::serve_unix(p, listener, &s, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Self {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            sock,
            plugin,
            stop: Some(stop),
            task: Some(task),
            keep: false,
        }
    }

    pub fn agent(&self) -> &Arc<Agent> {
        &self.plugin.volumes().agent
    }

    pub fn client(&self) -> CsiClient {
        CsiClient::new(&self.sock)
    }

    /// Stops serving the socket (the mounts and devices stay: a plugin
    /// restart) and returns the agent.
    pub async fn stop(mut self) -> Arc<Agent> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
        // Nothing to undo on drop: the next plugin owns it all.
        self.keep = true;
        self.agent().clone()
    }
}

impl Drop for CsiNode {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if self.keep {
            return;
        }
        // Undo what the volumes left, targets before staging paths.
        if let Ok(staged) = self.plugin.staged() {
            for rec in staged.values() {
                for t in rec.published.keys() {
                    while crate::devices::is_mountpoint(t)
                        && retry("umount", &[t.to_str().unwrap()], 5)
                    {}
                }
                while crate::devices::is_mountpoint(&rec.staging_path)
                    && retry("umount", &[rec.staging_path.to_str().unwrap()], 5)
                {}
                // Found by its file (in the test's directory): a device
                // number alone may be another test's by now.
                if let Ok(Some(d)) = LoopVolumes::loop_of(&rec.backing) {
                    let _ = retry("losetup", &["-d", d.to_str().unwrap()], 5);
                }
            }
        }
        for d in self.plugin.volumes().devices() {
            let _ = retry("losetup", &["-d", d.to_str().unwrap()], 5);
        }
    }
}

/// What a test's kubelet left of a process agent's CSI volumes, undone on
/// drop (a failing test included): the publish targets and staging paths
/// its records name are unmounted, then (lazily) every mount under the
/// agent's state directory (its FUSE mount), and the loop devices over
/// files there are detached. Declare it after the agent, so it runs first.
pub struct KubeletMounts {
    state_dir: PathBuf,
}

impl KubeletMounts {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            state_dir: state_dir.to_path_buf(),
        }
    }
}

impl Drop for KubeletMounts {
    fn drop(&mut self) {
        let umount = |p: &Path| {
            let p = p.to_str().unwrap_or_default();
            while crate::devices::is_mountpoint(Path::new(p)) {
                if !retry("umount", &[p], 5) && !retry("umount", &["-l", p], 1) {
                    break;
                }
            }
        };
        let records = std::fs::read_dir(self.state_dir.join("csi"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|d| serde_json::from_slice::<serde_json::Value>(&d).ok());
        for rec in records {
            if let Some(targets) = rec["published"].as_object() {
                for t in targets.keys() {
                    umount(Path::new(t));
                }
            }
            if let Some(s) = rec["staging_path"].as_str() {
                umount(Path::new(s));
            }
        }
        let state = self.state_dir.to_str().unwrap_or_default().to_string();
        if let Ok(out) = Command::new("losetup").arg("-a").output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if line.contains(&state)
                    && let Some(dev) = line.split(':').next()
                {
                    let _ = retry("losetup", &["-d", dev], 5);
                }
            }
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for m in mounts.lines().filter_map(|l| l.split_whitespace().nth(4)) {
            if m.starts_with(&state) {
                let _ = retry("umount", &["-l", m], 1);
            }
        }
    }
}

/// CreateVolume `name` of `bytes` (0: unsaid) with `cap`, as the
/// external-provisioner sends it for claim `db/<claim>` of a StorageClass
/// with `backingStorageClass: <class>` (None: a class without it).
pub fn create_req(
    name: &str,
    class: Option<&str>,
    bytes: i64,
    cap: VolumeCapability,
    claim: &str,
) -> volmig_api::csi::CreateVolumeRequest {
    let mut parameters = HashMap::from([
        ("csi.storage.k8s.io/pvc/name".to_string(), claim.to_string()),
        (
            "csi.storage.k8s.io/pvc/namespace".to_string(),
            "db".to_string(),
        ),
        ("csi.storage.k8s.io/pv/name".to_string(), name.to_string()),
    ]);
    if let Some(c) = class {
        parameters.insert(
            volmig_api::csi_driver::BACKING_CLASS_PARAM.to_string(),
            c.to_string(),
        );
    }
    volmig_api::csi::CreateVolumeRequest {
        name: name.to_string(),
        capacity_range: (bytes > 0).then_some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap],
        parameters,
        ..Default::default()
    }
}

/// ControllerPublishVolume of `volume` on `node` with `cap`, as the
/// external-attacher sends it.
pub fn controller_publish_req(
    volume: &str,
    node: &str,
    cap: VolumeCapability,
    readonly: bool,
) -> volmig_api::csi::ControllerPublishVolumeRequest {
    volmig_api::csi::ControllerPublishVolumeRequest {
        volume_id: volume.to_string(),
        node_id: node.to_string(),
        volume_capability: Some(cap),
        readonly,
        ..Default::default()
    }
}

/// ControllerUnpublishVolume of `volume` on `node`.
pub fn controller_unpublish_req(
    volume: &str,
    node: &str,
) -> volmig_api::csi::ControllerUnpublishVolumeRequest {
    volmig_api::csi::ControllerUnpublishVolumeRequest {
        volume_id: volume.to_string(),
        node_id: node.to_string(),
        ..Default::default()
    }
}
