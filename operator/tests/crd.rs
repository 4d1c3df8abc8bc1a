#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! The generated CRD: checked-in copies are current, sample objects pass or
//! fail its OpenAPI schema (jsonschema) and its CEL rules (evaluated with
//! kube's client-side CEL validator), and the operator's Rust twin of every
//! rule (`check_spec`, `check_update`) gives the same verdict.

use std::path::PathBuf;

use kube::CustomResourceExt;
use kube::core::cel::Validator;
use serde_json::{Value, json};
use volmig_api::crd::{self, VolumeMigration, VolumeMigrationSpec, rules};
use volmig_operator::crd_gen::{
    self, CRD_TEMPLATE, REGENERATE, SCHEMA_HASH, crd_yaml, generated_files, schema_hash,
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn generated_crd_files_are_current() {
    let update = std::env::var("VOLMIG_UPDATE_GENERATED").is_ok_and(|v| v == "1");
    let mut stale = Vec::new();
    for (rel, want) in generated_files().unwrap() {
        let path = root().join(rel);
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        if have != want {
            if update {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &want).unwrap();
            } else {
                stale.push(rel);
            }
        }
    }
    assert!(
        stale.is_empty(),
        "generated CRD files are stale: {stale:?}; regenerate with `{REGENERATE}` (or `volmig-operator crd`)"
    );
    // The YAML is what the binary's `crd` subcommand prints and parses back
    // into the CRD, annotated with the hash of its schema.
    let back: Value = serde_saphyr::from_str(&crd_yaml().unwrap()).unwrap();
    assert_eq!(back, serde_json::to_value(crd_gen::crd().unwrap()).unwrap());
    assert_eq!(
        back["metadata"]["annotations"][SCHEMA_HASH],
        json!(schema_hash().unwrap())
    );
    // The chart's copy is no longer in its crds/ directory (installed once,
    // never upgraded by Helm).
    assert!(
        !root().join("charts/volmig/crds").exists(),
        "charts/volmig/crds/ must go: the chart renders the CRD from {CRD_TEMPLATE}"
    );
}

#[test]
fn the_schema_hash_follows_the_schema() {
    let h = schema_hash().unwrap();
    assert!(h.starts_with("sha256:") && h.len() == 7 + 64, "{h}");
    assert_eq!(h, schema_hash().unwrap(), "the hash is stable");
    // Another schema, another hash: any change of the spec shows.
    let mut crd = VolumeMigration::crd();
    crd.spec.versions[0].served = !crd.spec.versions[0].served;
    assert_ne!(crd_gen::hash_of(&crd.spec).unwrap(), h);
    let mut crd = VolumeMigration::crd();
    crd.spec.versions[0].additional_printer_columns = None;
    assert_ne!(crd_gen::hash_of(&crd.spec).unwrap(), h);
}

/// The CRD's OpenAPI schema.
fn schema() -> Value {
    volmig_api::crd::openapi_schema().expect("the generated CRD has a schema")
}

fn obj(spec: Value) -> Value {
    json!({
        "apiVersion": "volmig.io/v1alpha1",
        "kind": "VolumeMigration",
        "metadata": {"name": "m", "namespace": "db"},
        "spec": spec,
    })
}

fn pair(src: &str, target: Value) -> Value {
    json!({"source": {"persistentVolumeClaim": src}, "target": target})
}

