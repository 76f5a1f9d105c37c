//! The monitoring endpoint (`--metrics-addr`): `/metrics`, `/healthz`, `/readyz` and a status
//! page at `/`, over plain HTTP/1.1 on TCP. Read-only: anything but GET (and HEAD) is answered
//! 405. A connection must send its request head within 5 s; at most 64 are open at once, so a
//! misbehaving scraper cannot take the agent's memory or file descriptors.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ACCEPT, ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::AgentError;

/// The classic Prometheus text format, served unless the scraper asks for OpenMetrics.
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";
pub const OPENMETRICS_FORMAT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const MAX_CONNECTIONS: usize = 64;

/// What the endpoint serves; the agent and the operator each have one.
pub trait Site: Send + Sync + 'static {
    /// Every metric in the OpenMetrics text format (what `prometheus-client` encodes).
    fn metrics(&self) -> impl Future<Output = String> + Send;
    /// Ok when ready for work, else why not (`/readyz`).
    fn ready(&self) -> impl Future<Output = Result<(), String>> + Send;
    /// The status page (HTML).
    fn page(&self) -> impl Future<Output = String> + Send;
}

/// Binds the monitoring address; a taken or invalid one stops the start with the reason.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AgentError> {
    TcpListener::bind(addr).await.map_err(|e| {
        AgentError::Invalid(format!("--metrics-addr {addr}: {e}: pick a free address, e.g. 127.0.0.1:9962"))
    })
}

/// Serves `site` on `listener` until `stop` turns true.
pub async fn serve<T: Site>(listener: TcpListener, site: Arc<T>, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.changed() => return,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection on the metrics address");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Over the cap the newest connection is closed: scrapers retry on their next interval.
        let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
        let (site, mut stop) = (site.clone(), stop.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let site = site.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&*site, &req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.changed() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
}

async fn answer<T: Site, B>(site: &T, req: &Request<B>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let known = matches!(path, "/" | "/metrics" | "/healthz" | "/readyz");
    if !known {
        return reply(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", format!(
            "no page {path}: try /metrics, /healthz, /readyz or /\n"
        ));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", format!(
            "{} is not allowed on {path}: this endpoint is read-only, use GET\n",
            req.method()
        ));
        r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let mut resp = match path {
        "/metrics" => {
            let open = req
                .headers()
                .get_all(ACCEPT)
                .iter()
                .any(|v| v.to_str().is_ok_and(|s| s.contains("application/openmetrics-text")));
            let text = site.metrics().await;
            if open {
                reply(StatusCode::OK, OPENMETRICS_FORMAT, text)
            } else {
                reply(StatusCode::OK, TEXT_FORMAT, to_classic(&text))
            }
        }
        "/healthz" => reply(StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into()),
        "/readyz" => match site.ready().await {
            Ok(()) => reply(StatusCode::OK, "text/plain; charset=utf-8", "ready\n".into()),
            Err(why) => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain; charset=utf-8", format!("not ready: {why}\n")),
        },
        _ => reply(StatusCode::OK, "text/html; charset=utf-8", site.page().await),
    };
    if req.method() == Method::HEAD {
        *resp.body_mut() = Full::new(Bytes::new());
    }
    resp
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// OpenMetrics text to the classic Prometheus format: a counter's metadata names the sample
/// (`_total`), and `# UNIT` and `# EOF` go. promtool and older scrapers want this form.
pub fn to_classic(open: &str) -> String {
    let mut out = String::with_capacity(open.len());
    let mut help: Option<&str> = None;
    for line in open.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if line.starts_with("# HELP ") {
            if let Some(h) = help.replace(line) {
                out.push_str(h);
                out.push('\n');
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.rsplit_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "gauge" | "histogram" | "summary" => (name.to_string(), kind),
                _ => (name.to_string(), "untyped"),
            };
            if let Some(h) = help.take() {
                let text = h.strip_prefix("# HELP ").and_then(|r| r.split_once(' ')).map_or("", |(_, t)| t);
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if let Some(h) = help.take() {
            out.push_str(h);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn counters_get_total_in_their_metadata() {
        let open = "# HELP allot_x Things.\n# TYPE allot_x counter\nallot_x_total{a=\"b\"} 3\n# HELP allot_d_seconds D.\n# TYPE allot_d_seconds histogram\n# UNIT allot_d_seconds seconds\nallot_d_seconds_sum 0.0\n# EOF\n";
        let classic = super::to_classic(open);
        assert_eq!(
            classic,
            "# HELP allot_x_total Things.\n# TYPE allot_x_total counter\nallot_x_total{a=\"b\"} 3\n# HELP allot_d_seconds D.\n# TYPE allot_d_seconds histogram\nallot_d_seconds_sum 0.0\n"
        );
    }
}
