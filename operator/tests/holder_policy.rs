#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! The admission policy that limits the operator's pods to holder pods
//! (`volmig_operator::holder_policy`): the chart's copy is current, and its
//! CEL rules, evaluated here as the API server would (`object`,
//! `oldObject`, `request`, `variables`), admit the holder pod the reconciler
//! builds, its update and deletion, and refuse every other kind of pod.

use std::path::PathBuf;

use serde_json::{Value, json};
use volmig_api::crd::VolumeMigration;
use volmig_operator::holder_policy::{IMAGE, TEMPLATE, VALIDATIONS, VARIABLES, template};
use volmig_operator::reconcile::resolve::holder_pod;

const HOLDER_IMAGE: &str = "registry.k8s.io/pause:3.10";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn generated_policy_is_current() {
    let want = template();
    let path = root().join(TEMPLATE);
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    if have != want {
        if std::env::var("VOLMIG_UPDATE_GENERATED").is_ok_and(|v| v == "1") {
            std::fs::write(&path, &want).unwrap();
        } else {
            panic!(
                "{TEMPLATE} is stale: VOLMIG_UPDATE_GENERATED=1 cargo test -p volmig-operator --test holder_policy"
            );
        }
    }
}

fn eval(expr: &str, ctx: &cel::Context) -> cel::Value {
    let p = cel::Program::compile(expr).unwrap_or_else(|e| panic!("{expr}: {e:?}"));
    p.execute(ctx).unwrap_or_else(|e| panic!("{expr}: {e:?}"))
}

/// The messages of the rules `op` on (`object`, `oldObject`) breaks.
fn refused(op: &str, object: &Value, old: &Value) -> Vec<&'static str> {
    let mut ctx = cel::Context::default();
    ctx.add_variable_from_value("object", cel::to_value(object).unwrap());
    ctx.add_variable_from_value("oldObject", cel::to_value(old).unwrap());
    ctx.add_variable_from_value(
        "request",
        cel::to_value(json!({"operation": op, "userInfo": {"username": "system:serviceaccount:volmig-system:volmig-operator"}}))
            .unwrap(),
    );
    // the policy's variables, in order, as `variables.<name>`
    let mut vars = serde_json::Map::new();
    for (name, expr) in VARIABLES {
        let v = eval(expr, &ctx).json().unwrap();
        vars.insert(name.to_string(), v);
        ctx.add_variable_from_value("variables", cel::to_value(&vars).unwrap());
    }
    VALIDATIONS
        .iter()
        .filter_map(|(expr, msg)| {
            let expr = expr.replace(IMAGE, HOLDER_IMAGE);
            match eval(&expr, &ctx) {
                cel::Value::Bool(true) => None,
                cel::Value::Bool(false) => Some(*msg),
                other => panic!("{expr} gave {other:?}"),
            }
        })
        .collect()
}

/// The holder pod the reconciler creates, as the API server sees it.
fn holder() -> Value {
    let vm: VolumeMigration = serde_json::from_value(json!({
        "apiVersion": "volmig.io/v1alpha1", "kind": "VolumeMigration",
        "metadata": {"name": "m", "namespace": "db", "uid": "u-1"},
        "spec": {"volumes": [{"source": {"persistentVolumeClaim": "data"},
                              "target": {"storageClassName": "fast"}}]},
    }))
    .unwrap();
    let pod = holder_pod(&vm, "volmig-holder-m", "n1", "data-volmig", HOLDER_IMAGE).unwrap();
    let mut v = serde_json::to_value(pod).unwrap();
    // what the API server adds by default
    v["spec"]["serviceAccountName"] = json!("default");
    v["spec"]["restartPolicy"] = json!("Always");
    v["spec"]["dnsPolicy"] = json!("ClusterFirst");
    v["spec"]["containers"][0]["imagePullPolicy"] = json!("IfNotPresent");
    v
}

