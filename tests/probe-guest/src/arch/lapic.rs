//! The local APIC (xAPIC, MMIO at 0xfee00000), programmed from CPL3
//! through the identity map.

use super::phys;
use super::tsc::delay_us;

/// Guest-physical base of the local APIC.
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// Spurious interrupt vector register: bit 8 enables the APIC.
const SVR: u64 = 0xf0;
/// Interrupt Request Register: 8 registers of 32 vectors, 0x10 apart.
const IRR: u64 = 0x200;
/// Interrupt command register, low and high halves.
const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;
const SVR_ENABLE: u32 = 1 << 8;
/// Delivery status: the IPI has not been accepted yet.
const ICR_PENDING: u32 = 1 << 12;
const ICR_INIT: u32 = 5 << 8;
const ICR_STARTUP: u32 = 6 << 8;
const ICR_ASSERT: u32 = 1 << 14;
/// Destination shorthand: all processors but the sender.
const ICR_ALL_BUT_SELF: u32 = 3 << 18;

fn read(reg: u64) -> u32 {
    phys::read_u32(LAPIC_BASE + reg)
}

fn write(reg: u64, value: u32) {
    phys::write_u32(LAPIC_BASE + reg, value);
}

/// Software-enables the local APIC (spurious vector 0xff).
pub fn enable() -> Result<(), phys::MapError> {
    phys::map(LAPIC_BASE, 0x1000)?;
    write(SVR, SVR_ENABLE | u32::from(super::idt::SPURIOUS_VECTOR));
    Ok(())
}

/// The local APIC's ID (bits 31:24 of its ID register).
pub fn id() -> u32 {
    read(0x20) >> 24
}

/// Whether `vector` is pending in the Interrupt Request Register (accepted
/// by the local APIC, not yet delivered to the processor).
pub fn requested(vector: u8) -> bool {
    let reg = IRR + 0x10 * u64::from(vector / 32);
    read(reg) & (1 << (vector % 32)) != 0
}

fn send_ipi(command: u32) {
    write(ICR_HIGH, 0);
    write(ICR_LOW, command);
    for _ in 0..1000 {
        if read(ICR_LOW) & ICR_PENDING == 0 {
            break;
        }
    }
}

/// Wakes every other processor with INIT, SIPI, SIPI (the MP
/// specification's universal startup algorithm) to real-mode code at
/// `page` (4 KiB-aligned, below 1 MiB).
pub fn start_aps(page: u64) {
    let vector = (page >> 12) as u32 & 0xff;
    send_ipi(ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_INIT);
    delay_us(10_000);
    for _ in 0..2 {
        send_ipi(ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_STARTUP | vector);
        delay_us(200);
    }
}
