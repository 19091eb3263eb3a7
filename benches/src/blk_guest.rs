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
use std::time::{Duration, Instant};

use super::threads::Snapshot;
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
fn run_once(cmd: Command, timeout: Duration) -> Result<f64, String> {
    let text = probe_output(cmd, timeout)?;
    super::probe_rate(&text, "probe: bench blk ")
}

/// One multi-queue phase as measured: guest IOPS, and how many host CPUs
/// were busy meanwhile (from `/proc/stat`: every CPU's non-idle time over
/// the wall time, so the VMM's threads, io_uring's workers and the loop
/// device's kernel threads all count).
#[derive(Clone, Copy, Debug)]
struct MqPhase {
    iops: f64,
    busy_cpus: f64,
    /// The VMM's vCPU threads' and its other threads' run time over the
    /// phase, in CPUs (1.0 = one CPU all the time).
    vcpus: f64,
    others: f64,
    /// The guest's own work per request (`work_ns=`), in ns.
    work_ns: f64,
}

/// Busy and total jiffies of all CPUs, from the first line of /proc/stat.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = text
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let idle = f.get(3)? + f.get(4).copied().unwrap_or(0);
    let total: u64 = f.iter().take(8).sum();
    Some((total - idle, total))
}

/// Runs one VMM command line with the probe's multi-queue bench and
/// returns the 1-queue (1 vCPU) and 2-queue (2 vCPUs) phases of the same
/// boot. The host's load is sampled from each phase's `start` line to its
/// result line.
fn run_mq(mut cmd: Command, timeout: Duration) -> Result<(MqPhase, MqPhase), String> {
    use std::io::BufRead;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().map_err(|e| format!("spawn: {e}"))?;
    let pid = child.id();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(timeout);
        // SAFETY: signalling a child we started; harmless if it is gone.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let mut text = String::new();
    let mut start = None;
    let mut threads = Snapshot::default();
    let mut phases = Vec::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if line.starts_with("probe: bench blkmq start ") {
            start = cpu_jiffies().map(|j| (j, Instant::now()));
            threads = Snapshot::take(pid);
        } else if line.starts_with("probe: bench blkmq ") && line.contains(" ns=") {
            let end = cpu_jiffies();
            let (vcpu_ns, other_ns) = Snapshot::take(pid).since(&threads);
            let iops = super::probe_field(&line, "n=")? / (super::probe_field(&line, "ns=")? / 1e9);
            let work_ns = super::probe_field(&line, "work_ns=")?;
            let (busy_cpus, vcpus, others) = match (start.take(), end) {
                (Some(((b0, t0), at)), Some((b1, t1))) if t1 > t0 => {
                    let wall = at.elapsed().as_nanos() as f64;
                    (
                        cpus * (b1 - b0) as f64 / (t1 - t0) as f64,
                        vcpu_ns as f64 / wall,
                        other_ns as f64 / wall,
                    )
                }
                _ => (f64::NAN, f64::NAN, f64::NAN),
            };
            phases.push(MqPhase {
                iops,
                busy_cpus,
                vcpus,
                others,
                work_ns,
            });
        }
        text.push_str(&line);
        text.push('\n');
    }
    let _ = child.wait();
    drop(killer);
    if text.contains("PROBE FAIL bench") {
        return Err(format!("bench check failed:\n{text}"));
    }
    match phases[..] {
        [one, two] => Ok((one, two)),
        _ => Err(format!("want two bench blkmq lines; output:\n{text}")),
    }
}

/// Runs one VMM command line to its end (killed after `timeout`) and
/// returns the probe's console output, or why the bench failed.
fn probe_output(mut cmd: Command, timeout: Duration) -> Result<String, String> {
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
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if text.contains("PROBE FAIL bench") {
        return Err(format!("bench check failed:\n{text}"));
    }
    Ok(text)
}

