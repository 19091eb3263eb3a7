//! virtio-blk end to end: the probe guest drives Keel's device from CPL3
//! with the virtio-drivers crate (and raw rings for malformed requests);
//! the host checks the backing byte for byte.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use keel_tests::{
    api_call, guest_pattern, make_test_disk, probe_guest, run_keel, scratch_dir, LoopDevice,
    ProbeReport, RunResult, RunningKeel,
};

const DEADLINE: Duration = Duration::from_secs(120);

const WRITABLE_CHECKS: &[&str] = &[
    "blk.0.identify",
    "blk.0.host_pattern",
    "blk.0.write_read",
    "blk.0.flush",
    "blk.0.write_zeroes",
    "blk.0.discard",
];

const MALFORMED_CHECKS: &[&str] = &[
    "blk.malformed.past_end",
    "blk.malformed.unknown_type",
    "blk.malformed.bad_address",
    "blk.malformed.wrong_direction",
    "blk.malformed.short_status",
    "blk.malformed.header_only",
];

/// Checks what the probe left on a writable disk's backing: its pattern at
/// 4 MiB, zeros where it wrote zeroes and discarded, the rest untouched.
fn verify_written(bytes: &[u8]) {
    assert_eq!(bytes.len() as u64, keel_tests::TEST_DISK_SIZE);
    let w = 4usize << 20;
    let bad = (w..w + (256 << 10)).find(|&o| bytes[o] != guest_pattern(o as u64));
    assert_eq!(bad, None, "guest pattern missing at offset {bad:?}");
    assert!(
        bytes[8 << 20..(8 << 20) + (64 << 10)]
            .iter()
            .all(|b| *b == 0),
        "write-zeroes range"
    );
    assert!(
        bytes[12 << 20..13 << 20].iter().all(|b| *b == 0),
        "discarded range"
    );
    assert_eq!(
        bytes[(8 << 20) + (64 << 10)],
        0xff,
        "beyond write-zeroes untouched"
    );
    assert_eq!(bytes[w - 1], 0x11, "before the guest's writes untouched");
    assert_eq!(
        bytes[w + (256 << 10)],
        0x11,
        "after the guest's writes untouched"
    );
}

fn keel_args(disks: &[String], extra_cmdline: &str) -> Vec<String> {
    let mut a = vec![
        "--kernel".to_string(),
        probe_guest().display().to_string(),
        "--memory".into(),
        "size=256M".into(),
        "--cmdline".into(),
        format!("console=ttyS0 probe.check=blk {extra_cmdline}"),
    ];
    for d in disks {
        a.push("--disk".into());
        a.push(d.clone());
    }
    a
}

#[test]
fn loop_device_and_read_only_file_disk() {
    let dir = scratch_dir("blk-loop");
    let backing = dir.join("guestos.img");
    make_test_disk(&backing);
    let lo = LoopDevice::attach(&backing);
    let config = dir.join("config.img");
    make_test_disk(&config);
    let config_before = std::fs::read(&config).unwrap();
    let args = keel_args(
        &[
            format!("path={},direct=on,serial=guestos", lo.path.display()),
            format!("path={},readonly=on,serial=config", config.display()),
        ],
        "probe.blk=2",
    );
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = run_keel(&refs, DEADLINE);
    let report = ProbeReport::parse(&r.stdout);
    let mut required: Vec<&str> = WRITABLE_CHECKS.to_vec();
    required.extend(MALFORMED_CHECKS);
    required.extend([
        "blk.1.identify",
        "blk.1.host_pattern",
        "blk.1.readonly",
        "blk.count",
    ]);
    report.assert_all_passed(&required, &r.stdout);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("serial=guestos"),
        "GET_ID of disk 0:\n{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("serial=config"),
        "GET_ID of disk 1:\n{}",
        r.stdout
    );
    // Read back through the block device itself, as an LVM volume would be.
    let via_device = std::fs::read(&lo.path).unwrap();
    verify_written(&via_device);
    assert!(
        std::fs::read(&config).unwrap() == config_before,
        "read-only disk unchanged"
    );
    // The malformed requests were counted, not fatal.
    assert!(
        r.stderr.contains("disk 0:") && !r.stderr.contains(" 0 invalid"),
        "{}",
        r.stderr
    );
    drop(lo);
}

