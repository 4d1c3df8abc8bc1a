//! Every Kubernetes API call the operator makes, as RBAC rules: the chart's
//! ClusterRole and Role must grant exactly these (`scripts/check-chart`
//! compares them with `volmig-operator rbac`), and the tests against the
//! fake API server check that every request the operator sends is one of
//! them ([`denied`]). Add a rule here when the code calls something new,
//! and remove it when the code stops: nothing else is granted.

use serde_json::{Value, json};

/// Where a rule applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every namespace (a ClusterRole): the migrations, their claims, pods
    /// and volumes are wherever the workloads are.
    Cluster,
    /// The operator's own namespace (a Role): its Lease and its TLS Secret.
    Own,
}

/// Which objects a rule covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Names {
    /// Any name (`create`, `list` and `watch` cannot be limited by name).
    Any,
    /// The VolumeMigration CRD only.
    Crd,
    /// The Lease `--lease-name` only.
    Lease,
    /// The TLS Secret `--tls-secret` only.
    TlsSecret,
}

/// One rule: what is granted, and which code needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub group: &'static str,
    /// The resource, with its subresource (`volumemigrations/status`).
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
    pub scope: Scope,
    pub names: Names,
    pub why: &'static str,
}

/// Everything the operator calls.
pub const RULES: &[Rule] = &[
    Rule {
        group: "volmig.io",
        resource: "volumemigrations",
        verbs: &["get", "list", "watch", "patch"],
        scope: Scope::Cluster,
        names: Names::Any,
        why: "the controller watches them; the status store reads them; the finalizer is added and removed with a JSON patch",
    },
    Rule {
        group: "volmig.io",
        resource: "volumemigrations/status",
        verbs: &["update"],
        scope: Scope::Cluster,
        names: Names::Any,
        why: "the status is the communication data set, replaced under resourceVersion (status_store.rs, reconcile/status.rs)",
    },
    Rule {
        group: "volmig.io",
        resource: "volmigvolumes",
        verbs: &["get"],
        scope: Scope::Cluster,
        names: Names::Any,
        why: "a migration of a volume of volmig's CSI driver reads the volume's record (reconcile/volmig.rs)",
    },
    Rule {
        group: "volmig.io",
        resource: "volmigvolumes/status",
        verbs: &["update"],
        scope: Scope::Cluster,
        names: Names::Any,
        why: "the record lists a migration's target backing claim before it is made, and names it current once the migration completed (reconcile/volmig.rs)",
    },
    Rule {
        group: "apiextensions.k8s.io",
        resource: "customresourcedefinitions",
        verbs: &["get"],
        scope: Scope::Cluster,
        names: Names::Crd,
        why: "refuse to run against CRDs of another version (startup.rs)",
    },
    Rule {
        group: "events.k8s.io",
        resource: "events",
        verbs: &["create", "patch"],
        scope: Scope::Cluster,
        names: Names::Any,
        why: "Events of phase changes and failures (kube's Recorder: create, then patch a series)",
    },
    Rule {
        group: "",
        resource: "persistentvolumeclaims",
        verbs: &["get", "list", "watch", "create", "patch", "delete"],
        scope: Scope::Cluster,
        names: Names::Any,
        why: "the claim cache; target claims created, disowned, and deleted where the source holds the newest data",
    },
    Rule {
        group: "",
        resource: "persistentvolumes",
        verbs: &["get", "list", "watch", "patch"],
        scope: Scope::Cluster,
        names: Names::Any,
        why: "the volume cache; rebinding sets reclaim policy Retain and the backs/backed-by annotations",
    },
    Rule {
        group: "",
        resource: "pods",
        verbs: &["get", "list", "watch", "create", "patch", "delete"],
        scope: Scope::Cluster,
        names: Names::Any,
        why: "the pod cache (consumers, agents); holder pods created, disowned and deleted (the chart's admission policy limits what may be created to holder pods)",
    },
    Rule {
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["create"],
        scope: Scope::Own,
        names: Names::Any,
        why: "leader election creates the Lease if missing",
    },
    Rule {
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["get", "patch"],
        scope: Scope::Own,
        names: Names::Lease,
        why: "leader election (kube-lease-manager) and the fencing epoch (leader.rs)",
    },
    Rule {
        group: "",
        resource: "secrets",
        verbs: &["create"],
        scope: Scope::Own,
        names: Names::Any,
        why: "the TLS Secret is created at the first start (tls_issuer.rs)",
    },
    Rule {
        group: "",
        resource: "secrets",
        verbs: &["get", "update"],
        scope: Scope::Own,
        names: Names::TlsSecret,
        why: "certificates renewed and rotated in the TLS Secret (tls_issuer.rs)",
    },
];

/// The names a deployment gives the rules' [`Names`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    pub lease: String,
    pub tls_secret: Option<String>,
}

