//! virtio-blk benchmark: Keel's device request path, driven in-process
//! through real split rings in guest memory, against raw io_uring on the
//! same backing at the same depth.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::virtio::block::{BlockConfig, DiskBackend, EngineKind, VirtioBlock};
use devices::virtio::{
    ActivateContext, Interrupt, InterruptSource, VectorSink, VirtioDevice, VIRTIO_F_VERSION_1,
};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use io_uring::{opcode, types, IoUring};
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_MQ;
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const DISK_SIZE: u64 = 256 << 20;
const QSIZE: u16 = 256;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x3000;
const USED: u64 = 0x4000;
const HDRS: u64 = 0x10000;
const STATUS: u64 = 0x20000;
const BUFS: u64 = 0x100000;
const MEM: usize = 48 << 20;

/// One workload row.
#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    write: bool,
    random: bool,
    bs: u64,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "4K randread",
        write: false,
        random: true,
        bs: 4096,
    },
    Workload {
        name: "4K randwrite",
        write: true,
        random: true,
        bs: 4096,
    },
    Workload {
        name: "1M seqread",
        write: false,
        random: false,
        bs: 1 << 20,
    },
    Workload {
        name: "1M seqwrite",
        write: true,
        random: false,
        bs: 1 << 20,
    },
];

/// Offsets of a workload: xorshift over the disk, or sequential, wrapping.
struct Offsets {
    state: u64,
    next_seq: u64,
    w: Workload,
}

impl Offsets {
    fn new(w: Workload) -> Self {
        Offsets {
            state: 0x9e37_79b9_7f4a_7c15,
            next_seq: 0,
            w,
        }
    }
    fn next(&mut self) -> u64 {
        let blocks = DISK_SIZE / self.w.bs;
        if self.w.random {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            (self.state % blocks) * self.w.bs
        } else {
            let o = self.next_seq;
            self.next_seq = (self.next_seq + self.w.bs) % (blocks * self.w.bs);
            o
        }
    }
}

/// Result of one run: operations and bytes per second.
#[derive(Clone, Copy, Default)]
struct Rate {
    iops: f64,
    mib_s: f64,
}

fn rate(ops: u64, bs: u64, elapsed: Duration) -> Rate {
    let s = elapsed.as_secs_f64();
    Rate {
        iops: ops as f64 / s,
        mib_s: (ops * bs) as f64 / s / (1 << 20) as f64,
    }
}

fn open_direct(path: &Path) -> std::fs::File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Raw io_uring: `qd` single-buffer requests kept in flight.
fn raw(path: &Path, w: Workload, qd: usize, dur: Duration) -> Rate {
    let file = open_direct(path);
    let layout = std::alloc::Layout::from_size_align(w.bs as usize * qd, 4096).expect("layout");
    // SAFETY: non-zero size; freed below.
    let buf = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!buf.is_null());
    let mut ring = IoUring::new(64).expect("io_uring");
    let mut offs = Offsets::new(w);
    let push = |ring: &mut IoUring, slot: usize, off: u64| {
        // SAFETY: the buffer outlives the ring's operations (drained below).
        let ptr = unsafe { buf.add(slot * w.bs as usize) };
        let e = if w.write {
            opcode::Write::new(types::Fd(file.as_raw_fd()), ptr, w.bs as u32)
                .offset(off)
                .build()
        } else {
            opcode::Read::new(types::Fd(file.as_raw_fd()), ptr, w.bs as u32)
                .offset(off)
                .build()
        };
        // SAFETY: as above.
        unsafe { ring.submission().push(&e.user_data(slot as u64)) }.expect("sq space");
    };
    for slot in 0..qd {
        push(&mut ring, slot, offs.next());
    }
    let start = Instant::now();
    let mut ops = 0u64;
    let mut in_flight = qd;
    loop {
        ring.submit_and_wait(1).expect("submit");
        let done: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (slot, res) in done {
            assert_eq!(res as u64, w.bs, "raw I/O failed: {res}");
            ops += 1;
            in_flight -= 1;
            if start.elapsed() < dur {
                push(&mut ring, slot as usize, offs.next());
                in_flight += 1;
            }
        }
        if in_flight == 0 {
            break;
        }
    }
    let r = rate(ops, w.bs, start.elapsed());
    // SAFETY: allocated above with this layout; no I/O in flight.
    unsafe { std::alloc::dealloc(buf, layout) };
    r
}

