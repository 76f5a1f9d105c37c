//! The fake apiserver's state and the handler of every request. Everything runs under one lock,
//! held only for synchronous work: a write, its history entry and its watch events happen
//! together, so a watch never misses or reorders a change.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::Request;
use crate::route::{ResourceInfo, Route, builtin, group_of, now_rfc3339, parse_path, plural_of};
use crate::select::{FieldSelector, LabelSelector};

/// Changes kept for watches that resume; older ones are compacted away.
pub(crate) const HISTORY_LIMIT: usize = 100_000;

pub(crate) type Chunk = Result<Bytes, io::Error>;

/// (apiVersion, plural, namespace or "", name)
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Key {
    pub av: String,
    pub plural: String,
    pub ns: String,
    pub name: String,
}

/// One write, kept for watches that resume from an older resourceVersion.
struct Change {
    rev: u64,
    key: Key,
    old: Option<Value>,
    /// The new object; for a deletion, the last state with the deletion's resourceVersion.
    new: Value,
    deleted: bool,
}

struct WatchFilter {
    av: String,
    plural: String,
    ns: Option<String>,
    name: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl WatchFilter {
    fn selects(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    fn covers(&self, key: &Key) -> bool {
        key.av == self.av
            && key.plural == self.plural
            && self.ns.as_ref().is_none_or(|ns| *ns == key.ns)
            && self.name.as_ref().is_none_or(|n| *n == key.name)
    }

    /// The event a change means to this watch: an object that starts matching is ADDED, one
    /// that stops matching is DELETED with its previous content at the change's
    /// resourceVersion (as the apiserver's watch cache does).
    fn event(&self, c: &Change) -> Option<(&'static str, Value)> {
        if !self.covers(&c.key) {
            return None;
        }
        let was = c.old.as_ref().is_some_and(|o| self.selects(o));
        let is = !c.deleted && self.selects(&c.new);
        match (was, is) {
            (false, true) => Some(("ADDED", c.new.clone())),
            (true, true) => Some(("MODIFIED", c.new.clone())),
            (true, false) => {
                let mut gone = c.old.clone().unwrap_or_default();
                meta_mut(&mut gone).insert("resourceVersion".into(), c.rev.to_string().into());
                Some(("DELETED", gone))
            }
            (false, false) => None,
        }
    }
}

struct Watch {
    id: u64,
    filter: WatchFilter,
    tx: UnboundedSender<Chunk>,
    kind: String,
    bookmarks: bool,
    deadline: Option<Instant>,
    /// Asked for `as=PartialObjectMetadata`: events carry metadata only.
    partial: bool,
}

/// A validating admission check: Err(message) denies the request.
pub(crate) type AdmitFn = Arc<dyn Fn(&crate::Admission<'_>) -> Result<(), String> + Send + Sync>;

pub(crate) struct Failure {
    pub verb: String,
    pub resource: String,
    pub status: u16,
    pub remaining: usize,
    /// The Status message (None: says it was injected).
    pub message: Option<String>,
}

pub(crate) struct State {
    pub rev: u64,
    /// Changes at or below this revision are forgotten: older resourceVersions get 410.
    pub horizon: u64,
    pub objects: BTreeMap<Key, Value>,
    history: Vec<Change>,
    pub requests: Vec<Request>,
    pub failures: Vec<Failure>,
    pub down: bool,
    watches: Vec<Watch>,
    next_watch: u64,
    /// Resources registered or learned from objects, beyond the built-in table.
    pub resources: HashMap<(String, String), ResourceInfo>,
    uid_seed: u64,
    uid_count: u64,
    pub bookmark_interval: Duration,
    history_limit: usize,
    /// The rest of limited lists, by continue token: (list revision, items still to send).
    pages: HashMap<u64, (u64, Vec<Value>)>,
    next_page: u64,
    /// uid → key of every stored object: the garbage collector's owner lookups.
    uids: HashMap<String, Key>,
    pub admission: Vec<(String, AdmitFn)>,
}

pub(crate) struct Shared {
    pub state: Mutex<State>,
}

/// What a request is answered with.
pub(crate) enum Reply {
    Json(u16, Value),
    Stream(UnboundedReceiver<Chunk>),
    /// Transport failure (the server is down).
    Down,
}

fn reason_of(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        410 => "Expired",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "",
    }
}

/// A Kubernetes `Status` failure body; kube-rs turns it into `kube::Error::Api`.
pub(crate) fn status_body(code: u16, reason: &str, message: impl Into<String>) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message.into(), "reason": reason, "code": code})
}

fn err(code: u16, message: impl Into<String>) -> Reply {
    Reply::Json(code, status_body(code, reason_of(code), message))
}

fn not_found(plural: &str, name: &str) -> Reply {
    let mut s = status_body(404, "NotFound", format!("{plural} \"{name}\" not found"));
    s["details"] = json!({"name": name, "kind": plural});
    Reply::Json(404, s)
}

fn conflict(plural: &str, name: &str, why: &str) -> Reply {
    let mut s = status_body(409, "Conflict", format!("Operation cannot be fulfilled on {plural} \"{name}\": {why}"));
    s["details"] = json!({"name": name, "kind": plural});
    Reply::Json(409, s)
}

const STALE: &str = "the object has been modified; please apply your changes to the latest version and try again";

fn meta(obj: &Value) -> Option<&Map<String, Value>> {
    obj.get("metadata").and_then(Value::as_object)
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    meta(obj).and_then(|m| m.get(field)).and_then(Value::as_str).filter(|s| !s.is_empty())
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"].as_object_mut().expect("metadata is an object")
}

fn has_finalizers(obj: &Value) -> bool {
    meta(obj).and_then(|m| m.get("finalizers")).and_then(Value::as_array).is_some_and(|f| !f.is_empty())
}

fn owner_uids(obj: &Value) -> Vec<String> {
    meta(obj)
        .and_then(|m| m.get("ownerReferences"))
        .and_then(Value::as_array)
        .map(|refs| refs.iter().filter_map(|r| r.get("uid").and_then(Value::as_str)).map(String::from).collect())
        .unwrap_or_default()
}

/// A custom resource's group (not core, apps, batch, policy or *.k8s.io).
fn is_custom(group: &str) -> bool {
    group.contains('.') && !group.ends_with(".k8s.io")
}

