#![cfg(feature = "kubectl")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! `kubectl volmig`: arguments to the resource, `--dry-run` YAML against the
//! CRD schema and the Rust twin of its CEL rules, status/list rendering, and
//! the exact requests `migrate`, `abort` and `list` send (mock API server).

use std::sync::{Arc, Mutex};

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
use volmig_cli::kubectl::args::{Cli, Cmd, MigrateArgs};
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
        (
            "a --to-storage-class fast --retain-source=false",
            "retainSource: false is not supported",
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
        assert!(a.dry_run);
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
