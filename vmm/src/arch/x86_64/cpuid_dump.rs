//! A text format for one processor's CPUID and KVM's supported CPUID table.
//!
//! Keel builds each vCPU's CPUID from two inputs: what the host processor
//! reports ([`HostCpuid`]) and what KVM supports (`KVM_GET_SUPPORTED_CPUID`).
//! Both differ between vendors and models, so a test that only looks at the
//! machine it runs on covers one vendor's path. A [`CpuidDump`] records both
//! inputs of a real host as text (`cargo run --release -p vmm --example
//! capture-cpuid > FILE`) and replays them anywhere: it is a [`HostCpuid`], and
//! [`CpuidDump::supported`] gives back KVM's table.
//!
//! Format, one entry a line, numbers in hexadecimal, `#` starts a comment:
//!
//! ```text
//! host <leaf> <subleaf> <eax> <ebx> <ecx> <edx>
//! kvm <function> <index> <flags> <eax> <ebx> <ecx> <edx>
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

use super::cpuid::{CpuidRegs, HostCpuid};

/// Leaves whose output depends on the subleaf (ECX) on some processor.
const INDEXED_LEAVES: &[u32] = &[
    0x4,
    0x7,
    0xB,
    0xD,
    0xF,
    0x10,
    0x12,
    0x14,
    0x17,
    0x18,
    0x1A,
    0x1B,
    0x1D,
    0x1E,
    0x1F,
    0x20,
    0x23,
    0x24,
    0x8000_001D,
    0x8000_0020,
    0x8000_0026,
];

/// Highest subleaf captured of an indexed leaf.
const MAX_SUBLEAF: u32 = 63;

/// Highest leaf captured in each range (basic, extended).
const MAX_LEAVES_PER_RANGE: u32 = 0x3F;

/// Why a dump cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DumpError {
    /// A line is not a `host` or `kvm` entry.
    #[error("line {line}: {why}")]
    BadLine {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        why: String,
    },
    /// The dump has no host leaf 0 (vendor) or no KVM entry at all.
    #[error("incomplete dump: {0}")]
    Incomplete(&'static str),
    /// KVM's table has more entries than a `CpuId` holds.
    #[error("KVM table of {0} entries does not fit a CpuId")]
    TooManyEntries(usize),
}

/// A recorded processor: its CPUID answers and KVM's supported table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuidDump {
    host: BTreeMap<(u32, u32), CpuidRegs>,
    kvm: Vec<[u32; 7]>,
}

impl CpuidDump {
    /// Records `host` and KVM's `supported` table.
    ///
    /// Every basic and extended leaf up to the host's maximum is recorded; the
    /// subleaves of indexed leaves (those KVM flags as indexed, and the known
    /// indexed leaves) up to 63 when they answer anything but zeros.
    pub fn capture<H: HostCpuid + ?Sized>(host: &H, supported: &CpuId) -> Self {
        let mut indexed: Vec<u32> = INDEXED_LEAVES.to_vec();
        indexed.extend(
            supported
                .as_slice()
                .iter()
                .filter(|e| e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0)
                .map(|e| e.function),
        );
        let mut dump = CpuidDump::default();
        for base in [0u32, 0x8000_0000] {
            let max = host.cpuid(base, 0).eax;
            if max < base {
                continue;
            }
            let last = max.min(base + MAX_LEAVES_PER_RANGE);
            for leaf in base..=last {
                dump.host.insert((leaf, 0), host.cpuid(leaf, 0));
                if indexed.contains(&leaf) {
                    for sub in 1..=MAX_SUBLEAF {
                        let r = host.cpuid(leaf, sub);
                        if r != CpuidRegs::default() {
                            dump.host.insert((leaf, sub), r);
                        }
                    }
                }
            }
        }
        dump.kvm = supported
            .as_slice()
            .iter()
            .map(|e| [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx])
            .collect();
        dump
    }

    /// The dump as text, after `header` (each of its lines becomes a comment).
    pub fn to_text(&self, header: &str) -> String {
        let mut out = String::new();
        for line in header.lines() {
            let _ = writeln!(out, "# {line}");
        }
        for (&(leaf, sub), r) in &self.host {
            let _ = writeln!(
                out,
                "host {leaf:08x} {sub:02x} {:08x} {:08x} {:08x} {:08x}",
                r.eax, r.ebx, r.ecx, r.edx
            );
        }
        for [f, i, fl, a, b, c, d] in &self.kvm {
            let _ = writeln!(
                out,
                "kvm {f:08x} {i:02x} {fl:x} {a:08x} {b:08x} {c:08x} {d:08x}"
            );
        }
        out
    }

