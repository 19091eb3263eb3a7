//! virtio-net throughput: the probe guest sending (guest -> host) and
//! receiving (host -> guest) UDP frames of 64 and 1500 bytes through a tap
//! on a bridge, guest-measured, under Keel and under QEMU (vhost off:
//! userspace virtio-net) over each chosen virtio transport
//! (`--transport mmio|pci|both`, default both; QEMU `-M microvm` with
//! `virtio-net-device` or `-M q35` with `virtio-net-pci`, see
//! [`super::transport`]), against a raw tap read/write loop on the same
//! bridge (the host limit), same run; and under Firecracker (mmio only, its
//! userspace virtio-net) when a binary built by hand is given
//! (`--firecracker PATH`).
//!
//! Everything runs in a network namespace the bench makes (and deletes):
//! bridge `br6` at 10.66.0.1/24; the guest (or the raw loop) is 10.66.0.2
//! with a fixed MAC and a static neighbour entry, so no ARP is needed on
//! the receive side.
//!
//! Guest -> host: the guest sends N frames to 10.66.0.1:9002 as fast as its
//! ring allows; the rate is N over the guest's send time, and a UDP socket
//! on the bridge counts what arrived. Host -> guest: once the guest says it
//! is ready, a host UDP socket sends N datagrams to 10.66.0.2:9003, paced
//! at 100,000 frames/s (more than a CPL3 guest here takes, without an
//! unpaced sender's full core taken from the vCPU and the VMM on a 2-core
//! host); the rate is what the receiver got over the time from its first to
//! its last frame (a receiver slower than the sender loses frames in the
//! tap's queue, not in the VMM: both VMMs stop reading the tap when the
//! guest has no buffers). The raw loop writes prebuilt frames to its own
//! tap, or reads from it what an unpaced sender sends: the host's limit.

use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::virtio::net::{HostTap, TapSetup};

use super::transport::{Kind, Transport};

const BRIDGE: &str = "br6";
const BRIDGE_MAC: [u8; 6] = [0x02, 0x66, 0, 0, 0, 1];
const HOST_IP: [u8; 4] = [10, 66, 0, 1];
const GUEST_IP: [u8; 4] = [10, 66, 0, 2];
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x66, 0, 2];
/// The probe's `bench.net` ports (tests/probe-guest/src/checks/net.rs).
const TX_PORT: u16 = 9002;
const RX_PORT: u16 = 9003;
/// virtio-net header Keel's tap code sets (TUNSETVNETHDRSZ).
const VNET_HDR: usize = 12;
/// A receiver that saw nothing for this long, after its first frame, is done.
const IDLE: Duration = Duration::from_secs(2);
/// Longest a guest run may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

fn mac_text(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn ip_text(a: &[u8; 4]) -> String {
    format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])
}

