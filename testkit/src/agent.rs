//! Node agents for tests: a `volmig-agent serve` process
//! ([`AgentProcess`], started by an [`AgentBuilder`]), and an in-process
//! agent ([`InProcAgent`]: `volmig_node_agent::agent::Agent` with an NBD server).
//!
//! A process agent serves NBD on a unix socket (and TCP if asked), and its
//! slave API over gRPC on its control socket (which masters dial by
//! default) and on 127.0.0.1 (plain text, or mutual TLS after
//! [`AgentBuilder::tls`]). Its files live in the test's directory, named
//! after the agent: `<name>.nbd.sock`, `<name>.ctl.sock`, `<name>-state/`,
//! `<name>.log`.

use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use volmig_api::Slave;
use volmig_api::SlaveResult;
use volmig_api::io::{BlockChoice, BlockKind};
use volmig_api::slave::{
    Fence, Frontend, ListVolumes, ServeVolume, SessionState, UnserveVolume, Unserved, VolumeInfo,
};
use volmig_frontends::nbd::{Export, NbdServer, ServerHandle};
use volmig_master::{ClientTls, GrpcSlave};
use volmig_node_agent::agent::Agent;
use volmig_node_agent::interposer::Interposer;

use crate::binaries::agent_bin;
use crate::master::{LocalMaster, Migration};
use crate::net::{free_addr, free_port};
use crate::pattern::{Expected, Writer, WriterOpts};
use crate::process::ChildGuard;
use crate::tools::Out;

/// How long an agent may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A `volmig-agent serve` process to start.
#[derive(Clone, Debug)]
pub struct AgentBuilder {
    dir: PathBuf,
    name: String,
    exports: Vec<(String, PathBuf)>,
    tls: Option<PathBuf>,
    nbd_tcp: bool,
    env: Vec<(String, String)>,
    port: Option<u16>,
    direct: bool,
    /// Do not wait for the gRPC port at start (its TLS files come later).
    grpc_later: bool,
    block: bool,
    keeper: Option<PathBuf>,
    extra: Vec<String>,
    /// Serve the CSI node plugin, with this node id (None: the default).
    csi: Option<Option<String>>,
    /// Serve Prometheus metrics here (`--metrics`).
    metrics: Option<SocketAddr>,
}

impl AgentBuilder {
    /// Agent `name` with its files in `dir`.
    pub fn new(dir: &Path, name: &str) -> Self {
        Self {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            exports: Vec::new(),
            tls: None,
            nbd_tcp: false,
            env: Vec::new(),
            port: None,
            direct: false,
            grpc_later: false,
            block: false,
            keeper: None,
            extra: Vec::new(),
            csi: None,
            metrics: None,
        }
    }

    /// Serves the backing device `path` as volume `volume` (`--export`).
    pub fn export(mut self, volume: &str, path: &Path) -> Self {
        self.exports.push((volume.to_string(), path.to_path_buf()));
        self
    }

    /// gRPC with mutual TLS, certificates from `certs` (see
    /// [`crate::certs::make`]).
    pub fn tls(mut self, certs: &Path) -> Self {
        self.tls = Some(certs.to_path_buf());
        self
    }

    /// NBD on a TCP port of 127.0.0.1 too.
    pub fn nbd_tcp(mut self) -> Self {
        self.nbd_tcp = true;
        self
    }

    /// An environment variable of the agent (`VOLMIG_FAULT`...).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// The gRPC port (a free one by default).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Opens backing devices with O_DIRECT.
    pub fn direct(mut self) -> Self {
        self.direct = true;
        self
    }

    /// With [`tls`](Self::tls) files that are not there yet: the agent
    /// serves NBD and its control socket meanwhile, and opens the gRPC port
    /// once they are; [`start`](Self::start) does not wait for that port.
    pub fn tls_later(mut self) -> Self {
        self.grpc_later = true;
        self
    }

    /// Kernel block devices (FUSE + loop), their files in
    /// `<name>-block/`: see [`AgentProcess::serve_block`]. Root only.
    pub fn block(mut self) -> Self {
        self.block = true;
        self
    }

    /// The descriptor keeper the agent hands its /dev/fuse descriptors to
    /// (an agent restart is then a stall of its block devices' I/O).
    pub fn keeper(mut self, keeper: &crate::keeper::KeeperProcess) -> Self {
        self.keeper = Some(keeper.socket().to_path_buf());
        self
    }

