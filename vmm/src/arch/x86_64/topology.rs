//! vCPU topology (sockets, cores, threads) and the APIC IDs it implies.
//!
//! vCPU `i` is numbered socket-major: `i = (socket * cores + core) * threads + thread`.
//! Its APIC ID packs the three indices into bit fields just wide enough for
//! each level, the way real x86 parts (and CPUID leaves 0xB/0x1F) describe them.

use serde::{Deserialize, Serialize};

/// How the vCPUs are arranged: `sockets * cores * threads` logical CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuTopology {
    /// Number of packages.
    pub sockets: u16,
    /// Cores per package.
    pub cores: u16,
    /// Hardware threads per core.
    pub threads: u16,
}

/// Where one vCPU sits in the topology.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuPosition {
    /// Package index.
    pub socket: u32,
    /// Core index within the package.
    pub core: u32,
    /// Thread index within the core.
    pub thread: u32,
}

/// Bits needed to hold `n` distinct values (0 for n <= 1).
fn bits_for(n: u16) -> u32 {
    if n <= 1 {
        0
    } else {
        u32::BITS - u32::from(n - 1).leading_zeros()
    }
}

impl CpuTopology {
    /// A flat topology: one socket, `vcpus` cores of one thread each.
    pub fn flat(vcpus: u16) -> Self {
        CpuTopology {
            sockets: 1,
            cores: vcpus.max(1),
            threads: 1,
        }
    }

    /// Total logical CPUs.
    pub fn vcpus(&self) -> u32 {
        u32::from(self.sockets) * u32::from(self.cores) * u32::from(self.threads)
    }

    /// Logical CPUs in one package.
    pub fn vcpus_per_socket(&self) -> u32 {
        u32::from(self.cores) * u32::from(self.threads)
    }

    /// Width of the SMT (thread) field of the APIC ID.
    pub fn thread_bits(&self) -> u32 {
        bits_for(self.threads)
    }

    /// Width of the core field of the APIC ID.
    pub fn core_bits(&self) -> u32 {
        bits_for(self.cores)
    }

    /// Shift of the package field: CPUID 0xB/0x1F level-1 "shift to next level".
    pub fn package_shift(&self) -> u32 {
        self.thread_bits() + self.core_bits()
    }

    /// Position of vCPU `index` (socket-major numbering).
    pub fn position(&self, index: u32) -> CpuPosition {
        let threads = u32::from(self.threads.max(1));
        let cores = u32::from(self.cores.max(1));
        CpuPosition {
            thread: index % threads,
            core: (index / threads) % cores,
            socket: index / (threads * cores),
        }
    }

    /// APIC ID (x2APIC ID) of vCPU `index`.
    pub fn apic_id(&self, index: u32) -> u32 {
        let p = self.position(index);
        (p.socket << self.package_shift()) | (p.core << self.thread_bits()) | p.thread
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_ids_are_indices() {
        let t = CpuTopology::flat(4);
        assert_eq!(
            (0..4).map(|i| t.apic_id(i)).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        assert_eq!(t.package_shift(), 2);
    }

    #[test]
    fn hostos_topology_packs_fields() {
        // HostOS: sockets=2, cores=vcpus/4, threads=2; 12 vCPUs -> 2 x 3 x 2.
        let t = CpuTopology {
            sockets: 2,
            cores: 3,
            threads: 2,
        };
        assert_eq!(t.vcpus(), 12);
        assert_eq!(t.thread_bits(), 1);
        assert_eq!(t.core_bits(), 2);
        // vCPU 5 = socket 0, core 2, thread 1 -> 0b101; vCPU 6 = socket 1 -> 1 << 3.
        assert_eq!(t.apic_id(5), 0b101);
        assert_eq!(t.apic_id(6), 0b1000);
        assert_eq!(t.apic_id(11), 0b1101);
    }
}