/// One writable file disk (`--disk path=...,<options>`), over virtio-mmio
/// (`--transport mmio`) or, with `pci`, virtio-pci: every writable and
/// malformed check passes, the backing holds what the probe wrote, and the
/// device counted the malformed requests instead of failing on them.
/// Returns the console.
fn writable_file_disk(name: &str, options: &str, pci: bool) -> String {
    let dir = scratch_dir(name);
    let disk = dir.join("disk.img");
    make_test_disk(&disk);
    let mut args = keel_args(
        &[format!("path={},{options}", disk.display())],
        "probe.blk=1",
    );
    let transport = if pci { "pci" } else { "mmio" };
    args.extend(["--transport".into(), transport.into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = run_keel(&refs, DEADLINE);
    let mut required: Vec<&str> = WRITABLE_CHECKS.to_vec();
    required.extend(MALFORMED_CHECKS);
    required.push("blk.count");
    ProbeReport::parse(&r.stdout).assert_all_passed(&required, &r.stdout);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    verify_written(&std::fs::read(&disk).unwrap());
    assert!(
        r.stderr.contains("disk 0:") && !r.stderr.contains(" 0 invalid"),
        "malformed requests counted:\n{}",
        r.stderr
    );
    r.stdout
}

/// On virtio-mmio (announced on the command line), with the sync engine.
#[test]
fn file_disk_with_the_sync_engine() {
    let console = writable_file_disk("blk-sync", "engine=sync,serial=sync0", false);
    assert!(
        console.contains("virtio_mmio.device=4K@0xd0000000:5"),
        "disk 0 announced as virtio-mmio:\n{console}"
    );
}

/// The same checks, raw rings included, with the disk on PCI (00:01.0,
/// found through ECAM; nothing announced as virtio-mmio).
#[test]
fn file_disk_over_virtio_pci() {
    let console = writable_file_disk("blk-pci", "serial=pci0", true);
    assert!(
        console.contains("probe: blk0 capacity=") && console.contains(" serial=pci0"),
        "GET_ID over PCI:\n{console}"
    );
    assert!(
        !console.contains("virtio_mmio.device="),
        "nothing announced as virtio-mmio:\n{console}"
    );
}

#[test]
fn flushed_data_survives_kill_9() {
    use std::io::Read;
    let dir = scratch_dir("blk-kill");
    let backing = dir.join("disk.img");
    make_test_disk(&backing);
    let lo = LoopDevice::attach(&backing);
    let args = keel_args(
        &[format!("path={},direct=on", lo.path.display())],
        "probe.check=blk.0.identify,blk.0.host_pattern,blk.0.write_read,blk.0.flush probe.idle",
    );
    let mut child = Command::new(keel_tests::keel())
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 512];
    let start = std::time::Instant::now();
    while !seen.contains("probe: blk0 flushed") {
        let n = out.read(&mut buf).unwrap();
        assert!(
            n > 0 && start.elapsed() < DEADLINE,
            "no flush line:\n{seen}"
        );
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    child.kill().unwrap(); // SIGKILL: no clean shutdown, no final flush
    child.wait().unwrap();
    // Drop the host page cache's view and read what is on the device.
    let _ = Command::new("blockdev")
        .arg("--flushbufs")
        .arg(&lo.path)
        .status();
    let bytes = std::fs::read(&lo.path).unwrap();
    let w = 4usize << 20;
    let bad = (w..w + (256 << 10)).find(|&o| bytes[o] != guest_pattern(o as u64));
    assert_eq!(
        bad, None,
        "flushed data lost at offset {bad:?}\nconsole:\n{seen}"
    );
    drop(lo);
}

/// Opens `disk` and takes the advisory lock `how` (LOCK_EX or LOCK_SH) on
/// it, as another VMM would; the lock lasts as long as the file.
fn hold_lock(disk: &Path, how: libc::c_int) -> std::fs::File {
    let f = std::fs::File::open(disk).unwrap();
    // SAFETY: flock on a descriptor we own.
    assert_eq!(
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), how) },
        0
    );
    f
}