    /// More `volmig-agent serve` options.
    pub fn arg(mut self, arg: &str) -> Self {
        self.extra.push(arg.to_string());
        self
    }

    /// Serves Prometheus metrics on a free port of 127.0.0.1 (read them
    /// with [`AgentProcess::metric`]).
    pub fn metrics(mut self) -> Self {
        self.metrics = Some(free_addr());
        self
    }

    /// Serves the CSI node plugin on `<name>.csi.sock` (`--csi-socket`),
    /// with `--node-id node_id` unless None (the host name then).
    pub fn csi(mut self, node_id: Option<&str>) -> Self {
        self.csi = Some(node_id.map(str::to_string));
        self
    }

    pub fn start(self) -> AgentProcess {
        let mut a = AgentProcess {
            csi_sock: self.dir.join(format!("{}.csi.sock", self.name)),
            nbd_sock: self.dir.join(format!("{}.nbd.sock", self.name)),
            ctl_sock: self.dir.join(format!("{}.ctl.sock", self.name)),
            state_dir: self.dir.join(format!("{}-state", self.name)),
            block_dir: self.dir.join(format!("{}-block", self.name)),
            log: self.dir.join(format!("{}.log", self.name)),
            port: self.port.unwrap_or_else(free_port),
            tcp: self.nbd_tcp.then(free_addr),
            child: None,
            starts: 0,
            spec: self,
        };
        // A port picked free may be taken before the agent binds it: pick
        // again (unless the test chose it).
        for attempt in 0.. {
            match a.spawn() {
                Ok(()) => return a,
                Err(log) if a.spec.port.is_none() && attempt < 5 && log.contains("in use") => {
                    a.port = free_port();
                    a.tcp = a.spec.nbd_tcp.then(free_addr);
                }
                Err(log) => panic!("volmig-agent {} did not come up:\n{log}", a.spec.name),
            }
        }
        unreachable!("the loop returns or panics")
    }
}

/// A running (or stopped) `volmig-agent serve`. Dropping it kills the
/// agent; when the test is failing, the end of its log is printed.
pub struct AgentProcess {
    spec: AgentBuilder,
    child: Option<ChildGuard>,
    pub nbd_sock: PathBuf,
    pub ctl_sock: PathBuf,
    /// The CSI node plugin's socket (with [`AgentBuilder::csi`]).
    pub csi_sock: PathBuf,
    pub state_dir: PathBuf,
    /// Where its kernel block frontends keep their files (the FUSE mount
    /// is `fuse/` in it), with [`AgentBuilder::block`].
    pub block_dir: PathBuf,
    pub log: PathBuf,
    port: u16,
    tcp: Option<SocketAddr>,
    starts: u32,
}

/// `VOLMIG_FAULT_DELAY` for a restart: the agent's FUSE workers read the
/// requests queued while it was down for half a second before it goes on
/// (what a loaded machine may do; see `fault::delay`).
pub const WORKERS_READ_FIRST: &str = "agent:fuse-workers-started=500";

