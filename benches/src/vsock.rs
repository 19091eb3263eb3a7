//! vsock throughput: the probe guest streaming to/from a host Unix socket
//! through Keel's vsock device (guest-measured) over each chosen virtio
//! transport (`--transport mmio|pci|both`, default both), against a raw
//! Unix socket pair on the host (the limit), QEMU's vhost-vsock (`-M
//! microvm` with `vhost-vsock-device`, `-M q35` with `vhost-vsock-pci`; the
//! host end is an AF_VSOCK socket; only where /dev/vhost-vsock exists), and
//! Firecracker's vsock (virtio-mmio only) when a binary built by hand is
//! given.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::threads::Snapshot;
use super::transport::{Kind, Transport};

const PORT: u32 = 5000;
const TOTAL: u64 = 32 << 20;

/// The guest's read buffer in the host -> guest direction: the probe reads
/// with the largest vsock packet payload (`VSOCK_MAX_WRITE` in the probe).
const GUEST_READ: usize = 64 << 10;
/// The host side's read buffer in the guest -> host direction.
const HOST_READ: usize = 64 << 10;

/// The raw baseline: the same stream over the same kind of host Unix
/// socket, served by the same [`host_side`] as the VMM paths, with a host
/// thread in the guest's place doing what the probe does at its end, timed
/// at the probe's boundaries: guest -> host, `size`-byte writes from the
/// first until every byte is in the host socket (the probe stops when the
/// device reports all bytes forwarded); host -> guest, [`GUEST_READ`]-byte
/// reads from connect until end of stream. A VMM path does all of this and
/// moves every byte through the virtqueues too, so its rate cannot exceed
/// this one but by noise. MiB/s.
fn raw(work: &Path, size: usize, dir: &'static str) -> Result<f64, String> {
    let path = work.join(format!("raw_{PORT}"));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| e.to_string())?;
    let host = host_side(Listener::Unix(listener), dir, size, Arc::default());
    let mut s = UnixStream::connect(&path).map_err(|e| e.to_string())?;
    let elapsed = if dir == "tx" {
        let data = vec![0x5au8; size];
        let t = Instant::now();
        let mut sent = 0u64;
        while sent < TOTAL {
            let n = (TOTAL - sent).min(size as u64) as usize;
            s.write_all(&data[..n]).map_err(|e| e.to_string())?;
            sent += n as u64;
        }
        let elapsed = t.elapsed();
        // The close, outside the timed part as in the probe.
        s.shutdown(std::net::Shutdown::Write)
            .map_err(|e| e.to_string())?;
        let _ = s.read_to_end(&mut Vec::new());
        elapsed
    } else {
        let mut buf = vec![0u8; GUEST_READ];
        let t = Instant::now();
        let mut got = 0u64;
        loop {
            match s.read(&mut buf).map_err(|e| e.to_string())? {
                0 => break,
                n => got += n as u64,
            }
        }
        let elapsed = t.elapsed();
        if got != TOTAL {
            return Err(format!("raw: received {got} of {TOTAL} bytes"));
        }
        elapsed
    };
    drop(s);
    host.join().map_err(|_| "raw: host side panicked")?;
    Ok(TOTAL as f64 / elapsed.as_secs_f64() / (1 << 20) as f64)
}

/// Where the host side of a run accepts the guest's connection: a Unix
/// socket (Keel, Firecracker, the raw baseline) or, for QEMU's
/// vhost-vsock, an AF_VSOCK socket on the host's CID.
enum Listener {
    /// A Unix socket listening.
    Unix(UnixListener),
    /// An AF_VSOCK stream socket listening on [`PORT`] (any CID); accept
    /// gives up once `stop` is set.
    Vsock {
        /// The listening socket.
        fd: OwnedFd,
        /// Set when the guest has gone without connecting.
        stop: Arc<AtomicBool>,
    },
}

