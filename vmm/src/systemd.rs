//! systemd integration: `Type=notify` readiness, STATUS lines, watchdog.
//! Every call is a no-op when systemd did not start Keel (no NOTIFY_SOCKET).

use std::time::Duration;

use sd_notify::NotifyState;

/// READY=1 and a status line (`VM running`, with the boot monitor's
/// `; guest boot pending`): the guest runs.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// STATUS=<text>.
pub fn status(text: &str) {
    send(&[NotifyState::Status(text)]);
}

/// STOPPING=1 with the reason.
pub fn stopping(why: &str) {
    let line = format!("VM stopped: {why}");
    send(&[NotifyState::Stopping, NotifyState::Status(&line)]);
}

/// WATCHDOG=1.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often to ping the watchdog (half of WatchdogSec), if enabled.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0u64;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        Some(Duration::from_micros(usec / 2))
    } else {
        None
    }
}

fn send(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        log::warn!("systemd notify: {e}");
    }
}
