//! Client for Keel's control API: HTTP/1.1 with JSON bodies over a Unix
//! socket (`keel --api-socket PATH`). One request per connection.
//!
//! - `GET /v1/vm`: `{"state": "running"|"paused"|"shutting-down"|"stopped", ...}`
//! - `GET /v1/counters`: the VMM's counters (vCPU exits, disks, net, vsock)
//! - `PUT /v1/vm/shutdown` `{"timeout_s": N}` -> 202: graceful shutdown
//!   (the ACPI power button or Ctrl-Alt-Del, per Keel's
//!   control.shutdown_method; then forced stop after the timeout)

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Nobody listens on the socket: Keel is not running.
    #[error("Keel's control socket {0} is not available ({1})")]
    Unavailable(PathBuf, std::io::Error),
    #[error("Keel API I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("Keel API answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("Keel API protocol error: {0}")]
    Protocol(String),
}

#[derive(Debug, Clone)]
pub struct KeelApi {
    pub socket: PathBuf,
    pub timeout: Duration,
}

impl KeelApi {
    pub fn new(socket: PathBuf) -> KeelApi {
        KeelApi {
            socket,
            timeout: Duration::from_secs(5),
        }
    }

    /// One request; returns the status and body of any answer.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, Vec<u8>), ApiError> {
        let mut stream = UnixStream::connect(&self.socket).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ApiError::Unavailable(self.socket.clone(), e)
            }
            _ => ApiError::Io(e),
        })?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        let body = body.unwrap_or("");
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: keel-agent\r\nAccept: application/json\r\nConnection: close\r\n"
        );
        if !body.is_empty() || method != "GET" {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(body);
        stream.write_all(req.as_bytes())?;
        read_response(BufReader::new(stream))
    }

    fn get_json(&self, path: &str) -> Result<serde_json::Value, ApiError> {
        let (status, body) = self.request("GET", path, None)?;
        if status != 200 {
            return Err(status_error(status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| ApiError::Protocol(format!("GET {path}: {e}")))
    }

    /// `GET /v1/vm`.
    pub fn vm(&self) -> Result<serde_json::Value, ApiError> {
        self.get_json("/v1/vm")
    }

    /// The VM's `state` field.
    pub fn vm_state(&self) -> Result<String, ApiError> {
        let v = self.vm()?;
        v.get("state")
            .and_then(|s| s.as_str())
            .map(str::to_string)
            .ok_or_else(|| ApiError::Protocol("GET /v1/vm: no \"state\" string".into()))
    }

    /// `GET /v1/counters`.
    pub fn counters(&self) -> Result<serde_json::Value, ApiError> {
        self.get_json("/v1/counters")
    }

    /// `PUT /v1/vm/shutdown`: ask for a graceful shutdown.
    pub fn shutdown(&self, timeout_s: u64) -> Result<(), ApiError> {
        let body = serde_json::json!({ "timeout_s": timeout_s }).to_string();
        let (status, body) = self.request("PUT", "/v1/vm/shutdown", Some(&body))?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(status_error(status, &body))
        }
    }
}

fn status_error(status: u16, body: &[u8]) -> ApiError {
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
    ApiError::Status { status, message }
}

/// Parse an HTTP/1.1 response: status line, headers, then a body framed by
/// Content-Length, chunked encoding, or the end of the connection.
pub fn read_response<R: BufRead>(mut r: R) -> Result<(u16, Vec<u8>), ApiError> {
    let mut head_bytes = 0usize;
    let mut line = String::new();
    let mut read_line = |r: &mut R, line: &mut String| -> Result<(), ApiError> {
        line.clear();
        let n = r
            .by_ref()
            .take((MAX_HEAD - head_bytes) as u64 + 1)
            .read_line(line)?;
        head_bytes += n;
        if head_bytes > MAX_HEAD {
            return Err(ApiError::Protocol("response head too large".into()));
        }
        if n == 0 {
            return Err(ApiError::Protocol(
                "connection closed in the response head".into(),
            ));
        }
        Ok(())
    };
    read_line(&mut r, &mut line)?;
    let mut parts = line.trim_end().splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(ApiError::Protocol(format!(
            "bad status line {:?}",
            line.trim_end()
        )));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ApiError::Protocol(format!("bad status line {:?}", line.trim_end())))?;
    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    loop {
        read_line(&mut r, &mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let v = v.trim();
            if k.eq_ignore_ascii_case("content-length") {
                content_length = Some(
                    v.parse()
                        .map_err(|_| ApiError::Protocol(format!("bad Content-Length {v:?}")))?,
                );
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.to_ascii_lowercase().contains("chunked");
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size_line = String::new();
            r.by_ref().take(128).read_line(&mut size_line)?;
            let size_hex = size_line.trim().split(';').next().unwrap_or("");
            let size = usize::from_str_radix(size_hex, 16)
                .map_err(|_| ApiError::Protocol(format!("bad chunk size {size_hex:?}")))?;
            if size == 0 {
                break;
            }
            if body.len() + size > MAX_BODY {
                return Err(ApiError::Protocol("response body too large".into()));
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)?;
        }
    } else if let Some(n) = content_length {
        if n > MAX_BODY {
            return Err(ApiError::Protocol("response body too large".into()));
        }
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else if status != 204 && status != 304 && !(100..200).contains(&status) {
        r.take(MAX_BODY as u64 + 1).read_to_end(&mut body)?;
        if body.len() > MAX_BODY {
            return Err(ApiError::Protocol("response body too large".into()));
        }
    }
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_length_chunked_and_eof_bodies() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}extra";
        assert_eq!(read_response(&r[..]).unwrap(), (200, b"{}".to_vec()));
        let r = b"HTTP/1.1 202 Accepted\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        assert_eq!(read_response(&r[..]).unwrap(), (202, b"abcde".to_vec()));
        let r = b"HTTP/1.0 404 Not Found\r\n\r\n{\"error\":\"no\"}";
        let (st, body) = read_response(&r[..]).unwrap();
        assert_eq!(st, 404);
        assert!(
            matches!(status_error(st, &body), ApiError::Status { message, .. } if message == "no")
        );
        assert!(read_response(&b"garbage\r\n\r\n"[..]).is_err());
        assert!(read_response(&b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"[..]).is_err());
    }
}
