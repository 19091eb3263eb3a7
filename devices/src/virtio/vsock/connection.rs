//! One vsock stream between a guest port and a host Unix socket, with
//! virtio-vsock's credit-based flow control in both directions.

use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Instant;

use super::control::Owed;
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use vm_memory::{VolatileMemoryError, VolatileSlice, WriteVolatile};

/// Bytes of guest data Keel buffers per connection when the host side is
/// slow (also the credit it grants the guest).
pub const CONN_TX_BUF: u32 = 1 << 20;

/// Where a connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Host connected to the device socket; waiting for `CONNECT <port>\n`.
    AwaitConnectLine,
    /// REQUEST sent to the guest; waiting for its RESPONSE.
    Connecting,
    /// Data flows.
    Established,
}

/// A stream.
pub struct Connection {
    /// Host side.
    pub stream: UnixStream,
    /// State.
    pub state: ConnState,
    /// The host-side (CID 2) port.
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    /// Guest data not yet written to the host socket.
    pub tx_buf: VecDeque<u8>,
    /// Bytes of guest data written to the host socket (our fwd_cnt).
    pub fwd_cnt: u32,
    /// fwd_cnt last told to the guest.
    pub last_fwd_cnt_sent: u32,
    /// Guest's receive buffer size.
    pub peer_buf_alloc: u32,
    /// Bytes the guest has consumed.
    pub peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    pub rx_cnt: u32,
    /// The host socket may have data to read.
    pub host_readable: bool,
    /// The host side shut its write half (EOF seen).
    pub host_eof: bool,
    /// The host side closed both halves (EPOLLHUP): nothing the guest
    /// sends can be delivered any more.
    pub host_hup: bool,
    /// When the connection is dropped (with RST) if the guest has not
    /// closed it by then: set once both directions are finished.
    pub close_by: Option<Instant>,
    /// The guest will send no more.
    pub guest_send_shut: bool,
    /// Partial `CONNECT` line from a host-initiated connection.
    pub line: Vec<u8>,
    /// Control packets owed while the control queue was full.
    pub owed: Owed,
    /// Its event-loop token (0 until registered).
    pub token: u32,
    /// In the device's ready queue (it may have data for the guest).
    pub queued: bool,
    /// In the device's list of connections touched by the current event.
    pub dirty: bool,
}

impl Connection {
    /// A connection over `stream`.
    pub fn new(stream: UnixStream, state: ConnState, local_port: u32, peer_port: u32) -> Self {
        Connection {
            stream,
            state,
            local_port,
            peer_port,
            tx_buf: VecDeque::new(),
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            host_readable: false,
            host_eof: false,
            host_hup: false,
            close_by: None,
            guest_send_shut: false,
            line: Vec::new(),
            owed: Owed::default(),
            token: 0,
            queued: false,
            dirty: false,
        }
    }

    /// Whether it has data for the guest: established, the host socket
    /// readable and not ended, and the guest has credit left.
    pub fn wants_rx(&self) -> bool {
        self.state == ConnState::Established
            && self.host_readable
            && !self.host_eof
            && self.peer_credit() > 0
    }

    /// Bytes the guest can still take (its credit to us).
    pub fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Whether the guest sending `len` more bytes stays within the credit
    /// we granted (our buffer).
    pub fn guest_may_send(&self, len: usize) -> bool {
        self.tx_buf.len() + len <= CONN_TX_BUF as usize
    }