impl Listener {
    /// An AF_VSOCK stream socket listening on `port`, any local CID.
    fn vsock(port: u32) -> Result<Listener, String> {
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(format!(
                "AF_VSOCK socket: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: `fd` is a new socket nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        // SAFETY: `addr` is a valid sockaddr_vm of the size passed; `fd`
        // is an open socket.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(addr).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        // SAFETY: listen(2) on an open, bound socket.
        if bound != 0 || unsafe { libc::listen(fd.as_raw_fd(), 4) } != 0 {
            return Err(format!(
                "AF_VSOCK port {port}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Listener::Vsock {
            fd,
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The next connection. An AF_VSOCK one is carried in a `UnixStream`:
    /// only read(2), write(2) and shutdown(2) are used on it, which are
    /// the same for every stream socket.
    fn accept(&self) -> Option<UnixStream> {
        match self {
            Listener::Unix(l) => l.accept().ok().map(|(s, _)| s),
            Listener::Vsock { fd, stop } => {
                let mut p = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                loop {
                    if stop.load(Ordering::Relaxed) {
                        return None;
                    }
                    // SAFETY: poll(2) on one valid pollfd.
                    if unsafe { libc::poll(&mut p, 1, 100) } > 0 {
                        break;
                    }
                }
                // SAFETY: accept(2) on a listening socket, peer address not
                // asked for; the result is checked.
                let c = unsafe {
                    libc::accept4(
                        fd.as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC,
                    )
                };
                // SAFETY: a new connected stream socket nobody else owns.
                (c >= 0).then(|| unsafe { UnixStream::from_raw_fd(c) })
            }
        }
    }
}

/// Host CPU a VMM spent while a stream crossed it: from the host side's
/// accept of the guest's connection to the last byte (guest -> host) or
/// to the guest's close (host -> guest).
#[derive(Clone, Copy, Debug)]
struct Busy {
    /// Wall time of that span (ns).
    wall_ns: u64,
    /// Run time of the VMM's vCPU threads in it (ns).
    vcpu_ns: u64,
    /// Run time of the VMM's other threads (devices, event loops) (ns).
    vmm_ns: u64,
}

/// Host side of one run, a VMM's or the raw baseline's: sinks (tx) with
/// [`HOST_READ`]-byte reads, or sources (rx) TOTAL bytes in `size`-byte
/// writes, then half-closes and waits for the other end to close. When
/// `vmm` holds a process ID by the time the guest connects, it also
/// returns that process's [`Busy`] over the stream.
fn host_side(
    listener: Listener,
    dir: &'static str,
    size: usize,
    vmm: Arc<AtomicU32>,
) -> std::thread::JoinHandle<Option<Busy>> {
    std::thread::spawn(move || {
        let mut s = listener.accept()?;
        let pid = vmm.load(Ordering::Relaxed);
        let start = (pid != 0).then(|| (Instant::now(), Snapshot::take(pid)));
        let mut end = None;
        let mut buf = vec![0u8; HOST_READ];
        if dir == "tx" {
            let mut got = 0u64;
            while let Ok(n @ 1..) = s.read(&mut buf) {
                got += n as u64;
                if got >= TOTAL && end.is_none() {
                    end = Some((Instant::now(), Snapshot::take(pid)));
                }
            }
        } else {
            let data = vec![0x5au8; size];
            let mut left = TOTAL as usize;
            while left > 0 {
                let n = left.min(size);
                s.write_all(&data[..n]).ok()?;
                left -= n;
            }
            let _ = s.shutdown(std::net::Shutdown::Write);
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            end = Some((Instant::now(), Snapshot::take(pid)));
        }
        let ((t0, s0), (t1, s1)) = (start?, end?);
        let (vcpu_ns, vmm_ns) = s1.since(&s0);
        Some(Busy {
            wall_ns: t1.duration_since(t0).as_nanos() as u64,
            vcpu_ns,
            vmm_ns,
        })
    })
}

/// MiB/s from the probe's `probe: bench vsock ... bytes=B ns=T` line, and
/// the VMM's [`Busy`] over the stream when it could be read.
/// The host end listens on `<sock>_<PORT>` (Keel's and Firecracker's
/// hybrid vsock) or, with `sock` `None`, on AF_VSOCK port [`PORT`]
/// (QEMU's vhost-vsock).
fn guest_rate(
    mut cmd: Command,
    sock: Option<&Path>,
    dir: &'static str,
    size: usize,
) -> Result<(f64, Option<Busy>), String> {
    let listener = match sock {
        Some(sock) => {
            let path = format!("{}_{PORT}", sock.display());
            let _ = std::fs::remove_file(&path);
            Listener::Unix(UnixListener::bind(path).map_err(|e| e.to_string())?)
        }
        None => Listener::vsock(PORT)?,
    };
    let stop = match &listener {
        Listener::Vsock { stop, .. } => Some(stop.clone()),
        Listener::Unix(_) => None,
    };
    let vmm = Arc::new(AtomicU32::new(0));
    let host = host_side(listener, dir, size, vmm.clone());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let child = cmd.spawn().map_err(|e| e.to_string())?;
    let pid = child.id();
    vmm.store(pid, Ordering::Relaxed);
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(120));
        // SAFETY: signalling a child we started; harmless if it is gone.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    drop(killer);
    // A guest that never connected leaves the host side in accept().
    if !host.is_finished() {
        match sock {
            Some(sock) => drop(UnixStream::connect(format!("{}_{PORT}", sock.display()))),
            None => {
                if let Some(stop) = &stop {
                    stop.store(true, Ordering::Relaxed);
                }
                let _ = host.join();
                return Err(format!(
                    "the guest never connected:\n{}",
                    String::from_utf8_lossy(&out.stdout)
                ));
            }
        }
    }
    let busy = host.join().ok().flatten();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("probe: bench vsock"))
        .ok_or_else(|| format!("no bench line:\n{text}"))?;
    let field = |k| super::probe_field(line, k);
    let rate = field("bytes=")? / (field("ns=")? / 1e9) / (1 << 20) as f64;
    Ok((rate, busy))
}

/// `runs` runs of `one`, each failure reported on stderr with `who`: the
/// rates (MiB/s) and the [`Busy`] figures of the runs that had them.
fn measure(
    runs: usize,
    who: &str,
    mut one: impl FnMut() -> Result<(f64, Option<Busy>), String>,
) -> (Vec<f64>, Vec<Busy>) {
    let mut rates = Vec::new();
    let mut busy = Vec::new();
    for _ in 0..runs {
        match one() {
            Ok((r, b)) => {
                rates.push(r);
                busy.extend(b);
            }
            Err(e) => eprintln!("{who}: {e}"),
        }
    }
    (rates, busy)
}

/// Prints (and records) where each VMM's host CPU went while the stream
/// crossed it: how busy its vCPU threads were (the guest's share, 100% =
/// one host CPU all the time) and its own threads' CPU per MiB moved.
fn print_busy(run: &mut super::record::Run, rows: &[(&str, usize, Transport, String, Vec<Busy>)]) {
    println!();
    println!("host CPU while the stream crossed the VMM, median of the runs: vCPU threads' busy share of the wall time (the guest's side), and the VMM's other threads' (device, event loop) CPU per MiB moved");
    println!();
    println!("| direction | write size | transport | VMM | vCPU threads busy | VMM threads (µs per MiB) |");
    println!("|---|---|---|---|---|---|");
    let mib = (TOTAL >> 20) as f64;
    for (direction, size, t, series, b) in rows {
        let row = format!("{direction} {} KiB", size >> 10);
        let vcpu: Vec<f64> = b
            .iter()
            .map(|b| 100.0 * b.vcpu_ns as f64 / b.wall_ns.max(1) as f64)
            .collect();
        let vmm: Vec<f64> = b.iter().map(|b| b.vmm_ns as f64 / 1e3 / mib).collect();
        run.push_on("vsock vCPU busy", &row, series, t.name(), "%", &vcpu);
        run.push_on("vsock VMM CPU", &row, series, t.name(), "µs/MiB", &vmm);
        println!(
            "| {direction} | {} KiB | {} | {series} | {:.0}% | {:.0} |",
            size >> 10,
            t.name(),
            super::median(vcpu),
            super::median(vmm),
        );
    }
}

const REQUEST: &[u8] = b"{\"sender_cid\": 3, \"message\": \"GetVsockProtocol\"}";
const REPLY: &[u8] = b"{\"Ok\":{\"HostOSVsockVersion\":{\"major\":1,\"minor\":0,\"patch\":0}}}";

/// The HostOS agent's pattern on the host: read the request, answer,
/// close; for `n` connections. The request is read by length (or to EOF,
/// whichever comes first) rather than to EOF alone: Firecracker does not
/// pass the guest's half-close on to the host socket, and the same agent
/// serves every VMM.
fn agent(listener: UnixListener, n: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for _ in 0..n {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            let mut req = vec![0u8; REQUEST.len()];
            let mut got = 0;
            while got < req.len() {
                match s.read(&mut req[got..]) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => got += k,
                }
            }
            let _ = s.write_all(REPLY);
        }
    })
}

/// Connect-request-reply round trips over a raw host Unix socket, µs.
fn raw_round_trip(dir: &Path, samples: usize) -> Vec<f64> {
    let path = dir.join("raw.sock");
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).expect("bind");
    let server = agent(l, samples);
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        let mut s = UnixStream::connect(&path).expect("connect");
        s.write_all(REQUEST).expect("write");
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).expect("read");
        assert_eq!(reply, REPLY);
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let _ = server.join();
    times
}

