//! The virtio-net device: configuration space, feature set, and the queue
//! handlers running on the device thread (an event-manager subscriber).
//!
//! TX: every available chain becomes one `writev` to the tap, header
//! included (the tap takes the 12-byte `virtio_net_hdr_v1`).
//!
//! RX: a frame is read from the tap (header included) with one `readv`
//! straight into the guest's receive buffers (zero-copy, as Firecracker and
//! Cloud Hypervisor do): the buffers the device holds (with MRG_RXBUF as
//! many as the largest frame needs, or all the guest offered; without it,
//! one chain), then the queue pair's bounce buffer for what does not fit in
//! them. A frame that fits is completed in place (`num_buffers` set in its
//! header). One that spilled into the bounce buffer is gathered there
//! whole and delivered by copy as before: when the guest has no buffer for
//! it, the frame stays in the bounce buffer, the tap is no longer polled
//! (its EPOLLIN interest is removed) and the stall is counted; the guest's
//! next rx-queue notification resumes delivery. Nothing read from the tap
//! is dropped except frames that can never fit.

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::{error, info, warn};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_ERR, VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_OK,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::counters::{bump, NetCounters};
use super::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO, VNET_HDR_LEN};
use crate::virtio::{
    chain_within, read_config_bytes, ActivateContext, ActivateError, Handoff, Interrupt,
    VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Largest frame, virtio-net header included: a 64 KiB GSO frame plus
/// Ethernet and VLAN headers (the limit QEMU and Firecracker use too).
pub const MAX_FRAME: usize = 65562;
/// Size of the rx and tx queues.
const QUEUE_SIZE: u16 = 256;
/// Size of the control queue.
const CTRL_QUEUE_SIZE: u16 = 64;
/// Most queue pairs.
pub const MAX_QUEUE_PAIRS: usize = 16;
/// Frames read from one tap queue per wake-up, so that one busy interface
/// cannot starve the other devices on the thread (epoll is level-triggered:
/// the rest are read on the next round).
const RX_BATCH: usize = 64;
/// Most descriptors in one rx or tx chain: the queue size (the virtio spec
/// forbids longer chains). A longer one (an indirect table may hold 65,535)
/// is refused as malformed before any of it is collected.
const MAX_CHAIN: usize = QUEUE_SIZE as usize;
/// Size of `struct virtio_net_config` up to `mtu`.
const CONFIG_LEN: usize = 12;
/// Receive checksum info: DATA_VALID in the header's flags.
const HDR_F_DATA_VALID: u8 = 2;

const EV_ACTIVATE: u32 = 0;
/// Queue `i`'s notification: `EV_QUEUE + i`.
const EV_QUEUE: u32 = 1;
/// Tap queue `i`'s readability: `EV_TAP + i`.
const EV_TAP: u32 = 1000;

/// How the device presents itself.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// MTU announced with VIRTIO_NET_F_MTU.
    pub mtu: u16,
}

/// A guest receive buffer (one chain), checked and ready to fill.
struct RxChain {
    head: u16,
    /// Its descriptors' buffers, in order.
    segs: Vec<(GuestAddress, usize)>,
    /// The same bytes as host iovecs (one per guest memory region a
    /// buffer touches), for `readv`.
    iov: IoVecs,
    cap: usize,
}

impl RxChain {
    fn empty() -> Self {
        RxChain {
            head: 0,
            segs: Vec::new(),
            iov: IoVecs(Vec::new()),
            cap: 0,
        }
    }
}

/// Frames from the tap on their way to the guest.
struct RxState {
    buf: Vec<u8>,
    /// Length of the frame waiting in `buf` (0: none).
    pending: usize,
    /// Buffers taken from the avail ring, not yet used.
    chains: VecDeque<RxChain>,
    /// Used chains, kept for their vectors' allocations.
    spare: Vec<RxChain>,
}

/// Host addresses of a chain being transmitted or received into.
struct IoVecs(Vec<libc::iovec>);
// SAFETY: the pointers point into guest memory, mapped for the VM's life
// (or, while a `readv` is set up, into the pair's bounce buffer); only the
// device thread uses them, and only while it holds the chain.
unsafe impl Send for IoVecs {}

struct Pair {
    rxq: Queue,
    txq: Queue,
    rx_evt: EventFd,
    tx_evt: EventFd,
    rx: RxState,
    /// The tap queue's fd is in the event loop.
    tap_watched: bool,
    /// Delivery waits for guest buffers (the tap is not polled meanwhile).
    stalled: bool,
}

/// Index of pair `p`'s receive queue (virtio 1.2, 5.1.2: rx0, tx0, rx1, ...).
fn rx_queue(p: usize) -> u16 {
    (2 * p) as u16
}

/// Index of pair `p`'s transmit queue.
fn tx_queue(p: usize) -> u16 {
    (2 * p + 1) as u16
}

struct Ctrl {
    queue: Queue,
    evt: EventFd,
    index: u32,
}

