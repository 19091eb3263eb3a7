//! The boot monitor: like HostOS's GuestOS runner, Keel watches the guest's
//! serial output for `GUESTOS BOOT SUCCESS` or `GUESTOS BOOT FAILURE` and
//! gives up waiting after a timeout (HostOS: 5 minutes).
//!
//! The markers are matched on the byte stream (the UART hands over one byte
//! per write, and a marker may arrive in any number of pieces), on the vCPU
//! thread that writes them, with a fixed-size window: no allocation, no
//! blocking. The first outcome is final. The control loop hears about it
//! through an eventfd, reports it (log, systemd `STATUS=`, the configured
//! consoles) and owns the timeout.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use devices::legacy::OutputWatcher;
use vmm_sys_util::eventfd::EventFd;

/// The guest's boot as the monitor sees it (`GET /v1/vm` `guest_boot`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestBoot {
    /// No marker yet, and the timeout has not passed.
    Pending,
    /// The guest printed `GUESTOS BOOT SUCCESS`.
    Success,
    /// The guest printed `GUESTOS BOOT FAILURE`.
    Failure,
    /// Neither marker within the timeout.
    Timeout,
}

impl GuestBoot {
    /// The name the API, systemd STATUS and the metrics use.
    pub fn name(self) -> &'static str {
        match self {
            GuestBoot::Pending => "pending",
            GuestBoot::Success => "success",
            GuestBoot::Failure => "failure",
            GuestBoot::Timeout => "timeout",
        }
    }

    /// The line written to the configured consoles (HostOS's wording).
    pub fn console_line(self) -> &'static str {
        match self {
            GuestBoot::Pending => "GuestOS boot pending",
            GuestBoot::Success => "GuestOS boot succeeded",
            GuestBoot::Failure => "GuestOS boot failed",
            GuestBoot::Timeout => "GuestOS boot timed out",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => GuestBoot::Success,
            2 => GuestBoot::Failure,
            3 => GuestBoot::Timeout,
            _ => GuestBoot::Pending,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            GuestBoot::Pending => 0,
            GuestBoot::Success => 1,
            GuestBoot::Failure => 2,
            GuestBoot::Timeout => 3,
        }
    }
}

/// The success marker.
pub const SUCCESS_MARKER: &[u8] = b"GUESTOS BOOT SUCCESS";
/// The failure marker.
pub const FAILURE_MARKER: &[u8] = b"GUESTOS BOOT FAILURE";
/// Bytes of output the matcher keeps (the longer marker's length).
const WINDOW: usize = 20;

/// Finds the markers in a byte stream fed in pieces of any size.
#[derive(Debug, Default)]
pub struct MarkerMatcher {
    window: [u8; WINDOW],
    filled: usize,
}

impl MarkerMatcher {
    /// Feeds the next bytes; returns the outcome of the first marker that
    /// ends in them.
    pub fn feed(&mut self, bytes: &[u8]) -> Option<GuestBoot> {
        for &b in bytes {
            self.window.copy_within(1.., 0);
            self.window[WINDOW - 1] = b;
            self.filled = (self.filled + 1).min(WINDOW);
            let seen = &self.window[WINDOW - self.filled..];
            if seen.ends_with(SUCCESS_MARKER) {
                return Some(GuestBoot::Success);
            }
            if seen.ends_with(FAILURE_MARKER) {
                return Some(GuestBoot::Failure);
            }
        }
        None
    }
}

/// The monitor shared by the serial port (which feeds it), the control loop
/// (which reports and times it out) and the API (which shows it).
#[derive(Debug)]
pub struct BootMonitor {
    state: AtomicU8,
    matcher: Mutex<MarkerMatcher>,
    /// Written once when the guest's output decides the outcome.
    pub wake: EventFd,
}