type Em = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// Keel's virtio-blk device on `path` with the io_uring engine, `queues`
/// request queues and `features` acked, in an event manager of its own.
fn io_uring_device(path: &Path, queues: u16, features: u64) -> (Arc<Mutex<VirtioBlock>>, Em) {
    let backend = DiskBackend::open(path, false, true).expect("disk");
    let mut blk = VirtioBlock::new(
        backend,
        BlockConfig {
            serial: None,
            engine: EngineKind::IoUring,
            cow: None,
            num_queues: queues,
        },
    )
    .expect("device");
    blk.set_acked_features(features);
    let dev = Arc::new(Mutex::new(blk));
    let mut em = Em::new().expect("event manager");
    em.add_subscriber(dev.clone());
    (dev, em)
}

/// Keel's device: a driver on real rings in guest memory, `qd` requests in
/// flight, each a header/data/status chain; the device runs on its own
/// thread exactly as in the VMM.
fn keel(path: &Path, w: Workload, qd: usize, dur: Duration) -> Rate {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).expect("memory");
    let (dev, mut em) = io_uring_device(path, 1, VIRTIO_F_VERSION_1);
    let mut q = Queue::new(QSIZE).expect("queue");
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    let kick = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    // The driver sleeps on the interrupt like a guest that halts: a
    // spinning driver would steal a core from the device on small hosts.
    let irq = EventFd::new(0).expect("eventfd");
    let irq_wait = irq.try_clone().expect("clone");
    let interrupt = Arc::new(Interrupt::new(irq));
    dev.lock()
        .expect("lock")
        .activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![q],
            queue_evts: vec![kick.try_clone().expect("clone")],
            interrupt: interrupt.clone(),
        })
        .expect("activate");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::spawn(move || {
        while !stop2.load(Ordering::Relaxed) {
            let _ = em.run_with_timeout(50);
        }
    });

    let mut offs = Offsets::new(w);
    let mut avail_idx: u16 = 0;
    let mut used_seen: u16 = 0;
    let kind: u32 = if w.write { 1 } else { 0 };
    let post = |slot: u64, off: u64, avail_idx: &mut u16| {
        let head = (slot * 3) as u16;
        let hdr = HDRS + slot * 16;
        mem.write_obj(kind, GuestAddress(hdr)).expect("hdr");
        mem.write_obj(off / 512, GuestAddress(hdr + 8))
            .expect("hdr");
        let descs: [(u64, u32, u16); 3] = [
            (hdr, 16, 1),
            (
                BUFS + slot * w.bs,
                w.bs as u32,
                1 | if w.write { 0 } else { 2 },
            ),
            (STATUS + slot, 1, 2),
        ];
        for (i, (addr, len, flags)) in descs.iter().enumerate() {
            let d = DESC + (u64::from(head) + i as u64) * 16;
            mem.write_obj(*addr, GuestAddress(d)).expect("desc");
            mem.write_obj(*len, GuestAddress(d + 8)).expect("desc");
            mem.write_obj(*flags, GuestAddress(d + 12)).expect("desc");
            mem.write_obj(head + i as u16 + 1, GuestAddress(d + 14))
                .expect("desc");
        }
        let at = AVAIL + 4 + 2 * u64::from(*avail_idx % QSIZE);
        mem.write_obj(head, GuestAddress(at)).expect("avail");
        *avail_idx = avail_idx.wrapping_add(1);
    };
    for slot in 0..qd as u64 {
        post(slot, offs.next(), &mut avail_idx);
    }
    mem.store(avail_idx, GuestAddress(AVAIL + 2), Ordering::Release)
        .expect("avail idx");
    kick.write(1).expect("kick");
    let start = Instant::now();
    let mut ops = 0u64;
    let mut in_flight = qd;
    while in_flight > 0 {
        let mut used: u16 = mem
            .load(GuestAddress(USED + 2), Ordering::Acquire)
            .expect("used idx");
        if used == used_seen {
            irq_wait.read().expect("interrupt");
            // Acknowledge before looking, as a driver does: the device
            // interrupts again only for what comes after.
            interrupt.ack(VIRTIO_MMIO_INT_VRING);
            used = mem
                .load(GuestAddress(USED + 2), Ordering::Acquire)
                .expect("used idx");
            if used == used_seen {
                continue;
            }
        }
        reap(&mem, 0, &mut used_seen, used, |slot| {
            ops += 1;
            in_flight -= 1;
            if start.elapsed() < dur {
                post(slot, offs.next(), &mut avail_idx);
                in_flight += 1;
            }
        });
        mem.store(avail_idx, GuestAddress(AVAIL + 2), Ordering::Release)
            .expect("avail idx");
        kick.write(1).expect("kick");
    }
    let r = rate(ops, w.bs, start.elapsed());
    stop.store(true, Ordering::Relaxed);
    let _ = thread.join();
    let _ = mem.num_regions();
    r
}

