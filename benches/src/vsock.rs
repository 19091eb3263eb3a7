//! vsock throughput: the probe guest streaming to/from a host Unix socket
//! through Keel's vsock device (guest-measured), against a raw Unix socket
//! pair on the host (the limit), and Firecracker's vsock when a binary built
//! by hand is given.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PORT: u32 = 5000;
const TOTAL: u64 = 32 << 20;

/// Raw Unix socket pair: MiB/s moving TOTAL bytes in `size` writes.
fn raw(size: usize) -> f64 {
    let (mut a, mut b) = UnixStream::pair().expect("socketpair");
    let t = Instant::now();
    let w = std::thread::spawn(move || {
        let buf = vec![0x5au8; size];
        let mut left = TOTAL as usize;
        while left > 0 {
            let n = left.min(size);
            a.write_all(&buf[..n]).expect("write");
            left -= n;
        }
    });
    let mut buf = vec![0u8; 64 << 10];
    let mut got = 0u64;
    while got < TOTAL {
        got += b.read(&mut buf).expect("read") as u64;
    }
    w.join().expect("writer");
    TOTAL as f64 / t.elapsed().as_secs_f64() / (1 << 20) as f64
}

/// Host side of one guest run: sinks (tx) or sources (rx) the stream.
fn host_side(listener: UnixListener, dir: &'static str) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        let mut buf = vec![0u8; 64 << 10];
        if dir == "tx" {
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        } else {
            let mut left = TOTAL as usize;
            while left > 0 {
                let n = left.min(buf.len());
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
                left -= n;
            }
            let _ = s.shutdown(std::net::Shutdown::Write);
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        }
    })
}

/// MiB/s from the probe's `probe: bench vsock ... bytes=B ns=T` line.
fn guest_rate(mut cmd: Command, sock: &Path, dir: &'static str) -> Result<f64, String> {
    let _ = std::fs::remove_file(format!("{}_{PORT}", sock.display()));
    let listener =
        UnixListener::bind(format!("{}_{PORT}", sock.display())).map_err(|e| e.to_string())?;
    let host = host_side(listener, dir);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let child = cmd.spawn().map_err(|e| e.to_string())?;
    let pid = child.id();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(120));
        // SAFETY: signalling a child we started; harmless if it is gone.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    drop(killer);
    let _ = host.join();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("probe: bench vsock"))
        .ok_or_else(|| format!("no bench line:\n{text}"))?;
    let field = |k| super::probe_field(line, k);
    Ok(field("bytes=")? / (field("ns=")? / 1e9) / (1 << 20) as f64)
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

/// Connect-request-reply round trip over a raw host Unix socket, µs.
fn raw_round_trip(dir: &Path, samples: usize) -> f64 {
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
    super::median(times)
}

/// Boot arguments of the round-trip measurement.
const ROUND_TRIP_CMDLINE: &str = "console=ttyS0 probe.check=vsock.identify,vsock.request_reply";

