//! Test harness: a throwaway CA and HTTPS server on loopback, a fake Keel
//! control API on a Unix socket, six files as slot volumes, and the agent
//! binary run as a subprocess.
#![allow(dead_code)]

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const MIB: usize = 1 << 20;
pub const BOOT_SIZE: usize = 2 * MIB;
pub const ROOT_SIZE: usize = 4 * MIB;
pub const VAR_SIZE: usize = 17 * MIB;
pub const WIPE: usize = 16 * MIB;

pub fn agent_bin() -> &'static str {
    env!("CARGO_BIN_EXE_keel-agent")
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// An update image: tar (+ zstd) of the given entries.
pub fn make_image(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        tar.append_data(&mut h, name, *data).unwrap();
    }
    let raw = tar.into_inner().unwrap();
    // Like the zstd CLI: with the frame checksum, so corruption is detected.
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    enc.include_checksum(true).unwrap();
    enc.write_all(&raw).unwrap();
    enc.finish().unwrap()
}

pub struct Image {
    pub boot: Vec<u8>,
    pub root: Vec<u8>,
    pub archive: Vec<u8>,
    pub hash: String,
}

/// A normal image: sizes deliberately not multiples of the copy chunk.
pub fn standard_image(seed: u64) -> Image {
    let boot = pattern(seed, MIB + MIB / 2 + 17);
    let root = pattern(seed + 1, 3 * MIB + 5);
    let archive = make_image(&[
        ("./boot.img", &boot),
        ("version.txt", b"2.0.0\n"),
        ("./root.img", &root),
    ]);
    let hash = sha256_hex(&archive);
    Image {
        boot,
        root,
        archive,
        hash,
    }
}

// ---------------------------------------------------------------- HTTPS server

#[derive(Clone)]
pub enum Route {
    /// 200 with Content-Length.
    Ok(Arc<Vec<u8>>),
    /// Announces the full length, sends half, closes.
    Truncated(Arc<Vec<u8>>),
    /// 200 without Content-Length: the body ends when the connection closes.
    NoLength(Arc<Vec<u8>>),
    Status(u16),
    /// Sends half, pauses, sends the rest.
    Stall(Arc<Vec<u8>>, Duration),
}

pub struct Https {
    pub port: u16,
    pub ca_file: PathBuf,
    routes: Arc<Mutex<HashMap<String, Route>>>,
    pub hits: Arc<AtomicUsize>,
}

impl Https {
    pub fn start(dir: &Path) -> Https {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "keel-agent test CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        let ca_file = dir.join("test-ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let routes: Arc<Mutex<HashMap<String, Route>>> = Arc::default();
        let hits = Arc::new(AtomicUsize::new(0));
        let (r2, h2) = (routes.clone(), hits.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(tcp) = conn else { continue };
                let (config, routes, hits) = (config.clone(), r2.clone(), h2.clone());
                std::thread::spawn(move || {
                    let _ = serve_tls(tcp, config, routes, hits);
                });
            }
        });
        Https {
            port,
            ca_file,
            routes,
            hits,
        }
    }

    pub fn route(&self, path: &str, r: Route) -> String {
        self.routes.lock().unwrap().insert(path.to_string(), r);
        format!("https://localhost:{}{path}", self.port)
    }
}

