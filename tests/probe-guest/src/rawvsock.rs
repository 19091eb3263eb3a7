//! A virtio-vsock driver with hand-built split virtqueues, for packets the
//! `virtio-drivers` crate never sends: a wrong source CID, unknown ops,
//! data on connections that do not exist, headers whose length does not
//! match their buffers.
//!
//! Three queues (rx, tx, event) of [`QUEUE_SIZE`] descriptors in the
//! legacy layout (descriptor table and available ring on one page, the used
//! ring on the next), as in `rawblk`. The receive queue holds [`RX_BUFS`]
//! buffers of [`RX_BUF_SIZE`] bytes, offered again as soon as a packet in
//! them has been read (a flood starts without them: [`RawVsock::new_without_rx`],
//! then [`RawVsock::post_rx`]); the event queue gets none (the device has
//! nothing to say there). Completions are found by polling; interrupts stay
//! off. As `rawblk`, over virtio-mmio or virtio-pci alike ([`ProbeTransport`]).

use alloc::alloc::{alloc_zeroed, dealloc, Layout};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::ptr::NonNull;
use core::sync::atomic::{fence, Ordering};

use virtio_drivers::transport::{DeviceStatus, Transport};

use crate::arch::tsc;
use crate::rawblk::{Wait, DESC_NEXT, DESC_WRITE, F_VERSION_1};
use crate::virtio::{ProbeTransport, VirtioDevice};

/// Descriptors per queue.
pub const QUEUE_SIZE: u16 = 16;
const PAGE: usize = 4096;
const AVAIL_OFFSET: usize = 16 * QUEUE_SIZE as usize;
/// Queue q's rings: pages 2q (descriptors, available ring) and 2q + 1
/// (used ring).
const QUEUES: usize = 3;
/// Transmit buffers page, then the receive buffers page.
const TX_PAGE: usize = 2 * QUEUES;
const RX_PAGE: usize = TX_PAGE + 1;
const PAGES: usize = RX_PAGE + 1;
/// Receive buffers.
pub const RX_BUFS: u16 = 8;
/// Bytes per receive buffer.
pub const RX_BUF_SIZE: usize = PAGE / RX_BUFS as usize;
/// Size of the transmit buffer page.
pub const TX_SIZE: usize = PAGE;

/// Queue indexes.
const RXQ: u16 = 0;
const TXQ: u16 = 1;

/// Header length.
pub const HDR_LEN: usize = 44;
/// Ops.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Reset.
pub const OP_RST: u16 = 3;
/// Half or full close.
pub const OP_SHUTDOWN: u16 = 4;
/// Data.
pub const OP_RW: u16 = 5;
/// Asks for a credit update.
pub const OP_CREDIT_REQUEST: u16 = 7;
/// SHUTDOWN flag: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;
/// Stream sockets.
pub const TYPE_STREAM: u16 = 1;
/// The host's CID.
pub const HOST_CID: u64 = 2;

/// `struct virtio_vsock_hdr`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hdr {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Flags.
    pub flags: u32,
    /// Sender's receive buffer.
    pub buf_alloc: u32,
    /// Sender's consumed count.
    pub fwd_cnt: u32,
}

