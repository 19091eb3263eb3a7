//! Ending the VM, in an order that works on Keel, Firecracker and QEMU.

use crate::arch::{port::outb, syscall, tsc};

/// Keel's ACPI-style power register (PM1 control).
const POWER_PORT: u16 = 0x600;
/// SLP_TYP = 5 (S5) << 2 | SLP_EN (1 << 5).
const POWER_OFF_S5: u8 = (5 << 2) | (1 << 5);
/// The i8042 command port.
const I8042_COMMAND: u16 = 0x64;
/// i8042 command: pulse the CPU reset line.
const I8042_RESET: u8 = 0xfe;
/// Keel's ACPI reset register (the FADT's RESET_REG) and its value.
const ACPI_RESET_PORT: u16 = 0x602;
const ACPI_RESET_VALUE: u8 = 1;
/// Time given to a VMM to act on a request before trying the next.
const GRACE_US: u64 = 20_000;

/// Ends the VM: S5 power-off on port 0x600; if still running, an i8042
/// reset pulse; if still running, a triple fault.
pub fn off() -> ! {
    outb(POWER_PORT, POWER_OFF_S5);
    grace();
    outb(I8042_COMMAND, I8042_RESET);
    grace();
    syscall::triple_fault()
}

/// Resets the machine through the i8042 (how Linux reboots with
/// `reboot=k`); if still running, a triple fault.
pub fn reset() -> ! {
    outb(I8042_COMMAND, I8042_RESET);
    grace();
    syscall::triple_fault()
}

/// Resets the machine through Keel's ACPI reset register (how Linux
/// reboots by default, `reboot=acpi`); if still running, a triple fault.
pub fn acpi_reset() -> ! {
    outb(ACPI_RESET_PORT, ACPI_RESET_VALUE);
    grace();
    syscall::triple_fault()
}

fn grace() {
    tsc::delay_us(GRACE_US);
}
