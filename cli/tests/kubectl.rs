#![cfg(feature = "kubectl")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! `kubectl volmig`: arguments to the resource, `--dry-run` YAML against the
//! CRD schema and the Rust twin of its CEL rules, status/list rendering, and
//! the exact requests `migrate`, `abort` and `list` send (mock API server).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use http::{Request, Response};
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use serde_json::{Value, json};
use volmig_api::crd::{
    Condition, ConditionStatus, CopyModeSpec, MigrationPhase, PhaseTimeStatus, SharedAttachment,
    VerifySpec, VolumeMigration, VolumeMigrationStatus, VolumeSessionStatus, VolumeStatus,
    check_spec,
};
use volmig_cli::kubectl::Error;
use volmig_cli::kubectl::args::{Cli, Cmd, DryRun, MigrateArgs, Output, Timeout};
use volmig_cli::kubectl::build::{build_migration, to_yaml};
use volmig_cli::kubectl::client;
use volmig_cli::kubectl::render::{age, render_list, render_status};

/// `migrate` arguments as clap parses them from `kubectl volmig migrate ...`.
fn migrate(args: &str) -> MigrateArgs {
    let argv = std::iter::once("kubectl-volmig")
        .chain(std::iter::once("migrate"))
        .chain(args.split_whitespace());
    match Cli::try_parse_from(argv).unwrap().cmd {
        Cmd::Migrate(a) => a,
        other => panic!("not migrate: {other:?}"),
    }
}

fn refused(args: &str) -> String {
    build_migration(&migrate(args), Some("db"))
        .expect_err(args)
        .to_string()
}

#[test]
fn storage_class_target_for_a_group_of_claims() {
    let vm = build_migration(
        &migrate("data logs --to-storage-class fast --mode mirror --sync-goal 50ms --bandwidth 200Mi --verify Sample --name mv"),
        Some("db"),
    )
    .unwrap();
    assert_eq!(vm.metadata.name.as_deref(), Some("mv"));
    assert_eq!(vm.metadata.namespace.as_deref(), Some("db"));
    let v = serde_json::to_value(&vm.spec).unwrap();
    assert_eq!(
        v["volumes"],
        json!([
            {"source": {"persistentVolumeClaim": "data"}, "target": {"storageClassName": "fast"}},
            {"source": {"persistentVolumeClaim": "logs"}, "target": {"storageClassName": "fast"}},
        ])
    );
    assert_eq!(vm.spec.copy_mode, CopyModeSpec::Mirror);
    assert_eq!(vm.spec.sync_goal, "50ms");
    assert_eq!(vm.spec.bandwidth_limit.as_deref(), Some("200Mi"));
    assert_eq!(vm.spec.verify, VerifySpec::Sample);
    assert!(vm.spec.retain_source);
    assert!(!vm.spec.abort);
    let parsed = check_spec(&vm.spec).unwrap();
    assert_eq!(parsed.bandwidth, 200 << 20);
    assert_eq!(parsed.sync_goal_ms, 50);
}

#[test]
fn retain_source_false_builds_for_volmig_volumes() {
    // The operator releases the source backing claim of a volmig volume; for
    // other volumes it waits with RetainSourceUnsupported (the spec is valid).
    let vm = build_migration(
        &migrate("a --to-storage-class fast --retain-source=false"),
        Some("db"),
    )
    .unwrap();
    assert!(!vm.spec.retain_source);
    check_spec(&vm.spec).unwrap();
}

#[test]
fn existing_claim_targets_pair_up_in_order_and_defaults_apply() {
    let vm = build_migration(
        &migrate("a b --to-pvc a-new --to-pvc b-new --retain-source=true"),
        None,
    )
    .unwrap();
    assert_eq!(vm.metadata.name.as_deref(), Some("a-migration"));
    assert_eq!(vm.metadata.namespace, None);
    let v = serde_json::to_value(&vm.spec).unwrap();
    assert_eq!(
        v,
        json!({
            "volumes": [
                {"source": {"persistentVolumeClaim": "a"}, "target": {"persistentVolumeClaim": "a-new"}},
                {"source": {"persistentVolumeClaim": "b"}, "target": {"persistentVolumeClaim": "b-new"}},
            ],
            "copyMode": "Auto", "syncGoal": "100ms", "verify": "Full",
            "retainSource": true, "abort": false,
        })
    );
}

