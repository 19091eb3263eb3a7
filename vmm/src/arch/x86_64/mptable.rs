//! The Intel MultiProcessor Specification (1.4) table: how a guest kernel
//! learns every vCPU's APIC ID, the I/O APIC and the ISA interrupt routing.
//!
//! The table is built as bytes (little-endian, per the spec's layouts),
//! checksummed, then written to guest memory at the start of the EBDA,
//! where Linux's `smp_scan_config` looks for the floating pointer.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_START, IOAPIC_START, MPTABLE_START};
use super::topology::CpuTopology;

/// Errors of writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// An APIC ID does not fit the table's 8-bit field.
    #[error("APIC ID {0} does not fit an MP table (at most 254)")]
    ApicIdTooLarge(u32),
    /// Guest memory rejected the write.
    #[error("cannot write the MP table to guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

const MPC_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINT: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;
/// Pins of the I/O APIC given ISA IRQs (KVM's in-kernel I/O APIC has 24).
const ISA_IRQS: u8 = 16;
/// Pins of KVM's in-kernel I/O APIC.
const IOAPIC_PINS: u8 = 24;
/// Interrupt entry flags: conforming to the bus (ISA: edge, active high).
const IRQ_FLAGS_CONFORM: u16 = 0;
/// Interrupt entry flags: level-triggered (bits 3:2 = 11), active high
/// (bits 1:0 = 01): the virtio lines.
const IRQ_FLAGS_LEVEL_HIGH: u16 = (3 << 2) | 1;
/// Floating pointer size in bytes.
const FPS_LEN: usize = 16;
/// Configuration table header size in bytes.
const HEADER_LEN: usize = 44;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// The I/O APIC's ID: one above the highest CPU APIC ID.
fn ioapic_id(topology: &CpuTopology) -> u32 {
    topology.apic_id(topology.vcpus() - 1) + 1
}

/// Builds the floating pointer and configuration table as they will sit at
/// guest address `base`. `level_irqs` are the level-triggered lines (the
/// virtio devices'); the other ISA lines conform to the bus.
pub fn build(
    topology: &CpuTopology,
    base: u64,
    level_irqs: &[u32],
) -> Result<Vec<u8>, MpTableError> {
    let ioapic = ioapic_id(topology);
    let ioapic = u8::try_from(ioapic)
        .ok()
        .filter(|id| *id < 0xff)
        .ok_or(MpTableError::ApicIdTooLarge(ioapic))?;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    // CPUID family/model/stepping signature and feature flags: a kernel reads
    // the real values from CPUID; these are informational (FPU|APIC).
    let (signature, features) = (0x600u32, 0x201u32);
    for i in 0..topology.vcpus() {
        let id = topology.apic_id(i);
        let id = u8::try_from(id)
            .ok()
            .filter(|id| *id < 0xff)
            .ok_or(MpTableError::ApicIdTooLarge(id))?;
        let flags = CPU_ENABLED | if i == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&signature.to_le_bytes());
        entries.extend_from_slice(&features.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 2;
    // Identity-map ISA IRQs to I/O APIC pins, except IRQ 0 (the PIT), which
    // reaches pin 2 on PC hardware (and in KVM's model); then the level lines
    // above the ISA range, identity-mapped too.
    let above = level_irqs
        .iter()
        .filter_map(|&irq| u8::try_from(irq).ok())
        .filter(|&irq| (ISA_IRQS..IOAPIC_PINS).contains(&irq));
    for irq in (0..ISA_IRQS).chain(above) {
        let pin = if irq == 0 { 2 } else { irq };
        let flags = if level_irqs.contains(&u32::from(irq)) {
            IRQ_FLAGS_LEVEL_HIGH
        } else {
            IRQ_FLAGS_CONFORM
        };
        entries.extend_from_slice(&[ENTRY_IOINT, INT_TYPE_INT]);
        entries.extend_from_slice(&flags.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, irq, ioapic, pin]);
        count += 1;
    }
    // LINT0 is ExtINT (the 8259), LINT1 NMI, on every local APIC (dest 0xff).
    entries.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_EXTINT, 0, 0, ISA_BUS_ID, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_NMI, 0, 0, ISA_BUS_ID, 0, 0xff, 1]);
    count += 2;

    let table_addr = base + FPS_LEN as u64;
    let table_len = HEADER_LEN + entries.len();
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.push(MPC_SPEC_REV);
    header.push(0); // checksum, below
    header.extend_from_slice(b"KEEL    "); // OEM ID, 8 bytes
    header.extend_from_slice(b"KEEL-VM     "); // product ID, 12 bytes
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    header.extend_from_slice(&[0, 0]); // extended checksum, reserved
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fps = Vec::with_capacity(FPS_LEN);
    fps.extend_from_slice(b"_MP_");
    fps.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fps.push(1); // length in 16-byte units
    fps.push(MPC_SPEC_REV);
    fps.push(0); // checksum, below
    fps.extend_from_slice(&[0; 5]); // feature bytes: no default configuration
    fps[10] = checksum(&fps);

    fps.extend_from_slice(&table);
    Ok(fps)
}

