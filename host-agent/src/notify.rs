//! `notify`: print a guest-supplied message on the host consoles,
//! min(count, 10) times, 2 s apart (`notify_interval_s`), in a background
//! thread.
//!
//! The text is untrusted: every control character and every terminal escape
//! or control sequence (ESC ..., CSI, OSC, DCS, C1 controls) is removed
//! before it reaches a console, as are bidirectional-override characters;
//! only newline and tab survive. Consoles are opened O_NOCTTY so a tty never
//! becomes the agent's controlling terminal.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const MAX_REPEAT: u32 = 10;
pub const MAX_MESSAGE_CHARS: usize = 4096;
/// At most this many notifications print at the same time.
pub const MAX_ACTIVE: usize = 4;

/// Remove control characters and escape sequences.
pub fn sanitize(input: &str) -> String {
    let mut out = String::with_capacity(input.len());
    let mut it = input.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '\n' | '\t' => out.push(c),
            '\u{1b}' => match it.next() {
                // CSI: parameters and intermediates, up to a final byte 0x40..=0x7e.
                Some('[') => skip_csi(&mut it),
                // OSC, DCS, SOS, PM, APC: a string up to ST (ESC \) or BEL.
                Some(']') | Some('P') | Some('X') | Some('^') | Some('_') => skip_string(&mut it),
                // nF escape sequences: intermediates 0x20..=0x2f, then one final byte.
                Some(c2) if ('\u{20}'..='\u{2f}').contains(&c2) => {
                    while let Some(&n) = it.peek() {
                        it.next();
                        if !('\u{20}'..='\u{2f}').contains(&n) {
                            break;
                        }
                    }
                }
                // Two-character sequences (ESC c, ESC 7, ...): drop both.
                _ => {}
            },
            '\u{9b}' => skip_csi(&mut it),
            '\u{9d}' | '\u{90}' | '\u{98}' | '\u{9e}' | '\u{9f}' => skip_string(&mut it),
            c if c.is_control() => {}
            // Bidirectional overrides/isolates, zero-width joiners and the like.
            '\u{200b}'..='\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2066}'..='\u{2069}'
            | '\u{feff}' => {}
            c => out.push(c),
        }
    }
    if out.chars().count() > MAX_MESSAGE_CHARS {
        out = out.chars().take(MAX_MESSAGE_CHARS).collect();
        out.push_str("...");
    }
    out
}

fn skip_csi(it: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    for c in it.by_ref() {
        if ('\u{40}'..='\u{7e}').contains(&c) || !('\u{20}'..='\u{7e}').contains(&c) {
            break;
        }
    }
}

fn skip_string(it: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    while let Some(c) = it.next() {
        match c {
            '\u{07}' | '\u{9c}' => break,
            '\u{1b}' => {
                if it.peek() == Some(&'\\') {
                    it.next();
                }
                break;
            }
            _ => {}
        }
    }
}

pub struct Notifier {
    consoles: Vec<PathBuf>,
    active: Arc<AtomicUsize>,
    /// Pause between repetitions (2 s; the agent's `notify_interval_s`).
    pub interval: Duration,
}

impl Notifier {
    pub fn new(consoles: Vec<PathBuf>) -> Notifier {
        Notifier {
            consoles,
            active: Arc::new(AtomicUsize::new(0)),
            interval: Duration::from_secs(2),
        }
    }

