//! `keel-bench`: benchmarks that print tables, Keel beside its anchors in
//! the same run.
//!
//! `keel-bench boot [--runs N] [--memory MIB] [--cpus N] [--qemu PATH]
//! [--firecracker PATH]` boots the probe guest under Keel, QEMU `-M microvm`
//! and (given the path of a binary built by hand, outside this project)
//! Firecracker, and reports medians of: exec to the guest's first console
//! byte, exec to the probe's last report line, and peak RSS of the VMM
//! process minus the guest memory it touched.
//!
//! `keel-bench blk [--seconds S] [--dir DIR] [--mq] [--only ROW]` drives Keel's virtio-blk
//! request path in-process (a host-side driver on real rings) against raw
//! io_uring on the same backing (a file, and a loop block device over
//! another file), 4 KiB random and 1 MiB sequential, at depth 1 and 32.
//!
//! `keel-bench net [--runs N] [--qemu PATH|none] [--firecracker PATH] [--dir tx|rx] [--frame B]` moves 64 B and 1500 B UDP
//! frames both ways between the probe guest and a bridge in a namespace of
//! its own, under Keel and QEMU, beside a raw tap loop.
//!
//! `blk-guest`, `net` and `vsock` take `--transport mmio|pci|both` (default
//! both): each row is measured for Keel over each chosen virtio transport
//! (`keel --transport` is always given) and for QEMU over the same one
//! (`-M microvm` with virtio-mmio devices, `-M q35` with virtio-pci ones;
//! see [`transport`]), with Keel's pci / mmio ratio in the table.
//!
//! Every measuring subcommand also takes `--json PATH` (this file) or
//! `--json-dir DIR` (a new file per run there) and writes its results in
//! the [`record`] format; `keel-bench report DIR [DIR...] --out OUT_DIR`
//! turns such runs into SVG bar charts ([`report`]).

mod api;
mod blk;
mod blk_guest;
mod boot;
mod net;
mod record;
mod report;
mod startup;
mod threads;
mod transport;
mod vsock;

/// The directory of this binary (target/<profile>), where `keel` and the
/// probe guest are built too.
pub fn bin_dir() -> std::path::PathBuf {
    std::env::current_exe()
        .expect("own path")
        .parent()
        .expect("target/<profile>")
        .to_path_buf()
}

/// `name` on $PATH.
pub fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Median of a non-empty sample.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The device a Firecracker run of the probe gets besides its console.
#[derive(Clone, Copy, Debug)]
pub enum FcDevice<'a> {
    /// None.
    None,
    /// A vsock device for guest CID 3 on this Unix socket (Firecracker binds
    /// it, so an old one is removed first).
    Vsock(&'a std::path::Path),
    /// A read-write virtio-blk drive on this file or block device, with
    /// Firecracker's io_uring engine (`io_engine = "Async"`).
    Drive(&'a std::path::Path),
    /// A virtio-net device on the existing tap `tap`, guest MAC `mac`.
    Net {
        /// Name of the tap (made beforehand, with a virtio-net header).
        tap: &'a str,
        /// The guest's MAC address, `aa:bb:cc:dd:ee:ff`.
        mac: &'a str,
    },
}

/// The probe guest under Firecracker: writes `work/fc.json` (`kernel` with
/// `cmdline`, `cpus` vCPUs, `mem_mib` MiB and `device`) and returns the
/// command that boots it.
pub fn firecracker(
    fc: &std::path::Path,
    work: &std::path::Path,
    kernel: &std::path::Path,
    cmdline: &str,
    (cpus, mem_mib): (u32, u64),
    device: FcDevice,
) -> std::io::Result<std::process::Command> {
    let device_json = match device {
        FcDevice::None => String::new(),
        FcDevice::Vsock(sock) => {
            let _ = std::fs::remove_file(sock);
            format!(
                r#","vsock":{{"guest_cid":3,"uds_path":"{}"}}"#,
                sock.display()
            )
        }
        FcDevice::Drive(path) => format!(
            r#","drives":[{{"drive_id":"d0","path_on_host":"{}","is_root_device":false,"is_read_only":false,"io_engine":"Async"}}]"#,
            path.display()
        ),
        FcDevice::Net { tap, mac } => format!(
            r#","network-interfaces":[{{"iface_id":"eth0","guest_mac":"{mac}","host_dev_name":"{tap}"}}]"#
        ),
    };
    let drives = if matches!(device, FcDevice::Drive(_)) {
        ""
    } else {
        r#""drives":[],"#
    };
    let cfg = work.join("fc.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"boot-source":{{"kernel_image_path":"{}","boot_args":"{cmdline}"}},{drives}"machine-config":{{"vcpu_count":{cpus},"mem_size_mib":{mem_mib}}}{device_json}}}"#,
            kernel.display()
        ),
    )?;
    let mut c = std::process::Command::new(fc);
    c.args(["--no-api", "--config-file", &cfg.display().to_string()])
        .args(["--level", "Error"]);
    Ok(c)
}

