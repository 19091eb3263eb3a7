//! PCI bus 0: slots by device number, and the host bridge at 00:00.0.

use std::sync::{Arc, Mutex};

use super::config::PciConfiguration;
use super::{BarMove, PciDevice, PciIds};

/// Device numbers on a bus.
pub const SLOTS: u8 = 32;
/// Intel's vendor ID, which the host bridge uses (as Cloud Hypervisor's).
const VENDOR_INTEL: u16 = 0x8086;
/// The host bridge's device ID (Cloud Hypervisor's virtual host bridge).
const HOST_BRIDGE_DEVICE: u16 = 0x0d57;
/// Class code of a host bridge: bridge (0x06), host (0x00).
const CLASS_HOST_BRIDGE: u32 = 0x06_00_00;

/// A shared handle to a function on the bus.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Why a device cannot be added.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RootError {
    /// Every slot is taken.
    #[error("no free PCI slot (at most {SLOTS} devices on bus 0)")]
    Full,
}

/// The host bridge: a header and nothing else.
pub struct HostBridge {
    config: PciConfiguration,
}

impl HostBridge {
    /// A host bridge header.
    pub fn new() -> Self {
        let ids = PciIds {
            vendor: VENDOR_INTEL,
            device: HOST_BRIDGE_DEVICE,
            revision: 0,
            class: CLASS_HOST_BRIDGE,
            subsystem_vendor: 0,
            subsystem: 0,
        };
        Self {
            config: PciConfiguration::new(ids, 0),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) -> Vec<BarMove> {
        self.config.write(offset, data)
    }
}

/// Bus 0 of segment 0: the host bridge in slot 0, devices in the next free
/// slots in the order they are added.
pub struct PciRoot {
    slots: Vec<Option<SharedPciDevice>>,
}

impl PciRoot {
    /// A bus with only the host bridge.
    pub fn new() -> Self {
        let mut slots: Vec<Option<SharedPciDevice>> = vec![None; usize::from(SLOTS)];
        slots[0] = Some(Arc::new(Mutex::new(HostBridge::new())));
        Self { slots }
    }

    /// Puts `device` in the lowest free slot; returns its device number.
    pub fn add_device(&mut self, device: SharedPciDevice) -> Result<u8, RootError> {
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(RootError::Full)?;
        self.slots[slot] = Some(device);
        // At most SLOTS (32) entries: fits a u8.
        Ok(slot as u8)
    }

    fn function(&self, bus: u8, device: u8, function: u8) -> Option<&SharedPciDevice> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.slots.get(usize::from(device))?.as_ref()
    }

    /// A configuration read; all-ones where no function answers, as on real
    /// hardware (how the guest sees an empty slot).
    pub fn config_read(&self, bus: u8, device: u8, function: u8, offset: usize, data: &mut [u8]) {
        match self.function(bus, device, function) {
            Some(d) => lock(d).config_read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A configuration write; dropped where no function answers. Returns
    /// the BARs it moved.
    pub fn config_write(
        &self,
        bus: u8,
        device: u8,
        function: u8,
        offset: usize,
        data: &[u8],
    ) -> Vec<BarMove> {
        match self.function(bus, device, function) {
            Some(d) => lock(d).config_write(offset, data),
            None => Vec::new(),
        }
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

/// Locks a function, recovering from a poisoned lock (plain registers).
fn lock(d: &SharedPciDevice) -> std::sync::MutexGuard<'_, dyn PciDevice + 'static> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read32(root: &PciRoot, dev: u8, func: u8, off: usize) -> u32 {
        let mut b = [0u8; 4];
        root.config_read(0, dev, func, off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn host_bridge_in_slot_0_devices_in_order() {
        let mut root = PciRoot::new();
        assert_eq!(read32(&root, 0, 0, 0), 0x0d57_8086);
        assert_eq!(read32(&root, 0, 0, 8) >> 8, CLASS_HOST_BRIDGE);
        assert_eq!(read32(&root, 1, 0, 0), u32::MAX, "empty slot");
        assert_eq!(read32(&root, 0, 1, 0), u32::MAX, "function 1");
        for want in 1..SLOTS {
            let got = root.add_device(Arc::new(Mutex::new(HostBridge::new())));
            assert_eq!(got, Ok(want));
        }
        let full = root.add_device(Arc::new(Mutex::new(HostBridge::new())));
        assert_eq!(full, Err(RootError::Full));
        assert_eq!(read32(&root, 31, 0, 0), 0x0d57_8086);
        let mut b = [0u8; 4];
        root.config_read(1, 0, 0, 0, &mut b);
        assert_eq!(b, [0xff; 4], "bus 1 does not exist");
    }
}
