//! The vsock command server (HostOS vsock protocol v1).
//!
//! Keel's vsock device is Firecracker-style hybrid vsock: a guest connection
//! to host port 19090 arrives as a connection on the Unix socket
//! `<uds_path>_19090`, which the agent listens on. One JSON request per
//! connection, read until EOF or until a complete JSON value has arrived
//! (so clients that half-close and clients that wait both work), with a size
//! cap, a per-read timeout (5 s) and a total deadline (30 s); one JSON answer;
//! close. The agent never connects to the guest.

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::VsockTuning;
use crate::json_frame::JsonFrame;
use crate::protocol::{encode_response, Command, Payload, Request, Response, PROTOCOL_VERSION};
use crate::Agent;

#[derive(Debug)]
pub enum ReadError {
    TooLarge(usize),
    Timeout,
    Io(std::io::Error),
}

impl ReadError {
    fn reason(&self) -> &'static str {
        match self {
            ReadError::TooLarge(_) => "oversized",
            ReadError::Timeout => "timeout",
            ReadError::Io(_) => "io",
        }
    }
    fn message(&self) -> String {
        match self {
            ReadError::TooLarge(max) => format!("request too large (more than {max} bytes)"),
            ReadError::Timeout => "timed out reading the request".to_string(),
            ReadError::Io(e) => format!("error reading the request: {e}"),
        }
    }
}

/// Read one request: until EOF or a complete JSON value, within the limits.
pub fn read_request(stream: &UnixStream, t: &VsockTuning) -> Result<Vec<u8>, ReadError> {
    let deadline = Instant::now() + t.total_timeout();
    let mut buf = Vec::new();
    let mut frame = JsonFrame::default();
    let mut chunk = [0u8; 4096];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(ReadError::Timeout);
        }
        let wait = t
            .read_timeout()
            .min(deadline - now)
            .max(Duration::from_millis(1));
        stream.set_read_timeout(Some(wait)).map_err(ReadError::Io)?;
        match (&*stream).read(&mut chunk) {
            Ok(0) => return Ok(buf),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > t.max_request_bytes {
                    return Err(ReadError::TooLarge(t.max_request_bytes));
                }
                if frame.feed(&chunk[..n]) {
                    return Ok(buf);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return Err(ReadError::Timeout)
            }
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

/// Parse the first JSON value of a request.
pub fn parse_request(buf: &[u8]) -> Result<Request, String> {
    match serde_json::Deserializer::from_slice(buf)
        .into_iter::<Request>()
        .next()
    {
        Some(Ok(r)) => Ok(r),
        Some(Err(e)) => Err(format!("malformed request: {e}")),
        None => Err("malformed request: empty".to_string()),
    }
}

/// Bind the listening socket: replace a stale socket (never another kind of
/// file), create the parent directory if needed, mode 0660.
///
/// The socket is bound and listening under a temporary name in the same
/// directory and then renamed into place, so a client that finds `path`
/// never meets a socket that is bound but not yet listening (which answers
/// `ECONNREFUSED`). Only when the temporary name would not fit in a socket
/// address is `path` bound directly.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
    }
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))?;
        }
    }
    let staged = staging_path(path);
    if staged.as_os_str().len() > SUN_PATH_MAX {
        if path.exists() {
            std::fs::remove_file(path)?;
        }
        let l = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
        return Ok(l);
    }
    let _ = std::fs::remove_file(&staged);
    let l = UnixListener::bind(&staged)?;
    let placed = std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o660))
        .and_then(|()| std::fs::rename(&staged, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staged);
        return Err(e);
    }
    Ok(l)
}

/// The longest path a Unix socket address holds, its NUL excluded.
const SUN_PATH_MAX: usize = 107;

/// Where [`bind`] binds before renaming: `.<name>.<pid>.new` beside `path`.
fn staging_path(path: &Path) -> std::path::PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.{}.new", std::process::id()))
}

