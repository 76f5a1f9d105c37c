//! An in-process, stateful fake of the Kubernetes API server behind a real [`kube::Client`].
//!
//! No Kubernetes API server can run where allot's tests run, so tests of Kubernetes code talk to
//! this fake through kube-rs itself (`kube::Api<K>`, `watcher`, `reflector`, `Controller`): the
//! client's whole request and response path is real, the server is a tower service. Tests using
//! it say "fake API" in their names. What it fakes and what it does not: see README.md.
//!
//! ```no_run
//! # async fn f() {
//! use k8s_openapi::api::core::v1::Pod;
//! let api = allot_kube_fake::FakeApiServer::new();
//! let pods: kube::Api<Pod> = kube::Api::namespaced(api.client(), "default");
//! # }
//! ```

mod route;
mod select;
mod server;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};

pub use route::ResourceInfo;
use server::{Incoming, Reply, Shared, State};

/// One request the fake served, as recorded by [`FakeApiServer::requests`].
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// get, list, watch, create, update, patch, delete, deletecollection (an eviction is a
    /// create of `pods` with subresource `eviction`).
    pub verb: String,
    /// `v1`, `allot.dev/v1`, ... ("" for a path outside /api and /apis).
    pub api_version: String,
    /// The plural (`pods`), or the whole path for a path outside /api and /apis.
    pub resource: String,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub content_type: Option<String>,
    /// The body as JSON (a JSON string when it was not JSON).
    pub body: Option<serde_json::Value>,
    /// The HTTP status answered; 0 when the server was down (transport failure).
    pub status: u16,
    /// The raw query string.
    pub query: String,
}

/// One write as a validating admission check sees it (see [`FakeApiServer::add_admission`]).
pub struct Admission<'a> {
    /// CREATE, UPDATE or DELETE (an eviction is a CREATE of pods/eviction).
    pub operation: &'a str,
    pub api_version: &'a str,
    /// The plural.
    pub resource: &'a str,
    pub subresource: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub name: &'a str,
    /// The object as it would be stored (the Eviction for an eviction); None for DELETE.
    pub object: Option<&'a serde_json::Value>,
    /// The stored object, for UPDATE and DELETE.
    pub old_object: Option<&'a serde_json::Value>,
    store: &'a std::collections::BTreeMap<server::Key, serde_json::Value>,
}

impl Admission<'_> {
    /// The stored objects of this apiVersion and kind, as the check runs (a webhook would read
    /// them from the API or a cache; here it is the same state, read under the write's lock).
    pub fn objects(&self, api_version: &str, kind: &str) -> Vec<serde_json::Value> {
        self.store
            .iter()
            .filter(|(k, v)| k.av == api_version && v.get("kind").and_then(serde_json::Value::as_str) == Some(kind))
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// The fake API server. Cheap to clone: clones share one state.
#[derive(Clone)]
pub struct FakeApiServer {
    shared: Arc<Shared>,
}

impl Default for FakeApiServer {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApiServer").field("revision", &self.revision()).finish()
    }
}