impl BootMonitor {
    /// A monitor waiting for a marker.
    pub fn new() -> std::io::Result<Self> {
        Ok(BootMonitor {
            state: AtomicU8::new(GuestBoot::Pending.as_u8()),
            matcher: Mutex::new(MarkerMatcher::default()),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// The outcome so far.
    pub fn state(&self) -> GuestBoot {
        GuestBoot::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Moves from pending to `outcome`; false if an outcome was already
    /// there (the first one is final).
    fn decide(&self, outcome: GuestBoot) -> bool {
        self.state
            .compare_exchange(
                GuestBoot::Pending.as_u8(),
                outcome.as_u8(),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// The timeout passed: pending becomes timeout. Returns whether it did.
    pub fn time_out(&self) -> bool {
        self.decide(GuestBoot::Timeout)
    }
}

impl OutputWatcher for BootMonitor {
    fn watch(&self, bytes: &[u8]) {
        if self.state() != GuestBoot::Pending {
            return;
        }
        let found = self
            .matcher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .feed(bytes);
        if let Some(outcome) = found {
            if self.decide(outcome) {
                if let Err(e) = self.wake.write(1) {
                    log::warn!("boot monitor: cannot wake the control loop: {e}");
                }
            }
        }
    }
}

/// A console of the boot monitor, opened at set-up (before privileges
/// and seccomp forbid opening anything).
#[derive(Debug)]
pub struct Console {
    path: PathBuf,
    file: Result<std::fs::File, String>,
}

/// Opens each console (HostOS: `/dev/tty1`, `/dev/ttyS0`) for appending,
/// without blocking and without becoming its controlling process; one that
/// cannot be opened is logged now and skipped when the outcome is written.
pub fn open_consoles(paths: &[PathBuf]) -> Vec<Console> {
    paths
        .iter()
        .map(|path| {
            let file = std::fs::OpenOptions::new()
                .append(true)
                .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(path)
                .map_err(|e| e.to_string());
            if let Err(e) = &file {
                log::warn!("boot monitor: cannot open {}: {e}", path.display());
            }
            Console {
                path: path.clone(),
                file,
            }
        })
        .collect()
}

/// Writes `line` to each console; one that cannot be written is logged and
/// skipped.
pub fn write_consoles(consoles: &[Console], line: &str) {
    for c in consoles {
        let result = match &c.file {
            Ok(f) => (&*f)
                .write_all(format!("{line}\n").as_bytes())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.clone()),
        };
        if let Err(e) = result {
            log::warn!("boot monitor: cannot write to {}: {e}", c.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_found_however_the_output_is_split() {
        let text = b"[  1.0] booting\r\nGUESTOS BOOT GUESTOS BOOT SUCCESS\r\n";
        for piece in 1..=text.len() {
            let mut m = MarkerMatcher::default();
            let found: Vec<GuestBoot> = text.chunks(piece).filter_map(|c| m.feed(c)).collect();
            assert_eq!(found, [GuestBoot::Success], "pieces of {piece}");
        }
        let mut m = MarkerMatcher::default();
        assert_eq!(m.feed(b"x GUESTOS BOOT FAIL"), None);
        assert_eq!(m.feed(b"URE\n"), Some(GuestBoot::Failure));
        // Near misses are not markers.
        for near in [
            &b"GUESTOS BOOT SUCCES\n"[..],
            b"guestos boot success",
            b"GUESTOS  BOOT SUCCESS",
            b"GUESTOS BOOT\nSUCCESS",
            b"GUESTOS BOOT SUCCEED",
        ] {
            let mut m = MarkerMatcher::default();
            assert_eq!(m.feed(near), None, "{}", String::from_utf8_lossy(near));
        }
    }

    #[test]
    fn the_first_outcome_is_final_and_wakes_the_loop_once() {
        let mon = BootMonitor::new().unwrap();
        assert_eq!(mon.state(), GuestBoot::Pending);
        for b in b"GUESTOS BOOT FAILURE then GUESTOS BOOT SUCCESS" {
            mon.watch(&[*b]);
        }
        assert_eq!(mon.state(), GuestBoot::Failure);
        assert_eq!(mon.wake.read().unwrap(), 1);
        assert!(!mon.time_out(), "a decided boot does not time out");
        assert_eq!(mon.state(), GuestBoot::Failure);

        let mon = BootMonitor::new().unwrap();
        assert!(mon.time_out());
        mon.watch(SUCCESS_MARKER);
        assert_eq!(
            mon.state(),
            GuestBoot::Timeout,
            "a late marker changes nothing"
        );
        assert!(mon.wake.read().is_err(), "nothing was signalled");
    }

    #[test]
    fn console_lines_reach_each_console_and_bad_ones_are_skipped() {
        let dir = std::env::temp_dir().join(format!("keel-bootmon-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("tty-a");
        std::fs::write(&a, "earlier\n").unwrap();
        let consoles = vec![dir.join("missing/tty"), a.clone()];
        write_consoles(&open_consoles(&consoles), GuestBoot::Timeout.console_line());
        assert_eq!(
            std::fs::read_to_string(&a).unwrap(),
            "earlier\nGuestOS boot timed out\n"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
