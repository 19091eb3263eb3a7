//! Records this host's CPUID and KVM's supported CPUID table as a
//! [`CpuidDump`], for the CPUID tests to replay on any machine:
//!
//! ```sh
//! cargo run --release -p vmm --example capture-cpuid > vmm/testdata/cpuid/NAME.txt
//! ```

use std::process::ExitCode;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::Kvm;
use vmm::arch::x86_64::cpuid::{HostCpuid, NativeCpuid};
use vmm::arch::x86_64::cpuid_dump::CpuidDump;

/// The processor's brand string (leaves 0x80000002-4).
fn brand() -> String {
    let mut bytes = Vec::new();
    for leaf in 0x8000_0002u32..=0x8000_0004 {
        let r = NativeCpuid.cpuid(leaf, 0);
        for w in [r.eax, r.ebx, r.ecx, r.edx] {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
    }
    String::from_utf8_lossy(&bytes)
        .trim_matches(|c: char| c == '\0' || c.is_whitespace())
        .to_string()
}

fn main() -> ExitCode {
    let supported = match Kvm::new().and_then(|k| k.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("capture-cpuid: cannot read KVM's supported CPUID: {e}");
            return ExitCode::FAILURE;
        }
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let header = format!(
        "Keel CPUID dump: host CPUID and KVM_GET_SUPPORTED_CPUID\nprocessor: {}\nhost kernel: {}\nwritten by `cargo run --release -p vmm --example capture-cpuid`",
        brand(),
        kernel.trim()
    );
    print!(
        "{}",
        CpuidDump::capture(&NativeCpuid, &supported).to_text(&header)
    );
    ExitCode::SUCCESS
}