#[test]
fn bad_input_is_refused_with_a_message_naming_the_problem() {
    let cases = [
        (
            "--to-storage-class fast",
            "at least one persistent volume claim",
        ),
        (
            "data",
            "--to-storage-class SC (new claims) or --to-pvc NAME",
        ),
        (
            "data --to-storage-class fast --to-pvc x",
            "either --to-storage-class or --to-pvc, not both",
        ),
        ("a b --to-pvc x", "--to-pvc given 1 time(s) for 2 claim(s)"),
        (
            "data --to-storage-class fast --sync-goal soon",
            "--sync-goal \"soon\" is not a duration",
        ),
        (
            "data --to-storage-class fast --sync-goal 100",
            "spec.syncGoal \"100\" is not a duration",
        ),
        (
            "data --to-storage-class fast --bandwidth lots",
            "--bandwidth \"lots\" is not a quantity",
        ),
        (
            "data --to-storage-class fast --bandwidth 1.5Gi",
            "--bandwidth \"1.5Gi\" is not a quantity",
        ),
        (
            "data --to-storage-class fast --mode fast",
            "--mode \"fast\": expected Auto, Background or Mirror",
        ),
        (
            "data --to-storage-class fast --verify most",
            "--verify \"most\": expected None, Sample or Full",
        ),
        (
            "a b --to-pvc b --to-pvc c",
            "a target claim must differ from every source claim",
        ),
        (
            "a a --to-storage-class fast",
            "each source claim may appear only once",
        ),
    ];
    for (args, want) in cases {
        let got = refused(args);
        assert!(got.contains(want), "{args}: got {got:?}, want {want:?}");
    }
    // 17 claims: more than one migration may hold.
    let many: Vec<String> = (0..17).map(|i| format!("c{i}")).collect();
    let got = refused(&format!("{} --to-storage-class fast", many.join(" ")));
    assert!(got.contains("at most 16"), "{got}");
    assert!(matches!(
        build_migration(&migrate("a --to-pvc a"), None),
        Err(Error::Invalid(_))
    ));
}

/// The CRD's OpenAPI schema.
fn schema() -> Value {
    volmig_api::crd::openapi_schema().expect("the generated CRD has a schema")
}

#[test]
fn dry_run_yaml_parses_back_and_passes_the_crd_rules() {
    let validator = jsonschema::validator_for(&schema()).unwrap();
    for args in [
        "data logs --to-storage-class fast --bandwidth 200Mi --sync-goal 1.5s -n db --dry-run",
        "a --to-pvc a-new --mode Background --verify None --dry-run",
    ] {
        let a = migrate(args);
        assert_eq!(a.dry_run, DryRun::Client);
        let vm = build_migration(&a, Some("db")).unwrap();
        let yaml = to_yaml(&vm).unwrap();
        assert!(
            yaml.starts_with("apiVersion: volmig.io/v1alpha1\nkind: VolumeMigration\n"),
            "{yaml}"
        );
        let back: VolumeMigration = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(back, vm);
        check_spec(&back.spec).unwrap();
        let as_json: Value = serde_saphyr::from_str(&yaml).unwrap();
        let errs: Vec<String> = validator
            .iter_errors(&as_json)
            .map(|e| e.to_string())
            .collect();
        assert!(errs.is_empty(), "{args}: {errs:?}\n{yaml}");
    }
    // The schema check is not vacuous: a bad quantity fails it.
    let mut bad =
        serde_json::to_value(build_migration(&migrate("a --to-pvc b"), None).unwrap()).unwrap();
    bad["spec"]["bandwidthLimit"] = json!("1.5Gi");
    assert!(!validator.is_valid(&bad));
}