impl AgentProcess {
    pub fn builder(dir: &Path, name: &str) -> AgentBuilder {
        AgentBuilder::new(dir, name)
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    fn spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "agent {} is running", self.spec.name);
        let _ = std::fs::remove_file(&self.nbd_sock);
        let _ = std::fs::remove_file(&self.ctl_sock);
        let _ = std::fs::remove_file(&self.csi_sock);
        self.starts += 1;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        use std::io::Write;
        writeln!(
            log,
            "==== volmig-agent start {} (testkit) ====",
            self.starts
        )
        .unwrap();
        let s = &self.spec;
        let mut cmd = Command::new(agent_bin());
        cmd.arg("serve")
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--nbd-unix")
            .arg(&self.nbd_sock)
            .arg("--control")
            .arg(&self.ctl_sock)
            .arg("--grpc")
            .arg(format!("127.0.0.1:{}", self.port));
        match &s.tls {
            Some(certs) => {
                cmd.arg("--tls-cert")
                    .arg(certs.join("agent.pem"))
                    .arg("--tls-key")
                    .arg(certs.join("agent-key.pem"))
                    .arg("--tls-client-ca")
                    .arg(certs.join("ca.pem"));
            }
            None => {
                cmd.arg("--insecure-grpc");
            }
        }
        if let Some(addr) = self.tcp {
            cmd.arg("--nbd-tcp").arg(addr.to_string());
        }
        if s.direct {
            cmd.arg("--direct");
        }
        if s.block {
            cmd.arg("--block")
                .arg("fuse")
                .arg("--block-dir")
                .arg(&self.block_dir);
        } else {
            cmd.arg("--block").arg("none");
        }
        if let Some(k) = &s.keeper {
            cmd.arg("--fd-keeper").arg(k);
        }
        if let Some(addr) = s.metrics {
            cmd.arg("--metrics").arg(addr.to_string());
        }
        cmd.args(&s.extra);
        if let Some(node_id) = &s.csi {
            cmd.arg("--csi-socket").arg(&self.csi_sock);
            if let Some(id) = node_id {
                cmd.arg("--node-id").arg(id);
            }
        }
        for (name, path) in &s.exports {
            cmd.arg("--export")
                .arg(format!("{name}={}", path.display()));
        }
        cmd.env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "0")
            .envs(s.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd.spawn().expect("spawning volmig-agent serve");
        self.child = Some(ChildGuard::new(child));
        self.wait_ready()
    }

    /// Waits until every socket accepts connections. Err(log) when the agent
    /// exited or did not come up in time.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("spawned");
            if let Some(st) = child.try_wait() {
                self.child = None;
                return Err(format!("agent exited with {st}\n{}", self.log_text()));
            }
            let nbd = UnixStream::connect(&self.nbd_sock).is_ok();
            let grpc = self.spec.grpc_later || TcpStream::connect(("127.0.0.1", self.port)).is_ok();
            let tcp = self.tcp.is_none_or(|a| TcpStream::connect(a).is_ok());
            let ctl = self.ctl_sock.exists();
            let csi = self.spec.csi.is_none() || self.csi_sock.exists();
            if nbd && grpc && tcp && ctl && csi {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "agent not ready after {START_TIMEOUT:?} (nbd {nbd}, grpc {grpc}, tcp {tcp}, \
                     control {ctl}, csi {csi})\n{}",
                    self.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the stopped (or killed) agent again on the same state
    /// directory, sockets and port, with `env` instead of the environment it
    /// was built with.
    pub fn start_again(&mut self, env: &[(&str, &str)]) {
        self.spec.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Err(log) = self.spawn() {
            panic!(
                "volmig-agent {} did not come up again:\n{log}",
                self.spec.name
            );
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.is_running())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// SIGTERM (SIGKILL after 30 s); how it exited, None if it was not
    /// running.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        Some(c.terminate(Duration::from_secs(30)))
    }

    /// SIGKILL.
    pub fn kill(&mut self) -> ExitStatus {
        self.child.take().expect("agent running").kill()
    }

    /// Waits for the agent to end by itself (a fault point); fails the test
    /// after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let name = format!("volmig-agent {}", self.spec.name);
        let st = self
            .child
            .as_mut()
            .expect("agent running")
            .wait_timeout(&name, timeout);
        self.child = None;
        st
    }

    /// A CSI client of its node plugin (started with [`AgentBuilder::csi`]).
    pub fn csi(&self) -> crate::csi::CsiClient {
        assert!(
            self.spec.csi.is_some(),
            "agent {} serves no CSI",
            self.spec.name
        );
        crate::csi::CsiClient::new(&self.csi_sock)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// No answer of the agent's FUSE workers found the kernel no longer
    /// waiting for it (in every run of this agent so far): no request was
    /// served twice, so no old write can have landed after a newer one.
    pub fn assert_each_request_served_once(&self) {
        let log = self.log_text();
        let orphaned: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("the kernel no longer waited for this answer"))
            .collect();
        assert!(
            orphaned.is_empty(),
            "{} FUSE answers came after the kernel had re-queued or given up their \
             request:\n{}",
            orphaned.len(),
            orphaned.join("\n")
        );
    }

    /// `nbd+unix:///NAME?socket=SOCK`
    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.nbd_sock.display())
    }

    /// `nbd://127.0.0.1:PORT/NAME`
    pub fn tcp_uri(&self, export: &str) -> String {
        let a = self.tcp.expect("agent built with nbd_tcp()");
        format!("nbd://{}:{}/{export}", a.ip(), a.port())
    }

    /// A writer over NBD on `volume` of this agent (see [`Writer`]).
    pub fn writer(
        &self,
        rt: &tokio::runtime::Handle,
        volume: &str,
        expected: Arc<Expected>,
        opts: WriterOpts,
    ) -> Writer {
        Writer::nbd(rt, &self.nbd_sock, volume, expected, opts)
    }

    /// The value of sample `name` of the agent's metrics now (`None`: not
    /// in them); the agent must have been built with
    /// [`AgentBuilder::metrics`].
    pub fn metric(&self, name: &str) -> Option<f64> {
        let addr = self
            .spec
            .metrics
            .expect("the agent serves no metrics: AgentBuilder::metrics");
        crate::net::sample(&crate::net::http_get(addr, "/metrics"), name)
    }

    /// The agent's FUSE mount (block frontends).
    pub fn fuse_mount(&self) -> PathBuf {
        self.block_dir.join("fuse")
    }

    /// Serves `backing` as `volume` (its `serve_volume`); not from inside a
    /// runtime.
    pub fn serve(&self, r: ServeVolume) -> SlaveResult<VolumeInfo> {
        self.call(async |s| s.serve_volume(r).await)
    }

    /// Serves `backing` as `volume` on a kernel block device (FUSE +
    /// loop); the volume's info, with its device.
    pub fn serve_block(&self, volume: &str, backing: &Path, direct: bool) -> VolumeInfo {
        let r = ServeVolume {
            volume: volume.to_string(),
            backing: backing.to_path_buf(),
            frontends: vec![Frontend::Block(BlockChoice::Only(BlockKind::FuseLoop))],
            direct,
        };
        let v = self.serve(r).unwrap_or_else(|e| {
            panic!(
                "serving {volume} as a block device: {e}\nagent log:\n{}",
                self.log_text()
            )
        });
        assert!(v.device.is_some(), "no block device in {v:?}");
        v
    }

    /// Stops serving `volume` (its `unserve_volume`).
    pub fn unserve(&self, volume: &str) -> SlaveResult<Unserved> {
        let r = UnserveVolume {
            volume: volume.to_string(),
        };
        self.call(async |s| s.unserve_volume(r).await)
    }

    /// The kernel block device of `volume`.
    pub fn device(&self, volume: &str) -> PathBuf {
        let vols = self.volumes();
        vols.iter()
            .find(|v| v.name == volume)
            .and_then(|v| v.device.clone())
            .unwrap_or_else(|| panic!("{volume} has no block device: {vols:?}"))
    }

    /// The gRPC port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The slave API's address, as masters dial it: the control socket
    /// (`unix://`, no TLS), or with [`AgentBuilder::tls`] the TCP port with
    /// mutual TLS.
    pub fn url(&self) -> String {
        match self.spec.tls {
            Some(_) => format!("https://127.0.0.1:{}", self.port),
            None => format!("unix://{}", self.ctl_sock.display()),
        }
    }

    /// The client identity a master presents (None: plain text).
    pub fn client_tls(&self) -> Option<ClientTls> {
        self.spec.tls.as_deref().map(crate::certs::client_tls)
    }

    /// `volmig migrate`'s options reaching this agent.
    pub fn master_args(&self) -> Vec<String> {
        let mut v = vec!["--agent".to_string(), self.url()];
        // Without TLS: the control socket, where file permissions decide.
        if let Some(certs) = &self.spec.tls {
            v.extend(["--tls-dir".into(), certs.display().to_string()]);
        }
        v
    }

    /// A gRPC client of this agent (call inside a tokio runtime).
    pub fn slave(&self) -> GrpcSlave {
        GrpcSlave::new(&self.url(), self.client_tls().as_ref()).expect("a gRPC client")
    }

    /// The volumes the agent serves (its `list_volumes`); not from inside a
    /// runtime.
    pub fn volumes(&self) -> Vec<VolumeInfo> {
        self.call(async |s| s.list_volumes(ListVolumes).await)
            .unwrap_or_else(|e| panic!("list_volumes: {e}\nagent log:\n{}", self.log_text()))
            .volumes
    }

    /// The backing device workload I/O of `volume` goes to now.
    pub fn active_path(&self, volume: &str) -> PathBuf {
        let vols = self.volumes();
        vols.iter()
            .find(|v| v.name == volume)
            .unwrap_or_else(|| panic!("{volume} not served: {vols:?}"))
            .active
            .clone()
    }

    /// Runs `f` with this agent's gRPC client on a runtime of its own (not
    /// from inside a runtime).
    fn call<T>(&self, f: impl AsyncFnOnce(GrpcSlave) -> T) -> T {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async { f(self.slave()).await })
    }

    /// The agent's state of the session a master's record (JSON) names.
    pub fn session_state(&self, record: &serde_json::Value) -> SessionState {
        let fence = Fence {
            session: record["session"].as_str().expect("record.session").into(),
            volume: record["volume"].as_str().expect("record.volume").into(),
            epoch: record["epoch"].as_u64().expect("record.epoch"),
        };
        self.call(async |s| s.get_state(fence).await)
            .unwrap_or_else(|e| {
                panic!(
                    "get_state: {e}
agent log:
{}",
                    self.log_text()
                )
            })
    }

    /// Asserts a master's final record says Completed, verified,
    /// redirected, with a cutover stall, and that the agent agrees (the
    /// session finished on the target, nothing dirty).
    pub fn assert_completed(&self, record: &serde_json::Value) {
        let r = record;
        assert_eq!(
            r["phase"],
            "Completed",
            "migration did not complete: {r:#}\nagent log:\n{}",
            self.log_text()
        );
        assert_eq!(r["verified"], true, "target not verified: {r:#}");
        assert!(
            r["cutover_stall_ms"].as_f64().is_some(),
            "no cutover stall recorded: {r:#}"
        );
        assert_eq!(r["redirected"], true, "workload not redirected: {r:#}");
        let st = self.session_state(r);
        assert!(
            st.finished && st.redirected && st.dirty_bytes == 0,
            "the agent's side of the session: {st:?}"
        );
    }

    /// The local master of this agent's tests (state in `<name>-master/`).
    pub fn master(&self) -> LocalMaster {
        LocalMaster::new(&self.spec.dir.join(format!("{}-master", self.spec.name)))
    }

    /// Starts `volmig migrate` of `volume` to `target` with `opts` in the
    /// background; returns once the session is past activation.
    pub fn migrate(&self, volume: &str, target: &Path, opts: &[&str]) -> Migration {
        self.master().start(self, volume, target, opts)
    }

    /// Runs `volmig migrate` of `volume` to `target` to its end; its output
    /// (exit 0 only when the migration completed).
    pub fn migrate_wait(&self, volume: &str, target: &Path, opts: &[&str]) -> Out {
        self.master().run(self, volume, target, opts)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
        if self.spec.block {
            crate::devices::tear_down_fuse(&self.fuse_mount());
        }
        if std::thread::panicking() {
            let log = self.log_text();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            eprintln!(
                "---- volmig-agent {} log ({}), last {} lines ----\n{}",
                self.spec.name,
                self.log.display(),
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// Serves `path` as volume `volume` on an in-process agent: the one place
/// tests add a volume to one.
pub async fn serve(agent: &Arc<Agent>, volume: &str, path: &Path, direct: bool) -> Arc<Interposer> {
    agent
        .add_volume(volume, path, direct)
        .await
        .unwrap_or_else(|e| panic!("serving {volume} from {}: {e}", path.display()))
}

/// An agent in the test's process, its state in `state_dir`.
pub fn in_process(state_dir: &Path) -> Arc<Agent> {
    Agent::new(state_dir).unwrap_or_else(|e| panic!("agent on {}: {e}", state_dir.display()))
}

/// An in-process agent with an NBD server on a unix socket: what `volmig-agent
/// serve` runs, inside the test (no process to start, the agent's own
/// structures at hand).
pub struct InProcAgent {
    pub agent: Arc<Agent>,
    server: NbdServer<Interposer>,
    _handle: ServerHandle,
    sock: PathBuf,
}

impl InProcAgent {
    /// Agent `name` with state `<dir>/<name>-state` and NBD on
    /// `<dir>/<name>.nbd.sock` (call inside a tokio runtime).
    pub async fn start(dir: &Path, name: &str) -> Self {
        let agent = in_process(&dir.join(format!("{name}-state")));
        let sock = dir.join(format!("{name}.nbd.sock"));
        let server = NbdServer::new();
        let handle = server.serve_unix(&sock).await.unwrap();
        Self {
            agent,
            server,
            _handle: handle,
            sock,
        }
    }

    /// Serves `path` as `volume`, and exports it over NBD.
    pub async fn serve(&self, volume: &str, path: &Path, direct: bool) -> Arc<Interposer> {
        let ip = serve(&self.agent, volume, path, direct).await;
        self.server
            .add_export(Export::new(volume, ip.clone()))
            .unwrap();
        ip
    }

    pub fn nbd_sock(&self) -> &Path {
        &self.sock
    }
}
