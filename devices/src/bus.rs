//! Address buses: map guest port-I/O or MMIO ranges to the devices behind them.
//!
//! A vCPU exit carries an absolute address; the bus finds the device whose
//! range holds it and hands over the offset into that range. Each device has
//! its own lock, so two vCPUs touching different devices never contend.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Answers a read of a byte-wide register: `value` in the access's first
/// byte, zeros in the rest (a wider access than the register).
pub fn read_byte_register(data: &mut [u8], value: u8) {
    data.fill(0);
    if let Some(b) = data.first_mut() {
        *b = value;
    }
}

/// A device reachable through register reads and writes.
pub trait BusDevice: Send {
    /// Reads `data.len()` bytes at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors of bus set-up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range is empty.
    #[error("empty range at {0:#x}")]
    EmptyRange(u64),
    /// The new range overlaps one already registered.
    #[error("range {base:#x}+{len:#x} overlaps a registered device")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

/// A shared handle to a device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A set of non-overlapping address ranges, each served by one device.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `[base, base + len)` with `device`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::EmptyRange(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        let clash_before = self
            .ranges
            .range(..end)
            .next_back()
            .is_some_and(|(b, e)| b + e.len > base);
        if clash_before {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// Stops serving the range that starts at `base`; returns whether one
    /// did.
    pub fn remove(&mut self, base: u64) -> bool {
        self.ranges.remove(&base).is_some()
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (base, entry) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < entry.len).then_some((offset, &entry.device))
    }

    /// Dispatches a read; returns false (and leaves `data` alone) when no
    /// device serves `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device serves `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock: device state is plain
/// registers, and a panic elsewhere must not wedge every vCPU.
fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatches_by_range_and_offset() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Reg(10))), 0x3f8, 8).unwrap();
        bus.insert(Arc::new(Mutex::new(Reg(20))), 0x60, 1).unwrap();
        let mut b = [0u8];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 12);
        assert!(bus.write(0x60, &[7]));
        assert!(bus.read(0x60, &mut b));
        assert_eq!(b[0], 7);
        assert!(!bus.read(0x400, &mut b));
        assert!(!bus.read(0x61, &mut b));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Reg(0))), 0x100, 0x10)
            .unwrap();
        let d = || Arc::new(Mutex::new(Reg(0)));
        assert!(bus.insert(d(), 0x10f, 1).is_err());
        assert!(bus.insert(d(), 0xf0, 0x11).is_err());
        assert!(bus.insert(d(), 0x50, 0).is_err());
        assert!(bus.insert(d(), u64::MAX, 2).is_err());
        bus.insert(d(), 0x110, 1).unwrap();
        bus.insert(d(), 0xf0, 0x10).unwrap();
    }
}