fn sample() -> VolumeMigration {
    let mut vm = build_migration(
        &migrate("data logs --to-storage-class fast --name mv"),
        Some("db"),
    )
    .unwrap();
    vm.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2026-01-01T10:00:00Z".parse().unwrap(),
    ));
    let vol = |src: &str, copied: i64, redirected: bool| VolumeStatus {
        source: src.into(),
        target: format!("{src}-volmig"),
        bytes_total: 4 << 30,
        bytes_copied: copied,
        dirty_bytes: 1 << 20,
        passes: 3,
        redirected,
        node: Some("node-1".into()),
        ..VolumeStatus::default()
    };
    let pt = |phase, start: &str, end: Option<&str>| PhaseTimeStatus {
        phase,
        start: start.into(),
        end: end.map(str::to_string),
    };
    vm.status = Some(VolumeMigrationStatus {
        phase: MigrationPhase::Resuming,
        epoch: 2,
        progress: Some("75%".into()),
        cutover_stall: Some("12.345ms".into()),
        volumes: vec![
            VolumeStatus {
                session: Some(VolumeSessionStatus {
                    id: "s-data".into(),
                    phase: MigrationPhase::Resuming,
                    ..VolumeSessionStatus::default()
                }),
                shared_with: vec![SharedAttachment {
                    node: "node-2".into(),
                    ..SharedAttachment::default()
                }],
                ..vol("data", 4 << 30, true)
            },
            vol("logs", 2 << 30, false),
        ],
        phase_times: vec![
            pt(
                MigrationPhase::Copying,
                "2026-01-01T10:00:00.000Z",
                Some("2026-01-01T10:01:30.250Z"),
            ),
            pt(
                MigrationPhase::Quiescing,
                "2026-01-01T10:01:30.250Z",
                Some("2026-01-01T10:01:30.262Z"),
            ),
            pt(MigrationPhase::Resuming, "2026-01-01T10:01:30.262Z", None),
        ],
        conditions: vec![Condition {
            type_: "Degraded".into(),
            status: ConditionStatus::True,
            reason: "AgentRestarted".into(),
            message: "agent on node-1 restarted; session resumed".into(),
            last_transition_time: "2026-01-01T10:01:00Z".into(),
            observed_generation: Some(1),
        }],
        ..VolumeMigrationStatus::default()
    });
    vm
}

#[test]
fn status_shows_phase_volumes_stall_timeline_and_conditions() {
    let now: Timestamp = "2026-01-01T10:01:32.262Z".parse().unwrap();
    let out = render_status(&sample(), now);
    for want in [
        "Name:       mv",
        "Namespace:  db",
        "Volumes:    data -> storage class fast, logs -> storage class fast",
        "Phase:      Resuming",
        "Progress:   75%",
        "Stall:      12.345ms",
        "data -> data-volmig  [####################] 100%  4.00 GiB / 4.00 GiB  dirty 1.00 MiB  passes 3  node node-1 (also node-2)  (Resuming, redirected)",
        "logs -> logs-volmig  [##########----------]  50%  2.00 GiB / 4.00 GiB",
        "Timeline:",
        "Copying        2026-01-01T10:00:00.000Z  90.250s",
        "Quiescing      2026-01-01T10:01:30.250Z  0.012s",
        "Resuming       2026-01-01T10:01:30.262Z  2.000s so far",
        "Degraded=True  AgentRestarted: agent on node-1 restarted; session resumed  (since 2026-01-01T10:01:00Z)",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    // Without a status: Pending, and a hint.
    let mut fresh = sample();
    fresh.status = None;
    assert!(render_status(&fresh, now).contains("Phase:      Pending (no status yet"));
}

#[test]
fn list_is_a_kubectl_like_table() {
    let now: Timestamp = "2026-01-01T12:00:00Z".parse().unwrap();
    let mut other = sample();
    other.metadata.name = Some("second-one".into());
    other.metadata.namespace = Some("web".into());
    other.status = None;
    let out = render_list(&[sample(), other.clone()], false, now);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "NAME         PHASE      PROGRESS   STALL      AGE",
            "mv           Resuming   75%        12.345ms   120m",
            "second-one   Pending    -          -          120m",
        ]
    );
    let all = render_list(&[other], true, now);
    assert!(all.starts_with("NAMESPACE   NAME"), "{all}");
    assert!(all.contains("web         second-one"), "{all}");
    assert_eq!(
        [age(5), age(125), age(4 * 3600), age(3 * 86_400)],
        ["5s", "2m", "4h", "3d"]
    );
}

#[test]
fn only_completed_is_success() {
    let mut vm = sample();
    assert!(client::outcome(&vm).is_err());
    vm.status.as_mut().unwrap().phase = MigrationPhase::Failed;
    vm.status.as_mut().unwrap().error = Some("ENOSPC on target".into());
    let e = client::outcome(&vm).unwrap_err().to_string();
    assert_eq!(e, "migration mv ended Failed: ENOSPC on target");
    vm.status.as_mut().unwrap().phase = MigrationPhase::Completed;
    client::outcome(&vm).unwrap();
}

