//! virtio glue for the `virtio-drivers` crate: a [`Hal`] over the probe's
//! identity map and heap, the virtio-mmio devices the VMM announced on the
//! command line (`virtio_mmio.device=<size>@<base>:<irq>`), and
//! [`VirtioDevice`], where a device is (virtio-mmio or virtio-pci), which
//! every driver opens its [`ProbeTransport`] from.

use alloc::alloc::{alloc_zeroed, dealloc, Layout};
use core::ptr::NonNull;

use virtio_drivers::transport::mmio::{MmioTransport, MmioVersion, VirtIOHeader};
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::{
    DeviceStatus, DeviceType, InterruptStatus, SomeTransport, Transport,
};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::arch::phys;
use crate::pci::{PciFunction, PciNotifyRegs};
use crate::println;

/// DMA through the identity map: physical address == pointer, memory from
/// the global allocator, nothing to share or bounce.
pub struct ProbeHal;

fn dma_layout(pages: usize) -> Option<Layout> {
    Layout::from_size_align(pages.checked_mul(PAGE_SIZE)?, PAGE_SIZE).ok()
}

// SAFETY: allocations are zeroed, page-aligned, exclusively owned until
// `dma_dealloc`; addresses are identity-mapped, so a pointer is its
// physical address.
unsafe impl Hal for ProbeHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let layout = dma_layout(pages.max(1)).expect("DMA allocation size overflows");
        // SAFETY: the layout has a non-zero size.
        let ptr =
            NonNull::new(unsafe { alloc_zeroed(layout) }).expect("probe heap exhausted (DMA)");
        (ptr.as_ptr() as PhysAddr, ptr)
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        match dma_layout(pages.max(1)) {
            Some(layout) => {
                // SAFETY: the caller passes what `dma_alloc` returned for
                // the same page count, hence the same layout.
                unsafe { dealloc(vaddr.as_ptr(), layout) };
                0
            }
            None => -1,
        }
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        phys::map(paddr, size as u64).expect("MMIO region outside the identity map");
        NonNull::new(paddr as *mut u8).expect("MMIO region at address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.cast::<u8>().as_ptr() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// One `virtio_mmio.device=` announcement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    /// Size of the register window.
    pub size: u64,
    /// Guest-physical base address.
    pub base: u64,
    /// Interrupt line (GSI).
    pub irq: u32,
}

impl MmioDevice {
    /// Parses Linux's `<size>@<base>:<irq>[:<id>]` (size with an optional
    /// K/M/G suffix; numbers decimal or 0x-hex).
    pub fn parse(value: &str) -> Option<Self> {
        let (size, rest) = value.split_once('@')?;
        let (base, rest) = rest.split_once(':')?;
        let irq = rest.split(':').next()?;
        Some(MmioDevice {
            size: parse_size(size)?,
            base: parse_u64(base)?,
            irq: u32::try_from(parse_u64(irq)?).ok()?,
        })
    }

    /// Opens the transport (see [`ProbeTransport`]). The returned transport borrows the window for
    /// as long as the caller keeps it; only one may exist per device.
    pub fn transport(&self) -> Result<ProbeTransport, alloc::string::String> {
        let size = usize::try_from(self.size)
            .map_err(|_| alloc::string::String::from("size too large"))?;
        phys::map(self.base, self.size).map_err(|e| alloc::format!("{e}"))?;
        let header = NonNull::new(self.base as *mut VirtIOHeader).ok_or("base address 0")?;
        // SAFETY: the window is identity-mapped device MMIO announced by the
        // VMM, aligned (virtio-mmio windows are page-aligned) and not
        // otherwise accessed by the probe.
        unsafe { MmioTransport::new(header, size) }
            .map(|mmio| ProbeTransport {
                inner: SomeTransport::Mmio(mmio),
                extra: 0,
                notify: None,
            })
            .map_err(|e| alloc::format!("{e}"))
    }
}

/// Where a virtio device is. Every driver (virtio-drivers' and the raw
/// ones) talks to it through the [`ProbeTransport`] this opens, so none
/// depends on the transport.
#[derive(Clone, Copy, Debug)]
pub enum VirtioDevice {
    /// A virtio-mmio window announced on the command line.
    Mmio(MmioDevice),
    /// A virtio-pci function on a PCI machine's bus 0.
    Pci(PciFunction),
}

impl VirtioDevice {
    /// Opens a transport on the device; only one may exist at a time.
    pub fn transport(&self) -> Result<ProbeTransport, alloc::string::String> {
        match self {
            VirtioDevice::Mmio(m) => m.transport(),
            VirtioDevice::Pci(p) => p.transport(),
        }
    }

    /// The virtio-mmio window's base (`None` over virtio-pci).
    pub fn mmio_base(&self) -> Option<u64> {
        match self {
            VirtioDevice::Mmio(m) => Some(m.base),
            VirtioDevice::Pci(_) => None,
        }
    }
}

