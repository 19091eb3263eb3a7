//! Hardware-reduced ACPI's fixed registers: the sleep-control register
//! (the guest powers the VM off by writing `SLP_TYP = 5 (S5) | SLP_EN`),
//! the sleep-status register next to it (reads 0), and the reset register
//! (the FADT's `RESET_REG`: writing its value resets the machine).

use vm_superio::Trigger;

use super::EventFdTrigger;
use crate::bus::BusDevice;

/// The port of the sleep-control register (the sleep-status register is
/// the next one).
pub const POWER_PORT: u64 = 0x600;
/// The ports the registers occupy: sleep control, sleep status, reset.
pub const POWER_PORT_LEN: u64 = 3;
/// The port of the reset register.
pub const RESET_PORT: u64 = POWER_PORT + RESET_OFFSET;
/// The value that resets the machine when written to the reset register.
pub const RESET_VALUE: u8 = 1;
/// The value that requests S5 (soft off): SLP_TYP=5 in bits 4:2, SLP_EN bit 5.
pub const S5_WRITE: u8 = (5 << 2) | (1 << 5);

const RESET_OFFSET: u64 = 2;

/// The registers; they signal the VMM through eventfds.
pub struct PowerRegisters {
    off: EventFdTrigger,
    reset: EventFdTrigger,
}

impl PowerRegisters {
    /// Registers that trigger `off` when the guest enters S5 and `reset`
    /// when it writes the reset register.
    pub fn new(off: EventFdTrigger, reset: EventFdTrigger) -> Self {
        PowerRegisters { off, reset }
    }
}

impl BusDevice for PowerRegisters {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (evt, what) = match (offset, data.first()) {
            (0, Some(&S5_WRITE)) => (&self.off, "power-off"),
            (RESET_OFFSET, Some(&RESET_VALUE)) => (&self.reset, "reset"),
            _ => return,
        };
        if let Err(e) = evt.trigger() {
            log::error!("{what} request lost: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    fn regs() -> (PowerRegisters, EventFd, EventFd) {
        let off = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let p = PowerRegisters::new(
            EventFdTrigger::try_clone_from(&off).unwrap(),
            EventFdTrigger::try_clone_from(&reset).unwrap(),
        );
        (p, off, reset)
    }

    #[test]
    fn only_s5_powers_off() {
        let (mut p, off, reset) = regs();
        p.write(0, &[5 << 2]); // SLP_TYP without SLP_EN
        p.write(0, &[1 << 5 | 3 << 2]); // S3: not supported, ignored
        assert!(off.read().is_err(), "no event yet");
        p.write(0, &[S5_WRITE]);
        assert_eq!(off.read().unwrap(), 1);
        assert!(reset.read().is_err());
    }

    #[test]
    fn only_the_reset_value_resets() {
        let (mut p, off, reset) = regs();
        p.write(RESET_OFFSET, &[0]);
        p.write(1, &[RESET_VALUE]); // the sleep-status register
        assert!(reset.read().is_err(), "no reset yet");
        p.write(RESET_OFFSET, &[RESET_VALUE]);
        assert_eq!(reset.read().unwrap(), 1);
        assert!(off.read().is_err());
    }
}
