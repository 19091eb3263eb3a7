//! The BAR windows: the guest-physical ranges BARs may be placed in, each
//! one device on the VMM's MMIO bus that forwards an access to whichever
//! BAR the guest has there now. BARs move while the VM runs (the guest
//! reprograms them), which the VMM's own bus, fixed once the vCPUs start,
//! cannot follow; this inner bus can.

use std::sync::{Arc, RwLock};

use crate::bus::{Bus, BusDevice, BusError, SharedDevice};

/// Where the BARs are decoded now, by absolute address.
#[derive(Default)]
pub struct BarSpace {
    bus: RwLock<Bus>,
}

impl BarSpace {
    /// An empty space: no BAR decoded.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Decodes `[base, base + len)` to `device`.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        self.bus
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(device, base, len)
    }

    /// Stops decoding the BAR at `base`; returns whether one was there.
    pub fn remove(&self, base: u64) -> bool {
        self.bus
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(base)
    }

    /// The window device for `[base, ...)`, to put on the VMM's bus there.
    pub fn window(self: &Arc<Self>, base: u64) -> BarWindow {
        BarWindow {
            space: self.clone(),
            base,
        }
    }

    fn read(&self, addr: u64, data: &mut [u8]) {
        let bus = self.bus.read().unwrap_or_else(|p| p.into_inner());
        if !bus.read(addr, data) {
            // Nothing decodes it: all ones, as an unclaimed PCI read.
            data.fill(0xff);
        }
    }

    fn write(&self, addr: u64, data: &[u8]) {
        let bus = self.bus.read().unwrap_or_else(|p| p.into_inner());
        bus.write(addr, data);
    }
}

/// One BAR window on the VMM's bus (see [`BarSpace::window`]).
pub struct BarWindow {
    space: Arc<BarSpace>,
    base: u64,
}

impl BusDevice for BarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.space.read(self.base.wrapping_add(offset), data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.space.write(self.base.wrapping_add(offset), data);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    struct Reg(u8);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn windows_follow_the_bars() {
        let space = BarSpace::new();
        let mut outer = Bus::new();
        outer
            .insert(Arc::new(Mutex::new(space.window(0x1000))), 0x1000, 0x1000)
            .unwrap();
        let reg = Arc::new(Mutex::new(Reg(7)));
        space.insert(reg.clone(), 0x1800, 0x10).unwrap();
        let mut b = [0u8; 1];
        assert!(outer.read(0x1801, &mut b));
        assert_eq!(b, [8]);
        assert!(outer.read(0x1000, &mut b));
        assert_eq!(b, [0xff], "nothing there");
        // Moved: the old address is empty, the new one answers.
        assert!(space.remove(0x1800));
        space.insert(reg, 0x1200, 0x10).unwrap();
        assert!(outer.read(0x1800, &mut b));
        assert_eq!(b, [0xff]);
        assert!(outer.write(0x1200, &[3]));
        assert!(outer.read(0x1200, &mut b));
        assert_eq!(b, [3]);
        assert!(!space.remove(0x1800));
    }
}
