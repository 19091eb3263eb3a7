//! ACPI tables: how a distro kernel finds the vCPUs, the interrupt
//! controllers, the legacy devices and how to power the machine off.
//!
//! The tables sit in the BIOS area below 1 MiB (reserved in the memory map),
//! where Linux also finds them by scanning for the RSDP:
//!
//! ```text
//! 0x000e_0000  RSDP (revision 2, points at the XSDT)
//! 0x000e_0040  XSDT -> FADT, MADT[, MCFG][, SRAT, SLIT]
//!   ...        FADT (hardware-reduced), DSDT, MADT, then the MCFG on a PCI
//!              machine and the SRAT and SLIT with `memory.numa` (see
//!              [`super::numa`])
//! ```
//!
//! The FADT is **hardware-reduced** (ACPI 6, `HW_REDUCED_ACPI`): there is no
//! PM1 event/control block, SCI or GPE to emulate, power-off is one write to
//! the sleep-control register (port 0x600, `SLP_TYP = 5 | SLP_EN`, which
//! Keel already implements), and the DSDT says `_S5` is sleep type 5. A full
//! FADT would add PM1a blocks, an SCI and the PM timer for nothing a
//! server guest uses. The DSDT describes COM1 (PNP0501) and the i8042
//! keyboard controller (PNP0303), which a hardware-reduced kernel only
//! finds there. The MADT lists every vCPU (local APIC entries below APIC ID
//! 255, local x2APIC entries from 255 on, so more than 254 vCPUs work), the
//! I/O APIC and the ISA interrupt override (IRQ 0 on pin 2). The virtio-mmio
//! devices are DSDT devices (`LNRO0005`) with their window and interrupt:
//! a hardware-reduced kernel maps no legacy interrupt lines by itself, so
//! devices announced on the command line alone would get no interrupt.
//! Their lines are level-triggered, active high, as Keel signals them (an
//! irqfd with a resample eventfd): in the `_CRS`, and for lines below 16 in
//! a MADT override too, as ISA lines are otherwise edge-triggered.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_START, IOAPIC_START};
use super::numa::{self, NumaLayout};
use super::pci_acpi::{self, PciHost};
use super::topology::CpuTopology;

/// Where the RSDP goes (inside the BIOS area Linux scans).
pub const RSDP_START: u64 = 0xe_0000;
/// End of the area the tables may use.
pub const ACPI_END: u64 = 0x10_0000;
/// The sleep-control register (hardware-reduced power-off).
pub const SLEEP_CONTROL_PORT: u64 = 0x600;
/// The sleep-status register, next to it.
pub const SLEEP_STATUS_PORT: u64 = 0x601;

const OEM_ID: [u8; 6] = *b"KEEL  ";
const OEM_TABLE_ID: [u8; 8] = *b"KEEL-VM ";
const OEM_REVISION: u32 = 1;

/// MADT structure types.
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_INT_OVERRIDE: u8 = 2;
const MADT_LOCAL_X2APIC: u8 = 9;
/// MADT flags: the machine also has 8259 PICs (PCAT_COMPAT).
const MADT_PCAT_COMPAT: u32 = 1;
/// MPS INTI flags: active high, edge triggered.
const INTI_EDGE_HIGH: u16 = (1 << 2) | 1;
/// MPS INTI flags: active high, level triggered.
const INTI_LEVEL_HIGH: u16 = (3 << 2) | 1;
/// ISA interrupt lines (the only ones a MADT override may name).
const ISA_IRQS: u32 = 16;
/// FADT IA-PC boot architecture flags: an 8042 is present.
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;

/// Why the tables cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit below 1 MiB.
    #[error("ACPI tables need {need} bytes, more than the {room} bytes reserved for them")]
    TooLarge {
        /// Bytes the tables need.
        need: u64,
        /// Bytes reserved.
        room: u64,
    },
    /// Guest memory refused the write.
    #[error("cannot write the ACPI tables into guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

/// What the tables describe.
#[derive(Clone, Debug)]
pub struct AcpiMachine<'a> {
    /// vCPU topology (APIC IDs).
    pub topology: &'a CpuTopology,
    /// The virtio-mmio devices: (register window base, length, GSI).
    pub virtio_mmio: &'a [(u64, u64, u32)],
    /// COM1's port and interrupt.
    pub com1: (u16, u32),
    /// The i8042's interrupt.
    pub i8042_irq: u32,
    /// The CMOS RTC's first port and interrupt.
    pub rtc: (u16, u32),
    /// The Generic Event Device's event register (port) and interrupt.
    pub ged: (u16, u32),
    /// The reset register's port and the value that resets.
    pub reset: (u16, u8),
    /// The PCI host bridge (MCFG, `\_SB.PCI0`), when the machine has one.
    pub pci: Option<PciHost>,
    /// The NUMA domains (SRAT, SLIT), with `memory.numa`.
    pub numa: Option<&'a NumaLayout>,
}

