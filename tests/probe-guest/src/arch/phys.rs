//! Access to guest-physical memory through the identity map.
//!
//! Memory the VMM wrote (start_info, tables) or that the probe pokes at (RAM
//! ranges, MMIO) is not Rust-owned: these accessors use plain MOVs in inline
//! assembly, so the compiler makes no assumption about it (address 0
//! included), and each call is exactly one access of the given width.

use core::arch::asm;

use super::paging;
pub use super::paging::MapError;

/// Makes `[addr, addr + len)` accessible; see [`paging::map`].
pub fn map(addr: u64, len: u64) -> Result<(), MapError> {
    paging::map(addr, len)
}

/// Reads a byte of guest-physical memory at `addr`, which must be mapped.
pub fn read_u8(addr: u64) -> u8 {
    let value: u8;
    // SAFETY: a single load from an identity-mapped address (the caller has
    // mapped it); it aliases nothing the compiler tracks.
    unsafe {
        asm!("mov {v}, byte ptr [{a}]", a = in(reg) addr, v = out(reg_byte) value,
             options(nostack, preserves_flags, readonly))
    }
    value
}

/// Writes a byte of guest-physical memory at `addr`, which must be mapped
/// and must not hold anything the probe itself is using.
pub fn write_u8(addr: u64, value: u8) {
    // SAFETY: a single store to an identity-mapped address outside
    // Rust-owned memory (the caller's contract).
    unsafe {
        asm!("mov byte ptr [{a}], {v}", a = in(reg) addr, v = in(reg_byte) value,
             options(nostack, preserves_flags))
    }
}

/// Reads a u16 of guest-physical memory at `addr`, which must be mapped.
pub fn read_u16(addr: u64) -> u16 {
    let value: u16;
    // SAFETY: as for `read_u8`.
    unsafe {
        asm!("mov {v:x}, word ptr [{a}]", a = in(reg) addr, v = out(reg) value,
             options(nostack, preserves_flags, readonly))
    }
    value
}

/// Writes a u16 of guest-physical memory at `addr`, which must be mapped
/// and must not hold anything the probe itself is using.
pub fn write_u16(addr: u64, value: u16) {
    // SAFETY: as for `write_u8`.
    unsafe {
        asm!("mov word ptr [{a}], {v:x}", a = in(reg) addr, v = in(reg) value,
             options(nostack, preserves_flags))
    }
}

/// Reads a u32 of guest-physical memory at `addr`, which must be mapped.
pub fn read_u32(addr: u64) -> u32 {
    let value: u32;
    // SAFETY: as for `read_u8`.
    unsafe {
        asm!("mov {v:e}, dword ptr [{a}]", a = in(reg) addr, v = out(reg) value,
             options(nostack, preserves_flags, readonly))
    }
    value
}

/// Reads a u64 of guest-physical memory at `addr`, which must be mapped.
pub fn read_u64(addr: u64) -> u64 {
    let value: u64;
    // SAFETY: as for `read_u8`.
    unsafe {
        asm!("mov {v}, qword ptr [{a}]", a = in(reg) addr, v = out(reg) value,
             options(nostack, preserves_flags, readonly))
    }
    value
}

/// Writes a u32 of guest-physical memory at `addr`, which must be mapped
/// and must not hold anything the probe itself is using.
pub fn write_u32(addr: u64, value: u32) {
    // SAFETY: as for `write_u64`.
    unsafe {
        asm!("mov dword ptr [{a}], {v:e}", a = in(reg) addr, v = in(reg) value,
             options(nostack, preserves_flags))
    }
}

/// Writes a u64 of guest-physical memory at `addr`, which must be mapped
/// and must not hold anything the probe itself is using.
pub fn write_u64(addr: u64, value: u64) {
    // SAFETY: a single store to an identity-mapped address outside
    // Rust-owned memory (the caller's contract).
    unsafe {
        asm!("mov qword ptr [{a}], {v}", a = in(reg) addr, v = in(reg) value,
             options(nostack, preserves_flags))
    }
}

/// Copies `buf.len()` bytes of guest-physical memory at `addr` into `buf`,
/// after mapping them.
pub fn read_bytes(addr: u64, buf: &mut [u8]) -> Result<(), MapError> {
    map(addr, buf.len() as u64)?;
    for (i, b) in buf.iter_mut().enumerate() {
        *b = read_u8(addr + i as u64);
    }
    Ok(())
}