    /// Writes `data` (after anything buffered before it) to the host
    /// socket, buffering what does not fit. With nothing buffered, `data`
    /// goes straight to the socket and only what the socket does not take
    /// is copied into the buffer. Err means the host side is gone.
    pub fn send_to_host(&mut self, data: &[u8]) -> std::io::Result<()> {
        if !self.tx_buf.is_empty() {
            self.tx_buf.extend(data);
            return self.flush_to_host();
        }
        let mut sent = 0usize;
        while sent < data.len() {
            match self.stream.write(&data[sent..]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    sent += n;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.tx_buf.extend(&data[sent..]);
        Ok(())
    }

    /// Writes `data`, guest memory, straight to the host socket (nothing
    /// may be buffered before it); returns how much the socket took
    /// (less than all of it when the socket is full). Err means the host
    /// side is gone.
    pub fn send_guest_slice(&mut self, data: &VolatileSlice<'_>) -> std::io::Result<usize> {
        let mut sent = 0usize;
        while sent < data.len() {
            let rest = data
                .offset(sent)
                .map_err(|e| std::io::Error::new(ErrorKind::InvalidInput, e))?;
            match self.stream.write_volatile(&rest) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    sent += n;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(VolatileMemoryError::IOError(e)) if e.kind() == ErrorKind::WouldBlock => break,
                Err(VolatileMemoryError::IOError(e)) => return Err(e),
                Err(e) => return Err(std::io::Error::other(e)),
            }
        }
        Ok(sent)
    }

    /// Writes buffered guest data to the host socket.
    pub fn flush_to_host(&mut self) -> std::io::Result<()> {
        while !self.tx_buf.is_empty() {
            let (a, _) = self.tx_buf.as_slices();
            match self.stream.write(a) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether neither side will send anything more: the host has ended
    /// its stream, and the guest has ended its own (or the host side is
    /// gone altogether), with nothing left to write to the host.
    pub fn finished(&self) -> bool {
        self.host_eof && (self.guest_send_shut || self.host_hup) && self.tx_buf.is_empty()
    }

    /// Whether the guest should hear about freed buffer space.
    pub fn credit_update_due(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CONN_TX_BUF / 4
    }
}

/// Connects to the listening Unix socket at `path` without blocking the
/// device thread: a listener whose backlog is full fails at once (EAGAIN)
/// instead of stalling every other connection. The stream is non-blocking.
pub fn connect_nonblocking(path: &Path) -> nix::Result<UnixStream> {
    let addr = UnixAddr::new(path)?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn connecting_never_blocks_on_a_full_backlog() {
        let dir = std::env::temp_dir().join(format!("keel-vsock-conn-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("full.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // Nobody accepts: the backlog fills, then connecting fails at once.
        let mut kept = Vec::new();
        let err = loop {
            match connect_nonblocking(&path) {
                Ok(s) => kept.push(s),
                Err(e) => break e,
            }
            assert!(kept.len() < 100_000, "the backlog never filled");
        };
        assert_eq!(err, nix::errno::Errno::EAGAIN);
        assert!(connect_nonblocking(&dir.join("nobody.sock")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn credit_accounting() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Connection::new(a, ConnState::Established, 1, 2);
        c.peer_buf_alloc = 1000;
        c.rx_cnt = 700;
        c.peer_fwd_cnt = 200;
        assert_eq!(c.peer_credit(), 500);
        c.peer_fwd_cnt = 700;
        assert_eq!(c.peer_credit(), 1000);
        // Counters wrap.
        c.rx_cnt = 10;
        c.peer_fwd_cnt = u32::MAX - 9;
        assert_eq!(c.peer_credit(), 980);
        assert!(c.guest_may_send(CONN_TX_BUF as usize));
        assert!(!c.guest_may_send(CONN_TX_BUF as usize + 1));
    }

    #[test]
    fn data_the_socket_takes_is_never_buffered() {
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut c = Connection::new(a, ConnState::Established, 1, 2);
        let mut got = vec![0u8; 4096];
        for i in 0..100u8 {
            c.send_to_host(&[i; 4096]).unwrap();
            b.read_exact(&mut got).unwrap();
            assert!(got.iter().all(|x| *x == i));
        }
        assert_eq!(c.fwd_cnt, 100 * 4096);
        assert_eq!(c.tx_buf.capacity(), 0, "no copy into the buffer");
    }

    #[test]
    fn a_slow_host_reader_buffers_within_the_credit_then_drains() {
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut c = Connection::new(a, ConnState::Established, 1, 2);
        let chunk = vec![7u8; 64 << 10];
        let mut sent = 0usize;
        while c.guest_may_send(chunk.len()) {
            c.send_to_host(&chunk).unwrap();
            sent += chunk.len();
        }
        assert!(!c.tx_buf.is_empty(), "the socket buffer filled up");
        assert!(c.tx_buf.len() <= CONN_TX_BUF as usize);
        let mut got = vec![0u8; sent];
        let mut read = 0;
        while read < sent {
            read += b.read(&mut got[read..]).unwrap();
            c.flush_to_host().unwrap();
        }
        assert!(c.tx_buf.is_empty());
        assert_eq!(c.fwd_cnt as usize, sent);
        assert!(got.iter().all(|x| *x == 7));
    }
}
