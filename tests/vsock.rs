//! virtio-vsock end to end: the probe guest drives Keel's device from CPL3
//! with virtio-drivers (and raw rings for malformed packets) against host
//! listeners on `<socket>_<port>`; host processes connect to the guest
//! through `<socket>` with `CONNECT <port>\n` when that is allowed.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use keel_tests::memory::resident;
use keel_tests::{api_call, console_typist, probe_guest, scratch_dir, ProbeReport, RunningKeel};

const T: Duration = Duration::from_secs(90);
/// The guest's memory.
const GUEST_MEM: u64 = 256 << 20;
const CID: u32 = 3;
const AGENT_PORT: u32 = 19090;
const ECHO_PORT: u32 = 19100;
const CLOSED_PORT: u32 = 19999;
const LISTEN_PORT: u32 = 5555;
const BENCH_PORT: u32 = 5000;
/// Bytes of the echo transfer: several times the credit both sides grant.
const TRANSFER_BYTES: u64 = 3_000_000;
/// What the agent port answers (HostOS agent's protocol, version 1.0.0).
const AGENT_ANSWER: &str = r#"{"Ok":{"HostOSVsockVersion":{"major":1,"minor":0,"patch":0}}}"#;

const DRIVER_CHECKS: &[&str] = &[
    "vsock.identify",
    "vsock.request_reply",
    "vsock.half_close",
    "vsock.transfer",
    "vsock.rst",
];
const MALFORMED_CHECKS: &[&str] = &[
    "vsock.malformed.wrong_src_cid",
    "vsock.malformed.unknown_op",
    "vsock.malformed.rw_no_connection",
    "vsock.malformed.len_past_descriptor",
    "vsock.malformed.wrong_type",
    "vsock.malformed.short_header",
];

/// The transfer pattern the probe sends: byte i.
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(31).wrapping_add(7)) as u8
}

