//! boot.* checks: what the VMM handed over through the PVH boot protocol,
//! and the probe's own execution state.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::arch::asm;
use core::fmt::Write;

use super::Context;
use crate::arch::{entry, phys};
use crate::fail;
use crate::println;
use crate::report::CheckResult;
use crate::start_info::E820_RAM;

/// Keel's 32-bit MMIO hole: RAM below 4 GiB ends here.
pub(super) const MMIO_HOLE_START: u64 = 0xc000_0000;
/// RAM resumes here, above the hole.
pub(super) const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// End of base memory (the EBDA follows).
const EBDA_START: u64 = 0x9fc00;
/// Start of high memory.
const HIMEM_START: u64 = 0x10_0000;

/// boot.start_info: magic, version >= 1, a memory map.
pub fn start_info(ctx: &Context<'_>) -> CheckResult {
    let info = ctx.start_info()?;
    if info.memmap_paddr == 0 || info.memmap_entries == 0 {
        fail!(
            "no memory map (memmap_paddr {:#x}, memmap_entries {})",
            info.memmap_paddr,
            info.memmap_entries
        );
    }
    Ok(())
}

/// boot.cmdline: readable, ASCII, well-formed probe options; the
/// `probe.echo` word, if any, is non-empty (and echoed by `main`).
pub fn cmdline(ctx: &Context<'_>) -> CheckResult {
    let bytes = ctx.cmdline.as_ref().map_err(Clone::clone)?;
    if let Some(i) = bytes
        .iter()
        .position(|&b| !(b.is_ascii_graphic() || b == b' ' || b == b'\t' || b == b'\n'))
    {
        fail!("byte {i} is {:#04x}, not printable ASCII", bytes[i]);
    }
    if !ctx.options.errors.is_empty() {
        fail!("{}", ctx.options.errors.join("; "));
    }
    if ctx.options.echo.is_some_and(str::is_empty) {
        fail!("probe.echo is empty");
    }
    Ok(())
}

/// Keel's RAM layout for `mem` bytes: `[start, end)` ranges.
fn keel_ram_layout(mem: u64) -> Vec<(u64, u64)> {
    let mut ranges = Vec::new();
    ranges.push((0, EBDA_START.min(mem)));
    ranges.push((HIMEM_START, mem.min(MMIO_HOLE_START)));
    if mem > MMIO_HOLE_START {
        ranges.push((MMIO_HOLE_END, MMIO_HOLE_END + (mem - MMIO_HOLE_START)));
    }
    ranges.retain(|(start, end)| end > start);
    ranges
}

fn format_ranges(ranges: &[(u64, u64)]) -> String {
    let mut text = String::new();
    for (i, (start, end)) in ranges.iter().enumerate() {
        let sep = if i == 0 { "" } else { " " };
        let _ = write!(text, "{sep}[{start:#x},{end:#x})");
    }
    text
}

/// Writes the complement of the 8 bytes at `addr`, reads them back, and
/// restores them.
fn touch(addr: u64) -> CheckResult {
    phys::map(addr, 8).map_err(|e| alloc::format!("RAM at {addr:#x}: {e}"))?;
    let old = phys::read_u64(addr);
    phys::write_u64(addr, !old);
    let read = phys::read_u64(addr);
    phys::write_u64(addr, old);
    if read != !old {
        fail!("RAM at {addr:#x}: wrote {:#x}, read back {read:#x}", !old);
    }
    let restored = phys::read_u64(addr);
    if restored != old {
        fail!("RAM at {addr:#x}: restored {old:#x}, read back {restored:#x}");
    }
    Ok(())
}

/// boot.memmap: entries sorted and disjoint; RAM as Keel lays it out for
/// `probe.mem`; the first and last 8 bytes of every RAM range usable.
/// Reports every problem found.
pub fn memmap(ctx: &Context<'_>) -> CheckResult {
    let mut map = ctx.start_info()?.memmap()?;
    let mut listing = String::new();
    for e in &map {
        let _ = write!(listing, " [{:#x},{:#x}):{}", e.addr, e.end(), e.kind);
    }
    println!("probe: memmap{listing}");
    let mut errors = Vec::new();
    for (i, e) in map.iter().enumerate() {
        if e.size == 0 {
            errors.push(format!("entry {i} at {:#x} is empty", e.addr));
        }
        if e.addr.checked_add(e.size).is_none() {
            errors.push(format!(
                "entry {i} at {:#x} size {:#x} wraps around",
                e.addr, e.size
            ));
        }
    }
    map.retain(|e| e.size != 0);
    if let Some(i) = (1..map.len()).find(|&i| map[i - 1].addr > map[i].addr) {
        errors.push(format!(
            "not sorted: [{:#x},..) follows [{:#x},..)",
            map[i].addr,
            map[i - 1].addr
        ));
        map.sort_by_key(|e| e.addr);
    }
    for pair in map.windows(2) {
        if pair[0].end() > pair[1].addr {
            errors.push(format!(
                "[{:#x},{:#x}) and [{:#x},{:#x}) overlap",
                pair[0].addr,
                pair[0].end(),
                pair[1].addr,
                pair[1].end()
            ));
        }
    }
    let ram: Vec<(u64, u64)> = map
        .iter()
        .filter(|e| e.kind == E820_RAM)
        .map(|e| (e.addr, e.end()))
        .collect();
    if ram.is_empty() {
        errors.push(format!("no RAM entry (type {E820_RAM})"));
    }
    match ctx.options.mem {
        Some(mem) => {
            let want = keel_ram_layout(mem);
            if ram != want {
                errors.push(format!(
                    "RAM {} != expected {} for probe.mem={mem}",
                    format_ranges(&ram),
                    format_ranges(&want)
                ));
            }
        }
        None => {
            let (start, end) = entry::image_range();
            if !ram.iter().any(|&(s, e)| s <= start && end <= e) {
                errors.push(format!(
                    "the probe image [{start:#x},{end:#x}) is not inside RAM {}",
                    format_ranges(&ram)
                ));
            }
        }
    }
    for &(start, end) in &ram {
        let last = end.saturating_sub(8).max(start);
        for addr in if last > start {
            [Some(start), Some(last)]
        } else {
            [Some(start), None]
        }
        .into_iter()
        .flatten()
        {
            if let Err(e) = touch(addr) {
                errors.push(e);
            }
        }
    }
    if !errors.is_empty() {
        fail!("{}", errors.join("; "));
    }
    Ok(())
}

/// boot.cpl3: the checks run at CPL3.
///
/// RFLAGS.IOPL is entered as 3 but not checked: a software KVM that runs
/// the guest on hardware CPL3 (PVM) keeps no guest IOPL, and port I/O works
/// there through the TSS I/O bitmap instead (see `arch::gdt`).
pub fn cpl3() -> CheckResult {
    let cs: u64;
    // SAFETY: reads CS.
    unsafe { asm!("mov {cs:e}, cs", cs = out(reg) cs, options(nomem, nostack, preserves_flags)) };
    if cs & 3 != 3 {
        fail!("CS {cs:#x}: CPL {}, want 3", cs & 3);
    }
    Ok(())
}