impl Hdr {
    /// Little-endian wire form.
    pub fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Parses the wire form.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or_default());
        let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().unwrap_or_default());
        Hdr {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

/// A packet the device put in the receive queue: its header, used.len and
/// payload.
#[derive(Clone, Debug)]
pub struct Received {
    /// The header.
    pub hdr: Hdr,
    /// What the device said it wrote.
    pub used_len: u32,
    /// The payload: `hdr.len` bytes, at most what the buffer holds and the
    /// device said it wrote.
    pub payload: Vec<u8>,
}

/// The device with hand-built queues.
pub struct RawVsock {
    transport: ProbeTransport,
    mem: NonNull<u8>,
    avail_idx: [u16; QUEUES],
    last_used: [u16; QUEUES],
    /// The guest CID from the config space.
    pub cid: u64,
    /// No transmit chain is out that the device did not return.
    pub clean: bool,
}

fn layout() -> Layout {
    // A constant, valid layout.
    Layout::from_size_align(PAGES * PAGE, PAGE).unwrap()
}

impl RawVsock {
    /// Resets the device and sets it up with fresh queues.
    pub fn new(dev: &VirtioDevice) -> Result<Self, String> {
        Self::open(dev, true)
    }

    /// As [`RawVsock::new`], but no receive buffer is offered until
    /// [`RawVsock::post_rx`].
    pub fn new_without_rx(dev: &VirtioDevice) -> Result<Self, String> {
        Self::open(dev, false)
    }

    fn open(dev: &VirtioDevice, rx: bool) -> Result<Self, String> {
        let transport = dev.transport()?;
        // SAFETY: a non-zero size.
        let mem = NonNull::new(unsafe { alloc_zeroed(layout()) })
            .ok_or("probe heap exhausted (raw vsock queues)")?;
        let mut raw = RawVsock {
            transport,
            mem,
            avail_idx: [0; QUEUES],
            last_used: [0; QUEUES],
            cid: 0,
            clean: true,
        };
        raw.setup(rx)?;
        Ok(raw)
    }

    fn page(&self, p: usize) -> *mut u8 {
        self.mem.as_ptr().wrapping_add(p * PAGE)
    }

    /// Resets the device and sets it up again: VERSION_1 if offered, the
    /// three queues, the receive buffers.
    pub fn init(&mut self) -> Result<(), String> {
        self.setup(true)
    }

    fn setup(&mut self, rx: bool) -> Result<(), String> {
        let t = &mut self.transport;
        t.negotiate(F_VERSION_1)?;
        // SAFETY: the device was reset and no longer uses the rings (they
        // are set up below).
        unsafe { self.mem.as_ptr().write_bytes(0, TX_PAGE * PAGE) };
        self.avail_idx = [0; QUEUES];
        self.last_used = [0; QUEUES];
        self.clean = true;
        t.set_guest_page_size(PAGE as u32);
        for q in 0..QUEUES as u16 {
            let max = t.max_queue_size(q);
            if max < u32::from(QUEUE_SIZE) {
                return Err(format!(
                    "queue {q} holds at most {max} descriptors, want {QUEUE_SIZE}"
                ));
            }
            let desc = self.mem.as_ptr() as u64 + (2 * q as usize * PAGE) as u64;
            t.queue_set(
                q,
                u32::from(QUEUE_SIZE),
                desc,
                desc + AVAIL_OFFSET as u64,
                desc + PAGE as u64,
            );
        }
        self.cid = t.config_u64(0)?;
        self.transport.finish_init();
        if rx {
            self.post_rx();
        }
        Ok(())
    }

    /// Offers the receive buffers (descriptor i is buffer i) and notifies.
    /// Once per setup: they are offered again as they are read.
    pub fn post_rx(&mut self) {
        for i in 0..RX_BUFS {
            let addr = self.page(RX_PAGE) as u64 + u64::from(i) * RX_BUF_SIZE as u64;
            self.write_desc(RXQ, i, addr, RX_BUF_SIZE as u32, DESC_WRITE, 0);
            self.offer(RXQ, i);
        }
        self.transport.notify(RXQ);
    }

    fn write_desc(&mut self, q: u16, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        assert!(index < QUEUE_SIZE);
        // SAFETY: descriptor `index` of queue q's table, in its ring page;
        // the device does not own it (no chain using it is out).
        unsafe {
            let d = self.page(2 * usize::from(q)).add(16 * usize::from(index));
            d.cast::<u64>().write_volatile(addr);
            d.add(8).cast::<u32>().write_volatile(len);
            d.add(12).cast::<u16>().write_volatile(flags);
            d.add(14).cast::<u16>().write_volatile(next);
        }
    }

    /// Puts chain `head` in queue q's available ring (no notification).
    fn offer(&mut self, q: u16, head: u16) {
        let qi = usize::from(q);
        let slot = usize::from(self.avail_idx[qi] % QUEUE_SIZE);
        // SAFETY: the available ring (flags, idx, ring[QUEUE_SIZE]) follows
        // the descriptor table in the queue's first page.
        unsafe {
            let avail = self.page(2 * qi).add(AVAIL_OFFSET);
            avail.add(4 + 2 * slot).cast::<u16>().write_volatile(head);
            fence(Ordering::SeqCst);
            self.avail_idx[qi] = self.avail_idx[qi].wrapping_add(1);
            avail
                .add(2)
                .cast::<u16>()
                .write_volatile(self.avail_idx[qi]);
        }
        fence(Ordering::SeqCst);
    }

    /// The next used entry of queue q, if any: (id, len).
    fn pop_used(&mut self, q: u16) -> Option<(u32, u32)> {
        let qi = usize::from(q);
        let used = self.page(2 * qi + 1);
        // SAFETY: the used ring (flags, idx, ring of (id u32, len u32)) is
        // the queue's second page; the device writes it.
        let idx = unsafe { used.add(2).cast::<u16>().read_volatile() };
        if idx == self.last_used[qi] {
            return None;
        }
        fence(Ordering::Acquire);
        let slot = usize::from(self.last_used[qi] % QUEUE_SIZE);
        // SAFETY: as above, entry `slot` < QUEUE_SIZE.
        let entry = unsafe {
            let e = used.add(4 + 8 * slot);
            (
                e.cast::<u32>().read_volatile(),
                e.add(4).cast::<u32>().read_volatile(),
            )
        };
        self.last_used[qi] = self.last_used[qi].wrapping_add(1);
        Some(entry)
    }

    /// Guest-physical address of byte `offset` of the transmit page.
    pub fn tx_addr(&self, offset: usize) -> u64 {
        assert!(offset < TX_SIZE);
        self.page(TX_PAGE) as u64 + offset as u64
    }

    /// Writes `bytes` into the transmit page at `offset`.
    pub fn put_tx(&mut self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= TX_SIZE);
        for (i, &b) in bytes.iter().enumerate() {
            // SAFETY: inside the transmit page (asserted); the device only
            // reads it while a chain is out, and none is when this is called.
            unsafe { self.page(TX_PAGE).add(offset + i).write_volatile(b) };
        }
    }

    /// Offers `len` bytes at `offset` of the transmit page as a chain of
    /// one descriptor, `head`, on the transmit queue, without notifying
    /// (see [`RawVsock::kick_tx`]). `head` must not be out with the device.
    pub fn offer_tx(&mut self, head: u16, offset: usize, len: u32) {
        assert!(offset + len as usize <= TX_SIZE);
        let addr = self.tx_addr(offset);
        self.write_desc(TXQ, head, addr, len, 0, 0);
        self.offer(TXQ, head);
    }

    /// Notifies the device of the transmit chains offered.
    pub fn kick_tx(&mut self) {
        self.transport.notify(TXQ);
    }

    /// The head of the next transmit chain the device returned, if any.
    pub fn tx_done(&mut self) -> Option<u16> {
        self.pop_used(TXQ).map(|(id, _)| id as u16)
    }

    /// Offers `segs` (address, length; device-readable) as one chain on
    /// the transmit queue, from descriptor 0, and waits at most `us` for
    /// the device to return it. Unless it came back, `clean` turns false.
    pub fn send(&mut self, segs: &[(u64, u32)], us: u64) -> Wait {
        assert!(!segs.is_empty() && segs.len() <= usize::from(QUEUE_SIZE));
        for (i, &(addr, len)) in segs.iter().enumerate() {
            let last = i + 1 == segs.len();
            let i = i as u16;
            self.write_desc(TXQ, i, addr, len, if last { 0 } else { DESC_NEXT }, i + 1);
        }
        self.offer(TXQ, 0);
        self.transport.notify(TXQ);
        let start = tsc::rdtsc();
        let limit = tsc::cycles_at_least(us);
        loop {
            if let Some((id, len)) = self.pop_used(TXQ) {
                if id == 0 {
                    return Wait::Done(len);
                }
                continue;
            }
            if tsc::rdtsc().wrapping_sub(start) > limit {
                self.clean = false;
                return if self.needs_reset() {
                    Wait::NeedsReset
                } else {
                    Wait::Timeout
                };
            }
            core::hint::spin_loop();
        }
    }

    /// Collects the packets the device puts in the receive queue for `us`
    /// microseconds, or until `stop` returns true for one. Each buffer is
    /// offered again once read.
    pub fn receive(&mut self, us: u64, mut stop: impl FnMut(&Hdr) -> bool) -> Vec<Received> {
        let mut got = Vec::new();
        self.receive_each(us, |r| {
            let done = stop(&r.hdr);
            got.push(r);
            done
        });
        got
    }

    /// Hands each packet the device puts in the receive queue to `f`, for
    /// `us` microseconds or until `f` returns true. Each buffer is offered
    /// again once read. Returns whether `f` stopped it.
    pub fn receive_each(&mut self, us: u64, mut f: impl FnMut(Received) -> bool) -> bool {
        let start = tsc::rdtsc();
        let limit = tsc::cycles_at_least(us);
        while tsc::rdtsc().wrapping_sub(start) <= limit {
            let Some((id, len)) = self.pop_used(RXQ) else {
                core::hint::spin_loop();
                continue;
            };
            let id = (id as u16) % RX_BUFS;
            let byte = |k: usize| {
                // SAFETY: inside receive buffer `id` (k < RX_BUF_SIZE), which
                // the device has returned; volatile, the device wrote it.
                unsafe {
                    self.page(RX_PAGE)
                        .add(usize::from(id) * RX_BUF_SIZE + k)
                        .read_volatile()
                }
            };
            let mut b = [0u8; HDR_LEN];
            for (k, x) in b.iter_mut().enumerate() {
                *x = byte(k);
            }
            let hdr = Hdr::from_bytes(&b);
            let end = (len as usize)
                .min(RX_BUF_SIZE)
                .min(HDR_LEN.saturating_add(hdr.len as usize));
            let payload = (HDR_LEN..end.max(HDR_LEN)).map(byte).collect();
            self.offer(RXQ, id);
            self.transport.notify(RXQ);
            if f(Received {
                hdr,
                used_len: len,
                payload,
            }) {
                return true;
            }
        }
        false
    }

    /// Whether the device status has DEVICE_NEEDS_RESET.
    pub fn needs_reset(&self) -> bool {
        self.transport
            .get_status()
            .contains(DeviceStatus::DEVICE_NEEDS_RESET)
    }
}

impl Drop for RawVsock {
    fn drop(&mut self) {
        // Reset first: the device lets go of the rings.
        self.transport.set_status(DeviceStatus::empty());
        // SAFETY: allocated in `new` with this layout; the device is reset.
        unsafe { dealloc(self.mem.as_ptr(), layout()) };
    }
}
