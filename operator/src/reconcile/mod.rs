//! The VolumeMigration reconciler. One pass looks at a migration and does
//! the next thing it needs:
//!
//! - deletion: request an abort, wait for the rollback; then rebind each
//!   target the workload runs on and release the others (see [`outcome`]),
//!   and only then let the finalizer go;
//! - an invalid spec: phase Failed with the reason, nothing created (the
//!   only final failure before a session: a corrected spec starts);
//! - no session yet: wait for a free slot (`--max-concurrent`), resolve
//!   each volume's source, node, agent and target (see [`resolve`]; what is
//!   not there yet keeps it Pending with the reason, looked at again with
//!   backoff: [`RETRY_FIRST`] doubling up to [`RETRY_MAX`]), create
//!   the session records in the status (phase Activating) and start the
//!   migration's job on the [`Supervisor`] (several volumes: a consistency
//!   group, cut over together);
//! - a running session: keep a driver on it (after a restart or a new
//!   leader, under a newer epoch), pass `spec.abort` on;
//! - an ended session: volume by volume, make the rebinding durable where
//!   the workload runs on the target (see [`rebind`]), remove the holder
//!   pods where it runs on the source (see [`outcome`]).

pub mod outcome;
pub mod rebind;
pub mod resolve;
pub mod status;
pub mod volmig;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{DeleteParams, ListParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::mpsc;
use tracing::{info, warn};
use volmig_api::crd::{
    MigrationPhase, SharedAttachment, VolumeMigration, VolumeStatus, check_spec,
};
use volmig_master::{
    Admission, DriverConfig, Job, MasterError, Member, MultiAttach, SessionConfig, Slots,
    Supervisor,
};

use crate::agents::{AgentLabels, Connector};
use crate::cache::{Caches, Read};
use crate::error::{Error, Result};
use crate::status_map::verify_from;
use crate::status_store::{CrStatusStore, Saved};
use outcome::Place;
use resolve::{Attachment, Plan, Resolved};

pub const FINALIZER: &str = "volmig.io/cleanup";

/// What `volmig-operator run` was told.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The operator's (and the agents') namespace.
    pub namespace: String,
    /// The labels of this release's agent pods.
    pub agent_labels: AgentLabels,
    pub agent_port: u16,
    /// Image of the holder pods (does nothing; `pause`).
    pub holder_image: String,
    /// Migrations driven at once (0: no limit); others wait in Pending.
    pub max_concurrent: usize,
    /// kubelet's root directory as the agents see it (the host's).
    pub kubelet_dir: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            namespace: "volmig-system".into(),
            agent_labels: AgentLabels::default(),
            agent_port: 7443,
            holder_image: "registry.k8s.io/pause:3.10".into(),
            max_concurrent: 4,
            kubelet_dir: crate::target::KUBELET_DIR.into(),
        }
    }
}

pub struct Context<C: Connector> {
    pub client: Client,
    /// Pods, claims and volumes as the reconciler reads them.
    pub caches: Caches,
    pub settings: Settings,
    pub connector: C,
    /// Runs the migrations' drivers (one job per migration), within the
    /// concurrency limit.
    pub supervisor: Supervisor,
    /// The agents each running job talks to, so a moved agent restarts it.
    endpoints: Mutex<HashMap<String, String>>,
    /// How often each migration waiting to start has waited in a row.
    waits: Mutex<HashMap<String, u32>>,
    /// This leader's fencing epoch (from the Lease's transitions).
    pub epoch: AtomicU64,
    /// Every save of a session record, for Events and metrics.
    pub saved: mpsc::UnboundedSender<Saved>,
    pub recorder: Recorder,
}

impl<C: Connector> Context<C> {
    pub fn new(
        client: Client,
        settings: Settings,
        connector: C,
        epoch: u64,
        saved: mpsc::UnboundedSender<Saved>,
        recorder: Recorder,
    ) -> Self {
        // The operator drives every session itself: its slots are in its
        // memory, and each session keeps its own bandwidth limit.
        let supervisor = Supervisor::new(Slots::in_process(settings.max_concurrent), 0);
        Self {
            caches: Caches::start(&client),
            client,
            settings,
            connector,
            supervisor,
            endpoints: Mutex::default(),
            waits: Mutex::default(),
            epoch: AtomicU64::new(epoch),
            saved,
            recorder,
        }
    }

