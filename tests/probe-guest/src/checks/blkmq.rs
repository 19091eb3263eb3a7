//! bench.blkmq: disk 0 driven over one request queue by one vCPU, then over
//! two request queues (VIRTIO_BLK_F_MQ) by two vCPUs, each keeping half
//! the requests in flight on its own queue: the multi-queue gain as a guest
//! sees it. `probe.bench.blkmq=<kind>,<block size>,<queue depth>,<count>`;
//! the machine needs at least 2 vCPUs. With `probe.bench.blkmq.work=<passes>`
//! each vCPU also hashes every block it read that many times before it
//! reuses the request's slot: the guest's own CPU work per request, which
//! a second queue on a second vCPU can share. Prints, for 1 and then 2
//! queues (`work_ns`: what that work costs per request, timed on the BSP
//! before the run):
//!
//! ```text
//! probe: bench blkmq randread bs=4096 qd=32 queues=1 wait=msix work=0 work_ns=0 n=20000 ns=...
//! probe: bench blkmq randread bs=4096 qd=32 queues=2 wait=msix work=0 work_ns=0 n=20000 ns=...
//! ```
//!
//! The driver is its own (virtio-drivers' has one queue): per queue a
//! split ring of up to [`RING`] descriptors, each request a fixed chain of
//! three (header, data, status) so that a used entry's id names its slot.
//! A lane reaps every completion that has arrived, does the work on each
//! block, offers the freed slots again and rings once for the batch; it
//! waits halted for its queue's MSI-X vector over virtio-pci, and polls
//! over virtio-mmio (see [`route_msix`]). The second queue is
//! driven by an application processor that [`Trampoline::launch`] brings
//! to CPL3; it shares nothing with the BSP but its ring memory, its
//! request count and two flags.

use alloc::format;
use alloc::string::String;
use core::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

use virtio_drivers::transport::{DeviceStatus, DeviceType, Transport};

use super::Context;
use crate::arch::ap::Trampoline;
use crate::arch::{idt, lapic, phys, syscall, tsc};
use crate::blkdev::SECTOR;
use crate::cmdline::BlkBench;
use crate::fail;
use crate::pci::{self, Bus};
use crate::println;
use crate::rawblk::{F_MQ, F_VERSION_1, S_OK, T_IN};
use crate::report::{CheckResult, Report};
use crate::scratch::Scratch;
use crate::virtio::{ProbeTransport, VirtioDevice};

/// Descriptors per ring (at most; less when the device offers less).
const RING: u16 = 128;
/// Descriptors per request: header, data, status.
const CHAIN: u16 = 3;
/// Request type: write.
const T_OUT: u32 = 1;
/// virtio-blk config: `num_queues` (u16), valid with F_MQ.
const CONFIG_NUM_QUEUES: usize = 34;
/// virtio-mmio QueueNotify register.
const MMIO_QUEUE_NOTIFY: u64 = 0x50;
/// The benchmark gives up when nothing completes for this long.
const STALL_US: u64 = 10_000_000;
/// The benchmark spans at most this much of the disk.
const SPAN: u64 = 1 << 30;
/// How long the BSP waits for the AP to take the launch.
const LAUNCH_US: u64 = 2_000_000;

/// How a queue's driver rings its doorbell.
#[derive(Clone, Copy, Debug)]
enum Doorbell {
    /// virtio-mmio: the queue index written to QueueNotify (32 bits).
    Mmio(u64),
    /// virtio-pci: the queue index written to the queue's own notification
    /// address (16 bits).
    Pci(u64),
}

impl Doorbell {
    fn ring(self, queue: u16) {
        match self {
            Doorbell::Mmio(addr) => phys::write_u32(addr, u32::from(queue)),
            Doorbell::Pci(addr) => phys::write_u16(addr, queue),
        }
    }
}

