//! Kubernetes objects of a small cluster for the [`crate::fake_api`]
//! server: VolumeMigration `db/m`, claims, PersistentVolumes, application
//! pods and agent pods, and their API paths.

use serde_json::{Value, json};

/// The API path of the VolumeMigration `db/m` that [`vm`] makes.
pub const VM_PATH: &str = "/apis/volmig.io/v1alpha1/namespaces/db/volumemigrations/m";

/// VolumeMigration `db/m` with `spec`.
pub fn vm(spec: Value) -> Value {
    json!({
        "apiVersion": "volmig.io/v1alpha1",
        "kind": "VolumeMigration",
        "metadata": {"name": "m", "namespace": "db"},
        "spec": spec,
    })
}

/// Claim `db/name` of `class` and `size`; bound to `volume` if given.
pub fn claim(name: &str, volume: Option<&str>, class: &str, size: &str, mode: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": "db"},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": class, "volumeMode": mode,
                 "resources": {"requests": {"storage": size}}, "volumeName": volume},
        "status": {"phase": if volume.is_some() { "Bound" } else { "Pending" }, "capacity": {"storage": size}},
    })
}

/// A CSI PersistentVolume bound to claim `db/claim`.
pub fn csi_volume(name: &str, claim: &str, size: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": name},
        "spec": {"capacity": {"storage": size}, "accessModes": ["ReadWriteOnce"], "volumeMode": "Block",
                 "persistentVolumeReclaimPolicy": "Delete",
                 "claimRef": {"namespace": "db", "name": claim},
                 "csi": {"driver": "csi.example.com", "volumeHandle": name}},
    })
}

/// A running pod `db/name` on `node` using `claim`.
pub fn app_pod(name: &str, node: &str, claim: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "db"},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app"}],
                 "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}]},
        "status": {"phase": "Running"},
    })
}

/// A ready node-agent pod on `node` at `ip`, of the chart installed as
/// release `volmig` (what the operator's default settings look for).
pub fn agent_pod(name: &str, node: &str, ip: &str) -> Value {
    release_agent_pod("volmig", name, node, ip)
}

/// A ready node-agent pod of Helm release `release` on `node` at `ip`.
pub fn release_agent_pod(release: &str, name: &str, node: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "volmig-system",
                     "labels": {"app.kubernetes.io/component": "node-agent",
                                "app.kubernetes.io/name": "volmig",
                                "app.kubernetes.io/instance": release}},
        "spec": {"nodeName": node, "containers": [{"name": "agent", "image": "volmig-agent"}]},
        "status": {"phase": "Running", "podIP": ip,
                   "conditions": [{"type": "Ready", "status": "True"}]},
    })
}

pub fn pvc_path(name: &str) -> String {
    format!("/api/v1/namespaces/db/persistentvolumeclaims/{name}")
}

pub fn pv_path(name: &str) -> String {
    format!("/api/v1/persistentvolumes/{name}")
}

pub fn pod_path(ns: &str, name: &str) -> String {
    format!("/api/v1/namespaces/{ns}/pods/{name}")
}

/// Node `name`.
pub fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
}

/// The API path of node `name`.
pub fn node_path(name: &str) -> String {
    format!("/api/v1/nodes/{name}")
}

/// The API path of the CSI driver's record of volume `id`.
pub fn volmig_volume_path(id: &str) -> String {
    format!("/apis/volmig.io/v1alpha1/volmigvolumes/{id}")
}

/// What the volume controller and a backing driver do for claim
/// `ns/name`: a PersistentVolume `pv-<name>` of driver
/// `hostpath.csi.k8s.io` (Block, its requested size), and the claim bound
/// to it. Returns the PV's name.
pub fn bind_claim(fake: &crate::fake_api::FakeApi, ns: &str, name: &str) -> String {
    let path = format!("/api/v1/namespaces/{ns}/persistentvolumeclaims/{name}");
    let c = fake
        .get(&path)
        .unwrap_or_else(|| panic!("no claim {ns}/{name} to bind"));
    let size = c["spec"]["resources"]["requests"]["storage"].clone();
    let pv = format!("pv-{name}");
    fake.put(
        &format!("/api/v1/persistentvolumes/{pv}"),
        json!({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": pv},
            "spec": {"capacity": {"storage": size}, "accessModes": c["spec"]["accessModes"].clone(),
                     "volumeMode": "Block", "persistentVolumeReclaimPolicy": "Delete",
                     "storageClassName": c["spec"]["storageClassName"].clone(),
                     "claimRef": {"namespace": ns, "name": name},
                     "csi": {"driver": "hostpath.csi.k8s.io", "volumeHandle": pv}},
        }),
    );
    fake.edit(&path, |c| {
        c["spec"]["volumeName"] = json!(pv);
        c["status"] = json!({"phase": "Bound", "capacity": {"storage": size}});
    });
    pv
}

/// What kubelet does for pod `ns/name`: it runs. Returns its uid.
pub fn run_pod(fake: &crate::fake_api::FakeApi, ns: &str, name: &str) -> String {
    let path = format!("/api/v1/namespaces/{ns}/pods/{name}");
    fake.edit(&path, |p| p["status"] = json!({"phase": "Running"}));
    fake.get(&path).unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// What `helm install` (or `kubectl apply -f crds/`) does first: the
/// checked-in CRDs (VolumeMigration, VolmigVolume) served by `fake`.
pub fn install_crds(fake: &crate::fake_api::FakeApi) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    for name in ["volumemigrations.volmig.io", "volmigvolumes.volmig.io"] {
        let file = dir.join(format!("{name}.yaml"));
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let crd: Value =
            serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        fake.put(
            &format!("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"),
            crd,
        );
    }
}
