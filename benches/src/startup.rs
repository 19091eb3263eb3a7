//! Startup with large memory, as HostOS starts its GuestOS (476 GiB on
//! 2 MiB hugepages): exec to the probe's first console byte and to its
//! last line for guests of growing size on hugepages, Keel against QEMU
//! (`-mem-path` on a hugetlbfs, with and without `-mem-prealloc`), and each
//! one's cost per GiB (the least-squares slope across the sizes).
//!
//! Needs root: the bench grows the host's 2 MiB pool
//! (`/proc/sys/vm/nr_hugepages`) to the largest guest and mounts a
//! hugetlbfs for QEMU in its scratch directory; both are undone at the end.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::boot::{self, Vmm, PROBE_CMDLINE};

/// The host's 2 MiB pool size.
const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";
/// Pages of 2 MiB in a GiB.
const PAGES_PER_GIB: u64 = 512;

struct Options {
    runs: usize,
    sizes_gib: Vec<u64>,
    qemu: Option<PathBuf>,
}

fn parse(args: &[String]) -> Options {
    let mut o = Options {
        runs: 5,
        sizes_gib: vec![1, 2, 4, 8],
        qemu: super::which("qemu-system-x86_64"),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().unwrap_or_else(|| super::usage());
        match a.as_str() {
            "--runs" => o.runs = val().parse().unwrap_or_else(|_| super::usage()),
            "--sizes" => {
                o.sizes_gib = val()
                    .split(',')
                    .map(|s| s.trim().parse().unwrap_or_else(|_| super::usage()))
                    .collect()
            }
            "--qemu" => {
                let v = val();
                o.qemu = (v != "none").then(|| v.into());
            }
            _ => super::usage(),
        }
    }
    if o.runs == 0 || o.sizes_gib.is_empty() || o.sizes_gib.contains(&0) {
        super::usage();
    }
    o
}

fn meminfo(key: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The host's hugepage pool grown for the bench; shrunk back when dropped.
struct HugePool {
    original: u64,
}

impl HugePool {
    /// Makes at least `pages` 2 MiB pages free.
    fn ensure(pages: u64) -> Result<Self, String> {
        let read = || -> Result<u64, String> {
            std::fs::read_to_string(NR_HUGEPAGES)
                .map_err(|e| format!("{NR_HUGEPAGES}: {e}"))?
                .trim()
                .parse()
                .map_err(|e| format!("{NR_HUGEPAGES}: {e}"))
        };
        let original = read()?;
        let pool = HugePool { original };
        let free = meminfo("HugePages_Free:").unwrap_or(0);
        if free < pages {
            std::fs::write(NR_HUGEPAGES, (original + pages - free).to_string())
                .map_err(|e| format!("{NR_HUGEPAGES}: {e} (the bench needs root)"))?;
        }
        let free = meminfo("HugePages_Free:").unwrap_or(0);
        if free < pages {
            return Err(format!(
                "{free} free 2 MiB pages after asking for {pages} (host memory too fragmented or too small)"
            ));
        }
        Ok(pool)
    }
}

impl Drop for HugePool {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(NR_HUGEPAGES, self.original.to_string()) {
            eprintln!(
                "warning: cannot restore {NR_HUGEPAGES} to {}: {e}",
                self.original
            );
        }
    }
}

/// A hugetlbfs mounted for QEMU's `-mem-path`; unmounted when dropped.
struct HugeMount {
    dir: PathBuf,
}

impl HugeMount {
    fn new(dir: PathBuf) -> Result<Self, String> {
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let out = Command::new("mount")
            .args(["-t", "hugetlbfs", "-o", "pagesize=2M", "none"])
            .arg(&dir)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t hugetlbfs: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(HugeMount { dir })
    }
}

impl Drop for HugeMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// Least-squares slope of `y` over `x`.
fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    (den > 0.0).then(|| num / den)
}

fn keel_vmm(keel: &Path, probe: &Path, gib: u64) -> Vmm {
    let (keel, probe) = (keel.to_path_buf(), probe.to_path_buf());
    Vmm {
        name: "Keel",
        command: Box::new(move |_| {
            let mut c = Command::new(&keel);
            c.args(["--kernel", &probe.display().to_string()])
                .args(["--transport", "mmio"])
                .args(["--memory", &format!("size={gib}G,hugepages=on")])
                .args(["--cpus", "boot=1"])
                .args(["--cmdline", PROBE_CMDLINE, "--serial", "stdout"])
                .args(["--log-level", "error"]);
            c
        }),
    }
}

fn qemu_vmm(qemu: &Path, probe: &Path, gib: u64, mem_path: &Path, prealloc: bool) -> Vmm {
    let (qemu, probe, mem_path) = (
        qemu.to_path_buf(),
        probe.to_path_buf(),
        mem_path.to_path_buf(),
    );
    Vmm {
        name: if prealloc {
            "QEMU -mem-prealloc"
        } else {
            "QEMU"
        },
        command: Box::new(move |_| {
            let mut c = boot::qemu_microvm(&qemu, &probe, &format!("{gib}G"), 1);
            c.args(["-mem-path", &mem_path.display().to_string()]);
            if prealloc {
                c.arg("-mem-prealloc");
            }
            c
        }),
    }
}

