//! The virtio-pci modern transport (virtio 1.2, section 4.1): a PCI
//! function (vendor 0x1af4, device 0x1040 + the virtio type, revision 1)
//! whose one 64-bit BAR holds every structure the vendor capabilities point
//! at. Registers decode into calls on a [`VirtioCore`], as virtio-mmio's do.
//!
//! ```text
//! BAR 0 (64-bit, prefetchable, BAR_SIZE bytes)
//! 0x0000  common configuration (VIRTIO_PCI_CAP_COMMON_CFG)
//! 0x1000  ISR status, read-to-clear (VIRTIO_PCI_CAP_ISR_CFG)
//! 0x2000  device-specific configuration (VIRTIO_PCI_CAP_DEVICE_CFG)
//! 0x3000  notifications: queue n at 0x3000 + 4 n (VIRTIO_PCI_CAP_NOTIFY_CFG,
//!         multiplier 4), caught by KVM ioeventfds
//! 0x4000  MSI-X table (one vector per queue plus one for configuration)
//! 0x6000  MSI-X pending-bit array
//! ```
//!
//! Interrupts: INTx through the device's [`Interrupt`] (a level line;
//! reading the ISR acknowledges it), or, once the driver enables MSI-X,
//! the vector the driver chose per queue and for configuration changes.
//! The command register's INTx disable bit switches the line off (the ISR
//! still collects reasons; clearing the bit asserts the line again if one
//! is pending), and the status register's interrupt bit shows whether the
//! ISR has one.

use std::sync::{Arc, Mutex};

use log::warn;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::pci_vectors::PciVectors;
pub use super::pci_vectors::NO_VECTOR;
use super::transport::VirtioCore;
use super::{Interrupt, VirtioDevice};
use crate::bus::BusDevice;
use crate::pci::config::{
    Bar, BarKind, PciConfiguration, PciIds, COMMAND, COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE,
    COMMAND_MEMORY, STATUS, STATUS_INTERRUPT,
};
use crate::pci::{BarMove, ConfigError, PciDevice};

/// Red Hat's vendor ID, which virtio devices use.
pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
/// Modern device IDs are this plus the virtio device type.
pub const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;
/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x8000;
/// Offset of the common configuration in BAR 0.
pub const COMMON_OFFSET: u64 = 0x0000;
/// Offset of the ISR status in BAR 0.
pub const ISR_OFFSET: u64 = 0x1000;
/// Offset of the device configuration in BAR 0.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Offset of the notification area in BAR 0.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// Offset of the MSI-X table in BAR 0.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// Offset of the MSI-X PBA in BAR 0.
pub const MSIX_PBA_OFFSET: u64 = 0x6000;
/// Most queues a device may have here (the notification area's room).
pub const MAX_QUEUES: usize = 0x1000 / NOTIFY_MULTIPLIER as usize;
const COMMON_LEN: u32 = 0x40;
const ISR_LEN: u32 = 4;
const DEVICE_CFG_LEN: u32 = 0x1000;
/// Vendor-specific capability ID.
const CAP_VENDOR: u8 = 0x09;
/// `cfg_type` of the virtio capabilities.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;

/// A virtio device behind virtio-pci registers.
pub struct PciTransport {
    core: VirtioCore,
    config: PciConfiguration,
    vectors: Arc<PciVectors>,
    /// Offset of the MSI-X capability in configuration space.
    msix_cap: usize,
}

fn class_of(device_type: u32) -> u32 {
    match device_type {
        1 => 0x02_00_00,  // network controller, Ethernet
        2 => 0x01_80_00,  // mass storage, other
        19 => 0x08_80_00, // system peripheral, other
        _ => 0xff_00_00,
    }
}

/// A virtio capability (`struct virtio_pci_cap`, plus the notify
/// multiplier when `extra` has it).
fn virtio_cap(cfg_type: u8, offset: u64, len: u32, extra: &[u8]) -> Vec<u8> {
    let cap_len = 16 + extra.len() as u8;
    let mut c = vec![CAP_VENDOR, 0, cap_len, cfg_type, 0, 0, 0, 0];
    c.extend_from_slice(&(offset as u32).to_le_bytes());
    c.extend_from_slice(&len.to_le_bytes());
    c.extend_from_slice(extra);
    c
}