/// FNV-1a 32 over `bytes`, as the probe prints it.
fn fnv1a(bytes: impl Iterator<Item = u8>) -> u32 {
    bytes.fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// A host listener on `<socket>_<port>`, each connection served by
/// `serve` on a thread of its own; stopped when dropped.
struct HostPort {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HostPort {
    fn start(
        sock: &Path,
        port: u32,
        serve: impl Fn(UnixStream) + Send + Sync + Clone + 'static,
    ) -> Self {
        let path = PathBuf::from(format!("{}_{port}", sock.display()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind host port");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).expect("blocking");
                        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
                        let serve = serve.clone();
                        std::thread::spawn(move || serve(s));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
        });
        HostPort {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for HostPort {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The agent port: reads each request to end of stream, records it, and
/// answers a non-empty one (the raw checks open connections that send
/// nothing and reset them).
fn agent(sock: &Path) -> (HostPort, Arc<Mutex<Vec<Vec<u8>>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let port = HostPort::start(sock, AGENT_PORT, move |mut s| {
        let mut req = Vec::new();
        let _ = s.read_to_end(&mut req);
        if !req.is_empty() {
            let _ = s.write_all(AGENT_ANSWER.as_bytes());
        }
        log.lock().unwrap().push(req);
    });
    (port, seen)
}

/// The echo port: reads at most 64 KiB every 10 ms and writes it back (a
/// slow reader, so that credit runs out on both sides); at end of stream
/// it closes. Records the bytes echoed per connection.
fn echo(sock: &Path) -> (HostPort, Arc<Mutex<Vec<u64>>>) {
    let done = Arc::new(Mutex::new(Vec::new()));
    let log = done.clone();
    let port = HostPort::start(sock, ECHO_PORT, move |mut s| {
        let mut buf = vec![0u8; 64 << 10];
        let mut total = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    total += n as u64;
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        log.lock().unwrap().push(total);
    });
    (port, done)
}

fn keel_args(dir: &Path, vsock: &str, cmdline: &str) -> (Vec<String>, PathBuf, PathBuf) {
    let sock = dir.join("v.sock");
    let api = dir.join("api.sock");
    let args = vec![
        "--kernel".to_string(),
        probe_guest().display().to_string(),
        "--memory".into(),
        format!("size={}M", GUEST_MEM >> 20),
        "--api-socket".into(),
        api.display().to_string(),
        "--vsock".into(),
        format!("cid={CID},socket={}{vsock}", sock.display()),
        "--cmdline".into(),
        format!("console=ttyS0 {cmdline}"),
    ];
    (args, sock, api)
}

/// The vsock counters from `GET /v1/counters`.
fn vsock_counters(api: &Path) -> serde_json::Value {
    let (status, body) = api_call(api, "GET", "/v1/counters", "").expect("API answers");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("counters JSON");
    v["vsock"].clone()
}

fn counter(c: &serde_json::Value, name: &str) -> u64 {
    c[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no vsock counter {name} in {c}"))
}

/// Waits for the probe's summary line; returns the console and report.
fn summary(k: &RunningKeel) -> (String, ProbeReport) {
    let start = Instant::now();
    loop {
        let console = k.console();
        let report = ProbeReport::parse(&console);
        if report.summary.is_some() {
            return (console, report);
        }
        assert!(
            start.elapsed() < T,
            "no summary line within {T:?}:\n{console}\nlog:\n{}",
            k.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The driver checks and the raw malformed-packet checks against the host
/// listeners, with the device on virtio-mmio (`--transport mmio`) or, with
/// `pci`, on virtio-pci (`--transport pci`, found at 00:01.0 through ECAM): the same
/// expectations either way. Returns the console.
fn driver_and_malformed(name: &str, pci: bool) -> String {
    let dir = scratch_dir(name);
    let checks = if pci { "vsock,pci.enumerate" } else { "vsock" };
    let cmdline = format!(
        "probe.check={checks} probe.vsock.cid={CID} probe.vsock.transfer={ECHO_PORT},{TRANSFER_BYTES} probe.vsock.closed_port={CLOSED_PORT} probe.idle"
    );
    let (mut args, sock, api) = keel_args(&dir, "", &cmdline);
    let transport = if pci { "pci" } else { "mmio" };
    args.extend(["--transport".into(), transport.into()]);
    // The device creates <socket> at start; the per-port listeners may
    // exist before.
    let (_agent, requests) = agent(&sock);
    let (_echo, echoed) = echo(&sock);
    let k = RunningKeel::start(&args, &api, &[]);
    let (console, report) = summary(&k);
    let counters = vsock_counters(&api);
    drop(k);

    let mut required: Vec<&str> = DRIVER_CHECKS
        .iter()
        .chain(MALFORMED_CHECKS)
        .copied()
        .collect();
    if pci {
        required.push("pci.enumerate");
    }
    report.assert_all_passed(&required, &console);
    assert!(
        console.contains(&format!("probe: vsock cid={CID}\n")),
        "{console}"
    );
    assert!(
        console.contains(&format!("probe: vsock reply {AGENT_ANSWER}\n")),
        "the guest did not print the agent's answer:\n{console}"
    );
    // The transfer's checksum is the pattern's.
    let sum = fnv1a((0..TRANSFER_BYTES).map(pattern));
    assert!(
        console.contains(&format!(
            "probe: vsock transfer port={ECHO_PORT} bytes={TRANSFER_BYTES} fnv1a={sum:#010x} "
        )),
        "transfer checksum line (want fnv1a={sum:#010x}):\n{console}"
    );
    assert_eq!(
        *echoed.lock().unwrap(),
        [TRANSFER_BYTES],
        "bytes the echo port served"
    );

    // Exactly one real request, as HostOS's agent expects it; the other
    // connections (raw checks) sent nothing: in particular no data from a
    // connection the device had reset.
    let requests = requests.lock().unwrap().clone();
    let nonempty: Vec<&Vec<u8>> = requests.iter().filter(|r| !r.is_empty()).collect();
    assert_eq!(
        nonempty.len(),
        1,
        "requests with data at the agent port: {:?}",
        nonempty
            .iter()
            .map(|r| String::from_utf8_lossy(r).to_string())
            .collect::<Vec<_>>()
    );
    let req: serde_json::Value = serde_json::from_slice(nonempty[0]).expect("request is JSON");
    assert_eq!(req["sender_cid"], CID, "{req}");
    assert_eq!(req["message"], "GetVsockProtocol", "{req}");

    assert_eq!(
        counter(&counters, "flow_control_violations"),
        0,
        "{counters}"
    );
    assert_eq!(counter(&counters, "host_connects_refused"), 0, "{counters}");
    assert!(
        counter(&counters, "conns_refused") >= 1,
        "vsock.rst: {counters}"
    );
    // Wrong source CID and short header at least.
    assert!(counter(&counters, "packets_dropped") >= 2, "{counters}");
    assert!(counter(&counters, "resets_received") >= 1, "{counters}");
    assert!(
        counter(&counters, "bytes_from_guest") >= TRANSFER_BYTES,
        "{counters}"
    );
    assert!(
        counter(&counters, "bytes_to_guest") >= TRANSFER_BYTES,
        "{counters}"
    );
    console
}

#[test]
fn guest_driver_and_malformed_packets_against_host_listeners() {
    driver_and_malformed("vsock-guest", false);
}

#[test]
fn guest_driver_and_malformed_packets_over_virtio_pci() {
    let console = driver_and_malformed("vsock-pci", true);
    assert!(
        console.contains("probe: pci 00:01.0 1af4:1053 "),
        "{console}"
    );
}

/// Connects to the device socket and asks for guest port `port`, where the
/// connection is allowed: the `CONNECT` line must go through.
fn host_connect(sock: &Path, port: u32) -> UnixStream {
    let mut s = UnixStream::connect(sock).expect("connect to the device socket");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .expect("write CONNECT");
    s
}

/// Whether an I/O error means the peer closed the connection (our write
/// hit a closed socket, or unread data made the close a reset).
fn closed_by_peer(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
    )
}

/// Asks for guest port `port` where host connections are refused; returns
/// what the device sent before it closed the connection. The device may
/// close right after accepting, before or while our `CONNECT` line is
/// written: a failed write (EPIPE, ECONNRESET), a reset or end of stream
/// are all the refusal. Panics on any other error, or if the device keeps
/// the connection open past the read timeout.
fn host_connect_refused(sock: &Path, port: u32) -> Vec<u8> {
    let mut s = UnixStream::connect(sock).expect("connect to the device socket");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    match s.write_all(format!("CONNECT {port}\n").as_bytes()) {
        Ok(()) => {}
        Err(e) if closed_by_peer(&e) => {}
        Err(e) => panic!("write CONNECT: {e}"),
    }
    let mut got = Vec::new();
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e) if closed_by_peer(&e) => return got,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("reading the device's answer (got {got:?} so far): {e}"),
        }
    }
}

#[test]
fn host_connect_is_refused_unless_allowed() {
    let dir = scratch_dir("vsock-refused");
    let cmdline = format!(
        "probe.check=vsock.identify,vsock.listen probe.vsock.listen={LISTEN_PORT},refused probe.idle"
    );
    let (args, sock, api) = keel_args(&dir, "", &cmdline);
    let k = RunningKeel::start(&args, &api, &[]);
    k.wait_console(
        &format!("probe: vsock listening on port {LISTEN_PORT}\n"),
        T,
    );
    // Closed without an answer: no `OK` line, nor anything else.
    let got = host_connect_refused(&sock, LISTEN_PORT);
    assert!(
        got.is_empty(),
        "the device answered a refused host connection: {:?}",
        String::from_utf8_lossy(&got)
    );
    let (console, report) = summary(&k);
    let counters = vsock_counters(&api);
    drop(k);
    report.assert_all_passed(&["vsock.identify"], &console);
    assert!(
        console.contains("probe: vsock.listen skipped: host-initiated connections are refused"),
        "{console}"
    );
    assert!(
        counter(&counters, "host_connects_refused") >= 1,
        "{counters}"
    );
    assert_eq!(counter(&counters, "host_conns_opened"), 0, "{counters}");
}

#[test]
fn host_connects_to_a_listening_guest_port() {
    let dir = scratch_dir("vsock-listen");
    let cmdline = format!(
        "probe.check=vsock.identify,vsock.listen probe.vsock.listen={LISTEN_PORT} probe.idle"
    );
    let (args, sock, api) = keel_args(&dir, ",allow_host_connect=on", &cmdline);
    let k = RunningKeel::start(&args, &api, &[]);
    k.wait_console(
        &format!("probe: vsock listening on port {LISTEN_PORT}\n"),
        T,
    );
    let mut s = host_connect(&sock, LISTEN_PORT);
    // "OK <host port>\n", then the guest's answer, then end of stream.
    let mut got = Vec::new();
    let mut b = [0u8; 256];
    while !got.contains(&b'\n') {
        let n = s.read(&mut b).expect("read OK line");
        assert!(n > 0, "closed before OK: {got:?}");
        got.extend_from_slice(&b[..n]);
    }
    let text = String::from_utf8_lossy(&got).to_string();
    let (ok, rest) = text.split_once('\n').unwrap();
    let host_port: u32 = ok
        .strip_prefix("OK ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("want OK <port>, got {ok:?}"));
    assert!(host_port >= 1 << 30, "host-side port {host_port}");
    s.write_all(b"hello from host\n").expect("write line");
    let mut answer = rest.as_bytes().to_vec();
    s.read_to_end(&mut answer).expect("read the guest's answer");
    assert_eq!(
        String::from_utf8_lossy(&answer),
        "guest got: hello from host\n"
    );
    let (console, report) = summary(&k);
    let counters = vsock_counters(&api);
    drop(k);
    report.assert_all_passed(&["vsock.identify", "vsock.listen"], &console);
    assert!(
        console.contains(&format!("probe: vsock accepted host port {host_port}\n")),
        "{console}"
    );
    assert_eq!(counter(&counters, "host_conns_opened"), 1, "{counters}");
    assert_eq!(counter(&counters, "host_connects_refused"), 0, "{counters}");
}

/// The benchmark in both directions, small: it runs and reports.
#[test]
fn bench_mode_streams_both_ways() {
    const TOTAL: u64 = 8 << 20;
    for dir_name in ["tx", "rx"] {
        let dir = scratch_dir(&format!("vsock-bench-{dir_name}"));
        let cmdline = format!(
            "probe.check=vsock.identify,bench probe.bench.vsock={BENCH_PORT},65536,{TOTAL},{dir_name} probe.idle"
        );
        let (args, sock, api) = keel_args(&dir, "", &cmdline);
        let moved = Arc::new(Mutex::new(0u64));
        let counted = moved.clone();
        let tx = dir_name == "tx";
        let _host = HostPort::start(&sock, BENCH_PORT, move |mut s| {
            let mut buf = vec![0x5au8; 64 << 10];
            if tx {
                // Sink to end of stream, then close.
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    *counted.lock().unwrap() += n as u64;
                }
            } else {
                let mut left = TOTAL;
                while left > 0 {
                    let n = left.min(buf.len() as u64) as usize;
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                    left -= n as u64;
                    *counted.lock().unwrap() += n as u64;
                }
                let _ = s.shutdown(std::net::Shutdown::Write);
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            }
        });
        let start = Instant::now();
        let k = RunningKeel::start(&args, &api, &[]);
        let (console, report) = summary(&k);
        drop(k);
        report.assert_all_passed(&["vsock.identify", "bench.vsock"], &console);
        let line = console
            .lines()
            .find(|l| l.starts_with("probe: bench vsock "))
            .unwrap_or_else(|| panic!("no bench line:\n{console}"));
        assert!(
            line.starts_with(&format!(
                "probe: bench vsock {dir_name} size=65536 bytes={TOTAL} ns="
            )),
            "{line}"
        );
        let ns: f64 = line.rsplit("ns=").next().unwrap().parse().unwrap();
        assert!(ns > 0.0, "{line}");
        assert_eq!(*moved.lock().unwrap(), TOTAL, "bytes the host moved");
        eprintln!(
            "vsock bench {dir_name}: {:.0} MiB/s in the guest ({:.1} s for the run)",
            TOTAL as f64 / (ns / 1e9) / (1 << 20) as f64,
            start.elapsed().as_secs_f64()
        );
    }
}

/// Packets of `vsock.flood`: more than the 200,000 of the issue that asked
/// for it, because Keel owes the guest only a 44-byte header for each
/// packet that wants an answer (3 in 4 of them), and 150,000 of those
/// would fit in the bound below even unbounded; 1,000,000 (750,000
/// answers, 31 MiB) would not.
const FLOOD_PACKETS: u64 = 1_000_000;
/// How much Keel's own memory may grow during the flood.
const FLOOD_GROWTH_LIMIT: u64 = 16 << 20;

/// The number after `key` in `line` (up to a space, comma or parenthesis).
fn number_after(line: &str, key: &str) -> u64 {
    let rest = line
        .split_once(key)
        .unwrap_or_else(|| panic!("no {key:?} in {line:?}"))
        .1;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number after {key:?} in {line:?}"))
}

/// The console line starting with `prefix`.
fn line_starting<'a>(console: &'a str, prefix: &str) -> &'a str {
    console
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line {prefix:?}:\n{console}"))
}

/// The guest floods the device with packets it wants to answer, without
/// receive buffers: Keel's own memory (all but guest RAM, see
/// `keel_tests::memory`) grows by less than 16 MiB between the probe's
/// `flood start` and `flood sent` lines (the probe waits for a byte on
/// the console at each, so nothing is measured while it runs), the device
/// keeps at most its bound of answers and still works afterwards.
#[test]
fn a_flood_without_receive_buffers_leaves_keels_memory_bounded() {
    let dir = scratch_dir("vsock-flood");
    let cmdline = format!(
        "probe.check=vsock.flood probe.vsock.flood={FLOOD_PACKETS},sync probe.vsock.cid={CID} probe.idle"
    );
    let (args, sock, api) = keel_args(&dir, "", &cmdline);
    let (_agent, requests) = agent(&sock);
    let k = RunningKeel::start(&args, &api, &[]);
    let pid = k.child.id();
    // Attached before the first sample: its thread and buffers are in both.
    let mut typist = console_typist(&api);
    k.wait_console("probe: vsock flood start", T);
    let start = resident(pid, GUEST_MEM);
    typist.write_all(b"g").expect("type the go-ahead");
    k.wait_console("probe: vsock flood sent ", T);
    let flooded = resident(pid, GUEST_MEM);
    typist.write_all(b"g").expect("type the go-ahead");
    let (console, report) = summary(&k);
    let end = resident(pid, GUEST_MEM);
    let counters = vsock_counters(&api);
    drop(k);

    let growth = flooded.own.max(end.own).saturating_sub(start.own);
    eprintln!(
        "vsock flood: Keel's own memory {} KiB at the start, {} KiB after the flood, {} KiB at the end (guest RAM {} -> {} KiB)",
        start.own >> 10,
        flooded.own >> 10,
        end.own >> 10,
        start.guest >> 10,
        end.guest >> 10
    );
    assert!(
        growth < FLOOD_GROWTH_LIMIT,
        "Keel's own memory grew by {} KiB during the flood (limit {} KiB): {start:?} -> {flooded:?} -> {end:?}",
        growth >> 10,
        FLOOD_GROWTH_LIMIT >> 10
    );
    report.assert_all_passed(&["vsock.flood"], &console);

    // "sent N packets (A REQUEST, B CREDIT_REQUEST, C RW, D RST) ns=..."
    let sent = line_starting(&console, "probe: vsock flood sent ");
    assert_eq!(number_after(sent, "sent "), FLOOD_PACKETS, "{sent}");
    let kinds = sent
        .split_once('(')
        .and_then(|(_, r)| r.split_once(')'))
        .unwrap_or_else(|| panic!("no (...) in {sent:?}"))
        .0;
    let of = |op: &str| -> u64 {
        kinds
            .split(", ")
            .find_map(|k| k.strip_suffix(&format!(" {op}")))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count of {op} in {sent:?}"))
    };
    let requests_sent = of("REQUEST");
    // All but the RSTs want an answer (an RST: none has a connection).
    let answerable = requests_sent + of("CREDIT_REQUEST") + of("RW");
    assert_eq!(answerable + of("RST"), FLOOD_PACKETS, "{sent}");
    eprintln!("{sent}");
    assert!(of("RST") > 0 && of("CREDIT_REQUEST") > 0, "{sent}");
    let kept = number_after(line_starting(&console, "probe: vsock flood kept "), "kept ");
    // No receive buffer: the queue filled to its bound, the rest dropped.
    let max = devices::virtio::vsock::MAX_CONTROL as u64;
    assert_eq!(kept, max, "answers the device kept");
    assert_eq!(counter(&counters, "resets_sent"), max, "{counters}");
    assert_eq!(
        counter(&counters, "control_dropped"),
        answerable - max,
        "{counters}"
    );
    assert_eq!(
        counter(&counters, "conns_refused"),
        requests_sent,
        "{counters}"
    );
    assert_eq!(counter(&counters, "conns_opened"), 1, "{counters}");
    assert!(
        console.contains(&format!("probe: vsock flood reply {AGENT_ANSWER}\n")),
        "{console}"
    );
    let requests = requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 1, "connections to the agent port");
    let req: serde_json::Value = serde_json::from_slice(&requests[0]).expect("request is JSON");
    assert_eq!(req["sender_cid"], CID, "{req}");
    assert_eq!(req["message"], "GetVsockProtocol", "{req}");
}
