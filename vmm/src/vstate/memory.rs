//! Guest memory: anonymous mappings (or 2 MiB hugetlbfs pages) laid out
//! around the 32-bit MMIO hole.

use std::path::Path;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::arch::x86_64::layout;
use crate::config::HugepagesMode;

/// Size of one hugetlbfs page.
pub const HUGEPAGE_SIZE: u64 = 2 << 20;
const HUGEPAGES_SYSFS: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

/// Errors of creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Not enough free hugepages for hugepage-backed memory.
    #[error("guest memory needs {needed} free 2 MiB hugepages but only {free} are free (raise {HUGEPAGES_SYSFS}/nr_hugepages)")]
    NotEnoughHugepages {
        /// Pages the guest needs.
        needed: u64,
        /// Pages free on the host.
        free: u64,
    },
    /// The host has no 2 MiB hugepage pool.
    #[error("the host has no 2 MiB hugepage pool for guest memory ({HUGEPAGES_SYSFS}: {0})")]
    NoHugepagePool(std::io::Error),
    /// mmap failed.
    #[error("cannot map {size} bytes of guest memory at {addr:#x}: {source}")]
    Mmap {
        /// Region size.
        size: u64,
        /// Region guest address.
        addr: u64,
        /// Why.
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The regions could not form a guest memory map.
    #[error("cannot build the guest memory map: {0}")]
    Regions(String),
}

/// Free 2 MiB hugepages on the host.
pub fn free_hugepages() -> Result<u64, MemoryError> {
    read_hugepage_count(Path::new(HUGEPAGES_SYSFS), "free_hugepages")
}

fn read_hugepage_count(dir: &Path, name: &str) -> Result<u64, MemoryError> {
    let text = std::fs::read_to_string(dir.join(name)).map_err(MemoryError::NoHugepagePool)?;
    text.trim().parse().map_err(|_| {
        MemoryError::NoHugepagePool(std::io::Error::other(format!(
            "unreadable {name}: {text:?}"
        )))
    })
}

/// Maps `size` bytes of guest memory with the usual x86 layout (see
/// [`layout::ram_ranges`]). With `hugepages`, the whole amount is reserved
/// from the host's 2 MiB pool up front, so a shortage is an error now, not
/// a SIGBUS later.
pub fn create_guest_memory(size: u64, hugepages: bool) -> Result<GuestMemoryMmap, MemoryError> {
    if hugepages {
        let needed = size.div_ceil(HUGEPAGE_SIZE);
        let free = free_hugepages()?;
        if free < needed {
            return Err(MemoryError::NotEnoughHugepages { needed, free });
        }
    }
    let mut regions = Vec::new();
    for r in layout::ram_ranges(size) {
        let flags = libc::MAP_PRIVATE
            | libc::MAP_ANONYMOUS
            | if hugepages {
                libc::MAP_HUGETLB
            } else {
                libc::MAP_NORESERVE
            };
        let len =
            usize::try_from(r.len).map_err(|_| MemoryError::Regions("region too large".into()))?;
        let mmap = MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .with_hugetlbfs(hugepages)
            .build()
            .map_err(|source| MemoryError::Mmap {
                size: r.len,
                addr: r.start,
                source,
            })?;
        // SAFETY: the range is the mapping just created and owned by `mmap`;
        // MADV_DONTDUMP only keeps guest memory out of core dumps, and
        // MADV_HUGEPAGE lets the kernel back it with transparent huge pages
        // (fewer TLB misses, and much cheaper page pinning for large
        // direct I/O into guest buffers).
        unsafe {
            libc::madvise(mmap.as_ptr().cast(), len, libc::MADV_DONTDUMP);
            if !hugepages {
                libc::madvise(mmap.as_ptr().cast(), len, libc::MADV_HUGEPAGE);
            }
        }
        let region = GuestRegionMmap::new(mmap, GuestAddress(r.start))
            .ok_or_else(|| MemoryError::Regions(format!("region at {:#x} wraps", r.start)))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Regions(e.to_string()))
}