/// The OpenAPI schema's verdict (structure, enums, patterns, lengths).
fn schema_ok(v: &Value) -> Result<(), String> {
    let s = schema();
    let validator = jsonschema::validator_for(&s).map_err(|e| e.to_string())?;
    let errs: Vec<String> = validator.iter_errors(v).map(|e| e.to_string()).collect();
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

/// The CEL rules' verdict.
fn cel(v: &Value, old: Option<&Value>) -> Result<(), String> {
    Validator::new()
        .validate(&schema(), v, old)
        .map_err(|e| format!("{e:?}"))
}

fn spec_of(v: &Value) -> VolumeMigrationSpec {
    serde_json::from_value(v["spec"].clone()).unwrap()
}

#[test]
fn every_rule_is_in_the_crd_with_its_message() {
    let text = serde_json::to_string(&VolumeMigration::crd()).unwrap();
    for (rule, msg) in rules::ALL {
        assert!(
            text.contains(&serde_json::to_string(rule).unwrap()),
            "rule missing: {rule}"
        );
        assert!(
            text.contains(&serde_json::to_string(msg).unwrap()),
            "message missing: {msg}"
        );
    }
    for p in [rules::DURATION_PATTERN, rules::QUANTITY_PATTERN] {
        assert!(
            text.contains(&serde_json::to_string(p).unwrap()),
            "pattern missing: {p}"
        );
    }
    let crd = VolumeMigration::crd();
    assert_eq!(crd.metadata.name.as_deref(), Some(crd::CRD_NAME));
    assert_eq!(
        crd.spec.names.short_names.as_deref(),
        Some(&crd::SHORT_NAMES.map(String::from)[..])
    );
    let cols: Vec<String> = crd.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(
        cols,
        [
            "Phase", "Ready", "Progress", "Stall", "Age", "Source", "Target", "Node"
        ]
    );
    // Source, target and node only with `kubectl get -o wide`.
    let wide: Vec<(String, Option<i32>)> = crd.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| (c.name.clone(), c.priority))
        .filter(|(_, p)| *p == Some(1))
        .collect();
    assert_eq!(wide.len(), 3, "{wide:?}");
    assert!(
        crd.spec.versions[0]
            .subresources
            .as_ref()
            .unwrap()
            .status
            .is_some()
    );
}

#[test]
fn valid_samples_pass_schema_cel_and_twin() {
    let samples = [
        obj(json!({"volumes": [pair("data-pg-0", json!({"storageClassName": "fast-ssd"}))]})),
        obj(json!({
            "volumes": [
                pair("a", json!({"storageClassName": "fast"})),
                pair("b", json!({"persistentVolumeClaim": "b-new"})),
            ],
            "copyMode": "Mirror", "syncGoal": "1.5s", "bandwidthLimit": "200Mi",
            "verify": "Sample", "retainSource": true, "abort": false,
        })),
        obj(
            json!({"volumes": [pair("a", json!({"storageClassName": "x"}))], "bandwidthLimit": "4096", "syncGoal": "50ms"}),
        ),
    ];
    for s in &samples {
        schema_ok(s).unwrap_or_else(|e| panic!("schema rejects {s}: {e}"));
        cel(s, None).unwrap_or_else(|e| panic!("CEL rejects {s}: {e}"));
        let parsed =
            crd::check_spec(&spec_of(s)).unwrap_or_else(|e| panic!("twin rejects {s}: {e:?}"));
        assert!(parsed.sync_goal_ms > 0);
    }
    let p = crd::check_spec(&spec_of(&samples[1])).unwrap();
    assert_eq!((p.sync_goal_ms, p.bandwidth), (1500, 200 << 20));
    // defaults: what the API server fills in is what serde fills in
    let s = spec_of(&samples[0]);
    assert_eq!(
        (s.sync_goal.as_str(), s.retain_source, s.abort),
        ("100ms", true, false)
    );
}

/// A sample, what rejects it (`schema`: the OpenAPI schema; `cel`: a CEL
/// rule, whose message must appear), and whether the twin must reject it.
struct Bad {
    what: &'static str,
    v: Value,
    schema: bool,
    cel_msg: Option<&'static str>,
}

