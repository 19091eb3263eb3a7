//! Finding the ACPI tables (RSDP, XSDT) and reading the SRAT and SLIT.
//!
//! The RSDP comes from start_info when the VMM gives it, else from a scan
//! of the BIOS area 0xe0000..0x100000 (as Linux does). Every table's length
//! and checksum are checked before it is used.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::table_bytes::{checksum_ok, read};

/// Where the RSDP may be (16-byte aligned) without a pointer to it.
const RSDP_AREA: (u64, u64) = (0xe_0000, 0x10_0000);
const RSDP_SIGNATURE: &[u8; 8] = b"RSD PTR ";
/// The standard table header.
const HEADER_LEN: usize = 36;
/// Largest table the probe reads.
const MAX_TABLE_LEN: usize = 1 << 20;

/// SRAT header: the standard one, a reserved dword (1), eight reserved bytes.
const SRAT_HEADER_LEN: usize = 48;
/// SRAT: processor local APIC affinity.
const SRAT_LOCAL_APIC: u8 = 0;
/// SRAT: memory affinity.
const SRAT_MEMORY: u8 = 1;
/// SRAT: processor local x2APIC affinity.
const SRAT_LOCAL_X2APIC: u8 = 2;

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from(u32_at(b, o)) | (u64::from(u32_at(b, o + 4)) << 32)
}

/// One table listed by the XSDT.
pub struct Table {
    /// Its guest-physical address.
    pub addr: u64,
    /// All its bytes (checksum verified).
    pub bytes: Vec<u8>,
}

impl Table {
    /// The signature, as text.
    pub fn signature(&self) -> &str {
        core::str::from_utf8(&self.bytes[..4]).unwrap_or("????")
    }
}

/// The RSDP's address: `hint` (start_info's `rsdp_paddr`) or a scan.
fn find_rsdp(hint: u64) -> Result<u64, String> {
    if hint != 0 {
        return Ok(hint);
    }
    let (start, end) = RSDP_AREA;
    (start..end)
        .step_by(16)
        .find(|&a| read(a, 8).is_ok_and(|s| s == RSDP_SIGNATURE))
        .ok_or_else(|| format!("no \"RSD PTR \" in {start:#x}..{end:#x}"))
}

/// Reads the table at `addr`, checking its length and checksum.
fn table(addr: u64) -> Result<Table, String> {
    let head = read(addr, HEADER_LEN)?;
    let len = u32_at(&head, 4) as usize;
    if !(HEADER_LEN..=MAX_TABLE_LEN).contains(&len) {
        return Err(format!("table at {addr:#x}: length {len}"));
    }
    let bytes = read(addr, len)?;
    if !checksum_ok(&bytes) {
        return Err(format!(
            "table {:?} at {addr:#x}: bad checksum",
            &bytes[..4]
        ));
    }
    Ok(Table { addr, bytes })
}

/// Every table the XSDT lists, in order (RSDP revision 2 or later).
pub fn tables(rsdp_hint: u64) -> Result<Vec<Table>, String> {
    let rsdp_addr = find_rsdp(rsdp_hint)?;
    let rsdp = read(rsdp_addr, 36)?;
    if &rsdp[..8] != RSDP_SIGNATURE {
        return Err(format!("no RSDP signature at {rsdp_addr:#x}"));
    }
    if !checksum_ok(&rsdp[..20]) {
        return Err(format!("RSDP at {rsdp_addr:#x}: bad checksum"));
    }
    if rsdp[15] < 2 {
        return Err(format!(
            "RSDP at {rsdp_addr:#x}: revision {}, no XSDT",
            rsdp[15]
        ));
    }
    if !checksum_ok(&rsdp) {
        return Err(format!("RSDP at {rsdp_addr:#x}: bad extended checksum"));
    }
    let xsdt = table(u64_at(&rsdp, 24))?;
    if &xsdt.bytes[..4] != b"XSDT" {
        return Err(format!(
            "RSDP points at {:?}, not an XSDT",
            &xsdt.bytes[..4]
        ));
    }
    (HEADER_LEN..xsdt.bytes.len())
        .step_by(8)
        .map(|o| {
            let entry = xsdt
                .bytes
                .get(o..o + 8)
                .ok_or_else(|| String::from("XSDT length not header + 8n"))?;
            table(u64_at(entry, 0))
        })
        .collect()
}

/// What an SRAT says.
#[derive(Debug, Default)]
pub struct Srat {
    /// (APIC ID, proximity domain) of each enabled processor entry.
    pub cpus: Vec<(u32, u32)>,
    /// (proximity domain, base, length) of each enabled memory entry.
    pub memory: Vec<(u32, u64, u64)>,
}

/// Parses an SRAT's processor and memory affinity structures.
pub fn parse_srat(t: &[u8]) -> Result<Srat, String> {
    if t.len() < SRAT_HEADER_LEN {
        return Err(format!("SRAT of {} bytes", t.len()));
    }
    let mut srat = Srat::default();
    let mut o = SRAT_HEADER_LEN;
    while o < t.len() {
        let (kind, len) = match t.get(o..o + 2) {
            Some(&[k, l]) => (k, usize::from(l)),
            _ => return Err(format!("SRAT structure at {o} cut short")),
        };
        let s = t
            .get(o..o + len)
            .filter(|_| len >= 2)
            .ok_or_else(|| format!("SRAT structure at {o}: length {len}"))?;
        match (kind, len) {
            (SRAT_LOCAL_APIC, 16) if u32_at(s, 4) & 1 != 0 => {
                let domain = u32::from(s[2]) | (u32_at(s, 8) & 0xffff_ff00);
                srat.cpus.push((u32::from(s[3]), domain));
            }
            (SRAT_LOCAL_X2APIC, 24) if u32_at(s, 12) & 1 != 0 => {
                srat.cpus.push((u32_at(s, 8), u32_at(s, 4)));
            }
            (SRAT_MEMORY, 40) if u32_at(s, 28) & 1 != 0 => {
                srat.memory
                    .push((u32_at(s, 2), u64_at(s, 8), u64_at(s, 16)));
            }
            (SRAT_LOCAL_APIC, 16) | (SRAT_LOCAL_X2APIC, 24) | (SRAT_MEMORY, 40) => {}
            (kind, len) => return Err(format!("SRAT structure at {o}: type {kind}, length {len}")),
        }
        o += len;
    }
    Ok(srat)
}

/// Parses a SLIT: the number of localities and the N x N distances.
pub fn parse_slit(t: &[u8]) -> Result<(usize, Vec<u8>), String> {
    let n = t
        .get(HEADER_LEN..HEADER_LEN + 8)
        .map(|b| u64_at(b, 0))
        .ok_or_else(|| format!("SLIT of {} bytes", t.len()))?;
    let n = usize::try_from(n)
        .ok()
        .filter(|&n| n <= 256)
        .ok_or_else(|| format!("SLIT with {n} localities"))?;
    let matrix = t
        .get(HEADER_LEN + 8..)
        .filter(|m| m.len() == n * n)
        .ok_or_else(|| format!("SLIT of {} bytes for {n} localities", t.len()))?;
    Ok((n, matrix.to_vec()))
}
