//! From a validated [`VmConfig`] to a running [`Vmm`], in one readable
//! sequence: KVM and memory, payload and boot tables, devices, vCPUs.

use std::sync::{mpsc, Arc};
use std::time::Instant;

use devices::bus::Bus;
use log::info;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::acpi::{self, AcpiError};
use crate::arch::x86_64::boot::{self, BootError};
use crate::arch::x86_64::cpuid::{self, CpuidError, CpuidOptions, NativeCpuid};
use crate::arch::x86_64::mptable::{self, MpTableError};
use crate::arch::x86_64::numa::{NumaError, NumaLayout};
use crate::arch::x86_64::regs::{self, RegsError};
use std::time::Duration;

use crate::api::auth::RolePolicy;
use crate::api::{self, ApiContext, BootInfo, DeviceInfo, MemoryInfo, VmInfo};
use crate::arch::x86_64::pci_acpi::PciHost;
use crate::arch::x86_64::regs::EntryMode;
use crate::boot_monitor::BootMonitor;
use crate::config::{
    resolve_group, ConfigError, ControlConfig, ShutdownMethod, Transport, VmConfig,
};
use crate::control::{self, VmStatus};
use crate::device_manager::LegacyDevices;
use crate::device_manager::{self, DeviceError, Placement};
use crate::pci_devices::PciDevices;
use crate::privileges;
use crate::seccomp::{self, ThreadKind};
use crate::teardown_helper;
use crate::vmm::{BootWatch, Vmm};
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{self, Vcpu, VcpuControl, VcpuError, VcpuShared};
use crate::vstate::vm::{Vm, VmError};

