//! Creates the devices, places them on the buses and wires their interrupt
//! lines.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::{Bus, BusError};
use devices::legacy::{
    BootTimer, Cmos, ConsoleHub, EventFdTrigger, Ged, Milestone, PowerRegisters, Serial,
    SerialCounters, SerialSink, BOOT_TIMER_PORT, COM1_IRQ, COM1_PORT, GED_IRQ, GED_PORT, I8042,
    I8042_PORT_DATA, I8042_PORT_LEN, POWER_PORT, POWER_PORT_LEN, RTC_PORT, RTC_PORT_LEN,
    SERIAL_PORT_LEN,
};
use vmm_sys_util::eventfd::EventFd;

use devices::virtio::block::{
    BlockConfig, BlockCounters, CowRange, DiskBackend, DiskError, EngineKind, TrimWorker,
    VirtioBlock,
};
use devices::virtio::mmio::{MmioTransport, MMIO_WINDOW, NOTIFY_OFFSET};
use devices::virtio::net::{
    format_mac, random_mac, resolve_mac, HostTap, NetConfig as DevNetConfig, NetCounters, TapError,
    TapSetup, TapTeardown, VirtioNet,
};
use devices::virtio::vsock::{
    VirtioVsock, VsockConfig as DevVsockConfig, VsockCounters, VsockError,
};
use devices::virtio::{Interrupt, InterruptResampler, VirtioDevice};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vm_memory::GuestMemoryMmap;

use crate::arch::x86_64::layout::{MMIO_DEVICES_START, MMIO_HOLE_START};
use crate::config::{
    CowTarget, DiskConfig, DiskEngine, NetConfig, SerialConfig, DEFAULT_COW_LIMIT,
};
use crate::pci_devices::{PciDevices, PciError, PciSlot};
use crate::vstate::vm::{Vm, VmError};

/// ISA interrupt line of the i8042 keyboard.
pub const KBD_IRQ: u32 = 1;

