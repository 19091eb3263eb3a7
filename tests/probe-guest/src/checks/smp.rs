//! smp.* checks: the multiprocessor description the VMM provides.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::Context;
use crate::arch::ap::{self, Trampoline};
use crate::arch::{lapic, tsc};
use crate::fail;
use crate::mptable::{self, MpTable};
use crate::println;
use crate::report::CheckResult;
use crate::start_info::E820_RAM;

/// Where every VMM puts the I/O APIC.
const IOAPIC_ADDR: u32 = 0xfec0_0000;

/// smp.mptable: an intact MP table listing the expected processors, the BSP
/// with APIC ID 0, and the I/O APIC. Reports every problem found.
pub fn mptable(ctx: &Context<'_>) -> CheckResult {
    let table: MpTable = mptable::find()?;
    let ids: Vec<u8> = table.processors.iter().map(|p| p.apic_id).collect();
    println!(
        "probe: mptable at {:#x} (config {:#x}): {} entries, processor APIC IDs {:?}, I/O APICs {:?}",
        table.floating_addr,
        table.config_addr,
        table.entries,
        ids,
        table.ioapics.iter().map(|a| format!("id {} at {:#x}", a.id, a.addr)).collect::<Vec<_>>()
    );
    let errors = problems(&table, ctx);
    if !errors.is_empty() {
        fail!("{}", errors.join("; "));
    }
    Ok(())
}

fn problems(table: &MpTable, ctx: &Context<'_>) -> Vec<String> {
    let mut errors = Vec::new();
    let cpus = &table.processors;
    let ids: Vec<u8> = cpus.iter().map(|p| p.apic_id).collect();
    if usize::from(table.header_entry_count) != table.entries {
        errors.push(format!(
            "header says {} entries, the table's length holds {}",
            table.header_entry_count, table.entries
        ));
    }
    if cpus.is_empty() {
        errors.push(String::from("no processor entries"));
    }
    for p in cpus.iter().filter(|p| !p.enabled) {
        errors.push(format!(
            "processor with APIC ID {} is not enabled",
            p.apic_id
        ));
    }
    let bsps: Vec<u8> = cpus.iter().filter(|p| p.bsp).map(|p| p.apic_id).collect();
    match bsps.as_slice() {
        [0] => {}
        [id] => errors.push(format!("the BSP has APIC ID {id}, want 0")),
        _ => errors.push(format!("{} processors flagged as BSP, want 1", bsps.len())),
    }
    for (i, id) in ids.iter().enumerate() {
        if ids[..i].contains(id) {
            errors.push(format!("APIC ID {id} appears twice"));
        }
    }
    let opts = ctx.options;
    let expected = match (opts.cpus, opts.topo.map(|t| t.vcpus())) {
        (Some(n), Some(m)) if n != m => {
            errors.push(format!(
                "probe.cpus={n} and probe.topo ({m} vCPUs) disagree"
            ));
            None
        }
        (n, m) => n.or(m),
    };
    if let Some(n) = expected {
        if cpus.len() != n as usize {
            errors.push(format!("{} processor entries, want {n}", cpus.len()));
        }
    }
    if let Some(topo) = opts.topo {
        let want: Vec<u32> = (0..topo.vcpus()).map(|i| topo.apic_id(i)).collect();
        if !ids.iter().map(|&id| u32::from(id)).eq(want.iter().copied()) {
            errors.push(format!("APIC IDs {ids:?}, want {want:?} for probe.topo"));
        }
    }
    if !table
        .ioapics
        .iter()
        .any(|a| a.addr == IOAPIC_ADDR && a.enabled)
    {
        errors.push(format!("no enabled I/O APIC entry at {IOAPIC_ADDR:#x}"));
    }
    errors
}

/// Lowest and highest-plus-one address where the AP trampoline may go:
/// above what VMMs put in the first 64 KiB (boot GDT, start_info, page
/// tables), below the EBDA.
const TRAMPOLINE_WINDOW: (u64, u64) = (0x1_0000, 0x9_f000);
/// How long to wait for the APs after the last SIPI.
const AP_ARRIVAL_TIMEOUT_MS: u64 = 1000;

/// A page of RAM in [`TRAMPOLINE_WINDOW`] that holds none of what the VMM
/// passed through start_info.
pub(crate) fn free_low_page(ctx: &Context<'_>) -> Result<u64, String> {
    let info = ctx.start_info()?;
    let map = info.memmap()?;
    let used = [
        (info.paddr, 56),
        (info.memmap_paddr, u64::from(info.memmap_entries) * 24),
        (
            info.cmdline_paddr,
            crate::start_info::MAX_CMDLINE as u64 + 1,
        ),
        (info.modlist_paddr, u64::from(info.nr_modules) * 32),
        (info.rsdp_paddr, 36),
    ];
    let (low, high) = TRAMPOLINE_WINDOW;
    (low..high)
        .step_by(ap::PAGE as usize)
        .find(|&page| {
            let end = page + ap::PAGE;
            let in_ram = map
                .iter()
                .any(|e| e.kind == E820_RAM && e.addr <= page && end <= e.end());
            let clash = used
                .iter()
                .any(|&(addr, len)| len != 0 && addr < end && page < addr.saturating_add(len));
            in_ram && !clash
        })
        .ok_or_else(|| format!("no free RAM page in [{low:#x},{high:#x}) for the AP trampoline"))
}

/// smp.ap_startup: INIT-SIPI-SIPI wakes every application processor, each
/// of which runs a real-mode trampoline that counts it.
pub fn ap_startup(ctx: &Context<'_>) -> CheckResult {
    let opts = ctx.options;
    let vcpus = match opts.cpus.or(opts.topo.map(|t| t.vcpus())) {
        Some(n) => n,
        None => mptable::find()
            .map(|t| t.processors.len() as u32)
            .map_err(|e| {
                format!("vCPU count unknown (no probe.cpus, probe.topo, or MP table: {e})")
            })?,
    };
    let want = vcpus.saturating_sub(1);
    let page = free_low_page(ctx)?;
    lapic::enable().map_err(|e| format!("local APIC: {e}"))?;
    let trampoline =
        Trampoline::install(page).map_err(|e| format!("trampoline at {page:#x}: {e}"))?;
    trampoline.start_aps();
    let mut arrived = trampoline.arrivals();
    for _ in 0..AP_ARRIVAL_TIMEOUT_MS {
        if u32::from(arrived) >= want {
            break;
        }
        tsc::delay_us(1000);
        arrived = trampoline.arrivals();
    }
    if u32::from(arrived) != want {
        fail!("{arrived} of {want} application processors reached the trampoline at {page:#x}");
    }
    Ok(())
}
