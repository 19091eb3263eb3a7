//! A virtio-pci function's interrupt vectors: its MSI-X table, which
//! vector the driver gave each queue and configuration changes, and the
//! delivery of a device's signal through them.
//!
//! Shared between the transport (the vCPU thread: the driver's register
//! writes) and the device's [`Interrupt`](super::Interrupt) (the device
//! thread: [`VectorSink::signal`]). A vector that may deliver (MSI-X
//! enabled, neither the function nor the vector masked) has a route, which
//! the VMM's [`MsiDelivery`] keeps in KVM's routing table; a signal for a
//! masked vector sets its pending bit in the PBA and goes out when the
//! driver unmasks it.

use std::sync::{Arc, Mutex, MutexGuard};

use super::{InterruptSource, VectorSink};
use crate::pci::msix::{MsiMessage, MsixTable, MsixUpdate};

/// "No vector" in the vector registers.
pub const NO_VECTOR: u16 = 0xffff;

/// What the VMM does with vectors: routes and sends them.
pub trait MsiDelivery: Send + Sync {
    /// Makes the device's routes what `routes` says, by vector: the message
    /// of each vector that may deliver now, `None` for the others.
    fn set_routes(&self, routes: &[Option<MsiMessage>]);
    /// Sends `vector` (its route is in place).
    fn trigger(&self, vector: u16);
}

struct State {
    table: MsixTable,
    config_vector: u16,
    queue_vectors: Vec<u16>,
    /// The routes last handed to the delivery.
    routes: Vec<Option<MsiMessage>>,
}

/// A function's vectors: one per queue plus one for configuration.
pub struct PciVectors {
    state: Mutex<State>,
    delivery: Arc<dyn MsiDelivery>,
}

impl std::fmt::Debug for PciVectors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciVectors").finish_non_exhaustive()
    }
}