struct Active {
    mem: GuestMemoryMmap,
    pairs: Vec<Pair>,
    ctrl: Option<Ctrl>,
    interrupt: Arc<Interrupt>,
    mrg_rxbuf: bool,
    guest_csum: bool,
    /// Pairs the driver enabled (VQ_PAIRS_SET; 1 until then).
    active_pairs: usize,
    iov: IoVecs,
}

/// What became of a frame's delivery attempt.
enum Delivery {
    Delivered,
    Dropped,
    NoBuffers,
}

/// A virtio-net device backed by a tap.
pub struct VirtioNet {
    taps: Vec<Tap>,
    /// Which tap queues are attached (multi-queue taps only).
    attached: Vec<bool>,
    config: NetConfig,
    config_space: [u8; CONFIG_LEN],
    avail_features: u64,
    acked_features: u64,
    queue_sizes: Vec<u16>,
    counters: Arc<NetCounters>,
    handoff: Handoff<Active>,
    active: Option<Active>,
    /// The tap failed for good (deleted under us): link reported down.
    tap_dead: bool,
}

impl VirtioNet {
    /// A device on `taps` (one fd per queue pair, see
    /// [`Tap::open`](super::tap::Tap::open)).
    pub fn new(taps: Vec<Tap>, config: NetConfig) -> std::io::Result<Self> {
        let pairs = taps.len();
        if pairs == 0 || pairs > MAX_QUEUE_PAIRS {
            return Err(std::io::Error::new(
                ErrorKind::InvalidInput,
                format!("1 to {MAX_QUEUE_PAIRS} tap queues needed, got {pairs}"),
            ));
        }
        let mut avail_features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_MTU)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_MRG_RXBUF)
            | (1 << VIRTIO_NET_F_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_TSO4)
            | (1 << VIRTIO_NET_F_GUEST_TSO6)
            | (1 << VIRTIO_NET_F_GUEST_ECN)
            | (1 << VIRTIO_NET_F_GUEST_UFO)
            | (1 << VIRTIO_NET_F_HOST_TSO4)
            | (1 << VIRTIO_NET_F_HOST_TSO6)
            | (1 << VIRTIO_NET_F_HOST_ECN)
            | (1 << VIRTIO_NET_F_HOST_UFO);
        let mut queue_sizes = vec![QUEUE_SIZE; 2 * pairs];
        if pairs > 1 {
            avail_features |= (1 << VIRTIO_NET_F_CTRL_VQ) | (1 << VIRTIO_NET_F_MQ);
            queue_sizes.push(CTRL_QUEUE_SIZE);
        }
        let mut dev = VirtioNet {
            attached: vec![true; pairs],
            taps,
            config,
            config_space: [0; CONFIG_LEN],
            avail_features,
            acked_features: 0,
            queue_sizes,
            counters: Arc::new(NetCounters::default()),
            handoff: Handoff::new()?,
            active: None,
            tap_dead: false,
        };
        dev.update_config_space();
        Ok(dev)
    }

    /// This interface's counters.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.config.mac
    }

    fn pairs(&self) -> usize {
        self.taps.len()
    }

    fn acked(&self, bit: u32) -> bool {
        self.acked_features & (1u64 << bit) != 0
    }

    fn update_config_space(&mut self) {
        let c = &mut self.config_space;
        c[0..6].copy_from_slice(&self.config.mac);
        let status = if self.tap_dead {
            0
        } else {
            VIRTIO_NET_S_LINK_UP as u16
        };
        c[6..8].copy_from_slice(&status.to_le_bytes());
        c[8..10].copy_from_slice(&(self.taps.len() as u16).to_le_bytes());
        c[10..12].copy_from_slice(&self.config.mtu.to_le_bytes());
    }

    /// Queue indices in use for the acked features: (rx/tx pairs, ctrl).
    fn layout(&self) -> (usize, Option<usize>) {
        let mq = self.acked(VIRTIO_NET_F_MQ);
        let pairs = if mq { self.pairs() } else { 1 };
        let ctrl = self.acked(VIRTIO_NET_F_CTRL_VQ).then_some(2 * pairs);
        (pairs, ctrl)
    }

    /// TUN_F_* flags matching what the driver accepts (only combinations
    /// the tap takes: segmentation offloads need checksum offload).
    fn tap_offload(&self) -> u32 {
        if !self.acked(VIRTIO_NET_F_GUEST_CSUM) {
            return 0;
        }
        let mut f = TUN_F_CSUM;
        if self.acked(VIRTIO_NET_F_GUEST_TSO4) {
            f |= TUN_F_TSO4;
        }
        if self.acked(VIRTIO_NET_F_GUEST_TSO6) {
            f |= TUN_F_TSO6;
        }
        if self.acked(VIRTIO_NET_F_GUEST_ECN) && f & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
            f |= TUN_F_TSO_ECN;
        }
        if self.acked(VIRTIO_NET_F_GUEST_UFO) {
            f |= TUN_F_UFO;
        }
        f
    }

    fn start(&mut self, ctx: ActivateContext, ops: &mut EventOps) -> Result<(), String> {
        let (npairs, ctrl_idx) = self.layout();
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues: Vec<Option<Queue>> = ctx.queues.into_iter().map(Some).collect();
        let mut evts: Vec<Option<EventFd>> = ctx.queue_evts.into_iter().map(Some).collect();
        let mut take = |i: usize| -> Result<(Queue, EventFd), String> {
            match (
                queues.get_mut(i).and_then(Option::take),
                evts.get_mut(i).and_then(Option::take),
            ) {
                (Some(mut q), Some(e)) => {
                    q.set_event_idx(event_idx);
                    Ok((q, e))
                }
                _ => Err(format!("queue {i} missing")),
            }
        };
        let mut pairs = Vec::with_capacity(npairs);
        for p in 0..npairs {
            let (rxq, rx_evt) = take(2 * p)?;
            let (txq, tx_evt) = take(2 * p + 1)?;
            pairs.push(Pair {
                rxq,
                txq,
                rx_evt,
                tx_evt,
                rx: RxState {
                    buf: vec![0u8; MAX_FRAME + 1],
                    pending: 0,
                    chains: VecDeque::with_capacity(usize::from(QUEUE_SIZE)),
                    spare: Vec::new(),
                },
                tap_watched: false,
                stalled: false,
            });
        }
        let ctrl = match ctrl_idx {
            Some(i) => {
                let (queue, evt) = take(i)?;
                Some(Ctrl {
                    queue,
                    evt,
                    index: i as u32,
                })
            }
            None => None,
        };
        let offload = self.tap_offload();
        if let Err(e) = self.taps[0].set_offload(offload) {
            warn!(
                "virtio-net {}: cannot set tap offloads {offload:#x}: {e}",
                self.taps[0].name()
            );
        }
        let mut a = Active {
            mem: ctx.mem,
            pairs,
            ctrl,
            interrupt: ctx.interrupt,
            mrg_rxbuf: self.acked(VIRTIO_NET_F_MRG_RXBUF),
            guest_csum: self.acked(VIRTIO_NET_F_GUEST_CSUM),
            active_pairs: 1,
            iov: IoVecs(Vec::with_capacity(usize::from(QUEUE_SIZE))),
        };
        for (p, pair) in a.pairs.iter().enumerate() {
            for (q, e) in [(2 * p, &pair.rx_evt), (2 * p + 1, &pair.tx_evt)] {
                ops.add(Events::with_data(e, EV_QUEUE + q as u32, EventSet::IN))
                    .map_err(|e| format!("watch queue {q}: {e:?}"))?;
            }
        }
        if let Some(c) = &a.ctrl {
            ops.add(Events::with_data(&c.evt, EV_QUEUE + c.index, EventSet::IN))
                .map_err(|e| format!("watch control queue: {e:?}"))?;
        }
        // Multi-queue stays off until the driver enables it.
        self.set_attached(1);
        if !self.tap_dead {
            watch_tap(&self.taps, &mut a.pairs[0], 0, ops, true);
        }
        self.active = Some(a);
        Ok(())
    }

    /// Attaches tap queues `0..n` and detaches the others (multi-queue
    /// taps): the kernel then steers frames only to queues being served.
    fn set_attached(&mut self, n: usize) {
        if self.taps.len() < 2 {
            return;
        }
        // Attach first, so that at least one queue stays attached.
        for want in [true, false] {
            for (i, tap) in self.taps.iter().enumerate() {
                if (i < n) == want && self.attached[i] != want {
                    match tap.set_queue_attached(want) {
                        Ok(()) => self.attached[i] = want,
                        Err(e) => warn!(
                            "virtio-net {}: cannot {} tap queue {i}: {e}",
                            tap.name(),
                            if want { "attach" } else { "detach" }
                        ),
                    }
                }
            }
        }
    }

    /// Guest -> tap.
    fn process_tx(&mut self, p: usize, ops: &mut EventOps) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let c = &self.counters;
        // A queue pair the driver did not enable still transmits through
        // an attached tap queue.
        let tap = if p < a.active_pairs {
            &self.taps[p]
        } else {
            &self.taps[0]
        };
        let pair = &mut a.pairs[p];
        let _ = pair.tx_evt.read();
        let mut used = false;
        let mut gone = None;
        loop {
            while let Some(chain) = pair.txq.pop_descriptor_chain(&a.mem) {
                let head = chain.head_index();
                let iov = &mut a.iov.0;
                iov.clear();
                let mut total = 0usize;
                let mut bad = !chain_within(&chain, MAX_CHAIN);
                let chain = chain.take(if bad { 0 } else { MAX_CHAIN });
                for d in chain {
                    if d.is_write_only() {
                        bad = true;
                        break;
                    }
                    if d.len() == 0 {
                        continue;
                    }
                    total += d.len() as usize;
                    if total > MAX_FRAME {
                        break;
                    }
                    match a.mem.get_slice(d.addr(), d.len() as usize) {
                        Ok(s) => iov.push(libc::iovec {
                            iov_base: s.ptr_guard_mut().as_ptr().cast(),
                            iov_len: d.len() as usize,
                        }),
                        Err(_) => {
                            bad = true;
                            break;
                        }
                    }
                }
                if bad || total < VNET_HDR_LEN {
                    bump(&c.invalid_chains, 1);
                } else if total > MAX_FRAME {
                    bump(&c.oversize, 1);
                    bump(&c.tx_dropped, 1);
                } else if self.tap_dead {
                    bump(&c.tx_dropped, 1);
                } else {
                    // SAFETY: the iovecs were just made from guest memory
                    // slices, which stay mapped.
                    match unsafe { tap.writev(iov) } {
                        Ok(_) => {
                            bump(&c.tx_frames, 1);
                            bump(&c.tx_bytes, (total - VNET_HDR_LEN) as u64);
                        }
                        Err(e) => {
                            bump(&c.tx_dropped, 1);
                            bump(&c.tap_errors, 1);
                            if tap_gone(&e) {
                                gone = Some(e);
                            } else if c.tap_errors.load(std::sync::atomic::Ordering::Relaxed) == 1 {
                                warn!(
                                    "virtio-net {}: tap write failed: {e} (counted; further failures only counted)",
                                    tap.name()
                                );
                            }
                        }
                    }
                }
                iov.clear();
                if let Err(e) = pair.txq.add_used(&a.mem, head, 0) {
                    error!("virtio-net: cannot return tx descriptor {head}: {e}");
                }
                used = true;
            }
            match crate::virtio::enable_notification(&mut pair.txq, &a.mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    error!("virtio-net: tx queue error: {e}");
                    break;
                }
            }
        }
        if used && pair.txq.needs_notification(&a.mem).unwrap_or(true) {
            a.interrupt.signal_used_queue(tx_queue(p));
        }
        if let Some(e) = gone {
            self.tap_failed(&e, ops);
        }
    }

    /// Tap -> guest, for queue pair `p`.
    ///
    /// The tap stays out of the event loop while delivery is stalled (no
    /// guest buffers); once buffers arrive the tap is read directly, and it
    /// goes back into the loop only when it runs dry. Under a steady
    /// overload (the guest is the bottleneck) a stall and its resumption
    /// thus cost no epoll_ctl at all.
    fn process_rx(&mut self, p: usize, ops: &mut EventOps) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        if p >= a.active_pairs {
            return;
        }
        let c = &self.counters;
        let tap = &self.taps[p];
        let pair = &mut a.pairs[p];
        let mut used = false;
        let mut budget = RX_BATCH;
        let mut failed = None;
        loop {
            if pair.rx.pending == 0 {
                if self.tap_dead {
                    break;
                }
                // Buffers or not, the waiting frame is in.
                pair.stalled = false;
                if budget == 0 {
                    // More may wait: level-triggered polling brings us back.
                    watch_tap(&self.taps, pair, p, ops, true);
                    break;
                }
                match read_frame(&a.mem, tap, pair, a.mrg_rxbuf, c, &mut used, &mut a.iov.0) {
                    Ok((n, _)) if n > MAX_FRAME => {
                        bump(&c.oversize, 1);
                        bump(&c.rx_dropped, 1);
                        continue;
                    }
                    Ok((n, _)) if n < VNET_HDR_LEN => {
                        bump(&c.rx_dropped, 1);
                        continue;
                    }
                    Ok((n, in_guest)) if n <= in_guest => {
                        // Zero-copy: the frame is in the guest's buffers.
                        budget -= 1;
                        let needed = buffers_for(pair, n, a.mrg_rxbuf);
                        complete(&a.mem, pair, n, needed, false, a.guest_csum, c);
                        used = true;
                        continue;
                    }
                    Ok((n, in_guest)) => {
                        // Spilled: gather the frame in the bounce buffer.
                        gather(&a.mem, pair, in_guest, a.mrg_rxbuf);
                        pair.rx.pending = n;
                        budget -= 1;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        // Dry: wake up for the next frame.
                        watch_tap(&self.taps, pair, p, ops, true);
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            match deliver(&a.mem, pair, a.mrg_rxbuf, a.guest_csum, c, &mut used) {
                Delivery::Delivered | Delivery::Dropped => pair.rx.pending = 0,
                Delivery::NoBuffers => {
                    // Ask for a notification when buffers arrive; if some
                    // arrived meanwhile, go on.
                    match crate::virtio::enable_notification(&mut pair.rxq, &a.mem) {
                        Ok(true) => continue,
                        Ok(false) => {}
                        Err(e) => error!("virtio-net: rx queue error: {e}"),
                    }
                    if !pair.stalled {
                        pair.stalled = true;
                        bump(&c.rx_stalls, 1);
                    }
                    // The rx notification resumes delivery; the tap is not
                    // polled meanwhile.
                    watch_tap(&self.taps, pair, p, ops, false);
                    break;
                }
            }
        }
        if used && pair.rxq.needs_notification(&a.mem).unwrap_or(true) {
            a.interrupt.signal_used_queue(rx_queue(p));
        }
        if let Some(e) = failed {
            bump(&c.tap_errors, 1);
            self.tap_failed(&e, ops);
        }
    }

    /// The rx queue was notified: the guest added buffers.
    fn rx_notified(&mut self, p: usize, ops: &mut EventOps) {
        if let Some(pair) = self.active.as_mut().and_then(|a| a.pairs.get_mut(p)) {
            let _ = pair.rx_evt.read();
        }
        self.process_rx(p, ops);
    }

    /// The tap is unusable for good (deleted, or failing reads): stop
    /// polling it, report the link down, keep serving the queues.
    fn tap_failed(&mut self, e: &std::io::Error, ops: &mut EventOps) {
        if self.tap_dead {
            return;
        }
        error!(
            "virtio-net {}: tap failed ({e}); link reported down, frames from the guest are dropped",
            self.taps[0].name()
        );
        self.tap_dead = true;
        if let Some(a) = self.active.as_mut() {
            for (i, pair) in a.pairs.iter_mut().enumerate() {
                if pair.rx.pending != 0 {
                    bump(&self.counters.rx_dropped, 1);
                    pair.rx.pending = 0;
                }
                watch_tap(&self.taps, pair, i, ops, false);
            }
        }
        self.update_config_space();
        if let Some(a) = &self.active {
            if self.acked(VIRTIO_NET_F_STATUS) {
                a.interrupt.signal_config_change();
            }
        }
    }

    /// Control queue: VQ_PAIRS_SET; everything else is answered ERR.
    fn process_ctrl(&mut self, ops: &mut EventOps) {
        let mq = self.acked(VIRTIO_NET_F_MQ);
        let max = self.pairs();
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let Some(ctrl) = a.ctrl.as_mut() else {
            return;
        };
        let _ = ctrl.evt.read();
        let mut set_pairs = None;
        let mut used = false;
        loop {
            while let Some(chain) = ctrl.queue.pop_descriptor_chain(&a.mem) {
                let head = chain.head_index();
                let mut cmd = [0u8; 8];
                let mut got = 0usize;
                let mut ack = None;
                let mut bad = !chain_within(&chain, usize::from(CTRL_QUEUE_SIZE));
                let chain = chain.take(if bad { 0 } else { usize::from(CTRL_QUEUE_SIZE) });
                for d in chain {
                    if d.is_write_only() {
                        if d.len() >= 1 && a.mem.check_range(d.addr(), 1) {
                            ack = Some(d.addr());
                        } else {
                            bad = true;
                        }
                        continue;
                    }
                    if ack.is_some() {
                        bad = true; // readable after writable
                        continue;
                    }
                    let take = (d.len() as usize).min(cmd.len() - got);
                    if take > 0
                        && a.mem
                            .read_slice(&mut cmd[got..got + take], d.addr())
                            .is_err()
                    {
                        bad = true;
                    }
                    got += take;
                }
                let mut status = VIRTIO_NET_ERR as u8;
                if !bad && got >= 2 {
                    let (class, command) = (u32::from(cmd[0]), u32::from(cmd[1]));
                    if mq
                        && class == VIRTIO_NET_CTRL_MQ
                        && command == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET
                        && got >= 4
                    {
                        let n = usize::from(u16::from_le_bytes([cmd[2], cmd[3]]));
                        if (1..=max).contains(&n) {
                            set_pairs = Some(n);
                            status = VIRTIO_NET_OK as u8;
                        }
                    }
                }
                bump(&self.counters.ctrl_commands, 1);
                let len = match ack {
                    Some(addr) if !bad => {
                        if a.mem.write_obj(status, addr).is_ok() {
                            1
                        } else {
                            0
                        }
                    }
                    _ => {
                        bump(&self.counters.invalid_chains, 1);
                        0
                    }
                };
                if let Err(e) = ctrl.queue.add_used(&a.mem, head, len) {
                    error!("virtio-net: cannot return control descriptor {head}: {e}");
                }
                used = true;
            }
            match crate::virtio::enable_notification(&mut ctrl.queue, &a.mem) {
                Ok(true) => continue,
                _ => break,
            }
        }
        if used && ctrl.queue.needs_notification(&a.mem).unwrap_or(true) {
            a.interrupt.signal_used_queue(ctrl.index as u16);
        }
        if let Some(n) = set_pairs {
            self.set_active_pairs(n, ops);
        }
    }

    fn set_active_pairs(&mut self, n: usize, ops: &mut EventOps) {
        let Some(active_now) = self.active.as_ref().map(|a| a.active_pairs) else {
            return;
        };
        if n == active_now {
            return;
        }
        self.set_attached(n);
        let dead = self.tap_dead;
        let Some(a) = self.active.as_mut() else {
            return;
        };
        a.active_pairs = n;
        for (i, pair) in a.pairs.iter_mut().enumerate() {
            if i < n {
                if !dead && !pair.stalled {
                    watch_tap(&self.taps, pair, i, ops, true);
                }
            } else {
                if pair.rx.pending != 0 {
                    bump(&self.counters.rx_dropped, 1);
                    pair.rx.pending = 0;
                }
                pair.stalled = false;
                watch_tap(&self.taps, pair, i, ops, false);
            }
        }
        info!(
            "virtio-net {}: {n} queue pair{} enabled",
            self.taps[0].name(),
            if n == 1 { "" } else { "s" }
        );
        // Frames may already wait on the newly attached queues.
        for i in active_now..n {
            self.process_rx(i, ops);
        }
    }
}

/// Adds or removes the tap queue's fd to or from the event loop.
fn watch_tap(taps: &[Tap], pair: &mut Pair, p: usize, ops: &mut EventOps, on: bool) {
    if pair.tap_watched == on {
        return;
    }
    let ev = Events::with_data(&taps[p], EV_TAP + p as u32, EventSet::IN);
    let r = if on { ops.add(ev) } else { ops.remove(ev) };
    match r {
        Ok(()) => pair.tap_watched = on,
        Err(e) => error!(
            "virtio-net {}: cannot (un)watch tap queue {p}: {e:?}",
            taps[p].name()
        ),
    }
}

/// Errors meaning the tap is gone (deleted, or this queue detached).
fn tap_gone(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADFD) | Some(libc::EBADF) | Some(libc::ENODEV) | Some(libc::ENXIO)
    )
}

