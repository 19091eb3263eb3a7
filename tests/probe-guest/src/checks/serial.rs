//! serial.* checks.

use crate::arch::port::{inb, outb};
use crate::fail;
use crate::report::CheckResult;
use crate::serial::{COM1, SCR};

/// serial.scratch: the 16550 scratch register holds what was written.
pub fn scratch() -> CheckResult {
    for value in [0x5a_u8, 0xa5] {
        outb(COM1 + SCR, value);
        let read = inb(COM1 + SCR);
        if read != value {
            fail!("wrote {value:#04x} to the scratch register, read back {read:#04x}");
        }
    }
    Ok(())
}
