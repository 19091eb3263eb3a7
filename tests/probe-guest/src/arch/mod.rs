//! x86-64 machinery: boot entry, descriptor tables, paging, the syscall
//! gate, port and physical-memory access.

/// 32-bit assembly shared by the BSP's and the APs' way to long mode:
/// SSE for compiled code (CR0.EM=0 CR0.TS=0 CR0.MP=1; CR4.OSFXSR,
/// CR4.OSXMMEXCPT) and CR4.PAE. A template piece for `global_asm!`.
macro_rules! asm_sse_and_pae {
    () => {
        r#"
    mov %cr0, %eax
    and $~0x0c, %eax
    or $0x02, %eax
    mov %eax, %cr0
    mov %cr4, %eax
    or $0x620, %eax
    mov %eax, %cr4
"#
    };
}

/// 32-bit assembly, once CR3 holds the page tables: EFER.LME, then
/// paging on, which enters IA-32e mode (a far jump to 64-bit code must
/// follow). A template piece for `global_asm!`.
macro_rules! asm_long_mode_on {
    () => {
        r#"
    mov $0xc0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000000, %eax
    mov %eax, %cr0
"#
    };
}

pub mod ap;
pub mod entry;
pub mod gdt;
pub mod idt;
pub mod lapic;
pub mod paging;
pub mod phys;
pub mod pic;
pub mod port;
pub mod syscall;
pub mod tsc;