/// One request queue and the requests its driver keeps on it: plain
/// addresses, so that the AP can own it.
#[derive(Clone, Copy, Debug)]
struct Lane {
    queue: u16,
    doorbell: Doorbell,
    /// Descriptor table, available ring (same page), used ring (next page).
    ring: u64,
    size: u16,
    /// Request headers (16 bytes each) then status bytes, one per slot.
    meta: u64,
    /// Data buffers, `bs` bytes per slot.
    data: u64,
    bs: u64,
    /// Requests kept in flight.
    depth: u16,
    /// Blocks the requests are spread over.
    blocks: u64,
    kind: BlkBench,
    seed: u64,
    /// Wait for completions halted until the queue's MSI-X vector (sent
    /// to this CPU) instead of spinning on the used ring.
    halt: bool,
    /// Hash passes over each block read before its slot is reused.
    work: u32,
}

/// What a lane's run ended with.
#[derive(Clone, Copy, Debug, Default)]
struct Outcome {
    completed: u64,
    errors: u64,
    stalled: bool,
    /// The sum of the work's hashes (so that the work is done).
    digest: u64,
}

impl Lane {
    fn avail(&self) -> u64 {
        self.ring + 16 * u64::from(self.size)
    }

    fn used(&self) -> u64 {
        self.ring + 4096
    }

    fn header(&self, slot: u16) -> u64 {
        self.meta + 16 * u64::from(slot)
    }

    fn status(&self, slot: u16) -> u64 {
        self.meta + 16 * u64::from(RING) + u64::from(slot)
    }

