#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! The RBAC table (`volmig_operator::rbac::RULES`) against the operator's
//! source: every kind of object the code reaches through an `Api<K>` (or
//! kube-lease-manager, or kube's event Recorder) has rules, and every
//! resource with rules is reached by the code. The verbs are checked by the
//! tests against the fake API server (every request the operator sends
//! there must be granted); `scripts/check-chart` checks that the chart
//! grants exactly the table.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use volmig_operator::rbac::RULES;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The (group, resource) of a kind the operator names in `Api<..>`.
fn resource_of(kind: &str) -> Option<(&'static str, &'static str)> {
    Some(match kind {
        "VolumeMigration" => ("volmig.io", "volumemigrations"),
        "VolmigVolume" => ("volmig.io", "volmigvolumes"),
        "Pod" => ("", "pods"),
        "PersistentVolumeClaim" => ("", "persistentvolumeclaims"),
        "PersistentVolume" => ("", "persistentvolumes"),
        "Lease" => ("coordination.k8s.io", "leases"),
        "Secret" => ("", "secrets"),
        "CustomResourceDefinition" => ("apiextensions.k8s.io", "customresourcedefinitions"),
        // a generic Api<K> (the caches' reflectors): its kinds are the ones above
        "K" => return None,
        _ => panic!(
            "the operator uses Api<{kind}>: add its rules to operator/src/rbac.rs (and the chart), and its resource to this test"
        ),
    })
}

#[test]
fn every_api_the_code_uses_has_rules_and_no_rule_is_unused() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut used = BTreeSet::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        if f.ends_with("rbac.rs") {
            continue; // the table itself
        }
        // The CSI controller (`volmig-operator csi-controller`) runs in its
        // own pod under its own ServiceAccount, with the sidecars' rules
        // (charts/volmig/templates/csi-rbac.yaml, checked by scripts/check-chart).
        if f.components().any(|c| c.as_os_str() == "csi") {
            continue;
        }
        for pat in ["Api<", "Api::<"] {
            for (i, _) in text.match_indices(pat) {
                let rest = &text[i + pat.len()..];
                let kind: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if let Some(r) = resource_of(&kind) {
                    used.insert(r);
                }
            }
        }
        if text.contains("LeaseManagerBuilder") {
            used.insert(("coordination.k8s.io", "leases"));
        }
        if text.contains("recorder.publish") || text.contains("Recorder::new") {
            used.insert(("events.k8s.io", "events"));
        }
    }
    let granted: BTreeSet<(&str, &str)> = RULES
        .iter()
        .map(|r| (r.group, r.resource.split('/').next().unwrap()))
        .collect();
    let missing: Vec<_> = used.difference(&granted).collect();
    let unused: Vec<_> = granted.difference(&used).collect();
    assert!(
        missing.is_empty(),
        "the code reaches {missing:?}, which operator/src/rbac.rs does not grant"
    );
    assert!(
        unused.is_empty(),
        "operator/src/rbac.rs grants {unused:?}, which no code reaches"
    );
    // the kinds the reconciler watches and writes are all there
    for r in [
        ("volmig.io", "volumemigrations"),
        ("", "pods"),
        ("", "persistentvolumeclaims"),
        ("", "persistentvolumes"),
    ] {
        assert!(used.contains(&r), "{r:?} not found in the source");
    }
}

#[test]
fn every_rule_says_why_and_no_wildcards() {
    for r in RULES {
        assert!(!r.why.is_empty(), "{r:?}");
        assert!(
            !r.verbs.contains(&"*") && r.resource != "*" && r.group != "*",
            "{r:?}"
        );
    }
}