impl PciTransport {
    /// A transport for `device`, raising `interrupt` for INTx; `queue_evts`
    /// are the per-queue notification eventfds (the VMM registers them as
    /// ioeventfds at BAR 0 + [`NOTIFY_OFFSET`] + 4 × queue); BAR 0 is at
    /// `bar_addr` (from the 64-bit window). `vectors` is the MSI-X state the
    /// VMM made for the device's queues (`interrupt` has it in front of its
    /// line). BAR 0 starts decoded (memory space and bus mastering enabled,
    /// as firmware leaves a device it placed).
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<Interrupt>,
        queue_evts: Vec<EventFd>,
        bar_addr: u64,
        vectors: Arc<PciVectors>,
    ) -> Result<Self, ConfigError> {
        let core = VirtioCore::new("virtio-pci", mem, device, interrupt, queue_evts);
        let queues = core.num_queues().min(MAX_QUEUES).min(vectors.queues());
        let device_type = core.device().device_type();
        let ids = PciIds {
            vendor: VIRTIO_PCI_VENDOR,
            // Device types are small (< 64): no overflow.
            device: VIRTIO_PCI_DEVICE_BASE + device_type as u16,
            revision: 1,
            class: class_of(device_type),
            subsystem_vendor: VIRTIO_PCI_VENDOR,
            subsystem: 0x40,
        };
        let mut config = PciConfiguration::new(ids, 1);
        config.add_bar(
            Bar {
                index: 0,
                size: BAR_SIZE,
                kind: BarKind::Mem64,
            },
            bar_addr,
        )?;
        let notify_len = (queues as u32) * NOTIFY_MULTIPLIER;
        let caps = [
            virtio_cap(CAP_COMMON, COMMON_OFFSET, COMMON_LEN, &[]),
            virtio_cap(CAP_ISR, ISR_OFFSET, ISR_LEN, &[]),
            virtio_cap(CAP_DEVICE, DEVICE_CFG_OFFSET, DEVICE_CFG_LEN, &[]),
            virtio_cap(
                CAP_NOTIFY,
                NOTIFY_OFFSET,
                notify_len,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
        ];
        for c in &caps {
            config.add_capability(c, &[])?;
        }
        // One vector per queue plus one for configuration changes.
        let (body, mask) = vectors.capability(0, MSIX_TABLE_OFFSET as u32, MSIX_PBA_OFFSET as u32);
        let msix_cap = config.add_capability(&body, &mask)?;
        config.set_command(COMMAND_MEMORY | COMMAND_BUS_MASTER);
        Ok(Self {
            core,
            config,
            vectors,
            msix_cap,
        })
    }

    /// The MSI-X vectors (shared with the device's interrupt).
    pub fn vectors(&self) -> &Arc<PciVectors> {
        &self.vectors
    }

    /// Where BAR 0 is decoded now (`None`: memory space disabled).
    pub fn bar_decoded(&self) -> Option<u64> {
        self.config.bar_decoded(0)
    }

    /// The vector the driver chose for queue `index` ([`NO_VECTOR`]: none).
    pub fn queue_vector(&self, index: usize) -> u16 {
        self.vectors.queue_vector(index)
    }

    /// The vector the driver chose for configuration changes.
    pub fn config_vector(&self) -> u16 {
        self.vectors.config_vector()
    }

    fn read_common(&mut self, offset: u64) -> u64 {
        let queue_vector = self.queue_vector(self.core.queue_sel as usize);
        let config_vector = self.config_vector();
        let num_queues = self.vectors.queues().min(self.core.num_queues());
        let c = &mut self.core;
        let q = |c: &mut VirtioCore, f: fn(&virtio_queue::Queue) -> u64| {
            c.selected_queue().map_or(0, |q| f(q))
        };
        match offset {
            0x00 => u64::from(c.device_features_sel),
            0x04 => u64::from(c.device_features_word()),
            0x08 => u64::from(c.driver_features_sel),
            0x0c => u64::from(c.driver_features_word()),
            0x10 => u64::from(config_vector),
            0x12 => num_queues as u64,
            0x14 => u64::from(c.read_status() as u8),
            0x15 => u64::from(c.config_generation as u8),
            0x16 => u64::from(c.queue_sel),
            0x18 => q(c, |q| u64::from(q.size())),
            0x1a => u64::from(queue_vector),
            0x1c => q(c, |q| u64::from(q.ready())),
            // Queue n notifies at NOTIFY_OFFSET + n * multiplier.
            0x1e => match c.selected_queue() {
                Some(_) => u64::from(c.queue_sel),
                None => 0,
            },
            0x20 => q(c, |q| q.desc_table()),
            0x24 => q(c, |q| q.desc_table() >> 32),
            0x28 => q(c, |q| q.avail_ring()),
            0x2c => q(c, |q| q.avail_ring() >> 32),
            0x30 => q(c, |q| q.used_ring()),
            0x34 => q(c, |q| q.used_ring() >> 32),
            _ => 0,
        }
    }

    fn write_common(&mut self, offset: u64, data: &[u8], value: u64) {
        let c = &mut self.core;
        let v32 = value as u32;
        match (offset, data.len()) {
            (0x00, 4) => c.device_features_sel = v32,
            (0x08, 4) => c.driver_features_sel = v32,
            (0x0c, 4) => c.set_driver_features_word(v32),
            (0x10, 2) => self.vectors.set_config_vector(value as u16),
            (0x14, 1) => {
                c.set_status(v32);
                if v32 == 0 {
                    // A device reset unassigns the vectors too.
                    self.vectors.reset();
                }
            }
            (0x16, 2) => c.queue_sel = v32,
            (0x1a, 2) => self
                .vectors
                .set_queue_vector(c.queue_sel as usize, value as u16),
            (0x18 | 0x1c | 0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34, _) => {
                let Some(q) = c.writable_queue() else {
                    return;
                };
                match offset {
                    0x18 => q.set_size(value as u16),
                    // Only 1 may be written (virtio 1.2, 4.1.4.3.2).
                    0x1c => q.set_ready(value == 1),
                    0x20 => q.set_desc_table_address(Some(v32), None),
                    0x24 => q.set_desc_table_address(None, Some(v32)),
                    0x28 => q.set_avail_ring_address(Some(v32), None),
                    0x2c => q.set_avail_ring_address(None, Some(v32)),
                    0x30 => q.set_used_ring_address(Some(v32), None),
                    _ => q.set_used_ring_address(None, Some(v32)),
                }
            }
            _ => warn!(
                "virtio-pci: ignored {}-byte write at common config {offset:#x}",
                data.len()
            ),
        }
    }

    fn msix_control_written(&mut self) {
        let mut ctrl = [0u8; 2];
        self.config.read(self.msix_cap + 2, &mut ctrl);
        self.vectors.set_control(u16::from_le_bytes(ctrl));
    }
}