#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    content_type: String,
    body: Option<Value>,
}

/// A mock API server answering each request with the next canned reply,
/// recording what it was sent.
fn mock(replies: Vec<Value>) -> (kube::Client, Arc<Mutex<Vec<Seen>>>) {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        for reply in replies {
            let Some((req, send)) = handle.next_request().await else {
                return;
            };
            let (parts, body) = req.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            log.lock().unwrap().push(Seen {
                method: parts.method.to_string(),
                path: parts.uri.to_string(),
                content_type: parts
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default(),
                body: serde_json::from_slice(&bytes).ok(),
            });
            send.send_response(
                Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap(),
            );
        }
    });
    (kube::Client::new(svc, "default"), seen)
}

#[tokio::test]
async fn migrate_abort_and_list_send_the_exact_requests() {
    let vm = build_migration(
        &migrate("data logs --to-storage-class fast --name mv"),
        Some("db"),
    )
    .unwrap();
    let stored = serde_json::to_value(sample()).unwrap();
    let list = json!({
        "apiVersion": "volmig.io/v1alpha1", "kind": "VolumeMigrationList",
        "metadata": {"resourceVersion": "7"}, "items": [stored.clone()],
    });
    let (kc, seen) = mock(vec![stored.clone(), stored.clone(), list.clone(), list]);

    let made = client::create(&kc, "db", &vm).await.unwrap();
    assert_eq!(made.metadata.name.as_deref(), Some("mv"));
    client::abort(&kc, "db", "mv").await.unwrap();
    let items = client::list(&kc, Some("db")).await.unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(
        items[0].status.as_ref().unwrap().phase,
        MigrationPhase::Resuming
    );
    client::list(&kc, None).await.unwrap();

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert_eq!(seen[0].method, "POST");
    assert_eq!(
        seen[0].path,
        "/apis/volmig.io/v1alpha1/namespaces/db/volumemigrations?"
    );
    assert_eq!(
        seen[0].body.as_ref(),
        Some(&serde_json::to_value(&vm).unwrap())
    );
    assert_eq!(
        seen[0].body.as_ref().unwrap()["spec"]["volumes"][1]["source"]["persistentVolumeClaim"],
        "logs"
    );
    assert_eq!(seen[1].method, "PATCH");
    assert_eq!(
        seen[1].path,
        "/apis/volmig.io/v1alpha1/namespaces/db/volumemigrations/mv?"
    );
    assert_eq!(seen[1].content_type, "application/merge-patch+json");
    assert_eq!(seen[1].body, Some(json!({"spec": {"abort": true}})));
    assert_eq!(seen[2].method, "GET");
    assert_eq!(
        seen[2].path,
        "/apis/volmig.io/v1alpha1/namespaces/db/volumemigrations?"
    );
    assert_eq!(seen[3].path, "/apis/volmig.io/v1alpha1/volumemigrations?");
}

/// The parsed command line for `args` (after `kubectl-volmig`).
fn cli(args: &str) -> Cli {
    Cli::try_parse_from(std::iter::once("kubectl-volmig").chain(args.split_whitespace())).unwrap()
}

#[test]
fn dry_run_and_output_take_kubectl_s_forms() {
    for (args, dry, out) in [
        ("a --to-pvc b", DryRun::None, None),
        ("a --to-pvc b --dry-run", DryRun::Client, None),
        (
            "a --to-pvc b --dry-run=client -o yaml",
            DryRun::Client,
            Some(Output::Yaml),
        ),
        (
            "a --to-pvc b --dry-run=server -o json",
            DryRun::Server,
            Some(Output::Json),
        ),
        (
            "a --to-pvc b --dry-run=none --output name",
            DryRun::None,
            Some(Output::Name),
        ),
    ] {
        let a = migrate(args);
        assert_eq!((a.dry_run, a.output), (dry, out), "{args}");
    }
    assert!(
        Cli::try_parse_from(["kubectl-volmig", "migrate", "a", "--dry-run=maybe"]).is_err(),
        "an unknown --dry-run is refused"
    );
    let vm = build_migration(&migrate("a --to-pvc b --name m"), Some("db")).unwrap();
    let yaml = client::printed(&vm, Some(Output::Yaml), DryRun::Client).unwrap();
    assert_eq!(yaml, to_yaml(&vm).unwrap());
    let json_text = client::printed(&vm, Some(Output::Json), DryRun::Client).unwrap();
    let back: VolumeMigration = serde_json::from_str(&json_text).unwrap();
    assert_eq!(back, vm);
    assert_eq!(
        client::printed(&vm, Some(Output::Name), DryRun::Client).unwrap(),
        "volumemigration.volmig.io/m\n"
    );
    assert_eq!(
        client::printed(&vm, None, DryRun::Client).unwrap(),
        "volumemigration.volmig.io/m created (dry run)\n"
    );
    assert_eq!(
        client::printed(&vm, None, DryRun::None).unwrap(),
        "volumemigration.volmig.io/m created\n"
    );
}

