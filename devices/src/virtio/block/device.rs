//! The virtio-blk device: configuration space, feature set, and the queue
//! handler running on the device thread (an event-manager subscriber).
//!
//! Path of a request: queue notification (ioeventfd) -> pop every available
//! chain -> parse into a free slot -> one io_uring submission for the whole
//! batch -> completion (the ring's fd polls readable) -> status byte, used
//! ring, one interrupt on the queue's vector (subject to EVENT_IDX
//! suppression). Slots, descriptor and iovec buffers are allocated once at
//! activation: the request path does not allocate.
//!
//! Multi-queue (VIRTIO_BLK_F_MQ): a disk offers [`BlockConfig::num_queues`]
//! queues. Each queue the driver enables has its own notification eventfd,
//! its own io_uring, its own slots and its own [`FlushBarrier`]; its
//! completions are answered on its own used ring and signalled on its own
//! interrupt vector ([`Interrupt::signal_used_queue`] with the queue's
//! index: one MSI-X vector per queue on virtio-pci; virtio-mmio has one
//! line for all). All the queues of a disk are served by the one device
//! thread, which waits on every queue's eventfd and ring fd in one event
//! loop: a request costs that thread only parsing and a place in a batch
//! (the I/O itself runs in the kernel's io_uring workers, in parallel for
//! all queues), so what the guest gains from several queues is lock-free
//! submission from each vCPU and parallel completion interrupts, not more
//! VMM threads. A thread per queue would compete for the host's few cores
//! (two on the smallest HostOS machines) with the vCPU threads it serves,
//! and would need the disk's shared state (the copy-on-write overlay, the
//! trim worker's queue, counters) behind locks.
//!
//! A FLUSH is not a ring-wide barrier: its fdatasync is queued once the
//! writes submitted before it on the same queue have completed
//! ([`FlushBarrier`]); reads and later writes go on meanwhile. Writes on
//! other queues are not waited for: a write the guest saw completed, on any
//! queue, has completed on the host before its used entry was written, so
//! the fdatasync (started later) covers it; one still in flight there the
//! driver has not seen completed, and the spec leaves it uncovered
//! (virtio 1.2, 5.2.6.2).

use std::sync::Arc;
use std::time::Instant;

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::{error, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::backend::DiskBackend;
use super::barrier::FlushBarrier;
use super::counters::{bump, BlockCounters};
use super::cow::{CowError, CowOverlay, CowRange};
use super::engine::{sync_rw, Completion, EngineKind, Uring};
use super::request::{self, Request, RequestError, RequestKind, ID_LEN};
use super::trim_worker::{self, TrimDone, TrimJob, TrimOp, TrimQueue, TrimWorker};
use crate::virtio::{
    read_config_bytes, ActivateContext, ActivateError, Handoff, Interrupt, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Virtio-blk sector size.
pub const SECTOR_SIZE: u64 = 512;
/// Most queues a disk offers.
pub const MAX_QUEUES: u16 = 16;
/// Queue size offered.
const QUEUE_SIZE: u16 = 256;
/// Data segments per request (queue size less header and status).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Descriptors collected of one chain at most: a request's (header, SEG_MAX
/// segments, status) and one more, which tells a longer chain (refused)
/// without collecting the rest of it. An indirect table may hold 65,535
/// descriptors; the host heap never grows with it.
const MAX_CHAIN: usize = SEG_MAX as usize + 3;
/// Largest discard / write-zeroes request, in sectors (2 GiB).
const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Discard granularity, in sectors (4 KiB).
const DISCARD_ALIGNMENT: u32 = 8;
/// Size of `struct virtio_blk_config` up to `write_zeroes_may_unmap`.
const CONFIG_LEN: usize = 60;

/// How a disk is presented.
#[derive(Clone, Debug)]
pub struct BlockConfig {
    /// Serial returned by GET_ID (at most 20 bytes kept).
    pub serial: Option<String>,
    /// I/O engine.
    pub engine: EngineKind,
    /// A copy-on-write range (writes there go to a temporary overlay).
    pub cow: Option<CowRange>,
    /// Request queues offered (VIRTIO_BLK_F_MQ above 1); clamped to
    /// 1..=[`MAX_QUEUES`].
    pub num_queues: u16,
}

impl Default for BlockConfig {
    fn default() -> Self {
        BlockConfig {
            serial: None,
            engine: EngineKind::default(),
            cow: None,
            num_queues: 1,
        }
    }
}

/// Event-manager data tags of the device thread's fds: the activation and
/// trim-worker eventfds, then per served queue (by position) its
/// notification eventfd and its ring.
const EV_ACTIVATE: u32 = 0;
const EV_TRIM: u32 = 1;
const EV_QUEUE: u32 = 0x100;
const EV_URING: u32 = 0x200;
/// The queue position in a per-queue tag.
const EV_INDEX: u32 = 0xff;

/// One request in flight (or being parsed).
struct Slot {
    head: u16,
    status: GuestAddress,
    used_len: u32,
    kind: RequestKind,
    bytes: u64,
    start: Instant,
    descs: Vec<Descriptor>,
    data: Vec<(GuestAddress, u32)>,
    iovecs: Vec<libc::iovec>,
    /// The range of a discard / write-zeroes in flight.
    trim: request::Segment,
    /// The flush epoch of a write (or discard, write-zeroes) in flight
    /// through the ring.
    write_epoch: Option<u64>,
}

// SAFETY: the raw pointers in `iovecs` point into guest memory, which is
// shared by design and stays mapped for the life of the VM; a slot is only
// ever used by the one thread owning the device.
unsafe impl Send for Slot {}

/// One request queue the driver enabled, and everything serving it.
struct BlkQueue {
    /// The queue's virtio index (its interrupt source).
    index: u16,
    queue: Queue,
    queue_evt: EventFd,
    uring: Option<Uring>,
    /// Orders this queue's flushes after the writes submitted before them
    /// on this queue.
    barrier: FlushBarrier,
    slots: Vec<Slot>,
    free: Vec<u16>,
    /// Every slot was taken while the guest had more requests: the next
    /// completion resumes taking them (no queue notification is armed).
    starved: bool,
    /// Requests with the trim worker.
    trims: usize,
}

impl BlkQueue {
    /// Whether operations (ring or trim worker) are still in flight.
    fn busy(&self) -> bool {
        self.trims > 0 || self.uring.as_ref().is_some_and(|u| u.in_flight() > 0)
    }
}

struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    /// The served queues, in index order (a position is the `EV_QUEUE` /
    /// `EV_URING` tag's low byte).
    queues: Vec<BlkQueue>,
    /// Which activation this is (the trim worker's results name it).
    generation: u64,
}

/// A virtio-blk device.
pub struct VirtioBlock {
    disk: DiskBackend,
    cow: Option<CowOverlay>,
    config: BlockConfig,
    id: [u8; ID_LEN],
    config_space: [u8; CONFIG_LEN],
    avail_features: u64,
    acked_features: u64,
    queue_sizes: Vec<u16>,
    counters: Arc<BlockCounters>,
    handoff: Handoff<Active>,
    active: Option<Active>,
    /// Reset queues whose I/O is still in flight: their rings stay in the
    /// event loop until every operation has completed (into guest buffers
    /// the driver must not reuse before STATUS reads 0).
    draining: Vec<Active>,
    /// The trim worker's queue (writable disks); used once the worker was
    /// taken to run on a thread of its own.
    trim_queue: Option<TrimQueue>,
    /// The worker, until [`take_trim_worker`](Self::take_trim_worker).
    trim_worker: Option<TrimWorker>,
    /// Results taken from the worker (kept to reuse its allocation).
    trim_results: Vec<TrimDone>,
    /// Activations so far.
    generation: u64,
}

impl VirtioBlock {
    /// A device serving `disk`.
    pub fn new(disk: DiskBackend, config: BlockConfig) -> std::io::Result<Self> {
        let num_queues = config.num_queues.clamp(1, MAX_QUEUES);
        let mut avail_features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE);
        if num_queues > 1 {
            avail_features |= 1 << VIRTIO_BLK_F_MQ;
        }
        if disk.read_only() {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            avail_features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        let mut id = [0u8; ID_LEN];
        if let Some(s) = &config.serial {
            let n = s.len().min(ID_LEN);
            id[..n].copy_from_slice(&s.as_bytes()[..n]);
        }
        let cow = config
            .cow
            .map(|range| CowOverlay::new(range, &std::env::temp_dir()))
            .transpose()?;
        // At most one job per slot of every queue.
        let depth = usize::from(QUEUE_SIZE) * usize::from(num_queues);
        let (trim_queue, trim_worker) = if disk.read_only() {
            (None, None)
        } else {
            let (q, w) = trim_worker::channel(disk.try_clone()?, depth)?;
            (Some(q), Some(w))
        };
        Ok(VirtioBlock {
            config_space: config_space(disk.capacity(), num_queues),
            disk,
            cow,
            config,
            id,
            avail_features,
            acked_features: 0,
            queue_sizes: vec![QUEUE_SIZE; usize::from(num_queues)],
            counters: Arc::new(BlockCounters::default()),
            handoff: Handoff::new()?,
            active: None,
            draining: Vec::new(),
            trim_queue,
            trim_worker,
            trim_results: Vec::with_capacity(depth),
            generation: 0,
        })
    }

    /// The disk's trim worker, to run ([`TrimWorker::run`]) on a thread of
    /// its own: from then on discards that only an ioctl can do, and trims
    /// around a copy-on-write range, leave the device thread (with the
    /// io_uring engine; the synchronous engine does everything inline).
    /// `None` for a read-only disk or once taken.
    pub fn take_trim_worker(&mut self) -> Option<TrimWorker> {
        self.trim_worker.take()
    }

    /// This disk's counters.
    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity()
    }

    /// Request queues offered.
    pub fn num_queues(&self) -> usize {
        self.queue_sizes.len()
    }

    fn start(&mut self, ctx: ActivateContext, ops: &mut EventOps) -> Result<(), String> {
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        self.generation += 1;
        let mut served = Vec::with_capacity(ctx.queues.len());
        for (index, (mut queue, queue_evt)) in
            ctx.queues.into_iter().zip(ctx.queue_evts).enumerate()
        {
            // A driver may use fewer queues than offered (Linux: at most one
            // per CPU; without VIRTIO_BLK_F_MQ only queue 0). activate()
            // checked that each enabled queue is valid.
            if index > 0 && !queue.ready() {
                continue;
            }
            queue.set_event_idx(event_idx);
            let uring = match self.config.engine {
                EngineKind::IoUring => match Uring::new(u32::from(QUEUE_SIZE)) {
                    Ok(u) => Some(u),
                    Err(e) => {
                        warn!("virtio-blk: io_uring unavailable ({e}); using synchronous I/O");
                        None
                    }
                },
                EngineKind::Sync => None,
            };
            let size = usize::from(queue.size().max(1));
            let slots = (0..size)
                .map(|_| Slot {
                    head: 0,
                    status: GuestAddress(0),
                    used_len: 0,
                    kind: RequestKind::Flush,
                    bytes: 0,
                    start: Instant::now(),
                    descs: Vec::with_capacity(size),
                    data: Vec::with_capacity(size),
                    iovecs: Vec::with_capacity(size),
                    trim: request::Segment {
                        offset: 0,
                        len: 0,
                        unmap: false,
                    },
                    write_epoch: None,
                })
                .collect();
            served.push(BlkQueue {
                index: index as u16,
                queue,
                queue_evt,
                uring,
                barrier: FlushBarrier::new(size),
                slots,
                free: (0..size as u16).rev().collect(),
                starved: false,
                trims: 0,
            });
        }
        if served.is_empty() {
            return Err("no queue".into());
        }
        for (pos, q) in served.iter().enumerate() {
            let pos = pos as u32;
            ops.add(Events::with_data(
                &q.queue_evt,
                EV_QUEUE | pos,
                EventSet::IN,
            ))
            .map_err(|e| format!("watch queue {}: {e:?}", q.index))?;
            if let Some(u) = &q.uring {
                ops.add(Events::with_data(u, EV_URING | pos, EventSet::IN))
                    .map_err(|e| format!("watch io_uring of queue {}: {e:?}", q.index))?;
            }
        }
        self.active = Some(Active {
            mem: ctx.mem,
            interrupt: ctx.interrupt,
            queues: served,
            generation: self.generation,
        });
        Ok(())
    }

    /// Handles a notification of the queue at position `pos`: parses every
    /// available request and submits the whole batch at once.
    fn process_queue(&mut self, pos: usize) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let generation = a.generation;
        let mem = &a.mem;
        let Some(q) = a.queues.get_mut(pos) else {
            return;
        };
        let _ = q.queue_evt.read();
        q.starved = false;
        let mut completed_now = false;
        loop {
            while let Some(slot_idx) = q.free.last().copied() {
                let Some(chain) = q.queue.pop_descriptor_chain(mem) else {
                    break;
                };
                q.free.pop();
                let slot = &mut q.slots[usize::from(slot_idx)];
                slot.head = chain.head_index();
                slot.start = Instant::now();
                slot.descs.clear();
                slot.descs.extend(chain.take(MAX_CHAIN));
                // The worker serves only once someone runs it.
                let trims = match (&self.trim_queue, &self.trim_worker) {
                    (Some(t), None) => Some((t, generation, pos as u16, &mut q.trims)),
                    _ => None,
                };
                let done = start_request(
                    Target {
                        disk: &self.disk,
                        cow: self.cow.as_mut(),
                    },
                    &self.id,
                    &self.counters,
                    mem,
                    q.uring.as_mut().map(|uring| Ring {
                        uring,
                        barrier: &mut q.barrier,
                        trims,
                    }),
                    slot,
                    slot_idx,
                );
                if done {
                    finish(mem, &mut q.queue, &self.counters, slot);
                    q.free.push(slot_idx);
                    completed_now = true;
                }
            }
            if q.free.is_empty() {
                // Requests may wait for a slot: a completion resumes.
                q.starved = true;
                break;
            }
            // Re-enable notifications; if more arrived meanwhile, go again.
            match crate::virtio::enable_notification(&mut q.queue, mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    error!("virtio-blk: queue {} error: {e}", q.index);
                    break;
                }
            }
        }
        if let Some(u) = q.uring.as_mut() {
            if let Err(e) = u.submit() {
                error!("virtio-blk: io_uring submit: {e}");
            }
        }
        if completed_now {
            notify(mem, &a.interrupt, q);
        }
    }

    /// Handles the trim worker's results and, with `ring`, the io_uring
    /// completions of the queue at that position.
    fn process_completions(&mut self, ring: Option<usize>) {
        let mut results = std::mem::take(&mut self.trim_results);
        // The worker's results only on its own event (`ring` None): that
        // event stays ready until read, so a ring's event need not look
        // (one read fewer, a failing one, per completion round).
        if let (Some(q), None) = (&self.trim_queue, ring) {
            q.take_done(|d| results.push(d));
        }
        // Results for reset queues only count down what they wait for.
        let current = self.active.as_ref().map(|a| a.generation);
        results.retain(|d| {
            if Some(d.generation) == current {
                return true;
            }
            if let Some(q) = self
                .draining
                .iter_mut()
                .find(|o| o.generation == d.generation)
                .and_then(|o| o.queues.get_mut(usize::from(d.queue)))
            {
                q.trims = q.trims.saturating_sub(1);
            }
            false
        });
        let served = self.active.as_ref().map_or(0, |a| a.queues.len());
        for pos in 0..served {
            if ring == Some(pos) || results.iter().any(|d| usize::from(d.queue) == pos) {
                self.complete(pos, &results);
            }
        }
        results.clear();
        self.trim_results = results;
    }

    /// Completes the finished requests of the queue at position `pos`: its
    /// results among `trims` from the worker, then its io_uring
    /// completions.
    fn complete(&mut self, pos: usize, trims: &[TrimDone]) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mem = &a.mem;
        let Some(q) = a.queues.get_mut(pos) else {
            return;
        };
        let Some(u) = q.uring.as_mut() else { return };
        let mut any = false;
        let (slots, free, queue) = (&mut q.slots, &mut q.free, &mut q.queue);
        let barrier = &mut q.barrier;
        let counters = &self.counters;
        let disk = &self.disk;
        for d in trims.iter().filter(|d| usize::from(d.queue) == pos) {
            let Some(slot) = slots.get_mut(usize::from(d.tag)) else {
                continue;
            };
            q.trims = q.trims.saturating_sub(1);
            if let Some(e) = slot.write_epoch.take() {
                barrier.write_done(e);
            }
            complete_io(counters, slot, d.res);
            finish(mem, queue, counters, slot);
            free.push(d.tag);
            any = true;
        }
        u.complete(|(tag, mut res): Completion| {
            let Some(slot) = slots.get_mut(tag as usize) else {
                return;
            };
            if let Some(e) = slot.write_epoch.take() {
                barrier.write_done(e);
            }
            if res == -libc::EOPNOTSUPP && slot.kind == RequestKind::WriteZeroes {
                // A file system without ZERO_RANGE: a punched hole reads as
                // zeros (quick, metadata only).
                let t = slot.trim;
                res = match disk.write_zeroes(t.offset, t.len, true) {
                    Ok(()) => 0,
                    Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
                };
            }
            complete_io(counters, slot, res);
            finish(mem, queue, counters, slot);
            free.push(tag as u16);
            any = true;
        });
        // Flushes whose writes have now all completed.
        let mut queued = false;
        while let Some(tag) = barrier.take_ready() {
            if let Some(slot) = slots.get_mut(usize::from(tag)) {
                if submit_or_fail(counters, slot, u.fsync(disk.fd(), u64::from(tag))) {
                    finish(mem, queue, counters, slot);
                    free.push(tag);
                    any = true;
                } else {
                    queued = true;
                }
            }
        }
        if queued {
            if let Err(e) = u.submit() {
                error!("virtio-blk: io_uring submit: {e}");
            }
        }
        if any {
            notify(mem, &a.interrupt, q);
        }
        // Requests waited for free slots: take them now.
        if q.starved && !q.free.is_empty() {
            self.process_queue(pos);
        }
    }
}