/// Runs keel on the probe with the one disk `disk_arg`.
fn run_with_disk(disk_arg: String, cmdline: &str) -> RunResult {
    let args = keel_args(&[disk_arg], cmdline);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run_keel(&refs, DEADLINE)
}

fn assert_refused_in_use(r: &RunResult) {
    assert_eq!(r.code(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("in use"), "{}", r.stderr);
}

#[test]
fn a_disk_in_use_is_refused_before_boot() {
    let dir = scratch_dir("blk-locked");
    let disk = dir.join("disk.img");
    make_test_disk(&disk);
    let held = hold_lock(&disk, libc::LOCK_EX);
    assert_refused_in_use(&run_with_disk(format!("path={}", disk.display()), ""));
    drop(held);

    // A disk its users share (HostOS's GuestOS and upgrade VMs): with a
    // shared lock held elsewhere, `shared=on` gets in and writes, and a
    // keel that wants the disk to itself is still kept out.
    let held = hold_lock(&disk, libc::LOCK_SH);
    let r = run_with_disk(format!("path={},shared=on", disk.display()), "probe.blk=1");
    ProbeReport::parse(&r.stdout).assert_all_passed(WRITABLE_CHECKS, &r.stdout);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    verify_written(&std::fs::read(&disk).unwrap());
    assert_refused_in_use(&run_with_disk(format!("path={}", disk.display()), ""));
    drop(held);
}

/// The config disk's image, read from the running keel's sealed memfd.
fn config_disk_image(pid: u32) -> Vec<u8> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("keel's fds");
    for fd in fds.flatten() {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        if target
            .display()
            .to_string()
            .contains("memfd:keel-config-disk")
        {
            return std::fs::read(fd.path()).expect("read the memfd");
        }
    }
    panic!("keel holds no keel-config-disk memfd");
}

#[test]
fn config_disk_is_labelled_read_only_and_has_no_serial() {
    use std::io::Read;
    let dir = scratch_dir("blk-config-disk");
    let src = dir.join("config");
    std::fs::create_dir_all(src.join("extra")).unwrap();
    let tar: Vec<u8> = (0..200_000u32).map(|i| (i * 31 + i / 977) as u8).collect();
    std::fs::write(src.join("ic-bootstrap.tar"), &tar).unwrap();
    std::fs::write(src.join("extra/node.json"), b"{\"node\":1}\n").unwrap();
    let sock = dir.join("api.sock");
    let mut args = keel_args(&[], "probe.idle probe.blk=1");
    args[5] =
        "console=ttyS0 probe.check=blk.0.identify,blk.0.readonly,blk.count probe.idle probe.blk=1"
            .into();
    args.extend([
        "--config-disk".into(),
        format!("dir={}", src.display()),
        "--api-socket".into(),
        sock.display().to_string(),
    ]);
    let mut k = RunningKeel::start(&args, &sock, &[]);
    k.wait_console("probe: idle", DEADLINE);
    let console = k.console();
    ProbeReport::parse(&console)
        .assert_all_passed(&["blk.0.identify", "blk.0.readonly", "blk.count"], &console);
    let blk0 = console
        .lines()
        .find(|l| l.starts_with("probe: blk0 capacity="))
        .unwrap_or_else(|| panic!("no blk0 line:\n{console}"));
    assert!(blk0.contains("ro=1"), "{blk0}");
    // GET_ID answers an empty serial (the probe prints `-` only when
    // GET_ID fails).
    assert!(blk0.ends_with("serial="), "no serial expected: {blk0}");

    // The image: label CONFIG, the files byte for byte.
    let image = config_disk_image(k.child.id());
    let copy = dir.join("config.img");
    std::fs::write(&copy, &image).unwrap();
    let mut f = std::fs::File::open(&copy).unwrap();
    let fs = fatfs::FileSystem::new(&mut f, fatfs::FsOptions::new()).unwrap();
    assert_eq!(fs.volume_label(), "CONFIG");
    let read = |name: &str| {
        let mut v = Vec::new();
        fs.root_dir()
            .open_file(name)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .read_to_end(&mut v)
            .unwrap();
        v
    };
    assert_eq!(read("ic-bootstrap.tar"), tar);
    assert_eq!(read("extra/node.json"), b"{\"node\":1}\n");
    drop(fs);
    // What udev (and so the GuestOS's /dev/disk/by-label) sees.
    let blkid = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "LABEL"])
        .arg(&copy)
        .output()
        .expect("blkid (util-linux)");
    assert_eq!(String::from_utf8_lossy(&blkid.stdout).trim(), "CONFIG");

    // GET /v1/vm lists it, read-only.
    let (code, body) = api_call(&sock, "GET", "/v1/vm", "").expect("API answers");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let disk = v["devices"]
        .as_array()
        .and_then(|d| {
            d.iter().find(|d| {
                d["path"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("config-disk:"))
            })
        })
        .unwrap_or_else(|| panic!("no config disk in {body}"));
    assert_eq!(disk["readonly"], true, "{body}");
    assert_eq!(disk["queues"], 1, "{body}");
    k.stop_with_keelctl(DEADLINE);
}

