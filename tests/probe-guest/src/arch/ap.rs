//! Application processor startup: a real-mode trampoline that counts the
//! processors arriving in it and then halts them for good or, once
//! [`Trampoline::launch`] armed it, takes the first of them to CPL3 to run
//! a Rust function of the probe on a stack of its own.
//!
//! The launched AP goes the way the BSP went (see [`super::entry`]), in a
//! short straight line of CPL0 code: the trampoline loads the AP's GDT and
//! enters 32-bit protected mode at `ap_protected_entry` in the image; from
//! there SSE, the BSP's page tables, long mode, the AP's own TSS (its
//! kernel and fault stacks, an all-allowing I/O bitmap) and the shared IDT;
//! then `iretq` to CPL3. The AP shares the BSP's identity map, so it only
//! touches memory the BSP mapped before the launch. It runs with
//! interrupts off; the syscall gate works on it (its TSS gives it a kernel
//! stack of its own).

use core::arch::global_asm;

use super::gdt;
use super::{lapic, phys};

/// GDT selector of the AP's 32-bit code segment (only used between real
/// mode and long mode).
const AP_CODE32: u16 = 0x38;
/// Size of the launched AP's CPL3 stack.
pub const AP_USER_STACK_SIZE: usize = 64 * 1024;

// Copied to a free page below 1 MiB; a started AP runs it in real mode with
// CS = page >> 4, IP = 0. The counter and the launch words live in the same
// page; everything past the switch to protected mode is in the image.
global_asm!(
    r#"
    .pushsection .rodata.ap_trampoline, "a"
    .code16
    .globl ap_trampoline_start
ap_trampoline_start:
    cli
    lock incw %cs:(ap_trampoline_counter - ap_trampoline_start)
    cmpw $0, %cs:(ap_trampoline_launch - ap_trampoline_start)
    je 1f
    mov $1, %ax
    lock xaddw %ax, %cs:(ap_trampoline_seq - ap_trampoline_start)
    test %ax, %ax
    jnz 1f
    lgdtl %cs:(ap_trampoline_gdtr - ap_trampoline_start)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl ${AP_CODE32}, $ap_protected_entry
1:  hlt
    jmp 1b
    .balign 2
    .globl ap_trampoline_counter
ap_trampoline_counter:
    .word 0
    .globl ap_trampoline_launch
ap_trampoline_launch:
    .word 0
    .globl ap_trampoline_seq
ap_trampoline_seq:
    .word 0
    .balign 4
ap_trampoline_gdtr:
    .word ap_gdt_end - ap_gdt_table - 1
    .long ap_gdt_table
    .globl ap_trampoline_end
ap_trampoline_end:
    .code64
    .popsection

    .pushsection .text.ap_entry, "ax"
    .code32
ap_protected_entry:
    mov ${KERNEL_DS}, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    /* As the BSP: SSE and PAE, the BSP's page tables, long mode. */
"#,
    asm_sse_and_pae!(),
    r#"
    mov $pml4_table, %eax
    mov %eax, %cr3
"#,
    asm_long_mode_on!(),
    r#"
    ljmp ${KERNEL_CS}, $ap_long_entry

    .code64
ap_long_entry:
    mov ${KERNEL_DS}, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    lea ap_kernel_stack_top(%rip), %rsp
    mov ${TSS_SEL}, %eax
    ltr %ax
    lidt idt_ptr(%rip)
    /* iretq to ap_user_entry at CPL3 with RDI = the argument and RSI = the
       function (iretq keeps general registers). */
    mov ap_launch_arg(%rip), %rdi
    mov ap_launch_entry(%rip), %rsi
    pushq ${USER_DS}
    lea ap_user_stack_top(%rip), %rax
    pushq %rax
    pushq ${USER_RFLAGS}
    pushq ${USER_CS}
    lea ap_user_entry(%rip), %rax
    pushq %rax
    iretq

ap_user_entry:
    fninit
    ldmxcsr ap_mxcsr(%rip)
    call *%rsi
    ud2
    .popsection

    .pushsection .data.ap, "aw"
    .balign 16
    /* The same layout as the BSP's GDT, its own TSS, and a 32-bit code
       segment for the way up from real mode. */
    .globl ap_gdt_table
ap_gdt_table:
    .quad 0
    .quad 0x00af9b000000ffff
    .quad 0x00cf93000000ffff
    .quad 0x00cff3000000ffff
    .quad 0x00affb000000ffff
    .globl ap_gdt_tss
ap_gdt_tss:
    .quad 0
    .quad 0
    .quad 0x00cf9b000000ffff
ap_gdt_end:
    .balign 8
    .globl ap_launch_entry
ap_launch_entry:
    .quad 0
    .globl ap_launch_arg
ap_launch_arg:
    .quad 0
ap_mxcsr:
    .long 0x1f80
    .popsection

    .pushsection .bss.ap, "aw", @nobits
    .balign 16
    .globl ap_tss64
ap_tss64:
    .skip {TSS_LIMIT} + 1
    .balign 16
    .skip {KERNEL_STACK_SIZE}
    .globl ap_kernel_stack_top
ap_kernel_stack_top:
    .balign 16
    .skip {IST_STACK_SIZE}
    .globl ap_ist_stack_top
ap_ist_stack_top:
    .balign 16
    .skip {AP_USER_STACK_SIZE}
ap_user_stack_top:
    .popsection
"#,
    AP_CODE32 = const AP_CODE32,
    KERNEL_CS = const gdt::KERNEL_CS,
    KERNEL_DS = const gdt::KERNEL_DS,
    USER_CS = const gdt::USER_CS,
    USER_DS = const gdt::USER_DS,
    TSS_SEL = const gdt::TSS_SEL,
    USER_RFLAGS = const super::idt::USER_RFLAGS,
    TSS_LIMIT = const gdt::TSS_LIMIT,
    KERNEL_STACK_SIZE = const super::entry::KERNEL_STACK_SIZE,
    IST_STACK_SIZE = const gdt::IST_STACK_SIZE,
    AP_USER_STACK_SIZE = const AP_USER_STACK_SIZE,
    options(att_syntax)
);

extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_counter: u8;
    static ap_trampoline_launch: u8;
    static ap_trampoline_seq: u8;
    static ap_trampoline_end: u8;
    static ap_gdt_tss: u8;
    static ap_launch_entry: u8;
    static ap_launch_arg: u8;
    static ap_tss64: u8;
    static ap_kernel_stack_top: u8;
    static ap_ist_stack_top: u8;
}

/// A trampoline installed in a page of guest memory.
pub struct Trampoline {
    page: u64,
}

/// Size of the page the trampoline takes.
pub const PAGE: u64 = 0x1000;

/// What a launched AP runs at CPL3: it gets the launch's argument and
/// never returns (it may idle through the syscall gate when done).
pub type ApEntry = extern "C" fn(u64) -> !;

/// Offset of `label` (a symbol of the trampoline) in the trampoline.
fn offset(label: *const u8) -> u64 {
    label as u64 - &raw const ap_trampoline_start as u64
}

impl Trampoline {
    /// Copies the trampoline to `page` (4 KiB-aligned, below 1 MiB, RAM
    /// that nothing else uses) with its counter at 0, not armed.
    pub fn install(page: u64) -> Result<Self, phys::MapError> {
        phys::map(page, PAGE)?;
        let start = &raw const ap_trampoline_start as u64;
        let end = &raw const ap_trampoline_end as u64;
        for i in 0..end - start {
            phys::write_u8(page + i, phys::read_u8(start + i));
        }
        Ok(Trampoline { page })
    }

    /// Sends INIT, SIPI, SIPI to all other processors.
    pub fn start_aps(&self) {
        lapic::start_aps(self.page);
    }

    /// How many processors have arrived.
    pub fn arrivals(&self) -> u16 {
        phys::read_u16(self.page + offset(&raw const ap_trampoline_counter))
    }

    /// Arms the trampoline so that the first AP to arrive runs `entry(arg)`
    /// at CPL3 (the others halt as before), then starts the APs. One AP
    /// per probe boot: the AP's stacks and TSS are single statics.
    /// [`Self::launched`] tells when an AP took it.
    pub fn launch(&self, entry: ApEntry, arg: u64) {
        let tss = &raw const ap_tss64 as u64;
        phys::write_u64(
            tss + gdt::TSS_RSP0 as u64,
            &raw const ap_kernel_stack_top as u64,
        );
        phys::write_u64(
            tss + gdt::TSS_IST1 as u64,
            &raw const ap_ist_stack_top as u64,
        );
        phys::write_u16(tss + gdt::TSS_IOMAP_BASE as u64, gdt::TSS_SIZE as u16);
        phys::write_u8(tss + gdt::TSS_LIMIT as u64, 0xff);
        let [low, high] = tss_descriptor(tss, gdt::TSS_LIMIT as u32);
        let desc = &raw const ap_gdt_tss as u64;
        phys::write_u64(desc, low);
        phys::write_u64(desc + 8, high);
        phys::write_u64(&raw const ap_launch_entry as u64, entry as usize as u64);
        phys::write_u64(&raw const ap_launch_arg as u64, arg);
        phys::write_u16(self.page + offset(&raw const ap_trampoline_seq), 0);
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        phys::write_u16(self.page + offset(&raw const ap_trampoline_launch), 1);
        self.start_aps();
    }

    /// Whether an AP took the launch (it is past the trampoline).
    pub fn launched(&self) -> bool {
        phys::read_u16(self.page + offset(&raw const ap_trampoline_seq)) != 0
    }
}

/// The two quadwords of an available 64-bit TSS descriptor (present, DPL
/// 0) for a TSS at `base` with byte limit `limit` (below 1 MiB).
fn tss_descriptor(base: u64, limit: u32) -> [u64; 2] {
    let limit = u64::from(limit);
    let low = (limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | 0x89 << 40
        | ((limit >> 16) & 0xf) << 48
        | ((base >> 24) & 0xff) << 56;
    [low, base >> 32]
}
