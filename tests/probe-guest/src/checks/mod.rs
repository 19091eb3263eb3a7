//! The checks, by area. Each returns `Ok(())` or the reason it failed; the
//! order here is the order of the output lines.

mod acpi;
mod blk;
mod blkmq;
mod boot;
mod cpuid;
mod net;
mod pci;
mod serial;
mod smp;
mod vsock;
mod vsock_flood;

use alloc::string::String;
use alloc::vec::Vec;

use virtio_drivers::transport::{DeviceType, Transport};

use crate::cmdline::Options;
use crate::println;
use crate::report::Report;
use crate::start_info::StartInfo;
use crate::virtio::{MmioDevice, VirtioDevice};

/// virtio-pci modern device IDs: this plus the virtio device type.
const PCI_DEVICE_BASE: u16 = 0x1040;

/// What the checks look at.
pub struct Context<'a> {
    /// start_info as read from EBX (not yet validated).
    pub info: &'a Result<StartInfo, String>,
    /// The raw command line bytes.
    pub cmdline: &'a Result<alloc::vec::Vec<u8>, String>,
    /// Parsed probe options.
    pub options: &'a Options<'a>,
}

impl Context<'_> {
    /// start_info, if it was readable and valid.
    pub fn start_info(&self) -> Result<&StartInfo, String> {
        let info = self.info.as_ref().map_err(Clone::clone)?;
        info.validate()
            .map_err(|e| alloc::format!("no valid start_info: {e}"))?;
        Ok(info)
    }

    /// The virtio devices of type `ty`: those announced as virtio-mmio on
    /// the command line, in announcement order, or, when none is, the
    /// virtio-pci functions of that type on a PCI machine's bus 0, by slot
    /// (`probe: pci: ...` when the bus cannot be read).
    pub fn virtio_devices(&self, ty: DeviceType) -> Vec<VirtioDevice> {
        let mmio: Vec<VirtioDevice> = self
            .options
            .virtio_mmio
            .iter()
            .filter_map(|v| MmioDevice::parse(v))
            .filter(|d| d.transport().is_ok_and(|t| t.device_type() == ty))
            .map(VirtioDevice::Mmio)
            .collect();
        if !mmio.is_empty() {
            return mmio;
        }
        let Ok(info) = self.start_info() else {
            return Vec::new();
        };
        match crate::pci::functions_with_id(info.rsdp_paddr, PCI_DEVICE_BASE + ty as u16) {
            Ok(f) => f.into_iter().map(VirtioDevice::Pci).collect(),
            Err(e) => {
                println!("probe: pci: {e}");
                Vec::new()
            }
        }
    }
}

/// Runs every check selected by `probe.check`.
pub fn run_all(ctx: &Context<'_>, report: &mut Report<'_>) {
    report.check("boot.start_info", || boot::start_info(ctx));
    report.check("boot.cmdline", || boot::cmdline(ctx));
    report.check("boot.memmap", || boot::memmap(ctx));
    report.check("boot.cpl3", boot::cpl3);
    report.check("cpuid.hypervisor", cpuid::hypervisor);
    report.check("cpuid.apic_id", cpuid::apic_id);
    report.check("cpuid.topology", || cpuid::topology(ctx));
    report.check("smp.mptable", || smp::mptable(ctx));
    if ctx.options.numa.is_some() {
        report.check("acpi.numa", || acpi::numa(ctx));
    }
    report.check("serial.scratch", serial::scratch);
    let bench_done = report.selects_prefix("blk.") && blk::run(ctx, report);
    if !bench_done {
        blk::bench(ctx, report);
    }
    blkmq::bench(ctx, report);
    vsock::run(ctx, report);
    net::run(ctx, report);
    pci::run(ctx, report);
    // Last: it leaves the other processors halted in real mode.
    report.check("smp.ap_startup", || smp::ap_startup(ctx));
}