/// The CMOS register the FADT names as the century.
pub const CENTURY_REG: u8 = devices::legacy::RTC_CENTURY_REG;
/// The GED's event bit for the power button (its `_EVT` tests it).
const GED_POWER_BUTTON: u8 = devices::legacy::GED_POWER_BUTTON;
/// `Notify` value of a power button: pressed.
const NOTIFY_BUTTON_PRESSED: u8 = 0x80;

/// The tables as bytes, each at its guest address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTables {
    /// (guest address, bytes) of the RSDP and each table.
    pub blobs: Vec<(u64, Vec<u8>)>,
}

impl AcpiTables {
    /// The bytes of the table at `addr`, if one starts there.
    pub fn at(&self, addr: u64) -> Option<&[u8]> {
        self.blobs
            .iter()
            .find(|(a, _)| *a == addr)
            .map(|(_, b)| b.as_slice())
    }
}

fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The DSDT: `_S5`, COM1 and the i8042.
fn dsdt(m: &AcpiMachine) -> Vec<u8> {
    // Each object is serialized within its statement: the AML builders borrow
    // their children.
    let mut body = Vec::new();
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(m.com1.0, m.com1.0, 1, 8),
                    &aml::Interrupt::new(true, true, false, false, m.com1.1),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);
    aml::Device::new(
        "_SB_.PS2K".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0303")),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(0x60, 0x60, 1, 1),
                    &aml::IO::new(0x64, 0x64, 1, 1),
                    &aml::Interrupt::new(true, true, false, false, m.i8042_irq),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);
    // The CMOS RTC, for Linux's rtc_cmos (which binds to PNP0B00).
    aml::Device::new(
        "_SB_.RTC_".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0B00")),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(m.rtc.0, m.rtc.0, 1, 2),
                    &aml::Interrupt::new(true, true, false, false, m.rtc.1),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);
    ged(m, &mut body);
    for (i, &(base, len, gsi)) in m.virtio_mmio.iter().enumerate() {
        // Linux's virtio_mmio driver matches LNRO0005 (as QEMU's microvm and
        // Firecracker describe their devices).
        let (base32, len32) = (base as u32, len as u32);
        aml::Device::new(
            format!("_SB_.V{:03X}", i & 0xfff).as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &(i as u32)),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::Memory32Fixed::new(true, base32, len32),
                        // Level-triggered, active high.
                        &aml::Interrupt::new(true, false, false, false, gsi),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(&mut body);
    }
    if let Some(host) = &m.pci {
        pci_acpi::dsdt(host, &mut body);
    }
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&5u8, &aml::ZERO, &aml::ZERO, &aml::ZERO]),
    )
    .to_aml_bytes(&mut body);
    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    table.append_slice(&body);
    table.as_slice().to_vec()
}

/// The Generic Event Device and the power button it notifies:
///
/// ```text
/// Device (\_SB.GED) {
///     Name (_HID, "ACPI0013")
///     Name (_CRS, ResourceTemplate () { Interrupt (, Edge, ActiveHigh) { ged irq } })
///     OperationRegion (GDST, SystemIO, ged port, 1)
///     Field (GDST, ByteAcc, NoLock, WriteAsZeros) { GDAT, 8 }
///     Method (_EVT, 1, Serialized) {
///         Local0 = GDAT        // reading clears the pending events
///         If (Local0 & 1) { Notify (\_SB.PWRB, 0x80) }
///     }
/// }
/// Device (\_SB.PWRB) { Name (_HID, EisaId ("PNP0C0C")) }
/// ```
fn ged(m: &AcpiMachine, body: &mut Vec<u8>) {
    let local0 = aml::Local(0);
    let gdat = aml::Path::new("GDAT");
    let bit = aml::And::new(&aml::ZERO, &local0, &GED_POWER_BUTTON);
    let pwrb = aml::Path::new("\\_SB_.PWRB");
    let notify = aml::Notify::new(&pwrb, &NOTIFY_BUTTON_PRESSED);
    aml::Device::new(
        "_SB_.GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::Interrupt::new(
                    true, true, false, false, m.ged.1,
                )]),
            ),
            &aml::OpRegion::new(
                "GDST".into(),
                aml::OpRegionSpace::SystemIO,
                &u64::from(m.ged.0),
                &1u8,
            ),
            &aml::Field::new(
                "GDST".into(),
                aml::FieldAccessType::Byte,
                aml::FieldLockRule::NoLock,
                aml::FieldUpdateRule::WriteAsZeroes,
                vec![aml::FieldEntry::Named(*b"GDAT", 8)],
            ),
            &aml::Method::new(
                "_EVT".into(),
                1,
                true,
                vec![
                    &aml::Store::new(&local0, &gdat),
                    &aml::If::new(&bit, vec![&notify]),
                ],
            ),
        ],
    )
    .to_aml_bytes(body);
    aml::Device::new(
        "_SB_.PWRB".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
        ],
    )
    .to_aml_bytes(body);
}

