//! Per-vCPU CPUID tables: host passthrough (libvirt's `host-passthrough`) filtered by KVM.
//!
//! The table for each vCPU starts from what KVM reports it can virtualize
//! (`Kvm::get_supported_cpuid`), takes identification and cache descriptions from the
//! host processor, writes the guest's own topology (APIC IDs, cache sharing, leaves 0xB,
//! 0x1F and the AMD topology leaves), clears what this VMM cannot honour (nested
//! virtualization, AMX) and then the features the configuration disables by name.
//!
//! Host CPUID values come through the [`HostCpuid`] trait so the logic can be tested
//! with a fake processor; [`NativeCpuid`] executes the real instruction.
//!
//! Typical use: one table per vCPU, each created with its APIC ID as KVM vCPU id (KVM
//! uses the vCPU id as the local APIC ID, so the two must agree):
//!
//! ```no_run
//! use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
//! use kvm_ioctls::{Cap, Kvm};
//! use vmm::arch::x86_64::cpuid::{build_vcpu_cpuid, CpuidOptions, NativeCpuid};
//! use vmm::arch::x86_64::topology::CpuTopology;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let kvm = Kvm::new()?;
//! let vm = kvm.create_vm()?;
//! vm.create_irq_chip()?;
//! let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
//! let topology = CpuTopology { sockets: 2, cores: 3, threads: 2 };
//! let masked = vec!["tsx-ldtrk".to_string()];
//! for index in 0..topology.vcpus() {
//!     let vcpu = vm.create_vcpu(u64::from(topology.apic_id(index)))?;
//!     let opts = CpuidOptions {
//!         masked_features: masked.clone(),
//!         tsc_khz: vcpu.get_tsc_khz().ok(),
//!         tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
//!     };
//!     let cpuid = build_vcpu_cpuid(&supported, &NativeCpuid, &topology, index, &opts)?;
//!     vcpu.set_cpuid2(&cpuid)?;
//! }
//! # Ok(())
//! # }
//! ```

use kvm_bindings::{
    kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
};

use super::topology::CpuTopology;

/// Basic leaf: maximum basic leaf and vendor string.
const LEAF_VENDOR: u32 = 0x0;
/// Basic leaf: version information, APIC ID, feature flags.
const LEAF_FEATURES: u32 = 0x1;
/// Basic leaf: cache and TLB descriptors.
const LEAF_CACHE_DESCRIPTORS: u32 = 0x2;
/// Basic leaf: deterministic cache parameters (Intel).
const LEAF_CACHE_PARAMS: u32 = 0x4;
/// Basic leaf: structured extended features.
const LEAF_EXT_FEATURES: u32 = 0x7;
/// Basic leaf: extended topology enumeration.
const LEAF_TOPOLOGY: u32 = 0xB;
/// Basic leaf: V2 extended topology enumeration.
const LEAF_TOPOLOGY_V2: u32 = 0x1F;
/// AMX tile palette information (Intel).
const LEAF_AMX_TILE_INFO: u32 = 0x1D;
/// AMX TMUL information (Intel).
const LEAF_AMX_TMUL_INFO: u32 = 0x1E;
/// Hypervisor leaf: KVM signature and maximum hypervisor leaf.
const LEAF_KVM_SIGNATURE: u32 = 0x4000_0000;
/// Hypervisor leaf: TSC and APIC bus frequencies (the VMware-defined timing leaf).
const LEAF_HV_TIMING: u32 = 0x4000_0010;
/// Extended leaf: maximum extended leaf.
const LEAF_EXT_MAX: u32 = 0x8000_0000;
/// Extended leaf: extended feature flags.
const LEAF_EXT_FEATURE_FLAGS: u32 = 0x8000_0001;
/// Extended leaves: processor brand string.
const LEAF_BRAND_FIRST: u32 = 0x8000_0002;
/// Extended leaf: AMD L1 cache and TLB information.
const LEAF_L1_CACHE: u32 = 0x8000_0005;
/// Extended leaf: L2/L3 cache and TLB information.
const LEAF_L2_CACHE: u32 = 0x8000_0006;
/// Extended leaf: advanced power management (invariant TSC).
const LEAF_APM: u32 = 0x8000_0007;
/// Extended leaf: address sizes and AMD core count.
const LEAF_ADDR_SIZES: u32 = 0x8000_0008;
/// Extended leaf: AMD cache topology.
const LEAF_AMD_CACHE_TOPOLOGY: u32 = 0x8000_001D;
/// Extended leaf: AMD processor topology.
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001E;

/// Leaf 0x1 ECX: VMX.
const ECX1_VMX: u32 = 1 << 5;
/// Leaf 0x1 ECX: x2APIC.
const ECX1_X2APIC: u32 = 1 << 21;
/// Leaf 0x1 ECX: TSC-deadline timer mode of the local APIC.
const ECX1_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 0x1 ECX: running under a hypervisor.
const ECX1_HYPERVISOR: u32 = 1 << 31;
/// Leaf 0x1 EDX: HTT (`EBX[23:16]` is valid).
const EDX1_HTT: u32 = 1 << 28;
/// Leaf 0x7.0 EDX: AMX-BF16.
const EDX7_AMX_BF16: u32 = 1 << 22;
/// Leaf 0x7.0 EDX: AMX-TILE.
const EDX7_AMX_TILE: u32 = 1 << 24;
/// Leaf 0x7.0 EDX: AMX-INT8.
const EDX7_AMX_INT8: u32 = 1 << 25;
/// Leaf 0x7.1 EAX: AMX-FP16.
const EAX7_1_AMX_FP16: u32 = 1 << 21;
/// Leaf 0x7.1 EDX: AMX-COMPLEX.
const EDX7_1_AMX_COMPLEX: u32 = 1 << 8;
/// Leaf 0x80000001 ECX: SVM.
const ECX_EXT_SVM: u32 = 1 << 2;
/// Leaf 0x80000001 ECX: topology extensions (leaves 0x8000001D/0x8000001E).
const ECX_EXT_TOPOEXT: u32 = 1 << 22;
/// Leaf 0x80000007 EDX: invariant TSC.
const EDX_APM_INVTSC: u32 = 1 << 8;

/// Cache-type field (`EAX[4:0]`) of leaves 0x4 and 0x8000001D; 0 means "no more caches".
const CACHE_TYPE_MASK: u32 = 0x1F;
/// Bit position of the "logical processors sharing this cache" field in leaves 0x4/0x8000001D.
const CACHE_SHARING_SHIFT: u32 = 14;
/// Mask (after shifting) of the cache sharing field: 12 bits.
const CACHE_SHARING_MAX: u32 = 0xFFF;
/// Bit position of leaf 0x4 `EAX[31:26]`, addressable core IDs per package - 1.
const CACHE_CORES_SHIFT: u32 = 26;
/// Largest value of leaf 0x4 `EAX[31:26]` (6 bits).
const CACHE_CORES_MAX: u32 = 0x3F;
/// Upper bound on cache subleaves read from the host (real parts have 4 or 5).
const MAX_CACHE_SUBLEAVES: u32 = 16;

/// Level type "SMT" in leaves 0xB/0x1F `ECX[15:8]`.
const TOPO_LEVEL_SMT: u32 = 1;
/// Level type "Core" in leaves 0xB/0x1F `ECX[15:8]`.
const TOPO_LEVEL_CORE: u32 = 2;

/// Widest APIC-ID package shift the 12-bit cache sharing fields can describe.
const MAX_PACKAGE_SHIFT: u32 = 12;
/// Most logical processors per package AMD's 8-bit NC field (0x80000008 `ECX[7:0]`) can hold.
const AMD_MAX_THREADS_PER_PACKAGE: u32 = 256;
/// Highest APIC ID usable without x2APIC (0xFF is the xAPIC broadcast ID).
const MAX_XAPIC_ID: u32 = 0xFE;
/// KVM's default local APIC bus frequency (1 GHz), in kHz, reported in leaf 0x40000010 EBX.
const KVM_APIC_BUS_KHZ: u32 = 1_000_000;

/// The four registers one CPUID query returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidRegs {
    /// EAX.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
}

/// A source of host CPUID values.
///
/// [`NativeCpuid`] executes the instruction; tests supply a fake processor.
pub trait HostCpuid {
    /// Returns what CPUID reports for `leaf` (EAX input) and `subleaf` (ECX input).
    fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidRegs;
}

/// The processor this code runs on, queried with the CPUID instruction.
#[derive(Clone, Copy, Debug, Default)]
pub struct NativeCpuid;

impl HostCpuid for NativeCpuid {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidRegs {
        // SAFETY: CPUID exists on every x86_64 processor and only reads processor
        // information; the intrinsic has no memory-safety preconditions. (It is a safe
        // function in recent Rust; the block keeps older toolchains compiling.)
        #[allow(unused_unsafe)]
        let r = unsafe { core::arch::x86_64::__cpuid_count(leaf, subleaf) };
        CpuidRegs {
            eax: r.eax,
            ebx: r.ebx,
            ecx: r.ecx,
            edx: r.edx,
        }
    }
}

/// CPU vendor, as far as the topology leaves care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuVendor {
    /// `GenuineIntel`: topology in leaves 0x4, 0xB and 0x1F.
    Intel,
    /// `AuthenticAMD` or `HygonGenuine`: topology also in 0x80000008, 0x8000001D and 0x8000001E.
    Amd,
    /// Anything else: treated like Intel (leaves 0x4, 0xB, 0x1F).
    Other,
}

impl CpuVendor {
    /// Classifies the vendor string of leaf 0 (EBX, EDX, ECX).
    pub fn from_leaf0(regs: &CpuidRegs) -> Self {
        let mut id = [0u8; 12];
        id[0..4].copy_from_slice(&regs.ebx.to_le_bytes());
        id[4..8].copy_from_slice(&regs.edx.to_le_bytes());
        id[8..12].copy_from_slice(&regs.ecx.to_le_bytes());
        match &id {
            b"GenuineIntel" => CpuVendor::Intel,
            b"AuthenticAMD" | b"HygonGenuine" => CpuVendor::Amd,
            _ => CpuVendor::Other,
        }
    }
}

/// The vendor of the host processor.
pub fn host_vendor<H: HostCpuid + ?Sized>(host: &H) -> CpuVendor {
    CpuVendor::from_leaf0(&host.cpuid(LEAF_VENDOR, 0))
}

/// One of the four CPUID output registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CpuidRegister {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// Where a named CPU feature lives: one bit of one register of one (sub)leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CpuFeature {
    /// Canonical name (libvirt spelling, with `-` separators).
    pub name: &'static str,
    /// CPUID leaf (EAX input).
    pub leaf: u32,
    /// CPUID subleaf (ECX input); 0 for leaves without subleaves.
    pub subleaf: u32,
    /// Output register holding the bit.
    pub register: CpuidRegister,
    /// Bit number, 0..=31.
    pub bit: u8,
}

/// Options that shape the CPUID table beyond host passthrough.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuidOptions {
    /// Features to hide from the guest, by name (see [`feature_names`]); like libvirt's
    /// `<feature policy='disable' name='...'/>`. `-` and `_` are interchangeable.
    pub masked_features: Vec<String>,
    /// Guest TSC frequency in kHz (from `VcpuFd::get_tsc_khz()`). With an invariant host
    /// TSC it is published in leaf 0x40000010 EAX. `None` or 0: leaf not published.
    pub tsc_khz: Option<u32>,
    /// Advertise the local APIC TSC-deadline timer (leaf 0x1 ECX bit 24) even where KVM's
    /// supported table leaves it out (KVM emulates it whenever it reports
    /// `KVM_CAP_TSC_DEADLINE_TIMER`). Set it from
    /// `kvm.check_extension(Cap::TscDeadlineTimer)`; it needs the in-kernel irqchip.
    /// `false` keeps whatever KVM's table says.
    pub tsc_deadline: bool,
}