/// Errors of device set-up.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The serial log file cannot be created.
    #[error("cannot create serial log {path}: {source}")]
    SerialLog {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    /// An interrupt line could not be wired.
    #[error(transparent)]
    Irq(#[from] VmError),
    /// Two devices claim the same addresses.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// A disk cannot be used.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// A disk's copy-on-write range cannot be set up.
    #[error("disks[{index}].cow: {why}")]
    Cow {
        /// The disk's position in the configuration.
        index: usize,
        /// Why.
        why: String,
    },
    /// The vsock device cannot be created.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// A NIC's tap cannot be set up.
    #[error("net {index}: {source}")]
    Net {
        /// The NIC's position in the configuration.
        index: usize,
        /// Why.
        source: TapError,
    },
    /// A NIC's device cannot be created.
    #[error("net {index}: {why}")]
    NetDevice {
        /// The NIC's position in the configuration.
        index: usize,
        /// Why.
        why: String,
    },
    /// No interrupt line left for another virtio device.
    #[error("no free interrupt line for virtio device {0}")]
    NoIrq(usize),
    /// The device thread's event loop could not be set up.
    #[error("device event loop: {0}")]
    EventLoop(String),
    /// A device cannot go on the PCI bus.
    #[error("pci: {0}")]
    Pci(#[from] PciError),
}

/// Where the virtio devices go: virtio-mmio windows on the MMIO bus, or
/// virtio-pci functions on PCI bus 0.
pub enum Placement<'a> {
    /// virtio-mmio (`machine.transport = "mmio"`).
    Mmio(&'a mut Bus),
    /// virtio-pci (`machine.transport = "pci"`).
    Pci(&'a mut PciDevices),
}

/// Where one virtio device was put.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// A virtio-mmio window.
    Mmio(MmioSlot),
    /// A PCI function.
    Pci(PciSlot),
}

impl Location {
    /// How `GET /v1/vm` and the log name it.
    pub fn describe(&self) -> String {
        match self {
            Location::Mmio(s) => s.cmdline(),
            Location::Pci(s) => s.location(),
        }
    }
}

/// First interrupt line given to virtio-mmio devices (below: legacy ISA).
const VIRTIO_IRQ_BASE: u32 = 5;
/// Last usable I/O APIC pin.
const VIRTIO_IRQ_LAST: u32 = 23;

/// Event loop type of the device thread.
pub type DeviceEventManager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// The virtio devices: where they are, and what the VMM keeps of them.
pub struct VirtioDevices {
    /// The device thread's event loop (moved into the thread at start).
    pub event_manager: DeviceEventManager,
    /// Where each device is, in order (disks, config disk, vsock, NICs).
    pub locations: Vec<Location>,
    /// `virtio_mmio.device=` command-line entries, one per virtio-mmio
    /// device (none on a PCI machine).
    pub cmdline: Vec<String>,
    /// Where each virtio-mmio device sits (the same order as `cmdline`),
    /// for the DSDT.
    pub slots: Vec<MmioSlot>,
    /// Per-disk counters, in disk order.
    pub disk_counters: Vec<Arc<BlockCounters>>,
    /// vsock counters.
    pub vsock_counters: Option<Arc<VsockCounters>>,
    /// The NICs, in configuration order.
    pub nets: Vec<NetDeviceInfo>,
    /// Undo the NICs' host set-up (tap, bridge) when dropped: keep them
    /// until the VM has ended.
    pub net_teardown: Vec<TapTeardown>,
    /// The writable disks' trim workers, to start with
    /// [`start_trim_workers`] (a disk's trims wait until its worker runs).
    pub trim_workers: Vec<TrimWorker>,
}

/// What the VMM keeps of one NIC.
#[derive(Clone, Debug)]
pub struct NetDeviceInfo {
    /// Tap interface.
    pub tap: String,
    /// Bridge, if any.
    pub bridge: Option<String>,
    /// The guest's MAC address.
    pub mac: String,
    /// Where the guest sees it (`virtio_mmio.device=` entry or PCI slot).
    pub location: String,
    /// Its counters.
    pub counters: Arc<NetCounters>,
}

/// Creates every configured virtio device, puts its transport where
/// `place` says, wires its interrupts (irqfds) and queue notifications
/// (ioeventfds). The order, hence virtio-mmio windows and PCI slots: the
/// disks in configuration order, the config disk, vsock, then the NICs.
/// `boot_vcpus` sets the disks' default queue count.
#[allow(clippy::too_many_arguments)]
pub fn setup_virtio_devices(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    mut place: Placement<'_>,
    disks: &[DiskConfig],
    boot_vcpus: u16,
    config_disk: Option<DiskBackend>,
    vsock: Option<&crate::config::VsockConfig>,
    nets: &[NetConfig],
) -> Result<VirtioDevices, DeviceError> {
    let mut out = VirtioDevices {
        event_manager: DeviceEventManager::new()
            .map_err(|e| DeviceError::EventLoop(format!("{e:?}")))?,
        locations: Vec::new(),
        cmdline: Vec::new(),
        slots: Vec::new(),
        disk_counters: Vec::new(),
        vsock_counters: None,
        nets: Vec::new(),
        net_teardown: Vec::new(),
        trim_workers: Vec::new(),
    };
    let mut resampler = InterruptResampler::new();
    for (index, d) in disks.iter().enumerate() {
        let backend = DiskBackend::open_locked(&d.path, d.readonly, d.direct, d.shared)?;
        let cow = match d.cow {
            Some(CowTarget::Partition(n)) => {
                let file = backend.try_clone_file().map_err(DeviceError::EventFd)?;
                let part =
                    crate::payload::partition_range(&d.path, Arc::new(file), backend.capacity(), n)
                        .map_err(|e| DeviceError::Cow {
                            index,
                            why: e.to_string(),
                        })?;
                let limit = d
                    .cow_limit
                    .as_ref()
                    .map_or(DEFAULT_COW_LIMIT, |l| l.bytes());
                log::info!(
                    "disk {index}: partition {n} ([{:#x}, {:#x})) is copy-on-write into a {} KiB overlay",
                    part.start,
                    part.start + part.len,
                    limit >> 10
                );
                Some(CowRange {
                    start: part.start,
                    len: part.len,
                    limit,
                })
            }
            None => None,
        };
        let config = BlockConfig {
            serial: d.serial.clone(),
            engine: match d.engine {
                DiskEngine::IoUring => EngineKind::IoUring,
                DiskEngine::Sync => EngineKind::Sync,
            },
            cow,
            num_queues: d.queues(boot_vcpus),
        };
        let queues = config.num_queues;
        let at = out.add_block(vm, mem, &mut place, &mut resampler, backend, config)?;
        log::info!(
            "disk {index}: {} on {at}, {queues} queue(s)",
            d.path.display()
        );
    }
    // The config disk: read-only, and never a serial (`config` would tell
    // the GuestOS it runs in a Kubernetes testnet).
    if let Some(backend) = config_disk {
        let config = BlockConfig {
            serial: None,
            engine: EngineKind::Sync,
            cow: None,
            num_queues: 1,
        };
        let at = out.add_block(vm, mem, &mut place, &mut resampler, backend, config)?;
        log::info!("config disk on {at} (read-only)");
    }
    if let Some(v) = vsock {
        let dev = VirtioVsock::new(DevVsockConfig {
            guest_cid: v.cid,
            uds_path: v.socket.clone(),
            allow_host_connect: v.allow_host_connect,
        })?;
        out.vsock_counters = Some(dev.counters());
        let dev = Arc::new(Mutex::new(dev));
        out.event_manager.add_subscriber(dev.clone());
        let at = out.attach(vm, mem, &mut place, &mut resampler, dev)?;
        log::info!(
            "vsock: guest CID {} on {} (host-initiated connections {}), on {at}",
            v.cid,
            v.socket.display(),
            if v.allow_host_connect {
                "allowed"
            } else {
                "refused"
            }
        );
    }
    // NICs come after the other devices: their slots do not move the
    // others'.
    for (index, n) in nets.iter().enumerate() {
        let host = HostTap::open(&TapSetup {
            name: n.tap.clone(),
            bridge: n.bridge.clone(),
            mtu: n.mtu.map(u32::from),
            queues: usize::from(n.queues.max(1)),
        })
        .map_err(|source| DeviceError::Net { index, source })?;
        let HostTap {
            queues,
            teardown,
            mtu,
        } = host;
        // From here on, an error undoes this tap's set-up too.
        out.net_teardown.push(teardown);
        let mac = match &n.mac {
            Some(m) => resolve_mac(m).map_err(|why| DeviceError::NetDevice { index, why })?,
            None => random_mac(),
        };
        let dev = VirtioNet::new(
            queues,
            DevNetConfig {
                mac,
                mtu: u16::try_from(mtu).unwrap_or(u16::MAX),
            },
        )
        .map_err(|e| DeviceError::NetDevice {
            index,
            why: e.to_string(),
        })?;
        let counters = dev.counters();
        let dev = Arc::new(Mutex::new(dev));
        out.event_manager.add_subscriber(dev.clone());
        let location = out.attach(vm, mem, &mut place, &mut resampler, dev)?;
        log::info!(
            "net {index}: tap {}{} mac {} mtu {mtu}, {} queue pair{}, on {location}",
            n.tap,
            n.bridge
                .as_deref()
                .map(|b| format!(" (bridge {b})"))
                .unwrap_or_default(),
            format_mac(&mac),
            n.queues,
            if n.queues == 1 { "" } else { "s" },
        );
        out.nets.push(NetDeviceInfo {
            tap: n.tap.clone(),
            bridge: n.bridge.clone(),
            mac: format_mac(&mac),
            location,
            counters,
        });
    }
    if !resampler.is_empty() {
        out.event_manager
            .add_subscriber(Arc::new(Mutex::new(resampler)));
    }
    Ok(out)
}

/// Where one virtio-mmio device sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    /// First byte of its register window.
    pub base: u64,
    /// Size of the window.
    pub len: u64,
    /// Its interrupt line (a GSI on the I/O APIC).
    pub irq: u32,
}

impl MmioSlot {
    /// The `virtio_mmio.device=` command-line entry that announces it.
    pub fn cmdline(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            self.len >> 10,
            self.base,
            self.irq
        )
    }
}