/// Per-queue interrupts, as virtio-pci's MSI-X vectors deliver them: queue
/// `q`'s signal writes eventfd `q`, which its driver thread sleeps on.
#[derive(Debug)]
struct QueueVectors(Vec<EventFd>);

impl VectorSink for QueueVectors {
    fn signal(&self, source: InterruptSource) -> bool {
        if let InterruptSource::Queue(q) = source {
            if let Some(e) = self.0.get(usize::from(q)) {
                let _ = e.write(1);
            }
        }
        true
    }
}

/// Guest memory given to each queue's rings and buffers in [`keel_mq`].
const MQ_SPAN: u64 = 4 << 20;

/// Keel's device with `queues` request queues (VIRTIO_BLK_F_MQ), each
/// driven by its own thread (a vCPU) keeping `qd / queues` requests in
/// flight on its own rings and sleeping on its own interrupt vector; the
/// device runs on its one thread as in the VMM. Small requests only (each
/// queue's buffers fit [`MQ_SPAN`]).
fn keel_mq(path: &Path, w: Workload, queues: usize, qd: usize, dur: Duration) -> Rate {
    let per_queue = qd / queues;
    assert!(per_queue >= 1 && w.bs * per_queue as u64 <= MQ_SPAN / 2);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MQ_SPAN as usize * queues)])
        .expect("memory");
    let (dev, mut em) = io_uring_device(
        path,
        queues as u16,
        VIRTIO_F_VERSION_1 | (1 << VIRTIO_BLK_F_MQ),
    );
    let mut qs = Vec::new();
    let mut kicks = Vec::new();
    let mut irqs = Vec::new();
    for n in 0..queues as u64 {
        let base = n * MQ_SPAN;
        let mut q = Queue::new(QSIZE).expect("queue");
        q.set_size(QSIZE);
        q.set_desc_table_address(Some((base + DESC) as u32), Some(0));
        q.set_avail_ring_address(Some((base + AVAIL) as u32), Some(0));
        q.set_used_ring_address(Some((base + USED) as u32), Some(0));
        q.set_ready(true);
        qs.push(q);
        kicks.push(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
        irqs.push(EventFd::new(0).expect("eventfd"));
    }
    let vectors = QueueVectors(irqs.iter().map(|e| e.try_clone().expect("clone")).collect());
    let line = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let interrupt = Arc::new(Interrupt::new(line).with_vectors(Arc::new(vectors)));
    dev.lock()
        .expect("lock")
        .activate(ActivateContext {
            mem: mem.clone(),
            queues: qs,
            queue_evts: kicks
                .iter()
                .map(|k| k.try_clone().expect("clone"))
                .collect(),
            interrupt,
        })
        .expect("activate");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::spawn(move || {
        while !stop2.load(Ordering::Relaxed) {
            let _ = em.run_with_timeout(50);
        }
    });
    let start = Instant::now();
    let drivers: Vec<_> = kicks
        .into_iter()
        .zip(irqs)
        .enumerate()
        .map(|(n, (kick, irq))| {
            let mem = mem.clone();
            std::thread::spawn(move || {
                drive_queue(
                    &mem,
                    n as u64 * MQ_SPAN,
                    n as u64,
                    w,
                    per_queue,
                    &kick,
                    &irq,
                    start,
                    dur,
                )
            })
        })
        .collect();
    let ops: u64 = drivers.into_iter().map(|d| d.join().expect("driver")).sum();
    let r = rate(ops, w.bs, start.elapsed());
    stop.store(true, Ordering::Relaxed);
    let _ = thread.join();
    r
}

