//! The guest's NUMA topology as ACPI describes it (`memory.numa = true`):
//! one proximity domain per socket, in the SRAT (which vCPUs and which
//! memory belong to each domain) and the SLIT (the distances between them).
//!
//! The split rule: guest RAM, taken in address order over its ranges
//! (below the 32-bit hole, then above 4 GiB), is cut into `sockets` equal
//! parts; part `n` is domain `n`. A part that straddles the hole gets two
//! memory affinity entries. Each part must be a whole number of 2 MiB pages
//! (the hugepage size, so no hugepage is split between domains) and at least
//! [`MIN_NODE_MEMORY`]. vCPU `i` belongs to the domain of its socket
//! (`CpuTopology::position`). The SLIT gives 10 from a domain to itself and
//! 20 (QEMU's default) between any two.
//!
//! Only the description: guest memory stays one mapping and is not bound
//! to host NUMA nodes.
//!
//! ```text
//! SRAT: (x2)APIC affinity per vCPU (domain = socket), then
//!       memory affinity per part (domain, base, length, enabled)
//! SLIT: N x N bytes, 10 on the diagonal, 20 elsewhere
//! ```

use acpi_tables::sdt::Sdt;
use acpi_tables::slit::SLIT;
use acpi_tables::srat::MemoryAffinity;
use acpi_tables::Aml;

use super::layout::{self, Range};
use super::topology::CpuTopology;

/// Each domain's memory is a multiple of this (the 2 MiB hugepage size).
pub const NODE_ALIGN: u64 = 2 << 20;
/// Least memory per domain (Linux ignores nodes below 4 MiB; the first
/// also holds the kernel).
pub const MIN_NODE_MEMORY: u64 = 16 << 20;
/// SLIT distance from a domain to itself.
pub const LOCAL_DISTANCE: u8 = 10;
/// SLIT distance between two domains (QEMU's default).
pub const REMOTE_DISTANCE: u8 = 20;

/// SRAT revision (ACPI 6).
const SRAT_REVISION: u8 = 3;
/// SRAT header: the standard 36 bytes, a reserved dword that must be 1,
/// eight reserved bytes.
const SRAT_HEADER_LEN: u32 = 48;
/// SRAT structure: processor local APIC affinity (16 bytes).
const SRAT_LOCAL_APIC: u8 = 0;
/// SRAT structure: processor local x2APIC affinity (24 bytes).
const SRAT_LOCAL_X2APIC: u8 = 2;
/// Affinity flags: enabled.
const AFFINITY_ENABLED: u32 = 1;

/// Why guest memory cannot be split into one domain per socket.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NumaError {
    /// One socket: one domain, nothing for the tables to tell.
    #[error("needs at least 2 sockets (cpus.sockets): each socket is one NUMA node")]
    OneSocket,
    /// The parts would not be whole 2 MiB pages.
    #[error(
        "{size} bytes do not split into {nodes} equal parts of whole 2 MiB pages: \
         memory.size must be a multiple of {} MiB",
        (u64::from(*nodes) * NODE_ALIGN) >> 20
    )]
    Uneven {
        /// Guest memory.
        size: u64,
        /// Domains (sockets).
        nodes: u32,
    },
    /// The parts would be too small.
    #[error(
        "each of the {nodes} NUMA nodes would get {} MiB; at least {} MiB each is needed",
        (size / u64::from(*nodes)) >> 20,
        MIN_NODE_MEMORY >> 20
    )]
    TooSmall {
        /// Guest memory.
        size: u64,
        /// Domains (sockets).
        nodes: u32,
    },
}

/// One run of guest RAM and the domain it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeMemory {
    /// Proximity domain (socket index).
    pub domain: u32,
    /// The guest-physical range.
    pub range: Range,
}

/// The domains of a guest: its vCPU topology and its RAM, split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumaLayout {
    /// The vCPUs (domain = socket).
    pub topology: CpuTopology,
    /// Guest RAM by domain, in address order.
    pub memory: Vec<NodeMemory>,
}

impl NumaLayout {
    /// Splits `mem_size` bytes of guest RAM among the sockets of `topology`.
    pub fn new(topology: &CpuTopology, mem_size: u64) -> Result<Self, NumaError> {
        let nodes = u32::from(topology.sockets);
        if nodes < 2 {
            return Err(NumaError::OneSocket);
        }
        let size = mem_size;
        if !size.is_multiple_of(u64::from(nodes) * NODE_ALIGN) {
            return Err(NumaError::Uneven { size, nodes });
        }
        let per_node = size / u64::from(nodes);
        if per_node < MIN_NODE_MEMORY {
            return Err(NumaError::TooSmall { size, nodes });
        }
        let mut memory = Vec::new();
        let (mut domain, mut left) = (0u32, per_node);
        for ram in layout::ram_ranges(size) {
            let mut start = ram.start;
            while start < ram.end() {
                let len = left.min(ram.end() - start);
                memory.push(NodeMemory {
                    domain,
                    range: Range { start, len },
                });
                start += len;
                left -= len;
                if left == 0 {
                    domain += 1;
                    left = per_node;
                }
            }
        }
        Ok(NumaLayout {
            topology: *topology,
            memory,
        })
    }