impl VirtioDevices {
    /// A virtio-blk device on `backend`, placed in the next slot (its
    /// counters kept); returns where.
    fn add_block(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        place: &mut Placement<'_>,
        resampler: &mut InterruptResampler,
        backend: DiskBackend,
        config: BlockConfig,
    ) -> Result<String, DeviceError> {
        let mut block = VirtioBlock::new(backend, config).map_err(DeviceError::EventFd)?;
        self.disk_counters.push(block.counters());
        self.trim_workers.extend(block.take_trim_worker());
        let block = Arc::new(Mutex::new(block));
        self.event_manager.add_subscriber(block.clone());
        self.attach(vm, mem, place, resampler, block)
    }

    /// Places `device` in the next slot and records where; returns its
    /// description.
    fn attach<D: VirtioDevice + 'static>(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        place: &mut Placement<'_>,
        resampler: &mut InterruptResampler,
        device: Arc<Mutex<D>>,
    ) -> Result<String, DeviceError> {
        let at = match place {
            Placement::Mmio(bus) => {
                let slot = attach_mmio(vm, mem, bus, resampler, device, self.slots.len())?;
                self.cmdline.push(slot.cmdline());
                self.slots.push(slot);
                Location::Mmio(slot)
            }
            Placement::Pci(pci) => Location::Pci(pci.attach(vm, mem, resampler, device)?),
        };
        self.locations.push(at);
        Ok(at.describe())
    }
}

