//! The control API: HTTP/1.1 with JSON bodies on a Unix socket (so
//! `curl --unix-socket` works), documented in `resources/api/openapi.json`.
//!
//! Each connection gets its own thread, bounded in number; requests are
//! bounded in size and time; state changes go to the VMM's control loop
//! through [`ControlHandle`], so the API never touches a vCPU or device
//! directly (console input excepted, through the serial port's lock).

pub mod auth;
pub mod http;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::legacy::{ConsoleHub, Serial};
use log::{info, warn};
use serde::Serialize;
use serde_json::{json, Value};

use crate::control::{ControlHandle, ControlRequest, VmState};
use crate::vmm::VmView;
use auth::{Peer, Role, RolePolicy};
use http::{ReadError, Request};

/// Every route: method, path, role needed. The OpenAPI file lists the same
/// set (a test checks it).
pub const ROUTES: &[(&str, &str, Role)] = &[
    ("GET", "/v1/vm", Role::ReadOnly),
    ("GET", "/v1/counters", Role::ReadOnly),
    ("PUT", "/v1/vm/pause", Role::Admin),
    ("PUT", "/v1/vm/resume", Role::Admin),
    ("PUT", "/v1/vm/shutdown", Role::Admin),
    ("PUT", "/v1/vm/stop", Role::Admin),
    ("GET", "/v1/console", Role::ReadOnly),
];

/// Most connections served at once; more get 503.
pub const MAX_CLIENTS: usize = 64;
/// How long a state-change request waits for the control loop.
const CONTROL_WAIT: Duration = Duration::from_secs(10);

/// Errors of setting up the API socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// bind(2) or chmod failed.
    #[error("cannot create API socket {path}: {source}")]
    Bind {
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The server thread could not start.
    #[error("cannot start the API thread: {0}")]
    Thread(std::io::Error),
    /// systemd passed a socket that cannot serve the API.
    #[error(transparent)]
    ListenFd(#[from] crate::systemd::ListenFdError),
}

/// What does not change while the VM runs (served by `GET /v1/vm`).
#[derive(Clone, Debug, Serialize)]
pub struct VmInfo {
    /// vCPU count.
    pub vcpus: u32,
    /// Topology.
    pub topology: crate::arch::x86_64::topology::CpuTopology,
    /// Memory.
    pub memory: MemoryInfo,
    /// Boot source.
    pub boot: BootInfo,
    /// Devices.
    pub devices: Vec<DeviceInfo>,
}

/// Guest memory description.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryInfo {
    /// Bytes.
    pub size_bytes: u64,
    /// What backs it: `hugetlbfs-2M` or `anonymous`.
    pub backing: &'static str,
    /// The configured `memory.hugepages`: `on`, `off` or `auto`.
    pub hugepages: &'static str,
    /// With `auto`, why Keel fell back to normal pages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugepages_fallback: Option<String>,
    /// NUMA nodes the ACPI SRAT and SLIT describe (`memory.numa`; 0 without).
    pub numa_nodes: u32,
}

/// Boot source description.
#[derive(Clone, Debug, Serialize)]
pub struct BootInfo {
    /// Kernel path.
    pub kernel: String,
    /// Initrd path.
    pub initrd: Option<String>,
    /// Command line as given to the guest.
    pub cmdline: String,
    /// "pvh" or "linux-64".
    pub protocol: &'static str,
}

/// One device.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceInfo {
    /// Kind, e.g. "virtio-blk", "serial".
    pub kind: &'static str,
    /// Backing path, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Read-only disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub readonly: Option<bool>,
    /// A NIC's MAC address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// A disk's request queues.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queues: Option<u16>,
    /// Where the guest sees it.
    pub location: String,
}

/// Everything a connection needs.
pub struct ApiContext {
    /// Requests to the control loop, and the VM's state.
    pub control: ControlHandle,
    /// Counters.
    pub view: VmView,
    /// Static description.
    pub info: VmInfo,
    /// Role mapping.
    pub roles: RolePolicy,
    /// Serial output watchers.
    pub console_hub: Arc<ConsoleHub>,
    /// The serial port, for console input.
    pub serial: Arc<Mutex<Serial>>,
    /// Default graceful-shutdown timeout.
    pub shutdown_timeout: Duration,
    /// Whether a console writer is attached.
    pub console_writer: Mutex<bool>,
    clients: AtomicUsize,
}