#[test]
fn invalid_samples_are_rejected_by_the_rule_meant_for_them() {
    let big: Vec<Value> = (0..17)
        .map(|i| pair(&format!("s{i}"), json!({"storageClassName": "x"})))
        .collect();
    let cases = [
        Bad {
            what: "no volumes",
            v: obj(json!({"volumes": []})),
            schema: false,
            cel_msg: Some(rules::VOLUMES_NOT_EMPTY_MSG),
        },
        Bad {
            what: "missing volumes",
            v: obj(json!({})),
            schema: true,
            cel_msg: None,
        },
        Bad {
            what: "too many volumes",
            v: obj(json!({"volumes": big})),
            schema: true,
            cel_msg: None,
        },
        Bad {
            what: "same source twice",
            v: obj(
                json!({"volumes": [pair("a", json!({"storageClassName": "x"})), pair("a", json!({"storageClassName": "y"}))]}),
            ),
            schema: false,
            cel_msg: Some(rules::UNIQUE_SOURCES_MSG),
        },
        Bad {
            what: "target is the source",
            v: obj(json!({"volumes": [pair("a", json!({"persistentVolumeClaim": "a"}))]})),
            schema: false,
            cel_msg: Some(rules::TARGET_NOT_A_SOURCE_MSG),
        },
        Bad {
            what: "target is another source",
            v: obj(
                json!({"volumes": [pair("a", json!({"persistentVolumeClaim": "b"})), pair("b", json!({"storageClassName": "x"}))]}),
            ),
            schema: false,
            cel_msg: Some(rules::TARGET_NOT_A_SOURCE_MSG),
        },
        Bad {
            what: "two targets",
            v: obj(
                json!({"volumes": [pair("a", json!({"persistentVolumeClaim": "b", "storageClassName": "x"}))]}),
            ),
            schema: false,
            cel_msg: Some(rules::ONE_TARGET_MSG),
        },
        Bad {
            what: "no target",
            v: obj(json!({"volumes": [pair("a", json!({}))]})),
            schema: false,
            cel_msg: Some(rules::ONE_TARGET_MSG),
        },
        Bad {
            what: "bad sync goal",
            v: obj(
                json!({"volumes": [pair("a", json!({"storageClassName": "x"}))], "syncGoal": "fast"}),
            ),
            schema: true,
            cel_msg: None,
        },
        Bad {
            what: "bare number sync goal",
            v: obj(
                json!({"volumes": [pair("a", json!({"storageClassName": "x"}))], "syncGoal": "100"}),
            ),
            schema: true,
            cel_msg: None,
        },
        Bad {
            what: "bad bandwidth",
            v: obj(
                json!({"volumes": [pair("a", json!({"storageClassName": "x"}))], "bandwidthLimit": "1.5Gi"}),
            ),
            schema: true,
            cel_msg: None,
        },
        Bad {
            what: "bad copy mode",
            v: obj(
                json!({"volumes": [pair("a", json!({"storageClassName": "x"}))], "copyMode": "Fast"}),
            ),
            schema: true,
            cel_msg: None,
        },
        Bad {
            what: "empty claim name",
            v: obj(json!({"volumes": [pair("", json!({"storageClassName": "x"}))]})),
            schema: true,
            cel_msg: None,
        },
    ];
    for c in &cases {
        let s = schema_ok(&c.v);
        assert_eq!(s.is_err(), c.schema, "{}: schema verdict {s:?}", c.what);
        if let Some(msg) = c.cel_msg {
            let e = cel(&c.v, None).expect_err(c.what);
            assert!(e.contains(msg), "{}: CEL error {e} lacks {msg:?}", c.what);
        }
        // The twin rejects every case that deserializes at all.
        if let Ok(spec) = serde_json::from_value::<VolumeMigrationSpec>(c.v["spec"].clone()) {
            let e = crd::check_spec(&spec).expect_err(c.what);
            if let Some(msg) = c.cel_msg {
                assert!(e.iter().any(|m| m == msg), "{}: twin said {e:?}", c.what);
            }
        }
    }
}