/// Accept connections forever, one thread each (bounded).
pub fn serve(agent: Arc<Agent>, listener: UnixListener) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                log::warn!("vsock: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= agent.config.vsock.max_connections {
            active.fetch_sub(1, Ordering::SeqCst);
            agent.metrics.vsock_rejected("busy");
            log::warn!("vsock: too many connections; refusing one");
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = (&stream).write_all(
                encode_response(&Err("host agent busy: too many connections".into())).as_bytes(),
            );
            continue;
        }
        let agent = agent.clone();
        let active = active.clone();
        std::thread::spawn(move || {
            handle_connection(&agent, stream);
            active.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

fn send(stream: &UnixStream, response: &Response) {
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    if let Err(e) = (&*stream).write_all(encode_response(response).as_bytes()) {
        log::warn!("vsock: cannot send the answer: {e}");
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// One connection: read, check, dispatch, answer.
pub fn handle_connection(agent: &Agent, stream: UnixStream) {
    let m = &agent.metrics;
    let buf = match read_request(&stream, &agent.config.vsock) {
        Ok(b) => b,
        Err(e) => {
            log::warn!("vsock: refused a request: {}", e.message());
            m.vsock_rejected(e.reason());
            send(&stream, &Err(e.message()));
            return;
        }
    };
    let req = match parse_request(&buf) {
        Ok(r) => r,
        Err(e) => {
            log::warn!("vsock: {e}");
            m.vsock_rejected("malformed");
            send(&stream, &Err(e));
            return;
        }
    };
    if req.sender_cid != agent.config.guest_cid {
        log::warn!(
            "vsock: refused {} from sender_cid {}: only the guest CID {} is served",
            req.message.name(),
            req.sender_cid,
            agent.config.guest_cid
        );
        m.vsock_rejected("sender_cid");
        send(
            &stream,
            &Err(format!(
                "sender_cid {} does not match the guest's CID; request refused",
                req.sender_cid
            )),
        );
        return;
    }
    log::info!(
        "vsock: request {} from CID {}",
        req.message.name(),
        req.sender_cid
    );
    let (response, committed) = dispatch(agent, &req.message);
    m.vsock_request(req.message.name(), response.is_ok());
    match &response {
        Ok(_) => log::info!("vsock: {} -> ok", req.message.name()),
        Err(e) => log::warn!("vsock: {} -> error: {e}", req.message.name()),
    }
    send(&stream, &response);
    drop(stream);
    if committed {
        crate::upgrade::after_commit(agent);
    }
}

/// Run a command. The bool is true after a committed upgrade (the caller
/// answers the guest first, then shuts it down and reboots).
pub fn dispatch(agent: &Agent, cmd: &Command) -> (Response, bool) {
    let cfg = &agent.config;
    match cmd {
        Command::GetVsockProtocol => (Ok(Payload::HostOSVsockVersion(PROTOCOL_VERSION)), false),
        Command::GetHostOSVersion => {
            let r = std::fs::File::open(&cfg.version_file).and_then(|f| {
                let mut s = String::new();
                f.take(4096).read_to_string(&mut s)?;
                Ok(s)
            });
            (
                r.map(|s| Payload::HostOSVersion(s.trim().to_string()))
                    .map_err(|e| format!("could not read the HostOS version: {e}")),
                false,
            )
        }
        Command::Notify(n) => (
            agent
                .notifier
                .notify(n.count, &n.message)
                .map(|_| Payload::NoPayload),
            false,
        ),
        Command::Upgrade(u) => match crate::upgrade::run(agent, &u.url, &u.target_hash) {
            Ok(()) => (Ok(Payload::NoPayload), true),
            Err(e) => {
                log::error!("upgrade failed: {e}");
                (Err(format!("upgrade failed: {}", e.guest_message())), false)
            }
        },
        Command::StartUpgradeGuestVm => (start_upgrade_vm(agent), false),
        Command::AttachHsm | Command::DetachHsm => (
            Err(format!(
                "{} is not supported on this host: Keel has no USB passthrough",
                cmd.name()
            )),
            false,
        ),
    }
}

fn start_upgrade_vm(agent: &Agent) -> Response {
    let cfg = &agent.config;
    let Some(unit) = &cfg.upgrade_vm_unit else {
        return Err("start-upgrade-guest-vm: no upgrade VM unit is configured on this host".into());
    };
    let argv = vec![
        cfg.systemctl.to_string_lossy().into_owned(),
        "start".to_string(),
        unit.clone(),
    ];
    log::info!("start-upgrade-guest-vm: running {argv:?}");
    match crate::cmd::run(&argv, Duration::from_secs(120)) {
        Ok(o) if o.success => Ok(Payload::NoPayload),
        Ok(o) => Err(format!(
            "could not start {unit} ({}): {}",
            o.status, o.output
        )),
        Err(e) => Err(format!("could not start {unit}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_takes_the_first_value() {
        let r =
            parse_request(br#"{"sender_cid":3,"message":"GetVsockProtocol"} trailing"#).unwrap();
        assert_eq!(r.message, Command::GetVsockProtocol);
        assert!(parse_request(b"").unwrap_err().contains("malformed"));
        assert!(parse_request(b"{").unwrap_err().contains("malformed"));
    }

    /// A client that sees the socket path can always connect: the path
    /// appears only once the socket listens. A watcher connects whenever
    /// the path exists while the socket is bound again and again; binding
    /// the path directly (bind, then listen) lets it meet ECONNREFUSED.
    #[test]
    fn the_socket_path_appears_only_once_it_listens() {
        let dir = std::env::temp_dir().join(format!("agent-bind-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock_19090");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut refused = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    if let Err(e) = UnixStream::connect(&path) {
                        if e.kind() == std::io::ErrorKind::ConnectionRefused {
                            refused += 1;
                        }
                    }
                }
                refused
            })
        };
        // Keep every listener alive (a closed one would refuse too) and
        // drain their backlogs, so that the watcher's connects never block.
        let mut listeners: Vec<UnixListener> = Vec::new();
        let drain = |listeners: &[UnixListener]| {
            for l in listeners {
                while l.accept().is_ok() {}
            }
        };
        for _ in 0..300 {
            let l = bind(&path).unwrap();
            l.set_nonblocking(true).unwrap();
            listeners.push(l);
            drain(&listeners);
        }
        stop.store(true, Ordering::Relaxed);
        while !watcher.is_finished() {
            drain(&listeners);
            std::thread::yield_now();
        }
        assert_eq!(watcher.join().unwrap(), 0, "a connection was refused");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o660);
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 1, "staging sockets left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn another_kind_of_file_is_never_replaced() {
        let dir = std::env::temp_dir().join(format!("agent-bind-file-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock_19090");
        std::fs::write(&path, b"keep").unwrap();
        assert_eq!(
            bind(&path).unwrap_err().kind(),
            std::io::ErrorKind::AlreadyExists
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
