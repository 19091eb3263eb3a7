//! Shared helpers of the integration tests: find the built binaries, run
//! `keel` with a deadline, and read the probe guest's report.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The cargo target directory the tests were built in.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    // target/<profile>/deps/<test binary>
    let exe = std::env::current_exe().expect("test binary path");
    exe.ancestors()
        .nth(3)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// A built binary of the workspace: the tests' own profile first, then
/// release, then debug. Panics with a how-to when it has not been built.
pub fn workspace_binary(name: &str) -> PathBuf {
    let target = target_dir();
    let own = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent()?.parent().map(|p| p.join(name)));
    let candidates = own.into_iter().chain([
        target.join("release").join(name),
        target.join("debug").join(name),
    ]);
    for c in candidates {
        if c.is_file() {
            return c;
        }
    }
    panic!(
        "{name} not found under {}: run `cargo build --release` first (the README's test command does)",
        target.display()
    );
}

/// The `keel` binary.
pub fn keel() -> PathBuf {
    workspace_binary("keel")
}

/// The probe guest (release build preferred: it is what the README boots).
pub fn probe_guest() -> PathBuf {
    let release = target_dir().join("release").join("probe-guest");
    if release.is_file() {
        return release;
    }
    workspace_binary("probe-guest")
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf()
}

/// A fresh, empty scratch directory for one test.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keel-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// What a finished `keel` run left behind.
#[derive(Debug)]
pub struct RunResult {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output (the console when `--serial stdout`).
    pub stdout: String,
    /// Standard error (Keel's log).
    pub stderr: String,
    /// Wall time from spawn to exit.
    pub elapsed: Duration,
}

impl RunResult {
    /// The exit code; panics if killed by a signal.
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or_else(|| {
            panic!(
                "keel killed by a signal: {:?}\n{}",
                self.status, self.stderr
            )
        })
    }
}

/// Runs `cmd` to completion, killing it after `deadline`.
pub fn run_with_deadline(mut cmd: Command, deadline: Duration) -> RunResult {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keel");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let st = child.wait().expect("wait");
            let stdout = out_thread.join().unwrap_or_default();
            let stderr = err_thread.join().unwrap_or_default();
            panic!("keel still running after {deadline:?} ({st:?})\nstdout:\n{stdout}\nstderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = start.elapsed();
    RunResult {
        status,
        stdout: out_thread.join().unwrap_or_default(),
        stderr: err_thread.join().unwrap_or_default(),
        elapsed,
    }
}

/// Runs `keel` with `args` (console on stdout unless the args say otherwise).
pub fn run_keel(args: &[&str], deadline: Duration) -> RunResult {
    let mut cmd = Command::new(keel());
    cmd.args(args);
    run_with_deadline(cmd, deadline)
}

/// The probe guest's report, parsed from its console output.
#[derive(Debug, Default)]
pub struct ProbeReport {
    /// Checks that passed.
    pub passed: Vec<String>,
    /// Checks that failed, with the reason.
    pub failed: Vec<(String, String)>,
    /// The summary line's counts, if it was printed.
    pub summary: Option<(usize, usize)>,
}

impl ProbeReport {
    /// Parses `PROBE ok NAME`, `PROBE FAIL NAME: WHY` and
    /// `probe: N passed, M failed` lines.
    pub fn parse(console: &str) -> Self {
        let mut r = ProbeReport::default();
        for line in console.lines().map(str::trim_end) {
            if let Some(name) = line.strip_prefix("PROBE ok ") {
                r.passed.push(name.trim().to_string());
            } else if let Some(rest) = line.strip_prefix("PROBE FAIL ") {
                let (name, why) = rest.split_once(':').unwrap_or((rest, ""));
                r.failed
                    .push((name.trim().to_string(), why.trim().to_string()));
            } else if let Some(rest) = line.strip_prefix("probe: ") {
                let nums: Vec<usize> = rest
                    .split(|c: char| !c.is_ascii_digit())
                    .filter_map(|t| t.parse().ok())
                    .collect();
                if rest.contains(" passed, ") && rest.ends_with(" failed") && nums.len() == 2 {
                    r.summary = Some((nums[0], nums[1]));
                }
            }
        }
        r
    }

    /// Asserts that the run reached its summary with no failure and that
    /// every check in `required` passed.
    pub fn assert_all_passed(&self, required: &[&str], console: &str) {
        assert!(
            self.failed.is_empty(),
            "probe checks failed: {:?}\nconsole:\n{console}",
            self.failed
        );
        assert_eq!(
            self.summary,
            Some((self.passed.len(), 0)),
            "summary missing or inconsistent\nconsole:\n{console}"
        );
        for name in required {
            assert!(
                self.passed.iter().any(|p| p == name),
                "check {name} did not run\nconsole:\n{console}"
            );
        }
    }
}

/// Host pattern the tests write before boot at disk bytes
/// `[1 MiB, 1 MiB + 64 KiB)`; the probe reads and checks it.
pub fn host_pattern(o: u64) -> u8 {
    (((o >> 12) as u8).wrapping_mul(7)) ^ (o as u8)
}

/// Guest pattern the probe writes at `[4 MiB, 4 MiB + 256 KiB)`.
pub fn guest_pattern(o: u64) -> u8 {
    ((o >> 9) as u8) ^ (o as u8) ^ 0xa5
}

/// Size of the test disks.
pub const TEST_DISK_SIZE: u64 = 16 << 20;

/// Writes a 16 MiB test disk image: the host pattern at 1 MiB, 0xff over
/// `[8 MiB, 13 MiB)` (where the probe zeroes and discards), 0x11 elsewhere.
pub fn make_test_disk(path: &Path) {
    let mut b = vec![0x11u8; TEST_DISK_SIZE as usize];
    for o in (1u64 << 20)..(1 << 20) + (64 << 10) {
        b[o as usize] = host_pattern(o);
    }
    b[8 << 20..13 << 20].fill(0xff);
    std::fs::write(path, b).expect("write test disk");
}

/// A loop block device over a file, detached when dropped.
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub path: PathBuf,
}

impl LoopDevice {
    /// Attaches `file` to a free loop device (needs root).
    pub fn attach(file: &Path) -> Self {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .expect("run losetup");
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            out.status.success() && dev.starts_with("/dev/loop"),
            "losetup failed (tests need root and loop devices): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDevice { path: dev.into() }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_probe_output() {
        let r = ProbeReport::parse(
            "probe: start\nPROBE ok boot.cmdline\nPROBE FAIL smp.mptable: no _MP_\nprobe: 1 passed, 1 failed\n",
        );
        assert_eq!(r.passed, ["boot.cmdline"]);
        assert_eq!(
            r.failed,
            [("smp.mptable".to_string(), "no _MP_".to_string())]
        );
        assert_eq!(r.summary, Some((1, 1)));
    }
}