/// One queue's driver in [`keel_mq`]: its rings and buffers from `base`,
/// `qd` requests in flight until `dur` after `start`; returns the requests
/// completed.
#[allow(clippy::too_many_arguments)]
fn drive_queue(
    mem: &GuestMemoryMmap,
    base: u64,
    seed: u64,
    w: Workload,
    qd: usize,
    kick: &EventFd,
    irq: &EventFd,
    start: Instant,
    dur: Duration,
) -> u64 {
    let mut offs = Offsets::new(w);
    // Each queue its own offsets.
    offs.state ^= seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
    let mut avail_idx: u16 = 0;
    let mut used_seen: u16 = 0;
    let kind: u32 = if w.write { 1 } else { 0 };
    let post = |slot: u64, off: u64, avail_idx: &mut u16| {
        let head = (slot * 3) as u16;
        let hdr = base + HDRS + slot * 16;
        mem.write_obj(kind, GuestAddress(hdr)).expect("hdr");
        mem.write_obj(off / 512, GuestAddress(hdr + 8))
            .expect("hdr");
        let descs: [(u64, u32, u16); 3] = [
            (hdr, 16, 1),
            (
                base + BUFS + slot * w.bs,
                w.bs as u32,
                1 | if w.write { 0 } else { 2 },
            ),
            (base + STATUS + slot, 1, 2),
        ];
        for (i, (addr, len, flags)) in descs.iter().enumerate() {
            let d = base + DESC + (u64::from(head) + i as u64) * 16;
            mem.write_obj(*addr, GuestAddress(d)).expect("desc");
            mem.write_obj(*len, GuestAddress(d + 8)).expect("desc");
            mem.write_obj(*flags, GuestAddress(d + 12)).expect("desc");
            mem.write_obj(head + i as u16 + 1, GuestAddress(d + 14))
                .expect("desc");
        }
        let at = base + AVAIL + 4 + 2 * u64::from(*avail_idx % QSIZE);
        mem.write_obj(head, GuestAddress(at)).expect("avail");
        *avail_idx = avail_idx.wrapping_add(1);
    };
    for slot in 0..qd as u64 {
        post(slot, offs.next(), &mut avail_idx);
    }
    mem.store(avail_idx, GuestAddress(base + AVAIL + 2), Ordering::Release)
        .expect("avail idx");
    kick.write(1).expect("kick");
    let mut ops = 0u64;
    let mut in_flight = qd;
    while in_flight > 0 {
        let mut used: u16 = mem
            .load(GuestAddress(base + USED + 2), Ordering::Acquire)
            .expect("used idx");
        if used == used_seen {
            // The queue's vector (an edge): sleep until it fires.
            irq.read().expect("interrupt");
            used = mem
                .load(GuestAddress(base + USED + 2), Ordering::Acquire)
                .expect("used idx");
            if used == used_seen {
                continue;
            }
        }
        reap(mem, base, &mut used_seen, used, |slot| {
            ops += 1;
            in_flight -= 1;
            if start.elapsed() < dur {
                post(slot, offs.next(), &mut avail_idx);
                in_flight += 1;
            }
        });
        mem.store(avail_idx, GuestAddress(base + AVAIL + 2), Ordering::Release)
            .expect("avail idx");
        kick.write(1).expect("kick");
    }
    ops
}

/// Takes the used-ring entries of the queue at `base` from `*seen` up to
/// `used`: checks each request's status byte and hands its slot to `done`.
fn reap(mem: &GuestMemoryMmap, base: u64, seen: &mut u16, used: u16, mut done: impl FnMut(u64)) {
    while *seen != used {
        let e = base + USED + 4 + 8 * u64::from(*seen % QSIZE);
        let head: u32 = mem.read_obj(GuestAddress(e)).expect("used elem");
        let slot = u64::from(head) / 3;
        let status: u8 = mem
            .read_obj(GuestAddress(base + STATUS + slot))
            .expect("status");
        assert_eq!(status, 0, "Keel request failed");
        *seen = seen.wrapping_add(1);
        done(slot);
    }
}