/// The `blk-guest` subcommand; records into `run`.
pub fn main(args: &[String], run: &mut super::record::Run) {
    let mut runs = 3usize;
    let mut qemu = super::which("qemu-system-x86_64");
    let mut poll_us = 0u32;
    let mut transports = vec![Transport::Mmio, Transport::Pci];
    let mut fc: Option<PathBuf> = None;
    let (mut main_table, mut mq) = (true, true);
    let mut mq_backing = MqBacking::Zram;
    let mut mq_work = MQ_WORK.to_vec();
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
            ("--mq-work", Some(v)) => {
                mq_work = v
                    .split(',')
                    .map(|w| w.parse().unwrap_or_else(|_| super::usage()))
                    .collect()
            }
            ("--mq-backing", Some(v)) => {
                mq_backing = match v.as_str() {
                    "file" => MqBacking::File,
                    "shm-loop" => MqBacking::ShmLoop,
                    "zram" => MqBacking::Zram,
                    _ => super::usage(),
                }
            }
            ("--tables", Some(v)) => {
                (main_table, mq) = match v.as_str() {
                    "main" => (true, false),
                    "mq" => (false, true),
                    "both" => (true, true),
                    _ => super::usage(),
                }
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
    if main_table {
        main_rows(
            run,
            &keel,
            &probe,
            qemu.as_deref(),
            fc.as_deref(),
            &work,
            &lo,
            runs,
            poll_us,
            &transports,
        );
    }
    drop(lo);
    let _ = std::fs::remove_dir_all(&work);
    if mq && !transports.contains(&Transport::Pci) {
        println!("\nvirtio-blk multi-queue: measured over pci only (per-queue MSI-X vectors); not measured");
    } else if mq {
        let mq = MqRun {
            keel: &keel,
            probe: &probe,
            qemu: qemu.as_deref(),
            runs,
            work: &mq_work,
        };
        mq_backing.with_disk(|disk, what| mq.table(run, disk, what));
    }
}

/// The disk of the multi-queue rows (`--mq-backing`; default `zram`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MqBacking {
    /// A regular file on the host's disk, opened O_DIRECT by both VMMs:
    /// each queue's io_uring reaches the filesystem directly.
    File,
    /// A loop device over a file in memory: one block device for every
    /// queue.
    ShmLoop,
    /// A zram device (a RAM disk, holding incompressible data here): no
    /// queue and no thread of its own, each request is served by the
    /// thread that issues it (for the VMMs, io_uring's workers), so that
    /// the disk adds no serial step of its own, as a multi-queue NVMe disk
    /// with a queue per CPU would not.
    Zram,
}

impl MqBacking {
    /// Makes the disk, calls `f` with its path and a description, and
    /// removes it. Without zram (no CONFIG_ZRAM, not root) it says so and
    /// uses a loop device over /dev/shm.
    fn with_disk(self, f: impl FnOnce(&str, &str)) {
        let pid = std::process::id();
        match self {
            MqBacking::File => {
                let img = PathBuf::from(format!("/var/tmp/keel-bench-mq-{pid}.img"));
                super::blk::make_backing(&img);
                f(&img.display().to_string(), "a file in /var/tmp, O_DIRECT");
                let _ = std::fs::remove_file(&img);
            }
            MqBacking::ShmLoop => {
                let img = PathBuf::from(format!("/dev/shm/keel-bench-mq-{pid}.img"));
                super::blk::make_backing(&img);
                let lo = super::blk::LoopDev::attach(&img);
                f(&lo.0, "a loop device over a file in /dev/shm, O_DIRECT");
                drop(lo);
                let _ = std::fs::remove_file(&img);
            }
            MqBacking::Zram => match super::blk::Zram::create() {
                Ok(z) => f(&z.path(), "a zram device of incompressible data, O_DIRECT"),
                Err(e) => {
                    println!("\nno zram device ({e}): the multi-queue rows use a loop device over /dev/shm");
                    MqBacking::ShmLoop.with_disk(f)
                }
            },
        }
    }
}

