//! The vsock device: queues, the connection multiplexer and the device
//! thread's event handling.
//!
//! Work per event is proportional to the connections that have work: the
//! handlers note the connections they touch (`touch`), those that may have
//! data for the guest wait in a ready queue served round-robin, and only
//! touched connections have their epoll interest and close deadline
//! revisited (all of them only when receive buffers run out or return).
//! Guest data goes from the packet straight to the host socket; only what
//! the socket does not take is buffered. No packet allocates.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::{debug, error, warn};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{ByteValued, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{connect_nonblocking, ConnState, Connection, CONN_TX_BUF};
use super::control::{ControlQueue, Pushed};
use super::packet::*;
use super::segments::Segments;
use crate::virtio::{
    chain_within, read_config_bytes, ActivateContext, ActivateError, Handoff, Interrupt,
    VirtioDevice, VIRTIO_F_VERSION_1,
};

/// Virtio device ID of vsock.
const VIRTIO_ID_VSOCK: u32 = 19;
const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue (device to driver).
const RX_QUEUE: u16 = 0;
/// Index of the transmit queue (driver to device).
const TX_QUEUE: u16 = 1;
/// Most descriptors in one chain (the queue size: the virtio spec forbids
/// longer chains); a longer one is dropped before any of it is collected.
const MAX_CHAIN: usize = QUEUE_SIZE as usize;
/// Most connections at once: with 1 MiB of credit each, Keel buffers at
/// most 256 MiB for host sockets that stop reading.
pub const MAX_CONNECTIONS: usize = 256;
/// Largest payload accepted in one packet.
const MAX_PKT: usize = 64 << 10;
/// First host-side port for host-initiated connections.
const HOST_PORT_BASE: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line.
const MAX_LINE: usize = 32;

const EV_ACTIVATE: u32 = 0;
const EV_RXQ: u32 = 1;
const EV_TXQ: u32 = 2;
const EV_EVQ: u32 = 3;
const EV_LISTENER: u32 = 4;
const EV_CLOSE_TIMER: u32 = 5;
/// How long a finished connection (both directions ended) waits for the
/// guest's RST (or full SHUTDOWN) before Keel drops it and resets it.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
const EV_CONN_BASE: u32 = 16;

/// Configuration of the device.
#[derive(Clone, Debug)]
pub struct VsockConfig {
    /// The guest's CID (HostOS: 3).
    pub guest_cid: u64,
    /// Base path of the host's Unix sockets.
    pub uds_path: PathBuf,
    /// Accept host-initiated connections (`CONNECT <port>`).
    pub allow_host_connect: bool,
}

/// Errors of creating the device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The host socket cannot be created.
    #[error("cannot create vsock socket {path}: {source}")]
    Bind {
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Invalid CID.
    #[error("guest CID {0} is reserved (use 3 or above)")]
    BadCid(u64),
    /// The close timer cannot be created.
    #[error("cannot create the vsock close timer: {0}")]
    Timer(std::io::Error),
}

/// Counters of the device.
#[derive(Debug, Default)]
#[allow(missing_docs)]
pub struct VsockCounters {
    pub conns_opened: AtomicU64,
    pub host_conns_opened: AtomicU64,
    pub conns_refused: AtomicU64,
    pub host_connects_refused: AtomicU64,
    pub conns_closed: AtomicU64,
    pub resets_sent: AtomicU64,
    pub resets_received: AtomicU64,
    pub bytes_to_guest: AtomicU64,
    pub bytes_from_guest: AtomicU64,
    pub packets_dropped: AtomicU64,
    pub invalid_packets: AtomicU64,
    pub flow_control_violations: AtomicU64,
    pub connection_limit_hits: AtomicU64,
    pub rx_stalls_no_buffers: AtomicU64,
    pub close_timeouts: AtomicU64,
    /// Control packets of no connection (RSTs) dropped because the control
    /// queue was full (a guest not taking what it is sent).
    pub control_dropped: AtomicU64,
}

impl VsockCounters {
    /// The counters as (name, value) pairs, for the API.
    pub fn pairs(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("conns_opened", self.conns_opened.load(Relaxed)),
            ("host_conns_opened", self.host_conns_opened.load(Relaxed)),
            ("conns_refused", self.conns_refused.load(Relaxed)),
            (
                "host_connects_refused",
                self.host_connects_refused.load(Relaxed),
            ),
            ("conns_closed", self.conns_closed.load(Relaxed)),
            ("resets_sent", self.resets_sent.load(Relaxed)),
            ("resets_received", self.resets_received.load(Relaxed)),
            ("bytes_to_guest", self.bytes_to_guest.load(Relaxed)),
            ("bytes_from_guest", self.bytes_from_guest.load(Relaxed)),
            ("packets_dropped", self.packets_dropped.load(Relaxed)),
            ("invalid_packets", self.invalid_packets.load(Relaxed)),
            (
                "flow_control_violations",
                self.flow_control_violations.load(Relaxed),
            ),
            (
                "connection_limit_hits",
                self.connection_limit_hits.load(Relaxed),
            ),
            (
                "rx_stalls_no_buffers",
                self.rx_stalls_no_buffers.load(Relaxed),
            ),
            ("close_timeouts", self.close_timeouts.load(Relaxed)),
            ("control_dropped", self.control_dropped.load(Relaxed)),
        ]
    }
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}

type Key = (u32, u32); // (local/host port, peer/guest port)

/// The device's monotonic clock: `Instant::now()`, plus, in unit tests,
/// however far the test has moved it on (so that a test of the close
/// timeout neither sleeps nor depends on how fast it runs).
#[derive(Debug, Default)]
struct Clock {
    #[cfg(test)]
    advanced: Duration,
}

impl Clock {
    fn now(&self) -> Instant {
        #[cfg(test)]
        return Instant::now() + self.advanced;
        #[cfg(not(test))]
        Instant::now()
    }
}

struct Active {
    mem: GuestMemoryMmap,
    rxq: Queue,
    txq: Queue,
    evts: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    conns: HashMap<Key, Connection>,
    tokens: HashMap<u32, Key>,
    /// Registered interest per token.
    interest: HashMap<u32, EventSet>,
    /// Connections that may have data for the guest (`Connection::queued`),
    /// in the order they are served; one that turns out to have none is
    /// dropped from it until it is touched again.
    ready: VecDeque<Key>,
    /// Connections touched by the current event (`Connection::dirty`).
    dirty: Vec<Key>,
    /// `rx_blocked` when interests were last brought up to date.
    interest_rx_blocked: bool,
    /// Connections with a close deadline (`Connection::close_by`).
    closing: Vec<Key>,
    next_token: u32,
    control: ControlQueue,
    next_host_port: u32,
    buf: Vec<u8>,
    /// The device-readable buffers of the tx chain being handled.
    tx_segs: Segments,
    /// The device-writable buffers of the rx chain being filled.
    rx_segs: Segments,
    rx_blocked: bool,
    /// The earliest `close_by` the close timer is armed for.
    timer_armed_for: Option<Instant>,
}

/// The virtio-vsock device.
pub struct VirtioVsock {
    cfg: VsockConfig,
    listener: UnixListener,
    avail_features: u64,
    acked_features: u64,
    queue_sizes: [u16; 3],
    counters: Arc<VsockCounters>,
    handoff: Handoff<Active>,
    active: Option<Active>,
    listener_registered: bool,
    /// Fires when a finished connection's grace period ends.
    close_timer: TimerFd,
    close_timeout: Duration,
    clock: Clock,
}