    /// Check that at least one console opens, then print in the background.
    /// Returns how many times the message will be printed.
    pub fn notify(&self, count: u32, message: &str) -> Result<u32, String> {
        let repeat = count.min(MAX_REPEAT);
        let text = sanitize(message);
        let mut files = Vec::new();
        let mut errors = Vec::new();
        for path in &self.consoles {
            // append: a console may be a log file; harmless on a tty.
            match OpenOptions::new()
                .append(true)
                .custom_flags(libc::O_NOCTTY)
                .open(path)
            {
                Ok(f) => files.push((path.clone(), f)),
                Err(e) => errors.push(format!("{}: {e}", path.display())),
            }
        }
        if files.is_empty() {
            return Err(format!(
                "no host console could be opened ({})",
                errors.join("; ")
            ));
        }
        for e in &errors {
            log::warn!("notify: cannot open console {e}");
        }
        if repeat == 0 {
            return Ok(0);
        }
        if self.active.fetch_add(1, Ordering::SeqCst) >= MAX_ACTIVE {
            self.active.fetch_sub(1, Ordering::SeqCst);
            return Err(format!(
                "{MAX_ACTIVE} notifications are already being printed; try later"
            ));
        }
        log::info!("notify: printing a guest message {repeat} time(s): {text:?}");
        let active = self.active.clone();
        let interval = self.interval;
        let line = format!("\n{text}\n");
        std::thread::spawn(move || {
            let mut printed = 0;
            for i in 0..repeat {
                files.retain_mut(|(path, f)| match f.write_all(line.as_bytes()) {
                    Ok(()) => true,
                    Err(e) => {
                        log::warn!("notify: writing to {}: {e}", path.display());
                        false
                    }
                });
                if files.is_empty() {
                    break;
                }
                printed += 1;
                if i + 1 == repeat {
                    break;
                }
                std::thread::sleep(interval);
            }
            log::info!("notify: done, printed {printed} time(s)");
            active.fetch_sub(1, Ordering::SeqCst);
        });
        Ok(repeat)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_controls_and_escapes() {
        assert_eq!(sanitize("plain text"), "plain text");
        assert_eq!(sanitize("a\nb\tc"), "a\nb\tc");
        assert_eq!(sanitize("\u{1b}[31mred\u{1b}[0m"), "red");
        assert_eq!(sanitize("x\u{1b}[2J\u{1b}[Hy"), "xy");
        assert_eq!(sanitize("t\u{1b}]0;title\u{07}u"), "tu");
        assert_eq!(
            sanitize("t\u{1b}]8;;http://x\u{1b}\\link\u{1b}]8;;\u{1b}\\"),
            "tlink"
        );
        assert_eq!(sanitize("a\u{1b}Pq#0;2;0;0;0\u{1b}\\b"), "ab");
        assert_eq!(sanitize("a\u{1b}cb"), "ab");
        assert_eq!(sanitize("a\u{1b}(0b"), "ab");
        assert_eq!(sanitize("a\u{9b}31mb"), "ab");
        assert_eq!(sanitize("a\rb\u{8}c\u{7}d\u{0}e\u{7f}f"), "abcdef");
        assert_eq!(sanitize("\u{202e}evil"), "evil");
        assert_eq!(sanitize("unterminated\u{1b}[12"), "unterminated");
        assert_eq!(sanitize("ünïcødé ✓"), "ünïcødé ✓");
        let long = "x".repeat(10_000);
        assert_eq!(sanitize(&long).chars().count(), MAX_MESSAGE_CHARS + 3);
    }

    #[test]
    fn prints_min_count_10_times_to_every_console() {
        let dir = std::env::temp_dir().join(format!("notify-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let c1 = dir.join("tty1");
        let c2 = dir.join("ttyS0");
        std::fs::write(&c1, "").unwrap();
        std::fs::write(&c2, "").unwrap();
        let mut n = Notifier::new(vec![c1.clone(), dir.join("missing"), c2.clone()]);
        n.interval = Duration::from_millis(1);
        assert_eq!(n.notify(25, "hi\u{1b}[31m!").unwrap(), 10);
        let t0 = std::time::Instant::now();
        while n.active.load(Ordering::SeqCst) > 0 && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        for c in [&c1, &c2] {
            assert_eq!(std::fs::read_to_string(c).unwrap(), "\nhi!\n".repeat(10));
        }
        let none = Notifier::new(vec![dir.join("missing")]);
        assert!(none.notify(1, "x").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
