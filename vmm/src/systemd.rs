//! systemd integration: `Type=notify` readiness, STATUS lines, watchdog,
//! and the control socket of socket activation (`LISTEN_FDS`). The notify
//! calls are no-ops when systemd did not start Keel (no NOTIFY_SOCKET).

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use nix::sys::socket::{
    getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrLike, SockaddrStorage,
};

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

/// Why the socket systemd passed cannot serve the control API.
#[derive(Debug, thiserror::Error)]
pub enum ListenFdError {
    /// `LISTEN_PID`/`LISTEN_FDS` could not be read.
    #[error("systemd socket activation: bad LISTEN_PID/LISTEN_FDS: {0}")]
    Env(std::io::Error),
    /// The descriptor is not a listening Unix stream socket.
    #[error("systemd socket activation: fd {fd} is not a listening Unix stream socket ({why}); the socket unit must say ListenStream=/path")]
    NotUnixStream {
        /// The descriptor.
        fd: RawFd,
        /// What it is instead.
        why: String,
    },
}

/// The control socket systemd passed (socket activation), if any: the
/// first `LISTEN_FDS` descriptor when `LISTEN_PID` is Keel's pid, checked
/// to be a listening Unix stream socket. `LISTEN_PID`, `LISTEN_FDS` and
/// `LISTEN_FDNAMES` are removed from the environment in every case, so
/// that nothing Keel starts takes them for its own. Call it before other
/// threads read the environment.
pub fn listen_socket() -> Result<Option<UnixListener>, ListenFdError> {
    let first = sd_notify::listen_fds().map(|mut fds| fds.next());
    std::env::remove_var("LISTEN_FDNAMES");
    let Some(fd) = first.map_err(ListenFdError::Env)? else {
        return Ok(None);
    };
    // SAFETY: systemd passed this descriptor to us (LISTEN_PID is our pid),
    // and nothing else in the process owns it: it becomes the listener's.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    check_listener(owned).map(Some)
}

/// `fd` as a listener, if it is a listening Unix stream socket.
fn check_listener(fd: OwnedFd) -> Result<UnixListener, ListenFdError> {
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let bad = |why: String| ListenFdError::NotUnixStream { fd: raw, why };
    let b: BorrowedFd<'_> = fd.as_fd();
    let kind = getsockopt(&b, sockopt::SockType).map_err(|e| bad(format!("not a socket: {e}")))?;
    if kind != SockType::Stream {
        return Err(bad(format!("socket type {kind:?}")));
    }
    let family = getsockname::<SockaddrStorage>(raw)
        .map_err(|e| bad(format!("getsockname: {e}")))?
        .family();
    if family != Some(AddressFamily::Unix) {
        return Err(bad(format!("address family {family:?}")));
    }
    if !getsockopt(&b, sockopt::AcceptConn).map_err(|e| bad(format!("SO_ACCEPTCONN: {e}")))? {
        return Err(bad("not listening".into()));
    }
    Ok(UnixListener::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn only_a_listening_unix_stream_socket_is_taken() {
        let dir = std::env::temp_dir().join(format!("keel-listenfd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = UnixListener::bind(dir.join("api.sock")).unwrap();
        assert!(check_listener(OwnedFd::from(good)).is_ok());
        let file = std::fs::File::create(dir.join("plain")).unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (pair, _other) = UnixStream::pair().unwrap();
        for fd in [
            OwnedFd::from(file),
            OwnedFd::from(udp),
            OwnedFd::from(tcp),
            OwnedFd::from(pair),
        ] {
            let e = check_listener(fd).unwrap_err();
            assert!(matches!(e, ListenFdError::NotUnixStream { .. }), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_listen_variables_are_cleared() {
        // Another process's variables (LISTEN_PID is not ours): ignored,
        // and removed all the same.
        std::env::set_var("LISTEN_PID", "1");
        std::env::set_var("LISTEN_FDS", "1");
        std::env::set_var("LISTEN_FDNAMES", "api");
        assert!(listen_socket().unwrap().is_none());
        for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            assert!(std::env::var_os(v).is_none(), "{v} left set");
        }
    }
}
