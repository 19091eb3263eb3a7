//! Boot benchmark: the same probe guest under each VMM.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One VMM under test.
pub(crate) struct Vmm {
    /// The series name.
    pub name: &'static str,
    /// Builds the command for one run; `workdir` is a scratch directory.
    pub command: Box<dyn Fn(&Path) -> Command>,
}

/// One run's measurements.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sample {
    /// Exec to the guest's first console byte.
    pub first_output: Duration,
    /// Exec to the probe's summary line.
    pub last_line: Duration,
    /// Peak RSS (VmHWM) minus resident guest memory, KiB.
    overhead_kib: u64,
    /// Peak RSS, KiB.
    peak_kib: u64,
}

struct Options {
    runs: usize,
    memory_mib: u64,
    cpus: u32,
    qemu: Option<PathBuf>,
    firecracker: Option<PathBuf>,
}

fn parse(args: &[String]) -> Options {
    let mut o = Options {
        runs: 10,
        memory_mib: 512,
        cpus: 2,
        qemu: super::which("qemu-system-x86_64"),
        firecracker: std::env::var_os("FIRECRACKER").map(PathBuf::from),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().unwrap_or_else(|| super::usage());
        match a.as_str() {
            "--runs" => o.runs = val().parse().unwrap_or_else(|_| super::usage()),
            "--memory" => o.memory_mib = val().parse().unwrap_or_else(|_| super::usage()),
            "--cpus" => o.cpus = val().parse().unwrap_or_else(|_| super::usage()),
            "--qemu" => o.qemu = Some(val().into()),
            "--firecracker" => o.firecracker = Some(val().into()),
            _ => super::usage(),
        }
    }
    o
}

/// Where keel-bench itself (and so keel and the probe) was built.
pub(crate) fn target_release() -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    exe.parent().expect("target/<profile>").to_path_buf()
}

/// keel and the probe guest next to keel-bench; exits when one is missing.
pub(crate) fn binaries() -> (PathBuf, PathBuf) {
    let dir = target_release();
    let (keel, probe) = (dir.join("keel"), dir.join("probe-guest"));
    for p in [&keel, &probe] {
        if !p.is_file() {
            eprintln!("{} missing: run `cargo build --release` first", p.display());
            std::process::exit(1);
        }
    }
    (keel, probe)
}

/// QEMU `-M microvm` booting the probe (`PROBE_CMDLINE`) with `memory`
/// (QEMU's `-m` syntax) and `cpus` vCPUs, serial on stdout.
pub(crate) fn qemu_microvm(qemu: &Path, probe: &Path, memory: &str, cpus: u32) -> Command {
    let mut c = Command::new(qemu);
    c.args(["-M", "microvm,x-option-roms=off,rtc=off,isa-serial=on"])
        .args(["-enable-kvm", "-cpu", "host,-arch-capabilities"])
        .args(["-m", memory, "-smp", &cpus.to_string()])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-serial", "stdio", "-monitor", "none"])
        .args(["-kernel", &probe.display().to_string()])
        .args(["-append", PROBE_CMDLINE]);
    c
}

/// Kernel command line for every VMM: the probe stays up after its checks
/// so its memory can be read before it is stopped.
pub(crate) const PROBE_CMDLINE: &str = "console=ttyS0 probe.idle";
const LAST_LINE: &str = " failed";
const IDLE_LINE: &str = "probe: idle";