/// Takes the next usable receive buffer off the avail ring; unusable ones
/// (device-readable descriptors, outside guest memory, smaller than the
/// header) go back to the guest unused and are counted.
fn next_rx_chain(
    mem: &GuestMemoryMmap,
    pair: &mut Pair,
    c: &NetCounters,
    used: &mut bool,
) -> Option<RxChain> {
    loop {
        let chain = pair.rxq.pop_descriptor_chain(mem)?;
        let head = chain.head_index();
        let mut ch = pair.rx.spare.pop().unwrap_or_else(RxChain::empty);
        ch.segs.clear();
        ch.iov.0.clear();
        ch.head = head;
        ch.cap = 0;
        let mut bad = !chain_within(&chain, MAX_CHAIN);
        let chain = chain.take(if bad { 0 } else { MAX_CHAIN });
        'descs: for d in chain {
            if !d.is_write_only() {
                bad = true;
                break;
            }
            let len = d.len() as usize;
            if len == 0 {
                continue;
            }
            // One slice per guest memory region the buffer touches; an
            // address outside guest memory fails here.
            for s in mem.get_slices(d.addr(), len) {
                match s {
                    Ok(s) => ch.iov.0.push(libc::iovec {
                        iov_base: s.ptr_guard_mut().as_ptr().cast(),
                        iov_len: s.len(),
                    }),
                    Err(_) => {
                        bad = true;
                        break 'descs;
                    }
                }
            }
            ch.segs.push((d.addr(), len));
            ch.cap += len;
        }
        if bad || ch.cap < VNET_HDR_LEN {
            bump(&c.invalid_chains, 1);
            pair.rx.spare.push(ch);
            if let Err(e) = pair.rxq.add_used(mem, head, 0) {
                error!("virtio-net: cannot return rx descriptor {head}: {e}");
            }
            *used = true;
            continue;
        }
        return Some(ch);
    }
}

