//! The identity map: guest-physical address == virtual address, every page
//! present, writable and user-accessible (U/S=1), so that CPL3 code can
//! reach RAM, MMIO, and the CPU's own tables.
//!
//! The tables are static data in the image, so the entry code only loads
//! CR3:
//! - with 1 GiB pages (CPUID pdpe1gb): one PDPT maps the first 512 GiB;
//! - without: the entry code switches PML4[0] to a second PDPT that maps
//!   only the first GiB, with 2 MiB pages; [`init`] and [`map`] then add
//!   more GiBs from CPL3 (page directories from a small pool), which is
//!   cheap there, and flush the TLB through the syscall gate.

use core::arch::global_asm;
use core::sync::atomic::{AtomicUsize, Ordering};

use super::syscall;

/// One past the highest guest-physical address the identity map can cover.
pub const IDENTITY_LIMIT: u64 = 512 << 30;
/// Present | writable | user.
const PTE_PRW_U: u64 = 0x7;
/// Present | writable | user | large page.
const PTE_LARGE: u64 = 0x87;
const GIB: u64 = 1 << 30;
const ENTRIES: usize = 512;
/// Page directories available to the 2 MiB-page fallback: the 4 GiBs below
/// 4 GiB (first one static) and a few more for RAM and MMIO above.
const PD_POOL: usize = 8;

global_asm!(
    r#"
    .pushsection .data.page_tables, "aw"
    .balign 4096
    .globl pml4_table
pml4_table:
    .quad pdpt_1g + {PRW_U}
    .fill 511, 8, 0

    .globl pdpt_1g
pdpt_1g:
    .set gib, 0
    .rept 512
    .quad (gib << 30) | {LARGE}
    .set gib, gib + 1
    .endr

    .globl pdpt_2m
pdpt_2m:
    .quad pd_first_gib + {PRW_U}
    .fill 511, 8, 0

pd_first_gib:
    .set mib2, 0
    .rept 512
    .quad (mib2 << 21) | {LARGE}
    .set mib2, mib2 + 1
    .endr
    .popsection
"#,
    PRW_U = const PTE_PRW_U,
    LARGE = const PTE_LARGE,
    options(att_syntax)
);

/// A 4 KiB page-table page.
#[repr(C, align(4096))]
struct Table([u64; ENTRIES]);

extern "C" {
    static pml4_table: Table;
    static pdpt_1g: Table;
    static mut pdpt_2m: Table;
}

/// Page directories for the fallback, taken in order.
static mut PD_POOL_PAGES: [Table; PD_POOL] = [const { Table([0; ENTRIES]) }; PD_POOL];
static PD_POOL_USED: AtomicUsize = AtomicUsize::new(0);

/// Why an address range cannot be made accessible.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// The range reaches past [`IDENTITY_LIMIT`] (or wraps around).
    BeyondIdentityMap,
    /// 2 MiB-page fallback only: no page directory left in the pool.
    PoolExhausted,
}

impl core::fmt::Display for MapError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MapError::BeyondIdentityMap => {
                write!(f, "beyond the {} GiB identity map", IDENTITY_LIMIT >> 30)
            }
            MapError::PoolExhausted => write!(f, "no page directory left for the 2 MiB-page map"),
        }
    }
}

/// Whether the entry code found 1 GiB pages (the whole identity map is
/// then present from the start).
pub fn uses_1g_pages() -> bool {
    // SAFETY: a read of a page-table entry that only the entry code writes.
    let pml4e = unsafe { core::ptr::read_volatile(&raw const pml4_table.0[0]) };
    pml4e & !0xfff == &raw const pdpt_1g as u64
}

/// Completes the map below 4 GiB (RAM, MMIO hole, local APIC), which the
/// interrupt path needs. Call once at CPL3 before enabling interrupts.
pub fn init() {
    // A pool this size always covers the first 4 GiB: the result is Ok.
    let _ = map(0, 4 * GIB);
}

/// Makes `[start, start + len)` accessible through the identity map.
pub fn map(start: u64, len: u64) -> Result<(), MapError> {
    let end = start.checked_add(len).ok_or(MapError::BeyondIdentityMap)?;
    if end > IDENTITY_LIMIT {
        return Err(MapError::BeyondIdentityMap);
    }
    if uses_1g_pages() || len == 0 {
        return Ok(());
    }
    let mut added = false;
    let mut result = Ok(());
    for gib in start / GIB..end.div_ceil(GIB) {
        // SAFETY: single-threaded CPL3 code owns the fallback PDPT; the
        // entry is read and written through raw pointers, no references.
        let entry = unsafe { &raw mut pdpt_2m.0[gib as usize] };
        // SAFETY: as above.
        if unsafe { entry.read_volatile() } != 0 {
            continue;
        }
        let index = PD_POOL_USED.fetch_add(1, Ordering::Relaxed);
        if index >= PD_POOL {
            result = Err(MapError::PoolExhausted);
            break;
        }
        // SAFETY: pool page `index` was just handed out, to this GiB only.
        let pd = unsafe { &raw mut PD_POOL_PAGES[index] }.cast::<u64>();
        for i in 0..ENTRIES {
            // SAFETY: i < ENTRIES, inside the page directory.
            unsafe {
                pd.add(i)
                    .write((gib * GIB + ((i as u64) << 21)) | PTE_LARGE)
            };
        }
        // SAFETY: the page directory is complete before it is linked in.
        unsafe { entry.write_volatile(pd as u64 | PTE_PRW_U) };
        added = true;
    }
    if added {
        syscall::flush_tlb();
    }
    result
}
