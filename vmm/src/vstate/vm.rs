//! The KVM VM: capabilities, guest memory slots, in-kernel irqchip and PIT,
//! interrupt lines as irqfds.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use std::sync::Arc;

use kvm_ioctls::{Cap, IoEventAddress, Kvm, NoDatamatch, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// Where KVM puts the real-mode TSS it needs on Intel (3 pages, in the hole).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Errors of creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    /// KVM lacks a capability Keel needs.
    #[error("KVM lacks the {0:?} capability")]
    MissingCap(Cap),
    /// A KVM ioctl failed.
    #[error("{0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// More vCPUs than KVM allows.
    #[error("{wanted} vCPUs requested but KVM allows at most {max}")]
    TooManyVcpus {
        /// Requested.
        wanted: u32,
        /// KVM's limit.
        max: usize,
    },
}

const REQUIRED_CAPS: [Cap; 6] = [
    Cap::Irqchip,
    Cap::Ioeventfd,
    Cap::Irqfd,
    Cap::UserMemory,
    Cap::SetTssAddr,
    Cap::Pit2,
];

/// An open VM with memory and interrupt controllers in place.
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
}

impl Vm {
    /// Opens KVM, checks its capabilities and creates a VM able to hold
    /// `vcpus` vCPUs.
    pub fn new(vcpus: u32) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        for cap in REQUIRED_CAPS {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(cap));
            }
        }
        let max = kvm.get_max_vcpus();
        if vcpus as usize > max {
            return Err(VmError::TooManyVcpus { wanted: vcpus, max });
        }
        let fd = kvm.create_vm().map_err(|e| VmError::Kvm("create VM", e))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(|e| VmError::Kvm("set TSS address", e))?;
        fd.create_irq_chip()
            .map_err(|e| VmError::Kvm("create irqchip", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| VmError::Kvm("create PIT", e))?;
        Ok(Vm {
            kvm,
            fd: Arc::new(fd),
        })
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM handle.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The VM handle, for what changes KVM's view while the VM runs (BAR
    /// moves, MSI routes).
    pub fn shared_fd(&self) -> Arc<VmFd> {
        self.fd.clone()
    }

    /// Registers every region of `mem` as a KVM memory slot.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region's host mapping lives as long as `mem`, which
            // the VMM keeps for the whole life of the VM, and slots do not
            // overlap (the regions of a GuestMemoryMmap never do).
            unsafe { self.fd.set_user_memory_region(r) }
                .map_err(|e| VmError::Kvm("set memory region", e))?;
        }
        Ok(())
    }

    /// Makes KVM signal `evt` (without leaving the guest) when the guest
    /// writes the 32-bit value `datamatch` at MMIO address `addr`.
    pub fn register_mmio_notify(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &kvm_ioctls::IoEventAddress::Mmio(addr), datamatch)
            .map_err(|e| VmError::Kvm("register ioeventfd", e))
    }

    /// Makes KVM signal `evt` when the guest writes anything, of any size,
    /// at MMIO address `addr` (a virtio-pci queue's notification address).
    pub fn register_pci_notify(&self, evt: &EventFd, addr: u64) -> Result<(), VmError> {
        pci_notify(&self.fd, evt, addr, true)
    }

    /// An eventfd that raises interrupt line `gsi` when written (an edge).
    pub fn irq_line(&self, gsi: u32) -> Result<EventFd, VmError> {
        let evt = new_eventfd()?;
        self.fd
            .register_irqfd(&evt, gsi)
            .map_err(|e| VmError::Kvm("register irqfd", e))?;
        Ok(evt)
    }

    /// A level-triggered line `gsi`: writing the first eventfd asserts it;
    /// KVM lowers it at the guest's EOI and then signals the second
    /// (`KVM_IRQFD_FLAG_RESAMPLE`), where the device asserts it again if it
    /// still has a reason to.
    pub fn level_irq_line(&self, gsi: u32) -> Result<(EventFd, EventFd), VmError> {
        let evt = new_eventfd()?;
        let resample = new_eventfd()?;
        self.fd
            .register_irqfd_with_resample(&evt, &resample, gsi)
            .map_err(|e| VmError::Kvm("register irqfd with resample", e))?;
        Ok((evt, resample))
    }
}

/// Registers (`on`) or unregisters `evt` as the ioeventfd of any write at
/// MMIO `addr` (no data match, any length).
pub fn pci_notify(fd: &VmFd, evt: &EventFd, addr: u64, on: bool) -> Result<(), VmError> {
    let at = IoEventAddress::Mmio(addr);
    if on {
        fd.register_ioevent(evt, &at, NoDatamatch)
            .map_err(|e| VmError::Kvm("register ioeventfd", e))
    } else {
        fd.unregister_ioevent(evt, &at, NoDatamatch)
            .map_err(|e| VmError::Kvm("unregister ioeventfd", e))
    }
}

/// A new non-blocking eventfd.
pub fn new_eventfd() -> Result<EventFd, VmError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|e| {
        VmError::Kvm(
            "eventfd",
            kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(0)),
        )
    })
}
