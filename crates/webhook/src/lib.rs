//! allot's validating admission webhook: HTTPS with rustls, AdmissionReview `admission.k8s.io/v1`
//! in and out, one validator per path in a small route table.
//!
//! The transport is turned into a typed `AdmissionRequest` before any validator sees it; a
//! request that is not a well-formed review gets HTTP 400 with a message, never a guess.
//! Validators are plain functions: another one is added with [`Routes::validate`].

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use tokio::net::TcpListener;

pub mod ippool;
pub mod kkp;
pub mod tls;

pub use tls::server_config;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {message}")]
    Certificate { path: PathBuf, message: String },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
}

/// A validator: one admission request in, its answer out. Pure and quick: the apiserver waits.
pub type Validator = Arc<dyn Fn(&AdmissionRequest<DynamicObject>) -> AdmissionResponse + Send + Sync>;

/// What `/readyz` asks: `Err(reason)` while a validator cannot answer yet.
pub type ReadyCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Paths to validators. Unknown paths answer 404.
#[derive(Clone, Default)]
pub struct Routes {
    routes: Vec<(String, Validator)>,
    ready: Vec<ReadyCheck>,
}

impl Routes {
    pub fn new() -> Routes {
        Routes::default()
    }

    /// Every validator allot ships.
    pub fn standard() -> Routes {
        Routes::new().validate(kkp::PATH, kkp::validate_cluster)
    }

    /// Serve `f` at `POST path`.
    pub fn validate(mut self, path: &str, f: impl Fn(&AdmissionRequest<DynamicObject>) -> AdmissionResponse + Send + Sync + 'static) -> Routes {
        self.routes.retain(|(p, _)| p != path);
        self.routes.push((path.to_string(), Arc::new(f)));
        self
    }

    /// `/readyz` answers 503 with the reason while `check` fails (e.g. before the cluster was
    /// read), so a Service sends reviews only to replicas that can answer them.
    pub fn ready_when(mut self, check: impl Fn() -> Result<(), String> + Send + Sync + 'static) -> Routes {
        self.ready.push(Arc::new(check));
        self
    }

    /// Why `/readyz` answers 503 now, if it does.
    pub fn not_ready(&self) -> Option<String> {
        self.ready.iter().find_map(|c| c().err())
    }

    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|(p, _)| p.as_str())
    }

    fn get(&self, path: &str) -> Option<&Validator> {
        self.routes.iter().find(|(p, _)| p == path).map(|(_, v)| v)
    }
}

/// Limits against slow or oversized clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The largest body read (the apiserver's own request limit is 3 MiB).
    pub max_body: usize,
    /// TLS handshake, then the request head, then the body: each must arrive within this.
    pub handshake_timeout: Duration,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_body: 3 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
        }
    }
}

type Body = Full<Bytes>;

fn text(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut msg = msg.into();
    msg.push('\n');
    let mut r = Response::new(Full::new(Bytes::from(msg)));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, "text/plain; charset=utf-8".parse().expect("static header"));
    r
}

/// Reads an AdmissionReview body and answers it with `validator`, or says why it cannot.
pub fn review(body: &[u8], validator: &Validator) -> Result<AdmissionReview<DynamicObject>, (StatusCode, String)> {
    let bad = |m: String| (StatusCode::BAD_REQUEST, m);
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| bad(format!("the body is not JSON: {e}")))?;
    let field = |k: &str| value.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_string();
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    if api_version != "admission.k8s.io/v1" || kind != "AdmissionReview" {
        return Err(bad(format!(
            "expected an AdmissionReview of apiVersion admission.k8s.io/v1, got apiVersion {api_version:?} kind {kind:?}: \
             set admissionReviewVersions: [v1] in the webhook configuration"
        )));
    }
    if value.get("request").is_none_or(|r| r.is_null()) {
        return Err(bad("the AdmissionReview has no request".into()));
    }
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_value(value).map_err(|e| bad(format!("the AdmissionReview's request is malformed: {e}")))?;
    let request: AdmissionRequest<DynamicObject> = review.try_into().map_err(|e| bad(format!("{e}")))?;
    Ok(validator(&request).into_review())
}

async fn handle(req: Request<Incoming>, routes: Arc<Routes>, limits: Limits) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    if path == "/healthz" || path == "/readyz" {
        return Ok(match *req.method() {
            Method::GET | Method::HEAD => match routes.not_ready().filter(|_| path == "/readyz") {
                Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, why),
                None => text(StatusCode::OK, "ok"),
            },
            _ => with_allow(text(StatusCode::METHOD_NOT_ALLOWED, format!("{path} answers GET only")), "GET, HEAD"),
        });
    }
    let Some(validator) = routes.get(&path) else {
        let known: Vec<&str> = routes.paths().collect();
        return Ok(text(StatusCode::NOT_FOUND, format!("no webhook at {path}: this server validates at {}", known.join(", "))));
    };
    if req.method() != Method::POST {
        return Ok(with_allow(text(StatusCode::METHOD_NOT_ALLOWED, format!("{path} answers POST with an AdmissionReview only, not {}", req.method())), "POST"));
    }
    let too_large = || text(StatusCode::PAYLOAD_TOO_LARGE, format!("the body is larger than {} bytes", limits.max_body));
    let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body as u64) {
        return Ok(too_large());
    }
    let body = match tokio::time::timeout(limits.body_timeout, Limited::new(req.into_body(), limits.max_body).collect()).await {
        Err(_) => return Ok(text(StatusCode::REQUEST_TIMEOUT, format!("the body did not arrive within {:?}", limits.body_timeout))),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return Ok(too_large()),
        Ok(Err(e)) => return Ok(text(StatusCode::BAD_REQUEST, format!("reading the body: {e}"))),
        Ok(Ok(b)) => b.to_bytes(),
    };
    Ok(match review(&body, validator) {
        Ok(answer) => {
            let json = serde_json::to_vec(&answer).expect("an AdmissionReview serializes");
            let mut r = Response::new(Full::new(Bytes::from(json)));
            r.headers_mut().insert(CONTENT_TYPE, "application/json".parse().expect("static header"));
            r
        }
        Err((status, msg)) => {
            tracing::warn!(%path, "bad request: {msg}");
            text(status, msg)
        }
    })
}

fn with_allow(mut r: Response<Body>, allow: &'static str) -> Response<Body> {
    r.headers_mut().insert(ALLOW, allow.parse().expect("static header"));
    r
}

/// Binds `addr` (port 0 picks one; see the returned address).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|source| Error::Listen { addr, source })
}

/// Serves HTTPS on `listener` until `shutdown` resolves, then lets open requests finish (up
/// to 10 seconds) so the apiserver sees no cut connection during a rollout.
pub async fn serve(listener: TcpListener, tls: tokio_rustls::rustls::ServerConfig, routes: Routes, limits: Limits, shutdown: impl Future<Output = ()>) {
    let acceptor = tls::acceptor(tls);
    let routes = Arc::new(routes);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let acceptor = acceptor.clone();
        let routes = routes.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return tracing::debug!(%peer, "TLS handshake: {e}"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            let service = service_fn(move |req| handle(req, routes.clone(), limits));
            let mut builder = http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%peer, "connection: {e}");
            }
        });
    }
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(Duration::from_secs(10)) => tracing::warn!("open connections cut after 10 s"),
    }
}