/// Raises queue `q`'s interrupt unless EVENT_IDX says the driver does not
/// need it.
fn notify(mem: &GuestMemoryMmap, interrupt: &Interrupt, q: &mut BlkQueue) {
    match q.queue.needs_notification(mem) {
        Ok(false) => {}
        _ => interrupt.signal_used_queue(q.index),
    }
}

/// Writes the status byte and returns the chain to the guest.
fn finish(mem: &GuestMemoryMmap, queue: &mut Queue, counters: &BlockCounters, slot: &mut Slot) {
    if slot.used_len > 0 {
        // The status address was validated as part of a writable descriptor.
        let status = (slot.used_len >> 24) as u8;
        if mem.write_obj(status, slot.status).is_err() {
            bump(&counters.invalid_requests, 1);
        }
    }
    let len = slot.used_len & 0x00ff_ffff;
    if let Err(e) = queue.add_used(mem, slot.head, len) {
        error!("virtio-blk: cannot return descriptor {}: {e}", slot.head);
    }
    counters.latency(slot.start.elapsed().as_nanos() as u64);
}

/// Packs a status byte and used length into `Slot::used_len`.
fn pack(status: u32, len: u64) -> u32 {
    (status << 24) | (len.min(0x00ff_fffe) as u32 + 1)
}

/// Parses and starts the request in `slot`. Returns true when it completed
/// synchronously (errors, small requests, the sync engine).
/// The disk a request goes to, with its copy-on-write overlay if any.
struct Target<'a> {
    disk: &'a DiskBackend,
    cow: Option<&'a mut CowOverlay>,
}

/// The asynchronous engine: the ring, the flush barrier, and the trim
/// worker when it runs (its queue, the activation's generation, the
/// virtqueue's position and its count of requests there).
struct Ring<'a> {
    uring: &'a mut Uring,
    barrier: &'a mut FlushBarrier,
    trims: Option<(&'a TrimQueue, u64, u16, &'a mut usize)>,
}

fn start_request(
    target: Target<'_>,
    id: &[u8; ID_LEN],
    counters: &BlockCounters,
    mem: &GuestMemoryMmap,
    uring: Option<Ring<'_>>,
    slot: &mut Slot,
    tag: u16,
) -> bool {
    let Target { disk, mut cow } = target;
    let req = match request::parse(
        mem,
        &slot.descs,
        disk.capacity(),
        disk.read_only(),
        SEG_MAX as usize,
        &mut slot.data,
        &mut slot.iovecs,
    ) {
        Ok(r) => r,
        Err(RequestError::NoStatus | RequestError::ChainTooLong) => {
            bump(&counters.invalid_requests, 1);
            slot.used_len = 0;
            return true;
        }
        Err(e) => {
            let status = if matches!(e, RequestError::Unsupported(_)) {
                bump(&counters.unsupported_requests, 1);
                VIRTIO_BLK_S_UNSUPP
            } else {
                bump(&counters.invalid_requests, 1);
                VIRTIO_BLK_S_IOERR
            };
            slot.status = request::status_addr(&slot.descs).unwrap_or(GuestAddress(0));
            slot.used_len = pack(status, 0);
            return true;
        }
    };
    slot.status = req.status;
    slot.kind = req.kind;
    slot.bytes = req.data_len;
    let offset = req.offset;
    if let Some(c) = cow.as_deref_mut() {
        let rw = matches!(req.kind, RequestKind::In | RequestKind::Out);
        if rw && c.overlaps(offset, req.data_len) {
            cow_rw(disk, c, counters, mem, slot, req.kind, offset);
            return true;
        }
    }
    match (req.kind, uring) {
        (
            RequestKind::In | RequestKind::Out,
            Some(Ring {
                uring: u, barrier, ..
            }),
        ) => {
            let write = req.kind == RequestKind::Out;
            // SAFETY: the iovecs point into guest memory (mapped for the
            // VM's life) and the slot is not reused before completion.
            let r = unsafe { u.rw(write, disk.fd(), &slot.iovecs, offset, u64::from(tag)) };
            let done = submit_or_fail(counters, slot, r);
            if write && !done {
                slot.write_epoch = Some(barrier.write_started());
            }
            done
        }
        (
            RequestKind::Flush,
            Some(Ring {
                uring: u, barrier, ..
            }),
        ) => {
            if barrier.flush_arrived(tag) {
                submit_or_fail(counters, slot, u.fsync(disk.fd(), u64::from(tag)))
            } else {
                // Queued once the earlier writes complete.
                false
            }
        }
        (RequestKind::In | RequestKind::Out, None) => {
            let res = sync_rw(
                disk.fd(),
                &mut slot.iovecs,
                offset,
                req.kind == RequestKind::Out,
            );
            complete_io(counters, slot, res);
            true
        }
        (RequestKind::Flush, None) => {
            let res = match disk.flush() {
                Ok(()) => 0,
                Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
            };
            complete_io(counters, slot, res);
            true
        }
        (RequestKind::GetId, _) => {
            let written = write_id(mem, &slot.data, id);
            slot.used_len = pack(VIRTIO_BLK_S_OK, written as u64);
            true
        }
        (RequestKind::Discard | RequestKind::WriteZeroes, Some(ring)) => {
            trim_async(disk, cow, counters, mem, ring, &req, slot, tag)
        }
        (RequestKind::Discard | RequestKind::WriteZeroes, _) => {
            let status = trim(disk, cow, mem, counters, &req, &slot.data);
            slot.used_len = pack(status, 0);
            true
        }
    }
}

