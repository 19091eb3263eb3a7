//! `keelctl`: the admins' client of Keel's control socket.
//!
//! Exit codes: 0 success; 1 the request was refused or failed (4xx/5xx
//! other than 403); 2 usage error; 3 the socket cannot be reached;
//! 4 permission denied (403).
//!
//! `console` exits 0 on detach (Ctrl-]) and when the VM ends (it says so
//! on stderr), 1 when Keel closes the console while the VM still runs. On
//! a terminal it runs in raw mode, restored on exit and on SIGINT, SIGTERM,
//! SIGHUP and SIGQUIT.

use std::io::{IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg, Termios};
use serde_json::{json, Value};

/// Default control socket (where the systemd unit puts it).
const DEFAULT_SOCKET: &str = "/run/keel/api.sock";

/// Query and control a running Keel VM.
#[derive(Parser, Debug)]
#[command(name = "keelctl", version)]
struct Args {
    /// Control socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print the raw JSON answer (for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// VM state, uptime, topology, memory, boot source, devices.
    Info,
    /// vCPU exit and device (disk, net, vsock, serial) counters.
    Counters,
    /// Pause every vCPU.
    Pause,
    /// Resume a paused VM.
    Resume,
    /// Graceful shutdown (ACPI power button, or Ctrl-Alt-Del per
    /// control.shutdown_method), forced stop after the timeout.
    Shutdown {
        /// Seconds before the forced stop (Keel's default: 120).
        #[arg(long)]
        timeout: Option<u64>,
        /// Wait until the VM has ended and print the state it ended in.
        #[arg(long)]
        wait: bool,
    },
    /// Forced stop, now; waits until the VM has ended and prints the state
    /// it ended in.
    Stop,
    /// Attach to the serial console (Ctrl-] detaches); `--rw` to type.
    Console {
        /// Type into the console too (admins; one writer at a time).
        #[arg(long)]
        rw: bool,
    },
}

/// Exit codes.
const EXIT_FAILED: u8 = 1;
const EXIT_UNREACHABLE: u8 = 3;
const EXIT_DENIED: u8 = 4;

/// The escape character that detaches from the console: Ctrl-].
const ESCAPE: u8 = 0x1d;
/// How long to wait for an answer to one request.
const ANSWER_WAIT: Duration = Duration::from_secs(30);
/// How long `stop` waits for the VM to end.
const STOP_WAIT: Duration = Duration::from_secs(30);
/// Between two looks at the VM's state while waiting for it to end.
const STATE_POLL: Duration = Duration::from_millis(20);
/// Largest error answer read before a console stream.
const MAX_ANSWER: u64 = 64 << 10;

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
enum CallError {
    /// connect(2) failed.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Sending or reading failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// What came back is not an HTTP answer.
    #[error("malformed answer from Keel")]
    Malformed,
}

impl CallError {
    fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            CallError::Malformed => EXIT_FAILED,
            _ => EXIT_UNREACHABLE,
        })
    }
}

fn connect(path: &Path) -> Result<UnixStream, CallError> {
    UnixStream::connect(path).map_err(|source| CallError::Connect {
        path: path.display().to_string(),
        source,
    })
}

/// Sends one request; returns status and parsed JSON body.
fn request(
    path: &Path,
    method: &str,
    target: &str,
    body: Option<&str>,
) -> Result<(u16, Value), CallError> {
    let mut s = connect(path)?;
    s.set_read_timeout(Some(ANSWER_WAIT))?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {target} HTTP/1.1\r\nHost: keel\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(CallError::Malformed)?;
    let json = serde_json::from_str(body).unwrap_or(Value::Null);
    Ok((status, json))
}

/// The VM's state from `GET /v1/vm`; None when Keel cannot be asked (it
/// has exited, or is exiting).
fn vm_state(path: &Path) -> Option<String> {
    match request(path, "GET", "/v1/vm", None) {
        Ok((200, v)) => v.get("state").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// Waits until the VM has ended (its state is `stopped`, or Keel is gone,
/// which it only is once the VM has ended). Err: the last state seen when
/// `wait` ran out.
fn wait_for_end(path: &Path, wait: Duration) -> Result<String, String> {
    let start = Instant::now();
    loop {
        match vm_state(path) {
            None => return Ok("stopped".into()),
            Some(s) if s == "stopped" => return Ok(s),
            Some(s) if start.elapsed() >= wait => return Err(s),
            Some(_) => std::thread::sleep(STATE_POLL),
        }
    }
}

fn print_table(v: &Value, prefix: &str) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                print_table(v, &key);
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                print_table(v, &format!("{prefix}[{i}]"));
            }
        }
        Value::String(s) => println!("{prefix:<32} {s}"),
        Value::Null => println!("{prefix:<32} -"),
        other => println!("{prefix:<32} {other}"),
    }
}

