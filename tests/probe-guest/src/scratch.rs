//! Scratch RAM for large DMA buffers (disk data, benchmark buffers), which
//! would not fit the 1 MiB heap: the largest piece of RAM in the memory map
//! above 1 MiB that holds neither the probe image nor anything start_info
//! points at. Handed out by a bump allocator; everything is given back when
//! the [`Scratch`] is dropped.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::Cell;

use crate::arch::{entry, phys};
use crate::start_info::{StartInfo, E820_RAM};

const PAGE: u64 = 4096;
/// Low memory (real-mode area, the AP trampoline, VMM tables) is left alone.
const LOW_LIMIT: u64 = 0x10_0000;
/// Size of a PVH module list entry.
const MODLIST_ENTRY_SIZE: u64 = 32;

/// A bump allocator over free RAM. Only one may exist at a time (they
/// would hand out the same memory).
pub struct Scratch {
    next: Cell<u64>,
    end: u64,
}

impl Scratch {
    /// Finds the free RAM from start_info's memory map.
    pub fn new(info: &StartInfo) -> Result<Self, String> {
        let memmap = info.memmap()?;
        let mut taken: Vec<(u64, u64)> = Vec::new();
        let (image_start, image_end) = entry::image_range();
        taken.push((0, LOW_LIMIT));
        taken.push((image_start, image_end));
        taken.push((info.paddr, info.paddr + 64));
        taken.push((info.cmdline_paddr, info.cmdline_paddr + 4097));
        taken.push((
            info.memmap_paddr,
            info.memmap_paddr + u64::from(info.memmap_entries) * 24,
        ));
        if info.nr_modules != 0 && info.modlist_paddr != 0 {
            let count = u64::from(info.nr_modules.min(64));
            taken.push((
                info.modlist_paddr,
                info.modlist_paddr + count * MODLIST_ENTRY_SIZE,
            ));
            if phys::map(info.modlist_paddr, count * MODLIST_ENTRY_SIZE).is_ok() {
                for i in 0..count {
                    let e = info.modlist_paddr + i * MODLIST_ENTRY_SIZE;
                    let (addr, size) = (phys::read_u64(e), phys::read_u64(e + 8));
                    taken.push((addr, addr.saturating_add(size)));
                }
            }
        }
        let mut best = (0, 0);
        for ram in memmap.iter().filter(|e| e.kind == E820_RAM) {
            // Cut the RAM range at every taken range; keep the largest piece.
            let mut pieces = alloc::vec![(ram.addr, ram.end())];
            for &(t0, t1) in &taken {
                pieces = pieces
                    .into_iter()
                    .flat_map(|(a, b)| {
                        if t1 <= a || t0 >= b {
                            alloc::vec![(a, b)]
                        } else {
                            alloc::vec![(a, t0.max(a)), (t1.min(b), b)]
                        }
                    })
                    .filter(|(a, b)| b > a)
                    .collect();
            }
            for (a, b) in pieces {
                let (a, b) = (a.next_multiple_of(PAGE), b & !(PAGE - 1));
                if b > a && b - a > best.1 - best.0 {
                    best = (a, b);
                }
            }
        }
        if best.1 == best.0 {
            return Err(String::from("no free RAM above the probe image"));
        }
        phys::map(best.0, best.1 - best.0).map_err(|e| format!("scratch RAM: {e}"))?;
        Ok(Scratch {
            next: Cell::new(best.0),
            end: best.1,
        })
    }

    /// Bytes still free.
    pub fn free(&self) -> u64 {
        self.end - self.next.get()
    }

    /// A zeroed, page-aligned buffer of `len` bytes, valid while `self` is.
    #[allow(
        clippy::mut_from_ref,
        reason = "a bump allocator: every call hands out a new, disjoint range"
    )]
    pub fn take(&self, len: usize) -> Result<&mut [u8], String> {
        let start = self.next.get();
        let end = start
            .checked_add((len as u64).next_multiple_of(PAGE))
            .filter(|&e| e <= self.end)
            .ok_or_else(|| {
                format!(
                    "scratch RAM exhausted: {len} bytes wanted, {} free",
                    self.free()
                )
            })?;
        self.next.set(end);
        // SAFETY: [start, start + len) is identity-mapped RAM that nothing
        // else uses (see `new`), handed out once while `self` lives; any
        // byte value is a valid u8 and it is zeroed before use.
        let buf = unsafe { core::slice::from_raw_parts_mut(start as *mut u8, len) };
        buf.fill(0);
        Ok(buf)
    }
}
