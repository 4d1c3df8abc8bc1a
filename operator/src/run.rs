//! `volmig-operator run`: probes and metrics, leader election, and while
//! leading the VolumeMigration controller with its drivers. On SIGTERM (or
//! a lost lease) the controller stops and every driver stops between steps;
//! the sessions go on under the next leader.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};
use volmig_api::crd::VolumeMigration;
use volmig_api::tls::{ClientTls, TlsFiles};

use crate::agents::{AgentLabels, GrpcConnector};
use crate::health::{Health, health_router, metrics_router, serve};
use crate::metrics::Metrics;
use crate::reconcile::resolve::{MANAGED_BY, MIGRATION_LABEL};
use crate::reconcile::{Context, Settings, error_policy, reconcile};
use crate::{leader, observe, startup, tls_issuer};

/// The flags of `volmig-operator run` (the Helm chart passes these).
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The operator's namespace (where the agents and the Lease are).
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,
    /// The Helm release of this operator and its agents: only agent pods
    /// (in --namespace) labelled app.kubernetes.io/instance=<this>,
    /// app.kubernetes.io/name=<--app-name> and
    /// app.kubernetes.io/component=node-agent are dialled.
    #[arg(long, env = "VOLMIG_INSTANCE")]
    pub instance: String,
    /// The agent pods' app.kubernetes.io/name (the chart's name).
    #[arg(long, env = "VOLMIG_APP_NAME", default_value = "volmig")]
    pub app_name: String,
    /// The agents' gRPC port.
    #[arg(long, default_value_t = 7443)]
    pub agent_port: u16,
    /// The DNS name in the agents' certificate.
    #[arg(long, default_value = "volmig-agent")]
    pub agent_tls_name: String,
    /// Directory with ca.pem, master.pem, master-key.pem (as `volmig certs` writes them).
    #[arg(long, default_value = "/etc/volmig/tls")]
    pub tls_dir: PathBuf,
    /// Serve /metrics here.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Serve /healthz and /readyz here.
    #[arg(long, default_value = "0.0.0.0:8081")]
    pub health_addr: SocketAddr,
    /// The Lease used for leader election.
    #[arg(long, default_value = "volmig-operator")]
    pub lease_name: String,
    /// Migrations driven at once (0: no limit); the rest wait in Pending.
    #[arg(long, default_value_t = 4)]
    pub max_concurrent: usize,
    /// This replica's name (lease holder identity, events' reporter).
    #[arg(long, env = "POD_NAME", default_value = "volmig-operator")]
    pub pod_name: String,
    /// Image of the pods that keep a target attached on its node.
    #[arg(long, default_value = "registry.k8s.io/pause:3.10")]
    pub holder_image: String,
    /// kubelet's directory on the nodes, as the agents mount it.
    #[arg(long, default_value = crate::target::KUBELET_DIR)]
    pub kubelet_dir: String,
    /// Issue the mutual-TLS certificates of the operator and the agents into
    /// this Secret (in --namespace), and renew and rotate them; the pods
    /// mount it (--tls-dir) and reload it. Without it (cert-manager), the
    /// files in --tls-dir come from elsewhere.
    #[arg(long)]
    pub tls_secret: Option<String>,
    /// Lifetime of the CA --tls-secret holds (renewed with a third left).
    #[arg(long, default_value = "87600h", value_parser = duration)]
    pub tls_ca_validity: Duration,
    /// Lifetime of the agent and operator certificates (renewed with a third left).
    #[arg(long, default_value = "2160h", value_parser = duration)]
    pub tls_cert_validity: Duration,
    /// How long after a change of --tls-secret every pod has its files
    /// (kubelet's sync); each step of a CA rotation waits this long.
    #[arg(long, default_value = "1h", value_parser = duration)]
    pub tls_propagation: Duration,
}

fn duration(s: &str) -> Result<Duration, String> {
    volmig_api::units::parse_duration(s)
}