/// The main table: every workload at depth 1 and 32 over each transport,
/// Keel beside QEMU and (over mmio) Firecracker.
#[allow(clippy::too_many_arguments)]
fn main_rows(
    run: &mut super::record::Run,
    keel: &Path,
    probe: &Path,
    qemu: Option<&Path>,
    fc: Option<&Path>,
    work: &Path,
    lo: &super::blk::LoopDev,
    runs: usize,
    poll_us: u32,
    transports: &[Transport],
) {
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
                let mut k = Command::new(keel);
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
                let mut k = t.qemu(q, probe, &cmdline, "512M");
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
                    work,
                    probe,
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
            for &t in transports {
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
}

/// Requests per multi-queue run without guest work (each boot runs 1
/// queue, then 2); with work, fewer (see [`MqRun::count`]).
const MQ_COUNT: u64 = 100_000;
/// Requests in flight in the multi-queue rows: all on one queue, or half
/// on each of two.
const MQ_DEPTH: u32 = 32;
/// The guest's work per request in the multi-queue rows (`--mq-work`):
/// hash passes over each block read (`probe.bench.blkmq.work`), from none
/// to several times the host's own cost of a request.
const MQ_WORK: [u32; 4] = [0, 8, 24, 48];

/// The multi-queue rows, over virtio-pci only: 4K random reads at depth
/// 32 over 1 queue driven by one vCPU, then over 2 queues driven by one
/// vCPU each (16 in flight on each), in the same 2-vCPU guest, each vCPU
/// halted until its queue's MSI-X vector; Keel and QEMU q35; for each
/// amount of guest work per request. Over virtio-mmio a device has one
/// interrupt line, which the probe does not route, so its lanes would
/// spin: two spinning vCPUs on a small host measure the spinning, not the
/// queues.
struct MqRun<'a> {
    keel: &'a Path,
    probe: &'a Path,
    qemu: Option<&'a Path>,
    runs: usize,
    /// Hash passes per request, one set of rows each.
    work: &'a [u32],
}