impl VirtioVsock {
    /// Creates the device and its host socket `cfg.uds_path` (a stale
    /// socket file is replaced).
    pub fn new(cfg: VsockConfig) -> Result<Self, VsockError> {
        if cfg.guest_cid < 3 || cfg.guest_cid > u64::from(u32::MAX) {
            return Err(VsockError::BadCid(cfg.guest_cid));
        }
        let shown = cfg.uds_path.display().to_string();
        let err = |source| VsockError::Bind {
            path: shown.clone(),
            source,
        };
        if cfg.uds_path.exists() {
            if UnixStream::connect(&cfg.uds_path).is_ok() {
                return Err(err(std::io::Error::other(
                    "another process serves this socket",
                )));
            }
            std::fs::remove_file(&cfg.uds_path).map_err(err)?;
        }
        let listener = UnixListener::bind(&cfg.uds_path).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        let close_timer = TimerFd::new()
            .map_err(|e| VsockError::Timer(std::io::Error::from_raw_os_error(e.errno())))?;
        // SAFETY: F_SETFL on a timerfd we own; no memory is involved.
        if unsafe { libc::fcntl(close_timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(VsockError::Timer(std::io::Error::last_os_error()));
        }
        Ok(VirtioVsock {
            cfg,
            listener,
            avail_features: VIRTIO_F_VERSION_1,
            acked_features: 0,
            queue_sizes: [QUEUE_SIZE; 3],
            counters: Arc::new(VsockCounters::default()),
            handoff: Handoff::new().map_err(err)?,
            active: None,
            listener_registered: false,
            close_timer,
            close_timeout: CLOSE_TIMEOUT,
            clock: Clock::default(),
        })
    }

    /// The device's counters.
    pub fn counters(&self) -> Arc<VsockCounters> {
        self.counters.clone()
    }

    fn header(&self, c: &Connection, op: u16, len: u32, flags: u32) -> Header {
        header_for(self.cfg.guest_cid, c, op, len, flags)
    }

    fn rst_for(&self, local: u32, peer: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cfg.guest_cid,
            src_port: local,
            dst_port: peer,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Default::default()
        }
    }

    fn start(&mut self, ctx: ActivateContext, ops: &mut EventOps) -> Result<(), String> {
        let mut queues = ctx.queues.into_iter();
        let (Some(rxq), Some(txq), Some(_evq)) = (queues.next(), queues.next(), queues.next())
        else {
            return Err("vsock needs 3 queues".into());
        };
        for (i, e) in ctx.queue_evts.iter().enumerate() {
            ops.add(Events::with_data(e, EV_RXQ + i as u32, EventSet::IN))
                .map_err(|e| format!("watch queue: {e:?}"))?;
        }
        if !self.listener_registered {
            ops.add(Events::with_data(&self.listener, EV_LISTENER, EventSet::IN))
                .map_err(|e| format!("watch socket: {e:?}"))?;
            ops.add(Events::with_data(
                &self.close_timer,
                EV_CLOSE_TIMER,
                EventSet::IN,
            ))
            .map_err(|e| format!("watch close timer: {e:?}"))?;
            self.listener_registered = true;
        }
        self.active = Some(Active {
            mem: ctx.mem,
            rxq,
            txq,
            evts: ctx.queue_evts,
            interrupt: ctx.interrupt,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            interest: HashMap::new(),
            ready: VecDeque::with_capacity(MAX_CONNECTIONS),
            dirty: Vec::with_capacity(MAX_CONNECTIONS),
            interest_rx_blocked: false,
            closing: Vec::new(),
            next_token: EV_CONN_BASE,
            control: ControlQueue::new(),
            next_host_port: HOST_PORT_BASE,
            buf: vec![0u8; MAX_PKT],
            tx_segs: Segments::with_capacity(MAX_CHAIN),
            rx_segs: Segments::with_capacity(MAX_CHAIN),
            rx_blocked: false,
            timer_armed_for: None,
        });
        Ok(())
    }

    /// Guest -> host packets.
    fn process_tx(&mut self, ops: &mut EventOps) {
        let Some(mut a) = self.active.take() else {
            return;
        };
        let mut used_any = false;
        let mem = a.mem.clone();
        loop {
            while let Some(chain) = a.txq.pop_descriptor_chain(&mem) {
                let head = chain.head_index();
                // Where the packet lies, read and sent from guest memory.
                let ok = chain_within(&chain, MAX_CHAIN)
                    && a.tx_segs.gather(&mem, chain, false, MAX_CHAIN);
                if ok {
                    self.handle_tx_packet(&mut a, ops);
                } else {
                    bump(&self.counters.packets_dropped, 1);
                }
                let _ = a.txq.add_used(&a.mem, head, 0);
                used_any = true;
            }
            match crate::virtio::enable_notification(&mut a.txq, &a.mem) {
                Ok(true) => continue,
                _ => break,
            }
        }
        if used_any && a.txq.needs_notification(&a.mem).unwrap_or(true) {
            a.interrupt.signal_used_queue(TX_QUEUE);
        }
        self.active = Some(a);
    }

    fn handle_tx_packet(&mut self, a: &mut Active, ops: &mut EventOps) {
        let c = &self.counters;
        let mut h = Header::default();
        if !a.tx_segs.read_at(&a.mem, 0, h.as_mut_slice()) {
            bump(&c.packets_dropped, 1);
            return;
        }
        let payload_room = a.tx_segs.bytes() - HDR_LEN;
        let (src_cid, dst_cid, len, op, type_) =
            (h.src_cid, h.dst_cid, h.len as usize, h.op, h.type_);
        let (src_port, dst_port) = (h.src_port, h.dst_port);
        // A guest may not pretend to be another CID: drop, never answer.
        if src_cid != self.cfg.guest_cid {
            warn!(
                "vsock: packet from CID {src_cid}, guest is CID {}: dropped",
                self.cfg.guest_cid
            );
            bump(&c.packets_dropped, 1);
            return;
        }
        // The RST below tells the guest that the connection (guest port
        // src_port, host port dst_port) is gone: forget it here too.
        if len > MAX_PKT || len > payload_room {
            bump(&c.packets_dropped, 1);
            self.close(a, (dst_port, src_port), op != OP_RST, ops);
            return;
        }
        if dst_cid != HOST_CID || type_ != TYPE_STREAM {
            bump(&c.invalid_packets, 1);
            self.close(a, (dst_port, src_port), op != OP_RST, ops);
            return;
        }
        let key = (dst_port, src_port);
        if op == OP_REQUEST {
            self.guest_connect(a, key, &h, ops);
            touch(a, key);
            return;
        }
        touch(a, key);
        let Some(conn) = a.conns.get_mut(&key) else {
            if op != OP_RST {
                self.send_rst(a, (dst_port, src_port));
            }
            return;
        };
        conn.peer_buf_alloc = h.buf_alloc;
        conn.peer_fwd_cnt = h.fwd_cnt;
        match op {
            OP_RESPONSE if conn.state == ConnState::Connecting => {
                conn.state = ConnState::Established;
                let line = format!("OK {}\n", conn.local_port);
                if conn.stream.write_all(line.as_bytes()).is_err() {
                    self.close(a, key, true, ops);
                } else {
                    bump(&c.host_conns_opened, 1);
                }
            }
            OP_RW if conn.state == ConnState::Established && !conn.guest_send_shut => {
                if !conn.guest_may_send(len) {
                    warn!("vsock: guest port {src_port} overran its credit: reset");
                    bump(&c.flow_control_violations, 1);
                    self.close(a, key, true, ops);
                    return;
                }
                // Straight from guest memory to the socket; what it does not
                // take is buffered (copied once, through the scratch buffer).
                let sent = if conn.tx_buf.is_empty() {
                    match send_from_guest(&a.mem, &a.tx_segs, HDR_LEN, len, conn) {
                        Ok(n) => n,
                        Err(_) => {
                            bump(&c.bytes_from_guest, len as u64);
                            self.close(a, key, true, ops);
                            return;
                        }
                    }
                } else {
                    0
                };
                // len <= MAX_PKT, the scratch buffer's size (checked above).
                let rest = &mut a.buf[..len - sent];
                if !a.tx_segs.read_at(&a.mem, HDR_LEN + sent, rest) {
                    bump(&c.packets_dropped, 1);
                    return;
                }
                bump(&c.bytes_from_guest, len as u64);
                if !rest.is_empty() && conn.send_to_host(rest).is_err() {
                    self.close(a, key, true, ops);
                } else if conn.credit_update_due() {
                    let h = self.header(conn, OP_CREDIT_UPDATE, 0, 0);
                    conn.last_fwd_cnt_sent = conn.fwd_cnt;
                    a.control.push(h, Some(conn));
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                let h = self.header(conn, OP_CREDIT_UPDATE, 0, 0);
                conn.last_fwd_cnt_sent = conn.fwd_cnt;
                a.control.push(h, Some(conn));
            }
            OP_SHUTDOWN => {
                let flags = h.flags;
                if flags & SHUTDOWN_SEND != 0 {
                    conn.guest_send_shut = true;
                    let _ = conn.flush_to_host();
                    if conn.tx_buf.is_empty() {
                        let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                    }
                }
                if flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) == SHUTDOWN_SEND | SHUTDOWN_RCV {
                    // Full close: finish with RST, as the spec asks.
                    self.close(a, key, true, ops);
                }
            }
            OP_RST => {
                bump(&c.resets_received, 1);
                self.close(a, key, false, ops);
            }
            _ => {
                bump(&c.invalid_packets, 1);
                self.close(a, key, true, ops);
            }
        }
    }

