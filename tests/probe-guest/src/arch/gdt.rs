//! The GDT and the 64-bit TSS.
//!
//! The GDT is static data in the image. The entry code loads it while still
//! in 32-bit mode, fills in the TSS descriptor's base (the only field the
//! assembler cannot compute) and loads the task register.
//!
//! The TSS lives in .bss: the CPL3 entry code fills in RSP0, IST1 and the
//! I/O bitmap offset after zeroing .bss, before the first port access or
//! CPL0 entry. Its I/O permission bitmap allows every port. That matters
//! on software KVMs that keep no guest IOPL for CPL3 (such as the
//! "PVM" this probe targets, where port I/O at CPL3 traps and is
//! emulated with the permission check the CPU would do): there the bitmap,
//! not RFLAGS.IOPL, is what lets CPL3 code reach the serial port.

use core::arch::global_asm;

/// Kernel (CPL0) 64-bit code selector.
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data selector.
pub const KERNEL_DS: u16 = 0x10;
/// User (CPL3) data selector, RPL 3.
pub const USER_DS: u16 = 0x18 | 3;
/// User (CPL3) 64-bit code selector, RPL 3.
pub const USER_CS: u16 = 0x20 | 3;
/// TSS selector.
pub const TSS_SEL: u16 = 0x28;
/// Interrupt stack table slot (1-based, as in a gate) for faults that must
/// not trust the current stack: NMI, double fault, machine check.
pub const IST_FAULT: u8 = 1;
/// Size of that IST stack.
pub const IST_STACK_SIZE: usize = 8 * 1024;
/// Offset of RSP0 in the TSS.
pub const TSS_RSP0: usize = 4;
/// Offset of IST1 in the TSS.
pub const TSS_IST1: usize = 36;
/// Offset of the I/O map base field in the TSS.
pub const TSS_IOMAP_BASE: usize = 102;
/// Size of the TSS proper; the I/O permission bitmap follows it.
pub const TSS_SIZE: usize = 104;
/// One bit per port, 0 = allowed.
pub const IO_BITMAP_SIZE: usize = 65536 / 8;
/// TSS limit: the TSS, the bitmap, and the all-ones byte that must end it.
pub const TSS_LIMIT: usize = TSS_SIZE + IO_BITMAP_SIZE;

// Descriptor encodings: 0x00af9b.. = present, DPL 0, code exec/read,
// accessed, L=1; 0x00cf93.. = DPL 0 data read/write; f3/fb = the same at
// DPL 3. The accessed bits are preset so the CPU never writes them.
global_asm!(
    r#"
    .pushsection .data.descriptors, "aw"
    .balign 16
gdt_table:
    .quad 0
    .quad 0x00af9b000000ffff
    .quad 0x00cf93000000ffff
    .quad 0x00cff3000000ffff
    .quad 0x00affb000000ffff
    .globl gdt_tss
gdt_tss:
    .quad 0
    .quad 0
gdt_end:

    .balign 8
    .globl gdt_ptr32
gdt_ptr32:
    .word gdt_end - gdt_table - 1
    .long gdt_table

    .popsection

    .pushsection .bss.tss, "aw", @nobits
    .balign 16
    .globl tss64
tss64:
    .skip {TSS_LIMIT} + 1

    .balign 16
    .skip {IST_STACK_SIZE}
    .globl ist_fault_stack_top
ist_fault_stack_top:
    .popsection
"#,
    IST_STACK_SIZE = const IST_STACK_SIZE,
    TSS_LIMIT = const TSS_LIMIT,
    options(att_syntax)
);