/// The multi-queue row: 4K random reads at depth 32 over 1 queue, then
/// over 2 queues driven from 2 threads (16 each), on `path`.
fn mq_rows(label: &str, path: &Path, dur: Duration, run: &mut super::record::Run) {
    let w = WORKLOADS[0];
    let one = keel_mq(path, w, 1, 32, dur);
    let two = keel_mq(path, w, 2, 32, dur);
    let table = format!("virtio-blk multi-queue, {label}");
    let row = format!("{} QD32", w.name);
    run.push(&table, &row, "1 queue", "IOPS", &[one.iops]);
    run.push(&table, &row, "2 queues, 2 drivers", "IOPS", &[two.iops]);
    println!(
        "| {label} | {} | 32 | {:.0} IOPS | {:.0} IOPS | {:.2}x |",
        w.name,
        one.iops,
        two.iops,
        two.iops / one.iops
    );
}

/// A loop device over a file, detached on drop.
pub struct LoopDev(pub String);

impl LoopDev {
    /// Attaches `file` with direct I/O.
    pub fn attach(file: &Path) -> Self {
        let out = Command::new("losetup")
            .args(["-f", "--show", "--direct-io=on"])
            .arg(file)
            .output()
            .expect("losetup");
        let dev = LoopDev(String::from_utf8_lossy(&out.stdout).trim().to_string());
        assert!(
            dev.0.starts_with("/dev/loop"),
            "losetup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dev
    }

    /// Writes back and drops the device's page cache, so that the next run
    /// starts from a clean device: a VMM that opens it without O_DIRECT
    /// (Firecracker's Async engine) leaves dirty pages behind, whose
    /// write-back would otherwise land on the O_DIRECT writes of whichever
    /// VMM runs next.
    pub fn drop_cache(&self) {
        use std::os::fd::AsRawFd;
        let Ok(f) = std::fs::OpenOptions::new().write(true).open(&self.0) else {
            eprintln!("cannot open {} to drop its page cache", self.0);
            return;
        };
        if let Err(e) = f.sync_all() {
            eprintln!("cannot write back {}: {e}", self.0);
        }
        // SAFETY: posix_fadvise only reads its arguments; the descriptor is
        // open for the whole call.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if rc != 0 {
            eprintln!("cannot drop the page cache of {}: error {rc}", self.0);
        }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// Creates a fully allocated backing file of the bench's disk size.
pub fn make_backing(path: &Path) {
    let f = std::fs::File::create(path).expect("backing file");
    f.set_len(DISK_SIZE).expect("size");
    // Fill it so reads hit allocated blocks, not holes.
    let chunk = vec![0x5au8; 1 << 20];
    use std::io::Write;
    let mut f = f;
    for _ in 0..DISK_SIZE >> 20 {
        f.write_all(&chunk).expect("fill");
    }
    f.sync_all().expect("sync");
}

/// A zram device made for a bench (`/sys/class/zram-control/hot_add`),
/// `DISK_SIZE` long and filled with incompressible data, so that every
/// read copies a stored page; removed on drop.
pub struct Zram(u32);

impl Zram {
    /// Adds, sizes and fills a new zram device, or says why it cannot.
    pub fn create() -> Result<Self, String> {
        let id: u32 = std::fs::read_to_string("/sys/class/zram-control/hot_add")
            .map_err(|e| format!("no zram (CONFIG_ZRAM, root): {e}"))?
            .trim()
            .parse()
            .map_err(|e| format!("zram hot_add: {e}"))?;
        let z = Zram(id);
        let sys = format!("/sys/block/zram{id}");
        std::fs::write(format!("{sys}/disksize"), DISK_SIZE.to_string())
            .map_err(|e| format!("{sys}/disksize: {e}"))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(z.path())
            .map_err(|e| format!("{}: {e}", z.path()))?;
        // xorshift64: incompressible, so zram keeps each page whole.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut chunk = vec![0u8; 1 << 20];
        use std::io::Write;
        for _ in 0..DISK_SIZE >> 20 {
            for w in chunk.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&chunk).map_err(|e| format!("fill zram: {e}"))?;
        }
        f.sync_all().map_err(|e| format!("fill zram: {e}"))?;
        Ok(z)
    }

    /// The device node.
    pub fn path(&self) -> String {
        format!("/dev/zram{}", self.0)
    }
}

impl Drop for Zram {
    fn drop(&mut self) {
        let _ = std::fs::write(format!("/sys/block/zram{}/reset", self.0), "1");
        let _ = std::fs::write("/sys/class/zram-control/hot_remove", self.0.to_string());
    }
}

/// The `blk` subcommand; records into `run`.
pub fn main(args: &[String], run: &mut super::record::Run) {
    let mut secs = 2.0f64;
    let mut dir = PathBuf::from("/var/tmp");
    let mut mq_only = false;
    let mut only: Option<String> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--mq" {
            mq_only = true;
            continue;
        }
        match (a.as_str(), it.next()) {
            ("--seconds", Some(v)) => secs = v.parse().unwrap_or_else(|_| super::usage()),
            ("--dir", Some(v)) => dir = v.into(),
            ("--only", Some(v)) => only = Some(v.clone()),
            _ => super::usage(),
        }
    }
    let dur = Duration::from_secs_f64(secs);
    let work = dir.join(format!("keel-bench-blk-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("work dir");
    let file = work.join("disk.img");
    let loop_file = work.join("loop.img");
    make_backing(&file);
    make_backing(&loop_file);
    let out = Command::new("losetup")
        .args(["-f", "--show", "--direct-io=on"])
        .arg(&loop_file)
        .output()
        .expect("losetup");
    let loop_dev = LoopDev(String::from_utf8_lossy(&out.stdout).trim().to_string());
    assert!(
        loop_dev.0.starts_with("/dev/loop"),
        "losetup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let backings = [
        ("loop device", PathBuf::from(&loop_dev.0)),
        ("file", file.clone()),
    ];
    if !mq_only {
        table(&backings, dur, secs, only.as_deref(), run);
    }
    if only.is_some() {
        drop(loop_dev);
        let _ = std::fs::remove_dir_all(&work);
        return;
    }
    println!("virtio-blk multi-queue, in-process, O_DIRECT, {secs} s per cell: depth 32 over 1 queue, or over 2 queues each driven by its own thread (a vCPU) and interrupt vector");
    println!();
    println!("| backing | workload | QD | 1 queue | 2 queues | 2 / 1 |");
    println!("|---|---|---|---|---|---|");
    for (label, path) in &backings {
        mq_rows(label, path, dur, run);
    }
    println!();
    drop(loop_dev);
    let _ = std::fs::remove_dir_all(&work);
}

/// The main table: every workload at depth 1 and 32 on each backing,
/// Keel against raw io_uring; with `only`, just the rows whose
/// "<backing> <workload> <QD>" (e.g. "loop device 4K randread 32") starts
/// with it, for profiling one row.
fn table(
    backings: &[(&str, PathBuf)],
    dur: Duration,
    secs: f64,
    only: Option<&str>,
    run: &mut super::record::Run,
) {
    println!("virtio-blk request path, in-process, O_DIRECT, {secs} s per cell; ratio = Keel / raw io_uring on the same backing");
    println!();
    println!("| backing | workload | QD | raw io_uring | Keel device path | Keel / raw |");
    println!("|---|---|---|---|---|---|");
    for (label, path) in backings {
        for w in WORKLOADS {
            for qd in [1usize, 32] {
                if only.is_some_and(|o| !format!("{label} {} {qd}", w.name).starts_with(o)) {
                    continue;
                }
                let r = raw(path, w, qd, dur);
                let k = keel(path, w, qd, dur);
                let show = |x: Rate| {
                    if w.bs >= 1 << 20 {
                        format!("{:.0} MiB/s", x.mib_s)
                    } else {
                        format!("{:.0} IOPS", x.iops)
                    }
                };
                let (unit, fig): (&str, fn(Rate) -> f64) = if w.bs >= 1 << 20 {
                    ("MiB/s", |x| x.mib_s)
                } else {
                    ("IOPS", |x| x.iops)
                };
                let table = format!("virtio-blk in process, {label}");
                let row = format!("{} QD{qd}", w.name);
                run.push(&table, &row, "raw io_uring", unit, &[fig(r)]);
                run.push(&table, &row, "Keel device path", unit, &[fig(k)]);
                println!(
                    "| {label} | {} | {qd} | {} | {} | {:.0}% |",
                    w.name,
                    show(r),
                    show(k),
                    100.0 * k.iops / r.iops
                );
            }
        }
    }
    println!();
}
