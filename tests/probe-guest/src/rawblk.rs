//! A virtio-blk driver with a hand-built split virtqueue, for what the
//! `virtio-drivers` crate cannot send: WRITE_ZEROES and DISCARD requests,
//! and deliberately malformed descriptor chains.
//!
//! One queue (or, [`RawBlk::with_queues`], up to [`MAX_QUEUES`] request
//! queues: VIRTIO_BLK_F_MQ) of [`QUEUE_SIZE`] descriptors in the legacy
//! layout (which a modern device accepts as well): descriptor table at the
//! start of a page, the available ring right after it, the used ring on the
//! next page; queue q's two pages follow queue q - 1's. The
//! caller picks which descriptors a chain uses, so that a chain the device
//! never returns cannot collide with the next one. Completions are found by
//! polling the used ring; interrupts stay unused. The registers are reached
//! through [`ProbeTransport`], so the same driver runs over virtio-mmio and
//! virtio-pci (common configuration, notification and device configuration
//! structures, found through the function's capability list).

use alloc::alloc::{alloc_zeroed, dealloc, Layout};
use alloc::format;
use alloc::string::String;
use core::ptr::NonNull;
use core::sync::atomic::{fence, Ordering};

use virtio_drivers::transport::{DeviceStatus, Transport};

use crate::arch::tsc;
use crate::virtio::{ProbeTransport, VirtioDevice};

/// Descriptors in the queue.
pub const QUEUE_SIZE: u16 = 16;
const PAGE: usize = 4096;
/// Most request queues set up.
pub const MAX_QUEUES: usize = 2;
/// Ring pages per queue (descriptors + available ring, used ring), then one
/// page of request headers, status bytes and small buffers
/// ([`RawBlk::buf`]).
const PAGES: usize = 2 * MAX_QUEUES + 1;
const QUEUE_PAGES: usize = 2 * PAGE;
const AVAIL_OFFSET: usize = 16 * QUEUE_SIZE as usize;
const USED_OFFSET: usize = PAGE;
/// Offset of the small-buffer page.
const BUF_OFFSET: usize = MAX_QUEUES * QUEUE_PAGES;
/// Size of the small-buffer page.
pub const BUF_SIZE: usize = PAGE;

/// Descriptor flags.
pub const DESC_NEXT: u16 = 1;
/// The device writes this buffer.
pub const DESC_WRITE: u16 = 2;

/// Request types.
pub const T_IN: u32 = 0;
/// Discard.
pub const T_DISCARD: u32 = 11;
/// Write zeroes.
pub const T_WRITE_ZEROES: u32 = 13;

/// Feature bits.
pub const F_RO: u64 = 1 << 5;
/// Several request queues.
pub const F_MQ: u64 = 1 << 12;
/// FLUSH command.
pub const F_FLUSH: u64 = 1 << 9;
/// DISCARD command.
pub const F_DISCARD: u64 = 1 << 13;
/// WRITE_ZEROES command.
pub const F_WRITE_ZEROES: u64 = 1 << 14;
/// Virtio 1.0 device.
pub const F_VERSION_1: u64 = 1 << 32;

/// Status byte values.
pub const S_OK: u8 = 0;
/// I/O error.
pub const S_IOERR: u8 = 1;
/// Unsupported request.
pub const S_UNSUPP: u8 = 2;

/// One buffer of a descriptor chain.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// How waiting for a chain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// In the used ring, with the length the device says it wrote.
    Done(u32),
    /// Not in the used ring within the time allowed.
    Timeout,
    /// The device set DEVICE_NEEDS_RESET instead of completing it.
    NeedsReset,
}

/// The device with hand-built queues.
pub struct RawBlk {
    transport: ProbeTransport,
    mem: NonNull<u8>,
    /// Queues set up (1..=MAX_QUEUES).
    queues: usize,
    avail_idx: [u16; MAX_QUEUES],
    last_used: [u16; MAX_QUEUES],
    /// Features the device offers.
    pub offered: u64,
    /// Features negotiated.
    pub features: u64,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// No chain is out that the device did not return (false after a wait
    /// ended without the chain): the descriptors can all be reused.
    pub clean: bool,
}

fn layout() -> Layout {
    // A constant, valid layout.
    Layout::from_size_align(PAGES * PAGE, PAGE).unwrap()
}

impl RawBlk {
    /// Resets the device and sets it up with `want` & the offered features
    /// (plus VERSION_1 when offered, as a driver must) and one queue.
    pub fn new(dev: &VirtioDevice, want: u64) -> Result<Self, String> {
        Self::with_queues(dev.transport()?, want, 1)
    }