/// A discard or write-zeroes with the asynchronous engine: one segment
/// (parse enforced `max_discard_seg`), validated here. On a file (or as
/// write-zeroes on a block device) an io_uring fallocate; a discard on a
/// block device (BLKDISCARD) and the disk's part of a trim touching the
/// copy-on-write range go to the trim worker (the range's own part, bounded
/// by the overlay's limit, is done here). Returns true when it completed.
#[allow(clippy::too_many_arguments)]
fn trim_async(
    disk: &DiskBackend,
    cow: Option<&mut CowOverlay>,
    counters: &BlockCounters,
    mem: &GuestMemoryMmap,
    ring: Ring<'_>,
    req: &Request,
    slot: &mut Slot,
    tag: u16,
) -> bool {
    let zeroes = req.kind == RequestKind::WriteZeroes;
    let seg = match request::read_segment(mem, &slot.data, 0, disk.capacity()) {
        Ok(s) if s.len <= u64::from(MAX_DISCARD_SECTORS) * SECTOR_SIZE => s,
        _ => {
            bump(&counters.invalid_requests, 1);
            slot.used_len = pack(VIRTIO_BLK_S_IOERR, 0);
            return true;
        }
    };
    slot.trim = seg;
    let Ring {
        uring: u,
        barrier,
        trims,
    } = ring;
    let mut pieces = [(seg.offset, seg.len), (0, 0)];
    let mut count = 1;
    match cow {
        Some(c) if c.overlaps(seg.offset, seg.len) => {
            // The range's part: zeroes in the overlay, a discard nothing.
            if zeroes {
                if let Err(e) = c.zero_inside(disk.file(), seg.offset, seg.len) {
                    slot.used_len = pack(cow_failed(counters, e), 0);
                    return true;
                }
            }
            let outside = c.outside(seg.offset, seg.len);
            count = outside.len().min(pieces.len());
            pieces[..count].copy_from_slice(&outside[..count]);
        }
        Some(_) => {}
        None => {
            if let Some(mode) = disk.trim_mode(zeroes, seg.unmap) {
                let r = u.fallocate(disk.fd(), mode, seg.offset, seg.len, u64::from(tag));
                let done = submit_or_fail(counters, slot, r);
                if !done {
                    slot.write_epoch = Some(barrier.write_started());
                }
                return done;
            }
        }
    }
    let op = if zeroes {
        TrimOp::Zeroes { unmap: seg.unmap }
    } else {
        TrimOp::Discard
    };
    if let Some((jobs, generation, queue, in_flight)) = trims {
        let job = TrimJob {
            generation,
            queue,
            tag,
            op,
            pieces,
            count,
        };
        match jobs.submit(job) {
            Ok(()) => {
                *in_flight += 1;
                slot.write_epoch = Some(barrier.write_started());
                return false;
            }
            Err(_) => warn!("virtio-blk: trim worker unavailable; trimming inline"),
        }
    }
    let res = trim_worker::run_job(disk, op, &pieces[..count]);
    complete_io(counters, slot, res);
    true
}

fn submit_or_fail(counters: &BlockCounters, slot: &mut Slot, r: std::io::Result<()>) -> bool {
    match r {
        Ok(()) => false,
        Err(e) => {
            error!("virtio-blk: cannot queue I/O: {e}");
            bump(&counters.io_errors, 1);
            slot.used_len = pack(VIRTIO_BLK_S_IOERR, 0);
            true
        }
    }
}

/// Records the result `res` (bytes or -errno) of the read/write/flush in
/// `slot`.
fn complete_io(counters: &BlockCounters, slot: &mut Slot, res: i32) {
    let ok = match slot.kind {
        RequestKind::Flush | RequestKind::Discard | RequestKind::WriteZeroes => res >= 0,
        _ => res >= 0 && res as u64 == slot.bytes,
    };
    if !ok {
        if res < 0 {
            warn!(
                "virtio-blk: host I/O error on {:?}: {}",
                slot.kind,
                std::io::Error::from_raw_os_error(-res)
            );
        } else {
            warn!(
                "virtio-blk: short {:?}: {res} of {} bytes",
                slot.kind, slot.bytes
            );
        }
        bump(&counters.io_errors, 1);
        slot.used_len = pack(VIRTIO_BLK_S_IOERR, 0);
        return;
    }
    match slot.kind {
        RequestKind::In => {
            bump(&counters.read_ops, 1);
            bump(&counters.read_bytes, slot.bytes);
            slot.used_len = pack(VIRTIO_BLK_S_OK, slot.bytes);
        }
        RequestKind::Out => {
            bump(&counters.write_ops, 1);
            bump(&counters.write_bytes, slot.bytes);
            slot.used_len = pack(VIRTIO_BLK_S_OK, 0);
        }
        RequestKind::Discard => {
            bump(&counters.discard_ops, 1);
            slot.used_len = pack(VIRTIO_BLK_S_OK, 0);
        }
        RequestKind::WriteZeroes => {
            bump(&counters.write_zeroes_ops, 1);
            slot.used_len = pack(VIRTIO_BLK_S_OK, 0);
        }
        _ => {
            bump(&counters.flush_ops, 1);
            slot.used_len = pack(VIRTIO_BLK_S_OK, 0);
        }
    }
}

/// GET_ID: copies the serial into the data buffers; returns bytes written.
fn write_id(mem: &GuestMemoryMmap, data: &[(GuestAddress, u32)], id: &[u8; ID_LEN]) -> usize {
    let mut off = 0usize;
    for &(addr, len) in data {
        let n = (len as usize).min(ID_LEN - off);
        if n == 0 || mem.write_slice(&id[off..off + n], addr).is_err() {
            break;
        }
        off += n;
    }
    off
}

/// Runs every segment of a discard / write-zeroes request.
fn trim(
    disk: &DiskBackend,
    mut cow: Option<&mut CowOverlay>,
    mem: &GuestMemoryMmap,
    counters: &BlockCounters,
    req: &Request,
    data: &[(GuestAddress, u32)],
) -> u32 {
    let n = req.data_len / u64::from(request::SEGMENT_LEN);
    for i in 0..n {
        let seg = match request::read_segment(mem, data, i, disk.capacity()) {
            Ok(s) => s,
            Err(_) => {
                bump(&counters.invalid_requests, 1);
                return VIRTIO_BLK_S_IOERR;
            }
        };
        if seg.len > u64::from(MAX_DISCARD_SECTORS) * SECTOR_SIZE {
            bump(&counters.invalid_requests, 1);
            return VIRTIO_BLK_S_IOERR;
        }
        let zeroes = req.kind == RequestKind::WriteZeroes;
        let pieces = match cow.as_deref_mut() {
            Some(c) if c.overlaps(seg.offset, seg.len) => {
                // The range's part: zeroes in the overlay, a discard nothing.
                if zeroes {
                    if let Err(e) = c.zero_inside(disk.file(), seg.offset, seg.len) {
                        return cow_failed(counters, e);
                    }
                }
                c.outside(seg.offset, seg.len)
            }
            _ => vec![(seg.offset, seg.len)],
        };
        let r = pieces.into_iter().try_for_each(|(offset, len)| {
            if zeroes {
                disk.write_zeroes(offset, len, seg.unmap)
            } else {
                disk.discard(offset, len)
            }
        });
        if let Err(e) = r {
            warn!("virtio-blk: {:?} failed: {e}", req.kind);
            bump(&counters.io_errors, 1);
            return VIRTIO_BLK_S_IOERR;
        }
    }
    if req.kind == RequestKind::Discard {
        bump(&counters.discard_ops, 1);
    } else {
        bump(&counters.write_zeroes_ops, 1);
    }
    VIRTIO_BLK_S_OK
}

/// Counts a failed overlay operation; the status for the guest.
fn cow_failed(counters: &BlockCounters, e: CowError) -> u32 {
    match e {
        CowError::Limit { limit } => {
            warn!("virtio-blk: copy-on-write overlay full ({limit} bytes): write refused");
            bump(&counters.cow_limit_errors, 1);
        }
        CowError::Io(e) => {
            warn!("virtio-blk: copy-on-write I/O error: {e}");
            bump(&counters.io_errors, 1);
        }
    }
    VIRTIO_BLK_S_IOERR
}

/// A read or write touching the copy-on-write range, served synchronously
/// through a bounce buffer (guest memory through vm-memory; the buffer
/// 4 KiB aligned, for O_DIRECT disks).
fn cow_rw(
    disk: &DiskBackend,
    cow: &mut CowOverlay,
    counters: &BlockCounters,
    mem: &GuestMemoryMmap,
    slot: &mut Slot,
    kind: RequestKind,
    offset: u64,
) {
    let len = slot.bytes as usize;
    let mut raw = vec![0u8; len + 4096];
    let skip = raw.as_ptr().align_offset(4096).min(4096);
    let buf = &mut raw[skip..skip + len];
    let mut at = 0usize;
    let result = if kind == RequestKind::Out {
        let gathered = slot.data.iter().try_for_each(|&(addr, n)| {
            let r = mem.read_slice(&mut buf[at..at + n as usize], addr);
            at += n as usize;
            r
        });
        match gathered {
            Ok(()) => cow.write(disk.file(), buf, offset),
            Err(_) => {
                bump(&counters.invalid_requests, 1);
                slot.used_len = pack(VIRTIO_BLK_S_IOERR, 0);
                return;
            }
        }
    } else {
        cow.read(disk.file(), buf, offset)
            .map_err(CowError::Io)
            .and_then(|()| {
                slot.data.iter().try_for_each(|&(addr, n)| {
                    let r = mem.write_slice(&buf[at..at + n as usize], addr);
                    at += n as usize;
                    r.map_err(|e| CowError::Io(std::io::Error::other(e.to_string())))
                })
            })
    };
    match result {
        Ok(()) => complete_io(counters, slot, len as i32),
        Err(e) => slot.used_len = pack(cow_failed(counters, e), 0),
    }
}

/// `struct virtio_blk_config` for a disk of `capacity` bytes.
fn config_space(capacity: u64, num_queues: u16) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    c[0..8].copy_from_slice(&(capacity / SECTOR_SIZE).to_le_bytes());
    c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
    c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
    c[34..36].copy_from_slice(&num_queues.to_le_bytes());
    c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
    c[40..44].copy_from_slice(&request::MAX_TRIM_SEGMENTS.to_le_bytes()); // max_discard_seg
    c[44..48].copy_from_slice(&DISCARD_ALIGNMENT.to_le_bytes());
    c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
    c[52..56].copy_from_slice(&request::MAX_TRIM_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
    c[56] = 1; // write_zeroes_may_unmap
    c
}

