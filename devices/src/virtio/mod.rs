//! Virtio devices (virtio 1.x) and their transports: virtio-mmio
//! ([`mmio`]) and virtio-pci ([`pci`]), both over one [`transport::VirtioCore`].
//!
//! A device implements [`VirtioDevice`]; [`mmio::MmioTransport`] serves its
//! registers to the guest and, once the driver sets DRIVER_OK, hands it the
//! configured queues, their notification eventfds (KVM ioeventfds) and an
//! [`Interrupt`] (a KVM irqfd). From then on the device works on its own
//! thread: the vCPUs never touch a queue.

pub mod block;
pub mod mmio;
pub mod net;
pub mod pci;
pub mod pci_vectors;
#[cfg(test)]
mod test_device;
pub mod transport;
pub mod vsock;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Feature bit: the device complies with virtio 1.x.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Feature bit: indirect descriptors.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 =
    1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// Feature bit: used/avail event index notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Errors of activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up fewer or more queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues given.
        got: usize,
    },
    /// A queue's rings do not lie in guest memory.
    #[error("queue {0} is not valid (size or ring addresses)")]
    InvalidQueue(usize),
    /// Setting up the device's back end failed.
    #[error("device back end: {0}")]
    Backend(String),
}

/// The device's interrupt line (an irqfd) and the transport's
/// INTERRUPT_STATUS register it sets bits in.
///
/// The line is level-triggered when built [`with_resample`](Self::with_resample):
/// KVM holds the I/O APIC pin asserted from a write of the irqfd until the
/// guest's EOI, then lowers it and signals the resample eventfd;
/// [`resample`](Self::resample) asserts it again while a reason is still
/// pending. Nothing is lost while the guest has the pin masked (Linux masks a
/// pin briefly to move its IRQ to another CPU): a masked level pin stays
/// pending in the I/O APIC and fires when unmasked. Built with
/// [`new`](Self::new), each write is an edge.
///
/// A transport with per-source vectors (virtio-pci's MSI-X) puts a
/// [`VectorSink`] in front of the line ([`with_vectors`](Self::with_vectors)):
/// while it takes the signals, the line and INTERRUPT_STATUS stay untouched.
///
/// virtio-pci's INTx disable (the command register's bit 10) switches the
/// line off ([`set_line_disabled`](Self::set_line_disabled)): reasons
/// still collect in INTERRUPT_STATUS, but the line is neither asserted nor
/// asserted again after an EOI; switched on again, a pending reason
/// asserts it at once.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
    resample: Option<EventFd>,
    vectors: Option<Arc<dyn VectorSink>>,
    line_disabled: AtomicBool,
}

/// What an interrupt reports: a queue's used buffers or a configuration
/// change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptSource {
    /// Queue `n` has used buffers.
    Queue(u16),
    /// The device configuration changed.
    Config,
}

/// Per-source interrupt delivery in front of a device's line (virtio-pci's
/// MSI-X vectors).
pub trait VectorSink: Send + Sync + std::fmt::Debug {
    /// Delivers the interrupt of `source` (or records it pending, or drops
    /// it when the driver gave the source no vector) and returns true; false
    /// when the line is to be used instead (MSI-X disabled).
    fn signal(&self, source: InterruptSource) -> bool;
}

