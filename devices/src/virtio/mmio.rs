//! The virtio-mmio transport (virtio 1.x "modern" register layout, version 2).
//!
//! Feature negotiation, device status and reset follow the virtio spec:
//! features are only accepted while FEATURES_OK is not yet set, FEATURES_OK
//! stays clear if the driver accepted features the device never offered,
//! queue registers are only writable before DRIVER_OK, and writing 0 to
//! STATUS resets the device.

use std::sync::{Arc, Mutex};

use log::{error, warn};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateContext, Interrupt, VirtioDevice};
use crate::bus::BusDevice;

/// "virt" in little endian.
const MMIO_MAGIC: u32 = 0x7472_6976;
/// Modern (virtio 1.x) virtio-mmio.
const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the guest ("KEEL" is not registered; 0 is fine).
const VENDOR_ID: u32 = 0;
/// Size of one device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of the queue notification register, for ioeventfds.
pub const NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;

/// A virtio device behind virtio-mmio registers.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
    /// The status before a reset the device has not finished yet (0: none):
    /// what STATUS reads until it has.
    resetting: u32,
}

impl MmioTransport {
    /// A transport for `device`, raising `interrupt`; `queue_evts` are the
    /// per-queue notification eventfds (registered as ioeventfds by the VMM
    /// at this window's [`NOTIFY_OFFSET`], with the queue index as datamatch).
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<Interrupt>,
        queue_evts: Vec<EventFd>,
    ) -> Self {
        // A size a device declares that virtio-queue refuses (not a power
        // of two) leaves that queue out; activation then fails cleanly.
        let queues = lock(&device)
            .queue_max_sizes()
            .iter()
            .filter_map(|&max| Queue::new(max).ok())
            .collect();
        MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            queue_evts,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            resetting: 0,
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn queues_writable(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0
    }

    fn reset(&mut self) {
        if self.activated {
            let mut dev = lock(&self.device);
            if !dev.reset() {
                // The device cannot be reset: tell the driver it needs a reset
                // it will never get, rather than pretend.
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                return;
            }
            if dev.reset_pending() {
                self.resetting = self.status.max(1);
            }
        }
        self.activated = false;
        self.status = 0;
        self.driver_features = 0;
        self.driver_features_sel = 0;
        self.device_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.clear();
        for q in &mut self.queues {
            q.reset();
        }
    }

    /// STATUS: the old status while the device still completes a reset.
    fn read_status(&mut self) -> u32 {
        if self.resetting != 0 {
            if lock(&self.device).reset_pending() {
                return self.resetting;
            }
            self.resetting = 0;
        }
        self.status
    }

    fn set_status(&mut self, value: u32) {
        // A driver that does not wait for the reset to finish goes on.
        self.resetting = 0;
        if value == 0 {
            self.reset();
            return;
        }
        let new_bits = value & !self.status;
        // Bits may only be added, in the spec's order.
        if value & self.status != self.status {
            warn!(
                "virtio-mmio: driver cleared status bits without a reset ({:#x} -> {value:#x})",
                self.status
            );
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        if new_bits & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = lock(&self.device).avail_features();
            if self.driver_features & !offered != 0 || self.status & VIRTIO_CONFIG_S_DRIVER == 0 {
                // Leave FEATURES_OK clear: the driver must notice and give
                // up; going on to DRIVER_OK regardless fails the device.
                self.status = value & !(VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
                if value & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
                    self.status |= VIRTIO_CONFIG_S_FAILED;
                }
                return;
            }
            lock(&self.device).set_acked_features(self.driver_features);
        }
        if new_bits & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if value & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                self.status |= VIRTIO_CONFIG_S_FAILED;
                return;
            }
            self.status = value;
            self.activate();
            return;
        }
        if value & VIRTIO_CONFIG_S_ACKNOWLEDGE == 0 && value != 0 {
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        self.status = value;
    }

    fn activate(&mut self) {
        let mut evts = Vec::with_capacity(self.queue_evts.len());
        for e in &self.queue_evts {
            match e.try_clone() {
                Ok(e) => evts.push(e),
                Err(err) => {
                    error!("virtio-mmio: cannot clone queue eventfd: {err}");
                    self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                    return;
                }
            }
        }
        let queues: Result<Vec<Queue>, _> = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect();
        let Ok(queues) = queues else {
            warn!("virtio-mmio: driver configured an invalid queue");
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            return;
        };
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            queue_evts: evts,
            interrupt: self.interrupt.clone(),
        };
        match lock(&self.device).activate(ctx) {
            Ok(()) => self.activated = true,
            Err(e) => {
                warn!("virtio-mmio: device activation failed: {e}");
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            }
        }
    }

    fn read_reg(&mut self, offset: u32) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => lock(&self.device).device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => {
                let f = lock(&self.device).avail_features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            VIRTIO_MMIO_QUEUE_NUM_MAX => {
                self.selected_queue().map_or(0, |q| u32::from(q.max_size()))
            }
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.read_status(),
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            // Shared memory regions: none (length all ones means "absent").
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u32, value: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                if self.status & VIRTIO_CONFIG_S_DRIVER != 0
                    && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0
                {
                    match self.driver_features_sel {
                        0 => {
                            self.driver_features =
                                (self.driver_features & !0xffff_ffff) | u64::from(value)
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                        }
                        _ => {}
                    }
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            // A driver tearing a queue down writes 0 to QueueReady even while
            // running, and expects to read 0 back; the device keeps its own
            // copy of the queue until reset.
            VIRTIO_MMIO_QUEUE_READY if value == 0 => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(false);
                }
            }
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_READY
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => {
                if !self.queues_writable() {
                    return;
                }
                let Some(q) = self.selected_queue() else {
                    return;
                };
                match offset {
                    VIRTIO_MMIO_QUEUE_NUM => q.set_size(value as u16),
                    VIRTIO_MMIO_QUEUE_READY => q.set_ready(value == 1),
                    VIRTIO_MMIO_QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
                    VIRTIO_MMIO_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
                    VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(value), None),
                    VIRTIO_MMIO_QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(value)),
                    VIRTIO_MMIO_QUEUE_USED_LOW => q.set_used_ring_address(Some(value), None),
                    _ => q.set_used_ring_address(None, Some(value)),
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                // Normally caught by the ioeventfd; a write KVM did not match
                // (another access size) lands here and is forwarded.
                if let Some(e) = self.queue_evts.get(value as usize) {
                    let _ = e.write(1);
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            VIRTIO_MMIO_STATUS => self.set_status(value),
            _ => warn!("virtio-mmio: write to unknown register {offset:#x}"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            lock(&self.device).read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        // Registers are 32-bit and must be accessed as such.
        match (u32::try_from(offset), data.len()) {
            (Ok(off), 4) if off % 4 == 0 => {
                let v = self.read_reg(off);
                data.copy_from_slice(&v.to_le_bytes());
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            lock(&self.device).write_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        match (u32::try_from(offset), <[u8; 4]>::try_from(data)) {
            (Ok(off), Ok(bytes)) if off % 4 == 0 => self.write_reg(off, u32::from_le_bytes(bytes)),
            _ => warn!(
                "virtio-mmio: ignored {}-byte write at {offset:#x}",
                data.len()
            ),
        }
    }
}

fn lock(
    dev: &Arc<Mutex<dyn VirtioDevice>>,
) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::ActivateError;
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct Dummy {
        acked: u64,
        activated: usize,
        resets: usize,
        sizes: [u16; 2],
        draining: bool,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn avail_features(&self) -> u64 {
            super::super::VIRTIO_F_VERSION_1 | 1
        }
        fn set_acked_features(&mut self, f: u64) {
            self.acked = f;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::virtio::read_config_bytes(&[1, 2, 3, 4], offset, data);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            assert_eq!(ctx.queues.len(), 2);
            assert_eq!(ctx.queues[0].size(), 16);
            self.activated += 1;
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.resets += 1;
            true
        }
        fn reset_pending(&self) -> bool {
            self.draining
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let dev = Arc::new(Mutex::new(Dummy {
            sizes: [16, 16],
            ..Default::default()
        }));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let evts = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let t = MmioTransport::new(mem, dev.clone(), Arc::new(Interrupt::new(irq)), evts);
        (t, dev)
    }

    fn r(t: &mut MmioTransport, off: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(off), &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u32, v: u32) {
        t.write(u64::from(off), &v.to_le_bytes());
    }

    const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    const DRV: u32 = VIRTIO_CONFIG_S_DRIVER;
    const FOK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
    const DOK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;

    fn negotiate(t: &mut MmioTransport, features_hi: u32) {
        w(t, VIRTIO_MMIO_STATUS, ACK);
        w(t, VIRTIO_MMIO_STATUS, ACK | DRV);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES, features_hi);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        w(t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK);
    }

    #[test]
    fn identification_registers() {
        let (mut t, _) = transport();
        assert_eq!(r(&mut t, VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC);
        assert_eq!(r(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_ID), 2);
        w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES),
            1,
            "VERSION_1 is bit 32"
        );
        let mut b = [0u8; 2];
        t.read(u64::from(VIRTIO_MMIO_CONFIG) + 1, &mut b);
        assert_eq!(b, [2, 3]);
        // Registers need aligned 32-bit accesses.
        let mut odd = [0xffu8; 2];
        t.read(0, &mut odd);
        assert_eq!(odd, [0, 0]);
    }

    #[test]
    fn full_handshake_activates_once() {
        let (mut t, dev) = transport();
        negotiate(&mut t, 1);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS) & FOK, FOK);
        assert_eq!(dev.lock().unwrap().acked, (1 << 32) | 1);
        for q in 0..2 {
            w(&mut t, VIRTIO_MMIO_QUEUE_SEL, q);
            assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
            w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
            w(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000 + q * 0x1000);
            w(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x4000 + q * 0x1000);
            w(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x8000 + q * 0x1000);
            w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        }
        w(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert_eq!(dev.lock().unwrap().activated, 1);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), ACK | DRV | FOK | DOK);
        // Queue registers are frozen once running, except that a driver
        // may mark a queue not ready (and reads that back).
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 8);
        w(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        // A reset the device finishes later (I/O in flight): STATUS reads
        // the old value until it has, then 0.
        dev.lock().unwrap().draining = true;
        w(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), ACK | DRV | FOK | DOK);
        dev.lock().unwrap().draining = false;
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(
            r(&mut t, VIRTIO_MMIO_QUEUE_READY),
            0,
            "reset clears the queues"
        );
    }

    #[test]
    fn features_the_device_never_offered_keep_features_ok_clear() {
        let (mut t, dev) = transport();
        negotiate(&mut t, 1 | (1 << 7));
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS) & FOK, 0);
        w(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert_eq!(dev.lock().unwrap().activated, 0, "never activated");
        assert_ne!(r(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FAILED, 0);
    }

    #[test]
    fn driver_ok_without_features_ok_fails() {
        let (mut t, dev) = transport();
        w(&mut t, VIRTIO_MMIO_STATUS, ACK);
        w(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV);
        w(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV | DOK);
        assert_eq!(dev.lock().unwrap().activated, 0);
        assert_ne!(r(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FAILED, 0);
    }

    #[test]
    fn stray_notify_writes_reach_the_queue_eventfd() {
        let (mut t, _) = transport();
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_evts[1].read().unwrap(), 1);
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 7); // no such queue: ignored
    }
}