#[test]
fn transition_rules_hold_abort_and_volumes() {
    let base = json!({"volumes": [pair("a", json!({"storageClassName": "x"}))], "abort": true});
    let aborted = obj(base.clone());
    let mut unset = aborted.clone();
    unset["spec"]["abort"] = json!(false);
    let e = cel(&unset, Some(&aborted)).expect_err("abort unset");
    assert!(e.contains(rules::ABORT_STAYS_MSG), "{e}");
    let mut removed = aborted.clone();
    removed["spec"].as_object_mut().unwrap().remove("abort");
    assert!(cel(&removed, Some(&aborted)).is_err(), "abort removed");
    assert!(crd::check_update(&spec_of(&aborted), &spec_of(&unset), false).is_err());

    let mut other = aborted.clone();
    other["spec"]["volumes"][0]["source"]["persistentVolumeClaim"] = json!("b");
    let e = cel(&other, Some(&aborted)).expect_err("volumes changed");
    assert!(e.contains(rules::VOLUMES_FIXED_MSG), "{e}");
    assert!(crd::check_update(&spec_of(&aborted), &spec_of(&other), false).is_err());

    // bandwidth may change while running
    let mut running = obj(
        json!({"volumes": [pair("a", json!({"storageClassName": "x"}))], "bandwidthLimit": "10Mi"}),
    );
    running["status"] = json!({"phase": "Copying"});
    let mut faster = running.clone();
    faster["spec"]["bandwidthLimit"] = json!("100Mi");
    cel(&faster, Some(&running)).unwrap();
    crd::check_update(&spec_of(&running), &spec_of(&faster), false).unwrap();
    // abort while running: fine; after the end: refused
    let mut abort = running.clone();
    abort["spec"]["abort"] = json!(true);
    cel(&abort, Some(&running)).unwrap();
    crd::check_update(&spec_of(&running), &spec_of(&abort), false).unwrap();
    let mut done = running.clone();
    done["status"]["phase"] = json!("Completed");
    let mut late = done.clone();
    late["spec"]["abort"] = json!(true);
    let e = cel(&late, Some(&done)).expect_err("abort after completion");
    assert!(e.contains(rules::NO_ABORT_AFTER_END_MSG), "{e}");
    assert!(crd::check_update(&spec_of(&done), &spec_of(&late), true).is_err());
}

/// A status as the operator writes it, with `f` applied.
fn with_status(f: impl FnOnce(&mut Value)) -> Value {
    let mut v = obj(json!({"volumes": [pair("a", json!({"storageClassName": "x"}))]}));
    v["status"] = json!({
        "phase": "Copying",
        "phaseTimes": [{"phase": "Copying", "start": "2026-01-01T10:00:00.123Z"}],
        "conditions": [
            {"type": "Ready", "status": "False", "reason": "InProgress",
             "message": "Copying: 10% copied", "lastTransitionTime": "2026-01-01T10:00:00.123Z",
             "observedGeneration": 1},
            {"type": "Complete", "status": "False", "reason": "Copying", "message": "",
             "lastTransitionTime": "2026-01-01T10:00:00.123Z"},
        ],
    });
    f(&mut v);
    v
}

/// The schema's verdict with `format` checked too (the API server checks
/// `date-time`).
fn schema_ok_with_formats(v: &Value) -> Result<(), String> {
    let s = schema();
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&s)
        .map_err(|e| e.to_string())?;
    let errs: Vec<String> = validator.iter_errors(v).map(|e| e.to_string()).collect();
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

#[test]
fn conditions_follow_the_api_conventions() {
    let crd = serde_json::to_value(VolumeMigration::crd()).unwrap();
    let conds = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
        ["conditions"];
    assert_eq!(conds["x-kubernetes-list-type"], "map", "{conds}");
    assert_eq!(conds["x-kubernetes-list-map-keys"], json!(["type"]));
    let item = &conds["items"]["properties"];
    assert_eq!(item["status"]["enum"], json!(["True", "False", "Unknown"]));
    assert_eq!(item["lastTransitionTime"]["format"], "date-time");
    let times = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
        ["phaseTimes"]["items"]["properties"];
    assert_eq!(times["start"]["format"], "date-time");
    assert_eq!(times["end"]["format"], "date-time");

    schema_ok_with_formats(&with_status(|_| {})).unwrap();
    let bad = [
        (
            "status Yes",
            with_status(|v| v["status"]["conditions"][0]["status"] = json!("Yes")),
        ),
        (
            "a time that is no date-time",
            with_status(|v| {
                v["status"]["conditions"][0]["lastTransitionTime"] = json!("yesterday")
            }),
        ),
        (
            "a phase start that is no date-time",
            with_status(|v| v["status"]["phaseTimes"][0]["start"] = json!("10:00")),
        ),
        (
            "a reason with a space",
            with_status(|v| v["status"]["conditions"][0]["reason"] = json!("In progress")),
        ),
        (
            "no reason",
            with_status(|v| {
                v["status"]["conditions"][0]
                    .as_object_mut()
                    .unwrap()
                    .remove("reason");
            }),
        ),
    ];
    for (what, v) in bad {
        assert!(
            schema_ok_with_formats(&v).is_err(),
            "{what} passed the schema"
        );
    }
    // CEL rules that read the status still hold.
    cel(&with_status(|_| {}), None).unwrap();
}