    /// A guest REQUEST to host port `key.0`: connect to `<path>_<port>`.
    fn guest_connect(&mut self, a: &mut Active, key: Key, h: &Header, ops: &mut EventOps) {
        let c = &self.counters;
        if a.conns.contains_key(&key) {
            bump(&c.invalid_packets, 1);
            self.close(a, key, true, ops);
            return;
        }
        if a.conns.len() >= MAX_CONNECTIONS {
            bump(&c.connection_limit_hits, 1);
            self.send_rst(a, key);
            return;
        }
        let path = format!("{}_{}", self.cfg.uds_path.display(), key.0);
        let stream = match connect_nonblocking(std::path::Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                debug!("vsock: cannot connect to {path} ({e}): reset");
                bump(&c.conns_refused, 1);
                self.send_rst(a, key);
                return;
            }
        };
        let mut conn = Connection::new(stream, ConnState::Established, key.0, key.1);
        conn.peer_buf_alloc = h.buf_alloc;
        conn.peer_fwd_cnt = h.fwd_cnt;
        let resp = self.header(&conn, OP_RESPONSE, 0, 0);
        if self.register(a, key, conn, ops) {
            a.control.push(resp, a.conns.get_mut(&key));
            bump(&c.conns_opened, 1);
        } else {
            self.send_rst(a, key);
        }
    }

    fn register(&self, a: &mut Active, key: Key, conn: Connection, ops: &mut EventOps) -> bool {
        let token = a.next_token;
        a.next_token = a.next_token.wrapping_add(1).max(EV_CONN_BASE);
        let set = EventSet::IN | EventSet::READ_HANG_UP;
        if ops
            .add(Events::with_data_raw(conn.stream.as_raw_fd(), token, set))
            .is_err()
        {
            return false;
        }
        a.tokens.insert(token, key);
        a.interest.insert(token, set);
        let mut conn = conn;
        conn.token = token;
        a.conns.insert(key, conn);
        touch(a, key);
        true
    }

    /// Removes a connection; with `rst`, tells the guest.
    fn close(&self, a: &mut Active, key: Key, rst: bool, ops: &mut EventOps) {
        if let Some(conn) = a.conns.remove(&key) {
            // Its keys left in `ready`, `dirty` or `closing` find nothing.
            let token = conn.token;
            if a.tokens.remove(&token).is_some() {
                if let Some(set) = a.interest.remove(&token) {
                    let _ = ops.remove(Events::with_data_raw(conn.stream.as_raw_fd(), token, set));
                }
            }
            bump(&self.counters.conns_closed, 1);
        }
        if rst {
            self.send_rst(a, key);
        }
    }

    /// Queues an RST for `key` (a connection that is not, or no longer,
    /// open); dropped and counted when the control queue is full.
    fn send_rst(&self, a: &mut Active, key: Key) {
        if a.control.push(self.rst_for(key.0, key.1), None) == Pushed::Dropped {
            bump(&self.counters.control_dropped, 1);
        } else {
            bump(&self.counters.resets_sent, 1);
        }
    }

    /// Host -> guest: control packets first, then data from readable
    /// connections the guest has credit for.
    fn process_rx(&mut self) {
        let Some(mut a) = self.active.take() else {
            return;
        };
        let mut used_any = false;
        'fill: loop {
            if a.control.is_empty() {
                // Packets owed while the queue was full, made afresh.
                let cid = self.cfg.guest_cid;
                a.control.resync(a.conns.values_mut(), |c, op, flags| {
                    header_for(cid, c, op, 0, flags)
                });
            }
            queue_ready(&mut a);
            if a.control.is_empty() && a.ready.is_empty() {
                a.rx_blocked = false;
                break;
            }
            let Some(chain) = a.rxq.pop_descriptor_chain(&a.mem) else {
                if !a.rx_blocked {
                    bump(&self.counters.rx_stalls_no_buffers, 1);
                }
                a.rx_blocked = true;
                let _ = a.rxq.enable_notification(&a.mem);
                break;
            };
            let head = chain.head_index();
            if !(chain_within(&chain, MAX_CHAIN)
                && a.rx_segs.gather(&a.mem, chain, true, MAX_CHAIN))
            {
                bump(&self.counters.invalid_packets, 1);
                let _ = a.rxq.add_used(&a.mem, head, 0);
                used_any = true;
                continue;
            }
            if a.rx_segs.bytes() < HDR_LEN {
                let _ = a.rxq.add_used(&a.mem, head, 0);
                used_any = true;
                continue;
            }
            if let Some(h) = a.control.pop() {
                let _ = a.rx_segs.write_at(&a.mem, 0, h.as_slice());
                let _ = a.rxq.add_used(&a.mem, head, HDR_LEN as u32);
                used_any = true;
                continue;
            }
            let room = (a.rx_segs.bytes() - HDR_LEN).min(MAX_PKT);
            if room == 0 {
                // A header-only buffer takes control packets only (there are
                // none now): never read into an empty buffer, which would
                // read 0 bytes and look like the host's EOF. It waits at the
                // head of the queue for the next control packet or a kick.
                a.rxq.go_to_previous_position();
                a.rx_blocked = true;
                let _ = a.rxq.enable_notification(&a.mem);
                break;
            }
            while let Some(key) = a.ready.pop_front() {
                let Some(conn) = a.conns.get_mut(&key) else {
                    continue;
                };
                conn.queued = false;
                if !conn.wants_rx() {
                    continue;
                }
                // Its credit, EOF or readability changes here.
                if !conn.dirty {
                    conn.dirty = true;
                    a.dirty.push(key);
                }
                let want = room.min(conn.peer_credit() as usize);
                // Straight from the socket into the guest's buffer, after
                // the header's place.
                match a.rx_segs.read_from(&a.mem, HDR_LEN, want, &mut conn.stream) {
                    Ok(0) => {
                        conn.host_eof = true;
                        // A host side gone altogether takes no more data.
                        let flags = if conn.host_hup {
                            SHUTDOWN_SEND | SHUTDOWN_RCV
                        } else {
                            SHUTDOWN_SEND
                        };
                        let h = self.header(conn, OP_SHUTDOWN, 0, flags);
                        a.control.push(h, Some(conn));
                    }
                    Ok(n) => {
                        conn.rx_cnt = conn.rx_cnt.wrapping_add(n as u32);
                        conn.last_fwd_cnt_sent = conn.fwd_cnt;
                        let h = self.header(conn, OP_RW, n as u32, 0);
                        let _ = a.rx_segs.write_at(&a.mem, 0, h.as_slice());
                        let _ = a.rxq.add_used(&a.mem, head, (HDR_LEN + n) as u32);
                        bump(&self.counters.bytes_to_guest, n as u64);
                        used_any = true;
                        // Round-robin: back of the queue while it has more.
                        if conn.wants_rx() {
                            conn.queued = true;
                            a.ready.push_back(key);
                        }
                        continue 'fill;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => conn.host_readable = false,
                    Err(_) => {
                        conn.host_eof = true;
                        let h = self.header(conn, OP_SHUTDOWN, 0, SHUTDOWN_RCV | SHUTDOWN_SEND);
                        a.control.push(h, Some(conn));
                    }
                }
            }
            // Nothing sent in this buffer: give it back.
            a.rxq.go_to_previous_position();
        }
        if used_any && a.rxq.needs_notification(&a.mem).unwrap_or(true) {
            a.interrupt.signal_used_queue(RX_QUEUE);
        }
        self.active = Some(a);
    }

    /// A host process connected to the device socket.
    fn accept_host(&mut self, ops: &mut EventOps) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!("vsock: accept: {e}");
                    return;
                }
            };
            let Some(mut a) = self.active.take() else {
                // No guest driver yet: nothing to connect to.
                bump(&self.counters.host_connects_refused, 1);
                continue;
            };
            if !self.cfg.allow_host_connect
                || a.conns.len() >= MAX_CONNECTIONS
                || stream.set_nonblocking(true).is_err()
            {
                warn!("vsock: host-initiated connection refused (allow_host_connect is off or limit reached)");
                bump(&self.counters.host_connects_refused, 1);
                self.active = Some(a);
                continue;
            }
            let port = a.next_host_port;
            a.next_host_port = a.next_host_port.wrapping_add(1).max(HOST_PORT_BASE);
            let conn = Connection::new(stream, ConnState::AwaitConnectLine, port, 0);
            // Keyed by its unique local port until the guest port is known.
            self.register(&mut a, (port, u32::MAX), conn, ops);
            self.active = Some(a);
        }
    }

    /// Reads `CONNECT <port>\n` from a host-initiated connection.
    fn read_connect_line(&mut self, a: &mut Active, key: Key, ops: &mut EventOps) {
        let Some(conn) = a.conns.get_mut(&key) else {
            return;
        };
        let mut b = [0u8; MAX_LINE];
        let n = match conn.stream.read(&mut b) {
            Ok(0) => return self.close(a, key, false, ops),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(_) => return self.close(a, key, false, ops),
        };
        conn.line.extend_from_slice(&b[..n]);
        let Some(end) = conn.line.iter().position(|c| *c == b'\n') else {
            if conn.line.len() > MAX_LINE {
                self.close(a, key, false, ops);
            }
            return;
        };
        let line = String::from_utf8_lossy(&conn.line[..end]).to_string();
        let port = line
            .strip_prefix("CONNECT ")
            .and_then(|p| p.trim().parse::<u32>().ok());
        let Some(port) = port else {
            bump(&self.counters.invalid_packets, 1);
            return self.close(a, key, false, ops);
        };
        // Re-key with the guest port now known.
        let Some(mut conn) = a.conns.remove(&key) else {
            return;
        };
        let token = conn.token;
        conn.peer_port = port;
        conn.state = ConnState::Connecting;
        // Listed under its old key, it would be missed under the new one.
        conn.queued = false;
        conn.dirty = false;
        let new_key = (conn.local_port, port);
        let req = self.header(&conn, OP_REQUEST, 0, 0);
        a.conns.insert(new_key, conn);
        if a.tokens.contains_key(&token) {
            a.tokens.insert(token, new_key);
        }
        touch(a, new_key);
        a.control.push(req, a.conns.get_mut(&new_key));
    }

    /// Drops, with RST, finished connections the guest has not closed
    /// within [`CLOSE_TIMEOUT`] (a guest that never answers the host's
    /// close must not keep its entry, and its share of the connection
    /// limit, forever), and keeps the close timer armed for the next one.
    fn reap(&mut self, ops: &mut EventOps) {
        let Some(mut a) = self.active.take() else {
            return;
        };
        let now = self.clock.now();
        // Only a touched connection can have just finished.
        for i in 0..a.dirty.len() {
            let key = a.dirty[i];
            if let Some(c) = a.conns.get_mut(&key) {
                if c.close_by.is_none() && c.finished() {
                    c.close_by = Some(now + self.close_timeout);
                    a.closing.push(key);
                }
            }
        }
        let mut next: Option<Instant> = None;
        let mut i = 0;
        while i < a.closing.len() {
            let key = a.closing[i];
            match a.conns.get(&key).and_then(|c| c.close_by) {
                Some(t) if t <= now => {
                    a.closing.swap_remove(i);
                    debug!("vsock: guest port {} did not close in time: reset", key.1);
                    bump(&self.counters.close_timeouts, 1);
                    self.close(&mut a, key, true, ops);
                }
                Some(t) => {
                    next = Some(next.map_or(t, |n| n.min(t)));
                    i += 1;
                }
                None => {
                    a.closing.swap_remove(i);
                }
            }
        }
        if next != a.timer_armed_for {
            let r = match next {
                Some(t) => self.close_timer.reset(
                    t.saturating_duration_since(now)
                        .max(Duration::from_millis(1)),
                    None,
                ),
                None => self.close_timer.clear(),
            };
            if let Err(e) = r {
                error!("vsock: close timer: {e}");
            }
            a.timer_armed_for = next;
        }
        let resets = !a.control.is_empty();
        self.active = Some(a);
        if resets {
            self.process_rx();
        }
    }

    /// Keeps each connection's epoll interest in line with what it can do.
    fn update_interest(&mut self, ops: &mut EventOps) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let rx_blocked = a.rx_blocked;
        // Receive buffers ran out or came back: every connection's read
        // interest changes; otherwise only touched connections'.
        let all = rx_blocked != a.interest_rx_blocked;
        a.interest_rx_blocked = rx_blocked;
        let mut dirty = std::mem::take(&mut a.dirty);
        for key in &dirty {
            if let Some(c) = a.conns.get_mut(key) {
                c.dirty = false;
            }
        }
        let keys: &mut dyn Iterator<Item = &Key> = if all {
            &mut a.conns.keys()
        } else {
            &mut dirty.iter()
        };
        for key in keys {
            let Some(c) = a.conns.get(key) else { continue };
            let token = &c.token;
            let mut want = EventSet::READ_HANG_UP;
            let wants_read = match c.state {
                ConnState::AwaitConnectLine => true,
                ConnState::Established => !c.host_eof && c.peer_credit() > 0 && !rx_blocked,
                _ => false,
            };
            if wants_read {
                want |= EventSet::IN;
            }
            if !c.tx_buf.is_empty() {
                want |= EventSet::OUT;
            }
            if a.interest.get(token) != Some(&want)
                && ops
                    .modify(Events::with_data_raw(c.stream.as_raw_fd(), *token, want))
                    .is_ok()
            {
                a.interest.insert(*token, want);
            }
        }
        dirty.clear();
        a.dirty = dirty;
    }

    fn conn_event(&mut self, token: u32, set: EventSet, ops: &mut EventOps) {
        let Some(mut a) = self.active.take() else {
            return;
        };
        let Some(key) = a.tokens.get(&token).copied() else {
            self.active = Some(a);
            return;
        };
        touch(&mut a, key);
        let state = a.conns.get(&key).map(|c| c.state);
        if state == Some(ConnState::AwaitConnectLine) {
            self.read_connect_line(&mut a, key, ops);
        } else if let Some(conn) = a.conns.get_mut(&key) {
            if set.contains(EventSet::OUT) {
                if conn.flush_to_host().is_err() {
                    self.close(&mut a, key, true, ops);
                    self.active = Some(a);
                    return;
                }
                if conn.credit_update_due() {
                    let h = self.header(conn, OP_CREDIT_UPDATE, 0, 0);
                    conn.last_fwd_cnt_sent = conn.fwd_cnt;
                    a.control.push(h, Some(conn));
                }
                if conn.guest_send_shut && conn.tx_buf.is_empty() {
                    let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                }
            }
            if set.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
                conn.host_readable = true;
            }
            if set.contains(EventSet::HANG_UP) {
                conn.host_hup = true;
            }
        }
        self.active = Some(a);
    }
}

