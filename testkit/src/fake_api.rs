//! An in-memory Kubernetes API server behind `tower_test::mock::pair`: a
//! `kube::Client` talks to it exactly as to a real one. It keeps objects by
//! path and serves GET (object and list, with label and field selectors),
//! POST, PUT and PATCH (merge, JSON patch; server-side apply as a merge) of
//! objects and their `/status`, and DELETE with finalizers. Every write
//! bumps a global resourceVersion; a write carrying an older one gets 409
//! Conflict; a spec change or a deletion bumps `metadata.generation`.
//! Every request is logged so tests can say what was (not) done.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};

#[derive(Debug, Clone)]
pub struct Logged {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub body: Value,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    rv: u64,
    uid: u64,
    log: Vec<Logged>,
    /// Answer the next N writes to a path containing the key with 409.
    conflicts: Vec<(String, u32)>,
}

#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

/// `/api/v1/namespaces/ns/pods/name/status` → (collection, Some(name), Some("status")).
fn split(path: &str) -> (String, Option<String>, Option<String>) {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    // prefix: api/v1 or apis/group/version
    let base = if parts.first() == Some(&"api") { 2 } else { 3 };
    let mut i = base;
    if parts.get(i) == Some(&"namespaces") && parts.len() > i + 2 {
        i += 2;
    }
    // parts[i] = plural
    let coll = format!("/{}", parts[..=i.min(parts.len() - 1)].join("/"));
    let name = parts.get(i + 1).map(|s| s.to_string());
    let sub = parts.get(i + 2).map(|s| s.to_string());
    (coll, name, sub)
}

fn status(code: u16, reason: &str, msg: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": msg, "reason": reason, "code": code}),
    )
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| {
            let v = v.replace('+', " ");
            percent_decode(&v)
        })
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 3 <= b.len()
            && let Ok(n) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(n);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

fn field<'a>(v: &'a Value, dotted: &str) -> &'a Value {
    dotted.split('.').fold(v, |v, k| &v[k])
}

fn matches(obj: &Value, label_sel: Option<&str>, field_sel: Option<&str>) -> bool {
    let labels_ok = label_sel.is_none_or(|sel| {
        sel.split(',')
            .filter(|s| !s.is_empty())
            .all(|term| match term.split_once('=') {
                Some((k, v)) => {
                    obj["metadata"]["labels"][k.trim_end_matches('=')].as_str() == Some(v)
                }
                None => !obj["metadata"]["labels"][term].is_null(),
            })
    });
    let fields_ok = field_sel.is_none_or(|sel| {
        sel.split(',').filter(|s| !s.is_empty()).all(|term| {
            let (k, v) = term.split_once('=').unwrap();
            field(obj, k.trim_end_matches('=')).as_str() == Some(v)
        })
    });
    labels_ok && fields_ok
}

