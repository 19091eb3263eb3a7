//! KVM state: the VM (memory, irqchip, PIT) and its vCPUs.

pub mod irq_routing;
pub mod memory;
pub mod vcpu;
pub mod vm;
