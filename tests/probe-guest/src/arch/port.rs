//! Port I/O. The probe runs at CPL3 with RFLAGS.IOPL = 3, so IN and OUT are
//! allowed there (and each one the VMM emulates is a VM exit).

use core::arch::asm;

/// Writes `value` to I/O port `port`.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port writes touch no memory of ours; which device they reach
    // is the caller's business, and any port is allowed with IOPL 3.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from I/O port `port`.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}
