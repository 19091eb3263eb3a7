//! The IDT, its entry stubs, and what an exception or interrupt does.
//!
//! The entry code only loads IDTR (the table is in .bss, all gates not
//! present); [`init`] fills the gates from CPL3, where it runs at native
//! speed, before the probe does anything that could fault. Until then an
//! exception ends the VM with a triple fault.
//!
//! - Exceptions 0..32 go to `exception_common`, which drops to CPL3 on a
//!   stack of its own and calls [`exception_report`]: it prints
//!   `PROBE FAIL exception: ...` and ends the VM. A fault while reporting
//!   triple-faults.
//! - Vectors 32..48 (the legacy IRQ range) count the interrupt in
//!   [`irq_count`] and acknowledge it at the local APIC.
//! - Vector 0xff (the local APIC's spurious vector) returns at once.
//! - Vector 3 (#BP, raised by `INT3`) is the syscall gate (DPL 3), see
//!   [`super::syscall`].

use core::arch::global_asm;

use super::gdt::{IST_FAULT, KERNEL_CS, USER_CS, USER_DS};

/// First vector routed to the IRQ handler.
pub const IRQ_VECTOR_BASE: u8 = 32;
/// Number of IRQ vectors with a handler.
pub const IRQ_VECTORS: u8 = 16;
/// The local APIC spurious-interrupt vector (returns without EOI).
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// The syscall gate's vector: #BP, raised from CPL3 by `INT3`.
pub const SYSCALL_VECTOR: u8 = 3;
/// Bytes between two entry stubs in `vector_stubs`.
const STUB_STRIDE: u64 = 16;
/// Stack the exception report runs on at CPL3.
const REPORT_STACK_SIZE: usize = 32 * 1024;
/// Guest-physical address of the local APIC's EOI register.
const LAPIC_EOI: u32 = 0xfee0_00b0;
/// RFLAGS for code entered at CPL3: IOPL 3, interrupts off, bit 1 set.
pub const USER_RFLAGS: u64 = 0x3002;

// One 16-byte stub per vector 0..48: push a zero error code where the CPU
// pushes none, push the vector, jump to the common path.
global_asm!(
    r#"
    .pushsection .text.vectors, "ax"
    .balign 16
    .globl vector_stubs
vector_stubs:
    .set vec, 0
    .rept {STUBS}
    .balign 16
    .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    .if vec < 32
    jmp exception_common
    .else
    jmp irq_common
    .endif
    .set vec, vec + 1
    .endr

    /* Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS. */
exception_common:
    cmpb $0, exception_reporting(%rip)
    jne triple_fault
    movb $1, exception_reporting(%rip)
    mov 0(%rsp), %rdi
    mov 8(%rsp), %rsi
    mov 16(%rsp), %rdx
    mov 24(%rsp), %rcx
    mov %cr2, %r8
    pushq ${USER_DS}
    pushq $(report_stack_top - 8)
    pushq ${USER_RFLAGS}
    pushq ${USER_CS}
    pushq $exception_report
    iretq

    /* Stack: vector, 0, RIP, CS, RFLAGS, RSP, SS. */
irq_common:
    push %rax
    mov 8(%rsp), %rax
    incl irq_counts(, %rax, 4)
    mov ${LAPIC_EOI}, %eax
    movl $0, (%rax)
    pop %rax
    add $16, %rsp
    iretq

    .globl spurious_stub
spurious_stub:
    iretq

    /* An IDT with limit 0: any exception escalates to a triple fault. */
    .globl triple_fault
triple_fault:
    lidt null_idt_ptr(%rip)
    ud2
    .popsection

    .pushsection .rodata.idt, "a"
    .balign 8
null_idt_ptr:
    .word 0
    .quad 0
    .balign 8
    .globl idt_ptr
idt_ptr:
    .word 256 * 16 - 1
    .quad idt_table
    .popsection

    .pushsection .bss.idt, "aw", @nobits
    .balign 16
    .globl idt_table
idt_table:
    .skip 256 * 16
    .globl irq_counts
irq_counts:
    .skip 256 * 4
exception_reporting:
    .byte 0
    .balign 16
    .skip {REPORT_STACK_SIZE}
report_stack_top:
    .popsection
"#,
    STUBS = const (IRQ_VECTOR_BASE + IRQ_VECTORS) as u32,
    USER_DS = const USER_DS,
    USER_CS = const USER_CS,
    USER_RFLAGS = const USER_RFLAGS,
    LAPIC_EOI = const LAPIC_EOI,
    REPORT_STACK_SIZE = const REPORT_STACK_SIZE,
    options(att_syntax)
);

/// One 64-bit interrupt gate.
#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl Gate {
    /// A present 64-bit interrupt gate (IF cleared on entry) to `handler`,
    /// callable by software from privilege level `dpl`, on IST slot `ist`
    /// (0: the TSS's RSP0 or the current stack).
    fn interrupt(handler: u64, dpl: u8, ist: u8) -> Self {
        Gate {
            offset_low: handler as u16,
            selector: KERNEL_CS,
            ist,
            type_attr: 0x8e | (dpl << 5),
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

extern "C" {
    static mut idt_table: [Gate; 256];
    static irq_counts: [u32; 256];
    static vector_stubs: u8;
    static spurious_stub: u8;
    static syscall_entry: u8;
}

/// Fills the IDT. Must run first thing at CPL3, before anything can fault.
pub fn init() {
    let stubs = &raw const vector_stubs as u64;
    let spurious = &raw const spurious_stub as u64;
    let syscall = &raw const syscall_entry as u64;
    let set = |vector: u8, gate: Gate| {
        // SAFETY: the IDT is ours, identity-mapped and writable from CPL3;
        // the CPU reads a gate only when delivering through it, and nothing
        // is delivered while this single-threaded code runs with interrupts
        // off (a fault here triple-faults either way).
        unsafe {
            (&raw mut idt_table)
                .cast::<Gate>()
                .add(usize::from(vector))
                .write(gate)
        }
    };
    for vector in 0..(IRQ_VECTOR_BASE + IRQ_VECTORS) {
        let ist = match vector {
            2 | 8 | 18 => IST_FAULT,
            _ => 0,
        };
        set(
            vector,
            Gate::interrupt(stubs + u64::from(vector) * STUB_STRIDE, 0, ist),
        );
    }
    set(SPURIOUS_VECTOR, Gate::interrupt(spurious, 0, 0));
    set(SYSCALL_VECTOR, Gate::interrupt(syscall, 3, 0));
}

/// How many times interrupt `vector` was taken since boot.
#[allow(dead_code, reason = "for the interrupt-driven (virtio) checks to come")]
pub fn irq_count(vector: u8) -> u32 {
    // SAFETY: the counters are plain memory updated by the CPL0 interrupt
    // path; a volatile read of an aligned u32 is atomic on x86.
    unsafe { core::ptr::read_volatile(&raw const irq_counts[usize::from(vector)]) }
}

/// Entered at CPL3 on the report stack by `exception_common`: prints the
/// failure line and ends the VM.
#[no_mangle]
extern "C" fn exception_report(vector: u64, error: u64, rip: u64, cs: u64, cr2: u64) -> ! {
    crate::println!(
        "PROBE FAIL exception: vector {vector} rip={rip:#x} err={error:#x} cr2={cr2:#x} cpl={}",
        cs & 3
    );
    crate::power::off()
}
