//! The accept loop on the agent's socket: hyper HTTP/1.1 per connection, with the guards
//! `axum::serve` lacks. A connection must deliver its request head within `header_timeout`
//! (from accept, or from the end of its previous answer: idle and slowloris connections are
//! both cut) and its body within `body_timeout`; the handler itself is never timed, because an
//! ADD may wait `--add-wait` for a block. At most `max_connections` are open: a new connection
//! beyond the cap closes the oldest one that is not running a handler, or, when every one is,
//! is answered 503 at once. Every error answer has an `ApiError` JSON body.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use allot_wire::{ApiError, ErrorKind};
use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tower_service::Service;

/// Per-connection limits of the agent's socket.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_body: usize,
    /// How long shutdown waits for running handlers before it gives up on them.
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            header_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(5),
            max_body: 1 << 20,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// One open connection, as the accept loop sees it.
#[derive(Default)]
struct Conn {
    /// Handlers running on this connection; a connection with none may be closed for a newer one.
    busy: AtomicUsize,
    evict: Notify,
}

struct Busy(Arc<Conn>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Open connections in accept order (the key grows), so the oldest idle one is found first.
#[derive(Default)]
struct Table {
    next: u64,
    conns: BTreeMap<u64, Arc<Conn>>,
}

/// Removes a connection from the table when its task ends, even by a panic.
struct Registered {
    table: Arc<Mutex<Table>>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.table.lock().unwrap_or_else(|p| p.into_inner()).conns.remove(&self.id);
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then lets running handlers finish
/// (up to `limits.drain_timeout`).
pub async fn run(
    listener: UnixListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let table = Arc::new(Mutex::new(Table::default()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => r,
            () = &mut shutdown => break,
        };
        while tasks.try_join_next().is_some() {}
        let stream = match stream {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors or similar: back off instead of spinning.
                tracing::warn!(error = %e, "accepting a connection on the agent socket");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some((id, conn)) = admit(&table, limits.max_connections) else {
            tracing::warn!(cap = limits.max_connections, "agent socket: every connection runs a request; refusing a new one");
            let body = error_body(ErrorKind::TryAgain, format!(
                "the agent is serving {} requests at once, its limit: try again shortly",
                limits.max_connections
            ));
            let head = format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            // Best effort and never blocking: take what the client sent (so closing does not
            // reset the connection under the answer), and the socket buffer takes the answer.
            let mut sink = [0u8; 4096];
            while matches!(stream.try_read(&mut sink), Ok(n) if n > 0) {}
            let _ = stream.try_write(&[head.as_bytes(), &body].concat());
            continue;
        };
        let (app, table, stop) = (app.clone(), table.clone(), stop_rx.clone());
        tasks.spawn(async move {
            let _registered = Registered { table, id };
            serve_conn(stream, app, limits, conn, stop).await;
        });
    }
    // New clients are refused at once (the plugin answers "try again") while running ones finish.
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(limits.drain_timeout, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(left = tasks.len(), "shutdown: requests still running after {:?}; closing them", limits.drain_timeout);
    }
    Ok(())
}

/// Registers a new connection; at the cap, first closes the oldest one that runs no handler.
/// None when every open connection is running a handler.
fn admit(table: &Mutex<Table>, cap: usize) -> Option<(u64, Arc<Conn>)> {
    let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
    if t.conns.len() >= cap {
        let victim = t.conns.iter().find(|(_, c)| c.busy.load(Ordering::SeqCst) == 0).map(|(id, _)| *id)?;
        if let Some(c) = t.conns.remove(&victim) {
            c.evict.notify_one();
        }
    }
    let id = t.next;
    t.next += 1;
    let conn = Arc::new(Conn::default());
    t.conns.insert(id, conn.clone());
    Some((id, conn))
}

async fn serve_conn(stream: UnixStream, app: Router, limits: Limits, conn: Arc<Conn>, mut stop: watch::Receiver<bool>) {
    let svc_conn = conn.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (app, conn) = (app.clone(), svc_conn.clone());
        async move { Ok::<_, Infallible>(handle(app, req, limits, conn).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        // A client that half-closes after its request still gets the answer, and its handler
        // runs to the end instead of being dropped halfway.
        .half_close(true)
        .max_buf_size(64 * 1024);
    let http = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(http);
    tokio::select! {
        r = http.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "agent socket connection ended");
            }
        }
        () = conn.evict.notified() => tracing::debug!("closed an idle connection for a new one (connection cap)"),
        _ = stop.changed() => {
            http.as_mut().graceful_shutdown();
            let _ = http.await;
        }
    }
}

async fn handle(mut app: Router, req: Request<Incoming>, limits: Limits, conn: Arc<Conn>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body as u64) {
        return too_large(limits.max_body);
    }
    let bytes = match tokio::time::timeout(limits.body_timeout, Limited::new(body, limits.max_body).collect()).await {
        Ok(Ok(c)) => c.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => return too_large(limits.max_body),
        Ok(Err(e)) => {
            return error_response(StatusCode::BAD_REQUEST, ErrorKind::Invalid, format!("reading the request body: {e}"));
        }
        Err(_) => {
            return error_response(
                StatusCode::REQUEST_TIMEOUT,
                ErrorKind::Invalid,
                format!("the request body did not arrive within {:?}: send it whole", limits.body_timeout),
            );
        }
    };
    let (method, path) = (parts.method.clone(), parts.uri.path().chars().take(100).collect::<String>());
    conn.busy.fetch_add(1, Ordering::SeqCst);
    let _busy = Busy(conn);
    let resp = match app.call(Request::from_parts(parts, Body::from(bytes))).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    json_errors(resp, &method, &path).await
}

fn too_large(max: usize) -> Response<Body> {
    error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::Invalid,
        format!("request body larger than the agent's limit of {max} bytes"),
    )
}

/// Gives the router's own error answers (unknown route, wrong method, body rejections) an
/// `ApiError` body like every other error.
async fn json_errors(resp: Response<Body>, method: &axum::http::Method, path: &str) -> Response<Body> {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let text = resp.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let message = match status {
        StatusCode::NOT_FOUND => format!("the agent has no route {method} {path}"),
        StatusCode::METHOD_NOT_ALLOWED => format!("{method} is not allowed on {path}"),
        _ if !text.is_empty() => format!("{method} {path}: {text}"),
        _ => format!("{method} {path}: {status}"),
    };
    let kind = match status {
        StatusCode::SERVICE_UNAVAILABLE => ErrorKind::TryAgain,
        s if s.is_server_error() => ErrorKind::Internal,
        _ => ErrorKind::Invalid,
    };
    error_response(status, kind, message)
}

fn error_body(kind: ErrorKind, message: String) -> Vec<u8> {
    serde_json::to_vec(&ApiError { kind, message }).expect("serializing an ApiError")
}

pub(crate) fn error_response(status: StatusCode, kind: ErrorKind, message: String) -> Response<Body> {
    let mut resp = Response::new(Body::from(error_body(kind, message)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
