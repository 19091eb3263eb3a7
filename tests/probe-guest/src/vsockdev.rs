//! A virtio-vsock device driven by the `virtio-drivers` crate's low-level
//! [`VirtIOSocket`], with the probe's own connection bookkeeping on top:
//! per-connection receive buffers sized to the credit the probe grants
//! (`buf_alloc`), credit updates as the probe consumes data, half-close
//! (SHUTDOWN with only the SEND flag, which the crate's
//! `VsockConnectionManager` cannot send), and bounded waits on the receive
//! side: the used ring is polled against a TSC deadline.
//!
//! Sending goes through the crate, which spins until the device returns the
//! transmit chain, without a time limit: a device that never completes a
//! transmit chain hangs the probe (the host test's deadline catches that).

use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::mem::ManuallyDrop;

use virtio_drivers::device::socket::{
    ConnectionInfo, DisconnectReason, SocketError, StreamShutdown, VirtIOSocket, VsockAddr,
    VsockEvent, VsockEventType, VMADDR_CID_HOST,
};
use virtio_drivers::transport::{DeviceStatus, DeviceType, Transport};
use virtio_drivers::Error as VirtioError;

use crate::arch::tsc::{self, Deadline};
use crate::cmdline::VSOCK_MAX_WRITE;
use crate::virtio::{ProbeHal, ProbeTransport, VirtioDevice};

/// Bytes per receive buffer (8 of them, the crate's queue size): a packet
/// from the device carries at most this less the 44-byte header.
pub const RX_BUF: usize = 32 * 1024;

/// The driver type. The transport sets the status bits one at a time
/// (see [`ProbeTransport`]): Firecracker ignores virtio-drivers' single
/// ACKNOWLEDGE | DRIVER write and never activates the device.
type Socket = VirtIOSocket<ProbeHal, ProbeTransport, RX_BUF>;

/// Queues: rx, tx, event.
const QUEUES: u32 = 3;

/// Least time between two credit requests on a connection.
pub const CREDIT_ASK_US: u64 = 1000;

/// First local port for connections the probe opens.
const FIRST_LOCAL_PORT: u32 = 49152;

/// Where a connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// REQUEST sent, no answer yet.
    Connecting,
    /// RESPONSE received (or, listening, sent): data may flow.
    Open,
    /// The peer reset it (RST).
    Reset,
    /// The probe reset it (RST sent).
    Closed,
}

/// One stream.
pub struct Conn {
    info: ConnectionInfo,
    /// Where it stands.
    pub state: State,
    /// The peer sent SHUTDOWN: it sends no more (end of stream once `rx`
    /// is drained).
    pub peer_shutdown: bool,
    /// Received, not yet read.
    rx: VecDeque<u8>,
    /// Bytes received in all (wrapping, as the counters of the protocol).
    received: u32,
    /// Bytes read by the probe: its `fwd_cnt`.
    consumed: u32,
    /// `fwd_cnt` last told to the device.
    told: u32,
    /// Set when the device sent more than the credit granted.
    pub overrun: Option<String>,
    /// Packets from the peer on this connection, by kind: (RW, other).
    pub packets: (u64, u64),
    /// The peer's last `buf_alloc` and `fwd_cnt`.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent in all (wrapping).
    tx_cnt: u32,
    /// When the probe last let the driver ask for credit (TSC).
    credit_asked: Option<u64>,
    /// Credit requests sent.
    pub credit_requests: u64,
    /// The last packet from the peer on this connection.
    last_event: Option<VsockEvent>,
}

