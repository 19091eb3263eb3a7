//! Legacy PC devices on port I/O: 16550 serial, i8042, boot timer, power-off.

mod boot_timer;
mod i8042;
mod power;
mod rtc;
mod serial;

pub use boot_timer::{BootTimer, Milestone, BOOT_TIMER_PORT};
pub use i8042::{I8042Error, I8042, I8042_PORT_DATA, I8042_PORT_LEN};
pub use power::{PowerButton, POWER_PORT, S5_WRITE};
pub use rtc::{Clock, Cmos, RTC_CENTURY_REG, RTC_IRQ, RTC_PORT, RTC_PORT_LEN};
pub use serial::{
    ConsoleHub, OutputWatcher, Serial, SerialSink, TeeSink, COM1_IRQ, COM1_PORT, SERIAL_PORT_LEN,
};

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
