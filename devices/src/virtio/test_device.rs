//! A device model for the transports' tests: two 16-entry queues, features
//! VERSION_1 | bit 0, config bytes 1, 2, 3, 4; it counts activations and
//! resets.

use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateContext, ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

/// The test device.
#[derive(Default)]
pub struct Dummy {
    /// Features the driver accepted.
    pub acked: u64,
    /// Activations so far.
    pub activated: usize,
    /// Resets so far.
    pub resets: usize,
    /// Queue sizes.
    pub sizes: [u16; 2],
    /// Whether a reset is still completing.
    pub draining: bool,
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | 1
    }
    fn set_acked_features(&mut self, f: u64) {
        self.acked = f;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&[1, 2, 3, 4], offset, data);
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

/// Guest memory, the device, its interrupt and two queue eventfds.
pub fn dummy_parts() -> (
    GuestMemoryMmap,
    Arc<Mutex<Dummy>>,
    Arc<Interrupt>,
    Vec<EventFd>,
) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let dev = Arc::new(Mutex::new(Dummy {
        sizes: [16, 16],
        ..Default::default()
    }));
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let evts = (0..2)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    (mem, dev, Arc::new(Interrupt::new(irq)), evts)
}