impl VirtioDevice for VirtioBlock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing in the block config is writable without CONFIG_WCE.
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        ctx.check_queue_count(self.queue_sizes.len())?;
        // Queue 0 must be there; the others are served when enabled.
        for (i, q) in ctx.queues.iter().enumerate() {
            if (i == 0 || q.ready()) && !q.is_valid(&ctx.mem) {
                return Err(ActivateError::InvalidQueue(i));
            }
        }
        // The device thread picks the context up and starts serving.
        self.handoff.activate(ctx)
    }

    fn reset(&mut self) -> bool {
        // The device thread unregisters the retired fds before closing them
        // (a closed fd's number could be reused by the next activation), and
        // waits there, not here, for I/O still in flight.
        self.handoff.reset(self.active.take());
        self.acked_features = 0;
        true
    }

    fn reset_pending(&self) -> bool {
        self.handoff.has_retired() || !self.draining.is_empty()
    }
}

impl MutEventSubscriber for VirtioBlock {
    fn init(&mut self, ops: &mut EventOps) {
        self.handoff.watch(ops, EV_ACTIVATE, "virtio-blk");
        if let Some(q) = &self.trim_queue {
            if let Err(e) = ops.add(Events::with_data(q.done_evt(), EV_TRIM, EventSet::IN)) {
                error!("virtio-blk: cannot watch the trim worker: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            EV_ACTIVATE => {
                let (mut retired, pending) = self.handoff.take();
                retired.extend(self.active.take());
                // Unregister the fds of reset (or replaced) queues before
                // closing them.
                for old in retired {
                    for (pos, q) in old.queues.iter().enumerate() {
                        let data = EV_QUEUE | pos as u32;
                        let _ = ops.remove(Events::with_data(&q.queue_evt, data, EventSet::IN));
                    }
                    self.draining.push(old);
                }
                self.reap_drained(ops);
                if let Some(ctx) = pending {
                    if let Err(e) = self.start(ctx, ops) {
                        error!("virtio-blk: activation failed: {e}");
                    } else {
                        // Requests queued before activation finished.
                        let served = self.active.as_ref().map_or(0, |a| a.queues.len());
                        for pos in 0..served {
                            self.process_queue(pos);
                        }
                    }
                }
            }
            EV_TRIM => {
                self.process_completions(None);
                self.reap_drained(ops);
            }
            data => {
                let pos = (data & EV_INDEX) as usize;
                match data & !EV_INDEX {
                    EV_QUEUE => self.process_queue(pos),
                    EV_URING => {
                        self.process_completions(Some(pos));
                        self.reap_drained(ops);
                    }
                    _ => {}
                }
            }
        }
    }
}

impl VirtioBlock {
    /// Takes the completions of reset queues (their requests are never
    /// answered) and drops those with nothing more in flight.
    fn reap_drained(&mut self, ops: &mut EventOps) {
        self.draining.retain_mut(|old| {
            for q in &mut old.queues {
                if let Some(u) = q.uring.as_mut() {
                    u.complete(|_| {});
                }
            }
            if old.queues.iter().any(BlkQueue::busy) {
                return true;
            }
            for (pos, q) in old.queues.iter().enumerate() {
                if let Some(u) = &q.uring {
                    let data = EV_URING | pos as u32;
                    let _ = ops.remove(Events::with_data(u, data, EventSet::IN));
                }
            }
            false
        });
    }
}

impl std::fmt::Debug for VirtioBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioBlock")
            .field("capacity", &self.disk.capacity())
            .field("read_only", &self.disk.read_only())
            .field("fd", &self.disk.fd())
            .field("active", &self.active.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::Mutex;

    use event_manager::{EventManager, SubscriberOps};
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    };
    #[test]
    fn trim_segment_limit_is_enforced_and_unused_sectors_are_never_multiplied() {
        let d = disk("trimlim", 1 << 20);
        let m = mem();
        // Two segments where max_discard_seg / max_write_zeroes_seg say 1.
        let dis = header(&m, 0, VIRTIO_BLK_T_DISCARD, 0);
        let wz = header(&m, 1, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        segment(&m, DATA, 8, 16);
        segment(&m, DATA + 16, 64, 16);
        // FLUSH and GET_ID leave the sector unused: any value is fine.
        let flush = header(&m, 2, VIRTIO_BLK_T_FLUSH, u64::MAX);
        let get_id = header(&m, 3, VIRTIO_BLK_T_GET_ID, u64::MAX / 3);
        let chains = [
            desc(dis, 16, N, 1),
            desc(DATA, 32, N, 2),
            desc(STATUS, 1, W, 0),
            desc(wz, 16, N, 4),
            desc(DATA, 32, N, 5),
            desc(STATUS + 1, 1, W, 0),
            desc(flush, 16, N, 7),
            desc(STATUS + 2, 1, W, 0),
            desc(get_id, 16, N, 9),
            desc(DATA + 0x1000, 20, N | W, 10),
            desc(STATUS + 3, 1, W, 0),
        ];
        for i in 0..4 {
            m.write_obj(0xeeu8, GuestAddress(STATUS + i)).unwrap();
        }
        let mut r = rig(&d.0, false, EngineKind::Sync, &chains, m);
        run_until_used(&mut r, 4);
        let m = &r.mem;
        assert_eq!(status(m, 0), VIRTIO_BLK_S_IOERR as u8, "2 discard segments");
        assert_eq!(status(m, 1), VIRTIO_BLK_S_IOERR as u8, "2 zeroes segments");
        assert_eq!(status(m, 2), VIRTIO_BLK_S_OK as u8, "flush");
        assert_eq!(status(m, 3), VIRTIO_BLK_S_OK as u8, "get id");
        let bytes = std::fs::read(&d.0).unwrap();
        assert!(bytes.iter().all(|b| *b == 0x11), "disk untouched");
        // Reads and writes validate the sector before using it.
        let mut data = Vec::new();
        let mut iov = Vec::new();
        let descs = [
            Descriptor::new(HDR + 0x100, 16, N, 1),
            Descriptor::new(DATA, 512, N | W, 2),
            Descriptor::new(STATUS, 1, W, 0),
        ];
        for (sector, want) in [(u64::MAX, Err(RequestError::OutOfRange)), (3, Ok(1536))] {
            m.write_obj(VIRTIO_BLK_T_IN, GuestAddress(HDR + 0x100))
                .unwrap();
            m.write_obj(sector, GuestAddress(HDR + 0x108)).unwrap();
            let got = request::parse(m, &descs, 1 << 20, false, 8, &mut data, &mut iov);
            assert_eq!(got.map(|r| r.offset), want, "sector {sector}");
        }
    }

    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    type Em = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const N: u16 = VRING_DESC_F_NEXT as u16;

    struct Disk(PathBuf);
    impl Drop for Disk {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn disk(name: &str, bytes: usize) -> Disk {
        let p = std::env::temp_dir().join(format!("keel-blk-{name}-{}", std::process::id()));
        std::fs::write(&p, vec![0x11u8; bytes]).unwrap();
        Disk(p)
    }

    /// Writes a discard / write-zeroes segment at `at`.
    fn segment(mem: &GuestMemoryMmap, at: u64, sector: u64, n: u32) {
        mem.write_obj(sector, GuestAddress(at)).unwrap();
        mem.write_obj(n, GuestAddress(at + 8)).unwrap();
        mem.write_obj(0u32, GuestAddress(at + 12)).unwrap();
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    /// Writes a request header for `kind` at sector `sector`, slot `i`.
    fn header(mem: &GuestMemoryMmap, i: u64, kind: u32, sector: u64) -> u64 {
        let at = HDR + i * 16;
        mem.write_obj(kind, GuestAddress(at)).unwrap();
        mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
        at
    }

    struct Rig {
        mem: GuestMemoryMmap,
        dev: Arc<Mutex<VirtioBlock>>,
        em: Em,
        interrupt: Arc<Interrupt>,
        irq: EventFd,
        used_addr: GuestAddress,
    }

    fn rig(
        path: &std::path::Path,
        ro: bool,
        engine: EngineKind,
        chains: &[RawDescriptor],
        mem: GuestMemoryMmap,
    ) -> Rig {
        rig_cow(path, ro, engine, chains, mem, None)
    }

    fn rig_cow(
        path: &std::path::Path,
        ro: bool,
        engine: EngineKind,
        chains: &[RawDescriptor],
        mem: GuestMemoryMmap,
        cow: Option<CowRange>,
    ) -> Rig {
        let q = MockSplitQueue::new(&mem, 32);
        let used_addr = q.used_addr();
        q.add_desc_chains(chains, 0).unwrap();
        let queue: Queue = q.create_queue().unwrap();
        let backend = DiskBackend::open(path, ro, false).unwrap();
        let mut blk = VirtioBlock::new(
            backend,
            BlockConfig {
                serial: Some("keel-disk-0".into()),
                engine,
                cow,
                num_queues: 1,
            },
        )
        .unwrap();
        blk.set_acked_features(VIRTIO_F_VERSION_1);
        let dev = Arc::new(Mutex::new(blk));
        let mut em = Em::new().unwrap();
        em.add_subscriber(dev.clone());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
        dev.lock()
            .unwrap()
            .activate(ActivateContext {
                mem: mem.clone(),
                queues: vec![queue],
                queue_evts: vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
                interrupt: interrupt.clone(),
            })
            .unwrap();
        Rig {
            mem,
            dev,
            em,
            interrupt,
            irq,
            used_addr,
        }
    }

    /// Runs the device until `n` chains are used; returns (head, len) pairs.
    fn used_idx(r: &Rig) -> u16 {
        r.mem.read_obj(r.used_addr.unchecked_add(2)).unwrap()
    }

    fn run_until_used(r: &mut Rig, n: u16) -> Vec<(u32, u32)> {
        let used_addr = r.used_addr;
        for _ in 0..200 {
            r.em.run_with_timeout(10).unwrap();
            let idx: u16 = r.mem.read_obj(used_addr.unchecked_add(2)).unwrap();
            if idx >= n {
                return (0..u64::from(n))
                    .map(|i| {
                        let e = used_addr.unchecked_add(4 + i * 8);
                        (
                            r.mem.read_obj(e).unwrap(),
                            r.mem.read_obj(e.unchecked_add(4)).unwrap(),
                        )
                    })
                    .collect();
            }
        }
        panic!("device did not complete {n} requests");
    }

    use vm_memory::Address;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
    }

    fn status(m: &GuestMemoryMmap, i: u64) -> u8 {
        m.read_obj(GuestAddress(STATUS + i)).unwrap()
    }

    fn write_then_read(engine: EngineKind) {
        let d = disk(&format!("rw-{engine:?}"), 1 << 20);
        // The host's own pattern at sector 100, for the read.
        let host: Vec<u8> = (0..8192u32).map(|i| (i * 13 % 241) as u8).collect();
        let mut file = std::fs::read(&d.0).unwrap();
        file[100 * 512..100 * 512 + 8192].copy_from_slice(&host);
        std::fs::write(&d.0, &file).unwrap();
        let m = mem();
        let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
        m.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        let h0 = header(&m, 0, VIRTIO_BLK_T_OUT, 16);
        let h1 = header(&m, 1, VIRTIO_BLK_T_IN, 100);
        let h2 = header(&m, 2, VIRTIO_BLK_T_FLUSH, 0);
        let chains = [
            // write: header, two data segments, status
            desc(h0, 16, N, 1),
            desc(DATA, 4096, N, 2),
            desc(DATA + 4096, 4096, N, 3),
            desc(STATUS, 1, W, 0),
            // read the host's pattern into another buffer
            desc(h1, 16, N, 5),
            desc(DATA + 0x10000, 8192, N | W, 6),
            desc(STATUS + 1, 1, W, 0),
            // flush (ordered after the write by the engine)
            desc(h2, 16, N, 8),
            desc(STATUS + 2, 1, W, 0),
        ];
        for i in 0..3 {
            m.write_obj(0xffu8, GuestAddress(STATUS + i)).unwrap();
        }
        let mut r = rig(&d.0, false, engine, &chains, m);
        let used = run_until_used(&mut r, 3);
        let m = &r.mem;
        assert_eq!((status(m, 0), status(m, 1), status(m, 2)), (0, 0, 0));
        // Read's used length covers data and status; write's only the status.
        let lens: std::collections::HashMap<u32, u32> = used.into_iter().collect();
        assert_eq!(lens[&0], 1);
        assert_eq!(lens[&4], 8193);
        let mut back = vec![0u8; 8192];
        m.read_slice(&mut back, GuestAddress(DATA + 0x10000))
            .unwrap();
        assert!(back == host, "the guest read what the host wrote");
        let on_disk = std::fs::read(&d.0).unwrap();
        assert!(
            on_disk[16 * 512..16 * 512 + 8192] == pattern[..],
            "the write landed"
        );
        assert_eq!(
            on_disk[16 * 512 - 1],
            0x11,
            "nothing before the request touched"
        );
        assert_eq!(on_disk[16 * 512 + 8192], 0x11, "nothing after it either");
        let c = r.dev.lock().unwrap().counters().snapshot();
        assert_eq!(
            (c.read_ops, c.write_ops, c.flush_ops, c.write_bytes),
            (1, 1, 1, 8192)
        );
        assert!(r.interrupt.status() & 1 == 1 && r.irq.read().unwrap() >= 1);
    }

    #[test]
    fn write_then_read_io_uring() {
        write_then_read(EngineKind::IoUring);
    }

    #[test]
    fn write_then_read_sync() {
        write_then_read(EngineKind::Sync);
    }

    #[test]
    fn a_flush_waits_for_earlier_writes_but_does_not_hold_later_reads() {
        let d = disk("flush-order", 1 << 20);
        let m = mem();
        m.write_slice(&[0x5au8; 4096], GuestAddress(DATA)).unwrap();
        let h0 = header(&m, 0, VIRTIO_BLK_T_OUT, 8);
        let h1 = header(&m, 1, VIRTIO_BLK_T_FLUSH, 0);
        let h2 = header(&m, 2, VIRTIO_BLK_T_IN, 64);
        let chains = [
            desc(h0, 16, N, 1),
            desc(DATA, 4096, N, 2),
            desc(STATUS, 1, W, 0),
            desc(h1, 16, N, 4),
            desc(STATUS + 1, 1, W, 0),
            desc(h2, 16, N, 6),
            desc(DATA + 0x10000, 4096, N | W, 7),
            desc(STATUS + 2, 1, W, 0),
        ];
        for i in 0..3 {
            m.write_obj(0xffu8, GuestAddress(STATUS + i)).unwrap();
        }
        let mut r = rig(&d.0, false, EngineKind::IoUring, &chains, m);
        // The first round activates the queue and takes all three requests
        // (completions are handled on a later round): the write and the
        // read are in the ring, the flush waits for the write only.
        r.em.run_with_timeout(1000).unwrap();
        {
            let dev = r.dev.lock().unwrap();
            let a = &dev.active.as_ref().expect("active").queues[0];
            let u = a.uring.as_ref().expect("io_uring on this host");
            assert_eq!(u.in_flight(), 2, "the read went in beside the write");
            assert_eq!(a.barrier.waiting(), 1, "the flush waits");
        }
        let used = run_until_used(&mut r, 3);
        let pos = |head: u32| used.iter().position(|&(h, _)| h == head).unwrap();
        assert!(
            pos(0) < pos(3),
            "the flush completed after the write it covers: {used:?}"
        );
        let m = &r.mem;
        assert_eq!((status(m, 0), status(m, 1), status(m, 2)), (0, 0, 0));
        let c = r.dev.lock().unwrap().counters().snapshot();
        assert_eq!((c.read_ops, c.write_ops, c.flush_ops), (1, 1, 1));
        assert_eq!(
            r.dev.lock().unwrap().active.as_ref().unwrap().queues[0]
                .barrier
                .waiting(),
            0
        );
    }

    #[test]
    fn malformed_requests_fail_cleanly_and_the_queue_keeps_working() {
        let d = disk("bad", 64 << 10); // 128 sectors
        let m = mem();
        let past_end = header(&m, 0, VIRTIO_BLK_T_IN, 128);
        let unknown = header(&m, 1, 0xff, 0);
        let wrong_dir = header(&m, 2, VIRTIO_BLK_T_IN, 0);
        let bad_addr = header(&m, 3, VIRTIO_BLK_T_OUT, 0);
        let odd_len = header(&m, 4, VIRTIO_BLK_T_OUT, 0);
        let hdr_only = header(&m, 5, VIRTIO_BLK_T_IN, 0);
        let good = header(&m, 6, VIRTIO_BLK_T_IN, 0);
        let chains = [
            desc(past_end, 16, N, 1),
            desc(DATA, 512, N | W, 2),
            desc(STATUS, 1, W, 0),
            desc(unknown, 16, N, 4),
            desc(STATUS + 1, 1, W, 0),
            desc(wrong_dir, 16, N, 6),
            desc(DATA, 512, N, 7), // read into a device-readable buffer
            desc(STATUS + 2, 1, W, 0),
            desc(bad_addr, 16, N, 9),
            desc(0x7f00_0000_0000, 512, N, 10),
            desc(STATUS + 3, 1, W, 0),
            desc(odd_len, 16, N, 12),
            desc(DATA, 100, N, 13),
            desc(STATUS + 4, 1, W, 0),
            desc(hdr_only, 16, 0, 0),
            desc(good, 16, N, 16),
            desc(DATA, 512, N | W, 17),
            desc(STATUS + 6, 1, W, 0),
        ];
        for i in 0..7 {
            m.write_obj(0xeeu8, GuestAddress(STATUS + i)).unwrap();
        }
        let mut r = rig(&d.0, false, EngineKind::IoUring, &chains, m);
        let used = run_until_used(&mut r, 7);
        let m = &r.mem;
        assert_eq!(status(m, 0), VIRTIO_BLK_S_IOERR as u8, "past the end");
        assert_eq!(status(m, 1), VIRTIO_BLK_S_UNSUPP as u8, "unknown type");
        assert_eq!(status(m, 2), VIRTIO_BLK_S_IOERR as u8, "wrong direction");
        assert_eq!(
            status(m, 3),
            VIRTIO_BLK_S_IOERR as u8,
            "outside guest memory"
        );
        assert_eq!(status(m, 4), VIRTIO_BLK_S_IOERR as u8, "not whole sectors");
        assert_eq!(
            status(m, 6),
            VIRTIO_BLK_S_OK as u8,
            "the next good request works"
        );
        let hdr_only_used = used
            .iter()
            .find(|(h, _)| *h == 14)
            .expect("header-only chain returned");
        assert_eq!(
            hdr_only_used.1, 0,
            "nothing written for a chain without status"
        );
        let c = r.dev.lock().unwrap().counters().snapshot();
        assert_eq!(
            (c.invalid_requests, c.unsupported_requests, c.read_ops),
            (5, 1, 1)
        );
        assert_eq!(
            std::fs::read(&d.0).unwrap(),
            vec![0x11u8; 64 << 10],
            "disk untouched"
        );
    }

    #[test]
    fn an_overlong_indirect_chain_is_refused_without_being_collected() {
        use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;
        let d = disk("long", 64 << 10);
        let m = mem();
        // An indirect table of 4,000 descriptors: a header, 3,998 data
        // segments (far more than SEG_MAX), a status byte.
        const TABLE: u64 = 0x40_0000;
        const LONG: u16 = 4000;
        let long_hdr = header(&m, 0, VIRTIO_BLK_T_IN, 0);
        for i in 0..LONG {
            let raw = match i {
                0 => desc(long_hdr, 16, N, 1),
                i if i == LONG - 1 => desc(STATUS, 1, W, 0),
                i => desc(DATA, 512, N | W, i + 1),
            };
            m.write_obj(raw, GuestAddress(TABLE + u64::from(i) * 16))
                .unwrap();
        }
        let good = header(&m, 1, VIRTIO_BLK_T_IN, 0);
        let chains = [
            desc(TABLE, u32::from(LONG) * 16, VRING_DESC_F_INDIRECT as u16, 0),
            desc(good, 16, N, 2),
            desc(DATA, 512, N | W, 3),
            desc(STATUS + 1, 1, W, 0),
        ];
        for i in 0..2 {
            m.write_obj(0xeeu8, GuestAddress(STATUS + i)).unwrap();
        }
        let mut r = rig(&d.0, false, EngineKind::IoUring, &chains, m);
        let used = run_until_used(&mut r, 2);
        let long = used
            .iter()
            .find(|(h, _)| *h == 0)
            .expect("long chain returned");
        assert_eq!(long.1, 0, "returned unanswered");
        assert_eq!(status(&r.mem, 0), 0xee, "its last descriptor untouched");
        assert_eq!(
            status(&r.mem, 1),
            VIRTIO_BLK_S_OK as u8,
            "the next request works"
        );
        let c = r.dev.lock().unwrap().counters().snapshot();
        assert_eq!((c.invalid_requests, c.read_ops), (1, 1));
        // Only what a request may hold was collected.
        let dev = r.dev.lock().unwrap();
        let a = &dev.active.as_ref().expect("active").queues[0];
        assert!(a.slots.iter().all(|s| s.descs.len() <= MAX_CHAIN));
    }

    #[test]
    fn read_only_disk_refuses_writes_and_serves_get_id() {
        let d = disk("ro", 64 << 10);
        let m = mem();
        let w = header(&m, 0, VIRTIO_BLK_T_OUT, 0);
        let id = header(&m, 1, VIRTIO_BLK_T_GET_ID, 0);
        let z = header(&m, 2, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let chains = [
            desc(w, 16, N, 1),
            desc(DATA, 512, N, 2),
            desc(STATUS, 1, W, 0),
            desc(id, 16, N, 4),
            desc(DATA + 4096, 20, N | W, 5),
            desc(STATUS + 1, 1, W, 0),
            desc(z, 16, N, 7),
            desc(DATA + 8192, 16, N, 8),
            desc(STATUS + 2, 1, W, 0),
        ];
        let mut r = rig(&d.0, true, EngineKind::IoUring, &chains, m);
        run_until_used(&mut r, 3);
        let m = &r.mem;
        assert_eq!(status(m, 0), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(status(m, 1), VIRTIO_BLK_S_OK as u8);
        assert_eq!(status(m, 2), VIRTIO_BLK_S_IOERR as u8);
        let mut serial = [0u8; 20];
        m.read_slice(&mut serial, GuestAddress(DATA + 4096))
            .unwrap();
        assert_eq!(&serial[..11], b"keel-disk-0");
        assert!(serial[11..].iter().all(|b| *b == 0));
        assert_eq!(std::fs::read(&d.0).unwrap(), vec![0x11u8; 64 << 10]);
        assert!(r.dev.lock().unwrap().avail_features() & (1 << VIRTIO_BLK_F_RO) != 0);
    }

    #[test]
    fn discard_and_write_zeroes_reach_the_file_sync() {
        discard_and_write_zeroes_reach_the_file(EngineKind::Sync);
    }

    #[test]
    fn discard_and_write_zeroes_reach_the_file_io_uring() {
        discard_and_write_zeroes_reach_the_file(EngineKind::IoUring);
    }

    fn discard_and_write_zeroes_reach_the_file(engine: EngineKind) {
        let d = disk(&format!("trim{engine:?}"), 1 << 20);
        let m = mem();
        let dis = header(&m, 0, VIRTIO_BLK_T_DISCARD, 0);
        let wz = header(&m, 1, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let past = header(&m, 2, VIRTIO_BLK_T_DISCARD, 0);
        // segment: sector, num_sectors, flags
        let seg = |at: u64, sector: u64, n: u32| {
            m.write_obj(sector, GuestAddress(at)).unwrap();
            m.write_obj(n, GuestAddress(at + 8)).unwrap();
            m.write_obj(0u32, GuestAddress(at + 12)).unwrap();
        };
        seg(DATA, 8, 16); // discard [4 KiB, 12 KiB)
        seg(DATA + 16, 64, 8); // zero [32 KiB, 36 KiB)
        seg(DATA + 32, 2040, 16); // past the end of 2048 sectors
        let chains = [
            desc(dis, 16, N, 1),
            desc(DATA, 16, N, 2),
            desc(STATUS, 1, W, 0),
            desc(wz, 16, N, 4),
            desc(DATA + 16, 16, N, 5),
            desc(STATUS + 1, 1, W, 0),
            desc(past, 16, N, 7),
            desc(DATA + 32, 16, N, 8),
            desc(STATUS + 2, 1, W, 0),
        ];
        let mut r = rig(&d.0, false, engine, &chains, m);
        run_until_used(&mut r, 3);
        let m = &r.mem;
        assert_eq!((status(m, 0), status(m, 1)), (0, 0));
        assert_eq!(status(m, 2), VIRTIO_BLK_S_IOERR as u8);
        let bytes = std::fs::read(&d.0).unwrap();
        assert!(
            bytes[4096..12288].iter().all(|b| *b == 0),
            "discarded range reads zero"
        );
        assert!(bytes[32768..36864].iter().all(|b| *b == 0), "zeroed range");
        assert_eq!(bytes[4095], 0x11);
        assert_eq!(bytes[36864], 0x11);
        let c = r.dev.lock().unwrap().counters().snapshot();
        assert_eq!((c.discard_ops, c.write_zeroes_ops), (1, 1));
    }

    /// One chain per (header, data, data length, device-writable)
    /// request: header, data, status byte `STATUS + i`.
    fn three_descriptor_chains(requests: &[(u64, u64, u32, bool)]) -> Vec<RawDescriptor> {
        requests
            .iter()
            .enumerate()
            .flat_map(|(i, &(h, data, len, write))| {
                let i = i as u16;
                [
                    desc(h, 16, N, 3 * i + 1),
                    desc(data, len, N | if write { W } else { 0 }, 3 * i + 2),
                    desc(STATUS + u64::from(i), 1, W, 0),
                ]
            })
            .collect()
    }

    /// A copy-on-write disk: every trim goes to the worker.
    fn trim_rig(name: &str, m: GuestMemoryMmap, requests: &[(u64, u64, u32, bool)]) -> (Disk, Rig) {
        let d = disk(name, 1 << 20);
        let chains = three_descriptor_chains(requests);
        for i in 0..requests.len() as u64 {
            m.write_obj(0xffu8, GuestAddress(STATUS + i)).unwrap();
        }
        let cow = CowRange {
            start: 1024 * 512,
            len: 64 * 512,
            limit: 4096,
        };
        let r = rig_cow(&d.0, false, EngineKind::IoUring, &chains, m, Some(cow));
        (d, r)
    }

    #[test]
    fn a_trim_waits_for_the_worker_without_holding_the_device_thread() {
        let m = mem();
        let dis = header(&m, 0, VIRTIO_BLK_T_DISCARD, 0);
        let rd = header(&m, 1, VIRTIO_BLK_T_IN, 100);
        let fl = header(&m, 2, VIRTIO_BLK_T_FLUSH, 0);
        segment(&m, DATA, 8, 16); // discard [4 KiB, 12 KiB)
        let requests = [
            (dis, DATA, 16, false),
            (rd, DATA + 0x10000, 4096, true),
            (fl, DATA + 0x20000, 0, false),
        ];
        let (d, mut r) = trim_rig("trimworker", m, &requests);
        let worker = r.dev.lock().unwrap().take_trim_worker().unwrap();
        // The worker does not run yet: the read completes, the discard and
        // the flush behind it wait, and the device thread is free.
        let used = run_until_used(&mut r, 1);
        for _ in 0..20 {
            r.em.run_with_timeout(5).unwrap();
        }
        assert_eq!(used_idx(&r), 1, "only the read completed");
        assert_eq!(used[0].0, 3, "the read's head");
        assert_eq!((status(&r.mem, 0), status(&r.mem, 2)), (0xff, 0xff));
        assert_eq!(status(&r.mem, 1), 0);
        assert_eq!(std::fs::read(&d.0).unwrap()[4096], 0x11, "not yet");
        // The worker runs: the discard completes, then the flush.
        let t = std::thread::spawn(move || worker.run());
        run_until_used(&mut r, 3);
        assert_eq!((status(&r.mem, 0), status(&r.mem, 2)), (0, 0));
        let bytes = std::fs::read(&d.0).unwrap();
        assert!(bytes[4096..12288].iter().all(|b| *b == 0), "discarded");
        assert_eq!((bytes[4095], bytes[12288]), (0x11, 0x11));
        let c = r.dev.lock().unwrap().counters().snapshot();
        assert_eq!((c.discard_ops, c.flush_ops, c.io_errors), (1, 1, 0));
        // Dropping the device ends the worker.
        drop(r);
        t.join().unwrap();
    }

    #[test]
    fn a_reset_waits_for_the_trims_with_the_worker() {
        let m = mem();
        let wz = header(&m, 0, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        segment(&m, DATA, 8, 8);
        let (_d, mut r) = trim_rig("trimreset", m, &[(wz, DATA, 16, false)]);
        let worker = r.dev.lock().unwrap().take_trim_worker().unwrap();
        r.em.run_with_timeout(10).unwrap();
        let mut dev = r.dev.lock().unwrap();
        assert!(dev.reset());
        drop(dev);
        for _ in 0..20 {
            r.em.run_with_timeout(5).unwrap();
        }
        assert!(
            r.dev.lock().unwrap().reset_pending(),
            "the write-zeroes is still with the worker"
        );
        let t = std::thread::spawn(move || worker.run());
        for _ in 0..1000 {
            if !r.dev.lock().unwrap().reset_pending() {
                break;
            }
            r.em.run_with_timeout(5).unwrap();
        }
        assert!(!r.dev.lock().unwrap().reset_pending());
        assert_eq!(used_idx(&r), 0, "no request answered after reset");
        assert_eq!(status(&r.mem, 0), 0xff);
        drop(r);
        t.join().unwrap();
    }

    #[test]
    fn reset_leaves_in_flight_io_to_the_device_thread() {
        let d = disk("resetflight", 64 << 10);
        let m = mem();
        let chains: Vec<RawDescriptor> = (0..8u16)
            .flat_map(|i| {
                let h = header(&m, u64::from(i), VIRTIO_BLK_T_IN, u64::from(i));
                let data = DATA + u64::from(i) * 0x1000;
                [
                    desc(h, 16, N, 3 * i + 1),
                    desc(data, 4096, N | W, 3 * i + 2),
                    desc(STATUS + u64::from(i), 1, W, 0),
                ]
            })
            .collect();
        let mut r = rig(&d.0, false, EngineKind::IoUring, &chains, m);
        // One round of the device thread: activation, the reads submitted
        // (their completions not taken yet). Then a reset, as the vCPU
        // does it: it returns without waiting for them.
        r.em.run_with_timeout(10).unwrap();
        let used_before = used_idx(&r);
        assert!(r.dev.lock().unwrap().active.is_some());
        let mut dev = r.dev.lock().unwrap();
        assert!(dev.reset());
        assert!(dev.reset_pending(), "the reads are still in flight");
        drop(dev);
        // The device thread takes their completions; the reset then ends.
        for _ in 0..1000 {
            if !r.dev.lock().unwrap().reset_pending() {
                break;
            }
            r.em.run_with_timeout(5).unwrap();
        }
        let dev = r.dev.lock().unwrap();
        assert!(!dev.reset_pending());
        assert!(dev.draining.is_empty());
        assert_eq!(used_idx(&r), used_before, "no request answered after reset");
    }

    #[test]
    fn reset_and_reactivation_reuse_no_stale_fds() {
        let d = disk("reset", 64 << 10);
        let m = mem();
        let h = header(&m, 0, VIRTIO_BLK_T_IN, 0);
        let chains = [
            desc(h, 16, N, 1),
            desc(DATA, 512, N | W, 2),
            desc(STATUS, 1, W, 0),
        ];
        let mut r = rig(&d.0, false, EngineKind::IoUring, &chains, m);
        run_until_used(&mut r, 1);
        // Reset and activate again, several times: each activation must
        // start serving (fd numbers get reused once the old ones close).
        for round in 0..3u16 {
            assert!(r.dev.lock().unwrap().reset());
            r.em.run_with_timeout(10).unwrap();
            let q = MockSplitQueue::new(&r.mem, 32);
            q.add_desc_chains(&chains, 0).unwrap();
            let queue: Queue = q.create_queue().unwrap();
            r.dev.lock().unwrap().set_acked_features(VIRTIO_F_VERSION_1);
            r.dev
                .lock()
                .unwrap()
                .activate(ActivateContext {
                    mem: r.mem.clone(),
                    queues: vec![queue],
                    queue_evts: vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
                    interrupt: r.interrupt.clone(),
                })
                .unwrap();
            r.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
            run_until_used(&mut r, 1);
            assert_eq!(status(&r.mem, 0), 0, "round {round}");
        }
    }

    #[test]
    fn host_enospc_reaches_the_guest_as_ioerr_and_is_counted() {
        // A 1 MiB tmpfs holding a sparse 8 MiB disk: writes past the space
        // fail on the host with ENOSPC.
        let mnt = std::env::temp_dir().join(format!("keel-enospc-{}", std::process::id()));
        std::fs::create_dir_all(&mnt).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&mnt)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "mounting a tmpfs needs root (the test suite runs as root)"
        );
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
                let _ = std::fs::remove_dir(&self.0);
            }
        }
        let _guard = Unmount(mnt.clone());
        let path = mnt.join("disk.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let m = mem();
        let w = header(&m, 0, VIRTIO_BLK_T_OUT, 0);
        let chains = [
            desc(w, 16, N, 1),
            desc(DATA, 2 << 20, N, 2),
            desc(STATUS, 1, W, 0),
        ];
        let mut r = rig(&path, false, EngineKind::IoUring, &chains, m);
        run_until_used(&mut r, 1);
        assert_eq!(status(&r.mem, 0), VIRTIO_BLK_S_IOERR as u8);
        let c = r.dev.lock().unwrap().counters().snapshot();
        assert_eq!((c.io_errors, c.write_ops), (1, 0));
    }

    #[test]
    fn the_cow_range_takes_writes_zeroes_and_discards_without_touching_the_disk() {
        // 1 MiB disk; sectors [256, 512) are copy-on-write, 8 KiB at most.
        let d = disk("cow", 1 << 20);
        let m = mem();
        let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
        m.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        let w = header(&m, 0, VIRTIO_BLK_T_OUT, 252); // 2 KiB before, 6 KiB inside
        let r = header(&m, 1, VIRTIO_BLK_T_IN, 252);
        let over = header(&m, 2, VIRTIO_BLK_T_OUT, 300); // 8 KiB more: over the limit
        let z = header(&m, 3, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let dis = header(&m, 4, VIRTIO_BLK_T_DISCARD, 0);
        segment(&m, DATA + 0x8000, 510, 4); // zeroes: 2 sectors inside, 2 after
        segment(&m, DATA + 0x8010, 256, 256); // discard: the whole range
                                              // (header, data, data length, device-writable) per request.
        let requests = [
            (w, DATA, 8192, false),
            (r, DATA + 0x10000, 8192, true),
            (over, DATA, 8192, false),
            (z, DATA + 0x8000, 16, false),
            (dis, DATA + 0x8010, 16, false),
        ];
        let chains = three_descriptor_chains(&requests);
        let cow = CowRange {
            start: 256 * 512,
            len: 256 * 512,
            limit: 8192,
        };
        let mut rig = rig_cow(&d.0, false, EngineKind::IoUring, &chains, m, Some(cow));
        run_until_used(&mut rig, 5);
        let m = &rig.mem;
        assert_eq!((status(m, 0), status(m, 1)), (0, 0));
        assert_eq!(status(m, 2), VIRTIO_BLK_S_IOERR as u8, "over the limit");
        assert_eq!((status(m, 3), status(m, 4)), (0, 0));
        let mut back = vec![0u8; 8192];
        m.read_slice(&mut back, GuestAddress(DATA + 0x10000))
            .unwrap();
        assert!(back == pattern, "reads see the overlay");
        let host = std::fs::read(&d.0).unwrap();
        assert_eq!(
            &host[252 * 512..256 * 512],
            &pattern[..2048],
            "before the range"
        );
        assert!(
            host[256 * 512..512 * 512].iter().all(|b| *b == 0x11),
            "range untouched"
        );
        assert!(
            host[512 * 512..514 * 512].iter().all(|b| *b == 0),
            "zeroes after it"
        );
        assert_eq!(host[514 * 512], 0x11);
        let c = rig.dev.lock().unwrap().counters().snapshot();
        assert_eq!((c.cow_limit_errors, c.io_errors, c.write_ops), (1, 0, 1));
        assert_eq!((c.write_zeroes_ops, c.discard_ops), (1, 1));
    }

    #[test]
    fn config_space_reports_capacity_and_limits() {
        let d = disk("cfg", 1 << 20);
        let blk = VirtioBlock::new(
            DiskBackend::open(&d.0, false, false).unwrap(),
            BlockConfig::default(),
        )
        .unwrap();
        let mut cap = [0u8; 8];
        blk.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 2048);
        let mut seg = [0u8; 4];
        blk.read_config(12, &mut seg);
        assert_eq!(u32::from_le_bytes(seg), SEG_MAX);
        let mut past = [0xffu8; 4];
        blk.read_config(100, &mut past);
        assert_eq!(past, [0; 4]);
        let f = blk.avail_features();
        assert!(f & (1 << VIRTIO_BLK_F_FLUSH) != 0 && f & (1 << VIRTIO_BLK_F_DISCARD) != 0);
    }

    // Multi-queue.

    /// Records the queues whose interrupts were signalled, in order (as
    /// virtio-pci's MSI-X vectors would take them).
    #[derive(Debug, Default)]
    struct Signals(Mutex<Vec<u16>>);

    impl crate::virtio::VectorSink for Signals {
        fn signal(&self, source: crate::virtio::InterruptSource) -> bool {
            if let crate::virtio::InterruptSource::Queue(q) = source {
                self.0.lock().unwrap().push(q);
            }
            true
        }
    }

    impl Signals {
        fn take(&self) -> Vec<u16> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    /// Where queue `q`'s rings lie (32 entries each).
    fn ring_at(q: usize) -> GuestAddress {
        GuestAddress(q as u64 * 0x8000)
    }

    struct MqRig {
        mem: GuestMemoryMmap,
        dev: Arc<Mutex<VirtioBlock>>,
        em: Em,
        signals: Arc<Signals>,
        evts: Vec<EventFd>,
        used: Vec<GuestAddress>,
    }

    /// A disk with `num_queues` queues of which the driver enabled the
    /// first `chains.len()`, queue `q` holding `chains[q]`.
    fn mq_rig(
        path: &std::path::Path,
        engine: EngineKind,
        num_queues: u16,
        chains: &[&[RawDescriptor]],
        mem: GuestMemoryMmap,
        cow: Option<CowRange>,
    ) -> MqRig {
        let mut blk = VirtioBlock::new(
            DiskBackend::open(path, false, false).unwrap(),
            BlockConfig {
                serial: None,
                engine,
                cow,
                num_queues,
            },
        )
        .unwrap();
        assert_eq!(blk.num_queues(), usize::from(num_queues));
        blk.set_acked_features(VIRTIO_F_VERSION_1 | (1 << VIRTIO_BLK_F_MQ));
        let mut queues = Vec::new();
        let mut used = Vec::new();
        for q in 0..usize::from(num_queues) {
            match chains.get(q) {
                Some(c) => {
                    let m = MockSplitQueue::create(&mem, ring_at(q), 32);
                    m.add_desc_chains(c, 0).unwrap();
                    used.push(m.used_addr());
                    queues.push(m.create_queue().unwrap());
                }
                // Not enabled by the driver.
                None => queues.push(Queue::new(QUEUE_SIZE).unwrap()),
            }
        }
        let dev = Arc::new(Mutex::new(blk));
        let mut em = Em::new().unwrap();
        em.add_subscriber(dev.clone());
        let signals = Arc::new(Signals::default());
        let interrupt =
            Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()).with_vectors(signals.clone());
        let evts: Vec<EventFd> = (0..num_queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        dev.lock()
            .unwrap()
            .activate(ActivateContext {
                mem: mem.clone(),
                queues,
                queue_evts: evts.iter().map(|e| e.try_clone().unwrap()).collect(),
                interrupt: Arc::new(interrupt),
            })
            .unwrap();
        MqRig {
            mem,
            dev,
            em,
            signals,
            evts,
            used,
        }
    }

    impl MqRig {
        /// Queue `q`'s used entries so far, (head, length).
        fn used(&self, q: usize) -> Vec<(u32, u32)> {
            let at = self.used[q];
            let idx: u16 = self.mem.read_obj(at.unchecked_add(2)).unwrap();
            (0..u64::from(idx))
                .map(|i| {
                    let e = at.unchecked_add(4 + i * 8);
                    (
                        self.mem.read_obj(e).unwrap(),
                        self.mem.read_obj(e.unchecked_add(4)).unwrap(),
                    )
                })
                .collect()
        }

        /// Runs the device until queue `q` has `n` used entries, for each
        /// `(q, n)` of `want`.
        fn run_until(&mut self, want: &[(usize, usize)]) {
            for _ in 0..400 {
                if want.iter().all(|&(q, n)| self.used(q).len() >= n) {
                    return;
                }
                self.em.run_with_timeout(10).unwrap();
            }
            panic!("device did not complete {want:?}");
        }

        /// The driver adds `chain` to queue `q` at descriptor `at` and
        /// notifies.
        fn push(&self, q: usize, chain: &[RawDescriptor], at: u16) {
            // The layout of MockSplitQueue::create(ring_at(q), 32), whose
            // constructor would clear the rings' indices.
            let table = ring_at(q);
            let avail = table.unchecked_add(16 * 32);
            let mut idx: u16 = self.mem.read_obj(avail.unchecked_add(2)).unwrap();
            let mut head = true;
            for (i, d) in chain.iter().enumerate() {
                let n = at + i as u16;
                self.mem
                    .write_obj(*d, table.unchecked_add(16 * u64::from(n)))
                    .unwrap();
                if head {
                    let slot = avail.unchecked_add(4 + 2 * u64::from(idx % 32));
                    self.mem.write_obj(n, slot).unwrap();
                    idx = idx.wrapping_add(1);
                }
                head = Descriptor::from(*d).flags() & N == 0;
            }
            self.mem.write_obj(idx, avail.unchecked_add(2)).unwrap();
            self.evts[q].write(1).unwrap();
        }

        /// Queue `q`'s state on the device thread.
        fn with_queue<T>(&self, q: usize, f: impl FnOnce(&BlkQueue) -> T) -> T {
            let dev = self.dev.lock().unwrap();
            let a = dev.active.as_ref().expect("active");
            f(a.queues.iter().find(|s| usize::from(s.index) == q).unwrap())
        }
    }

    /// A request chain (header, one data buffer, status at `STATUS + s`),
    /// its descriptors from `first`.
    fn chain3(
        first: u16,
        hdr: u64,
        data: u64,
        len: u32,
        write: bool,
        s: u64,
    ) -> [RawDescriptor; 3] {
        [
            desc(hdr, 16, N, first + 1),
            desc(data, len, N | if write { W } else { 0 }, first + 2),
            desc(STATUS + s, 1, W, 0),
        ]
    }

    #[test]
    fn config_space_and_features_announce_the_queues() {
        let d = disk("mqcfg", 1 << 20);
        for (n, mq) in [(1u16, false), (4, true), (99, true)] {
            let blk = VirtioBlock::new(
                DiskBackend::open(&d.0, false, false).unwrap(),
                BlockConfig {
                    num_queues: n,
                    ..BlockConfig::default()
                },
            )
            .unwrap();
            let want = n.min(MAX_QUEUES);
            let mut b = [0u8; 2];
            blk.read_config(34, &mut b);
            assert_eq!(u16::from_le_bytes(b), want, "num_queues at 34");
            assert_eq!(blk.queue_max_sizes().len(), usize::from(want));
            assert_eq!(blk.avail_features() & (1 << VIRTIO_BLK_F_MQ) != 0, mq);
        }
    }

    #[test]
    fn requests_on_each_queue_complete_on_that_queue_and_signal_it() {
        for engine in [EngineKind::IoUring, EngineKind::Sync] {
            let d = disk(&format!("mq-{engine:?}"), 1 << 20);
            let m = mem();
            let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
            m.write_slice(&pattern, GuestAddress(DATA + 0x10000))
                .unwrap();
            let r0 = header(&m, 0, VIRTIO_BLK_T_IN, 0);
            let w1 = header(&m, 1, VIRTIO_BLK_T_OUT, 8);
            let r1 = header(&m, 2, VIRTIO_BLK_T_IN, 16);
            let q0 = chain3(0, r0, DATA, 4096, true, 0);
            let mut q1 = chain3(0, w1, DATA + 0x10000, 4096, false, 1).to_vec();
            q1.extend(chain3(3, r1, DATA + 0x20000, 4096, true, 2));
            for i in 0..4 {
                m.write_obj(0xffu8, GuestAddress(STATUS + i)).unwrap();
            }
            let mut r = mq_rig(&d.0, engine, 2, &[&q0, &q1], m, None);
            r.run_until(&[(0, 1), (1, 2)]);
            assert_eq!(r.used(0), [(0, 4097)], "{engine:?}: the read, on queue 0");
            let mut on1 = r.used(1);
            on1.sort();
            assert_eq!(on1, [(0, 1), (3, 4097)], "{engine:?}: both on queue 1");
            assert_eq!(
                (status(&r.mem, 0), status(&r.mem, 1), status(&r.mem, 2)),
                (0, 0, 0)
            );
            let mut got = r.signals.take();
            got.sort();
            got.dedup();
            assert_eq!(got, [0, 1], "{engine:?}: each queue signalled");
            // A request on queue 1 alone: queue 1's used ring, its vector.
            let r2 = header(&r.mem, 3, VIRTIO_BLK_T_IN, 8);
            r.push(1, &chain3(6, r2, DATA + 0x30000, 4096, true, 3), 6);
            r.run_until(&[(1, 3)]);
            assert_eq!(r.used(1)[2], (6, 4097));
            assert_eq!(r.used(0).len(), 1, "{engine:?}: nothing on queue 0");
            let sig = r.signals.take();
            assert!(!sig.is_empty() && sig.iter().all(|&q| q == 1), "{sig:?}");
            let mut back = vec![0u8; 4096];
            r.mem
                .read_slice(&mut back, GuestAddress(DATA + 0x30000))
                .unwrap();
            assert!(
                back == pattern,
                "{engine:?}: queue 0's write read back on queue 1"
            );
            let c = r.dev.lock().unwrap().counters().snapshot();
            assert_eq!((c.read_ops, c.write_ops), (3, 1));
        }
    }

    #[test]
    fn a_driver_may_enable_fewer_queues_than_offered() {
        let d = disk("mqfew", 64 << 10);
        let m = mem();
        let h = header(&m, 0, VIRTIO_BLK_T_IN, 0);
        let q0 = chain3(0, h, DATA, 512, true, 0);
        // Four offered; the driver (without MQ, or one CPU) uses queue 0.
        let mut r = mq_rig(&d.0, EngineKind::IoUring, 4, &[&q0], m, None);
        r.run_until(&[(0, 1)]);
        assert_eq!(status(&r.mem, 0), 0);
        assert_eq!(
            r.dev.lock().unwrap().active.as_ref().unwrap().queues.len(),
            1
        );
        assert_eq!(r.signals.take(), [0]);
        // An enabled queue whose rings are not in guest memory is refused.
        let d2 = disk("mqfew2", 64 << 10);
        let mut blk = VirtioBlock::new(
            DiskBackend::open(&d2.0, false, false).unwrap(),
            BlockConfig {
                num_queues: 2,
                ..BlockConfig::default()
            },
        )
        .unwrap();
        let mk = |at: u64| {
            let mut q = Queue::new(32).unwrap();
            q.set_size(32);
            q.set_desc_table_address(Some(at as u32), Some((at >> 32) as u32));
            q.set_avail_ring_address(Some(at as u32 + 0x1000), Some((at >> 32) as u32));
            q.set_used_ring_address(Some(at as u32 + 0x2000), Some((at >> 32) as u32));
            q.set_ready(true);
            q
        };
        let err = blk
            .activate(ActivateContext {
                mem: r.mem.clone(),
                queues: vec![mk(0), mk(0x7f_0000_0000)],
                queue_evts: (0..2)
                    .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
                    .collect(),
                interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
            })
            .unwrap_err();
        assert!(matches!(err, ActivateError::InvalidQueue(1)), "{err}");
    }

    #[test]
    fn a_flush_covers_writes_completed_on_any_queue_and_waits_only_for_its_own() {
        let d = disk("mqflush", 1 << 20);
        let m = mem();
        m.write_slice(&[0x5au8; 4096], GuestAddress(DATA)).unwrap();
        m.write_slice(&[0xa5u8; 4096], GuestAddress(DATA + 0x1000))
            .unwrap();
        let w1 = header(&m, 0, VIRTIO_BLK_T_OUT, 8);
        for i in 0..4 {
            m.write_obj(0xffu8, GuestAddress(STATUS + i)).unwrap();
        }
        let q0 = chain3(0, w1, DATA, 4096, false, 0);
        let mut r = mq_rig(&d.0, EngineKind::IoUring, 2, &[&q0, &[]], m, None);
        // W1 on queue 0 completes (the guest sees it used).
        r.run_until(&[(0, 1)]);
        assert_eq!(status(&r.mem, 0), 0);
        // Then W2 and a FLUSH behind it on queue 0, a FLUSH on queue 1.
        // The device thread takes queue 0 first, then queue 1, without
        // reaping W2's completion in between.
        let w2 = header(&r.mem, 1, VIRTIO_BLK_T_OUT, 16);
        let f1 = header(&r.mem, 2, VIRTIO_BLK_T_FLUSH, 0);
        let f0 = header(&r.mem, 3, VIRTIO_BLK_T_FLUSH, 0);
        let mut more0 = chain3(3, w2, DATA + 0x1000, 4096, false, 1).to_vec();
        more0.extend([desc(f0, 16, N, 7), desc(STATUS + 3, 1, W, 0)]);
        r.push(0, &more0, 3);
        r.push(1, &[desc(f1, 16, N, 1), desc(STATUS + 2, 1, W, 0)], 0);
        r.dev.lock().unwrap().process_queue(0);
        let in_flight = |r: &MqRig, q| r.with_queue(q, |s| s.uring.as_ref().unwrap().in_flight());
        assert_eq!(in_flight(&r, 0), 1, "W2 in flight");
        assert_eq!(
            r.with_queue(0, |q| q.barrier.waiting()),
            1,
            "queue 0's flush waits for W2, sent before it on its queue"
        );
        r.dev.lock().unwrap().process_queue(1);
        // Queue 1's flush went to the host at once: W1 completed before it
        // was sent (so the fdatasync covers it); W2, in flight on queue 0,
        // the guest has not seen completed, and it is not waited for.
        assert_eq!(r.with_queue(1, |q| q.barrier.waiting()), 0);
        assert_eq!(in_flight(&r, 1), 1, "queue 1's fdatasync submitted");
        assert_eq!(in_flight(&r, 0), 1, "while W2 is still in flight");
        r.run_until(&[(0, 3), (1, 1)]);
        let used0: Vec<u32> = r.used(0).iter().map(|u| u.0).collect();
        let pos = |h: u32| used0.iter().position(|&x| x == h).unwrap();
        assert!(pos(3) < pos(6), "queue 0's flush after W2: {used0:?}");
        for i in 0..4 {
            assert_eq!(status(&r.mem, i), 0, "request {i}");
        }
        let c = r.dev.lock().unwrap().counters().snapshot();
        assert_eq!((c.write_ops, c.flush_ops), (2, 2));
        let bytes = std::fs::read(&d.0).unwrap();
        assert!(bytes[8 * 512..8 * 512 + 4096].iter().all(|b| *b == 0x5a));
        assert!(bytes[16 * 512..16 * 512 + 4096].iter().all(|b| *b == 0xa5));
    }

    #[test]
    fn reset_with_io_in_flight_on_two_queues_waits_for_both() {
        let d = disk("mqreset", 64 << 10);
        let m = mem();
        let reads = |q: u64| -> Vec<RawDescriptor> {
            (0..8u16)
                .flat_map(|i| {
                    let n = q * 8 + u64::from(i);
                    let h = header(&m, n, VIRTIO_BLK_T_IN, n);
                    chain3(3 * i, h, DATA + n * 0x1000, 4096, true, n)
                })
                .collect()
        };
        let (c0, c1) = (reads(0), reads(1));
        let mut r = mq_rig(&d.0, EngineKind::IoUring, 2, &[&c0, &c1], m, None);
        // One round: activation, both queues' reads submitted.
        r.em.run_with_timeout(10).unwrap();
        let before = (r.used(0).len(), r.used(1).len());
        let in_flight = |r: &MqRig, q| r.with_queue(q, |s| s.uring.as_ref().unwrap().in_flight());
        assert!(in_flight(&r, 0) > 0 && in_flight(&r, 1) > 0);
        r.signals.take();
        assert!(r.dev.lock().unwrap().reset());
        assert!(r.dev.lock().unwrap().reset_pending());
        for _ in 0..1000 {
            if !r.dev.lock().unwrap().reset_pending() {
                break;
            }
            r.em.run_with_timeout(5).unwrap();
        }
        let dev = r.dev.lock().unwrap();
        assert!(!dev.reset_pending());
        assert!(dev.draining.is_empty());
        drop(dev);
        assert_eq!((r.used(0).len(), r.used(1).len()), before, "none answered");
        assert!(r.signals.take().is_empty(), "no interrupt after reset");
    }

    #[test]
    fn trims_from_any_queue_go_through_the_worker_and_come_back_on_their_queue() {
        let d = disk("mqtrim", 1 << 20);
        let m = mem();
        let dis = header(&m, 0, VIRTIO_BLK_T_DISCARD, 0);
        let wz = header(&m, 1, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        segment(&m, DATA, 8, 16); // discard [4 KiB, 12 KiB)
        segment(&m, DATA + 16, 64, 8); // zero [32 KiB, 36 KiB)
        for i in 0..2 {
            m.write_obj(0xffu8, GuestAddress(STATUS + i)).unwrap();
        }
        let q0 = chain3(0, wz, DATA + 16, 16, false, 1);
        let q1 = chain3(0, dis, DATA, 16, false, 0);
        // A copy-on-write range elsewhere: both trims go to the worker.
        let cow = CowRange {
            start: 1024 * 512,
            len: 64 * 512,
            limit: 4096,
        };
        let mut r = mq_rig(&d.0, EngineKind::IoUring, 2, &[&q0, &q1], m, Some(cow));
        let worker = r.dev.lock().unwrap().take_trim_worker().unwrap();
        r.em.run_with_timeout(10).unwrap();
        assert_eq!(r.with_queue(0, |q| q.trims), 1);
        assert_eq!(r.with_queue(1, |q| q.trims), 1);
        let t = std::thread::spawn(move || worker.run());
        r.run_until(&[(0, 1), (1, 1)]);
        assert_eq!((r.used(0), r.used(1)), (vec![(0, 1)], vec![(0, 1)]));
        assert_eq!((status(&r.mem, 0), status(&r.mem, 1)), (0, 0));
        let mut sig = r.signals.take();
        sig.sort();
        sig.dedup();
        assert_eq!(sig, [0, 1]);
        let bytes = std::fs::read(&d.0).unwrap();
        assert!(bytes[4096..12288].iter().all(|b| *b == 0), "discarded");
        assert!(bytes[32768..36864].iter().all(|b| *b == 0), "zeroed");
        assert_eq!(
            (bytes[4095], bytes[12288], bytes[36864]),
            (0x11, 0x11, 0x11)
        );
        drop(r);
        t.join().unwrap();
    }
}