/// Writes the MP table for `topology` at [`MPTABLE_START`]; `level_irqs`
/// are the level-triggered lines.
pub fn setup_mptable(
    mem: &GuestMemoryMmap,
    topology: &CpuTopology,
    level_irqs: &[u32],
) -> Result<(), MpTableError> {
    let bytes = build(topology, MPTABLE_START, level_irqs)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes([b[o], b[o + 1]])
    }

    #[test]
    fn table_lists_every_vcpu_with_checksums() {
        let t = CpuTopology {
            sockets: 2,
            cores: 3,
            threads: 2,
        };
        let b = build(&t, MPTABLE_START, &[5, 17]).unwrap();
        assert_eq!(&b[..4], b"_MP_");
        assert_eq!(b[..16].iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        let table = &b[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16_at(table, 4) as usize;
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        let mut off = HEADER_LEN;
        let mut ids = Vec::new();
        let mut bsp = 0;
        let mut ints = Vec::new();
        while off < len {
            match table[off] {
                ENTRY_PROCESSOR => {
                    ids.push(table[off + 1] as u32);
                    if table[off + 3] & CPU_BOOTPROCESSOR != 0 {
                        bsp += 1;
                        assert_eq!(table[off + 1], 0);
                    }
                    off += 20;
                }
                ENTRY_IOINT => {
                    // (source IRQ, pin, flags)
                    ints.push((table[off + 5], table[off + 7], u16_at(table, off + 2)));
                    off += 8;
                }
                _ => off += 8,
            }
        }
        let want: Vec<u32> = (0..12).map(|i| t.apic_id(i)).collect();
        assert_eq!(ids, want);
        assert_eq!(bsp, 1);
        // 12 CPUs, bus and I/O APIC, 16 ISA lines and line 17, 2 LINTs.
        assert_eq!(u16_at(table, 34) as usize, 12 + 2 + 17 + 2);
        // IRQ 0 on pin 2; the virtio lines 5 and 17 level-triggered, active
        // high; the rest conform to the ISA bus.
        assert_eq!(ints.len(), 17);
        assert_eq!(ints[0], (0, 2, IRQ_FLAGS_CONFORM));
        assert_eq!(ints[5], (5, 5, IRQ_FLAGS_LEVEL_HIGH));
        assert_eq!(ints[4], (4, 4, IRQ_FLAGS_CONFORM));
        assert_eq!(ints[16], (17, 17, IRQ_FLAGS_LEVEL_HIGH));
    }

    #[test]
    fn too_many_ids_is_an_error() {
        let t = CpuTopology {
            sockets: 1,
            cores: 255,
            threads: 1,
        };
        assert!(matches!(
            build(&t, MPTABLE_START, &[]),
            Err(MpTableError::ApicIdTooLarge(_))
        ));
    }
}
