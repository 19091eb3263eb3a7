//! Device tests on real taps (created here, named `kt<pid><tag>`), driven
//! through guest rings in test memory; frames are injected and captured
//! with an AF_PACKET socket bound to the tap. Run as root (CAP_NET_ADMIN).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_net::*;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::netlink::Rtnl;
use super::*;
use crate::virtio::{ActivateContext, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

type Em = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// A local experimental EtherType: nothing else on the host uses it.
const ETHERTYPE: u16 = 0x88b5;
const RING_SIZE: u16 = 256;
const BUF: u64 = 0x10_0000;
const GUEST_MAC: [u8; 6] = [0x6a, 0x01, 0x00, 0x00, 0x00, 0x01];

fn f(bit: u32) -> u64 {
    1u64 << bit
}

/// A tap for one test; deleted when dropped (if still there).
struct TestTap {
    name: String,
    index: u32,
}

impl Drop for TestTap {
    fn drop(&mut self) {
        if let Ok(mut nl) = Rtnl::new() {
            if let Ok(Some(l)) = nl.link_by_index(self.index) {
                if l.name == self.name {
                    let _ = nl.delete(self.index);
                }
            }
        }
    }
}

/// Creates tap `kt<pid><tag>` with `queues` queue fds, IPv6 off (no
/// router solicitations in the way), MTU 9000 (room for the large
/// frames the tests inject), up.
fn make_tap(tag: &str, queues: usize) -> (Vec<Tap>, TestTap) {
    let name = format!("kt{}{tag}", std::process::id() % 1_000_000);
    let taps = Tap::open(&name, queues).expect("create a tap (tests run as root)");
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    let mut nl = Rtnl::new().unwrap();
    let index = nl.link_by_name(&name).unwrap().expect("tap exists").index;
    nl.set_mtu(index, 9000).unwrap();
    nl.set_up(index).unwrap();
    (taps, TestTap { name, index })
}

/// An AF_PACKET socket on one interface.
struct PacketSock(OwnedFd);

impl PacketSock {
    fn bind(index: u32) -> Self {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd was just created and is owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_ll is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = index as i32;
        // SAFETY: sll is a valid sockaddr_ll of the given size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: tv is a valid timeval.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        PacketSock(fd)
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: sends frame.len() bytes from frame.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
    }

    /// The next frame with our EtherType, within `timeout`.
    fn recv_ours(&self, timeout: Duration) -> Option<Vec<u8>> {
        let start = Instant::now();
        let mut buf = vec![0u8; 70_000];
        while start.elapsed() < timeout {
            // SAFETY: receives at most buf.len() bytes into buf.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 14 && buf[12..14] == ETHERTYPE.to_be_bytes() {
                return Some(buf[..n as usize].to_vec());
            }
        }
        None
    }
}

/// An Ethernet frame of `len` bytes with our EtherType; `tag` marks it.
fn frame(len: usize, tag: u8) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    f[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    for (i, b) in f[14..].iter_mut().enumerate() {
        *b = tag.wrapping_add((i % 251) as u8);
    }
    f
}