/// Runs `vmm` once until the probe idles, then stops it.
pub(crate) fn measure(vmm: &Vmm, workdir: &Path, guest_mib: u64) -> Result<Sample, String> {
    let mut cmd = (vmm.command)(workdir);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("spawn: {e}"))?;
    let result = read_until_idle(&mut child, start).and_then(|(first, last)| {
        let (peak_kib, guest_kib) = memory_of(child.id(), guest_mib)?;
        Ok(Sample {
            first_output: first,
            last_line: last,
            overhead_kib: peak_kib.saturating_sub(guest_kib),
            peak_kib,
        })
    });
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn read_until_idle(child: &mut Child, start: Instant) -> Result<(Duration, Duration), String> {
    let mut out = child.stdout.take().ok_or("no stdout")?;
    let mut seen = String::new();
    let mut first = None;
    let mut last = None;
    let mut buf = [0u8; 4096];
    while !seen.contains(IDLE_LINE) {
        if start.elapsed() > Duration::from_secs(60) {
            return Err(format!("no `{IDLE_LINE}` within 60 s; output:\n{seen}"));
        }
        let n = out.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("VMM exited early; output:\n{seen}"));
        }
        let now = start.elapsed();
        first.get_or_insert(now);
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        if last.is_none()
            && seen
                .lines()
                .any(|l| l.starts_with("probe: ") && l.ends_with(LAST_LINE))
        {
            last = Some(now);
        }
    }
    if seen.contains("PROBE FAIL") {
        eprintln!(
            "warning: probe reported failures:\n{}",
            seen.lines()
                .filter(|l| l.contains("FAIL"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    Ok((first.unwrap_or_default(), last.ok_or("no summary line")?))
}

/// Peak RSS of `pid` and the resident size of its guest-memory mappings
/// (anonymous mappings at least half the guest's size), in KiB.
fn memory_of(pid: u32, guest_mib: u64) -> Result<(u64, u64), String> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    let peak = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .ok_or("no VmHWM")?;
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).map_err(|e| e.to_string())?;
    let mut guest = 0u64;
    let mut in_guest = false;
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        match (f.next(), f.next()) {
            (Some("Size:"), Some(kib)) => {
                in_guest = kib.parse::<u64>().unwrap_or(0) >= guest_mib * 1024 / 2;
            }
            (Some("Rss:"), Some(kib)) if in_guest => guest += kib.parse::<u64>().unwrap_or(0),
            _ => {}
        }
    }
    Ok((peak, guest))
}

