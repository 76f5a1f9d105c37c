//! A small blocking client for the agent's HTTP/JSON API on a unix socket.
//!
//! One request per connection (`Connection: close`): the plugin makes one call per process, and
//! a connect on a unix socket costs microseconds.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use allot_wire::ApiError;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub const DEFAULT_SOCKET: &str = "/run/allot/allot.sock";
pub const SOCKET_ENV: &str = "ALLOT_SOCKET";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("agent socket {} is missing: is `allot agent` running? (start it with `allot agent`, or point --socket / ALLOT_SOCKET at its socket)", .0.display())]
    NotFound(PathBuf),
    #[error("nothing listens on agent socket {}: is `allot agent` running? (start it with `allot agent`)", .0.display())]
    Refused(PathBuf),
    #[error("permission denied on agent socket {}: the socket is mode 0600, run as the agent's user (root)", .0.display())]
    Denied(PathBuf),
    #[error("agent on {} did not answer within {:?}", .socket.display(), .timeout)]
    Timeout { socket: PathBuf, timeout: Duration },
    #[error("talking to the agent on {}: {source}", .socket.display())]
    Io { socket: PathBuf, source: io::Error },
    #[error("unexpected answer from the agent on {}: {what}", .socket.display())]
    Protocol { socket: PathBuf, what: String },
    #[error("{}", .0.message)]
    Api(ApiError),
}

impl ClientError {
    /// True when the agent could not be reached at all (as opposed to answering with an error).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::NotFound(_) | ClientError::Refused(_) | ClientError::Denied(_))
    }
}

#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        Client { socket: socket.into(), timeout }
    }

    pub fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, ClientError> {
        self.call("GET", path, None::<&()>)
    }

    pub fn post<B: Serialize, R: DeserializeOwned>(&self, path: &str, body: &B) -> Result<R, ClientError> {
        self.call("POST", path, Some(body))
    }

    pub fn delete<R: DeserializeOwned>(&self, path: &str) -> Result<R, ClientError> {
        self.call("DELETE", path, None::<&()>)
    }

    pub fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<R, ClientError> {
        let body = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| self.protocol(format!("encoding request: {e}")))?,
            None => Vec::new(),
        };
        let (status, payload) = self.exchange(method, path, &body)?;
        if (200..300).contains(&status) {
            serde_json::from_slice(&payload).map_err(|e| self.protocol(format!("decoding answer to {method} {path}: {e}")))
        } else {
            match serde_json::from_slice::<ApiError>(&payload) {
                Ok(e) => Err(ClientError::Api(e)),
                Err(_) => Err(self.protocol(format!(
                    "HTTP {status} for {method} {path}: {}",
                    String::from_utf8_lossy(&payload).chars().take(200).collect::<String>()
                ))),
            }
        }
    }

    fn protocol(&self, what: String) -> ClientError {
        ClientError::Protocol { socket: self.socket.clone(), what }
    }

    fn io(&self, source: io::Error) -> ClientError {
        match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                ClientError::Timeout { socket: self.socket.clone(), timeout: self.timeout }
            }
            _ => ClientError::Io { socket: self.socket.clone(), source },
        }
    }

    fn exchange(&self, method: &str, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>), ClientError> {
        let mut stream = UnixStream::connect(&self.socket).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ClientError::NotFound(self.socket.clone()),
            io::ErrorKind::ConnectionRefused => ClientError::Refused(self.socket.clone()),
            io::ErrorKind::PermissionDenied => ClientError::Denied(self.socket.clone()),
            _ => self.io(e),
        })?;
        stream.set_read_timeout(Some(self.timeout)).map_err(|e| self.io(e))?;
        stream.set_write_timeout(Some(self.timeout)).map_err(|e| self.io(e))?;
        let mut req = Vec::with_capacity(160 + body.len());
        write!(
            req,
            "{method} {path} HTTP/1.1\r\nHost: allot\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .expect("writing to a Vec");
        req.extend_from_slice(body);
        stream.write_all(&req).map_err(|e| self.io(e))?;
        // Stop as soon as the sized body is in: waiting for the server to close the connection
        // costs a scheduling round trip on every call.
        let mut raw = Vec::with_capacity(4096);
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).map_err(|e| self.io(e))?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&chunk[..n]);
            if response_complete(&raw) {
                break;
            }
        }
        parse_response(&raw).map_err(|what| self.protocol(what))
    }
}

/// True once `raw` holds the whole head and as many body bytes as Content-Length announces.
fn response_complete(raw: &[u8]) -> bool {
    let Some(head_end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else { return false };
    let head = String::from_utf8_lossy(&raw[..head_end]);
    let length = head.split("\r\n").find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().ok()).flatten()
    });
    length.is_some_and(|n| raw.len() >= head_end + 4 + n)
}

/// Splits an HTTP/1.1 response into status and body (Content-Length, chunked, or to EOF).
pub fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("incomplete HTTP response ({} bytes)", raw.len()))?;
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| "HTTP head is not UTF-8".to_string())?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("content-length") {
                length = Some(v.parse::<usize>().map_err(|_| format!("bad Content-Length {v:?}"))?);
            } else if k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
    }
    let rest = &raw[head_end + 4..];
    if chunked {
        // The agent always answers with a sized body.
        return Err("chunked HTTP bodies are not supported".into());
    }
    match length {
        Some(n) if rest.len() < n => Err(format!("body cut short: {} of {n} bytes", rest.len())),
        Some(n) => Ok((status, rest[..n].to_vec())),
        None => Ok((status, rest.to_vec())),
    }
}

/// The socket to use: an explicit path, else `ALLOT_SOCKET`, else the default.
pub fn socket_path(explicit: Option<&str>) -> PathBuf {
    explicit
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os(SOCKET_ENV).filter(|s| !s.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_length_bodies() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(raw).unwrap(), (200, b"{}".to_vec()));
    }

    #[test]
    fn refuses_cut_short_and_garbage() {
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{}").is_err());
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"HTTP/1.1 abc\r\n\r\n").is_err());
    }

    #[test]
    fn missing_socket_says_how_to_start_the_agent() {
        let c = Client::new("/nonexistent/allot.sock", Duration::from_secs(1));
        let err = c.get::<serde_json::Value>("/v1/status").unwrap_err();
        assert!(err.is_unreachable());
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/allot.sock") && msg.contains("allot agent"), "{msg}");
    }
}