/// The hardware-reduced FADT pointing at the DSDT.
fn fadt(dsdt_addr: u64, reset: (u16, u8)) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::ResetRegSup);
    f.iapc_boot_arch = IAPC_BOOT_ARCH_8042.into();
    f.century = CENTURY_REG;
    f.reset_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(reset.0),
    );
    f.reset_value = reset.1;
    f.sleep_control_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        SLEEP_CONTROL_PORT,
    );
    f.sleep_status_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        SLEEP_STATUS_PORT,
    );
    bytes_of(&f.finalize())
}

/// The MADT: every vCPU, the I/O APIC, the interrupt overrides.
fn madt(m: &AcpiMachine) -> Vec<u8> {
    let mut table = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    table.write_u32(36, APIC_START as u32);
    table.write_u32(40, MADT_PCAT_COMPAT);
    let t = m.topology;
    for index in 0..t.vcpus() {
        let id = t.apic_id(index);
        match u8::try_from(id) {
            Ok(id8) if id8 < 0xff => {
                let uid = u8::try_from(index).unwrap_or(0xff);
                table.append_slice(&[MADT_LOCAL_APIC, 8, uid, id8, 1, 0, 0, 0]);
            }
            _ => {
                let mut e = vec![MADT_LOCAL_X2APIC, 16, 0, 0];
                e.extend_from_slice(&id.to_le_bytes());
                e.extend_from_slice(&1u32.to_le_bytes()); // enabled
                e.extend_from_slice(&index.to_le_bytes()); // ACPI processor UID
                table.append_slice(&e);
            }
        }
    }
    // The I/O APIC keeps ID 0 in the MADT sense of "an ID", which Linux only
    // uses to name it; pins start at GSI 0.
    let mut ioapic = vec![MADT_IO_APIC, 12, 0, 0];
    ioapic.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    table.append_slice(&ioapic);
    // The PIT's IRQ 0 reaches pin 2. Other ISA IRQs are identity-mapped, edge
    // and active high by default; virtio lines among them are overridden to
    // level-triggered (an override is only valid for ISA IRQs 0-15; the
    // lines above carry their trigger mode in their DSDT `_CRS` alone).
    let mut overrides = vec![(0u8, 2u32, INTI_EDGE_HIGH)];
    for &(_, _, gsi) in m.virtio_mmio {
        if let Ok(source) = u8::try_from(gsi) {
            if gsi < ISA_IRQS {
                overrides.push((source, gsi, INTI_LEVEL_HIGH));
            }
        }
    }
    for (source, gsi, flags) in overrides {
        let mut e = vec![MADT_INT_OVERRIDE, 10, 0, source];
        e.extend_from_slice(&gsi.to_le_bytes());
        e.extend_from_slice(&flags.to_le_bytes());
        table.append_slice(&e);
    }
    table.update_checksum();
    table.as_slice().to_vec()
}

/// Builds the RSDP and the tables at their guest addresses.
pub fn build(m: &AcpiMachine) -> Result<AcpiTables, AcpiError> {
    let align = |a: u64| (a + 15) & !15;
    let xsdt_addr = align(RSDP_START + Rsdp::len() as u64);
    // After the FADT and MADT: with PCI the MCFG, with NUMA the SRAT and SLIT.
    let mut extra = Vec::new();
    if let Some(host) = &m.pci {
        extra.push(pci_acpi::mcfg(host, OEM_ID, OEM_TABLE_ID, OEM_REVISION));
    }
    if let Some(layout) = m.numa {
        extra.push(numa::srat(layout, OEM_ID, OEM_TABLE_ID, OEM_REVISION));
        extra.push(numa::slit(layout, OEM_ID, OEM_TABLE_ID, OEM_REVISION));
    }
    let xsdt_len = 36 + 8 * (2 + extra.len() as u64);
    let fadt_addr = align(xsdt_addr + xsdt_len);
    let fadt_len = acpi_tables::fadt::FADT::len() as u64;
    let dsdt_addr = align(fadt_addr + fadt_len);
    let dsdt = dsdt(m);
    let madt_addr = align(dsdt_addr + dsdt.len() as u64);
    let madt = madt(m);
    let mut end = madt_addr + madt.len() as u64;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut blobs = vec![
        (fadt_addr, fadt(dsdt_addr, m.reset)),
        (dsdt_addr, dsdt),
        (madt_addr, madt),
    ];
    for table in extra {
        let addr = align(end);
        end = addr + table.len() as u64;
        xsdt.add_entry(addr);
        blobs.push((addr, table));
    }
    if end > ACPI_END {
        return Err(AcpiError::TooLarge {
            need: end - RSDP_START,
            room: ACPI_END - RSDP_START,
        });
    }
    blobs.splice(
        0..0,
        [
            (RSDP_START, bytes_of(&Rsdp::new(OEM_ID, xsdt_addr))),
            (xsdt_addr, bytes_of(&xsdt)),
        ],
    );
    Ok(AcpiTables { blobs })
}