impl Conn {
    fn new(info: ConnectionInfo, state: State) -> Self {
        let capacity = info.buf_alloc as usize;
        Conn {
            info,
            state,
            peer_shutdown: false,
            rx: VecDeque::with_capacity(capacity),
            received: 0,
            consumed: 0,
            told: 0,
            overrun: None,
            packets: (0, 0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            credit_asked: None,
            credit_requests: 0,
            last_event: None,
        }
    }

    /// The peer's port.
    pub fn peer_port(&self) -> u32 {
        self.info.dst.port
    }

    /// Bytes the peer can take now (its credit to the probe).
    pub fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Bytes waiting to be read.
    pub fn available(&self) -> usize {
        self.rx.len()
    }

    /// All data read and the peer will send no more (or the stream is gone).
    pub fn at_eof(&self) -> bool {
        self.rx.is_empty()
            && (self.peer_shutdown || matches!(self.state, State::Reset | State::Closed))
    }

    fn handle(&mut self, event: &VsockEvent, body: &[u8]) -> Wanted {
        self.info.update_for_event(event);
        self.last_event = Some(event.clone());
        self.peer_buf_alloc = event.buffer_status.buffer_allocation;
        self.peer_fwd_cnt = event.buffer_status.forward_count;
        match event.event_type {
            VsockEventType::Connected => {
                self.packets.1 += 1;
                if self.state == State::Connecting {
                    self.state = State::Open;
                }
            }
            VsockEventType::Received { .. } => {
                self.packets.0 += 1;
                self.received = self.received.wrapping_add(body.len() as u32);
                let in_flight = self.received.wrapping_sub(self.told);
                if in_flight > self.info.buf_alloc && self.overrun.is_none() {
                    self.overrun = Some(format!(
                        "the device sent {in_flight} bytes beyond fwd_cnt {} with buf_alloc {}",
                        self.told, self.info.buf_alloc
                    ));
                }
                if self.state == State::Open {
                    self.rx.extend(body);
                }
            }
            VsockEventType::Disconnected {
                reason: DisconnectReason::Reset,
            } => {
                self.packets.1 += 1;
                self.state = State::Reset;
            }
            VsockEventType::Disconnected {
                reason: DisconnectReason::Shutdown,
            } => {
                self.packets.1 += 1;
                self.peer_shutdown = true;
            }
            VsockEventType::CreditRequest => {
                self.packets.1 += 1;
                return Wanted::CreditUpdate;
            }
            VsockEventType::CreditUpdate | VsockEventType::ConnectionRequest => {
                self.packets.1 += 1;
            }
        }
        Wanted::Nothing
    }
}

/// What handling an event asks of the driver afterwards.
enum Wanted {
    Nothing,
    CreditUpdate,
}

/// An initialized device.
pub struct Vsock {
    /// Dropped by hand (see `Drop`).
    sock: ManuallyDrop<Socket>,
    /// virtio-mmio register window (`None` over virtio-pci).
    base: Option<u64>,
    /// The guest CID from the config space.
    pub cid: u64,
    /// Features the device offers.
    pub offered: u64,
    next_port: u32,
    /// Ports listened on.
    listening: Vec<u32>,
    /// Connection requests to listened ports, not yet accepted.
    requests: VecDeque<VsockEvent>,
    /// Connection requests to other ports (refused with RST).
    pub refused_requests: u32,
    /// Events that matched no connection passed to `poll`.
    pub stray: u32,
}

/// A send that could not go out yet.
pub enum SendError {
    /// Not enough credit: poll and try again.
    NoCredit,
    /// Anything else.
    Failed(String),
}

impl Vsock {
    /// Resets the device, reads what it offers and initializes the driver.
    pub fn open(dev: &VirtioDevice) -> Result<Self, String> {
        Self::open_transport(dev.transport()?, dev.mmio_base())
    }

    /// As [`open`](Self::open), on `transport` (`base`: its virtio-mmio
    /// window, if it is one).
    pub fn open_transport(
        mut transport: ProbeTransport,
        base: Option<u64>,
    ) -> Result<Self, String> {
        if transport.device_type() != DeviceType::Socket {
            return Err(format!(
                "device is {:?}, not a socket device",
                transport.device_type()
            ));
        }
        transport.set_status(DeviceStatus::empty());
        transport.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        let offered = transport.read_device_features();
        let sock = Socket::new(transport).map_err(|e| format!("virtio-drivers init: {e}"))?;
        Ok(Vsock {
            cid: sock.guest_cid(),
            sock: ManuallyDrop::new(sock),
            base,
            offered,
            next_port: FIRST_LOCAL_PORT,
            listening: Vec::new(),
            requests: VecDeque::new(),
            refused_requests: 0,
            stray: 0,
        })
    }

    /// A fresh local port.
    pub fn fresh_port(&mut self) -> u32 {
        let p = self.next_port;
        self.next_port = self.next_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
        p
    }

    /// Sends a REQUEST to host port `port`; the connection is `Connecting`
    /// until `poll` sees the answer. `buf_alloc`: the credit granted.
    pub fn connect_start(&mut self, port: u32, buf_alloc: u32) -> Result<Conn, String> {
        let dst = VsockAddr {
            cid: VMADDR_CID_HOST,
            port,
        };
        let mut info = ConnectionInfo::new(dst, self.fresh_port());
        info.buf_alloc = buf_alloc;
        self.sock
            .connect(&info)
            .map_err(|e| format!("sending REQUEST to port {port}: {e}"))?;
        Ok(Conn::new(info, State::Connecting))
    }