/// Most iovecs one `readv` takes (the kernel's UIO_MAXIOV).
const IOV_MAX: usize = 1024;

/// Reads the next frame from the tap straight into the guest's receive
/// buffers, and into the bounce buffer whatever does not fit in them.
///
/// Takes buffers off the avail ring first: with MRG_RXBUF until the held
/// ones can take the largest frame (or the guest has no more), without it
/// one chain. Returns the frame's length and how many of its first bytes
/// the guest's buffers can hold (the frame is entirely in guest memory
/// when its length is at most that).
fn read_frame(
    mem: &GuestMemoryMmap,
    tap: &Tap,
    pair: &mut Pair,
    mrg_rxbuf: bool,
    c: &NetCounters,
    used: &mut bool,
    iov: &mut Vec<libc::iovec>,
) -> std::io::Result<(usize, usize)> {
    let max_chains = usize::from(pair.rxq.size());
    let mut held: usize = pair.rx.chains.iter().map(|ch| ch.cap).sum();
    while (if mrg_rxbuf {
        held < MAX_FRAME
    } else {
        pair.rx.chains.is_empty()
    }) && pair.rx.chains.len() < max_chains
    {
        match next_rx_chain(mem, pair, c, used) {
            Some(ch) => {
                held += ch.cap;
                pair.rx.chains.push_back(ch);
            }
            None => break,
        }
    }
    let limit = pair.rx.buf.len();
    let mut in_guest = 0usize;
    iov.clear();
    let usable = if mrg_rxbuf { pair.rx.chains.len() } else { 1 };
    'chains: for ch in pair.rx.chains.iter().take(usable) {
        for v in &ch.iov.0 {
            if in_guest >= limit || iov.len() >= IOV_MAX - 1 {
                break 'chains;
            }
            let take = v.iov_len.min(limit - in_guest);
            iov.push(libc::iovec {
                iov_base: v.iov_base,
                iov_len: take,
            });
            in_guest += take;
        }
    }
    if in_guest < limit {
        let rest = &mut pair.rx.buf[in_guest..];
        iov.push(libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        });
    }
    // SAFETY: the iovecs cover the held chains' buffers, resolved through
    // vm-memory when the chains were taken (guest memory stays mapped and
    // the device owns those buffers until it returns them), and the rest
    // of the bounce buffer, which nothing else borrows meanwhile.
    let r = unsafe { tap.readv(iov) };
    iov.clear();
    Ok((r?, in_guest))
}

