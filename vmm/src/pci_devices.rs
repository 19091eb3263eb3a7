//! The virtio devices of a PCI machine (`machine.transport = "pci"`): each
//! behind a virtio-pci transport in its own slot of bus 0, in the order
//! they are attached (slot 1 first).
//!
//! Per device: BAR 0 (64-bit, [`BAR_SIZE`]) from the 64-bit window above
//! RAM, decoded through the [`BarSpace`] windows on the MMIO bus; one KVM
//! ioeventfd per queue at BAR 0 + [`NOTIFY_OFFSET`] + 4 × queue (any write,
//! any size); an INTx line (level, with resample) on the slot's
//! [`pci_intx_gsi`]; and one MSI GSI with an irqfd per MSI-X vector (one per
//! queue plus configuration), routed while the vector may deliver. When the
//! guest moves BAR 0 or switches its memory decoding, the ioeventfds and
//! the window entry follow (on the vCPU thread that wrote the register).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use devices::bus::Bus;
use devices::pci::access::{BarMoveHandler, PciConfigIo, PciConfigMmio, CONFIG_IO_LEN};
use devices::pci::bars::{BarAllocError, BarAllocator};
use devices::pci::msix::MsiMessage;
use devices::pci::windows::BarSpace;
use devices::pci::{BarKind, BarMove, PciRoot};
use devices::virtio::pci::{
    PciTransport, BAR_SIZE, MAX_QUEUES, NOTIFY_MULTIPLIER, NOTIFY_OFFSET, VIRTIO_PCI_DEVICE_BASE,
};
use devices::virtio::pci_vectors::{MsiDelivery, PciVectors};
use devices::virtio::{Interrupt, InterruptResampler, VirtioDevice};
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{
    pci_intx_gsi, pci_mmio64_window, PCI_CONFIG_IO_PORT, PCI_ECAM_SIZE, PCI_ECAM_START,
    PCI_MMIO32_SIZE, PCI_MMIO32_START,
};
use crate::vstate::irq_routing::{GsiRouter, RoutingError};
use crate::vstate::vm::{new_eventfd, pci_notify, Vm, VmError};