impl FakeApiServer {
    pub fn new() -> Self {
        Self { shared: Arc::new(Shared { state: Mutex::new(State::new()) }) }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not take every later call down with it.
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A real `kube::Client` whose transport is this fake (default namespace "default"). Needs a
    /// tokio runtime, as every kube client does.
    pub fn client(&self) -> kube::Client {
        kube::Client::new(FakeService { shared: self.shared.clone() }, "default")
    }

    /// Seed an object as if it were stored (no checks; replaces one of the same name). Needs
    /// `apiVersion`, `kind` and `metadata.name`; fills uid, creationTimestamp and generation when
    /// missing and always sets a new resourceVersion. Open watches see it.
    ///
    /// # Panics
    /// When apiVersion, kind or metadata.name is missing: a test bug.
    pub fn insert(&self, obj: serde_json::Value) {
        self.state().insert(obj);
    }

    /// Every stored object of this apiVersion and kind, ordered by namespace and name.
    pub fn objects(&self, api_version: &str, kind: &str) -> Vec<serde_json::Value> {
        self.state().objects_of(api_version, kind)
    }

    /// Every request served, in order (also the failed ones).
    pub fn requests(&self) -> Vec<Request> {
        self.state().requests.clone()
    }

    /// What the requests so far needed from RBAC: (apiGroup, resource or
    /// "resource/subresource", verb), the three columns of a Role rule, for every request that
    /// reached the server (a 404 or 409 needed the permission too; not those while down).
    /// Compare it with the rules in deploy/ to show they grant no more than the code calls.
    pub fn rbac_used(&self) -> std::collections::BTreeSet<(String, String, String)> {
        self.state()
            .requests
            .iter()
            .filter(|r| r.status != 0 && !r.api_version.is_empty())
            .map(|r| {
                let group = r.api_version.rsplit_once('/').map_or("", |(g, _)| g).to_string();
                let resource = match &r.subresource {
                    Some(s) => format!("{}/{s}", r.resource),
                    None => r.resource.clone(),
                };
                (group, resource, r.verb.clone())
            })
            .collect()
    }

    pub fn clear_requests(&self) {
        self.state().requests.clear();
    }

    /// Answer the next `count` requests of `verb` on `resource` with `status` (a Kubernetes
    /// Status body with the matching reason) instead of serving them. `verb`: get list watch
    /// create update patch delete deletecollection; `resource`: the plural, or
    /// "plural/subresource" (`"pods/eviction"`, `"allotnodes/status"`).
    pub fn fail_next(&self, verb: &str, resource: &str, status: u16, count: usize) {
        self.push_failure(verb, resource, status, count, None);
    }

    /// [`Self::fail_next`] with the Status message the real apiserver sends (e.g. the eviction
    /// of a pod that two PodDisruptionBudgets select is a 500 that says so).
    pub fn fail_next_with(&self, verb: &str, resource: &str, status: u16, count: usize, message: &str) {
        self.push_failure(verb, resource, status, count, Some(message.into()));
    }

    fn push_failure(&self, verb: &str, resource: &str, status: u16, count: usize, message: Option<String>) {
        if count > 0 {
            self.state().failures.push(server::Failure {
                verb: verb.into(),
                resource: resource.into(),
                status,
                remaining: count,
                message,
            });
        }
    }

    /// Forget the history: a watch (or an Exact list) from a resourceVersion older than now gets
    /// 410 Gone (reason Expired), as after an etcd compaction.
    pub fn compact(&self) {
        self.state().compact();
    }

    /// End every open watch stream cleanly, as an apiserver restart does; clients re-watch.
    pub fn break_watches(&self) {
        self.state().end_watches(false);
    }

    /// While down, every request fails at the transport (kube sees `kube::Error::Service`),
    /// and open watches end with a transport error.
    pub fn set_down(&self, down: bool) {
        let mut st = self.state();
        st.down = down;
        if down {
            st.end_watches(true);
        }
    }

    /// Add a validating admission check, standing in for a validating webhook: it sees every
    /// create, update (also of /status), delete and eviction served through the API (not
    /// `insert`, not the garbage collector's deletions) before anything is stored; `Err(msg)`
    /// answers 400 "admission webhook \"name\" denied the request: msg" and changes nothing.
    /// The check runs under the fake's lock, atomically with the write, which a real webhook
    /// does not: races between a webhook's read and the write need another test. It must not
    /// call back into this `FakeApiServer` (that would deadlock); read through
    /// [`Admission::objects`].
    pub fn add_admission(
        &self,
        name: &str,
        check: impl Fn(&Admission<'_>) -> Result<(), String> + Send + Sync + 'static,
    ) {
        self.state().admission.push((name.to_string(), Arc::new(check)));
    }

    /// The global resourceVersion counter: the revision of the last write.
    pub fn revision(&self) -> u64 {
        self.state().rev
    }

    /// How often watches that asked for bookmarks get one (default 1 s); for watches opened
    /// after the call.
    pub fn set_bookmark_interval(&self, every: Duration) {
        self.state().bookmark_interval = every;
    }

    /// Declare a resource the built-in table does not know (or override it): its kind, scope and
    /// whether it has a status subresource. Unknown resources are otherwise served generically,
    /// namespaced when addressed with a namespace, without a status subresource.
    pub fn register(&self, api_version: &str, plural: &str, info: ResourceInfo) {
        self.state().resources.insert((api_version.into(), plural.into()), info);
    }
}

type ResBody = UnsyncBoxBody<Bytes, io::Error>;

/// The tower service behind [`FakeApiServer::client`].
#[derive(Clone)]
struct FakeService {
    shared: Arc<Shared>,
}

impl tower_service::Service<http::Request<kube::client::Body>> for FakeService {
    type Response = http::Response<ResBody>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, io::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<kube::client::Body>) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.map_err(io::Error::other)?.to_bytes();
            let content_type = parts.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
            let accept = parts.headers.get(http::header::ACCEPT).and_then(|v| v.to_str().ok());
            let reply = {
                let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                st.handle(
                    &shared,
                    Incoming {
                        method: parts.method.as_str(),
                        path: parts.uri.path(),
                        query: parts.uri.query().unwrap_or(""),
                        content_type,
                        accept,
                        body: &body,
                    },
                )
            };
            let (code, body) = match reply {
                Reply::Down => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        "fake API server is down (FakeApiServer::set_down)",
                    ));
                }
                Reply::Json(code, v) => {
                    let bytes = Bytes::from(serde_json::to_vec(&v).expect("JSON values serialize"));
                    (code, Full::new(bytes).map_err(|e: Infallible| match e {}).boxed_unsync())
                }
                Reply::Stream(mut rx) => {
                    let s = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
                        .map(|c| c.map(http_body::Frame::data));
                    (200, StreamBody::new(s).boxed_unsync())
                }
            };
            Ok(http::Response::builder()
                .status(code)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body)
                .expect("a valid response"))
        })
    }
}