    /// Reads a dump written by [`CpuidDump::to_text`].
    pub fn parse(text: &str) -> Result<Self, DumpError> {
        let mut dump = CpuidDump::default();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |why: String| DumpError::BadLine { line: n + 1, why };
            let mut words = line.split_whitespace();
            let kind = words.next().unwrap_or("");
            let nums = words
                .map(|w| u32::from_str_radix(w, 16).map_err(|e| bad(format!("`{w}`: {e}"))))
                .collect::<Result<Vec<u32>, _>>()?;
            match (kind, nums.as_slice()) {
                ("host", &[leaf, sub, eax, ebx, ecx, edx]) => {
                    dump.host
                        .insert((leaf, sub), CpuidRegs { eax, ebx, ecx, edx });
                }
                ("kvm", &[f, i, fl, a, b, c, d]) => dump.kvm.push([f, i, fl, a, b, c, d]),
                ("host", _) => return Err(bad("a host entry has 6 numbers".into())),
                ("kvm", _) => return Err(bad("a kvm entry has 7 numbers".into())),
                (other, _) => return Err(bad(format!("unknown entry kind `{other}`"))),
            }
        }
        if !dump.host.contains_key(&(0, 0)) {
            return Err(DumpError::Incomplete("no host leaf 0"));
        }
        if dump.kvm.is_empty() {
            return Err(DumpError::Incomplete("no kvm entries"));
        }
        Ok(dump)
    }

    /// KVM's supported table as recorded.
    pub fn supported(&self) -> Result<CpuId, DumpError> {
        let entries: Vec<kvm_cpuid_entry2> = self
            .kvm
            .iter()
            .map(
                |&[function, index, flags, eax, ebx, ecx, edx]| kvm_cpuid_entry2 {
                    function,
                    index,
                    flags,
                    eax,
                    ebx,
                    ecx,
                    edx,
                    ..Default::default()
                },
            )
            .collect();
        CpuId::from_entries(&entries).map_err(|_| DumpError::TooManyEntries(entries.len()))
    }

    /// Whether the recorded host answers `leaf` differently per subleaf.
    fn is_indexed(&self, leaf: u32) -> bool {
        INDEXED_LEAVES.contains(&leaf) || self.host.range((leaf, 1)..=(leaf, u32::MAX)).count() > 0
    }
}

impl HostCpuid for CpuidDump {
    /// Replays the recorded answer. A subleaf that was not recorded answers
    /// zeros for an indexed leaf (as the processor did: only non-zero subleaves
    /// are recorded) and subleaf 0's answer otherwise (the subleaf is ignored).
    fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidRegs {
        if let Some(r) = self.host.get(&(leaf, subleaf)) {
            return *r;
        }
        if subleaf != 0 && !self.is_indexed(leaf) {
            if let Some(r) = self.host.get(&(leaf, 0)) {
                return *r;
            }
        }
        CpuidRegs::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::cpuid::NativeCpuid;

    struct Fixed;
    impl HostCpuid for Fixed {
        fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidRegs {
            match (leaf, subleaf) {
                (0, _) => CpuidRegs {
                    eax: 0xB,
                    ebx: 0x756e_6547,
                    ecx: 0x6c65_746e,
                    edx: 0x4965_6e69,
                },
                (1, _) => CpuidRegs {
                    eax: 0x806f8,
                    ..Default::default()
                },
                (0xB, s) if s < 2 => CpuidRegs {
                    eax: s + 1,
                    ebx: 2 << s,
                    ecx: ((s + 1) << 8) | s,
                    edx: 7,
                },
                (0xB, s) => CpuidRegs {
                    ecx: s,
                    edx: 7,
                    ..Default::default()
                },
                (0x8000_0000, _) => CpuidRegs {
                    eax: 0x8000_0001,
                    ..Default::default()
                },
                _ => CpuidRegs::default(),
            }
        }
    }

    fn kvm_table() -> CpuId {
        CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 0,
                eax: 0xB,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xB,
                index: 1,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ebx: 4,
                ..Default::default()
            },
        ])
        .expect("two entries fit")
    }

    #[test]
    fn round_trip_replays_every_answer() {
        let dump = CpuidDump::capture(&Fixed, &kvm_table());
        let text = dump.to_text("a fake processor\nsecond line");
        assert!(text.starts_with("# a fake processor\n# second line\n"));
        let back = CpuidDump::parse(&text).expect("parses");
        assert_eq!(back, dump);
        for (leaf, sub) in [(0, 0), (1, 0), (1, 5), (0xB, 0), (0xB, 1), (0xB, 9), (7, 3)] {
            assert_eq!(
                back.cpuid(leaf, sub),
                Fixed.cpuid(leaf, sub),
                "{leaf:#x}.{sub}"
            );
        }
        let kvm = back.supported().expect("fits");
        assert_eq!(kvm.as_slice(), kvm_table().as_slice());
    }

    #[test]
    fn the_live_host_replays_exactly() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .expect("KVM_GET_SUPPORTED_CPUID");
        let dump = CpuidDump::capture(&NativeCpuid, &supported);
        let back = CpuidDump::parse(&dump.to_text("live")).expect("parses");
        // Leaf 1 EBX and leaves 0xB/0x1F/0x8000001E EDX carry the APIC ID of whichever
        // CPU runs the instruction: compare the leaves that do not.
        for leaf in [0u32, 7, 0x8000_0000, 0x8000_0001, 0x8000_0002] {
            assert_eq!(back.cpuid(leaf, 0), NativeCpuid.cpuid(leaf, 0), "{leaf:#x}");
        }
        assert_eq!(
            back.supported().expect("fits").as_slice(),
            supported.as_slice()
        );
    }

    #[test]
    fn bad_dumps_are_refused_with_the_line() {
        assert_eq!(
            CpuidDump::parse("host 0 0 1 2 3\n"),
            Err(DumpError::BadLine {
                line: 1,
                why: "a host entry has 6 numbers".into()
            })
        );
        assert!(matches!(
            CpuidDump::parse("# c\nhost 0 0 1 2 3 zz\n"),
            Err(DumpError::BadLine { line: 2, .. })
        ));
        assert!(matches!(
            CpuidDump::parse("msr 0 0\n"),
            Err(DumpError::BadLine { line: 1, .. })
        ));
        assert_eq!(
            CpuidDump::parse("kvm 0 0 0 1 2 3 4\n"),
            Err(DumpError::Incomplete("no host leaf 0"))
        );
        assert_eq!(
            CpuidDump::parse("host 0 0 1 2 3 4\n"),
            Err(DumpError::Incomplete("no kvm entries"))
        );
    }
}