/// Writes `len` bytes that start `skip` bytes into the guest buffers `segs`
/// straight from guest memory to `conn`'s host socket; returns how many
/// the socket took.
fn send_from_guest(
    mem: &GuestMemoryMmap,
    segs: &Segments,
    skip: usize,
    len: usize,
    conn: &mut Connection,
) -> std::io::Result<usize> {
    let mut sent = 0usize;
    segs.each_slice(mem, skip, len, |slice| {
        let took = conn.send_guest_slice(slice)?;
        sent += took;
        Ok(took == slice.len())
    })?;
    Ok(sent)
}

/// Notes that the current event touched connection `key`: its epoll
/// interest and close deadline are revisited after the event, and it joins
/// the ready queue if it has data for the guest.
fn touch(a: &mut Active, key: Key) {
    if let Some(c) = a.conns.get_mut(&key) {
        if !c.dirty {
            c.dirty = true;
            a.dirty.push(key);
        }
    }
}

/// Queues the touched connections that have data for the guest (and are
/// not queued yet). A connection becomes ready only through something that
/// touches it: host readability (its event), the guest's credit or its
/// RESPONSE (its packets), its registration.
fn queue_ready(a: &mut Active) {
    for key in &a.dirty {
        if let Some(c) = a.conns.get_mut(key) {
            if !c.queued && c.wants_rx() {
                c.queued = true;
                a.ready.push_back(*key);
            }
        }
    }
}