/// A kubeconfig with two contexts on two (unreachable) servers.
fn kubeconfig(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("config");
    std::fs::write(
        &path,
        r#"apiVersion: v1
kind: Config
current-context: one
clusters:
- name: one
  cluster: {server: "http://127.0.0.1:1"}
- name: two
  cluster: {server: "http://127.0.0.1:2"}
users:
- name: u
  user: {token: secret}
contexts:
- name: one
  context: {cluster: one, user: u, namespace: ns-one}
- name: two
  context: {cluster: two, user: u, namespace: ns-two}
"#,
    )
    .unwrap();
    path
}

#[tokio::test]
async fn kubeconfig_context_impersonation_and_timeout_reach_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let kc = kubeconfig(dir.path()).display().to_string();
    let c = cli(&format!("--kubeconfig {kc} list"));
    let cfg = client::config(&c.conn).await.unwrap();
    assert_eq!(cfg.cluster_url.to_string(), "http://127.0.0.1:1/");
    assert_eq!(cfg.default_namespace, "ns-one");
    assert_eq!(cfg.auth_info.impersonate, None);
    assert_eq!(cfg.read_timeout, None, "--request-timeout 0 waits forever");

    let c = cli(&format!(
        "--kubeconfig {kc} --context two --as alice --as-group ops --as-group dev --request-timeout 7s status m"
    ));
    assert_eq!(
        c.conn.request_timeout,
        Timeout(Some(Duration::from_secs(7)))
    );
    let cfg = client::config(&c.conn).await.unwrap();
    assert_eq!(cfg.cluster_url.to_string(), "http://127.0.0.1:2/");
    assert_eq!(cfg.default_namespace, "ns-two");
    assert_eq!(cfg.auth_info.impersonate.as_deref(), Some("alice"));
    assert_eq!(
        cfg.auth_info.impersonate_groups,
        Some(vec!["ops".to_string(), "dev".to_string()])
    );
    for t in [cfg.read_timeout, cfg.write_timeout, cfg.connect_timeout] {
        assert_eq!(t, Some(Duration::from_secs(7)));
    }
    assert!(Cli::try_parse_from(["kubectl-volmig", "--request-timeout", "soon", "list"]).is_err());
    let e = client::config(&cli("--kubeconfig /nonexistent/kc list").conn)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("--kubeconfig /nonexistent/kc"), "{e}");
}

/// A one-request-at-a-time HTTP server standing in for the API server:
/// answers `reply` (or nothing, when None: the client must time out) and
/// hands the request's head to the test.
async fn fake_server(
    reply: Option<Value>,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let reply = reply.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
                let Some(reply) = reply else {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    return;
                };
                let body = serde_json::to_vec(&reply).unwrap();
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
                let _ = s.write_all(&body).await;
            });
        }
    });
    (addr, rx)
}