#[test]
fn the_holder_pod_is_admitted_and_other_pods_are_not() {
    let h = holder();
    assert_eq!(refused("CREATE", &h, &Value::Null), Vec::<&str>::new());
    assert_eq!(
        refused("UPDATE", &h, &h),
        Vec::<&str>::new(),
        "disowning (a patch)"
    );
    assert_eq!(refused("DELETE", &Value::Null, &h), Vec::<&str>::new());

    let mutated = |f: &dyn Fn(&mut Value)| {
        let mut p = holder();
        f(&mut p);
        p
    };
    let cases: Vec<(&str, Value)> = vec![
        (
            "another image",
            mutated(&|p| p["spec"]["containers"][0]["image"] = json!("evil:latest")),
        ),
        (
            "a second container",
            mutated(&|p| {
                let c = p["spec"]["containers"][0].clone();
                p["spec"]["containers"].as_array_mut().unwrap().push(c);
            }),
        ),
        (
            "an init container",
            mutated(&|p| {
                p["spec"]["initContainers"] = json!([{"name": "i", "image": HOLDER_IMAGE}])
            }),
        ),
        (
            "a hostPath volume",
            mutated(&|p| {
                p["spec"]["volumes"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"name": "root", "hostPath": {"path": "/"}}));
            }),
        ),
        (
            "a service account token",
            mutated(&|p| p["spec"]["automountServiceAccountToken"] = json!(true)),
        ),
        (
            "the host network",
            mutated(&|p| p["spec"]["hostNetwork"] = json!(true)),
        ),
        (
            "the host PID namespace",
            mutated(&|p| p["spec"]["hostPID"] = json!(true)),
        ),
        (
            "root",
            mutated(&|p| p["spec"]["securityContext"]["runAsNonRoot"] = json!(false)),
        ),
        (
            "privileged",
            mutated(&|p| p["spec"]["containers"][0]["securityContext"]["privileged"] = json!(true)),
        ),
        (
            "privilege escalation",
            mutated(&|p| {
                p["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] =
                    json!(true)
            }),
        ),
        (
            "added capabilities",
            mutated(&|p| {
                p["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] =
                    json!(["SYS_ADMIN"])
            }),
        ),
        (
            "not a holder (another component)",
            mutated(&|p| p["metadata"]["labels"]["app.kubernetes.io/component"] = json!("web")),
        ),
        (
            "no labels",
            mutated(&|p| {
                p["metadata"]
                    .as_object_mut()
                    .unwrap()
                    .remove("labels")
                    .map(|_| ())
                    .unwrap()
            }),
        ),
    ];
    for (what, pod) in &cases {
        assert!(
            !refused("CREATE", pod, &Value::Null).is_empty(),
            "a pod with {what} must be refused"
        );
    }
    // an application pod may be neither changed nor deleted by the operator
    let app = json!({"metadata": {"name": "app-0", "labels": {"app": "db"}},
                     "spec": {"containers": [{"name": "c", "image": "postgres"}]}});
    assert!(!refused("DELETE", &Value::Null, &app).is_empty());
    assert!(!refused("UPDATE", &app, &app).is_empty());
    // nor turned into a "holder" by relabelling
    let mut relabelled = app.clone();
    relabelled["metadata"]["labels"] = h["metadata"]["labels"].clone();
    assert!(!refused("UPDATE", &relabelled, &app).is_empty());
}

/// The policy applies to the operator's and the CSI controller's
/// ServiceAccounts, and to no one else.
#[test]
fn the_policy_holds_the_operator_and_the_csi_controller_only() {
    use volmig_operator::holder_policy::{CSI_USER, MATCH, OPERATOR_USER};
    let op = "system:serviceaccount:volmig-system:volmig-operator";
    let csi = "system:serviceaccount:volmig-system:volmig-csi-controller";
    let expr = MATCH.replace(OPERATOR_USER, op).replace(CSI_USER, csi);
    let applies = |user: &str| {
        let mut ctx = cel::Context::default();
        ctx.add_variable_from_value(
            "request",
            cel::to_value(json!({"operation": "CREATE", "userInfo": {"username": user}})).unwrap(),
        );
        match eval(&expr, &ctx) {
            cel::Value::Bool(b) => b,
            other => panic!("{expr} gave {other:?}"),
        }
    };
    assert!(applies(op));
    assert!(applies(csi));
    assert!(!applies("system:serviceaccount:volmig-system:default"));
    assert!(!applies("kubernetes-admin"));
    let t = template();
    assert!(
        t.contains(r#"include "volmig.operator.serviceAccountName""#)
            && t.contains(r#"include "volmig.csi.serviceAccountName""#),
        "the chart's copy names both ServiceAccounts"
    );
}

/// The holder pod the CSI controller runs for a published volume is
/// admitted, changed and deleted like the operator's.
#[test]
fn the_csi_controllers_holder_pod_is_admitted() {
    use volmig_api::crd::VolumeAttachmentRecord;
    use volmig_operator::csi::controller::{attachment_holder, holder_name};
    let id = "vol-0123456789abcdef";
    let a = VolumeAttachmentRecord {
        node: "n1".into(),
        holder_pod: holder_name(id, "n1"),
        claim: format!("{id}-0"),
        readonly: false,
    };
    let pod = attachment_holder("volmig-system", id, &a, HOLDER_IMAGE).unwrap();
    let mut h = serde_json::to_value(pod).unwrap();
    h["spec"]["serviceAccountName"] = json!("default");
    h["spec"]["restartPolicy"] = json!("Always");
    h["spec"]["containers"][0]["imagePullPolicy"] = json!("IfNotPresent");
    assert_eq!(refused("CREATE", &h, &Value::Null), Vec::<&str>::new());
    assert_eq!(refused("UPDATE", &h, &h), Vec::<&str>::new());
    assert_eq!(refused("DELETE", &Value::Null, &h), Vec::<&str>::new());
    let mut other = h.clone();
    other["spec"]["containers"][0]["image"] = json!("evil:latest");
    assert!(!refused("CREATE", &other, &Value::Null).is_empty());
}