/// The transport every probe driver uses (virtio-mmio, or virtio-pci on a
/// PCI machine), with two changes:
///
/// - It sets the device status one step of the initialization sequence
///   (virtio 1.x, 3.1.1) at a time: ACKNOWLEDGE, then DRIVER, then
///   FEATURES_OK, then DRIVER_OK, each in its own write. virtio-drivers
///   writes ACKNOWLEDGE | DRIVER in one write after the reset
///   (`Transport::begin_init`); a device that enforces the sequence
///   (Firecracker's virtio-mmio transport accepts only 0 -> 1 -> 3 -> 0xb ->
///   0xf) ignores that write and, the device staying in reset, every
///   feature, queue and DRIVER_OK write after it: the device is never
///   activated.
/// - It acks the feature bits set with [`ProbeTransport::ack_also`] on top
///   of those the driver acks, for features the probe drives itself.
/// - Over virtio-pci, it notifies a queue with one write to the address
///   it found for that queue when the queue was set up, as Linux does.
///   virtio-drivers selects the queue and reads its `queue_notify_off`
///   again on every notification: two more exits to the VMM per request,
///   which would make a bench measure the driver rather than the device.
pub struct ProbeTransport {
    inner: SomeTransport<'static>,
    extra: u64,
    notify: Option<NotifyCache>,
}

/// Queues whose notification address [`ProbeTransport`] keeps.
const NOTIFY_CACHED: usize = 16;
/// virtio-pci common configuration: queue_select, queue_notify_off.
const COMMON_QUEUE_SELECT: u64 = 0x16;
const COMMON_QUEUE_NOTIFY_OFF: u64 = 0x1e;

/// Each set-up queue's notification address (virtio-pci).
struct NotifyCache {
    regs: PciNotifyRegs,
    at: [Option<u64>; NOTIFY_CACHED],
}

impl ProbeTransport {
    /// A virtio-pci function's transport; with `regs`, notifications go
    /// straight to each queue's address.
    pub fn pci(pci: PciTransport, regs: Option<PciNotifyRegs>) -> Self {
        ProbeTransport {
            inner: SomeTransport::Pci(pci),
            extra: 0,
            notify: regs.map(|regs| NotifyCache {
                regs,
                at: [None; NOTIFY_CACHED],
            }),
        }
    }

    /// The MMIO transport's version (legacy or modern; `None` over PCI).
    pub fn version(&self) -> Option<MmioVersion> {
        match &self.inner {
            SomeTransport::Mmio(m) => Some(m.version()),
            _ => None,
        }
    }

    /// Whether the device is a virtio 1.x one (virtio-pci here is always
    /// modern), which must keep FEATURES_OK only for features it accepts.
    pub fn is_modern(&self) -> bool {
        match &self.inner {
            SomeTransport::Mmio(m) => m.version() == MmioVersion::Modern,
            _ => true,
        }
    }

    /// The address queue `queue`'s notifications go to (virtio-pci, once
    /// the queue is set up; `None` over virtio-mmio, whose one QueueNotify
    /// register takes the queue index).
    pub fn notify_addr(&self, queue: u16) -> Option<u64> {
        self.notify
            .as_ref()
            .and_then(|c| c.at.get(usize::from(queue)).copied().flatten())
    }

    /// The u64 at `offset` of the device configuration, read as two u32
    /// halves (low first), as virtio-blk's capacity and virtio-vsock's
    /// guest CID are laid out.
    pub fn config_u64(&self, offset: usize) -> Result<u64, alloc::string::String> {
        let half = |at| {
            self.read_config_space::<u32>(at)
                .map_err(|e| alloc::format!("config: {e:?}"))
        };
        Ok(u64::from(half(offset)?) | u64::from(half(offset + 4)?) << 32)
    }

    /// Resets the device and negotiates its features: ACKNOWLEDGE and
    /// DRIVER, acks what it offers of `want`, sets FEATURES_OK and, on a
    /// virtio 1.x device, checks that the device kept it. Returns what
    /// the device offered and what was acked; the queues are the caller's.
    pub fn negotiate(&mut self, want: u64) -> Result<(u64, u64), alloc::string::String> {
        self.set_status(DeviceStatus::empty());
        self.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        let offered = self.read_device_features();
        let acked = offered & want;
        self.write_driver_features(acked);
        self.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK);
        if self.is_modern() && !self.get_status().contains(DeviceStatus::FEATURES_OK) {
            return Err(alloc::format!(
                "device refused features {acked:#x} (FEATURES_OK not kept)"
            ));
        }
        Ok((offered, acked))
    }

    /// Also acks `features` (which must all be offered) when the driver
    /// writes its own.
    pub fn ack_also(&mut self, features: u64) {
        self.extra = features;
    }
}