fn le_value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

impl PciDevice for PciTransport {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
        // The status register's interrupt bit: the ISR has a reason.
        if let Some(b) = STATUS.checked_sub(offset).and_then(|i| data.get_mut(i)) {
            if self.core.interrupt.status() != 0 {
                *b |= STATUS_INTERRUPT as u8;
            }
        }
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) -> Vec<BarMove> {
        let moves = self.config.write(offset, data);
        if offset < COMMAND + 2 && offset.saturating_add(data.len()) > COMMAND {
            let disabled = self.config.command() & COMMAND_INTX_DISABLE != 0;
            self.core.interrupt.set_line_disabled(disabled);
        }
        let ctrl = self.msix_cap + 2;
        if offset < ctrl + 2 && offset + data.len() > ctrl {
            self.msix_control_written();
        }
        moves
    }
}

impl BusDevice for PciTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON_OFFSET + u64::from(COMMON_LEN) => {
                let v = self.read_common(o - COMMON_OFFSET);
                let bytes = v.to_le_bytes();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = bytes.get(i).copied().unwrap_or(0);
                }
            }
            o if (ISR_OFFSET..ISR_OFFSET + u64::from(ISR_LEN)).contains(&o) => {
                // Reading the ISR clears it and acknowledges the INTx line.
                data.fill(0);
                if o == ISR_OFFSET {
                    if let Some(b) = data.first_mut() {
                        let status = self.core.interrupt.status();
                        self.core.interrupt.ack(status);
                        *b = status as u8;
                    }
                }
            }
            o if (DEVICE_CFG_OFFSET..NOTIFY_OFFSET).contains(&o) => {
                self.core.read_config(o - DEVICE_CFG_OFFSET, data);
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.vectors.read_table(o - MSIX_TABLE_OFFSET, data);
            }
            o if o >= MSIX_PBA_OFFSET => self.vectors.read_pba(o - MSIX_PBA_OFFSET, data),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_OFFSET + u64::from(COMMON_LEN) => {
                self.write_common(o - COMMON_OFFSET, data, le_value(data));
            }
            o if (DEVICE_CFG_OFFSET..NOTIFY_OFFSET).contains(&o) => {
                self.core.write_config(o - DEVICE_CFG_OFFSET, data);
            }
            // Normally caught by the ioeventfd; other access sizes land here.
            o if (NOTIFY_OFFSET..MSIX_TABLE_OFFSET).contains(&o) => {
                self.core
                    .notify(((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize);
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.vectors.write_table(o - MSIX_TABLE_OFFSET, data);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE as ACK, VIRTIO_CONFIG_S_DRIVER as DRV,
        VIRTIO_CONFIG_S_DRIVER_OK as DOK, VIRTIO_CONFIG_S_FEATURES_OK as FOK,
    };

    use super::*;
    use crate::virtio::test_device::{dummy_parts, Dummy};

    const BAR: u64 = 0x40_0000_0000;

    /// Counts the vectors sent.
    #[derive(Default)]
    struct Sent(Mutex<Vec<u16>>);
    impl crate::virtio::pci_vectors::MsiDelivery for Sent {
        fn set_routes(&self, _routes: &[Option<crate::pci::msix::MsiMessage>]) {}
        fn trigger(&self, vector: u16) {
            self.0.lock().unwrap().push(vector);
        }
    }

    fn transport_with(sent: Arc<Sent>) -> (PciTransport, Arc<Mutex<Dummy>>, Arc<Interrupt>) {
        let (mem, dev, _, evts) = dummy_parts();
        let vectors = PciVectors::new(evts.len(), sent);
        let line = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = Arc::new(Interrupt::new(line).with_vectors(vectors.clone()));
        let t = PciTransport::new(mem, dev.clone(), irq.clone(), evts, BAR, vectors).unwrap();
        (t, dev, irq)
    }

    fn transport() -> (PciTransport, Arc<Mutex<Dummy>>, Arc<Interrupt>) {
        transport_with(Arc::default())
    }

    fn cfg(t: &mut PciTransport, off: usize, len: usize) -> u64 {
        let mut b = [0u8; 8];
        t.config_read(off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn r(t: &mut PciTransport, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        t.read(off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn w(t: &mut PciTransport, off: u64, len: usize, v: u64) {
        t.write(off, &v.to_le_bytes()[..len]);
    }

    /// Walks the capability list: (offset, id, cfg_type) of each.
    fn caps(t: &mut PciTransport) -> Vec<(usize, u8, u8)> {
        let mut out = Vec::new();
        let mut p = cfg(t, 0x34, 1) as usize;
        while p != 0 && out.len() < 16 {
            out.push((p, cfg(t, p, 1) as u8, cfg(t, p + 3, 1) as u8));
            p = cfg(t, p + 1, 1) as usize;
        }
        out
    }

    #[test]
    fn identifies_as_a_modern_virtio_function() {
        let (mut t, _, _) = transport();
        assert_eq!(cfg(&mut t, 0, 4), 0x1042_1af4, "vendor, 0x1040 + block");
        assert_eq!(cfg(&mut t, 8, 1), 1, "revision 1: modern only");
        assert_eq!(cfg(&mut t, 0x2c, 4), 0x0040_1af4);
        assert_eq!(cfg(&mut t, 0x3d, 1), 1, "INTA#");
        // BAR 0: 64-bit at BAR, sized BAR_SIZE.
        assert_eq!(cfg(&mut t, 0x10, 4) & !0xf, BAR & 0xffff_ffff);
        assert_eq!(cfg(&mut t, 0x14, 4), BAR >> 32);
        t.config_write(0x10, &[0xff; 4]);
        assert_eq!(!(cfg(&mut t, 0x10, 4) as u32 & !0xf) + 1, BAR_SIZE as u32);
        let list = caps(&mut t);
        let types: Vec<(u8, u8)> = list.iter().map(|&(_, id, ty)| (id, ty)).collect();
        assert_eq!(
            types[..4],
            [
                (CAP_VENDOR, CAP_COMMON),
                (CAP_VENDOR, CAP_ISR),
                (CAP_VENDOR, CAP_DEVICE),
                (CAP_VENDOR, CAP_NOTIFY)
            ]
        );
        assert_eq!(types[4].0, crate::pci::msix::MSIX_CAP_ID);
        // The notify capability: BAR 0, offset, two queues x 4, multiplier 4.
        let n = list[3].0;
        assert_eq!(cfg(&mut t, n + 2, 1), 20, "cap_len");
        assert_eq!(cfg(&mut t, n + 4, 1), 0, "bar");
        assert_eq!(cfg(&mut t, n + 8, 4), NOTIFY_OFFSET);
        assert_eq!(cfg(&mut t, n + 12, 4), 8);
        assert_eq!(cfg(&mut t, n + 16, 4), 4);
        // MSI-X: 3 vectors (two queues and configuration).
        let m = list[4].0;
        assert_eq!(cfg(&mut t, m + 2, 2) & 0x7ff, 2);
        assert_eq!(cfg(&mut t, m + 4, 4), MSIX_TABLE_OFFSET);
        assert_eq!(cfg(&mut t, m + 8, 4), MSIX_PBA_OFFSET);
    }

    fn negotiate(t: &mut PciTransport) {
        w(t, 0x14, 1, u64::from(ACK));
        w(t, 0x14, 1, u64::from(ACK | DRV));
        w(t, 0x00, 4, 1);
        assert_eq!(r(t, 0x04, 4), 1, "VERSION_1 is bit 32");
        w(t, 0x08, 4, 1);
        w(t, 0x0c, 4, 1);
        w(t, 0x08, 4, 0);
        w(t, 0x0c, 4, 1);
        w(t, 0x14, 1, u64::from(ACK | DRV | FOK));
    }

    #[test]
    fn negotiates_sets_up_queues_and_activates() {
        let (mut t, dev, _) = transport();
        assert_eq!(r(&mut t, 0x12, 2), 2, "num_queues");
        negotiate(&mut t);
        assert_eq!(r(&mut t, 0x14, 1), u64::from(ACK | DRV | FOK));
        assert_eq!(dev.lock().unwrap().acked, (1 << 32) | 1);
        for q in 0..2u64 {
            w(&mut t, 0x16, 2, q);
            assert_eq!(r(&mut t, 0x18, 2), 16, "queue_size starts at the max");
            assert_eq!(r(&mut t, 0x1e, 2), q, "queue_notify_off");
            w(&mut t, 0x1a, 2, q);
            assert_eq!(r(&mut t, 0x1a, 2), q, "vector taken");
            let base = 0x1_0000 + q * 0x1000;
            w(&mut t, 0x20, 4, base);
            w(&mut t, 0x24, 4, 0);
            w(&mut t, 0x28, 4, base + 0x100);
            w(&mut t, 0x30, 4, base + 0x200);
            w(&mut t, 0x1c, 2, 1);
            assert_eq!(r(&mut t, 0x20, 4), base);
            assert_eq!(r(&mut t, 0x1c, 2), 1);
        }
        w(&mut t, 0x10, 2, 7);
        assert_eq!(r(&mut t, 0x10, 2), u64::from(NO_VECTOR), "no vector 7");
        w(&mut t, 0x10, 2, 2);
        assert_eq!(t.config_vector(), 2);
        assert_eq!(t.queue_vector(1), 1);
        w(&mut t, 0x14, 1, u64::from(ACK | DRV | FOK | DOK));
        assert_eq!(dev.lock().unwrap().activated, 1);
        // Queue registers are frozen after DRIVER_OK.
        w(&mut t, 0x16, 2, 0);
        w(&mut t, 0x20, 4, 0x9000);
        assert_eq!(r(&mut t, 0x20, 4), 0x1_0000);
        // Device config at its offset.
        assert_eq!(r(&mut t, DEVICE_CFG_OFFSET + 1, 2), 0x0302);
        // Reset.
        w(&mut t, 0x14, 1, 0);
        assert_eq!(r(&mut t, 0x14, 1), 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        w(&mut t, 0x16, 2, 0);
        assert_eq!(r(&mut t, 0x1c, 2), 0, "queues reset");
    }

    #[test]
    fn features_the_device_never_offered_fail_features_ok() {
        let (mut t, _, _) = transport();
        w(&mut t, 0x14, 1, u64::from(ACK | DRV));
        w(&mut t, 0x08, 4, 0);
        w(&mut t, 0x0c, 4, 0b110);
        w(&mut t, 0x14, 1, u64::from(ACK | DRV | FOK));
        assert_eq!(r(&mut t, 0x14, 1) & u64::from(FOK), 0);
    }

    #[test]
    fn isr_read_acknowledges_and_notify_forwards() {
        let (mut t, _, irq) = transport();
        irq.signal_used_queue(0);
        assert_eq!(r(&mut t, ISR_OFFSET, 1), 1, "queue interrupt");
        assert_eq!(r(&mut t, ISR_OFFSET, 1), 0, "read-to-clear");
        irq.signal_config_change();
        assert_eq!(r(&mut t, ISR_OFFSET, 1), 2, "config interrupt");
        // A notification KVM did not catch reaches the queue's eventfd.
        w(&mut t, NOTIFY_OFFSET + 4, 1, 1);
        assert_eq!(t.core.queue_evts[1].read().unwrap(), 1);
    }

    /// How many times the INTx line was asserted since the last call.
    fn asserted(irq: &Interrupt) -> u64 {
        irq.irqfd.read().unwrap_or(0)
    }

    fn set_command(t: &mut PciTransport, command: u16) {
        t.config_write(COMMAND, &command.to_le_bytes());
    }

    #[test]
    fn intx_disable_keeps_the_line_down_and_clearing_it_reasserts_a_pending_isr() {
        let (mut t, _, irq) = transport();
        let on = COMMAND_MEMORY | COMMAND_BUS_MASTER;
        let status_bit = |t: &mut PciTransport| cfg(t, STATUS, 2) & u64::from(STATUS_INTERRUPT);
        assert_eq!(status_bit(&mut t), 0, "nothing pending");
        irq.signal_used_queue(0);
        assert_eq!(asserted(&irq), 1, "INTx enabled as firmware leaves it");
        assert_ne!(status_bit(&mut t), 0, "status shows the pending interrupt");

        set_command(&mut t, on | COMMAND_INTX_DISABLE);
        assert_eq!(
            cfg(&mut t, COMMAND, 2),
            u64::from(on | COMMAND_INTX_DISABLE)
        );
        irq.signal_used_queue(1);
        irq.signal_config_change();
        assert_eq!(asserted(&irq), 0, "no assertion while INTx is disabled");
        // The EOI path does not bring it back either.
        irq.resample();
        assert_eq!(asserted(&irq), 0, "no reassertion after an EOI");
        assert_ne!(status_bit(&mut t), 0, "still pending in the function");

        // Cleared with the ISR pending: asserted again at once.
        set_command(&mut t, on);
        assert_eq!(asserted(&irq), 1, "pending ISR reasserts the line");
        assert_eq!(r(&mut t, ISR_OFFSET, 1), 3, "queue and config reasons kept");
        assert_eq!(status_bit(&mut t), 0);

        // Disabled and enabled again with nothing pending: no assertion.
        set_command(&mut t, on | COMMAND_INTX_DISABLE);
        set_command(&mut t, on);
        assert_eq!(asserted(&irq), 0, "nothing pending, nothing asserted");
        // A byte write of the command register's high byte works too.
        t.config_write(COMMAND + 1, &[(COMMAND_INTX_DISABLE >> 8) as u8]);
        assert!(irq.line_disabled());
        irq.signal_used_queue(0);
        assert_eq!(asserted(&irq), 0);
        t.config_write(COMMAND + 1, &[0]);
        assert_eq!(asserted(&irq), 1);
    }

    #[test]
    fn with_msix_enabled_clearing_intx_disable_asserts_nothing() {
        let (mut t, _, irq) = transport();
        let m = caps(&mut t)[4].0;
        t.config_write(m + 2, &0x8000u16.to_le_bytes());
        set_command(
            &mut t,
            COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE,
        );
        irq.signal_used_queue(0);
        set_command(&mut t, COMMAND_MEMORY | COMMAND_BUS_MASTER);
        assert_eq!(asserted(&irq), 0, "MSI-X enabled: no INTx");
        assert_eq!(r(&mut t, ISR_OFFSET, 1), 0);
    }

    #[test]
    fn with_msix_enabled_queues_use_their_vectors_not_the_isr() {
        let sent = Arc::new(Sent::default());
        let (mut t, _, irq) = transport_with(sent.clone());
        let m = caps(&mut t)[4].0;
        w(&mut t, 0x16, 2, 1);
        w(&mut t, 0x1a, 2, 1);
        w(&mut t, MSIX_TABLE_OFFSET + 16, 4, 0xfee0_0000);
        w(&mut t, MSIX_TABLE_OFFSET + 24, 4, 0x31);
        t.config_write(m + 2, &0x8000u16.to_le_bytes());
        // Vector 1 still masked: pending in the PBA, nothing sent.
        irq.signal_used_queue(1);
        assert_eq!(r(&mut t, MSIX_PBA_OFFSET, 8), 0b10);
        assert!(sent.0.lock().unwrap().is_empty());
        w(&mut t, MSIX_TABLE_OFFSET + 28, 4, 0);
        assert_eq!(*sent.0.lock().unwrap(), [1], "delivered at unmask");
        assert_eq!(r(&mut t, MSIX_PBA_OFFSET, 8), 0);
        irq.signal_used_queue(1);
        assert_eq!(*sent.0.lock().unwrap(), [1, 1]);
        assert_eq!(r(&mut t, ISR_OFFSET, 1), 0, "the ISR is INTx's");
        // A device reset unassigns the vectors.
        w(&mut t, 0x14, 1, 0);
        assert_eq!(r(&mut t, 0x1a, 2), u64::from(NO_VECTOR));
    }

    #[test]
    fn memory_decoding_follows_the_command_register() {
        let (mut t, _, _) = transport();
        assert_eq!(t.bar_decoded(), Some(BAR), "decoded as firmware leaves it");
        let moves = t.config_write(0x04, &0u16.to_le_bytes());
        assert_eq!(moves.len(), 1);
        assert_eq!(t.bar_decoded(), None);
        t.config_write(0x04, &0x6u16.to_le_bytes());
        assert_eq!(t.bar_decoded(), Some(BAR));
    }

    #[test]
    fn msix_table_through_the_bar_and_the_capability() {
        let (mut t, _, _) = transport();
        let m = caps(&mut t)[4].0;
        w(&mut t, MSIX_TABLE_OFFSET + 16, 4, 0xfee0_0000);
        w(&mut t, MSIX_TABLE_OFFSET + 24, 4, 0x31);
        assert_eq!(r(&mut t, MSIX_TABLE_OFFSET + 16, 4), 0xfee0_0000);
        assert_eq!(r(&mut t, MSIX_TABLE_OFFSET + 28, 4), 1, "masked");
        assert!(!t.vectors().enabled());
        t.config_write(m + 2, &0x8000u16.to_le_bytes());
        assert!(t.vectors().enabled());
        assert_eq!(cfg(&mut t, m + 2, 2), 0x8002, "enable bit, size 2");
        assert_eq!(r(&mut t, MSIX_PBA_OFFSET, 8), 0);
    }
}