/// Places `device` in virtio-mmio slot `slot`.
fn attach_mmio<D: VirtioDevice + 'static>(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    resampler: &mut InterruptResampler,
    device: Arc<Mutex<D>>,
    slot: usize,
) -> Result<MmioSlot, DeviceError> {
    let irq = VIRTIO_IRQ_BASE + slot as u32;
    if irq > VIRTIO_IRQ_LAST {
        return Err(DeviceError::NoIrq(slot));
    }
    let base = MMIO_DEVICES_START + slot as u64 * MMIO_WINDOW;
    let queues = lock(&device).queue_max_sizes().len();
    let mut queue_evts = Vec::with_capacity(queues);
    for q in 0..queues {
        let evt = eventfd()?;
        vm.register_mmio_notify(&evt, base + NOTIFY_OFFSET, q as u32)?;
        queue_evts.push(evt);
    }
    let interrupt = Arc::new(match vm.level_irq_line(irq) {
        Ok((evt, resample)) => Interrupt::with_resample(evt, resample),
        Err(e) => {
            // An edge line works too, but loses an edge that arrives while
            // the guest has the pin masked until the device's next event.
            log::warn!("virtio-mmio slot {slot}: no level-triggered line ({e}); using an edge");
            Interrupt::new(vm.irq_line(irq)?)
        }
    });
    resampler.add(interrupt.clone());
    let transport = MmioTransport::new(mem.clone(), device, interrupt, queue_evts);
    mmio.insert(Arc::new(Mutex::new(transport)), base, MMIO_WINDOW)?;
    Ok(MmioSlot {
        base,
        len: MMIO_WINDOW,
        irq,
    })
}

fn lock<D: ?Sized>(m: &Mutex<D>) -> std::sync::MutexGuard<'_, D> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the device thread: all virtio queue work happens here, never on a
/// vCPU thread. With a `poll` window, after handling events the thread
/// keeps checking for more (a non-blocking epoll_wait) until `poll` passes
/// without any, and only then sleeps: the guest's next notification or the
/// next I/O completion is then picked up without a wake-up.
pub fn start_device_thread(mut em: DeviceEventManager, poll: Duration) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("keel-devices".into())
        .spawn(move || {
            crate::seccomp::confine(crate::seccomp::ThreadKind::Device);
            device_loop(&mut em, poll)
        })
        .map(|_| ())
}

/// Starts each disk's trim worker on a thread of its own (`keel-trimN`),
/// confined as [`ThreadKind::Trim`](crate::seccomp::ThreadKind::Trim).
pub fn start_trim_workers(workers: Vec<TrimWorker>) -> std::io::Result<()> {
    for (i, w) in workers.into_iter().enumerate() {
        std::thread::Builder::new()
            .name(format!("keel-trim{i}"))
            .spawn(move || {
                crate::seccomp::confine(crate::seccomp::ThreadKind::Trim);
                w.run()
            })?;
    }
    Ok(())
}