/// The migration whose `volmig.io/migration` label `o` carries.
fn migration_of<K: Resource>(o: &K) -> Option<ObjectRef<VolumeMigration>> {
    let name = o.labels().get(MIGRATION_LABEL)?;
    Some(ObjectRef::new(name).within(o.meta().namespace.as_deref()?))
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

pub async fn run(a: RunArgs) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let health = Arc::new(Health::default());
    let metrics = Arc::new(Metrics::default());
    let (h, m) = (a.health_addr, a.metrics_addr);
    let hr = health_router(health.clone());
    tokio::spawn(async move {
        if let Err(e) = serve(h, hr).await {
            error!(addr = %h, error = %e, "health endpoint failed");
        }
    });
    let mr = metrics_router(metrics.clone());
    tokio::spawn(async move {
        if let Err(e) = serve(m, mr).await {
            error!(addr = %m, error = %e, "metrics endpoint failed");
        }
    });

    let (term_tx, mut term) = watch::channel(false);
    tokio::spawn(async move {
        terminated().await;
        let _ = term_tx.send(true);
    });

    // The certificates first: the agents wait for them, whatever the CRD.
    if let Some(secret) = &a.tls_secret {
        let policy = tls_issuer::Policy {
            agent_name: a.agent_tls_name.clone(),
            ca_validity: a.tls_ca_validity,
            cert_validity: a.tls_cert_validity,
            propagation: a.tls_propagation,
        };
        tokio::spawn(tls_issuer::run(
            client.clone(),
            a.namespace.clone(),
            secret.clone(),
            policy,
        ));
    }

    // Ready once the API server serves the CRD this operator was built for;
    // a missing or stale one is refused with how to update it.
    let vms: Api<VolumeMigration> = Api::all(client.clone());
    let mut stop = term.clone();
    let stopped = async move {
        let _ = stop.wait_for(|t| *t).await;
    };
    if !startup::wait_for_current_crd(&client, startup::CRD_RECHECK, stopped).await {
        return Ok(());
    }
    health.ready.store(true, Ordering::SeqCst);

    // Its own certificate: kubelet projects the Secret a while after it
    // exists; read again for every connection to an agent.
    let own = ClientTls::client(TlsFiles::in_dir(&a.tls_dir, "master"));
    tokio::select! {
        _ = own.ready(Duration::from_secs(2)) => {}
        _ = term.changed() => return Ok(()),
    }
    let connector = GrpcConnector::new(&a.tls_dir, &a.agent_tls_name)?;
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "volmig-operator".into(),
            instance: Some(a.pod_name.clone()),
        },
    );
    let (saved_tx, saved_rx) = mpsc::unbounded_channel();
    tokio::spawn(observe::run(saved_rx, recorder.clone(), metrics.clone()));
    let settings = Settings {
        namespace: a.namespace.clone(),
        agent_labels: AgentLabels {
            name: a.app_name.clone(),
            instance: a.instance.clone(),
        },
        agent_port: a.agent_port,
        holder_image: a.holder_image.clone(),
        max_concurrent: a.max_concurrent,
        kubelet_dir: a.kubelet_dir.clone(),
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        settings,
        connector,
        1,
        saved_tx,
        recorder,
    ));
    let mut leading =
        leader::elect(client.clone(), &a.namespace, &a.lease_name, &a.pod_name).await?;
    info!(identity = %a.pod_name, lease = %a.lease_name, "waiting for leadership");

    loop {
        tokio::select! {
            _ = term.changed() => break,
            r = leading.wait_for(|l| *l) => { r?; }
        }
        let epoch = leader::epoch(client.clone(), &a.namespace, &a.lease_name).await?;
        ctx.epoch.store(epoch, Ordering::SeqCst);
        ctx.caches.ready().await?;
        info!(epoch, "leading: reconciling VolumeMigrations");

        // The target claims and holder pods a migration made (labelled, not
        // owned: see reconcile::resolve) wake it when they change.
        let made = watcher::Config::default().labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1));
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let errors = metrics.clone();
        let controller = Controller::new(vms.clone(), watcher::Config::default())
            .watches(
                Api::<PersistentVolumeClaim>::all(client.clone()),
                made.clone(),
                |c| migration_of(&c),
            )
            .watches(Api::<Pod>::all(client.clone()), made, |p| migration_of(&p))
            .graceful_shutdown_on(async move {
                let _ = stop_rx.await;
            })
            .run(reconcile, error_policy, ctx.clone())
            .for_each(move |r| {
                let errors = errors.clone();
                async move {
                    if let Err(e) = r {
                        errors.reconcile_failed();
                        warn!(error = %e, "reconcile");
                    }
                }
            });
        let task = tokio::spawn(controller);
        let terminating = tokio::select! {
            _ = term.changed() => true,
            r = leading.wait_for(|l| !*l) => { r?; warn!("lost the lease; stopping"); false }
        };
        let _ = stop_tx.send(());
        if let Err(e) = task.await {
            error!(error = %e, "controller task");
        }
        ctx.supervisor.stop_all(Duration::from_secs(30)).await;
        info!("drivers stopped between steps; their sessions continue under the next leader");
        if terminating {
            break;
        }
    }
    health.stopping.store(true, Ordering::SeqCst);
    drop(leading); // releases the lease
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}