fn serve_tls(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
    routes: Arc<Mutex<HashMap<String, Route>>>,
    hits: Arc<AtomicUsize>,
) -> std::io::Result<()> {
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let conn = rustls::ServerConnection::new(config).map_err(std::io::Error::other)?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b)? == 0 {
            return Ok(());
        }
        head.push(b[0]);
    }
    hits.fetch_add(1, Ordering::SeqCst);
    let head = String::from_utf8_lossy(&head).to_string();
    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
    let route = routes.lock().unwrap().get(&path).cloned();
    match route {
        Some(Route::Ok(body)) => {
            write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            s.write_all(&body)?;
        }
        Some(Route::Truncated(body)) => {
            write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            s.write_all(&body[..body.len() / 2])?;
        }
        Some(Route::NoLength(body)) => {
            write!(s, "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")?;
            for c in body.chunks(64 * 1024) {
                if s.write_all(c).is_err() {
                    return Ok(());
                }
            }
        }
        Some(Route::Stall(body, pause)) => {
            write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            s.write_all(&body[..body.len() / 2])?;
            s.flush()?;
            std::thread::sleep(pause);
            s.write_all(&body[body.len() / 2..])?;
        }
        Some(Route::Status(code)) => {
            write!(
                s,
                "HTTP/1.1 {code} Nope\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )?;
        }
        None => {
            write!(
                s,
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )?;
        }
    }
    s.conn.send_close_notify();
    s.flush()?;
    Ok(())
}

// ------------------------------------------------------------- fake Keel API

#[derive(Default)]
pub struct KeelState {
    pub state: String,
    /// `guest_boot` of `GET /v1/vm` (the boot monitor's outcome).
    pub guest_boot: String,
    pub shutdown_bodies: Vec<String>,
    pub requests: Vec<String>,
}

pub struct FakeKeel {
    pub socket: PathBuf,
    pub state: Arc<Mutex<KeelState>>,
}

pub fn fake_counters() -> serde_json::Value {
    serde_json::json!({
        "vcpus": [
            {"index": 0, "exits": {"io_in": 11, "io_out": 12, "mmio_read": 13, "mmio_write": 14, "other": 0}},
            {"index": 1, "exits": {"io_in": 21, "io_out": 22, "mmio_read": 23, "mmio_write": 24, "other": 1}}
        ],
        "disks": [{"index": 0, "read_ops": 5, "read_bytes": 20480, "write_ops": 2, "write_bytes": 8192,
                   "flush_ops": 1, "discard_ops": 0, "write_zeroes_ops": 0, "invalid_requests": 0,
                   "unsupported_requests": 0, "io_errors": 0}],
        "net": [],
        "vsock": null,
        "something_new": {"nested": {"value": 7}, "label": "ignored"}
    })
}

impl FakeKeel {
    pub fn start(socket: PathBuf) -> FakeKeel {
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).unwrap();
        let state = Arc::new(Mutex::new(KeelState {
            state: "running".into(),
            guest_boot: "pending".into(),
            ..Default::default()
        }));
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(c) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = fake_keel_conn(c, st);
                });
            }
        });
        FakeKeel { socket, state }
    }
}

fn fake_keel_conn(c: UnixStream, st: Arc<Mutex<KeelState>>) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut r = BufReader::new(c.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut parts = line.split(' ');
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        if h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    let body = String::from_utf8_lossy(&body).to_string();
    let (status, resp) = {
        let mut s = st.lock().unwrap();
        s.requests.push(format!("{method} {path}"));
        match (method.as_str(), path.as_str()) {
            ("GET", "/v1/vm") => (
                200,
                serde_json::json!({"state": s.state, "guest_boot": s.guest_boot, "uptime_s": 12.5, "pid": 4242, "vcpus": 2, "memory_mib": 512})
                    .to_string(),
            ),
            ("GET", "/v1/counters") => (200, fake_counters().to_string()),
            ("PUT", "/v1/vm/shutdown") => {
                s.shutdown_bodies.push(body);
                s.state = "stopped".into();
                (202, "{}".to_string())
            }
            _ => (404, "{\"error\":\"no such endpoint\"}".to_string()),
        }
    };
    // Chunked, to exercise the client's decoder.
    let mut w = c;
    write!(
        w,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{resp}\r\n0\r\n\r\n",
        resp.len()
    )?;
    Ok(())
}

// ---------------------------------------------------------------- environment

