//! Application processor startup: a real-mode trampoline that counts the
//! processors arriving in it, then halts them for good.

use core::arch::global_asm;

use super::{lapic, phys};

// Copied to a free page below 1 MiB; a started AP runs it in real mode with
// CS = page >> 4, IP = 0. The counter lives in the same page.
global_asm!(
    r#"
    .pushsection .rodata.ap_trampoline, "a"
    .code16
    .globl ap_trampoline_start
ap_trampoline_start:
    cli
    lock incw %cs:(ap_trampoline_counter - ap_trampoline_start)
1:  hlt
    jmp 1b
    .balign 2
    .globl ap_trampoline_counter
ap_trampoline_counter:
    .word 0
    .globl ap_trampoline_end
ap_trampoline_end:
    .code64
    .popsection
"#,
    options(att_syntax)
);

extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_counter: u8;
    static ap_trampoline_end: u8;
}

/// A trampoline installed in a page of guest memory.
pub struct Trampoline {
    counter: u64,
}

/// Size of the page the trampoline takes.
pub const PAGE: u64 = 0x1000;

impl Trampoline {
    /// Copies the trampoline to `page` (4 KiB-aligned, below 1 MiB, RAM
    /// that nothing else uses) with its counter at 0.
    pub fn install(page: u64) -> Result<Self, phys::MapError> {
        phys::map(page, PAGE)?;
        let start = &raw const ap_trampoline_start as u64;
        let end = &raw const ap_trampoline_end as u64;
        let counter_offset = &raw const ap_trampoline_counter as u64 - start;
        for i in 0..end - start {
            phys::write_u8(page + i, phys::read_u8(start + i));
        }
        Ok(Trampoline {
            counter: page + counter_offset,
        })
    }

    /// Sends INIT, SIPI, SIPI to all other processors.
    pub fn start_aps(&self) {
        lapic::start_aps(self.counter & !(PAGE - 1));
    }

    /// How many processors have arrived.
    pub fn arrivals(&self) -> u16 {
        phys::read_u32(self.counter) as u16
    }
}
