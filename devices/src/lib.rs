//! Keel's device models.
//!
//! Devices here know nothing about KVM: they see register reads and writes
//! through [`bus::BusDevice`] and signal interrupts through eventfds, so each
//! can be driven and tested on its own.

#![deny(missing_docs)]

pub mod bus;
pub mod legacy;
pub mod pci;
pub mod virtio;