/// One table row per device and counter: `DEVICE INDEX COUNTER VALUE`,
/// vCPUs, disks, NICs, vsock and serial in that order; a device kind the VM has
/// none of gets one `(none)` row, so every kind is always listed.
fn counter_rows(v: &Value) -> Vec<String> {
    fn flatten(v: &Value, prefix: &str, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(v, &key, out);
                }
            }
            Value::String(s) => out.push((prefix.into(), s.clone())),
            Value::Null => out.push((prefix.into(), "-".into())),
            other => out.push((prefix.into(), other.to_string())),
        }
    }
    let row = |kind: &str, index: &str, name: &str, value: &str| {
        format!("{kind:<6} {index:<5} {name:<28} {value}")
    };
    let mut rows = vec![row("DEVICE", "INDEX", "COUNTER", "VALUE")];
    for (section, kind) in [
        ("vcpus", "vcpu"),
        ("disks", "disk"),
        ("net", "net"),
        ("vsock", "vsock"),
        ("serial", "serial"),
    ] {
        // A list of devices, each with its index; or one device (vsock).
        let devices: Vec<(String, &Value)> = match v.get(section) {
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let index = d.get("index").map_or(i.to_string(), Value::to_string);
                    (index, d)
                })
                .collect(),
            Some(d @ Value::Object(_)) => vec![("-".into(), d)],
            _ => Vec::new(),
        };
        if devices.is_empty() {
            rows.push(row(kind, "-", "(none)", "-"));
        }
        for (index, d) in devices {
            let mut pairs = Vec::new();
            flatten(d, "", &mut pairs);
            for (name, value) in pairs.iter().filter(|(n, _)| n != "index") {
                rows.push(row(kind, &index, name, value));
            }
        }
    }
    rows
}

/// The terminal's settings before raw mode, for the signal handlers.
static SAVED_TERMIOS: OnceLock<libc::termios> = OnceLock::new();

/// Restores the terminal, then dies of the signal as if unhandled.
extern "C" fn restore_and_die(sig: libc::c_int) {
    if let Some(t) = SAVED_TERMIOS.get() {
        // SAFETY: tcsetattr, signal and raise are async-signal-safe; `t`
        // points at a termios that lives for the whole process.
        unsafe {
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, t);
        }
    }
    // SAFETY: as above; the signal is blocked while its handler runs, so
    // the re-raised one is delivered, with the default action, on return.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// Standard input's terminal in raw mode while this lives; its settings
/// come back on drop (any return or unwinding) and on SIGINT, SIGTERM,
/// SIGHUP and SIGQUIT.
struct RawTerminal {
    saved: Termios,
}

impl RawTerminal {
    fn enter() -> nix::Result<Self> {
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin)?;
        // Only one console per process: the first settings are the ones
        // to restore.
        let _ = SAVED_TERMIOS.set(saved.clone().into());
        let action = SigAction::new(
            SigHandler::Handler(restore_and_die),
            SaFlags::empty(),
            SigSet::empty(),
        );
        for sig in [
            Signal::SIGINT,
            Signal::SIGTERM,
            Signal::SIGHUP,
            Signal::SIGQUIT,
        ] {
            // SAFETY: the handler only makes async-signal-safe calls.
            unsafe { sigaction(sig, &action) }?;
        }
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw)?;
        Ok(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = tcsetattr(std::io::stdin(), SetArg::TCSANOW, &self.saved);
    }
}

/// A line for the user on stderr (`\r\n`-ended while the terminal is raw).
fn say(raw: bool, msg: &str) {
    let end = if raw { "\r\n" } else { "\n" };
    let mut err = std::io::stderr();
    let _ = write!(err, "{msg}{end}");
    let _ = err.flush();
}