pub struct Options {
    pub max_download_bytes: u64,
    pub extra_ca: bool,
    pub read_timeout_s: f64,
    pub total_timeout_s: f64,
    pub upgrade_vm_unit: Option<String>,
    pub metrics_tls: bool,
    pub download_timeout_s: u64,
    /// `notify_interval_s` (unset: the agent's default, 2 s).
    pub notify_interval_s: Option<f64>,
    /// Replace a volume path (slot, kind) -> path.
    pub volume_override: Vec<(&'static str, &'static str, PathBuf)>,
    /// `upgrade_url_hosts` (empty: not set).
    pub upgrade_url_hosts: Vec<&'static str>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_download_bytes: 64 << 20,
            extra_ca: true,
            read_timeout_s: 5.0,
            total_timeout_s: 30.0,
            upgrade_vm_unit: Some("guestos-upgrader.service".into()),
            metrics_tls: false,
            download_timeout_s: 20,
            notify_interval_s: None,
            volume_override: vec![],
            upgrade_url_hosts: vec![],
        }
    }
}

pub struct Env {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub sock: PathBuf,
    pub grubenv: PathBuf,
    pub marker: PathBuf,
    pub systemctl_log: PathBuf,
    pub consoles: Vec<PathBuf>,
    pub textfile: PathBuf,
    pub metrics_port: u16,
    pub keel: FakeKeel,
    pub https: Https,
    pub initial: HashMap<String, Vec<u8>>,
    pub initial_grubenv: Vec<u8>,
    child: Option<Child>,
    pub log: PathBuf,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh scratch directory (`/tmp/keel-agent-<name>-<pid>-<n>`), removed
/// when dropped unless the thread is panicking (a failed test keeps it).
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn new(name: &str) -> ScratchDir {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir =
            std::env::temp_dir().join(format!("keel-agent-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        ScratchDir(dir)
    }
}

impl std::ops::Deref for ScratchDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for ScratchDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_script(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

pub fn grubenv_bytes(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut env = host_agent::grubenv::GrubEnv::new();
    for (k, v) in pairs {
        env.set(k, v);
    }
    env.encode().unwrap()
}

impl Env {
    pub fn new(name: &str, opts: Options) -> Env {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir =
            std::env::temp_dir().join(format!("keel-agent-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("vol")).unwrap();
        std::fs::create_dir_all(dir.join("grub")).unwrap();
        std::fs::create_dir_all(dir.join("state")).unwrap();
        std::fs::create_dir_all(dir.join("textfile")).unwrap();
        let mut initial = HashMap::new();
        for (si, slot) in ["A", "B"].iter().enumerate() {
            for (ki, (kind, size)) in [("boot", BOOT_SIZE), ("root", ROOT_SIZE), ("var", VAR_SIZE)]
                .iter()
                .enumerate()
            {
                let data = pattern((si * 10 + ki + 100) as u64, *size);
                let p = dir.join("vol").join(format!("{slot}_{kind}"));
                std::fs::write(&p, &data).unwrap();
                initial.insert(format!("{slot}_{kind}"), data);
            }
        }
        let grubenv = dir.join("grub").join("grubenv");
        let initial_grubenv = grubenv_bytes(&[("boot_alternative", "A"), ("boot_cycle", "stable")]);
        std::fs::write(&grubenv, &initial_grubenv).unwrap();
        std::fs::write(dir.join("version.txt"), "1.2.3-test\n").unwrap();
        let consoles = vec![dir.join("tty1"), dir.join("ttyS0")];
        for c in &consoles {
            std::fs::write(c, "").unwrap();
        }
        let marker = dir.join("rebooted");
        write_script(
            &dir.join("reboot.sh"),
            &format!("echo \"reboot $*\" >> {}", marker.display()),
        );
        let systemctl_log = dir.join("systemctl.log");
        write_script(
            &dir.join("systemctl"),
            &format!(
                "echo \"$@\" >> {log}\nif [ -e {fail} ]; then echo 'Job for unit failed' >&2; exit 1; fi\nexit 0",
                log = systemctl_log.display(),
                fail = dir.join("systemctl.fail").display()
            ),
        );
        let keel = FakeKeel::start(dir.join("keel-api.sock"));
        let https = Https::start(&dir);
        let metrics_port = free_port();
        let sock = dir.join("run").join("vsock.sock_19090");
        let textfile = dir.join("textfile").join("keel_agent.prom");
        let vol = |slot: &str, kind: &str| -> PathBuf {
            opts.volume_override
                .iter()
                .find(|(s, k, _)| *s == slot && *k == kind)
                .map(|(_, _, p)| p.clone())
                .unwrap_or_else(|| dir.join("vol").join(format!("{slot}_{kind}")))
        };
        let mut toml = format!(
            r#"guest_cid = 3
vsock_socket = "{sock}"
version_file = "{dir}/version.txt"
state_dir = "{dir}/state"
grubenv = "{grubenv}"
keel_api_socket = "{api}"
reboot_command = ["{dir}/reboot.sh", "now"]
systemctl = "{dir}/systemctl"
consoles = ["{c0}", "{c1}"]
max_download_bytes = {max}
download_timeout_s = {dl_timeout}
shutdown_timeout_s = 120
"#,
            sock = sock.display(),
            dir = dir.display(),
            grubenv = grubenv.display(),
            api = keel.socket.display(),
            c0 = consoles[0].display(),
            c1 = consoles[1].display(),
            max = opts.max_download_bytes,
            dl_timeout = opts.download_timeout_s,
        );
        if let Some(n) = opts.notify_interval_s {
            toml.push_str(&format!("notify_interval_s = {n:?}\n"));
        }
        if !opts.upgrade_url_hosts.is_empty() {
            toml.push_str(&format!(
                "upgrade_url_hosts = {:?}\n",
                opts.upgrade_url_hosts
            ));
        }
        if let Some(u) = &opts.upgrade_vm_unit {
            toml.push_str(&format!("upgrade_vm_unit = \"{u}\"\n"));
        }
        if opts.extra_ca {
            toml.push_str(&format!(
                "extra_ca_file = \"{}\"\nsystem_ca_file = \"{}/no-system-bundle.pem\"\n",
                https.ca_file.display(),
                dir.display()
            ));
        }
        toml.push_str(&format!(
            "[vsock]\nread_timeout_s = {}\ntotal_timeout_s = {}\nmax_request_bytes = 65536\n",
            opts.read_timeout_s, opts.total_timeout_s
        ));
        toml.push_str(&format!(
            "[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\ntextfile = \"{}\"\ninterval_s = 1\n",
            textfile.display()
        ));
        if opts.metrics_tls {
            toml.push_str(&format!(
                "tls_cert = \"{d}/server.pem\"\ntls_key = \"{d}/server.key\"\n",
                d = dir.display()
            ));
        }
        for slot in ["A", "B"] {
            toml.push_str(&format!(
                "[volumes.{slot}]\nboot = \"{}\"\nroot = \"{}\"\nvar = \"{}\"\n",
                vol(slot, "boot").display(),
                vol(slot, "root").display(),
                vol(slot, "var").display()
            ));
        }
        let config = dir.join("keel-agent.toml");
        std::fs::write(&config, toml).unwrap();
        let log = dir.join("agent.log");
        Env {
            dir,
            config,
            sock,
            grubenv,
            marker,
            systemctl_log,
            consoles,
            textfile,
            metrics_port,
            keel,
            https,
            initial,
            initial_grubenv,
            child: None,
            log,
        }
    }

    /// Start `keel-agent serve`, optionally with a crash point.
    pub fn start(&mut self, abort_at: Option<&str>) {
        let _ = std::fs::remove_file(&self.sock);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(agent_bin());
        cmd.args(["--config", self.config.to_str().unwrap(), "serve"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .env_remove(host_agent::fault::ENV);
        if let Some(p) = abort_at {
            cmd.env(host_agent::fault::ENV, p);
        }
        let mut child = cmd.spawn().unwrap();
        let t0 = Instant::now();
        while !self.sock.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("agent exited at start ({st}):\n{}", self.log_text());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "agent did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The metrics listener is bound before the vsock socket is served.
        self.child = Some(child);
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait for the agent to exit (after a crash point).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("agent not running");
        let t0 = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if t0.elapsed() > timeout {
                let _ = child.kill();
                panic!("agent did not exit:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Send one request the way the HostOS guest client does (write, then
    /// half-close) and read the answer to EOF.
    pub fn request(&self, json: &str) -> String {
        let mut s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        s.write_all(json.as_bytes()).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    pub fn upgrade_request(&self, url: &str, hash: &str) -> String {
        serde_json::json!({"sender_cid": 3, "message": {"upgrade": {"url": url, "target-hash": hash}}})
            .to_string()
    }

    pub fn volume(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.join("vol").join(name)).unwrap()
    }

    pub fn grubenv_now(&self) -> Vec<u8> {
        std::fs::read(&self.grubenv).unwrap()
    }

    /// The active slot A and grubenv are exactly as at the start.
    pub fn assert_active_untouched(&self) {
        for k in ["A_boot", "A_root", "A_var"] {
            assert!(self.volume(k) == self.initial[k], "{k} changed");
        }
        assert_eq!(self.grubenv_now(), self.initial_grubenv, "grubenv changed");
    }

    pub fn assert_inactive_untouched(&self) {
        for k in ["B_boot", "B_root", "B_var"] {
            assert!(self.volume(k) == self.initial[k], "{k} changed");
        }
    }

    /// Slot `slot` holds `img` (boot/root prefixes, var wiped), the rest of
    /// each volume as before.
    pub fn assert_slot_has(&self, slot: &str, img: &Image) {
        let boot = self.volume(&format!("{slot}_boot"));
        let root = self.volume(&format!("{slot}_root"));
        let var = self.volume(&format!("{slot}_var"));
        assert_eq!(boot.len(), BOOT_SIZE);
        assert!(
            boot[..img.boot.len()] == img.boot[..],
            "{slot}_boot content"
        );
        assert!(boot[img.boot.len()..] == self.initial[&format!("{slot}_boot")][img.boot.len()..]);
        assert_eq!(root.len(), ROOT_SIZE);
        assert!(
            root[..img.root.len()] == img.root[..],
            "{slot}_root content"
        );
        assert_eq!(var.len(), VAR_SIZE);
        assert!(var[..WIPE].iter().all(|&b| b == 0), "{slot}_var not wiped");
        assert!(var[WIPE..] == self.initial[&format!("{slot}_var")][WIPE..]);
    }

    /// Fetch the metrics endpoint (plain HTTP).
    pub fn scrape(&self, openmetrics: bool) -> (String, String) {
        let mut s = TcpStream::connect(("127.0.0.1", self.metrics_port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let accept = if openmetrics {
            "Accept: application/openmetrics-text;version=1.0.0\r\n"
        } else {
            ""
        };
        write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n{accept}\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        (head.to_string(), body.to_string())
    }

    pub fn wait_for(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !f() {
            assert!(
                t0.elapsed() < timeout,
                "timed out waiting for {what}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn run_cli(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(agent_bin())
            .args(["--config", self.config.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.stop();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!(
                "kept {} for inspection; agent log:\n{}",
                self.dir.display(),
                self.log_text()
            );
        }
    }
}

/// Parse Prometheus/OpenMetrics text into `series -> value`
/// (series = `name{labels}` exactly as written).
pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = match line.rfind('}') {
            Some(i) => (&line[..=i], line[i + 1..].trim()),
            None => {
                let (a, b) = line
                    .split_once(' ')
                    .unwrap_or_else(|| panic!("bad line {line:?}"));
                (a, b.trim())
            }
        };
        let value: f64 = value
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        out.insert(series.to_string(), value);
    }
    out
}
