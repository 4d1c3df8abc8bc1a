//! `kubectl volmig upgrade-agents`: the node agents moved to their
//! DaemonSet's new image **in place**, node by node, so that each node's
//! volumes only stall.
//!
//! Deleting an agent pod (what a DaemonSet rollout does) ends its
//! descriptor keeper too, and with it the FUSE connection of every block
//! device on the node: the pods' I/O fails. A container's image, though,
//! may be changed in a running pod: kubelet then restarts that container
//! alone, and the keeper (a native sidecar, an init container) keeps the
//! connection, so the new agent takes its devices back as after a crash.
//! After `helm upgrade` (the chart's DaemonSet is `OnDelete`, so nothing
//! restarts by itself), this command compares every agent pod with the
//! DaemonSet's template and, where the containers differ only in their
//! images, patches the images of the regular containers (never the
//! keeper's: it stays at its old image, which works with newer agents, until
//! the pod is replaced) and waits for the pod to be ready again before the
//! next node, stopping at the first pod that is not. A pod whose containers
//! or volumes differ otherwise cannot be upgraded in place: it is reported,
//! to be drained and deleted by hand.

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, ContainerStatus, Pod, PodSpec};
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

use super::{Error, Result};

/// The labels of the chart's agent DaemonSet.
pub const AGENT_SELECTOR: &str =
    "app.kubernetes.io/part-of=volmig,app.kubernetes.io/component=node-agent";

/// One regular container of a pod moved to another image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageChange {
    /// Its index in `spec.containers`.
    pub index: usize,
    pub container: String,
    pub from: String,
    pub to: String,
}

/// What to do with one agent pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Its containers are the template's.
    UpToDate,
    /// Only images differ: these regular containers get the template's.
    /// Init containers (the keeper) keep theirs.
    InPlace(Vec<ImageChange>),
    /// More than images differ: the pod must be replaced (drained first).
    Replace(String),
}

fn image(c: &Container) -> String {
    c.image.clone().unwrap_or_default()
}

/// `c` as JSON without its image, to compare the rest.
fn without_image(c: &Container) -> Value {
    let mut v = serde_json::to_value(c).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.remove("image");
    }
    v
}

/// The first difference other than an image between two container lists,
/// if any.
fn differs(kind: &str, pod: &[Container], template: &[Container]) -> Option<String> {
    let names = |cs: &[Container]| cs.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
    if names(pod) != names(template) {
        return Some(format!(
            "{kind} {:?} in the pod, {:?} in the template",
            names(pod),
            names(template)
        ));
    }
    pod.iter()
        .zip(template)
        .find(|(p, t)| without_image(p) != without_image(t))
        .map(|(p, _)| format!("{kind} {} differs in more than its image", p.name))
}

/// What upgrading `pod` to `template` takes.
pub fn plan(pod: &PodSpec, template: &PodSpec) -> Plan {
    let init = |s: &PodSpec| s.init_containers.clone().unwrap_or_default();
    if let Some(why) = differs("init container", &init(pod), &init(template))
        .or_else(|| differs("container", &pod.containers, &template.containers))
    {
        return Plan::Replace(why);
    }
    let vols = |s: &PodSpec| serde_json::to_value(s.volumes.clone().unwrap_or_default()).ok();
    if vols(pod) != vols(template) {
        return Plan::Replace("the pod's volumes differ from the template's".into());
    }
    let changes: Vec<_> = pod
        .containers
        .iter()
        .zip(&template.containers)
        .enumerate()
        .filter(|(_, (p, t))| image(p) != image(t))
        .map(|(index, (p, t))| ImageChange {
            index,
            container: p.name.clone(),
            from: image(p),
            to: image(t),
        })
        .collect();
    if changes.is_empty() {
        Plan::UpToDate
    } else {
        Plan::InPlace(changes)
    }
}

/// The JSON patch that moves the containers to their new images, each
/// guarded by a test of its old one (a pod changed meanwhile is refused).
pub fn image_patch(changes: &[ImageChange]) -> Value {
    let mut ops = Vec::new();
    for c in changes {
        let path = format!("/spec/containers/{}/image", c.index);
        ops.push(json!({"op": "test", "path": path, "value": c.from}));
        ops.push(json!({"op": "replace", "path": path, "value": c.to}));
    }
    Value::Array(ops)
}

/// Whether every container of `pod` named in `changes` has restarted since
/// `restarts` were counted and the pod is ready; or why it will not be
/// (a container waiting for a reason that does not pass by itself).
fn settled(pod: &Pod, changes: &[ImageChange], restarts: &[i32]) -> Settled {
    let Some(st) = pod.status.as_ref() else {
        return Settled::No(None);
    };
    let mut stuck = None;
    for (change, before) in changes.iter().zip(restarts) {
        let name = &change.container;
        let Some(cs) = container_status(pod, name) else {
            return Settled::No(None);
        };
        if let Some(w) = cs.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            let reason = w.reason.clone().unwrap_or_default();
            if matches!(
                reason.as_str(),
                "ImagePullBackOff" | "ErrImagePull" | "InvalidImageName" | "CrashLoopBackOff"
            ) {
                stuck = Some(format!(
                    "container {name}: {reason}{}",
                    w.message
                        .as_deref()
                        .map(|m| format!(" ({m})"))
                        .unwrap_or_default()
                ));
            }
        }
        if cs.restart_count <= *before || !cs.ready {
            return Settled::No(stuck);
        }
    }
    let ready = st
        .conditions
        .as_ref()
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    if ready {
        Settled::Yes
    } else {
        Settled::No(stuck)
    }
}

