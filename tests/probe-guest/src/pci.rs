//! PCI bus 0 of a PCI machine: ECAM is where ACPI's MCFG says (RSDP from
//! start_info, then the XSDT); functions are enumerated and their BARs
//! read with virtio-drivers' `PciRoot` over ECAM, and virtio-pci
//! transports opened on them. A machine without an MCFG has no PCI bus to
//! the probe (nothing is read at a guessed address).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use virtio_drivers::transport::pci::bus::{
    BarInfo, Cam, DeviceFunction, DeviceFunctionInfo, MmioCam, PciRoot,
};
use virtio_drivers::transport::pci::PciTransport;

use crate::arch::phys;
use crate::virtio::{ProbeHal, ProbeTransport};

/// Bytes of the ACPI table header.
const HEADER_LEN: u64 = 36;
/// Offset of the first allocation (ECAM base) in the MCFG.
const MCFG_ALLOCATION: u64 = 44;
/// Bytes of ECAM per bus; the probe reads bus 0 only.
const ECAM_BUS: u64 = 1 << 20;
/// Capability ID of MSI-X.
pub const CAP_MSIX: u8 = 0x11;
/// Capability ID of the virtio-pci structures (vendor-specific), and the
/// `cfg_type`s of the common configuration and the notifications.
const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;

/// A virtio-pci function's common configuration and notification
/// structures, in guest-physical addresses.
#[derive(Clone, Copy, Debug)]
pub struct PciNotifyRegs {
    /// The common configuration structure.
    pub common: u64,
    /// The notification structure.
    pub notify: u64,
    /// `notify_off_multiplier`.
    pub multiplier: u32,
}

fn table_at(addr: u64) -> Result<([u8; 4], u32), String> {
    phys::map(addr, HEADER_LEN).map_err(|e| format!("ACPI table at {addr:#x}: {e}"))?;
    let mut sig = [0u8; 4];
    phys::read_bytes(addr, &mut sig).map_err(|e| format!("{e}"))?;
    Ok((sig, phys::read_u32(addr + 4)))
}

/// Where the BIOS area is searched for the RSDP (ACPI 6.5, 5.2.5.1).
const BIOS_AREA: (u64, u64) = (0xe_0000, 0x10_0000);

/// The RSDP: start_info's `rsdp` (0: none given), else the first
/// "RSD PTR " on a 16-byte boundary of the BIOS area.
fn find_rsdp(rsdp: u64) -> Option<u64> {
    if rsdp != 0 {
        return Some(rsdp);
    }
    let (low, high) = BIOS_AREA;
    phys::map(low, high - low).ok()?;
    (low..high)
        .step_by(16)
        .find(|&a| phys::read_u64(a) == u64::from_le_bytes(*b"RSD PTR "))
}

/// ECAM's base from the MCFG, or `None` when ACPI has no MCFG (no PCI
/// machine). `rsdp` is start_info's RSDP address (0: none given). The
/// tables are listed by the XSDT (RSDP revision 2 and later) or, in an
/// ACPI 1.0 RSDP such as SeaBIOS builds for QEMU's q35, the RSDT.
pub fn ecam_base(rsdp: u64) -> Result<Option<u64>, String> {
    let Some(rsdp) = find_rsdp(rsdp) else {
        return Ok(None);
    };
    phys::map(rsdp, 36).map_err(|e| format!("RSDP: {e}"))?;
    let (root, want, width) = if phys::read_u8(rsdp + 15) >= 2 {
        (phys::read_u64(rsdp + 24), b"XSDT", 8)
    } else {
        (u64::from(phys::read_u32(rsdp + 16)), b"RSDT", 4)
    };
    let (sig, len) = table_at(root)?;
    if &sig != want {
        return Err(format!(
            "{} at {root:#x} has signature {sig:?}",
            core::str::from_utf8(want).unwrap_or("root table")
        ));
    }
    phys::map(root, u64::from(len)).map_err(|e| format!("root table: {e}"))?;
    let entries = (u64::from(len).saturating_sub(HEADER_LEN)) / width;
    for i in 0..entries {
        let at = root + HEADER_LEN + width * i;
        let table = if width == 8 {
            phys::read_u64(at)
        } else {
            u64::from(phys::read_u32(at))
        };
        if &table_at(table)?.0 == b"MCFG" {
            phys::map(table, MCFG_ALLOCATION + 16).map_err(|e| format!("MCFG: {e}"))?;
            return Ok(Some(phys::read_u64(table + MCFG_ALLOCATION)));
        }
    }
    Ok(None)
}

/// Bus 0 through ECAM.
pub struct Bus {
    root: PciRoot<MmioCam<'static>>,
    ecam: u64,
}

/// One function found on bus 0.
pub struct Function {
    /// Its address.
    pub at: DeviceFunction,
    /// Its IDs and class.
    pub info: DeviceFunctionInfo,
}

impl Bus {
    /// Opens bus 0 of the ECAM window at `ecam`.
    pub fn open(ecam: u64) -> Result<Self, String> {
        phys::map(ecam, ECAM_BUS).map_err(|e| format!("ECAM at {ecam:#x}: {e}"))?;
        // SAFETY: the window is identity-mapped device memory the VMM
        // announced in the MCFG, 4-byte aligned, and no Rust reference
        // points into it (`read`/`write` below use single volatile accesses
        // through `phys`); only bus 0 (its first MiB, mapped just above) is
        // ever accessed.
        let cam = unsafe { MmioCam::new(ecam as *mut u8, Cam::Ecam) };
        Ok(Bus {
            root: PciRoot::new(cam),
            ecam,
        })
    }

