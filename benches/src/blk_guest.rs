//! virtio-blk full path: the probe guest's benchmark mode (CPL3 driver ->
//! notify -> VMM -> backing) under Keel and under QEMU (aio=io_uring,
//! cache.direct=on), same guest, same backing, same run, over each chosen
//! virtio transport (`--transport mmio|pci|both`, default both; see
//! [`super::transport`]): Keel with `--transport`, QEMU `-M microvm` with
//! `virtio-blk-device` (modern virtio-mmio like Keel's) or `-M q35` with
//! `virtio-blk-pci` (modern only), and Firecracker over mmio when a binary built
//! by hand is given (`--firecracker PATH`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::transport::{Kind, Transport};

struct Case {
    kind: &'static str,
    bs: u64,
    count: u64,
}

const CASES: [Case; 4] = [
    Case {
        kind: "randread",
        bs: 4096,
        count: 20000,
    },
    Case {
        kind: "randwrite",
        bs: 4096,
        count: 20000,
    },
    Case {
        kind: "read",
        bs: 1 << 20,
        count: 1000,
    },
    Case {
        kind: "write",
        bs: 1 << 20,
        count: 1000,
    },
];

/// Runs one VMM command line and returns the guest-measured rate
/// (operations per second) from the probe's bench line.
fn run_once(mut cmd: Command, timeout: Duration) -> Result<f64, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().map_err(|e| format!("spawn: {e}"))?;
    let pid = child.id();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(timeout);
        // SAFETY: signalling a child we started; harmless if it is gone.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    drop(killer);
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("PROBE FAIL bench") {
        return Err(format!("bench check failed:\n{text}"));
    }
    super::probe_rate(&text, "probe: bench blk")
}

