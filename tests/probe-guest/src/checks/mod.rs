//! The checks, by area. Each returns `Ok(())` or the reason it failed; the
//! order here is the order of the output lines.

mod acpi;
mod blk;
mod boot;
mod cpuid;
mod net;
mod pci;
mod serial;
mod smp;
mod vsock;
mod vsock_flood;

use alloc::string::String;

use crate::cmdline::Options;
use crate::report::Report;
use crate::start_info::StartInfo;

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
    vsock::run(ctx, report);
    net::run(ctx, report);
    pci::run(ctx, report);
    // Last: it leaves the other processors halted in real mode.
    report.check("smp.ap_startup", || smp::ap_startup(ctx));
}
