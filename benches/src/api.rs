//! Control API benchmark: latency of `GET /v1/vm` and `GET /v1/counters`
//! (p50/p99 over many requests), and the effect of a client hammering the
//! API on a running guest's disk throughput (guest-measured).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// One request on a kept-alive connection; returns the body length.
fn request(s: &mut UnixStream, path: &str, buf: &mut Vec<u8>) -> usize {
    try_request(s, path, buf).expect("request")
}

fn try_request(s: &mut UnixStream, path: &str, buf: &mut Vec<u8>) -> Option<usize> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: k\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    buf.clear();
    let mut chunk = [0u8; 8192];
    loop {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(h) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..h]);
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.trim().parse().ok())
                .expect("content length");
            if buf.len() >= h + 4 + len {
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                return Some(len);
            }
        }
    }
}

fn latencies(sock: &Path, path: &str, n: usize, keep_alive: bool) -> Vec<f64> {
    let mut out = Vec::with_capacity(n);
    let mut buf = Vec::new();
    let mut conn = UnixStream::connect(sock).expect("connect");
    for _ in 0..n {
        let t = Instant::now();
        if !keep_alive {
            conn = UnixStream::connect(sock).expect("connect");
        }
        request(&mut conn, path, &mut buf);
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    out.sort_by(|a, b| a.total_cmp(b));
    out
}

struct Keel(Child);
impl Drop for Keel {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_keel(dir: &Path, sock: &Path, cmdline: &str, disk: Option<&str>) -> Keel {
    let mut c = Command::new(dir.join("keel"));
    c.args(["--kernel", &dir.join("probe-guest").display().to_string()])
        // The same machine whatever Keel's default transport.
        .args(["--transport", "mmio"])
        .args([
            "--memory",
            "size=256M",
            "--cmdline",
            cmdline,
            "--log-level",
            "error",
        ])
        .arg("--api-socket")
        .arg(sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(d) = disk {
        c.args(["--disk", &format!("path={d},direct=on")]);
    }
    let k = Keel(c.spawn().expect("spawn keel"));
    let t = Instant::now();
    while UnixStream::connect(sock).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "API did not come up");
        std::thread::sleep(Duration::from_millis(10));
    }
    k
}

/// Guest-measured IOPS of the probe's blk bench, with the API idle or
/// hammered by a client.
fn guest_iops(dir: &Path, sock: &Path, disk: &str, hammer: Option<Duration>) -> (f64, u64) {
    let _ = std::fs::remove_file(sock);
    let cmdline =
        "console=ttyS0 probe.check=blk.0.identify,bench probe.bench.blk=randread,4096,16,6000";
    let mut k = start_keel(dir, sock, cmdline, Some(disk));
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let client = hammer.map(|gap| {
        let (stop, count, sock) = (stop.clone(), count.clone(), sock.to_path_buf());
        std::thread::spawn(move || {
            let mut conn = UnixStream::connect(&sock).expect("connect");
            let mut buf = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if try_request(&mut conn, "/v1/counters", &mut buf).is_none() {
                    return; // Keel exited at the end of the run
                }
                count.fetch_add(1, Ordering::Relaxed);
                if !gap.is_zero() {
                    std::thread::sleep(gap);
                }
            }
        })
    });
    let mut out = String::new();
    let _ = k.0.stdout.take().expect("stdout").read_to_string(&mut out);
    stop.store(true, Ordering::Relaxed);
    if let Some(c) = client {
        let _ = c.join();
    }
    let rate = super::probe_rate(&out, "probe: bench blk").unwrap_or_else(|e| panic!("{e}"));
    (rate, count.load(Ordering::Relaxed))
}

/// The `api` subcommand; records into `run`.
pub fn main(args: &[String], run: &mut super::record::Run) {
    let mut n = 10_000usize;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--requests", Some(v)) => n = v.parse().unwrap_or_else(|_| super::usage()),
            _ => super::usage(),
        }
    }
    let dir = super::bin_dir();
    run.found("Keel", Some(&dir.join("keel")));
    let work = PathBuf::from("/var/tmp").join(format!("keel-bench-api-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("work dir");
    let sock = work.join("api.sock");
    {
        let _k = start_keel(
            &dir,
            &sock,
            "console=ttyS0 probe.check=boot.cpl3 probe.idle",
            None,
        );
        println!("control API latency, {n} requests each, guest running (µs)");
        println!();
        println!("| request | connection | p50 | p99 | max |");
        println!("|---|---|---|---|---|");
        for (path, keep) in [("/v1/vm", true), ("/v1/counters", true), ("/v1/vm", false)] {
            let l = latencies(&sock, path, n, keep);
            let row = format!(
                "GET {path}, {}",
                if keep { "kept alive" } else { "new connection" }
            );
            run.push("control API latency", &row, "Keel", "µs", &l);
            println!(
                "| GET {path} | {} | {:.0} | {:.0} | {:.0} |",
                if keep {
                    "kept alive"
                } else {
                    "new per request"
                },
                percentile(&l, 0.5),
                percentile(&l, 0.99),
                l[l.len() - 1]
            );
        }
    }
    let img = work.join("disk.img");
    super::blk::make_backing(&img);
    let disk = img.display().to_string();
    let idle_runs: Vec<f64> = (0..3)
        .map(|_| guest_iops(&dir, &sock, &disk, None).0)
        .collect();
    let effect = "guest 4K randread QD16 under API load";
    run.push(effect, "idle", "Keel", "IOPS", &idle_runs);
    let idle = super::median(idle_runs);
    println!();
    println!("effect on a running guest: probe 4K randread QD16 (guest-measured), median of 3");
    println!();
    println!("| API load | API requests during the run | guest IOPS | vs idle |");
    println!("|---|---|---|---|");
    println!("| idle | 0 | {idle:.0} | 1.00x |");
    for (label, gap) in [
        (
            "one client, 1 ms between requests",
            Duration::from_millis(1),
        ),
        ("one client, back to back", Duration::ZERO),
    ] {
        let runs: Vec<(f64, u64)> = (0..3)
            .map(|_| guest_iops(&dir, &sock, &disk, Some(gap)))
            .collect();
        let rates: Vec<f64> = runs.iter().map(|x| x.0).collect();
        run.push(effect, label, "Keel", "IOPS", &rates);
        let b = super::median(rates);
        let reqs = runs.iter().map(|x| x.1).sum::<u64>() / runs.len() as u64;
        println!("| {label} | {reqs} | {b:.0} | {:.2}x |", b / idle);
    }
    let _ = std::fs::remove_dir_all(&work);
}
