//! Boots the probe guest under real KVM and checks what it reports, the
//! console log, the boot timer and Keel's exit codes.

use std::process::Command;
use std::time::Duration;

use keel_tests::{
    api_call, probe_guest, repo_root, run_keel, run_with_deadline, scratch_dir, ProbeReport,
    RunningKeel,
};

/// The tests that change the host's hugepage pool take turns.
static HUGEPAGE_POOL: std::sync::Mutex<()> = std::sync::Mutex::new(());
const NR_HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";
const FREE_HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";

fn read_count(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{path}: {e} (2 MiB hugepage pool)"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

const DEADLINE: Duration = Duration::from_secs(60);

/// Checks the probe runs for the devices of this milestone.
const BASE_CHECKS: &[&str] = &[
    "boot.start_info",
    "boot.cmdline",
    "boot.memmap",
    "boot.cpl3",
    "cpuid.hypervisor",
    "cpuid.apic_id",
    "cpuid.topology",
    "smp.mptable",
    "serial.scratch",
    "smp.ap_startup",
];

fn probe_args(mem: &str, cpus: &str, expect: &str) -> Vec<String> {
    vec![
        "--kernel".into(),
        probe_guest().display().to_string(),
        "--memory".into(),
        format!("size={mem}"),
        "--cpus".into(),
        cpus.into(),
        "--cmdline".into(),
        format!("console=ttyS0 {expect}"),
    ]
}

fn run(args: &[String]) -> keel_tests::RunResult {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run_keel(&refs, DEADLINE)
}

#[test]
fn probe_passes_every_check_on_a_small_guest() {
    let args = probe_args(
        "512M",
        "boot=1",
        &format!(
            "probe.mem={} probe.cpus=1 probe.topo=1,1,1 probe.echo=keel-cmdline-ok",
            512u64 << 20
        ),
    );
    let r = run(&args);
    ProbeReport::parse(&r.stdout).assert_all_passed(BASE_CHECKS, &r.stdout);
    assert!(
        r.stdout.contains("keel-cmdline-ok"),
        "cmdline echoed:\n{}",
        r.stdout
    );
    assert_eq!(r.code(), 0, "clean guest end exits 0\n{}", r.stderr);
    assert!(r.stderr.contains("guest powered off"), "{}", r.stderr);
}

#[test]
fn hostos_topology_and_memory_above_4g() {
    // HostOS: sockets=2, cores=vcpus/4, threads=2. 8 vCPUs, 5 GiB of
    // memory so RAM continues above the 32-bit MMIO hole (NORESERVE: only
    // touched pages cost host memory).
    let mem = 5u64 << 30;
    let args = probe_args(
        "5G",
        "boot=8,sockets=2,cores=2,threads=2",
        &format!("probe.mem={mem} probe.cpus=8 probe.topo=2,2,2"),
    );
    let r = run(&args);
    ProbeReport::parse(&r.stdout).assert_all_passed(BASE_CHECKS, &r.stdout);
    assert_eq!(r.code(), 0, "{}", r.stderr);
}

#[test]
fn odd_topology_with_sparse_apic_ids() {
    // 3 cores per socket leaves holes in the APIC ID space (core field is 2
    // bits wide): the probe checks the MP table lists exactly the IDs CPUID
    // implies.
    let args = probe_args(
        "256M",
        "boot=12,sockets=2,cores=3,threads=2",
        &format!("probe.mem={} probe.cpus=12 probe.topo=2,3,2", 256u64 << 20),
    );
    let r = run(&args);
    ProbeReport::parse(&r.stdout).assert_all_passed(BASE_CHECKS, &r.stdout);
    assert_eq!(r.code(), 0, "{}", r.stderr);
}

#[test]
fn boot_timer_records_guest_milestones() {
    let r = run(&probe_args("128M", "boot=1", ""));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    for code in ["0x01", "0x02", "0x03"] {
        assert!(
            r.stderr
                .contains(&format!("boot-timer: guest milestone {code} at")),
            "milestone {code} missing:\n{}",
            r.stderr
        );
    }
}

#[test]
fn serial_log_file_is_truncated_at_each_launch() {
    let dir = scratch_dir("serial-log");
    let log = dir.join("guestos-serial.log");
    std::fs::write(&log, "stale output of an earlier boot\n".repeat(100)).unwrap();
    let mut args = probe_args("128M", "boot=1", "");
    args.extend(["--serial".into(), format!("file={}", log.display())]);
    let r = run(&args);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.starts_with("probe: start"),
        "log starts fresh:\n{text}"
    );
    assert!(!text.contains("stale output"));
    ProbeReport::parse(&text).assert_all_passed(BASE_CHECKS, &text);
    assert!(!r.stdout.contains("PROBE"), "console went to the file only");
}

