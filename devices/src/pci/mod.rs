//! The PCI bus the guest enumerates: one segment, bus 0, a host bridge at
//! 00:00.0 and up to 31 more functions (function 0 of each slot).
//!
//! - [`config`]: a function's configuration header, write masks, BARs and
//!   capabilities;
//! - [`root`]: the bus itself, which routes configuration accesses by
//!   device number, and the host bridge;
//! - [`access`]: the two ways in, the legacy 0xCF8/0xCFC ports and the ECAM
//!   MMIO window, both [`crate::bus::BusDevice`]s;
//! - [`bars`]: where BARs go, from a 32-bit window below 4 GiB and a 64-bit
//!   window above RAM (rust-vmm's `vm-allocator`);
//! - [`msix`]: MSI-X tables and pending bits;
//! - [`windows`]: the BAR windows on the VMM's bus, which follow BAR moves.

pub mod access;
pub mod bars;
pub mod config;
pub mod msix;
pub mod root;
pub mod windows;

pub use config::{Bar, BarKind, BarMove, PciConfiguration, PciIds};
pub use root::{HostBridge, PciRoot};

/// Why a configuration header cannot take a BAR or capability.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The BAR index is out of range or already used.
    #[error("BAR index {0} is out of range or taken")]
    BarIndex(usize),
    /// The size is no power of two, below 16 bytes, or too big for 32 bits.
    #[error("invalid BAR size {0:#x}")]
    BarSize(u64),
    /// The address is not aligned to the size, or too high for 32 bits.
    #[error("invalid BAR address {0:#x}")]
    BarAddress(u64),
    /// The capability does not fit in the configuration space.
    #[error("no room for a {0}-byte capability")]
    CapabilitySpace(usize),
}

/// A PCI function: what the bus needs of a device model.
pub trait PciDevice: Send {
    /// A configuration-space read of `data.len()` bytes at `offset`.
    fn config_read(&mut self, offset: usize, data: &mut [u8]);
    /// A configuration-space write; returns the BARs it moved, which the VMM
    /// must then serve at their new addresses.
    fn config_write(&mut self, offset: usize, data: &[u8]) -> Vec<BarMove>;
}