/// A packet of connection `c` to the guest `guest_cid`.
fn header_for(guest_cid: u64, c: &Connection, op: u16, len: u32, flags: u32) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: guest_cid,
        src_port: c.local_port,
        dst_port: c.peer_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags,
        buf_alloc: CONN_TX_BUF,
        fwd_cnt: c.fwd_cnt,
    }
}

impl VirtioDevice for VirtioVsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cfg.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        ctx.check_queue_count(3)?;
        for (i, q) in ctx.queues.iter().enumerate() {
            if !q.is_valid(&ctx.mem) {
                return Err(ActivateError::InvalidQueue(i));
            }
        }
        self.handoff.activate(ctx)
    }

    fn reset(&mut self) -> bool {
        self.handoff.reset(self.active.take());
        self.acked_features = 0;
        true
    }
}

impl MutEventSubscriber for VirtioVsock {
    fn init(&mut self, ops: &mut EventOps) {
        self.handoff.watch(ops, EV_ACTIVATE, "vsock");
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            EV_ACTIVATE => {
                let (mut retired, pending) = self.handoff.take();
                retired.extend(self.active.take());
                // A reset drops every connection (the transport is gone).
                for mut old in retired {
                    for (i, e) in old.evts.iter().enumerate() {
                        let _ = ops.remove(Events::with_data(e, EV_RXQ + i as u32, EventSet::IN));
                    }
                    for (token, key) in old.tokens.drain() {
                        if let (Some(c), Some(set)) =
                            (old.conns.get(&key), old.interest.get(&token))
                        {
                            let _ = ops.remove(Events::with_data_raw(
                                c.stream.as_raw_fd(),
                                token,
                                *set,
                            ));
                        }
                    }
                    bump(&self.counters.conns_closed, old.conns.len() as u64);
                }
                if let Some(ctx) = pending {
                    if let Err(e) = self.start(ctx, ops) {
                        error!("vsock: activation failed: {e}");
                    }
                }
            }
            EV_RXQ => {
                if let Some(a) = &self.active {
                    let _ = a.evts[0].read();
                }
                if let Some(a) = self.active.as_mut() {
                    a.rx_blocked = false;
                }
                self.process_rx();
            }
            EV_TXQ => {
                if let Some(a) = &self.active {
                    let _ = a.evts[1].read();
                }
                self.process_tx(ops);
                self.process_rx();
            }
            EV_EVQ => {
                if let Some(a) = &self.active {
                    let _ = a.evts[2].read();
                }
            }
            EV_LISTENER => {
                self.accept_host(ops);
                self.process_rx();
            }
            EV_CLOSE_TIMER => {
                // Non-blocking: a timer re-armed since it fired reads EAGAIN.
                let _ = self.close_timer.wait();
            }
            token => {
                self.conn_event(token, events.event_set(), ops);
                self.process_rx();
            }
        }
        self.reap(ops);
        self.update_interest(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::super::control::MAX_CONTROL;
    use super::*;
    use std::sync::Mutex;

    use event_manager::{EventManager, SubscriberOps};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    type Em = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;
    const GUEST_CID: u64 = 3;
    const TXBUF: u64 = 0x40_0000;
    const RXBUF: u64 = 0x80_0000;
    const BATCHBUF: u64 = 0xa0_0000;
    const TABLE: u64 = 0xc0_0000;

    struct Rig {
        mem: GuestMemoryMmap,
        dev: Arc<Mutex<VirtioVsock>>,
        em: Em,
        rx_used: GuestAddress,
        tx_used: GuestAddress,
        tx_avail: GuestAddress,
        tx_desc: GuestAddress,
        rx_avail: GuestAddress,
        rx_desc: GuestAddress,
        evts: Vec<EventFd>,
        tx_posted: u16,
        rx_posted: u16,
        dir: PathBuf,
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn rig(name: &str, allow_host: bool) -> Rig {
        let dir = std::env::temp_dir().join(format!("keel-vsock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 64);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 64);
        let evq = MockSplitQueue::create(&mem, GuestAddress(0x3_0000), 64);
        // The mock lays its used ring over the avail ring's second half:
        // each queue gets its used ring further on (tests wrap the rings).
        let used_of = |m: &MockSplitQueue<GuestMemoryMmap>| m.avail_addr().unchecked_add(0x200);
        let queue_of = |m: &MockSplitQueue<GuestMemoryMmap>| {
            let mut q: Queue = m.create_queue().unwrap();
            let used = used_of(m).0;
            q.set_ready(false);
            q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
            q.set_ready(true);
            q
        };
        let queues = vec![queue_of(&rxq), queue_of(&txq), queue_of(&evq)];
        let evts: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let dev = VirtioVsock::new(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: dir.join("v.sock"),
            allow_host_connect: allow_host,
        })
        .unwrap();
        let dev = Arc::new(Mutex::new(dev));
        let mut em = Em::new().unwrap();
        em.add_subscriber(dev.clone());
        dev.lock()
            .unwrap()
            .activate(ActivateContext {
                mem: mem.clone(),
                queues,
                queue_evts: evts.iter().map(|e| e.try_clone().unwrap()).collect(),
                interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
            })
            .unwrap();
        em.run_with_timeout(10).unwrap();

        Rig {
            rx_used: used_of(&rxq),
            tx_used: used_of(&txq),
            tx_avail: txq.avail_addr(),
            tx_desc: txq.desc_table_addr(),
            rx_avail: rxq.avail_addr(),
            rx_desc: rxq.desc_table_addr(),
            mem,
            dev,
            em,
            evts,
            tx_posted: 0,
            rx_posted: 0,
            dir,
        }
    }

    fn put_desc(mem: &GuestMemoryMmap, table: GuestAddress, i: u16, d: Descriptor) {
        mem.write_obj(
            RawDescriptor::from(d),
            table.unchecked_add(u64::from(i) * 16),
        )
        .unwrap();
    }

    fn publish(mem: &GuestMemoryMmap, avail: GuestAddress, posted: &mut u16, head: u16) {
        mem.write_obj(head, avail.unchecked_add(4 + 2 * u64::from(*posted % 64)))
            .unwrap();
        *posted += 1;
        mem.write_obj(*posted, avail.unchecked_add(2)).unwrap();
    }

    impl Rig {
        /// Guest sends a packet (header + payload) on the tx queue.
        fn send(&mut self, h: Header, payload: &[u8]) {
            let slot = u64::from(self.tx_posted % 32);
            let at = TXBUF + slot * 0x2_0000;
            self.mem.write_obj(h, GuestAddress(at)).unwrap();
            self.mem
                .write_slice(payload, GuestAddress(at + HDR_LEN as u64))
                .unwrap();
            let head = (self.tx_posted % 32) * 2;
            if payload.is_empty() {
                put_desc(
                    &self.mem,
                    self.tx_desc,
                    head,
                    Descriptor::new(at, HDR_LEN as u32, 0, 0),
                );
            } else {
                put_desc(
                    &self.mem,
                    self.tx_desc,
                    head,
                    Descriptor::new(at, HDR_LEN as u32, VRING_DESC_F_NEXT as u16, head + 1),
                );
                put_desc(
                    &self.mem,
                    self.tx_desc,
                    head + 1,
                    Descriptor::new(at + HDR_LEN as u64, payload.len() as u32, 0, 0),
                );
            }
            let mut p = self.tx_posted;
            publish(&self.mem, self.tx_avail, &mut p, head);
            self.tx_posted = p;
            self.evts[1].write(1).unwrap();
            self.spin();
        }

        /// Guest offers `n` receive buffers of 4 KiB + header.
        fn offer_rx(&mut self, n: u16) {
            self.offer_rx_len(n, 0x1000 + HDR_LEN as u32);
        }

        /// Guest offers `n` receive buffers of `len` bytes.
        fn offer_rx_len(&mut self, n: u16, len: u32) {
            for _ in 0..n {
                let i = self.rx_posted % 64;
                let at = RXBUF + u64::from(i) * 0x2000;
                put_desc(
                    &self.mem,
                    self.rx_desc,
                    i,
                    Descriptor::new(at, len, VRING_DESC_F_WRITE as u16, 0),
                );
                let mut p = self.rx_posted;
                publish(&self.mem, self.rx_avail, &mut p, i);
                self.rx_posted = p;
            }
            self.evts[0].write(1).unwrap();
            self.spin();
        }

        /// Moves the device's clock on by `by`, then lets the device
        /// handle an event (a kick of the event queue), as its close timer
        /// would have made it when the time had really passed.
        fn advance_clock(&mut self, by: Duration) {
            self.dev.lock().unwrap().clock.advanced += by;
            self.evts[2].write(1).unwrap();
            self.spin();
        }

        fn spin(&mut self) {
            for _ in 0..5 {
                self.em.run_with_timeout(5).unwrap();
                self.check_ready_set();
            }
        }

        /// After every event: each connection with data for the guest is
        /// in the ready queue (never missed), once, and nothing is left
        /// marked as touched.
        fn check_ready_set(&self) {
            let dev = self.dev.lock().unwrap();
            let Some(a) = dev.active.as_ref() else { return };
            assert!(a.dirty.is_empty(), "touched list cleared after the event");
            for (key, c) in &a.conns {
                assert!(!c.dirty, "{key:?} still marked touched");
                let times = a.ready.iter().filter(|k| *k == key).count();
                assert_eq!(times, usize::from(c.queued), "{key:?} queued once");
                if c.wants_rx() {
                    assert!(c.queued, "{key:?} has data for the guest but is not queued");
                }
            }
        }

        /// Packets the device has put in the rx queue so far.
        fn received(&self) -> Vec<(Header, Vec<u8>)> {
            let n: u16 = self.mem.read_obj(self.rx_used.unchecked_add(2)).unwrap();
            (0..n).map(|k| self.used_packet(k)).collect()
        }

        /// The packet in used rx entry `k`.
        fn used_packet(&self, k: u16) -> (Header, Vec<u8>) {
            let e = self.rx_used.unchecked_add(4 + 8 * u64::from(k % 64));
            let id: u32 = self.mem.read_obj(e).unwrap();
            let len: u32 = self.mem.read_obj(e.unchecked_add(4)).unwrap();
            let at = RXBUF + u64::from(id) * 0x2000;
            let h: Header = self.mem.read_obj(GuestAddress(at)).unwrap();
            let mut data = vec![0u8; len as usize - HDR_LEN];
            self.mem
                .read_slice(&mut data, GuestAddress(at + HDR_LEN as u64))
                .unwrap();
            (h, data)
        }

        /// Guest sends header-only packets `hs`, many per notification.
        fn send_batch(&mut self, hs: &[Header]) {
            for chunk in hs.chunks(32) {
                for h in chunk {
                    let i = self.tx_posted % 64;
                    let at = BATCHBUF + u64::from(i) * 64;
                    self.mem.write_obj(*h, GuestAddress(at)).unwrap();
                    put_desc(
                        &self.mem,
                        self.tx_desc,
                        i,
                        Descriptor::new(at, HDR_LEN as u32, 0, 0),
                    );
                    let mut p = self.tx_posted;
                    publish(&self.mem, self.tx_avail, &mut p, i);
                    self.tx_posted = p;
                }
                self.evts[1].write(1).unwrap();
                self.spin();
                assert_eq!(self.tx_used(), self.tx_posted, "the batch was taken");
            }
        }

        /// Guest offers receive buffers until the device has nothing more
        /// for it; returns what it got (after what `received` saw before).
        fn drain_rx(&mut self, seen: &mut u16) -> Vec<(Header, Vec<u8>)> {
            let mut got = Vec::new();
            loop {
                let used: u16 = self.mem.read_obj(self.rx_used.unchecked_add(2)).unwrap();
                let outstanding = self.rx_posted.wrapping_sub(used);
                self.offer_rx(32u16.min(64 - outstanding));
                let used: u16 = self.mem.read_obj(self.rx_used.unchecked_add(2)).unwrap();
                if used == *seen {
                    return got;
                }
                while *seen != used {
                    got.push(self.used_packet(*seen));
                    *seen = seen.wrapping_add(1);
                }
            }
        }

        fn tx_used(&self) -> u16 {
            self.mem.read_obj(self.tx_used.unchecked_add(2)).unwrap()
        }

        fn counters(&self) -> Arc<VsockCounters> {
            self.dev.lock().unwrap().counters()
        }
    }

    fn pkt(op: u16, src_port: u32, dst_port: u32, len: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 1 << 20,
            fwd_cnt: 0,
        }
    }

    #[test]
    fn guest_connects_sends_and_receives_then_resets() {
        let mut r = rig("flow", false);
        let listener = UnixListener::bind(r.dir.join("v.sock_19090")).unwrap();
        r.offer_rx(8);
        r.send(pkt(OP_REQUEST, 1234, 19090, 0), &[]);
        let (mut host, _) = listener.accept().unwrap();
        let got = r.received();
        assert_eq!({ got[0].0.op }, OP_RESPONSE);
        assert_eq!({ got[0].0.dst_port }, 1234);
        r.send(pkt(OP_RW, 1234, 19090, 5), b"hello");
        let mut b = [0u8; 5];
        host.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hello");
        host.write_all(b"world").unwrap();
        r.spin();
        let got = r.received();
        let rw = got
            .iter()
            .find(|(h, _)| h.op == OP_RW)
            .expect("data to the guest");
        assert_eq!(rw.1, b"world");
        r.send(pkt(OP_RST, 1234, 19090, 0), &[]);
        let c = r.counters();
        assert_eq!(c.conns_opened.load(Relaxed), 1);
        assert_eq!(c.conns_closed.load(Relaxed), 1);
        assert_eq!(c.bytes_from_guest.load(Relaxed), 5);
        assert_eq!(c.bytes_to_guest.load(Relaxed), 5);
        assert_eq!(r.tx_used(), 3);
    }

    #[test]
    fn nobody_listening_means_reset_and_bad_packets_are_counted() {
        let mut r = rig("bad", false);
        r.offer_rx(8);
        r.send(pkt(OP_REQUEST, 1, 5555, 0), &[]);
        assert_eq!(
            { r.received()[0].0.op },
            OP_RST,
            "no listener on v.sock_5555"
        );
        // Spoofed source CID: dropped without an answer.
        let mut spoof = pkt(OP_REQUEST, 1, 5555, 0);
        spoof.src_cid = 7;
        r.send(spoof, &[]);
        // Data on an unknown connection, unknown op, bad type: reset.
        r.send(pkt(OP_RW, 9, 9, 3), b"abc");
        let mut bad_type = pkt(OP_REQUEST, 2, 5555, 0);
        bad_type.type_ = 2;
        r.send(bad_type, &[]);
        // Length larger than the descriptors carry: dropped.
        r.send(pkt(OP_RW, 9, 9, 4096), b"x");
        let c = r.counters();
        assert_eq!(c.conns_refused.load(Relaxed), 1);
        assert_eq!(c.packets_dropped.load(Relaxed), 2);
        assert_eq!(c.invalid_packets.load(Relaxed), 1);
        assert!(r.received().iter().filter(|(h, _)| h.op == OP_RST).count() >= 3);
        assert_eq!(r.tx_used(), 5, "every packet returned to the guest");
    }

    #[test]
    fn a_finished_connection_the_guest_never_closes_is_reset_after_the_timeout() {
        let mut r = rig("linger", false);
        // Far longer than the test could take: only the test's clock ends it.
        const GRACE: Duration = Duration::from_secs(3600);
        r.dev.lock().unwrap().close_timeout = GRACE;
        let listener = UnixListener::bind(r.dir.join("v.sock_19090")).unwrap();
        r.offer_rx(8);
        r.send(pkt(OP_REQUEST, 1234, 19090, 0), &[]);
        let (mut host, _) = listener.accept().unwrap();
        r.send(pkt(OP_RW, 1234, 19090, 3), b"req");
        let mut shut = pkt(OP_SHUTDOWN, 1234, 19090, 0);
        shut.flags = SHUTDOWN_SEND;
        r.send(shut, &[]);
        // The guest's half-close reaches the host as EOF.
        let mut req = Vec::new();
        host.read_to_end(&mut req).unwrap();
        assert_eq!(req, b"req");
        host.write_all(b"reply").unwrap();
        drop(host);
        r.spin();
        let got = r.received();
        assert!(got.iter().any(|(h, d)| { h.op } == OP_RW && d == b"reply"));
        let (sh, _) = got
            .iter()
            .find(|(h, _)| { h.op } == OP_SHUTDOWN)
            .expect("the host's close passed on");
        assert_eq!({ sh.flags } & SHUTDOWN_SEND, SHUTDOWN_SEND);
        assert!(!got.iter().any(|(h, _)| { h.op } == OP_RST), "not yet");
        let c = r.counters();
        assert_eq!(
            c.conns_closed.load(Relaxed),
            0,
            "the guest gets its grace period"
        );
        // Half the grace period later: still there.
        r.advance_clock(GRACE / 2);
        assert!(!r.received().iter().any(|(h, _)| { h.op } == OP_RST));
        assert_eq!(c.close_timeouts.load(Relaxed), 0);
        assert_eq!(c.conns_closed.load(Relaxed), 0);
        // The guest never answers: at the end of the grace period the
        // entry goes, with a reset.
        r.advance_clock(GRACE / 2);
        let got = r.received();
        assert!(got
            .iter()
            .any(|(h, _)| { h.op } == OP_RST && { h.dst_port } == 1234));
        assert_eq!(c.close_timeouts.load(Relaxed), 1);
        assert_eq!(c.conns_closed.load(Relaxed), 1);
        assert!(r
            .dev
            .lock()
            .unwrap()
            .active
            .as_ref()
            .unwrap()
            .conns
            .is_empty());
    }

    #[test]
    fn host_initiated_connections_are_refused_unless_allowed() {
        let mut r = rig("refuse", false);
        r.offer_rx(4);
        let mut s = UnixStream::connect(r.dir.join("v.sock")).unwrap();
        s.write_all(b"CONNECT 52\n").unwrap();
        r.spin();
        // The device has closed the connection by now: end of stream, or a
        // reset if our line was left unread. A timeout is a failure.
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 16];
        match s.read(&mut b) {
            Ok(n) => assert_eq!(n, 0, "closed without OK: {:?}", &b[..n]),
            Err(e) => assert_eq!(
                e.kind(),
                ErrorKind::ConnectionReset,
                "closed without OK: {e}"
            ),
        }
        assert!(r.received().iter().all(|(h, _)| h.op != OP_REQUEST));
        assert_eq!(r.counters().host_connects_refused.load(Relaxed), 1);

        let mut r = rig("allow", true);
        r.offer_rx(4);
        let mut s = UnixStream::connect(r.dir.join("v.sock")).unwrap();
        s.write_all(b"CONNECT 52\n").unwrap();
        r.spin();
        let req = r
            .received()
            .into_iter()
            .find(|(h, _)| h.op == OP_REQUEST)
            .expect("REQUEST to the guest");
        assert_eq!({ req.0.dst_port }, 52);
        let host_port = req.0.src_port;
        assert!(host_port >= HOST_PORT_BASE);
        r.send(pkt(OP_RESPONSE, 52, host_port, 0), &[]);
        let mut line = [0u8; 32];
        let n = s.read(&mut line).unwrap();
        assert_eq!(
            std::str::from_utf8(&line[..n]).unwrap(),
            format!("OK {host_port}\n")
        );
    }

    #[test]
    fn guest_data_goes_straight_to_the_socket_and_a_full_socket_loses_nothing() {
        let mut r = rig("direct", false);
        let listener = UnixListener::bind(r.dir.join("v.sock_8")).unwrap();
        r.offer_rx(16);
        r.send(pkt(OP_REQUEST, 2, 8, 0), &[]);
        let (mut host, _) = listener.accept().unwrap();
        let tx_buf_cap = |r: &Rig| {
            let dev = r.dev.lock().unwrap();
            dev.active.as_ref().unwrap().conns[&(8, 2)]
                .tx_buf
                .capacity()
        };
        // A host that keeps up: nothing is ever copied into the buffer.
        let mut got = [0u8; 1000];
        for i in 0..20u8 {
            r.send(pkt(OP_RW, 2, 8, 1000), &[i; 1000]);
            host.read_exact(&mut got).unwrap();
            assert!(got.iter().all(|x| *x == i), "packet {i}");
        }
        assert_eq!(tx_buf_cap(&r), 0, "no packet went through the buffer");
        // A host that stops reading: the socket fills part-way through a
        // packet, the rest is buffered, and every byte arrives in order.
        let chunks = 12usize;
        for i in 0..chunks {
            let data: Vec<u8> = (0..64 << 10).map(|j| (i * 7 + j / 4096) as u8).collect();
            r.send(pkt(OP_RW, 2, 8, data.len() as u32), &data);
        }
        assert!(tx_buf_cap(&r) > 0, "the socket filled up");
        let mut all = vec![0u8; chunks << 16];
        host.set_nonblocking(true).unwrap();
        let (mut read, mut idle_rounds) = (0, 0);
        while read < all.len() {
            match host.read(&mut all[read..]) {
                Ok(n) => read += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    idle_rounds += 1;
                    assert!(idle_rounds < 500, "{read} of {} bytes arrived", all.len());
                    r.spin();
                }
                Err(e) => panic!("{e}"),
            }
        }
        for (k, b) in all.iter().enumerate() {
            let (i, j) = (k >> 16, k & 0xffff);
            assert_eq!(*b, (i * 7 + j / 4096) as u8, "byte {k}");
        }
        let c = r.counters();
        assert_eq!(
            c.bytes_from_guest.load(Relaxed),
            20_000 + (chunks << 16) as u64
        );
        assert_eq!(c.flow_control_violations.load(Relaxed), 0);
    }