    /// Resets the device behind `transport` and sets it up with `want` &
    /// the offered features (plus VERSION_1) and `queues` request queues
    /// (at most [`MAX_QUEUES`]; more than one needs [`F_MQ`] in `want`).
    pub fn with_queues(
        transport: ProbeTransport,
        want: u64,
        queues: usize,
    ) -> Result<Self, String> {
        if queues == 0 || queues > MAX_QUEUES {
            return Err(format!(
                "{queues} queues (the raw driver sets up 1 to {MAX_QUEUES})"
            ));
        }
        // SAFETY: a non-zero size.
        let mem = NonNull::new(unsafe { alloc_zeroed(layout()) })
            .ok_or("probe heap exhausted (raw queue)")?;
        let mut raw = RawBlk {
            transport,
            mem,
            queues,
            avail_idx: [0; MAX_QUEUES],
            last_used: [0; MAX_QUEUES],
            offered: 0,
            features: 0,
            capacity: 0,
            clean: true,
        };
        raw.init(want)?;
        Ok(raw)
    }

    /// Resets the device and sets it up again, with fresh rings.
    pub fn init(&mut self, want: u64) -> Result<(), String> {
        let t = &mut self.transport;
        (self.offered, self.features) = t.negotiate(want | F_VERSION_1)?;
        // SAFETY: the device was reset and no longer uses the rings (they
        // are set up below); the small-buffer page is left as it is.
        unsafe { self.mem.as_ptr().write_bytes(0, BUF_OFFSET) };
        self.avail_idx = [0; MAX_QUEUES];
        self.last_used = [0; MAX_QUEUES];
        self.clean = true;
        t.set_guest_page_size(PAGE as u32);
        for q in 0..self.queues {
            let max = t.max_queue_size(q as u16);
            if max < u32::from(QUEUE_SIZE) {
                return Err(format!(
                    "queue {q} holds at most {max} descriptors, want {QUEUE_SIZE}"
                ));
            }
            let base = self.mem.as_ptr() as u64 + (q * QUEUE_PAGES) as u64;
            t.queue_set(
                q as u16,
                u32::from(QUEUE_SIZE),
                base,
                base + AVAIL_OFFSET as u64,
                base + USED_OFFSET as u64,
            );
        }
        t.finish_init();
        self.capacity = t.config_u64(0)?;
        Ok(())
    }

    /// Sets the device up again with the features negotiated before.
    pub fn reinit(&mut self) -> Result<(), String> {
        let want = self.features;
        self.init(want)
    }

    /// Reads a u32 of the device config space.
    pub fn config_u32(&self, offset: usize) -> Option<u32> {
        self.transport.read_config_space(offset).ok()
    }

    /// Guest-physical address of byte `offset` of the small-buffer page.
    pub fn buf(&self, offset: usize) -> u64 {
        assert!(offset < BUF_SIZE);
        self.mem.as_ptr() as u64 + (BUF_OFFSET + offset) as u64
    }

