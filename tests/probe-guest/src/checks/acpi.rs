//! acpi.* checks: the ACPI tables the VMM built.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::boot::{MMIO_HOLE_END, MMIO_HOLE_START};
use super::Context;
use crate::acpi::{self, Table};
use crate::fail;
use crate::println;
use crate::report::CheckResult;

/// SLIT distance from a domain to itself (the ACPI spec's value).
const LOCAL_DISTANCE: u8 = 10;

fn find<'t>(tables: &'t [Table], sig: &str) -> Option<&'t Table> {
    tables.iter().find(|t| t.signature() == sig)
}

/// acpi.numa (with `probe.numa=<nodes>`): 0 means no SRAT or SLIT;
/// otherwise one proximity domain per socket of `probe.topo`, every vCPU
/// in its socket's domain, RAM (`probe.mem`, Keel's layout) covered
/// exactly once in equal shares in address order, and a SLIT of that many
/// localities (10 to itself, more and symmetric between two).
pub fn numa(ctx: &Context<'_>) -> CheckResult {
    let opts = ctx.options;
    let nodes = opts.numa.ok_or("needs probe.numa")?;
    let hint = ctx.start_info().map(|i| i.rsdp_paddr).unwrap_or(0);
    let tables = acpi::tables(hint)?;
    let sigs: Vec<&str> = tables.iter().map(Table::signature).collect();
    println!("probe: acpi tables {sigs:?}");
    let (srat, slit) = (find(&tables, "SRAT"), find(&tables, "SLIT"));
    if nodes == 0 {
        if srat.is_some() || slit.is_some() {
            fail!("probe.numa=0 but the XSDT lists {sigs:?}");
        }
        return Ok(());
    }
    let (Some(srat), Some(slit)) = (srat, slit) else {
        fail!("no SRAT and SLIT in the XSDT: {sigs:?}");
    };
    let topo = opts.topo.ok_or("probe.numa needs probe.topo")?;
    let mem = opts.mem.ok_or("probe.numa needs probe.mem")?;
    if topo.sockets != nodes {
        fail!(
            "probe.numa={nodes} but probe.topo has {} sockets",
            topo.sockets
        );
    }
    let s = acpi::parse_srat(&srat.bytes)?;
    println!(
        "probe: srat at {:#x}: {} processors, memory (domain, base, length) {:x?}",
        srat.addr,
        s.cpus.len(),
        s.memory
    );
    let mut errors = Vec::new();
    let per_socket = topo.cores * topo.threads;
    let mut want: Vec<(u32, u32)> = (0..topo.vcpus())
        .map(|i| (topo.apic_id(i), i / per_socket))
        .collect();
    let mut got = s.cpus.clone();
    want.sort_unstable();
    got.sort_unstable();
    if got != want {
        errors.push(format!(
            "processors (APIC ID, domain) {got:?}, want {want:?}"
        ));
    }
    errors.extend(memory_problems(s.memory, mem, nodes));
    let (n, distances) = acpi::parse_slit(&slit.bytes)?;
    println!(
        "probe: slit at {:#x}: {n} localities {distances:?}",
        slit.addr
    );
    if n != nodes as usize {
        errors.push(format!("SLIT has {n} localities, want {nodes}"));
    } else {
        for a in 0..n {
            for b in 0..n {
                let d = distances[a * n + b];
                let ok = if a == b {
                    d == LOCAL_DISTANCE
                } else {
                    d > LOCAL_DISTANCE && d == distances[b * n + a]
                };
                if !ok {
                    errors.push(format!("SLIT distance {a} -> {b} is {d}"));
                }
            }
        }
    }
    if !errors.is_empty() {
        fail!("{}", errors.join("; "));
    }
    Ok(())
}

/// The memory entries must tile Keel's RAM ranges for `mem` bytes exactly,
/// domains in address order, each with `mem / nodes` bytes.
fn memory_problems(mut memory: Vec<(u32, u64, u64)>, mem: u64, nodes: u32) -> Vec<String> {
    let mut errors = Vec::new();
    memory.sort_unstable_by_key(|&(_, base, _)| base);
    let low = mem.min(MMIO_HOLE_START);
    let mut ram = Vec::from([(0, low)]);
    if mem > low {
        ram.push((MMIO_HOLE_END, MMIO_HOLE_END + (mem - low)));
    }
    let mut entries = memory.iter();
    for &(start, end) in &ram {
        let mut at = start;
        while at < end {
            match entries.next() {
                Some(&(_, base, len)) if base == at && len > 0 => at += len,
                Some(e) => {
                    errors.push(format!(
                        "memory entry {e:x?} where RAM continues at {at:#x}"
                    ));
                    return errors;
                }
                None => {
                    errors.push(format!("RAM from {at:#x} to {end:#x} in no domain"));
                    return errors;
                }
            }
        }
        if at != end {
            errors.push(format!(
                "memory entry runs past RAM's end {end:#x} to {at:#x}"
            ));
        }
    }
    if let Some(e) = entries.next() {
        errors.push(format!("memory entry {e:x?} outside RAM"));
    }
    if memory.windows(2).any(|w| w[0].0 > w[1].0) {
        errors.push(String::from("domains not in address order"));
    }
    for d in 0..nodes {
        let total: u64 = memory.iter().filter(|m| m.0 == d).map(|m| m.2).sum();
        if total != mem / u64::from(nodes) {
            errors.push(format!(
                "domain {d} has {total:#x} bytes, want {:#x}",
                mem / u64::from(nodes)
            ));
        }
    }
    errors
}
