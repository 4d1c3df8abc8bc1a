//! An in-memory Kubernetes API server behind `tower_test::mock::pair`: a
//! `kube::Client` talks to it exactly as to a real one. It keeps objects by
//! path and serves GET (object and list, with label and field selectors),
//! WATCH (a list's resourceVersion on: the events since, then live ones, so
//! kube's reflectors and controllers run against it), POST, PUT and PATCH
//! (merge, JSON patch; server-side apply as a merge) of objects and their
//! `/status`, and DELETE with finalizers, a uid precondition and the
//! propagation policies. Every write bumps a global resourceVersion; a write
//! carrying an older one gets 409 Conflict; a spec change or a deletion
//! bumps `metadata.generation`.
//!
//! What the cluster's controllers would do next happens at once: the garbage
//! collector deletes an object's dependents (by `ownerReferences`) once it
//! is gone, or right away under foreground deletion, and drops the
//! references under orphan deletion; a deleted claim takes its bound
//! volume along when the volume's reclaim policy is `Delete`. Every request
//! is logged so tests can say what was (not) done.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// The user of the client [`FakeApi::start`] returns.
pub const OPERATOR: &str = "operator";

#[derive(Debug, Clone)]
pub struct Logged {
    /// Whose client sent it ([`OPERATOR`], or [`FakeApi::client_as`]'s).
    pub user: String,
    pub method: Method,
    pub path: String,
    pub query: String,
    pub body: Value,
}

