//! A hardware-reduced ACPI style sleep-control register: the guest powers
//! the VM off by writing `SLP_TYP = 5 (S5) | SLP_EN` to it.

use vm_superio::Trigger;

use super::EventFdTrigger;
use crate::bus::BusDevice;

/// The port of the sleep-control register.
pub const POWER_PORT: u64 = 0x600;
/// The value that requests S5 (soft off): SLP_TYP=5 in bits 4:2, SLP_EN bit 5.
pub const S5_WRITE: u8 = (5 << 2) | (1 << 5);

/// The sleep-control register; signals the VMM through an eventfd.
pub struct PowerButton {
    off: EventFdTrigger,
}

impl PowerButton {
    /// A device that triggers `off` when the guest enters S5.
    pub fn new(off: EventFdTrigger) -> Self {
        PowerButton { off }
    }
}

impl BusDevice for PowerButton {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&S5_WRITE) {
            if let Err(e) = self.off.trigger() {
                log::error!("power-off request lost: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn only_s5_powers_off() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut p = PowerButton::new(EventFdTrigger::try_clone_from(&evt).unwrap());
        p.write(0, &[5 << 2]); // SLP_TYP without SLP_EN
        p.write(0, &[1 << 5 | 3 << 2]); // S3: not supported, ignored
        assert!(evt.read().is_err(), "no event yet");
        p.write(0, &[S5_WRITE]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
