//! The PVH entry: from 32-bit protected mode (paging off) to 64-bit long
//! mode at CPL0, then straight down to CPL3, where all Rust code runs.
//!
//! CPL0 code is emulated (about 1 us per instruction) on the machines this
//! probe is meant for, so the kernel-mode part is a short straight line of
//! assembly: the page tables and GDT are static data in the image, and the
//! TSS and IDT are filled in later by CPL3 code (the TSS right below, the
//! IDT by [`super::idt::init`]) before anything enters CPL0 again.
//!
//! Register state on entry (PVH ABI): 32-bit protected mode, flat CS/DS/ES/SS,
//! paging off, interrupts off, EBX = guest-physical address of
//! `struct hvm_start_info`. The stack pointer is undefined.

use core::arch::global_asm;

use super::gdt;

/// Size of the CPL3 stack all probe code runs on.
pub const USER_STACK_SIZE: usize = 128 * 1024;
/// Size of the CPL0 stack (TSS.RSP0) used by interrupts and the syscall gate.
pub const KERNEL_STACK_SIZE: usize = 16 * 1024;

/// Port of the boot-progress register: the VMM timestamps each byte.
pub const BOOT_MILESTONE_PORT: u16 = 0x80;
/// Milestone: the PVH entry point was reached.
pub const MILESTONE_ENTRY: u8 = 0x01;
/// Milestone: CPL3 reached, the probe's Rust code is about to run.
pub const MILESTONE_CPL3: u8 = 0x02;
/// Milestone: every selected check has run.
pub const MILESTONE_DONE: u8 = 0x03;

// The Xen ELF note telling a PVH-capable loader where the 32-bit entry is
// (XEN_ELFNOTE_PHYS32_ENTRY = 18). The descriptor is 8 bytes wide like
// Linux's; loaders read its low 32 bits.
global_asm!(
    r#"
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad pvh_start32
    .balign 4
    .popsection
"#,
    options(att_syntax)
);

global_asm!(
    r#"
    .pushsection .text.pvh_entry, "ax"
    .code32
    .globl pvh_start32
pvh_start32:
    mov $({MILESTONE_ENTRY}), %al
    outb %al, $({PORT})
    mov %ebx, %esi
"#,
    asm_sse_and_pae!(),
    r#"
    /* pml4_table points at the 1 GiB-page PDPT; without pdpe1gb switch
       to the PDPT whose first GiB is mapped with 2 MiB pages. */
    mov $0x80000000, %eax
    cpuid
    cmp $0x80000001, %eax
    jb 1f
    mov $0x80000001, %eax
    cpuid
    bt $26, %edx
    jc 2f
1:  movl $(pdpt_2m + 7), pml4_table
2:  mov $pml4_table, %eax
    mov %eax, %cr3
"#,
    asm_long_mode_on!(),
    r#"
    /* 64-bit TSS descriptor (the TSS lies below 4 GiB, its limit below
       64 KiB): low dword is base[15:0] << 16 | limit[15:0]; high dword is
       base[31:24] | type (present, available 64-bit TSS) | base[23:16]. */
    mov $tss64, %eax
    mov %eax, %ecx
    shl $16, %ecx
    or ${TSS_LIMIT}, %ecx
    mov %ecx, gdt_tss
    mov %eax, %edx
    shr $16, %edx
    and $0xff, %edx
    and $0xff000000, %eax
    or %eax, %edx
    or $0x8900, %edx
    mov %edx, gdt_tss + 4

    lgdt gdt_ptr32
    ljmp ${KERNEL_CS}, $long_mode_entry

    .code64
long_mode_entry:
    mov ${KERNEL_DS}, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    lea kernel_stack_top(%rip), %rsp
    mov ${TSS_SEL}, %eax
    ltr %ax
    lidt idt_ptr(%rip)

    /* iretq to user_entry at CPL3, RFLAGS = IOPL 3, IF 0. */
    mov %esi, %edi
    pushq ${USER_DS}
    pushq $user_stack_top
    pushq ${USER_RFLAGS}
    pushq ${USER_CS}
    pushq $user_entry
    iretq

    /* From here on: CPL3, native speed. RDI = start_info address. */
user_entry:
    mov %rdi, %r12
    /* .bss (stacks, TSS, IDT, heap) may hold anything a loader left there.
       Nothing is on the stacks yet. */
    lea __bss_start(%rip), %rdi
    lea __bss_end(%rip), %rcx
    sub %rdi, %rcx
    xor %eax, %eax
    cld
    rep stosb
    /* TSS: stacks for CPL0 entries, and an all-zero I/O bitmap ended by an
       all-ones byte. */
    lea kernel_stack_top(%rip), %rax
    mov %rax, tss64 + {TSS_RSP0}(%rip)
    lea ist_fault_stack_top(%rip), %rax
    mov %rax, tss64 + {TSS_IST1}(%rip)
    movw ${TSS_SIZE}, tss64 + {TSS_IOMAP_BASE}(%rip)
    movb $0xff, tss64 + {TSS_LIMIT}(%rip)
    mov $({MILESTONE_CPL3}), %al
    outb %al, $({PORT})
    fninit
    ldmxcsr mxcsr_default(%rip)
    mov %r12, %rdi
    call probe_main
    ud2
    .popsection

    .pushsection .rodata.entry, "a"
    .balign 4
mxcsr_default:
    .long 0x1f80
    .popsection

    .pushsection .bss.stacks, "aw", @nobits
    .balign 16
    .skip {USER_STACK_SIZE}
user_stack_top:
    .balign 16
    .skip {KERNEL_STACK_SIZE}
    .globl kernel_stack_top
kernel_stack_top:
    .popsection
"#,
    MILESTONE_ENTRY = const MILESTONE_ENTRY,
    MILESTONE_CPL3 = const MILESTONE_CPL3,
    PORT = const BOOT_MILESTONE_PORT,
    USER_STACK_SIZE = const USER_STACK_SIZE,
    KERNEL_STACK_SIZE = const KERNEL_STACK_SIZE,
    KERNEL_CS = const gdt::KERNEL_CS,
    KERNEL_DS = const gdt::KERNEL_DS,
    USER_CS = const gdt::USER_CS,
    USER_DS = const gdt::USER_DS,
    TSS_SEL = const gdt::TSS_SEL,
    USER_RFLAGS = const super::idt::USER_RFLAGS,
    TSS_LIMIT = const gdt::TSS_LIMIT,
    TSS_SIZE = const gdt::TSS_SIZE,
    TSS_RSP0 = const gdt::TSS_RSP0,
    TSS_IST1 = const gdt::TSS_IST1,
    TSS_IOMAP_BASE = const gdt::TSS_IOMAP_BASE,
    options(att_syntax)
);

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

/// The guest-physical range `[start, end)` the probe image (code, data and
/// .bss) occupies.
pub fn image_range() -> (u64, u64) {
    (
        &raw const __image_start as u64,
        &raw const __image_end as u64,
    )
}