    /// Every function on bus 0, by device number.
    pub fn functions(&self) -> Vec<Function> {
        self.root
            .enumerate_bus(0)
            .map(|(at, info)| Function { at, info })
            .collect()
    }

    fn register(&self, at: DeviceFunction, offset: u8) -> u64 {
        self.ecam + u64::from(Cam::Ecam.cam_offset(at, offset))
    }

    /// Configuration dword at `offset` of `at`.
    pub fn read(&self, at: DeviceFunction, offset: u8) -> u32 {
        phys::read_u32(self.register(at, offset))
    }

    /// Writes configuration dword `offset` of `at`.
    pub fn write(&mut self, at: DeviceFunction, offset: u8, value: u32) {
        phys::write_u32(self.register(at, offset), value);
    }

    /// Offset of `at`'s capability `id`, if it has one.
    pub fn capability(&self, at: DeviceFunction, id: u8) -> Option<u8> {
        self.root
            .capabilities(at)
            .find(|c| c.id == id)
            .map(|c| c.offset)
    }

    /// BAR 0's address (a memory BAR, 32- or 64-bit).
    pub fn bar0(&mut self, at: DeviceFunction) -> Result<u64, String> {
        match self.root.bar_info(at, 0) {
            Ok(Some(b @ BarInfo::Memory { .. })) => b
                .memory_address_size()
                .map(|(addr, _)| addr)
                .ok_or_else(|| String::from("BAR 0 has no address")),
            other => Err(format!("BAR 0: {other:?}")),
        }
    }

    /// Moves `at`'s (64-bit) BAR 0 to `addr`.
    pub fn move_bar0(&mut self, at: DeviceFunction, addr: u64) {
        self.root.set_bar_64(at, 0, addr);
    }

    /// A virtio-pci transport on `at` (its BAR read as it is now).
    pub fn transport(&mut self, at: DeviceFunction) -> Result<ProbeTransport, String> {
        let regs = self.notify_regs(at);
        PciTransport::new::<ProbeHal, _>(&mut self.root, at)
            .map(|t| ProbeTransport::pci(t, regs))
            .map_err(|e| format!("virtio-pci transport on {at}: {e}"))
    }

    /// Where `at`'s virtio-pci common configuration and notification
    /// structures are (virtio 1.2, 4.1.4), when both are found in memory
    /// BARs with addresses.
    pub fn notify_regs(&mut self, at: DeviceFunction) -> Option<PciNotifyRegs> {
        let caps: Vec<(u8, u8)> = self
            .root
            .capabilities(at)
            .filter(|c| c.id == CAP_VENDOR)
            .map(|c| (c.offset, (c.private_header >> 8) as u8))
            .collect();
        let mut common = None;
        let mut notify = None;
        for (offset, cfg_type) in caps {
            let bar = (self.read(at, offset + 4) & 0xff) as u8;
            let within = u64::from(self.read(at, offset + 8));
            let base = match self.root.bar_info(at, bar) {
                Ok(Some(b @ BarInfo::Memory { .. })) => b.memory_address_size()?.0,
                _ => continue,
            };
            match cfg_type {
                CFG_COMMON => common = Some(base + within),
                CFG_NOTIFY => notify = Some((base + within, self.read(at, offset + 16))),
                _ => {}
            }
        }
        let (notify, multiplier) = notify?;
        Some(PciNotifyRegs {
            common: common?,
            notify,
            multiplier,
        })
    }

    /// The address of `at`'s memory BAR `bar` (0..=5), if it has one.
    pub fn bar_address(&mut self, at: DeviceFunction, bar: u8) -> Option<u64> {
        match self.root.bar_info(at, bar) {
            Ok(Some(b @ BarInfo::Memory { .. })) => Some(b.memory_address_size()?.0),
            _ => None,
        }
    }

    /// ECAM's base.
    pub fn ecam(&self) -> u64 {
        self.ecam
    }
}

/// Bus 0 of a PCI machine (`rsdp` as for [`ecam_base`]); `None` when
/// ACPI has no MCFG.
pub fn machine_bus(rsdp: u64) -> Option<Result<Bus, String>> {
    match ecam_base(rsdp) {
        Ok(Some(ecam)) => Some(Bus::open(ecam)),
        Ok(None) => None,
        Err(e) => Some(Err(e)),
    }
}

/// A function on bus 0 of the ECAM window at `ecam`: enough to open its
/// transport again whenever a driver needs it.
#[derive(Clone, Copy, Debug)]
pub struct PciFunction {
    /// ECAM's base.
    pub ecam: u64,
    /// The function's address.
    pub at: DeviceFunction,
}

impl PciFunction {
    /// A virtio-pci transport on the function (its BAR read as it is now).
    pub fn transport(&self) -> Result<ProbeTransport, String> {
        Bus::open(self.ecam)?.transport(self.at)
    }
}

/// The functions with device ID `device_id` on a PCI machine's bus 0, by
/// device number (`rsdp` as for [`ecam_base`]); none without a PCI bus.
pub fn functions_with_id(rsdp: u64, device_id: u16) -> Result<Vec<PciFunction>, String> {
    let Some(bus) = machine_bus(rsdp) else {
        return Ok(Vec::new());
    };
    let bus = bus?;
    Ok(bus
        .functions()
        .into_iter()
        .filter(|f| f.info.device_id == device_id)
        .map(|f| PciFunction {
            ecam: bus.ecam,
            at: f.at,
        })
        .collect())
}