/// Boot arguments of the round-trip measurement.
const ROUND_TRIP_CMDLINE: &str = "console=ttyS0 probe.check=vsock.identify,vsock.request_reply";

/// The same round trip from the probe guest through a VMM's vsock, µs
/// (guest-measured; one VM boot per sample; failed boots are left out). `vmm` makes the command line
/// of one boot whose vsock socket is `sock`.
fn guest_round_trip(vmm: &dyn Fn() -> Option<Command>, sock: &Path, runs: usize) -> Vec<f64> {
    let mut times = Vec::new();
    for _ in 0..runs {
        let port = format!("{}_19090", sock.display());
        let _ = std::fs::remove_file(&port);
        let _ = std::fs::remove_file(sock);
        let Ok(listener) = UnixListener::bind(&port) else {
            break;
        };
        let server = agent(listener, 1);
        let Some(mut cmd) = vmm() else { continue };
        let Ok(mut child) = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
        else {
            continue;
        };
        let pid = child.id();
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(60));
            // SAFETY: signalling a child we started; harmless if it is gone.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        });
        let mut text = String::new();
        if let Some(mut out) = child.stdout.take() {
            let _ = out.read_to_string(&mut text);
        }
        let _ = child.wait();
        drop(killer);
        // Unblock the agent if the guest never connected.
        let _ = UnixStream::connect(&port);
        let _ = server.join();
        match text
            .lines()
            .find_map(|l| l.strip_prefix("probe: vsock request_reply ns="))
            .and_then(|v| v.trim().parse::<f64>().ok())
        {
            Some(ns) => times.push(ns / 1e3),
            None => eprintln!("round trip: no measurement:\n{text}"),
        }
    }
    times
}