/// The `startup` subcommand; records into `run`.
pub fn main(args: &[String], run: &mut super::record::Run) {
    let o = parse(args);
    let (keel, probe) = boot::binaries();
    run.found("Keel", Some(&keel));
    run.found("QEMU", o.qemu.as_deref());
    let largest = o.sizes_gib.iter().copied().max().unwrap_or(1);
    // A little over the largest guest: QEMU's file may round up.
    let _pool = match HugePool::ensure(largest * PAGES_PER_GIB + 16) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("startup: not measured: no hugepages for a {largest} GiB guest: {e}");
            std::process::exit(1);
        }
    };
    let workdir = std::env::temp_dir().join(format!("keel-bench-startup-{}", std::process::id()));
    std::fs::create_dir_all(&workdir).expect("scratch dir");
    let mount = match &o.qemu {
        Some(_) => match HugeMount::new(workdir.join("hugetlbfs")) {
            Ok(m) => Some(m),
            Err(e) => {
                eprintln!("QEMU: not measured ({e})");
                None
            }
        },
        None => {
            eprintln!("QEMU: not measured (qemu-system-x86_64 not found)");
            None
        }
    };
    println!(
        "startup with large memory: probe guest on 2 MiB hugepages, 1 vCPU, median of {} runs (ms); QEMU `-M microvm -mem-path <hugetlbfs>`, with and without `-mem-prealloc`",
        o.runs
    );
    let series = ["Keel", "QEMU", "QEMU -mem-prealloc"];
    // (series, GiB, first byte ms, last line ms) medians.
    let mut medians: Vec<(&str, u64, f64, f64)> = Vec::new();
    for &gib in &o.sizes_gib {
        let mut vmms = vec![keel_vmm(&keel, &probe, gib)];
        if let (Some(q), Some(m)) = (&o.qemu, &mount) {
            vmms.push(qemu_vmm(q, &probe, gib, &m.dir, false));
            vmms.push(qemu_vmm(q, &probe, gib, &m.dir, true));
        }
        for vmm in &vmms {
            let mut samples = Vec::new();
            for _ in 0..o.runs {
                match boot::measure(vmm, &workdir, gib << 10) {
                    Ok(s) => samples.push(s),
                    Err(e) => {
                        eprintln!("{} at {gib} GiB: run failed: {e}", vmm.name);
                        break;
                    }
                }
            }
            if samples.is_empty() {
                continue;
            }
            let first: Vec<f64> = samples
                .iter()
                .map(|s| s.first_output.as_secs_f64() * 1e3)
                .collect();
            let last: Vec<f64> = samples
                .iter()
                .map(|s| s.last_line.as_secs_f64() * 1e3)
                .collect();
            run.push(
                "startup",
                &format!("{gib} GiB exec to first console byte"),
                vmm.name,
                "ms",
                &first,
            );
            run.push(
                "startup",
                &format!("{gib} GiB exec to last probe line"),
                vmm.name,
                "ms",
                &last,
            );
            medians.push((vmm.name, gib, super::median(first), super::median(last)));
        }
    }
    let cell = |name: &str, gib: u64| -> String {
        let keel = medians.iter().find(|m| m.0 == "Keel" && m.1 == gib);
        match medians.iter().find(|m| m.0 == name && m.1 == gib) {
            None => "not measured".into(),
            Some(m) if name == "Keel" => format!("{:.1} / {:.1}", m.2, m.3),
            Some(m) => match keel {
                Some(k) if k.2 > 0.0 && k.3 > 0.0 => format!(
                    "{:.1} / {:.1} ({:.2}x / {:.2}x Keel)",
                    m.2,
                    m.3,
                    m.2 / k.2,
                    m.3 / k.3
                ),
                _ => format!("{:.1} / {:.1}", m.2, m.3),
            },
        }
    };
    println!();
    println!("| guest memory | Keel: first byte / last line | QEMU | QEMU -mem-prealloc |");
    println!("|---|---|---|---|");
    for &gib in &o.sizes_gib {
        println!(
            "| {gib} GiB | {} | {} | {} |",
            cell(series[0], gib),
            cell(series[1], gib),
            cell(series[2], gib)
        );
    }
    println!();
    println!("cost per GiB of guest memory (least-squares slope of exec to first console byte over the sizes)");
    println!();
    println!("| VMM | ms per GiB | so, for 100 GiB |");
    println!("|---|---|---|");
    for name in series {
        let points: Vec<(f64, f64)> = medians
            .iter()
            .filter(|m| m.0 == name)
            .map(|m| (m.1 as f64, m.2))
            .collect();
        match slope(&points) {
            Some(s) => {
                run.push("startup", "cost per GiB", name, "ms", &[s]);
                println!("| {name} | {s:.2} | {:.2} s |", s * 100.0 / 1e3);
            }
            None => println!("| {name} | not measured (needs two sizes) | - |"),
        }
    }
    drop(mount);
    let _ = std::fs::remove_dir_all(&workdir);
}

#[cfg(test)]
mod tests {
    use super::slope;

    #[test]
    fn slope_of_a_line_and_of_too_few_points() {
        let s = slope(&[(1.0, 12.0), (2.0, 14.0), (4.0, 18.0), (8.0, 26.0)]).unwrap_or(f64::NAN);
        assert!((s - 2.0).abs() < 1e-9, "{s}");
        assert_eq!(slope(&[(1.0, 5.0)]), None);
        assert_eq!(slope(&[(2.0, 5.0), (2.0, 7.0)]), None);
    }
}
