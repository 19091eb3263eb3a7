//! KVM's GSI routing table, kept whole in one place. `KVM_SET_GSI_ROUTING`
//! replaces the entire table, so the table always holds KVM's default
//! entries (GSIs 0-15 on the PICs and the I/O APIC, 16-23 on the I/O APIC:
//! the legacy devices' and the virtio lines' irqfds go through them) plus
//! one MSI entry per virtio-pci vector that may deliver. GSIs for MSI
//! vectors come from rust-vmm's `vm-allocator`, above the I/O APIC's pins.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use devices::pci::msix::MsiMessage;
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_IRQ_ROUTES,
};
use kvm_ioctls::VmFd;
use vm_allocator::IdAllocator;

use super::vm::VmError;

/// I/O APIC pins, hence the GSIs of KVM's default routes (0-23).
pub const IOAPIC_PINS: u32 = 24;
/// GSIs below this are also routed to the PICs.
const PIC_LINES: u32 = 16;

/// Why a route cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    /// No GSI left for another MSI vector.
    #[error("no GSI left for an MSI vector: {0}")]
    NoGsi(vm_allocator::Error),
    /// The table does not fit KVM's.
    #[error("GSI routing table: {0:?}")]
    Table(vmm_sys_util::fam::Error),
    /// KVM refused the table.
    #[error(transparent)]
    Kvm(#[from] VmError),
}

struct Table {
    gsis: IdAllocator,
    msi: BTreeMap<u32, MsiMessage>,
}

/// The VM's GSI routing table.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    table: Mutex<Table>,
}

impl GsiRouter {
    /// A table of KVM's default routes for the VM `vm`.
    pub fn new(vm: Arc<VmFd>) -> Result<Self, RoutingError> {
        let gsis = IdAllocator::new(IOAPIC_PINS, KVM_MAX_IRQ_ROUTES as u32 - 1)
            .map_err(RoutingError::NoGsi)?;
        Ok(Self {
            vm,
            table: Mutex::new(Table {
                gsis,
                msi: BTreeMap::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A GSI for an MSI vector (no route until [`set_msi`](Self::set_msi)).
    pub fn allocate(&self) -> Result<u32, RoutingError> {
        self.lock().gsis.allocate_id().map_err(RoutingError::NoGsi)
    }

    /// Routes each GSI of `routes` to its message, or removes its route
    /// (`None`), and hands KVM the whole table.
    pub fn set_msi(&self, routes: &[(u32, Option<MsiMessage>)]) -> Result<(), RoutingError> {
        let mut t = self.lock();
        for &(gsi, msg) in routes {
            match msg {
                Some(m) => t.msi.insert(gsi, m),
                None => t.msi.remove(&gsi),
            };
        }
        let entries = entries(&t.msi);
        let table = KvmIrqRouting::from_entries(&entries).map_err(RoutingError::Table)?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| VmError::Kvm("set GSI routing", e))?;
        Ok(())
    }
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

/// KVM's default routes (`kvm_setup_default_irq_routing`) and the MSI ones.
fn entries(msi: &BTreeMap<u32, MsiMessage>) -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::with_capacity(40 + msi.len());
    for gsi in 0..IOAPIC_PINS {
        v.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < PIC_LINES {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            v.push(irqchip(gsi, chip, gsi % 8));
        }
    }
    for (&gsi, m) in msi {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = m.address as u32;
        e.u.msi.address_hi = (m.address >> 32) as u32;
        e.u.msi.data = m.data;
        v.push(e);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chip(e: &kvm_irq_routing_entry) -> (u32, u32, u32) {
        // SAFETY: the entries read here were built as irqchip routes.
        let c = unsafe { e.u.irqchip };
        (e.gsi, c.irqchip, c.pin)
    }

    #[test]
    fn the_table_keeps_kvms_default_routes() {
        let mut msi = BTreeMap::new();
        msi.insert(
            24,
            MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x45,
            },
        );
        let v = entries(&msi);
        // 16 GSIs on both chips, 8 on the I/O APIC only, one MSI.
        assert_eq!(v.len(), 16 * 2 + 8 + 1);
        let chips: Vec<_> = v
            .iter()
            .filter(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP)
            .map(chip)
            .collect();
        assert!(chips.contains(&(5, KVM_IRQCHIP_IOAPIC, 5)));
        assert!(chips.contains(&(23, KVM_IRQCHIP_IOAPIC, 23)));
        let pics: Vec<_> = chips
            .into_iter()
            .filter(|c| c.1 != KVM_IRQCHIP_IOAPIC)
            .collect();
        assert_eq!(pics.len(), 16);
        assert!(pics.contains(&(10, KVM_IRQCHIP_PIC_SLAVE, 2)));
        assert!(pics.contains(&(3, KVM_IRQCHIP_PIC_MASTER, 3)));
        let m = v.last().unwrap();
        assert_eq!((m.gsi, m.type_), (24, KVM_IRQ_ROUTING_MSI));
        // SAFETY: built as an MSI route just above.
        let r = unsafe { m.u.msi };
        assert_eq!((r.address_lo, r.address_hi, r.data), (0xfee0_1000, 1, 0x45));
    }

    /// KVM takes the table (needs /dev/kvm; run as root).
    #[test]
    fn kvm_takes_msi_routes_and_gsis_are_unique() {
        let vm = crate::vstate::vm::Vm::new(1).unwrap();
        let r = GsiRouter::new(vm.shared_fd()).unwrap();
        let (a, b) = (r.allocate().unwrap(), r.allocate().unwrap());
        assert_eq!((a, b), (24, 25));
        let m = MsiMessage {
            address: 0xfee0_0000,
            data: 0x41,
        };
        r.set_msi(&[(a, Some(m)), (b, Some(m))]).unwrap();
        r.set_msi(&[(a, None)]).unwrap();
        assert_eq!(r.lock().msi.len(), 1);
    }
}