/// Command line used when the config gives none.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Everything that can stop a VM from being built. Nothing is left running
/// when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// KVM or VM creation.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel, initrd or boot information.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// MP table.
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// The NUMA description (`memory.numa`).
    #[error("memory.numa: {0}")]
    Numa(#[from] NumaError),
    /// CPUID table.
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
    /// Devices.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// vCPUs.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Boot vCPU registers.
    #[error("boot vCPU: {0}")]
    Regs(#[from] RegsError),
    /// Reading the host's supported CPUID.
    #[error("cannot read KVM's supported CPUID: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    /// The control loop's eventfd.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    /// The control API socket.
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    /// Booting from the guest's disk (`boot_slot`).
    #[error(transparent)]
    Payload(#[from] crate::payload::PayloadError),
    /// The config disk.
    #[error(transparent)]
    ConfigDisk(#[from] crate::config_disk::ConfigDiskError),
    /// Building or installing a seccomp filter.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// Forking the tap teardown helper.
    #[error("cannot start the tap teardown helper: {0}")]
    TeardownHelper(std::io::Error),
    /// Dropping privileges.
    #[error(transparent)]
    Privileges(#[from] crate::privileges::PrivilegeError),
}

/// The API's group-to-role mapping.
/// The graceful-shutdown method in force: the ACPI power button needs
/// the ACPI tables (the GED lives in the DSDT).
fn shutdown_method(config: &VmConfig) -> ShutdownMethod {
    match config.control.shutdown_method {
        ShutdownMethod::Acpi if !config.machine.acpi => {
            info!("no ACPI tables (machine.acpi = false): graceful shutdown types Ctrl-Alt-Del");
            ShutdownMethod::CtrlAltDel
        }
        m => m,
    }
}

fn role_policy(c: &ControlConfig) -> Result<RolePolicy, ConfigError> {
    let gid = |field: &str, g: &Option<String>| {
        g.as_deref()
            .map(|name| resolve_group(name).map_err(|why| ConfigError::invalid(field, name, why)))
            .transpose()
    };
    Ok(RolePolicy {
        admin_gid: gid("control.admin_group", &c.admin_group)?,
        readonly_gid: gid("control.readonly_group", &c.readonly_group)?,
    })
}

/// The device list of `GET /v1/vm`.
fn device_list(
    config: &VmConfig,
    virtio: &[String],
    nets: &[device_manager::NetDeviceInfo],
) -> Vec<DeviceInfo> {
    let mut v = vec![DeviceInfo {
        kind: "serial",
        path: match &config.serial {
            crate::config::SerialConfig::File { path, .. } => Some(path.display().to_string()),
            _ => None,
        },
        readonly: None,
        mac: None,
        queues: None,
        location: "COM1 0x3f8 irq 4".into(),
    }];
    for (d, loc) in config.disks.iter().zip(virtio) {
        v.push(DeviceInfo {
            kind: "virtio-blk",
            path: Some(d.path.display().to_string()),
            readonly: Some(d.readonly),
            mac: None,
            queues: Some(d.queues(config.cpus.boot)),
            location: loc.clone(),
        });
    }
    if let (Some(c), Some(loc)) = (&config.config_disk, virtio.get(config.disks.len())) {
        v.push(DeviceInfo {
            kind: "virtio-blk",
            path: Some(format!("config-disk:{}", c.dir.display())),
            readonly: Some(true),
            mac: None,
            queues: Some(1),
            location: loc.clone(),
        });
    }
    for n in nets {
        v.push(DeviceInfo {
            kind: "virtio-net",
            path: Some(n.tap.clone()),
            readonly: None,
            mac: Some(n.mac.clone()),
            queues: None,
            location: n.location.clone(),
        });
    }
    v
}

/// The boot monitor, watching the serial output, when configured.
fn boot_watch(config: &VmConfig, legacy: &LegacyDevices) -> Result<Option<BootWatch>, BuildError> {
    let c = &config.boot_monitor;
    if !c.enabled {
        return Ok(None);
    }
    let monitor = Arc::new(BootMonitor::new().map_err(BuildError::EventFd)?);
    legacy
        .serial
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .add_watcher(monitor.clone());
    info!(
        "boot monitor: waiting up to {} s for GUESTOS BOOT SUCCESS or FAILURE on the console",
        c.timeout_s
    );
    Ok(Some(BootWatch {
        monitor,
        timeout: Duration::from_secs(c.timeout_s),
        consoles: crate::boot_monitor::open_consoles(&c.consoles),
    }))
}

/// Builds and starts the VM described by `config`. `start` is the VMM's
/// start time, the zero of the boot timer.
pub fn build_and_start(config: &VmConfig, start: Instant) -> Result<Vmm, BuildError> {
    config.validate()?;
    let roles = role_policy(&config.control)?;
    // Bind the API socket first: a bad path is a configuration error. Its
    // group is the widest role's (read-only callers must reach it too).
    let api_listener = api::listener(
        config.control.api_socket.as_deref(),
        roles.readonly_gid.or(roles.admin_gid),
    )?;
    let topology = config.cpus.topology()?;
    let vcpus = topology.vcpus();
    let mem_size = config.memory.size.bytes();
    // Booting from the disk: read (and for the GuestOS VM advance) its A/B
    // state before anything else is created, and before the virtio-blk
    // device opens the disk.
    let from_disk = match config.payload.boot_slot {
        Some(role) => {
            let disk = config.payload.boot_disk.unwrap_or(0);
            let disk = config
                .disks
                .get(disk)
                .ok_or(ConfigError::Missing("payload.boot_disk"))?;
            Some(crate::payload::resolve(role, disk)?)
        }
        None => None,
    };

    let vm = Vm::new(vcpus)?;
    let (guest_memory, backing) =
        memory::create_guest_memory_with(mem_size, config.memory.hugepages)?;
    vm.register_memory(&guest_memory)?;

    let config_disk = config
        .config_disk
        .as_ref()
        .map(|c| crate::config_disk::open(&c.dir))
        .transpose()?;
    let mut mmio = Bus::new();
    let mut pci = match config.machine.transport {
        Transport::Pci => Some(PciDevices::new(&vm, mem_size).map_err(DeviceError::from)?),
        Transport::Mmio => None,
    };
    let place = match pci.as_mut() {
        Some(p) => Placement::Pci(p),
        None => Placement::Mmio(&mut mmio),
    };
    let virtio = device_manager::setup_virtio_devices(
        &vm,
        &guest_memory,
        place,
        &config.disks,
        config.cpus.boot,
        config_disk,
        config.vsock.as_ref(),
        &config.nets,
    )?;
    let mut cmdline = match &from_disk {
        Some(p) => p.cmdline.clone(),
        None => config
            .payload
            .cmdline
            .as_deref()
            .unwrap_or(DEFAULT_CMDLINE)
            .to_string(),
    };
    let virtio_locations: Vec<String> = virtio.locations.iter().map(|l| l.describe()).collect();
    // The command line announces the virtio-mmio devices (none on a PCI
    // machine, whose guest enumerates bus 0) (Linux's virtio_mmio.device=,
    // which the probe guest reads too); with ACPI the DSDT describes them as
    // well, and a hardware-reduced Linux binds those (the command-line copies
    // then find their window taken and stand aside: such a kernel gives
    // command-line devices no interrupt line).
    for entry in &virtio.cmdline {
        cmdline.push(' ');
        cmdline.push_str(entry);
    }
    let cmdline = cmdline.as_str();
    let (kernel, initrd, kernel_name) = match &from_disk {
        Some(p) => (
            boot::Image::Bytes {
                name: &p.source,
                data: &p.kernel,
            },
            p.initrd.as_deref().map(|data| boot::Image::Bytes {
                name: &p.source,
                data,
            }),
            p.source.clone(),
        ),
        None => {
            // `validate` guarantees the kernel is set without boot_slot.
            let kernel = config
                .payload
                .kernel
                .as_deref()
                .ok_or(ConfigError::Missing("kernel"))?;
            (
                boot::Image::Path(kernel),
                config.payload.initrd.as_deref().map(boot::Image::Path),
                kernel.display().to_string(),
            )
        }
    };
    let payload = boot::load_payload(&guest_memory, mem_size, kernel, initrd, cmdline)?;
    boot::write_boot_info(&guest_memory, mem_size, &payload, cmdline.len())?;
    let virtio_irqs: Vec<u32> = virtio.slots.iter().map(|s| s.irq).collect();
    mptable::setup_mptable(&guest_memory, &topology, &virtio_irqs)?;
    if config.machine.acpi {
        let virtio_mmio: Vec<(u64, u64, u32)> = virtio
            .slots
            .iter()
            .map(|s| (s.base, s.len, s.irq))
            .collect();
        let numa = config
            .memory
            .numa
            .then(|| NumaLayout::new(&topology, mem_size))
            .transpose()?;
        acpi::setup_acpi(
            &guest_memory,
            &acpi::AcpiMachine {
                topology: &topology,
                virtio_mmio: &virtio_mmio,
                com1: (devices::legacy::COM1_PORT as u16, devices::legacy::COM1_IRQ),
                i8042_irq: device_manager::KBD_IRQ,
                rtc: (devices::legacy::RTC_PORT as u16, devices::legacy::RTC_IRQ),
                ged: (devices::legacy::GED_PORT as u16, devices::legacy::GED_IRQ),
                reset: (
                    devices::legacy::RESET_PORT as u16,
                    devices::legacy::RESET_VALUE,
                ),
                pci: (config.machine.transport == Transport::Pci)
                    .then(|| PciHost::for_memory(mem_size)),
                numa: numa.as_ref(),
            },
        )?;
    }
    info!(
        "payload: {} ({:?} entry at {:#x}), {} MiB, {} vCPUs ({}x{}x{})",
        kernel_name,
        payload.entry.mode,
        payload.entry.entry,
        mem_size >> 20,
        vcpus,
        topology.sockets,
        topology.cores,
        topology.threads
    );

    let mut pio = Bus::new();
    let legacy =
        device_manager::setup_legacy_devices(&vm, &mut pio, &config.serial, start, mem_size)?;
    if let Some(pci) = pci {
        pci.finish(&mut mmio, &mut pio).map_err(DeviceError::from)?;
    }
    let boot_watch = boot_watch(config, &legacy)?;

    let supported = vm
        .kvm()
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(BuildError::SupportedCpuid)?;
    let mut cpuid_opts = CpuidOptions {
        masked_features: config.cpus.mask.clone(),
        tsc_khz: None,
        tsc_deadline: vm.kvm().check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
    };
    let mut created = Vec::with_capacity(vcpus as usize);
    for index in 0..vcpus {
        let apic_id = topology.apic_id(index);
        let fd = vm
            .fd()
            .create_vcpu(u64::from(apic_id))
            .map_err(|e| VcpuError::Kvm(index, "create vCPU", e))?;
        if index == 0 {
            cpuid_opts.tsc_khz = fd.get_tsc_khz().ok();
        }
        let table =
            cpuid::build_vcpu_cpuid(&supported, &NativeCpuid, &topology, index, &cpuid_opts)?;
        created.push(Vcpu::configure(fd, index, &table)?);
    }
    let bsp = &created[0];
    regs::setup_sregs(&guest_memory, bsp.fd(), payload.entry.mode)?;
    regs::setup_regs(bsp.fd(), payload.entry.mode, payload.entry.entry)?;

    let disk_counters = virtio.disk_counters;
    let vsock_counters = virtio.vsock_counters;
    let nets = virtio.nets;
    let net_teardown = virtio.net_teardown;
    let trim_workers = virtio.trim_workers;
    // Everything is open: from here on no thread gets privileges or may
    // make a call outside its kind's allow-list. No other thread exists
    // yet; each one confines itself first thing.
    seccomp::set_global(seccomp::Filters::new(config.security.seccomp)?);
    let net_teardown =
        teardown_helper::spawn(net_teardown, &guest_memory).map_err(BuildError::TeardownHelper)?;
    privileges::drop_privileges(config.security.run_as()?)?;
    device_manager::start_device_thread(
        virtio.event_manager,
        Duration::from_micros(u64::from(config.devices.poll_us)),
    )
    .map_err(BuildError::EventFd)?;
    device_manager::start_trim_workers(trim_workers).map_err(BuildError::EventFd)?;
    vcpu::install_kick_handler()?;
    let (tx, rx) = mpsc::channel();
    let events_ready = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?);
    let shared = VcpuShared {
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        control: Arc::new(VcpuControl::default()),
        events: tx,
        events_ready: events_ready.clone(),
    };
    let status = Arc::new(VmStatus::new(start));
    let (control_handle, inbox) = control::channel(status.clone()).map_err(BuildError::EventFd)?;
    let shutdown_timeout = Duration::from_secs(config.control.shutdown_timeout_s);
    let console_hub = legacy.console_hub.clone();
    let serial = legacy.serial.clone();
    let mut vmm = Vmm::new(
        vm,
        guest_memory,
        legacy,
        shared.control.clone(),
        rx,
        events_ready,
        status,
        shutdown_timeout,
    );
    vmm.set_shutdown_method(shutdown_method(config));
    vmm.set_disk_counters(disk_counters);
    vmm.set_vsock_counters(vsock_counters);
    vmm.set_nets(nets.clone(), net_teardown);
    vmm.set_control_inbox(inbox);
    if let Some(w) = boot_watch {
        vmm.set_boot_watch(w);
    }
    for v in &created {
        vmm.add_vcpu_counters(v.counters());
    }
    if let Some(listener) = api_listener {
        let info = VmInfo {
            vcpus,
            topology,
            memory: MemoryInfo {
                size_bytes: mem_size,
                backing: backing.name(),
                hugepages: config.memory.hugepages.name(),
                hugepages_fallback: backing.fallback.clone(),
                numa_nodes: if config.memory.numa && config.machine.acpi {
                    u32::from(topology.sockets)
                } else {
                    0
                },
            },
            boot: BootInfo {
                kernel: kernel_name.clone(),
                initrd: match &from_disk {
                    Some(p) => p
                        .initrd
                        .as_ref()
                        .map(|_| p.source.replace("/vmlinuz", "/initrd.img")),
                    None => config
                        .payload
                        .initrd
                        .as_ref()
                        .map(|p| p.display().to_string()),
                },
                cmdline: cmdline.to_string(),
                protocol: match payload.entry.mode {
                    EntryMode::Pvh => "pvh",
                    EntryMode::Linux64 => "linux-64",
                },
            },
            devices: device_list(config, &virtio_locations, &nets),
        };
        let ctx = ApiContext::new(
            control_handle,
            vmm.view(),
            info,
            roles,
            console_hub,
            serial,
            shutdown_timeout,
        );
        api::start(listener, Arc::new(ctx))?;
    }
    for v in created {
        let handle = v.start(shared.clone())?;
        vmm.add_vcpu(handle);
    }
    // The main thread creates no thread after this.
    seccomp::apply_current(ThreadKind::Main)?;
    Ok(vmm)
}
