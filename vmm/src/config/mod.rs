//! The one typed configuration model of a VM, shared by the command line,
//! the TOML config file and (later) the control API.
//!
//! A config file is deserialized straight into [`VmConfig`]; command-line
//! flags then override it field by field (a `--memory` flag replaces the
//! whole `[memory]` table, `--kernel` just the kernel). [`VmConfig::validate`]
//! checks the result before anything is created, so a VM never starts
//! half-configured.

mod options;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::arch::x86_64::cpuid;
use crate::arch::x86_64::layout;
use crate::arch::x86_64::numa::NumaLayout;
use crate::arch::x86_64::topology::CpuTopology;
pub use options::{parse_size, parse_switch, ByteSize, OptionList};

/// A configuration error; `field` names the offending setting, as a flag
/// (`memory.size`) or file key, so the admin knows exactly what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value that does not parse or is out of range.
    #[error("invalid value for {field}: {value:?}: {why}")]
    Invalid {
        /// The setting.
        field: String,
        /// The value given.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// A key the option does not know.
    #[error("unknown key `{key}` in {field} (known keys: {known})")]
    UnknownKey {
        /// The option.
        field: String,
        /// The key given.
        key: String,
        /// The keys it accepts.
        known: String,
    },
    /// A required setting is absent.
    #[error("missing {0}")]
    Missing(&'static str),
    /// A required key of a repeated option is absent (`disks[1].path`).
    #[error("missing {0}")]
    MissingKey(String),
    /// The config file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this model.
    #[error("config file {path}: {message}")]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the key and line).
        message: String,
    },
}

impl ConfigError {
    /// An [`ConfigError::Invalid`] for `field`.
    pub fn invalid(field: &str, value: &str, why: String) -> Self {
        ConfigError::Invalid {
            field: field.to_string(),
            value: value.to_string(),
            why,
        }
    }
}

/// What to boot.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    /// Kernel image: ELF vmlinux (PVH or 64-bit entry) or bzImage.
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Boot the GuestOS from its own disk instead of `kernel`/`initrd`/
    /// `cmdline`: the A/B slot its grubenv selects (`guestos`) or the
    /// opposite one (`upgrade`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_slot: Option<BootSlot>,
    /// The disk (index into `disks`) `boot_slot` reads; the first when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_disk: Option<usize>,
}

/// The role of a VM booted from its disk (`--boot-slot`, `payload.boot_slot`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootSlot {
    /// The GuestOS VM: the slot grubenv selects, advancing its boot cycle.
    Guestos,
    /// The upgrade VM: the slot opposite `boot_alternative`; never writes.
    Upgrade,
}

impl BootSlot {
    /// Parses `guestos` or `upgrade`.
    pub fn parse(field: &str, v: &str) -> Result<Self, ConfigError> {
        match v {
            "guestos" => Ok(BootSlot::Guestos),
            "upgrade" => Ok(BootSlot::Upgrade),
            _ => Err(ConfigError::invalid(
                field,
                v,
                "expected guestos or upgrade".into(),
            )),
        }
    }
}

/// Guest memory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Size (a string such as `"512M"` in the file, or a byte count).
    pub size: ByteSize,
    /// Back guest memory with 2 MiB hugetlbfs pages: on, off or auto
    /// (`true`/`false` are read as on/off).
    #[serde(default)]
    pub hugepages: HugepagesMode,
    /// Accept a size above the host's physical memory (MemTotal).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub overcommit: bool,
    /// Describe each socket as a NUMA node (ACPI SRAT and SLIT), with
    /// guest RAM split evenly among them (see `arch::x86_64::numa`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub numa: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size: ByteSize::from_bytes(512 << 20),
            hugepages: HugepagesMode::Off,
            overcommit: false,
            numa: false,
        }
    }
}

/// Whether guest memory is backed by 2 MiB hugepages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HugepagesMode {
    /// Normal (anonymous, transparent-hugepage advised) memory.
    #[default]
    Off,
    /// Hugepages, reserved up front; too few free is an error.
    On,
    /// Hugepages when enough are free, else normal pages with a warning
    /// (HostOS's behaviour).
    Auto,
}

impl HugepagesMode {
    /// Parses `on`, `off` or `auto` (also the switch words `true`/`false`,
    /// `yes`/`no`, `1`/`0`).
    pub fn parse(input: &str) -> Result<Self, String> {
        if input.eq_ignore_ascii_case("auto") {
            return Ok(HugepagesMode::Auto);
        }
        match parse_switch(input) {
            Ok(true) => Ok(HugepagesMode::On),
            Ok(false) => Ok(HugepagesMode::Off),
            Err(_) => Err("expected on, off or auto".into()),
        }
    }

    /// The name the API and `--print-config` use.
    pub fn name(self) -> &'static str {
        match self {
            HugepagesMode::Off => "off",
            HugepagesMode::On => "on",
            HugepagesMode::Auto => "auto",
        }
    }
}

impl<'de> Deserialize<'de> for HugepagesMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(HugepagesMode::On),
            Raw::Bool(false) => Ok(HugepagesMode::Off),
            Raw::Text(t) => HugepagesMode::parse(&t)
                .map_err(|why| serde::de::Error::custom(format!("{t:?}: {why}"))),
        }
    }
}

/// vCPUs and what the guest sees of the CPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpusConfig {
    /// vCPUs started at boot.
    pub boot: u16,
    /// Sockets (packages); 1 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sockets: Option<u16>,
    /// Cores per socket; derived from the others when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cores: Option<u16>,
    /// Threads per core; 1 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<u16>,
    /// CPUID features hidden from the guest (libvirt's `policy='disable'`).
    #[serde(default)]
    pub mask: Vec<String>,
}

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig {
            boot: 1,
            sockets: None,
            cores: None,
            threads: None,
            mask: Vec::new(),
        }
    }
}

impl CpusConfig {
    /// The topology in force: sockets and threads default to 1, cores to
    /// whatever makes `sockets x cores x threads` equal `boot`.
    pub fn topology(&self) -> Result<CpuTopology, ConfigError> {
        let sockets = self.sockets.unwrap_or(1);
        let threads = self.threads.unwrap_or(1);
        let cores = match self.cores {
            Some(c) => c,
            None => {
                let per = sockets.saturating_mul(threads).max(1);
                if !self.boot.is_multiple_of(per) {
                    return Err(ConfigError::invalid(
                        "cpus.cores",
                        "(derived)",
                        format!(
                            "boot={} is not divisible by sockets x threads = {per}",
                            self.boot
                        ),
                    ));
                }
                self.boot / per
            }
        };
        Ok(CpuTopology {
            sockets,
            cores,
            threads,
        })
    }
}

/// Where the guest's serial console goes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase", deny_unknown_fields)]
pub enum SerialConfig {
    /// Keel's standard output.
    #[default]
    Stdout,
    /// Nowhere.
    Off,
    /// A log file, truncated at each launch and rotated when it reaches
    /// `max_size` (like virtlogd's `max_size`/`max_backups`).
    File {
        /// The log file.
        path: PathBuf,
        /// Size at which the log is rotated: `PATH` becomes `PATH.1`,
        /// `PATH.1` becomes `PATH.2`, and so on, and a new `PATH` is begun.
        #[serde(default = "default_serial_max_size")]
        max_size: ByteSize,
        /// Rotated logs kept (`PATH.1` .. `PATH.N`); 0 truncates `PATH`
        /// instead.
        #[serde(default = "default_serial_max_backups")]
        max_backups: u32,
    },
}

/// Default `serial.max_size`: virtlogd's 2 MiB.
pub const DEFAULT_SERIAL_MAX_SIZE: u64 = 2 << 20;
/// Default `serial.max_backups`: virtlogd's 3.
pub const DEFAULT_SERIAL_MAX_BACKUPS: u32 = 3;
/// Most `serial.max_backups` accepted.
pub const MAX_SERIAL_BACKUPS: u32 = 100;
/// Least `serial.max_size` accepted (smaller would rotate on every line).
pub const MIN_SERIAL_MAX_SIZE: u64 = 4 << 10;

fn default_serial_max_size() -> ByteSize {
    ByteSize::from_bytes(DEFAULT_SERIAL_MAX_SIZE)
}

fn default_serial_max_backups() -> u32 {
    DEFAULT_SERIAL_MAX_BACKUPS
}

/// I/O engine of a disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskEngine {
    /// io_uring, batching a queue's requests per submission (falls back to
    /// sync when the kernel refuses io_uring).
    #[default]
    IoUring,
    /// Synchronous preadv/pwritev on the device thread.
    Sync,
}

/// A virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Block device (LVM volume, loop device) or regular file.
    pub path: PathBuf,
    /// Guest may not write (VIRTIO_BLK_F_RO; the file is opened read-only).
    #[serde(default)]
    pub readonly: bool,
    /// Open with O_DIRECT (HostOS's `cache=none`).
    #[serde(default)]
    pub direct: bool,
    /// Serial returned by GET_ID (at most 20 ASCII characters).
    #[serde(default)]
    pub serial: Option<String>,
    /// I/O engine.
    #[serde(default)]
    pub engine: DiskEngine,
    /// A range whose writes go to a temporary overlay, discarded at exit
    /// (`"partition:N"`: partition N of the disk's GPT). Reads see the
    /// overlay; the disk itself is never written there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cow: Option<CowTarget>,
    /// Most bytes the overlay holds (default 512M, HostOS's temporary
    /// device); writes beyond it fail with IOERR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cow_limit: Option<ByteSize>,
    /// Another VMM may use the disk at the same time (a shared advisory lock
    /// instead of an exclusive one): HostOS's GuestOS VM and upgrade VM share
    /// the GuestOS disk, each writing its own partitions. Both must say so.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
    /// Request queues (VIRTIO_BLK_F_MQ above 1), 1 to [`MAX_DISK_QUEUES`];
    /// `min(cpus.boot, 16)` when absent (see [`DiskConfig::queues`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u16>,
}

/// Most request queues a disk may have.
pub const MAX_DISK_QUEUES: u16 = devices::virtio::block::MAX_QUEUES;

impl DiskConfig {
    /// The request queues this disk offers on a VM booting `boot_vcpus`
    /// vCPUs: `num_queues`, else one per vCPU up to [`MAX_DISK_QUEUES`].
    pub fn queues(&self, boot_vcpus: u16) -> u16 {
        self.num_queues
            .unwrap_or_else(|| boot_vcpus.clamp(1, MAX_DISK_QUEUES))
    }
}

/// Overlay size when `cow_limit` is absent (HostOS's 512 MiB device).
pub const DEFAULT_COW_LIMIT: u64 = 512 << 20;

/// What `[[disks]] cow` covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CowTarget {
    /// Partition N (1-based) of the disk's GPT.
    Partition(u32),
}