/// How many of the held buffers a frame of `len` bytes (known to fit in
/// them) takes.
fn buffers_for(pair: &Pair, len: usize, mrg_rxbuf: bool) -> usize {
    if !mrg_rxbuf {
        return 1;
    }
    let mut have = 0usize;
    for (i, ch) in pair.rx.chains.iter().enumerate() {
        have += ch.cap;
        if have >= len {
            return i + 1;
        }
    }
    pair.rx.chains.len()
}

/// Copies between `data` and the guest buffers `segs`, from their start;
/// returns how many bytes were copied (at most `data.len()`), or `None`
/// when guest memory refused.
fn copy_segs(
    mem: &GuestMemoryMmap,
    segs: &[(GuestAddress, usize)],
    data: &mut [u8],
    to_guest: bool,
) -> Option<usize> {
    let mut off = 0usize;
    for &(addr, seg_len) in segs {
        if off >= data.len() {
            break;
        }
        let n = seg_len.min(data.len() - off);
        let part = &mut data[off..off + n];
        let r = if to_guest {
            mem.write_slice(part, addr)
        } else {
            mem.read_slice(part, addr)
        };
        r.ok()?;
        off += n;
    }
    Some(off)
}

/// Copies the first `in_guest` bytes of a frame that spilled past the
/// guest's buffers from those buffers into the bounce buffer, so that the
/// whole frame is there.
fn gather(mem: &GuestMemoryMmap, pair: &mut Pair, in_guest: usize, mrg_rxbuf: bool) {
    let usable = if mrg_rxbuf { pair.rx.chains.len() } else { 1 };
    let mut off = 0usize;
    for ch in pair.rx.chains.iter().take(usable) {
        if off >= in_guest {
            break;
        }
        let end = (off + ch.cap).min(in_guest);
        off += copy_segs(mem, &ch.segs, &mut pair.rx.buf[off..end], false).unwrap_or(end - off);
    }
}

