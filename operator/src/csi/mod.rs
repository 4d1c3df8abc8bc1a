//! The CSI controller service of the driver `csi.volmig.io`
//! (`volmig-operator csi-controller`), beside the kubernetes-csi sidecars
//! (external-provisioner, -attacher, -resizer) on a unix socket. The node
//! plugin is the agent's (`volmig_node_agent::csi`).
//!
//! A volume is a record (`VolmigVolume`, cluster scoped, named by the
//! volume id) and a backing claim (`volumeMode: Block`, of the
//! StorageClass parameter `backingStorageClass`) in volmig's namespace:
//!
//! - CreateVolume records the volume under an id derived from the
//!   request's name (stable: no migration changes it), then makes the
//!   backing claim, and answers ABORTED until it is bound;
//! - ControllerPublishVolume runs a holder pod on the node that attaches
//!   the *current* backing claim as a raw device (`volumeDevices`);
//!   kubelet publishes that device at
//!   `<kubelet dir>/pods/<holder uid>/volumeDevices/kubernetes.io~csi/<backing PV>`,
//!   which the agent sees through its mount of kubelet's directory (the
//!   same way a migration's target reaches it, see [`crate::target`]);
//!   the publish context names that path (`volmig.io/backing-device`)
//!   and NodeStageVolume serves the volume from it;
//! - ControllerUnpublishVolume deletes the holder; DeleteVolume releases
//!   the backing claims, never while published or while a migration
//!   moves the volume;
//! - ControllerExpandVolume grows the current backing claim;
//! - ControllerModifyVolume (a VolumeAttributesClass with a new
//!   `backingStorageClass`) creates a VolumeMigration of the workload's
//!   claim to that class.

pub mod controller;
pub mod error;
pub mod service;

pub use controller::{Controller, Settings, volume_id};
pub use error::{ControllerError, ControllerResult, Kind};
pub use service::{ControllerService, bind_unix, serve_unix};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The flags of `volmig-operator csi-controller` (the chart passes these).
#[derive(Debug, Clone, clap::Args)]
pub struct CsiArgs {
    /// The unix socket the sidecars dial (their --csi-address).
    #[arg(long, default_value = "/csi/csi.sock")]
    pub csi_socket: PathBuf,
    /// volmig's namespace: backing claims and holder pods live here.
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,
    /// Image of the pods that attach a backing claim on a node.
    #[arg(long, default_value = "registry.k8s.io/pause:3.10")]
    pub holder_image: String,
    /// kubelet's directory on the nodes, as the agents mount it.
    #[arg(long, default_value = crate::target::KUBELET_DIR)]
    pub kubelet_dir: String,
    /// How long ControllerPublishVolume waits for its holder pod to run
    /// before answering ABORTED (the attacher calls again).
    #[arg(long, default_value = "20s", value_parser = duration)]
    pub publish_wait: Duration,
    /// Size of a volume whose claim asks for none.
    #[arg(long, default_value = "1Gi", value_parser = size)]
    pub default_size: u64,
}

fn duration(s: &str) -> Result<Duration, String> {
    volmig_api::units::parse_duration(s)
}

fn size(s: &str) -> Result<u64, String> {
    volmig_api::units::parse_size(s).map_err(|e| e.to_string())
}

/// Serves the controller until SIGTERM or Ctrl-C. Not leader-elected:
/// the sidecars are (`--leader-election`), and every call is idempotent
/// against the API server, which holds all the state.
pub async fn run(a: CsiArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await?;
    let controller = Arc::new(Controller::new(
        client,
        Settings {
            namespace: a.namespace,
            holder_image: a.holder_image,
            kubelet_dir: a.kubelet_dir,
            publish_wait: a.publish_wait,
            default_bytes: a.default_size,
        },
    ));
    let listener = bind_unix(&a.csi_socket)
        .map_err(|e| anyhow::anyhow!("CSI socket {}: {e}", a.csi_socket.display()))?;
    tracing::info!(socket = %a.csi_socket.display(), driver = volmig_api::csi_driver::DRIVER_NAME, "CSI controller listening");
    serve_unix(
        controller,
        listener,
        &a.csi_socket,
        crate::run::terminated(),
    )
    .await?;
    Ok(())
}