    #[test]
    fn overrunning_the_credit_resets_the_connection() {
        let mut r = rig("credit", false);
        let listener = UnixListener::bind(r.dir.join("v.sock_7")).unwrap();
        r.offer_rx(16);
        r.send(pkt(OP_REQUEST, 1, 7, 0), &[]);
        let (_host, _) = listener.accept().unwrap(); // never reads
        let chunk = vec![1u8; 64 << 10];
        for _ in 0..((CONN_TX_BUF as usize) / chunk.len() + 16) {
            r.send(pkt(OP_RW, 1, 7, chunk.len() as u32), &chunk);
        }
        let c = r.counters();
        assert_eq!(c.flow_control_violations.load(Relaxed), 1);
        assert!(r.received().iter().any(|(h, _)| h.op == OP_RST));
    }

    #[test]
    fn a_guest_flooding_without_rx_buffers_cannot_grow_the_control_queue() {
        let mut r = rig("flood", false);
        let listener = UnixListener::bind(r.dir.join("v.sock_77")).unwrap();
        // Three times the queue's bound of packets that each earn an RST
        // (unknown connections), no receive buffer posted.
        let flood: Vec<Header> = (0..3 * MAX_CONTROL as u32)
            .map(|i| {
                let op = [OP_REQUEST, OP_CREDIT_REQUEST, OP_RW, OP_SHUTDOWN][i as usize % 4];
                pkt(op, 10_000 + i, 20_000 + i, 0)
            })
            .collect();
        r.send_batch(&flood);
        // A real connection now: its RESPONSE and credit updates are owed.
        r.send(pkt(OP_REQUEST, 5, 77, 0), &[]);
        let (mut host, _) = listener.accept().unwrap();
        r.send_batch(&vec![pkt(OP_CREDIT_REQUEST, 5, 77, 0); 500]);
        {
            let dev = r.dev.lock().unwrap();
            let a = dev.active.as_ref().unwrap();
            assert!(a.control.len() <= MAX_CONTROL, "{}", a.control.len());
        }
        assert_eq!(r.tx_used(), r.tx_posted, "every packet was taken");
        let c = r.counters();
        assert_eq!(c.control_dropped.load(Relaxed), 2 * MAX_CONTROL as u64);
        assert_eq!(c.resets_sent.load(Relaxed), MAX_CONTROL as u64);
        // The guest posts buffers: the queued RSTs, then what the
        // connection is owed, made afresh, in order.
        let mut seen = 0;
        let got = r.drain_rx(&mut seen);
        let rsts = got.iter().filter(|(h, _)| h.op == OP_RST).count();
        assert_eq!(rsts, MAX_CONTROL);
        let ours: Vec<u16> = got
            .iter()
            .filter(|(h, _)| h.dst_port == 5)
            .map(|(h, _)| h.op)
            .collect();
        assert_eq!(ours, [OP_RESPONSE, OP_CREDIT_UPDATE]);
        // The connection works.
        r.send(pkt(OP_RW, 5, 77, 4), b"ping");
        let mut b = [0u8; 4];
        host.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
        host.write_all(b"pong").unwrap();
        r.spin();
        let got = r.drain_rx(&mut seen);
        assert!(got.iter().any(|(h, d)| h.op == OP_RW && d == b"pong"));
    }