/// Firecracker booting the probe with `cmdline`, its vsock on `sock`.
fn fc_cmd(fc: &Path, work: &Path, probe: &Path, cmdline: &str, sock: &Path) -> Option<Command> {
    super::firecracker(
        fc,
        work,
        probe,
        cmdline,
        (1, 256),
        super::FcDevice::Vsock(sock),
    )
    .ok()
}

/// QEMU's vsock over `t`: the probe with `cmdline`, a vhost-vsock device
/// for guest CID 3.
fn qemu_cmd(qemu: &Path, probe: &Path, cmdline: &str, t: Transport) -> Command {
    let mut c = t.qemu(qemu, probe, cmdline, "256M");
    c.args([
        "-device",
        &format!("{},guest-cid=3", t.qemu_device(Kind::Vsock)),
    ]);
    c
}

/// Keel booting the probe with `cmdline` over `t`, its vsock on `sock`.
fn keel_cmd(bin: &Path, cmdline: &str, sock: &Path, t: Transport) -> Command {
    let mut c = Command::new(bin.join("keel"));
    c.args(["--kernel", &bin.join("probe-guest").display().to_string()])
        .args(t.keel_args())
        .args(["--memory", "size=256M", "--cmdline", cmdline])
        .args(["--log-level", "error"])
        .args(["--vsock", &format!("cid=3,socket={}", sock.display())]);
    c
}