impl ApiContext {
    /// Bundles the API's view of the VM.
    pub fn new(
        control: ControlHandle,
        view: VmView,
        info: VmInfo,
        roles: RolePolicy,
        console_hub: Arc<ConsoleHub>,
        serial: Arc<Mutex<Serial>>,
        shutdown_timeout: Duration,
    ) -> Self {
        ApiContext {
            control,
            view,
            info,
            roles,
            console_hub,
            serial,
            shutdown_timeout,
            console_writer: Mutex::new(false),
            clients: AtomicUsize::new(0),
        }
    }
}

/// The listening socket: the one systemd passed (LISTEN_FDS, checked to be
/// a listening Unix stream socket), else a new one at `path` (mode 0660,
/// a stale socket replaced; anything else at `path` is an error and left
/// alone), owned by `group` so its members can connect (SO_PEERCRED then
/// decides what each caller may do).
pub fn listener(path: Option<&Path>, group: Option<u32>) -> Result<Option<UnixListener>, ApiError> {
    if let Some(l) = crate::systemd::listen_socket()? {
        return Ok(Some(l));
    }
    let Some(path) = path else { return Ok(None) };
    let shown = path.display().to_string();
    let err = |source| ApiError::Bind {
        path: shown.clone(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(err(std::io::Error::other(
                "something other than a socket is there: not removing it",
            )));
        }
        Ok(_) => {
            // Only replace a socket nobody answers on.
            if UnixStream::connect(path).is_ok() {
                return Err(err(std::io::Error::other(
                    "another process is serving this socket",
                )));
            }
            std::fs::remove_file(path).map_err(err)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let l = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(err)?;
    }
    Ok(Some(l))
}

/// Serves the API on its own thread.
pub fn start(listener: UnixListener, ctx: Arc<ApiContext>) -> Result<(), ApiError> {
    std::thread::Builder::new()
        .name("keel-api".into())
        .spawn(move || {
            lower_priority();
            crate::seccomp::confine(crate::seccomp::ThreadKind::Api);
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => accept(stream, &ctx),
                    Err(e) => {
                        warn!("api: accept: {e}");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(ApiError::Thread)
}

/// Lowers the calling thread's scheduling priority: API work must never
/// take CPU time from vCPUs or devices on a busy host.
fn lower_priority() {
    // SAFETY: gettid and setpriority on the calling thread only.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

fn accept(mut stream: UnixStream, ctx: &Arc<ApiContext>) {
    if ctx.clients.fetch_add(1, Relaxed) >= MAX_CLIENTS {
        ctx.clients.fetch_sub(1, Relaxed);
        let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
        let _ = http::respond_error(&mut stream, 503, "too many clients", true);
        return;
    }
    let ctx2 = ctx.clone();
    let spawned = std::thread::Builder::new()
        .name("keel-api-conn".into())
        .spawn(move || {
            serve_connection(stream, &ctx2);
            ctx2.clients.fetch_sub(1, Relaxed);
        });
    if spawned.is_err() {
        ctx.clients.fetch_sub(1, Relaxed);
    }
}

fn serve_connection(mut stream: UnixStream, ctx: &ApiContext) {
    let peer = match auth::peer_of(&stream) {
        Ok(p) => p,
        Err(e) => {
            warn!("api: cannot read peer credentials: {e}");
            return;
        }
    };
    let role = ctx.roles.role(&peer);
    let _ = stream.set_read_timeout(Some(http::REQUEST_DEADLINE));
    let _ = stream.set_write_timeout(Some(http::REQUEST_DEADLINE));
    let mut buf = Vec::new();
    loop {
        let req = match http::read_request(&mut stream, &mut buf) {
            Ok(r) => r,
            Err(ReadError::Closed | ReadError::Gone) => return,
            Err(ReadError::Bad(status, msg)) => {
                let _ = http::respond_error(&mut stream, status, msg, true);
                return;
            }
        };
        if let Err(refusal) = check(&peer, role, &req) {
            // A refusal for want of a role ends the connection: the caller
            // may do nothing more on it (and a console client must not be
            // left waiting for a stream that never comes).
            let close = req.close || refusal.status == 403;
            let _ = http::respond_error(&mut stream, refusal.status, &refusal.message, close);
            if close {
                let _ = stream.shutdown(std::net::Shutdown::Both);
                return;
            }
            continue;
        }
        if req.method == "GET" && req.path == "/v1/console" {
            console(stream, ctx, wants_console_write(&req));
            return;
        }
        let close = req.close;
        let answering = ctx.control.answering();
        let (status, body) = route(ctx, &req);
        let sent = http::respond(&mut stream, status, &body, close);
        drop(answering);
        if sent.is_err() || close {
            return;
        }
    }
}

/// Why a request is not served: its status and message.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Refusal {
    status: u16,
    message: String,
}

/// Whether a console request asks to type (`?mode=rw`).
fn wants_console_write(req: &Request) -> bool {
    req.path == "/v1/console"
        && req
            .query
            .as_deref()
            .is_some_and(|q| q.split('&').any(|kv| kv == "mode=rw"))
}

/// Checks the route exists and the role suffices (typing into the console
/// needs an admin); logs a denial, once.
fn check(peer: &Peer, role: Role, req: &Request) -> Result<(), Refusal> {
    // A caller with no role learns nothing, not even which routes exist,
    // and its connection ends with the 403.
    if role == Role::None {
        warn!(
            "api: denied {} {} to uid {} (pid {}): no role",
            req.method, req.path, peer.uid, peer.pid
        );
        return Err(Refusal {
            status: 403,
            message: "permission denied".into(),
        });
    }
    let same_path: Vec<_> = ROUTES.iter().filter(|(_, p, _)| *p == req.path).collect();
    let Some((_, _, need)) = same_path.iter().find(|(m, _, _)| *m == req.method) else {
        let (status, message) = if same_path.is_empty() {
            (404, format!("no such endpoint: {}", req.path))
        } else {
            (405, format!("{} does not accept {}", req.path, req.method))
        };
        return Err(Refusal { status, message });
    };
    let (need, message) = if wants_console_write(req) {
        (Role::Admin, "only admins may type into the console")
    } else {
        (*need, "permission denied")
    };
    if role < need {
        warn!(
            "api: denied {} {}{} to uid {} (pid {}, role {role:?})",
            req.method,
            req.path,
            req.query
                .as_deref()
                .map(|q| format!("?{q}"))
                .unwrap_or_default(),
            peer.uid,
            peer.pid
        );
        return Err(Refusal {
            status: 403,
            message: message.into(),
        });
    }
    Ok(())
}

fn route(ctx: &ApiContext, req: &Request) -> (u16, Value) {
    let control = |r: ControlRequest, ok: u16| match ctx.control.request(r, CONTROL_WAIT) {
        Ok(()) => (ok, json!({ "state": ctx.control.status.state().name() })),
        Err(e) => (409, json!({ "error": e })),
    };
    match req.path.as_str() {
        "/v1/vm" => (200, vm_json(ctx)),
        "/v1/counters" => (200, counters_json(&ctx.view)),
        "/v1/vm/pause" => control(ControlRequest::Pause, 200),
        "/v1/vm/resume" => control(ControlRequest::Resume, 200),
        "/v1/vm/stop" => control(ControlRequest::Stop, 202),
        "/v1/vm/shutdown" => match shutdown_timeout(&req.body, ctx.shutdown_timeout) {
            Ok(timeout) => control(ControlRequest::Shutdown { timeout }, 202),
            Err(e) => (400, json!({ "error": e })),
        },
        _ => (404, json!({ "error": "no such endpoint" })),
    }
}

/// Parses an optional `{"timeout_s": N}` body.
fn shutdown_timeout(body: &[u8], default: Duration) -> Result<Duration, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(default);
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        timeout_s: Option<u64>,
    }
    let b: Body = serde_json::from_slice(body).map_err(|e| format!("bad JSON body: {e}"))?;
    match b.timeout_s {
        None => Ok(default),
        Some(0) | Some(3601..) => Err("timeout_s must be between 1 and 3600".into()),
        Some(s) => Ok(Duration::from_secs(s)),
    }
}

fn vm_json(ctx: &ApiContext) -> Value {
    let mut v = serde_json::to_value(&ctx.info).unwrap_or_else(|_| json!({}));
    if let Value::Object(m) = &mut v {
        m.insert("state".into(), json!(ctx.control.status.state().name()));
        m.insert(
            "uptime_s".into(),
            json!(ctx.control.status.uptime().as_secs_f64()),
        );
        m.insert("pid".into(), json!(std::process::id()));
        let boot = ctx.view.boot_monitor.as_ref().map(|b| b.state().name());
        m.insert("guest_boot".into(), json!(boot.unwrap_or("off")));
    }
    v
}

/// The counters document (`GET /v1/counters`).
pub fn counters_json(view: &VmView) -> Value {
    use std::sync::atomic::Ordering::Relaxed as R;
    let vcpus: Vec<Value> = view
        .vcpu_counters
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({
                "index": i,
                "exits": {
                    "io_in": c.io_in.load(R),
                    "io_out": c.io_out.load(R),
                    "mmio_read": c.mmio_read.load(R),
                    "mmio_write": c.mmio_write.load(R),
                    "unhandled_io": c.unhandled_io.load(R),
                    "interrupted": c.interrupted.load(R),
                    "other": c.other.load(R),
                }
            })
        })
        .collect();
    let disks: Vec<Value> = view
        .disk_counters
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let s = c.snapshot();
            json!({
                "index": i,
                "read_ops": s.read_ops, "read_bytes": s.read_bytes,
                "write_ops": s.write_ops, "write_bytes": s.write_bytes,
                "flush_ops": s.flush_ops, "discard_ops": s.discard_ops,
                "write_zeroes_ops": s.write_zeroes_ops,
                "invalid_requests": s.invalid_requests,
                "unsupported_requests": s.unsupported_requests,
                "io_errors": s.io_errors,
                "cow_limit_errors": s.cow_limit_errors,
                "latency_ns_total": s.latency_ns_total,
                "latency_ns_max": s.latency_ns_max,
                "latency_samples": s.latency_samples,
            })
        })
        .collect();
    let vsock = view.vsock_counters.as_ref().map(|c| {
        Value::Object(
            c.pairs()
                .into_iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect(),
        )
    });
    let net: Vec<Value> = view
        .nets
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mut m = serde_json::Map::new();
            m.insert("index".into(), json!(i));
            m.insert("tap".into(), json!(n.tap));
            m.insert("mac".into(), json!(n.mac));
            for (k, v) in n.counters.pairs() {
                m.insert(k.into(), json!(v));
            }
            Value::Object(m)
        })
        .collect();
    let serial = json!({
        "lost_bytes": view.serial_counters.lost_bytes.load(R),
    });
    json!({ "vcpus": vcpus, "disks": disks, "net": net, "vsock": vsock, "serial": serial })
}