/// `kubectl-volmig` with a kubeconfig pointing at `addr`.
fn plugin(
    dir: &std::path::Path,
    addr: std::net::SocketAddr,
    args: &[&str],
) -> std::process::Command {
    let kc = dir.join("kc");
    std::fs::write(
        &kc,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\nclusters:\n- name: c\n  cluster: {{server: \"http://{addr}\"}}\nusers:\n- name: u\n  user: {{token: t}}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u, namespace: db}}\n"
        ),
    )
    .unwrap();
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_kubectl-volmig"));
    c.arg("--kubeconfig").arg(&kc).args(args);
    c.env("KUBECONFIG", "/nonexistent")
        .env("RUST_BACKTRACE", "1");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_impersonates_and_gives_up_after_the_request_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, mut heads) = fake_server(Some(serde_json::to_value(sample()).unwrap())).await;
    let out = tokio::task::spawn_blocking({
        let mut c = plugin(
            dir.path(),
            addr,
            &["--as", "alice", "--as-group", "ops", "status", "mv"],
        );
        move || c.output().unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Phase:      Resuming"));
    let head = heads.recv().await.unwrap().to_ascii_lowercase();
    assert!(
        head.starts_with("get /apis/volmig.io/v1alpha1/namespaces/db/volumemigrations/mv"),
        "{head}"
    );
    assert!(head.contains("impersonate-user: alice"), "{head}");
    assert!(head.contains("impersonate-group: ops"), "{head}");

    // A server that never answers: the request gives up after 1 s, with
    // one line.
    let (addr, _heads) = fake_server(None).await;
    let t = std::time::Instant::now();
    let out = tokio::task::spawn_blocking({
        let mut c = plugin(
            dir.path(),
            addr,
            &["--request-timeout", "1s", "status", "mv"],
        );
        move || c.output().unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
}

#[tokio::test]
async fn server_dry_run_stores_nothing() {
    let vm = build_migration(
        &migrate("data --to-storage-class fast --name mv"),
        Some("db"),
    )
    .unwrap();
    let (kc, seen) = mock(vec![serde_json::to_value(&vm).unwrap()]);
    client::create_with(&kc, "db", &vm, true).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0].method, "POST");
    assert_eq!(
        seen[0].path,
        "/apis/volmig.io/v1alpha1/namespaces/db/volumemigrations?&dryRun=All"
    );
}

const MV_PATH: &str = "/apis/volmig.io/v1alpha1/namespaces/db/volumemigrations/mv";

/// `status --watch` follows a watch: it shows every change, stops once the
/// migration ended, and never reads the object again by polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_follows_a_watch_not_polls() {
    let (client, fake) = volmig_testkit::fake_api::FakeApi::start();
    let mut vm = serde_json::to_value(sample()).unwrap();
    vm["status"]["phase"] = json!("Copying");
    fake.put(MV_PATH, vm);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    struct Chan(tokio::sync::mpsc::UnboundedSender<Vec<u8>>);
    impl std::io::Write for Chan {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.send(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let watching = tokio::spawn({
        let client = client.clone();
        async move { client::watch_status(&client, "db", "mv", false, Chan(tx)).await }
    });
    async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) -> String {
        let chunk = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("no output for 10 s")
            .expect("output closed");
        String::from_utf8(chunk).unwrap()
    }
    let first = next(&mut rx).await;
    assert!(first.contains("Phase:      Copying"), "{first}");
    // Wait a while: nothing changes, nothing is shown, nothing is polled.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rx.try_recv().is_err(), "shown again without a change");
    fake.edit(MV_PATH, |o| o["status"]["phase"] = json!("Redirecting"));
    let second = next(&mut rx).await;
    assert!(
        second.starts_with("---\n") && second.contains("Phase:      Redirecting"),
        "{second}"
    );
    fake.edit(MV_PATH, |o| o["status"]["phase"] = json!("Completed"));
    let third = next(&mut rx).await;
    assert!(third.contains("Phase:      Completed"), "{third}");
    let done = tokio::time::timeout(Duration::from_secs(10), watching)
        .await
        .expect("the watch did not end with the migration")
        .unwrap()
        .unwrap();
    assert_eq!(done.status.unwrap().phase, MigrationPhase::Completed);
    // One list and watches of the collection, by name; no GET of the object.
    let reads: Vec<String> = fake
        .log()
        .into_iter()
        .filter(|l| l.method == http::Method::GET)
        .map(|l| format!("{}?{}", l.path, l.query))
        .collect();
    assert!(
        reads.iter().all(|r| r
            .starts_with("/apis/volmig.io/v1alpha1/namespaces/db/volumemigrations?")
            && r.contains("metadata.name%3Dmv")),
        "{reads:#?}"
    );
    assert!(reads.iter().any(|r| r.contains("watch=true")), "{reads:#?}");
    assert!(reads.len() <= 3, "polled: {reads:#?}");
}

#[tokio::test]
async fn watching_a_missing_migration_is_an_error() {
    let (client, _fake) = volmig_testkit::fake_api::FakeApi::start();
    let e = tokio::time::timeout(
        Duration::from_secs(10),
        client::watch_status(&client, "db", "nope", false, std::io::sink()),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert!(matches!(e, Error::Gone(_)), "{e}");
}
