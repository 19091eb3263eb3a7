//! The virtio-pci transport's registers: a fuzzed sequence of reads and
//! writes to its configuration space (header, BAR, capabilities, the MSI-X
//! control) and to BAR 0 (common configuration, ISR, device configuration,
//! notifications, MSI-X table and PBA), on a transport in front of a real
//! virtio-blk device (synchronous engine, a 64 KiB temp file) whose event
//! loop runs after every write, so a driver-like sequence ends in requests
//! served from guest memory and interrupts sent through MSI-X or INTx.
//!
//! Checked on every input: the vendor ID always reads 0x1af4, and a vector
//! is only ever sent while its route is in place (unmasked, MSI-X on).
//!
//! Input: an access count u8, that many accesses of 7 bytes (kind u8: bit
//! 0 write, bits 1-2 size 1/2/4/8, bit 3 configuration space rather than
//! BAR 0; offset u16, mod 256 or mod the BAR's size; value u32), then the
//! bytes at DATA.
#![no_main]

use std::sync::{Arc, Mutex};

use devices::bus::BusDevice;
use devices::pci::msix::MsiMessage;
use devices::pci::PciDevice;
use devices::virtio::pci::{PciTransport, BAR_SIZE};
use devices::virtio::pci_vectors::{MsiDelivery, PciVectors};
use devices::virtio::{Interrupt, VirtioDevice};
use keel_fuzz::{fill_data, guest_memory, sync_block_in_loop, Input};
use libfuzzer_sys::fuzz_target;

/// BAR 0's address (as the VMM would place it in the 64-bit window).
const BAR: u64 = 0x1_0000_0000;

/// The VMM's side of MSI-X: checks every vector sent has a route.
#[derive(Default)]
struct Routes(Mutex<Vec<Option<MsiMessage>>>);

impl MsiDelivery for Routes {
    fn set_routes(&self, routes: &[Option<MsiMessage>]) {
        if let Ok(mut r) = self.0.lock() {
            *r = routes.to_vec();
        }
    }

    fn trigger(&self, vector: u16) {
        let routed = self
            .0
            .lock()
            .map(|r| matches!(r.get(usize::from(vector)), Some(Some(_))))
            .unwrap_or(false);
        assert!(routed, "vector {vector} sent without a route");
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let n = input.u8();
    let ops: Vec<(u8, u16, u32)> = (0..n)
        .map(|_| (input.u8(), input.u16(), input.u32()))
        .collect();
    let mem = guest_memory();
    fill_data(&mem, input.rest());
    let Some((blk, mut em, irq, notify)) = sync_block_in_loop("pci") else {
        return;
    };
    let queues = blk.lock().map_or(1, |b| b.queue_max_sizes().len());
    let vectors = PciVectors::new(queues, Arc::new(Routes::default()));
    let interrupt = Arc::new(Interrupt::new(irq).with_vectors(vectors.clone()));
    let device: Arc<Mutex<dyn VirtioDevice>> = blk;
    let Ok(mut t) = PciTransport::new(mem, device, interrupt, vec![notify], BAR, vectors) else {
        return;
    };
    let mut buf = [0u8; 8];
    for (kind, offset, value) in ops {
        let size = 1usize << ((kind >> 1) & 3);
        let write = kind & 1 != 0;
        if write {
            buf[..4].copy_from_slice(&value.to_le_bytes());
            buf[4..].fill(0);
        }
        if kind & 8 != 0 {
            // Configuration space: 256 bytes, accesses inside it.
            let offset = usize::from(offset) % (256 - size + 1);
            if write {
                let _ = t.config_write(offset, &buf[..size]);
            } else {
                t.config_read(offset, &mut buf[..size]);
                if offset == 0 && size == 2 {
                    assert_eq!(buf[..2], [0xf4, 0x1a], "vendor ID");
                }
            }
        } else {
            let offset = u64::from(offset) % BAR_SIZE;
            if write {
                t.write(offset, &buf[..size]);
            } else {
                t.read(offset, &mut buf[..size]);
            }
        }
        if write {
            let _ = em.run_with_timeout(0);
        }
    }
});