/// The probe's multi-queue bench, small: disk 0 over one request queue
/// driven by the boot vCPU, then over two, the second driven by an
/// application processor the probe takes to CPL3. Each queue's requests
/// must come back on its own used ring (a lane polls only its own), over
/// virtio-mmio and virtio-pci; Keel counts every request. Over pci the
/// lanes also do the guest's work on every block they read
/// (`probe.bench.blkmq.work`), which the probe times and reports.
#[test]
fn two_request_queues_from_two_vcpus() {
    const N: u64 = 2000;
    // Over pci each lane halts until its queue's MSI-X vector, sent to its
    // own CPU; virtio-mmio's one line is not routed, so there they poll.
    for (transport, wait, work) in [("mmio", "poll", 0), ("pci", "msix", 2)] {
        let dir = scratch_dir(&format!("blk-mq-{transport}"));
        let disk = dir.join("disk.img");
        make_test_disk(&disk);
        let cmdline = format!(
            "console=ttyS0 probe.check=bench.blkmq probe.bench.blkmq=randread,4096,8,{N} probe.bench.blkmq.work={work}"
        );
        let disk_arg = format!("path={},num_queues=2", disk.display());
        let kernel = probe_guest().display().to_string();
        let args = [
            "--kernel",
            &kernel,
            "--memory",
            "size=256M",
            "--cpus",
            "boot=2",
            "--transport",
            transport,
            "--cmdline",
            &cmdline,
            "--disk",
            &disk_arg,
        ];
        let r = run_keel(&args, DEADLINE);
        ProbeReport::parse(&r.stdout).assert_all_passed(&["bench.blkmq"], &r.stdout);
        assert_eq!(r.code(), 0, "{transport}: {}", r.stderr);
        for queues in [1, 2] {
            let want = format!(
                "probe: bench blkmq randread bs=4096 qd=8 queues={queues} wait={wait} work={work} work_ns="
            );
            let line = r
                .stdout
                .lines()
                .find(|l| l.starts_with(&want))
                .unwrap_or_else(|| panic!("{transport}: no {want:?} in\n{}", r.stdout));
            let field = |key: &str| -> u64 {
                line.split_whitespace()
                    .find_map(|f| f.strip_prefix(key))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("{transport}: no {key} in {line:?}"))
            };
            assert_eq!(field("n="), N, "{line}");
            assert!(field("ns=") > 0, "{line}");
            // Work costs time; none costs none.
            assert_eq!(field("work_ns=") > 0, work > 0, "{line}");
        }
        assert_eq!(
            r.stdout
                .matches("probe: bench info: blkmq work digest 0x")
                .count(),
            if work > 0 { 2 } else { 0 },
            "{transport}: one digest per phase with work:\n{}",
            r.stdout
        );
        let want = format!("disk 0: {} reads ({} B)", 2 * N, 2 * N * 4096);
        assert!(
            r.stderr.contains(&want),
            "{transport}: no {want:?} in\n{}",
            r.stderr
        );
    }
}