/// Sets a frame header's `num_buffers`, and clears DATA_VALID without
/// GUEST_CSUM (frames are then fully checksummed by the host and the flags
/// must be zero).
fn fix_header(hdr: &mut [u8], needed: usize, guest_csum: bool) {
    hdr[10..12].copy_from_slice(&(needed as u16).to_le_bytes());
    if !guest_csum {
        hdr[0] &= !HDR_F_DATA_VALID;
    }
}

/// Returns the first `needed` held buffers to the guest with a `len`-byte
/// frame in them: copied from the bounce buffer when `copy`, already in
/// place otherwise (then only its header is rewritten).
fn complete(
    mem: &GuestMemoryMmap,
    pair: &mut Pair,
    len: usize,
    needed: usize,
    copy: bool,
    guest_csum: bool,
    c: &NetCounters,
) {
    if copy {
        fix_header(&mut pair.rx.buf[..VNET_HDR_LEN], needed, guest_csum);
    } else if let Some(first) = pair.rx.chains.front() {
        // The first buffer holds the whole header (next_rx_chain).
        let mut hdr = [0u8; VNET_HDR_LEN];
        let ok = copy_segs(mem, &first.segs, &mut hdr, false).is_some() && {
            fix_header(&mut hdr, needed, guest_csum);
            copy_segs(mem, &first.segs, &mut hdr, true).is_some()
        };
        if !ok {
            bump(&c.invalid_chains, 1);
        }
    }
    let mut off = 0usize;
    for _ in 0..needed {
        let Some(ch) = pair.rx.chains.pop_front() else {
            break;
        };
        let n = ch.cap.min(len - off);
        if copy && copy_segs(mem, &ch.segs, &mut pair.rx.buf[off..off + n], true).is_none() {
            bump(&c.invalid_chains, 1);
        }
        off += n;
        if let Err(e) = pair.rxq.add_used(mem, ch.head, n as u32) {
            error!("virtio-net: cannot return rx descriptor {}: {e}", ch.head);
        }
        pair.rx.spare.push(ch);
    }
    bump(&c.rx_frames, 1);
    bump(&c.rx_bytes, (len - VNET_HDR_LEN) as u64);
}