/// Writes the tables into guest memory; returns the RSDP's address.
pub fn setup_acpi(mem: &GuestMemoryMmap, m: &AcpiMachine) -> Result<u64, AcpiError> {
    let tables = build(m)?;
    for (addr, bytes) in &tables.blobs {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(AcpiError::Write)?;
    }
    Ok(RSDP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
    }

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from(u32_at(b, o)) | (u64::from(u32_at(b, o + 4)) << 32)
    }

    fn machine(t: &CpuTopology) -> AcpiMachine<'_> {
        AcpiMachine {
            topology: t,
            virtio_mmio: &[(0xd000_0000, 0x1000, 5), (0xd000_1000, 0x1000, 17)],
            com1: (0x3f8, 4),
            i8042_irq: 1,
            rtc: (0x70, 8),
            ged: (0x608, 3),
            reset: (0x602, 1),
            pci: None,
            numa: None,
        }
    }

    fn dsdt_of(t: &AcpiTables) -> Vec<u8> {
        let fadt = &walk(t)[0].1;
        t.at(u64_at(fadt, 140)).expect("X_DSDT").to_vec()
    }

    fn aml_bytes(a: &dyn Aml) -> Vec<u8> {
        bytes_of(a)
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn fadt_names_the_century_and_the_reset_register() {
        let topo = CpuTopology {
            sockets: 1,
            cores: 1,
            threads: 1,
        };
        let t = build(&machine(&topo)).unwrap();
        let fadt = &walk(&t)[0].1;
        assert_eq!(fadt[108], 0x32, "century register");
        // RESET_REG_SUP (bit 10), RESET_REG in system I/O at 0x602, value 1.
        assert_ne!(u32_at(fadt, 112) & (1 << 10), 0);
        assert_eq!(fadt[116], 1, "reset register in system I/O space");
        assert_eq!(fadt[117], 8, "one byte wide");
        assert_eq!(u64_at(fadt, 120), 0x602);
        assert_eq!(fadt[128], 1, "reset value");
    }

    #[test]
    fn dsdt_has_the_rtc_ged_and_power_button() {
        let topo = CpuTopology {
            sockets: 1,
            cores: 1,
            threads: 1,
        };
        let dsdt = dsdt_of(&build(&machine(&topo)).unwrap());
        assert!(contains(&dsdt, &aml_bytes(&aml::EISAName::new("PNP0B00"))));
        assert!(contains(&dsdt, b"RTC_"));
        // The RTC's ports: an IO descriptor (0x47) for 0x70, length 2.
        assert!(contains(
            &dsdt,
            &[0x47, 0x01, 0x70, 0x00, 0x70, 0x00, 0x01, 0x02]
        ));
        assert!(contains(&dsdt, b"ACPI0013\0"));
        assert!(contains(&dsdt, &aml_bytes(&aml::EISAName::new("PNP0C0C"))));
        assert!(contains(&dsdt, b"_EVT"));
        assert!(contains(&dsdt, b"GDAT"));
        // The GED's interrupt: consumer, edge, active high, IRQ 3.
        assert!(contains(&dsdt, &[0x89, 6, 0, 0x03, 1, 3, 0, 0, 0]));
        // Notify (\_SB.PWRB, 0x80): NotifyOp, the root path, 0x80.
        let mut notify = vec![0x86, b'\\', 0x2e];
        notify.extend_from_slice(b"_SB_PWRB");
        notify.extend_from_slice(&[0x0a, 0x80]);
        assert!(contains(&dsdt, &notify), "Notify of the power button");
    }

    /// ACPICA's disassembler (Debian's acpica-tools) reads the DSDT back:
    /// an independent check of the AML, not of Keel's own byte patterns.
    #[test]
    fn iasl_disassembles_the_dsdt() {
        let topo = CpuTopology {
            sockets: 1,
            cores: 2,
            threads: 1,
        };
        let dsdt = dsdt_of(&build(&machine(&topo)).unwrap());
        let dsl = iasl_disassemble(&dsdt, "dsdt");
        for want in [
            "Device (_SB.RTC)",
            "EisaId (\"PNP0B00\")",
            "Device (_SB.GED)",
            "\"ACPI0013\"",
            "OperationRegion (GDST, SystemIO, 0x0608, One)",
            "Method (_EVT, 1, Serialized)",
            "Local0 = GDAT",
            "Notify (\\_SB.PWRB, 0x80)",
            "Device (_SB.PWRB)",
            "EisaId (\"PNP0C0C\")",
            "Device (_SB.COM1)",
            "Name (_S5, Package",
        ] {
            assert!(dsl.contains(want), "{want:?} missing from\n{dsl}");
        }
    }

    fn pci_machine(t: &CpuTopology) -> AcpiMachine<'_> {
        AcpiMachine {
            virtio_mmio: &[],
            pci: Some(PciHost::for_memory(8 << 30)),
            ..machine(t)
        }
    }

    fn iasl_disassemble(table: &[u8], name: &str) -> String {
        let dir = std::env::temp_dir().join(format!("keel-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dat = dir.join(format!("{name}.dat"));
        std::fs::write(&dat, table).unwrap();
        let out = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&dat)
            .output()
            .expect("iasl (Debian's acpica-tools) must be installed");
        let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl")));
        let _ = std::fs::remove_dir_all(&dir);
        dsl.unwrap_or_else(|e| {
            panic!(
                "iasl wrote no disassembly ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    #[test]
    fn pci_machine_has_an_mcfg_for_bus_0() {
        let topo = CpuTopology {
            sockets: 1,
            cores: 1,
            threads: 1,
        };
        let t = build(&pci_machine(&topo)).unwrap();
        let tables = walk(&t);
        let sigs: Vec<[u8; 4]> = tables.iter().map(|(s, _)| *s).collect();
        assert_eq!(sigs, [*b"FACP", *b"APIC", *b"MCFG"]);
        let mcfg = &tables[2].1;
        assert_eq!(mcfg.len(), 44 + 16, "one allocation entry");
        assert_eq!(u64_at(mcfg, 44), super::super::layout::PCI_ECAM_START);
        assert_eq!(&mcfg[52..56], &[0, 0, 0, 0], "segment 0, buses 0-0");
        let dsl = iasl_disassemble(mcfg, "mcfg");
        assert!(dsl.contains("Base Address : 00000000E0000000"), "{dsl}");
        // Without PCI: no MCFG, no host bridge.
        let t = build(&machine(&topo)).unwrap();
        assert_eq!(walk(&t).len(), 2);
        assert!(!contains(&dsdt_of(&t), b"PCI0"));
    }

    /// The host bridge, its windows and its interrupt routing, read back
    /// by ACPICA's disassembler.
    #[test]
    fn iasl_disassembles_the_pci_host_bridge() {
        let topo = CpuTopology {
            sockets: 1,
            cores: 1,
            threads: 1,
        };
        let dsdt = dsdt_of(&build(&pci_machine(&topo)).unwrap());
        assert_eq!(
            dsdt.windows(8).filter(|w| w == b"LNRO0005").count(),
            0,
            "no virtio-mmio devices on a PCI machine"
        );
        let dsl = iasl_disassemble(&dsdt, "dsdt-pci");
        for want in [
            "Device (_SB.PCI0)",
            "EisaId (\"PNP0A08\")",
            "EisaId (\"PNP0A03\")",
            "Name (_SEG, Zero)",
            "Name (_BBN, Zero)",
            "WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode,",
            // The config ports, the 32-bit window, the 64-bit window (RAM
            // ends at 9 GiB, so it starts at 9 GiB).
            "0x0CF8,             // Range Minimum",
            "0xC0000000,         // Range Minimum",
            "0xCFFFFFFF,         // Range Maximum",
            "0x0000000240000000, // Range Minimum",
            "0x000000123FFFFFFF, // Range Maximum",
            "0x0000001000000000, // Length",
            "Name (_PRT, Package (0x7C)",
            "0x0001FFFF,",
            "\\_SB.LNK1,",
            "Device (_SB.LNK7)",
            "EisaId (\"PNP0C0F\")",
            "Interrupt (ResourceConsumer, Level, ActiveHigh, Shared, ,, )",
            "0x00000017,",
            "Method (_SRS, 1, NotSerialized)",
            "Device (_SB.MRES)",
            "EisaId (\"PNP0C02\")",
            "Memory32Fixed (ReadWrite,",
            "0xE0000000,         // Address Base",
            "0x00100000,         // Address Length",
        ] {
            assert!(dsl.contains(want), "{want:?} missing from\n{dsl}");
        }
    }

    /// What an SRAT says, read back field by field: (APIC ID, domain) of
    /// each processor entry and (domain, base, length) of each enabled
    /// memory entry.
    #[allow(clippy::type_complexity)]
    fn parse_srat(srat: &[u8]) -> (Vec<(u32, u32)>, Vec<(u32, u64, u64)>) {
        assert_eq!(&srat[..4], b"SRAT");
        assert_eq!(u32_at(srat, 36), 1, "reserved dword must be 1");
        let (mut cpus, mut mem) = (Vec::new(), Vec::new());
        let mut o = 48;
        while o < srat.len() {
            let (kind, len) = (srat[o], srat[o + 1] as usize);
            match (kind, len) {
                (0, 16) => {
                    assert_eq!(u32_at(srat, o + 4) & 1, 1, "enabled");
                    let domain = u32::from(srat[o + 2])
                        | (u32::from(srat[o + 9]) << 8)
                        | (u32::from(srat[o + 10]) << 16)
                        | (u32::from(srat[o + 11]) << 24);
                    cpus.push((u32::from(srat[o + 3]), domain));
                }
                (2, 24) => {
                    assert_eq!(u32_at(srat, o + 12) & 1, 1, "enabled");
                    cpus.push((u32_at(srat, o + 8), u32_at(srat, o + 4)));
                }
                (1, 40) => {
                    assert_eq!(u32_at(srat, o + 28) & 1, 1, "enabled");
                    mem.push((
                        u32_at(srat, o + 2),
                        u64_at(srat, o + 8),
                        u64_at(srat, o + 16),
                    ));
                }
                other => panic!("unexpected SRAT structure {other:?}"),
            }
            o += len;
        }
        assert_eq!(o, srat.len(), "structures fill the table exactly");
        (cpus, mem)
    }

    /// Builds the tables of a NUMA guest; checks that the SRAT gives every
    /// vCPU its socket's domain and covers RAM exactly once, each domain
    /// getting an equal share in address order, and the SLIT's matrix.
    fn check_numa(topo: CpuTopology, size: u64) -> AcpiTables {
        let layout = NumaLayout::new(&topo, size).unwrap();
        let t = build(&AcpiMachine {
            numa: Some(&layout),
            ..machine(&topo)
        })
        .unwrap();
        let tables = walk(&t);
        let sigs: Vec<[u8; 4]> = tables.iter().map(|(s, _)| *s).collect();
        assert_eq!(sigs, [*b"FACP", *b"APIC", *b"SRAT", *b"SLIT"]);
        let (cpus, mem) = parse_srat(&tables[2].1);
        let per_socket = u32::from(topo.cores) * u32::from(topo.threads);
        let want: Vec<(u32, u32)> = (0..topo.vcpus())
            .map(|i| (topo.apic_id(i), i / per_socket))
            .collect();
        assert_eq!(cpus, want, "every vCPU in its socket's domain");
        // RAM exactly once: the entries, in address order, tile the RAM
        // ranges with no gap or overlap.
        let mut sorted = mem.clone();
        sorted.sort_by_key(|&(_, base, _)| base);
        let mut tiles = sorted.iter().peekable();
        for ram in super::super::layout::ram_ranges(size) {
            let mut at = ram.start;
            while at < ram.end() {
                let &(_, base, len) = tiles.next().expect("RAM not covered");
                assert_eq!(base, at, "gap or overlap at {at:#x}");
                at += len;
            }
            assert_eq!(at, ram.end(), "entry runs past RAM");
        }
        assert!(tiles.next().is_none(), "memory outside RAM");
        // Domains in address order, each with an equal share.
        let nodes = u32::from(topo.sockets);
        let domains: Vec<u32> = sorted.iter().map(|m| m.0).collect();
        assert!(domains.windows(2).all(|w| w[0] <= w[1]), "{domains:?}");
        for d in 0..nodes {
            let total: u64 = mem.iter().filter(|m| m.0 == d).map(|m| m.2).sum();
            assert_eq!(total, size / u64::from(nodes), "domain {d}");
        }
        let slit = &tables[3].1;
        let n = nodes as usize;
        assert_eq!(u64_at(slit, 36), u64::from(nodes), "localities");
        assert_eq!(slit.len(), 44 + n * n);
        for a in 0..n {
            for b in 0..n {
                let want = if a == b { 10 } else { 20 };
                assert_eq!(slit[44 + a * n + b], want, "distance {a} -> {b}");
            }
        }
        t
    }

    #[test]
    fn srat_and_slit_describe_each_socket() {
        let topo = CpuTopology {
            sockets: 2,
            cores: 3,
            threads: 2,
        };
        // 8 GiB: domain 0 spans the hole.
        check_numa(topo, 8 << 30);
        // Below the hole only.
        check_numa(topo, 1 << 30);
        // Four sockets, 12 GiB: domain 0 below the hole, the rest above.
        check_numa(
            CpuTopology {
                sockets: 4,
                cores: 2,
                threads: 1,
            },
            12 << 30,
        );
        // HostOS's shape: 2 x 16 x 2, 476 GiB.
        check_numa(
            CpuTopology {
                sockets: 2,
                cores: 16,
                threads: 2,
            },
            476 << 30,
        );
    }

    #[test]
    fn srat_uses_x2apic_affinity_from_apic_id_255() {
        let topo = CpuTopology {
            sockets: 2,
            cores: 80,
            threads: 2,
        };
        let t = check_numa(topo, 16 << 30);
        let srat = &walk(&t)[2].1;
        let (mut local, mut x2apic) = (0, 0);
        let mut o = 48;
        while o < srat.len() {
            match srat[o] {
                0 => local += 1,
                2 => {
                    x2apic += 1;
                    assert!(u32_at(srat, o + 8) >= 0xff);
                }
                _ => {}
            }
            o += srat[o + 1] as usize;
        }
        let high = (0..topo.vcpus())
            .filter(|&i| topo.apic_id(i) >= 0xff)
            .count();
        assert!(high > 0);
        assert_eq!((local, x2apic), (topo.vcpus() as usize - high, high));
    }

    /// The `Name : Value` fields of an iasl data-table disassembly: the
    /// header's, then one list per subtable (from its `Subtable Type`).
    fn iasl_fields(dsl: &str) -> Vec<Vec<(String, String)>> {
        let body = dsl.split("Raw Table Data").next().unwrap_or_default();
        let mut blocks = vec![Vec::new()];
        for (k, v) in body
            .lines()
            .filter_map(|l| l.split_once("] ").map(|(_, rest)| rest))
            .filter_map(|f| f.split_once(" : "))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        {
            if k == "Subtable Type" {
                blocks.push(Vec::new());
            }
            if let Some(b) = blocks.last_mut() {
                b.push((k, v));
            }
        }
        blocks
    }

    fn hex(v: &str) -> u64 {
        let digits = v.split_whitespace().next().unwrap_or_default();
        u64::from_str_radix(digits, 16).unwrap_or_else(|e| panic!("{v:?}: {e}"))
    }

    /// ACPICA's disassembler reads the SRAT and SLIT back: an independent
    /// parser, whose fields must give each vCPU its socket's domain and
    /// each domain its share of RAM.
    #[test]
    fn iasl_disassembles_the_srat_and_slit() {
        // 2 x 64 x 2: APIC IDs up to 255, so both affinity structures.
        let topo = CpuTopology {
            sockets: 2,
            cores: 64,
            threads: 2,
        };
        let size = 8u64 << 30;
        let t = check_numa(topo, size);
        let tables = walk(&t);
        let srat = iasl_disassemble(&tables[2].1, "srat");
        assert!(!srat.contains("****"), "iasl complains:\n{srat}");
        let (mut cpus, mut mem) = (Vec::new(), Vec::new());
        for block in iasl_fields(&srat) {
            let get = |k: &str| {
                block
                    .iter()
                    .find(|(name, _)| name == k)
                    .map(|(_, v)| v.as_str())
                    .unwrap_or_else(|| panic!("no {k:?} in {block:?}"))
            };
            let Some((_, kind)) = block.iter().find(|(k, _)| k == "Subtable Type") else {
                continue;
            };
            assert_eq!(
                hex(get("Flags (decoded below)")) & 1,
                1,
                "enabled: {block:?}"
            );
            if kind.contains("[Processor Local APIC/SAPIC Affinity]") {
                let domain = hex(get("Proximity Domain Low(8)"))
                    | hex(get("Proximity Domain High(24)")) << 8;
                cpus.push((hex(get("Apic ID")), domain));
            } else if kind.contains("[Processor Local x2APIC Affinity]") {
                cpus.push((hex(get("Apic ID")), hex(get("Proximity Domain"))));
            } else if kind.contains("[Memory Affinity]") {
                mem.push((
                    hex(get("Proximity Domain")),
                    hex(get("Base Address")),
                    hex(get("Address Length")),
                ));
            } else {
                panic!("unexpected subtable {kind}");
            }
        }
        let want: Vec<(u64, u64)> = (0..topo.vcpus())
            .map(|i| (u64::from(topo.apic_id(i)), u64::from(i / 128)))
            .collect();
        assert_eq!(cpus, want, "{srat}");
        assert!(
            cpus.iter().any(|&(id, _)| id >= 0xff),
            "x2APIC entries read"
        );
        // 4 GiB each: domain 0 is [0, 3G) and [4G, 5G).
        assert_eq!(
            mem,
            [
                (0, 0, 3 << 30),
                (0, 4 << 30, 1 << 30),
                (1, 5 << 30, 4 << 30)
            ],
            "{srat}"
        );
        let slit = iasl_disassemble(&tables[3].1, "slit");
        assert!(!slit.contains("****"), "iasl complains:\n{slit}");
        let fields: Vec<(String, String)> = iasl_fields(&slit).concat();
        let rows: Vec<&str> = fields
            .iter()
            .filter(|(k, _)| k.starts_with("Locality "))
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(rows, ["0A 14", "14 0A"], "{slit}");
    }

    /// Walks RSDP -> XSDT -> tables; returns (signature, bytes) of each.
    fn walk(t: &AcpiTables) -> Vec<([u8; 4], Vec<u8>)> {
        let rsdp = t.at(RSDP_START).expect("RSDP");
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "revision 2");
        let xsdt = t.at(u64_at(rsdp, 24)).expect("XSDT");
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(sum(xsdt), 0);
        let mut out = Vec::new();
        for i in 0..(xsdt.len() - 36) / 8 {
            let tb = t.at(u64_at(xsdt, 36 + 8 * i)).expect("table");
            assert_eq!(u32_at(tb, 4) as usize, tb.len(), "length field");
            assert_eq!(sum(tb), 0, "checksum of {:?}", &tb[..4]);
            out.push(([tb[0], tb[1], tb[2], tb[3]], tb.to_vec()));
        }
        out
    }

    #[test]
    fn tables_chain_and_checksum() {
        let topo = CpuTopology {
            sockets: 2,
            cores: 3,
            threads: 2,
        };
        let t = build(&machine(&topo)).unwrap();
        let tables = walk(&t);
        let sigs: Vec<[u8; 4]> = tables.iter().map(|(s, _)| *s).collect();
        assert_eq!(sigs, [*b"FACP", *b"APIC"]);
        let fadt = &tables[0].1;
        // HW_REDUCED_ACPI (bit 20) and the sleep registers at 0x600/0x601.
        assert_ne!(u32_at(fadt, 112) & (1 << 20), 0);
        assert_eq!(fadt[244], 1, "sleep control in system I/O space");
        assert_eq!(u64_at(fadt, 248), SLEEP_CONTROL_PORT);
        assert_eq!(u64_at(fadt, 260), SLEEP_STATUS_PORT);
        let dsdt = t.at(u64_at(fadt, 140)).expect("X_DSDT");
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(sum(dsdt), 0);
        // _S5_ is a package whose first element is sleep type 5.
        let s5 = dsdt.windows(4).position(|w| w == b"_S5_").expect("_S5_");
        assert_eq!(&dsdt[s5 + 4..s5 + 9], &[0x12, 0x07, 0x04, 0x0a, 0x05]);
        assert!(dsdt.windows(4).any(|w| w == b"COM1"));
        // One LNRO0005 device per virtio-mmio slot.
        let hids = dsdt.windows(8).filter(|w| w == b"LNRO0005").count();
        assert_eq!(hids, 2);
        // Their extended interrupt descriptors (0x89, length 6, flags, one
        // interrupt): consumer, level-triggered, active high, exclusive.
        for gsi in [5u8, 17] {
            let flags: Vec<u8> = dsdt
                .windows(9)
                .filter(|w| w[0] == 0x89 && w[1] == 6 && w[2] == 0 && w[4] == 1)
                .filter(|w| w[5..] == [gsi, 0, 0, 0])
                .map(|w| w[3])
                .collect();
            assert_eq!(flags, [0x01], "interrupt descriptor of GSI {gsi}");
        }
    }

    #[test]
    fn madt_lists_every_vcpu_by_apic_id() {
        let topo = CpuTopology {
            sockets: 2,
            cores: 3,
            threads: 2,
        };
        let t = build(&machine(&topo)).unwrap();
        let madt = &walk(&t)[1].1;
        assert_eq!(u32_at(madt, 36), APIC_START as u32);
        let mut ids = Vec::new();
        let mut overrides = Vec::new();
        let mut ioapics = 0;
        let mut o = 44;
        while o < madt.len() {
            let (kind, len) = (madt[o], madt[o + 1] as usize);
            match kind {
                MADT_LOCAL_APIC => ids.push(u32::from(madt[o + 3])),
                MADT_LOCAL_X2APIC => ids.push(u32_at(madt, o + 4)),
                MADT_IO_APIC => {
                    ioapics += 1;
                    assert_eq!(u32_at(madt, o + 4), IOAPIC_START as u32);
                }
                MADT_INT_OVERRIDE => overrides.push((
                    madt[o + 3],
                    u32_at(madt, o + 4),
                    u16::from_le_bytes([madt[o + 8], madt[o + 9]]),
                )),
                other => panic!("unexpected MADT entry {other}"),
            }
            o += len;
        }
        let want: Vec<u32> = (0..topo.vcpus()).map(|i| topo.apic_id(i)).collect();
        assert_eq!(ids, want);
        assert_eq!(ioapics, 1);
        // The PIT's override, and the virtio line below 16 made
        // level-triggered (the one at 17 is no ISA line: its `_CRS` says it).
        assert_eq!(overrides, [(0, 2, INTI_EDGE_HIGH), (5, 5, INTI_LEVEL_HIGH)]);
    }

    #[test]
    fn more_than_254_vcpus_use_x2apic_entries() {
        let topo = CpuTopology {
            sockets: 2,
            cores: 80,
            threads: 2,
        };
        let t = build(&machine(&topo)).unwrap();
        let madt = &walk(&t)[1].1;
        let mut x2 = 0;
        let mut o = 44;
        while o < madt.len() {
            if madt[o] == MADT_LOCAL_X2APIC {
                x2 += 1;
                assert!(u32_at(madt, o + 4) >= 0xff);
            }
            o += madt[o + 1] as usize;
        }
        let high = (0..topo.vcpus())
            .filter(|&i| topo.apic_id(i) >= 0xff)
            .count();
        assert!(high > 0);
        assert_eq!(x2, high);
    }
}