impl Interrupt {
    /// An edge-triggered interrupt raised by writing `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
            resample: None,
            vectors: None,
            line_disabled: AtomicBool::new(false),
        }
    }

    /// A level-triggered interrupt: `irqfd` was registered with KVM together
    /// with `resample` (`KVM_IRQFD_FLAG_RESAMPLE`), and the device thread
    /// calls [`resample`](Self::resample) when `resample` is readable (see
    /// [`InterruptResampler`]).
    pub fn with_resample(irqfd: EventFd, resample: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
            resample: Some(resample),
            vectors: None,
            line_disabled: AtomicBool::new(false),
        }
    }

    /// Puts `vectors` in front of the line: each signal goes to it first.
    pub fn with_vectors(mut self, vectors: Arc<dyn VectorSink>) -> Self {
        self.vectors = Some(vectors);
        self
    }

    fn to_vectors(&self, source: InterruptSource) -> bool {
        self.vectors.as_ref().is_some_and(|v| v.signal(source))
    }

    /// Signals "used buffer in queue `queue`" to the driver.
    pub fn signal_used_queue(&self, queue: u16) {
        if !self.to_vectors(InterruptSource::Queue(queue)) {
            self.raise(VIRTIO_MMIO_INT_VRING);
        }
    }

    /// Signals "configuration changed" (e.g. a NIC's link status).
    pub fn signal_config_change(&self) {
        if !self.to_vectors(InterruptSource::Config) {
            self.raise(VIRTIO_MMIO_INT_CONFIG);
        }
    }

    /// Sets `bit` in INTERRUPT_STATUS and asserts the line, also when the bit
    /// was still set: on an edge line, an edge the guest missed while it had
    /// the pin masked is made up for by the next event; on a level line,
    /// asserting an asserted line changes nothing.
    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.assert_line();
    }

    fn assert_line(&self) {
        if self.line_disabled() {
            return;
        }
        if let Err(e) = self.irqfd.write(1) {
            log::error!("virtio: cannot raise interrupt: {e}");
        }
    }

    /// After the guest's EOI lowered a level line: consumes the resample
    /// event and asserts the line again if a reason is still pending (one
    /// raised after the driver read INTERRUPT_STATUS, or never acknowledged).
    pub fn resample(&self) {
        if let Some(r) = &self.resample {
            // Nonblocking: nothing to read just means no EOI since the last call.
            let _ = r.read();
        }
        if self.status() != 0 {
            self.assert_line();
        }
    }

    /// Switches the line off (PCI INTx disable set) or on again. While off,
    /// nothing asserts it; KVM lowers a level line it holds asserted at the
    /// guest's next EOI (user space cannot lower a resampling irqfd's
    /// assertion), and [`resample`](Self::resample) then leaves it down.
    /// Switched on with a reason pending, the line is asserted again.
    pub fn set_line_disabled(&self, disabled: bool) {
        let was = self.line_disabled.swap(disabled, Ordering::SeqCst);
        if was && !disabled && self.status() != 0 {
            self.assert_line();
        }
    }

    /// Whether the line is switched off (PCI INTx disable).
    pub fn line_disabled(&self) -> bool {
        self.line_disabled.load(Ordering::SeqCst)
    }

    /// The resample eventfd of a level line.
    pub fn resample_fd(&self) -> Option<&EventFd> {
        self.resample.as_ref()
    }

    /// The INTERRUPT_STATUS register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// INTERRUPT_ACK: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears everything (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

/// Serves the resample eventfds of level-triggered lines on the device
/// thread: after each EOI, a line with a pending reason is asserted again.
#[derive(Debug, Default)]
pub struct InterruptResampler {
    lines: Vec<Arc<Interrupt>>,
}

impl InterruptResampler {
    /// A resampler for no line yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `line` (ignored when it has no resample eventfd). Call before the
    /// resampler is added to its event manager.
    pub fn add(&mut self, line: Arc<Interrupt>) {
        if line.resample.is_some() {
            self.lines.push(line);
        }
    }

    /// The lines served.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// Whether no line is served.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }
}

impl MutEventSubscriber for InterruptResampler {
    fn init(&mut self, ops: &mut EventOps) {
        for (index, line) in self.lines.iter().enumerate() {
            if let Some(fd) = line.resample_fd() {
                let data = u32::try_from(index).unwrap_or(u32::MAX);
                if let Err(e) = ops.add(Events::with_data(fd, data, EventSet::IN)) {
                    log::error!("virtio: cannot watch interrupt resample eventfd: {e:?}");
                }
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let index = usize::try_from(events.data()).unwrap_or(usize::MAX);
        if let Some(line) = self.lines.get(index) {
            line.resample();
        }
    }
}

/// What a device receives when the driver sets DRIVER_OK.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The configured queues, in index order.
    pub queues: Vec<Queue>,
    /// Their notification eventfds (KVM ioeventfds), in index order.
    pub queue_evts: Vec<EventFd>,
    /// The interrupt line.
    pub interrupt: Arc<Interrupt>,
}

impl ActivateContext {
    /// Checks that the driver set up exactly the device's `expected`
    /// queues, each with its notification eventfd.
    pub fn check_queue_count(&self, expected: usize) -> Result<(), ActivateError> {
        if self.queues.len() != expected || self.queue_evts.len() != expected {
            return Err(ActivateError::QueueCount {
                expected,
                got: self.queues.len(),
            });
        }
        Ok(())
    }
}

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// Virtio device ID (2 = block, 1 = net, 19 = vsock).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers.
    fn avail_features(&self) -> u64;
    /// Records the features the driver accepted (a subset of the offer).
    fn set_acked_features(&mut self, features: u64);
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device on the driver's queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops the device and forgets its queues (driver reset). Returns
    /// false if the device cannot be reset (it then needs a VM restart).
    /// It must not wait (it runs on a vCPU thread): what is still in flight
    /// finishes on the device thread, see [`reset_pending`](Self::reset_pending).
    fn reset(&mut self) -> bool;
    /// Whether a reset has not finished yet (I/O started before it still in
    /// flight): the transport's STATUS reads non-zero until it has, and the
    /// driver waits for a zero (virtio 1.x, 2.4.2).
    fn reset_pending(&self) -> bool {
        false
    }
}

