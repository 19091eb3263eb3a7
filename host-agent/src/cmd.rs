//! Running the few programs the agent runs (systemctl, the reboot command):
//! a fixed argv, never a shell, a clean environment, a time limit.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Outcome {
    pub success: bool,
    pub status: String,
    /// The last bytes of stderr and stdout (for error messages).
    pub output: String,
}

/// Run `argv` and wait at most `timeout` (then it is killed).
pub fn run(argv: &[String], timeout: Duration) -> std::io::Result<Outcome> {
    let (prog, args) = argv
        .split_first()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty argv"))?;
    let mut child = Command::new(prog)
        .args(args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Pipes are drained by threads that report through channels, so a
    // grandchild holding a pipe open can never block us.
    let drain = |r: Option<Box<dyn Read + Send>>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.by_ref().take(64 * 1024).read_to_end(&mut buf);
                // Keep reading (and discarding) so the child never blocks on a full pipe.
                let _ = std::io::copy(&mut r, &mut std::io::sink());
            }
            let _ = tx.send(buf);
        });
        rx
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let collect = |rx: std::sync::mpsc::Receiver<Vec<u8>>| {
        rx.recv_timeout(Duration::from_secs(1)).unwrap_or_default()
    };
    let mut text = String::from_utf8_lossy(&collect(err)).into_owned();
    text.push_str(&String::from_utf8_lossy(&collect(out)));
    let text = text.trim();
    let tail: String = {
        let chars: Vec<char> = text.chars().collect();
        chars[chars.len().saturating_sub(500)..].iter().collect()
    };
    Ok(match status {
        Some(st) => Outcome {
            success: st.success(),
            status: st.to_string(),
            output: tail,
        },
        None => Outcome {
            success: false,
            status: format!("killed after {} s", timeout.as_secs()),
            output: tail,
        },
    })
}
