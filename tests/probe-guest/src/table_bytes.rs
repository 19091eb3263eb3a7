//! Reading firmware tables (MP table, ACPI) out of guest-physical memory:
//! their bytes and the byte-sum checksum they all use.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::arch::phys;

/// Whether `bytes` sum to zero (mod 256), as every table's checksum makes them.
pub fn checksum_ok(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) == 0
}

/// `len` bytes of guest-physical memory at `addr`.
pub fn read(addr: u64, len: usize) -> Result<Vec<u8>, String> {
    let mut buf = alloc::vec![0; len];
    phys::read_bytes(addr, &mut buf).map_err(|e| format!("{len} bytes at {addr:#x}: {e}"))?;
    Ok(buf)
}