/// The same round trip from the probe guest through a VMM's vsock, µs
/// (guest-measured; one VM boot per sample). `vmm` makes the command line
/// of one boot whose vsock socket is `sock`.
fn guest_round_trip(vmm: &dyn Fn() -> Option<Command>, sock: &Path, runs: usize) -> Option<f64> {
    let mut times = Vec::new();
    for _ in 0..runs {
        let port = format!("{}_19090", sock.display());
        let _ = std::fs::remove_file(&port);
        let _ = std::fs::remove_file(sock);
        let server = agent(UnixListener::bind(&port).ok()?, 1);
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
    (!times.is_empty()).then(|| super::median(times))
}

/// Firecracker booting the probe with `cmdline`, its vsock on `sock`.
fn fc_cmd(fc: &Path, work: &Path, probe: &Path, cmdline: &str, sock: &Path) -> Option<Command> {
    super::firecracker(fc, work, probe, cmdline, (1, 256), Some(sock)).ok()
}

pub fn main(args: &[String]) {
    let mut fc: Option<PathBuf> = std::env::var_os("FIRECRACKER").map(PathBuf::from);
    let mut runs = 3usize;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--firecracker", Some(v)) => fc = Some(v.into()),
            ("--runs", Some(v)) => runs = v.parse().unwrap_or_else(|_| super::usage()),
            _ => super::usage(),
        }
    }
    let bin = super::bin_dir();
    let probe = bin.join("probe-guest");
    let work = PathBuf::from("/var/tmp").join(format!("keel-bench-vsock-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("work dir");
    let sock = work.join("v.sock");
    println!("vsock throughput, {} MiB per run, median of {runs} (MiB/s); guest figures measured in the guest", TOTAL >> 20);
    println!();
    println!("| direction | write size | raw Unix socket pair | Keel | Keel / raw | Firecracker | Keel / Firecracker |");
    println!("|---|---|---|---|---|---|---|");
    for dir in ["tx", "rx"] {
        for size in [4096usize, 64 << 10] {
            let cmdline = format!(
                "console=ttyS0 probe.check=vsock.identify,bench probe.bench.vsock={PORT},{size},{TOTAL},{dir}"
            );
            let r = super::median((0..runs).map(|_| raw(size)).collect());
            let k: Vec<f64> = (0..runs)
                .filter_map(|_| {
                    let mut c = Command::new(bin.join("keel"));
                    c.args([
                        "--kernel",
                        &probe.display().to_string(),
                        "--memory",
                        "size=256M",
                    ])
                    .args(["--cmdline", &cmdline, "--log-level", "error"])
                    .args(["--vsock", &format!("cid=3,socket={}", sock.display())]);
                    guest_rate(c, &sock, dir)
                        .map_err(|e| eprintln!("Keel: {e}"))
                        .ok()
                })
                .collect();
            let f: Vec<f64> = match &fc {
                Some(fc) if fc.is_file() => (0..runs)
                    .filter_map(|_| {
                        let cmd = fc_cmd(fc, &work, &probe, &cmdline, &sock)?;
                        guest_rate(cmd, &sock, dir)
                            .map_err(|e| eprintln!("Firecracker: {e}"))
                            .ok()
                    })
                    .collect(),
                _ => Vec::new(),
            };
            let k = (!k.is_empty()).then(|| super::median(k));
            let f = (!f.is_empty()).then(|| super::median(f));
            println!(
                "| {} | {} KiB | {r:.0} | {} | {} | {} | {} |",
                if dir == "tx" {
                    "guest -> host"
                } else {
                    "host -> guest"
                },
                size >> 10,
                k.map_or("failed".into(), |k| format!("{k:.0}")),
                k.map_or("-".into(), |k| format!("{:.0}%", 100.0 * k / r)),
                match (&fc, f) {
                    (_, Some(f)) => format!("{f:.0}"),
                    (Some(_), None) => "failed".into(),
                    (None, None) => "not measured (no binary)".into(),
                },
                match (k, f) {
                    (Some(k), Some(f)) => format!("{:.2}x", k / f),
                    _ => "-".into(),
                }
            );
        }
    }
    let raw_rt = raw_round_trip(&work, 200);
    let boots = runs.max(5);
    let keel_rt = guest_round_trip(
        &|| {
            let mut c = Command::new(bin.join("keel"));
            c.args(["--kernel", &probe.display().to_string()])
                .args(["--memory", "size=256M", "--cmdline", ROUND_TRIP_CMDLINE])
                .args(["--log-level", "error"])
                .args(["--vsock", &format!("cid=3,socket={}", sock.display())]);
            Some(c)
        },
        &sock,
        boots,
    );
    let fc_rt = match &fc {
        Some(fc) if fc.is_file() => guest_round_trip(
            &|| fc_cmd(fc, &work, &probe, ROUND_TRIP_CMDLINE, &sock),
            &sock,
            boots,
        ),
        _ => None,
    };
    let show = |t: Option<f64>| {
        t.map_or("failed".into(), |t| {
            format!("{t:.0} ({:.1}x raw)", t / raw_rt)
        })
    };
    println!();
    println!("connect-request-reply (the HostOS agent's pattern), median (µs)");
    println!();
    println!("| path | round trip (µs) |");
    println!("|---|---|");
    println!("| raw Unix socket on the host (200 samples) | {raw_rt:.0} |");
    println!(
        "| probe guest -> Keel vsock -> host socket ({boots} boots) | {} |",
        show(keel_rt)
    );
    println!(
        "| probe guest -> Firecracker vsock -> host socket ({boots} boots) | {} |",
        match &fc {
            Some(f) if f.is_file() => show(fc_rt),
            _ => "not measured (no binary)".into(),
        }
    );
    let _ = std::fs::remove_dir_all(&work);
}
