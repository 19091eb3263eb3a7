//! Linux guest tier: boots a minimal Linux kernel (PVH entry, ELF vmlinux) with
//! a busybox initramfs under `keel` and checks what the guest reports on its
//! serial console.
//!
//! The kernel and initramfs come from `resources/linux-guest/build.sh` (cached
//! under `.cache/linux-guest/`; the first build takes a while). Linux cannot
//! boot on KVM without hardware virtualization (see
//! shared/reference/kvm-here.md), so the test is `#[ignore]`d and refuses to
//! pass where /proc/cpuinfo has neither vmx nor svm.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Prefix of every line the guest's /init prints.
const MARK: &str = "KEEL-LINUX-GUEST:";
/// How long the guest may take from `keel` start to reset.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Keel's exit status for a guest-requested reset.
const EXIT_GUEST_RESET: i32 = 3;
const GUEST_MEMORY_MIB: u64 = 512;
const GUEST_CPUS: u32 = 2;
const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 nokaslr";

fn has_hardware_virtualization() -> bool {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory")
        .to_path_buf()
}

/// The `keel` binary of this workspace: the test executable lives in
/// `<target>/<profile>/deps/`, so look in `<target>/<profile>/` first, then in
/// `<target>/release/` and `<target>/debug/`.
fn keel_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("unexpected test executable location {}", exe.display()));
    let target_dir = profile_dir.parent().unwrap_or(profile_dir);
    let mut candidates = vec![profile_dir.join("keel")];
    for profile in ["release", "debug"] {
        let c = target_dir.join(profile).join("keel");
        if !candidates.contains(&c) {
            candidates.push(c);
        }
    }
    candidates
        .iter()
        .find(|c| c.is_file())
        .cloned()
        .unwrap_or_else(|| {
            let list: Vec<String> = candidates.iter().map(|c| c.display().to_string()).collect();
            panic!(
                "keel binary not found (looked at: {}); build it first with \
                 `cargo build --release -p vmm --bin keel`",
                list.join(", ")
            )
        })
}

/// Runs build.sh (a no-op when its cache is current) and returns
/// (vmlinux, initramfs).
fn build_guest() -> (PathBuf, PathBuf) {
    let script = repo_root().join("resources/linux-guest/build.sh");
    eprintln!(
        "linux_guest: running {} (the first build takes a while)",
        script.display()
    );
    let output = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{} failed with {}; stdout:\n{stdout}",
        script.display(),
        output.status
    );
    let value = |key: &str| -> PathBuf {
        let prefix = format!("{key}=");
        let line = stdout
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("build.sh printed no {key}= line; stdout:\n{stdout}"));
        let path = PathBuf::from(line.trim());
        assert!(path.is_file(), "{key} {} is not a file", path.display());
        path
    };
    (
        value("KEEL_LINUX_GUEST_VMLINUX"),
        value("KEEL_LINUX_GUEST_INITRAMFS"),
    )
}

/// Waits for `child` up to `timeout`; kills it and returns None on timeout.
fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait on keel") {
            return Some(status);
        }
        if start.elapsed() >= timeout {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn read_lossy(path: &Path) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut f) = fs::File::open(path) {
        let _ = f.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The text after `KEEL-LINUX-GUEST: <key>` on the first console line that has
/// it (kernel messages can share a line with the guest's output, so the marker
/// is searched anywhere in the line).
fn guest_value<'a>(console: &'a str, key: &str) -> Option<&'a str> {
    let needle = format!("{MARK} {key}");
    console.lines().find_map(|l| {
        l.find(&needle)
            .map(|i| l[i + needle.len()..].trim_matches(|c: char| c.is_whitespace()))
    })
}

#[test]
#[ignore = "Linux tier: needs hardware virtualization (vmx/svm); run by .ci/run with --ignored where present"]
fn linux_guest_boots_reports_and_resets() {
    if !has_hardware_virtualization() {
        panic!("not run: no hardware virtualization (no vmx/svm in /proc/cpuinfo)");
    }

    let keel = keel_binary();
    let (vmlinux, initramfs) = build_guest();
    let dir = keel_tests::scratch_dir("linux-guest");
    let console_log = dir.join("console.log");
    let keel_out = dir.join("keel.stdout.log");
    let keel_err = dir.join("keel.stderr.log");

    let mut cmd = Command::new(&keel);
    cmd.arg("--kernel")
        .arg(&vmlinux)
        .arg("--initrd")
        .arg(&initramfs)
        .arg("--cmdline")
        .arg(CMDLINE)
        .arg("--memory")
        .arg(format!("size={GUEST_MEMORY_MIB}M"))
        .arg("--cpus")
        .arg(format!("boot={GUEST_CPUS}"))
        .arg("--serial")
        .arg(format!("file={}", console_log.display()))
        .stdin(Stdio::null())
        .stdout(fs::File::create(&keel_out).expect("create keel stdout log"))
        .stderr(fs::File::create(&keel_err).expect("create keel stderr log"));
    eprintln!("linux_guest: {cmd:?}");

    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", keel.display()));
    let status = wait_with_timeout(&mut child, BOOT_TIMEOUT);
    let elapsed = started.elapsed();

    let console = read_lossy(&console_log);
    let diagnostics = || {
        format!(
            "keel: {}\nexit: {}\nconsole tail ({}):\n{}\nkeel stderr tail ({}):\n{}\n(files kept in {})",
            keel.display(),
            match status {
                Some(s) => s.to_string(),
                None => format!("killed after {BOOT_TIMEOUT:?} timeout"),
            },
            console_log.display(),
            tail(&console, 40),
            keel_err.display(),
            tail(&read_lossy(&keel_err), 20),
            dir.display()
        )
    };
    eprintln!("linux_guest: keel finished in {elapsed:.1?} with {status:?}");

    assert!(
        status.is_some(),
        "guest did not finish within {BOOT_TIMEOUT:?}\n{}",
        diagnostics()
    );
    assert!(
        guest_value(&console, "init reached").is_some(),
        "console lacks `{MARK} init reached`\n{}",
        diagnostics()
    );

    let nproc = guest_value(&console, "nproc")
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u32>().ok());
    assert_eq!(
        nproc,
        Some(GUEST_CPUS),
        "guest nproc (from `{MARK} nproc N`)\n{}",
        diagnostics()
    );

    // `KEEL-LINUX-GUEST: MemTotal:   503412 kB`
    let mem_kib = guest_value(&console, "MemTotal:")
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok());
    let Some(mem_kib) = mem_kib else {
        panic!("console lacks `{MARK} MemTotal: N kB`\n{}", diagnostics());
    };
    let mem_mib = mem_kib / 1024;
    assert!(
        (400..=GUEST_MEMORY_MIB).contains(&mem_mib),
        "MemTotal {mem_kib} kB ({mem_mib} MiB) implausible for a {GUEST_MEMORY_MIB} MiB guest \
         (expected 400..={GUEST_MEMORY_MIB} MiB)\n{}",
        diagnostics()
    );

    assert!(
        guest_value(&console, "done").is_some(),
        "console lacks `{MARK} done`\n{}",
        diagnostics()
    );
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(EXIT_GUEST_RESET),
        "keel should exit with {EXIT_GUEST_RESET} (guest-requested reset)\n{}",
        diagnostics()
    );
}