/// Places the pending frame in guest buffers.
fn deliver(
    mem: &GuestMemoryMmap,
    pair: &mut Pair,
    mrg_rxbuf: bool,
    guest_csum: bool,
    c: &NetCounters,
    used: &mut bool,
) -> Delivery {
    let len = pair.rx.pending;
    // How many buffers the frame takes.
    let needed = loop {
        let mut have = 0usize;
        let mut fit = None;
        for (i, ch) in pair.rx.chains.iter().enumerate() {
            have += ch.cap;
            if have >= len {
                fit = Some(i + 1);
                break;
            }
            if !mrg_rxbuf {
                break;
            }
        }
        if let Some(n) = fit {
            break n;
        }
        if !pair.rx.chains.is_empty()
            && (!mrg_rxbuf || pair.rx.chains.len() >= usize::from(pair.rxq.size()))
        {
            // The guest's buffers cannot hold this frame: one buffer
            // without MRG_RXBUF, or all the queue's buffers with it.
            bump(&c.rx_dropped, 1);
            bump(&c.oversize, 1);
            return Delivery::Dropped;
        }
        match next_rx_chain(mem, pair, c, used) {
            Some(ch) => pair.rx.chains.push_back(ch),
            None => return Delivery::NoBuffers,
        }
    };
    complete(mem, pair, len, needed, true, guest_csum, c);
    bump(&c.rx_copied, 1);
    *used = true;
    Delivery::Delivered
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
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
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Read-only for a virtio 1.x driver (no CTRL_MAC_ADDR).
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(ActivateError::Backend(
                "driver did not accept VIRTIO_F_VERSION_1".into(),
            ));
        }
        ctx.check_queue_count(self.queue_sizes.len())?;
        let (pairs, ctrl) = self.layout();
        for i in (0..2 * pairs).chain(ctrl) {
            let q = &ctx.queues[i];
            if !q.ready() || !q.is_valid(&ctx.mem) {
                return Err(ActivateError::InvalidQueue(i));
            }
        }
        self.handoff.activate(ctx)
    }

    fn reset(&mut self) -> bool {
        let active = self.active.take();
        if let Some(a) = &active {
            let lost = a.pairs.iter().filter(|p| p.rx.pending != 0).count();
            bump(&self.counters.rx_dropped, lost as u64);
        }
        // The device thread unregisters the retired fds.
        self.handoff.reset(active);
        self.acked_features = 0;
        if !self.tap_dead {
            let _ = self.taps[0].set_offload(0);
        }
        true
    }
}

