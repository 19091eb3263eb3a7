//! Creates the devices, places them on the buses and wires their interrupt
//! lines.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::bus::{Bus, BusError};
use devices::legacy::{
    BootTimer, EventFdTrigger, Milestone, PowerButton, Serial, SerialSink, BOOT_TIMER_PORT,
    COM1_IRQ, COM1_PORT, I8042, I8042_PORT_DATA, I8042_PORT_LEN, POWER_PORT, SERIAL_PORT_LEN,
};
use vmm_sys_util::eventfd::EventFd;

use crate::config::SerialConfig;
use crate::vstate::vm::{Vm, VmError};

/// ISA interrupt line of the i8042 keyboard.
const KBD_IRQ: u32 = 1;

/// Errors of device set-up.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The serial log file cannot be created.
    #[error("cannot create serial log {path}: {source}")]
    SerialLog {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    /// An interrupt line could not be wired.
    #[error(transparent)]
    Irq(#[from] VmError),
    /// Two devices claim the same addresses.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// The legacy devices and the VMM's handles on them.
pub struct LegacyDevices {
    /// COM1.
    pub serial: Arc<Mutex<Serial>>,
    /// The keyboard controller (Ctrl-Alt-Del).
    pub i8042: Arc<Mutex<I8042>>,
    /// Boot milestones recorded so far.
    pub milestones: Arc<Mutex<Vec<Milestone>>>,
    /// Signalled when the guest resets through the i8042.
    pub reset_evt: EventFd,
    /// Signalled when the guest enters S5.
    pub power_off_evt: EventFd,
}

fn eventfd() -> Result<EventFd, DeviceError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)
}

fn trigger(evt: &EventFd) -> Result<EventFdTrigger, DeviceError> {
    EventFdTrigger::try_clone_from(evt).map_err(DeviceError::EventFd)
}

/// Builds the serial port, i8042, boot timer and power register, and puts
/// them on `pio`.
pub fn setup_legacy_devices(
    vm: &Vm,
    pio: &mut Bus,
    serial: &SerialConfig,
    start: Instant,
) -> Result<LegacyDevices, DeviceError> {
    let sink = match serial {
        SerialConfig::Stdout => SerialSink::Stdout(std::io::stdout()),
        SerialConfig::Off => SerialSink::Off,
        SerialConfig::File { path } => {
            SerialSink::file(path).map_err(|source| DeviceError::SerialLog {
                path: path.display().to_string(),
                source,
            })?
        }
    };
    let com1_irq = vm.irq_line(COM1_IRQ)?;
    let serial = Arc::new(Mutex::new(Serial::new(EventFdTrigger(com1_irq), sink)));
    pio.insert(serial.clone(), COM1_PORT, SERIAL_PORT_LEN)?;

    let reset_evt = eventfd()?;
    let kbd_irq = vm.irq_line(KBD_IRQ)?;
    let i8042 = Arc::new(Mutex::new(I8042::new(
        EventFdTrigger(kbd_irq),
        trigger(&reset_evt)?,
    )));
    pio.insert(i8042.clone(), I8042_PORT_DATA, I8042_PORT_LEN)?;

    let timer = BootTimer::new(start);
    let milestones = timer.milestones();
    pio.insert(Arc::new(Mutex::new(timer)), BOOT_TIMER_PORT, 1)?;

    let power_off_evt = eventfd()?;
    let power = PowerButton::new(trigger(&power_off_evt)?);
    pio.insert(Arc::new(Mutex::new(power)), POWER_PORT, 1)?;

    Ok(LegacyDevices {
        serial,
        i8042,
        milestones,
        reset_evt,
        power_off_evt,
    })
}
