//! Shared helpers of the integration tests: find the built binaries, run
//! `keel` with a deadline, and read the probe guest's report.

pub mod guestos_disk;
pub mod memory;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::process::{Command, ExitStatus};
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

/// A test's scratch directory (`/tmp/keel-test-<name>-<pid>`): removed
/// when dropped, unless the thread is panicking (a failed test keeps its
/// files for inspection, and says where they are).
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl std::ops::Deref for ScratchDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for ScratchDir {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.path.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("could not remove {}: {e}", self.path.display());
            }
        }
    }
}

/// A fresh, empty scratch directory for one test, removed again when the
/// returned guard is dropped (see [`ScratchDir`]).
pub fn scratch_dir(name: &str) -> ScratchDir {
    let path = std::env::temp_dir().join(format!("keel-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path).expect("scratch dir");
    ScratchDir { path }
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

/// A `keel` process running in the background, killed when dropped.
pub struct RunningKeel {
    /// The child.
    pub child: std::process::Child,
    /// Its control socket.
    pub socket: PathBuf,
    /// Console output read so far (from stdout), filled by a thread.
    pub console: std::sync::Arc<std::sync::Mutex<String>>,
    /// Keel's log (stderr), filled by a thread.
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
    /// One message from each of the two pipe readers when it hits end of
    /// stream.
    readers_done: std::sync::mpsc::Receiver<()>,
    /// How many of them have.
    readers_ended: usize,
}

impl RunningKeel {
    /// Starts `keel` with `args`; waits until its API answers `GET /v1/vm`.
    pub fn start(args: &[String], socket: &Path, envs: &[(&str, String)]) -> Self {
        let mut cmd = Command::new(keel());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn keel");
        let console = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (done_tx, readers_done) = std::sync::mpsc::channel();
        for (pipe, sink) in [
            (
                Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
                console.clone(),
            ),
            (
                Box::new(child.stderr.take().expect("stderr")) as Box<dyn Read + Send>,
                log.clone(),
            ),
        ] {
            let done = done_tx.clone();
            std::thread::spawn(move || {
                let mut pipe = pipe;
                let mut buf = [0u8; 1024];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
                let _ = done.send(());
            });
        }
        let k = RunningKeel {
            child,
            socket: socket.to_path_buf(),
            console,
            log,
            readers_done,
            readers_ended: 0,
        };
        let start = Instant::now();
        while api_call(socket, "GET", "/v1/vm", "").map(|r| r.0) != Some(200) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "API never came up:\n{}",
                k.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        k
    }

    /// Console output so far.
    pub fn console(&self) -> String {
        self.console.lock().unwrap().clone()
    }

    /// Log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the console contains `needle`.
    pub fn wait_console(&self, needle: &str, deadline: Duration) {
        let start = Instant::now();
        while !self.console().contains(needle) {
            assert!(
                start.elapsed() < deadline,
                "no {needle:?} on the console:\n{}\nlog:\n{}",
                self.console(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the VM with `keelctl stop` and waits for Keel to exit 0.
    pub fn stop_with_keelctl(&mut self, deadline: Duration) {
        let out = Command::new(workspace_binary("keelctl"))
            .arg("--socket")
            .arg(&self.socket)
            .arg("stop")
            .output()
            .expect("run keelctl stop");
        assert!(out.status.success(), "keelctl stop: {out:?}");
        let code = self.wait_exit(deadline);
        assert_eq!(code, 0, "keel after keelctl stop:\n{}", self.log());
    }

    /// Waits for the process to exit and for its console and log to be
    /// read to the end; returns its exit code.
    pub fn wait_exit(&mut self, deadline: Duration) -> i32 {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                // Both pipe readers reach end of stream once keel is gone.
                while self.readers_ended < 2 {
                    let left = deadline.saturating_sub(start.elapsed());
                    assert!(
                        self.readers_done.recv_timeout(left).is_ok(),
                        "keel exited ({st:?}) but its output did not end within {deadline:?}:\n{}",
                        self.log()
                    );
                    self.readers_ended += 1;
                }
                return st.code().unwrap_or(-1);
            }
            assert!(
                start.elapsed() < deadline,
                "keel did not exit:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RunningKeel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP request on the control socket: (status, body). None when the
/// socket cannot be reached.
pub fn api_call(socket: &Path, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: keel\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // The server may answer (413) and close before reading a large body:
    // a failed write still leaves its answer to read.
    let _ = s.write_all(req.as_bytes());
    let mut raw = String::new();
    let _ = s.read_to_string(&mut raw);
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// Attaches to the console as its writer (`GET /v1/console?mode=rw` on
/// the control socket) and returns the stream to type into. What the
/// console sends is read and discarded by a thread until Keel closes it.
pub fn console_typist(socket: &Path) -> std::os::unix::net::UnixStream {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect to the API");
    s.write_all(b"GET /v1/console?mode=rw HTTP/1.1\r\nHost: keel\r\n\r\n")
        .expect("ask for the console");
    let mut reader = BufReader::new(s.try_clone().expect("clone the console stream"));
    let mut status = String::new();
    reader.read_line(&mut status).expect("status line");
    assert!(
        status.split_whitespace().nth(1) == Some("200"),
        "console writer refused: {status:?}"
    );
    // The rest (headers, then the console) is not needed.
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    s
}

/// Runs `keelctl --socket SOCK ARGS...` as `uid` with exactly the groups
/// `groups` (the first is also the gid), stdin closed; returns (exit code,
/// stdout, stderr).
pub fn keelctl_as(uid: u32, groups: &[u32], sock: &Path, args: &[&str]) -> (i32, String, String) {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(workspace_binary("keelctl"));
    cmd.arg("--socket")
        .arg(sock)
        .args(args)
        .stdin(Stdio::null());
    let groups = groups.to_vec();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(groups[0]) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("run keelctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
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
