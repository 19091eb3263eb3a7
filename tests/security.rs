//! Seccomp and the privilege drop: a thread that makes a forbidden system
//! call ends Keel with exit code 7 and its call's number in the log (the
//! `KEEL_TEST_SECCOMP_VIOLATION` hook makes one thread of the named kind do
//! so); `--seccomp off` lets the same call through, with a warning; with
//! `--user`, every thread of a running Keel is confined (`Seccomp: 2`),
//! runs as that user with no capability at all, and the guest's disk and
//! vsock checks pass.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use keel_tests::{
    keel, make_test_disk, probe_guest, run_with_deadline, scratch_dir, ProbeReport, RunningKeel,
};

/// `personality`, the call the hook makes.
const HOOK_SYSCALL: &str = "135";

fn probe_args(dir: &Path, cmdline: &str) -> Vec<String> {
    vec![
        "--kernel".into(),
        probe_guest().display().to_string(),
        "--memory".into(),
        "size=256M".into(),
        "--cpus".into(),
        "boot=2".into(),
        "--api-socket".into(),
        dir.join("api.sock").display().to_string(),
        "--vsock".into(),
        format!("cid=7,socket={}", dir.join("v.sock").display()),
        "--cmdline".into(),
        format!("console=ttyS0 {cmdline}"),
    ]
}

fn run_with_hook(kind: &str, extra: &[&str]) -> keel_tests::RunResult {
    let dir = scratch_dir(&format!("seccomp-{kind}{}", extra.len()));
    // A writable disk, so that its trim worker thread exists.
    let disk = dir.join("disk.img");
    make_test_disk(&disk);
    let mut cmd = Command::new(keel());
    cmd.args(probe_args(&dir, "probe.check=boot,vsock.identify"))
        .args(["--disk".into(), format!("path={}", disk.display())])
        .args(extra)
        .env("KEEL_TEST_SECCOMP_VIOLATION", kind);
    run_with_deadline(cmd, Duration::from_secs(60))
}

#[test]
fn a_forbidden_call_kills_keel_and_names_the_thread_and_the_call() {
    // The device thread confines itself when started, a disk's trim worker
    // and the API's acceptor too, each vCPU before its first KVM_RUN, the
    // main thread once every other thread runs.
    for kind in ["vcpu", "device", "trim", "api", "main"] {
        let r = run_with_hook(kind, &[]);
        assert_eq!(r.code(), 7, "{kind}: exit code\n{}", r.stderr);
        let line = format!("seccomp: the {kind} thread made forbidden system call {HOOK_SYSCALL};");
        assert!(
            r.stderr.contains(&line),
            "{kind}: no {line:?} in\n{}",
            r.stderr
        );
        if kind == "vcpu" {
            // Confined before the first KVM_RUN: the guest never ran.
            assert!(!r.stdout.contains("PROBE"), "the guest ran\n{}", r.stdout);
        }
    }
}

#[test]
fn seccomp_off_lets_the_call_through_and_warns() {
    let r = run_with_hook("vcpu", &["--seccomp", "off"]);
    assert_eq!(r.code(), 0, "{}\n{}", r.stderr, r.stdout);
    assert!(r.stderr.contains("SECCOMP IS OFF"), "{}", r.stderr);
    ProbeReport::parse(&r.stdout).assert_all_passed(&["vsock.identify"], &r.stdout);
}

/// `Name:\tvalue` of a /proc status file.
fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(":"))
        .unwrap_or_else(|| panic!("no {name} in\n{status}"))
        .trim()
}