    #[test]
    fn a_header_only_rx_buffer_is_never_read_into_and_never_means_eof() {
        let mut r = rig("hdronly", false);
        let listener = UnixListener::bind(r.dir.join("v.sock_78")).unwrap();
        r.offer_rx(1);
        r.send(pkt(OP_REQUEST, 6, 78, 0), &[]);
        let (mut host, _) = listener.accept().unwrap();
        host.write_all(b"data").unwrap();
        r.spin();
        // A buffer with room for the header only.
        r.offer_rx_len(1, HDR_LEN as u32);
        {
            let dev = r.dev.lock().unwrap();
            let conn = &dev.active.as_ref().unwrap().conns[&(78, 6)];
            assert!(!conn.host_eof, "an empty read was taken for EOF");
        }
        assert!(r.received().iter().all(|(h, _)| h.op != OP_SHUTDOWN));
        // It takes the next control packet; a full buffer takes the data.
        r.send(pkt(OP_CREDIT_REQUEST, 6, 78, 0), &[]);
        r.offer_rx(1);
        let ops: Vec<u16> = r.received().iter().map(|(h, _)| h.op).collect();
        assert_eq!(ops, [OP_RESPONSE, OP_CREDIT_UPDATE, OP_RW]);
        assert_eq!(r.received()[2].1, b"data");
    }

