//! Just enough HTTP/1.1 for the control API: bounded request reading
//! (header and body limits, a read deadline) and JSON responses.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// Most header bytes accepted.
pub const MAX_HEADER: usize = 8 << 10;
/// Most body bytes accepted.
pub const MAX_BODY: usize = 16 << 10;
/// How long a client may take to send one request.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// GET, PUT, ...
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// Query string, if any.
    pub query: Option<String>,
    /// Body bytes.
    pub body: Vec<u8>,
    /// The client asked to close after this request.
    pub close: bool,
}

/// Why no request could be read.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadError {
    /// The client closed the connection cleanly between requests.
    Closed,
    /// Timed out or an I/O error: drop the connection.
    Gone,
    /// A bad request: answer with this status and message, then close.
    Bad(u16, &'static str),
}

/// Reads one request from `stream` (which must have a read timeout set).
/// `buf` carries bytes already read past the previous request.
pub fn read_request<S: Read>(stream: &mut S, buf: &mut Vec<u8>) -> Result<Request, ReadError> {
    let start = Instant::now();
    let mut chunk = [0u8; 2048];
    let header_end = loop {
        if let Some(pos) = find(buf, b"\r\n\r\n") {
            if pos > MAX_HEADER {
                return Err(ReadError::Bad(431, "request header too large"));
            }
            break pos + 4;
        }
        if buf.len() > MAX_HEADER {
            return Err(ReadError::Bad(431, "request header too large"));
        }
        if start.elapsed() > REQUEST_DEADLINE {
            return Err(ReadError::Bad(408, "request not received in time"));
        }
        match stream.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Err(ReadError::Closed),
            Ok(0) => return Err(ReadError::Gone),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if buf.is_empty() {
                    // Idle keep-alive connection: let it go.
                    return Err(ReadError::Gone);
                }
                return Err(ReadError::Bad(408, "request not received in time"));
            }
            Err(_) => return Err(ReadError::Gone),
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&buf[..header_end]) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(ReadError::Bad(400, "malformed request")),
    }
    let method = req.method.unwrap_or("").to_string();
    let target = req.path.unwrap_or("");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target.to_string(), None),
    };
    let mut length = 0usize;
    let mut close = req.version == Some(0);
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or(ReadError::Bad(400, "bad Content-Length"))?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ReadError::Bad(
                411,
                "chunked bodies are not accepted; send Content-Length",
            ));
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = h.value.eq_ignore_ascii_case(b"close");
        }
    }
    if length > MAX_BODY {
        return Err(ReadError::Bad(413, "request body too large"));
    }
    let mut rest = buf.split_off(header_end);
    std::mem::swap(buf, &mut rest);
    // `buf` now holds what followed the header.
    while buf.len() < length {
        if start.elapsed() > REQUEST_DEADLINE {
            return Err(ReadError::Bad(408, "request body not received in time"));
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err(ReadError::Gone),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ReadError::Bad(408, "request body not received in time"))
            }
            Err(_) => return Err(ReadError::Gone),
        }
    }
    let leftover = buf.split_off(length);
    let body = std::mem::replace(buf, leftover);
    Ok(Request {
        method,
        path,
        query,
        body,
        close,
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reason phrase of a status code.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Writes a JSON response.
pub fn respond<W: Write>(
    w: &mut W,
    status: u16,
    body: &serde_json::Value,
    close: bool,
) -> std::io::Result<()> {
    let text = body.to_string();
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n",
        reason(status),
        text.len(),
        if close { "Connection: close\r\n" } else { "" }
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(text.as_bytes());
    w.write_all(&out)
}

/// Writes an error response `{"error": message}`.
pub fn respond_error<W: Write>(
    w: &mut W,
    status: u16,
    message: &str,
    close: bool,
) -> std::io::Result<()> {
    respond(w, status, &serde_json::json!({ "error": message }), close)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Request, ReadError> {
        let mut cursor = std::io::Cursor::new(raw.to_vec());
        read_request(&mut cursor, &mut Vec::new())
    }

    #[test]
    fn requests_with_and_without_bodies() {
        let r = parse(b"GET /v1/vm HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.body.len()),
            ("GET", "/v1/vm", 0)
        );
        let r = parse(b"PUT /v1/vm/shutdown?x=1 HTTP/1.1\r\nContent-Length: 15\r\nConnection: close\r\n\r\n{\"timeout_s\":5}").unwrap();
        assert_eq!(r.body, b"{\"timeout_s\":5}");
        assert_eq!(r.query.as_deref(), Some("x=1"));
        assert!(r.close);
    }

    #[test]
    fn pipelined_requests_keep_their_bytes() {
        let raw = b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n".to_vec();
        let mut cursor = std::io::Cursor::new(raw);
        let mut buf = Vec::new();
        assert_eq!(read_request(&mut cursor, &mut buf).unwrap().path, "/a");
        assert_eq!(read_request(&mut cursor, &mut buf).unwrap().path, "/b");
        assert_eq!(read_request(&mut cursor, &mut buf), Err(ReadError::Closed));
    }

    #[test]
    fn bad_requests_get_precise_statuses() {
        assert_eq!(
            parse(b"garbage\r\n\r\n"),
            Err(ReadError::Bad(400, "malformed request"))
        );
        let big = format!(
            "GET / HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEADER + 10)
        );
        assert!(matches!(parse(big.as_bytes()), Err(ReadError::Bad(431, _))));
        let body = format!("PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        assert!(matches!(
            parse(body.as_bytes()),
            Err(ReadError::Bad(413, _))
        ));
        assert!(matches!(
            parse(b"PUT / HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            Err(ReadError::Bad(400, _))
        ));
        assert!(matches!(
            parse(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(ReadError::Bad(411, _))
        ));
        assert_eq!(
            parse(b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"),
            Err(ReadError::Gone)
        );
    }
}
