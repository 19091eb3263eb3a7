//! The guest-physical address map.
//!
//! ```text
//! 0x0000_0500  GDT used for boot (Linux 64-bit protocol and PVH)
//! 0x0000_6000  PVH hvm_start_info, module list at +0x40
//! 0x0000_7000  PVH memory map / Linux zero page (boot_params)
//! 0x0000_8ff0  initial stack for the Linux 64-bit protocol
//! 0x0000_9000  identity page tables (Linux 64-bit protocol): PML4, PDPT, PD
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA: MP floating pointer and configuration table
//! 0x0010_0000  kernel (ELF p_paddr / bzImage protected-mode code)
//!   ...        RAM up to min(size, 3 GiB); initrd at the top of it
//! 0xc000_0000  32-bit MMIO hole: PCI 32-bit BAR window (256 MiB)
//! 0xd000_0000  virtio-mmio devices (4 KiB each)
//! 0xe000_0000  PCI ECAM, bus 0 (1 MiB)
//! 0xfec0_0000  IOAPIC; 0xfee0_0000 local APICs
//! 0x1_0000_0000 the rest of RAM
//!   ...        PCI 64-bit BAR window (64 GiB), from the first 1 GiB
//!              boundary at or above the end of RAM (and 4 GiB)
//! ```

/// Boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (empty, limit 0) for the Linux 64-bit protocol.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Stack pointer for the Linux 64-bit protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 of the identity map built for the Linux 64-bit protocol.
pub const PML4_START: u64 = 0x9000;
/// PDPT of that map.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory of that map (first GiB in 2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Room for the command line, NUL included.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area; RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the MP table goes (first KiB of the EBDA, where Linux looks).
pub const MPTABLE_START: u64 = EBDA_START;
/// First byte of "high" memory, where kernels load.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole: RAM below 4 GiB stops here.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole; RAM resumes here.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// First address for virtio-mmio devices, inside the hole.
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
/// PCI: the window 32-bit BARs are allocated from.
pub const PCI_MMIO32_START: u64 = MMIO_HOLE_START;
/// Its size (up to the virtio-mmio devices).
pub const PCI_MMIO32_SIZE: u64 = MMIO_DEVICES_START - MMIO_HOLE_START;
/// PCI ECAM (memory-mapped configuration space) of bus 0.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// One bus: 32 devices x 8 functions x 4 KiB.
pub const PCI_ECAM_SIZE: u64 = 1 << 20;
/// The 64-bit BAR window starts at a multiple of this.
pub const PCI_MMIO64_ALIGN: u64 = 1 << 30;
/// Size of the 64-bit BAR window.
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;
/// The legacy configuration ports (0xCF8-0xCFF).
pub const PCI_CONFIG_IO_PORT: u16 = 0xcf8;
/// First GSI of the PCI INTx lines (IOAPIC pins above the ISA ones).
pub const PCI_INTX_GSI_BASE: u32 = 16;
/// Number of PCI INTx lines (GSIs 16-23).
pub const PCI_INTX_LINES: u32 = 8;
/// The I/O APIC.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APICs.
pub const APIC_START: u64 = 0xfee0_0000;
/// Largest guest memory accepted (well inside a 46-bit guest-physical space).
pub const MAX_MEMORY: u64 = 16 << 40;
/// Highest APIC ID the MP table can list (0xff is the broadcast ID).
pub const MAX_APIC_ID: u32 = 254;
/// Highest address an initrd may end at (Linux's default initrd_addr_max).
pub const INITRD_ADDR_MAX: u64 = 0x7fff_ffff;

/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// A range of guest-physical addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    /// First address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Range {
    /// One past the last address.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// The RAM ranges backing `size` bytes of guest memory: below the MMIO hole
/// first, the remainder above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<Range> {
    let low = size.min(MMIO_HOLE_START);
    let mut v = vec![Range { start: 0, len: low }];
    if size > low {
        v.push(Range {
            start: MMIO_HOLE_END,
            len: size - low,
        });
    }
    v
}

// ECAM lies between the virtio-mmio devices and the I/O APIC.
const _: () =
    assert!(PCI_ECAM_START > MMIO_DEVICES_START && PCI_ECAM_START + PCI_ECAM_SIZE < IOAPIC_START);

/// The 64-bit PCI BAR window of a guest with `size` bytes of RAM: above
/// RAM and 4 GiB, 1 GiB aligned.
pub fn pci_mmio64_window(size: u64) -> Range {
    let ram_end = ram_ranges(size).last().map_or(0, Range::end);
    let start = ram_end
        .max(MMIO_HOLE_END)
        .next_multiple_of(PCI_MMIO64_ALIGN);
    Range {
        start,
        len: PCI_MMIO64_SIZE,
    }
}

/// The GSI of INTx `pin` (0-3 for INTA#-INTD#) of device `slot` on bus 0:
/// the usual swizzle over the [`PCI_INTX_LINES`] lines.
pub fn pci_intx_gsi(slot: u8, pin: u8) -> u32 {
    PCI_INTX_GSI_BASE + (u32::from(slot) + u32::from(pin)) % PCI_INTX_LINES
}

/// One entry of the memory map given to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The memory map of a guest with `size` bytes of RAM: usable RAM except
/// the EBDA and BIOS area below 1 MiB, which are reserved (the MP table
/// lives there).
pub fn e820_map(size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for r in ram_ranges(size) {
        let start = r.start.max(HIMEM_START);
        if r.end() > start {
            map.push(E820Entry {
                addr: start,
                size: r.end() - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_fits_below_the_hole() {
        assert_eq!(
            ram_ranges(512 << 20),
            [Range {
                start: 0,
                len: 512 << 20
            }]
        );
        let map = e820_map(512 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(
            (map[2].addr, map[2].size),
            (HIMEM_START, (512 << 20) - HIMEM_START)
        );
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (512 << 20) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn pci_windows_stay_clear_of_ram_and_each_other() {
        let w = pci_mmio64_window(512 << 20);
        assert_eq!(w.start, MMIO_HOLE_END);
        let w = pci_mmio64_window((8 << 30) + (1 << 20));
        // RAM ends at 4 GiB + (8 GiB + 1 MiB - 3 GiB): the next GiB is 10 GiB.
        assert_eq!(w.start, 10 << 30);
        let w = pci_mmio64_window(MAX_MEMORY);
        assert!(w.end() <= 1 << 46, "inside a 46-bit guest-physical space");
        assert_eq!(pci_intx_gsi(1, 0), 17);
        assert_eq!(pci_intx_gsi(7, 1), 16);
        assert!((0..32).all(|s| (16..24).contains(&pci_intx_gsi(s, 3))));
    }

    #[test]
    fn large_guest_splits_around_the_hole() {
        let size = 8u64 << 30;
        let r = ram_ranges(size);
        assert_eq!(
            r[0],
            Range {
                start: 0,
                len: MMIO_HOLE_START
            }
        );
        assert_eq!(
            r[1],
            Range {
                start: MMIO_HOLE_END,
                len: size - MMIO_HOLE_START
            }
        );
        let map = e820_map(size);
        assert_eq!(map[2].addr + map[2].size, MMIO_HOLE_START);
        assert_eq!(map[3].addr, MMIO_HOLE_END);
        assert_eq!(
            map[3].addr + map[3].size,
            MMIO_HOLE_END + size - MMIO_HOLE_START
        );
        // Nothing RAM-typed overlaps the hole.
        assert!(map
            .iter()
            .all(|e| e.addr + e.size <= MMIO_HOLE_START || e.addr >= MMIO_HOLE_END));
    }
}