/// The `blk-guest` subcommand; records into `run`.
pub fn main(args: &[String], run: &mut super::record::Run) {
    let mut runs = 3usize;
    let mut qemu = super::which("qemu-system-x86_64");
    let mut poll_us = 0u32;
    let mut transports = vec![Transport::Mmio, Transport::Pci];
    let mut fc: Option<PathBuf> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--runs", Some(v)) => runs = v.parse().unwrap_or_else(|_| super::usage()),
            ("--keel-poll-us", Some(v)) => poll_us = v.parse().unwrap_or_else(|_| super::usage()),
            ("--qemu", Some(v)) if v == "none" => qemu = None,
            ("--qemu", Some(v)) => qemu = Some(v.into()),
            ("--firecracker", Some(v)) => fc = Some(v.into()),
            ("--transport", Some(v)) => {
                transports = Transport::parse_list(v).unwrap_or_else(|| super::usage())
            }
            _ => super::usage(),
        }
    }
    let dir = super::bin_dir();
    let keel = dir.join("keel");
    run.found("Keel", Some(&keel));
    run.found("QEMU", qemu.as_deref());
    let fc = super::firecracker_binary(fc, run);
    let probe = dir.join("probe-guest");
    let work = PathBuf::from("/var/tmp").join(format!("keel-bench-blkg-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("work dir");
    let img = work.join("disk.img");
    super::blk::make_backing(&img);
    let lo = super::blk::LoopDev::attach(&img);
    println!("virtio-blk full path: probe guest (CPL3, virtio-drivers) -> VMM -> loop device (O_DIRECT), guest-measured, median of {runs}; Keel's device thread polls {poll_us} µs; QEMU: `-M microvm` with virtio-blk-device over mmio, `-M q35` with virtio-blk-pci over pci; Firecracker (mmio only): io_engine Async (io_uring), which opens the device without O_DIRECT");
    println!();
    println!("| workload | QD | transport | Keel | QEMU | Keel / QEMU | Firecracker | Keel / Firecracker | Keel pci / mmio |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for c in CASES {
        for qd in [1u32, 32] {
            let cmdline = format!(
                "console=ttyS0 probe.check=blk.0.identify,bench probe.bench.blk={},{},{qd},{}",
                c.kind, c.bs, c.count
            );
            let keel_cmd = |t: Transport| {
                let mut k = Command::new(&keel);
                k.args([
                    "--kernel",
                    &probe.display().to_string(),
                    "--memory",
                    "size=512M",
                ])
                .args(t.keel_args())
                .args(["--cmdline", &cmdline, "--log-level", "error"])
                .args(["--disk", &format!("path={},direct=on", lo.0)])
                .args(["--device-poll-us", &poll_us.to_string()]);
                k
            };
            let qemu_cmd = |q: &Path, t: Transport| {
                let mut k = t.qemu(q, &probe, &cmdline, "512M");
                k.args([
                    "-drive",
                    &format!(
                        "id=d0,file={},format=raw,if=none,cache.direct=on,aio=io_uring",
                        lo.0
                    ),
                ])
                .args(["-device", &format!("{},drive=d0", t.qemu_device(Kind::Blk))]);
                k
            };
            let fc_cmd = |f: &Path| {
                super::firecracker(
                    f,
                    &work,
                    &probe,
                    &cmdline,
                    (1, 512),
                    super::FcDevice::Drive(Path::new(&lo.0)),
                )
            };
            let show = |r: f64| {
                if c.bs >= 1 << 20 {
                    format!("{r:.0} MiB/s")
                } else {
                    format!("{r:.0} IOPS")
                }
            };
            let name = format!("{} {}", if c.bs >= 1 << 20 { "1M" } else { "4K" }, c.kind);
            let (unit, scale) = if c.bs >= 1 << 20 {
                ("MiB/s", c.bs as f64 / (1 << 20) as f64)
            } else {
                ("IOPS", 1.0)
            };
            let row = format!("{name} QD{qd}");
            let mut keel_mmio = None;
            for &t in &transports {
                let mut ks = Vec::new();
                let mut qs = Vec::new();
                let mut fs = Vec::new();
                for _ in 0..runs {
                    match run_once(keel_cmd(t), Duration::from_secs(120)) {
                        Ok(r) => ks.push(r * scale),
                        Err(e) => eprintln!("Keel {} {} qd {qd}: {e}", t.name(), c.kind),
                    }
                    if let Some(q) = &qemu {
                        // q35 boots through SeaBIOS: more time to boot.
                        match run_once(qemu_cmd(q, t), Duration::from_secs(180)) {
                            Ok(r) => qs.push(r * scale),
                            Err(e) => eprintln!("QEMU {} {} qd {qd}: {e}", t.name(), c.kind),
                        }
                    }
                    // Firecracker has no PCI transport.
                    if let (Some(f), Transport::Mmio) = (&fc, t) {
                        match fc_cmd(f)
                            .map_err(|e| e.to_string())
                            .and_then(|cmd| run_once(cmd, Duration::from_secs(120)))
                        {
                            Ok(r) => fs.push(r * scale),
                            Err(e) => eprintln!("Firecracker {} qd {qd}: {e}", c.kind),
                        }
                        // Its writes went through the page cache: write
                        // them back now, not during the next VMM's run.
                        lo.drop_cache();
                    }
                }
                run.push_on(
                    "virtio-blk full path",
                    &row,
                    &t.keel_series(),
                    t.name(),
                    unit,
                    &ks,
                );
                run.push_on(
                    "virtio-blk full path",
                    &row,
                    &t.qemu_series(),
                    t.name(),
                    unit,
                    &qs,
                );
                run.push_on(
                    "virtio-blk full path",
                    &row,
                    "Firecracker",
                    t.name(),
                    unit,
                    &fs,
                );
                let k = (!ks.is_empty()).then(|| super::median(ks));
                let q = (!qs.is_empty()).then(|| super::median(qs));
                let f = (!fs.is_empty()).then(|| super::median(fs));
                if t == Transport::Mmio {
                    keel_mmio = k;
                }
                let fc_cell = super::transport::firecracker_cell(fc.is_some(), t, f.map(show));
                println!(
                    "| {name} | {qd} | {} | {} | {} | {} | {fc_cell} | {} | {} |",
                    t.name(),
                    k.map_or("failed".into(), show),
                    q.map_or(
                        if qemu.is_some() {
                            "failed".into()
                        } else {
                            "not measured (no QEMU)".into()
                        },
                        |q| format!("{} ({})", show(q), t.qemu_machine())
                    ),
                    super::transport::ratio(k, q),
                    super::transport::ratio(k, f),
                    if t == Transport::Pci {
                        super::transport::ratio(k, keel_mmio)
                    } else {
                        "-".into()
                    }
                );
            }
        }
    }
    drop(lo);
    let _ = std::fs::remove_dir_all(&work);
}
