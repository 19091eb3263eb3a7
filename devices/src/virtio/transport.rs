//! What every virtio transport does the same way (virtio 1.x, sections 2
//! and 3): feature negotiation, device status, queue set-up, activation
//! and reset. The transports ([`super::mmio`], [`super::pci`]) only decode
//! their registers into calls on a [`VirtioCore`].
//!
//! Features are only accepted while FEATURES_OK is not yet set,
//! FEATURES_OK stays clear if the driver accepted features the device never
//! offered, queue registers are only writable before DRIVER_OK, and writing
//! 0 to the status resets the device.

use std::sync::{Arc, Mutex};

use log::{error, warn};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateContext, Interrupt, VirtioDevice};

/// A virtio device and the transport-independent state around it.
pub struct VirtioCore {
    /// The device model.
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    /// The interrupt handed to the device on activation.
    pub interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    /// Per-queue notification eventfds (KVM ioeventfds).
    pub queue_evts: Vec<EventFd>,
    /// Which 32-bit word of the device features reads.
    pub device_features_sel: u32,
    /// Which 32-bit word of the driver features writes.
    pub driver_features_sel: u32,
    driver_features: u64,
    /// The queue the queue registers address.
    pub queue_sel: u32,
    status: u32,
    /// Bumped on every device-config write.
    pub config_generation: u32,
    activated: bool,
    /// The status before a reset the device has not finished yet (0: none):
    /// what the status reads until it has.
    resetting: u32,
    /// Name used in logs ("virtio-mmio", "virtio-pci").
    name: &'static str,
}

impl VirtioCore {
    /// State for `device`, raising `interrupt`, notified through
    /// `queue_evts` (one per queue).
    pub fn new(
        name: &'static str,
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
        VirtioCore {
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
            name,
        }
    }

    /// The device model, locked.
    pub fn device(&self) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
        lock(&self.device)
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The queue the queue registers address.
    pub fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// The selected queue, if the driver may still configure it (after
    /// FEATURES_OK, before DRIVER_OK).
    pub fn writable_queue(&mut self) -> Option<&mut Queue> {
        let writable = self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        if writable {
            self.selected_queue()
        } else {
            None
        }
    }

    /// The selected 32-bit word of the device's features.
    pub fn device_features_word(&self) -> u32 {
        let f = self.device().avail_features();
        match self.device_features_sel {
            0 => f as u32,
            1 => (f >> 32) as u32,
            _ => 0,
        }
    }

    /// The selected 32-bit word of the driver's features.
    pub fn driver_features_word(&self) -> u32 {
        match self.driver_features_sel {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    /// Writes the selected word of the driver's features (only between
    /// DRIVER and FEATURES_OK).
    pub fn set_driver_features_word(&mut self, value: u32) {
        if self.status & VIRTIO_CONFIG_S_DRIVER == 0
            || self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
        {
            return;
        }
        let v = u64::from(value);
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
            _ => {}
        }
    }

    /// Forwards a notification KVM did not catch (another access size).
    pub fn notify(&self, queue: usize) {
        if let Some(e) = self.queue_evts.get(queue) {
            let _ = e.write(1);
        }
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

    /// The device status: the old status while the device still completes
    /// a reset.
    pub fn read_status(&mut self) -> u32 {
        if self.resetting != 0 {
            if lock(&self.device).reset_pending() {
                return self.resetting;
            }
            self.resetting = 0;
        }
        self.status
    }

    /// A driver write of the device status.
    pub fn set_status(&mut self, value: u32) {
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
                "{}: driver cleared status bits without a reset ({:#x} -> {value:#x})",
                self.name, self.status
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
                    error!("{}: cannot clone queue eventfd: {err}", self.name);
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
            warn!("{}: driver configured an invalid queue", self.name);
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
                warn!("{}: device activation failed: {e}", self.name);
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            }
        }
    }

    /// A driver read of the device-specific configuration.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.device().read_config(offset, data);
    }

    /// A driver write of the device-specific configuration.
    pub fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.device().write_config(offset, data);
        self.config_generation = self.config_generation.wrapping_add(1);
    }
}

/// Locks a device, recovering from a poisoned lock.
fn lock(
    device: &Arc<Mutex<dyn VirtioDevice>>,
) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}