/// Why a CPUID table could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuidError {
    /// A masked feature name is not in the feature table.
    #[error("unknown CPU feature `{0}` (see cpuid::feature_names() for the accepted names)")]
    UnknownFeature(String),
    /// The table would hold more entries than KVM accepts.
    #[error("CPUID table needs {count} entries, more than KVM accepts ({max})")]
    TooManyEntries {
        /// Entries the table would hold.
        count: usize,
        /// Most entries KVM accepts.
        max: usize,
    },
    /// A topology dimension is zero.
    #[error("CPU topology {0:?} has a zero dimension")]
    EmptyTopology(CpuTopology),
    /// The topology does not fit the CPUID fields that describe it.
    #[error("CPU topology {topology:?} does not fit CPUID: {reason}")]
    TopologyTooLarge {
        /// The offending topology.
        topology: CpuTopology,
        /// Which field overflows.
        reason: &'static str,
    },
    /// The vCPU index is not below the topology's vCPU count.
    #[error("vCPU index {index} out of range: the topology has {vcpus} vCPUs")]
    VcpuIndexOutOfRange {
        /// Requested index.
        index: u32,
        /// vCPUs in the topology.
        vcpus: u32,
    },
    /// KVM's supported table lacks a leaf the guest cannot do without.
    #[error("KVM's supported CPUID table lacks leaf {0:#x}")]
    MissingLeaf(u32),
    /// APIC IDs above 254 need x2APIC, which is masked or not offered by KVM.
    #[error("APIC IDs up to {max_apic_id} need x2APIC, but x2apic is masked or unsupported")]
    X2apicRequired {
        /// Highest APIC ID of the topology.
        max_apic_id: u32,
    },
}

/// One row of the feature table: accepted names (first is canonical) and location.
struct FeatureDef {
    names: &'static [&'static str],
    leaf: u32,
    subleaf: u32,
    register: CpuidRegister,
    bit: u8,
}

/// Shorthand constructor for [`FEATURES`].
const fn feat(
    names: &'static [&'static str],
    leaf: u32,
    subleaf: u32,
    register: CpuidRegister,
    bit: u8,
) -> FeatureDef {
    FeatureDef {
        names,
        leaf,
        subleaf,
        register,
        bit,
    }
}

use CpuidRegister::{Eax as A, Ebx as B, Ecx as C, Edx as D};

/// Maskable features. Names are stored in normalized form (lowercase, `-` separators):
/// libvirt's spelling first, then Linux `/proc/cpuinfo` spellings that normalize differently.
#[rustfmt::skip]
static FEATURES: &[FeatureDef] = &[
    // Leaf 0x1 EDX.
    feat(&["fpu"], 0x1, 0, D, 0),
    feat(&["vme"], 0x1, 0, D, 1),
    feat(&["de"], 0x1, 0, D, 2),
    feat(&["pse"], 0x1, 0, D, 3),
    feat(&["tsc"], 0x1, 0, D, 4),
    feat(&["msr"], 0x1, 0, D, 5),
    feat(&["pae"], 0x1, 0, D, 6),
    feat(&["mce"], 0x1, 0, D, 7),
    feat(&["cx8"], 0x1, 0, D, 8),
    feat(&["apic"], 0x1, 0, D, 9),
    feat(&["sep"], 0x1, 0, D, 11),
    feat(&["mtrr"], 0x1, 0, D, 12),
    feat(&["pge"], 0x1, 0, D, 13),
    feat(&["mca"], 0x1, 0, D, 14),
    feat(&["cmov"], 0x1, 0, D, 15),
    feat(&["pat"], 0x1, 0, D, 16),
    feat(&["pse36"], 0x1, 0, D, 17),
    feat(&["pn"], 0x1, 0, D, 18),
    feat(&["clflush"], 0x1, 0, D, 19),
    feat(&["ds"], 0x1, 0, D, 21),
    feat(&["acpi"], 0x1, 0, D, 22),
    feat(&["mmx"], 0x1, 0, D, 23),
    feat(&["fxsr"], 0x1, 0, D, 24),
    feat(&["sse"], 0x1, 0, D, 25),
    feat(&["sse2"], 0x1, 0, D, 26),
    feat(&["ss"], 0x1, 0, D, 27),
    feat(&["ht"], 0x1, 0, D, 28),
    feat(&["tm"], 0x1, 0, D, 29),
    feat(&["pbe"], 0x1, 0, D, 31),
    // Leaf 0x1 ECX.
    feat(&["pni", "sse3"], 0x1, 0, C, 0),
    feat(&["pclmuldq", "pclmulqdq"], 0x1, 0, C, 1),
    feat(&["dtes64"], 0x1, 0, C, 2),
    feat(&["monitor"], 0x1, 0, C, 3),
    feat(&["ds-cpl"], 0x1, 0, C, 4),
    feat(&["vmx"], 0x1, 0, C, 5),
    feat(&["smx"], 0x1, 0, C, 6),
    feat(&["est"], 0x1, 0, C, 7),
    feat(&["tm2"], 0x1, 0, C, 8),
    feat(&["ssse3"], 0x1, 0, C, 9),
    feat(&["cid", "cnxt-id"], 0x1, 0, C, 10),
    feat(&["fma"], 0x1, 0, C, 12),
    feat(&["cx16"], 0x1, 0, C, 13),
    feat(&["xtpr"], 0x1, 0, C, 14),
    feat(&["pdcm"], 0x1, 0, C, 15),
    feat(&["pcid"], 0x1, 0, C, 17),
    feat(&["dca"], 0x1, 0, C, 18),
    feat(&["sse4.1", "sse4-1"], 0x1, 0, C, 19),
    feat(&["sse4.2", "sse4-2"], 0x1, 0, C, 20),
    feat(&["x2apic"], 0x1, 0, C, 21),
    feat(&["movbe"], 0x1, 0, C, 22),
    feat(&["popcnt"], 0x1, 0, C, 23),
    feat(&["tsc-deadline", "tsc-deadline-timer"], 0x1, 0, C, 24),
    feat(&["aes"], 0x1, 0, C, 25),
    feat(&["xsave"], 0x1, 0, C, 26),
    feat(&["avx"], 0x1, 0, C, 28),
    feat(&["f16c"], 0x1, 0, C, 29),
    feat(&["rdrand"], 0x1, 0, C, 30),
    feat(&["hypervisor"], 0x1, 0, C, 31),
    // Leaf 0x7.0 EBX.
    feat(&["fsgsbase"], 0x7, 0, B, 0),
    feat(&["tsc-adjust"], 0x7, 0, B, 1),
    feat(&["sgx"], 0x7, 0, B, 2),
    feat(&["bmi1"], 0x7, 0, B, 3),
    feat(&["hle"], 0x7, 0, B, 4),
    feat(&["avx2"], 0x7, 0, B, 5),
    feat(&["smep"], 0x7, 0, B, 7),
    feat(&["bmi2"], 0x7, 0, B, 8),
    feat(&["erms"], 0x7, 0, B, 9),
    feat(&["invpcid"], 0x7, 0, B, 10),
    feat(&["rtm"], 0x7, 0, B, 11),
    feat(&["mpx"], 0x7, 0, B, 14),
    feat(&["avx512f"], 0x7, 0, B, 16),
    feat(&["avx512dq"], 0x7, 0, B, 17),
    feat(&["rdseed"], 0x7, 0, B, 18),
    feat(&["adx"], 0x7, 0, B, 19),
    feat(&["smap"], 0x7, 0, B, 20),
    feat(&["avx512ifma"], 0x7, 0, B, 21),
    feat(&["clflushopt"], 0x7, 0, B, 23),
    feat(&["clwb"], 0x7, 0, B, 24),
    feat(&["intel-pt"], 0x7, 0, B, 25),
    feat(&["avx512pf"], 0x7, 0, B, 26),
    feat(&["avx512er"], 0x7, 0, B, 27),
    feat(&["avx512cd"], 0x7, 0, B, 28),
    feat(&["sha-ni"], 0x7, 0, B, 29),
    feat(&["avx512bw"], 0x7, 0, B, 30),
    feat(&["avx512vl"], 0x7, 0, B, 31),
    // Leaf 0x7.0 ECX.
    feat(&["avx512-prefetchwt1", "prefetchwt1"], 0x7, 0, C, 0),
    feat(&["avx512vbmi"], 0x7, 0, C, 1),
    feat(&["umip"], 0x7, 0, C, 2),
    feat(&["pku"], 0x7, 0, C, 3),
    feat(&["waitpkg"], 0x7, 0, C, 5),
    feat(&["avx512-vbmi2"], 0x7, 0, C, 6),
    feat(&["shstk", "cet-ss", "user-shstk"], 0x7, 0, C, 7),
    feat(&["gfni"], 0x7, 0, C, 8),
    feat(&["vaes"], 0x7, 0, C, 9),
    feat(&["vpclmulqdq"], 0x7, 0, C, 10),
    feat(&["avx512vnni", "avx512-vnni"], 0x7, 0, C, 11),
    feat(&["avx512bitalg", "avx512-bitalg"], 0x7, 0, C, 12),
    feat(&["avx512-vpopcntdq"], 0x7, 0, C, 14),
    feat(&["la57"], 0x7, 0, C, 16),
    feat(&["rdpid"], 0x7, 0, C, 22),
    feat(&["bus-lock-detect"], 0x7, 0, C, 24),
    feat(&["cldemote"], 0x7, 0, C, 25),
    feat(&["movdiri"], 0x7, 0, C, 27),
    feat(&["movdir64b"], 0x7, 0, C, 28),
    feat(&["enqcmd"], 0x7, 0, C, 29),
    feat(&["pks"], 0x7, 0, C, 31),
    // Leaf 0x7.0 EDX.
    feat(&["avx512-4vnniw"], 0x7, 0, D, 2),
    feat(&["avx512-4fmaps"], 0x7, 0, D, 3),
    feat(&["fsrm"], 0x7, 0, D, 4),
    feat(&["avx512-vp2intersect"], 0x7, 0, D, 8),
    feat(&["md-clear"], 0x7, 0, D, 10),
    feat(&["serialize"], 0x7, 0, D, 14),
    feat(&["tsx-ldtrk", "tsxldtrk"], 0x7, 0, D, 16),
    feat(&["pconfig"], 0x7, 0, D, 18),
    feat(&["arch-lbr"], 0x7, 0, D, 19),
    feat(&["ibt", "cet-ibt"], 0x7, 0, D, 20),
    feat(&["amx-bf16"], 0x7, 0, D, 22),
    feat(&["avx512-fp16"], 0x7, 0, D, 23),
    feat(&["amx-tile"], 0x7, 0, D, 24),
    feat(&["amx-int8"], 0x7, 0, D, 25),
    feat(&["spec-ctrl"], 0x7, 0, D, 26),
    feat(&["stibp"], 0x7, 0, D, 27),
    feat(&["flush-l1d"], 0x7, 0, D, 28),
    feat(&["arch-capabilities"], 0x7, 0, D, 29),
    feat(&["core-capability"], 0x7, 0, D, 30),
    feat(&["ssbd"], 0x7, 0, D, 31),
    // Leaf 0x7.1 EAX.
    feat(&["avx-vnni"], 0x7, 1, A, 4),
    feat(&["avx512-bf16"], 0x7, 1, A, 5),
    feat(&["fzrm"], 0x7, 1, A, 10),
    feat(&["fsrs"], 0x7, 1, A, 11),
    feat(&["fsrc"], 0x7, 1, A, 12),
    feat(&["amx-fp16"], 0x7, 1, A, 21),
    feat(&["avx-ifma"], 0x7, 1, A, 23),
    feat(&["lam"], 0x7, 1, A, 26),
    // Leaf 0xD.1 EAX.
    feat(&["xsaveopt"], 0xD, 1, A, 0),
    feat(&["xsavec"], 0xD, 1, A, 1),
    feat(&["xgetbv1"], 0xD, 1, A, 2),
    feat(&["xsaves"], 0xD, 1, A, 3),
    feat(&["xfd"], 0xD, 1, A, 4),
    // Leaf 0x80000001 ECX.
    feat(&["lahf-lm"], 0x8000_0001, 0, C, 0),
    feat(&["cmp-legacy"], 0x8000_0001, 0, C, 1),
    feat(&["svm"], 0x8000_0001, 0, C, 2),
    feat(&["extapic"], 0x8000_0001, 0, C, 3),
    feat(&["cr8legacy"], 0x8000_0001, 0, C, 4),
    feat(&["abm", "lzcnt"], 0x8000_0001, 0, C, 5),
    feat(&["sse4a"], 0x8000_0001, 0, C, 6),
    feat(&["misalignsse"], 0x8000_0001, 0, C, 7),
    feat(&["3dnowprefetch"], 0x8000_0001, 0, C, 8),
    feat(&["osvw"], 0x8000_0001, 0, C, 9),
    feat(&["ibs"], 0x8000_0001, 0, C, 10),
    feat(&["xop"], 0x8000_0001, 0, C, 11),
    feat(&["skinit"], 0x8000_0001, 0, C, 12),
    feat(&["wdt"], 0x8000_0001, 0, C, 13),
    feat(&["lwp"], 0x8000_0001, 0, C, 15),
    feat(&["fma4"], 0x8000_0001, 0, C, 16),
    feat(&["tce"], 0x8000_0001, 0, C, 17),
    feat(&["nodeid-msr"], 0x8000_0001, 0, C, 19),
    feat(&["tbm"], 0x8000_0001, 0, C, 21),
    feat(&["topoext"], 0x8000_0001, 0, C, 22),
    feat(&["perfctr-core"], 0x8000_0001, 0, C, 23),
    feat(&["perfctr-nb"], 0x8000_0001, 0, C, 24),
    feat(&["bpext"], 0x8000_0001, 0, C, 26),
    feat(&["perfctr-llc", "perfctr-l2"], 0x8000_0001, 0, C, 28),
    feat(&["mwaitx"], 0x8000_0001, 0, C, 29),
    // Leaf 0x80000001 EDX.
    feat(&["syscall"], 0x8000_0001, 0, D, 11),
    feat(&["nx", "xd"], 0x8000_0001, 0, D, 20),
    feat(&["mmxext"], 0x8000_0001, 0, D, 22),
    feat(&["fxsr-opt"], 0x8000_0001, 0, D, 25),
    feat(&["pdpe1gb"], 0x8000_0001, 0, D, 26),
    feat(&["rdtscp"], 0x8000_0001, 0, D, 27),
    feat(&["lm", "i64"], 0x8000_0001, 0, D, 29),
    feat(&["3dnowext"], 0x8000_0001, 0, D, 30),
    feat(&["3dnow"], 0x8000_0001, 0, D, 31),
    // Leaf 0x80000007 EDX.
    feat(&["invtsc"], 0x8000_0007, 0, D, 8),
    // Leaf 0x80000008 EBX.
    feat(&["clzero"], 0x8000_0008, 0, B, 0),
    feat(&["wbnoinvd"], 0x8000_0008, 0, B, 9),
    feat(&["amd-ibpb"], 0x8000_0008, 0, B, 12),
    feat(&["amd-stibp"], 0x8000_0008, 0, B, 15),
    feat(&["amd-ssbd"], 0x8000_0008, 0, B, 24),
    feat(&["virt-ssbd"], 0x8000_0008, 0, B, 25),
];

