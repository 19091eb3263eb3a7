//! `keelctl console` as an admin meets it, through a real pseudo-terminal:
//! raw mode for the session and the terminal's settings back afterwards
//! (on Ctrl-], on signals, when the VM ends), the banner, Ctrl-] in both
//! modes. And the control socket around it: a refusal (403) ends the
//! connection and is logged once, a dead writer frees the writer slot at
//! once while a half-closed one keeps watching, `keelctl stop` reports the
//! state the VM ended in, `keelctl counters` lists disks, NICs and vsock.

use std::fs::File;
use std::io::{Read, Write};
use std::ops::Deref;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_tests::{api_call, keelctl_as, probe_guest, scratch_dir, workspace_binary, RunningKeel};

const T: Duration = Duration::from_secs(30);
/// Groups of the test's config (numeric, so no /etc/group entries needed).
const RO_GID: u32 = 4343;
const ADMIN_GID: u32 = 4344;
const TEST_UID: u32 = 4242;
/// Ctrl-], keelctl's escape character.
const ESCAPE: u8 = 0x1d;

/// The `[control]`-bearing config of a probe-guest VM with `cmdline`.
fn write_config(dir: &Path, cmdline: &str) -> (PathBuf, PathBuf) {
    // The socket's directory must be reachable by unprivileged callers.
    let _ = std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755));
    let sock = dir.join("api.sock");
    let cfg = dir.join("vm.toml");
    std::fs::write(
        &cfg,
        format!(
            "[payload]\nkernel = \"{}\"\ncmdline = \"console=ttyS0 probe.check=boot.cpl3 {cmdline}\"\n[memory]\nsize = \"128M\"\n[control]\napi_socket = \"{}\"\nadmin_group = \"{ADMIN_GID}\"\nreadonly_group = \"{RO_GID}\"\nshutdown_timeout_s = 5\n",
            probe_guest().display(),
            sock.display()
        ),
    )
    .unwrap();
    (cfg, sock)
}

fn start(name: &str, cmdline: &str) -> (RunningKeel, impl Deref<Target = Path>) {
    let dir = scratch_dir(name);
    let (cfg, sock) = write_config(&dir, cmdline);
    let k = RunningKeel::start(&["--config".into(), cfg.display().to_string()], &sock, &[]);
    (k, dir)
}

fn keelctl_cmd(sock: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(workspace_binary("keelctl"));
    cmd.arg("--socket").arg(sock).args(args);
    cmd
}