/// Hands activations and resets from the vCPU thread (where the transport
/// runs) to the device thread (where the queues are served): the context
/// waits here until the device thread picks it up, and the state of a reset
/// device stays here (its fds still open) until the device thread has
/// unregistered them from its event loop.
pub struct Handoff<A> {
    evt: EventFd,
    pending: Option<ActivateContext>,
    retired: Vec<A>,
}

impl<A> Handoff<A> {
    /// An empty hand-off.
    pub fn new() -> std::io::Result<Self> {
        Ok(Handoff {
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            pending: None,
            retired: Vec::new(),
        })
    }

    /// Puts the eventfd in the device thread's event loop with `data`
    /// (from a subscriber's `init`); a failure is logged under `device`.
    pub fn watch(&self, ops: &mut event_manager::EventOps, data: u32, device: &str) {
        let ev =
            event_manager::Events::with_data(&self.evt, data, vmm_sys_util::epoll::EventSet::IN);
        if let Err(e) = ops.add(ev) {
            log::error!("{device}: cannot watch activation: {e:?}");
        }
    }

    /// Queues an activation for the device thread.
    pub fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.pending = Some(ctx);
        self.evt
            .write(1)
            .map_err(|e| ActivateError::Backend(e.to_string()))
    }

    /// Forgets a queued activation and retires `active`, if any.
    pub fn reset(&mut self, active: Option<A>) {
        self.pending = None;
        if let Some(a) = active {
            self.retired.push(a);
            let _ = self.evt.write(1);
        }
    }

    /// Whether retired states wait for the device thread.
    pub fn has_retired(&self) -> bool {
        !self.retired.is_empty()
    }

    /// On the device thread, when the eventfd fires: the retired states
    /// (to unregister, then drop) and the activation to start, if any.
    pub fn take(&mut self) -> (Vec<A>, Option<ActivateContext>) {
        let _ = self.evt.read();
        (std::mem::take(&mut self.retired), self.pending.take())
    }
}

/// Whether `chain` has at most `max` descriptors, found by walking at most
/// `max + 1` of them without keeping any. A device calls it before it
/// collects a chain (or makes a `Reader`/`Writer` of it, which collects every
/// descriptor): an indirect table may hold 65,535 descriptors, and the
/// virtio spec forbids a driver chains longer than the queue size.
pub fn chain_within<M>(chain: &DescriptorChain<M>, max: usize) -> bool
where
    M: std::ops::Deref + Clone,
    M::Target: GuestMemory,
{
    chain.clone().take(max.saturating_add(1)).count() <= max
}

/// Copies `src[offset..]` into `data`, or fills `data` with zeros when the
/// access falls outside `src` (config space reads).
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    match start
        .checked_add(data.len())
        .and_then(|end| src.get(start..end))
    {
        Some(bytes) => data.copy_from_slice(bytes),
        None => data.fill(0),
    }
}

