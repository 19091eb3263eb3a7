//! KVM state: the VM (memory, irqchip, PIT) and its vCPUs.

pub mod memory;
pub mod irq_routing;
pub mod vcpu;
pub mod vm;