    /// Writes `bytes` into the small-buffer page at `offset`.
    pub fn put(&mut self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= BUF_SIZE);
        for (i, &b) in bytes.iter().enumerate() {
            // SAFETY: inside the small-buffer page (asserted), which the
            // device only touches while a chain pointing at it is out;
            // volatile, as the device may have written it.
            unsafe {
                self.mem
                    .as_ptr()
                    .add(BUF_OFFSET + offset + i)
                    .write_volatile(b)
            };
        }
    }

    /// Reads byte `offset` of the small-buffer page.
    pub fn get(&self, offset: usize) -> u8 {
        assert!(offset < BUF_SIZE);
        // SAFETY: inside the small-buffer page; volatile, the device writes it.
        unsafe { self.mem.as_ptr().add(BUF_OFFSET + offset).read_volatile() }
    }

    /// Writes a 16-byte request header at `offset` of the small-buffer page.
    pub fn put_header(&mut self, offset: usize, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.put(offset, &h);
    }

    /// Puts `segs` in descriptors `first..first + segs.len()`, chained, and
    /// offers the chain to the device. Returns its head.
    pub fn submit(&mut self, first: u16, segs: &[Seg]) -> u16 {
        self.submit_on(0, first, segs)
    }

    /// As [`Self::submit`], on queue `q`.
    pub fn submit_on(&mut self, q: usize, first: u16, segs: &[Seg]) -> u16 {
        assert!(!segs.is_empty() && usize::from(first) + segs.len() <= usize::from(QUEUE_SIZE));
        assert!(q < self.queues);
        let desc = self.mem.as_ptr().wrapping_add(q * QUEUE_PAGES);
        for (i, seg) in segs.iter().enumerate() {
            let index = first + i as u16;
            let mut flags = if seg.write { DESC_WRITE } else { 0 };
            if i + 1 < segs.len() {
                flags |= DESC_NEXT;
            }
            // SAFETY: descriptor `index` < QUEUE_SIZE lies in the first
            // ring page; the device does not own it (no chain using it is
            // out, the caller's contract).
            unsafe {
                let d = desc.add(16 * usize::from(index));
                d.cast::<u64>().write_volatile(seg.addr);
                d.add(8).cast::<u32>().write_volatile(seg.len);
                d.add(12).cast::<u16>().write_volatile(flags);
                d.add(14).cast::<u16>().write_volatile(index + 1);
            }
        }
        let slot = usize::from(self.avail_idx[q] % QUEUE_SIZE);
        // SAFETY: the available ring (flags, idx, ring[QUEUE_SIZE]) follows
        // the descriptor table in the queue's first page.
        unsafe {
            let avail = desc.add(AVAIL_OFFSET);
            avail.add(4 + 2 * slot).cast::<u16>().write_volatile(first);
            fence(Ordering::SeqCst);
            self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
            avail.add(2).cast::<u16>().write_volatile(self.avail_idx[q]);
        }
        fence(Ordering::SeqCst);
        self.transport.notify(q as u16);
        first
    }

    /// Polls the used ring until chain `head` comes back, at most `us`
    /// microseconds (at the highest TSC rate: possibly longer). Other
    /// chains coming back meanwhile are passed over. Every few thousand
    /// polls the device status is read: DEVICE_NEEDS_RESET ends the wait.
    /// Unless the chain came back, [`RawBlk::clean`] turns false.
    pub fn wait(&mut self, head: u16, us: u64) -> Wait {
        self.wait_on(0, head, us)
    }

    /// As [`Self::wait`], on queue `q`'s used ring.
    pub fn wait_on(&mut self, q: usize, head: u16, us: u64) -> Wait {
        let result = self.poll_used(q, head, us);
        if !matches!(result, Wait::Done(_)) {
            self.clean = false;
        }
        result
    }

    fn poll_used(&mut self, q: usize, head: u16, us: u64) -> Wait {
        let start = tsc::rdtsc();
        let limit = tsc::cycles_at_least(us);
        let used = self
            .mem
            .as_ptr()
            .wrapping_add(q * QUEUE_PAGES + USED_OFFSET);
        let mut polls: u32 = 0;
        loop {
            // SAFETY: the used ring (flags, idx, ring of (id u32, len u32))
            // is the queue's second ring page; the device writes it.
            let idx = unsafe { used.add(2).cast::<u16>().read_volatile() };
            while self.last_used[q] != idx {
                fence(Ordering::Acquire);
                let slot = usize::from(self.last_used[q] % QUEUE_SIZE);
                // SAFETY: as above, entry `slot` < QUEUE_SIZE.
                let (id, len) = unsafe {
                    let e = used.add(4 + 8 * slot);
                    (
                        e.cast::<u32>().read_volatile(),
                        e.add(4).cast::<u32>().read_volatile(),
                    )
                };
                self.last_used[q] = self.last_used[q].wrapping_add(1);
                if id == u32::from(head) {
                    return Wait::Done(len);
                }
            }
            polls = polls.wrapping_add(1);
            if polls.is_multiple_of(4096) && self.needs_reset() {
                return Wait::NeedsReset;
            }
            if tsc::rdtsc().wrapping_sub(start) > limit {
                return if self.needs_reset() {
                    Wait::NeedsReset
                } else {
                    Wait::Timeout
                };
            }
            core::hint::spin_loop();
        }
    }

    /// Whether the device status has DEVICE_NEEDS_RESET.
    pub fn needs_reset(&self) -> bool {
        self.transport
            .get_status()
            .contains(DeviceStatus::DEVICE_NEEDS_RESET)
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.transport.get_status().bits()
    }

    /// A well-formed request on descriptors `first..first + 3` (or + 2
    /// without data): header at small-buffer offset `hdr`, the status byte
    /// at `hdr + 16`, `data` in between. Returns the status byte and
    /// used.len, or why there is none.
    pub fn request(
        &mut self,
        first: u16,
        hdr: usize,
        kind: u32,
        sector: u64,
        data: Option<Seg>,
        us: u64,
    ) -> Result<(u8, u32), String> {
        self.request_on(0, first, hdr, kind, sector, data, us)
    }

    /// As [`Self::request`], on queue `q` (its completion looked for in
    /// that queue's used ring only).
    #[allow(clippy::too_many_arguments)]
    pub fn request_on(
        &mut self,
        q: usize,
        first: u16,
        hdr: usize,
        kind: u32,
        sector: u64,
        data: Option<Seg>,
        us: u64,
    ) -> Result<(u8, u32), String> {
        self.put_header(hdr, kind, sector);
        self.put(hdr + 16, &[0xee]);
        let header = Seg {
            addr: self.buf(hdr),
            len: 16,
            write: false,
        };
        let status = Seg {
            addr: self.buf(hdr + 16),
            len: 1,
            write: true,
        };
        let head = match data {
            Some(d) => self.submit_on(q, first, &[header, d, status]),
            None => self.submit_on(q, first, &[header, status]),
        };
        match self.wait_on(q, head, us) {
            Wait::Done(len) => Ok((self.get(hdr + 16), len)),
            Wait::Timeout => Err(format!("no completion within {} ms", us / 1000)),
            Wait::NeedsReset => Err(format!(
                "device set DEVICE_NEEDS_RESET (status {:#x})",
                self.status()
            )),
        }
    }
}

impl Drop for RawBlk {
    fn drop(&mut self) {
        // Reset first: the device lets go of the rings.
        self.transport.set_status(DeviceStatus::empty());
        // SAFETY: allocated in `new` with this layout; the device is reset.
        unsafe { dealloc(self.mem.as_ptr(), layout()) };
    }
}
