//! `kubectl volmig upgrade-agents` against the fake API server, with a fake
//! kubelet that restarts a container whose image changed (as a real one
//! does: the container alone, in the same pod, the keeper untouched).

#![cfg(feature = "kubectl")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use serde_json::{Value, json};
use volmig_cli::kubectl::Error;
use volmig_cli::kubectl::args::{Cli, Cmd};
use volmig_cli::kubectl::upgrade::upgrade_agents;
use volmig_testkit::fake_api::FakeApi;

const NS: &str = "volmig-system";
const DS: &str = "/apis/apps/v1/namespaces/volmig-system/daemonsets/volmig-agent";
const OLD: &str = "ghcr.io/volmig/volmig:0.1.0";
const NEW: &str = "ghcr.io/volmig/volmig:0.2.0";
/// The image the fake kubelet cannot pull.
const BAD: &str = "ghcr.io/volmig/volmig:nope";

fn pod_path(node: &str) -> String {
    format!("/api/v1/namespaces/{NS}/pods/volmig-agent-{node}")
}

fn selector() -> Value {
    json!({
        "app.kubernetes.io/name": "volmig",
        "app.kubernetes.io/instance": "volmig",
        "app.kubernetes.io/component": "node-agent",
    })
}

fn pod_spec(image: &str, agent_args: &[&str]) -> Value {
    json!({
        "initContainers": [{
            "name": "keeper", "image": image, "restartPolicy": "Always",
            "command": ["volmig-agent"], "args": ["keeper", "--socket=/run/volmig/keeper.sock"],
            "volumeMounts": [{"name": "run", "mountPath": "/run/volmig"}],
        }],
        "containers": [{
            "name": "agent", "image": image, "command": ["volmig-agent"], "args": agent_args,
            "volumeMounts": [{"name": "run", "mountPath": "/run/volmig"}],
        }],
        "volumes": [{"name": "run", "emptyDir": {"medium": "Memory"}}],
    })
}

const ARGS: &[&str] = &["serve", "--fd-keeper=/run/volmig/keeper.sock"];

/// The chart's DaemonSet after `helm upgrade` to `image`.
fn daemonset(image: &str, strategy: &str) -> Value {
    let mut labels = selector();
    labels["app.kubernetes.io/part-of"] = json!("volmig");
    json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "volmig-agent", "namespace": NS, "labels": labels, "uid": "ds-uid"},
        "spec": {
            "selector": {"matchLabels": selector()},
            "updateStrategy": {"type": strategy},
            "template": {"metadata": {"labels": selector()}, "spec": pod_spec(image, ARGS)},
        },
    })
}

/// An agent pod of the DaemonSet on `node`, running `image`, ready.
fn pod(node: &str, image: &str, agent_args: &[&str]) -> Value {
    let mut spec = pod_spec(image, agent_args);
    spec["nodeName"] = json!(node);
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("volmig-agent-{node}"), "namespace": NS, "labels": selector(),
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                "name": "volmig-agent", "uid": "ds-uid", "controller": true}],
        },
        "spec": spec,
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "initContainerStatuses": [{"name": "keeper", "image": image, "imageID": "",
                "ready": true, "restartCount": 0, "started": true, "state": {"running": {}}}],
            "containerStatuses": [{"name": "agent", "image": image, "imageID": "",
                "ready": true, "restartCount": 0, "state": {"running": {}}}],
        },
    })
}