#[test]
fn example_config_file_boots_the_probe() {
    let mut cmd = Command::new(keel_tests::keel());
    cmd.current_dir(repo_root())
        .args(["--config", "resources/examples/probe.toml"]);
    let r = run_with_deadline(cmd, DEADLINE);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    ProbeReport::parse(&r.stdout).assert_all_passed(BASE_CHECKS, &r.stdout);
}

#[test]
fn guest_reset_exits_3() {
    let r = run(&probe_args(
        "128M",
        "boot=1",
        "probe.check=boot.cpl3 probe.end=reset",
    ));
    assert_eq!(r.code(), 3, "{}", r.stderr);
    assert!(r.stderr.contains("reset"), "{}", r.stderr);
}

/// `memory.numa`: the probe reads the SRAT and SLIT back (`acpi.numa`)
/// and checks them against the configured sockets and memory.
#[test]
fn numa_guest_sees_one_node_per_socket() {
    let mut checks = BASE_CHECKS.to_vec();
    checks.push("acpi.numa");
    // 5 GiB on 2 sockets: node 0 is [0, 2.5G), node 1 [2.5G, 3G) and
    // [4G, 6G), across the hole.
    let mut args = probe_args(
        "5G,numa=on",
        "boot=8,sockets=2,cores=2,threads=2",
        &format!(
            "probe.mem={} probe.cpus=8 probe.topo=2,2,2 probe.numa=2",
            5u64 << 30
        ),
    );
    let r = run(&args);
    ProbeReport::parse(&r.stdout).assert_all_passed(&checks, &r.stdout);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    // Four sockets below the hole.
    let r = run(&probe_args(
        "1G,numa=on",
        "boot=4,sockets=4",
        &format!(
            "probe.mem={} probe.cpus=4 probe.topo=4,1,1 probe.numa=4",
            1u64 << 30
        ),
    ));
    ProbeReport::parse(&r.stdout).assert_all_passed(&checks, &r.stdout);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    // Without numa=on there are no such tables: probe.numa=0 passes and
    // probe.numa=2 fails (the check can fail).
    args[3] = "size=5G".into();
    let r = run(&args);
    let report = ProbeReport::parse(&r.stdout);
    assert!(
        report
            .failed
            .iter()
            .any(|(name, why)| name == "acpi.numa" && why.contains("no SRAT and SLIT")),
        "{}",
        r.stdout
    );
    let last = args.len() - 1;
    args[last] = args[last].replace("probe.numa=2", "probe.numa=0");
    let r = run(&args);
    ProbeReport::parse(&r.stdout).assert_all_passed(&checks, &r.stdout);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    // The API says how many nodes the guest was told of.
    let (memory, log) = memory_info_with("numa-api", "size=128M,numa=on", "boot=2,sockets=2");
    assert_eq!(memory["numa_nodes"], 2, "{memory}\n{log}");
    let (memory, log) = memory_info_with("numa-api-off", "size=128M", "boot=2,sockets=2");
    assert_eq!(memory["numa_nodes"], 0, "{memory}\n{log}");
}

/// Boots the probe on a machine with `transport` and returns its console.
fn machine_boots_the_probe(transport: &str) -> String {
    let mut args = probe_args(
        "512M",
        "boot=1",
        &format!("probe.mem={} probe.cpus=1 probe.topo=1,1,1", 512u64 << 20),
    );
    args.extend([
        "--transport".into(),
        transport.into(),
        "--log-level".into(),
        "debug".into(),
    ]);
    let r = run(&args);
    ProbeReport::parse(&r.stdout).assert_all_passed(BASE_CHECKS, &r.stdout);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    r.stdout
}

/// A PCI machine (host bridge, ECAM, MCFG, `\_SB.PCI0` in the DSDT), the
/// default, boots the probe; the probe finds the host bridge.
#[test]
fn pci_machine_boots_the_probe() {
    let console = machine_boots_the_probe("pci");
    assert!(console.contains("PROBE ok pci.enumerate"), "{console}");
}

/// The virtio-mmio machine boots the probe as well; it has no PCI bus.
#[test]
fn mmio_machine_boots_the_probe() {
    let console = machine_boots_the_probe("mmio");
    assert!(!console.contains("PROBE ok pci.enumerate"), "{console}");
}

#[test]
fn acpi_reset_register_exits_3() {
    // The probe writes the FADT's reset register (port 0x602) and nothing
    // else; without the register it would triple-fault (exit 4).
    let r = run(&probe_args(
        "128M",
        "boot=1",
        "probe.check=boot.cpl3 probe.end=acpi-reset",
    ));
    assert_eq!(r.code(), 3, "{}", r.stderr);
    assert!(r.stderr.contains("reset"), "{}", r.stderr);
}

#[test]
fn guest_triple_fault_exits_4_with_registers() {
    let r = run(&probe_args(
        "128M",
        "boot=1",
        "probe.check=boot.cpl3 probe.end=triple-fault",
    ));
    assert_eq!(r.code(), 4, "{}", r.stderr);
    assert!(
        r.stderr.contains("triple fault") && r.stderr.contains("rip="),
        "{}",
        r.stderr
    );
}