/// Reads the answer's head (up to the blank line) byte by byte, so that
/// nothing of the stream after it is consumed.
fn read_head(s: &mut UnixStream) -> Option<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) if head.len() < MAX_ANSWER as usize => head.push(b[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// What typing does: forwards stdin to the console (`forward`) and, on a
/// terminal, watches for Ctrl-], which detaches.
fn console_input(mut sock: UnixStream, forward: bool, terminal: bool, detached: Arc<AtomicBool>) {
    let detach = |sock: &UnixStream| {
        detached.store(true, SeqCst);
        let _ = sock.shutdown(std::net::Shutdown::Both);
    };
    let mut buf = [0u8; 256];
    let stdin = std::io::stdin();
    let mut lock = stdin.lock();
    loop {
        let n = match lock.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        if n == 0 {
            if terminal {
                // The terminal is gone: nobody is watching.
                detach(&sock);
            } else {
                // End of a script's input: stop typing, keep watching.
                let _ = sock.shutdown(std::net::Shutdown::Write);
            }
            return;
        }
        let escape = buf[..n].iter().position(|&b| b == ESCAPE);
        let typed = &buf[..escape.unwrap_or(n)];
        if forward && !typed.is_empty() && sock.write_all(typed).is_err() {
            // Keel closed the console: the output side reports why.
            return;
        }
        if escape.is_some() {
            detach(&sock);
            return;
        }
    }
}

fn console(args: &Args, rw: bool) -> ExitCode {
    let mut s = match connect(&args.socket) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("keelctl: {e}");
            return e.exit_code();
        }
    };
    let target = if rw {
        "/v1/console?mode=rw"
    } else {
        "/v1/console"
    };
    let req = format!("GET {target} HTTP/1.1\r\nHost: keel\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() || s.set_read_timeout(Some(ANSWER_WAIT)).is_err() {
        eprintln!("keelctl: cannot send the console request");
        return ExitCode::from(EXIT_UNREACHABLE);
    }
    let Some(head) = read_head(&mut s) else {
        eprintln!("keelctl: no answer from Keel");
        return ExitCode::from(EXIT_FAILED);
    };
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    if status != 200 {
        // The error body: as long as the answer says, else up to the close.
        let length = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<u64>().ok())?
        });
        let mut rest = Vec::new();
        let _ = (&mut s)
            .take(length.unwrap_or(MAX_ANSWER).min(MAX_ANSWER))
            .read_to_end(&mut rest);
        let json: Value = serde_json::from_slice(&rest).unwrap_or(Value::Null);
        let why = json.get("error").and_then(Value::as_str).map_or_else(
            || String::from_utf8_lossy(&rest).trim().to_string(),
            str::to_string,
        );
        eprintln!("keelctl: console refused ({status}): {why}");
        return ExitCode::from(if status == 403 {
            EXIT_DENIED
        } else {
            EXIT_FAILED
        });
    }
    if s.set_read_timeout(None).is_err() {
        return ExitCode::from(EXIT_FAILED);
    }
    let terminal = std::io::stdin().is_terminal();
    let raw = if terminal {
        let pid = request(&args.socket, "GET", "/v1/vm", None)
            .ok()
            .and_then(|(_, v)| v.get("pid").and_then(Value::as_u64));
        match RawTerminal::enter() {
            Ok(r) => {
                let who = pid.map_or("keel".to_string(), |p| format!("keel (pid {p})"));
                say(true, &format!("Connected to {who}; escape character is ^]"));
                Some(r)
            }
            Err(e) => {
                eprintln!("keelctl: cannot put the terminal in raw mode: {e}");
                return ExitCode::from(EXIT_FAILED);
            }
        }
    } else {
        None
    };
    let detached = Arc::new(AtomicBool::new(false));
    // A terminal's input is read in both modes, to catch Ctrl-]; a script's
    // only when it types.
    if rw || terminal {
        match s.try_clone() {
            Ok(w) => {
                let detached = detached.clone();
                std::thread::spawn(move || console_input(w, rw, terminal, detached));
            }
            Err(e) => {
                say(raw.is_some(), &format!("keelctl: {e}"));
                return ExitCode::from(EXIT_FAILED);
            }
        }
    }
    let mut out = std::io::stdout();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                    // Nobody reads the output any more.
                    return ExitCode::SUCCESS;
                }
            }
        }
    }
    if detached.load(SeqCst) {
        say(raw.is_some(), "");
        return ExitCode::SUCCESS;
    }
    // Keel closed the console: the VM ended, or something went wrong.
    match vm_state(&args.socket) {
        None => {
            say(raw.is_some(), "keel: the VM has ended (state: stopped)");
            ExitCode::SUCCESS
        }
        Some(state) if state == "stopped" => {
            say(
                raw.is_some(),
                &format!("keel: the VM has ended (state: {state})"),
            );
            ExitCode::SUCCESS
        }
        Some(state) => {
            say(
                raw.is_some(),
                &format!("keelctl: Keel closed the console (VM state: {state})"),
            );
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (method, target, body) = match &args.cmd {
        Cmd::Info => ("GET", "/v1/vm", None),
        Cmd::Counters => ("GET", "/v1/counters", None),
        Cmd::Pause => ("PUT", "/v1/vm/pause", None),
        Cmd::Resume => ("PUT", "/v1/vm/resume", None),
        Cmd::Shutdown { timeout, .. } => (
            "PUT",
            "/v1/vm/shutdown",
            timeout.map(|t| format!("{{\"timeout_s\":{t}}}")),
        ),
        Cmd::Stop => ("PUT", "/v1/vm/stop", None),
        Cmd::Console { rw } => return console(&args, *rw),
    };
    let ends_vm = matches!(args.cmd, Cmd::Stop | Cmd::Shutdown { .. });
    let (status, mut json) = match request(&args.socket, method, target, body.as_deref()) {
        Ok(r) => r,
        // Keel may end with the VM before its answer is out: a stop or
        // shutdown whose answer is cut short by Keel going away did its job.
        Err(CallError::Io(_) | CallError::Malformed)
            if ends_vm && vm_state(&args.socket).is_none() =>
        {
            (202, json!({ "state": "stopped" }))
        }
        Err(e) => {
            eprintln!("keelctl: {e}");
            return e.exit_code();
        }
    };
    // Stop (and shutdown --wait): report the state the VM ended in.
    let end_wait = match &args.cmd {
        Cmd::Stop => Some(STOP_WAIT),
        Cmd::Shutdown {
            timeout,
            wait: true,
        } => Some(Duration::from_secs(timeout.unwrap_or(3600)) + STOP_WAIT),
        _ => None,
    };
    let mut code = match status {
        200..=299 => ExitCode::SUCCESS,
        403 => ExitCode::from(EXIT_DENIED),
        _ => ExitCode::from(EXIT_FAILED),
    };
    if let (Some(wait), 200..=299) = (end_wait, status) {
        match wait_for_end(&args.socket, wait) {
            Ok(state) => json = json!({ "state": state }),
            Err(state) => {
                eprintln!(
                    "keelctl: the VM has not ended after {}s (state: {state})",
                    wait.as_secs()
                );
                json = json!({ "state": state });
                code = ExitCode::from(EXIT_FAILED);
            }
        }
    }
    if args.json {
        println!("{json}");
    } else if (200..300).contains(&status) {
        if matches!(args.cmd, Cmd::Counters) {
            for row in counter_rows(&json) {
                println!("{row}");
            }
        } else {
            print_table(&json, "");
        }
    } else {
        eprintln!(
            "keelctl: {} ({status})",
            json.get("error")
                .and_then(Value::as_str)
                .unwrap_or("request failed")
        );
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_list_every_device_kind() {
        let doc = json!({
            "vcpus": [{"index": 0, "exits": {"io_in": 5}}],
            "disks": [{"index": 0, "read_ops": 7}],
            "net": [],
            "vsock": null,
            "serial": {"lost_bytes": 3},
        });
        let rows = counter_rows(&doc);
        let words: Vec<Vec<&str>> = rows
            .iter()
            .map(|r| r.split_whitespace().collect())
            .collect();
        assert_eq!(words[0], ["DEVICE", "INDEX", "COUNTER", "VALUE"]);
        assert!(
            words.contains(&vec!["vcpu", "0", "exits.io_in", "5"]),
            "{rows:?}"
        );
        assert!(
            words.contains(&vec!["disk", "0", "read_ops", "7"]),
            "{rows:?}"
        );
        assert!(words.contains(&vec!["net", "-", "(none)", "-"]), "{rows:?}");
        assert!(
            words.contains(&vec!["vsock", "-", "(none)", "-"]),
            "{rows:?}"
        );
        assert!(
            words.contains(&vec!["serial", "-", "lost_bytes", "3"]),
            "{rows:?}"
        );
        assert!(!rows.iter().any(|r| r.contains(" index ")), "{rows:?}");
    }
}