/// What backs guest memory, as `GET /v1/vm` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryBacking {
    /// 2 MiB hugetlbfs pages (else anonymous memory).
    pub hugepages: bool,
    /// With `hugepages=auto`, why Keel fell back to normal pages.
    pub fallback: Option<String>,
}

impl MemoryBacking {
    /// `hugetlbfs-2M` or `anonymous`.
    pub fn name(&self) -> &'static str {
        if self.hugepages {
            "hugetlbfs-2M"
        } else {
            "anonymous"
        }
    }
}

/// Maps guest memory as `mode` asks: `on` and `off` as
/// [`create_guest_memory`]; `auto` tries hugepages and falls back to normal
/// pages (with a warning) when too few are free, the host has no pool, or
/// the reservation fails (pages taken since they were counted).
pub fn create_guest_memory_with(
    size: u64,
    mode: HugepagesMode,
) -> Result<(GuestMemoryMmap, MemoryBacking), MemoryError> {
    let backing = |hugepages| MemoryBacking {
        hugepages,
        fallback: None,
    };
    match mode {
        HugepagesMode::Off => Ok((create_guest_memory(size, false)?, backing(false))),
        HugepagesMode::On => Ok((create_guest_memory(size, true)?, backing(true))),
        HugepagesMode::Auto => match create_guest_memory(size, true) {
            Ok(m) => {
                log::info!("hugepages=auto: guest memory on 2 MiB hugepages");
                Ok((m, backing(true)))
            }
            Err(
                e @ (MemoryError::NotEnoughHugepages { .. }
                | MemoryError::NoHugepagePool(_)
                | MemoryError::Mmap { .. }),
            ) => {
                log::warn!("hugepages=auto: {e}; using normal pages instead");
                let m = create_guest_memory(size, false)?;
                Ok((
                    m,
                    MemoryBacking {
                        hugepages: false,
                        fallback: Some(e.to_string()),
                    },
                ))
            }
            Err(e) => Err(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn layout_matches_the_address_map() {
        // 3.5 GiB of NORESERVE mapping touches almost nothing.
        let size = (3u64 << 30) + (512 << 20);
        let m = create_guest_memory(size, false).unwrap();
        let regions: Vec<(u64, u64)> = m.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(
            regions,
            [
                (0, layout::MMIO_HOLE_START),
                (layout::MMIO_HOLE_END, 512 << 20)
            ]
        );
        m.write_obj(0xdead_beefu32, GuestAddress(layout::MMIO_HOLE_END + 8))
            .unwrap();
        assert!(m
            .write_obj(1u8, GuestAddress(layout::MMIO_HOLE_START))
            .is_err());
    }

    #[test]
    fn hugepage_shortage_is_a_clear_error() {
        let free = free_hugepages().unwrap_or(0);
        let size = (free + 1) * HUGEPAGE_SIZE;
        let e = create_guest_memory(size, true).unwrap_err();
        assert!(
            matches!(
                e,
                MemoryError::NotEnoughHugepages { .. } | MemoryError::NoHugepagePool(_)
            ),
            "{e}"
        );
        assert!(e.to_string().contains("hugepage"));
    }

    #[test]
    fn auto_falls_back_to_normal_pages_when_too_few_are_free() {
        let free = free_hugepages().unwrap_or(0);
        let size = (free + 1) * HUGEPAGE_SIZE;
        let (m, backing) = create_guest_memory_with(size, HugepagesMode::Auto).unwrap();
        assert!(!backing.hugepages);
        assert_eq!(backing.name(), "anonymous");
        let why = backing.fallback.expect("the reason is kept");
        assert!(why.contains("hugepage"), "{why}");
        assert_eq!(m.iter().map(|r| r.len()).sum::<u64>(), size);
        let (_, off) = create_guest_memory_with(16 << 20, HugepagesMode::Off).unwrap();
        assert_eq!(
            off,
            MemoryBacking {
                hugepages: false,
                fallback: None
            }
        );
    }
}
