//! Where BARs go: 32-bit BARs in a window below 4 GiB, 64-bit BARs in a
//! window above RAM, each BAR aligned to its size (as the PCI spec
//! requires), allocated with rust-vmm's `vm-allocator`.

use vm_allocator::{AddressAllocator, AllocPolicy};

use super::BarKind;

/// Why a BAR gets no address.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BarAllocError {
    /// A window is empty, overflows or is misplaced.
    #[error("invalid MMIO window {base:#x}+{size:#x}: {source}")]
    Window {
        /// Its base.
        base: u64,
        /// Its size.
        size: u64,
        /// What `vm-allocator` said.
        source: vm_allocator::Error,
    },
    /// The window has no room left for a BAR of this size.
    #[error("no room for a {size:#x}-byte {kind:?} BAR: {source}")]
    Full {
        /// The BAR's size.
        size: u64,
        /// Its kind.
        kind: BarKind,
        /// What `vm-allocator` said.
        source: vm_allocator::Error,
    },
}

/// The two MMIO windows BARs are carved from.
pub struct BarAllocator {
    low: AddressAllocator,
    high: AddressAllocator,
}

impl BarAllocator {
    /// Windows `[low_base, low_base + low_size)` for 32-bit BARs and
    /// `[high_base, high_base + high_size)` for 64-bit ones.
    pub fn new(low: (u64, u64), high: (u64, u64)) -> Result<Self, BarAllocError> {
        let window = |(base, size): (u64, u64)| {
            AddressAllocator::new(base, size).map_err(|source| BarAllocError::Window {
                base,
                size,
                source,
            })
        };
        Ok(Self {
            low: window(low)?,
            high: window(high)?,
        })
    }

    /// A base address for a BAR of `size` bytes (a power of two), aligned
    /// to its size.
    pub fn allocate(&mut self, size: u64, kind: BarKind) -> Result<u64, BarAllocError> {
        let window = match kind {
            BarKind::Mem32 => &mut self.low,
            BarKind::Mem64 => &mut self.high,
        };
        window
            .allocate(size, size, AllocPolicy::FirstMatch)
            .map(|r| r.start())
            .map_err(|source| BarAllocError::Full { size, kind, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_are_aligned_and_in_their_window() {
        let low = (0xc000_0000, 0x1000_0000);
        let high = (0x40_0000_0000, 0x10_0000_0000);
        let mut a = BarAllocator::new(low, high).unwrap();
        let x = a.allocate(0x1000, BarKind::Mem32).unwrap();
        let y = a.allocate(0x10_0000, BarKind::Mem32).unwrap();
        assert_eq!(x, 0xc000_0000);
        assert_eq!(y % 0x10_0000, 0, "aligned to its size");
        assert!(y >= x + 0x1000 && y + 0x10_0000 <= low.0 + low.1);
        let z = a.allocate(0x4000, BarKind::Mem64).unwrap();
        let w = a.allocate(0x4000, BarKind::Mem64).unwrap();
        assert_eq!((z, w), (0x40_0000_0000, 0x40_0000_4000));
        // The low window is full after this one.
        assert!(a.allocate(0x800_0000, BarKind::Mem32).is_ok());
        assert!(matches!(
            a.allocate(0x800_0000, BarKind::Mem32),
            Err(BarAllocError::Full { .. })
        ));
        assert!(matches!(
            BarAllocator::new((0, 0), high),
            Err(BarAllocError::Window { .. })
        ));
    }
}