impl FakeApi {
    /// A client of a fresh fake API server, and the server.
    pub fn start() -> (kube::Client, FakeApi) {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api = FakeApi::default();
        let server = api.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let bytes = body.collect_bytes().await.unwrap();
                let ct = parts
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let (code, out) = server.handle(
                    parts.method,
                    parts.uri.path(),
                    parts.uri.query().unwrap_or(""),
                    &ct,
                    &bytes,
                );
                let resp = Response::builder()
                    .status(StatusCode::from_u16(code).unwrap())
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&out).unwrap()))
                    .unwrap();
                send.send_response(resp);
            }
        });
        (kube::Client::new(svc, "default"), api)
    }

    fn handle(
        &self,
        method: Method,
        path: &str,
        query: &str,
        ct: &str,
        body: &[u8],
    ) -> (u16, Value) {
        let mut st = self.state.lock().unwrap();
        let parsed: Value = if body.is_empty() {
            Value::Null
        } else if ct.contains("yaml") {
            serde_saphyr::from_slice(body).unwrap_or(Value::Null)
        } else {
            serde_json::from_slice(body).unwrap_or(Value::Null)
        };
        st.log.push(Logged {
            method: method.clone(),
            path: path.to_string(),
            query: query.to_string(),
            body: parsed.clone(),
        });
        let (coll, name, sub) = split(path);
        if method != Method::GET
            && let Some(c) = st
                .conflicts
                .iter_mut()
                .find(|(k, n)| path.contains(k.as_str()) && *n > 0)
        {
            c.1 -= 1;
            return status(409, "Conflict", "injected conflict");
        }
        match (method, name) {
            (Method::GET, None) => {
                if query_param(query, "watch").as_deref() == Some("true") {
                    return status(
                        405,
                        "MethodNotAllowed",
                        "the fake API server does not watch",
                    );
                }
                let ls = query_param(query, "labelSelector");
                let fs = query_param(query, "fieldSelector");
                let plural = coll.rsplit('/').next().unwrap().to_string();
                let api_prefix = coll.rsplit_once('/').unwrap().0.to_string();
                // a list across namespaces (/api/v1/pods) takes every namespace's
                let items: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|(k, _)| {
                        let parent = k.rsplit_once('/').unwrap().0;
                        parent == coll
                            || (!coll.contains("/namespaces/")
                                && parent.starts_with(&format!("{api_prefix}/namespaces/"))
                                && parent.ends_with(&format!("/{plural}"))
                                && parent.matches('/').count()
                                    == api_prefix.matches('/').count() + 3)
                    })
                    .map(|(_, v)| v.clone())
                    .filter(|v| matches(v, ls.as_deref(), fs.as_deref()))
                    .collect();
                (
                    200,
                    json!({"apiVersion": "v1", "kind": "List",
                             "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
                )
            }
            (Method::GET, Some(n)) => match st.objects.get(&format!("{coll}/{n}")) {
                Some(o) => (200, o.clone()),
                None => status(404, "NotFound", &format!("{n} not found")),
            },
            (Method::POST, None) => {
                let mut obj = parsed;
                let n = obj["metadata"]["name"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| {
                        format!(
                            "{}{}",
                            obj["metadata"]["generateName"].as_str().unwrap_or("obj-"),
                            st.uid + 1
                        )
                    });
                let key = format!("{coll}/{n}");
                if st.objects.contains_key(&key) {
                    return status(409, "AlreadyExists", &format!("{n} already exists"));
                }
                st.rv += 1;
                st.uid += 1;
                let m = &mut obj["metadata"];
                m["name"] = json!(n);
                m["resourceVersion"] = json!(st.rv.to_string());
                m["uid"] = json!(format!("uid-{}", st.uid));
                m["generation"] = json!(1);
                m["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
                if let Some(ns) = coll
                    .split("/namespaces/")
                    .nth(1)
                    .and_then(|r| r.split('/').next())
                {
                    m["namespace"] = json!(ns);
                }
                st.objects.insert(key, obj.clone());
                (201, obj)
            }
            (Method::PUT, Some(n)) => {
                let key = format!("{coll}/{n}");
                let Some(cur) = st.objects.get(&key).cloned() else {
                    return status(404, "NotFound", &format!("{n} not found"));
                };
                if let Some(rv) = parsed["metadata"]["resourceVersion"].as_str()
                    && cur["metadata"]["resourceVersion"].as_str() != Some(rv)
                {
                    return status(
                        409,
                        "Conflict",
                        "the object has been modified; please apply your changes to the latest version and try again",
                    );
                }
                let next = if sub.as_deref() == Some("status") {
                    let mut o = cur.clone();
                    o["status"] = parsed["status"].clone();
                    o
                } else {
                    let mut o = parsed.clone();
                    o["status"] = cur["status"].clone();
                    o["metadata"]["uid"] = cur["metadata"]["uid"].clone();
                    o["metadata"]["creationTimestamp"] =
                        cur["metadata"]["creationTimestamp"].clone();
                    o["metadata"]["generation"] = cur["metadata"]["generation"].clone();
                    o["metadata"]["deletionTimestamp"] =
                        cur["metadata"]["deletionTimestamp"].clone();
                    o
                };
                Self::store(&mut st, key, &cur, next)
            }
            (Method::PATCH, Some(n)) => {
                let key = format!("{coll}/{n}");
                let Some(cur) = st.objects.get(&key).cloned() else {
                    return status(404, "NotFound", &format!("{n} not found"));
                };
                if let Some(rv) = parsed["metadata"]["resourceVersion"].as_str()
                    && cur["metadata"]["resourceVersion"].as_str() != Some(rv)
                {
                    return status(409, "Conflict", "the object has been modified");
                }
                let mut doc = cur.clone();
                if ct.contains("json-patch") {
                    // As the API server does: `test` of null passes on a missing path.
                    let ops: Vec<Value> = parsed
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|op| {
                            !(op["op"] == "test"
                                && op["value"].is_null()
                                && doc.pointer(op["path"].as_str().unwrap_or("")).is_none())
                        })
                        .collect();
                    let p: json_patch::Patch = match serde_json::from_value(Value::Array(ops)) {
                        Ok(p) => p,
                        Err(e) => return status(400, "BadRequest", &e.to_string()),
                    };
                    if let Err(e) = json_patch::patch(&mut doc, &p) {
                        return status(422, "Invalid", &e.to_string());
                    }
                } else {
                    json_patch::merge(&mut doc, &parsed);
                }
                let mut next = if sub.as_deref() == Some("status") {
                    let mut o = cur.clone();
                    o["status"] = doc["status"].clone();
                    o
                } else {
                    let mut o = doc;
                    o["status"] = cur["status"].clone();
                    o
                };
                next["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"].clone();
                Self::store(&mut st, key, &cur, next)
            }
            (Method::DELETE, Some(n)) => {
                let key = format!("{coll}/{n}");
                let Some(cur) = st.objects.get(&key).cloned() else {
                    return status(404, "NotFound", &format!("{n} not found"));
                };
                let has_finalizers = cur["metadata"]["finalizers"]
                    .as_array()
                    .is_some_and(|f| !f.is_empty());
                if has_finalizers {
                    let mut next = cur.clone();
                    if next["metadata"]["deletionTimestamp"].is_null() {
                        next["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:01Z");
                        let g = next["metadata"]["generation"].as_i64().unwrap_or(0);
                        next["metadata"]["generation"] = json!(g + 1);
                    }
                    st.rv += 1;
                    next["metadata"]["resourceVersion"] = json!(st.rv.to_string());
                    st.objects.insert(key, next.clone());
                    (200, next)
                } else {
                    st.rv += 1;
                    st.objects.remove(&key);
                    (
                        200,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}),
                    )
                }
            }
            (m, _) => status(405, "MethodNotAllowed", &format!("{m} {path}")),
        }
    }

    /// Stores a write: resourceVersion, generation on spec changes, removal
    /// once a deleted object has no finalizers left.
    fn store(st: &mut State, key: String, cur: &Value, mut next: Value) -> (u16, Value) {
        st.rv += 1;
        next["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        if next["spec"] != cur["spec"] {
            let g = cur["metadata"]["generation"].as_i64().unwrap_or(0);
            next["metadata"]["generation"] = json!(g + 1);
        }
        let gone = !next["metadata"]["deletionTimestamp"].is_null()
            && next["metadata"]["finalizers"]
                .as_array()
                .is_none_or(|f| f.is_empty());
        if gone {
            st.objects.remove(&key);
        } else {
            st.objects.insert(key, next.clone());
        }
        (200, next)
    }

    // --- what tests use ---

    /// Puts an object as a controller or a user would find it.
    pub fn put(&self, path: &str, mut obj: Value) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        st.uid += 1;
        let m = &mut obj["metadata"];
        m["resourceVersion"] = json!(st.rv.to_string());
        if m["uid"].is_null() {
            m["uid"] = json!(format!("uid-{}", st.uid));
        }
        if m["generation"].is_null() {
            m["generation"] = json!(1);
        }
        if m["creationTimestamp"].is_null() {
            m["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        st.objects.insert(path.to_string(), obj);
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(path).cloned()
    }

    /// Changes a stored object in place (as a kubelet or a user would).
    pub fn edit(&self, path: &str, f: impl FnOnce(&mut Value)) {
        let mut st = self.state.lock().unwrap();
        let cur = st.objects.get(path).cloned().expect("object to edit");
        let mut next = cur.clone();
        f(&mut next);
        Self::store(&mut st, path.to_string(), &cur, next);
    }

    pub fn paths(&self) -> Vec<String> {
        self.state.lock().unwrap().objects.keys().cloned().collect()
    }

    pub fn log(&self) -> Vec<Logged> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn clear_log(&self) {
        self.state.lock().unwrap().log.clear();
    }

    /// Writes (not GETs) of the log, as `METHOD path`.
    pub fn writes(&self) -> Vec<String> {
        self.log()
            .into_iter()
            .filter(|l| l.method != Method::GET)
            .map(|l| format!("{} {}", l.method, l.path))
            .collect()
    }

    /// The next `n` writes to a path containing `key` get 409 Conflict.
    pub fn conflict_next(&self, key: &str, n: u32) {
        self.state
            .lock()
            .unwrap()
            .conflicts
            .push((key.to_string(), n));
    }
}