impl MqRun<'_> {
    /// Requests per phase for `work` passes: about as long a phase as
    /// without work, at least 20000 requests.
    fn count(work: u32) -> u64 {
        (MQ_COUNT * 8 / (8 + u64::from(work))).max(20_000)
    }

    fn keel_cmd(&self, disk: &str, cmdline: &str) -> Command {
        let mut k = Command::new(self.keel);
        k.args(["--kernel", &self.probe.display().to_string()])
            .args(["--memory", "size=512M", "--cpus", "boot=2"])
            .args(Transport::Pci.keel_args())
            .args(["--cmdline", cmdline, "--log-level", "error"])
            .args(["--disk", &format!("path={disk},direct=on,num_queues=2")]);
        k
    }

    fn qemu_cmd(&self, q: &Path, disk: &str, cmdline: &str) -> Command {
        let t = Transport::Pci;
        let mut k = t.qemu_smp(q, self.probe, cmdline, "512M", 2);
        k.args([
            "-drive",
            &format!("id=d0,file={disk},format=raw,if=none,cache.direct=on,aio=io_uring"),
        ])
        .args([
            "-device",
            &format!("{},drive=d0,num-queues=2", t.qemu_device(Kind::Blk)),
        ]);
        k
    }

    /// Measures and prints the table over `disk` (described by `what`).
    fn table(&self, run: &mut super::record::Run, disk: &str, what: &str) {
        let t = Transport::Pci;
        let runs = self.runs;
        let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
        println!();
        println!("virtio-blk multi-queue, full path over pci: 4K random reads at depth {MQ_DEPTH} from the probe guest with 2 vCPUs and a disk of 2 request queues ({what}): 1 queue driven by one vCPU ({MQ_DEPTH} in flight), then 2 queues driven by one vCPU each ({} in flight on each), in the same boot, each vCPU halted until its queue's MSI-X vector; the guest's own work per request: none, or hashing each block it read N times before it reuses the slot (its time per request measured in the guest); guest-measured IOPS; meanwhile the host CPUs busy (of {ncpu}, whatever ran: the VMM, the host's block work) and the VMM's vCPU threads and other threads (device, event loop, io_uring workers) in CPUs; median of {runs}", MQ_DEPTH / 2);
        println!();
        println!("| guest work per request | VMM | queues | IOPS | host CPUs busy | VMM vCPU threads | VMM other threads | 2 queues / 1 |");
        println!("|---|---|---|---|---|---|---|---|");
        let table = "virtio-blk multi-queue";
        let mut series = vec![t.keel_series()];
        if self.qemu.is_some() {
            series.push(t.qemu_series());
        }
        // samples[work][vmm]: each boot's (1 queue, 2 queues).
        let mut samples =
            vec![vec![Vec::<(MqPhase, MqPhase)>::new(); series.len()]; self.work.len()];
        for _ in 0..runs {
            for (w, &work) in self.work.iter().enumerate() {
                let cmdline = format!(
                    "console=ttyS0 probe.check=bench.blkmq probe.bench.blkmq=randread,4096,{MQ_DEPTH},{} probe.bench.blkmq.work={work}",
                    Self::count(work)
                );
                match run_mq(self.keel_cmd(disk, &cmdline), Duration::from_secs(120)) {
                    Ok(r) => samples[w][0].push(r),
                    Err(e) => eprintln!("Keel {} multi-queue, work {work}: {e}", t.name()),
                }
                if let Some(q) = self.qemu {
                    match run_mq(self.qemu_cmd(q, disk, &cmdline), Duration::from_secs(180)) {
                        Ok(r) => samples[w][1].push(r),
                        Err(e) => eprintln!("QEMU {} multi-queue, work {work}: {e}", t.name()),
                    }
                }
            }
        }
        for (w, &work) in self.work.iter().enumerate() {
            for (series, samples) in series.iter().zip(&samples[w]) {
                let pick = |f: &dyn Fn(&(MqPhase, MqPhase)) -> f64| -> Vec<f64> {
                    samples.iter().map(f).filter(|v| v.is_finite()).collect()
                };
                let med = |v: Vec<f64>| (!v.is_empty()).then(|| super::median(v));
                let cpus = |v: Option<f64>| v.map_or("failed".into(), |v| format!("{v:.2}"));
                let gain = pick(&|s| s.1.iops / s.0.iops);
                let work_ns = pick(&|s| s.0.work_ns);
                let work_cell = match (work, med(work_ns.clone())) {
                    (0, _) => "none".to_string(),
                    (_, Some(ns)) => format!("{work} hash passes, {:.1} µs", ns / 1e3),
                    (_, None) => format!("{work} hash passes"),
                };
                let suffix = if work == 0 {
                    String::new()
                } else {
                    format!(", guest work {work} passes")
                };
                if work != 0 {
                    let row = format!("guest work {work} passes");
                    run.push_on(
                        &format!("{table}: guest work per request"),
                        &row,
                        series,
                        t.name(),
                        "ns",
                        &work_ns,
                    );
                }
                for queues in [1u8, 2] {
                    let phase = |s: &(MqPhase, MqPhase)| if queues == 1 { s.0 } else { s.1 };
                    let row = format!("4K randread QD{MQ_DEPTH}, {queues} queue(s){suffix}");
                    let iops = pick(&|s| phase(s).iops);
                    run.push_on(table, &row, series, t.name(), "IOPS", &iops);
                    for (what, v) in [
                        ("host CPUs busy", pick(&|s| phase(s).busy_cpus)),
                        ("VMM vCPU threads", pick(&|s| phase(s).vcpus)),
                        ("VMM other threads", pick(&|s| phase(s).others)),
                    ] {
                        run.push_on(
                            &format!("{table}: {what}"),
                            &row,
                            series,
                            t.name(),
                            "CPUs",
                            &v,
                        );
                    }
                    println!(
                        "| {work_cell} | {series} | {queues} | {} | {} | {} | {} | {} |",
                        med(iops).map_or("failed".into(), |v| format!("{v:.0}")),
                        cpus(med(pick(&|s| phase(s).busy_cpus))),
                        cpus(med(pick(&|s| phase(s).vcpus))),
                        cpus(med(pick(&|s| phase(s).others))),
                        if queues == 2 {
                            med(gain.clone()).map_or("failed".into(), |g| format!("{g:.2}x"))
                        } else {
                            "-".into()
                        },
                    );
                }
                run.push_on(
                    table,
                    &format!("2 queues / 1 queue{suffix}"),
                    series,
                    t.name(),
                    "x",
                    &gain,
                );
            }
        }
    }
}