/// Streams the serial console; a writer (an admin who asked with
/// `?mode=rw`, already checked) who finds no other writer may also type
/// into it.
fn console(mut stream: UnixStream, ctx: &ApiContext, wants_write: bool) {
    let writer = wants_write && {
        let mut w = ctx.console_writer.lock().unwrap_or_else(|p| p.into_inner());
        !std::mem::replace(&mut *w, true)
    };
    if wants_write && !writer {
        let _ = http::respond_error(
            &mut stream,
            409,
            "another client is typing into the console",
            true,
        );
        return;
    }
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nX-Keel-Console: {}\r\nConnection: close\r\n\r\n",
        if writer { "rw" } else { "ro" }
    );
    let _ = stream.set_read_timeout(None);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    // Subscribed before the answer: whatever the guest prints once the
    // client has its 200 reaches it.
    let (id, rx) = ctx.console_hub.subscribe();
    if stream.write_all(head.as_bytes()).is_err() {
        ctx.console_hub.unsubscribe(id);
        release_writer(ctx, writer);
        return;
    }
    info!(
        "api: console attached ({})",
        if writer { "read-write" } else { "read-only" }
    );
    // Set by the writer's input thread once the client has closed its
    // connection (a half-close, end of its input, is not that).
    let gone = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let input = if writer {
            stream.try_clone().ok().and_then(|s| {
                let gone = &gone;
                std::thread::Builder::new()
                    .name("keel-api-console-in".into())
                    .spawn_scoped(scope, move || {
                        console_input(&s, &ctx.serial);
                        gone.store(true, SeqCst);
                        // The slot is free the moment the writer is gone,
                        // not when the guest next prints.
                        release_writer(ctx, true);
                    })
                    .ok()
            })
        } else {
            None
        };
        let mut out = Vec::with_capacity(4096);
        loop {
            if ctx.control.status.state() == VmState::Stopped || gone.load(SeqCst) {
                break;
            }
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(b) => {
                    out.push(b);
                    out.extend(rx.try_iter().take(4095));
                    if stream.write_all(&out).is_err() {
                        break;
                    }
                    out.clear();
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    // Notice a watcher that went away while the guest is
                    // quiet (a writer's input thread watches for that).
                    if input.is_none() && hung_up(&stream, 0) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        ctx.console_hub.unsubscribe(id);
        // Wakes the input thread, which then frees the writer slot.
        let _ = stream.shutdown(std::net::Shutdown::Both);
        match input {
            Some(t) => {
                let _ = t.join();
            }
            None => release_writer(ctx, writer),
        }
    });
}

