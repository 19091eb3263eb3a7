//! Metrics: HostOS's gauges, the agent's own counters, and Keel's counters
//! (read from its control API), encoded with `prometheus-client`.
//!
//! Served two ways: an HTTP endpoint (`GET /metrics`; OpenMetrics when the
//! scraper asks for it, else Prometheus text 0.0.4; optional TLS) and a
//! `.prom` file for node_exporter's textfile collector, replaced atomically.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::grubenv::{BootCycle, BootState};
use crate::keel_api::ApiError;
use crate::Agent;

type Labels = Vec<(String, String)>;
type F64Gauge = Gauge<f64, AtomicU64>;

/// Reasons an upgrade can fail (label values of `keel_agent_upgrades_failed_total`).
pub const FAILURE_REASONS: &[&str] = &[
    "invalid_request",
    "busy",
    "not_stable",
    "boot_state",
    "download",
    "too_large",
    "hash_mismatch",
    "archive",
    "volume",
    "commit",
];

pub const UPGRADE_PHASES: &[&str] = &[
    "idle",
    "checking",
    "downloading",
    "validating",
    "writing",
    "committing",
    "committed",
    "shutting-down-guest",
    "rebooting",
];

#[derive(Default)]
struct Inner {
    upgrades_started: u64,
    upgrades_succeeded: u64,
    upgrades_failed: BTreeMap<&'static str, u64>,
    phase: &'static str,
    download_bytes: u64,
    download_expected: Option<u64>,
    written_bytes: u64,
    last_success: Option<f64>,
    last_failure: Option<f64>,
    reboots: u64,
    vsock_requests: BTreeMap<(String, &'static str), u64>,
    vsock_rejected: BTreeMap<&'static str, u64>,
}

/// The agent's own counters.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
    dirty: AtomicBool,
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }
    pub fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::SeqCst);
    }
    pub fn upgrade_started(&self) {
        self.with(|i| {
            i.upgrades_started += 1;
            i.download_bytes = 0;
            i.download_expected = None;
            i.written_bytes = 0;
        });
        self.mark_dirty();
    }
    pub fn upgrade_succeeded(&self) {
        self.with(|i| {
            i.upgrades_succeeded += 1;
            i.last_success = Some(now_unix());
        });
        self.mark_dirty();
    }
    pub fn upgrade_failed(&self, reason: &'static str) {
        self.with(|i| {
            *i.upgrades_failed.entry(reason).or_default() += 1;
            i.last_failure = Some(now_unix());
            if reason != "busy" {
                // (A "busy" refusal leaves the running upgrade's phase alone.)
                i.phase = "idle";
            }
        });
        self.mark_dirty();
    }
    pub fn set_phase(&self, phase: &'static str) {
        self.with(|i| i.phase = phase);
        self.mark_dirty();
    }
    pub fn set_download(&self, bytes: u64, expected: Option<u64>) {
        self.with(|i| {
            i.download_bytes = bytes;
            i.download_expected = expected;
        });
    }
    pub fn add_written(&self, n: u64) {
        self.with(|i| i.written_bytes += n);
    }
    pub fn reboot_requested(&self) {
        self.with(|i| i.reboots += 1);
        self.mark_dirty();
    }
    pub fn vsock_request(&self, command: &str, ok: bool) {
        self.with(|i| {
            *i.vsock_requests
                .entry((command.to_string(), if ok { "ok" } else { "err" }))
                .or_default() += 1
        });
    }
    pub fn vsock_rejected(&self, reason: &'static str) {
        self.with(|i| *i.vsock_rejected.entry(reason).or_default() += 1);
    }
    /// Current counts, for tests and `status`.
    pub fn upgrade_counts(&self) -> (u64, u64, BTreeMap<&'static str, u64>) {
        self.with(|i| {
            (
                i.upgrades_started,
                i.upgrades_succeeded,
                i.upgrades_failed.clone(),
            )
        })
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn gauge(reg: &mut Registry, name: &str, help: &str, value: f64) {
    let g = F64Gauge::default();
    g.set(value);
    reg.register(name, help, g);
}

fn gauge_family(reg: &mut Registry, name: &str, help: &str, samples: Vec<(Labels, f64)>) {
    let f = Family::<Labels, F64Gauge>::default();
    for (l, v) in samples {
        f.get_or_create(&l).set(v);
    }
    reg.register(name, help, f);
}

fn counter(reg: &mut Registry, name: &str, help: &str, value: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(value);
    reg.register(name, help, c);
}

fn counter_family(reg: &mut Registry, name: &str, help: &str, samples: Vec<(Labels, u64)>) {
    let f = Family::<Labels, Counter<u64>>::default();
    for (l, v) in samples {
        f.get_or_create(&l).inc_by(v);
    }
    reg.register(name, help, f);
}

/// HostOS's `hostos_guestos_state`: 0 running, 1 undefined, 2 not running.
pub fn guestos_state(api: &Result<String, ApiError>) -> f64 {
    match api {
        Ok(s) if s == "running" => 0.0,
        Ok(s) if s == "stopped" || s == "shutting-down" => 2.0,
        Ok(_) => 1.0,
        Err(ApiError::Unavailable(..)) => 2.0,
        Err(_) => 1.0,
    }
}

/// The boot monitor's outcomes, as Keel's `GET /v1/vm` names them.
pub const GUEST_BOOT_STATES: [&str; 5] = ["pending", "success", "failure", "timeout", "off"];

/// `keel_guest_boot{state=...}`: 1 for the boot monitor's current outcome
/// (`guest_boot` of `GET /v1/vm`), 0 for the others; nothing when Keel
/// did not answer or reports no known outcome.
pub fn guest_boot_samples(vm: Option<&serde_json::Value>) -> Vec<(Labels, f64)> {
    let Some(now) = vm
        .and_then(|v| v.get("guest_boot"))
        .and_then(|b| b.as_str())
        .filter(|b| GUEST_BOOT_STATES.contains(b))
    else {
        return Vec::new();
    };
    GUEST_BOOT_STATES
        .iter()
        .map(|s| {
            (
                labels(&[("vm", "guestos"), ("state", s)]),
                if *s == now { 1.0 } else { 0.0 },
            )
        })
        .collect()
}

/// `hostos_boot_action`: 0 normal (stable), 1 an upgrade is installed and
/// waits for its first boot (or `install`), 2 the running slot is not
/// confirmed and the next boot rolls back (`failsafe_check`).
pub fn boot_action(cycle: &BootCycle) -> f64 {
    match cycle {
        BootCycle::Stable => 0.0,
        BootCycle::FailsafeCheck => 2.0,
        _ => 1.0,
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Num {
    U(u64),
    F(f64),
}

fn sanitize_name(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() {
        out.push('_');
    }
    out
}

/// Flatten every numeric leaf of a JSON document into `name -> [(labels, value)]`.
/// Array elements become a label: `index` (the element's own `index` field if
/// it has one, else its position); nested arrays use `<key>_index`.
fn flatten(
    v: &serde_json::Value,
    name: &str,
    key: &str,
    labels: &mut Labels,
    out: &mut BTreeMap<String, Vec<(Labels, Num)>>,
) {
    use serde_json::Value;
    match v {
        Value::Number(n) => {
            let num = match n.as_u64() {
                Some(u) => Num::U(u),
                None => Num::F(n.as_f64().unwrap_or(f64::NAN)),
            };
            out.entry(name.to_string())
                .or_default()
                .push((labels.clone(), num));
        }
        Value::Bool(b) => {
            out.entry(name.to_string())
                .or_default()
                .push((labels.clone(), Num::F(if *b { 1.0 } else { 0.0 })));
        }
        Value::Object(map) => {
            let in_element = !labels.is_empty() && map.contains_key("index");
            for (k, child) in map {
                if k == "index" && in_element {
                    continue;
                }
                let k = sanitize_name(k);
                flatten(child, &format!("{name}_{k}"), &k, labels, out);
            }
        }
        Value::Array(items) => {
            let label = if labels.iter().any(|(l, _)| l == "index") {
                format!("{key}_index")
            } else {
                "index".to_string()
            };
            for (pos, item) in items.iter().enumerate() {
                let idx = item
                    .get("index")
                    .and_then(|i| i.as_u64())
                    .unwrap_or(pos as u64);
                labels.push((label.clone(), idx.to_string()));
                flatten(item, name, key, labels, out);
                labels.pop();
            }
        }
        Value::Null | Value::String(_) => {}
    }
}

/// Leaves that look like levels rather than running totals stay gauges.
fn gaugey(name: &str) -> bool {
    const WORDS: &[&str] = &[
        "latency", "max", "min", "avg", "mean", "depth", "inflight", "current", "size", "last",
        "uptime", "pid", "seconds", "capacity", "state", "len",
    ];
    name.split('_').skip(1).any(|c| WORDS.contains(&c))
        || name.ends_with("_s")
        || name.ends_with("_in_flight")
}

fn register_flat(
    reg: &mut Registry,
    flat: BTreeMap<String, Vec<(Labels, Num)>>,
    counters_allowed: bool,
    help: &str,
) {
    for (name, samples) in flat {
        let all_u = samples.iter().all(|(_, n)| matches!(n, Num::U(_)));
        let no_labels = samples.len() == 1 && samples[0].0.is_empty();
        if counters_allowed && all_u && !gaugey(&name) {
            let vals = samples
                .into_iter()
                .map(|(l, n)| (l, if let Num::U(u) = n { u } else { 0 }))
                .collect::<Vec<_>>();
            if no_labels {
                counter(reg, &name, help, vals[0].1);
            } else {
                counter_family(reg, &name, help, vals);
            }
        } else {
            let vals = samples
                .into_iter()
                .map(|(l, n)| {
                    (
                        l,
                        match n {
                            Num::U(u) => u as f64,
                            Num::F(f) => f,
                        },
                    )
                })
                .collect::<Vec<_>>();
            if no_labels {
                gauge(reg, &name, help, vals[0].1);
            } else {
                gauge_family(reg, &name, help, vals);
            }
        }
    }
}

/// Register Keel's `/v1/vm` and `/v1/counters` under `keel_`.
pub fn register_keel(
    reg: &mut Registry,
    vm: Option<&serde_json::Value>,
    counters: Option<&serde_json::Value>,
) {
    if let Some(vm) = vm {
        let mut flat = BTreeMap::new();
        flatten(vm, "keel_vm", "vm", &mut Vec::new(), &mut flat);
        register_flat(reg, flat, false, "Keel VM information (GET /v1/vm)");
    }
    if let Some(c) = counters {
        let mut flat = BTreeMap::new();
        flatten(c, "keel", "", &mut Vec::new(), &mut flat);
        // A counters document whose keys collide with /v1/vm's would register twice.
        flat.retain(|k, _| !k.starts_with("keel_vm_"));
        register_flat(reg, flat, true, "Keel VMM counter (GET /v1/counters)");
    }
}

/// Encode everything (OpenMetrics text).
pub fn render(agent: &Agent) -> String {
    let cfg = &agent.config;
    let mut reg = Registry::default();

    // Keel.
    let vm = agent.api.vm();
    let state = match &vm {
        Ok(v) => v
            .get("state")
            .and_then(|s| s.as_str())
            .map(str::to_string)
            .ok_or_else(|| ApiError::Protocol("no state".into())),
        Err(ApiError::Unavailable(p, e)) => Err(ApiError::Unavailable(
            p.clone(),
            std::io::Error::new(e.kind(), e.to_string()),
        )),
        Err(e) => Err(ApiError::Protocol(e.to_string())),
    };
    gauge_family(
        &mut reg,
        "hostos_guestos_state",
        "GuestOS VM state: 0 running, 1 undefined, 2 not running",
        vec![(labels(&[("vm", "guestos")]), guestos_state(&state))],
    );
    gauge(
        &mut reg,
        "keel_api_up",
        "Whether Keel's control API answered",
        if vm.is_ok() { 1.0 } else { 0.0 },
    );
    let counters = if vm.is_ok() {
        agent.api.counters().ok()
    } else {
        None
    };
    register_keel(&mut reg, vm.as_ref().ok(), counters.as_ref());
    let boot = guest_boot_samples(vm.as_ref().ok());
    if !boot.is_empty() {
        gauge_family(
            &mut reg,
            "keel_guest_boot",
            "GuestOS boot as Keel's boot monitor sees it: 1 for the current state (pending, success, failure, timeout; off without the monitor)",
            boot,
        );
    }

    // Boot slots.
    match BootState::load(&cfg.grubenv) {
        Ok(st) => {
            gauge(
                &mut reg,
                "hostos_boot_stable",
                "HostOS is boot stable",
                if st.is_stable() { 1.0 } else { 0.0 },
            );
            gauge_family(
                &mut reg,
                "hostos_boot_action",
                "HostOS boot action: 0 stable, 1 upgrade installed (awaiting first boot), 2 unconfirmed (next boot rolls back)",
                vec![(
                    labels(&[
                        ("current", st.current().as_str()),
                        ("next_boot", st.next_boot().as_str()),
                        ("boot_cycle", st.cycle.as_str()),
                    ]),
                    boot_action(&st.cycle),
                )],
            );
        }
        Err(e) => {
            log::warn!("metrics: {e}");
            gauge(&mut reg, "hostos_boot_stable", "HostOS is boot stable", 0.0);
        }
    }
    let version = read_version(&cfg.version_file);
    gauge_family(
        &mut reg,
        "hostos_version",
        "HostOS version string",
        vec![(
            labels(&[("version", version.as_deref().unwrap_or("unknown"))]),
            if version.is_some() { 1.0 } else { 0.0 },
        )],
    );

    // The agent.
    let i = agent.metrics.with(|i| {
        (
            i.upgrades_started,
            i.upgrades_succeeded,
            i.upgrades_failed.clone(),
            i.phase,
            i.download_bytes,
            i.download_expected,
            i.written_bytes,
            i.last_success,
            i.last_failure,
            i.reboots,
            i.vsock_requests.clone(),
            i.vsock_rejected.clone(),
        )
    });
    let (
        started,
        succeeded,
        failed,
        phase,
        dl,
        dl_exp,
        written,
        last_ok,
        last_err,
        reboots,
        reqs,
        rej,
    ) = i;
    counter(
        &mut reg,
        "keel_agent_upgrades_started",
        "Upgrades requested by the guest",
        started,
    );
    counter(
        &mut reg,
        "keel_agent_upgrades_succeeded",
        "Upgrades installed and committed",
        succeeded,
    );
    counter_family(
        &mut reg,
        "keel_agent_upgrades_failed",
        "Upgrades that failed, by reason",
        FAILURE_REASONS
            .iter()
            .map(|r| {
                (
                    labels(&[("reason", r)]),
                    failed.get(r).copied().unwrap_or(0),
                )
            })
            .collect(),
    );
    let phase = if phase.is_empty() { "idle" } else { phase };
    gauge_family(
        &mut reg,
        "keel_agent_upgrade_phase",
        "Current upgrade phase (1 for the current one)",
        UPGRADE_PHASES
            .iter()
            .map(|p| (labels(&[("phase", p)]), if *p == phase { 1.0 } else { 0.0 }))
            .collect(),
    );
    gauge(
        &mut reg,
        "keel_agent_upgrade_download_bytes",
        "Bytes downloaded by the current or last upgrade",
        dl as f64,
    );
    gauge(
        &mut reg,
        "keel_agent_upgrade_download_expected_bytes",
        "Size announced for the current or last download (-1: unknown)",
        dl_exp.map_or(-1.0, |n| n as f64),
    );
    gauge(
        &mut reg,
        "keel_agent_upgrade_written_bytes",
        "Bytes written to the inactive slot by the current or last upgrade",
        written as f64,
    );
    if let Some(t) = last_ok {
        gauge(
            &mut reg,
            "keel_agent_upgrade_last_success_timestamp_seconds",
            "When the last upgrade was committed",
            t,
        );
    }
    if let Some(t) = last_err {
        gauge(
            &mut reg,
            "keel_agent_upgrade_last_failure_timestamp_seconds",
            "When the last upgrade failed",
            t,
        );
    }
    counter(
        &mut reg,
        "keel_agent_reboots_requested",
        "Reboot commands run after an upgrade",
        reboots,
    );
    counter_family(
        &mut reg,
        "keel_agent_vsock_requests",
        "Guest vsock requests, by command and result",
        reqs.into_iter()
            .map(|((c, r), n)| (labels(&[("command", &c), ("result", r)]), n))
            .collect(),
    );
    counter_family(
        &mut reg,
        "keel_agent_vsock_rejected",
        "Guest vsock requests refused before dispatch, by reason",
        rej.into_iter()
            .map(|(r, n)| (labels(&[("reason", r)]), n))
            .collect(),
    );

    let mut out = String::new();
    encode(&mut out, &reg).expect("encoding to a String cannot fail");
    out
}

fn read_version(path: &Path) -> Option<String> {
    let mut s = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(4096)
        .read_to_string(&mut s)
        .ok()?;
    let v = s.trim();
    (!v.is_empty()).then(|| v.to_string())
}

/// OpenMetrics text to Prometheus text 0.0.4 (what node_exporter's textfile
/// collector and old scrapers parse): counters' HELP/TYPE take the `_total`
/// sample name, `# UNIT` and `# EOF` go.
pub fn to_prometheus_text(om: &str) -> String {
    let counters: BTreeSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Write `contents` to `path` atomically (temp file, fsync, rename).
pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // node_exporter reads only *.prom, so the temp file is never half-read.
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Rewrite the textfile every `interval_s`, and soon after an upgrade event.
pub fn spawn_textfile(agent: Arc<Agent>) {
    let path = agent.config.metrics.textfile.clone();
    if path.is_empty() {
        return;
    }
    let interval = Duration::from_secs(agent.config.metrics.interval_s);
    std::thread::Builder::new()
        .name("metrics-textfile".into())
        .spawn(move || {
            let path = Path::new(&path);
            let mut last: Option<Instant> = None;
            loop {
                let due = last.is_none_or(|t| t.elapsed() >= interval);
                if due || agent.metrics.dirty.swap(false, Ordering::SeqCst) {
                    let text = to_prometheus_text(&render(&agent));
                    if let Err(e) = write_atomic(path, text.as_bytes()) {
                        log::warn!("metrics: cannot write {}: {e}", path.display());
                    }
                    last = Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        })
        .expect("spawn textfile thread");
}

fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("metrics.tls_cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "metrics.tls_cert {}: no certificate",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("metrics.tls_key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("metrics TLS: {e}"))?;
    Ok(Arc::new(config))
}

const MAX_HTTP_CONNECTIONS: usize = 8;

/// Bind the metrics endpoint (if configured) and serve it from a thread.
/// Returns the bound address.
pub fn spawn_http(agent: Arc<Agent>) -> Result<Option<SocketAddr>, String> {
    let mc = &agent.config.metrics;
    if mc.listen.is_empty() {
        return Ok(None);
    }
    let tls = match (&mc.tls_cert, &mc.tls_key) {
        (Some(c), Some(k)) => Some(tls_config(c, k)?),
        _ => None,
    };
    let listener = TcpListener::bind(&mc.listen)
        .map_err(|e| format!("metrics: cannot listen on {}: {e}", mc.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    log::info!(
        "metrics: serving {}://{addr}/metrics",
        if tls.is_some() { "https" } else { "http" }
    );
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(stream) = conn else { continue };
                if active.fetch_add(1, Ordering::SeqCst) >= MAX_HTTP_CONNECTIONS {
                    active.fetch_sub(1, Ordering::SeqCst);
                    continue; // dropped: closes the connection
                }
                let agent = agent.clone();
                let tls = tls.clone();
                let active = active.clone();
                std::thread::spawn(move || {
                    let _ = serve_http(&agent, stream, tls);
                    active.fetch_sub(1, Ordering::SeqCst);
                });
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(Some(addr))
}

fn serve_http(
    agent: &Agent,
    stream: TcpStream,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    match tls {
        Some(cfg) => {
            let conn = rustls::ServerConnection::new(cfg).map_err(std::io::Error::other)?;
            let mut s = rustls::StreamOwned::new(conn, stream);
            let r = handle_http(agent, &mut s);
            s.conn.send_close_notify();
            let _ = s.flush();
            r
        }
        None => {
            let mut s = stream;
            handle_http(agent, &mut s)
        }
    }
}

fn handle_http<S: Read + Write>(agent: &Agent, s: &mut S) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > 8192 || Instant::now() > deadline {
            return respond(s, 400, "text/plain", "bad request\n");
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let mut first = head.lines().next().unwrap_or("").split(' ');
    let (method, target) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        return respond(s, 405, "text/plain", "only GET\n");
    }
    match path {
        "/metrics" => {
            let openmetrics = head.lines().any(|l| {
                l.to_ascii_lowercase().starts_with("accept:")
                    && l.contains("application/openmetrics-text")
            });
            let body = render(agent);
            if openmetrics {
                respond(
                    s,
                    200,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    &body,
                )
            } else {
                respond(
                    s,
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    &to_prometheus_text(&body),
                )
            }
        }
        "/" => respond(s, 200, "text/plain", "keel-agent: metrics at /metrics\n"),
        _ => respond(s, 404, "text/plain", "not found\n"),
    }
}

fn respond<S: Write>(s: &mut S, status: u16, ctype: &str, body: &str) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    };
    let msg = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(msg.as_bytes())?;
    s.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keel_counters_flatten_with_index_labels() {
        let counters = serde_json::json!({
            "vcpus": [
                {"index": 0, "exits": {"io_in": 1, "io_out": 2, "mmio_read": 3, "mmio_write": 4, "other": 0}},
                {"index": 1, "exits": {"io_in": 5, "io_out": 6, "mmio_read": 7, "mmio_write": 8, "other": 9}}
            ],
            "disks": [{"index": 0, "read_ops": 10, "read_bytes": 4096, "latency_us_max": 7, "queues": [{"index": 0, "kicks": 3}]}],
            "net": [],
            "vsock": null,
            "future": {"ratio": 0.5, "flag": true, "name": "x", "weird-key": 4}
        });
        let vm = serde_json::json!({"state": "running", "uptime_s": 12.5, "pid": 123, "vcpus": 2});
        let mut reg = Registry::default();
        register_keel(&mut reg, Some(&vm), Some(&counters));
        let mut s = String::new();
        encode(&mut s, &reg).unwrap();
        for want in [
            "keel_vcpus_exits_io_in_total{index=\"0\"} 1",
            "keel_vcpus_exits_other_total{index=\"1\"} 9",
            "keel_disks_read_bytes_total{index=\"0\"} 4096",
            "keel_disks_latency_us_max{index=\"0\"} 7",
            "keel_disks_queues_kicks_total{index=\"0\",queues_index=\"0\"} 3",
            "keel_future_ratio 0.5",
            "keel_future_flag 1",
            "keel_future_weird_key_total 4",
            "keel_vm_uptime_s 12.5",
            "keel_vm_pid 123",
            "# TYPE keel_vcpus_exits_io_in counter",
        ] {
            assert!(s.contains(want), "missing {want:?} in\n{s}");
        }
        assert!(!s.contains("keel_vcpus_index"));
        let p = to_prometheus_text(&s);
        assert!(p.contains("# TYPE keel_vcpus_exits_io_in_total counter"));
        assert!(!p.contains("# EOF"));
    }

    #[test]
    fn guest_boot_is_one_hot_by_state() {
        let vm = serde_json::json!({"state": "running", "guest_boot": "timeout"});
        let mut reg = Registry::default();
        gauge_family(
            &mut reg,
            "keel_guest_boot",
            "h",
            guest_boot_samples(Some(&vm)),
        );
        let mut s = String::new();
        encode(&mut s, &reg).unwrap();
        for (state, v) in [
            ("pending", 0),
            ("success", 0),
            ("failure", 0),
            ("timeout", 1),
        ] {
            let want = format!("keel_guest_boot{{vm=\"guestos\",state=\"{state}\"}} {v}");
            assert!(s.contains(&want), "missing {want:?} in\n{s}");
        }
        assert!(guest_boot_samples(None).is_empty());
        let odd = serde_json::json!({"guest_boot": "exploded"});
        assert!(guest_boot_samples(Some(&odd)).is_empty());
    }

    #[test]
    fn state_mappings() {
        assert_eq!(guestos_state(&Ok("running".into())), 0.0);
        assert_eq!(guestos_state(&Ok("paused".into())), 1.0);
        assert_eq!(guestos_state(&Ok("stopped".into())), 2.0);
        assert_eq!(guestos_state(&Ok("shutting-down".into())), 2.0);
        assert_eq!(
            guestos_state(&Err(ApiError::Unavailable(
                "/x".into(),
                std::io::ErrorKind::NotFound.into()
            ))),
            2.0
        );
        assert_eq!(guestos_state(&Err(ApiError::Protocol("x".into()))), 1.0);
        assert_eq!(boot_action(&BootCycle::Stable), 0.0);
        assert_eq!(boot_action(&BootCycle::FirstBoot), 1.0);
        assert_eq!(boot_action(&BootCycle::FailsafeCheck), 2.0);
    }
}
