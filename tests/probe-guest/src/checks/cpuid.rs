//! cpuid.* checks: what the VMM's CPUID table says, read at CPL0 through
//! the syscall gate (CPL3 CPUID would show the host's raw values here).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::Context;
use crate::arch::syscall::{cpuid, Cpuid};
use crate::cmdline::{ceil_log2, Topology};
use crate::fail;
use crate::report::CheckResult;

const KVM_SIGNATURE: &[u8; 12] = b"KVMKVMKVM\0\0\0";
/// Leaf 0xB level types.
const LEVEL_INVALID: u32 = 0;
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;
/// Subleaves of 0xB looked at before giving up on finding the end.
const MAX_LEVELS: u32 = 8;

fn max_basic_leaf() -> u32 {
    cpuid(0, 0).eax
}

fn is_intel() -> bool {
    let l0 = cpuid(0, 0);
    [l0.ebx, l0.edx, l0.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .eq(*b"GenuineIntel")
}

fn require_leaf_0xb() -> Result<(), String> {
    let max = max_basic_leaf();
    if max < 0xb {
        return Err(format!(
            "leaf 0xB is not available (max basic leaf {max:#x})"
        ));
    }
    Ok(())
}

/// cpuid.hypervisor: the hypervisor bit and KVM's signature leaf.
pub fn hypervisor() -> CheckResult {
    if cpuid(1, 0).ecx & (1 << 31) == 0 {
        fail!("leaf 1 ECX bit 31 (hypervisor) is clear");
    }
    let Cpuid { eax, ebx, ecx, edx } = cpuid(0x4000_0000, 0);
    let signature: Vec<u8> = [ebx, ecx, edx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    if signature != KVM_SIGNATURE {
        fail!(
            "leaf 0x40000000 signature {:?}, want \"KVMKVMKVM\\0\\0\\0\"",
            String::from_utf8_lossy(&signature)
        );
    }
    if eax < 0x4000_0001 {
        fail!("leaf 0x40000000 EAX {eax:#x} < 0x40000001");
    }
    Ok(())
}

/// cpuid.apic_id: the BSP (this vCPU) has APIC ID 0 in leaves 1 and 0xB.
pub fn apic_id() -> CheckResult {
    let initial = cpuid(1, 0).ebx >> 24;
    if initial != 0 {
        fail!("leaf 1 EBX[31:24] (initial APIC ID) is {initial}, want 0 on the BSP");
    }
    require_leaf_0xb()?;
    let x2apic = cpuid(0xb, 0).edx;
    if x2apic != 0 {
        fail!("leaf 0xB EDX (x2APIC ID) is {x2apic}, want 0 on the BSP");
    }
    Ok(())
}

/// One level of leaf 0xB.
struct Level {
    shift: u32,
    count: u32,
    kind: u32,
    x2apic_id: u32,
}

fn level(subleaf: u32) -> Level {
    let r = cpuid(0xb, subleaf);
    Level {
        shift: r.eax & 0x1f,
        count: r.ebx & 0xffff,
        kind: (r.ecx >> 8) & 0xff,
        x2apic_id: r.edx,
    }
}

/// cpuid.topology: leaf 0xB (and leaves 1 and 4) match `probe.topo`, or
/// without it, leaf 0xB is self-consistent.
pub fn topology(ctx: &Context<'_>) -> CheckResult {
    require_leaf_0xb()?;
    let mut errors = Vec::new();
    match ctx.options.topo {
        Some(topo) => check_expected(topo, &mut errors),
        None => check_consistent(&mut errors),
    }
    if !errors.is_empty() {
        fail!("{}", errors.join("; "));
    }
    Ok(())
}

fn check_expected(topo: Topology, errors: &mut Vec<String>) {
    let Topology {
        cores: c,
        threads: t,
        ..
    } = topo;
    let (tb, cb) = (ceil_log2(t), ceil_log2(c));
    let smt = level(0);
    if smt.kind != LEVEL_SMT || smt.count != t || smt.shift != tb {
        errors.push(format!(
            "0xB.0: type {} count {} shift {}, want type {LEVEL_SMT} count {t} shift {tb}",
            smt.kind, smt.count, smt.shift
        ));
    }
    let core = level(1);
    if core.kind != LEVEL_CORE || core.count != c * t || core.shift != tb + cb {
        errors.push(format!(
            "0xB.1: type {} count {} shift {}, want type {LEVEL_CORE} count {} shift {}",
            core.kind,
            core.count,
            core.shift,
            c * t,
            tb + cb
        ));
    }
    let end = level(2);
    if end.kind != LEVEL_INVALID {
        errors.push(format!(
            "0xB.2: type {}, want {LEVEL_INVALID} (invalid)",
            end.kind
        ));
    }
    let l1 = cpuid(1, 0);
    let logical = (l1.ebx >> 16) & 0xff;
    if logical < c * t {
        errors.push(format!(
            "leaf 1 EBX[23:16] {logical} < cores*threads {}",
            c * t
        ));
    }
    if c * t > 1 && l1.edx & (1 << 28) == 0 {
        errors.push(String::from(
            "leaf 1 EDX bit 28 (HTT) clear with more than one logical CPU per socket",
        ));
    }
    if is_intel() && max_basic_leaf() >= 4 {
        let cores = (cpuid(4, 0).eax >> 26) + 1;
        if cores < c {
            errors.push(format!("leaf 4 EAX[31:26]+1 = {cores} < cores {c}"));
        }
    }
}

fn check_consistent(errors: &mut Vec<String>) {
    let first = level(0);
    if first.kind != LEVEL_SMT {
        errors.push(format!(
            "0xB.0: type {}, want {LEVEL_SMT} (SMT)",
            first.kind
        ));
    }
    let mut prev = first;
    for sub in 1..MAX_LEVELS {
        let l = level(sub);
        if l.kind == LEVEL_INVALID {
            return;
        }
        if l.x2apic_id != prev.x2apic_id {
            errors.push(format!(
                "0xB.{sub}: x2APIC ID {} differs from {}",
                l.x2apic_id, prev.x2apic_id
            ));
        }
        if l.kind <= prev.kind || l.shift < prev.shift || l.count < prev.count || l.count == 0 {
            errors.push(format!(
                "0xB.{sub}: type {} shift {} count {} does not follow type {} shift {} count {}",
                l.kind, l.shift, l.count, prev.kind, prev.shift, prev.count
            ));
        }
        prev = l;
    }
    errors.push(format!(
        "no invalid (type 0) level within {MAX_LEVELS} subleaves"
    ));
}