    /// Connects to host port `port` and waits (at most `us`) for the answer.
    pub fn connect(&mut self, port: u32, buf_alloc: u32, us: u64) -> Result<Conn, String> {
        let mut conn = self.connect_start(port, buf_alloc)?;
        let deadline = Deadline::after_us(us);
        while conn.state == State::Connecting {
            if !self.poll(&mut [&mut conn])? {
                if deadline.passed() {
                    return Err(format!(
                        "no answer to REQUEST to port {port} within {} ms",
                        us / 1000
                    ));
                }
                core::hint::spin_loop();
            }
        }
        match conn.state {
            State::Open => Ok(conn),
            _ => Err(format!("REQUEST to port {port} answered with RST")),
        }
    }

    /// Handles at most one packet from the device. Returns whether there
    /// was one.
    pub fn poll(&mut self, conns: &mut [&mut Conn]) -> Result<bool, String> {
        let cid = self.cid;
        let mut matched: Option<(usize, Wanted)> = None;
        let mut unmatched: Option<VsockEvent> = None;
        let got = self
            .sock
            .poll(|event, body| {
                match conns
                    .iter_mut()
                    .position(|c| event.matches_connection(&c.info, cid))
                {
                    Some(i) => matched = Some((i, conns[i].handle(&event, body))),
                    None => unmatched = Some(event.clone()),
                }
                Ok(Some(event))
            })
            .map_err(|e| format!("receiving a packet: {e}"))?;
        if got.is_none() {
            return Ok(false);
        }
        if let Some((i, Wanted::CreditUpdate)) = matched {
            self.credit_update(conns[i])?;
        }
        if let Some(event) = unmatched {
            match event.event_type {
                VsockEventType::ConnectionRequest
                    if event.destination.cid == cid
                        && self.listening.contains(&event.destination.port) =>
                {
                    self.requests.push_back(event);
                }
                VsockEventType::ConnectionRequest => {
                    self.refused_requests += 1;
                    let info = ConnectionInfo::new(event.source, event.destination.port);
                    self.sock
                        .force_close(&info)
                        .map_err(|e| format!("refusing a connection: {e}"))?;
                }
                _ => self.stray += 1,
            }
        }
        Ok(true)
    }

    /// Tries to send `data` (at most 64 KiB) as one packet. Without
    /// enough credit it returns `NoCredit`; at most once per
    /// [`CREDIT_ASK_US`] it lets the driver send a CREDIT_REQUEST (the
    /// driver asks whenever a send finds too little credit, which in a
    /// polling loop would flood the device).
    pub fn try_send(&mut self, conn: &mut Conn, data: &[u8]) -> Result<(), SendError> {
        if conn.state != State::Open {
            return Err(SendError::Failed(format!("connection is {:?}", conn.state)));
        }
        debug_assert!(data.len() as u64 <= VSOCK_MAX_WRITE);
        let short = (conn.peer_credit() as usize) < data.len();
        if short {
            let now = tsc::rdtsc();
            if conn
                .credit_asked
                .is_some_and(|t| now.wrapping_sub(t) < tsc::cycles_us(CREDIT_ASK_US))
            {
                return Err(SendError::NoCredit);
            }
            conn.credit_asked = Some(now);
            conn.credit_requests += 1;
        }
        match self.sock.send(data, &mut conn.info) {
            Ok(()) => {
                conn.told = conn.consumed;
                conn.tx_cnt = conn.tx_cnt.wrapping_add(data.len() as u32);
                Ok(())
            }
            Err(VirtioError::SocketDeviceError(SocketError::InsufficientBufferSpaceInPeer)) => {
                // The driver sent a CREDIT_REQUEST headed with our fwd_cnt:
                // the device may now fill the buffer up from there.
                conn.told = conn.consumed;
                Err(SendError::NoCredit)
            }
            Err(e) => Err(SendError::Failed(format!("send: {e}"))),
        }
    }