    #[test]
    fn an_overlong_indirect_tx_chain_is_dropped_without_being_collected() {
        use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;
        let mut r = rig("longchain", false);
        r.offer_rx(4);
        // An indirect table of 4,000 descriptors, the first a REQUEST.
        const LONG: u16 = 4000;
        r.mem
            .write_obj(pkt(OP_REQUEST, 7, 9999, 0), GuestAddress(BATCHBUF))
            .unwrap();
        for i in 0..LONG {
            let d = if i == 0 {
                Descriptor::new(BATCHBUF, HDR_LEN as u32, VRING_DESC_F_NEXT as u16, 1)
            } else if i == LONG - 1 {
                Descriptor::new(BATCHBUF + 0x100, 1, 0, 0)
            } else {
                Descriptor::new(BATCHBUF + 0x100, 1, VRING_DESC_F_NEXT as u16, i + 1)
            };
            put_desc(&r.mem, GuestAddress(TABLE), i, d);
        }
        put_desc(
            &r.mem,
            r.tx_desc,
            0,
            Descriptor::new(TABLE, u32::from(LONG) * 16, VRING_DESC_F_INDIRECT as u16, 0),
        );
        let mut p = r.tx_posted;
        publish(&r.mem, r.tx_avail, &mut p, 0);
        r.tx_posted = p;
        r.evts[1].write(1).unwrap();
        r.spin();
        assert_eq!(r.tx_used(), 1, "returned to the guest");
        assert!(r.received().is_empty(), "not read as a packet");
        assert_eq!(r.counters().packets_dropped.load(Relaxed), 1);
        // The queue keeps working.
        r.send(pkt(OP_REQUEST, 8, 9999, 0), &[]);
        assert_eq!({ r.received()[0].0.op }, OP_RST);
    }
}