impl CowTarget {
    /// Parses `partition:N`.
    pub fn parse(input: &str) -> Result<Self, String> {
        input
            .strip_prefix("partition:")
            .and_then(|n| n.parse::<u32>().ok())
            .filter(|n| *n >= 1)
            .map(CowTarget::Partition)
            .ok_or_else(|| "expected partition:N (N from 1, as in the GPT)".to_string())
    }
}

impl std::fmt::Display for CowTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CowTarget::Partition(n) => write!(f, "partition:{n}"),
        }
    }
}

impl Serialize for CowTarget {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for CowTarget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        CowTarget::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The virtio-vsock device (host side on Unix sockets).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's CID (HostOS: 3).
    pub cid: u64,
    /// Base path: guest connects to port P reach `<socket>_P`; host
    /// processes connect to `<socket>` itself.
    pub socket: PathBuf,
    /// Accept host-initiated connections (`CONNECT <port>`). Off by
    /// default: on HostOS the guest always starts the conversation.
    #[serde(default)]
    pub allow_host_connect: bool,
}

/// A virtio-net NIC on a tap device (HostOS: `vnet1` on bridge `br6`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Tap interface: opened if it exists (left in place at exit), else
    /// created (deleted at exit).
    pub tap: String,
    /// Bridge to attach the tap to (must exist); detached at exit if Keel
    /// attached it.
    #[serde(default)]
    pub bridge: Option<String>,
    /// The guest's MAC address; a random locally administered one when
    /// absent.
    #[serde(default)]
    pub mac: Option<String>,
    /// MTU set on the tap and announced to the guest (VIRTIO_NET_F_MTU);
    /// the tap's current MTU when absent.
    #[serde(default)]
    pub mtu: Option<u16>,
    /// Queue pairs (a multi-queue tap when above 1).
    #[serde(default = "default_net_queues")]
    pub queues: u16,
}

fn default_net_queues() -> u16 {
    1
}

/// The control socket and life-cycle policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Unix socket of the control API (mode 0660). Without it (and without
    /// a socket passed by systemd) there is no API.
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// Group (name or number) whose members may change the VM's state and
    /// type into the console; root always may.
    #[serde(default)]
    pub admin_group: Option<String>,
    /// Group whose members may query the VM and watch the console.
    #[serde(default)]
    pub readonly_group: Option<String>,
    /// Seconds a graceful shutdown (SIGTERM or API) waits for the guest
    /// before stopping it by force.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout_s: u64,
    /// How a graceful shutdown asks the guest to go down.
    #[serde(default)]
    pub shutdown_method: ShutdownMethod,
}

/// How a graceful shutdown (SIGTERM, `keelctl shutdown`) asks the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShutdownMethod {
    /// Press the ACPI power button (a GED event notifying `PNP0C0C`), as
    /// libvirt does; systemd, acpid or the kernel's button driver act on
    /// it. Without ACPI tables (`machine.acpi = false`) Ctrl-Alt-Del is
    /// used instead.
    #[default]
    Acpi,
    /// Type Ctrl-Alt-Del through the i8042.
    CtrlAltDel,
}

impl ShutdownMethod {
    /// Parses the value as the file spells it (`acpi`, `ctrl-alt-del`).
    pub fn parse(field: &str, value: &str) -> Result<Self, ConfigError> {
        match value {
            "acpi" => Ok(ShutdownMethod::Acpi),
            "ctrl-alt-del" => Ok(ShutdownMethod::CtrlAltDel),
            _ => Err(ConfigError::invalid(
                field,
                value,
                "expected acpi or ctrl-alt-del".into(),
            )),
        }
    }
}

fn default_shutdown_timeout() -> u64 {
    120
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            api_socket: None,
            admin_group: None,
            readonly_group: None,
            shutdown_timeout_s: default_shutdown_timeout(),
            shutdown_method: ShutdownMethod::default(),
        }
    }
}

/// The device thread.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesConfig {
    /// After device work, keep polling for more for up to this many
    /// microseconds before sleeping (0: sleep at once). Lower latency
    /// under load for host CPU; for hosts with a core to spare.
    #[serde(default)]
    pub poll_us: u32,
}

/// Longest device-thread polling window accepted (µs).
pub const MAX_POLL_US: u32 = 1000;

/// A whole VM.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Boot payload.
    #[serde(default)]
    pub payload: PayloadConfig,
    /// Guest memory.
    #[serde(default)]
    pub memory: MemoryConfig,
    /// vCPUs.
    #[serde(default)]
    pub cpus: CpusConfig,
    /// Serial console.
    #[serde(default)]
    pub serial: SerialConfig,
    /// Disks, in the order the guest sees them.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// NICs, in the order the guest sees them.
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// Control socket and shutdown policy.
    #[serde(default)]
    pub control: ControlConfig,
    /// vsock device.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// The device thread.
    #[serde(default)]
    pub devices: DevicesConfig,
    /// The machine the guest sees.
    #[serde(default)]
    pub machine: MachineConfig,
    /// The boot monitor (`GUESTOS BOOT SUCCESS`/`FAILURE` on the console).
    #[serde(default)]
    pub boot_monitor: BootMonitorConfig,
    /// A FAT disk labelled `CONFIG` built from a directory (HostOS's
    /// config media), attached read-only after the disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_disk: Option<ConfigDiskConfig>,
    /// Seccomp and the privilege drop.
    #[serde(default)]
    pub security: SecurityConfig,
}

/// Confinement after set-up (see the README's "Security").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityConfig {
    /// Per-thread seccomp filters (on by default; off only for debugging,
    /// with a loud warning).
    #[serde(default = "default_true")]
    pub seccomp: bool,
    /// `USER[:GROUP]` (names or numbers) to switch to once everything is open. Without
    /// it Keel keeps its user but still drops every capability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        SecurityConfig {
            seccomp: true,
            user: None,
        }
    }
}

impl SecurityConfig {
    /// The user to switch to, parsed.
    pub fn run_as(&self) -> Result<Option<crate::privileges::RunAs>, ConfigError> {
        self.user
            .as_deref()
            .map(|u| {
                crate::privileges::RunAs::parse(u)
                    .map_err(|why| ConfigError::invalid("security.user", u, why))
            })
            .transpose()
    }
}

/// The config disk: a read-only FAT image labelled `CONFIG`, built at start
/// from the files of a directory (such as `ic-bootstrap.tar`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigDiskConfig {
    /// The directory whose files (and subdirectories) go on the disk.
    pub dir: PathBuf,
}

/// The boot monitor: watches the serial output for HostOS's boot markers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootMonitorConfig {
    /// Watch at all (on by default; `guest_boot` is `off` without it).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Seconds after the vCPUs start without a marker before the boot is
    /// reported as timed out (HostOS: 300).
    #[serde(default = "default_boot_timeout")]
    pub timeout_s: u64,
    /// Where a line with the outcome is written as well (HostOS:
    /// `/dev/tty1` and `/dev/ttyS0`); none by default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consoles: Vec<PathBuf>,
}

fn default_boot_timeout() -> u64 {
    300
}

/// Longest boot-monitor timeout accepted (a day).
pub const MAX_BOOT_TIMEOUT_S: u64 = 86_400;

impl Default for BootMonitorConfig {
    fn default() -> Self {
        BootMonitorConfig {
            enabled: true,
            timeout_s: default_boot_timeout(),
            consoles: Vec::new(),
        }
    }
}

/// The machine the guest sees.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// ACPI tables (RSDP, XSDT, hardware-reduced FADT, DSDT, MADT): how a
    /// distro kernel finds the vCPUs, COM1, the i8042 and power-off. The MP
    /// table is there either way (for `acpi=off` guests).
    #[serde(default = "default_true")]
    pub acpi: bool,
    /// Where the virtio devices sit: `pci` (the default: what a distro
    /// kernel finds, as on QEMU's q35) or `mmio`.
    #[serde(default)]
    pub transport: Transport,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            acpi: true,
            transport: Transport::default(),
        }
    }
}

/// The transport of the virtio devices (`[machine] transport`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// virtio-mmio windows announced on the command line and in the DSDT.
    Mmio,
    /// A PCI host bridge (ECAM and ports 0xCF8/0xCFC, MCFG, `\_SB.PCI0`)
    /// with each virtio device a virtio-pci function; no virtio-mmio
    /// devices. The default.
    #[default]
    Pci,
}

impl Transport {
    /// Parses the value as the file spells it (`mmio`, `pci`).
    pub fn parse(field: &str, value: &str) -> Result<Self, ConfigError> {
        match value {
            "mmio" => Ok(Transport::Mmio),
            "pci" => Ok(Transport::Pci),
            _ => Err(ConfigError::invalid(
                field,
                value,
                "expected mmio or pci".into(),
            )),
        }
    }
}

fn default_true() -> bool {
    true
}

/// Command-line flag values, as given (each overrides the file).
#[derive(Clone, Debug, Default)]
pub struct FlagOverrides {
    /// `--kernel PATH`
    pub kernel: Option<PathBuf>,
    /// `--initrd PATH`
    pub initrd: Option<PathBuf>,
    /// `--cmdline STRING`
    pub cmdline: Option<String>,
    /// `--boot-slot guestos|upgrade`
    pub boot_slot: Option<String>,
    /// `--memory size=..[,hugepages=on|off|auto][,overcommit=on][,numa=on]`
    pub memory: Option<String>,
    /// `--cpus boot=N[,sockets=S,cores=C,threads=T][,mask=a:b]`
    pub cpus: Option<String>,
    /// `--serial stdout|off|file=PATH`
    pub serial: Option<String>,
    /// `--disk path=P[,readonly=on][,direct=on][,serial=ID][,engine=..]`,
    /// repeated; when any is given they replace the file's disks.
    pub disks: Vec<String>,
    /// `--api-socket PATH`
    pub api_socket: Option<PathBuf>,
    /// `--shutdown-timeout SECONDS`
    pub shutdown_timeout_s: Option<u64>,
    /// `--shutdown-method acpi|ctrl-alt-del`
    pub shutdown_method: Option<String>,
    /// `--device-poll-us MICROSECONDS`
    pub device_poll_us: Option<u32>,
    /// `--vsock cid=N,socket=PATH[,allow_host_connect=on]`
    pub vsock: Option<String>,
    /// `--machine acpi=on|off[,transport=mmio|pci]`
    pub machine: Option<String>,
    /// `--transport mmio|pci`
    pub transport: Option<String>,
    /// `--boot-monitor on|off|timeout_s=N[,consoles=PATH:PATH]`
    pub boot_monitor: Option<String>,
    /// `--config-disk dir=PATH`
    pub config_disk: Option<String>,
    /// `--net tap=NAME[,bridge=BR][,mac=MAC][,mtu=N][,queues=N]` (MAC may be
    /// `hostos:<node>:<deployment>:<management MAC>`, a HostOS-derived one),
    /// repeated; when any is given they replace the file's NICs.
    pub nets: Vec<String>,
    /// `--seccomp on|off`
    pub seccomp: Option<String>,
    /// `--user USER[:GROUP]`
    pub user: Option<String>,
}

