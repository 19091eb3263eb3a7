//! The syscall gate: CPL3 code enters CPL0 for the few things that need it.
//!
//! The gate is `INT3`: the breakpoint vector's IDT entry is a DPL 3
//! interrupt gate to `syscall_entry`. `INT n` cannot be used: the software
//! KVM this probe targets (PVM) runs the guest on hardware CPL3, where an
//! `INT n` faults into the host, and its instruction emulator does not do
//! protected-mode software interrupts (and it takes `int 0x80` for a 32-bit
//! Linux system call). `INT3` raises an exception (#BP), which it reflects
//! into the guest's IDT like any other. The probe uses no breakpoints.
//!
//! ABI: RAX = call number; arguments in RDI, RSI; results as documented per
//! call. An unknown number returns RAX = u64::MAX. The gate is an interrupt
//! gate, so the call runs with interrupts off, on the TSS's RSP0 stack.
//!
//! CPUID in particular must go through here: on the software KVM these
//! probes target, CPUID at CPL3 is not intercepted and returns the host's
//! raw values instead of the VMM's table.

use core::arch::{asm, global_asm};

/// CPUID: RDI = leaf, RSI = subleaf; returns EAX, EBX (in RSI), ECX, EDX.
const SYS_CPUID: u64 = 0;
/// STI; HLT: waits for the next interrupt, which is handled before return.
const SYS_IDLE: u64 = 1;
/// Returns control register RDI (0, 3 or 4) in RAX; other values give u64::MAX.
#[allow(dead_code, reason = "see read_cr")]
const SYS_READ_CR: u64 = 2;
/// Reloads CR3, flushing non-global TLB entries.
const SYS_FLUSH_TLB: u64 = 3;
/// Loads an empty IDT and raises an exception: a triple fault.
const SYS_TRIPLE_FAULT: u64 = 4;
/// WRMSR: RDI = MSR index, RSI = value. The caller makes sure the MSR
/// exists (a #GP here ends the VM through the exception path).
const SYS_WRMSR: u64 = 5;
const SYSCALLS: u64 = 6;

global_asm!(
    r#"
    .pushsection .text.syscall, "ax"
    .globl syscall_entry
syscall_entry:
    cmp ${SYSCALLS}, %rax
    jae 1f
    jmp *syscall_table(, %rax, 8)
1:  mov $-1, %rax
    iretq

sys_cpuid:
    push %rbx
    mov %edi, %eax
    mov %esi, %ecx
    cpuid
    mov %ebx, %esi
    pop %rbx
    iretq

sys_idle:
    sti
    hlt
    iretq

sys_read_cr:
    cmp $0, %rdi
    jne 1f
    mov %cr0, %rax
    iretq
1:  cmp $3, %rdi
    jne 1f
    mov %cr3, %rax
    iretq
1:  cmp $4, %rdi
    jne 1f
    mov %cr4, %rax
    iretq
1:  mov $-1, %rax
    iretq

sys_flush_tlb:
    mov %cr3, %rax
    mov %rax, %cr3
    iretq

sys_wrmsr:
    mov %edi, %ecx
    mov %esi, %eax
    mov %rsi, %rdx
    shr $32, %rdx
    wrmsr
    iretq
    .popsection

    .pushsection .rodata.syscall, "a"
    .balign 8
syscall_table:
    .quad sys_cpuid
    .quad sys_idle
    .quad sys_read_cr
    .quad sys_flush_tlb
    .quad triple_fault
    .quad sys_wrmsr
    .popsection
"#,
    SYSCALLS = const SYSCALLS,
    options(att_syntax)
);

/// The four result registers of CPUID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cpuid {
    /// EAX.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
}

/// Executes CPUID at CPL0, so the VMM's CPUID table answers.
pub fn cpuid(leaf: u32, subleaf: u32) -> Cpuid {
    let (eax, ebx, ecx, edx): (u64, u64, u64, u64);
    // SAFETY: the gate runs CPUID and returns; it touches no memory of ours
    // and preserves every register but the ones named here.
    unsafe {
        asm!(
            "int3",
            inout("rax") SYS_CPUID => eax,
            inout("rdi") u64::from(leaf) => _,
            inout("rsi") u64::from(subleaf) => ebx,
            out("rcx") ecx,
            out("rdx") edx,
            options(nostack, preserves_flags),
        );
    }
    Cpuid {
        eax: eax as u32,
        ebx: ebx as u32,
        ecx: ecx as u32,
        edx: edx as u32,
    }
}

/// Halts with interrupts enabled until an interrupt arrives and is handled.
pub fn idle() {
    // SAFETY: STI; HLT; IRETQ at CPL0; interrupt handlers preserve all state.
    unsafe {
        asm!("int3", inout("rax") SYS_IDLE => _, options(nostack, preserves_flags));
    }
}

/// Reads control register CR`n` (n = 0, 3 or 4); `None` for other `n`.
#[allow(dead_code, reason = "for checks of the CPU state the probe runs in")]
pub fn read_cr(n: u8) -> Option<u64> {
    let value: u64;
    // SAFETY: the gate only reads a control register.
    unsafe {
        asm!(
            "int3",
            inout("rax") SYS_READ_CR => value,
            in("rdi") u64::from(n),
            options(nostack, preserves_flags, nomem),
        );
    }
    (value != u64::MAX).then_some(value)
}

/// Flushes the TLB after page-table entries were changed.
pub fn flush_tlb() {
    // SAFETY: reloading CR3 with its own value only drops cached
    // translations; `memory` (no `nomem`) orders the preceding
    // page-table writes before it.
    unsafe {
        asm!("int3", inout("rax") SYS_FLUSH_TLB => _, options(nostack, preserves_flags));
    }
}

/// Writes `value` to model-specific register `msr` at CPL0. The MSR must
/// exist (check CPUID first): a #GP ends the VM.
pub fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the gate runs WRMSR and returns; the caller picks an MSR
    // whose effect on memory is accounted for (`memory` is not excluded).
    unsafe {
        asm!(
            "int3",
            inout("rax") SYS_WRMSR => _,
            in("rdi") u64::from(msr),
            in("rsi") value,
            out("rcx") _,
            out("rdx") _,
            options(nostack, preserves_flags),
        );
    }
}

/// Triple-faults the vCPU: a VMM resets or (QEMU with `-no-reboot`) exits.
pub fn triple_fault() -> ! {
    // SAFETY: the gate never returns.
    unsafe {
        asm!("int3", in("rax") SYS_TRIPLE_FAULT, options(noreturn, nostack));
    }
}