impl Transport for ProbeTransport {
    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }
    fn read_device_features(&mut self) -> u64 {
        self.inner.read_device_features()
    }
    fn write_driver_features(&mut self, driver_features: u64) {
        self.inner
            .write_driver_features(driver_features | self.extra)
    }
    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.inner.max_queue_size(queue)
    }
    fn notify(&mut self, queue: u16) {
        let cached = self
            .notify
            .as_ref()
            .and_then(|c| c.at.get(usize::from(queue)).copied().flatten());
        match cached {
            Some(addr) => phys::write_u16(addr, queue),
            None => self.inner.notify(queue),
        }
    }
    fn get_status(&self) -> DeviceStatus {
        self.inner.get_status()
    }
    fn set_status(&mut self, status: DeviceStatus) {
        let mut now = self.inner.get_status();
        for step in [
            DeviceStatus::ACKNOWLEDGE,
            DeviceStatus::DRIVER,
            DeviceStatus::FEATURES_OK,
            DeviceStatus::DRIVER_OK,
        ] {
            if status.contains(step) && !now.contains(step) {
                now |= step;
                self.inner.set_status(now);
            }
        }
        // A reset (0), FAILED, or anything the steps did not reach.
        if now != status {
            self.inner.set_status(status);
        }
    }
    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.inner.set_guest_page_size(guest_page_size)
    }
    fn requires_legacy_layout(&self) -> bool {
        self.inner.requires_legacy_layout()
    }
    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.inner
            .queue_set(queue, size, descriptors, driver_area, device_area);
        if let Some(c) = self.notify.as_mut() {
            if let Some(slot) = c.at.get_mut(usize::from(queue)) {
                phys::write_u16(c.regs.common + COMMON_QUEUE_SELECT, queue);
                let off = phys::read_u16(c.regs.common + COMMON_QUEUE_NOTIFY_OFF);
                *slot = Some(c.regs.notify + u64::from(off) * u64::from(c.regs.multiplier));
            }
        }
    }
    fn queue_unset(&mut self, queue: u16) {
        if let Some(slot) = self
            .notify
            .as_mut()
            .and_then(|c| c.at.get_mut(usize::from(queue)))
        {
            *slot = None;
        }
        self.inner.queue_unset(queue)
    }
    fn queue_used(&mut self, queue: u16) -> bool {
        self.inner.queue_used(queue)
    }
    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.inner.ack_interrupt()
    }
    fn read_config_generation(&self) -> u32 {
        self.inner.read_config_generation()
    }
    fn read_config_space<V: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<V> {
        self.inner.read_config_space(offset)
    }
    fn write_config_space<V: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: V,
    ) -> virtio_drivers::Result<()> {
        self.inner.write_config_space(offset, value)
    }
}

fn parse_u64(text: &str) -> Option<u64> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

fn parse_size(text: &str) -> Option<u64> {
    let (digits, shift) = match text.as_bytes().last()? {
        b'k' | b'K' => (&text[..text.len() - 1], 10),
        b'm' | b'M' => (&text[..text.len() - 1], 20),
        b'g' | b'G' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    parse_u64(digits)?.checked_mul(1 << shift)
}

/// Prints one `probe: virtio-mmio ...` line per announced device.
pub fn describe(announcements: &[&str]) {
    for value in announcements {
        match MmioDevice::parse(value) {
            None => println!("probe: virtio-mmio {value}: cannot parse"),
            Some(dev) => match dev.transport() {
                Ok(t) => println!(
                    "probe: virtio-mmio {:#x} irq {}: {:?}, transport {:?}",
                    dev.base,
                    dev.irq,
                    t.device_type(),
                    t.version()
                        .map(|v| alloc::format!("{v:?}"))
                        .unwrap_or_default()
                ),
                Err(e) => println!("probe: virtio-mmio {:#x} irq {}: {e}", dev.base, dev.irq),
            },
        }
    }
}

const REG_VERSION: u64 = 0x04;
const REG_QUEUE_SEL: u64 = 0x30;
const REG_QUEUE_READY: u64 = 0x44;
const REG_STATUS: u64 = 0x70;

/// Quiesces the virtio-mmio device at `base` before a virtio-drivers driver
/// is dropped: with `unset_first`, marks `queues` not ready as the driver
/// would (QueueReady = 0, read back) but with a bounded wait — the driver
/// spins forever on a device that ignores the write; then resets it.
/// Returns false when a queue still reads ready after the reset: the caller
/// must then leak the driver rather than hang the probe in its teardown.
pub fn quiesce(base: u64, queues: u32, unset_first: bool) -> bool {
    let reg = |off: u64| base + off;
    let modern = phys::read_u32(reg(REG_VERSION)) >= 2;
    if modern && unset_first {
        for q in 0..queues {
            phys::write_u32(reg(REG_QUEUE_SEL), q);
            phys::write_u32(reg(REG_QUEUE_READY), 0);
            let mut ready = 0;
            for _ in 0..100 {
                ready = phys::read_u32(reg(REG_QUEUE_READY));
                if ready == 0 {
                    break;
                }
            }
            if ready != 0 {
                println!(
                    "probe: virtio-mmio {base:#x}: queue {q}: QueueReady reads {ready} after the driver wrote 0 (virtio-mmio: reads return the last value written)"
                );
            }
        }
    }
    phys::write_u32(reg(REG_STATUS), 0);
    if modern {
        for q in 0..queues {
            phys::write_u32(reg(REG_QUEUE_SEL), q);
            if phys::read_u32(reg(REG_QUEUE_READY)) != 0 {
                println!(
                    "probe: virtio-mmio {base:#x}: queue {q}: QueueReady still set after a device reset"
                );
                return false;
            }
        }
    }
    true
}
