//! `keelctl`: the admins' client of Keel's control socket.
//!
//! Exit codes: 0 success; 1 the request was refused or failed (4xx/5xx
//! other than 403); 2 usage error; 3 the socket cannot be reached;
//! 4 permission denied (403).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::Value;

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
    /// vCPU exit and device counters.
    Counters,
    /// Pause every vCPU.
    Pause,
    /// Resume a paused VM.
    Resume,
    /// Graceful shutdown (Ctrl-Alt-Del), forced stop after the timeout.
    Shutdown {
        /// Seconds before the forced stop (Keel's default: 120).
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Forced stop, now.
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

fn connect(path: &PathBuf) -> Result<UnixStream, ExitCode> {
    UnixStream::connect(path).map_err(|e| {
        eprintln!("keelctl: cannot connect to {}: {e}", path.display());
        ExitCode::from(EXIT_UNREACHABLE)
    })
}

/// Sends one request; returns status and parsed JSON body.
fn call(
    path: &PathBuf,
    method: &str,
    target: &str,
    body: Option<&str>,
) -> Result<(u16, Value), ExitCode> {
    let mut s = connect(path)?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {target} HTTP/1.1\r\nHost: keel\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let io_err = |e: std::io::Error| {
        eprintln!("keelctl: {e}");
        ExitCode::from(EXIT_UNREACHABLE)
    };
    s.write_all(req.as_bytes()).map_err(io_err)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(io_err)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            eprintln!("keelctl: malformed answer from Keel");
            ExitCode::from(EXIT_FAILED)
        })?;
    let json = serde_json::from_str(body).unwrap_or(Value::Null);
    Ok((status, json))
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

fn console(args: &Args, rw: bool) -> ExitCode {
    let mut s = match connect(&args.socket) {
        Ok(s) => s,
        Err(c) => return c,
    };
    let target = if rw {
        "/v1/console?mode=rw"
    } else {
        "/v1/console"
    };
    let req = format!("GET {target} HTTP/1.1\r\nHost: keel\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return ExitCode::from(EXIT_UNREACHABLE);
    }
    // Read the response head byte by byte, then stream.
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => return ExitCode::from(EXIT_FAILED),
        }
    }
    let head = String::from_utf8_lossy(&head);
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    if status != 200 {
        let mut rest = String::new();
        let _ = s.read_to_string(&mut rest);
        eprintln!("keelctl: console refused ({status}): {}", rest.trim());
        return ExitCode::from(if status == 403 {
            EXIT_DENIED
        } else {
            EXIT_FAILED
        });
    }
    if rw {
        if let Ok(mut w) = s.try_clone() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 256];
                let stdin = std::io::stdin();
                let mut lock = stdin.lock();
                while let Ok(n) = lock.read(&mut buf) {
                    // Ctrl-] (0x1d) detaches, as in virsh console.
                    if n == 0 {
                        // End of input: stop typing, keep watching.
                        let _ = w.shutdown(std::net::Shutdown::Write);
                        return;
                    }
                    if buf[..n].contains(&0x1d) || w.write_all(&buf[..n]).is_err() {
                        let _ = w.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                }
            });
        }
    }
    let mut out = std::io::stdout();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return ExitCode::SUCCESS,
            Ok(n) => {
                if out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                    return ExitCode::SUCCESS;
                }
            }
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
        Cmd::Shutdown { timeout } => (
            "PUT",
            "/v1/vm/shutdown",
            timeout.map(|t| format!("{{\"timeout_s\":{t}}}")),
        ),
        Cmd::Stop => ("PUT", "/v1/vm/stop", None),
        Cmd::Console { rw } => return console(&args, *rw),
    };
    let (status, json) = match call(&args.socket, method, target, body.as_deref()) {
        Ok(r) => r,
        Err(code) => return code,
    };
    if args.json {
        println!("{json}");
    } else if (200..300).contains(&status) {
        print_table(&json, "");
    } else {
        eprintln!(
            "keelctl: {} ({status})",
            json.get("error")
                .and_then(Value::as_str)
                .unwrap_or("request failed")
        );
    }
    match status {
        200..=299 => ExitCode::SUCCESS,
        403 => ExitCode::from(EXIT_DENIED),
        _ => ExitCode::from(EXIT_FAILED),
    }
}
