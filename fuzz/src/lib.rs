//! Shared pieces of Keel's fuzz targets: a cursor over the fuzz input and a
//! rig that lays out split virtqueues in guest memory from that input,
//! activates a device on them and runs its event loop on this thread.
//!
//! Everything a target creates (guest memory, eventfds, the epoll fd, temp
//! files) is dropped at the end of its iteration: nothing leaks across
//! iterations and no thread is started.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use devices::virtio::{ActivateContext, Interrupt, VirtioDevice};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Guest memory size.
pub const MEM_SIZE: u64 = 0x10_0000;
/// Where the input's trailing bytes land in guest memory (request headers,
/// payloads, ...): seeds point their descriptors here.
pub const DATA: u64 = 0x8_0000;
/// Size of every fuzzed queue.
pub const QUEUE_SIZE: u16 = 16;

/// Reads little-endian integers off the front of the fuzz input; an
/// exhausted input reads as zeros.
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    /// The next `n` bytes (fewer at the end).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    fn int<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let h = self.take(N);
        b[..h.len()].copy_from_slice(h);
        b
    }

    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.int::<1>()[0]
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.int())
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.int())
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.int())
    }

    /// Whatever is left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(self.0.len())
    }
}

/// Fresh guest memory of [`MEM_SIZE`] bytes.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("anonymous guest memory")
}

/// Copies `data` to [`DATA`] (what fits).
pub fn fill_data(mem: &GuestMemoryMmap, data: &[u8]) {
    let n = data.len().min((MEM_SIZE - DATA) as usize);
    mem.write_slice(&data[..n], GuestAddress(DATA))
        .expect("DATA area is in guest memory");
}

/// One queue in guest memory, filled from the input.
pub struct Ring {
    /// The used ring's address.
    pub used: GuestAddress,
    queue: virtio_queue::Queue,
}

impl Ring {
    /// Queue `index` at its own page: reads a descriptor count (mod
    /// [`QUEUE_SIZE`] + 1), that many raw descriptors (addr u64, len u32,
    /// flags u16, next u16), an available-entry count and that many heads.
    pub fn from_input(mem: &GuestMemoryMmap, index: u64, input: &mut Input<'_>) -> Ring {
        let q = MockSplitQueue::create(mem, GuestAddress(0x1000 * (index + 1)), QUEUE_SIZE);
        let n = u16::from(input.u8()) % (QUEUE_SIZE + 1);
        for i in 0..n {
            let d = Descriptor::new(input.u64(), input.u32(), input.u16(), input.u16());
            mem.write_obj(
                RawDescriptor::from(d),
                q.desc_table_addr().unchecked_add(u64::from(i) * 16),
            )
            .expect("descriptor table is in guest memory");
        }
        let m = u16::from(input.u8()) % (QUEUE_SIZE + 1);
        for i in 0..m {
            mem.write_obj(
                input.u16(),
                q.avail_addr().unchecked_add(4 + 2 * u64::from(i)),
            )
            .expect("avail ring is in guest memory");
        }
        mem.write_obj(m, q.avail_addr().unchecked_add(2))
            .expect("avail ring is in guest memory");
        Ring {
            used: q.used_addr(),
            queue: q.create_queue().expect("a valid mock queue"),
        }
    }
}

/// The event loop type the VMM runs devices on.
pub type Em = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// A device activated on fuzzed rings, with its event loop.
pub struct Rig<D> {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The device.
    pub dev: Arc<Mutex<D>>,
    /// Its event loop.
    pub em: Em,
    /// The queues' notification eventfds.
    pub evts: Vec<EventFd>,
    /// The queues' used rings.
    pub used: Vec<GuestAddress>,
}

impl<D: VirtioDevice + MutEventSubscriber + Send + 'static> Rig<D> {
    /// Acks `features` (masked by the offer), activates `dev` on `rings`
    /// and lets it handle its activation (and the requests already queued).
    pub fn new(mut dev: D, features: u64, mem: GuestMemoryMmap, rings: Vec<Ring>) -> Rig<D> {
        let offer = dev.avail_features();
        dev.set_acked_features(features & offer);
        let dev = Arc::new(Mutex::new(dev));
        let mut em = Em::new().expect("epoll");
        em.add_subscriber(dev.clone());
        let evts: Vec<EventFd> = rings
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
            .collect();
        let used = rings.iter().map(|r| r.used).collect();
        let ctx = ActivateContext {
            mem: mem.clone(),
            queues: rings.into_iter().map(|r| r.queue).collect(),
            queue_evts: evts
                .iter()
                .map(|e| e.try_clone().expect("eventfd"))
                .collect(),
            interrupt: Arc::new(Interrupt::new(
                EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            )),
        };
        // Refusing the queues (a wrong count) is a valid outcome.
        let _ = dev.lock().expect("device lock").activate(ctx);
        let mut rig = Rig {
            mem,
            dev,
            em,
            evts,
            used,
        };
        rig.spin();
        rig
    }

    /// Kicks queue `i`.
    pub fn kick(&mut self, i: usize) {
        if let Some(e) = self.evts.get(i) {
            let _ = e.write(1);
        }
    }

    /// Runs the event loop until nothing is pending (at most a few rounds).
    pub fn spin(&mut self) {
        for _ in 0..4 {
            match self.em.run_with_timeout(0) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}

/// This process's disk: a 64 KiB temp file named by `tag` and the pid,
/// created on the first call (later calls return it whatever their tag).
pub fn temp_disk(tag: &str) -> &'static Path {
    static DISK: OnceLock<PathBuf> = OnceLock::new();
    DISK.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("keel-fuzz-{tag}-{}", std::process::id()));
        std::fs::write(&p, vec![0x5au8; 64 << 10]).expect("temp disk");
        p
    })
}

/// A virtio-blk device on this process's temp disk (`tag`, see
/// [`temp_disk`]) with the synchronous engine, subscribed to a fresh event
/// loop, and the two eventfds a transport needs (interrupt line, queue 0's
/// notification); `None` if any of it cannot be made.
pub fn sync_block_in_loop(
    tag: &str,
) -> Option<(
    Arc<Mutex<devices::virtio::block::VirtioBlock>>,
    Em,
    EventFd,
    EventFd,
)> {
    use devices::virtio::block::{BlockConfig, DiskBackend, EngineKind, VirtioBlock};
    let backend = DiskBackend::open(temp_disk(tag), false, false).ok()?;
    let config = BlockConfig {
        serial: None,
        engine: EngineKind::Sync,
        cow: None,
        num_queues: 1,
    };
    let blk = Arc::new(Mutex::new(VirtioBlock::new(backend, config).ok()?));
    let mut em = Em::new().ok()?;
    em.add_subscriber(blk.clone());
    let irq = EventFd::new(libc::EFD_NONBLOCK).ok()?;
    let notify = EventFd::new(libc::EFD_NONBLOCK).ok()?;
    Some((blk, em, irq, notify))
}
