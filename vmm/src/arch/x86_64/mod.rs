//! x86-64 specifics: address map, boot protocols, CPUID, MP table, vCPU
//! register state.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod cpuid_dump;
pub mod layout;
pub mod mptable;
pub mod numa;
pub mod pci_acpi;
pub mod regs;
pub mod topology;
