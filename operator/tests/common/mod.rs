//! Shared by the operator's tests: the fake API server, certificates, a
//! real `volmig-agent` process, volume contents a writer can be checked
//! against, and Kubernetes objects of a small cluster.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod fake_api;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use serde_json::{Value, json};

pub const BLOCK: u64 = 4096;

pub const VM_PATH: &str = "/apis/volmig.io/v1alpha1/namespaces/db/volumemigrations/m";

/// Writes ca.pem, agent.pem/agent-key.pem (server: `volmig-agent`,
/// `localhost`) and master.pem/master-key.pem (client), as `volmig certs`.
pub fn certs(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let leaf = |name: &str, hosts: &[&str], client: bool| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        for h in hosts {
            p.subject_alt_names.push(match h.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*h).try_into().unwrap()),
            });
        }
        p.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (agent, agent_key) = leaf("volmig-agent", &["volmig-agent", "localhost"], false);
    let (master, master_key) = leaf("volmig-master", &[], true);
    for (n, d) in [
        ("ca.pem", ca.pem()),
        ("agent.pem", agent),
        ("agent-key.pem", agent_key),
        ("master.pem", master),
        ("master-key.pem", master_key),
    ] {
        std::fs::write(dir.join(n), d).unwrap();
    }
}

/// The `volmig-agent` binary of this build, built if missing.
pub fn agent_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // <target>/<profile>/deps/<test> -> <target>/<profile>/volmig-agent
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let agent = profile_dir.join("volmig-agent");
    let release = profile_dir.ends_with("release");
    let target_dir = profile_dir.parent().unwrap();
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "-q", "-p", "volmig-agent", "--target-dir"])
        .arg(target_dir);
    if release {
        cmd.arg("--release");
    }
    // Always ask cargo: a stale agent binary would test old code.
    let st = cmd.status().unwrap();
    assert!(st.success(), "building volmig-agent for the test failed");
    assert!(
        agent.exists(),
        "{} missing after the build",
        agent.display()
    );
    agent
}

pub struct Proc(pub Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A pattern block `b` of generation `g`.
pub fn fill(buf: &mut [u8], b: u64, g: u32) {
    for (i, c) in buf.chunks_exact_mut(8).enumerate() {
        c.copy_from_slice(&((b << 32) ^ ((g as u64) << 16) ^ i as u64 ^ 0x5151).to_le_bytes());
    }
}

/// A source file of `size` bytes holding generation 0 everywhere, and an
/// empty target of the same size.
pub fn volumes(dir: &Path, size: u64) -> (PathBuf, PathBuf) {
    let src = dir.join("source.img");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(size).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for mb in 0..size >> 20 {
        for (i, c) in buf.chunks_exact_mut(BLOCK as usize).enumerate() {
            fill(c, ((mb << 20) / BLOCK) + i as u64, 0);
        }
        f.write_all_at(&buf, mb << 20).unwrap();
    }
    let dst = dir.join("target.img");
    std::fs::File::create(&dst).unwrap().set_len(size).unwrap();
    (src, dst)
}

/// Checks every block of `path`: the last acknowledged generation of the
/// hot blocks, generation 0 elsewhere.
pub fn check_volume(path: &Path, size: u64, gens: &[AtomicU32]) {
    let f = std::fs::File::open(path).unwrap();
    let (mut got, mut want) = (vec![0u8; BLOCK as usize], vec![0u8; BLOCK as usize]);
    for b in 0..size / BLOCK {
        let g = gens
            .get(b as usize)
            .map(|g| g.load(Ordering::SeqCst))
            .unwrap_or(0);
        fill(&mut want, b, g);
        f.read_exact_at(&mut got, b * BLOCK).unwrap();
        assert!(
            got == want,
            "block {b} of {} does not hold generation {g}",
            path.display()
        );
    }
}

/// A real agent process serving `source` as volume `vol` over NBD (unix
/// socket) and gRPC with mutual TLS.
pub struct Agent {
    pub proc: Proc,
    pub port: u16,
    pub nbd: PathBuf,
}

pub fn start_agent(dir: &Path, source: &Path, volume: &str) -> Agent {
    let port = free_port();
    let certs_dir = dir.join("certs");
    let nbd = dir.join("nbd.sock");
    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    let child = Command::new(agent_bin())
        .args(["serve", "--state-dir"])
        .arg(dir.join("agent-state"))
        .arg("--export")
        .arg(format!("{volume}={}", source.display()))
        .arg("--nbd-unix")
        .arg(&nbd)
        .arg("--control")
        .arg(dir.join("ctl.sock"))
        .arg("--grpc")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--tls-cert")
        .arg(certs_dir.join("agent.pem"))
        .arg("--tls-key")
        .arg(certs_dir.join("agent-key.pem"))
        .arg("--tls-client-ca")
        .arg(certs_dir.join("ca.pem"))
        .stderr(log)
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() || !nbd.exists() {
        assert!(t.elapsed() < Duration::from_secs(20), "agent did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Agent {
        proc: Proc(child),
        port,
        nbd,
    }
}

/// Random 4 KiB writes over NBD to the first `hot` blocks until stopped;
/// `gens` records each block's last acknowledged generation.
pub async fn writer(
    sock: PathBuf,
    volume: String,
    gens: Arc<Vec<AtomicU32>>,
    stop: Arc<AtomicBool>,
) -> u64 {
    let mut c = volmig_frontends::nbd::NbdClient::connect_unix(&sock, &volume)
        .await
        .unwrap();
    let mut buf = vec![0u8; BLOCK as usize];
    let mut x = 0x2545_f491u64;
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x % gens.len() as u64;
        let g = gens[b as usize].load(Ordering::SeqCst) + 1;
        fill(&mut buf, b, g);
        c.write(b * BLOCK, &buf, false).await.unwrap();
        gens[b as usize].store(g, Ordering::SeqCst);
        n += 1;
        tokio::time::sleep(Duration::from_micros(300)).await;
    }
    n
}

// --- Kubernetes objects ---

pub fn vm(spec: Value) -> Value {
    json!({
        "apiVersion": "volmig.io/v1alpha1",
        "kind": "VolumeMigration",
        "metadata": {"name": "m", "namespace": "db"},
        "spec": spec,
    })
}

pub fn claim(name: &str, volume: Option<&str>, class: &str, size: &str, mode: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": "db"},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": class, "volumeMode": mode,
                 "resources": {"requests": {"storage": size}}, "volumeName": volume},
        "status": {"phase": if volume.is_some() { "Bound" } else { "Pending" }, "capacity": {"storage": size}},
    })
}

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

pub fn app_pod(name: &str, node: &str, claim: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "db"},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app"}],
                 "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}]},
        "status": {"phase": "Running"},
    })
}

pub fn agent_pod(name: &str, node: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "volmig-system",
                     "labels": {"app.kubernetes.io/component": "node-agent"}},
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
