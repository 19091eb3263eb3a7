//! x86-64 machinery: boot entry, descriptor tables, paging, the syscall
//! gate, port and physical-memory access.

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