/// Most disks a VM can have (virtio-mmio slots with a free interrupt line).
pub const MAX_DISKS: usize = 16;
/// Most NICs a VM can have.
pub const MAX_NETS: usize = 8;
// On a PCI machine every virtio device takes a slot of bus 0 (31 besides
// the host bridge): disks (the config disk among them), NICs and vsock fit.
const _: () = assert!(MAX_DISKS + MAX_NETS + 1 < devices::pci::root::SLOTS as usize);
/// Most virtio-mmio devices (interrupt lines 5 to 23).
pub const MAX_VIRTIO_DEVICES: usize = 19;
/// Smallest MTU a NIC accepts (IPv4's minimum).
pub const MIN_MTU: u16 = 68;
/// Largest MTU of a tap (64 KiB less the Ethernet header).
pub const MAX_MTU: u16 = 65521;
/// Smallest guest memory Keel accepts.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Longest kernel command line accepted.
pub const MAX_CMDLINE: usize = layout::CMDLINE_MAX_SIZE - 1;

impl VmConfig {
    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::ParseFile {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    /// Applies command-line flags over this config.
    pub fn apply_flags(&mut self, flags: &FlagOverrides) -> Result<(), ConfigError> {
        if let Some(k) = &flags.kernel {
            self.payload.kernel = Some(k.clone());
        }
        if let Some(i) = &flags.initrd {
            self.payload.initrd = Some(i.clone());
        }
        if let Some(c) = &flags.cmdline {
            self.payload.cmdline = Some(c.clone());
        }
        if let Some(b) = &flags.boot_slot {
            self.payload.boot_slot = Some(BootSlot::parse("payload.boot_slot", b)?);
        }
        if let Some(m) = &flags.memory {
            self.memory = parse_memory_flag(m)?;
        }
        if let Some(c) = &flags.cpus {
            self.cpus = parse_cpus_flag(c)?;
        }
        if let Some(s) = &flags.serial {
            self.serial = parse_serial_flag(s)?;
        }
        if let Some(p) = &flags.api_socket {
            self.control.api_socket = Some(p.clone());
        }
        if let Some(v) = &flags.vsock {
            self.vsock = Some(parse_vsock_flag(v)?);
        }
        if let Some(t) = flags.shutdown_timeout_s {
            self.control.shutdown_timeout_s = t;
        }
        if let Some(m) = &flags.shutdown_method {
            self.control.shutdown_method = ShutdownMethod::parse("control.shutdown_method", m)?;
        }
        if let Some(m) = &flags.machine {
            self.machine = parse_machine_flag(m)?;
        }
        if let Some(t) = &flags.transport {
            self.machine.transport = Transport::parse("machine.transport", t)?;
        }
        if let Some(b) = &flags.boot_monitor {
            self.boot_monitor = parse_boot_monitor_flag(b)?;
        }
        if let Some(c) = &flags.config_disk {
            self.config_disk = Some(parse_config_disk_flag(c)?);
        }
        if let Some(p) = flags.device_poll_us {
            self.devices.poll_us = p;
        }
        if !flags.disks.is_empty() {
            self.disks = flags
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| parse_disk_flag(i, d))
                .collect::<Result<_, _>>()?;
        }
        if let Some(v) = &flags.seccomp {
            self.security.seccomp =
                parse_switch(v).map_err(|why| ConfigError::invalid("security.seccomp", v, why))?;
        }
        if let Some(u) = &flags.user {
            self.security.user = Some(u.clone());
        }
        if !flags.nets.is_empty() {
            self.nets = flags
                .nets
                .iter()
                .enumerate()
                .map(|(i, n)| parse_net_flag(i, n))
                .collect::<Result<_, _>>()?;
        }
        Ok(())
    }