enum Settled {
    Yes,
    /// Not yet; with a reason when a container is stuck.
    No(Option<String>),
}

/// The status of `pod`'s regular container `name`.
fn container_status<'a>(pod: &'a Pod, name: &str) -> Option<&'a ContainerStatus> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == name)
}

fn restart_counts(pod: &Pod, changes: &[ImageChange]) -> Vec<i32> {
    changes
        .iter()
        .map(|c| container_status(pod, &c.container).map_or(0, |s| s.restart_count))
        .collect()
}

/// The agent DaemonSet of `ns`: `name`, or the only one with the chart's
/// labels.
pub async fn find_daemonset(client: &Client, ns: &str, name: Option<&str>) -> Result<DaemonSet> {
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), ns);
    if let Some(n) = name {
        return Ok(api.get(n).await?);
    }
    let mut found = api
        .list(&ListParams::default().labels(AGENT_SELECTOR))
        .await?
        .items;
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Error::Upgrade(format!(
            "no volmig agent DaemonSet (labels {AGENT_SELECTOR}) in namespace {ns}: \
             pass -n with the release's namespace, or --daemonset"
        ))),
        _ => Err(Error::Upgrade(format!(
            "several volmig agent DaemonSets in namespace {ns} ({}): pass --daemonset",
            found
                .iter()
                .map(|d| d.name_any())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The pods `ds` owns, by node name.
pub async fn agent_pods(client: &Client, ns: &str, ds: &DaemonSet) -> Result<Vec<Pod>> {
    let selector = ds
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.clone())
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let uid = ds.uid();
    let mut pods: Vec<Pod> = api
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .into_iter()
        .filter(|p| {
            p.owner_references()
                .iter()
                .any(|o| o.kind == "DaemonSet" && Some(&o.uid) == uid.as_ref())
        })
        .collect();
    pods.sort_by_key(node_of);
    Ok(pods)
}

fn node_of(p: &Pod) -> String {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}

/// Patches `pod` as `changes` say and waits, by a watch, until it is ready
/// on the new images; gives up after `timeout`, or at once when a container
/// cannot start.
async fn upgrade_pod(
    client: &Client,
    ns: &str,
    pod: &Pod,
    changes: &[ImageChange],
    timeout: Duration,
) -> Result<Duration> {
    let name = pod.name_any();
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let restarts = restart_counts(pod, changes);
    let t = Instant::now();
    let patch: json_patch::Patch = serde_json::from_value(image_patch(changes))
        .map_err(|e| Error::Upgrade(format!("building the patch of pod {name}: {e}")))?;
    api.patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await?;
    let mut changes_seen = watcher::watch_object(api, &name).boxed();
    let mut stuck = None;
    let wait = async {
        while let Some(p) = changes_seen.try_next().await? {
            let Some(p) = p else {
                return Err(Error::Upgrade(format!(
                    "pod {name} was deleted while its agent restarted"
                )));
            };
            match settled(&p, changes, &restarts) {
                Settled::Yes => return Ok(()),
                Settled::No(why) => stuck = why.or(stuck.take()),
            }
        }
        Err(Error::Upgrade(format!("the watch of pod {name} ended")))
    };
    match tokio::time::timeout(timeout, wait).await {
        Ok(r) => r.map(|()| t.elapsed()),
        Err(_) => Err(Error::Upgrade(format!(
            "pod {name} on node {} is not ready on its new image after {timeout:?}{}; \
             the nodes after it were left as they are",
            node_of(pod),
            stuck.map(|s| format!(": {s}")).unwrap_or_default()
        ))),
    }
}

/// One line of the report.
fn line(pod: &Pod, what: &str) -> String {
    format!("{:<20} {:<32} {what}\n", node_of(pod), pod.name_any())
}

/// Upgrades the agents of `ds` in place, one node at a time; writes a line
/// per pod to `out`. `Err` when a pod did not come back ready, or when some
/// pods need replacing.
pub async fn upgrade_agents(
    client: &Client,
    ns: &str,
    daemonset: Option<&str>,
    dry_run: bool,
    timeout: Duration,
    mut out: impl std::io::Write,
) -> Result<()> {
    let ds = find_daemonset(client, ns, daemonset).await?;
    let ds_name = ds.name_any();
    let spec = ds
        .spec
        .clone()
        .ok_or_else(|| Error::Upgrade(format!("DaemonSet {ds_name} has no spec")))?;
    let strategy = spec
        .update_strategy
        .as_ref()
        .and_then(|s| s.type_.clone())
        .unwrap_or_else(|| "RollingUpdate".into());
    if strategy != "OnDelete" {
        return Err(Error::Upgrade(format!(
            "DaemonSet {ds_name} has updateStrategy {strategy}: it replaces its pods by itself, \
             and each keeper with its pod (the node's FUSE devices fail their I/O); in-place \
             upgrades need OnDelete (the chart's default, agent.updateStrategy)"
        )));
    }
    let template = spec
        .template
        .spec
        .clone()
        .ok_or_else(|| Error::Upgrade(format!("DaemonSet {ds_name} has no pod template")))?;
    let pods = agent_pods(client, ns, &ds).await?;
    let write = |out: &mut dyn std::io::Write, s: String| {
        out.write_all(s.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| Error::Output(e.to_string()))
    };
    if pods.is_empty() {
        write(&mut out, format!("DaemonSet {ds_name} has no pods\n"))?;
        return Ok(());
    }
    let mut replace = Vec::new();
    for pod in &pods {
        let Some(pspec) = pod.spec.as_ref() else {
            continue;
        };
        if pod.metadata.deletion_timestamp.is_some() {
            // Its replacement comes from the new template anyway.
            write(&mut out, line(pod, "terminating: left alone"))?;
            continue;
        }
        match plan(pspec, &template) {
            Plan::UpToDate => write(&mut out, line(pod, "up to date"))?,
            Plan::Replace(why) => {
                write(
                    &mut out,
                    line(pod, &format!("cannot be upgraded in place: {why}")),
                )?;
                replace.push(node_of(pod));
            }
            Plan::InPlace(changes) => {
                let what = changes
                    .iter()
                    .map(|c| format!("{} {} -> {}", c.container, c.from, c.to))
                    .collect::<Vec<_>>()
                    .join(", ");
                if dry_run {
                    write(
                        &mut out,
                        line(pod, &format!("would restart in place: {what}")),
                    )?;
                    continue;
                }
                write(&mut out, line(pod, &format!("restarting in place: {what}")))?;
                let took = upgrade_pod(client, ns, pod, &changes, timeout).await?;
                write(
                    &mut out,
                    line(
                        pod,
                        &format!("ready again after {:.1} s", took.as_secs_f64()),
                    ),
                )?;
            }
        }
    }
    if replace.is_empty() {
        Ok(())
    } else {
        Err(Error::Upgrade(format!(
            "{} pod(s) differ from the template in more than images (nodes {}): drain each \
             node's volmig volumes (no pod using them on it), then delete its agent pod",
            replace.len(),
            replace.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, image: &str, args: &[&str]) -> Container {
        Container {
            name: name.into(),
            image: Some(image.into()),
            args: Some(args.iter().map(|s| s.to_string()).collect()),
            ..Container::default()
        }
    }

    fn spec(agent: &str, keeper: &str, agent_args: &[&str]) -> PodSpec {
        PodSpec {
            init_containers: Some(vec![c("keeper", keeper, &["keeper"])]),
            containers: vec![c("agent", agent, agent_args)],
            ..PodSpec::default()
        }
    }

    #[test]
    fn only_the_regular_containers_images_are_changed() {
        let pod = spec("volmig:1", "volmig:1", &["serve"]);
        let tpl = spec("volmig:2", "volmig:2", &["serve"]);
        assert_eq!(
            plan(&pod, &tpl),
            Plan::InPlace(vec![ImageChange {
                index: 0,
                container: "agent".into(),
                from: "volmig:1".into(),
                to: "volmig:2".into(),
            }])
        );
        assert_eq!(plan(&tpl, &tpl), Plan::UpToDate);
        // The keeper's image alone differing is nothing to do.
        assert_eq!(
            plan(&spec("volmig:2", "volmig:1", &["serve"]), &tpl),
            Plan::UpToDate
        );
    }

    #[test]
    fn anything_else_differing_needs_a_new_pod() {
        let tpl = spec("volmig:2", "volmig:2", &["serve", "--new-flag"]);
        let Plan::Replace(why) = plan(&spec("volmig:1", "volmig:1", &["serve"]), &tpl) else {
            panic!("an args change was planned in place");
        };
        assert!(why.contains("container agent"), "{why}");
        let mut keeper_changed = spec("volmig:2", "volmig:2", &["serve", "--new-flag"]);
        keeper_changed.init_containers = Some(vec![c("keeper", "volmig:2", &["keeper", "-v"])]);
        assert!(matches!(plan(&keeper_changed, &tpl), Plan::Replace(w) if w.contains("keeper")));
        let mut more = tpl.clone();
        more.containers.push(c("registrar", "reg:1", &[]));
        assert!(matches!(plan(&tpl, &more), Plan::Replace(_)));
    }

    #[test]
    fn the_patch_tests_each_old_image_before_replacing_it() {
        let p = image_patch(&[ImageChange {
            index: 1,
            container: "agent".into(),
            from: "a:1".into(),
            to: "a:2".into(),
        }]);
        assert_eq!(
            p,
            json!([
                {"op": "test", "path": "/spec/containers/1/image", "value": "a:1"},
                {"op": "replace", "path": "/spec/containers/1/image", "value": "a:2"},
            ])
        );
    }
}