/// What the fake kubelet did, in order: ("restart" | "ready" | "stuck", node).
type Events = Arc<Mutex<Vec<(&'static str, String)>>>;

/// A kubelet for every pod: when a container's image in the spec is not the
/// one it runs, it restarts that container (not ready for a moment, then
/// running the new image, restart count + 1); an image it cannot pull
/// leaves the container waiting in ImagePullBackOff.
fn kubelet(fake: FakeApi, nodes: &[&str]) -> Events {
    let events: Events = Arc::default();
    let nodes: Vec<String> = nodes.iter().map(|s| s.to_string()).collect();
    let ev = events.clone();
    tokio::spawn(async move {
        loop {
            for node in &nodes {
                let path = pod_path(node);
                let Some(p) = fake.get(&path) else { continue };
                let want = p["spec"]["containers"][0]["image"].clone();
                let runs = p["status"]["containerStatuses"][0]["image"].clone();
                let waiting = !p["status"]["containerStatuses"][0]["state"]["waiting"].is_null();
                if want == runs || waiting {
                    continue;
                }
                ev.lock().unwrap().push(("restart", node.clone()));
                fake.edit(&path, |o| {
                    let cs = &mut o["status"]["containerStatuses"][0];
                    cs["ready"] = json!(false);
                    o["status"]["conditions"][0]["status"] = json!("False");
                });
                tokio::time::sleep(Duration::from_millis(150)).await;
                if want == json!(BAD) {
                    ev.lock().unwrap().push(("stuck", node.clone()));
                    fake.edit(&path, |o| {
                        o["status"]["containerStatuses"][0]["state"] = json!({"waiting": {
                            "reason": "ImagePullBackOff",
                            "message": "Back-off pulling image \"ghcr.io/volmig/volmig:nope\""}});
                    });
                    continue;
                }
                // Recorded before the pod shows it: the command may go on
                // as soon as it does.
                ev.lock().unwrap().push(("ready", node.clone()));
                fake.edit(&path, |o| {
                    let cs = &mut o["status"]["containerStatuses"][0];
                    cs["image"] = want.clone();
                    cs["ready"] = json!(true);
                    cs["restartCount"] = json!(cs["restartCount"].as_i64().unwrap_or(0) + 1);
                    o["status"]["conditions"][0]["status"] = json!("True");
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    events
}

async fn run(
    client: &kube::Client,
    dry_run: bool,
    timeout: Duration,
) -> (Result<(), Error>, String) {
    let mut out = Vec::new();
    let r = tokio::time::timeout(
        Duration::from_secs(60),
        upgrade_agents(client, NS, None, dry_run, timeout, &mut out),
    )
    .await
    .expect("upgrade-agents did not end");
    (r, String::from_utf8(out).unwrap())
}

fn image_of(fake: &FakeApi, node: &str, init: bool) -> String {
    let p = fake.get(&pod_path(node)).unwrap();
    let c = if init { "initContainers" } else { "containers" };
    p["spec"][c][0]["image"].as_str().unwrap().to_string()
}

fn patches(fake: &FakeApi) -> Vec<String> {
    fake.writes()
        .into_iter()
        .filter(|w| w.starts_with("PATCH"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_move_to_the_new_image_one_node_at_a_time_and_the_keepers_stay() {
    let (client, fake) = FakeApi::start();
    fake.put(DS, daemonset(NEW, "OnDelete"));
    let nodes = ["n1", "n2", "n3"];
    for n in nodes {
        fake.put(&pod_path(n), pod(n, OLD, ARGS));
    }
    // Not the DaemonSet's (no owner): left alone.
    let mut stranger = pod("n4", OLD, ARGS);
    stranger["metadata"]["ownerReferences"] = json!([]);
    fake.put(&pod_path("n4"), stranger);
    // Being deleted: its replacement will be new anyway.
    let mut leaving = pod("n5", OLD, ARGS);
    leaving["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    fake.put(&pod_path("n5"), leaving);
    let events = kubelet(fake.clone(), &["n1", "n2", "n3", "n4", "n5"]);

    let (r, out) = run(&client, false, Duration::from_secs(20)).await;
    r.unwrap();
    for n in nodes {
        assert_eq!(image_of(&fake, n, false), NEW, "{n}: agent\n{out}");
        assert_eq!(
            image_of(&fake, n, true),
            OLD,
            "{n}: the keeper was changed\n{out}"
        );
        assert!(out.contains(&format!("volmig-agent-{n}")), "{out}");
    }
    assert_eq!(image_of(&fake, "n4", false), OLD);
    assert_eq!(image_of(&fake, "n5", false), OLD);
    assert!(out.contains("terminating: left alone"), "{out}");
    assert_eq!(
        out.matches(&format!("agent {OLD} -> {NEW}")).count(),
        3,
        "{out}"
    );
    assert_eq!(out.matches("ready again after").count(), 3, "{out}");
    // One node at a time: each restarted and ready before the next one's
    // image changed.
    let seen = events.lock().unwrap().clone();
    let want: Vec<(&str, String)> = nodes
        .iter()
        .flat_map(|n| [("restart", n.to_string()), ("ready", n.to_string())])
        .collect();
    assert_eq!(seen, want);
    assert_eq!(patches(&fake).len(), 3, "{:?}", patches(&fake));

    // Again: nothing to do.
    fake.clear_log();
    let (r, out) = run(&client, false, Duration::from_secs(20)).await;
    r.unwrap();
    assert_eq!(out.matches("up to date").count(), 3, "{out}");
    assert!(patches(&fake).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_says_what_it_would_do_and_changes_nothing() {
    let (client, fake) = FakeApi::start();
    fake.put(DS, daemonset(NEW, "OnDelete"));
    fake.put(&pod_path("n1"), pod("n1", OLD, ARGS));
    let (r, out) = run(&client, true, Duration::from_secs(5)).await;
    r.unwrap();
    assert!(
        out.contains(&format!("would restart in place: agent {OLD} -> {NEW}")),
        "{out}"
    );
    assert!(patches(&fake).is_empty());
    assert_eq!(image_of(&fake, "n1", false), OLD);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_differs_in_more_than_images_is_reported_for_a_drain() {
    let (client, fake) = FakeApi::start();
    fake.put(DS, daemonset(NEW, "OnDelete"));
    fake.put(&pod_path("n1"), pod("n1", OLD, &["serve"]));
    fake.put(&pod_path("n2"), pod("n2", OLD, ARGS));
    kubelet(fake.clone(), &["n1", "n2"]);
    let (r, out) = run(&client, false, Duration::from_secs(20)).await;
    let Err(Error::Upgrade(msg)) = r else {
        panic!("a pod needing replacement passed: {out}");
    };
    assert!(msg.contains("n1") && msg.contains("drain"), "{msg}");
    assert!(
        out.contains("cannot be upgraded in place: container agent differs"),
        "{out}"
    );
    assert_eq!(image_of(&fake, "n1", false), OLD);
    // The other node was upgraded all the same.
    assert_eq!(image_of(&fake, "n2", false), NEW);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_does_not_come_back_stops_the_upgrade_with_the_reason() {
    let (client, fake) = FakeApi::start();
    fake.put(DS, daemonset(BAD, "OnDelete"));
    fake.put(&pod_path("n1"), pod("n1", OLD, ARGS));
    fake.put(&pod_path("n2"), pod("n2", OLD, ARGS));
    kubelet(fake.clone(), &["n1", "n2"]);
    let (r, out) = run(&client, false, Duration::from_secs(2)).await;
    let Err(Error::Upgrade(msg)) = r else {
        panic!("a pod that never became ready passed: {out}");
    };
    assert!(
        msg.contains("volmig-agent-n1") && msg.contains("ImagePullBackOff"),
        "{msg}"
    );
    assert_eq!(
        image_of(&fake, "n2", false),
        OLD,
        "the next node was touched"
    );
    assert_eq!(patches(&fake).len(), 1);
}

#[tokio::test]
async fn a_rolling_update_daemonset_is_refused() {
    let (client, fake) = FakeApi::start();
    fake.put(DS, daemonset(NEW, "RollingUpdate"));
    fake.put(&pod_path("n1"), pod("n1", OLD, ARGS));
    let (r, out) = run(&client, false, Duration::from_secs(5)).await;
    let Err(Error::Upgrade(msg)) = r else {
        panic!("a RollingUpdate DaemonSet was upgraded: {out}");
    };
    assert!(msg.contains("OnDelete"), "{msg}");
    assert!(patches(&fake).is_empty());
}

#[test]
fn the_command_line_takes_a_daemonset_a_dry_run_and_a_timeout() {
    let cli = Cli::parse_from([
        "kubectl-volmig",
        "-n",
        "storage",
        "upgrade-agents",
        "--daemonset",
        "vm-agent",
        "--dry-run",
        "--timeout",
        "2m",
    ]);
    let Cmd::UpgradeAgents(a) = cli.cmd else {
        panic!("{:?}", cli.cmd);
    };
    assert_eq!(cli.namespace.as_deref(), Some("storage"));
    assert_eq!(a.daemonset.as_deref(), Some("vm-agent"));
    assert!(a.dry_run);
    assert_eq!(a.timeout, Duration::from_secs(120));
}