impl Named {
    /// The resource names rule names `n` stands for: `Some(None)` any,
    /// `None` no rule at all.
    fn name(&self, n: Names) -> Option<Option<Vec<String>>> {
        match n {
            Names::Any => Some(None),
            Names::Crd => Some(Some(crate::crd_gen::crd_names().to_vec())),
            Names::Lease => Some(Some(vec![self.lease.clone()])),
            // no Secret to manage (cert-manager): no rule
            Names::TlsSecret => self.tls_secret.clone().map(|s| Some(vec![s])),
        }
    }
}

/// Whether a rule is in force for this deployment (the Secret rules only
/// when the operator manages its certificates).
fn in_force(r: &Rule, named: &Named) -> bool {
    let secret = r.group.is_empty() && r.resource == "secrets";
    named.name(r.names).is_some() && (!secret || named.tls_secret.is_some())
}

/// The rules as Kubernetes PolicyRules: `{"cluster": [...], "namespace": [...]}`
/// (`volmig-operator rbac`, which scripts/check-chart compares with the
/// chart's ClusterRole and Role).
pub fn policy_rules(named: &Named) -> Value {
    let mut cluster = Vec::new();
    let mut own = Vec::new();
    for r in RULES.iter().filter(|r| in_force(r, named)) {
        let mut rule = json!({"apiGroups": [r.group], "resources": [r.resource], "verbs": r.verbs});
        if let Some(Some(names)) = named.name(r.names) {
            rule["resourceNames"] = json!(names);
        }
        match r.scope {
            Scope::Cluster => cluster.push(rule),
            Scope::Own => own.push(rule),
        }
    }
    json!({"cluster": cluster, "namespace": own})
}

impl Named {
    /// The names of a deployment: its Lease, and its TLS Secret if the
    /// operator issues the certificates.
    pub fn new(lease: &str, tls_secret: Option<&str>) -> Self {
        Self {
            lease: lease.into(),
            tls_secret: tls_secret.map(Into::into),
        }
    }
}

/// Err naming every request of `log` (method, path, query) that no rule
/// grants to an operator in namespace `own`; an empty log is an error too
/// (nothing was checked).
pub fn check(log: &[(String, String, String)], own: &str, named: &Named) -> Result<(), String> {
    if log.is_empty() {
        return Err("no requests to check".into());
    }
    let denied = denied(
        log.iter()
            .map(|(m, p, q)| (m.as_str(), p.as_str(), q.as_str())),
        own,
        named,
    );
    if denied.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the operator called what its RBAC (operator/src/rbac.rs, the chart) does not grant:\n{}",
            denied.join("\n")
        ))
    }
}

/// A request as RBAC sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl Request {
    /// From an HTTP method, a path (`/api/v1/namespaces/ns/pods/name`,
    /// `/apis/group/version/...`) and its query.
    pub fn from_http(method: &str, path: &str, query: &str) -> Option<Request> {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, rest) = match *parts.first()? {
            "api" => ("", parts.get(2..)?),
            "apis" => (*parts.get(1)?, parts.get(3..)?),
            _ => return None,
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, more @ ..] if !more.is_empty() => (Some(ns.to_string()), more),
            _ => (None, rest),
        };
        let (resource, name) = match rest {
            [res] => (res.to_string(), None),
            [res, name] => (res.to_string(), Some(name.to_string())),
            [res, name, sub] => (format!("{res}/{sub}"), Some(name.to_string())),
            _ => return None,
        };
        let watch = query
            .split('&')
            .any(|kv| kv == "watch=true" || kv == "watch=1");
        let verb = match (method, &name) {
            ("GET", Some(_)) => "get",
            ("GET", None) if watch => "watch",
            ("GET", None) => "list",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", Some(_)) => "delete",
            ("DELETE", None) => "deletecollection",
            _ => return None,
        };
        Some(Request {
            verb: verb.into(),
            group: group.into(),
            resource,
            namespace,
            name,
        })
    }
}

/// Whether a rule grants `req` to an operator in namespace `own`.
fn grants(r: &Rule, req: &Request, own: &str, named: &Named) -> bool {
    let scope_ok = match r.scope {
        Scope::Cluster => true,
        Scope::Own => req.namespace.as_deref() == Some(own),
    };
    let name_ok = match named.name(r.names) {
        None => false,
        Some(None) => true,
        // a name-limited rule grants nothing without a name (create, list)
        Some(Some(names)) => req.name.as_ref().is_some_and(|n| names.contains(n)),
    };
    in_force(r, named)
        && scope_ok
        && name_ok
        && r.group == req.group
        && r.resource == req.resource
        && r.verbs.contains(&req.verb.as_str())
}