fn device_loop(em: &mut DeviceEventManager, poll: Duration) -> ! {
    loop {
        if let Err(e) = em.run() {
            log::error!("device event loop: {e:?}");
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let mut last = Instant::now();
        while last.elapsed() < poll {
            match em.run_with_timeout(0) {
                Ok(0) => std::hint::spin_loop(),
                Ok(_) => last = Instant::now(),
                Err(_) => break,
            }
        }
    }
}

/// The legacy devices and the VMM's handles on them.
pub struct LegacyDevices {
    /// COM1.
    pub serial: Arc<Mutex<Serial>>,
    /// Watchers of COM1's output (API console clients).
    pub console_hub: Arc<ConsoleHub>,
    /// COM1's counters.
    pub serial_counters: Arc<SerialCounters>,
    /// The keyboard controller (Ctrl-Alt-Del).
    pub i8042: Arc<Mutex<I8042>>,
    /// Boot milestones recorded so far.
    pub milestones: Arc<Mutex<Vec<Milestone>>>,
    /// The ACPI Generic Event Device (the power button).
    pub ged: Arc<Mutex<Ged>>,
    /// Signalled when the guest resets (i8042 or the ACPI reset register).
    pub reset_evt: EventFd,
    /// Signalled when the guest enters S5.
    pub power_off_evt: EventFd,
}

fn eventfd() -> Result<EventFd, DeviceError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)
}

fn trigger(evt: &EventFd) -> Result<EventFdTrigger, DeviceError> {
    EventFdTrigger::try_clone_from(evt).map_err(DeviceError::EventFd)
}

/// Builds the serial port, i8042, CMOS RTC, boot timer, ACPI power
/// registers and GED, and puts them on `pio`. `mem_size` is the guest's
/// RAM (the CMOS memory-size bytes).
pub fn setup_legacy_devices(
    vm: &Vm,
    pio: &mut Bus,
    serial: &SerialConfig,
    start: Instant,
    mem_size: u64,
) -> Result<LegacyDevices, DeviceError> {
    let sink = match serial {
        SerialConfig::Stdout => SerialSink::Stdout(std::io::stdout()),
        SerialConfig::Off => SerialSink::Off,
        SerialConfig::File {
            path,
            max_size,
            max_backups,
        } => SerialSink::file(path, max_size.bytes(), *max_backups).map_err(|source| {
            DeviceError::SerialLog {
                path: path.display().to_string(),
                source,
            }
        })?,
    };
    let com1_irq = vm.irq_line(COM1_IRQ)?;
    let console_hub = Arc::new(ConsoleHub::default());
    let com1 = Serial::with_hub(EventFdTrigger(com1_irq), sink, console_hub.clone());
    let serial_counters = com1.counters();
    let serial = Arc::new(Mutex::new(com1));
    pio.insert(serial.clone(), COM1_PORT, SERIAL_PORT_LEN)?;

    let reset_evt = eventfd()?;
    let kbd_irq = vm.irq_line(KBD_IRQ)?;
    let i8042 = Arc::new(Mutex::new(I8042::new(
        EventFdTrigger(kbd_irq),
        trigger(&reset_evt)?,
    )));
    pio.insert(i8042.clone(), I8042_PORT_DATA, I8042_PORT_LEN)?;

    let timer = BootTimer::new(start);
    let milestones = timer.milestones();
    pio.insert(Arc::new(Mutex::new(timer)), BOOT_TIMER_PORT, 1)?;

    let below_4g = mem_size.min(MMIO_HOLE_START);
    let rtc = Cmos::new(below_4g, mem_size - below_4g);
    pio.insert(Arc::new(Mutex::new(rtc)), RTC_PORT, RTC_PORT_LEN)?;

    let power_off_evt = eventfd()?;
    let power = PowerRegisters::new(trigger(&power_off_evt)?, trigger(&reset_evt)?);
    pio.insert(Arc::new(Mutex::new(power)), POWER_PORT, POWER_PORT_LEN)?;

    let ged = Arc::new(Mutex::new(Ged::new(EventFdTrigger(vm.irq_line(GED_IRQ)?))));
    pio.insert(ged.clone(), GED_PORT, 1)?;

    Ok(LegacyDevices {
        serial,
        console_hub,
        serial_counters,
        i8042,
        milestones,
        ged,
        reset_evt,
        power_off_evt,
    })
}
