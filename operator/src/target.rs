//! Where the target's raw device appears on the node. The operator runs a
//! small "holder" pod on the node with the target claim as a raw block
//! `volumeDevices` entry; kubelet attaches the volume and publishes the
//! device under the pod's directory, which the agent (with the host's
//! `/var/lib/kubelet` mounted, mount propagation on) opens.

use k8s_openapi::api::core::v1::PersistentVolume;

/// kubelet's root directory on the node (`--kubelet-dir`).
pub const KUBELET_DIR: &str = "/var/lib/kubelet";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetPathError {
    #[error("persistent volume has no name")]
    Unnamed,
    #[error(
        "persistent volume {0} is neither a CSI nor a local volume: volmig finds raw block devices of those two only"
    )]
    UnsupportedSource(String),
}

/// The volume plugin directory kubelet uses for `pv`'s block device.
pub fn plugin_dir(pv: &PersistentVolume) -> Result<&'static str, TargetPathError> {
    let name = pv.metadata.name.clone().ok_or(TargetPathError::Unnamed)?;
    let spec = pv.spec.as_ref();
    if spec.is_some_and(|s| s.csi.is_some()) {
        Ok("kubernetes.io~csi")
    } else if spec.is_some_and(|s| s.local.is_some()) {
        Ok("kubernetes.io~local-volume")
    } else {
        Err(TargetPathError::UnsupportedSource(name))
    }
}

/// `<kubelet dir>/pods/<holder pod uid>/volumeDevices/<plugin dir>/<PV name>`.
pub fn device_path(
    kubelet_dir: &str,
    holder_uid: &str,
    pv: &PersistentVolume,
) -> Result<String, TargetPathError> {
    let dir = plugin_dir(pv)?;
    let name = pv
        .metadata
        .name
        .as_deref()
        .ok_or(TargetPathError::Unnamed)?;
    let root = kubelet_dir.trim_end_matches('/');
    Ok(format!(
        "{root}/pods/{holder_uid}/volumeDevices/{dir}/{name}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        CSIPersistentVolumeSource, LocalVolumeSource, NFSVolumeSource, PersistentVolumeSpec,
    };
    use kube::api::ObjectMeta;

    fn pv(name: &str, spec: PersistentVolumeSpec) -> PersistentVolume {
        PersistentVolume {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            spec: Some(spec),
            status: None,
        }
    }

    #[test]
    fn csi_local_and_others() {
        let csi = pv(
            "pvc-1234",
            PersistentVolumeSpec {
                csi: Some(CSIPersistentVolumeSource {
                    driver: "ebs.csi.aws.com".into(),
                    volume_handle: "vol-1".into(),
                    ..CSIPersistentVolumeSource::default()
                }),
                ..PersistentVolumeSpec::default()
            },
        );
        assert_eq!(
            device_path(KUBELET_DIR, "u-1", &csi).unwrap(),
            "/var/lib/kubelet/pods/u-1/volumeDevices/kubernetes.io~csi/pvc-1234"
        );
        let local = pv(
            "local-pv-a",
            PersistentVolumeSpec {
                local: Some(LocalVolumeSource {
                    path: "/dev/sdb".into(),
                    fs_type: None,
                }),
                ..PersistentVolumeSpec::default()
            },
        );
        assert_eq!(
            device_path("/var/lib/kubelet/", "u-2", &local).unwrap(),
            "/var/lib/kubelet/pods/u-2/volumeDevices/kubernetes.io~local-volume/local-pv-a"
        );
        let nfs = pv(
            "nfs",
            PersistentVolumeSpec {
                nfs: Some(NFSVolumeSource {
                    path: "/x".into(),
                    server: "s".into(),
                    read_only: None,
                }),
                ..PersistentVolumeSpec::default()
            },
        );
        assert_eq!(
            device_path(KUBELET_DIR, "u", &nfs),
            Err(TargetPathError::UnsupportedSource("nfs".into()))
        );
    }
}
