//! Initial vCPU state for each boot protocol: registers, segments, control
//! registers, FPU, MSRs and the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    PVH_INFO_START, ZERO_PAGE_START,
};

/// Errors of setting up a vCPU's initial state.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM ioctl failed.
    #[error("{0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// Guest memory rejected a write.
    #[error("cannot write {0} to guest memory: {1}")]
    Memory(&'static str, vm_memory::GuestMemoryError),
    /// KVM accepted fewer MSRs than given.
    #[error("KVM set {0} of {1} boot MSRs")]
    Msrs(usize, usize),
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh,
    /// Linux 64-bit boot protocol: long mode on identity page tables,
    /// RSI = zero page.
    Linux64,
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 4;
const APIC_MODE_EXTINT: u32 = 7;

/// A GDT descriptor from its flags (access byte in bits 7:0, granularity
/// and size nibble in 15:12), base and limit.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
        | ((limit & 0xf_0000) << 32)
        | ((flags & 0xf0ff) << 40)
}

/// The KVM segment cache matching a GDT descriptor.
fn segment(entry: u64, index: u8) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0xf_0000) | (entry & 0xffff)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
    }
}

/// The boot GDT: null, code, data, TSS.
fn boot_gdt(mode: EntryMode) -> [u64; 4] {
    let code = match mode {
        EntryMode::Pvh => gdt_entry(0xc09b, 0, 0xfffff), // 32-bit, 4 GiB
        EntryMode::Linux64 => gdt_entry(0xa09b, 0, 0xfffff), // 64-bit
    };
    [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff), // data, 4 GiB
        gdt_entry(0x008b, 0, 0x67),    // 32-bit busy TSS
    ]
}

/// Writes the boot GDT/IDT and loads segments and control registers.
pub fn setup_sregs(mem: &GuestMemoryMmap, vcpu: &VcpuFd, mode: EntryMode) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu
        .get_sregs()
        .map_err(|e| RegsError::Kvm("get sregs", e))?;
    let gdt = boot_gdt(mode);
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|e| RegsError::Memory("GDT", e))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|e| RegsError::Memory("IDT", e))?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    let code = segment(gdt[1], 1);
    let data = segment(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[3], 3);
    match mode {
        EntryMode::Pvh => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryMode::Linux64 => {
            write_identity_map(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 = CR4_PAE;
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(|e| RegsError::Kvm("set sregs", e))
}

/// Identity-maps the first GiB with 2 MiB pages (Linux 64-bit protocol).
fn write_identity_map(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|e| RegsError::Memory("page tables", e))
    };
    w(PDPTE_START | 0x3, PML4_START)?;
    w(PDE_START | 0x3, PDPTE_START)?;
    for i in 0..512u64 {
        w((i << 21) | 0x83, PDE_START + i * 8)?;
    }
    Ok(())
}

/// Sets the general registers of the boot vCPU.
pub fn setup_regs(vcpu: &VcpuFd, mode: EntryMode, entry: u64) -> Result<(), RegsError> {
    let regs = match mode {
        EntryMode::Pvh => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
        EntryMode::Linux64 => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
    };
    vcpu.set_regs(&regs)
        .map_err(|e| RegsError::Kvm("set regs", e))
}

/// Resets the FPU to its power-on control words.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|e| RegsError::Kvm("set fpu", e))
}

/// Sets the MSRs a kernel expects firmware to have set.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries = [kvm_msr_entry {
        index: MSR_IA32_MISC_ENABLE,
        data: MISC_ENABLE_FAST_STRING,
        ..Default::default()
    }];
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs(0, entries.len()))?;
    let n = vcpu
        .set_msrs(&msrs)
        .map_err(|e| RegsError::Kvm("set msrs", e))?;
    if n != entries.len() {
        return Err(RegsError::Msrs(n, entries.len()));
    }
    Ok(())
}

/// Routes LINT0 to ExtINT (the 8259) and LINT1 to NMI, as firmware does.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| RegsError::Kvm("get lapic", e))?;
    let mut set_mode = |reg: usize, mode: u32| {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    };
    set_mode(APIC_LVT0, APIC_MODE_EXTINT);
    set_mode(APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic)
        .map_err(|e| RegsError::Kvm("set lapic", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code64 = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((code64.l, code64.db, code64.g), (1, 0, 1));
        assert_eq!(code64.limit, 0xffff_ffff);
        assert_eq!((code64.type_, code64.present, code64.s), (0xb, 1, 1));
        let code32 = segment(gdt_entry(0xc09b, 0, 0xfffff), 1);
        assert_eq!((code32.l, code32.db), (0, 1));
        let tss = segment(gdt_entry(0x008b, 0, 0x67), 3);
        assert_eq!(
            (tss.limit, tss.s, tss.type_, tss.selector),
            (0x67, 0, 0xb, 0x18)
        );
        assert_eq!(segment(0, 0).unusable, 1);
    }
}