    /// Sends all of `data`, in packets of at most `chunk` bytes, waiting
    /// for credit as needed (at most `us` without progress). Data that
    /// arrives meanwhile is kept.
    pub fn send_all(
        &mut self,
        conn: &mut Conn,
        data: &[u8],
        chunk: usize,
        us: u64,
    ) -> Result<(), String> {
        let mut at = 0;
        let mut deadline = Deadline::after_us(us);
        while at < data.len() {
            let n = (data.len() - at).min(chunk).min(VSOCK_MAX_WRITE as usize);
            match self.try_send(conn, &data[at..at + n]) {
                Ok(()) => {
                    at += n;
                    deadline = Deadline::after_us(us);
                }
                Err(SendError::NoCredit) => {
                    if !self.poll(&mut [&mut *conn])? {
                        if deadline.passed() {
                            return Err(format!(
                                "no credit for {} ms after {at} of {} bytes",
                                us / 1000,
                                data.len()
                            ));
                        }
                        core::hint::spin_loop();
                    }
                }
                Err(SendError::Failed(e)) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads up to `out.len()` received bytes; tells the device about the
    /// freed space once half the credit has been consumed since it last
    /// heard.
    pub fn read(&mut self, conn: &mut Conn, out: &mut [u8]) -> Result<usize, String> {
        let n = out.len().min(conn.rx.len());
        let (a, b) = conn.rx.as_slices();
        let from_a = n.min(a.len());
        out[..from_a].copy_from_slice(&a[..from_a]);
        out[from_a..n].copy_from_slice(&b[..n - from_a]);
        conn.rx.drain(..n);
        conn.consumed = conn.consumed.wrapping_add(n as u32);
        conn.info.done_forwarding(n);
        if conn.state == State::Open
            && !conn.peer_shutdown
            && conn.consumed.wrapping_sub(conn.told) >= conn.info.buf_alloc / 2
        {
            self.credit_update(conn)?;
        }
        Ok(n)
    }

    /// Bytes sent on `conn` that the device has not yet reported forwarded
    /// (its `fwd_cnt`): for a host socket, not yet written to it.
    pub fn unforwarded(conn: &Conn) -> u32 {
        conn.tx_cnt.wrapping_sub(conn.peer_fwd_cnt)
    }

    /// Sends a CREDIT_REQUEST, at most once per [`CREDIT_ASK_US`].
    /// virtio-drivers sends one only from `send`, when the peer's credit is
    /// short of the packet and no request is pending: so this hands `send`
    /// a one-byte packet on a copy of the connection that has seen a
    /// CREDIT_UPDATE granting nothing (no request pending, no credit). The
    /// driver sends the request, headed with the connection's own
    /// addresses, `buf_alloc` and `fwd_cnt`, and refuses the byte; the copy
    /// is dropped.
    pub fn request_credit(&mut self, conn: &mut Conn) -> Result<(), String> {
        let now = tsc::rdtsc();
        if conn
            .credit_asked
            .is_some_and(|t| now.wrapping_sub(t) < tsc::cycles_us(CREDIT_ASK_US))
        {
            return Ok(());
        }
        // The crate does not export the buffer status type: the update is
        // made from the last packet the peer sent on the connection.
        let Some(mut update) = conn.last_event.clone() else {
            return Err(String::from("no packet from the peer yet"));
        };
        update.buffer_status.buffer_allocation = 0;
        update.buffer_status.forward_count = conn.tx_cnt;
        update.event_type = VsockEventType::CreditUpdate;
        conn.credit_asked = Some(now);
        conn.credit_requests += 1;
        let mut probe = conn.info.clone();
        probe.update_for_event(&update);
        match self.sock.send(&[0], &mut probe) {
            Err(VirtioError::SocketDeviceError(SocketError::InsufficientBufferSpaceInPeer)) => {
                // The request carried our current fwd_cnt (the connection's
                // own): the device may fill the buffer up from there.
                conn.told = conn.consumed;
                Ok(())
            }
            Ok(()) => Err(String::from("the driver sent the credit probe as data")),
            Err(e) => Err(format!("credit request: {e}")),
        }
    }

    /// Waits until the device reports every byte sent on `conn` forwarded
    /// (its `fwd_cnt` in the packets it sends equals the bytes sent),
    /// asking for credit updates meanwhile; `us` without progress ends it
    /// with an error. This is the end of a transfer that the protocol
    /// itself confirms, without relying on the device passing a half-close
    /// on (Firecracker's does not shut down the host socket on a SHUTDOWN
    /// with only the SEND flag).
    pub fn wait_forwarded(&mut self, conn: &mut Conn, us: u64) -> Result<(), String> {
        let mut deadline = Deadline::after_us(us);
        let mut left = Self::unforwarded(conn);
        while left != 0 {
            if matches!(conn.state, State::Reset | State::Closed) {
                return Err(format!(
                    "connection {:?} with {left} bytes not reported forwarded",
                    conn.state
                ));
            }
            if self.poll(&mut [&mut *conn])? {
                let now_left = Self::unforwarded(conn);
                if now_left != left {
                    left = now_left;
                    deadline = Deadline::after_us(us);
                }
                continue;
            }
            if deadline.passed() {
                return Err(format!(
                    "{left} bytes not reported forwarded within {} ms",
                    us / 1000
                ));
            }
            self.request_credit(conn)?;
            core::hint::spin_loop();
        }
        Ok(())
    }

    /// Sends a CREDIT_UPDATE.
    pub fn credit_update(&mut self, conn: &mut Conn) -> Result<(), String> {
        self.sock
            .credit_update(&conn.info)
            .map_err(|e| format!("credit update: {e}"))?;
        conn.told = conn.consumed;
        Ok(())
    }

    /// Reads until the end of the stream (at most `limit` bytes are kept;
    /// `us` without progress ends it with an error).
    pub fn read_to_eof(
        &mut self,
        conn: &mut Conn,
        limit: usize,
        us: u64,
    ) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        let mut buf = alloc::vec![0u8; 4096];
        let mut deadline = Deadline::after_us(us);
        loop {
            let n = self.read(conn, &mut buf)?;
            if n > 0 {
                let keep = n.min(limit.saturating_sub(out.len()));
                out.extend_from_slice(&buf[..keep]);
                deadline = Deadline::after_us(us);
                continue;
            }
            if conn.at_eof() {
                return Ok(out);
            }
            if !self.poll(&mut [&mut *conn])? {
                if deadline.passed() {
                    return Err(format!(
                        "no data and no end of stream within {} ms ({} bytes so far)",
                        us / 1000,
                        out.len()
                    ));
                }
                core::hint::spin_loop();
            }
        }
    }

    /// SHUTDOWN with the SEND flag only: the probe sends no more but still
    /// receives.
    pub fn shutdown_send(&mut self, conn: &mut Conn) -> Result<(), String> {
        self.sock
            .shutdown_with_hints(&conn.info, StreamShutdown::SEND)
            .map_err(|e| format!("shutdown: {e}"))?;
        conn.told = conn.consumed;
        Ok(())
    }

    /// SHUTDOWN with both flags (the device answers RST).
    pub fn shutdown(&mut self, conn: &mut Conn) -> Result<(), String> {
        self.sock
            .shutdown(&conn.info)
            .map_err(|e| format!("shutdown: {e}"))
    }

    /// Resets the connection (RST), unless the peer already did.
    pub fn close(&mut self, conn: &mut Conn) -> Result<(), String> {
        if matches!(conn.state, State::Reset | State::Closed) {
            return Ok(());
        }
        conn.state = State::Closed;
        self.sock
            .force_close(&conn.info)
            .map_err(|e| format!("RST: {e}"))
    }

    /// Accepts connections to guest port `port` from now on.
    pub fn listen(&mut self, port: u32) {
        if !self.listening.contains(&port) {
            self.listening.push(port);
        }
    }

    /// Waits (at most `us`) for a connection request to a listened port and
    /// accepts it with credit `buf_alloc`. `None` when none came.
    pub fn accept(&mut self, us: u64, buf_alloc: u32) -> Result<Option<Conn>, String> {
        let deadline = Deadline::after_us(us);
        loop {
            if let Some(event) = self.requests.pop_front() {
                let mut info = ConnectionInfo::new(event.source, event.destination.port);
                info.buf_alloc = buf_alloc;
                info.update_for_event(&event);
                self.sock
                    .accept(&info)
                    .map_err(|e| format!("sending RESPONSE: {e}"))?;
                let mut conn = Conn::new(info, State::Open);
                conn.last_event = Some(event);
                return Ok(Some(conn));
            }
            if !self.poll(&mut [])? {
                if deadline.passed() {
                    return Ok(None);
                }
                core::hint::spin_loop();
            }
        }
    }
}

impl Drop for Vsock {
    /// Stops the queues (bounded, unlike virtio-drivers), resets the device
    /// and lets the driver go; if a queue still reads ready after the reset
    /// the driver is leaked rather than hang the probe in its own
    /// `queue_unset`.
    fn drop(&mut self) {
        if let Some(base) = self.base {
            if !crate::virtio::quiesce(base, QUEUES, true) {
                return;
            }
        }
        // SAFETY: dropped once, here; `sock` is not used afterwards.
        unsafe { ManuallyDrop::drop(&mut self.sock) };
    }
}