fn release_writer(ctx: &ApiContext, writer: bool) {
    if writer {
        *ctx.console_writer.lock().unwrap_or_else(|p| p.into_inner()) = false;
    }
}

/// Whether the connection is hung up: the client closed it entirely (or
/// shut down both directions), or this side shut it down. A client that
/// only half-closed (stopped sending) is not. Waits up to `timeout_ms`
/// (-1: for as long as it takes).
fn hung_up(stream: &UnixStream, timeout_ms: i32) -> bool {
    let mut fds = [libc::pollfd {
        fd: stream.as_raw_fd(),
        events: 0,
        revents: 0,
    }];
    loop {
        // SAFETY: poll reads and writes exactly the one pollfd given, which
        // lives on this stack frame for the whole call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 1, timeout_ms) };
        if r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        // An error of poll itself: treat the connection as unusable.
        return r < 0 || fds[0].revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0;
    }
}

/// Forwards what the client types to the serial port, waiting while the
/// UART's FIFO is full. Returns once the client has hung up: end of its
/// input alone (a half-close) leaves it watching, so this then waits for
/// the full close.
fn console_input(stream: &UnixStream, serial: &Mutex<Serial>) {
    let mut buf = [0u8; 256];
    loop {
        let n = match std::io::Read::read(&mut &*stream, &mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut sent = 0;
        while sent < n {
            let took = serial
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .enqueue_input(&buf[sent..n])
                .unwrap_or(0);
            sent += took;
            if took == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    while !hung_up(stream, -1) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_bodies() {
        let d = Duration::from_secs(120);
        assert_eq!(shutdown_timeout(b"", d), Ok(d));
        assert_eq!(shutdown_timeout(b"{}", d), Ok(d));
        assert_eq!(
            shutdown_timeout(br#"{"timeout_s":5}"#, d),
            Ok(Duration::from_secs(5))
        );
        assert!(shutdown_timeout(br#"{"timeout_s":0}"#, d).is_err());
        assert!(shutdown_timeout(br#"{"timeout":5}"#, d).is_err());
        assert!(shutdown_timeout(b"{not json", d).is_err());
    }

    #[test]
    fn refusals_name_their_status() {
        let peer = Peer {
            pid: 1,
            uid: 1000,
            groups: vec![1000],
        };
        let req = |method: &str, path: &str, query: Option<&str>| Request {
            method: method.into(),
            path: path.into(),
            query: query.map(str::to_string),
            body: Vec::new(),
            close: false,
        };
        let status = |role, r: &Request| check(&peer, role, r).err().map(|r| r.status);
        assert_eq!(
            status(Role::None, &req("GET", "/v1/console", None)),
            Some(403)
        );
        assert_eq!(
            status(Role::ReadOnly, &req("GET", "/v1/console", None)),
            None
        );
        let rw = req("GET", "/v1/console", Some("mode=rw"));
        assert_eq!(status(Role::ReadOnly, &rw), Some(403));
        assert_eq!(status(Role::Admin, &rw), None);
        assert_eq!(
            status(Role::Admin, &req("GET", "/v1/nope", None)),
            Some(404)
        );
        // No role: a 403 (which ends the connection) whatever it asks.
        assert_eq!(status(Role::None, &req("GET", "/v1/nope", None)), Some(403));
        assert_eq!(
            status(Role::None, &req("PUT", "/v1/console", None)),
            Some(403)
        );
        assert_eq!(
            status(Role::Admin, &req("PUT", "/v1/console", None)),
            Some(405)
        );
        assert_eq!(
            status(Role::ReadOnly, &req("PUT", "/v1/vm/stop", None)),
            Some(403)
        );
    }

    #[test]
    fn only_a_stale_socket_is_replaced() {
        let dir = std::env::temp_dir().join(format!("keel-api-listener-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A regular file where the socket goes: an error, and kept.
        let file = dir.join("file.sock");
        std::fs::write(&file, b"precious").unwrap();
        let e = listener(Some(&file), None).unwrap_err().to_string();
        assert!(e.contains("not removing"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");
        // A socket nobody serves: replaced.
        let stale = dir.join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        let serving = listener(Some(&stale), None).unwrap();
        assert!(serving.is_some());
        // A socket someone serves: kept.
        let e = listener(Some(&stale), None).unwrap_err().to_string();
        assert!(e.contains("another process"), "{e}");
        drop(serving);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn openapi_file_lists_exactly_the_routes() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../resources/api/openapi.json"
        ))
        .expect("resources/api/openapi.json");
        let doc: Value = serde_json::from_str(&text).expect("valid JSON");
        let mut documented: Vec<(String, String)> = Vec::new();
        for (path, ops) in doc["paths"].as_object().expect("paths") {
            for method in ops.as_object().expect("operations").keys() {
                documented.push((method.to_uppercase(), path.clone()));
            }
        }
        documented.sort();
        let mut served: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p, _)| (m.to_string(), p.to_string()))
            .collect();
        served.sort();
        assert_eq!(documented, served);
    }
}
