//! Legacy PC devices on port I/O: 16550 serial, i8042, CMOS RTC, boot timer,
//! ACPI sleep-control and reset registers, ACPI Generic Event Device.

mod boot_timer;
mod ged;
mod i8042;
mod power;
mod rtc;
mod serial;
mod serial_log;

pub use boot_timer::{BootTimer, Milestone, BOOT_TIMER_PORT};
pub use ged::{Ged, GED_IRQ, GED_PORT, GED_POWER_BUTTON};
pub use i8042::{I8042Error, I8042, I8042_PORT_DATA, I8042_PORT_LEN};
pub use power::{PowerRegisters, POWER_PORT, POWER_PORT_LEN, RESET_PORT, RESET_VALUE, S5_WRITE};
pub use rtc::{Clock, Cmos, RTC_CENTURY_REG, RTC_IRQ, RTC_PORT, RTC_PORT_LEN};
pub use serial::{
    ConsoleHub, OutputWatcher, Serial, SerialCounters, SerialSink, TeeSink, COM1_IRQ, COM1_PORT,
    SERIAL_PORT_LEN,
};
pub use serial_log::RotatingLog;

use vmm_sys_util::eventfd::EventFd;

/// An eventfd that device models signal: an interrupt line (irqfd) or a
/// request to the VMM (reset, power-off).
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl EventFdTrigger {
    /// Wraps a duplicate of `evt`, so the VMM keeps its own handle.
    pub fn try_clone_from(evt: &EventFd) -> std::io::Result<Self> {
        Ok(EventFdTrigger(evt.try_clone()?))
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