/// A body whose apiVersion or kind is not the path's: 400, as the apiserver's decoder answers.
fn type_mismatch(r: &Route, info: &ResourceInfo, obj: &Value) -> Option<Reply> {
    let av = obj.get("apiVersion").and_then(Value::as_str).filter(|a| !a.is_empty());
    if let Some(av) = av.filter(|a| *a != r.api_version) {
        return Some(err(
            400,
            format!(
                "the API version in the data ({av}) does not match the expected API version ({}): send it to /apis/{av}/... or change apiVersion",
                r.api_version
            ),
        ));
    }
    let kind = obj.get("kind").and_then(Value::as_str).filter(|k| !k.is_empty());
    if let Some(kind) = kind.filter(|k| !info.kind.is_empty() && *k != info.kind && *k != "Eviction") {
        return Some(err(
            400,
            format!("the kind in the data ({kind}) is not the kind of {} ({})", r.plural, info.kind),
        ));
    }
    None
}

/// Names the apiserver would refuse as path segments or DNS subdomains.
fn bad_name(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("a name is required")
    } else if name.len() > 253 {
        Some("must be no more than 253 characters")
    } else if name == "." || name == ".." || name.contains('/') || name.contains('%') {
        Some("may not be '.' or '..' and may not contain '/' or '%'")
    } else {
        None
    }
}

/// The object without what only the server sets, to tell a no-op write from a change.
fn comparable(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
        m.remove("managedFields");
    }
    v
}

/// The part whose change bumps metadata.generation: all but metadata (and status when it is a
/// subresource).
fn generation_part(obj: &Value, status: bool) -> Value {
    let mut v = obj.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("metadata");
        if status {
            o.remove("status");
        }
    }
    v
}

pub(crate) struct Incoming<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a str,
    pub content_type: Option<&'a str>,
    pub accept: Option<&'a str>,
    pub body: &'a [u8],
}