#[test]
fn with_user_every_thread_is_confined_unprivileged_and_the_guest_works() {
    let dir = scratch_dir("privdrop");
    let disk = dir.join("disk.img");
    make_test_disk(&disk);
    let mut args = probe_args(
        &dir,
        "probe.check=boot,smp,blk.0.identify,blk.0.host_pattern,blk.0.write_read,blk.0.flush,vsock.identify probe.idle",
    );
    args.extend(["--disk".into(), format!("path={}", disk.display())]);
    // By name: Debian's `nobody` is 65534 with primary group 65534 (nogroup).
    args.extend(["--user".into(), "nobody".into()]);
    let mut k = RunningKeel::start(&args, &dir.join("api.sock"), &[]);
    k.wait_console("probe: idle", Duration::from_secs(60));
    let pid = k.child.id();
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task list")
        .map(|e| e.expect("task").path())
        .collect();
    // main, keel-devices, the disk's keel-trim0, keel-api, two vCPUs at
    // least.
    assert!(tasks.len() >= 6, "{tasks:?}");
    for t in &tasks {
        let status = std::fs::read_to_string(t.join("status")).expect("status");
        let name = field(&status, "Name");
        assert_eq!(field(&status, "Seccomp"), "2", "{name}: not filtered");
        assert_eq!(field(&status, "NoNewPrivs"), "1", "{name}");
        for id in ["Uid", "Gid"] {
            let ids: Vec<&str> = field(&status, id).split_whitespace().collect();
            assert_eq!(ids, ["65534"; 4], "{name}: {id}");
        }
        assert_eq!(field(&status, "Groups"), "", "{name}: groups");
        for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(field(&status, set), "0000000000000000", "{name}: {set}");
        }
    }
    let console = k.console();
    ProbeReport::parse(&console).assert_all_passed(
        &[
            "blk.0.identify",
            "blk.0.host_pattern",
            "blk.0.write_read",
            "blk.0.flush",
            "vsock.identify",
        ],
        &console,
    );
    assert!(
        k.log().contains("privileges dropped: uid 65534 gid 65534"),
        "{}",
        k.log()
    );
    k.stop_with_keelctl(Duration::from_secs(30));
}

#[test]
fn without_user_root_keeps_its_uid_but_no_capability() {
    let dir = scratch_dir("privdrop-root");
    let args = probe_args(&dir, "probe.check=boot probe.idle");
    let mut k = RunningKeel::start(&args, &dir.join("api.sock"), &[]);
    k.wait_console("probe: idle", Duration::from_secs(60));
    let status = std::fs::read_to_string(format!("/proc/{}/status", k.child.id())).unwrap();
    assert_eq!(field(&status, "Uid").split_whitespace().next(), Some("0"));
    for set in ["CapPrm", "CapEff", "CapBnd"] {
        assert_eq!(field(&status, set), "0000000000000000", "{set}");
    }
    assert!(
        k.log().contains("running as root without --user"),
        "{}",
        k.log()
    );
    k.stop_with_keelctl(Duration::from_secs(30));
}

#[test]
fn the_serial_log_rotates_under_the_vcpu_filter() {
    // Rotation renames and creates files on the vCPU that writes the byte:
    // the one place after start where Keel opens a path.
    let dir = scratch_dir("seccomp-serial-rotation");
    let log = dir.join("console.log");
    let mut cmd = Command::new(keel());
    let word = "w".repeat(1500);
    cmd.args(probe_args(&dir, &format!("probe.cpus=2 probe.echo={word}")))
        .arg("--serial")
        .arg(format!("file={},max_size=4K,max_backups=2", log.display()));
    let r = run_with_deadline(cmd, Duration::from_secs(60));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(!r.stderr.contains("seccomp:"), "{}", r.stderr);
    let backup = Path::new(&format!("{}.1", log.display())).to_path_buf();
    let sizes: Vec<u64> = [&log, &backup]
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .collect();
    assert!(
        sizes[1] > 0 && sizes.iter().all(|s| *s <= 4096),
        "no rotation within 4 KiB: {sizes:?}\n{}",
        r.stderr
    );
    let all = format!(
        "{}{}",
        std::fs::read_to_string(&backup).unwrap_or_default(),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(all.contains("PROBE"), "the console lost the guest's output");
}
