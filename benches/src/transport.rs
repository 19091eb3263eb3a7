//! The virtio transport a guest bench row is measured over, and how each
//! VMM is told to use it: Keel with `--transport mmio|pci` (always given,
//! whatever Keel's default), QEMU with `-M microvm` and `virtio-*-device`
//! (virtio-mmio, modern) or `-M q35` and `virtio-*-pci` (modern only).
//!
//! QEMU's PCI machine is q35 rather than `microvm,pcie=on`: the probe runs
//! no firmware of its own, and microvm's qboot leaves the BARs of PCI
//! functions unassigned, where q35's SeaBIOS assigns them (and its ACPI
//! tables carry the MCFG the probe finds ECAM with).

use std::path::Path;
use std::process::Command;

/// A virtio transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// virtio-mmio.
    Mmio,
    /// virtio-pci.
    Pci,
}

/// The device kinds the guest benches attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// virtio-blk.
    Blk,
    /// virtio-net.
    Net,
    /// vhost-vsock (QEMU has no userspace vsock device).
    Vsock,
}

impl Transport {
    /// Its name as `--transport` and the tables write it.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Mmio => "mmio",
            Transport::Pci => "pci",
        }
    }

    /// Parses a bench's `--transport mmio|pci|both`.
    pub fn parse_list(v: &str) -> Option<Vec<Transport>> {
        match v {
            "mmio" => Some(vec![Transport::Mmio]),
            "pci" => Some(vec![Transport::Pci]),
            "both" => Some(vec![Transport::Mmio, Transport::Pci]),
            _ => None,
        }
    }

    /// Keel's arguments selecting this transport.
    pub fn keel_args(self) -> [&'static str; 2] {
        ["--transport", self.name()]
    }

    /// The series name of Keel over this transport (records and charts).
    pub fn keel_series(self) -> String {
        format!("Keel {}", self.name())
    }

    /// The QEMU machine this transport is measured on.
    pub fn qemu_machine(self) -> &'static str {
        match self {
            Transport::Mmio => "microvm",
            Transport::Pci => "q35",
        }
    }

    /// The series name of QEMU over this transport: `QEMU microvm` (as
    /// before there was a transport column) or `QEMU q35`.
    pub fn qemu_series(self) -> String {
        format!("QEMU {}", self.qemu_machine())
    }

    /// QEMU's device of `kind` over this transport, options after it
    /// (such as `drive=d0`) to be appended by the caller.
    pub fn qemu_device(self, kind: Kind) -> &'static str {
        match (self, kind) {
            (Transport::Mmio, Kind::Blk) => "virtio-blk-device",
            (Transport::Mmio, Kind::Net) => "virtio-net-device",
            (Transport::Mmio, Kind::Vsock) => "vhost-vsock-device",
            // Modern only, like Keel's: the probe looks for the modern
            // device IDs (0x1040 + type).
            (Transport::Pci, Kind::Blk) => "virtio-blk-pci,disable-legacy=on",
            (Transport::Pci, Kind::Net) => "virtio-net-pci,disable-legacy=on",
            (Transport::Pci, Kind::Vsock) => "vhost-vsock-pci,disable-legacy=on",
        }
    }

    /// QEMU booting the probe at `probe` with `cmdline`, `mem` of memory,
    /// one vCPU, serial on stdout, over this transport; the caller adds
    /// the devices (see [`Transport::qemu_device`]).
    pub fn qemu(self, qemu: &Path, probe: &Path, cmdline: &str, mem: &str) -> Command {
        self.qemu_smp(qemu, probe, cmdline, mem, 1)
    }

    /// As [`Self::qemu`], with `cpus` vCPUs.
    pub fn qemu_smp(
        self,
        qemu: &Path,
        probe: &Path,
        cmdline: &str,
        mem: &str,
        cpus: u32,
    ) -> Command {
        let mut c = Command::new(qemu);
        match self {
            Transport::Mmio => c
                .args(["-M", "microvm,acpi=off"])
                // Modern virtio-mmio like Keel's: the same guest driver path.
                .args(["-global", "virtio-mmio.force-legacy=false"]),
            Transport::Pci => c.args(["-M", "q35"]),
        };
        c.args(["-enable-kvm", "-cpu", "host,-arch-capabilities"])
            .args(["-m", mem, "-smp", &cpus.to_string()])
            // Names the vCPU threads `CPU N/KVM`, so that their time can be
            // told apart from the VMM's own.
            .args(["-name", "probe,debug-threads=on"])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .args(["-serial", "stdio", "-monitor", "none"])
            .args(["-kernel", &probe.display().to_string(), "-append", cmdline]);
        c
    }
}

/// The Firecracker cell of a row over `t`: `measured` (the shown median,
/// `None` when every run failed) where Firecracker ran, else why not
/// (it has no PCI transport; no binary was given).
pub fn firecracker_cell(have_binary: bool, t: Transport, measured: Option<String>) -> String {
    match (have_binary, t) {
        (_, Transport::Pci) => "- (no PCI)".into(),
        (false, _) => "not measured (no binary)".into(),
        (true, _) => measured.unwrap_or_else(|| "failed".into()),
    }
}

/// `a / b` as a table cell (`-` when either is missing).
pub fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_lists() {
        assert_eq!(Transport::parse_list("mmio"), Some(vec![Transport::Mmio]));
        assert_eq!(Transport::parse_list("pci"), Some(vec![Transport::Pci]));
        assert_eq!(
            Transport::parse_list("both"),
            Some(vec![Transport::Mmio, Transport::Pci])
        );
        assert_eq!(Transport::parse_list("isa"), None);
    }

    #[test]
    fn every_vmm_is_told_the_transport() {
        assert_eq!(Transport::Pci.keel_args(), ["--transport", "pci"]);
        assert_eq!(Transport::Mmio.keel_args(), ["--transport", "mmio"]);
        let args = |t: Transport| -> Vec<String> {
            t.qemu(Path::new("q"), Path::new("p"), "c", "1M")
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        assert!(args(Transport::Pci).contains(&"q35".to_string()));
        assert!(args(Transport::Mmio).contains(&"microvm,acpi=off".to_string()));
        assert!(Transport::Pci.qemu_device(Kind::Blk).contains("-pci"));
        assert!(Transport::Mmio.qemu_device(Kind::Net).ends_with("-device"));
    }

    #[test]
    fn ratio_cells() {
        assert_eq!(ratio(Some(3.0), Some(2.0)), "1.50x");
        assert_eq!(ratio(None, Some(2.0)), "-");
        assert_eq!(ratio(Some(1.0), Some(0.0)), "-");
    }
}