/// The requests of `log` (method, path, query) that no rule grants, as
/// readable lines; empty when the operator stayed within [`RULES`].
pub fn denied<'a>(
    log: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>,
    own: &str,
    named: &Named,
) -> Vec<String> {
    log.into_iter()
        .filter_map(|(method, path, query)| {
            let Some(req) = Request::from_http(method, path, query) else {
                return Some(format!("{method} {path}?{query}: not an API request"));
            };
            (!RULES.iter().any(|r| grants(r, &req, own, named))).then(|| {
                format!(
                    "{} {}/{} {} in {}: {method} {path}?{query}",
                    req.verb,
                    if req.group.is_empty() {
                        "core"
                    } else {
                        &req.group
                    },
                    req.resource,
                    req.name.as_deref().unwrap_or("*"),
                    req.namespace.as_deref().unwrap_or("the cluster")
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named() -> Named {
        Named {
            lease: "volmig-operator".into(),
            tls_secret: Some("volmig-tls".into()),
        }
    }

    #[test]
    fn requests_as_rbac_sees_them() {
        let r = Request::from_http("GET", "/api/v1/pods", "watch=true&resourceVersion=5").unwrap();
        assert_eq!(
            (r.verb.as_str(), r.resource.as_str(), r.namespace),
            ("watch", "pods", None)
        );
        let r = Request::from_http(
            "PUT",
            "/apis/volmig.io/v1alpha1/namespaces/db/volumemigrations/m/status",
            "",
        )
        .unwrap();
        assert_eq!(r.verb, "update");
        assert_eq!(r.group, "volmig.io");
        assert_eq!(r.resource, "volumemigrations/status");
        assert_eq!(r.namespace.as_deref(), Some("db"));
        assert_eq!(r.name.as_deref(), Some("m"));
        let r = Request::from_http("DELETE", "/api/v1/namespaces/db/persistentvolumeclaims", "")
            .unwrap();
        assert_eq!(r.verb, "deletecollection");
        let r = Request::from_http("GET", "/api/v1/namespaces/db", "").unwrap();
        assert_eq!(
            (r.resource.as_str(), r.name.as_deref()),
            ("namespaces", Some("db"))
        );
    }

    #[test]
    fn only_what_the_rules_say() {
        let n = named();
        let ok = |m, p, q| denied([(m, p, q)], "volmig-system", &n).is_empty();
        assert!(ok("GET", "/api/v1/persistentvolumes", "watch=true"));
        assert!(ok("PATCH", "/api/v1/persistentvolumes/pv-1", ""));
        assert!(
            !ok("DELETE", "/api/v1/persistentvolumes/pv-1", ""),
            "PVs are never deleted"
        );
        assert!(!ok("GET", "/api/v1/nodes", ""), "no nodes");
        assert!(
            !ok("GET", "/apis/storage.k8s.io/v1/storageclasses", ""),
            "no classes"
        );
        // the Lease and the Secret: own namespace, own name
        let lease = "/apis/coordination.k8s.io/v1/namespaces/volmig-system/leases/volmig-operator";
        assert!(ok("PATCH", lease, ""));
        assert!(!ok(
            "PATCH",
            "/apis/coordination.k8s.io/v1/namespaces/volmig-system/leases/other",
            ""
        ));
        assert!(!ok(
            "PATCH",
            "/apis/coordination.k8s.io/v1/namespaces/db/leases/volmig-operator",
            ""
        ));
        assert!(ok(
            "POST",
            "/apis/coordination.k8s.io/v1/namespaces/volmig-system/leases",
            ""
        ));
        assert!(ok(
            "GET",
            "/api/v1/namespaces/volmig-system/secrets/volmig-tls",
            ""
        ));
        assert!(!ok(
            "GET",
            "/api/v1/namespaces/volmig-system/secrets/other",
            ""
        ));
        assert!(
            !ok("GET", "/api/v1/namespaces/volmig-system/secrets", ""),
            "no listing of Secrets"
        );
        assert!(!ok("GET", "/api/v1/namespaces/db/secrets/volmig-tls", ""));
        // the CRD: read, by name
        let crd =
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/volumemigrations.volmig.io";
        assert!(ok("GET", crd, ""));
        assert!(!ok("PATCH", crd, ""));
        assert!(!ok(
            "GET",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/other.io",
            ""
        ));
        // without a Secret to manage (cert-manager), no Secret at all
        let cm = Named {
            tls_secret: None,
            ..named()
        };
        assert!(
            !denied(
                [(
                    "GET",
                    "/api/v1/namespaces/volmig-system/secrets/volmig-tls",
                    ""
                )],
                "volmig-system",
                &cm
            )
            .is_empty()
        );
    }

    #[test]
    fn policy_rules_split_by_scope() {
        let p = policy_rules(&named());
        let cluster = p["cluster"].as_array().unwrap();
        let own = p["namespace"].as_array().unwrap();
        assert_eq!(cluster.len() + own.len(), RULES.len());
        assert!(own.iter().all(|r| {
            let res = r["resources"][0].as_str().unwrap();
            res == "leases" || res == "secrets"
        }));
        assert!(cluster.iter().any(|r| r["resourceNames"]
            == json!(["volumemigrations.volmig.io", "volmigvolumes.volmig.io"])));
        let cm = policy_rules(&Named {
            tls_secret: None,
            ..named()
        });
        assert!(
            cm["namespace"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["resources"][0] != "secrets"),
            "{cm}"
        );
    }
}
