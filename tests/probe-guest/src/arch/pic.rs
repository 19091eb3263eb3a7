//! The legacy 8259 PICs: masked, so that nothing arrives through them. An
//! uninitialized 8259 would deliver IRQs on vectors 0-15 (the exception
//! vectors); the probe uses the local APIC for any interrupt it wants.

use super::port::outb;

const PIC1_DATA: u16 = 0x21;
const PIC2_DATA: u16 = 0xa1;

/// Masks every IRQ line of both PICs (OCW1). Harmless where there is none.
pub fn mask_all() {
    outb(PIC1_DATA, 0xff);
    outb(PIC2_DATA, 0xff);
}
