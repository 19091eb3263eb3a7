//! The PVH `struct hvm_start_info` the VMM passes in EBX, and what it
//! points to (command line, memory map). Everything here is VMM-provided
//! data: it is validated, never trusted.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::arch::phys;

/// `hvm_start_info.magic`.
pub const MAGIC: u32 = 0x336e_c578;
/// Size of `hvm_start_info` in version 1 (the memory map fields included).
const SIZE_V1: u64 = 56;
/// Size of one memory map entry.
const MEMMAP_ENTRY_SIZE: u64 = 24;
/// More entries than this is taken as garbage.
pub const MAX_MEMMAP_ENTRIES: u32 = 128;
/// Longest command line read (NUL excluded).
pub const MAX_CMDLINE: usize = 4096;
/// Memory map type of usable RAM.
pub const E820_RAM: u32 = 1;

/// The fields of `hvm_start_info` (version 1 layout).
#[derive(Clone, Debug)]
pub struct StartInfo {
    /// Where the structure is.
    pub paddr: u64,
    /// Must be [`MAGIC`].
    pub magic: u32,
    /// Structure version (memmap fields exist from version 1).
    pub version: u32,
    /// SIF_* flags.
    pub flags: u32,
    /// Number of modules at `modlist_paddr`.
    pub nr_modules: u32,
    /// Module list address.
    pub modlist_paddr: u64,
    /// NUL-terminated command line address (0: none).
    pub cmdline_paddr: u64,
    /// ACPI RSDP address (0: none).
    pub rsdp_paddr: u64,
    /// Memory map address.
    pub memmap_paddr: u64,
    /// Number of memory map entries.
    pub memmap_entries: u32,
}

/// One memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemmapEntry {
    /// First address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// E820-style type (1 = RAM).
    pub kind: u32,
}

impl MemmapEntry {
    /// One past the last address (saturating: a wrapping entry is invalid
    /// and reported by the memmap check).
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

impl StartInfo {
    /// Reads the structure at `paddr`; the magic and version are not
    /// checked here (the boot.start_info check does that).
    pub fn read(paddr: u64) -> Result<Self, String> {
        if paddr == 0 {
            return Err(String::from("EBX (start_info address) is 0"));
        }
        phys::map(paddr, SIZE_V1).map_err(|e| format!("start_info at {paddr:#x}: {e}"))?;
        let u32_at = |off: u64| phys::read_u32(paddr + off);
        let u64_at = |off: u64| u64::from(u32_at(off)) | u64::from(u32_at(off + 4)) << 32;
        Ok(StartInfo {
            paddr,
            magic: u32_at(0),
            version: u32_at(4),
            flags: u32_at(8),
            nr_modules: u32_at(12),
            modlist_paddr: u64_at(16),
            cmdline_paddr: u64_at(24),
            rsdp_paddr: u64_at(32),
            memmap_paddr: u64_at(40),
            memmap_entries: u32_at(48),
        })
    }

    /// The structure is one this probe understands (magic, version >= 1).
    pub fn validate(&self) -> Result<(), String> {
        if self.magic != MAGIC {
            return Err(format!("magic {:#x} != {MAGIC:#x}", self.magic));
        }
        if self.version < 1 {
            return Err(format!(
                "version {} < 1 (no memory map fields)",
                self.version
            ));
        }
        Ok(())
    }

    /// The command line: NUL-terminated, at most [`MAX_CMDLINE`] bytes.
    /// Returns the raw bytes (not necessarily ASCII).
    pub fn cmdline(&self) -> Result<Vec<u8>, String> {
        self.validate()?;
        let addr = self.cmdline_paddr;
        if addr == 0 {
            return Err(String::from("cmdline_paddr is 0"));
        }
        phys::map(addr, MAX_CMDLINE as u64 + 1)
            .map_err(|e| format!("cmdline at {addr:#x}: {e}"))?;
        let mut bytes = Vec::new();
        for i in 0..=MAX_CMDLINE as u64 {
            match phys::read_u8(addr + i) {
                0 => return Ok(bytes),
                b => bytes.push(b),
            }
        }
        Err(format!("no NUL within {MAX_CMDLINE} bytes at {addr:#x}"))
    }

    /// The memory map, in the VMM's order.
    pub fn memmap(&self) -> Result<Vec<MemmapEntry>, String> {
        self.validate()?;
        let (addr, count) = (self.memmap_paddr, self.memmap_entries);
        if addr == 0 || count == 0 {
            return Err(format!(
                "no memory map (memmap_paddr {addr:#x}, memmap_entries {count})"
            ));
        }
        if count > MAX_MEMMAP_ENTRIES {
            return Err(format!("memmap_entries {count} > {MAX_MEMMAP_ENTRIES}"));
        }
        phys::map(addr, u64::from(count) * MEMMAP_ENTRY_SIZE)
            .map_err(|e| format!("memmap at {addr:#x}: {e}"))?;
        Ok((0..u64::from(count))
            .map(|i| {
                let e = addr + i * MEMMAP_ENTRY_SIZE;
                MemmapEntry {
                    addr: u64::from(phys::read_u32(e)) | u64::from(phys::read_u32(e + 4)) << 32,
                    size: u64::from(phys::read_u32(e + 8))
                        | u64::from(phys::read_u32(e + 12)) << 32,
                    kind: phys::read_u32(e + 16),
                }
            })
            .collect())
    }
}