#[test]
fn sigterm_shuts_a_running_guest_down_gracefully() {
    // SIGTERM presses the ACPI power button; the interactive probe powers
    // off on it.
    let args = probe_args("128M", "boot=2", "probe.check=boot.cpl3 probe.interactive");
    let mut child = Command::new(keel_tests::keel())
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the guest says it is idle, then SIGTERM.
    let mut out = child.stdout.take().unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    let start = std::time::Instant::now();
    while !seen.contains("probe: interactive") {
        use std::io::Read;
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0 && start.elapsed() < DEADLINE, "no idle line:\n{seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(err.contains("stopped on graceful shutdown"), "{err}");
}

#[test]
fn hugepage_backed_memory_boots() {
    let _pool = HUGEPAGE_POOL.lock().unwrap_or_else(|p| p.into_inner());
    let sys = NR_HUGEPAGES;
    let before: u64 = std::fs::read_to_string(sys)
        .expect("2 MiB hugepage pool")
        .trim()
        .parse()
        .unwrap();
    let want = before + 64; // 128 MiB more
    std::fs::write(sys, want.to_string()).expect("reserve hugepages (needs root)");
    let got: u64 = std::fs::read_to_string(sys)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let r = run(&probe_args(
        "128M",
        "boot=1",
        &format!("probe.mem={} probe.check=boot.memmap", 128u64 << 20),
    )
    .into_iter()
    .map(|a| {
        if a == "size=128M" {
            "size=128M,hugepages=on".into()
        } else {
            a
        }
    })
    .collect::<Vec<_>>());
    std::fs::write(sys, before.to_string()).unwrap();
    assert!(
        got >= want,
        "host could only reserve {got} of {want} hugepages"
    );
    assert_eq!(r.code(), 0, "{}", r.stderr);
    ProbeReport::parse(&r.stdout).assert_all_passed(&["boot.memmap"], &r.stdout);
}

/// `GET /v1/vm`'s `memory` of a probe guest started with `--memory memory`,
/// and Keel's log.
fn memory_info(name: &str, memory: &str) -> (serde_json::Value, String) {
    memory_info_with(name, memory, "boot=1")
}

/// `GET /v1/vm`'s `memory` of a probe guest with these `--memory` and
/// `--cpus` values, and Keel's log.
fn memory_info_with(name: &str, memory: &str, cpus: &str) -> (serde_json::Value, String) {
    let dir = scratch_dir(name);
    let sock = dir.join("api.sock");
    let mut args = probe_args("128M", cpus, "probe.check=boot.cpl3 probe.idle");
    args[3] = memory.to_string();
    args.extend(["--api-socket".into(), sock.display().to_string()]);
    let mut k = RunningKeel::start(&args, &sock, &[]);
    let (code, body) = api_call(&sock, "GET", "/v1/vm", "").expect("API answers");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("VM JSON");
    k.stop_with_keelctl(DEADLINE);
    (v["memory"].clone(), k.log())
}

#[test]
fn hugepages_auto_uses_free_pages_else_falls_back_with_a_warning() {
    let _pool = HUGEPAGE_POOL.lock().unwrap_or_else(|p| p.into_inner());
    // Too few free: more than the pool has free now (overcommit=on: a
    // host with a large pool could be asked for more than MemTotal).
    let pages = read_count(FREE_HUGEPAGES) + 64;
    let (mem, log) = memory_info(
        "hugepages-auto-fallback",
        &format!("size={},hugepages=auto,overcommit=on", pages * (2 << 20)),
    );
    assert_eq!(mem["hugepages"], "auto", "{mem}");
    assert_eq!(mem["backing"], "anonymous", "{mem}");
    let why = mem["hugepages_fallback"].as_str().unwrap_or_default();
    assert!(why.contains("free 2 MiB hugepages"), "{mem}");
    assert!(
        log.contains("WARN") && log.contains("hugepages=auto") && log.contains("normal pages"),
        "{log}"
    );

    // Enough free: 64 pages more in the pool for a 128 MiB guest.
    let before = read_count(NR_HUGEPAGES);
    std::fs::write(NR_HUGEPAGES, (before + 64).to_string()).expect("grow the pool (root)");
    let free = read_count(FREE_HUGEPAGES);
    let result =
        (free >= 64).then(|| memory_info("hugepages-auto-used", "size=128M,hugepages=auto"));
    std::fs::write(NR_HUGEPAGES, before.to_string()).unwrap();
    let (mem, _) =
        result.unwrap_or_else(|| panic!("the host could only free {free} of 64 hugepages"));
    assert_eq!(mem["hugepages"], "auto", "{mem}");
    assert_eq!(mem["backing"], "hugetlbfs-2M", "{mem}");
    assert!(mem.get("hugepages_fallback").is_none(), "{mem}");
}