    /// Checks everything that can be checked before creating the VM.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.security.run_as()?;
        self.validate_boot_source()?;
        if let Some(kernel) = &self.payload.kernel {
            check_readable_file("payload.kernel", kernel)?;
        }
        if let Some(initrd) = &self.payload.initrd {
            check_readable_file("payload.initrd", initrd)?;
        }
        if let Some(c) = &self.payload.cmdline {
            if c.len() > MAX_CMDLINE {
                return Err(ConfigError::invalid(
                    "payload.cmdline",
                    &format!("{}...", &c[..c.floor_char_boundary(32)]),
                    format!("longer than {MAX_CMDLINE} bytes"),
                ));
            }
            if !c.is_ascii() || c.contains('\0') {
                return Err(ConfigError::invalid(
                    "payload.cmdline",
                    c,
                    "must be printable ASCII".into(),
                ));
            }
        }
        self.validate_memory()?;
        self.validate_cpus()?;
        self.validate_numa()?;
        self.validate_disks()?;
        self.validate_nets()?;
        self.validate_control()?;
        self.validate_machine()?;
        self.validate_boot_monitor()?;
        if self.devices.poll_us > MAX_POLL_US {
            return Err(ConfigError::invalid(
                "devices.poll_us",
                &self.devices.poll_us.to_string(),
                format!("at most {MAX_POLL_US} µs"),
            ));
        }
        if let Some(v) = &self.vsock {
            if v.cid < 3 || v.cid > u64::from(u32::MAX) {
                return Err(ConfigError::invalid(
                    "vsock.cid",
                    &v.cid.to_string(),
                    "CIDs 0-2 are reserved; use 3 or above (HostOS uses 3)".into(),
                ));
            }
            let parent = v
                .socket
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if !parent.is_dir() {
                return Err(ConfigError::invalid(
                    "vsock.socket",
                    &v.socket.display().to_string(),
                    format!("directory {} does not exist", parent.display()),
                ));
            }
        }
        if let SerialConfig::File {
            path,
            max_size,
            max_backups,
        } = &self.serial
        {
            if max_size.bytes() < MIN_SERIAL_MAX_SIZE {
                return Err(ConfigError::invalid(
                    "serial.max_size",
                    &max_size.to_string(),
                    format!("at least {MIN_SERIAL_MAX_SIZE} bytes"),
                ));
            }
            if *max_backups > MAX_SERIAL_BACKUPS {
                return Err(ConfigError::invalid(
                    "serial.max_backups",
                    &max_backups.to_string(),
                    format!("at most {MAX_SERIAL_BACKUPS}"),
                ));
            }
            let parent = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if !parent.is_dir() {
                return Err(ConfigError::invalid(
                    "serial.path",
                    &path.display().to_string(),
                    format!("directory {} does not exist", parent.display()),
                ));
            }
        }
        Ok(())
    }

    /// Either a kernel, or `boot_slot` (then no kernel, initrd or command
    /// line, and `boot_disk` names a disk).
    fn validate_boot_source(&self) -> Result<(), ConfigError> {
        let p = &self.payload;
        let Some(role) = p.boot_slot else {
            if let Some(d) = p.boot_disk {
                return Err(ConfigError::invalid(
                    "payload.boot_disk",
                    &d.to_string(),
                    "only used with payload.boot_slot (--boot-slot)".into(),
                ));
            }
            p.kernel.as_ref().ok_or(ConfigError::Missing(
                "kernel (--kernel or payload.kernel; or --boot-slot to boot from the disk)",
            ))?;
            return Ok(());
        };
        let shown = format!("{role:?}").to_lowercase();
        for (set, field) in [
            (p.kernel.is_some(), "kernel"),
            (p.initrd.is_some(), "initrd"),
            (p.cmdline.is_some(), "cmdline"),
        ] {
            if set {
                return Err(ConfigError::invalid(
                    "payload.boot_slot",
                    &shown,
                    format!(
                        "takes the kernel, initrd and command line from the disk: \
                         remove payload.{field} (--{field})"
                    ),
                ));
            }
        }
        let index = p.boot_disk.unwrap_or(0);
        if index >= self.disks.len() {
            return Err(ConfigError::invalid(
                "payload.boot_disk",
                &index.to_string(),
                format!(
                    "there are {} disks; boot_slot reads disks[{index}]",
                    self.disks.len()
                ),
            ));
        }
        Ok(())
    }

    fn validate_memory(&self) -> Result<(), ConfigError> {
        let size = self.memory.size.bytes();
        let shown = self.memory.size.to_string();
        if size < MIN_MEMORY {
            return Err(ConfigError::invalid(
                "memory.size",
                &shown,
                format!("at least {} MiB is needed", MIN_MEMORY >> 20),
            ));
        }
        if size > layout::MAX_MEMORY {
            return Err(ConfigError::invalid(
                "memory.size",
                &shown,
                format!("at most {} GiB is supported", layout::MAX_MEMORY >> 30),
            ));
        }
        let hugepages = self.memory.hugepages;
        let align: u64 = if hugepages == HugepagesMode::Off {
            4 << 10
        } else {
            2 << 20
        };
        let host = HostMemory::read();
        match host.check(size, self.memory.overcommit) {
            Err(why) => return Err(ConfigError::invalid("memory.size", &shown, why)),
            Ok(Some(warning)) => log::warn!("memory.size {shown}: {warning}"),
            Ok(None) => {}
        }
        if !size.is_multiple_of(align) {
            return Err(ConfigError::invalid(
                "memory.size",
                &shown,
                format!(
                    "must be a multiple of {} KiB{}",
                    align >> 10,
                    if hugepages == HugepagesMode::Off {
                        String::new()
                    } else {
                        format!(" with hugepages={}", hugepages.name())
                    }
                ),
            ));
        }
        Ok(())
    }

    fn validate_boot_monitor(&self) -> Result<(), ConfigError> {
        let b = &self.boot_monitor;
        if b.timeout_s == 0 || b.timeout_s > MAX_BOOT_TIMEOUT_S {
            return Err(ConfigError::invalid(
                "boot_monitor.timeout_s",
                &b.timeout_s.to_string(),
                format!("between 1 and {MAX_BOOT_TIMEOUT_S} seconds"),
            ));
        }
        for (i, c) in b.consoles.iter().enumerate() {
            if !c.is_absolute() {
                return Err(ConfigError::invalid(
                    &format!("boot_monitor.consoles[{i}]"),
                    &c.display().to_string(),
                    "must be an absolute path (such as /dev/tty1)".into(),
                ));
            }
        }
        Ok(())
    }

    fn validate_control(&self) -> Result<(), ConfigError> {
        let c = &self.control;
        if let Some(p) = &c.api_socket {
            let parent = p
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if !parent.is_dir() {
                return Err(ConfigError::invalid(
                    "control.api_socket",
                    &p.display().to_string(),
                    format!("directory {} does not exist", parent.display()),
                ));
            }
        }
        for (field, g) in [
            ("control.admin_group", &c.admin_group),
            ("control.readonly_group", &c.readonly_group),
        ] {
            if let Some(g) = g {
                resolve_group(g).map_err(|why| ConfigError::invalid(field, g, why))?;
            }
        }
        if c.shutdown_timeout_s == 0 || c.shutdown_timeout_s > 3600 {
            return Err(ConfigError::invalid(
                "control.shutdown_timeout_s",
                &c.shutdown_timeout_s.to_string(),
                "between 1 and 3600 seconds".into(),
            ));
        }
        Ok(())
    }

    /// `memory.numa`: needs the ACPI tables, two sockets or more, and RAM
    /// that splits into equal parts of whole 2 MiB pages.
    fn validate_numa(&self) -> Result<(), ConfigError> {
        if !self.memory.numa {
            return Ok(());
        }
        if !self.machine.acpi {
            return Err(ConfigError::invalid(
                "memory.numa",
                "true",
                "needs machine.acpi = true (NUMA nodes are described in the ACPI SRAT and SLIT; \
                 the MP table cannot)"
                    .into(),
            ));
        }
        let topology = self.cpus.topology()?;
        NumaLayout::new(&topology, self.memory.size.bytes())
            .map_err(|e| ConfigError::invalid("memory.numa", "true", e.to_string()))?;
        Ok(())
    }

    /// What the PCI machine needs: ACPI (without it the guest would not
    /// learn the host bridge's windows or INTx routing).
    fn validate_machine(&self) -> Result<(), ConfigError> {
        if self.machine.transport != Transport::Pci {
            return Ok(());
        }
        if !self.machine.acpi {
            return Err(ConfigError::invalid(
                "machine.transport",
                "pci",
                "needs machine.acpi = true (the guest finds the PCI host bridge's windows and \
                 interrupt routing in ACPI); pci is the default transport: choose \
                 machine.transport = \"mmio\" for a machine without ACPI"
                    .into(),
            ));
        }
        Ok(())
    }

    fn validate_nets(&self) -> Result<(), ConfigError> {
        use devices::virtio::net::{resolve_mac, tap::valid_ifname, MAX_QUEUE_PAIRS};
        if self.nets.len() > MAX_NETS {
            return Err(ConfigError::invalid(
                "nets",
                &self.nets.len().to_string(),
                format!("at most {MAX_NETS} NICs"),
            ));
        }
        let devices = self.disks.len()
            + usize::from(self.config_disk.is_some())
            + self.nets.len()
            + usize::from(self.vsock.is_some());
        if devices > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::invalid(
                "nets",
                &devices.to_string(),
                format!(
                    "at most {MAX_VIRTIO_DEVICES} virtio devices (disks, the config disk, NICs and vsock together)"
                ),
            ));
        }
        for (i, n) in self.nets.iter().enumerate() {
            valid_ifname(&n.tap)
                .map_err(|why| ConfigError::invalid(&format!("nets[{i}].tap"), &n.tap, why))?;
            if self.nets[..i].iter().any(|o| o.tap == n.tap) {
                return Err(ConfigError::invalid(
                    &format!("nets[{i}].tap"),
                    &n.tap,
                    "given twice".into(),
                ));
            }
            if let Some(br) = &n.bridge {
                valid_ifname(br)
                    .map_err(|why| ConfigError::invalid(&format!("nets[{i}].bridge"), br, why))?;
                if *br == n.tap {
                    return Err(ConfigError::invalid(
                        &format!("nets[{i}].bridge"),
                        br,
                        "the tap cannot be its own bridge".into(),
                    ));
                }
            }
            if let Some(mac) = &n.mac {
                let field = format!("nets[{i}].mac");
                let parsed =
                    resolve_mac(mac).map_err(|why| ConfigError::invalid(&field, mac, why))?;
                let dup = self.nets[..i]
                    .iter()
                    .filter_map(|o| o.mac.as_deref())
                    .any(|m| resolve_mac(m).is_ok_and(|m| m == parsed));
                if dup {
                    return Err(ConfigError::invalid(&field, mac, "given twice".into()));
                }
            }
            if let Some(mtu) = n.mtu {
                if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
                    return Err(ConfigError::invalid(
                        &format!("nets[{i}].mtu"),
                        &mtu.to_string(),
                        format!("between {MIN_MTU} and {MAX_MTU}"),
                    ));
                }
            }
            if n.queues == 0 || usize::from(n.queues) > MAX_QUEUE_PAIRS {
                return Err(ConfigError::invalid(
                    &format!("nets[{i}].queues"),
                    &n.queues.to_string(),
                    format!("between 1 and {MAX_QUEUE_PAIRS} queue pairs"),
                ));
            }
        }
        Ok(())
    }

    fn validate_disks(&self) -> Result<(), ConfigError> {
        let disks = self.disks.len() + usize::from(self.config_disk.is_some());
        if disks > MAX_DISKS {
            return Err(ConfigError::invalid(
                "disks",
                &disks.to_string(),
                format!("at most {MAX_DISKS} disks (the config disk counts)"),
            ));
        }
        if let Some(c) = &self.config_disk {
            if !c.dir.is_dir() {
                return Err(ConfigError::invalid(
                    "config_disk.dir",
                    &c.dir.display().to_string(),
                    "not a directory".into(),
                ));
            }
        }
        for (i, d) in self.disks.iter().enumerate() {
            if let Some(n) = d.num_queues {
                if n == 0 || n > MAX_DISK_QUEUES {
                    return Err(ConfigError::invalid(
                        &format!("disks[{i}].num_queues"),
                        &n.to_string(),
                        format!("between 1 and {MAX_DISK_QUEUES}"),
                    ));
                }
            }
            let field = format!("disks[{i}].path");
            let shown = d.path.display().to_string();
            let meta = std::fs::metadata(&d.path)
                .map_err(|e| ConfigError::invalid(&field, &shown, e.to_string()))?;
            use std::os::unix::fs::FileTypeExt;
            if !meta.is_file() && !meta.file_type().is_block_device() {
                return Err(ConfigError::invalid(
                    &field,
                    &shown,
                    "not a block device or regular file".into(),
                ));
            }
            if let Some(s) = &d.serial {
                if s.len() > 20 || !s.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(ConfigError::invalid(
                        &format!("disks[{i}].serial"),
                        s,
                        "at most 20 printable ASCII characters, no spaces".into(),
                    ));
                }
            }
            if self.disks[..i].iter().any(|o| o.path == d.path) {
                return Err(ConfigError::invalid(&field, &shown, "given twice".into()));
            }
            if let Some(limit) = &d.cow_limit {
                if d.cow.is_none() {
                    return Err(ConfigError::invalid(
                        &format!("disks[{i}].cow_limit"),
                        &limit.to_string(),
                        "only used with cow".into(),
                    ));
                }
                if limit.bytes() == 0 || limit.bytes() % 512 != 0 {
                    return Err(ConfigError::invalid(
                        &format!("disks[{i}].cow_limit"),
                        &limit.to_string(),
                        "a positive multiple of 512 bytes".into(),
                    ));
                }
            }
            if let (Some(cow), true) = (&d.cow, d.readonly) {
                return Err(ConfigError::invalid(
                    &format!("disks[{i}].cow"),
                    &cow.to_string(),
                    "a read-only disk takes no writes to redirect".into(),
                ));
            }
            if !d.readonly {
                if let Some(why) = write_refusal(&d.path, meta.file_type().is_block_device()) {
                    return Err(ConfigError::invalid(
                        &format!("disks[{i}].readonly"),
                        "off",
                        format!("{shown} {why}; use readonly=on (readonly = true in the file)"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_cpus(&self) -> Result<(), ConfigError> {
        let boot = self.cpus.boot;
        if boot == 0 {
            return Err(ConfigError::invalid(
                "cpus.boot",
                "0",
                "at least one vCPU".into(),
            ));
        }
        let t = self.cpus.topology()?;
        if t.sockets == 0 || t.cores == 0 || t.threads == 0 {
            return Err(ConfigError::invalid(
                "cpus.topology",
                &format!("{}x{}x{}", t.sockets, t.cores, t.threads),
                "sockets, cores and threads must all be at least 1".into(),
            ));
        }
        if t.vcpus() != u32::from(boot) {
            return Err(ConfigError::invalid(
                "cpus.topology",
                &format!(
                    "sockets={},cores={},threads={}",
                    t.sockets, t.cores, t.threads
                ),
                format!(
                    "describes {} vCPUs but boot={boot}: sockets x cores x threads must equal boot",
                    t.vcpus()
                ),
            ));
        }
        let max_id = t.apic_id(t.vcpus() - 1);
        if max_id > layout::MAX_APIC_ID {
            return Err(ConfigError::invalid(
                "cpus.topology",
                &format!(
                    "sockets={},cores={},threads={}",
                    t.sockets, t.cores, t.threads
                ),
                format!(
                    "highest APIC ID would be {max_id}; the MP table describes at most {}",
                    layout::MAX_APIC_ID
                ),
            ));
        }
        for name in &self.cpus.mask {
            cpuid::parse_feature(name)
                .map_err(|e| ConfigError::invalid("cpus.mask", name, e.to_string()))?;
        }
        Ok(())
    }
}

/// Why the kernel would refuse writes to a disk, if it would: a block device
/// it reports read-only (`BLKROGET`, e.g. `losetup -r`), a file on a
/// read-only filesystem, an immutable or append-only file.
fn write_refusal(path: &Path, block_device: bool) -> Option<String> {
    use std::os::fd::AsRawFd;
    if block_device {
        if let Ok(f) = std::fs::File::open(path) {
            let mut ro: libc::c_int = 0;
            // SAFETY: BLKROGET writes one int through the pointer, which points at
            // `ro`, alive for the call; the fd is open for the call's duration.
            let rc = unsafe { libc::ioctl(f.as_raw_fd(), BLKROGET, &mut ro) };
            if rc == 0 && ro != 0 {
                return Some("is a block device the kernel reports read-only (BLKROGET)".into());
            }
        }
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(_) => None,
        Err(e) => match e.raw_os_error() {
            Some(libc::EROFS) => Some("is on a read-only filesystem (EROFS)".into()),
            Some(libc::EPERM) => {
                Some("cannot be written: the file is immutable or append-only (EPERM)".into())
            }
            Some(libc::EACCES) => Some("cannot be opened for writing (permission denied)".into()),
            _ => None,
        },
    }
}

/// `BLKROGET`: `_IO(0x12, 94)`, whether a block device is read-only.
const BLKROGET: libc::c_ulong = 0x125e;

/// The host's memory, from `/proc/meminfo`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostMemory {
    /// `MemTotal`, in bytes: the host's physical memory.
    pub total: Option<u64>,
    /// `MemAvailable`, in bytes: what can be had now without swapping.
    pub available: Option<u64>,
}

impl HostMemory {
    /// Reads `/proc/meminfo` (both fields `None` when it cannot be read).
    pub fn read() -> Self {
        std::fs::read_to_string("/proc/meminfo")
            .map(|t| Self::parse(&t))
            .unwrap_or_default()
    }

    /// Parses the text of `/proc/meminfo`.
    pub fn parse(text: &str) -> Self {
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
                .and_then(|kib| kib.checked_mul(1024))
        };
        HostMemory {
            total: field("MemTotal"),
            available: field("MemAvailable"),
        }
    }

    /// Checks a guest of `size` bytes against this host: an error above the
    /// physical memory unless `overcommit`, a warning above what is available
    /// now (or above the physical memory with `overcommit`).
    pub fn check(&self, size: u64, overcommit: bool) -> Result<Option<String>, String> {
        let gib = |b: u64| format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30));
        if let Some(total) = self.total.filter(|&t| size > t) {
            if !overcommit {
                return Err(format!(
                    "more than this host's physical memory ({}, MemTotal); add overcommit=on \
                     (memory.overcommit = true in the file) to start anyway",
                    gib(total)
                ));
            }
            return Ok(Some(format!(
                "more than this host's physical memory ({}); starting because overcommit=on",
                gib(total)
            )));
        }
        if let Some(avail) = self.available.filter(|&a| size > a) {
            return Ok(Some(format!(
                "more than the memory available now ({}, MemAvailable): the host may swap \
                 or kill processes as the guest touches its memory",
                gib(avail)
            )));
        }
        Ok(None)
    }
}

fn check_readable_file(field: &str, path: &Path) -> Result<(), ConfigError> {
    let shown = path.display().to_string();
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => std::fs::File::open(path)
            .map(|_| ())
            .map_err(|e| ConfigError::invalid(field, &shown, e.to_string())),
        Ok(_) => Err(ConfigError::invalid(
            field,
            &shown,
            "not a regular file".into(),
        )),
        Err(e) => Err(ConfigError::invalid(field, &shown, e.to_string())),
    }
}