impl PciVectors {
    /// Vectors for a device with `queues` queues, delivered by `delivery`;
    /// MSI-X starts disabled, every vector masked, no source has a vector.
    pub fn new(queues: usize, delivery: Arc<dyn MsiDelivery>) -> Arc<Self> {
        let vectors = u16::try_from(queues.saturating_add(1)).unwrap_or(u16::MAX);
        let table = MsixTable::new(vectors);
        let n = table.len();
        Arc::new(PciVectors {
            state: Mutex::new(State {
                table,
                config_vector: NO_VECTOR,
                queue_vectors: vec![NO_VECTOR; queues],
                routes: vec![None; n],
            }),
            delivery,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of vectors in the table.
    pub fn len(&self) -> usize {
        self.lock().table.len()
    }

    /// Whether the table is empty (never: at least one vector).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of queues with a vector register.
    pub fn queues(&self) -> usize {
        self.lock().queue_vectors.len()
    }

    /// The MSI-X capability's body and write mask (see
    /// [`MsixTable::capability`]).
    pub fn capability(&self, bar: u8, table: u32, pba: u32) -> ([u8; 12], [u8; 12]) {
        self.lock().table.capability(bar, table, pba)
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.lock().table.enabled()
    }

    /// The vector a vector register would read back after the driver wrote
    /// `v`: `v` if the table has it, else [`NO_VECTOR`].
    fn checked(s: &State, v: u16) -> u16 {
        if usize::from(v) < s.table.len() {
            v
        } else {
            NO_VECTOR
        }
    }

    /// The vector of configuration changes.
    pub fn config_vector(&self) -> u16 {
        self.lock().config_vector
    }

    /// The driver writes the configuration vector register.
    pub fn set_config_vector(&self, v: u16) {
        let mut s = self.lock();
        s.config_vector = Self::checked(&s, v);
    }

    /// The vector of queue `q` ([`NO_VECTOR`] for none or no such queue).
    pub fn queue_vector(&self, q: usize) -> u16 {
        self.lock()
            .queue_vectors
            .get(q)
            .copied()
            .unwrap_or(NO_VECTOR)
    }

    /// The driver writes queue `q`'s vector register.
    pub fn set_queue_vector(&self, q: usize, v: u16) {
        let mut s = self.lock();
        let v = Self::checked(&s, v);
        if let Some(slot) = s.queue_vectors.get_mut(q) {
            *slot = v;
        }
    }

    /// Device reset: no source has a vector any more (the table itself is
    /// the PCI function's and stays).
    pub fn reset(&self) {
        let mut s = self.lock();
        s.config_vector = NO_VECTOR;
        s.queue_vectors.fill(NO_VECTOR);
    }

    /// A guest read of the table.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        self.lock().table.read_table(offset, data);
    }

    /// A guest read of the PBA.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        self.lock().table.read_pba(offset, data);
    }

    /// A guest write of the table: routes follow the messages and masks,
    /// and a vector unmasked with its pending bit set goes out.
    pub fn write_table(&self, offset: u64, data: &[u8]) {
        let mut s = self.lock();
        let updates = s.table.write_table(offset, data);
        self.sync_routes(&mut s);
        for u in updates {
            if let MsixUpdate::DeliverPending(v) = u {
                self.delivery.trigger(v);
            }
        }
    }

    /// The driver wrote the capability's message control (enable, function
    /// mask): routes follow, pending vectors that may deliver now go out.
    pub fn set_control(&self, control: u16) {
        let mut s = self.lock();
        let ready = s.table.set_control(control);
        self.sync_routes(&mut s);
        for v in ready {
            self.delivery.trigger(v);
        }
    }

    /// Hands the delivery the routes of the vectors that may deliver, when
    /// they changed.
    fn sync_routes(&self, s: &mut State) {
        let want: Vec<Option<MsiMessage>> = (0..s.table.len())
            .map(|v| {
                let v = v as u16;
                s.table.may_deliver(v).then(|| s.table.message(v)).flatten()
            })
            .collect();
        if want != s.routes {
            self.delivery.set_routes(&want);
            s.routes = want;
        }
    }
}

impl VectorSink for PciVectors {
    fn signal(&self, source: InterruptSource) -> bool {
        let mut s = self.lock();
        if !s.table.enabled() {
            return false;
        }
        let vector = match source {
            InterruptSource::Queue(q) => s
                .queue_vectors
                .get(usize::from(q))
                .copied()
                .unwrap_or(NO_VECTOR),
            InterruptSource::Config => s.config_vector,
        };
        // No vector: the driver wants no interrupt for this source.
        if vector != NO_VECTOR && s.table.raise(vector) {
            self.delivery.trigger(vector);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what the VMM would do.
    #[derive(Default)]
    struct Recorder {
        routes: Mutex<Vec<Vec<Option<MsiMessage>>>>,
        sent: Mutex<Vec<u16>>,
    }

    impl MsiDelivery for Recorder {
        fn set_routes(&self, routes: &[Option<MsiMessage>]) {
            self.routes.lock().unwrap().push(routes.to_vec());
        }
        fn trigger(&self, vector: u16) {
            self.sent.lock().unwrap().push(vector);
        }
    }

    const ENABLE: u16 = 1 << 15;
    const FMASK: u16 = 1 << 14;

    fn program(v: &PciVectors, vector: u64, data: u32) {
        v.write_table(vector * 16, &0xfee0_0000u32.to_le_bytes());
        v.write_table(vector * 16 + 8, &data.to_le_bytes());
    }

    fn unmask(v: &PciVectors, vector: u64) {
        v.write_table(vector * 16 + 12, &0u32.to_le_bytes());
    }

    fn pba(v: &PciVectors) -> u64 {
        let mut b = [0u8; 8];
        v.read_pba(0, &mut b);
        u64::from_le_bytes(b)
    }

    #[test]
    fn disabled_msix_leaves_the_line_to_intx() {
        let rec = Arc::new(Recorder::default());
        let v = PciVectors::new(2, rec.clone());
        assert_eq!(v.len(), 3);
        v.set_queue_vector(0, 0);
        assert!(!v.signal(InterruptSource::Queue(0)), "INTx");
        assert!(rec.sent.lock().unwrap().is_empty());
    }

    #[test]
    fn each_queue_goes_to_its_vector_once_unmasked() {
        let rec = Arc::new(Recorder::default());
        let v = PciVectors::new(2, rec.clone());
        v.set_config_vector(2);
        v.set_queue_vector(0, 0);
        v.set_queue_vector(1, 1);
        v.set_queue_vector(7, 1); // no such queue: ignored
        v.set_config_vector(9);
        assert_eq!(v.config_vector(), NO_VECTOR, "no vector 9");
        v.set_config_vector(2);
        for n in 0..3 {
            program(&v, n, 0x40 + n as u32);
        }
        v.set_control(ENABLE);
        // Every vector still masked: no route, signals pend.
        assert!(rec.routes.lock().unwrap().is_empty());
        assert!(v.signal(InterruptSource::Queue(1)));
        assert_eq!(pba(&v), 0b010);
        assert!(rec.sent.lock().unwrap().is_empty());
        // Unmasking vector 1 routes it, then delivers the pending signal.
        unmask(&v, 1);
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 0x41,
        };
        assert_eq!(
            rec.routes.lock().unwrap().last().unwrap(),
            &vec![None, Some(msg), None]
        );
        assert_eq!(*rec.sent.lock().unwrap(), [1]);
        assert_eq!(pba(&v), 0);
        unmask(&v, 0);
        unmask(&v, 2);
        assert!(v.signal(InterruptSource::Queue(0)));
        assert!(v.signal(InterruptSource::Config));
        assert_eq!(*rec.sent.lock().unwrap(), [1, 0, 2]);
        // The function mask holds them all back; lifting it delivers.
        v.set_control(ENABLE | FMASK);
        assert_eq!(
            rec.routes.lock().unwrap().last().unwrap(),
            &vec![None, None, None]
        );
        assert!(v.signal(InterruptSource::Queue(0)));
        assert!(v.signal(InterruptSource::Queue(1)));
        assert_eq!(pba(&v), 0b011);
        v.set_control(ENABLE);
        assert_eq!(pba(&v), 0);
        assert_eq!(*rec.sent.lock().unwrap(), [1, 0, 2, 0, 1]);
        // A source without a vector is dropped, not sent on the line.
        v.reset();
        assert_eq!(v.queue_vector(0), NO_VECTOR);
        assert!(v.signal(InterruptSource::Queue(0)));
        assert_eq!(rec.sent.lock().unwrap().len(), 5);
    }
}