/// Why a device cannot go on the PCI bus.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// No room for its BAR.
    #[error(transparent)]
    Bar(#[from] BarAllocError),
    /// No GSI or route for its vectors.
    #[error(transparent)]
    Routing(#[from] RoutingError),
    /// A KVM call failed.
    #[error(transparent)]
    Kvm(#[from] VmError),
    /// Its configuration header cannot be built.
    #[error("configuration header: {0}")]
    Header(devices::pci::ConfigError),
    /// Bus 0 is full.
    #[error(transparent)]
    Slots(#[from] devices::pci::root::RootError),
    /// More queues than the notification area has room for.
    #[error("{0} queues (virtio-pci takes at most {MAX_QUEUES})")]
    Queues(usize),
    /// Its BAR overlaps another.
    #[error(transparent)]
    Bus(#[from] devices::bus::BusError),
    /// An eventfd could not be duplicated.
    #[error("cannot duplicate an eventfd: {0}")]
    EventFd(std::io::Error),
}

/// Where one device sits on the PCI bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciSlot {
    /// Device number on bus 0 (function 0).
    pub slot: u8,
    /// BAR 0's address as placed.
    pub bar: u64,
    /// The INTx (INTA#) line's GSI.
    pub intx_gsi: u32,
    /// PCI device ID (0x1040 + virtio type).
    pub device_id: u16,
}

impl PciSlot {
    /// The device's place as `GET /v1/vm` and the log show it.
    pub fn location(&self) -> String {
        format!(
            "pci 0000:00:{:02x}.0 ({:04x}:{:04x}) bar0 {:#x} intx gsi {}",
            self.slot,
            devices::virtio::pci::VIRTIO_PCI_VENDOR,
            self.device_id,
            self.bar,
            self.intx_gsi
        )
    }
}

/// What a BAR move needs of a placed device.
struct Placed {
    transport: Arc<Mutex<PciTransport>>,
    /// Duplicates of its queues' notification eventfds.
    notify: Vec<EventFd>,
}

/// The MSI side of one device: a GSI and an irqfd per vector.
struct VectorRoutes {
    router: Arc<GsiRouter>,
    gsis: Vec<u32>,
    irqfds: Vec<EventFd>,
}

impl MsiDelivery for VectorRoutes {
    fn set_routes(&self, routes: &[Option<MsiMessage>]) {
        let pairs: Vec<(u32, Option<MsiMessage>)> = self
            .gsis
            .iter()
            .copied()
            .zip(routes.iter().copied())
            .collect();
        if let Err(e) = self.router.set_msi(&pairs) {
            log::error!("virtio-pci: cannot update MSI routes: {e}");
        }
    }

    fn trigger(&self, vector: u16) {
        if let Some(fd) = self.irqfds.get(usize::from(vector)) {
            if let Err(e) = fd.write(1) {
                log::error!("virtio-pci: cannot send MSI vector {vector}: {e}");
            }
        }
    }
}

/// Bus 0 while devices are attached; [`finish`](Self::finish) puts it on
/// the buses.
pub struct PciDevices {
    root: PciRoot,
    bars: BarAllocator,
    space: Arc<BarSpace>,
    router: Arc<GsiRouter>,
    vm: Arc<VmFd>,
    windows: [(u64, u64); 2],
    placed: BTreeMap<u8, Placed>,
}

impl PciDevices {
    /// An empty bus 0 (the host bridge only) for a guest with `mem_size`
    /// bytes of RAM.
    pub fn new(vm: &Vm, mem_size: u64) -> Result<Self, PciError> {
        let high = pci_mmio64_window(mem_size);
        let windows = [(PCI_MMIO32_START, PCI_MMIO32_SIZE), (high.start, high.len)];
        Ok(Self {
            root: PciRoot::new(),
            bars: BarAllocator::new(windows[0], windows[1])?,
            space: BarSpace::new(),
            router: Arc::new(GsiRouter::new(vm.shared_fd())?),
            vm: vm.shared_fd(),
            windows,
            placed: BTreeMap::new(),
        })
    }

    /// Puts `device` behind a virtio-pci transport in the next slot.
    pub fn attach<D: VirtioDevice + 'static>(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        resampler: &mut InterruptResampler,
        device: Arc<Mutex<D>>,
    ) -> Result<PciSlot, PciError> {
        let (queues, device_type) = {
            let d = device.lock().unwrap_or_else(|p| p.into_inner());
            (d.queue_max_sizes().len(), d.device_type())
        };
        if queues > MAX_QUEUES {
            return Err(PciError::Queues(queues));
        }
        // Slots are handed out in order; the root confirms it below.
        let slot = u8::try_from(self.placed.len() + 1).unwrap_or(u8::MAX);
        let bar = self.bars.allocate(BAR_SIZE, BarKind::Mem64)?;
        let mut queue_evts = Vec::with_capacity(queues);
        let mut notify = Vec::with_capacity(queues);
        for q in 0..queues {
            let evt = new_eventfd()?;
            vm.register_pci_notify(&evt, notify_addr(bar, q))?;
            notify.push(evt.try_clone().map_err(PciError::EventFd)?);
            queue_evts.push(evt);
        }
        let mut gsis = Vec::with_capacity(queues + 1);
        let mut irqfds = Vec::with_capacity(queues + 1);
        for _ in 0..=queues {
            let gsi = self.router.allocate()?;
            let fd = new_eventfd()?;
            vm.fd()
                .register_irqfd(&fd, gsi)
                .map_err(|e| VmError::Kvm("register MSI irqfd", e))?;
            gsis.push(gsi);
            irqfds.push(fd);
        }
        let vectors = PciVectors::new(
            queues,
            Arc::new(VectorRoutes {
                router: self.router.clone(),
                gsis,
                irqfds,
            }),
        );
        let intx_gsi = pci_intx_gsi(slot, 0);
        let (line, resample) = vm.level_irq_line(intx_gsi)?;
        let interrupt =
            Arc::new(Interrupt::with_resample(line, resample).with_vectors(vectors.clone()));
        resampler.add(interrupt.clone());
        let transport = PciTransport::new(mem.clone(), device, interrupt, queue_evts, bar, vectors)
            .map_err(PciError::Header)?;
        let transport = Arc::new(Mutex::new(transport));
        self.space.insert(transport.clone(), bar, BAR_SIZE)?;
        let got = self.root.add_device(transport.clone())?;
        debug_assert_eq!(got, slot);
        self.placed.insert(got, Placed { transport, notify });
        Ok(PciSlot {
            slot: got,
            bar,
            intx_gsi,
            // Device types are small (< 64): no overflow.
            device_id: VIRTIO_PCI_DEVICE_BASE + device_type as u16,
        })
    }

    /// Puts the bus on the machine: configuration space through the ports
    /// 0xCF8-0xCFF on `pio` and ECAM on `mmio`, and the BAR windows on
    /// `mmio`.
    pub fn finish(self, mmio: &mut Bus, pio: &mut Bus) -> Result<Arc<PciRoot>, PciError> {
        let root = Arc::new(self.root);
        for (base, len) in self.windows {
            mmio.insert(Arc::new(Mutex::new(self.space.window(base))), base, len)?;
        }
        let mover = Mover {
            space: self.space,
            vm: self.vm,
            windows: self.windows,
            placed: self.placed,
        };
        let on_move: BarMoveHandler = Arc::new(move |device, m| mover.moved(device, m));
        let io = PciConfigIo::new(root.clone(), on_move.clone());
        pio.insert(
            Arc::new(Mutex::new(io)),
            u64::from(PCI_CONFIG_IO_PORT),
            CONFIG_IO_LEN,
        )?;
        let ecam = PciConfigMmio::new(root.clone(), on_move);
        mmio.insert(Arc::new(Mutex::new(ecam)), PCI_ECAM_START, PCI_ECAM_SIZE)?;
        Ok(root)
    }
}

/// Queue `q`'s notification address with BAR 0 at `bar`.
fn notify_addr(bar: u64, q: usize) -> u64 {
    bar + NOTIFY_OFFSET + u64::from(NOTIFY_MULTIPLIER) * q as u64
}

/// Follows the guest's BAR moves.
struct Mover {
    space: Arc<BarSpace>,
    vm: Arc<VmFd>,
    windows: [(u64, u64); 2],
    placed: BTreeMap<u8, Placed>,
}

impl Mover {
    fn in_windows(&self, addr: u64) -> bool {
        self.windows
            .iter()
            .any(|&(base, len)| addr >= base && addr.saturating_add(BAR_SIZE) <= base + len)
    }

    fn moved(&self, device: u8, m: BarMove) {
        let Some(p) = self.placed.get(&device) else {
            log::warn!(
                "pci: BAR {} of device {device} changed, but it has none",
                m.index
            );
            return;
        };
        if m.index != 0 {
            return;
        }
        if let Some(old) = m.old.filter(|&a| self.in_windows(a)) {
            self.space.remove(old);
            self.notifications(p, old, false);
        }
        match m.new {
            Some(new) if self.in_windows(new) => {
                if let Err(e) = self.space.insert(p.transport.clone(), new, BAR_SIZE) {
                    log::warn!("pci: device {device}: BAR 0 at {new:#x} not decoded: {e}");
                    return;
                }
                self.notifications(p, new, true);
                log::info!("pci: device {device}: BAR 0 now at {new:#x}");
            }
            Some(new) => log::warn!(
                "pci: device {device}: BAR 0 moved to {new:#x}, outside the PCI windows: not decoded"
            ),
            None => log::info!("pci: device {device}: BAR 0 no longer decoded"),
        }
    }

    fn notifications(&self, p: &Placed, bar: u64, on: bool) {
        for (q, evt) in p.notify.iter().enumerate() {
            if let Err(e) = pci_notify(&self.vm, evt, notify_addr(bar, q), on) {
                log::error!("pci: queue {q} notification at {bar:#x}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use devices::virtio::block::{BlockConfig, DiskBackend, EngineKind, VirtioBlock};

    use super::*;
    use crate::vstate::memory;

    const ECAM_SLOT1: u64 = PCI_ECAM_START + (1 << 15);

    fn r32(bus: &Bus, addr: u64) -> u32 {
        let mut b = [0u8; 4];
        assert!(bus.read(addr, &mut b), "nothing at {addr:#x}");
        u32::from_le_bytes(b)
    }

    fn w32(bus: &Bus, addr: u64, v: u32) {
        assert!(bus.write(addr, &v.to_le_bytes()));
    }

    /// A disk behind virtio-pci in slot 1; its BAR moves and stops being
    /// decoded as the guest says, and its notification ioeventfds follow
    /// (KVM refuses a second registration of the same eventfd at the same
    /// address, and the removal of one that is not there). Needs /dev/kvm.
    #[test]
    fn devices_take_slots_and_follow_bar_moves() {
        let dir = std::env::temp_dir().join(format!("keel-pci-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("disk.img");
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
        let vm = Vm::new(1).unwrap();
        let (mem, _) =
            memory::create_guest_memory_with(64 << 20, crate::config::HugepagesMode::Off).unwrap();
        let mut pci = PciDevices::new(&vm, 64 << 20).unwrap();
        let backend = DiskBackend::open_locked(&disk, false, false, false).unwrap();
        let config = BlockConfig {
            serial: None,
            engine: EngineKind::Sync,
            cow: None,
            num_queues: 1,
        };
        let block = Arc::new(Mutex::new(VirtioBlock::new(backend, config).unwrap()));
        let mut resampler = InterruptResampler::new();
        let at = pci.attach(&vm, &mem, &mut resampler, block).unwrap();
        assert_eq!((at.slot, at.device_id, at.intx_gsi), (1, 0x1042, 17));
        assert_eq!(at.bar, pci_mmio64_window(64 << 20).start);
        assert_eq!(resampler.len(), 1, "the INTx line is level-triggered");
        let evt = pci.placed[&1].notify[0].try_clone().unwrap();
        let (mut mmio, mut pio) = (Bus::new(), Bus::new());
        pci.finish(&mut mmio, &mut pio).unwrap();
        // Host bridge and the disk, through the ports and ECAM.
        w32(&pio, u64::from(PCI_CONFIG_IO_PORT), 0x8000_0800);
        assert_eq!(r32(&pio, u64::from(PCI_CONFIG_IO_PORT) + 4), 0x1042_1af4);
        assert_eq!(r32(&mmio, PCI_ECAM_START), 0x0d57_8086);
        assert_eq!(r32(&mmio, ECAM_SLOT1 + 0x14), (at.bar >> 32) as u32);
        assert_eq!(r32(&mmio, PCI_ECAM_START + (2 << 15)), u32::MAX);
        // num_queues in the common configuration, at the BAR.
        assert_eq!(r32(&mmio, at.bar + 0x12) & 0xffff, 1);
        let fd = vm.shared_fd();
        let registered = |addr| pci_notify(&fd, &evt, addr + NOTIFY_OFFSET, true).is_err();
        assert!(registered(at.bar), "the notification ioeventfd is in place");
        // Move BAR 0 up by 1 MiB.
        let new = at.bar + (1 << 20);
        w32(&mmio, ECAM_SLOT1 + 0x10, (new as u32) | 0xc);
        w32(&mmio, ECAM_SLOT1 + 0x14, (new >> 32) as u32);
        assert_eq!(
            r32(&mmio, new + 0x12) & 0xffff,
            1,
            "served at the new address"
        );
        assert_eq!(
            r32(&mmio, at.bar + 0x12),
            u32::MAX,
            "nothing at the old one"
        );
        assert!(registered(new), "notifications moved");
        assert!(
            pci_notify(&fd, &evt, at.bar + NOTIFY_OFFSET, false).is_err(),
            "none left at the old address"
        );
        // Memory decoding off: not decoded, no ioeventfd; on again: back.
        w32(&mmio, ECAM_SLOT1 + 0x04, 0);
        assert_eq!(r32(&mmio, new + 0x12), u32::MAX);
        assert!(pci_notify(&fd, &evt, new + NOTIFY_OFFSET, false).is_err());
        w32(&mmio, ECAM_SLOT1 + 0x04, 0x6);
        assert_eq!(r32(&mmio, new + 0x12) & 0xffff, 1);
        assert!(registered(new));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A four-queue disk: num_queues in the common and the device
    /// configuration, an MSI-X table of five vectors (one per queue and the
    /// configuration's), and a notification
    /// ioeventfd at every queue's address. Needs /dev/kvm.
    #[test]
    fn a_multi_queue_disk_gets_a_vector_and_an_ioeventfd_per_queue() {
        let dir = std::env::temp_dir().join(format!("keel-pci-mq-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("disk.img");
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
        let vm = Vm::new(2).unwrap();
        let (mem, _) =
            memory::create_guest_memory_with(64 << 20, crate::config::HugepagesMode::Off).unwrap();
        let mut pci = PciDevices::new(&vm, 64 << 20).unwrap();
        let backend = DiskBackend::open_locked(&disk, false, false, false).unwrap();
        let config = BlockConfig {
            num_queues: 4,
            ..BlockConfig::default()
        };
        let block = Arc::new(Mutex::new(VirtioBlock::new(backend, config).unwrap()));
        let mut resampler = InterruptResampler::new();
        let at = pci.attach(&vm, &mem, &mut resampler, block).unwrap();
        let notify: Vec<EventFd> = pci.placed[&1]
            .notify
            .iter()
            .map(|e| e.try_clone().unwrap())
            .collect();
        assert_eq!(notify.len(), 4);
        let (mut mmio, mut pio) = (Bus::new(), Bus::new());
        pci.finish(&mut mmio, &mut pio).unwrap();
        assert_eq!(r32(&mmio, at.bar + 0x12) & 0xffff, 4, "common num_queues");
        let device_cfg = at.bar + devices::virtio::pci::DEVICE_CFG_OFFSET;
        assert_eq!(
            r32(&mmio, device_cfg + 32) >> 16,
            4,
            "virtio_blk_config.num_queues"
        );
        // The MSI-X capability (ID 0x11) in the capability list.
        let mut cap = r32(&mmio, ECAM_SLOT1 + 0x34) & 0xff;
        let control = loop {
            assert_ne!(cap, 0, "no MSI-X capability");
            let head = r32(&mmio, ECAM_SLOT1 + u64::from(cap));
            if head & 0xff == 0x11 {
                break head >> 16;
            }
            cap = (head >> 8) & 0xff;
        };
        assert_eq!((control & 0x7ff) + 1, 5, "MSI-X table size");
        let fd = vm.shared_fd();
        for (q, evt) in notify.iter().enumerate() {
            assert!(
                pci_notify(&fd, evt, notify_addr(at.bar, q), true).is_err(),
                "queue {q}'s ioeventfd is in place"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