/// Every feature name [`parse_feature`] accepts, in normalized spelling (lowercase, `-`
/// separators). The `_` spelling of each (e.g. `tsc_deadline_timer`) is accepted too.
pub fn feature_names() -> impl Iterator<Item = &'static str> {
    FEATURES.iter().flat_map(|f| f.names.iter().copied())
}

/// Looks up a feature by name: case-insensitive, `-` and `_` interchangeable.
pub fn parse_feature(name: &str) -> Result<CpuFeature, CpuidError> {
    let normalized: String = name
        .chars()
        .map(|c| {
            if c == '_' {
                '-'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect();
    FEATURES
        .iter()
        .find(|f| f.names.contains(&normalized.as_str()))
        .map(|f| CpuFeature {
            name: f.names[0],
            leaf: f.leaf,
            subleaf: f.subleaf,
            register: f.register,
            bit: f.bit,
        })
        .ok_or_else(|| CpuidError::UnknownFeature(name.to_string()))
}

/// Checks that `topology` can be described by the CPUID fields of a `vendor` processor.
///
/// Limits: every dimension at least 1; at most 12 APIC-ID bits below the package field
/// (the 12-bit cache sharing fields of leaves 0x4/0x8000001D); on AMD at most 256
/// logical processors per package (0x80000008 `ECX[7:0]`). The legacy 8-bit field of leaf
/// 0x1 `EBX[23:16]` and the 6-bit field of leaf 0x4 `EAX[31:26]` saturate instead, as on
/// large real parts; guests read the topology from leaves 0xB/0x1F.
pub fn check_topology(topology: &CpuTopology, vendor: CpuVendor) -> Result<(), CpuidError> {
    if topology.sockets == 0 || topology.cores == 0 || topology.threads == 0 {
        return Err(CpuidError::EmptyTopology(*topology));
    }
    if topology.package_shift() > MAX_PACKAGE_SHIFT {
        return Err(CpuidError::TopologyTooLarge {
            topology: *topology,
            reason: "more than 12 APIC ID bits per package (cache sharing fields are 12 bits)",
        });
    }
    if vendor == CpuVendor::Amd && topology.vcpus_per_socket() > AMD_MAX_THREADS_PER_PACKAGE {
        return Err(CpuidError::TopologyTooLarge {
            topology: *topology,
            reason: "more than 256 threads per package (AMD 0x80000008 ECX NC field is 8 bits)",
        });
    }
    Ok(())
}

/// Builds the CPUID table of vCPU `vcpu_index` (socket-major numbering, see
/// [`CpuTopology::position`]) for `KVM_SET_CPUID2`.
///
/// `supported` is `Kvm::get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)`; `host` is normally
/// [`NativeCpuid`]. The result keeps every leaf KVM supports and:
/// - copies the vendor (leaf 0), version (leaf 0x1 EAX), CLFLUSH size, cache descriptors
///   (0x2, 0x4, 0x80000005, 0x80000006, 0x8000001D) and brand string from the host;
/// - writes the topology: leaf 0x1 EBX APIC ID and logical count, HTT; leaf 0x4 sharing and
///   core count; leaves 0xB and 0x1F (SMT and Core levels, then an invalid level; 0x1F only
///   when the maximum basic leaf reaches it); on AMD 0x80000008 ECX, 0x8000001D, 0x8000001E
///   and TOPOEXT;
/// - sets the hypervisor bit and (with [`CpuidOptions::tsc_deadline`]) TSC-deadline;
/// - clears VMX, SVM and AMX, then every feature in [`CpuidOptions::masked_features`];
/// - publishes the TSC frequency in leaf 0x40000010 when the host TSC is invariant, the
///   guest sees `invtsc` and [`CpuidOptions::tsc_khz`] is known.
///
/// The vCPU must be created with KVM vCPU id `topology.apic_id(vcpu_index)`.
pub fn build_vcpu_cpuid<H: HostCpuid + ?Sized>(
    supported: &CpuId,
    host: &H,
    topology: &CpuTopology,
    vcpu_index: u32,
    opts: &CpuidOptions,
) -> Result<CpuId, CpuidError> {
    let vendor = host_vendor(host);
    check_topology(topology, vendor)?;
    if vcpu_index >= topology.vcpus() {
        return Err(CpuidError::VcpuIndexOutOfRange {
            index: vcpu_index,
            vcpus: topology.vcpus(),
        });
    }
    let masked = opts
        .masked_features
        .iter()
        .map(|name| parse_feature(name))
        .collect::<Result<Vec<_>, _>>()?;

    let mut table = Table {
        entries: supported.as_slice().to_vec(),
    };
    let geo = Geometry::new(topology, vcpu_index);
    let host_max_basic = host.cpuid(LEAF_VENDOR, 0).eax;
    let host_max_ext = host.cpuid(LEAF_EXT_MAX, 0).eax;

    // Leaf 0: KVM's maximum basic leaf (at least 0xB, which we always provide), host vendor.
    let max_basic = {
        let leaf0 = table
            .get_mut(LEAF_VENDOR, 0)
            .ok_or(CpuidError::MissingLeaf(LEAF_VENDOR))?;
        let h = host.cpuid(LEAF_VENDOR, 0);
        leaf0.eax = leaf0.eax.max(LEAF_TOPOLOGY);
        leaf0.ebx = h.ebx;
        leaf0.ecx = h.ecx;
        leaf0.edx = h.edx;
        leaf0.eax
    };
    let max_ext = table.get(LEAF_EXT_MAX, 0).map_or(0, |e| e.eax);

    // Leaf 0x1: version, APIC ID, logical processor count, HTT, hypervisor.
    {
        let h = host.cpuid(LEAF_FEATURES, 0);
        let leaf1 = table
            .get_mut(LEAF_FEATURES, 0)
            .ok_or(CpuidError::MissingLeaf(LEAF_FEATURES))?;
        leaf1.eax = h.eax;
        let logical = (1u32 << geo.package_shift).min(0xFF);
        leaf1.ebx = (h.ebx & 0xFFFF) | (logical << 16) | ((geo.apic_id & 0xFF) << 24);
        leaf1.ecx |= ECX1_HYPERVISOR;
        leaf1.ecx &= !ECX1_VMX;
        if opts.tsc_deadline {
            leaf1.ecx |= ECX1_TSC_DEADLINE;
        }
        if topology.vcpus_per_socket() > 1 {
            leaf1.edx |= EDX1_HTT;
        } else {
            leaf1.edx &= !EDX1_HTT;
        }
    }

    // Leaf 0x2: cache and TLB descriptors, from the host.
    if host_max_basic >= LEAF_CACHE_DESCRIPTORS {
        table.set(
            LEAF_CACHE_DESCRIPTORS,
            0,
            false,
            host.cpuid(LEAF_CACHE_DESCRIPTORS, 0),
        );
    }

    // Leaf 0x4: host caches, guest sharing. AMD reserves this leaf.
    if vendor != CpuVendor::Amd && host_max_basic >= LEAF_CACHE_PARAMS {
        table.remove_leaf(LEAF_CACHE_PARAMS);
        let cores_field = ((1u32 << geo.core_bits) - 1).min(CACHE_CORES_MAX) << CACHE_CORES_SHIFT;
        for_each_host_cache(host, LEAF_CACHE_PARAMS, |subleaf, mut regs| {
            if regs.eax & CACHE_TYPE_MASK != 0 {
                regs.eax =
                    with_cache_sharing(regs.eax, &geo) & !(CACHE_CORES_MAX << CACHE_CORES_SHIFT);
                regs.eax |= cores_field;
            }
            table.set(LEAF_CACHE_PARAMS, subleaf, true, regs);
        });
    }

    // Leaf 0x7: no AMX (its tile state needs per-process permission the VMM does not request).
    if let Some(e) = table.get_mut(LEAF_EXT_FEATURES, 0) {
        e.edx &= !(EDX7_AMX_BF16 | EDX7_AMX_TILE | EDX7_AMX_INT8);
    }
    if let Some(e) = table.get_mut(LEAF_EXT_FEATURES, 1) {
        e.eax &= !EAX7_1_AMX_FP16;
        e.edx &= !EDX7_1_AMX_COMPLEX;
    }
    // The AMX tile leaves describe nothing without AMX (some kernels drop them from
    // KVM_GET_CPUID2 when they are all zeros, others keep them): leave them out.
    table.remove_leaf(LEAF_AMX_TILE_INFO);
    table.remove_leaf(LEAF_AMX_TMUL_INFO);

    // Leaves 0xB and 0x1F: the guest topology replaces whatever KVM copied from the host.
    table.remove_leaf(LEAF_TOPOLOGY);
    table.remove_leaf(LEAF_TOPOLOGY_V2);
    let topo_leaves: &[u32] = if max_basic >= LEAF_TOPOLOGY_V2 {
        &[LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2]
    } else {
        &[LEAF_TOPOLOGY]
    };
    for &leaf in topo_leaves {
        for subleaf in 0..3 {
            table.set(leaf, subleaf, true, geo.topology_level(subleaf));
        }
    }

    // Brand string and extended cache leaves, from the host.
    for leaf in [
        LEAF_BRAND_FIRST,
        LEAF_BRAND_FIRST + 1,
        LEAF_BRAND_FIRST + 2,
        LEAF_L1_CACHE,
        LEAF_L2_CACHE,
    ] {
        if leaf <= max_ext && leaf <= host_max_ext {
            table.set(leaf, 0, false, host.cpuid(leaf, 0));
        }
    }

    // No nested virtualization.
    if let Some(e) = table.get_mut(LEAF_EXT_FEATURE_FLAGS, 0) {
        e.ecx &= !ECX_EXT_SVM;
    }

    if vendor == CpuVendor::Amd {
        amd_topology(&mut table, host, &geo, max_ext.min(host_max_ext));
    }

    for f in &masked {
        if let Some(e) = table.get_mut(f.leaf, f.subleaf) {
            *reg_mut(e, f.register) &= !(1u32 << f.bit);
        }
    }

    let max_apic_id = topology.apic_id(topology.vcpus() - 1);
    let x2apic = table
        .get(LEAF_FEATURES, 0)
        .is_some_and(|e| e.ecx & ECX1_X2APIC != 0);
    if max_apic_id > MAX_XAPIC_ID && !x2apic {
        return Err(CpuidError::X2apicRequired { max_apic_id });
    }

    // Leaf 0x40000010: TSC frequency, only for an invariant TSC the guest knows about.
    table.remove_leaf(LEAF_HV_TIMING);
    let host_invtsc = host_max_ext >= LEAF_APM && host.cpuid(LEAF_APM, 0).edx & EDX_APM_INVTSC != 0;
    let guest_invtsc = table
        .get(LEAF_APM, 0)
        .is_some_and(|e| e.edx & EDX_APM_INVTSC != 0);
    if let Some(khz) = opts.tsc_khz.filter(|&k| k != 0) {
        if host_invtsc && guest_invtsc {
            if let Some(sig) = table.get_mut(LEAF_KVM_SIGNATURE, 0) {
                sig.eax = sig.eax.max(LEAF_HV_TIMING);
                table.set(
                    LEAF_HV_TIMING,
                    0,
                    false,
                    CpuidRegs {
                        eax: khz,
                        ebx: KVM_APIC_BUS_KHZ,
                        ecx: 0,
                        edx: 0,
                    },
                );
            }
        }
    }

    table
        .entries
        .sort_by_key(|e| (e.function, e.index, e.flags));
    if table.entries.len() > KVM_MAX_CPUID_ENTRIES {
        return Err(CpuidError::TooManyEntries {
            count: table.entries.len(),
            max: KVM_MAX_CPUID_ENTRIES,
        });
    }
    CpuId::from_entries(&table.entries).map_err(|_| CpuidError::TooManyEntries {
        count: table.entries.len(),
        max: KVM_MAX_CPUID_ENTRIES,
    })
}

/// AMD topology: 0x80000008 ECX, 0x8000001D cache sharing, 0x8000001E IDs, TOPOEXT.
fn amd_topology<H: HostCpuid + ?Sized>(table: &mut Table, host: &H, geo: &Geometry, max_ext: u32) {
    if let Some(e) = table.get_mut(LEAF_ADDR_SIZES, 0) {
        // ECX[7:0] NC = threads per package - 1; ECX[15:12] ApicIdCoreIdSize.
        e.ecx =
            (e.ecx & !0xF0FF) | ((geo.threads_per_package - 1) & 0xFF) | (geo.package_shift << 12);
    }
    table.remove_leaf(LEAF_AMD_CACHE_TOPOLOGY);
    table.remove_leaf(LEAF_AMD_TOPOLOGY);
    let topoext = max_ext >= LEAF_AMD_TOPOLOGY;
    if topoext {
        for_each_host_cache(host, LEAF_AMD_CACHE_TOPOLOGY, |subleaf, mut regs| {
            if regs.eax & CACHE_TYPE_MASK != 0 {
                regs.eax = with_cache_sharing(regs.eax, geo);
            }
            table.set(LEAF_AMD_CACHE_TOPOLOGY, subleaf, true, regs);
        });
        table.set(
            LEAF_AMD_TOPOLOGY,
            0,
            false,
            CpuidRegs {
                eax: geo.apic_id,
                ebx: ((geo.threads_per_core - 1) & 0xFF) << 8 | (geo.core & 0xFF),
                ecx: geo.socket & 0xFF,
                edx: 0,
            },
        );
    }
    if let Some(e) = table.get_mut(LEAF_EXT_FEATURE_FLAGS, 0) {
        if topoext {
            e.ecx |= ECX_EXT_TOPOEXT;
        } else {
            e.ecx &= !ECX_EXT_TOPOEXT;
        }
    }
}

/// Calls `f(subleaf, regs)` for each host cache of a leaf 0x4-style leaf, then for the
/// first invalid subleaf (cache type 0) that terminates the list.
fn for_each_host_cache<H: HostCpuid + ?Sized>(
    host: &H,
    leaf: u32,
    mut f: impl FnMut(u32, CpuidRegs),
) {
    for subleaf in 0..MAX_CACHE_SUBLEAVES {
        let regs = host.cpuid(leaf, subleaf);
        f(subleaf, regs);
        if regs.eax & CACHE_TYPE_MASK == 0 {
            break;
        }
    }
}

/// Replaces `EAX[25:14]` (logical processors sharing the cache - 1) of a leaf 0x4 or
/// 0x8000001D cache: L1 and L2 are shared by the threads of a core, L3 and beyond by
/// the package. Counted as addressable APIC IDs, the way guests turn it into a mask.
fn with_cache_sharing(eax: u32, geo: &Geometry) -> u32 {
    let level = (eax >> 5) & 0x7;
    let sharing_bits = if level <= 2 {
        geo.thread_bits
    } else {
        geo.package_shift
    };
    let sharing = ((1u32 << sharing_bits) - 1).min(CACHE_SHARING_MAX);
    (eax & !(CACHE_SHARING_MAX << CACHE_SHARING_SHIFT)) | (sharing << CACHE_SHARING_SHIFT)
}

/// Topology facts about one vCPU, precomputed from a checked [`CpuTopology`].
struct Geometry {
    apic_id: u32,
    thread_bits: u32,
    core_bits: u32,
    package_shift: u32,
    threads_per_core: u32,
    threads_per_package: u32,
    core: u32,
    socket: u32,
}

impl Geometry {
    fn new(topology: &CpuTopology, index: u32) -> Self {
        let pos = topology.position(index);
        Geometry {
            apic_id: topology.apic_id(index),
            thread_bits: topology.thread_bits(),
            core_bits: topology.core_bits(),
            package_shift: topology.package_shift(),
            threads_per_core: u32::from(topology.threads),
            threads_per_package: topology.vcpus_per_socket(),
            core: pos.core,
            socket: pos.socket,
        }
    }

    /// Subleaf `subleaf` of leaf 0xB/0x1F: SMT level, Core level, then invalid.
    fn topology_level(&self, subleaf: u32) -> CpuidRegs {
        let (shift, count, level_type) = match subleaf {
            0 => (self.thread_bits, self.threads_per_core, TOPO_LEVEL_SMT),
            1 => (
                self.package_shift,
                self.threads_per_package,
                TOPO_LEVEL_CORE,
            ),
            _ => (0, 0, 0),
        };
        CpuidRegs {
            eax: shift,
            ebx: count & 0xFFFF,
            ecx: (subleaf & 0xFF) | (level_type << 8),
            edx: self.apic_id,
        }
    }
}

/// A mutable list of CPUID entries with KVM's lookup rules.
struct Table {
    entries: Vec<kvm_cpuid_entry2>,
}

/// Whether `e` answers CPUID(`leaf`, `subleaf`) under KVM's rules.
fn answers(e: &kvm_cpuid_entry2, leaf: u32, subleaf: u32) -> bool {
    e.function == leaf && (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == subleaf)
}

impl Table {
    fn get(&self, leaf: u32, subleaf: u32) -> Option<&kvm_cpuid_entry2> {
        self.entries.iter().find(|e| answers(e, leaf, subleaf))
    }

    fn get_mut(&mut self, leaf: u32, subleaf: u32) -> Option<&mut kvm_cpuid_entry2> {
        self.entries.iter_mut().find(|e| answers(e, leaf, subleaf))
    }

    fn remove_leaf(&mut self, leaf: u32) {
        self.entries.retain(|e| e.function != leaf);
    }

    /// Sets the registers answering (`leaf`, `subleaf`), adding an entry if none does.
    fn set(&mut self, leaf: u32, subleaf: u32, indexed: bool, regs: CpuidRegs) {
        let e = match self.get_mut(leaf, subleaf) {
            Some(e) => e,
            None => {
                self.entries.push(kvm_cpuid_entry2 {
                    function: leaf,
                    index: if indexed { subleaf } else { 0 },
                    flags: if indexed {
                        KVM_CPUID_FLAG_SIGNIFCANT_INDEX
                    } else {
                        0
                    },
                    ..Default::default()
                });
                let last = self.entries.len() - 1;
                &mut self.entries[last]
            }
        };
        e.eax = regs.eax;
        e.ebx = regs.ebx;
        e.ecx = regs.ecx;
        e.edx = regs.edx;
    }
}

/// The register `r` of entry `e`.
fn reg_mut(e: &mut kvm_cpuid_entry2, r: CpuidRegister) -> &mut u32 {
    match r {
        CpuidRegister::Eax => &mut e.eax,
        CpuidRegister::Ebx => &mut e.ebx,
        CpuidRegister::Ecx => &mut e.ecx,
        CpuidRegister::Edx => &mut e.edx,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};

    use kvm_ioctls::Kvm;

    use super::*;
    use crate::arch::x86_64::cpuid_dump::CpuidDump;

    /// (leaf, subleaf, register) of every feature-flag register: bits here may only be set
    /// when KVM supports them (plus the documented additions).
    const FEATURE_REGS: &[(u32, u32, CpuidRegister)] = &[
        (0x1, 0, C),
        (0x1, 0, D),
        (0x7, 0, B),
        (0x7, 0, C),
        (0x7, 0, D),
        (0x7, 1, A),
        (0x7, 1, D),
        (0xD, 1, A),
        (0x8000_0001, 0, C),
        (0x8000_0001, 0, D),
        (0x8000_0007, 0, D),
        (0x8000_0008, 0, B),
    ];

    fn find(c: &CpuId, leaf: u32, subleaf: u32) -> Option<kvm_cpuid_entry2> {
        c.as_slice()
            .iter()
            .copied()
            .find(|e| answers(e, leaf, subleaf))
    }

    fn regs(c: &CpuId, leaf: u32, subleaf: u32) -> CpuidRegs {
        let e = find(c, leaf, subleaf)
            .unwrap_or_else(|| panic!("leaf {leaf:#x}.{subleaf} missing from the table"));
        CpuidRegs {
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }

    fn reg(r: &CpuidRegs, which: CpuidRegister) -> u32 {
        match which {
            CpuidRegister::Eax => r.eax,
            CpuidRegister::Ebx => r.ebx,
            CpuidRegister::Ecx => r.ecx,
            CpuidRegister::Edx => r.edx,
        }
    }

    fn bit_set(c: &CpuId, f: &CpuFeature) -> bool {
        find(c, f.leaf, f.subleaf)
            .map(|e| {
                let r = CpuidRegs {
                    eax: e.eax,
                    ebx: e.ebx,
                    ecx: e.ecx,
                    edx: e.edx,
                };
                reg(&r, f.register) & (1 << f.bit) != 0
            })
            .unwrap_or(false)
    }

    fn feature(name: &str) -> CpuFeature {
        parse_feature(name).expect("feature in table")
    }

    /// Checks one built table against the host, KVM's table and the topology rules.
    /// Returns the vCPU's x2APIC ID (leaf 0xB EDX).
    fn check_table<H: HostCpuid + ?Sized>(
        built: &CpuId,
        supported: &CpuId,
        host: &H,
        topo: &CpuTopology,
        index: u32,
        opts: &CpuidOptions,
    ) -> u32 {
        let ctx = format!("topology {topo:?}, vCPU {index}");
        let vendor = host_vendor(host);
        let apic_id = topo.apic_id(index);

        // No duplicate answers for the same (leaf, subleaf).
        let mut seen = HashSet::new();
        for e in built.as_slice() {
            let key = if e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0 {
                (e.function, Some(e.index))
            } else {
                (e.function, None)
            };
            assert!(seen.insert(key), "{ctx}: duplicate entry {key:x?}");
        }

        // Every leaf/subleaf KVM supports is still answered (the topology leaves keep
        // exactly three subleaves: SMT, Core, invalid).
        for e in supported.as_slice() {
            if matches!(e.function, LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2) && e.index > 2 {
                continue;
            }
            if matches!(e.function, LEAF_AMX_TILE_INFO | LEAF_AMX_TMUL_INFO) {
                assert!(
                    find(built, e.function, e.index).is_none(),
                    "{ctx}: AMX leaf kept"
                );
                continue;
            }
            let b = find(built, e.function, e.index)
                .unwrap_or_else(|| panic!("{ctx}: KVM leaf {:#x}.{} missing", e.function, e.index));
            assert_eq!(
                b.flags, e.flags,
                "{ctx}: flags of {:#x}.{}",
                e.function, e.index
            );
        }

        // Identification and cache descriptions are the host's.
        let h0 = host.cpuid(0, 0);
        let b0 = regs(built, 0, 0);
        assert_eq!(
            (b0.ebx, b0.ecx, b0.edx),
            (h0.ebx, h0.ecx, h0.edx),
            "{ctx}: vendor"
        );
        assert!(b0.eax >= LEAF_TOPOLOGY, "{ctx}: max basic leaf below 0xB");
        assert_eq!(
            b0.eax,
            regs(supported, 0, 0).eax.max(LEAF_TOPOLOGY),
            "{ctx}: max leaf"
        );
        let h1 = host.cpuid(1, 0);
        let b1 = regs(built, 1, 0);
        assert_eq!(b1.eax, h1.eax, "{ctx}: family/model/stepping");
        assert_eq!(
            b1.ebx & 0xFFFF,
            h1.ebx & 0xFFFF,
            "{ctx}: CLFLUSH size/brand index"
        );
        if h0.eax >= 2 {
            assert_eq!(regs(built, 2, 0), host.cpuid(2, 0), "{ctx}: leaf 2");
        }
        let max_ext = regs(built, LEAF_EXT_MAX, 0).eax;
        let host_max_ext = host.cpuid(LEAF_EXT_MAX, 0).eax;
        for leaf in 0x8000_0002..=0x8000_0006u32 {
            if leaf <= max_ext.min(host_max_ext) {
                assert_eq!(
                    regs(built, leaf, 0),
                    host.cpuid(leaf, 0),
                    "{ctx}: {leaf:#x}"
                );
            }
        }

        // Feature bits: a subset of KVM's plus hypervisor, HTT, TSC-deadline (when asked)
        // and, on AMD, TOPOEXT.
        for &(leaf, subleaf, r) in FEATURE_REGS {
            let (Some(b), Some(s)) = (find(built, leaf, subleaf), find(supported, leaf, subleaf))
            else {
                continue;
            };
            let to_regs = |e: kvm_cpuid_entry2| CpuidRegs {
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
            };
            let mut extra = reg(&to_regs(b), r) & !reg(&to_regs(s), r);
            match (leaf, r) {
                (0x1, CpuidRegister::Ecx) => {
                    extra &= !ECX1_HYPERVISOR;
                    if opts.tsc_deadline {
                        extra &= !ECX1_TSC_DEADLINE;
                    }
                }
                (0x1, CpuidRegister::Edx) => extra &= !EDX1_HTT,
                (LEAF_EXT_FEATURE_FLAGS, CpuidRegister::Ecx) if vendor == CpuVendor::Amd => {
                    extra &= !ECX_EXT_TOPOEXT
                }
                _ => {}
            }
            assert_eq!(
                extra, 0,
                "{ctx}: bits beyond KVM's in {leaf:#x}.{subleaf} {r:?}"
            );
        }
        assert_eq!(
            b1.ecx & ECX1_HYPERVISOR != 0,
            !opts
                .masked_features
                .iter()
                .any(|f| { feature(f).name == "hypervisor" })
        );
        for name in ["vmx", "svm", "amx-tile", "amx-int8", "amx-bf16", "amx-fp16"] {
            assert!(!bit_set(built, &feature(name)), "{ctx}: {name} not cleared");
        }
        for name in &opts.masked_features {
            let f = parse_feature(name).expect("valid masked feature");
            assert!(!bit_set(built, &f), "{ctx}: masked {name} still set");
        }

        // Leaf 0x1 topology fields.
        assert_eq!(b1.ebx >> 24, apic_id & 0xFF, "{ctx}: initial APIC ID");
        assert_eq!(
            (b1.ebx >> 16) & 0xFF,
            (1u32 << topo.package_shift()).min(255),
            "{ctx}: addressable IDs per package"
        );
        let htt_masked = opts.masked_features.iter().any(|f| feature(f).name == "ht");
        assert_eq!(
            b1.edx & EDX1_HTT != 0,
            topo.vcpus_per_socket() > 1 && !htt_masked,
            "{ctx}: HTT"
        );

        // Leaf 0x4: host caches with guest sharing.
        if vendor != CpuVendor::Amd {
            for subleaf in 0..MAX_CACHE_SUBLEAVES {
                let h = host.cpuid(4, subleaf);
                let b = regs(built, 4, subleaf);
                assert_eq!(
                    (b.eax & 0x3FFF, b.ebx, b.ecx, b.edx),
                    (h.eax & 0x3FFF, h.ebx, h.ecx, h.edx),
                    "{ctx}: leaf 4.{subleaf} cache description"
                );
                if h.eax & 0x1F == 0 {
                    break;
                }
                let level = (h.eax >> 5) & 7;
                let sharing = if level <= 2 {
                    (1 << topo.thread_bits()) - 1
                } else {
                    (1 << topo.package_shift()) - 1
                };
                assert_eq!((b.eax >> 14) & 0xFFF, sharing, "{ctx}: 4.{subleaf} sharing");
                assert_eq!(
                    b.eax >> 26,
                    ((1u32 << topo.core_bits()) - 1).min(63),
                    "{ctx}: 4.{subleaf} cores"
                );
            }
        }

        // Leaves 0xB and 0x1F.
        let mut topo_leaves = vec![LEAF_TOPOLOGY];
        if b0.eax >= LEAF_TOPOLOGY_V2 {
            topo_leaves.push(LEAF_TOPOLOGY_V2);
        } else {
            assert!(
                find(built, LEAF_TOPOLOGY_V2, 0).is_none(),
                "{ctx}: stray 0x1F"
            );
        }
        for leaf in topo_leaves {
            let expect = [
                (topo.thread_bits(), u32::from(topo.threads), 0x100),
                (topo.package_shift(), topo.vcpus_per_socket(), 0x201),
                (0, 0, 2),
            ];
            for (subleaf, (eax, ebx, ecx)) in (0u32..).zip(expect) {
                let e = find(built, leaf, subleaf).expect("topology subleaf present");
                assert_eq!(e.index, subleaf, "{ctx}: {leaf:#x}.{subleaf} index");
                assert_ne!(e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 0, "{ctx}: flag");
                assert_eq!(
                    (e.eax, e.ebx, e.ecx, e.edx),
                    (eax, ebx, ecx, apic_id),
                    "{ctx}: {leaf:#x}.{subleaf}"
                );
            }
        }

        // KVM's own leaves are kept; the timing leaf only with an invariant TSC.
        let sig = regs(supported, LEAF_KVM_SIGNATURE, 0);
        let bsig = regs(built, LEAF_KVM_SIGNATURE, 0);
        assert_eq!((bsig.ebx, bsig.ecx, bsig.edx), (sig.ebx, sig.ecx, sig.edx));
        let invtsc = host_max_ext >= LEAF_APM
            && host.cpuid(LEAF_APM, 0).edx & EDX_APM_INVTSC != 0
            && bit_set(built, &feature("invtsc"));
        match opts.tsc_khz.filter(|&k| k != 0) {
            Some(khz) if invtsc => {
                assert_eq!(regs(built, LEAF_HV_TIMING, 0).eax, khz, "{ctx}: TSC kHz");
                assert!(
                    bsig.eax >= LEAF_HV_TIMING,
                    "{ctx}: 0x40000000 EAX too small"
                );
            }
            _ => {
                assert!(
                    find(built, LEAF_HV_TIMING, 0).is_none(),
                    "{ctx}: timing leaf"
                );
                assert_eq!(bsig.eax, sig.eax);
            }
        }
        regs(built, LEAF_TOPOLOGY, 0).edx
    }

    // ---------------------------------------------------------------- real host and KVM

    fn open_kvm() -> Kvm {
        Kvm::new().unwrap_or_else(|e| {
            panic!("this test needs a working /dev/kvm to read KVM's supported CPUID: {e}")
        })
    }

    fn kvm_supported(kvm: &Kvm) -> CpuId {
        kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .expect("KVM_GET_SUPPORTED_CPUID")
    }

    fn topologies() -> Vec<CpuTopology> {
        vec![
            CpuTopology::flat(1),
            CpuTopology {
                sockets: 2,
                cores: 3,
                threads: 2,
            },
            CpuTopology {
                sockets: 2,
                cores: 16,
                threads: 2,
            },
            // 288 vCPUs, APIC IDs up to 455: x2APIC-width IDs.
            CpuTopology {
                sockets: 4,
                cores: 36,
                threads: 2,
            },
            // 256 threads in one package: the most AMD's 8-bit NC field describes.
            CpuTopology {
                sockets: 1,
                cores: 128,
                threads: 2,
            },
            // 300 cores in one package: saturates the legacy 8-bit and 6-bit count fields
            // on Intel; more than AMD's 0x80000008 can describe, so refused there.
            CpuTopology::flat(300),
        ]
    }

    /// What [`check_all_topologies`] saw.
    #[derive(Debug, Default, PartialEq)]
    struct TopologyOutcome {
        /// Topologies whose every vCPU table was built and checked.
        accepted: Vec<CpuTopology>,
        /// Topologies the vendor's rules refuse (and `build_vcpu_cpuid` refused).
        refused: Vec<CpuTopology>,
    }

    /// Builds and checks every vCPU's table of every topology in [`topologies`] for
    /// `host`, following the host vendor's rules: a topology [`check_topology`]
    /// refuses for that vendor must be refused by `build_vcpu_cpuid` too.
    fn check_all_topologies<H: HostCpuid + ?Sized>(
        supported: &CpuId,
        host: &H,
        opts: &CpuidOptions,
    ) -> TopologyOutcome {
        let vendor = host_vendor(host);
        let mut outcome = TopologyOutcome::default();
        for topo in topologies() {
            if let Err(e) = check_topology(&topo, vendor) {
                assert!(matches!(e, CpuidError::TopologyTooLarge { .. }), "{e}");
                assert!(
                    matches!(
                        build_vcpu_cpuid(supported, host, &topo, 0, opts),
                        Err(CpuidError::TopologyTooLarge { .. })
                    ),
                    "{vendor:?} {topo:?}: refused by check_topology, built anyway"
                );
                outcome.refused.push(topo);
                continue;
            }
            let mut ids = HashSet::new();
            for index in 0..topo.vcpus() {
                let built = build_vcpu_cpuid(supported, host, &topo, index, opts)
                    .unwrap_or_else(|e| panic!("{vendor:?} {topo:?} vCPU {index}: {e}"));
                let id = check_table(&built, supported, host, &topo, index, opts);
                assert_eq!(id, topo.apic_id(index));
                assert!(ids.insert(id), "{topo:?}: APIC ID {id} repeated");
            }
            assert_eq!(ids.len() as u32, topo.vcpus());
            outcome.accepted.push(topo);
        }
        outcome
    }

    /// The outcome every host of `vendor` must give: all topologies but, on AMD, the
    /// one with more than 256 threads per package.
    fn expected_outcome(vendor: CpuVendor) -> TopologyOutcome {
        let (refused, accepted) = topologies()
            .into_iter()
            .partition(|t| vendor == CpuVendor::Amd && t.vcpus_per_socket() > 256);
        TopologyOutcome { accepted, refused }
    }

    fn real_host_opts() -> CpuidOptions {
        CpuidOptions {
            masked_features: vec!["rtm".into(), "hle".into(), "tsc_adjust".into()],
            tsc_khz: Some(2_300_000),
            tsc_deadline: true,
        }
    }

    #[test]
    fn real_host_tables_follow_host_kvm_and_topology() {
        let kvm = open_kvm();
        let supported = kvm_supported(&kvm);
        let outcome = check_all_topologies(&supported, &NativeCpuid, &real_host_opts());
        assert_eq!(outcome, expected_outcome(host_vendor(&NativeCpuid)));
    }

    /// A processor recorded with `cargo run -p vmm --example capture-cpuid`.
    fn captured(text: &str) -> CpuidDump {
        CpuidDump::parse(text).unwrap_or_else(|e| panic!("test data: {e}"))
    }

    /// Recorded hosts of both vendors, whatever this host is.
    fn captured_hosts() -> Vec<(&'static str, CpuidDump)> {
        vec![
            (
                "intel-xeon-5th-gen",
                captured(include_str!(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/testdata/cpuid/intel-xeon-5th-gen.txt"
                ))),
            ),
            (
                "amd-epyc",
                captured(include_str!(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/testdata/cpuid/amd-epyc.txt"
                ))),
            ),
        ]
    }

    #[test]
    fn captured_hosts_cover_both_vendors() {
        let vendors: Vec<CpuVendor> = captured_hosts()
            .iter()
            .map(|(_, h)| host_vendor(h))
            .collect();
        assert_eq!(vendors, [CpuVendor::Intel, CpuVendor::Amd]);
    }

    #[test]
    fn captured_tables_follow_kvm_and_topology() {
        for (name, host) in captured_hosts() {
            let supported = host.supported().expect("KVM table fits");
            let outcome = check_all_topologies(&supported, &host, &real_host_opts());
            assert_eq!(
                outcome,
                expected_outcome(host_vendor(&host)),
                "{name}: vendor rules"
            );
        }
    }

    #[test]
    fn captured_hosts_every_feature_can_be_masked() {
        let topo = CpuTopology {
            sockets: 1,
            cores: 2,
            threads: 2,
        };
        for (name, host) in captured_hosts() {
            let supported = host.supported().expect("KVM table fits");
            for feat in feature_names() {
                let opts = CpuidOptions {
                    masked_features: vec![feat.to_string()],
                    tsc_khz: Some(1_000_000),
                    tsc_deadline: true,
                };
                let built = build_vcpu_cpuid(&supported, &host, &topo, 3, &opts)
                    .unwrap_or_else(|e| panic!("{name}: masking {feat}: {e}"));
                assert!(!bit_set(&built, &feature(feat)), "{name}: {feat} still set");
                check_table(&built, &supported, &host, &topo, 3, &opts);
            }
        }
    }

    #[test]
    fn real_host_every_feature_can_be_masked() {
        let kvm = open_kvm();
        let supported = kvm_supported(&kvm);
        let topo = CpuTopology {
            sockets: 1,
            cores: 2,
            threads: 2,
        };
        for name in feature_names() {
            for spelling in [name.to_string(), name.replace('-', "_")] {
                let opts = CpuidOptions {
                    masked_features: vec![spelling.clone()],
                    tsc_khz: Some(1_000_000),
                    tsc_deadline: true,
                };
                let built = build_vcpu_cpuid(&supported, &NativeCpuid, &topo, 3, &opts)
                    .unwrap_or_else(|e| panic!("masking {spelling}: {e}"));
                assert!(!bit_set(&built, &feature(name)), "{spelling} still set");
                check_table(&built, &supported, &NativeCpuid, &topo, 3, &opts);
            }
        }
    }

    #[test]
    fn real_kvm_accepts_tables_for_x2apic_ids() {
        let kvm = open_kvm();
        let supported = kvm_supported(&kvm);
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
        let topo = CpuTopology {
            sockets: 4,
            cores: 36,
            threads: 2,
        };
        let max_id = topo.apic_id(topo.vcpus() - 1);
        let max_vcpu_id = kvm.check_extension_int(kvm_ioctls::Cap::MaxVcpuId);
        assert!(
            i64::from(max_id) < i64::from(max_vcpu_id),
            "KVM max vCPU id {max_vcpu_id} too small for APIC ID {max_id}"
        );
        for index in [0, 1, 71, 72, 200, topo.vcpus() - 1] {
            let apic_id = topo.apic_id(index);
            let vcpu = vm.create_vcpu(u64::from(apic_id)).expect("KVM_CREATE_VCPU");
            let opts = CpuidOptions {
                masked_features: vec!["pdpe1gb".into()],
                tsc_khz: vcpu.get_tsc_khz().ok(),
                tsc_deadline: kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
            };
            let built = build_vcpu_cpuid(&supported, &NativeCpuid, &topo, index, &opts)
                .expect("build table");
            vcpu.set_cpuid2(&built).expect("KVM_SET_CPUID2");
            let back = vcpu
                .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                .expect("KVM_GET_CPUID2");
            let missing: Vec<(u32, u32)> = built
                .as_slice()
                .iter()
                .filter(|b| {
                    !back
                        .as_slice()
                        .iter()
                        .any(|e| e.function == b.function && e.index == b.index)
                })
                .map(|e| (e.function, e.index))
                .collect();
            assert_eq!(
                back.as_slice().len(),
                built.as_slice().len(),
                "missing {missing:x?}"
            );
            assert_eq!(regs(&back, 1, 0).ebx >> 24, apic_id & 0xFF);
            for subleaf in 0..3 {
                assert_eq!(
                    regs(&back, LEAF_TOPOLOGY, subleaf),
                    regs(&built, LEAF_TOPOLOGY, subleaf)
                );
            }
            assert_eq!(
                find(&back, LEAF_HV_TIMING, 0).map(|e| e.eax),
                find(&built, LEAF_HV_TIMING, 0).map(|e| e.eax)
            );
        }
    }

    // ---------------------------------------------------------------- fake processors

    /// A fake processor: exact (leaf, subleaf) lookups, zeros elsewhere.
    #[derive(Clone, Default)]
    struct FakeHost {
        leaves: BTreeMap<(u32, u32), CpuidRegs>,
    }

    impl FakeHost {
        fn with(mut self, leaf: u32, subleaf: u32, r: [u32; 4]) -> Self {
            let [eax, ebx, ecx, edx] = r;
            self.leaves
                .insert((leaf, subleaf), CpuidRegs { eax, ebx, ecx, edx });
            self
        }

        fn vendor(self, max_leaf: u32, name: &[u8; 12]) -> Self {
            let word =
                |i: usize| u32::from_le_bytes([name[i], name[i + 1], name[i + 2], name[i + 3]]);
            self.with(0, 0, [max_leaf, word(0), word(8), word(4)])
        }

        /// KVM's table for this host: every leaf, with features filtered by `keep`.
        fn supported(
            &self,
            indexed: &[u32],
            keep: impl Fn(u32, u32, CpuidRegs) -> CpuidRegs,
        ) -> CpuId {
            let mut entries: Vec<kvm_cpuid_entry2> = self
                .leaves
                .iter()
                .map(|(&(function, index), &r)| {
                    let r = keep(function, index, r);
                    kvm_cpuid_entry2 {
                        function,
                        index,
                        flags: if indexed.contains(&function) {
                            KVM_CPUID_FLAG_SIGNIFCANT_INDEX
                        } else {
                            0
                        },
                        eax: r.eax,
                        ebx: r.ebx,
                        ecx: r.ecx,
                        edx: r.edx,
                        ..Default::default()
                    }
                })
                .collect();
            entries.push(kvm_cpuid_entry2 {
                function: LEAF_KVM_SIGNATURE,
                eax: 0x4000_0001,
                ebx: 0x4b4d_564b,
                ecx: 0x564b_4d56,
                edx: 0x4d,
                ..Default::default()
            });
            entries.push(kvm_cpuid_entry2 {
                function: 0x4000_0001,
                eax: 0x0100_7efb,
                ..Default::default()
            });
            CpuId::from_entries(&entries).expect("fake table fits")
        }
    }

    impl HostCpuid for FakeHost {
        fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidRegs {
            self.leaves
                .get(&(leaf, subleaf))
                .copied()
                .unwrap_or_default()
        }
    }

    /// A Sapphire-Rapids-like Intel host with leaf 0x1F (max basic leaf 0x20).
    fn fake_intel() -> FakeHost {
        FakeHost::default()
            .vendor(0x20, b"GenuineIntel")
            .with(1, 0, [0x000806f8, 0x0a40_0800, 0xfffa_3223, 0x1f8b_fbff])
            .with(2, 0, [0x00fe_ff01, 0xf0, 0, 0])
            .with(4, 0, [0xfc00_4121, 0x02c0_003f, 0x3f, 0])
            .with(4, 1, [0xfc00_4122, 0x01c0_003f, 0x3f, 0])
            .with(4, 2, [0xfc00_4143, 0x03c0_003f, 0x7ff, 0])
            .with(4, 3, [0xfc1f_c163, 0x0380_003f, 0x1_7fff, 4])
            .with(4, 4, [0, 0, 0, 0])
            .with(7, 0, [2, 0xf3bf_fbff, 0x1b41_5f6e, 0xbfc1_4c10])
            .with(7, 1, [0x1c30, 0, 0, 0])
            .with(0xB, 0, [1, 2, 0x100, 0x5a])
            .with(0xB, 1, [7, 112, 0x201, 0x5a])
            .with(0xB, 2, [0, 0, 2, 0x5a])
            .with(0xD, 0, [0x602e7, 0xa88, 0x2b08, 0])
            .with(0xD, 1, [0x1f, 0x980, 0, 0])
            .with(0x1F, 0, [1, 2, 0x100, 0x5a])
            .with(0x1F, 1, [7, 112, 0x201, 0x5a])
            .with(0x1F, 2, [0, 0, 2, 0x5a])
            .with(0x8000_0000, 0, [0x8000_0008, 0, 0, 0])
            .with(0x8000_0001, 0, [0, 0, 0x121, 0x2c10_0800])
            .with(
                0x8000_0002,
                0,
                [0x6574_6e49, 0x2952_286c, 0x6f65_5820, 0x2952_286e],
            )
            .with(0x8000_0003, 0, [0x6f72_5020, 0x7373_6563, 0x726f, 0])
            .with(0x8000_0004, 0, [0, 0, 0, 0])
            .with(0x8000_0006, 0, [0, 0, 0x0800_7040, 0])
            .with(0x8000_0007, 0, [0, 0, 0, 0x100])
            .with(0x8000_0008, 0, [0x3934, 0, 0, 0])
    }

    /// An EPYC-like AMD host (Zen 4 values, SVM present).
    fn fake_amd() -> FakeHost {
        FakeHost::default()
            .vendor(0x10, b"AuthenticAMD")
            .with(1, 0, [0x00a1_0f11, 0x0a80_0800, 0xfef8_3203, 0x178b_fbff])
            .with(7, 0, [1, 0xf1bf_97a9, 0x0040_5fce, 0x1000_0010])
            .with(0xB, 0, [1, 2, 0x100, 0x17])
            .with(0xB, 1, [7, 128, 0x201, 0x17])
            .with(0xD, 0, [0x2e7, 0x980, 0x988, 0])
            .with(0xD, 1, [0xf, 0x348, 0, 0])
            .with(
                0x8000_0000,
                0,
                [0x8000_0028, 0x6874_7541, 0x444d_4163, 0x6974_6e65],
            )
            .with(
                0x8000_0001,
                0,
                [0x00a1_0f11, 0x4000_0000, 0x75c2_37ff, 0x2fd3_fbff],
            )
            .with(
                0x8000_0002,
                0,
                [0x2044_4d41, 0x43595045, 0x3439_3920, 0x3436_2d34],
            )
            .with(
                0x8000_0003,
                0,
                [0x6f43_2d20, 0x7250_2065, 0x7365_636f, 0x2020_726f],
            )
            .with(
                0x8000_0004,
                0,
                [0x2020_2020, 0x2020_2020, 0x2020_2020, 0x0020_2020],
            )
            .with(
                0x8000_0005,
                0,
                [0xff48_ff40, 0xff48_ff40, 0x2004_0140, 0x2004_0140],
            )
            .with(
                0x8000_0006,
                0,
                [0x5c00_2200, 0x6c00_4200, 0x0200_6140, 0x0100_9140],
            )
            .with(0x8000_0007, 0, [0, 0x3b, 0, 0x0000_6799])
            .with(
                0x8000_0008,
                0,
                [0x3030, 0x791e_f257, 0x0003_707f, 0x0001_0000],
            )
            .with(0x8000_000A, 0, [1, 0x8000, 0, 0x1ebf_bcff])
            .with(0x8000_001D, 0, [0x0000_4121, 0x01c0_003f, 0x3f, 0])
            .with(0x8000_001D, 1, [0x0000_4122, 0x01c0_003f, 0x3f, 0])
            .with(0x8000_001D, 2, [0x0000_4143, 0x01c0_003f, 0x7ff, 2])
            .with(0x8000_001D, 3, [0x0001_c163, 0x03c0_003f, 0x7fff, 1])
            .with(0x8000_001D, 4, [0, 0, 0, 0])
            .with(0x8000_001E, 0, [0x17, 0x10b, 0, 0])
    }

    const INDEXED: &[u32] = &[4, 7, 0xB, 0xD, 0x1F, 0x8000_001D];

    /// KVM's view of the fake hosts: pass through everything except a few features,
    /// with KVM's topology leaves describing the host (to be replaced).
    fn kvm_like(leaf: u32, _subleaf: u32, mut r: CpuidRegs) -> CpuidRegs {
        if leaf == 1 {
            r.ecx &= !(ECX1_TSC_DEADLINE | (1 << 3)); // KVM leaves out TSC-deadline, MONITOR
            r.ecx |= ECX1_HYPERVISOR;
            r.edx &= !EDX1_HTT;
        }
        if leaf == 7 {
            r.ecx &= !(1 << 16); // no LA57 on this KVM
        }
        r
    }

    #[test]
    fn fake_intel_topologies() {
        let host = fake_intel();
        let supported = host.supported(INDEXED, kvm_like);
        let opts = CpuidOptions {
            masked_features: vec!["avx512f".into(), "sha_ni".into()],
            tsc_khz: Some(2_100_000),
            tsc_deadline: false,
        };
        assert_eq!(
            check_all_topologies(&supported, &host, &opts),
            expected_outcome(CpuVendor::Intel)
        );
        for topo in topologies() {
            for index in [0, topo.vcpus() - 1] {
                let built =
                    build_vcpu_cpuid(&supported, &host, &topo, index, &opts).expect("table");
                // 0x1F mirrors 0xB (no module/die levels).
                for subleaf in 0..3 {
                    assert_eq!(regs(&built, 0x1F, subleaf), regs(&built, 0xB, subleaf));
                }
                assert!(!bit_set(&built, &feature("tsc-deadline")));
            }
        }
        // The HostOS shape, spelled out: 2 sockets x 3 cores x 2 threads, vCPU 7 is
        // socket 1, core 0, thread 1: APIC ID 0b1001.
        let topo = CpuTopology {
            sockets: 2,
            cores: 3,
            threads: 2,
        };
        let built = build_vcpu_cpuid(&supported, &host, &topo, 7, &opts).expect("table");
        assert_eq!(regs(&built, 1, 0).ebx >> 16, 0x0908);
        assert_eq!(
            regs(&built, 0xB, 0),
            CpuidRegs {
                eax: 1,
                ebx: 2,
                ecx: 0x100,
                edx: 9
            }
        );
        assert_eq!(
            regs(&built, 0xB, 1),
            CpuidRegs {
                eax: 3,
                ebx: 6,
                ecx: 0x201,
                edx: 9
            }
        );
        assert_eq!(
            regs(&built, 0xB, 2),
            CpuidRegs {
                eax: 0,
                ebx: 0,
                ecx: 2,
                edx: 9
            }
        );
        // L1d shared by 2 threads, L3 by the package (8 IDs), 4 core IDs per package.
        assert_eq!(regs(&built, 4, 0).eax, (3 << 26) | (1 << 14) | 0x121);
        assert_eq!(regs(&built, 4, 3).eax, (3 << 26) | (7 << 14) | 0x163);
        assert_ne!(regs(&built, 1, 0).edx & EDX1_HTT, 0);
        // Flat single vCPU: no HTT, one ID per package.
        let one =
            build_vcpu_cpuid(&supported, &host, &CpuTopology::flat(1), 0, &opts).expect("table");
        assert_eq!(regs(&one, 1, 0).edx & EDX1_HTT, 0);
        assert_eq!(regs(&one, 1, 0).ebx >> 16, 0x0001);
        assert_eq!(regs(&one, 4, 3).eax, 0x163);
        // Large flat topology: legacy fields saturate, 0xB carries the truth.
        let big = CpuTopology::flat(300);
        let t = build_vcpu_cpuid(&supported, &host, &big, 299, &opts).expect("table");
        assert_eq!(regs(&t, 1, 0).ebx >> 16, (299 & 0xFF) << 8 | 0xFF);
        assert_eq!(regs(&t, 4, 0).eax >> 26, 63);
        assert_eq!(
            regs(&t, 0xB, 1),
            CpuidRegs {
                eax: 9,
                ebx: 300,
                ecx: 0x201,
                edx: 299
            }
        );
    }

    #[test]
    fn fake_amd_topology_leaves() {
        let host = fake_amd();
        let supported = host.supported(INDEXED, kvm_like);
        let opts = CpuidOptions {
            masked_features: vec![],
            tsc_khz: Some(2_400_000),
            tsc_deadline: true,
        };
        assert_eq!(
            check_all_topologies(&supported, &host, &opts),
            expected_outcome(CpuVendor::Amd)
        );
        let topo = CpuTopology {
            sockets: 2,
            cores: 3,
            threads: 2,
        };
        let mut ids = HashSet::new();
        for index in 0..topo.vcpus() {
            let built = build_vcpu_cpuid(&supported, &host, &topo, index, &opts).expect("table");
            let id = check_table(&built, &supported, &host, &topo, index, &opts);
            assert!(ids.insert(id));
            let pos = topo.position(index);
            assert_eq!(
                regs(&built, LEAF_AMD_TOPOLOGY, 0),
                CpuidRegs {
                    eax: id,
                    ebx: (1 << 8) | pos.core,
                    ecx: pos.socket,
                    edx: 0
                },
                "vCPU {index}"
            );
            let ext = regs(&built, LEAF_EXT_FEATURE_FLAGS, 0);
            assert_ne!(ext.ecx & ECX_EXT_TOPOEXT, 0, "topoext");
            assert_eq!(ext.ecx & ECX_EXT_SVM, 0, "svm");
            // NC = 5 (6 threads per package), ApicIdCoreIdSize = 3; PerfTscSize kept.
            assert_eq!(regs(&built, LEAF_ADDR_SIZES, 0).ecx, 0x0003_3005);
            // Caches: L1d/L1i/L2 per core (2 IDs), L3 per package (8 IDs); rest from host.
            let sharing: Vec<u32> = (0..4)
                .map(|s| (regs(&built, LEAF_AMD_CACHE_TOPOLOGY, s).eax >> 14) & 0xFFF)
                .collect();
            assert_eq!(sharing, [1, 1, 1, 7]);
            for s in 0..5 {
                let (b, h) = (
                    regs(&built, LEAF_AMD_CACHE_TOPOLOGY, s),
                    host.cpuid(LEAF_AMD_CACHE_TOPOLOGY, s),
                );
                assert_eq!(
                    (b.eax & 0x3FFF, b.ebx, b.ecx, b.edx),
                    (h.eax & 0x3FFF, h.ebx, h.ecx, h.edx)
                );
            }
            assert!(find(&built, 4, 0).is_none(), "AMD has no leaf 4");
            assert!(find(&built, 0x1F, 0).is_none(), "max basic leaf is 0x10");
            assert_ne!(regs(&built, 1, 0).ecx & ECX1_TSC_DEADLINE, 0);
        }
        // Too many threads per package for the 8-bit NC field.
        let big = CpuTopology {
            sockets: 1,
            cores: 129,
            threads: 2,
        };
        assert!(matches!(
            build_vcpu_cpuid(&supported, &host, &big, 0, &opts),
            Err(CpuidError::TopologyTooLarge { .. })
        ));
        // The same topology is fine on Intel.
        let intel = fake_intel();
        let isup = intel.supported(INDEXED, kvm_like);
        assert!(build_vcpu_cpuid(&isup, &intel, &big, 257, &opts).is_ok());
    }

    #[test]
    fn amd_without_topology_leaves_clears_topoext() {
        let host = fake_amd().with(0x8000_0000, 0, [0x8000_0008, 0, 0, 0]);
        let supported = host.supported(INDEXED, |leaf, _, mut r| {
            if leaf == 1 {
                r.ecx &= !ECX1_HYPERVISOR;
            }
            r
        });
        let topo = CpuTopology {
            sockets: 1,
            cores: 2,
            threads: 1,
        };
        let built =
            build_vcpu_cpuid(&supported, &host, &topo, 1, &CpuidOptions::default()).expect("table");
        assert_eq!(
            regs(&built, LEAF_EXT_FEATURE_FLAGS, 0).ecx & ECX_EXT_TOPOEXT,
            0
        );
        // KVM's table here lacks the hypervisor bit; the guest still gets it.
        assert_eq!(regs(&supported, 1, 0).ecx & ECX1_HYPERVISOR, 0);
        assert_ne!(regs(&built, 1, 0).ecx & ECX1_HYPERVISOR, 0);
        assert!(find(&built, LEAF_AMD_TOPOLOGY, 0).is_none());
        assert!(find(&built, LEAF_AMD_CACHE_TOPOLOGY, 0).is_none());
    }

    #[test]
    fn masking_by_name() {
        let host = fake_intel();
        let supported = host.supported(INDEXED, kvm_like);
        let names = [
            "avx512f",
            "x2apic",
            "tsc_deadline_timer",
            "pdpe1gb",
            "sse4_2",
            "sse4.1",
            "XSAVEOPT",
            "avx512_vnni",
            "invtsc",
        ];
        let opts = CpuidOptions {
            masked_features: names.iter().map(|s| s.to_string()).collect(),
            tsc_khz: Some(1_000_000),
            tsc_deadline: true,
        };
        let topo = CpuTopology {
            sockets: 1,
            cores: 4,
            threads: 2,
        };
        let built = build_vcpu_cpuid(&supported, &host, &topo, 5, &opts).expect("table");
        for n in names {
            assert!(!bit_set(&built, &feature(n)), "{n}");
        }
        // Unmasked neighbours stay.
        for n in ["avx512dq", "sse3", "avx2", "lm", "xsavec"] {
            assert!(bit_set(&built, &feature(n)), "{n}");
        }
        // invtsc masked: no timing leaf even though the host TSC is invariant.
        assert!(find(&built, LEAF_HV_TIMING, 0).is_none());
        check_table(&built, &supported, &host, &topo, 5, &opts);
    }

    #[test]
    fn unknown_feature_is_an_error_naming_it() {
        assert_eq!(
            parse_feature("avx9000"),
            Err(CpuidError::UnknownFeature("avx9000".into()))
        );
        let host = fake_intel();
        let supported = host.supported(INDEXED, kvm_like);
        let opts = CpuidOptions {
            masked_features: vec!["avx2".into(), "no-such-flag".into()],
            ..Default::default()
        };
        let err = build_vcpu_cpuid(&supported, &host, &CpuTopology::flat(1), 0, &opts).unwrap_err();
        assert_eq!(err, CpuidError::UnknownFeature("no-such-flag".into()));
        assert!(err.to_string().contains("`no-such-flag`"));
    }

    #[test]
    fn feature_table_is_consistent() {
        let mut names = HashSet::new();
        let mut bits = HashSet::new();
        for f in FEATURES {
            for n in f.names {
                assert!(names.insert(*n), "duplicate name {n}");
                assert_eq!(
                    *n,
                    n.to_ascii_lowercase().replace('_', "-"),
                    "{n} not normalized"
                );
                assert_eq!(parse_feature(n).map(|p| p.name), Ok(f.names[0]));
            }
            assert!(f.bit < 32);
            assert!(
                bits.insert((f.leaf, f.subleaf, f.register, f.bit)),
                "{} duplicates a bit",
                f.names[0]
            );
        }
        assert!(FEATURES.len() >= 60);
        assert_eq!(feature_names().count(), names.len());
        // Linux /proc/cpuinfo and libvirt spellings.
        for (a, b) in [
            ("tsc_deadline_timer", "tsc-deadline"),
            ("sse4_1", "sse4.1"),
            ("pclmulqdq", "pclmuldq"),
            ("sha_ni", "sha-ni"),
            ("avx512_vnni", "avx512vnni"),
            ("avx512_vbmi2", "avx512-vbmi2"),
            ("lahf_lm", "lahf-lm"),
            ("amx_tile", "amx-tile"),
        ] {
            assert_eq!(parse_feature(a), parse_feature(b), "{a} vs {b}");
        }
        let f = feature("pdpe1gb");
        assert_eq!(
            (f.leaf, f.subleaf, f.register, f.bit),
            (0x8000_0001, 0, D, 26)
        );
        let f = feature("waitpkg");
        assert_eq!((f.leaf, f.subleaf, f.register, f.bit), (7, 0, C, 5));
    }

    #[test]
    fn timing_leaf_needs_invariant_tsc_and_frequency() {
        let topo = CpuTopology::flat(2);
        let with_khz = CpuidOptions {
            tsc_khz: Some(2_345_678),
            ..Default::default()
        };
        // Invariant host TSC and a known frequency: published, and reachable.
        let host = fake_intel();
        let supported = host.supported(INDEXED, kvm_like);
        let t = build_vcpu_cpuid(&supported, &host, &topo, 0, &with_khz).expect("table");
        assert_eq!(
            regs(&t, LEAF_HV_TIMING, 0),
            CpuidRegs {
                eax: 2_345_678,
                ebx: 1_000_000,
                ecx: 0,
                edx: 0
            }
        );
        assert_eq!(regs(&t, LEAF_KVM_SIGNATURE, 0).eax, LEAF_HV_TIMING);
        check_table(&t, &supported, &host, &topo, 0, &with_khz);
        // Unknown frequency (or zero): absent.
        for khz in [None, Some(0)] {
            let opts = CpuidOptions {
                tsc_khz: khz,
                ..Default::default()
            };
            let t = build_vcpu_cpuid(&supported, &host, &topo, 0, &opts).expect("table");
            assert!(find(&t, LEAF_HV_TIMING, 0).is_none());
            assert_eq!(regs(&t, LEAF_KVM_SIGNATURE, 0).eax, 0x4000_0001);
        }
        // Host TSC not invariant: absent.
        let host = fake_intel().with(0x8000_0007, 0, [0, 0, 0, 0]);
        let supported = host.supported(INDEXED, kvm_like);
        let t = build_vcpu_cpuid(&supported, &host, &topo, 1, &with_khz).expect("table");
        assert!(find(&t, LEAF_HV_TIMING, 0).is_none());
        assert_eq!(regs(&t, LEAF_KVM_SIGNATURE, 0).eax, 0x4000_0001);
        check_table(&t, &supported, &host, &topo, 1, &with_khz);
    }

    #[test]
    fn topology_and_size_errors() {
        let host = fake_intel();
        let supported = host.supported(INDEXED, kvm_like);
        let opts = CpuidOptions::default();
        let zero = CpuTopology {
            sockets: 1,
            cores: 0,
            threads: 1,
        };
        assert_eq!(
            build_vcpu_cpuid(&supported, &host, &zero, 0, &opts),
            Err(CpuidError::EmptyTopology(zero))
        );
        let wide = CpuTopology {
            sockets: 1,
            cores: 4096,
            threads: 2,
        };
        assert!(matches!(
            build_vcpu_cpuid(&supported, &host, &wide, 0, &opts),
            Err(CpuidError::TopologyTooLarge { .. })
        ));
        assert_eq!(
            check_topology(
                &CpuTopology {
                    sockets: 1,
                    cores: 2048,
                    threads: 2
                },
                CpuVendor::Intel
            ),
            Ok(())
        );
        let topo = CpuTopology {
            sockets: 2,
            cores: 3,
            threads: 2,
        };
        assert_eq!(
            build_vcpu_cpuid(&supported, &host, &topo, 12, &opts),
            Err(CpuidError::VcpuIndexOutOfRange {
                index: 12,
                vcpus: 12
            })
        );
        // x2APIC masked while APIC IDs exceed 254.
        let opts = CpuidOptions {
            masked_features: vec!["x2apic".into()],
            ..Default::default()
        };
        assert_eq!(
            build_vcpu_cpuid(&supported, &host, &CpuTopology::flat(300), 0, &opts),
            Err(CpuidError::X2apicRequired { max_apic_id: 299 })
        );
        assert!(build_vcpu_cpuid(&supported, &host, &CpuTopology::flat(255), 0, &opts).is_ok());
        // A KVM table already near the limit: our additions overflow it.
        let mut entries = supported.as_slice().to_vec();
        for i in 0..(KVM_MAX_CPUID_ENTRIES - entries.len()) as u32 {
            entries.push(kvm_cpuid_entry2 {
                function: 0x8000_0100 + i,
                ..Default::default()
            });
        }
        let full = CpuId::from_entries(&entries).expect("full table");
        assert!(matches!(
            build_vcpu_cpuid(
                &full,
                &host,
                &CpuTopology::flat(1),
                0,
                &CpuidOptions {
                    tsc_khz: Some(1),
                    ..Default::default()
                }
            ),
            Err(CpuidError::TooManyEntries {
                max: KVM_MAX_CPUID_ENTRIES,
                ..
            })
        ));
        // Missing leaf 1.
        let mut entries = supported.as_slice().to_vec();
        entries.retain(|e| e.function != 1);
        let no1 = CpuId::from_entries(&entries).expect("table");
        assert_eq!(
            build_vcpu_cpuid(&no1, &host, &topo, 0, &CpuidOptions::default()),
            Err(CpuidError::MissingLeaf(1))
        );
    }

    #[test]
    fn vendor_detection() {
        assert_eq!(host_vendor(&fake_intel()), CpuVendor::Intel);
        assert_eq!(host_vendor(&fake_amd()), CpuVendor::Amd);
        assert_eq!(
            host_vendor(&FakeHost::default().vendor(0xd, b"HygonGenuine")),
            CpuVendor::Amd
        );
        assert_eq!(
            host_vendor(&FakeHost::default().vendor(0xd, b"CentaurHauls")),
            CpuVendor::Other
        );
        assert_ne!(
            host_vendor(&NativeCpuid),
            CpuVendor::Other,
            "unexpected host vendor"
        );
    }
}