impl State {
    pub fn new() -> Self {
        let seed =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos() as u64);
        State {
            rev: 1,
            horizon: 0,
            objects: BTreeMap::new(),
            history: Vec::new(),
            requests: Vec::new(),
            failures: Vec::new(),
            down: false,
            watches: Vec::new(),
            next_watch: 0,
            resources: HashMap::new(),
            uid_seed: seed ^ 0x5eed,
            uid_count: 0,
            bookmark_interval: Duration::from_secs(1),
            history_limit: HISTORY_LIMIT,
            pages: HashMap::new(),
            next_page: 0,
            uids: HashMap::new(),
            admission: Vec::new(),
        }
    }

    /// The stored state without watches, history or requests: where a dry run writes.
    fn dry_copy(&self) -> State {
        let mut st = State::new();
        st.rev = self.rev;
        st.horizon = self.horizon;
        st.objects = self.objects.clone();
        st.uids = self.uids.clone();
        st.admission = self.admission.clone();
        st.resources = self.resources.clone();
        st.uid_seed = self.uid_seed;
        st.uid_count = self.uid_count;
        st
    }

    /// The stored objects of a route's resource (and namespace, if any), in key order: a range
    /// of the map, not a scan of every object.
    fn collection<'a>(&'a self, r: &'a Route) -> impl Iterator<Item = (&'a Key, &'a Value)> + 'a {
        let start = Key {
            av: r.api_version.clone(),
            plural: r.plural.clone(),
            ns: r.namespace.clone().unwrap_or_default(),
            name: String::new(),
        };
        self.objects.range(start..).take_while(move |(k, _)| {
            k.av == r.api_version && k.plural == r.plural && r.namespace.as_ref().is_none_or(|ns| *ns == k.ns)
        })
    }

    fn new_uid(&mut self) -> String {
        self.uid_count += 1;
        format!("{:08x}-fa4e-4000-8000-{:012x}", self.uid_seed as u32, self.uid_count)
    }

    pub fn info(&self, group: &str, av: &str, plural: &str) -> Option<ResourceInfo> {
        self.resources.get(&(av.to_string(), plural.to_string())).cloned().or_else(|| builtin(group, plural))
    }

    /// Write (or delete, `new = None`) one object: bump the revision, record the change, tell
    /// the watches. Returns the stored object (for a deletion, its last state).
    fn commit(&mut self, key: Key, new: Option<Value>) -> Value {
        self.rev += 1;
        let rev = self.rev.to_string();
        let old = self.objects.get(&key).cloned();
        let (obj, deleted) = match new {
            Some(mut v) => {
                meta_mut(&mut v).insert("resourceVersion".into(), rev.into());
                if let Some(u) = old.as_ref().and_then(|o| meta_str(o, "uid")) {
                    self.uids.remove(u);
                }
                if let Some(u) = meta_str(&v, "uid") {
                    self.uids.insert(u.to_string(), key.clone());
                }
                self.objects.insert(key.clone(), v.clone());
                (v, false)
            }
            None => {
                let mut v = self.objects.remove(&key).unwrap_or(Value::Null);
                if let Some(u) = meta_str(&v, "uid") {
                    self.uids.remove(u);
                }
                meta_mut(&mut v).insert("resourceVersion".into(), rev.into());
                (v, true)
            }
        };
        let change = Change { rev: self.rev, key, old, new: obj.clone(), deleted };
        self.watches.retain(|w| match w.filter.event(&change) {
            Some((t, o)) => w.tx.send(Ok(event_line(t, &shape(&o, w.partial)))).is_ok(),
            None => !w.tx.is_closed(),
        });
        self.history.push(change);
        if self.history.len() > self.history_limit {
            // As etcd compacts: the oldest half goes; watches from before it get 410 Expired.
            let cut = self.history_limit.div_ceil(2);
            self.horizon = self.history[cut - 1].rev;
            self.history.drain(..cut);
        }
        obj
    }

    /// Seed an object as stored; fills uid, creationTimestamp and generation when missing.
    pub fn insert(&mut self, mut obj: Value) {
        let av = obj.get("apiVersion").and_then(Value::as_str).unwrap_or_default().to_string();
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
        assert!(
            !av.is_empty() && !kind.is_empty(),
            "FakeApiServer::insert: the object needs apiVersion and kind: {obj}"
        );
        let name = meta_str(&obj, "name")
            .unwrap_or_else(|| panic!("FakeApiServer::insert: the object needs metadata.name: {obj}"))
            .to_string();
        let group = group_of(&av).to_string();
        let plural = plural_of(&group, &kind);
        let ns = meta_str(&obj, "namespace").unwrap_or_default().to_string();
        if self.info(&group, &av, &plural).is_none() {
            self.resources
                .insert((av.clone(), plural.clone()), ResourceInfo { kind, namespaced: !ns.is_empty(), status: false });
        }
        let uid = self.new_uid();
        let m = meta_mut(&mut obj);
        m.entry("uid").or_insert(uid.into());
        m.entry("creationTimestamp").or_insert(now_rfc3339().into());
        m.entry("generation").or_insert(1.into());
        self.commit(Key { av, plural, ns, name }, Some(obj));
    }

    pub fn objects_of(&self, av: &str, kind: &str) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|(k, v)| k.av == av && v.get("kind").and_then(Value::as_str) == Some(kind))
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub fn compact(&mut self) {
        self.horizon = self.rev;
        self.history.clear();
    }

    /// End every watch stream; with an error chunk when the transport "fails".
    pub fn end_watches(&mut self, with_error: bool) {
        for w in self.watches.drain(..) {
            if with_error {
                let _ = w.tx.send(Err(io::Error::new(io::ErrorKind::ConnectionReset, "fake API server went down")));
            }
        }
    }

    fn take_failure(&mut self, verb: &str, resource: &str) -> Option<(u16, Option<String>)> {
        let f = self.failures.iter_mut().find(|f| f.remaining > 0 && f.verb == verb && f.resource == resource)?;
        f.remaining -= 1;
        let out = (f.status, f.message.clone());
        self.failures.retain(|f| f.remaining > 0);
        Some(out)
    }

    /// Serve one request and record it.
    pub fn handle(&mut self, shared: &Arc<Shared>, req: Incoming<'_>) -> Reply {
        let query: HashMap<String, String> = form_urlencoded::parse(req.query.as_bytes()).into_owned().collect();
        let body: Option<Value> = if req.body.is_empty() {
            None
        } else {
            Some(
                serde_json::from_slice(req.body)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(req.body).into_owned())),
            )
        };
        let route = parse_path(req.path);
        // kube's *_metadata calls ask for PartialObjectMetadata(List) in Accept.
        let partial = req.accept.is_some_and(|a| a.contains("as=PartialObjectMetadata"));
        let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
        let verb = match (req.method, route.as_ref().and_then(|r| r.name.as_ref())) {
            ("GET", _) if watch => "watch",
            ("GET", Some(_)) => "get",
            ("GET", None) => "list",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", Some(_)) => "delete",
            ("DELETE", None) => "deletecollection",
            _ => "unknown",
        };
        let mut record = Request {
            verb: verb.to_string(),
            api_version: route.as_ref().map(|r| r.api_version.clone()).unwrap_or_default(),
            resource: route.as_ref().map_or_else(|| req.path.to_string(), |r| r.plural.clone()),
            subresource: route.as_ref().and_then(|r| r.subresource.clone()),
            namespace: route.as_ref().and_then(|r| r.namespace.clone()),
            name: route.as_ref().and_then(|r| r.name.clone()),
            content_type: req.content_type.map(String::from),
            body: body.clone(),
            status: 0,
            query: req.query.to_string(),
        };
        let reply = if self.down {
            Reply::Down
        } else {
            let resource = match &record.subresource {
                Some(s) => format!("{}/{s}", record.resource),
                None => record.resource.clone(),
            };
            match self.take_failure(verb, &resource) {
                Some((code, message)) => err(
                    code,
                    message.unwrap_or_else(|| format!("injected failure: {verb} {resource} answered {code} (FakeApiServer::fail_next)")),
                ),
                None => match route {
                    // dryRun=All: the write runs on a copy that is then thrown away.
                    // (A delete carries it in its DeleteOptions body.)
                    Some(route)
                        if !matches!(verb, "get" | "list" | "watch")
                            && (query.get("dryRun").is_some_and(|d| d == "All")
                                || body
                                    .as_ref()
                                    .and_then(|b| b.get("dryRun"))
                                    .and_then(Value::as_array)
                                    .is_some_and(|d| d.iter().any(|x| x == "All"))) =>
                    {
                        self.dry_copy().serve(shared, verb, &route, &query, req.content_type, body, partial)
                    }
                    Some(route) => match self.serve(shared, verb, &route, &query, req.content_type, body, partial) {
                        Reply::Json(code, v) if partial && code < 300 => Reply::Json(code, shape(&v, true)),
                        other => other,
                    },
                    None if req.path == "/version" => Reply::Json(
                        200,
                        json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0-allot-fake", "platform": "linux/amd64"}),
                    ),
                    None => err(
                        404,
                        format!(
                            "the fake API serves no {} (no discovery): use kube::Api<K> with typed resources",
                            req.path
                        ),
                    ),
                },
            }
        };
        record.status = match &reply {
            Reply::Json(code, _) => *code,
            Reply::Stream(_) => 200,
            Reply::Down => 0,
        };
        tracing::debug!(verb, path = req.path, query = req.query, status = record.status, "fake API request");
        self.requests.push(record);
        reply
    }

    #[allow(clippy::too_many_arguments)]
    fn serve(
        &mut self,
        shared: &Arc<Shared>,
        verb: &str,
        r: &Route,
        q: &HashMap<String, String>,
        ct: Option<&str>,
        body: Option<Value>,
        partial: bool,
    ) -> Reply {
        let info = match self.info(&r.group, &r.api_version, &r.plural) {
            Some(info) => info,
            None => {
                // Unknown resource: served generically, kind from the body or from stored objects.
                let kind = body
                    .as_ref()
                    .and_then(|b| b.get("kind"))
                    .and_then(Value::as_str)
                    .map(String::from)
                    .unwrap_or_default();
                let info = ResourceInfo { kind, namespaced: r.namespace.is_some(), status: false };
                if !info.kind.is_empty() && verb != "patch" {
                    self.resources.insert((r.api_version.clone(), r.plural.clone()), info.clone());
                }
                info
            }
        };
        if r.namespace.is_some() && !info.namespaced {
            return err(
                404,
                format!("{} is cluster-scoped: use a path without namespaces/ (kube::Api::all)", r.plural),
            );
        }
        if r.namespace.is_none() && info.namespaced && r.name.is_some() {
            return err(404, format!("{} is namespaced: use a namespaced path (kube::Api::namespaced)", r.plural));
        }
        if let Some(sub) = &r.subresource {
            let ok = (sub == "status" && info.status && verb != "delete")
                || (sub == "eviction" && r.plural == "pods" && r.group.is_empty() && verb == "create");
            if !ok {
                return err(404, format!("the fake API serves no {sub} subresource of {} for {verb}", r.plural));
            }
        }
        let key = |name: &str| Key {
            av: r.api_version.clone(),
            plural: r.plural.clone(),
            ns: r.namespace.clone().unwrap_or_default(),
            name: name.to_string(),
        };
        match verb {
            "get" => {
                let name = r.name.as_deref().unwrap_or_default();
                match self.objects.get(&key(name)) {
                    Some(o) => Reply::Json(200, o.clone()),
                    None => not_found(&r.plural, name),
                }
            }
            "list" => self.list(r, &info, q),
            "watch" => self.watch(shared, r, &info, q, partial),
            "create" if r.subresource.as_deref() == Some("eviction") => {
                let name = r.name.as_deref().unwrap_or_default();
                if !self.objects.contains_key(&key(name)) {
                    return not_found(&r.plural, name);
                }
                // The Eviction's deleteOptions (kube 4.2 sends them as `delete_options`).
                let opts =
                    body.as_ref().and_then(|b| b.get("deleteOptions").or_else(|| b.get("delete_options"))).cloned();
                if let Some(refused) = self.check_preconditions(&r.plural, &key(name), opts.as_ref()) {
                    return refused;
                }
                if let Some(denied) = self.admit("CREATE", &key(name), Some("eviction"), body.as_ref(), None) {
                    return denied;
                }
                // No PodDisruptionBudget logic: an eviction always deletes (unless fail_next).
                self.delete_object(key(name), "Background");
                Reply::Json(
                    201,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
                )
            }
            "create" if r.name.is_some() => {
                err(405, format!("POST to a named {} is not allowed: POST to the collection", r.plural))
            }
            "create" => self.create(r, &info, body),
            "update" => {
                let name = r.name.clone().unwrap_or_default();
                let Some(Value::Object(_)) = body else {
                    return err(400, "the body of an update must be a JSON object");
                };
                let body = body.unwrap_or_default();
                let Some(old) = self.objects.get(&key(&name)).cloned() else {
                    return not_found(&r.plural, &name);
                };
                if let Some(bad) = type_mismatch(r, &info, &body) {
                    return bad;
                }
                if meta_str(&body, "name").is_some_and(|n| n != name) {
                    return err(
                        400,
                        format!(
                            "the name of the object ({}) does not match the name on the URL ({name})",
                            meta_str(&body, "name").unwrap_or_default()
                        ),
                    );
                }
                if let Some(rv) = meta_str(&body, "resourceVersion")
                    && Some(rv) != meta_str(&old, "resourceVersion")
                {
                    return conflict(&r.plural, &name, STALE);
                }
                // Custom resources allow no unconditional update (built-in kinds do).
                if is_custom(&r.group) && meta_str(&body, "resourceVersion").is_none() {
                    return err(
                        422,
                        format!(
                            "{} \"{name}\" is invalid: metadata.resourceVersion: Invalid value: 0x0: must be specified for an update (get the object first, or patch)",
                            r.plural
                        ),
                    );
                }
                self.finish_write(key(&name), &info, old, body, r.subresource.is_some())
            }
            "patch" => self.patch(r, &info, key(r.name.as_deref().unwrap_or_default()), ct, body),
            "delete" => self.delete(r, key(r.name.as_deref().unwrap_or_default()), body),
            "deletecollection" => {
                let (labels, fields) = match selectors(q) {
                    Ok(s) => s,
                    Err(e) => return e,
                };
                let keys: Vec<Key> = self
                    .collection(r)
                    .filter(|(_, o)| labels.matches(o) && fields.matches(o))
                    .map(|(k, _)| k.clone())
                    .collect();
                // All admitted or nothing deleted.
                for k in &keys {
                    if let Some(denied) = self.admit("DELETE", k, None, None, self.objects.get(k)) {
                        return denied;
                    }
                }
                let items: Vec<Value> = keys.into_iter().map(|k| self.delete_object(k, "Background").1).collect();
                Reply::Json(
                    200,
                    json!({"apiVersion": r.api_version, "kind": format!("{}List", info.kind), "metadata": {"resourceVersion": self.rev.to_string()}, "items": items}),
                )
            }
            _ => err(405, format!("method not allowed on {}", r.plural)),
        }
    }

    fn list(&mut self, r: &Route, info: &ResourceInfo, q: &HashMap<String, String>) -> Reply {
        let (labels, fields) = match selectors(q) {
            Ok(s) => s,
            Err(e) => return e,
        };
        if q.get("resourceVersionMatch").map(String::as_str) == Some("Exact")
            && let Some(rv) = q.get("resourceVersion").and_then(|v| v.parse::<u64>().ok())
            && rv < self.horizon
        {
            return err(410, format!("too old resource version: {rv} ({})", self.horizon));
        }
        let limit = q.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0);
        // A continued list is served from the snapshot its first page was cut from, as etcd
        // serves it from the first page's revision.
        let (rev, items) = match q.get("continue").filter(|c| !c.is_empty()) {
            Some(token) => {
                let Some((rev, rest)) = token
                    .strip_prefix("fake-")
                    .and_then(|id| id.parse::<u64>().ok())
                    .and_then(|id| self.pages.remove(&id))
                else {
                    return err(
                        400,
                        format!(
                            "continue token {token:?} is unknown or used: pass the token of the previous page once"
                        ),
                    );
                };
                if rev < self.horizon {
                    return err(
                        410,
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    );
                }
                (rev, rest)
            }
            None => (
                self.rev,
                self.collection(r)
                    .filter(|(_, o)| labels.matches(o) && fields.matches(o))
                    .map(|(_, o)| o.clone())
                    .collect::<Vec<Value>>(),
            ),
        };
        let mut metadata = json!({"resourceVersion": rev.to_string()});
        let mut items = items;
        if let Some(limit) = limit.filter(|l| items.len() > *l) {
            let rest = items.split_off(limit);
            metadata["remainingItemCount"] = rest.len().into();
            self.next_page += 1;
            metadata["continue"] = format!("fake-{}", self.next_page).into();
            self.pages.insert(self.next_page, (rev, rest));
            // Pages a client never asked for: keep the newest 1024.
            if self.pages.len() > 1024 {
                let oldest = *self.pages.keys().min().expect("not empty");
                self.pages.remove(&oldest);
            }
        }
        let kind = if info.kind.is_empty() { "List".to_string() } else { format!("{}List", info.kind) };
        Reply::Json(200, json!({"apiVersion": r.api_version, "kind": kind, "metadata": metadata, "items": items}))
    }

    fn create(&mut self, r: &Route, info: &ResourceInfo, body: Option<Value>) -> Reply {
        let Some(mut obj) = body.filter(Value::is_object) else {
            return err(400, "the body of a create must be a JSON object (the new resource)");
        };
        if meta_str(&obj, "resourceVersion").is_some() {
            return err(400, "resourceVersion should not be set on objects to be created");
        }
        if let Some(bad) = type_mismatch(r, info, &obj) {
            return bad;
        }
        if info.namespaced {
            let Some(ns) = &r.namespace else {
                return err(
                    404,
                    format!("{} is namespaced: create it through a namespaced path (kube::Api::namespaced)", r.plural),
                );
            };
            if meta_str(&obj, "namespace").is_some_and(|n| n != ns) {
                return err(
                    400,
                    format!(
                        "the namespace of the provided object ({}) does not match the namespace sent on the request ({ns})",
                        meta_str(&obj, "namespace").unwrap_or_default()
                    ),
                );
            }
            meta_mut(&mut obj).insert("namespace".into(), ns.clone().into());
        } else {
            meta_mut(&mut obj).remove("namespace");
        }
        let name = match (meta_str(&obj, "name"), meta_str(&obj, "generateName")) {
            (Some(n), _) => n.to_string(),
            (None, Some(prefix)) => {
                let prefix = prefix.to_string();
                loop {
                    // The apiserver's alphabet for generated suffixes.
                    const ALPHA: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
                    self.uid_count += 1;
                    let mut n = self.uid_count.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ self.uid_seed;
                    let mut s = prefix.clone();
                    for _ in 0..5 {
                        s.push(ALPHA[(n % ALPHA.len() as u64) as usize] as char);
                        n /= ALPHA.len() as u64;
                    }
                    let k = Key {
                        av: r.api_version.clone(),
                        plural: r.plural.clone(),
                        ns: r.namespace.clone().unwrap_or_default(),
                        name: s.clone(),
                    };
                    if !self.objects.contains_key(&k) {
                        break s;
                    }
                }
            }
            (None, None) => {
                return err(
                    422,
                    format!("{} is invalid: metadata.name: Required value: name or generateName is required", r.plural),
                );
            }
        };
        if let Some(why) = bad_name(&name) {
            return err(422, format!("{} \"{name}\" is invalid: metadata.name: Invalid value: {why}", r.plural));
        }
        let key = Key {
            av: r.api_version.clone(),
            plural: r.plural.clone(),
            ns: r.namespace.clone().filter(|_| info.namespaced).unwrap_or_default(),
            name: name.clone(),
        };
        if self.objects.contains_key(&key) {
            let mut s = status_body(409, "AlreadyExists", format!("{} \"{name}\" already exists", r.plural));
            s["details"] = json!({"name": name, "kind": r.plural});
            return Reply::Json(409, s);
        }
        let o = obj.as_object_mut().expect("checked above");
        o.entry("apiVersion").or_insert(r.api_version.clone().into());
        if !info.kind.is_empty() {
            o.entry("kind").or_insert(info.kind.clone().into());
        }
        // Custom resources with a status subresource drop status on create, as the apiserver does.
        if info.status && is_custom(&r.group) {
            o.remove("status");
        }
        let uid = self.new_uid();
        let m = meta_mut(&mut obj);
        m.insert("name".into(), name.into());
        m.insert("uid".into(), uid.into());
        m.insert("creationTimestamp".into(), now_rfc3339().into());
        m.insert("generation".into(), 1.into());
        m.remove("deletionTimestamp");
        m.remove("managedFields");
        if let Some(denied) = self.admit("CREATE", &key, None, Some(&obj), None) {
            return denied;
        }
        let stored = self.commit(key.clone(), Some(obj));
        self.collect_if_orphaned(key);
        Reply::Json(201, stored)
    }

    /// The end of every update and patch: keep what clients cannot change, honour the status
    /// subresource, skip no-op writes (no new resourceVersion, no event), bump generation.
    fn finish_write(&mut self, key: Key, info: &ResourceInfo, old: Value, mut new: Value, status_only: bool) -> Reply {
        if status_only {
            let mut merged = old.clone();
            match new.get("status") {
                Some(s) => merged["status"] = s.clone(),
                None => {
                    merged.as_object_mut().map(|o| o.remove("status"));
                }
            }
            new = merged;
        } else if info.status {
            match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    new.as_object_mut().map(|o| o.remove("status"));
                }
            }
        }
        let old_meta = meta(&old).cloned().unwrap_or_default();
        let m = meta_mut(&mut new);
        for field in ["name", "namespace", "uid", "creationTimestamp", "deletionTimestamp", "generation"] {
            match old_meta.get(field) {
                Some(v) => m.insert(field.into(), v.clone()),
                None => m.remove(field),
            };
        }
        for field in ["apiVersion", "kind"] {
            if let Some(v) = old.get(field) {
                new[field] = v.clone();
            }
        }
        // Webhooks see every update, also one that changes nothing.
        if let Some(denied) = self.admit("UPDATE", &key, status_only.then_some("status"), Some(&new), Some(&old)) {
            return denied;
        }
        if comparable(&new) == comparable(&old) {
            return Reply::Json(200, old);
        }
        if generation_part(&new, info.status) != generation_part(&old, info.status) {
            let g = old_meta.get("generation").and_then(Value::as_i64).unwrap_or(0) + 1;
            meta_mut(&mut new).insert("generation".into(), g.into());
        }
        // The last finalizer removed from an object being deleted: now it goes.
        if meta_str(&new, "deletionTimestamp").is_some() && !has_finalizers(&new) {
            // One DELETED event, as the apiserver deletes in the same write.
            self.objects.insert(key.clone(), new);
            let uid = meta_str(&old, "uid").unwrap_or_default().to_string();
            let gone = self.commit(key, None);
            self.collect_garbage(vec![uid]);
            return Reply::Json(200, gone);
        }
        let stored = self.commit(key.clone(), Some(new));
        self.collect_if_orphaned(key);
        Reply::Json(200, stored)
    }

    fn patch(&mut self, r: &Route, info: &ResourceInfo, key: Key, ct: Option<&str>, body: Option<Value>) -> Reply {
        let ct = ct.unwrap_or_default().split(';').next().unwrap_or_default().trim().to_string();
        let Some(body) = body else {
            return err(400, "a patch needs a body");
        };
        let name = key.name.clone();
        let apply = ct == "application/apply-patch+yaml";
        if apply && ["apiVersion", "kind"].iter().any(|f| body.get(f).and_then(Value::as_str).is_none_or(str::is_empty))
        {
            return err(
                400,
                "an apply patch needs apiVersion and kind: send the whole object's identity, not only the fields",
            );
        }
        let Some(old) = self.objects.get(&key).cloned() else {
            if apply && r.subresource.is_none() {
                // Server-side apply creates what is absent.
                let mut obj = body;
                if !obj.is_object() {
                    return err(
                        400,
                        "an apply patch must be a JSON object (the fake API reads apply patches as JSON, which kube sends)",
                    );
                }
                meta_mut(&mut obj).insert("name".into(), name.into());
                return self.create(r, info, Some(obj));
            }
            return not_found(&r.plural, &name);
        };
        if ct == "application/strategic-merge-patch+json" && is_custom(&r.group) {
            return err(
                415,
                format!(
                    "strategic merge patch is not supported for custom resources ({}): use a merge, JSON or apply patch",
                    r.plural
                ),
            );
        }
        let mut doc = old.clone();
        match ct.as_str() {
            "application/merge-patch+json"
            | "application/strategic-merge-patch+json"
            | "application/apply-patch+yaml" => {
                if !body.is_object() {
                    return err(400, format!("a {ct} patch must be a JSON object"));
                }
                if let Some(rv) = meta_str(&body, "resourceVersion")
                    && Some(rv) != meta_str(&old, "resourceVersion")
                {
                    return conflict(&r.plural, &name, STALE);
                }
                json_patch::merge(&mut doc, &body);
            }
            "application/json-patch+json" => {
                let ops: json_patch::Patch = match serde_json::from_value(body) {
                    Ok(p) => p,
                    Err(e) => return err(400, format!("the JSON patch is not a list of RFC 6902 operations: {e}")),
                };
                if let Err(e) = json_patch::patch(&mut doc, &ops) {
                    return err(422, format!("the JSON patch does not apply to {} \"{name}\": {e}", r.plural));
                }
            }
            other => {
                return err(
                    415,
                    format!(
                        "the patch content type {other:?} is not one of application/merge-patch+json, application/json-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml"
                    ),
                );
            }
        }
        if !doc.is_object() {
            return err(422, "the patched object is not a JSON object");
        }
        self.finish_write(key, info, old, doc, r.subresource.is_some())
    }

    fn delete(&mut self, r: &Route, key: Key, body: Option<Value>) -> Reply {
        if !self.objects.contains_key(&key) {
            return not_found(&r.plural, &key.name);
        }
        if let Some(refused) = self.check_preconditions(&r.plural, &key, body.as_ref()) {
            return refused;
        }
        let opts = body.unwrap_or_default();
        let policy = opts.get("propagationPolicy").and_then(Value::as_str).unwrap_or("Background");
        if !matches!(policy, "Background" | "Foreground" | "Orphan") {
            return err(400, format!("propagationPolicy {policy:?} is not one of Background, Foreground, Orphan"));
        }
        if let Some(denied) = self.admit("DELETE", &key, None, None, self.objects.get(&key)) {
            return denied;
        }
        let (code, obj) = self.delete_object(key, policy);
        Reply::Json(code, obj)
    }

    /// Run the admission checks on a write; the first denial answers 400 as a webhook's does.
    fn admit(
        &self,
        operation: &str,
        key: &Key,
        sub: Option<&str>,
        object: Option<&Value>,
        old: Option<&Value>,
    ) -> Option<Reply> {
        let req = crate::Admission {
            operation,
            api_version: &key.av,
            resource: &key.plural,
            subresource: sub,
            namespace: Some(key.ns.as_str()).filter(|ns| !ns.is_empty()),
            name: &key.name,
            object,
            old_object: old,
            store: &self.objects,
        };
        for (name, check) in &self.admission {
            if let Err(why) = check(&req) {
                return Some(err(400, format!("admission webhook \"{name}\" denied the request: {why}")));
            }
        }
        None
    }

    /// DeleteOptions.preconditions (uid, resourceVersion): 409 Conflict on a mismatch.
    fn check_preconditions(&self, plural: &str, key: &Key, opts: Option<&Value>) -> Option<Reply> {
        let obj = self.objects.get(key)?;
        for (field, label) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
            if let Some(want) =
                opts.and_then(|o| o.get("preconditions")).and_then(|p| p.get(field)).and_then(Value::as_str)
            {
                let have = meta_str(obj, field).unwrap_or_default();
                if want != have {
                    return Some(conflict(
                        plural,
                        &key.name,
                        &format!(
                            "Precondition failed: {label} in precondition: {want}, {label} in object meta: {have}"
                        ),
                    ));
                }
            }
        }
        None
    }

    /// Delete one object: 200 and its last state, or 202 when finalizers keep it (then it only
    /// gets a deletionTimestamp). Dependents are collected (Background, Foreground) or lose their
    /// owner reference (Orphan).
    fn delete_object(&mut self, key: Key, policy: &str) -> (u16, Value) {
        let obj = self.objects.get(&key).cloned().unwrap_or_default();
        let uid = meta_str(&obj, "uid").unwrap_or_default().to_string();
        if policy == "Orphan" {
            self.orphan(&uid);
        }
        if has_finalizers(&obj) {
            if meta_str(&obj, "deletionTimestamp").is_some() {
                return (202, obj);
            }
            let mut marked = obj;
            let m = meta_mut(&mut marked);
            m.insert("deletionTimestamp".into(), now_rfc3339().into());
            m.insert("deletionGracePeriodSeconds".into(), 0.into());
            return (202, self.commit(key, Some(marked)));
        }
        if policy == "Foreground" {
            self.collect_garbage(vec![uid.clone()]);
        }
        if key.av == "v1" && key.plural == "namespaces" {
            self.empty_namespace(&key.name);
        }
        let gone = self.commit(key, None);
        if policy == "Background" {
            self.collect_garbage(vec![uid]);
        }
        (200, gone)
    }

    /// What the namespace controller does before a namespace goes: delete everything in it (at
    /// once here; a cluster shows the namespace Terminating meanwhile). Objects with finalizers
    /// only get a deletionTimestamp.
    fn empty_namespace(&mut self, ns: &str) {
        let keys: Vec<Key> = self.objects.keys().filter(|k| k.ns == ns).cloned().collect();
        for k in keys {
            if self.objects.get(&k).is_some_and(|o| meta_str(o, "deletionTimestamp").is_none()) {
                self.delete_object(k, "Background");
            }
        }
    }

    /// An object written with owner references of which none is live is collected at once, as
    /// the garbage collector does with a dependent whose owners are gone (e.g. a block granted to
    /// a node being deleted). The write itself still succeeded.
    fn collect_if_orphaned(&mut self, key: Key) {
        let Some(obj) = self.objects.get(&key) else { return };
        let owners = owner_uids(obj);
        if owners.is_empty() || meta_str(obj, "deletionTimestamp").is_some() {
            return;
        }
        let live = owners.iter().any(|u| self.uids.contains_key(u));
        if !live {
            self.delete_object(key, "Background");
        }
    }

    fn orphan(&mut self, uid: &str) {
        let deps: Vec<Key> = self
            .objects
            .iter()
            .filter(|(_, o)| owner_uids(o).iter().any(|u| u == uid))
            .map(|(k, _)| k.clone())
            .collect();
        for k in deps {
            let mut o = self.objects[&k].clone();
            if let Some(refs) = meta_mut(&mut o).get_mut("ownerReferences").and_then(Value::as_array_mut) {
                refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(uid));
            }
            self.commit(k, Some(o));
        }
    }

    /// The garbage collector, run at once: every object owned by a dying uid and by no live
    /// owner is deleted, recursively (a real cluster does this a moment later).
    fn collect_garbage(&mut self, mut work: Vec<String>) {
        let mut dying: HashSet<String> = work.iter().cloned().collect();
        while let Some(uid) = work.pop() {
            let live = |u: &str| self.uids.contains_key(u) && !dying.contains(u);
            let mut deps = Vec::new();
            let mut kept = Vec::new();
            for (k, o) in &self.objects {
                let owners = owner_uids(o);
                if meta_str(o, "deletionTimestamp").is_some() || !owners.contains(&uid) {
                    continue;
                }
                if owners.iter().any(|u| live(u)) { kept.push(k.clone()) } else { deps.push(k.clone()) }
            }
            // A dependent with another live owner stays and loses its dangling references.
            for k in kept {
                let mut o = self.objects[&k].clone();
                if let Some(refs) = meta_mut(&mut o).get_mut("ownerReferences").and_then(Value::as_array_mut) {
                    refs.retain(|r| {
                        r.get("uid")
                            .and_then(Value::as_str)
                            .is_some_and(|u| self.uids.contains_key(u) && !dying.contains(u))
                    });
                }
                self.commit(k, Some(o));
            }
            for k in deps {
                let obj = self.objects[&k].clone();
                let dep_uid = meta_str(&obj, "uid").unwrap_or_default().to_string();
                if has_finalizers(&obj) {
                    let mut marked = obj;
                    meta_mut(&mut marked).insert("deletionTimestamp".into(), now_rfc3339().into());
                    self.commit(k, Some(marked));
                } else {
                    self.commit(k, None);
                    if dying.insert(dep_uid.clone()) {
                        work.push(dep_uid);
                    }
                }
            }
        }
    }

    fn watch(
        &mut self,
        shared: &Arc<Shared>,
        r: &Route,
        info: &ResourceInfo,
        q: &HashMap<String, String>,
        partial: bool,
    ) -> Reply {
        let (labels, fields) = match selectors(q) {
            Ok(s) => s,
            Err(e) => return e,
        };
        let filter = WatchFilter {
            av: r.api_version.clone(),
            plural: r.plural.clone(),
            ns: r.namespace.clone(),
            name: r.name.clone().or_else(|| fields.name().map(String::from)),
            labels,
            fields,
        };
        let kind = if info.kind.is_empty() {
            self.objects
                .iter()
                .find(|(k, _)| filter.covers(k))
                .and_then(|(_, o)| o.get("kind"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        } else {
            info.kind.clone()
        };
        let (tx, rx) = unbounded_channel();
        let rv = q.get("resourceVersion").map(String::as_str).unwrap_or("");
        let initial = q.get("sendInitialEvents").map(String::as_str) == Some("true");
        if rv.is_empty() || rv == "0" || initial {
            for (k, o) in &self.objects {
                if filter.covers(k) && filter.selects(o) {
                    let _ = tx.send(Ok(event_line("ADDED", &shape(o, partial))));
                }
            }
            if initial {
                let mut b = shape(&bookmark(&r.api_version, &kind, self.rev), partial);
                b["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
                let _ = tx.send(Ok(event_line("BOOKMARK", &b)));
            }
        } else {
            let Ok(n) = rv.parse::<u64>() else {
                return err(400, format!("resourceVersion {rv:?} is not a number: use one the server returned"));
            };
            if n < self.horizon {
                // What a real apiserver sends: an ERROR event with 410 Expired, then the end.
                let s = status_body(410, "Expired", format!("too old resource version: {n} ({})", self.horizon));
                let _ = tx.send(Ok(event_line("ERROR", &s)));
                return Reply::Stream(rx);
            }
            for c in self.history.iter().filter(|c| c.rev > n) {
                if let Some((t, o)) = filter.event(c) {
                    let _ = tx.send(Ok(event_line(t, &shape(&o, partial))));
                }
            }
        }
        let timeout = q.get("timeoutSeconds").and_then(|t| t.parse::<u64>().ok()).filter(|t| *t > 0);
        self.next_watch += 1;
        let id = self.next_watch;
        self.watches.push(Watch {
            id,
            filter,
            tx,
            kind,
            bookmarks: matches!(q.get("allowWatchBookmarks").map(String::as_str), Some("true" | "1")),
            deadline: timeout.map(|t| Instant::now() + Duration::from_secs(t)),
            partial,
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(tick(Arc::downgrade(shared), id, self.bookmark_interval));
        }
        Reply::Stream(rx)
    }
}

/// A watch's clock: bookmarks every `every` when asked for, the end at timeoutSeconds, and
/// cleanup once the client dropped the stream.
async fn tick(shared: Weak<Shared>, id: u64, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(shared) = shared.upgrade() else { return };
        let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        let rev = st.rev;
        let Some(i) = st.watches.iter().position(|w| w.id == id) else { return };
        let w = &st.watches[i];
        if w.tx.is_closed() || w.deadline.is_some_and(|d| Instant::now() >= d) {
            st.watches.remove(i);
            return;
        }
        if w.bookmarks {
            let b = shape(&bookmark(&w.filter.av, &w.kind, rev), w.partial);
            let _ = w.tx.send(Ok(event_line("BOOKMARK", &b)));
        }
    }
}

/// The object as sent: whole, or as meta.k8s.io/v1 PartialObjectMetadata(List) when asked.
fn shape(obj: &Value, partial: bool) -> Value {
    if !partial || obj.get("kind").and_then(Value::as_str) == Some("Status") {
        return obj.clone();
    }
    let one = |o: &Value| json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": o.get("metadata").cloned().unwrap_or(json!({}))});
    match obj.get("items").and_then(Value::as_array) {
        Some(items) => {
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList", "metadata": obj.get("metadata").cloned().unwrap_or(json!({})), "items": items.iter().map(one).collect::<Vec<_>>()})
        }
        None => one(obj),
    }
}

fn bookmark(av: &str, kind: &str, rev: u64) -> Value {
    json!({"kind": kind, "apiVersion": av, "metadata": {"resourceVersion": rev.to_string()}})
}

fn event_line(t: &str, obj: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": t, "object": obj})).expect("JSON values serialize");
    v.push(b'\n');
    Bytes::from(v)
}

#[allow(clippy::result_large_err)]
fn selectors(q: &HashMap<String, String>) -> Result<(LabelSelector, FieldSelector), Reply> {
    let labels = LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str)).map_err(|e| err(400, e))?;
    let fields = FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str)).map_err(|e| err(400, e))?;
    Ok((labels, fields))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "d"}})
    }

    #[test]
    fn history_is_compacted_when_over_its_limit() {
        let mut st = State::new();
        st.history_limit = 10;
        for i in 0..11 {
            st.insert(cm(&format!("c{i}")));
        }
        // 11 changes > 10: the oldest 5 are gone, the horizon is the last of them.
        assert_eq!(st.history.len(), 6);
        assert_eq!(st.horizon, st.history[0].rev - 1);
        assert_eq!(st.rev, 12);
        assert!(st.history.windows(2).all(|w| w[0].rev + 1 == w[1].rev));
    }

    #[test]
    fn the_uid_index_follows_every_write() {
        let mut st = State::new();
        let index_ok = |st: &State| {
            let from_objects: HashMap<String, Key> =
                st.objects.iter().map(|(k, o)| (meta_str(o, "uid").unwrap().to_string(), k.clone())).collect();
            from_objects == st.uids
        };
        st.insert(cm("a"));
        st.insert(cm("b"));
        assert!(index_ok(&st) && st.uids.len() == 2);
        // A seed replacing "a" with another uid: the old uid is gone from the index.
        let mut again = cm("a");
        again["metadata"]["uid"] = "u-new".into();
        st.insert(again);
        assert!(index_ok(&st) && st.uids.contains_key("u-new") && st.uids.len() == 2);
        let key = st.uids["u-new"].clone();
        st.commit(key, None);
        assert!(index_ok(&st) && st.uids.len() == 1);
    }

    #[test]
    fn watch_filter_events_follow_selector_transitions() {
        let key = Key { av: "v1".into(), plural: "configmaps".into(), ns: "d".into(), name: "c".into() };
        let f = WatchFilter {
            av: "v1".into(),
            plural: "configmaps".into(),
            ns: None,
            name: None,
            labels: LabelSelector::parse("a=1").unwrap(),
            fields: FieldSelector::default(),
        };
        let with = |l: &str| json!({"metadata": {"labels": {"a": l}}});
        let ch = |old: Option<Value>, new: Value, deleted| Change { rev: 1, key: key.clone(), old, new, deleted };
        assert_eq!(f.event(&ch(None, with("1"), false)).map(|e| e.0), Some("ADDED"));
        assert_eq!(f.event(&ch(None, with("2"), false)).map(|e| e.0), None);
        assert_eq!(f.event(&ch(Some(with("1")), with("1"), false)).map(|e| e.0), Some("MODIFIED"));
        assert_eq!(f.event(&ch(Some(with("1")), with("2"), false)).map(|e| e.0), Some("DELETED"));
        assert_eq!(f.event(&ch(Some(with("2")), with("1"), false)).map(|e| e.0), Some("ADDED"));
        assert_eq!(f.event(&ch(Some(with("1")), with("1"), true)).map(|e| e.0), Some("DELETED"));
        assert_eq!(f.event(&ch(Some(with("2")), with("2"), true)).map(|e| e.0), None);
        let other_ns = WatchFilter { ns: Some("e".into()), ..f };
        assert_eq!(other_ns.event(&ch(None, with("1"), false)), None);
    }
}