fn output(mut cmd: Command) -> (i32, String, String) {
    let out = cmd.stdin(Stdio::null()).output().expect("run keelctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Connects to `sock` with the credentials `uid`/`gid` (what SO_PEERCRED
/// reports is fixed at connect time).
fn connect_as(uid: u32, gid: u32, sock: &Path) -> UnixStream {
    let sock = sock.to_path_buf();
    std::thread::spawn(move || {
        let groups = [gid];
        // SAFETY: the raw system calls change only this thread's
        // credentials (libc's wrappers would change every thread's), and
        // the thread ends right after connecting.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_setgroups, 1, groups.as_ptr()), 0);
            assert_eq!(libc::syscall(libc::SYS_setresgid, gid, gid, gid), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0);
        }
        UnixStream::connect(&sock).expect("connect as another user")
    })
    .join()
    .expect("connecting thread")
}

/// Asks for the console with `mode=rw`: the answer's status, and the
/// stream (attached as the writer when 200).
fn try_writer(sock: &Path) -> (u16, UnixStream) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(b"GET /v1/console?mode=rw HTTP/1.1\r\nHost: k\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "answer cut short: {head:?}");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, s)
}

/// Asks for the writer slot until it is given (200), within `deadline`.
fn writer_slot_within(sock: &Path, deadline: Duration) -> UnixStream {
    let start = Instant::now();
    loop {
        let (status, s) = try_writer(sock);
        if status == 200 {
            return s;
        }
        assert_eq!(status, 409, "unexpected answer");
        assert!(
            start.elapsed() < deadline,
            "the writer slot is still taken after {deadline:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads `s` until what came contains `needle`.
fn read_until(s: &mut UnixStream, needle: &str) -> String {
    s.set_read_timeout(Some(T)).unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 512];
    while !seen.contains(needle) {
        let n = s.read(&mut buf).expect("console output in time");
        assert!(n > 0, "console closed before {needle:?}:\n{seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    seen
}

fn wait_exit(child: &mut Child, deadline: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return st;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("keelctl still running after {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_log(k: &RunningKeel, needle: &str) {
    let start = Instant::now();
    while !k.log().contains(needle) {
        assert!(
            start.elapsed() < T,
            "no {needle:?} in the log:\n{}",
            k.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A terminal's settings, field by field.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Settings {
    iflag: libc::tcflag_t,
    oflag: libc::tcflag_t,
    cflag: libc::tcflag_t,
    lflag: libc::tcflag_t,
    cc: Vec<libc::cc_t>,
    ispeed: libc::speed_t,
    ospeed: libc::speed_t,
}

/// A pseudo-terminal: keelctl gets the slave side as its controlling
/// terminal and stdio; the test types into and reads from the master.
struct Pty {
    master: File,
    slave: OwnedFd,
    out: Arc<Mutex<Vec<u8>>>,
}

impl Pty {
    fn open() -> Pty {
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: openpty writes two descriptors into the locals given; no
        // name buffer, default settings and size.
        let r = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors were just opened and belong to nobody else.
        let (master, slave) = unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let out = Arc::new(Mutex::new(Vec::new()));
        let mut reader = master.try_clone().unwrap();
        let sink = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Pty { master, slave, out }
    }

    fn settings(&self) -> Settings {
        // SAFETY: an all-zero termios is a valid value for tcgetattr to fill.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr fills the termios given, which lives on the stack.
        let r = unsafe { libc::tcgetattr(self.slave.as_raw_fd(), &mut t) };
        assert_eq!(r, 0, "tcgetattr: {}", std::io::Error::last_os_error());
        Settings {
            iflag: t.c_iflag,
            oflag: t.c_oflag,
            cflag: t.c_cflag,
            lflag: t.c_lflag,
            cc: t.c_cc.to_vec(),
            ispeed: t.c_ispeed,
            ospeed: t.c_ospeed,
        }
    }

    /// Starts keelctl with the slave side as its terminal.
    fn keelctl(&self, sock: &Path, args: &[&str]) -> Child {
        let mut cmd = keelctl_cmd(sock, args);
        let stdio = || Stdio::from(self.slave.try_clone().unwrap());
        cmd.stdin(stdio()).stdout(stdio()).stderr(stdio());
        // SAFETY: setsid and ioctl are async-signal-safe; they make the
        // child a session leader with the pty (its stdin) as controlling
        // terminal, as a login shell's child would have.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn().expect("spawn keelctl")
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    fn wait_for(&self, needle: &str) {
        let start = Instant::now();
        while !self.text().contains(needle) {
            assert!(
                start.elapsed() < T,
                "no {needle:?} on the terminal:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn type_in(&self, bytes: &[u8]) {
        (&self.master).write_all(bytes).unwrap();
    }
}

fn banner(k: &RunningKeel) -> String {
    format!(
        "Connected to keel (pid {}); escape character is ^]",
        k.child.id()
    )
}

/// Attaches under a fresh pty, checks the banner and raw mode; returns the
/// pty, the settings from before and keelctl.
fn attach_on_terminal(k: &RunningKeel, args: &[&str]) -> (Pty, Settings, Child) {
    let pty = Pty::open();
    let before = pty.settings();
    assert_ne!(before.lflag & libc::ICANON, 0, "a fresh pty is cooked");
    let child = pty.keelctl(&k.socket, args);
    pty.wait_for(&banner(k));
    let during = pty.settings();
    assert_eq!(
        during.lflag & (libc::ICANON | libc::ECHO | libc::ISIG),
        0,
        "raw while attached"
    );
    (pty, before, child)
}

#[test]
fn ctrl_bracket_detaches_and_the_terminal_comes_back() {
    let (k, _dir) = start("console-detach", "probe.interactive probe.heartbeat=100");
    k.wait_console("probe: interactive", T);

    // Read-only: output flows, typing goes nowhere, Ctrl-] detaches.
    let (pty, before, mut child) = attach_on_terminal(&k, &["console"]);
    pty.wait_for("probe: tick");
    pty.type_in(b"ro-typed\r");
    pty.type_in(&[ESCAPE]);
    let st = wait_exit(&mut child, T);
    assert_eq!(st.code(), Some(0), "{}", pty.text());
    assert_eq!(pty.settings(), before, "settings restored after detach");

    // Read-write: typing reaches the guest, Ctrl-] detaches.
    let (pty, before, mut child) = attach_on_terminal(&k, &["console", "--rw"]);
    pty.type_in(b"rw-typed\r");
    k.wait_console("probe: console got rw-typed", T);
    pty.wait_for("probe: console got rw-typed");
    // What the read-only session got typed would have come first.
    assert!(
        !k.console().contains("ro-typed"),
        "read-only input reached the guest:\n{}",
        k.console()
    );
    pty.type_in(&[ESCAPE]);
    let st = wait_exit(&mut child, T);
    assert_eq!(st.code(), Some(0), "{}", pty.text());
    assert_eq!(pty.settings(), before, "settings restored after detach");
    // And the writer slot is free again.
    drop(writer_slot_within(&k.socket, T));
}

#[test]
fn signals_restore_the_terminal() {
    let (k, _dir) = start("console-signals", "probe.interactive");
    k.wait_console("probe: interactive", T);
    // The writer's slot, once freed, is taken and kept here: the later
    // sessions watch only.
    let mut slot = None;
    for (sig, args) in [
        (libc::SIGTERM, &["console", "--rw"][..]),
        (libc::SIGHUP, &["console"][..]),
        (libc::SIGINT, &["console"][..]),
    ] {
        let (pty, before, mut child) = attach_on_terminal(&k, args);
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
        let st = wait_exit(&mut child, T);
        assert_eq!(st.signal(), Some(sig), "{st:?}\n{}", pty.text());
        assert_eq!(
            pty.settings(),
            before,
            "settings restored after signal {sig}"
        );
        if slot.is_none() {
            // The writer that died freed its slot.
            slot = Some(writer_slot_within(&k.socket, T));
        }
    }
}

#[test]
fn the_console_says_when_the_vm_ends() {
    let (mut k, _dir) = start("console-end", "probe.interactive");
    k.wait_console("probe: interactive", T);
    // On a terminal, read-only.
    let (pty, before, mut on_tty) = attach_on_terminal(&k, &["console"]);
    // From a script, read-write, input still open.
    let mut scripted = keelctl_cmd(&k.socket, &["console", "--rw"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = scripted.stdin.take().unwrap();
    input.write_all(b"scripted\n").unwrap();
    k.wait_console("probe: console got scripted", T);
    pty.wait_for("probe: console got scripted");

    let (code, _) = api_call(&k.socket, "PUT", "/v1/vm/stop", "").unwrap();
    assert_eq!(code, 202);
    let end = "keel: the VM has ended (state: stopped)";
    pty.wait_for(end);
    let st = wait_exit(&mut on_tty, T);
    assert_eq!(st.code(), Some(0), "{}", pty.text());
    assert_eq!(pty.settings(), before, "settings restored at the end");

    let st = wait_exit(&mut scripted, T);
    let mut err = String::new();
    scripted
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(st.code(), Some(0), "{err}");
    assert!(err.contains(end), "{err}");
    assert!(
        !err.contains("Connected to"),
        "no banner for scripts: {err}"
    );
    drop(input);
    assert_eq!(k.wait_exit(T), 0);
}

#[test]
fn a_refusal_ends_the_connection_and_is_logged_once() {
    let (mut k, _dir) = start("console-403", "probe.idle");
    let sock = k.socket.clone();
    // Let callers without a group reach the socket, so that Keel's roles
    // (not the file mode) decide.
    std::fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();

    let (code, _, err) = keelctl_as(TEST_UID, &[TEST_UID], &sock, &["console"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("403"), "{err}");
    // Read-only callers may watch, not type.
    let (code, _, err) = keelctl_as(TEST_UID + 1, &[RO_GID], &sock, &["console", "--rw"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("only admins may type"), "{err}");

    // On the wire: the answer says the connection closes, and it does.
    let mut s = connect_as(TEST_UID, TEST_UID, &sock);
    s.write_all(b"GET /v1/console HTTP/1.1\r\nHost: k\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .expect("the connection is closed after the answer");
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("Connection: close\r\n"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{answer}");

    assert_eq!(api_call(&sock, "PUT", "/v1/vm/stop", "").unwrap().0, 202);
    assert_eq!(k.wait_exit(T), 0);
    // Its last line is in the log: so is every earlier one.
    wait_log(&k, "VM ended");
    let log = k.log();
    let denied = |what: &str| log.matches(what).count();
    assert_eq!(
        denied(&format!("denied GET /v1/console to uid {TEST_UID} ")),
        2,
        "{log}"
    );
    assert_eq!(
        denied(&format!(
            "denied GET /v1/console?mode=rw to uid {} ",
            TEST_UID + 1
        )),
        1,
        "{log}"
    );
}

#[test]
fn a_dead_writer_frees_the_slot_at_once() {
    // The guest prints nothing once up: nothing to write to a dead writer.
    let (k, _dir) = start("console-dead-writer", "probe.interactive");
    k.wait_console("probe: interactive", T);

    // A keelctl killed outright.
    let mut rw = keelctl_cmd(&k.socket, &["console", "--rw"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut input = rw.stdin.take().unwrap();
    input.write_all(b"from keelctl\n").unwrap();
    k.wait_console("probe: console got from keelctl", T);
    assert_eq!(try_writer(&k.socket).0, 409, "keelctl is the writer");
    rw.kill().unwrap();
    rw.wait().unwrap();
    let mut s = writer_slot_within(&k.socket, T);
    // The new writer types into the guest.
    s.write_all(b"second writer\n").unwrap();
    read_until(&mut s, "probe: console got second writer");
    drop(input);

    // A client that drops its socket.
    drop(s);
    let s = writer_slot_within(&k.socket, T);
    assert_eq!(try_writer(&k.socket).0, 409, "one writer at a time");
    drop(s);
    drop(writer_slot_within(&k.socket, T));
}

#[test]
fn a_half_closed_writer_keeps_watching_and_its_slot() {
    let (k, _dir) = start(
        "console-half-closed",
        "probe.interactive probe.heartbeat=100",
    );
    k.wait_console("probe: interactive", T);
    let (status, mut s) = try_writer(&k.socket);
    assert_eq!(status, 200);
    s.write_all(b"before eof\n").unwrap();
    read_until(&mut s, "probe: console got before eof");
    // End of input: the client still watches.
    s.shutdown(std::net::Shutdown::Write).unwrap();
    read_until(&mut s, "probe: tick");
    read_until(&mut s, "probe: tick");
    assert_eq!(try_writer(&k.socket).0, 409, "the slot is still held");
    // Now gone entirely: the slot is free.
    drop(s);
    drop(writer_slot_within(&k.socket, T));
}

#[test]
fn stop_and_shutdown_wait_report_the_end_state() {
    let (mut k, _dir) = start("console-stop", "probe.idle");
    let (code, out, err) = output(keelctl_cmd(&k.socket, &["stop"]));
    assert_eq!(code, 0, "{err}");
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(words, ["state", "stopped"], "{out}");
    assert_eq!(k.wait_exit(T), 0);

    let (mut k, _dir) = start("console-shutdown", "probe.interactive");
    k.wait_console("probe: interactive", T);
    let (code, out, err) = output(keelctl_cmd(
        &k.socket,
        &["--json", "shutdown", "--wait", "--timeout", "20"],
    ));
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v, serde_json::json!({ "state": "stopped" }));
    // The default graceful shutdown: the ACPI power button.
    assert!(
        k.console().contains("probe: power-button"),
        "{}",
        k.console()
    );
    assert_eq!(k.wait_exit(T), 0);
}

/// A `keel` in a network namespace of its own (so it may create a tap),
/// killed when dropped.
struct KeelInNetns {
    child: Child,
    log: PathBuf,
}

impl Drop for KeelInNetns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn counters_have_disk_net_and_vsock_rows() {
    let dir = scratch_dir("console-counters");
    let (cfg, sock) = write_config(&dir, "probe.idle");
    let disk = dir.join("disk.img");
    File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    let log = dir.join("keel.log");
    let mut cmd = Command::new(keel_tests::keel());
    cmd.arg("--config")
        .arg(&cfg)
        .arg("--disk")
        .arg(format!("path={}", disk.display()))
        .args(["--net", "tap=kt0"])
        .arg("--vsock")
        .arg(format!("cid=3,socket={}", dir.join("vsock.sock").display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap());
    // SAFETY: unshare is async-signal-safe and changes only the child.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let k = KeelInNetns {
        child: cmd.spawn().expect("spawn keel"),
        log,
    };
    let start = Instant::now();
    while api_call(&sock, "GET", "/v1/vm", "").map(|r| r.0) != Some(200) {
        assert!(
            start.elapsed() < T,
            "API never came up:\n{}",
            std::fs::read_to_string(&k.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, out, err) = output(keelctl_cmd(&sock, &["counters"]));
    assert_eq!(code, 0, "{err}");
    let rows: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let has = |want: &[&str]| rows.iter().any(|r| r.starts_with(want));
    assert!(has(&["DEVICE", "INDEX", "COUNTER", "VALUE"]), "{out}");
    assert!(has(&["vcpu", "0", "exits.io_out"]), "{out}");
    for counter in ["read_ops", "write_bytes", "io_errors", "latency_ns_max"] {
        assert!(has(&["disk", "0", counter]), "disk {counter}:\n{out}");
    }
    assert!(has(&["net", "0", "tap", "kt0"]), "{out}");
    for counter in ["rx_frames", "tx_bytes", "tap_errors"] {
        assert!(has(&["net", "0", counter]), "net {counter}:\n{out}");
    }
    assert!(has(&["vsock", "-", "conns_opened"]), "{out}");
    assert_eq!(api_call(&sock, "PUT", "/v1/vm/stop", "").unwrap().0, 202);
}