/// A group given by name or number, as a gid.
pub fn resolve_group(g: &str) -> Result<u32, String> {
    if let Ok(gid) = g.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(g) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => Err("no such group".into()),
        Err(e) => Err(format!("cannot look the group up: {e}")),
    }
}

/// Parses `--memory size=512M[,hugepages=on|off|auto][,overcommit=on][,numa=on]`.
pub fn parse_memory_flag(input: &str) -> Result<MemoryConfig, ConfigError> {
    let o = OptionList::parse(
        "memory",
        input,
        &["size", "hugepages", "overcommit", "numa"],
        None,
    )?;
    Ok(MemoryConfig {
        size: o.size("size")?.ok_or(ConfigError::Missing("memory.size"))?,
        hugepages: o
            .get("hugepages")
            .map(|v| {
                HugepagesMode::parse(v)
                    .map_err(|why| ConfigError::invalid(&o.field("hugepages"), v, why))
            })
            .transpose()?
            .unwrap_or_default(),
        overcommit: o.switch("overcommit")?.unwrap_or(false),
        numa: o.switch("numa")?.unwrap_or(false),
    })
}

/// Parses `--cpus boot=N[,sockets=S,cores=C,threads=T][,mask=feat1:feat2]`.
///
/// Missing topology values are derived: sockets and threads default to 1,
/// cores to whatever makes the product equal `boot`; `boot` defaults to the
/// product when all three are given.
pub fn parse_cpus_flag(input: &str) -> Result<CpusConfig, ConfigError> {
    let o = OptionList::parse(
        "cpus",
        input,
        &["boot", "sockets", "cores", "threads", "mask"],
        None,
    )?;
    let sockets: Option<u16> = o.number("sockets")?;
    let cores: Option<u16> = o.number("cores")?;
    let threads: Option<u16> = o.number("threads")?;
    let boot = match (o.number::<u16>("boot")?, sockets, cores, threads) {
        (Some(b), ..) => b,
        (None, Some(s), Some(c), Some(t)) => s
            .checked_mul(c)
            .and_then(|x| x.checked_mul(t))
            .ok_or_else(|| ConfigError::invalid("cpus", input, "too many vCPUs".into()))?,
        _ => return Err(ConfigError::Missing("cpus.boot")),
    };
    let mask = o
        .get("mask")
        .map(|m| {
            m.split(':')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let cpus = CpusConfig {
        boot,
        sockets,
        cores,
        threads,
        mask,
    };
    cpus.topology()?;
    Ok(cpus)
}

/// Parses `--disk path=P[,readonly=on][,direct=on][,serial=ID][,engine=io_uring|sync][,num_queues=N]`,
/// the `index`th `--disk` (errors name `disks[index].<key>`).
pub fn parse_disk_flag(index: usize, input: &str) -> Result<DiskConfig, ConfigError> {
    let o = OptionList::parse(
        format!("disks[{index}]"),
        input,
        &[
            "path",
            "readonly",
            "direct",
            "serial",
            "engine",
            "cow",
            "cow_limit",
            "shared",
            "num_queues",
        ],
        None,
    )?;
    let engine = match o.get("engine") {
        None | Some("io_uring") => DiskEngine::IoUring,
        Some("sync") => DiskEngine::Sync,
        Some(other) => {
            return Err(ConfigError::invalid(
                &o.field("engine"),
                other,
                "expected io_uring or sync".into(),
            ))
        }
    };
    Ok(DiskConfig {
        path: o
            .get("path")
            .filter(|p| !p.is_empty())
            .ok_or_else(|| ConfigError::MissingKey(o.field("path")))?
            .into(),
        readonly: o.switch("readonly")?.unwrap_or(false),
        direct: o.switch("direct")?.unwrap_or(false),
        serial: o.get("serial").map(str::to_string),
        engine,
        cow: o
            .get("cow")
            .map(|v| {
                CowTarget::parse(v).map_err(|why| ConfigError::invalid(&o.field("cow"), v, why))
            })
            .transpose()?,
        cow_limit: o.size("cow_limit")?,
        shared: o.switch("shared")?.unwrap_or(false),
        num_queues: o.number("num_queues")?,
    })
}

/// Parses `--vsock cid=N,socket=PATH[,allow_host_connect=on]`.
pub fn parse_vsock_flag(input: &str) -> Result<VsockConfig, ConfigError> {
    let o = OptionList::parse(
        "vsock",
        input,
        &["cid", "socket", "allow_host_connect"],
        None,
    )?;
    Ok(VsockConfig {
        cid: o.number("cid")?.ok_or(ConfigError::Missing("vsock.cid"))?,
        socket: o
            .get("socket")
            .ok_or(ConfigError::Missing("vsock.socket"))?
            .into(),
        allow_host_connect: o.switch("allow_host_connect")?.unwrap_or(false),
    })
}

/// Parses `--net tap=NAME[,bridge=BR][,mac=MAC][,mtu=N][,queues=N]`, the
/// `index`th `--net` (errors name `nets[index].<key>`).
pub fn parse_net_flag(index: usize, input: &str) -> Result<NetConfig, ConfigError> {
    let o = OptionList::parse(
        format!("nets[{index}]"),
        input,
        &["tap", "bridge", "mac", "mtu", "queues"],
        None,
    )?;
    Ok(NetConfig {
        tap: o
            .get("tap")
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ConfigError::MissingKey(o.field("tap")))?
            .to_string(),
        bridge: o.get("bridge").map(str::to_string),
        mac: o.get("mac").map(str::to_string),
        mtu: o.number("mtu")?,
        queues: o.number("queues")?.unwrap_or_else(default_net_queues),
    })
}

/// Parses `--machine acpi=on|off[,transport=mmio|pci]`.
pub fn parse_machine_flag(input: &str) -> Result<MachineConfig, ConfigError> {
    let o = OptionList::parse("machine", input, &["acpi", "transport"], None)?;
    let transport = match o.get("transport") {
        Some(t) => Transport::parse("machine.transport", t)?,
        None => Transport::default(),
    };
    Ok(MachineConfig {
        acpi: o.switch("acpi")?.unwrap_or(true),
        transport,
    })
}

/// Parses `--boot-monitor on|off|timeout_s=N[,consoles=PATH:PATH]`: a bare
/// `on`/`off` switches the monitor; the keys leave it on.
pub fn parse_boot_monitor_flag(input: &str) -> Result<BootMonitorConfig, ConfigError> {
    let o = OptionList::parse(
        "boot_monitor",
        input,
        &["enabled", "timeout_s", "consoles"],
        Some("enabled"),
    )?;
    let defaults = BootMonitorConfig::default();
    Ok(BootMonitorConfig {
        enabled: o.switch("enabled")?.unwrap_or(true),
        timeout_s: o.number("timeout_s")?.unwrap_or(defaults.timeout_s),
        consoles: o
            .get("consoles")
            .map(|c| {
                c.split(':')
                    .filter(|p| !p.is_empty())
                    .map(PathBuf::from)
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// Parses `--config-disk dir=PATH`.
pub fn parse_config_disk_flag(input: &str) -> Result<ConfigDiskConfig, ConfigError> {
    let o = OptionList::parse("config_disk", input, &["dir"], None)?;
    Ok(ConfigDiskConfig {
        dir: o
            .get("dir")
            .filter(|d| !d.is_empty())
            .ok_or(ConfigError::Missing("config_disk.dir"))?
            .into(),
    })
}

/// Parses `--serial stdout|off|file=PATH[,max_size=SIZE][,max_backups=N]`.
pub fn parse_serial_flag(input: &str) -> Result<SerialConfig, ConfigError> {
    match input {
        "stdout" => Ok(SerialConfig::Stdout),
        "off" => Ok(SerialConfig::Off),
        _ if input.starts_with("file=") => {
            let o = OptionList::parse("serial", input, &["file", "max_size", "max_backups"], None)?;
            Ok(SerialConfig::File {
                path: o
                    .get("file")
                    .filter(|p| !p.is_empty())
                    .ok_or(ConfigError::Missing("serial.path"))?
                    .into(),
                max_size: o.size("max_size")?.unwrap_or_else(default_serial_max_size),
                max_backups: o
                    .number("max_backups")?
                    .unwrap_or(DEFAULT_SERIAL_MAX_BACKUPS),
            })
        }
        _ => Err(ConfigError::invalid(
            "serial",
            input,
            "expected stdout, off or file=PATH[,max_size=SIZE][,max_backups=N]".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_from_file_flag_and_machine_flag() {
        let cfg = VmConfig::from_toml("[machine]\ntransport = \"pci\"").unwrap();
        assert_eq!(cfg.machine.transport, Transport::Pci);
        assert!(cfg.machine.acpi, "acpi keeps its default");
        assert!(VmConfig::from_toml("[machine]\ntransport = \"isa\"").is_err());
        assert_eq!(VmConfig::default().machine.transport, Transport::Pci);
        let mut cfg = VmConfig::default();
        cfg.apply_flags(&FlagOverrides {
            transport: Some("pci".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cfg.machine.transport, Transport::Pci);
        let m = parse_machine_flag("acpi=off,transport=pci").unwrap();
        assert_eq!((m.acpi, m.transport), (false, Transport::Pci));
        let e = parse_machine_flag("transport=usb").unwrap_err().to_string();
        assert!(e.contains("machine.transport"), "{e}");
    }

    #[test]
    fn pci_takes_virtio_devices_but_needs_acpi() {
        let cfg = VmConfig::from_toml(
            "[payload]\nkernel = \"/dev/null\"\n[machine]\ntransport = \"pci\"\n\
             [vsock]\ncid = 3\nsocket = \"/tmp/keel-pci-unit.sock\"",
        )
        .unwrap();
        cfg.validate_machine().unwrap();
        let mut off = cfg.clone();
        off.machine.acpi = false;
        let e = off.validate_machine().unwrap_err().to_string();
        assert!(e.contains("needs machine.acpi = true"), "{e}");
    }

    #[test]
    fn file_then_flags_override() {
        let mut cfg = VmConfig::from_toml(
            r#"
            [payload]
            kernel = "/boot/vmlinux"
            cmdline = "console=ttyS0"
            [memory]
            size = "1G"
            hugepages = true
            [cpus]
            boot = 4
            sockets = 2
            cores = 1
            threads = 2
            mask = ["avx512f"]
            [serial]
            mode = "file"
            path = "/var/log/guest.log"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.memory.size.bytes(), 1 << 30);
        assert_eq!(cfg.memory.hugepages, HugepagesMode::On);
        assert_eq!(
            cfg.cpus.topology().unwrap(),
            CpuTopology {
                sockets: 2,
                cores: 1,
                threads: 2
            }
        );
        assert_eq!(
            cfg.serial,
            SerialConfig::File {
                path: "/var/log/guest.log".into(),
                max_size: ByteSize::from_bytes(DEFAULT_SERIAL_MAX_SIZE),
                max_backups: DEFAULT_SERIAL_MAX_BACKUPS,
            }
        );
        cfg.apply_flags(&FlagOverrides {
            memory: Some("size=256M".into()),
            serial: Some("off".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cfg.memory.size.bytes(), 256 << 20);
        assert_eq!(
            cfg.memory.hugepages,
            HugepagesMode::Off,
            "a flag replaces the whole section"
        );
        assert_eq!(cfg.serial, SerialConfig::Off);
        assert_eq!(cfg.payload.cmdline.as_deref(), Some("console=ttyS0"));
    }

    #[test]
    fn hugepages_on_off_auto_in_the_file_and_the_flag() {
        let mode = |text: &str| {
            VmConfig::from_toml(&format!("[memory]\nsize = \"1G\"\nhugepages = {text}"))
                .map(|c| c.memory.hugepages)
        };
        assert_eq!(mode("true"), Ok(HugepagesMode::On));
        assert_eq!(mode("false"), Ok(HugepagesMode::Off));
        assert_eq!(mode("\"on\""), Ok(HugepagesMode::On));
        assert_eq!(mode("\"off\""), Ok(HugepagesMode::Off));
        assert_eq!(mode("\"auto\""), Ok(HugepagesMode::Auto));
        let e = mode("\"sometimes\"").unwrap_err();
        assert!(
            e.contains("hugepages") && e.contains("on, off or auto"),
            "{e}"
        );
        assert_eq!(
            VmConfig::from_toml("[memory]\nsize = \"1G\"")
                .unwrap()
                .memory
                .hugepages,
            HugepagesMode::Off,
            "off by default"
        );
        let flag = |text: &str| parse_memory_flag(text).map(|m| m.hugepages);
        assert_eq!(flag("size=1G,hugepages=on").unwrap(), HugepagesMode::On);
        assert_eq!(flag("size=1G,hugepages=true").unwrap(), HugepagesMode::On);
        assert_eq!(flag("size=1G,hugepages=off").unwrap(), HugepagesMode::Off);
        assert_eq!(flag("size=1G,hugepages=auto").unwrap(), HugepagesMode::Auto);
        let e = flag("size=1G,hugepages=maybe").unwrap_err().to_string();
        assert!(
            e.contains("memory.hugepages") && e.contains("\"maybe\""),
            "{e}"
        );
        // --print-config writes the word, which reads back the same.
        let mut cfg = VmConfig::default();
        cfg.memory.hugepages = HugepagesMode::Auto;
        let text = toml::to_string(&cfg).unwrap();
        assert!(text.contains("hugepages = \"auto\""), "{text}");
        assert_eq!(VmConfig::from_toml(&text).unwrap(), cfg);
    }

    #[test]
    fn boot_monitor_from_the_file_and_the_flag() {
        let d = VmConfig::default().boot_monitor;
        assert!(d.enabled, "on by default");
        assert_eq!(d.timeout_s, 300, "HostOS's five minutes");
        assert!(d.consoles.is_empty());
        let cfg = VmConfig::from_toml(
            "[boot_monitor]\ntimeout_s = 60\nconsoles = [\"/dev/tty1\", \"/dev/ttyS0\"]",
        )
        .unwrap();
        assert_eq!(
            cfg.boot_monitor,
            BootMonitorConfig {
                enabled: true,
                timeout_s: 60,
                consoles: vec!["/dev/tty1".into(), "/dev/ttyS0".into()],
            }
        );
        assert!(VmConfig::from_toml("[boot_monitor]\ntimeout = 5").is_err());
        assert!(!parse_boot_monitor_flag("off").unwrap().enabled);
        let f = parse_boot_monitor_flag("timeout_s=2,consoles=/dev/tty1:/dev/ttyS0").unwrap();
        assert_eq!(
            (f.enabled, f.timeout_s, f.consoles.len()),
            (true, 2, 2),
            "{f:?}"
        );
        let e = parse_boot_monitor_flag("timeout_s=soon")
            .unwrap_err()
            .to_string();
        assert!(e.contains("boot_monitor.timeout_s"), "{e}");
        let text = toml::to_string(&cfg).unwrap();
        assert_eq!(VmConfig::from_toml(&text).unwrap(), cfg);
    }

    #[test]
    fn config_disk_from_the_file_and_the_flag() {
        assert_eq!(VmConfig::default().config_disk, None);
        let cfg = VmConfig::from_toml("[config_disk]\ndir = \"/run/config\"").unwrap();
        assert_eq!(
            cfg.config_disk,
            Some(ConfigDiskConfig {
                dir: "/run/config".into()
            })
        );
        assert!(VmConfig::from_toml("[config_disk]\ndir = \"/x\"\nserial = \"config\"").is_err());
        assert_eq!(
            parse_config_disk_flag("dir=/tmp").unwrap().dir,
            PathBuf::from("/tmp")
        );
        assert!(parse_config_disk_flag("dir=")
            .unwrap_err()
            .to_string()
            .contains("config_disk.dir"));
        assert!(parse_config_disk_flag("dir=/tmp,serial=config")
            .unwrap_err()
            .to_string()
            .contains("unknown key `serial`"));
        let text = toml::to_string(&cfg).unwrap();
        assert_eq!(VmConfig::from_toml(&text).unwrap(), cfg);
    }

    #[test]
    fn device_polling_from_the_file_and_the_flag() {
        let mut cfg = VmConfig::from_toml("[devices]\npoll_us = 50").unwrap();
        assert_eq!(cfg.devices.poll_us, 50);
        assert_eq!(VmConfig::default().devices.poll_us, 0, "off by default");
        cfg.apply_flags(&FlagOverrides {
            device_poll_us: Some(200),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cfg.devices.poll_us, 200);
        assert!(VmConfig::from_toml("[devices]\npoll = 5").is_err());
    }

    #[test]
    fn shutdown_method_from_the_file_and_the_flag() {
        assert_eq!(
            VmConfig::default().control.shutdown_method,
            ShutdownMethod::Acpi,
            "the power button by default"
        );
        let mut cfg = VmConfig::from_toml("[control]\nshutdown_method = \"ctrl-alt-del\"").unwrap();
        assert_eq!(cfg.control.shutdown_method, ShutdownMethod::CtrlAltDel);
        cfg.apply_flags(&FlagOverrides {
            shutdown_method: Some("acpi".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cfg.control.shutdown_method, ShutdownMethod::Acpi);
        let e = cfg
            .apply_flags(&FlagOverrides {
                shutdown_method: Some("reset".into()),
                ..Default::default()
            })
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("control.shutdown_method") && e.contains("reset"),
            "{e}"
        );
        assert!(VmConfig::from_toml("[control]\nshutdown_method = \"halt\"").is_err());
        let text = toml::to_string(&cfg).unwrap();
        assert!(text.contains("shutdown_method = \"acpi\""), "{text}");
    }

    #[test]
    fn file_errors_name_the_key() {
        let e = VmConfig::from_toml("[memory]\nsise = 1").unwrap_err();
        assert!(e.contains("sise"), "{e}");
        let e = VmConfig::from_toml("[memory]\nsize = \"12Q\"").unwrap_err();
        assert!(e.contains("suffix"), "{e}");
        let e = VmConfig::from_toml("[serial]\nmode = \"tty\"").unwrap_err();
        assert!(e.contains("tty"), "{e}");
    }

    #[test]
    fn cpus_flag_derives_topology() {
        let c = parse_cpus_flag("boot=8,sockets=2,threads=2").unwrap();
        assert_eq!(
            c.topology().unwrap(),
            CpuTopology {
                sockets: 2,
                cores: 2,
                threads: 2
            }
        );
        assert_eq!(
            parse_cpus_flag("sockets=2,cores=3,threads=2").unwrap().boot,
            12
        );
        assert_eq!(
            parse_cpus_flag("boot=3").unwrap().topology().unwrap(),
            CpuTopology::flat(3)
        );
        assert_eq!(
            parse_cpus_flag("boot=2,mask=avx512f:rtm").unwrap().mask,
            ["avx512f", "rtm"]
        );
        assert!(parse_cpus_flag("boot=6,sockets=4").is_err());
        assert!(parse_cpus_flag("boot=x")
            .unwrap_err()
            .to_string()
            .contains("cpus.boot"));
        assert!(parse_cpus_flag("sockets=2").is_err());
    }

    #[test]
    fn sizes_are_shown_as_typed() {
        let m = parse_memory_flag("size=1K").unwrap();
        assert_eq!(m.size.bytes(), 1024);
        let mut c = valid();
        c.memory = m;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("memory.size: \"1K\""), "{e}");
        let cfg = VmConfig::from_toml("[memory]\nsize = \"12k\"\n").unwrap();
        assert_eq!(cfg.memory.size.to_string(), "12k");
        let e = cfg.validate_memory().unwrap_err().to_string();
        assert!(e.contains("\"12k\""), "{e}");
        // Printed as typed, and a byte count stays a number.
        let text = toml::to_string(&cfg.memory).unwrap();
        assert!(text.contains("size = \"12k\""), "{text}");
        let text = toml::to_string(&MemoryConfig::default()).unwrap();
        assert!(text.contains("size = 536870912"), "{text}");
    }

    #[test]
    fn memory_against_the_host() {
        let host = HostMemory::parse(
            "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n",
        );
        assert_eq!(host.total, Some(24_000_000 * 1024));
        assert_eq!(host.available, Some(20_000_000 * 1024));
        assert_eq!(host.check(1 << 30, false), Ok(None));
        // Above what is free now: a warning.
        let warn = host.check(21_000_000 * 1024, false).unwrap().unwrap();
        assert!(warn.contains("MemAvailable"), "{warn}");
        // Above the physical memory: refused, unless overcommit.
        let err = host.check(1 << 40, false).unwrap_err();
        assert!(
            err.contains("overcommit=on") && err.contains("MemTotal"),
            "{err}"
        );
        let warn = host.check(1 << 40, true).unwrap().unwrap();
        assert!(warn.contains("overcommit=on"), "{warn}");
        // Unreadable meminfo: nothing to compare with.
        assert_eq!(HostMemory::parse("").check(1 << 40, false), Ok(None));
        // Through the flag and validate(): 1T is more than any test host has here.
        let real = HostMemory::read();
        assert!(real.total.is_some_and(|t| t < 1 << 40), "{real:?}");
        let mut c = valid();
        c.memory = parse_memory_flag("size=1T").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("memory.size: \"1T\"") && e.contains("overcommit=on"),
            "{e}"
        );
        c.memory = parse_memory_flag("size=1T,overcommit=on").unwrap();
        c.validate().expect("overcommit=on accepts it");
    }

    #[test]
    fn a_read_only_file_disk_needs_readonly_on() {
        // A file on a read-only (bind) mount gives EROFS; an immutable file EPERM.
        // Both are checked through the kernel in tests/config_errors.rs; here the
        // writable case: a plain file is accepted with readonly=off.
        let dir = std::env::temp_dir().join(format!("keel-cfg-ro-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("d.img");
        std::fs::write(&disk, vec![0u8; 4096]).unwrap();
        assert_eq!(write_refusal(&disk, false), None);
        let mut c = valid();
        c.disks = vec![parse_disk_flag(0, &format!("path={}", disk.display())).unwrap()];
        c.validate().expect("writable file disk");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn disk_flag() {
        let d = parse_disk_flag(0, "path=/dev/hostlvm/guestos,direct=on,serial=guestos").unwrap();
        assert_eq!(d.path, PathBuf::from("/dev/hostlvm/guestos"));
        assert!(d.direct && !d.readonly);
        assert_eq!(d.serial.as_deref(), Some("guestos"));
        assert_eq!(d.engine, DiskEngine::IoUring);
        assert_eq!(
            parse_disk_flag(0, "path=x,engine=sync").unwrap().engine,
            DiskEngine::Sync
        );
        assert!(parse_disk_flag(0, "readonly=on")
            .unwrap_err()
            .to_string()
            .contains("disks[0].path"));
        assert!(parse_disk_flag(2, "path=x,engine=aio")
            .unwrap_err()
            .to_string()
            .contains("disks[2].engine"));
        assert!(parse_disk_flag(0, "path=x,cache=none").is_err());
        let cfg = VmConfig::from_toml(
            "[[disks]]\npath = \"/dev/loop0\"\ndirect = true\n[[disks]]\npath = \"cfg.img\"\nreadonly = true\n",
        )
        .unwrap();
        assert_eq!(cfg.disks.len(), 2);
        assert!(cfg.disks[1].readonly);
    }

    #[test]
    fn disk_queues_from_the_flag_the_file_and_the_vcpus() {
        let d = parse_disk_flag(0, "path=x,num_queues=4").unwrap();
        assert_eq!(d.num_queues, Some(4));
        assert_eq!(d.queues(2), 4, "given: kept whatever the vCPUs");
        assert!(parse_disk_flag(1, "path=x,num_queues=many")
            .unwrap_err()
            .to_string()
            .contains("disks[1].num_queues"));
        // Absent: one per boot vCPU, at most 16.
        let d = parse_disk_flag(0, "path=x").unwrap();
        assert_eq!(d.num_queues, None);
        assert_eq!((d.queues(1), d.queues(2), d.queues(64)), (1, 2, 16));
        let cfg = VmConfig::from_toml(
            "[cpus]\nboot = 2\n[[disks]]\npath = \"a.img\"\nnum_queues = 3\n[[disks]]\npath = \"b.img\"\n",
        )
        .unwrap();
        assert_eq!(cfg.disks[0].queues(cfg.cpus.boot), 3);
        assert_eq!(cfg.disks[1].queues(cfg.cpus.boot), 2);
        // The printed config reads back the same (an absent count stays
        // absent: it follows the vCPUs).
        let text = toml::to_string(&cfg).unwrap();
        assert!(text.contains("num_queues = 3") && text.matches("num_queues").count() == 1);
        assert_eq!(VmConfig::from_toml(&text).unwrap(), cfg);
        // Out of range: refused before boot, the field named.
        let dir = std::env::temp_dir().join(format!("keel-cfg-nq-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("d.img");
        std::fs::write(&disk, vec![0u8; 4096]).unwrap();
        for (n, ok) in [(0, false), (1, true), (16, true), (17, false)] {
            let mut c = valid();
            let flag = format!("path={},num_queues={n}", disk.display());
            c.disks = vec![
                parse_disk_flag(0, &format!("path={}", dir.join("e.img").display())).unwrap(),
                parse_disk_flag(1, &flag).unwrap(),
            ];
            std::fs::write(dir.join("e.img"), vec![0u8; 4096]).unwrap();
            match c.validate() {
                Ok(()) => assert!(ok, "num_queues = {n} accepted"),
                Err(e) => {
                    assert!(!ok, "num_queues = {n} refused: {e}");
                    assert!(e.to_string().contains("disks[1].num_queues"), "{e}");
                }
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn net_flag_and_file() {
        let n = parse_net_flag(0, "tap=vnet1,bridge=br6,mac=6a:01:aa:bb:cc:dd,mtu=1500").unwrap();
        assert_eq!(
            n,
            NetConfig {
                tap: "vnet1".into(),
                bridge: Some("br6".into()),
                mac: Some("6a:01:aa:bb:cc:dd".into()),
                mtu: Some(1500),
                queues: 1,
            }
        );
        assert_eq!(parse_net_flag(0, "tap=t0,queues=4").unwrap().queues, 4);
        assert!(parse_net_flag(0, "bridge=br6")
            .unwrap_err()
            .to_string()
            .contains("nets[0].tap"));
        assert!(parse_net_flag(1, "tap=t0,mtu=big")
            .unwrap_err()
            .to_string()
            .contains("nets[1].mtu"));
        assert!(parse_net_flag(0, "tap=t0,model=e1000").is_err());
        let cfg = VmConfig::from_toml(
            "[[nets]]\ntap = \"vnet1\"\nbridge = \"br6\"\n[[nets]]\ntap = \"vnet2\"\nqueues = 2\nmtu = 9000\n",
        )
        .unwrap();
        assert_eq!(cfg.nets.len(), 2);
        assert_eq!(cfg.nets[0].queues, 1);
        assert_eq!((cfg.nets[1].queues, cfg.nets[1].mtu), (2, Some(9000)));
        // The printed config reads back the same.
        let text = toml::to_string(&cfg).unwrap();
        assert_eq!(VmConfig::from_toml(&text).unwrap(), cfg);
        // Flags replace the file's NICs.
        let mut cfg = cfg;
        cfg.apply_flags(&FlagOverrides {
            nets: vec!["tap=vnet9".into()],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cfg.nets.len(), 1);
        assert_eq!(cfg.nets[0].tap, "vnet9");
    }

    #[test]
    fn boot_slot_and_cow_settings() {
        let dir = std::env::temp_dir().join(format!("keel-cfg-slot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("d.img");
        std::fs::write(&disk, vec![0u8; 4096]).unwrap();
        let text = format!(
            "[payload]\nboot_slot = \"upgrade\"\n[[disks]]\npath = \"{}\"\ncow = \"partition:10\"\ncow_limit = \"512M\"\n",
            disk.display()
        );
        let cfg = VmConfig::from_toml(&text).unwrap();
        assert_eq!(cfg.payload.boot_slot, Some(BootSlot::Upgrade));
        assert_eq!(cfg.disks[0].cow, Some(CowTarget::Partition(10)));
        assert_eq!(
            cfg.disks[0].cow_limit.as_ref().map(ByteSize::bytes),
            Some(512 << 20)
        );
        cfg.validate().expect("no kernel needed with boot_slot");
        assert_eq!(
            VmConfig::from_toml(&toml::to_string(&cfg).unwrap()).unwrap(),
            cfg
        );
        let check = |f: &dyn Fn(&mut VmConfig), field: &str, why: &str| {
            let mut c = cfg.clone();
            f(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(field) && e.contains(why), "{e}");
        };
        check(
            &|c| c.payload.kernel = Some("/bin/sh".into()),
            "payload.boot_slot",
            "payload.kernel",
        );
        check(
            &|c| c.payload.cmdline = Some("x".into()),
            "payload.boot_slot",
            "payload.cmdline",
        );
        check(
            &|c| c.payload.boot_disk = Some(1),
            "payload.boot_disk",
            "1 disks",
        );
        check(&|c| c.disks.clear(), "payload.boot_disk", "0 disks");
        check(&|c| c.disks[0].readonly = true, "disks[0].cow", "read-only");
        check(
            &|c| c.disks[0].cow_limit = Some(ByteSize::from_bytes(100)),
            "disks[0].cow_limit",
            "multiple of 512",
        );
        check(
            &|c| {
                c.payload.boot_slot = None;
                c.payload.boot_disk = Some(0)
            },
            "payload.boot_disk",
            "only used with",
        );
        assert!(
            VmConfig::from_toml("[[disks]]\npath = \"x\"\ncow = \"part:1\"\n")
                .unwrap_err()
                .contains("partition:N")
        );
        let mut flags = cfg.clone();
        flags
            .apply_flags(&FlagOverrides {
                boot_slot: Some("guestos".into()),
                disks: vec![format!(
                    "path={},cow=partition:3,cow_limit=1M",
                    disk.display()
                )],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(flags.payload.boot_slot, Some(BootSlot::Guestos));
        assert_eq!(flags.disks[0].cow, Some(CowTarget::Partition(3)));
        let e = flags
            .apply_flags(&FlagOverrides {
                boot_slot: Some("hostos".into()),
                ..Default::default()
            })
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("payload.boot_slot") && e.contains("guestos or upgrade"),
            "{e}"
        );
        assert!(parse_disk_flag(1, "path=x,cow=partition:0")
            .unwrap_err()
            .to_string()
            .contains("disks[1].cow"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn serial_flag() {
        assert_eq!(parse_serial_flag("stdout").unwrap(), SerialConfig::Stdout);
        assert_eq!(
            parse_serial_flag("file=/tmp/x").unwrap(),
            SerialConfig::File {
                path: "/tmp/x".into(),
                max_size: ByteSize::from_bytes(2 << 20),
                max_backups: 3,
            }
        );
        assert_eq!(
            parse_serial_flag("file=/tmp/x,max_size=64K,max_backups=0").unwrap(),
            SerialConfig::File {
                path: "/tmp/x".into(),
                max_size: ByteSize::from_bytes(64 << 10),
                max_backups: 0,
            }
        );
        assert!(parse_serial_flag("file=/tmp/x,max_backups=-1").is_err());
        assert!(parse_serial_flag("file=/tmp/x,rotate=on").is_err());
        assert!(parse_serial_flag("file=").is_err());
        assert!(parse_serial_flag("tty").is_err());
    }

    fn valid() -> VmConfig {
        let exe = std::env::current_exe().unwrap();
        VmConfig {
            payload: PayloadConfig {
                kernel: Some(exe),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn numa_in_the_flag_and_the_file() {
        assert!(!parse_memory_flag("size=1G").unwrap().numa);
        assert!(parse_memory_flag("size=1G,numa=on").unwrap().numa);
        assert!(!parse_memory_flag("size=1G,numa=off").unwrap().numa);
        let e = parse_memory_flag("size=1G,numa=both")
            .unwrap_err()
            .to_string();
        assert!(e.contains("memory.numa") && e.contains("\"both\""), "{e}");
        let cfg = VmConfig::from_toml("[memory]\nsize = \"1G\"\nnuma = true").unwrap();
        assert!(cfg.memory.numa);
        assert!(
            !VmConfig::from_toml("[memory]\nsize = \"1G\"")
                .unwrap()
                .memory
                .numa
        );
        // --print-config shows it only when on, and reads back.
        let text = toml::to_string(&cfg.memory).unwrap();
        assert!(text.contains("numa = true"), "{text}");
        assert!(!toml::to_string(&MemoryConfig::default())
            .unwrap()
            .contains("numa"));
    }

    /// A valid 2-socket NUMA guest, for the refusals below to break.
    fn numa_config() -> VmConfig {
        let mut c = valid();
        c.memory = parse_memory_flag("size=256M,numa=on").unwrap();
        c.cpus = parse_cpus_flag("boot=4,sockets=2").unwrap();
        c
    }

    #[test]
    fn numa_refusals_name_memory_numa() {
        assert!(numa_config().validate().is_ok());
        let refused = |f: &dyn Fn(&mut VmConfig), why: &str| {
            let mut c = numa_config();
            f(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(
                e.starts_with("invalid value for memory.numa: \"true\"") && e.contains(why),
                "{e} should name memory.numa and say {why:?}"
            );
        };
        refused(&|c| c.machine.acpi = false, "machine.acpi = true");
        refused(
            &|c| c.cpus = parse_cpus_flag("boot=4").unwrap(),
            "at least 2 sockets",
        );
        // 3 sockets x 2 MiB pages do not divide 256 MiB.
        refused(
            &|c| c.cpus = parse_cpus_flag("boot=3,sockets=3").unwrap(),
            "multiple of 6 MiB",
        );
        // Each node a multiple of 4 KiB but not of 2 MiB.
        refused(
            &|c| c.memory.size = ByteSize::from_bytes((256 << 20) + (8 << 10)),
            "multiple of 4 MiB",
        );
        refused(
            &|c| {
                c.memory.size = ByteSize::from_bytes(32 << 20);
                c.cpus = parse_cpus_flag("boot=4,sockets=4").unwrap();
            },
            "at least 16 MiB each",
        );
        // Off: none of this is checked.
        let mut c = numa_config();
        c.memory.numa = false;
        c.machine.acpi = false;
        c.machine.transport = Transport::Mmio;
        c.cpus = parse_cpus_flag("boot=3,sockets=3").unwrap();
        assert!(c.validate().is_ok());
    }

    #[test]
    fn validation_names_the_field() {
        assert!(valid().validate().is_ok());
        let check = |f: &dyn Fn(&mut VmConfig), field: &str| {
            let mut c = valid();
            f(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e} should name {field}");
        };
        check(&|c| c.payload.kernel = None, "kernel");
        check(
            &|c| c.payload.kernel = Some("/nonexistent".into()),
            "payload.kernel",
        );
        check(
            &|c| c.payload.kernel = Some("/tmp".into()),
            "payload.kernel",
        );
        check(
            &|c| c.payload.initrd = Some("/nonexistent".into()),
            "payload.initrd",
        );
        check(
            &|c| c.payload.cmdline = Some("x".repeat(5000)),
            "payload.cmdline",
        );
        check(
            &|c| c.memory.size = ByteSize::from_bytes(1 << 20),
            "memory.size",
        );
        check(
            &|c| c.memory.size = ByteSize::from_bytes((64 << 20) + 512),
            "memory.size",
        );
        check(
            &|c| {
                c.memory.size = ByteSize::from_bytes((64 << 20) + (4 << 10));
                c.memory.hugepages = HugepagesMode::On
            },
            "memory.size",
        );
        check(
            &|c| {
                c.memory.size = ByteSize::from_bytes((64 << 20) + (4 << 10));
                c.memory.hugepages = HugepagesMode::Auto
            },
            "hugepages=auto",
        );
        check(&|c| c.cpus.boot = 0, "cpus.boot");
        check(
            &|c| {
                c.cpus.boot = 4;
                c.cpus.sockets = Some(2);
                c.cpus.cores = Some(1);
            },
            "cpus.topology",
        );
        check(
            &|c| c.cpus.mask = vec!["no-such-feature".into()],
            "cpus.mask",
        );
        check(
            &|c| {
                c.serial = SerialConfig::File {
                    path: "/nonexistent/dir/log".into(),
                    max_size: ByteSize::from_bytes(DEFAULT_SERIAL_MAX_SIZE),
                    max_backups: 3,
                }
            },
            "serial.path",
        );
        check(
            &|c| {
                c.serial = SerialConfig::File {
                    path: "/tmp/log".into(),
                    max_size: ByteSize::from_bytes(100),
                    max_backups: 3,
                }
            },
            "serial.max_size",
        );
        check(
            &|c| {
                c.serial = SerialConfig::File {
                    path: "/tmp/log".into(),
                    max_size: ByteSize::from_bytes(DEFAULT_SERIAL_MAX_SIZE),
                    max_backups: 1000,
                }
            },
            "serial.max_backups",
        );
        let nic = |tap: &str| NetConfig {
            tap: tap.into(),
            bridge: None,
            mac: None,
            mtu: None,
            queues: 1,
        };
        check(
            &|c| c.nets = vec![nic("a-very-long-tap-name")],
            "nets[0].tap",
        );
        check(&|c| c.nets = vec![nic("vnet/1")], "nets[0].tap");
        check(
            &|c| c.nets = vec![nic("vnet1"), nic("vnet1")],
            "nets[1].tap",
        );
        check(
            &|c| {
                c.nets = vec![NetConfig {
                    bridge: Some("br 6".into()),
                    ..nic("vnet1")
                }]
            },
            "nets[0].bridge",
        );
        check(
            &|c| {
                c.nets = vec![NetConfig {
                    mac: Some("01:00:5e:00:00:01".into()),
                    ..nic("vnet1")
                }]
            },
            "nets[0].mac",
        );
        check(
            &|c| {
                c.nets = vec![
                    NetConfig {
                        mac: Some("6a:01:00:00:00:01".into()),
                        ..nic("vnet1")
                    },
                    NetConfig {
                        mac: Some("6A:01:00:00:00:01".into()),
                        ..nic("vnet2")
                    },
                ]
            },
            "nets[1].mac",
        );
        check(
            &|c| {
                c.nets = vec![NetConfig {
                    mac: Some("hostos:guestos:mainnet:de:ad".into()),
                    ..nic("vnet1")
                }]
            },
            "nets[0].mac",
        );
        // A derived address clashes with the same address given plainly.
        check(
            &|c| {
                c.nets = vec![
                    NetConfig {
                        mac: Some("hostos:guestos:mainnet:de:ad:de:ad:de:ad".into()),
                        ..nic("vnet1")
                    },
                    NetConfig {
                        mac: Some("6a:01:f7:e0:c6:84".into()),
                        ..nic("vnet2")
                    },
                ]
            },
            "nets[1].mac",
        );
        check(
            &|c| {
                c.nets = vec![NetConfig {
                    mtu: Some(20),
                    ..nic("vnet1")
                }]
            },
            "nets[0].mtu",
        );
        check(&|c| c.devices.poll_us = MAX_POLL_US + 1, "devices.poll_us");
        check(&|c| c.boot_monitor.timeout_s = 0, "boot_monitor.timeout_s");
        check(
            &|c| {
                c.config_disk = Some(ConfigDiskConfig {
                    dir: "/nonexistent/config".into(),
                })
            },
            "config_disk.dir",
        );
        check(
            &|c| c.boot_monitor.consoles = vec!["tty1".into()],
            "boot_monitor.consoles[0]",
        );
        check(
            &|c| {
                c.nets = vec![NetConfig {
                    queues: 0,
                    ..nic("vnet1")
                }]
            },
            "nets[0].queues",
        );
        check(
            &|c| c.nets = (0..9).map(|i| nic(&format!("vnet{i}"))).collect(),
            "nets",
        );
        let mut ok = valid();
        ok.nets = vec![NetConfig {
            bridge: Some("br6".into()),
            mac: Some("6a:01:00:00:00:01".into()),
            mtu: Some(1500),
            queues: 2,
            ..nic("vnet1")
        }];
        assert!(ok.validate().is_ok());
    }

    #[test]
    fn security_section_and_flags() {
        let c = VmConfig::from_toml("[security]\nuser = \"65534:65534\"\nseccomp = false").unwrap();
        assert!(!c.security.seccomp);
        assert_eq!(
            c.security.run_as().unwrap(),
            Some(crate::privileges::RunAs {
                uid: 65534,
                gid: 65534
            })
        );
        assert!(VmConfig::default().security.seccomp, "on by default");
        let mut c = VmConfig::default();
        c.apply_flags(&FlagOverrides {
            seccomp: Some("off".into()),
            user: Some("no-such-user-keel".into()),
            ..Default::default()
        })
        .unwrap();
        assert!(!c.security.seccomp);
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("security.user") && e.contains("no-such-user-keel"),
            "{e}"
        );
        let nobody = crate::privileges::RunAs::parse("nobody").unwrap();
        assert_eq!(nobody.uid, 65534, "names resolve through the user database");
        assert!(crate::privileges::RunAs::parse("nobody:no-such-group-keel")
            .unwrap_err()
            .contains("no-such-group-keel"));
        assert!(
            crate::privileges::RunAs::parse("7").is_err(),
            "a bare uid needs its group"
        );
        let e = c
            .apply_flags(&FlagOverrides {
                seccomp: Some("maybe".into()),
                ..Default::default()
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("security.seccomp"), "{e}");
    }
}
