//! Finding and parsing an Intel MultiProcessor Specification 1.4 table.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::arch::phys;
use crate::table_bytes::{checksum_ok, read};

/// Where the MP floating pointer may be (16-byte aligned): the first KiB of
/// the EBDA, and the BIOS ROM area.
const SEARCH_AREAS: [(u64, u64); 2] = [(0x9fc00, 0xa0000), (0xf0000, 0x100000)];
const FLOATING_SIGNATURE: &[u8; 4] = b"_MP_";
const CONFIG_SIGNATURE: &[u8; 4] = b"PCMP";
/// Size of the configuration table header; entries follow.
const CONFIG_HEADER_SIZE: usize = 44;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const PROCESSOR_ENTRY_SIZE: usize = 20;
const OTHER_ENTRY_SIZE: usize = 8;

/// A processor entry.
#[derive(Clone, Copy, Debug)]
pub struct Processor {
    /// Local APIC ID.
    pub apic_id: u8,
    /// CPU_EN.
    pub enabled: bool,
    /// CPU_BP: the bootstrap processor.
    pub bsp: bool,
}

/// An I/O APIC entry.
#[derive(Clone, Copy, Debug)]
pub struct IoApic {
    /// I/O APIC ID.
    pub id: u8,
    /// IOAPIC_EN.
    pub enabled: bool,
    /// MMIO base address.
    pub addr: u32,
}

/// What the probe uses of an MP table.
#[derive(Clone, Debug)]
pub struct MpTable {
    /// Address of the floating pointer structure.
    pub floating_addr: u64,
    /// Address of the configuration table.
    pub config_addr: u64,
    /// Processor entries, in table order.
    pub processors: Vec<Processor>,
    /// I/O APIC entries.
    pub ioapics: Vec<IoApic>,
    /// The header's entry count.
    pub header_entry_count: u16,
    /// Entries found in the table's length (which is what Linux walks).
    pub entries: usize,
}

/// Finds the floating pointer, checks both checksums, parses the entries
/// (all of the table's length, as Linux does, whatever the header's count).
pub fn find() -> Result<MpTable, String> {
    let floating_addr = SEARCH_AREAS
        .iter()
        .flat_map(|&(start, end)| (start..end).step_by(16))
        .find(|&addr| {
            phys::map(addr, 4).is_ok() && phys::read_u32(addr).to_le_bytes() == *FLOATING_SIGNATURE
        })
        .ok_or_else(|| {
            String::from("no \"_MP_\" floating pointer in 0x9fc00..0xa0000 or 0xf0000..0x100000")
        })?;
    let head = read(floating_addr, 16)?;
    let length = usize::from(head[8]) * 16;
    if length < 16 {
        return Err(format!(
            "floating pointer at {floating_addr:#x}: length {length}"
        ));
    }
    if !checksum_ok(&read(floating_addr, length)?) {
        return Err(format!(
            "floating pointer at {floating_addr:#x}: bad checksum"
        ));
    }
    if head[11] != 0 {
        return Err(format!(
            "floating pointer at {floating_addr:#x}: default configuration {} (no table)",
            head[11]
        ));
    }
    let config_addr = u64::from(u32::from_le_bytes([head[4], head[5], head[6], head[7]]));
    if config_addr == 0 {
        return Err(format!(
            "floating pointer at {floating_addr:#x}: no configuration table"
        ));
    }
    let header = read(config_addr, CONFIG_HEADER_SIZE)?;
    if &header[..4] != CONFIG_SIGNATURE {
        return Err(format!("no \"PCMP\" signature at {config_addr:#x}"));
    }
    let length = usize::from(u16::from_le_bytes([header[4], header[5]]));
    if length < CONFIG_HEADER_SIZE {
        return Err(format!(
            "configuration table at {config_addr:#x}: length {length}"
        ));
    }
    let table = read(config_addr, length)?;
    if !checksum_ok(&table) {
        return Err(format!(
            "configuration table at {config_addr:#x}: bad checksum"
        ));
    }
    let mut mp = MpTable {
        floating_addr,
        config_addr,
        processors: Vec::new(),
        ioapics: Vec::new(),
        header_entry_count: u16::from_le_bytes([header[34], header[35]]),
        entries: 0,
    };
    let mut off = CONFIG_HEADER_SIZE;
    while let Some(&kind) = table.get(off) {
        let i = mp.entries;
        let size = match kind {
            ENTRY_PROCESSOR => PROCESSOR_ENTRY_SIZE,
            ENTRY_BUS | ENTRY_IOAPIC | ENTRY_IO_INTERRUPT | ENTRY_LOCAL_INTERRUPT => {
                OTHER_ENTRY_SIZE
            }
            other => return Err(format!("entry {i} at offset {off}: unknown type {other}")),
        };
        let entry = table
            .get(off..off + size)
            .ok_or_else(|| format!("entry {i} lies past the table's end"))?;
        match kind {
            ENTRY_PROCESSOR => mp.processors.push(Processor {
                apic_id: entry[1],
                enabled: entry[3] & 1 != 0,
                bsp: entry[3] & 2 != 0,
            }),
            ENTRY_IOAPIC => mp.ioapics.push(IoApic {
                id: entry[1],
                enabled: entry[3] & 1 != 0,
                addr: u32::from_le_bytes([entry[4], entry[5], entry[6], entry[7]]),
            }),
            _ => {}
        }
        off += size;
        mp.entries += 1;
    }
    Ok(mp)
}
