//! Keel: a rust-vmm based VMM that boots and guards one large guest.
//!
//! The pieces, in the order [`builder::build_and_start`] uses them:
//! [`config`] (one typed model), [`vstate`] (KVM VM, memory, vCPUs),
//! [`arch`] (x86-64 boot protocols, CPUID, MP table), [`device_manager`]
//! (devices on buses), and [`vmm`] (the running VM's control loop).

#![deny(missing_docs)]

pub mod api;
pub mod arch;
pub mod boot_monitor;
pub mod builder;
pub mod config;
pub mod config_disk;
pub mod control;
pub mod device_manager;
pub mod exit;
pub mod logger;
pub mod payload;
pub mod pci_devices;
pub mod privileges;
pub mod seccomp;
pub mod systemd;
pub mod teardown_helper;
pub mod vmm;
pub mod vstate;
