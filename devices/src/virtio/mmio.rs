//! The virtio-mmio transport (virtio 1.x "modern" register layout, version 2):
//! decodes the registers into calls on a [`VirtioCore`], which negotiates
//! features, keeps the status and resets as the virtio spec says.

use std::sync::{Arc, Mutex};

use log::warn;
use virtio_bindings::virtio_mmio::*;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::transport::VirtioCore;
use super::{Interrupt, VirtioDevice};
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
    core: VirtioCore,
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
        MmioTransport {
            core: VirtioCore::new("virtio-mmio", mem, device, interrupt, queue_evts),
        }
    }

    fn read_reg(&mut self, offset: u32) -> u32 {
        let c = &mut self.core;
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => c.device().device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => c.device_features_word(),
            VIRTIO_MMIO_QUEUE_NUM_MAX => c.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => c.selected_queue().map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => c.interrupt.status(),
            VIRTIO_MMIO_STATUS => c.read_status(),
            VIRTIO_MMIO_CONFIG_GENERATION => c.config_generation,
            // Shared memory regions: none (length all ones means "absent").
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u32, value: u32) {
        let c = &mut self.core;
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => c.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => c.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => c.set_driver_features_word(value),
            VIRTIO_MMIO_QUEUE_SEL => c.queue_sel = value,
            // A driver tearing a queue down writes 0 to QueueReady even while
            // running, and expects to read 0 back; the device keeps its own
            // copy of the queue until reset.
            VIRTIO_MMIO_QUEUE_READY if value == 0 => {
                if let Some(q) = c.selected_queue() {
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
                let Some(q) = c.writable_queue() else {
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
            // Normally caught by the ioeventfd; a write KVM did not match
            // (another access size) lands here and is forwarded.
            VIRTIO_MMIO_QUEUE_NOTIFY => c.notify(value as usize),
            VIRTIO_MMIO_INTERRUPT_ACK => c.interrupt.ack(value),
            VIRTIO_MMIO_STATUS => c.set_status(value),
            _ => warn!("virtio-mmio: write to unknown register {offset:#x}"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.core
                .read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
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
            self.core
                .write_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_device::{dummy_parts, Dummy};
    use virtio_bindings::virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
        VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    };

    fn transport() -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let (mem, dev, irq, evts) = dummy_parts();
        let t = MmioTransport::new(mem, dev.clone(), irq, evts);
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
        assert_eq!(t.core.queue_evts[1].read().unwrap(), 1);
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 7); // no such queue: ignored
    }
}
