//! The PCI host bridge as ACPI describes it: the MCFG table (where ECAM
//! is) and, in the DSDT, the host bridge `\_SB.PCI0` with its resource
//! windows and interrupt routing, the INTx link devices and the ECAM
//! window reserved as a motherboard resource.
//!
//! ```text
//! Device (\_SB.PCI0) {
//!     _HID PNP0A08 (PCI Express root), _CID PNP0A03 (PCI), _SEG 0, _BBN 0
//!     _CRS: bus 0; ports 0xCF8-0xCFF; DWordMemory 32-bit window;
//!           QWordMemory 64-bit window
//!     _PRT: slot 1-31, pin A-D -> \_SB.LNKn, n = (slot + pin) % 8
//! }
//! Device (\_SB.LNKn) { PNP0C0F, GSI 16 + n, level, active high, shared }
//! Device (\_SB.MRES) { PNP0C02, the ECAM window }
//! ```
//!
//! The INTx lines go through link devices rather than straight to GSIs
//! in `_PRT`: a GSI named in `_PRT` is level-triggered **active low** by
//! the PCI convention, while KVM's I/O APIC signals Keel's irqfd lines
//! active high; a link device's `_CRS` states the polarity (QEMU's q35
//! does the same).

use acpi_tables::mcfg::MCFG;
use acpi_tables::{aml, Aml};

use super::layout::{self, Range};

/// What the guest is told about the PCI host bridge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciHost {
    /// The ECAM window of bus 0.
    pub ecam: Range,
    /// The 32-bit BAR window.
    pub mmio32: Range,
    /// The 64-bit BAR window.
    pub mmio64: Range,
}

impl PciHost {
    /// Keel's PCI host bridge for a guest with `mem_size` bytes of RAM.
    pub fn for_memory(mem_size: u64) -> Self {
        Self {
            ecam: Range {
                start: layout::PCI_ECAM_START,
                len: layout::PCI_ECAM_SIZE,
            },
            mmio32: Range {
                start: layout::PCI_MMIO32_START,
                len: layout::PCI_MMIO32_SIZE,
            },
            mmio64: layout::pci_mmio64_window(mem_size),
        }
    }
}

/// The MCFG table: ECAM of segment 0, bus 0 only.
pub fn mcfg(host: &PciHost, oem_id: [u8; 6], oem_table_id: [u8; 8], revision: u32) -> Vec<u8> {
    let mut t = MCFG::new(oem_id, oem_table_id, revision);
    t.add_ecam(host.ecam.start, 0, 0, 0);
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn link_name(n: u32) -> String {
    format!("_SB_.LNK{n}")
}

/// Appends the host bridge, its INTx links and the ECAM reservation to a
/// DSDT body.
pub fn dsdt(host: &PciHost, body: &mut Vec<u8>) {
    // Each statement serializes at once: the builders borrow their parts.
    let port = layout::PCI_CONFIG_IO_PORT;
    let (m32, m64) = (host.mmio32, host.mmio64);
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let cfg_io = aml::IO::new(port, port, 1, 8);
    // The 32-bit window ends below 4 GiB: the casts cannot truncate.
    let mem32 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        m32.start as u32,
        (m32.end() - 1) as u32,
        None,
    );
    let mem64 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        m64.start,
        m64.end() - 1,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus, &cfg_io, &mem32, &mem64]);
    // _PRT: (slot << 16 | 0xffff, pin, link, 0) for every slot but the
    // host bridge's.
    let routes: Vec<(u32, u8, aml::Path)> = (1..32u8)
        .flat_map(|slot| (0..4u8).map(move |pin| (slot, pin)))
        .map(|(slot, pin)| {
            let line = layout::pci_intx_gsi(slot, pin) - layout::PCI_INTX_GSI_BASE;
            let link = aml::Path::new(&format!("\\{}", link_name(line)));
            ((u32::from(slot) << 16) | 0xffff, pin, link)
        })
        .collect();
    let entries: Vec<aml::Package> = routes
        .iter()
        .map(|(addr, pin, link)| aml::Package::new(vec![addr, pin, link, &aml::ZERO]))
        .collect();
    let prt = aml::Package::new(entries.iter().map(|p| p as &dyn Aml).collect());
    aml::Device::new(
        "_SB_.PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
            &aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_SEG".into(), &aml::ZERO),
            &aml::Name::new("_BBN".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
            &aml::Name::new("_PRT".into(), &prt),
        ],
    )
    .to_aml_bytes(body);
    for n in 0..layout::PCI_INTX_LINES {
        let gsi = layout::PCI_INTX_GSI_BASE + n;
        // Consumer, level-triggered, active high, shared.
        let irq = aml::Interrupt::new(true, false, false, true, gsi);
        let res = aml::ResourceTemplate::new(vec![&irq]);
        aml::Device::new(
            link_name(n).as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0F")),
                &aml::Name::new("_UID".into(), &n),
                &aml::Name::new("_PRS".into(), &res),
                &aml::Name::new("_CRS".into(), &res),
                // One fixed line each: setting or disabling it is a no-op
                // (Linux's link driver calls _SRS with the line from _CRS).
                &aml::Method::new("_SRS".into(), 1, false, vec![]),
                &aml::Method::new("_DIS".into(), 0, false, vec![]),
            ],
        )
        .to_aml_bytes(body);
    }
    // Linux uses ECAM only where a motherboard resource reserves it.
    let (ecam_base, ecam_len) = (host.ecam.start as u32, host.ecam.len as u32);
    aml::Device::new(
        "_SB_.MRES".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::Memory32Fixed::new(
                    true, ecam_base, ecam_len,
                )]),
            ),
        ],
    )
    .to_aml_bytes(body);
}