/// An open WATCH: the collection, its selectors, where its events go.
struct Watch {
    coll: String,
    labels: Option<String>,
    fields: Option<String>,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    rv: u64,
    uid: u64,
    log: Vec<Logged>,
    /// Answer the next N writes to a path containing the key with 409.
    conflicts: Vec<(String, u32)>,
    /// Every change: (resourceVersion, ADDED|MODIFIED|DELETED, path, object).
    history: Vec<(u64, &'static str, String, Value)>,
    watches: Vec<Watch>,
}

#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

/// A response body: one chunk, or a watch's events as they happen.
pub struct FakeBody(mpsc::UnboundedReceiver<Bytes>);

impl FakeBody {
    fn once(b: Vec<u8>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(Bytes::from(b));
        FakeBody(rx)
    }
}

impl http_body::Body for FakeBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// What a request gets: a JSON answer, or a watch stream.
enum Answer {
    Json(u16, Value),
    Watch(mpsc::UnboundedReceiver<Bytes>),
}

impl From<(u16, Value)> for Answer {
    fn from((code, v): (u16, Value)) -> Self {
        Answer::Json(code, v)
    }
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

/// Whether the object at `key` belongs to collection `coll`; a collection
/// across namespaces (/api/v1/pods) takes every namespace's.
fn in_collection(coll: &str, key: &str) -> bool {
    let Some((parent, _)) = key.rsplit_once('/') else {
        return false;
    };
    if parent == coll {
        return true;
    }
    let Some((api_prefix, plural)) = coll.rsplit_once('/') else {
        return false;
    };
    !coll.contains("/namespaces/")
        && parent.starts_with(&format!("{api_prefix}/namespaces/"))
        && parent.ends_with(&format!("/{plural}"))
        && parent.matches('/').count() == api_prefix.matches('/').count() + 3
}

fn status(code: u16, reason: &str, msg: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": msg, "reason": reason, "code": code}),
    )
}

fn success() -> (u16, Value) {
    (
        200,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}),
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

fn rv_of(obj: &Value) -> u64 {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// One line of a watch stream.
fn event_line(type_: &str, obj: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": type_, "object": obj})).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

/// How a deletion treats the object's dependents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Propagation {
    Background,
    Foreground,
    Orphan,
}

impl Propagation {
    fn of(body: &Value) -> Self {
        match body["propagationPolicy"].as_str() {
            Some("Foreground") => Propagation::Foreground,
            Some("Orphan") => Propagation::Orphan,
            _ => Propagation::Background,
        }
    }
}

impl State {
    /// Records a change and tells the open watches that see it.
    fn emit(&mut self, type_: &'static str, key: &str, obj: &Value) {
        self.history
            .push((rv_of(obj), type_, key.to_string(), obj.clone()));
        let line = event_line(type_, obj);
        self.watches.retain(|w| {
            if w.tx.is_closed() {
                return false;
            }
            if in_collection(&w.coll, key) && matches(obj, w.labels.as_deref(), w.fields.as_deref())
            {
                return w.tx.send(line.clone()).is_ok();
            }
            true
        });
    }

    /// Stores a new or changed object (its resourceVersion already set).
    fn put(&mut self, key: String, obj: Value) {
        let type_ = if self.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.objects.insert(key.clone(), obj.clone());
        self.emit(type_, &key, &obj);
    }

    /// Deletes the object at `key` as the API server would: marked while
    /// it has finalizers (its dependents deleted at once under foreground
    /// deletion), else removed, and then the garbage collector's part.
    fn delete(&mut self, key: &str, policy: Propagation) -> Option<Value> {
        let cur = self.objects.get(key).cloned()?;
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
            self.rv += 1;
            next["metadata"]["resourceVersion"] = json!(self.rv.to_string());
            self.put(key.to_string(), next.clone());
            if policy == Propagation::Foreground {
                self.collect_dependents(&cur, Propagation::Background);
            }
            Some(next)
        } else {
            self.remove(key, policy);
            None
        }
    }

    /// Removes the object at `key` for good, then collects its dependents.
    fn remove(&mut self, key: &str, policy: Propagation) {
        let Some(mut obj) = self.objects.remove(key) else {
            return;
        };
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.emit("DELETED", key, &obj);
        self.collect_dependents(&obj, policy);
        // The volume controller: a claim's volume goes with it when its
        // reclaim policy says Delete.
        if key.contains("/persistentvolumeclaims/")
            && let Some(pv) = obj["spec"]["volumeName"].as_str()
        {
            let pv_key = format!("/api/v1/persistentvolumes/{pv}");
            if self
                .objects
                .get(&pv_key)
                .is_some_and(|v| v["spec"]["persistentVolumeReclaimPolicy"] == "Delete")
            {
                self.remove(&pv_key, Propagation::Background);
            }
        }
    }

    /// The garbage collector for `owner`: deletes the objects that name it
    /// in their ownerReferences (or drops the reference: orphan deletion).
    fn collect_dependents(&mut self, owner: &Value, policy: Propagation) {
        let Some(uid) = owner["metadata"]["uid"].as_str() else {
            return;
        };
        let dependents: Vec<String> = self
            .objects
            .iter()
            .filter(|(_, o)| {
                o["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in dependents {
            if policy == Propagation::Orphan {
                let Some(mut o) = self.objects.get(&k).cloned() else {
                    continue;
                };
                if let Some(refs) = o["metadata"]["ownerReferences"].as_array_mut() {
                    refs.retain(|r| r["uid"] != uid);
                }
                self.rv += 1;
                o["metadata"]["resourceVersion"] = json!(self.rv.to_string());
                self.put(k, o);
            } else {
                self.delete(&k, Propagation::Background);
            }
        }
    }
}

impl FakeApi {
    /// A client of a fresh fake API server, and the server. Its requests
    /// are logged as user [`OPERATOR`].
    pub fn start() -> (kube::Client, FakeApi) {
        let api = FakeApi::default();
        (api.client_as(OPERATOR), api)
    }

    /// Another client of this server, whose requests are logged as `user`
    /// (a test acting as kubectl, say), so what the operator sent can be
    /// told apart.
    pub fn client_as(&self, user: &str) -> kube::Client {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<FakeBody>>();
        let server = self.clone();
        let user = user.to_string();
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
                let answer = server.handle(
                    &user,
                    parts.method,
                    parts.uri.path(),
                    parts.uri.query().unwrap_or(""),
                    &ct,
                    &bytes,
                );
                let (code, body) = match answer {
                    Answer::Json(code, out) => {
                        (code, FakeBody::once(serde_json::to_vec(&out).unwrap()))
                    }
                    Answer::Watch(rx) => (200, FakeBody(rx)),
                };
                let resp = Response::builder()
                    .status(StatusCode::from_u16(code).unwrap())
                    .header("content-type", "application/json")
                    .body(body)
                    .unwrap();
                send.send_response(resp);
            }
        });
        kube::Client::new(svc, "default")
    }

    /// Every request `user` sent: (method, path, query).
    pub fn requests_of(&self, user: &str) -> Vec<(String, String, String)> {
        self.log()
            .into_iter()
            .filter(|l| l.user == user)
            .map(|l| (l.method.to_string(), l.path, l.query))
            .collect()
    }