impl MutEventSubscriber for VirtioNet {
    fn init(&mut self, ops: &mut EventOps) {
        self.handoff.watch(ops, EV_ACTIVATE, "virtio-net");
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let data = events.data();
        match data {
            EV_ACTIVATE => {
                let (mut retired, pending) = self.handoff.take();
                retired.extend(self.active.take());
                for old in retired {
                    for (i, pair) in old.pairs.iter().enumerate() {
                        let _ = ops.remove(Events::with_data(
                            &pair.rx_evt,
                            EV_QUEUE + 2 * i as u32,
                            EventSet::IN,
                        ));
                        let _ = ops.remove(Events::with_data(
                            &pair.tx_evt,
                            EV_QUEUE + 2 * i as u32 + 1,
                            EventSet::IN,
                        ));
                        if pair.tap_watched {
                            let _ = ops.remove(Events::with_data(
                                &self.taps[i],
                                EV_TAP + i as u32,
                                EventSet::IN,
                            ));
                        }
                    }
                    if let Some(c) = &old.ctrl {
                        let _ =
                            ops.remove(Events::with_data(&c.evt, EV_QUEUE + c.index, EventSet::IN));
                    }
                }
                if let Some(ctx) = pending {
                    if let Err(e) = self.start(ctx, ops) {
                        error!("virtio-net: activation failed: {e}");
                    } else {
                        // Work queued before activation finished.
                        let pairs = self.active.as_ref().map_or(0, |a| a.pairs.len());
                        for p in 0..pairs {
                            self.process_tx(p, ops);
                        }
                        self.process_rx(0, ops);
                        self.process_ctrl(ops);
                    }
                }
            }
            d if d >= EV_TAP => {
                let p = (d - EV_TAP) as usize;
                let set = events.event_set();
                self.process_rx(p, ops);
                // EPOLLERR without EPOLLIN: the queue was detached or the
                // tap deleted.
                let still_watched = self
                    .active
                    .as_ref()
                    .and_then(|a| a.pairs.get(p))
                    .is_some_and(|pair| pair.tap_watched);
                if still_watched
                    && set.intersects(EventSet::ERROR | EventSet::HANG_UP)
                    && !set.contains(EventSet::IN)
                {
                    let e = std::io::Error::from_raw_os_error(libc::EBADFD);
                    bump(&self.counters.tap_errors, 1);
                    self.tap_failed(&e, ops);
                }
            }
            d => {
                let q = d - EV_QUEUE;
                let ctrl = self
                    .active
                    .as_ref()
                    .and_then(|a| a.ctrl.as_ref())
                    .map(|c| c.index);
                if Some(q) == ctrl {
                    self.process_ctrl(ops);
                } else if q.is_multiple_of(2) {
                    self.rx_notified((q / 2) as usize, ops);
                } else {
                    self.process_tx((q / 2) as usize, ops);
                }
            }
        }
    }
}

impl std::fmt::Debug for VirtioNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioNet")
            .field("tap", &self.taps[0].name())
            .field("queues", &self.taps.len())
            .field("mac", &super::format_mac(&self.config.mac))
            .field("active", &self.active.is_some())
            .finish()
    }
}