/// The `boot` subcommand; records into `run`.
pub fn main(args: &[String], run: &mut super::record::Run) {
    let o = parse(args);
    let (keel, probe) = binaries();
    let workdir = std::env::temp_dir().join(format!("keel-bench-{}", std::process::id()));
    std::fs::create_dir_all(&workdir).expect("scratch dir");
    let (mem, cpus) = (o.memory_mib, o.cpus);
    run.found("Keel", Some(&keel));
    run.found("QEMU", o.qemu.as_deref());
    let fc = super::firecracker_binary(o.firecracker.clone(), run);

    let mut vmms: Vec<(Vmm, Option<String>)> = Vec::new();
    {
        let (keel, probe) = (keel.clone(), probe.clone());
        vmms.push((
            Vmm {
                name: "Keel",
                command: Box::new(move |_| {
                    let mut c = Command::new(&keel);
                    c.args(["--kernel", &probe.display().to_string()])
                        // Like QEMU microvm's and Firecracker's devices,
                        // whatever Keel's default transport.
                        .args(["--transport", "mmio"])
                        .args(["--memory", &format!("size={mem}M")])
                        .args(["--cpus", &format!("boot={cpus}")])
                        .args([
                            "--cmdline",
                            PROBE_CMDLINE,
                            "--serial",
                            "stdout",
                            "--log-level",
                            "error",
                        ]);
                    c
                }),
            },
            None,
        ));
    }
    match &o.qemu {
        Some(qemu) => {
            let (qemu, probe) = (qemu.clone(), probe.clone());
            vmms.push((
                Vmm {
                    name: "QEMU microvm",
                    command: Box::new(move |_| {
                        qemu_microvm(&qemu, &probe, &format!("{mem}M"), cpus)
                    }),
                },
                None,
            ))
        }
        None => eprintln!(
            "QEMU: not measured (qemu-system-x86_64 not found; apt-get install qemu-system-x86)"
        ),
    }
    let fc_note = match (fc, &o.firecracker) {
        (Some(fc), _) => {
            let probe = probe.clone();
            vmms.push((
                Vmm {
                    name: "Firecracker",
                    command: Box::new(move |work| {
                        super::firecracker(
                            &fc,
                            work,
                            &probe,
                            PROBE_CMDLINE,
                            (cpus, mem),
                            super::FcDevice::None,
                        )
                            .expect("firecracker config")
                    }),
                },
                None,
            ));
            None
        }
        (None, Some(fc)) => Some(format!("not measured ({} is not a file)", fc.display())),
        (None, None) => Some("not measured (no binary: pass --firecracker PATH or FIRECRACKER=PATH; build it by hand outside this project)".to_string()),
    };

    println!(
        "boot benchmark: probe guest, {mem} MiB, {cpus} vCPUs, median of {} runs each",
        o.runs
    );
    let mut rows: Vec<(String, String, String, String, String)> = Vec::new();
    let mut keel_ref: Option<(f64, f64, f64)> = None;
    for (vmm, _) in &vmms {
        let mut samples = Vec::new();
        for _ in 0..o.runs {
            match measure(vmm, &workdir, mem) {
                Ok(s) => samples.push(s),
                Err(e) => {
                    eprintln!("{}: run failed: {e}", vmm.name);
                    break;
                }
            }
        }
        if samples.is_empty() {
            rows.push((
                vmm.name.into(),
                "failed".into(),
                "failed".into(),
                "failed".into(),
                "failed".into(),
            ));
            continue;
        }
        let figures: [(&str, &str, Vec<f64>); 4] = [
            (
                "exec to first console byte",
                "ms",
                samples
                    .iter()
                    .map(|s| s.first_output.as_secs_f64() * 1e3)
                    .collect(),
            ),
            (
                "exec to last probe line",
                "ms",
                samples
                    .iter()
                    .map(|s| s.last_line.as_secs_f64() * 1e3)
                    .collect(),
            ),
            (
                "VMM RSS overhead",
                "MiB",
                samples
                    .iter()
                    .map(|s| s.overhead_kib as f64 / 1024.0)
                    .collect(),
            ),
            (
                "peak RSS incl. guest",
                "MiB",
                samples.iter().map(|s| s.peak_kib as f64 / 1024.0).collect(),
            ),
        ];
        for (name, unit, v) in &figures {
            run.push("boot", name, vmm.name, unit, v);
        }
        let first = super::median(
            samples
                .iter()
                .map(|s| s.first_output.as_secs_f64() * 1e3)
                .collect(),
        );
        let last = super::median(
            samples
                .iter()
                .map(|s| s.last_line.as_secs_f64() * 1e3)
                .collect(),
        );
        let over = super::median(
            samples
                .iter()
                .map(|s| s.overhead_kib as f64 / 1024.0)
                .collect(),
        );
        let peak = super::median(samples.iter().map(|s| s.peak_kib as f64 / 1024.0).collect());
        let rel = |v: f64, k: f64| {
            if k > 0.0 {
                format!(" ({:.2}x Keel)", v / k)
            } else {
                String::new()
            }
        };
        let (kf, kl, ko) = *keel_ref.get_or_insert((first, last, over));
        rows.push((
            vmm.name.into(),
            format!(
                "{first:.1}{}",
                if vmm.name == "Keel" {
                    String::new()
                } else {
                    rel(first, kf)
                }
            ),
            format!(
                "{last:.1}{}",
                if vmm.name == "Keel" {
                    String::new()
                } else {
                    rel(last, kl)
                }
            ),
            format!(
                "{over:.2}{}",
                if vmm.name == "Keel" {
                    String::new()
                } else {
                    rel(over, ko)
                }
            ),
            format!("{peak:.2}"),
        ));
    }
    if let Some(note) = fc_note {
        rows.push((
            "Firecracker".into(),
            note,
            String::new(),
            String::new(),
            String::new(),
        ));
    }
    println!();
    println!("| VMM | exec to first console byte (ms) | exec to last probe line (ms) | VMM RSS overhead (MiB) | peak RSS incl. guest (MiB) |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!("| {} | {} | {} | {} | {} |", r.0, r.1, r.2, r.3, r.4);
    }
    let _ = std::fs::remove_dir_all(&workdir);
}