    /// Number of proximity domains.
    pub fn nodes(&self) -> u32 {
        u32::from(self.topology.sockets)
    }
}

/// The SRAT: every vCPU's domain (local APIC affinity below APIC ID 255,
/// local x2APIC affinity from 255 on, as in the MADT), then the memory.
pub fn srat(numa: &NumaLayout, oem_id: [u8; 6], oem_table_id: [u8; 8], revision: u32) -> Vec<u8> {
    let mut table = Sdt::new(
        *b"SRAT",
        SRAT_HEADER_LEN,
        SRAT_REVISION,
        oem_id,
        oem_table_id,
        revision,
    );
    table.write_u32(36, 1);
    let t = &numa.topology;
    let mut body = Vec::new();
    for index in 0..t.vcpus() {
        let id = t.apic_id(index);
        let domain = t.position(index).socket;
        let [d0, d1, d2, d3] = domain.to_le_bytes();
        match u8::try_from(id) {
            Ok(id8) if id8 < 0xff => {
                body.extend_from_slice(&[SRAT_LOCAL_APIC, 16, d0, id8]);
                body.extend_from_slice(&AFFINITY_ENABLED.to_le_bytes());
                // Local SAPIC EID, domain bits 8-31, clock domain.
                body.extend_from_slice(&[0, d1, d2, d3, 0, 0, 0, 0]);
            }
            _ => {
                body.extend_from_slice(&[SRAT_LOCAL_X2APIC, 24, 0, 0]);
                body.extend_from_slice(&domain.to_le_bytes());
                body.extend_from_slice(&id.to_le_bytes());
                body.extend_from_slice(&AFFINITY_ENABLED.to_le_bytes());
                // Clock domain, reserved.
                body.extend_from_slice(&[0; 8]);
            }
        }
    }
    for m in &numa.memory {
        MemoryAffinity::new(m.domain, m.range.start, m.range.len)
            .enabled()
            .to_aml_bytes(&mut body);
    }
    table.append_slice(&body);
    table.as_slice().to_vec()
}

/// The SLIT: [`LOCAL_DISTANCE`] on the diagonal, [`REMOTE_DISTANCE`]
/// elsewhere.
pub fn slit(numa: &NumaLayout, oem_id: [u8; 6], oem_table_id: [u8; 8], revision: u32) -> Vec<u8> {
    let n = numa.nodes();
    let mut t = SLIT::new(oem_id, oem_table_id, revision, n);
    let n = n as usize;
    for a in 0..n {
        for b in a + 1..n {
            t.set_distance(a, b, REMOTE_DISTANCE);
        }
    }
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo(sockets: u16, cores: u16, threads: u16) -> CpuTopology {
        CpuTopology {
            sockets,
            cores,
            threads,
        }
    }

    #[test]
    fn memory_splits_in_address_order_across_the_hole() {
        // 8 GiB on 2 sockets: node 0 gets [0, 3G) and [4G, 5G), node 1 the rest.
        let l = NumaLayout::new(&topo(2, 2, 1), 8 << 30).unwrap();
        let got: Vec<(u32, u64, u64)> = l
            .memory
            .iter()
            .map(|m| (m.domain, m.range.start, m.range.len))
            .collect();
        assert_eq!(
            got,
            [
                (0, 0, 3 << 30),
                (0, 4 << 30, 1 << 30),
                (1, 5 << 30, 4 << 30)
            ]
        );
        // Below the hole only: two entries, each half.
        let l = NumaLayout::new(&topo(2, 1, 1), 1 << 30).unwrap();
        assert_eq!(l.memory.len(), 2);
        assert_eq!(l.memory[1].range.start, 512 << 20);
    }

    #[test]
    fn refusals() {
        assert_eq!(
            NumaLayout::new(&topo(1, 4, 1), 1 << 30),
            Err(NumaError::OneSocket)
        );
        // 3 x 2 MiB does not divide 1 GiB.
        assert_eq!(
            NumaLayout::new(&topo(3, 1, 1), 1 << 30),
            Err(NumaError::Uneven {
                size: 1 << 30,
                nodes: 3
            })
        );
        // A 4 KiB multiple per node is not enough: 2 MiB pages.
        let size = 2 * ((64 << 20) + (4 << 10));
        assert!(matches!(
            NumaLayout::new(&topo(2, 1, 1), size),
            Err(NumaError::Uneven { .. })
        ));
        assert!(NumaLayout::new(&topo(2, 1, 1), 64 << 20).is_ok());
        assert_eq!(
            NumaLayout::new(&topo(4, 1, 1), 32 << 20),
            Err(NumaError::TooSmall {
                size: 32 << 20,
                nodes: 4
            })
        );
        let e = NumaError::Uneven {
            size: 1 << 30,
            nodes: 3,
        }
        .to_string();
        assert!(e.contains("multiple of 6 MiB"), "{e}");
    }
}