/// Re-enables `queue`'s notifications and says whether chains arrived
/// meanwhile, as `Queue::enable_notification` does, except that a ring
/// whose available index runs more than the queue's size ahead (nothing can
/// be popped from it: virtio-queue refuses to iterate it) says no. Device
/// loops "pop until empty, re-enable, go again if more" would otherwise spin
/// on such a ring forever (found by the virtio_mmio fuzz target).
pub fn enable_notification(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<bool, virtio_queue::Error> {
    use virtio_queue::{QueueOwnedT, QueueT};
    if !queue.enable_notification(mem)? {
        return Ok(false);
    }
    match queue.iter(mem) {
        Ok(_) => Ok(true),
        Err(e) => {
            log::error!("virtio: broken available ring: {e}");
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runaway_avail_index_is_no_more_work() {
        use virtio_queue::mock::MockSplitQueue;
        use virtio_queue::QueueT;
        use vm_memory::{Address, Bytes, GuestAddress};
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let m = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = m.create_queue().unwrap();
        // Two chains: more work. Then an index 100 ahead of a 16-entry
        // queue: virtio-queue pops nothing, and says "more" forever.
        mem.write_obj(2u16, m.avail_addr().unchecked_add(2))
            .unwrap();
        assert!(enable_notification(&mut q, &mem).unwrap());
        mem.write_obj(100u16, m.avail_addr().unchecked_add(2))
            .unwrap();
        assert!(q.pop_descriptor_chain(&mem).is_none());
        assert!(q.enable_notification(&mem).unwrap());
        assert!(!enable_notification(&mut q, &mem).unwrap());
    }

    /// How many times the irqfd was written since the last call.
    fn fired(i: &Interrupt) -> u64 {
        i.irqfd.read().unwrap_or(0)
    }

    #[test]
    fn every_reason_is_signalled_and_acknowledged_bits_clear() {
        let i = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        i.signal_used_queue(0);
        i.signal_used_queue(0);
        // A pending reason is signalled again: an edge lost while the guest
        // had the pin masked must not leave it pending for good.
        assert_eq!(fired(&i), 2);
        i.signal_config_change();
        assert_eq!(fired(&i), 1);
        assert_eq!(i.status(), VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
        i.ack(VIRTIO_MMIO_INT_VRING);
        assert_eq!(i.status(), VIRTIO_MMIO_INT_CONFIG);
        i.signal_used_queue(0);
        assert_eq!(fired(&i), 1);
        // A device reset clears what was pending.
        i.clear();
        assert_eq!(i.status(), 0);
    }

    #[test]
    fn level_line_is_asserted_again_after_eoi_while_a_reason_is_pending() {
        let nb = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let resample = nb();
        let kvm_side = resample.try_clone().unwrap();
        let i = Arc::new(Interrupt::with_resample(nb(), resample));
        i.signal_used_queue(0);
        assert_eq!(fired(&i), 1);
        // The guest's EOI (KVM writes the resample eventfd) with the reason
        // still pending: the line goes up again.
        kvm_side.write(1).unwrap();
        i.resample();
        assert_eq!(fired(&i), 1);
        // Acknowledged: the next EOI leaves the line down.
        i.ack(VIRTIO_MMIO_INT_VRING);
        kvm_side.write(1).unwrap();
        i.resample();
        assert_eq!(fired(&i), 0);
        // The resample event was consumed.
        assert!(kvm_side.read().is_err());
    }

    #[test]
    fn a_disabled_line_is_not_asserted_nor_resampled_and_enabling_it_reasserts() {
        let nb = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let resample = nb();
        let kvm_side = resample.try_clone().unwrap();
        let i = Arc::new(Interrupt::with_resample(nb(), resample));
        i.set_line_disabled(true);
        i.signal_used_queue(0);
        assert_eq!(fired(&i), 0);
        assert_eq!(i.status(), VIRTIO_MMIO_INT_VRING, "the reason is kept");
        kvm_side.write(1).unwrap();
        i.resample();
        assert_eq!(fired(&i), 0, "an EOI does not bring the line back");
        i.set_line_disabled(false);
        assert_eq!(fired(&i), 1, "enabled with a reason pending");
        i.set_line_disabled(false);
        assert_eq!(fired(&i), 0, "enabling an enabled line changes nothing");
        i.ack(VIRTIO_MMIO_INT_VRING);
        i.set_line_disabled(true);
        i.set_line_disabled(false);
        assert_eq!(fired(&i), 0, "nothing pending");
    }

    #[test]
    fn resampler_serves_only_level_lines_through_its_event_loop() {
        use event_manager::{EventManager, SubscriberOps};
        use std::sync::Mutex;
        let nb = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let resample = nb();
        let kvm_side = resample.try_clone().unwrap();
        let level = Arc::new(Interrupt::with_resample(nb(), resample));
        let edge = Arc::new(Interrupt::new(nb()));
        let mut r = InterruptResampler::new();
        r.add(level.clone());
        r.add(edge);
        assert_eq!(r.len(), 1);
        let mut em = EventManager::<Arc<Mutex<InterruptResampler>>>::new().unwrap();
        em.add_subscriber(Arc::new(Mutex::new(r)));
        level.signal_config_change();
        assert_eq!(fired(&level), 1);
        kvm_side.write(1).unwrap();
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(fired(&level), 1);
    }
}