    fn handle(
        &self,
        user: &str,
        method: Method,
        path: &str,
        query: &str,
        ct: &str,
        body: &[u8],
    ) -> Answer {
        let mut st = self.state.lock().unwrap();
        let parsed: Value = if body.is_empty() {
            Value::Null
        } else if ct.contains("yaml") {
            serde_saphyr::from_slice(body).unwrap_or(Value::Null)
        } else {
            serde_json::from_slice(body).unwrap_or(Value::Null)
        };
        st.log.push(Logged {
            user: user.to_string(),
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
            return status(409, "Conflict", "injected conflict").into();
        }
        match (method, name) {
            (Method::GET, None) => {
                let ls = query_param(query, "labelSelector");
                let fs = query_param(query, "fieldSelector");
                if query_param(query, "watch").as_deref() == Some("true") {
                    return Self::watch(
                        &mut st,
                        coll,
                        ls,
                        fs,
                        query_param(query, "resourceVersion"),
                    );
                }
                let items: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|(k, _)| in_collection(&coll, k))
                    .map(|(_, v)| v.clone())
                    .filter(|v| matches(v, ls.as_deref(), fs.as_deref()))
                    .collect();
                (
                    200,
                    json!({"apiVersion": "v1", "kind": "List",
                             "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
                )
                    .into()
            }
            (Method::GET, Some(n)) => match st.objects.get(&format!("{coll}/{n}")) {
                Some(o) => (200, o.clone()).into(),
                None => status(404, "NotFound", &format!("{n} not found")).into(),
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
                    return status(409, "AlreadyExists", &format!("{n} already exists")).into();
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
                st.put(key, obj.clone());
                (201, obj).into()
            }
            (Method::PUT, Some(n)) => {
                let key = format!("{coll}/{n}");
                let Some(cur) = st.objects.get(&key).cloned() else {
                    return status(404, "NotFound", &format!("{n} not found")).into();
                };
                if let Some(rv) = parsed["metadata"]["resourceVersion"].as_str()
                    && cur["metadata"]["resourceVersion"].as_str() != Some(rv)
                {
                    return status(
                        409,
                        "Conflict",
                        "the object has been modified; please apply your changes to the latest version and try again",
                    )
                    .into();
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
                Self::store(&mut st, key, &cur, next).into()
            }
            (Method::PATCH, Some(n)) => {
                let key = format!("{coll}/{n}");
                let Some(cur) = st.objects.get(&key).cloned() else {
                    return status(404, "NotFound", &format!("{n} not found")).into();
                };
                if let Some(rv) = parsed["metadata"]["resourceVersion"].as_str()
                    && cur["metadata"]["resourceVersion"].as_str() != Some(rv)
                {
                    return status(409, "Conflict", "the object has been modified").into();
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
                        Err(e) => return status(400, "BadRequest", &e.to_string()).into(),
                    };
                    if let Err(e) = json_patch::patch(&mut doc, &p) {
                        return status(422, "Invalid", &e.to_string()).into();
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
                Self::store(&mut st, key, &cur, next).into()
            }
            (Method::DELETE, Some(n)) => {
                let key = format!("{coll}/{n}");
                let Some(cur) = st.objects.get(&key).cloned() else {
                    return status(404, "NotFound", &format!("{n} not found")).into();
                };
                if let Some(uid) = parsed["preconditions"]["uid"].as_str()
                    && cur["metadata"]["uid"].as_str() != Some(uid)
                {
                    return status(
                        409,
                        "Conflict",
                        &format!("Precondition failed: UID in precondition: {uid}"),
                    )
                    .into();
                }
                match st.delete(&key, Propagation::of(&parsed)) {
                    Some(marked) => (200, marked).into(),
                    None => success().into(),
                }
            }
            (m, _) => status(405, "MethodNotAllowed", &format!("{m} {path}")).into(),
        }
    }

    /// Opens a watch of `coll`: the changes after `since` (every object as
    /// ADDED without one), then each change as it happens.
    fn watch(
        st: &mut State,
        coll: String,
        labels: Option<String>,
        fields: Option<String>,
        since: Option<String>,
    ) -> Answer {
        let (tx, rx) = mpsc::unbounded_channel();
        let since: u64 = since.and_then(|s| s.parse().ok()).unwrap_or(0);
        let seen = |k: &str, o: &Value| {
            in_collection(&coll, k) && matches(o, labels.as_deref(), fields.as_deref())
        };
        if since == 0 {
            for (k, o) in &st.objects {
                if seen(k, o) {
                    let _ = tx.send(event_line("ADDED", o));
                }
            }
        } else {
            for (rv, type_, k, o) in &st.history {
                if *rv > since && seen(k, o) {
                    let _ = tx.send(event_line(type_, o));
                }
            }
        }
        st.watches.push(Watch {
            coll,
            labels,
            fields,
            tx,
        });
        Answer::Watch(rx)
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
            st.objects.insert(key.clone(), next.clone());
            st.remove(&key, Propagation::Background);
        } else {
            st.put(key, next.clone());
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
        st.put(path.to_string(), obj);
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

    /// Deletes an object as `kubectl delete` would (background propagation),
    /// or by removing it outright with `Foreground`/`Orphan` semantics:
    /// `policy` is "Background", "Foreground" or "Orphan".
    pub fn delete(&self, path: &str, policy: &str) {
        let mut st = self.state.lock().unwrap();
        st.delete(path, Propagation::of(&json!({"propagationPolicy": policy})));
    }

    pub fn paths(&self) -> Vec<String> {
        self.state.lock().unwrap().objects.keys().cloned().collect()
    }

    /// The resourceVersion of every object under collection `coll` (e.g.
    /// `/api/v1/pods`, every namespace's), by path: what a reflector of
    /// that collection holds once it caught up.
    pub fn versions(&self, coll: &str) -> BTreeMap<String, String> {
        self.state
            .lock()
            .unwrap()
            .objects
            .iter()
            .filter(|(k, _)| in_collection(coll, k))
            .map(|(k, o)| {
                (
                    k.clone(),
                    o["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect()
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

    /// Lists (GETs of a collection, not watches), as `path?query`.
    pub fn lists(&self) -> Vec<String> {
        self.log()
            .into_iter()
            .filter(|l| {
                l.method == Method::GET
                    && split(&l.path).1.is_none()
                    && query_param(&l.query, "watch").as_deref() != Some("true")
            })
            .map(|l| format!("{}?{}", l.path, l.query))
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

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolume, PersistentVolumeClaim, Pod};
    use kube::Api;
    use kube::api::{DeleteParams, PropagationPolicy};
    use kube::runtime::{WatchStreamExt, reflector, watcher};

    fn owned_by(mut o: Value, owner: &Value) -> Value {
        o["metadata"]["ownerReferences"] = json!([{
            "apiVersion": "v1", "kind": "ConfigMap", "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"], "controller": true,
        }]);
        o
    }

    fn claim(name: &str, pv: &str) -> Value {
        json!({"metadata": {"name": name, "namespace": "db"}, "spec": {"volumeName": pv}})
    }

    fn pv(name: &str, policy: &str) -> Value {
        json!({"metadata": {"name": name}, "spec": {"persistentVolumeReclaimPolicy": policy}})
    }

    #[tokio::test]
    async fn garbage_collection_follows_owners_and_reclaim_policies() {
        let (client, fake) = FakeApi::start();
        let owner_path = "/api/v1/namespaces/db/configmaps/owner";
        fake.put(
            owner_path,
            json!({"metadata": {"name": "owner", "namespace": "db", "finalizers": ["x"]}}),
        );
        let owner = fake.get(owner_path).unwrap();
        let claims = "/api/v1/namespaces/db/persistentvolumeclaims";
        fake.put(&format!("{claims}/a"), owned_by(claim("a", "pv-a"), &owner));
        fake.put("/api/v1/persistentvolumes/pv-a", pv("pv-a", "Delete"));
        fake.put(&format!("{claims}/b"), owned_by(claim("b", "pv-b"), &owner));
        fake.put("/api/v1/persistentvolumes/pv-b", pv("pv-b", "Retain"));

        // background: the finalizer holds the owner, and with it its dependents
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "db");
        let _ = cms.delete("owner", &DeleteParams::default()).await;
        assert!(fake.get(&format!("{claims}/a")).is_some());
        // foreground: the dependents go at once, the owner waits for its finalizer
        let fg = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Foreground),
            ..DeleteParams::default()
        };
        let _ = cms.delete("owner", &fg).await;
        assert!(fake.get(owner_path).is_some());
        assert!(fake.get(&format!("{claims}/a")).is_none());
        assert!(
            fake.get("/api/v1/persistentvolumes/pv-a").is_none(),
            "reclaim policy Delete"
        );
        assert!(fake.get(&format!("{claims}/b")).is_none());
        assert!(
            fake.get("/api/v1/persistentvolumes/pv-b").is_some(),
            "reclaim policy Retain"
        );

        // orphan: the references go, the dependents stay
        let owner2 = "/api/v1/namespaces/db/configmaps/owner2";
        fake.put(
            owner2,
            json!({"metadata": {"name": "owner2", "namespace": "db"}}),
        );
        let o2 = fake.get(owner2).unwrap();
        fake.put(&format!("{claims}/c"), owned_by(claim("c", "pv-c"), &o2));
        fake.delete(owner2, "Orphan");
        let c = fake.get(&format!("{claims}/c")).unwrap();
        assert_eq!(c["metadata"]["ownerReferences"], json!([]));
        // background without finalizers: gone, dependents with it
        fake.put(&format!("{claims}/d"), owned_by(claim("d", "pv-d"), &c));
        fake.delete(&format!("{claims}/c"), "Background");
        assert!(fake.get(&format!("{claims}/d")).is_none());
    }

    #[tokio::test]
    async fn reflectors_follow_every_change() {
        let (client, fake) = FakeApi::start();
        let pod = |name: &str, phase: &str| {
            json!({"metadata": {"name": name, "namespace": "db", "labels": {"app": "x"}},
                   "spec": {"containers": []}, "status": {"phase": phase}})
        };
        fake.put("/api/v1/namespaces/db/pods/a", pod("a", "Pending"));
        let (store, writer) = reflector::store::<Pod>();
        let api: Api<Pod> = Api::all(client.clone());
        let cfg = watcher::Config::default().labels("app=x");
        tokio::spawn(
            watcher(api, cfg)
                .reflect(writer)
                .applied_objects()
                .for_each(|_| async {}),
        );
        store.wait_until_ready().await.unwrap();
        assert_eq!(store.state().len(), 1);

        fake.put("/api/v1/namespaces/db/pods/b", pod("b", "Pending"));
        fake.put("/api/v1/namespaces/other/pods/c", pod("c", "Pending"));
        fake.put(
            "/api/v1/namespaces/db/pods/ignored",
            json!({"metadata": {"name": "ignored", "namespace": "db"}}),
        );
        fake.edit("/api/v1/namespaces/db/pods/a", |p| {
            p["status"]["phase"] = json!("Running")
        });
        fake.delete("/api/v1/namespaces/db/pods/b", "Background");
        let want = |s: &reflector::Store<Pod>| {
            let mut names: Vec<(String, String)> = s
                .state()
                .iter()
                .map(|p| {
                    (
                        p.metadata.name.clone().unwrap(),
                        p.status.as_ref().unwrap().phase.clone().unwrap(),
                    )
                })
                .collect();
            names.sort();
            names
        };
        let expected = vec![
            ("a".to_string(), "Running".to_string()),
            ("c".to_string(), "Pending".to_string()),
        ];
        for _ in 0..500 {
            if want(&store) == expected {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(want(&store), expected);
        // the other kinds list and watch the same way
        let (pvcs, w) = reflector::store::<PersistentVolumeClaim>();
        tokio::spawn(
            watcher(
                Api::<PersistentVolumeClaim>::all(client.clone()),
                watcher::Config::default(),
            )
            .reflect(w)
            .applied_objects()
            .for_each(|_| async {}),
        );
        let (pvs, w) = reflector::store::<PersistentVolume>();
        tokio::spawn(
            watcher(
                Api::<PersistentVolume>::all(client),
                watcher::Config::default(),
            )
            .reflect(w)
            .applied_objects()
            .for_each(|_| async {}),
        );
        pvcs.wait_until_ready().await.unwrap();
        pvs.wait_until_ready().await.unwrap();
        assert!(pvcs.state().is_empty() && pvs.state().is_empty());
        assert!(
            fake.lists().len() >= 3,
            "each reflector listed once: {:?}",
            fake.lists()
        );
    }
}