/// The `vsock` subcommand; records into `run`.
pub fn main(args: &[String], run: &mut super::record::Run) {
    let mut fc: Option<PathBuf> = None;
    let mut qemu = super::which("qemu-system-x86_64");
    let mut runs = 3usize;
    let mut transports = vec![Transport::Mmio, Transport::Pci];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--firecracker", Some(v)) => fc = Some(v.into()),
            ("--qemu", Some(v)) if v == "none" => qemu = None,
            ("--qemu", Some(v)) => qemu = Some(v.into()),
            ("--runs", Some(v)) => runs = v.parse().unwrap_or_else(|_| super::usage()),
            ("--transport", Some(v)) => {
                transports = Transport::parse_list(v).unwrap_or_else(|| super::usage())
            }
            _ => super::usage(),
        }
    }
    let bin = super::bin_dir();
    let probe = bin.join("probe-guest");
    let work = PathBuf::from("/var/tmp").join(format!("keel-bench-vsock-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("work dir");
    let sock = work.join("v.sock");
    run.found("Keel", Some(&bin.join("keel")));
    let fc = super::firecracker_binary(fc, run);
    // QEMU's only vsock is vhost-vsock: the host kernel's device.
    let vhost = Path::new("/dev/vhost-vsock");
    let qemu_absent = match &qemu {
        None => Some("not measured (no QEMU)"),
        Some(_) if !vhost.exists() => Some("not measured (no /dev/vhost-vsock)"),
        Some(_) => None,
    };
    let qemu = qemu.filter(|_| qemu_absent.is_none());
    run.found("QEMU", qemu.as_deref());
    if let Some(why) = qemu_absent {
        eprintln!("QEMU: {why}; its vsock is vhost-vsock, which needs the host's /dev/vhost-vsock");
    }
    println!("vsock throughput, {} MiB per run, median of {runs} (MiB/s); guest figures measured in the guest; the write size is the sender's (the guest's for guest -> host, the host's for host -> guest); raw: the same stream and host side with a host thread in the guest's place, timed the same way, no transport (the same figure on each row); QEMU: vhost-vsock, `-M microvm` over mmio, `-M q35` over pci; Firecracker: mmio only", TOTAL >> 20);
    println!();
    println!("| direction | write size | transport | raw Unix socket | Keel | Keel / raw | QEMU | Keel / QEMU | Firecracker | Keel / Firecracker | Keel pci / mmio |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let med = |v: Vec<f64>| (!v.is_empty()).then(|| super::median(v));
    let mut busy_rows = Vec::new();
    for dir in ["tx", "rx"] {
        for size in [4096usize, 64 << 10] {
            let cmdline = format!(
                "console=ttyS0 probe.check=vsock.identify,bench probe.bench.vsock={PORT},{size},{TOTAL},{dir}"
            );
            let rs: Vec<f64> = (0..runs)
                .filter_map(|_| {
                    raw(&work, size, dir)
                        .map_err(|e| eprintln!("raw: {e}"))
                        .ok()
                })
                .collect();
            let direction = if dir == "tx" {
                "guest -> host"
            } else {
                "host -> guest"
            };
            let row = format!("{direction} {} KiB", size >> 10);
            run.push("vsock throughput", &row, "raw Unix socket", "MiB/s", &rs);
            let r = med(rs);
            let mut keel_mmio = None;
            for &t in &transports {
                let (k, kb) = measure(runs, &format!("Keel {}", t.name()), || {
                    guest_rate(keel_cmd(&bin, &cmdline, &sock, t), Some(&sock), dir, size)
                });
                let (q, qb) = match &qemu {
                    Some(qemu) => measure(runs, &format!("QEMU {}", t.name()), || {
                        guest_rate(qemu_cmd(qemu, &probe, &cmdline, t), None, dir, size)
                    }),
                    None => Default::default(),
                };
                let (f, fb) = match (&fc, t) {
                    (Some(fc), Transport::Mmio) => measure(runs, "Firecracker", || {
                        let cmd = fc_cmd(fc, &work, &probe, &cmdline, &sock)
                            .ok_or("no Firecracker command")?;
                        guest_rate(cmd, Some(&sock), dir, size)
                    }),
                    _ => Default::default(),
                };
                for (series, b) in [
                    (t.keel_series(), kb),
                    (t.qemu_series(), qb),
                    ("Firecracker".into(), fb),
                ] {
                    if !b.is_empty() {
                        busy_rows.push((direction, size, t, series, b));
                    }
                }
                let table = "vsock throughput";
                run.push_on(table, &row, &t.keel_series(), t.name(), "MiB/s", &k);
                run.push_on(table, &row, &t.qemu_series(), t.name(), "MiB/s", &q);
                run.push_on(table, &row, "Firecracker", t.name(), "MiB/s", &f);
                let (k, q, f) = (med(k), med(q), med(f));
                if t == Transport::Mmio {
                    keel_mmio = k;
                }
                println!(
                    "| {direction} | {} KiB | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    size >> 10,
                    t.name(),
                    r.map_or("failed".into(), |r| format!("{r:.0}")),
                    k.map_or("failed".into(), |k| format!("{k:.0}")),
                    match (k, r) {
                        (Some(k), Some(r)) => format!("{:.0}%", 100.0 * k / r),
                        _ => "-".into(),
                    },
                    match (qemu_absent, q) {
                        (_, Some(q)) => format!("{q:.0} ({})", t.qemu_machine()),
                        (Some(why), None) => why.into(),
                        (None, None) => "failed".into(),
                    },
                    super::transport::ratio(k, q),
                    match (&fc, f, t) {
                        (_, Some(f), _) => format!("{f:.0}"),
                        (_, None, Transport::Pci) => "n/a (mmio only)".into(),
                        (Some(_), None, _) => "failed".into(),
                        (None, None, _) => "not measured (no binary)".into(),
                    },
                    super::transport::ratio(k, f),
                    if t == Transport::Pci {
                        super::transport::ratio(k, keel_mmio)
                    } else {
                        "-".into()
                    },
                );
            }
        }
    }
    print_busy(run, &busy_rows);
    let raw_rts = raw_round_trip(&work, 200);
    let boots = runs.max(5);
    let rt_row = "connect-request-reply";
    run.push(
        "vsock round trip",
        rt_row,
        "raw Unix socket",
        "µs",
        &raw_rts,
    );
    let raw_rt = super::median(raw_rts);
    let show = |t: Option<f64>| {
        t.map_or("failed".into(), |t| {
            format!("{t:.0} ({:.1}x raw)", t / raw_rt)
        })
    };
    let mut rt_lines = Vec::new();
    for &t in &transports {
        let keel_rt = guest_round_trip(
            &|| Some(keel_cmd(&bin, ROUND_TRIP_CMDLINE, &sock, t)),
            &sock,
            boots,
        );
        run.push_on(
            "vsock round trip",
            rt_row,
            &t.keel_series(),
            t.name(),
            "µs",
            &keel_rt,
        );
        rt_lines.push((
            format!(
                "probe guest -> Keel vsock over {} -> host socket ({boots} boots)",
                t.name()
            ),
            show(med(keel_rt)),
        ));
    }
    if transports.contains(&Transport::Mmio) {
        let fc_rt = match &fc {
            Some(fc) => guest_round_trip(
                &|| fc_cmd(fc, &work, &probe, ROUND_TRIP_CMDLINE, &sock),
                &sock,
                boots,
            ),
            None => Vec::new(),
        };
        run.push_on(
            "vsock round trip",
            rt_row,
            "Firecracker",
            "mmio",
            "µs",
            &fc_rt,
        );
        rt_lines.push((
            format!("probe guest -> Firecracker vsock over mmio -> host socket ({boots} boots)"),
            match &fc {
                Some(_) => show(med(fc_rt)),
                None => "not measured (no binary)".into(),
            },
        ));
    }
    println!();
    println!("connect-request-reply (the HostOS agent's pattern), median (µs)");
    println!();
    println!("| path | round trip (µs) |");
    println!("|---|---|");
    println!("| raw Unix socket on the host (200 samples) | {raw_rt:.0} |");
    for (path, v) in rt_lines {
        println!("| {path} | {v} |");
    }
    let _ = std::fs::remove_dir_all(&work);
}