/// A guest-side split ring: the driver's view (add buffers, read used).
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl Ring {
    fn new(mem: &GuestMemoryMmap, start: u64) -> (Ring, Queue) {
        let m = MockSplitQueue::create(mem, GuestAddress(start), RING_SIZE);
        let q: Queue = m.create_queue().unwrap();
        (
            Ring {
                desc: m.desc_table_addr().0,
                avail: m.avail_addr().0,
                used: m.used_addr().0,
                next_desc: 0,
                avail_idx: 0,
            },
            q,
        )
    }

    /// Makes a chain of (address, length, device-writable) available;
    /// returns its head.
    fn add(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let idx = self.next_desc;
            let last = i + 1 == descs.len();
            let flags = if write { 2u16 } else { 0 } | if last { 0 } else { 1 };
            let at = self.desc + u64::from(idx) * 16;
            mem.write_obj(addr, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj((idx + 1) % RING_SIZE, GuestAddress(at + 14))
                .unwrap();
            self.next_desc = (idx + 1) % RING_SIZE;
        }
        self.publish(mem, head)
    }

    /// Makes available one indirect chain at `table` of `n` descriptors
    /// of `len` bytes each at `addr` (device-writable with `write`).
    fn add_indirect(
        &mut self,
        mem: &GuestMemoryMmap,
        table: u64,
        n: u16,
        (addr, len, write): (u64, u32, bool),
    ) -> u16 {
        for i in 0..n {
            let at = table + u64::from(i) * 16;
            let last = i + 1 == n;
            let flags = if write { 2u16 } else { 0 } | if last { 0 } else { 1 };
            mem.write_obj(addr, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj(if last { 0 } else { i + 1 }, GuestAddress(at + 14))
                .unwrap();
        }
        let head = self.next_desc;
        let at = self.desc + u64::from(head) * 16;
        mem.write_obj(table, GuestAddress(at)).unwrap();
        mem.write_obj(u32::from(n) * 16, GuestAddress(at + 8))
            .unwrap();
        mem.write_obj(4u16, GuestAddress(at + 12)).unwrap(); // INDIRECT
        mem.write_obj(0u16, GuestAddress(at + 14)).unwrap();
        self.next_desc = (head + 1) % RING_SIZE;
        self.publish(mem, head)
    }

    /// Puts chain `head` in the avail ring; returns it.
    fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) -> u16 {
        let slot = self.avail + 4 + u64::from(self.avail_idx % RING_SIZE) * 2;
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        head
    }

    fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used entry `i`: (head, length).
    fn used(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let at = self.used + 4 + u64::from(i % RING_SIZE) * 8;
        (
            mem.read_obj(GuestAddress(at)).unwrap(),
            mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
}

/// Records which queues were signalled, and leaves the delivery to the line
/// (as virtio-pci's vectors do with MSI-X off): under MSI-X each of these
/// sources is its own vector.
#[derive(Debug, Default)]
struct QueueSignals(Mutex<Vec<u16>>);

impl crate::virtio::VectorSink for QueueSignals {
    fn signal(&self, source: crate::virtio::InterruptSource) -> bool {
        if let crate::virtio::InterruptSource::Queue(q) = source {
            self.0.lock().unwrap().push(q);
        }
        false
    }
}

impl QueueSignals {
    /// The queues signalled so far, each once, in order.
    fn queues(&self) -> Vec<u16> {
        let mut v = self.0.lock().unwrap().clone();
        v.sort();
        v.dedup();
        v
    }
}

struct Rig {
    mem: GuestMemoryMmap,
    dev: Arc<Mutex<VirtioNet>>,
    em: Em,
    interrupt: Arc<Interrupt>,
    signals: Arc<QueueSignals>,
    rings: Vec<Ring>,
    kicks: Vec<EventFd>,
    tap: TestTap,
}

impl Rig {
    fn new(tag: &str, pairs: usize, features: u64) -> Rig {
        Rig::with_memory(tag, pairs, features, &[(GuestAddress(0), 0x100_0000)])
    }

    /// A rig whose guest memory is made of `regions`.
    fn with_memory(
        tag: &str,
        pairs: usize,
        features: u64,
        regions: &[(GuestAddress, usize)],
    ) -> Rig {
        let mem = GuestMemoryMmap::from_ranges(regions).unwrap();
        let (taps, tap) = make_tap(tag, pairs);
        let mut net = VirtioNet::new(
            taps,
            NetConfig {
                mac: GUEST_MAC,
                mtu: 1500,
            },
        )
        .unwrap();
        assert_eq!(features & !net.avail_features(), 0, "only offered features");
        net.set_acked_features(features);
        let nq = net.queue_max_sizes().len();
        let dev = Arc::new(Mutex::new(net));
        let mut em = Em::new().unwrap();
        em.add_subscriber(dev.clone());
        let mut rings = Vec::new();
        let mut queues = Vec::new();
        let mut kicks = Vec::new();
        let mut evts = Vec::new();
        for i in 0..nq {
            let (r, q) = Ring::new(&mem, 0x1_0000 * i as u64);
            rings.push(r);
            queues.push(q);
            let e = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            evts.push(e.try_clone().unwrap());
            kicks.push(e);
        }
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let signals = Arc::new(QueueSignals::default());
        let interrupt = Arc::new(Interrupt::new(irq).with_vectors(signals.clone()));
        dev.lock()
            .unwrap()
            .activate(ActivateContext {
                mem: mem.clone(),
                queues,
                queue_evts: evts,
                interrupt: interrupt.clone(),
            })
            .unwrap();
        let mut rig = Rig {
            mem,
            dev,
            em,
            interrupt,
            signals,
            rings,
            kicks,
            tap,
        };
        rig.spin(Duration::from_millis(30));
        rig
    }

    fn counters(&self) -> Arc<NetCounters> {
        self.dev.lock().unwrap().counters()
    }

    fn kick(&self, q: usize) {
        self.kicks[q].write(1).unwrap();
    }

    /// Runs the device thread's loop for `d`.
    fn spin(&mut self, d: Duration) {
        let start = Instant::now();
        while start.elapsed() < d {
            self.em.run_with_timeout(5).unwrap();
        }
    }

    /// Runs the loop until queue `q` has `n` used entries.
    fn run_until_used(&mut self, q: usize, n: u16) {
        let start = Instant::now();
        while self.rings[q].used_idx(&self.mem) < n {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "queue {q}: {} of {n} used",
                self.rings[q].used_idx(&self.mem)
            );
            self.em.run_with_timeout(5).unwrap();
        }
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

const BASE: u64 = VIRTIO_F_VERSION_1;

#[test]
fn tx_frames_reach_the_tap() {
    let mut r = Rig::new("tx", 1, BASE | f(VIRTIO_NET_F_MRG_RXBUF));
    let sock = PacketSock::bind(r.tap.index);
    let f1 = frame(60, 1);
    let f2 = frame(1514, 2);
    // Chain 1: header and frame in separate descriptors.
    r.mem.write_slice(&[0u8; 12], GuestAddress(BUF)).unwrap();
    r.mem.write_slice(&f1, GuestAddress(BUF + 0x100)).unwrap();
    // Chain 2: header and frame in one descriptor.
    let mut with_hdr = vec![0u8; 12];
    with_hdr.extend_from_slice(&f2);
    r.mem
        .write_slice(&with_hdr, GuestAddress(BUF + 0x1000))
        .unwrap();
    r.rings[1].add(&r.mem, &[(BUF, 12, false), (BUF + 0x100, 60, false)]);
    r.rings[1].add(&r.mem, &[(BUF + 0x1000, with_hdr.len() as u32, false)]);
    r.kick(1);
    r.run_until_used(1, 2);
    assert_eq!(
        sock.recv_ours(Duration::from_secs(2)).as_deref(),
        Some(&f1[..])
    );
    assert_eq!(
        sock.recv_ours(Duration::from_secs(2)).as_deref(),
        Some(&f2[..])
    );
    let c = r.counters();
    assert_eq!(c.get("tx_frames"), 2);
    assert_eq!(c.get("tx_bytes"), 60 + 1514);
    assert_eq!(c.get("tx_dropped") + c.get("invalid_chains"), 0);
    assert!(
        r.interrupt.status() & 1 == 1,
        "used-buffer interrupt raised"
    );
}

#[test]
fn rx_frames_fill_mergeable_buffers_with_num_buffers() {
    let mut r = Rig::new("rm", 1, BASE | f(VIRTIO_NET_F_MRG_RXBUF));
    let sock = PacketSock::bind(r.tap.index);
    // Bad buffers first (device-readable; outside guest memory): returned
    // unused, counted.
    r.rings[0].add(&r.mem, &[(BUF, 1000, false)]);
    r.rings[0].add(&r.mem, &[(0x7f00_0000_0000, 1000, true)]);
    let heads: Vec<u16> = (0..4)
        .map(|i| r.rings[0].add(&r.mem, &[(BUF + 0x1000 * (i + 1), 1000, true)]))
        .collect();
    r.kick(0);
    let big = frame(2500, 7);
    sock.send(&big);
    r.run_until_used(0, 5);
    let used: Vec<(u32, u32)> = (0..5).map(|i| r.rings[0].used(&r.mem, i)).collect();
    assert_eq!(
        &used[..2],
        &[(0, 0), (1, 0)],
        "bad buffers returned with nothing written"
    );
    assert_eq!(
        &used[2..],
        &[
            (u32::from(heads[0]), 1000),
            (u32::from(heads[1]), 1000),
            (u32::from(heads[2]), 2512 - 2000)
        ]
    );
    let mut got = r.read(BUF + 0x1000, 1000);
    got.extend(r.read(BUF + 0x2000, 1000));
    got.extend(r.read(BUF + 0x3000, 512));
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
    assert!(got[12..] == big[..], "frame data spans the three buffers");
    // A small frame takes one buffer.
    let small = frame(100, 9);
    sock.send(&small);
    r.run_until_used(0, 6);
    assert_eq!(r.rings[0].used(&r.mem, 5), (u32::from(heads[3]), 112));
    let got = r.read(BUF + 0x4000, 112);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
    assert!(got[12..] == small[..]);
    let c = r.counters();
    assert_eq!((c.get("rx_frames"), c.get("rx_bytes")), (2, 2600));
    assert_eq!((c.get("invalid_chains"), c.get("rx_dropped")), (2, 0));
    assert_eq!(
        c.get("rx_copied"),
        0,
        "both frames read straight into the guest"
    );
}

#[test]
fn rx_frame_longer_than_the_held_buffers_waits_for_more_and_arrives_whole() {
    let mut r = Rig::new("sp", 1, BASE | f(VIRTIO_NET_F_MRG_RXBUF));
    let sock = PacketSock::bind(r.tap.index);
    let heads: Vec<u16> = (0..2)
        .map(|i| r.rings[0].add(&r.mem, &[(BUF + 0x1000 * i, 1000, true)]))
        .collect();
    r.kick(0);
    // 2512 bytes with the header: 2000 land in the two buffers, the rest
    // in the bounce buffer; the frame waits for a third buffer.
    let big = frame(2500, 11);
    sock.send(&big);
    r.spin(Duration::from_millis(100));
    let c = r.counters();
    assert_eq!(r.rings[0].used_idx(&r.mem), 0, "nothing delivered yet");
    assert_eq!((c.get("rx_stalls"), c.get("rx_dropped")), (1, 0));
    let third = r.rings[0].add(&r.mem, &[(BUF + 0x8000, 1000, true)]);
    r.kick(0);
    r.run_until_used(0, 3);
    assert_eq!(
        (0..3)
            .map(|i| r.rings[0].used(&r.mem, i))
            .collect::<Vec<_>>(),
        [
            (u32::from(heads[0]), 1000),
            (u32::from(heads[1]), 1000),
            (u32::from(third), 512)
        ]
    );
    let mut got = r.read(BUF, 1000);
    got.extend(r.read(BUF + 0x1000, 1000));
    got.extend(r.read(BUF + 0x8000, 512));
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
    assert!(got[12..] == big[..], "the spilled frame arrives whole");
    assert_eq!((c.get("rx_frames"), c.get("rx_copied")), (1, 1));
}

#[test]
fn rx_buffers_across_memory_regions_are_filled_in_place_and_bad_ones_refused() {
    // Two adjacent regions: a buffer may straddle them (two iovecs).
    let regions = [
        (GuestAddress(0), 0x80_0000),
        (GuestAddress(0x80_0000), 0x80_0000),
    ];
    let mut r = Rig::with_memory("rg", 1, BASE, &regions);
    let sock = PacketSock::bind(r.tap.index);
    // Runs past the end of guest memory: refused, counted.
    r.rings[0].add(&r.mem, &[(0xff_fc00, 0x800, true)]);
    // Straddles the boundary, and a second descriptor after it.
    let head = r.rings[0].add(&r.mem, &[(0x7f_fe00, 0x400, true), (BUF, 0x400, true)]);
    r.kick(0);
    let fr = frame(1400, 13);
    sock.send(&fr);
    r.run_until_used(0, 2);
    assert_eq!(
        r.rings[0].used(&r.mem, 0),
        (0, 0),
        "bad buffer returned unused"
    );
    assert_eq!(r.rings[0].used(&r.mem, 1), (u32::from(head), 1412));
    let mut got = r.read(0x7f_fe00, 0x400);
    got.extend(r.read(BUF, 1412 - 0x400));
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
    assert!(got[12..] == fr[..]);
    let c = r.counters();
    assert_eq!((c.get("invalid_chains"), c.get("rx_frames")), (1, 1));
    assert_eq!(c.get("rx_copied"), 0);
}

#[test]
fn rx_without_mergeable_buffers_uses_one_chain_per_frame() {
    let mut r = Rig::new("rs", 1, BASE);
    let sock = PacketSock::bind(r.tap.index);
    // Two chains of 1024 + 1024 bytes.
    for i in 0..2u64 {
        let at = BUF + i * 0x1_0000;
        r.rings[0].add(&r.mem, &[(at, 1024, true), (at + 0x8000, 1024, true)]);
    }
    r.kick(0);
    let f1 = frame(1500, 3);
    sock.send(&f1);
    r.run_until_used(0, 1);
    assert_eq!(r.rings[0].used(&r.mem, 0), (0, 1512));
    let mut got = r.read(BUF, 1024);
    got.extend(r.read(BUF + 0x8000, 1512 - 1024));
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
    assert!(got[12..] == f1[..]);
    // Too large for one chain: dropped and counted, the chain kept for
    // the next frame.
    sock.send(&frame(3000, 4));
    let f3 = frame(200, 5);
    sock.send(&f3);
    r.run_until_used(0, 2);
    assert_eq!(r.rings[0].used(&r.mem, 1), (2, 212));
    assert!(r.read(BUF + 0x1_0000 + 12, 200) == f3[..]);
    let c = r.counters();
    assert_eq!((c.get("rx_dropped"), c.get("oversize")), (1, 1));
    assert_eq!(c.get("rx_frames"), 2);
    assert_eq!(c.get("rx_copied"), 0);
}

#[test]
fn rx_without_guest_buffers_stalls_then_resumes_without_dropping() {
    let mut r = Rig::new("st", 1, BASE | f(VIRTIO_NET_F_MRG_RXBUF));
    let sock = PacketSock::bind(r.tap.index);
    let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(300 + i * 10, 20 + i as u8)).collect();
    for fr in &frames {
        sock.send(fr);
    }
    r.spin(Duration::from_millis(200));
    let c = r.counters();
    assert_eq!(r.rings[0].used_idx(&r.mem), 0);
    assert_eq!(c.get("rx_stalls"), 1, "one stall, not one per attempt");
    assert_eq!(c.get("rx_dropped"), 0);
    assert_eq!(c.get("rx_frames"), 0);
    // The guest adds buffers and notifies: everything arrives, in order.
    for i in 0..3u64 {
        r.rings[0].add(&r.mem, &[(BUF + 0x1000 * i, 2048, true)]);
    }
    r.kick(0);
    r.run_until_used(0, 3);
    for (i, fr) in frames.iter().enumerate() {
        let (head, len) = r.rings[0].used(&r.mem, i as u16);
        assert_eq!((head, len as usize), (i as u32, fr.len() + 12));
        assert!(
            r.read(BUF + 0x1000 * i as u64 + 12, fr.len()) == fr[..],
            "frame {i}"
        );
    }
    assert_eq!(c.get("rx_frames"), 3);
    assert_eq!(c.get("rx_dropped"), 0);
    // Out of buffers again: a second stall, then resumed again.
    sock.send(&frame(64, 40));
    r.spin(Duration::from_millis(100));
    assert_eq!(c.get("rx_stalls"), 2);
    r.rings[0].add(&r.mem, &[(BUF + 0x8000, 2048, true)]);
    r.kick(0);
    r.run_until_used(0, 4);
    assert_eq!(c.get("rx_frames"), 4);
    assert_eq!(c.get("rx_dropped"), 0);
    // The two frames read while the guest had no buffers went by copy;
    // the two read after it added some went straight into them.
    assert_eq!(c.get("rx_copied"), 2);
}

#[test]
fn malformed_tx_chains_are_counted_and_the_queue_keeps_working() {
    let mut r = Rig::new("bt", 1, BASE);
    let sock = PacketSock::bind(r.tap.index);
    let good = frame(80, 50);
    r.mem.write_slice(&[0u8; 12], GuestAddress(BUF)).unwrap();
    r.mem.write_slice(&good, GuestAddress(BUF + 0x100)).unwrap();
    let tx = &mut r.rings[1];
    // Header shorter than 12 bytes.
    tx.add(&r.mem, &[(BUF, 8, false)]);
    // A device-writable descriptor on TX.
    tx.add(&r.mem, &[(BUF, 12, false), (BUF + 0x100, 80, true)]);
    // Outside guest memory.
    tx.add(&r.mem, &[(BUF, 12, false), (0x7f00_0000_0000, 80, false)]);
    // Over 65562 bytes with the header.
    tx.add(&r.mem, &[(BUF, 12, false), (BUF + 0x1000, 65551, false)]);
    // A good one after all that.
    tx.add(&r.mem, &[(BUF, 12, false), (BUF + 0x100, 80, false)]);
    r.kick(1);
    r.run_until_used(1, 5);
    for i in 0..5 {
        assert_eq!(r.rings[1].used(&r.mem, i).1, 0);
    }
    assert_eq!(
        sock.recv_ours(Duration::from_secs(2)).as_deref(),
        Some(&good[..])
    );
    let c = r.counters();
    assert_eq!(c.get("invalid_chains"), 3);
    assert_eq!((c.get("oversize"), c.get("tx_dropped")), (1, 1));
    assert_eq!(c.get("tx_frames"), 1);
}

#[test]
fn overlong_indirect_chains_are_refused_without_being_collected() {
    let mut r = Rig::new("lc", 1, BASE | f(VIRTIO_NET_F_MRG_RXBUF));
    let sock = PacketSock::bind(r.tap.index);
    const TABLE: u64 = 0x80_0000;
    // TX: a header, then 4,000 one-byte descriptors (a 4 KB frame, but far
    // more descriptors than the queue size).
    let f1 = frame(60, 9);
    r.mem.write_slice(&[0u8; 12], GuestAddress(BUF)).unwrap();
    r.mem.write_slice(&f1, GuestAddress(BUF + 0x100)).unwrap();
    r.rings[1].add_indirect(&r.mem, TABLE, 4000, (BUF + 0x100, 1, false));
    r.rings[1].add(&r.mem, &[(BUF, 12, false), (BUF + 0x100, 60, false)]);
    r.kick(1);
    r.run_until_used(1, 2);
    assert_eq!(
        sock.recv_ours(Duration::from_secs(2)).as_deref(),
        Some(&f1[..]),
        "only the good frame reached the tap"
    );
    let c = r.counters();
    assert_eq!((c.get("invalid_chains"), c.get("tx_frames")), (1, 1));
    // RX: a buffer of 4,000 descriptors is returned unused, the next one
    // takes the frame.
    r.rings[0].add_indirect(&r.mem, TABLE + 0x10_0000, 4000, (BUF + 0x1000, 16, true));
    r.rings[0].add(&r.mem, &[(BUF + 0x2000, 2048, true)]);
    r.kick(0);
    let f2 = frame(100, 10);
    sock.send(&f2);
    r.run_until_used(0, 2);
    assert_eq!(r.rings[0].used(&r.mem, 0).1, 0, "returned unused");
    assert_eq!(r.rings[0].used(&r.mem, 1).1 as usize, f2.len() + 12);
    assert_eq!(c.get("invalid_chains"), 2);
}

#[test]
fn control_queue_enables_queue_pairs() {
    let feats = BASE | f(VIRTIO_NET_F_MQ) | f(VIRTIO_NET_F_CTRL_VQ) | f(VIRTIO_NET_F_MRG_RXBUF);
    let mut r = Rig::new("mq", 2, feats);
    assert_eq!(r.rings.len(), 5, "two pairs and a control queue");
    let cmd = |r: &mut Rig, at: u64, bytes: &[u8]| {
        r.mem.write_slice(bytes, GuestAddress(at)).unwrap();
        r.mem.write_obj(0xeeu8, GuestAddress(at + 0x80)).unwrap();
        r.rings[4].add(
            &r.mem,
            &[(at, bytes.len() as u32, false), (at + 0x80, 1, true)],
        );
    };
    cmd(&mut r, BUF, &[4, 0, 2, 0]); // MQ VQ_PAIRS_SET 2
    cmd(&mut r, BUF + 0x100, &[4, 0, 3, 0]); // more pairs than there are
    cmd(&mut r, BUF + 0x200, &[0, 0, 1]); // CTRL_RX: not offered
    r.kick(4);
    r.run_until_used(4, 3);
    let ack = |r: &Rig, at: u64| r.mem.read_obj::<u8>(GuestAddress(at + 0x80)).unwrap();
    assert_eq!(ack(&r, BUF), VIRTIO_NET_OK as u8);
    assert_eq!(ack(&r, BUF + 0x100), VIRTIO_NET_ERR as u8);
    assert_eq!(ack(&r, BUF + 0x200), VIRTIO_NET_ERR as u8);
    assert_eq!(r.rings[4].used(&r.mem, 0).1, 1);
    assert_eq!(r.counters().get("ctrl_commands"), 3);
    // Both pairs carry traffic: frames sent by the guest on pair 1 reach
    // the tap, and every frame the host sends lands in one of the two rx
    // queues (the kernel picks which).
    let sock = PacketSock::bind(r.tap.index);
    let out = frame(90, 60);
    let mut with_hdr = vec![0u8; 12];
    with_hdr.extend_from_slice(&out);
    r.mem
        .write_slice(&with_hdr, GuestAddress(BUF + 0x1000))
        .unwrap();
    r.rings[3].add(&r.mem, &[(BUF + 0x1000, with_hdr.len() as u32, false)]);
    r.kick(3);
    r.run_until_used(3, 1);
    assert_eq!(
        sock.recv_ours(Duration::from_secs(2)).as_deref(),
        Some(&out[..])
    );
    // Pair 1's tx completion went to its own queue's interrupt source (its
    // own MSI-X vector on virtio-pci), the control queue's to queue 4.
    assert_eq!(r.signals.queues(), [3, 4]);
    for q in [0usize, 2] {
        for i in 0..8u64 {
            let at = BUF + 0x10_0000 * (q as u64 + 1) + i * 0x1000;
            r.rings[q].add(&r.mem, &[(at, 2048, true)]);
        }
        r.kick(q);
    }
    for i in 0..6u8 {
        sock.send(&frame(100 + usize::from(i), i));
    }
    let start = Instant::now();
    while r.rings[0].used_idx(&r.mem) + r.rings[2].used_idx(&r.mem) < 6 {
        assert!(start.elapsed() < Duration::from_secs(5), "frames lost");
        r.em.run_with_timeout(5).unwrap();
    }
    assert_eq!(r.counters().get("rx_frames"), 6);
    // Each rx queue that took frames was signalled on its own source.
    let mut want = vec![3, 4];
    for q in [0u16, 2] {
        if r.rings[usize::from(q)].used_idx(&r.mem) > 0 {
            want.push(q);
        }
    }
    want.sort();
    assert_eq!(r.signals.queues(), want);
}

#[test]
fn a_tap_deleted_under_the_device_is_counted_and_reported_link_down() {
    let feats = BASE | f(VIRTIO_NET_F_STATUS);
    let mut r = Rig::new("gn", 1, feats);
    let mut status = [0u8; 2];
    r.dev.lock().unwrap().read_config(6, &mut status);
    assert_eq!(u16::from_le_bytes(status), VIRTIO_NET_S_LINK_UP as u16);
    Rtnl::new().unwrap().delete(r.tap.index).unwrap();
    r.spin(Duration::from_millis(100));
    let c = r.counters();
    assert!(c.get("tap_errors") >= 1);
    r.dev.lock().unwrap().read_config(6, &mut status);
    assert_eq!(u16::from_le_bytes(status), 0, "link down");
    assert!(r.interrupt.status() & 2 != 0, "config-change interrupt");
    // The guest keeps sending: chains come back, frames counted as dropped.
    r.mem.write_slice(&[0u8; 12], GuestAddress(BUF)).unwrap();
    r.rings[1].add(&r.mem, &[(BUF, 12, false), (BUF + 0x100, 60, false)]);
    r.kick(1);
    r.run_until_used(1, 1);
    assert_eq!(c.get("tx_dropped"), 1);
    assert_eq!(c.get("tx_frames"), 0);
}

/// SIOCETHTOOL ETHTOOL_G* value of interface `name`.
fn ethtool_get(name: &str, cmd: u32) -> u32 {
    #[repr(C)]
    struct Req {
        name: [u8; 16],
        data: *mut [u32; 2],
        _pad: [u8; 16],
    }
    let mut val = [cmd, 0u32];
    let mut req = Req {
        name: [0; 16],
        data: &mut val,
        _pad: [0; 16],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: plain socket creation; the ioctl reads our ifreq and writes
    // the ethtool_value it points to.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert!(s >= 0);
        let rc = libc::ioctl(s, 0x8946, &mut req);
        libc::close(s);
        assert_eq!(rc, 0, "SIOCETHTOOL: {}", std::io::Error::last_os_error());
    }
    val[1]
}

#[test]
fn offloads_the_guest_accepts_are_mirrored_to_the_tap() {
    const ETHTOOL_GTXCSUM: u32 = 0x16;
    const ETHTOOL_GTSO: u32 = 0x1e;
    let feats = BASE
        | f(VIRTIO_NET_F_GUEST_CSUM)
        | f(VIRTIO_NET_F_GUEST_TSO4)
        | f(VIRTIO_NET_F_GUEST_TSO6)
        | f(VIRTIO_NET_F_CSUM)
        | f(VIRTIO_NET_F_HOST_TSO4);
    let r = Rig::new("of", 1, feats);
    let name = r.tap.name.clone();
    assert_eq!(ethtool_get(&name, ETHTOOL_GTXCSUM), 1);
    assert_eq!(ethtool_get(&name, ETHTOOL_GTSO), 1);
    // A driver reset takes them away again.
    assert!(r.dev.lock().unwrap().reset());
    assert_eq!(ethtool_get(&name, ETHTOOL_GTSO), 0);
    assert_eq!(ethtool_get(&name, ETHTOOL_GTXCSUM), 0);
    drop(r);
    // Without GUEST_CSUM nothing is offloaded.
    let r = Rig::new("o2", 1, BASE | f(VIRTIO_NET_F_GUEST_TSO4));
    assert_eq!(ethtool_get(&r.tap.name, ETHTOOL_GTSO), 0);
}

#[test]
fn config_space_features_and_macs() {
    let (taps, _t) = make_tap("cf", 1);
    let net = VirtioNet::new(
        taps,
        NetConfig {
            mac: GUEST_MAC,
            mtu: 9000,
        },
    )
    .unwrap();
    let mut cfg = [0u8; 12];
    net.read_config(0, &mut cfg);
    assert_eq!(&cfg[0..6], &GUEST_MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 1, "one pair");
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 9000, "mtu");
    let feats = net.avail_features();
    for bit in [
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_UFO,
    ] {
        assert!(feats & f(bit) != 0, "feature {bit} offered");
    }
    assert_eq!(feats & (f(VIRTIO_NET_F_MQ) | f(VIRTIO_NET_F_CTRL_VQ)), 0);
    assert_eq!(net.queue_max_sizes().len(), 2);
    assert_eq!(net.device_type(), 1);
    for _ in 0..16 {
        let m = random_mac();
        assert_eq!(m[0] & 0x03, 0x02, "locally administered unicast");
    }
    assert_eq!(
        parse_mac("6A:01:aa:bb:cc:dd").unwrap(),
        [0x6a, 1, 0xaa, 0xbb, 0xcc, 0xdd]
    );
    assert_eq!(
        format_mac(&[0x6a, 1, 0xaa, 0xbb, 0xcc, 0xdd]),
        "6a:01:aa:bb:cc:dd"
    );
    assert!(parse_mac("01:00:5e:00:00:01").is_err(), "multicast");
    assert!(parse_mac("6a:01:aa:bb:cc").is_err());
    assert!(parse_mac("6a:01:aa:bb:cc:zz").is_err());
    assert!(parse_mac("00:00:00:00:00:00").is_err());
}

#[test]
fn host_setup_attaches_to_a_bridge_and_teardown_undoes_it() {
    let pid = std::process::id() % 1_000_000;
    let br = format!("kb{pid}");
    let tap = format!("kt{pid}hs");
    let mut nl = Rtnl::new().unwrap();
    // A missing bridge is refused before anything is created.
    let e = HostTap::open(&TapSetup {
        name: tap.clone(),
        bridge: Some(br.clone()),
        mtu: None,
        queues: 1,
    })
    .err()
    .expect("missing bridge refused");
    assert!(matches!(e, TapError::NoBridge(_)), "{e}");
    assert!(nl.link_by_name(&tap).unwrap().is_none(), "nothing created");
    let ok = std::process::Command::new("ip")
        .args(["link", "add", &br, "type", "bridge"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "`ip link add {br} type bridge` (needs iproute2 and root)"
    );
    struct DelBridge(String);
    impl Drop for DelBridge {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &self.0])
                .status();
        }
    }
    let _br_guard = DelBridge(br.clone());
    let br_index = nl.link_by_name(&br).unwrap().unwrap().index;
    // Keel creates the tap: on the bridge, up, MTU set; gone afterwards.
    let host = HostTap::open(&TapSetup {
        name: tap.clone(),
        bridge: Some(br.clone()),
        mtu: Some(1400),
        queues: 2,
    })
    .unwrap();
    assert_eq!(host.queues.len(), 2);
    assert!(host.teardown.created() && host.teardown.attached());
    let l = nl.link_by_name(&tap).unwrap().unwrap();
    assert_eq!((l.master, l.mtu, l.up), (Some(br_index), Some(1400), true));
    // The name is taken now: a second single-queue open is refused.
    let e = HostTap::open(&TapSetup {
        name: tap.clone(),
        bridge: None,
        mtu: None,
        queues: 1,
    })
    .err()
    .expect("in use");
    assert!(e.to_string().contains(&tap), "{e}");
    // A bridge name that is not a bridge.
    let e = HostTap::open(&TapSetup {
        name: format!("kt{pid}h2"),
        bridge: Some("lo".into()),
        mtu: None,
        queues: 1,
    })
    .err()
    .expect("lo is no bridge");
    assert!(matches!(e, TapError::NotABridge(_)), "{e}");
    drop(host);
    assert!(
        nl.link_by_name(&tap).unwrap().is_none(),
        "created tap deleted"
    );
    // A tap that existed before (persistent, made by someone else): left
    // in place, taken off the bridge Keel put it on.
    let ok = std::process::Command::new("ip")
        .args(["tuntap", "add", "dev", &tap, "mode", "tap", "vnet_hdr"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "ip tuntap add");
    let host = HostTap::open(&TapSetup {
        name: tap.clone(),
        bridge: Some(br.clone()),
        mtu: None,
        queues: 1,
    })
    .unwrap();
    assert!(!host.teardown.created() && host.teardown.attached());
    assert_eq!(
        nl.link_by_name(&tap).unwrap().unwrap().master,
        Some(br_index)
    );
    drop(host);
    let l = nl
        .link_by_name(&tap)
        .unwrap()
        .expect("pre-existing tap kept");
    assert_eq!(l.master, None, "taken off the bridge");
    let _ = nl.delete(l.index);
}