/// The network namespace of the run; the bench process moves into it, so
/// its sockets, taps and children are all there. Deleted when dropped.
struct Netns(String);

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("run ip (iproute2 is needed): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

impl Netns {
    fn enter() -> Result<Netns, String> {
        let name = format!("keel-bench-net-{}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Netns(name);
        let n = ns.0.as_str();
        let bmac = mac_text(&BRIDGE_MAC);
        let gmac = mac_text(&GUEST_MAC);
        let host = format!("{}/24", ip_text(&HOST_IP));
        let guest = ip_text(&GUEST_IP);
        ip(&[
            "-n", n, "link", "add", BRIDGE, "address", &bmac, "type", "bridge",
        ])?;
        ip(&["-n", n, "addr", "add", &host, "dev", BRIDGE])?;
        ip(&["-n", n, "link", "set", BRIDGE, "up"])?;
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            n,
            "neigh",
            "replace",
            &guest,
            "lladdr",
            &gmac,
            "dev",
            BRIDGE,
            "nud",
            "permanent",
        ])?;
        let f = std::fs::File::open(format!("/var/run/netns/{n}")).map_err(|e| e.to_string())?;
        // SAFETY: setns on an fd we opened; it moves only this (so far
        // single-threaded) process into the namespace.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns: {}", std::io::Error::last_os_error()));
        }
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

/// RFC 1071 checksum of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A `frame`-byte Ethernet frame (no FCS) carrying UDP from the guest to
/// the host's TX_PORT, as the probe sends it (UDP checksum 0: none).
fn guest_frame(frame: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(frame);
    f.extend_from_slice(&BRIDGE_MAC);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (frame - 14) as u16;
    let mut iph = [0u8; 20];
    iph[0] = 0x45;
    iph[2..4].copy_from_slice(&ip_len.to_be_bytes());
    iph[8] = 64;
    iph[9] = 17;
    iph[12..16].copy_from_slice(&GUEST_IP);
    iph[16..20].copy_from_slice(&HOST_IP);
    let c = checksum(&iph);
    iph[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&iph);
    f.extend_from_slice(&TX_PORT.to_be_bytes());
    f.extend_from_slice(&TX_PORT.to_be_bytes());
    f.extend_from_slice(&(ip_len - 20).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.resize(frame, 0x5a);
    f
}

/// Counts datagrams to TX_PORT on the bridge address until `stop`.
struct Sink {
    got: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Sink {
    fn start() -> Result<Sink, String> {
        let s = UdpSocket::bind((ip_text(&HOST_IP), TX_PORT)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_millis(50)))
            .map_err(|e| e.to_string())?;
        let got = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, st) = (got.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !st.load(Ordering::Relaxed) {
                if s.recv(&mut buf).is_ok() {
                    g.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Ok(Sink { got, stop, thread })
    }

    /// Waits for stragglers, stops, and returns the count.
    fn finish(self) -> u64 {
        std::thread::sleep(Duration::from_millis(200));
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        self.got.load(Ordering::Relaxed)
    }
}

/// Offered load of the host -> guest sender for a guest (frames/s): well
/// above what a guest polling from CPL3 on this software KVM takes, and far
/// enough below an unpaced sender that the sender does not take a whole
/// core from the vCPU and the VMM on a 2-core host.
const GUEST_OFFERED_PPS: u64 = 100_000;
/// Frames the paced sender sends back to back between sleeps.
const BURST: u64 = 64;

/// Sends `count` datagrams of a `frame`-byte frame's payload to the
/// guest: paced at `pps` frames/s (in bursts), or as fast as it can.
fn send_to_guest(frame: usize, count: u64, pps: Option<u64>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let Ok(s) = UdpSocket::bind((ip_text(&HOST_IP), RX_PORT)) else {
            return;
        };
        let payload = vec![0x5au8; frame - 42];
        let to = std::net::SocketAddr::from((GUEST_IP, RX_PORT));
        let start = Instant::now();
        for i in 0..count {
            if let Some(pps) = pps.filter(|_| i % BURST == 0) {
                let due = start + Duration::from_secs_f64(i as f64 / pps as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            // A full tap queue drops (counted by the kernel); keep going.
            let _ = s.send_to(&payload, to);
        }
    })
}

/// One measurement: frames per second, the fraction delivered, and for a
/// VMM the host CPU its threads other than the vCPUs spent per frame.
#[derive(Clone, Copy)]
struct Rate {
    pps: f64,
    delivered: f64,
    vmm_ns_per_frame: Option<f64>,
}

/// The raw tap loop: writes `count` prebuilt frames to a tap on the bridge
/// (tx) or reads the host's datagrams from it (rx).
fn raw(dir: &str, frame: usize, count: u64) -> Result<Rate, String> {
    let tap = HostTap::open(&TapSetup {
        name: "kbraw0".into(),
        bridge: Some(BRIDGE.into()),
        mtu: None,
        queues: 1,
    })
    .map_err(|e| e.to_string())?;
    let q = &tap.queues[0];
    if dir == "tx" {
        let sink = Sink::start()?;
        let mut buf = vec![0u8; VNET_HDR];
        buf.extend_from_slice(&guest_frame(frame));
        let t = Instant::now();
        let mut sent = 0u64;
        while sent < count {
            match q.write(&buf) {
                Ok(_) => sent += 1,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
                Err(e) => return Err(format!("tap write: {e}")),
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let got = sink.finish();
        Ok(Rate {
            pps: count as f64 / secs,
            delivered: got as f64 / count as f64,
            vmm_ns_per_frame: None,
        })
    } else {
        // The bridge learns the raw loop's MAC only from frames it sends;
        // until then it floods, which reaches the tap as well.
        let sender = send_to_guest(frame, count, None);
        let mut buf = vec![0u8; 65536];
        let (mut got, mut first, mut last) = (0u64, None, Instant::now());
        let start = Instant::now();
        loop {
            match q.read(&mut buf) {
                Ok(n) if is_rx_frame(&buf[..n]) => {
                    got += 1;
                    last = Instant::now();
                    first.get_or_insert(last);
                    if got == count {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let idle =
                        first.map_or(start.elapsed() > RUN_TIMEOUT, |_| last.elapsed() > IDLE);
                    if idle {
                        break;
                    }
                    std::hint::spin_loop();
                }
                Err(e) => return Err(format!("tap read: {e}")),
            }
        }
        let _ = sender.join();
        let first = first.ok_or("no frame reached the tap")?;
        Ok(Rate {
            pps: got as f64 / last.duration_since(first).as_secs_f64(),
            delivered: got as f64 / count as f64,
            vmm_ns_per_frame: None,
        })
    }
}

/// A frame read from the tap (virtio-net header first) that is a UDP
/// datagram to the guest's RX_PORT.
fn is_rx_frame(b: &[u8]) -> bool {
    let f = b.get(VNET_HDR..).unwrap_or(&[]);
    f.len() >= 42
        && f[12..14] == [0x08, 0x00]
        && f[23] == 17
        && f[30..34] == GUEST_IP
        && f[36..38] == RX_PORT.to_be_bytes()
}

/// Runs the probe's net benchmark under one VMM command line.
fn guest(mut cmd: Command, dir: &str, frame: usize, count: u64) -> Result<Rate, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let sink = if dir == "tx" {
        Some(Sink::start()?)
    } else {
        None
    };
    let mut child = cmd.spawn().map_err(|e| format!("spawn: {e}"))?;
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    // Kills a run that hangs; samples the VMM's non-vCPU CPU time (the
    // last sample before it exits counts: at most 20 ms missed).
    let watcher = std::thread::spawn(move || {
        let t = Instant::now();
        let mut cpu = super::threads::Snapshot::default();
        while !d.load(Ordering::Relaxed) {
            cpu.update(pid);
            if t.elapsed() > RUN_TIMEOUT {
                // SAFETY: signalling a child we started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        cpu.total(false)
    });
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut text = String::new();
    let mut sender = None;
    let mut result = None;
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if line.starts_with("probe: bench net rx ready") {
            sender = Some(send_to_guest(frame, count, Some(GUEST_OFFERED_PPS)));
        }
        if line.starts_with("probe: bench net ") && line.contains(" ns=") {
            result = Some(
                super::probe_field(&line, "frames=")
                    .and_then(|n| Ok((n, super::probe_field(&line, "ns=")?))),
            );
        }
        text.push_str(&line);
        text.push('\n');
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    done.store(true, Ordering::Relaxed);
    let vmm_ns = watcher.join().unwrap_or(0);
    if let Some(s) = sender {
        let _ = s.join();
    }
    let host_got = sink.map(Sink::finish);
    if text.contains("PROBE FAIL bench") {
        return Err(format!("bench check failed ({status}):\n{text}"));
    }
    let (frames, ns) = result.ok_or_else(|| format!("no bench line ({status}):\n{text}"))??;
    Ok(Rate {
        pps: frames / (ns / 1e9),
        delivered: host_got.map_or(frames, |g| g as f64) / count as f64,
        vmm_ns_per_frame: (frames > 0.0).then(|| vmm_ns as f64 / frames),
    })
}

fn keel_cmd(bin: &Path, cmdline: &str, poll_us: u32, t: Transport) -> Command {
    let mut c = Command::new(bin.join("keel"));
    c.args(["--device-poll-us", &poll_us.to_string()]);
    c.args(["--kernel", &bin.join("probe-guest").display().to_string()])
        .args(t.keel_args())
        .args(["--memory", "size=256M", "--cmdline", cmdline])
        .args(["--log-level", "error"])
        .args([
            "--net",
            &format!("tap=kbk0,bridge={BRIDGE},mac={}", mac_text(&GUEST_MAC)),
        ]);
    c
}

fn qemu_cmd(qemu: &Path, probe: &Path, cmdline: &str, t: Transport) -> Command {
    let mut c = t.qemu(qemu, probe, cmdline, "256M");
    c.args([
        "-netdev",
        "tap,id=n0,ifname=kbq0,script=no,downscript=no,vhost=off",
    ])
    .args([
        "-device",
        &format!(
            "{},netdev=n0,mac={}",
            t.qemu_device(Kind::Net),
            mac_text(&GUEST_MAC)
        ),
    ]);
    c
}

/// Frames per run for a frame size and direction.
fn count(frame: usize) -> u64 {
    if frame <= 64 {
        200_000
    } else {
        100_000
    }
}

fn show(r: Option<Rate>, frame: usize) -> String {
    match r {
        Some(r) => format!(
            "{:.0} kpps, {:.2} Gbit/s ({:.0}%)",
            r.pps / 1e3,
            r.pps * frame as f64 * 8.0 / 1e9,
            100.0 * r.delivered.min(1.0)
        ),
        None => "failed".into(),
    }
}

fn median_rate(v: Vec<Rate>) -> Option<Rate> {
    if v.is_empty() {
        return None;
    }
    let pps = super::median(v.iter().map(|r| r.pps).collect());
    let delivered = super::median(v.iter().map(|r| r.delivered).collect());
    let cpu: Vec<f64> = v.iter().filter_map(|r| r.vmm_ns_per_frame).collect();
    Some(Rate {
        pps,
        delivered,
        vmm_ns_per_frame: (!cpu.is_empty()).then(|| super::median(cpu)),
    })
}

/// The `net` subcommand; records into `run`.
pub fn main(args: &[String], run: &mut super::record::Run) {
    let mut runs = 3usize;
    let mut qemu = super::which("qemu-system-x86_64");
    let mut dirs = vec!["tx", "rx"];
    let mut poll_us = 0u32;
    let mut frames = vec![64usize, 1500];
    let mut transports = vec![Transport::Mmio, Transport::Pci];
    let mut fc: Option<std::path::PathBuf> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next().map(String::as_str)) {
            ("--runs", Some(v)) => runs = v.parse().unwrap_or_else(|_| super::usage()),
            ("--firecracker", Some(v)) => fc = Some(v.into()),
            ("--qemu", Some("none")) => qemu = None,
            ("--qemu", Some(v)) => qemu = Some(v.into()),
            ("--keel-poll-us", Some(v)) => poll_us = v.parse().unwrap_or_else(|_| super::usage()),
            ("--dir", Some("tx")) => dirs = vec!["tx"],
            ("--dir", Some("rx")) => dirs = vec!["rx"],
            ("--frame", Some(v)) => {
                frames = vec![v
                    .parse()
                    .ok()
                    .filter(|f| (64..=1514).contains(f))
                    .unwrap_or_else(|| super::usage())]
            }
            ("--transport", Some(v)) => {
                transports = Transport::parse_list(v).unwrap_or_else(|| super::usage())
            }
            _ => super::usage(),
        }
    }
    let bin = super::bin_dir();
    let probe = bin.join("probe-guest");
    run.found("Keel", Some(&bin.join("keel")));
    run.found("QEMU", qemu.as_deref());
    let fc = super::firecracker_binary(fc, run);
    let ns = match Netns::enter() {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!("keel-bench net: network namespace set-up failed (needs root): {e}");
            std::process::exit(1);
        }
    };
    // QEMU opens an existing tap: a persistent one, made and put on the
    // bridge here (it goes with the namespace).
    let qemu_tap = qemu.as_ref().and_then(|_| {
        ip(&["tuntap", "add", "dev", "kbq0", "mode", "tap", "vnet_hdr"])
            .and_then(|()| ip(&["link", "set", "kbq0", "master", BRIDGE, "up"]))
            .map_err(|e| eprintln!("QEMU's tap: {e}"))
            .ok()
    });
    // Firecracker too opens an existing tap.
    let fc_work = std::env::temp_dir().join(format!("keel-bench-net-{}", std::process::id()));
    let fc = fc.filter(|_| {
        ip(&["tuntap", "add", "dev", "kbf0", "mode", "tap", "vnet_hdr"])
            .and_then(|()| ip(&["link", "set", "kbf0", "master", BRIDGE, "up"]))
            .and_then(|()| std::fs::create_dir_all(&fc_work).map_err(|e| e.to_string()))
            .map_err(|e| eprintln!("Firecracker's tap: {e}"))
            .is_ok()
    });
    let guest_mac = mac_text(&GUEST_MAC);
    let fc_cmd = |f: &Path, cmdline: &str| {
        super::firecracker(
            f,
            &fc_work,
            &probe,
            cmdline,
            (1, 256),
            super::FcDevice::Net {
                tap: "kbf0",
                mac: &guest_mac,
            },
        )
        .map_err(|e| e.to_string())
    };
    println!(
        "virtio-net throughput, UDP frames through a tap on a bridge, median of {runs}; \
         guest figures measured in the guest; (delivered %); Keel's device thread polls {poll_us} µs; \
         QEMU: `-M microvm` with virtio-net-device over mmio, `-M q35` with virtio-net-pci over pci \
         (vhost off); Firecracker: mmio only; the raw tap loop has no transport: the same figure on each row"
    );
    println!();
    println!(
        "| direction | frame | transport | raw tap loop | Keel | QEMU | Keel / QEMU | Firecracker | Keel / Firecracker | Keel / raw | Keel pci / mmio |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut cpu_rows = Vec::new();
    for &dir in &dirs {
        for &frame in &frames {
            let n = count(frame);
            let cmdline = format!(
                "console=ttyS0 probe.check=bench.net probe.net.ip={}/24 probe.net.peer={} \
                 probe.bench.net={dir},{frame},{n}",
                ip_text(&GUEST_IP),
                ip_text(&HOST_IP)
            );
            let mut rs = Vec::new();
            // Per transport: Keel's and QEMU's samples.
            let mut ks: Vec<Vec<Rate>> = vec![Vec::new(); transports.len()];
            let mut qs: Vec<Vec<Rate>> = vec![Vec::new(); transports.len()];
            let mut fs: Vec<Vec<Rate>> = vec![Vec::new(); transports.len()];
            for _ in 0..runs {
                match raw(dir, frame, n) {
                    Ok(r) => rs.push(r),
                    Err(e) => eprintln!("raw {dir} {frame}: {e}"),
                }
                for (i, &t) in transports.iter().enumerate() {
                    match guest(keel_cmd(&bin, &cmdline, poll_us, t), dir, frame, n) {
                        Ok(r) => ks[i].push(r),
                        Err(e) => eprintln!("Keel {} {dir} {frame}: {e}", t.name()),
                    }
                    if let (Some(q), Some(_)) = (&qemu, &qemu_tap) {
                        match guest(qemu_cmd(q, &probe, &cmdline, t), dir, frame, n) {
                            Ok(r) => qs[i].push(r),
                            Err(e) => eprintln!("QEMU {} {dir} {frame}: {e}", t.name()),
                        }
                    }
                    // Firecracker has no PCI transport.
                    if let (Some(f), Transport::Mmio) = (&fc, t) {
                        match fc_cmd(f, &cmdline).and_then(|c| guest(c, dir, frame, n)) {
                            Ok(r) => fs[i].push(r),
                            Err(e) => eprintln!("Firecracker {dir} {frame}: {e}"),
                        }
                    }
                }
            }
            let direction = if dir == "tx" {
                "guest -> host"
            } else {
                "host -> guest"
            };
            let row = format!("{direction} {frame} B");
            let record =
                |run: &mut super::record::Run, series: &str, t: Option<Transport>, v: &[Rate]| {
                    let kpps: Vec<f64> = v.iter().map(|r| r.pps / 1e3).collect();
                    let cpu: Vec<f64> = v
                        .iter()
                        .filter_map(|r| r.vmm_ns_per_frame)
                        .map(|ns| ns / 1e3)
                        .collect();
                    let tables = [
                        ("virtio-net throughput", "kpps", kpps),
                        ("VMM CPU outside vCPUs per frame", "µs", cpu),
                    ];
                    for (table, unit, samples) in tables {
                        match t {
                            Some(t) => run.push_on(table, &row, series, t.name(), unit, &samples),
                            None => run.push(table, &row, series, unit, &samples),
                        }
                    }
                };
            record(run, "raw tap loop", None, &rs);
            let r = median_rate(rs);
            let mut keel_mmio = None;
            for (i, &t) in transports.iter().enumerate() {
                record(run, &t.keel_series(), Some(t), &ks[i]);
                record(run, &t.qemu_series(), Some(t), &qs[i]);
                record(run, "Firecracker", Some(t), &fs[i]);
                let k = median_rate(std::mem::take(&mut ks[i]));
                let q = median_rate(std::mem::take(&mut qs[i]));
                let f = median_rate(std::mem::take(&mut fs[i]));
                if t == Transport::Mmio {
                    keel_mmio = k;
                }
                let pps = |x: Option<Rate>| x.map(|x| x.pps);
                println!(
                    "| {direction} | {frame} B | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    t.name(),
                    show(r, frame),
                    show(k, frame),
                    match (&qemu, q) {
                        (None, _) => "not measured (no QEMU)".into(),
                        (Some(_), q) => show(q, frame),
                    },
                    super::transport::ratio(pps(k), pps(q)),
                    super::transport::firecracker_cell(fc.is_some(), t, Some(show(f, frame))),
                    super::transport::ratio(pps(k), pps(f)),
                    match (k, r) {
                        (Some(k), Some(r)) => format!("{:.0}%", 100.0 * k.pps / r.pps),
                        _ => "-".into(),
                    },
                    if t == Transport::Pci {
                        super::transport::ratio(pps(k), pps(keel_mmio))
                    } else {
                        "-".into()
                    },
                );
                let cpu = |x: Option<Rate>| x.and_then(|x| x.vmm_ns_per_frame).map(|ns| ns / 1e3);
                cpu_rows.push((dir, frame, t, cpu(k), cpu(q), cpu(f)));
            }
        }
    }
    println!();
    println!("host CPU the VMM spent outside its vCPU threads, per frame (µs; device and event-loop threads; median)");
    println!();
    println!("| direction | frame | transport | Keel | QEMU | Keel / QEMU | Firecracker | Keel / Firecracker |");
    println!("|---|---|---|---|---|---|---|---|");
    for (dir, frame, t, k, q, f) in cpu_rows {
        let us = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.2}"));
        println!(
            "| {} | {frame} B | {} | {} | {} | {} | {} | {} |",
            if dir == "tx" {
                "guest -> host"
            } else {
                "host -> guest"
            },
            t.name(),
            us(k),
            us(q),
            super::transport::ratio(k, q),
            us(f),
            super::transport::ratio(k, f),
        );
    }
    drop(ns);
    let _ = std::fs::remove_dir_all(&fc_work);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_frame_is_a_valid_udp_datagram() {
        let f = guest_frame(64);
        assert_eq!(f.len(), 64);
        // A correct IPv4 header sums to zero with its checksum in place.
        assert_eq!(checksum(&f[14..34]), 0);
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 50);
        assert_eq!(u16::from_be_bytes([f[38], f[39]]), 30);
        assert_eq!(&f[36..38], &TX_PORT.to_be_bytes());
    }

    #[test]
    fn rx_frames_are_recognised_by_port() {
        let mut b = vec![0u8; VNET_HDR];
        let mut f = guest_frame(64);
        f[30..34].copy_from_slice(&GUEST_IP);
        f[36..38].copy_from_slice(&RX_PORT.to_be_bytes());
        b.extend_from_slice(&f);
        assert!(is_rx_frame(&b));
        b[VNET_HDR + 37] ^= 1;
        assert!(!is_rx_frame(&b));
    }
}