/// The Firecracker binary a bench was given (`--firecracker PATH` or
/// `FIRECRACKER=PATH`), recorded in `run`; `None`, with the reason on
/// stderr, when there is none or it is not a file. This project never
/// builds Firecracker: build it by hand.
pub fn firecracker_binary(
    given: Option<std::path::PathBuf>,
    run: &mut record::Run,
) -> Option<std::path::PathBuf> {
    let fc = match given.or_else(|| std::env::var_os("FIRECRACKER").map(Into::into)) {
        Some(f) if f.is_file() => Some(f),
        Some(f) => {
            eprintln!("Firecracker: {} is not a file: not measured", f.display());
            None
        }
        None => {
            eprintln!("Firecracker: not measured (no binary: pass --firecracker PATH or FIRECRACKER=PATH; build it by hand outside this project)");
            None
        }
    };
    run.found("Firecracker", fc.as_deref());
    fc
}

/// The number in field `key` (such as `ns=`) of a probe report line.
pub fn probe_field(line: &str, key: &str) -> Result<f64, String> {
    line.split_whitespace()
        .find_map(|t| t.strip_prefix(key))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no {key} in {line:?}"))
}

/// Operations per second from the probe's `probe: bench ... n=N ns=T` line.
pub fn probe_rate(output: &str, prefix: &str) -> Result<f64, String> {
    let line = output
        .lines()
        .find(|l| l.starts_with(prefix))
        .ok_or_else(|| format!("no `{prefix}` line; output:\n{output}"))?;
    Ok(probe_field(line, "n=")? / (probe_field(line, "ns=")? / 1e9))
}

fn usage() -> ! {
    eprintln!(
        "usage: keel-bench boot [--runs N] [--memory MIB] [--cpus N] [--qemu PATH] [--firecracker PATH]\n       keel-bench blk [--seconds S] [--dir DIR] [--mq] [--only \"BACKING WORKLOAD QD\"]\n       keel-bench blk-guest [--runs N] [--qemu PATH|none] [--firecracker PATH] [--keel-poll-us N] [--transport mmio|pci|both] [--tables main|mq|both] [--mq-backing zram|file|shm-loop] [--mq-work PASSES,...]\n       keel-bench api [--requests N]\n       keel-bench vsock [--runs N] [--qemu PATH|none] [--firecracker PATH] [--transport mmio|pci|both]\n       keel-bench net [--runs N] [--qemu PATH|none] [--firecracker PATH] [--dir tx|rx] [--frame BYTES] [--keel-poll-us N] [--transport mmio|pci|both]\n       keel-bench startup [--runs N] [--sizes GIB,GIB,...] [--qemu PATH|none]\n       (each also takes --json PATH or --json-dir DIR)\n       keel-bench report DIR|FILE [DIR|FILE...] --out OUT_DIR"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first().map(String::as_str) else {
        usage()
    };
    let bench: fn(&[String], &mut record::Run) = match cmd {
        "boot" => boot::main,
        "blk" => blk::main,
        "blk-guest" => blk_guest::main,
        "api" => api::main,
        "net" => net::main,
        "vsock" => vsock::main,
        "startup" => startup::main,
        "report" => {
            if let Err(e) = report::main(&args[1..]) {
                eprintln!("keel-bench report: {e}");
                std::process::exit(1);
            }
            return;
        }
        _ => usage(),
    };
    let (rest, out) = record::split_args(&args[1..]).unwrap_or_else(|e| {
        eprintln!("keel-bench: {e}");
        usage()
    });
    let mut run = record::Run::new(cmd, record::Meta::here(&rest));
    bench(&rest, &mut run);
    match run.write(&out) {
        Ok(Some(path)) => eprintln!("results: {}", path.display()),
        Ok(None) => {}
        Err(e) => {
            eprintln!("keel-bench: writing the results: {e}");
            std::process::exit(1);
        }
    }
}
