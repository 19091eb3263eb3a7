//! A Generic Event Device (ACPI `ACPI0013`, hardware-reduced ACPI's way to
//! signal events): one event register on port I/O and an interrupt line.
//!
//! The VMM raises an event (today only the power button) by setting its
//! bit and pulsing the interrupt; the guest's GED driver runs the DSDT's
//! `_EVT` method, which reads the register (reading clears it) and
//! `Notify`s the device the bit stands for (the power button, `PNP0C0C`,
//! with 0x80: pressed). The layout follows Cloud Hypervisor's GED, but on
//! a port rather than an MMIO page.

use vm_superio::Trigger;

use super::EventFdTrigger;
use crate::bus::{read_byte_register, BusDevice};

/// The GED's event register (one byte).
pub const GED_PORT: u64 = 0x608;
/// The GED's interrupt line (ISA IRQ 3: no COM2 here; edge, active high).
pub const GED_IRQ: u32 = 3;
/// Event bit: the power button was pressed.
pub const GED_POWER_BUTTON: u8 = 1 << 0;

/// The Generic Event Device.
pub struct Ged {
    pending: u8,
    irq: EventFdTrigger,
}

impl Ged {
    /// A GED that signals the guest on `irq`.
    pub fn new(irq: EventFdTrigger) -> Self {
        Ged { pending: 0, irq }
    }

    /// Records `event` (a `GED_*` bit) and interrupts the guest.
    pub fn notify(&mut self, event: u8) -> std::io::Result<()> {
        self.pending |= event;
        self.irq.trigger()
    }
}

impl BusDevice for Ged {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The event register clears when read (an empty access reads nothing).
        let value = if offset == 0 && !data.is_empty() {
            std::mem::take(&mut self.pending)
        } else {
            0
        };
        read_byte_register(data, value);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn an_event_interrupts_once_and_reading_clears_it() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut g = Ged::new(EventFdTrigger::try_clone_from(&evt).unwrap());
        let mut b = [0xffu8];
        g.read(0, &mut b);
        assert_eq!(b[0], 0, "nothing pending");
        assert!(evt.read().is_err(), "no interrupt yet");
        g.notify(GED_POWER_BUTTON).unwrap();
        assert_eq!(evt.read().unwrap(), 1);
        g.read(0, &mut b);
        assert_eq!(b[0], GED_POWER_BUTTON);
        g.read(0, &mut b);
        assert_eq!(b[0], 0, "read clears");
    }
}