    /// A new driver's epoch: newer than this leader's and than any epoch
    /// the session recorded, so the driver it replaces is fenced off.
    pub fn epoch_for(&self, vm: &VolumeMigration) -> u64 {
        let recorded = vm
            .status
            .as_ref()
            .map(|s| s.epoch.max(0) as u64)
            .unwrap_or(0);
        self.epoch.load(Ordering::SeqCst).max(recorded + 1)
    }

    /// The agents `key`'s job was started with.
    fn endpoints(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        // Whole strings go in and out; a panic cannot tear one.
        self.endpoints.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// When migration `key`, waiting to start, looks again: 5 s after its
    /// first wait, twice as long after each further one, at most 2 minutes.
    pub fn retry_after(&self, key: &str) -> Duration {
        let mut waits = self.waits.lock().unwrap_or_else(|p| p.into_inner());
        let n = waits.entry(key.to_string()).or_insert(0);
        let after = RETRY_FIRST.saturating_mul(1 << (*n).min(8)).min(RETRY_MAX);
        *n = n.saturating_add(1);
        after
    }

    /// Migration `key` waits no more.
    fn waited(&self, key: &str) {
        self.waits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// The endpoint of this release's ready agent pod on `node`, if any
    /// (from the pod cache).
    pub async fn agent_on(&self, node: &str) -> Result<Option<String>> {
        self.caches.ready().await?;
        Ok(crate::agents::agent_on_node(
            self.caches.pods(),
            &self.settings.namespace,
            &self.settings.agent_labels,
            node,
            self.settings.agent_port,
        ))
    }

    async fn event(&self, vm: &VolumeMigration, type_: EventType, reason: &str, note: String) {
        let ev = KubeEvent {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &vm.object_ref(&())).await {
            warn!(error = %e, "publishing an event failed");
        }
    }
}

/// The first retry of a migration waiting to start, and the longest.
pub const RETRY_FIRST: Duration = Duration::from_secs(5);
pub const RETRY_MAX: Duration = Duration::from_secs(120);

fn key(vm: &VolumeMigration) -> String {
    format!("{}/{}", vm.namespace().unwrap_or_default(), vm.name_any())
}

fn requeue(secs: u64) -> Action {
    Action::requeue(Duration::from_secs(secs))
}

/// The controller's reconcile function.
pub async fn reconcile<C: Connector>(
    vm: Arc<VolumeMigration>,
    ctx: Arc<Context<C>>,
) -> Result<Action> {
    let ns = vm
        .namespace()
        .ok_or_else(|| Error::Unnamed(vm.name_any()))?;
    let api: Api<VolumeMigration> = Api::namespaced(ctx.client.clone(), &ns);
    ctx.caches.ready().await?;
    finalizer(&api, FINALIZER, vm, |ev| async {
        match ev {
            Finalizer::Apply(vm) => apply(&vm, &ctx).await,
            Finalizer::Cleanup(vm) => cleanup(&vm, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    })
}

/// Retries failed reconciles; waiting for a rollback is the common one.
pub fn error_policy<C: Connector>(
    vm: Arc<VolumeMigration>,
    err: &Error,
    _ctx: Arc<Context<C>>,
) -> Action {
    match err {
        Error::WaitingForRollback(_) => requeue(2),
        e => {
            warn!(migration = %key(&vm), error = %e, "reconcile failed; retrying");
            requeue(10)
        }
    }
}

async fn apply<C: Connector>(vm: &VolumeMigration, ctx: &Context<C>) -> Result<Action> {
    let ns = vm.namespace().unwrap_or_default();
    let api: Api<VolumeMigration> = Api::namespaced(ctx.client.clone(), &ns);
    let st = vm.status.clone().unwrap_or_default();

    // Failed before a session: an invalid spec (looked at again below, so
    // a corrected spec starts), or what an older operator took for final.
    let failed_before_start = st.phase == MigrationPhase::Failed && st.session_id.is_none();
    if st.phase.is_terminal() && !failed_before_start {
        return finish(vm, ctx).await;
    }
    if st.session_id.is_some() {
        keep_driving(vm, ctx).await?;
        return Ok(requeue(30));
    }

    // No session yet. Only an invalid spec is final; everything else waits
    // for the cluster to catch up (see `resolve`).
    let parsed = match check_spec(&vm.spec) {
        Ok(p) => p,
        Err(msgs) => {
            let msg = format!("invalid spec: {}", msgs.join("; "));
            if status::failed_before_start(&api, vm, "InvalidSpec", &msg).await? {
                ctx.event(vm, EventType::Warning, "InvalidSpec", msg).await;
            }
            return Ok(Action::await_change());
        }
    };
    if vm.spec.abort {
        let g = vm.metadata.generation;
        status::update_status(&api, vm, |s| {
            s.phase = MigrationPhase::Aborted;
            status::apply_conditions(
                s,
                g,
                &[
                    (
                        "Ready",
                        false,
                        "Aborted",
                        "aborted before a session started",
                    ),
                    (
                        "Progressing",
                        false,
                        "Aborted",
                        "aborted before a session started",
                    ),
                ],
            );
        })
        .await?;
        return Ok(Action::await_change());
    }
    if let Admission::Full { running, limit } = ctx.supervisor.admission()? {
        let msg = format!(
            "{running} migrations are running (at most {limit} at once); this one starts when one ends"
        );
        status::pending(&api, vm, "WaitingForSlot", &msg).await?;
        return Ok(requeue(15));
    }

    let rs = match resolve::resolve(ctx, vm).await? {
        Plan::Ready(rs) => rs,
        Plan::Wait(reason, msg) => {
            if status::pending(&api, vm, reason, &msg).await? {
                ctx.event(vm, EventType::Normal, reason, msg).await;
            }
            return Ok(Action::requeue(ctx.retry_after(&key(vm))));
        }
    };
    ctx.waited(&key(vm));

    // Record where the volumes are, then create the session(s) (Activating).
    status::update_status(&api, vm, |s| {
        s.phase = MigrationPhase::Pending;
        s.error = None;
        s.volumes = rs
            .iter()
            .map(|r| VolumeStatus {
                source: r.source_claim.clone(),
                target: r.target_claim.clone(),
                volume: r.volume.clone(),
                backing_namespace: r.backing_namespace.clone(),
                target_volume: Some(r.target_volume.clone()),
                node: Some(r.node.clone()),
                agent: Some(r.agent.clone()),
                holder_pod: Some(r.holder_pod.clone()),
                shared_with: r
                    .shared
                    .iter()
                    .map(|a| SharedAttachment {
                        node: a.node.clone(),
                        agent: Some(a.agent.clone()),
                        holder_pod: Some(a.holder_pod.clone()),
                        target_path: Some(a.target_path.clone()),
                    })
                    .collect(),
                ..VolumeStatus::default()
            })
            .collect();
    })
    .await?;
    let config = SessionConfig {
        mode: parsed.mode,
        sync_goal_ms: parsed.sync_goal_ms,
        bandwidth: parsed.bandwidth,
        verify: verify_from(parsed.verify),
        ..SessionConfig::default()
    };
    let store =
        CrStatusStore::new(api.clone(), &ns, &vm.name_any()).with_observer(ctx.saved.clone());
    let epoch = ctx.epoch_for(vm);
    if let [r] = rs.as_slice() {
        let rec = volmig_master::create_session(
            &store,
            &r.volume,
            std::path::Path::new(&r.target_path),
            config,
            epoch,
        )
        .await?;
        info!(migration = %key(vm), session = %rec.session, volume = %r.volume, node = %r.node, epoch, "session created");
    } else {
        let members = members(ctx, &rs)?;
        volmig_master::group_run::create_group(&store, &vm.name_any(), &members, &config, epoch)
            .await?;
        info!(migration = %key(vm), volumes = rs.len(), epoch, "consistency group created");
    }
    let what: Vec<String> = rs
        .iter()
        .map(|r| {
            let shared = if r.shared.is_empty() {
                String::new()
            } else {
                let nodes: Vec<&str> = r.shared.iter().map(|a| a.node.as_str()).collect();
                format!(", also used on {}", nodes.join(", "))
            };
            format!(
                "{} (volume {}, node {}{shared}) to claim {}",
                r.source_claim, r.volume, r.node, r.target_claim
            )
        })
        .collect();
    ctx.event(
        vm,
        EventType::Normal,
        "Started",
        format!("migrating {}", what.join("; ")),
    )
    .await;
    start_driver(vm, ctx, &rs, epoch)?;
    Ok(requeue(30))
}

/// The slave of one volume: its copying agent, and the agents of the other
/// nodes of a multi-attach volume, each with its own path to the target.
fn slave_of<C: Connector>(ctx: &Context<C>, r: &Resolved) -> Result<MultiAttach<C::Slave>> {
    let others = r
        .shared
        .iter()
        .map(|a| {
            Ok((
                a.agent.clone(),
                ctx.connector.slave(&a.agent)?,
                Some(a.target_path.clone().into()),
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(MultiAttach::with_targets(
        ctx.connector.slave(&r.agent)?,
        others,
    ))
}

fn members<C: Connector>(
    ctx: &Context<C>,
    rs: &[Resolved],
) -> Result<Vec<Member<MultiAttach<C::Slave>>>> {
    rs.iter()
        .map(|r| {
            Ok(Member {
                volume: r.volume.clone(),
                target: r.target_path.clone().into(),
                agent: r.agent.clone(),
                shared_with: r.shared.iter().map(|a| a.node.clone()).collect(),
                slave: slave_of(ctx, r)?,
            })
        })
        .collect()
}

/// Every agent the migration's driver talks to, copying ones first.
fn agents_of(rs: &[Resolved]) -> String {
    let copying = rs.iter().map(|r| r.agent.clone());
    let shared = rs
        .iter()
        .flat_map(|r| r.shared.iter().map(|a| a.agent.clone()));
    copying.chain(shared).collect::<Vec<_>>().join(",")
}

/// Starts the migration's job on the supervisor: one session for one
/// volume, a consistency group (cut over together) for several.
fn start_driver<C: Connector>(
    vm: &VolumeMigration,
    ctx: &Context<C>,
    rs: &[Resolved],
    epoch: u64,
) -> Result<()> {
    let ns = vm.namespace().unwrap_or_default();
    let name = vm.name_any();
    let api: Api<VolumeMigration> = Api::namespaced(ctx.client.clone(), &ns);
    let store = CrStatusStore::new(api, &ns, &name).with_observer(ctx.saved.clone());
    let cfg = DriverConfig {
        epoch,
        ..DriverConfig::default()
    };
    let job = match rs {
        [r] => Job::Session {
            volume: r.volume.clone(),
            slave: slave_of(ctx, r)?,
        },
        _ => Job::Group {
            name,
            members: members(ctx, rs)?,
        },
    };
    let k = key(vm);
    let agents = agents_of(rs);
    if ctx.supervisor.start(&k, job, store, cfg) {
        ctx.endpoints().insert(k.clone(), agents.clone());
        info!(migration = %k, epoch, agents = %agents, "driver started");
    }
    Ok(())
}

/// The ready agent on `node`, or None (logged: the driver retries until
/// one is back).
async fn agent_for<C: Connector>(
    ctx: &Context<C>,
    migration: &str,
    node: &str,
) -> Result<Option<String>> {
    let found = ctx.agent_on(node).await?;
    if found.is_none() {
        warn!(
            migration,
            node, "no ready agent on the node; the driver retries until one is back"
        );
    }
    Ok(found)
}

/// A session exists and is not over: make sure a driver runs it.
async fn keep_driving<C: Connector>(vm: &VolumeMigration, ctx: &Context<C>) -> Result<()> {
    let k = key(vm);
    let st = vm.status.clone().unwrap_or_default();
    if st.volumes.is_empty() {
        return Ok(());
    }
    // The agents may have moved (a restarted agent pod gets a new IP).
    let mut rs = Vec::new();
    for v in &st.volumes {
        let node = v.node.clone().unwrap_or_default();
        let Some(agent) = agent_for(ctx, &k, &node).await? else {
            return Ok(());
        };
        let mut shared = Vec::new();
        for a in &v.shared_with {
            let Some(agent) = agent_for(ctx, &k, &a.node).await? else {
                return Ok(());
            };
            shared.push(Attachment {
                node: a.node.clone(),
                agent,
                holder_pod: a.holder_pod.clone().unwrap_or_default(),
                target_path: a.target_path.clone().unwrap_or_default(),
            });
        }
        rs.push(Resolved {
            source_claim: v.source.clone(),
            volume: v.volume.clone(),
            backing_namespace: v.backing_namespace.clone(),
            node,
            agent,
            target_claim: v.target.clone(),
            target_volume: v.target_volume.clone().unwrap_or_default(),
            holder_pod: v.holder_pod.clone().unwrap_or_default(),
            target_path: v.target_path.clone().unwrap_or_default(),
            shared,
        });
    }
    let agents = agents_of(&rs);
    if ctx.supervisor.is_running(&k) {
        if ctx.endpoints().get(&k) != Some(&agents) {
            info!(migration = %k, agents = %agents, "an agent moved; restarting the driver");
            ctx.supervisor.stop(&k); // started again by the next reconcile
        }
        return Ok(());
    }
    // Targets of operators before the uid label carry owner references to
    // the migration: drop them before the workload may run on a target.
    rebind::disown_all(ctx, vm, Read::Cached).await?;
    start_driver(vm, ctx, &rs, ctx.epoch_for(vm))
}

/// The session ended: each volume's outcome made durable where the
/// workload runs on its target, its holder pods released where it runs on
/// its source (see [`outcome`]).
async fn finish<C: Connector>(vm: &VolumeMigration, ctx: &Context<C>) -> Result<Action> {
    let st = vm.status.clone().unwrap_or_default();
    let ns = vm.namespace().unwrap_or_default();
    let mut rebound = Vec::new();
    let mut unsure = false;
    if st.session_id.is_none() {
        volmig::release_unstarted(ctx, vm).await?;
    }
    for v in &st.volumes {
        if v.backing_namespace.is_some() {
            // a volmig volume: its record says which backing claim is its
            match outcome::place(ctx, v).await? {
                Place::Target => {
                    if volmig::adopt(ctx, vm, v).await? {
                        let source = if vm.spec.retain_source {
                            "kept (retainSource)"
                        } else {
                            "released"
                        };
                        ctx.event(
                            vm,
                            EventType::Normal,
                            "BackingClaimChanged",
                            format!(
                                "volume {} (claim {}) is now backed by claim {}/{}; its former backing claim is {source}",
                                v.volume,
                                v.source,
                                v.backing_namespace.as_deref().unwrap_or_default(),
                                v.target
                            ),
                        )
                        .await;
                    }
                }
                Place::Source => volmig::release(ctx, vm, v).await?,
                Place::Unknown(why) => {
                    unsure = true;
                    warn!(migration = %key(vm), volume = %v.volume, "target backing claim {} kept: {why}", v.target);
                }
            }
            continue;
        }
        match outcome::place(ctx, v).await? {
            Place::Target => {
                if rebind::rebind_volume(ctx, &ns, v, Read::Cached).await? {
                    rebound.push(v.source.clone());
                }
            }
            Place::Source => release_holders(ctx, &ns, v).await?,
            Place::Unknown(why) => {
                unsure = true;
                if rebind::protect(ctx, &ns, v, Read::Cached).await? {
                    ctx.event(vm, EventType::Warning, "TargetKept", kept_note(v, &why))
                        .await;
                }
            }
        }
    }
    if !rebound.is_empty() {
        ctx.event(
            vm,
            EventType::Normal,
            "Rebound",
            format!(
                "claim(s) {} are now backed by their targets; the target claims and holder pods stay (see docs/ARCHITECTURE.md, Operator)",
                rebound.join(", ")
            ),
        )
        .await;
    }
    // Where the record cannot tell, ask the agents again later.
    Ok(if unsure {
        requeue(60)
    } else {
        Action::await_change()
    })
}

fn kept_note(v: &VolumeStatus, why: &str) -> String {
    format!(
        "kept target claim {}, its volume (reclaim policy Retain) and holder pod(s): {why}. \
         Delete them once you know the workload on claim {} does not use them",
        v.target, v.source
    )
}

async fn delete_holder<C: Connector>(ctx: &Context<C>, ns: &str, name: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    match pods.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(ae)) if ae.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Deletes volume `v`'s holder pods (every node's): its source is current.
async fn release_holders<C: Connector>(ctx: &Context<C>, ns: &str, v: &VolumeStatus) -> Result<()> {
    for h in resolve::holders(v) {
        delete_holder(ctx, ns, h).await?;
    }
    Ok(())
}

/// Deletes claim `name` if migration `vm` created it (a claim the spec
/// named stays); its source is current.
async fn release_claim<C: Connector>(
    ctx: &Context<C>,
    vm: &VolumeMigration,
    ns: &str,
    name: &str,
) -> Result<()> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let Some(c) = claims.get_opt(name).await? else {
        return Ok(());
    };
    if !resolve::ours(&c.metadata, vm) {
        return Ok(());
    }
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: c.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match claims.delete(name, &dp).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(ae)) if ae.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// What resolving a migration that never got a session created: its
/// holder pods and target claims, found by its uid.
async fn release_unstarted<C: Connector>(
    ctx: &Context<C>,
    vm: &VolumeMigration,
    ns: &str,
) -> Result<()> {
    let Some(uid) = vm.metadata.uid.as_deref() else {
        return Ok(());
    };
    let lp = ListParams::default().labels(&format!("{}={uid}", resolve::MIGRATION_UID_LABEL));
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    for p in pods.list(&lp).await?.items {
        if resolve::is_holder(&p) {
            delete_holder(ctx, ns, &p.name_any()).await?;
        }
    }
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    for c in claims.list(&lp).await?.items {
        release_claim(ctx, vm, ns, &c.name_any()).await?;
    }
    Ok(())
}

/// The migration is being deleted. A running session is rolled back
/// first; then, volume by volume, a target the workload runs on is rebound
/// before the finalizer goes, whatever happened before (a deletion right
/// after Completed, an operator restarted in between), and only a target
/// whose source is current is released (see [`outcome`]).
async fn cleanup<C: Connector>(vm: &VolumeMigration, ctx: &Context<C>) -> Result<Action> {
    let ns = vm.namespace().unwrap_or_default();
    let st = vm.status.clone().unwrap_or_default();
    let k = key(vm);
    if st.session_id.is_some() && !st.phase.is_terminal() {
        // The store reads the deletion as an abort request; make sure a
        // driver is there to carry it out, and that the request is recorded.
        if !st.abort_requested {
            let api: Api<VolumeMigration> = Api::namespaced(ctx.client.clone(), &ns);
            let store = CrStatusStore::new(api, &ns, &vm.name_any());
            for v in st.volumes.iter().filter(|v| v.session.is_some()) {
                match volmig_master::request_abort(&store, &v.volume).await {
                    Ok(_) | Err(MasterError::Invalid(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            ctx.event(
                vm,
                EventType::Normal,
                "Aborting",
                "deleted while migrating: rolling back".into(),
            )
            .await;
        }
        keep_driving(vm, ctx).await?;
        return Err(Error::WaitingForRollback(k));
    }
    for v in &st.volumes {
        if v.backing_namespace.is_some() {
            match outcome::place(ctx, v).await? {
                Place::Target => {
                    volmig::adopt(ctx, vm, v).await?;
                }
                Place::Source => volmig::release(ctx, vm, v).await?,
                Place::Unknown(why) => {
                    ctx.event(
                        vm,
                        EventType::Warning,
                        "TargetKept",
                        format!(
                            "kept backing claim {} of volume {} and its holder pod(s): {why}; the volume's record still lists it",
                            v.target, v.volume
                        ),
                    )
                    .await;
                }
            }
            continue;
        }
        match outcome::place(ctx, v).await? {
            Place::Target => {
                rebind::rebind_volume(ctx, &ns, v, Read::Live).await?;
            }
            Place::Source => {
                release_holders(ctx, &ns, v).await?;
                release_claim(ctx, vm, &ns, &v.target).await?;
            }
            Place::Unknown(why) => {
                rebind::protect(ctx, &ns, v, Read::Live).await?;
                ctx.event(vm, EventType::Warning, "TargetKept", kept_note(v, &why))
                    .await;
            }
        }
    }
    if st.session_id.is_none() {
        release_unstarted(ctx, vm, &ns).await?;
        volmig::release_unstarted(ctx, vm).await?;
    }
    ctx.supervisor.stop(&k);
    ctx.supervisor.forget(&k);
    ctx.endpoints().remove(&k);
    ctx.waited(&k);
    info!(migration = %k, phase = %st.phase, "finalized");
    Ok(Action::await_change())
}