    /// The guest's work on slot `slot`'s block: [`Lane::work`] passes of
    /// FNV-1a over its 64-bit words, read from memory each pass.
    fn consume(&self, slot: u16) -> u64 {
        let at = self.data + u64::from(slot) * self.bs;
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for _ in 0..self.work {
            for w in (0..self.bs).step_by(8) {
                h = (h ^ phys::read_u64(at + w)).wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        h
    }

    /// Writes slot `slot`'s chain (descriptors 3 * slot ..): it never
    /// changes, only the header's sector does.
    fn build_chain(&self, slot: u16) {
        let writes = self.kind.kind.writes();
        let first = slot * CHAIN;
        let segs = [
            (self.header(slot), 16u32, 0u16),
            (
                self.data + u64::from(slot) * self.bs,
                self.bs as u32,
                if writes { 0 } else { 2 },
            ),
            (self.status(slot), 1, 2),
        ];
        for (i, (addr, len, flags)) in segs.into_iter().enumerate() {
            let d = self.ring + 16 * u64::from(first + i as u16);
            let next = if i < 2 { 1 } else { 0 };
            phys::write_u64(d, addr);
            phys::write_u32(d + 8, len);
            phys::write_u16(d + 12, flags | next);
            phys::write_u16(d + 14, first + i as u16 + 1);
        }
        let kind = if writes { T_OUT } else { T_IN };
        phys::write_u32(self.header(slot), kind);
        phys::write_u32(self.header(slot) + 4, 0);
    }

    /// Runs `count` requests with [`Lane::depth`] in flight; polls the
    /// used ring.
    fn run(&self, count: u64) -> Outcome {
        let mut out = Outcome::default();
        let mut rng = self.seed | 1;
        let mut next_block = 0u64;
        let mut pick = || {
            if self.kind.kind.random() {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % self.blocks
            } else {
                next_block = (next_block + 1) % self.blocks;
                next_block
            }
        };
        let (avail, used) = (self.avail(), self.used());
        let (mut avail_idx, mut last_used) = (0u16, 0u16);
        let mut submitted = 0u64;
        let mut offer = |slot: u16, avail_idx: &mut u16| {
            phys::write_u64(self.header(slot) + 8, pick() * self.bs / SECTOR);
            phys::write_u8(self.status(slot), 0xee);
            let at = avail + 4 + 2 * u64::from(*avail_idx % self.size);
            phys::write_u16(at, slot * CHAIN);
            *avail_idx = avail_idx.wrapping_add(1);
        };
        for slot in 0..self.depth {
            if submitted == count {
                break;
            }
            offer(slot, &mut avail_idx);
            submitted += 1;
        }
        fence(Ordering::SeqCst);
        phys::write_u16(avail + 2, avail_idx);
        fence(Ordering::SeqCst);
        self.doorbell.ring(self.queue);
        let stall = tsc::cycles_at_least(STALL_US);
        let mut progress = tsc::rdtsc();
        while out.completed < count {
            let idx = phys::read_u16(used + 2);
            if idx == last_used {
                if tsc::rdtsc().wrapping_sub(progress) > stall {
                    out.stalled = true;
                    return out;
                }
                if self.halt {
                    // CPL3 runs with interrupts off: a vector that came
                    // since the read above is pending and ends the halt.
                    syscall::idle();
                } else {
                    core::hint::spin_loop();
                }
                continue;
            }
            fence(Ordering::Acquire);
            let mut offered = false;
            while last_used != idx {
                let e = used + 4 + 8 * u64::from(last_used % self.size);
                let head = phys::read_u32(e) as u16;
                last_used = last_used.wrapping_add(1);
                let slot = head / CHAIN;
                if phys::read_u8(self.status(slot)) != S_OK {
                    out.errors += 1;
                } else if self.work != 0 {
                    out.digest = out.digest.wrapping_add(self.consume(slot));
                }
                out.completed += 1;
                if submitted < count {
                    offer(slot, &mut avail_idx);
                    submitted += 1;
                    offered = true;
                }
            }
            progress = tsc::rdtsc();
            if offered {
                fence(Ordering::SeqCst);
                phys::write_u16(avail + 2, avail_idx);
                fence(Ordering::SeqCst);
                self.doorbell.ring(self.queue);
            }
        }
        out
    }
}

/// What the BSP hands the AP: its lane and request count, the start flag,
/// and where the AP leaves its outcome.
struct ApJob {
    lane: core::cell::UnsafeCell<Option<Lane>>,
    count: AtomicU64,
    /// [`JOB_WAIT`], [`JOB_READY`], [`JOB_RUN`] or [`JOB_DONE`].
    state: AtomicU32,
    completed: AtomicU64,
    errors: AtomicU64,
    stalled: AtomicU32,
    digest: AtomicU64,
    /// The AP's local APIC ID, written before it signals [`JOB_READY`].
    apic_id: AtomicU32,
}

// SAFETY: `lane` is written by the BSP before it sets `state` to 1 and only
// read by the AP after it saw that (release/acquire); the rest is atomic.
unsafe impl Sync for ApJob {}

static AP_JOB: ApJob = ApJob {
    lane: core::cell::UnsafeCell::new(None),
    count: AtomicU64::new(0),
    state: AtomicU32::new(0),
    completed: AtomicU64::new(0),
    errors: AtomicU64::new(0),
    stalled: AtomicU32::new(0),
    digest: AtomicU64::new(0),
    apic_id: AtomicU32::new(0),
};

/// Set up by the BSP; the AP is not at CPL3 yet.
const JOB_WAIT: u32 = 0;
/// The AP is at CPL3, waiting for the go.
const JOB_READY: u32 = 1;
/// The go: the AP runs its lane.
const JOB_RUN: u32 = 2;
/// The AP's outcome is written.
const JOB_DONE: u32 = 3;

/// The AP's side: waits for the BSP's go, runs its lane, reports, then
/// idles for good (interrupts stay unrouted to it).
extern "C" fn ap_main(_arg: u64) -> ! {
    // The BSP mapped the local APIC's page: this only enables this CPU's.
    let _ = lapic::enable();
    AP_JOB.apic_id.store(lapic::id(), Ordering::Relaxed);
    AP_JOB.state.store(JOB_READY, Ordering::Release);
    while AP_JOB.state.load(Ordering::Acquire) != JOB_RUN {
        core::hint::spin_loop();
    }
    // SAFETY: written before `state` became JOB_RUN (see ApJob).
    let lane = unsafe { *AP_JOB.lane.get() };
    if let Some(lane) = lane {
        let out = lane.run(AP_JOB.count.load(Ordering::Relaxed));
        AP_JOB.completed.store(out.completed, Ordering::Relaxed);
        AP_JOB.errors.store(out.errors, Ordering::Relaxed);
        AP_JOB
            .stalled
            .store(u32::from(out.stalled), Ordering::Relaxed);
        AP_JOB.digest.store(out.digest, Ordering::Relaxed);
    }
    AP_JOB.state.store(JOB_DONE, Ordering::Release);
    loop {
        crate::arch::syscall::idle();
    }
}

/// bench.blkmq (see the module documentation).
pub fn bench(ctx: &Context<'_>, report: &mut Report<'_>) {
    let Some(cfg) = ctx.options.bench_blk_mq else {
        return;
    };
    report.check("bench.blkmq", || run(ctx, cfg));
}

fn run(ctx: &Context<'_>, cfg: BlkBench) -> CheckResult {
    let dev = *ctx
        .virtio_devices(DeviceType::Block)
        .first()
        .ok_or("no virtio-blk device")?;
    let info = ctx.start_info()?;
    let scratch = Scratch::new(info)?;
    let bs = u64::from(cfg.block_size);
    let depth = u16::try_from(cfg.queue_depth).map_err(|_| "queue depth too large")?;
    if depth < 2 || depth % 2 != 0 || depth > RING / CHAIN {
        fail!(
            "queue depth {depth}: want an even depth from 2 to {}",
            RING / CHAIN
        );
    }
    // Ring pages (2 per queue), the per-slot headers and status bytes, the
    // data buffers: for two queues, each lane taking half the slots.
    let rings = scratch.take(4 * 4096)?.as_ptr() as u64;
    let meta = scratch.take(2 * 4096)?.as_ptr() as u64;
    let data = scratch.take(usize::from(depth) * bs as usize)?.as_ptr() as u64;
    let mut one = None;
    for queues in [1u16, 2] {
        let mut t = dev.transport()?;
        let capacity = setup(&mut t, queues, rings)?;
        let blocks = (capacity * SECTOR).min(SPAN) / bs;
        if blocks == 0 {
            fail!("block size {bs} is larger than the disk");
        }
        let size = ring_size(&mut t);
        let per = depth / queues;
        if per * CHAIN > size {
            fail!("{per} requests of {CHAIN} descriptors do not fit a ring of {size}");
        }
        lapic::enable().map_err(|e| format!("local APIC: {e}"))?;
        // The CPU driving each queue: the BSP, then the launched AP.
        let mut cpus = alloc::vec![lapic::id()];
        let trampoline = if queues > 1 {
            let (tr, ap) = launch_ap(ctx)?;
            cpus.push(ap);
            Some(tr)
        } else {
            None
        };
        // Vectors before DRIVER_OK, as the spec orders it: a VMM may bind
        // its interrupt routes then (QEMU does, once MSI-X is enabled).
        let halt = route_msix(&dev, &cpus)?;
        t.finish_init();
        let lanes: alloc::vec::Vec<Lane> = (0..queues)
            .map(|q| {
                let lane = Lane {
                    queue: q,
                    doorbell: doorbell(&dev, &t, q)?,
                    ring: rings + 2 * 4096 * u64::from(q),
                    size,
                    meta: meta + 4096 * u64::from(q),
                    data: data + u64::from(per) * u64::from(q) * bs,
                    bs,
                    depth: per,
                    blocks,
                    kind: cfg,
                    seed: 0x9e37_79b9_7f4a_7c15 ^ (u64::from(q) << 32),
                    halt,
                    work: ctx.options.bench_blk_mq_work,
                };
                for slot in 0..per {
                    lane.build_chain(slot);
                }
                Ok(lane)
            })
            .collect::<Result<_, String>>()?;
        let work_ns = work_cost(&lanes[0])?;
        // Untimed: the host may sample its own load from here to the result.
        println!("probe: bench blkmq start queues={queues}");
        let (ns, out) = match (&lanes[..], trampoline) {
            ([one], _) => {
                let start = tsc::rdtsc();
                let out = one.run(cfg.count);
                (cycles_ns(tsc::rdtsc().wrapping_sub(start))?, out)
            }
            ([bsp, ap], Some(_)) => two_lanes(*bsp, *ap, cfg.count)?,
            _ => fail!("{queues} queues: no lane for each"),
        };
        let wait = if halt { "msix" } else { "poll" };
        t.set_status(DeviceStatus::empty());
        if out.stalled {
            fail!(
                "{queues} queue(s): stalled after {} of {} requests",
                out.completed,
                cfg.count
            );
        }
        println!(
            "probe: bench blkmq {} bs={bs} qd={depth} queues={queues} wait={wait} work={} work_ns={work_ns} n={} ns={ns}",
            cfg.kind.name(),
            lanes[0].work,
            cfg.count
        );
        if lanes[0].work != 0 {
            println!("probe: bench info: blkmq work digest {:#x}", out.digest);
        }
        if out.errors != 0 {
            fail!("{queues} queue(s): {} requests failed", out.errors);
        }
        match one {
            None => one = Some(ns),
            Some(one) => println!(
                "probe: bench info: 2 queues / 1 queue = {:.2}x",
                one as f64 / ns.max(1) as f64
            ),
        }
    }
    Ok(())
}

/// Takes an application processor to CPL3 (see [`Trampoline::launch`])
/// into [`ap_main`]; returns the trampoline and the AP's local APIC ID
/// once it waits for the go.
fn launch_ap(ctx: &Context<'_>) -> Result<(Trampoline, u32), String> {
    AP_JOB.state.store(JOB_WAIT, Ordering::Release);
    let page = super::smp::free_low_page(ctx)?;
    let trampoline =
        Trampoline::install(page).map_err(|e| format!("trampoline at {page:#x}: {e}"))?;
    trampoline.launch(ap_main, 0);
    let deadline = tsc::Deadline::after_us(LAUNCH_US);
    while AP_JOB.state.load(Ordering::Acquire) != JOB_READY {
        if deadline.passed() {
            fail!(
                "no application processor reached CPL3 ({} arrived in the trampoline, {} took the launch): the bench needs 2 vCPUs",
                trampoline.arrivals(),
                if trampoline.launched() { "one" } else { "none" }
            );
        }
        core::hint::spin_loop();
    }
    Ok((trampoline, AP_JOB.apic_id.load(Ordering::Relaxed)))
}

/// Splits `count` over the BSP's lane `bsp` and the waiting AP's lane
/// `ap`; returns the time from the go to the last completion of both and
/// their outcome.
fn two_lanes(bsp: Lane, ap: Lane, count: u64) -> Result<(u64, Outcome), String> {
    let ap_count = count / 2;
    // SAFETY: the AP reads the lane only after `state` turns JOB_RUN below.
    unsafe { *AP_JOB.lane.get() = Some(ap) };
    AP_JOB.count.store(ap_count, Ordering::Relaxed);
    let start = tsc::rdtsc();
    AP_JOB.state.store(JOB_RUN, Ordering::Release);
    let mut out = bsp.run(count - ap_count);
    let stall = tsc::cycles_at_least(STALL_US);
    let waited = tsc::rdtsc();
    while AP_JOB.state.load(Ordering::Acquire) != JOB_DONE {
        if tsc::rdtsc().wrapping_sub(waited) > stall {
            fail!("the application processor did not finish its lane");
        }
        core::hint::spin_loop();
    }
    let ns = cycles_ns(tsc::rdtsc().wrapping_sub(start))?;
    out.completed += AP_JOB.completed.load(Ordering::Relaxed);
    out.errors += AP_JOB.errors.load(Ordering::Relaxed);
    out.stalled |= AP_JOB.stalled.load(Ordering::Relaxed) != 0;
    out.digest = out.digest.wrapping_add(AP_JOB.digest.load(Ordering::Relaxed));
    Ok((ns, out))
}

/// First interrupt vector of the bench's queues (queue q: this + q), in
/// the probe's IRQ range.
const MSIX_VECTOR_BASE: u8 = idt::IRQ_VECTOR_BASE + 8;
/// virtio-pci common configuration: queue_select, queue_msix_vector.
const COMMON_QUEUE_SELECT: u64 = 0x16;
const COMMON_QUEUE_VECTOR: u64 = 0x1a;

/// On a virtio-pci function with MSI-X, sends queue q's completions to
/// the local APIC `cpus[q]` (table entry q, vector [`MSIX_VECTOR_BASE`] +
/// q, fixed, edge, unmasked) and enables MSI-X: then each lane halts until
/// its vector comes. Returns false (lanes poll) over virtio-mmio, whose
/// one interrupt line the probe does not route, or without MSI-X.
fn route_msix(dev: &VirtioDevice, cpus: &[u32]) -> Result<bool, String> {
    let VirtioDevice::Pci(f) = dev else {
        return Ok(false);
    };
    let mut bus = Bus::open(f.ecam)?;
    let Some(cap) = bus.capability(f.at, pci::CAP_MSIX) else {
        return Ok(false);
    };
    let common = bus
        .notify_regs(f.at)
        .ok_or("no common configuration structure")?
        .common;
    let table = bus.read(f.at, cap + 4);
    let bar = bus
        .bar_address(f.at, (table & 7) as u8)
        .ok_or_else(|| format!("MSI-X table in BAR {}, which has no address", table & 7))?;
    let table = bar + u64::from(table & !7);
    phys::map(table, 16 * cpus.len() as u64).map_err(|e| format!("MSI-X table: {e}"))?;
    for (q, &apic) in cpus.iter().enumerate() {
        let entry = table + 16 * q as u64;
        phys::write_u32(entry, 0xfee0_0000 | (apic << 12));
        phys::write_u32(entry + 4, 0);
        phys::write_u32(entry + 8, u32::from(MSIX_VECTOR_BASE) + q as u32);
        phys::write_u32(entry + 12, 0);
        phys::write_u16(common + COMMON_QUEUE_SELECT, q as u16);
        phys::write_u16(common + COMMON_QUEUE_VECTOR, q as u16);
        if phys::read_u16(common + COMMON_QUEUE_VECTOR) != q as u16 {
            fail!("the device refused MSI-X vector {q} for queue {q}");
        }
    }
    let ctrl = bus.read(f.at, cap);
    bus.write(f.at, cap, ctrl | (1 << 31));
    Ok(true)
}

/// What [`Lane::consume`] costs per request on this CPU, in ns: the mean
/// of 64 passes over slot 0 (0 without work).
fn work_cost(lane: &Lane) -> Result<u64, String> {
    if lane.work == 0 {
        return Ok(0);
    }
    const TIMES: u64 = 64;
    let start = tsc::rdtsc();
    let mut h = 0;
    for _ in 0..TIMES {
        h ^= lane.consume(0);
    }
    let ns = cycles_ns(tsc::rdtsc().wrapping_sub(start))? / TIMES;
    core::hint::black_box(h);
    Ok(ns)
}

fn cycles_ns(cycles: u64) -> Result<u64, String> {
    tsc::cycles_to_ns(cycles).ok_or_else(|| {
        String::from("no TSC rate (cpuid 0x40000010, 0x15, 0x16, kvmclock all failed)")
    })
}

/// Resets the device and sets it up with `queues` request queues (F_MQ
/// when more than one; the device must offer that many), rings from
/// `rings` (two pages per queue), all but DRIVER_OK. Returns the capacity
/// in sectors.
fn setup(t: &mut ProbeTransport, queues: u16, rings: u64) -> Result<u64, String> {
    let want = F_VERSION_1 | if queues > 1 { F_MQ } else { 0 };
    let (offered, acked) = t.negotiate(want)?;
    if acked != want {
        fail!("device offers features {offered:#x}, the bench needs {want:#x}");
    }
    if queues > 1 {
        let n: u16 = t
            .read_config_space(CONFIG_NUM_QUEUES)
            .map_err(|e| format!("config: {e:?}"))?;
        if n < queues {
            fail!("device has {n} request queue(s), the bench needs {queues}");
        }
    }
    let size = ring_size(t);
    // SAFETY: scratch RAM the bench owns; the device is reset.
    unsafe { (rings as *mut u8).write_bytes(0, 4 * 4096) };
    for q in 0..queues {
        let base = rings + 2 * 4096 * u64::from(q);
        t.queue_set(
            q,
            u32::from(size),
            base,
            base + 16 * u64::from(size),
            base + 4096,
        );
    }
    t.config_u64(0)
}

/// The ring size used: [`RING`], or the device's maximum when smaller.
fn ring_size(t: &mut ProbeTransport) -> u16 {
    let max = t.max_queue_size(0);
    u16::try_from(max.min(u32::from(RING))).unwrap_or(RING)
}

/// Where queue `q`'s notifications go, fixed once the queue is set up.
fn doorbell(dev: &VirtioDevice, t: &ProbeTransport, q: u16) -> Result<Doorbell, String> {
    match dev.mmio_base() {
        Some(base) => Ok(Doorbell::Mmio(base + MMIO_QUEUE_NOTIFY)),
        None => t
            .notify_addr(q)
            .map(Doorbell::Pci)
            .ok_or_else(|| format!("no notification address for queue {q}")),
    }
}
