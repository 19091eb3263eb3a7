//! net.* checks, the network responder (`net.serve`) and the network
//! benchmark (`bench.net`), on the first virtio-net device announced on the
//! command line, through virtio-drivers' `VirtIONetRaw` (`netdev`).
//!
//! The probe is a tiny IPv4/IPv6 host: with `probe.net.ip=<a.b.c.d>/<n>`
//! and `probe.net.ip6=<addr>` it answers ARP requests, ICMPv4 echo
//! requests, IPv6 neighbour solicitations, ICMPv6 echo requests and echoes
//! UDP datagrams sent to port 7, in every phase that reads the device (so
//! the host can resolve it at any time). It computes every checksum itself
//! and checks those of the frames addressed to it: a frame for it that is
//! truncated or carries a bad checksum counts as malformed and fails
//! `net.serve`. `net.tso` acks CSUM and HOST_TSO4 beyond what
//! virtio-drivers negotiates (see `netdev`). Order: `net.identify`,
//! `net.udp_send`, `net.tso`,
//! `bench.net`, `net.serve`.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use virtio_drivers::transport::DeviceType;

use super::Context;
use crate::arch::tsc::{self, Deadline};
use crate::cmdline::{NetBench, VsockDir};
use crate::fail;
use crate::netdev::{self, Nic, F_CSUM, F_HOST_TSO4};
use crate::println;
use crate::report::Report;
use crate::virtio::VirtioDevice;

/// Source and destination port of `net.udp_send`.
pub const UDP_SEND_PORT: u16 = 9000;
/// The port the probe echoes UDP datagrams on.
pub const ECHO_PORT: u16 = 7;
/// `bench.net` tx: destination (and source) port.
pub const BENCH_TX_PORT: u16 = 9002;
/// `bench.net` rx: the port the host sends to.
pub const BENCH_RX_PORT: u16 = 9003;
/// `net.tso`: the peer's port (nobody listens: it answers RST).
pub const TSO_PORT: u16 = 9001;
/// `net.tso`: the probe's port.
const TSO_LOCAL_PORT: u16 = 49300;
/// `net.tso`: how long to wait for the RST.
const TSO_RST_US: u64 = 2_000_000;
/// How long to wait for the peer's ARP reply (per try, three tries).
const ARP_TRY_US: u64 = 1_000_000;
/// `bench.net` rx: how long to wait for the first frame.
const BENCH_RX_FIRST_US: u64 = 30_000_000;
/// `bench.net` rx: time without a frame, after the first, that ends it.
const BENCH_RX_IDLE_US: u64 = 2_000_000;

const ETH_ARP: u16 = 0x0806;
const ETH_IPV4: u16 = 0x0800;
const ETH_IPV6: u16 = 0x86dd;
const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_ICMPV6: u8 = 58;
const BROADCAST: [u8; 6] = [0xff; 6];

/// The payload of `net.udp_send` datagram `size`: byte `i`.
pub fn udp_send_pattern(size: usize, i: usize) -> u8 {
    (i.wrapping_mul(13).wrapping_add(size)) as u8
}

/// The first virtio-net device (announced, or on PCI).
fn net_device(ctx: &Context<'_>) -> Option<VirtioDevice> {
    ctx.virtio_devices(DeviceType::Network).into_iter().next()
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The Internet checksum's running sum (RFC 1071), not yet folded.
fn sum(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc = acc.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
    }
    if let [last] = chunks.remainder() {
        acc = acc.wrapping_add(u32::from(*last) << 8);
    }
    acc
}

/// Folds a running sum into the checksum field's value.
fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The pseudo-header sum of an IPv4 upper-layer packet.
fn pseudo4(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u32 {
    sum(dst, sum(src, 0)) + u32::from(proto) + len as u32
}

/// The pseudo-header sum of an IPv6 upper-layer packet.
fn pseudo6(src: &[u8], dst: &[u8], next: u8, len: usize) -> u32 {
    let l = len as u32;
    sum(dst, sum(src, 0)) + (l >> 16) + (l & 0xffff) + u32::from(next)
}

fn eth(dst: &[u8], src: &[u8; 6], ethertype: u16, payload_len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload_len);
    f.extend_from_slice(dst);
    f.extend_from_slice(src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// An Ethernet frame with an IPv4 packet (no options, TTL 64, DF clear).
fn ipv4_frame(
    dst_mac: &[u8],
    src_mac: &[u8; 6],
    src: &[u8],
    dst: &[u8],
    proto: u8,
    payload: &[u8],
) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut f = eth(dst_mac, src_mac, ETH_IPV4, total);
    let h = f.len();
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&(total as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 0, 64, proto, 0, 0]);
    f.extend_from_slice(src);
    f.extend_from_slice(dst);
    let c = fold(sum(&f[h..h + 20], 0));
    f[h + 10..h + 12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A UDP datagram (header and payload) with its checksum.
fn udp4(src: &[u8], dst: &[u8], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut u = Vec::with_capacity(len);
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&(len as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let mut c = fold(sum(&u, pseudo4(src, dst, PROTO_UDP, len)));
    if c == 0 {
        c = 0xffff;
    }
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

/// An Ethernet frame with an IPv6 packet carrying ICMPv6 message `msg`
/// (its checksum filled in here).
fn icmp6_frame(
    dst_mac: &[u8],
    src_mac: &[u8; 6],
    src: &[u8],
    dst: &[u8],
    hop_limit: u8,
    mut msg: Vec<u8>,
) -> Vec<u8> {
    msg[2] = 0;
    msg[3] = 0;
    let c = fold(sum(&msg, pseudo6(src, dst, PROTO_ICMPV6, msg.len())));
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = eth(dst_mac, src_mac, ETH_IPV6, 40 + msg.len());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    f.extend_from_slice(&[PROTO_ICMPV6, hop_limit]);
    f.extend_from_slice(src);
    f.extend_from_slice(dst);
    f.extend_from_slice(&msg);
    f
}

/// Frames the responder answered, by kind.
#[derive(Default, Debug)]
struct Counts {
    arp: u64,
    icmp: u64,
    nd: u64,
    icmp6: u64,
    udp: u64,
    malformed: u64,
}

/// A UDP datagram for the probe on a port other than the echo port.
struct UdpIn {
    dst_port: u16,
    len: usize,
}

/// The probe's addresses and what it has learnt.
struct Stack {
    mac: [u8; 6],
    ip: Option<[u8; 4]>,
    ip6: Option<[u8; 16]>,
    peer: Option<[u8; 4]>,
    peer_mac: Option<[u8; 6]>,
    counts: Counts,
    first_malformed: Option<String>,
    /// RSTs from the peer's `TSO_PORT` to `TSO_LOCAL_PORT`.
    tso_rsts: u64,
}

impl Stack {
    fn malformed(&mut self, why: String) {
        self.counts.malformed += 1;
        if self.first_malformed.is_none() {
            println!("probe: net malformed frame: {why}");
            self.first_malformed = Some(why);
        }
    }

    /// Reads and handles the frames waiting, at most a queue's worth (a
    /// steady stream would otherwise keep it here); returns the UDP
    /// datagrams for other ports. `Err` only for device errors.
    fn poll(&mut self, nic: &mut Nic) -> Result<Vec<UdpIn>, String> {
        let mut out = Vec::new();
        for _ in 0..netdev::QUEUE_SIZE {
            let Some(frame) = nic.recv()? else { break };
            if let Some(u) = self.handle(nic, &frame)? {
                out.push(u);
            }
        }
        Ok(out)
    }

    fn handle(&mut self, nic: &mut Nic, f: &[u8]) -> Result<Option<UdpIn>, String> {
        if f.len() < 14 {
            self.malformed(format!("{}-byte frame", f.len()));
            return Ok(None);
        }
        let dst = &f[0..6];
        if dst != self.mac && dst != BROADCAST && !(dst[0] == 0x33 && dst[1] == 0x33) {
            return Ok(None);
        }
        match be16(f, 12) {
            ETH_ARP => self.arp(nic, f).map(|_| None),
            ETH_IPV4 => self.ipv4(nic, f),
            ETH_IPV6 => self.ipv6(nic, f).map(|_| None),
            _ => Ok(None),
        }
    }

    fn arp(&mut self, nic: &mut Nic, f: &[u8]) -> Result<(), String> {
        let Some(ip) = self.ip else { return Ok(()) };
        if f.len() < 14 + 28 {
            self.malformed(format!("ARP frame of {} bytes", f.len()));
            return Ok(());
        }
        let a = &f[14..42];
        if be16(a, 0) != 1 || be16(a, 2) != ETH_IPV4 || a[4] != 6 || a[5] != 4 {
            return Ok(());
        }
        let (op, sha, spa, tpa) = (be16(a, 6), &a[8..14], &a[14..18], &a[24..28]);
        if Some(spa) == self.peer.as_ref().map(|p| &p[..]) && sha != [0; 6] {
            let mut m = [0u8; 6];
            m.copy_from_slice(sha);
            self.peer_mac = Some(m);
        }
        if op == 1 && tpa == ip {
            let mut r = eth(sha, &self.mac, ETH_ARP, 28);
            r.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 2]);
            r.extend_from_slice(&self.mac);
            r.extend_from_slice(&ip);
            r.extend_from_slice(sha);
            r.extend_from_slice(spa);
            nic.send(&r)?;
            self.counts.arp += 1;
        }
        Ok(())
    }

    fn ipv4(&mut self, nic: &mut Nic, f: &[u8]) -> Result<Option<UdpIn>, String> {
        let Some(ip) = self.ip else { return Ok(None) };
        if f.len() < 14 + 20 || f[30..34] != ip {
            return Ok(None);
        }
        let p = &f[14..];
        let ihl = usize::from(p[0] & 0xf) * 4;
        let total = usize::from(be16(p, 2));
        if p[0] >> 4 != 4 || ihl < 20 || total < ihl || total > p.len() {
            self.malformed(format!(
                "IPv4 header: version/IHL {:#x}, total length {total}, {} bytes after Ethernet",
                p[0],
                p.len()
            ));
            return Ok(None);
        }
        if fold(sum(&p[..ihl], 0)) != 0 {
            self.malformed(String::from("IPv4 header checksum"));
            return Ok(None);
        }
        if be16(p, 6) & 0x3fff != 0 {
            return Ok(None); // a fragment: not reassembled
        }
        let (src, proto, body) = (&p[12..16], p[9], &p[ihl..total]);
        match proto {
            PROTO_ICMP => {
                if body.len() < 8 || fold(sum(body, 0)) != 0 {
                    self.malformed(format!(
                        "ICMP message of {} bytes or its checksum",
                        body.len()
                    ));
                    return Ok(None);
                }
                if body[0] == 8 && body[1] == 0 {
                    let mut m = body.to_vec();
                    m[0] = 0;
                    m[2] = 0;
                    m[3] = 0;
                    let c = fold(sum(&m, 0));
                    m[2..4].copy_from_slice(&c.to_be_bytes());
                    nic.send(&ipv4_frame(&f[6..12], &self.mac, &ip, src, PROTO_ICMP, &m))?;
                    self.counts.icmp += 1;
                }
                Ok(None)
            }
            PROTO_UDP => {
                let ulen = if body.len() >= 8 {
                    usize::from(be16(body, 4))
                } else {
                    0
                };
                if body.len() < 8 || ulen < 8 || ulen > body.len() {
                    self.malformed(format!(
                        "UDP length {ulen} in {} bytes of IPv4 payload",
                        body.len()
                    ));
                    return Ok(None);
                }
                let u = &body[..ulen];
                if be16(u, 6) != 0 && fold(sum(u, pseudo4(src, &ip, PROTO_UDP, ulen))) != 0 {
                    self.malformed(String::from("UDP checksum"));
                    return Ok(None);
                }
                let (sport, dport) = (be16(u, 0), be16(u, 2));
                if dport == ECHO_PORT {
                    let reply = udp4(&ip, src, ECHO_PORT, sport, &u[8..]);
                    nic.send(&ipv4_frame(
                        &f[6..12],
                        &self.mac,
                        &ip,
                        src,
                        PROTO_UDP,
                        &reply,
                    ))?;
                    self.counts.udp += 1;
                    return Ok(None);
                }
                Ok(Some(UdpIn {
                    dst_port: dport,
                    len: ulen - 8,
                }))
            }
            PROTO_TCP => {
                if body.len() < 20 || fold(sum(body, pseudo4(src, &ip, PROTO_TCP, body.len()))) != 0
                {
                    self.malformed(format!(
                        "TCP segment of {} bytes or its checksum",
                        body.len()
                    ));
                    return Ok(None);
                }
                if Some(src) == self.peer.as_ref().map(|p| &p[..])
                    && be16(body, 0) == TSO_PORT
                    && be16(body, 2) == TSO_LOCAL_PORT
                    && body[13] & 0x04 != 0
                {
                    self.tso_rsts += 1;
                }
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    fn ipv6(&mut self, nic: &mut Nic, f: &[u8]) -> Result<(), String> {
        let Some(ip6) = self.ip6 else { return Ok(()) };
        if f.len() < 14 + 40 {
            return Ok(());
        }
        let p = &f[14..];
        let dst = &p[24..40];
        let solicited =
            dst[..13] == [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff] && dst[13..] == ip6[13..];
        if dst != ip6 && !solicited {
            return Ok(());
        }
        let plen = usize::from(be16(p, 4));
        if p[0] >> 4 != 6 || plen > p.len() - 40 {
            self.malformed(format!(
                "IPv6 header: version {}, payload length {plen}, {} bytes after the header",
                p[0] >> 4,
                p.len() - 40
            ));
            return Ok(());
        }
        if p[6] != PROTO_ICMPV6 {
            return Ok(());
        }
        let (src, hop, m) = (&p[8..24], p[7], &p[40..40 + plen]);
        if m.len() < 8 || fold(sum(m, pseudo6(src, dst, PROTO_ICMPV6, m.len()))) != 0 {
            self.malformed(format!(
                "ICMPv6 message of {} bytes or its checksum",
                m.len()
            ));
            return Ok(());
        }
        match (m[0], m[1]) {
            // Neighbour solicitation (RFC 4861 4.3): hop limit 255.
            (135, 0) if hop == 255 && m.len() >= 24 && m[8..24] == ip6 => {
                let unspecified = src == [0u8; 16];
                let (dst_ip, dst_mac, flags): ([u8; 16], Vec<u8>, u8) = if unspecified {
                    let mut all = [0u8; 16];
                    all[0] = 0xff;
                    all[1] = 2;
                    all[15] = 1;
                    (all, vec![0x33, 0x33, 0, 0, 0, 1], 0x20)
                } else {
                    let mut d = [0u8; 16];
                    d.copy_from_slice(src);
                    (d, f[6..12].to_vec(), 0x60)
                };
                let mut na = vec![136, 0, 0, 0, flags, 0, 0, 0];
                na.extend_from_slice(&ip6);
                na.extend_from_slice(&[2, 1]);
                na.extend_from_slice(&self.mac);
                nic.send(&icmp6_frame(&dst_mac, &self.mac, &ip6, &dst_ip, 255, na))?;
                self.counts.nd += 1;
            }
            (128, 0) if dst == ip6 => {
                let mut r = m.to_vec();
                r[0] = 129;
                nic.send(&icmp6_frame(&f[6..12], &self.mac, &ip6, src, 64, r))?;
                self.counts.icmp6 += 1;
            }
            _ => {}
        }
        Ok(())
    }

    /// Resolves the peer's MAC address: ARP requests, up to three, each
    /// answered within a second.
    fn resolve_peer(&mut self, nic: &mut Nic) -> Result<[u8; 6], String> {
        if let Some(m) = self.peer_mac {
            return Ok(m);
        }
        let (Some(ip), Some(peer)) = (self.ip, self.peer) else {
            return Err(String::from("needs probe.net.ip and probe.net.peer"));
        };
        for _ in 0..3 {
            let mut r = eth(&BROADCAST, &self.mac, ETH_ARP, 28);
            r.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
            r.extend_from_slice(&self.mac);
            r.extend_from_slice(&ip);
            r.extend_from_slice(&[0; 6]);
            r.extend_from_slice(&peer);
            nic.send(&r)?;
            let deadline = Deadline::after_us(ARP_TRY_US);
            while !deadline.passed() {
                self.poll(nic)?;
                if let Some(m) = self.peer_mac {
                    return Ok(m);
                }
                core::hint::spin_loop();
            }
        }
        Err(format!(
            "no ARP reply from {}.{}.{}.{} in 3 s",
            peer[0], peer[1], peer[2], peer[3]
        ))
    }
}

fn fmt_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// Runs the net checks: when a virtio-net device is announced or a net
/// option is given, and some net check is selected.
pub fn run(ctx: &Context<'_>, report: &mut Report<'_>) {
    let o = ctx.options;
    let asked = o.net_ip.is_some()
        || o.net_ip6.is_some()
        || o.net_peer.is_some()
        || o.net_serve_ms.is_some()
        || o.bench_net.is_some();
    let want_bench = o.bench_net.is_some() && report.selects("bench.net");
    if !report.selects_prefix("net.") && !want_bench {
        return;
    }
    let dev = net_device(ctx);
    if dev.is_none() && !asked {
        return;
    }
    let opened = match dev {
        Some(dev) => Nic::open(&dev, F_CSUM | F_HOST_TSO4),
        None => {
            report.check("net.identify", || {
                Err(String::from("no virtio-net device (ID 1) announced"))
            });
            if want_bench {
                report.check("bench.net", || Err(String::from("no virtio-net device")));
            }
            return;
        }
    };
    let mut nic = match opened {
        Ok(n) => n,
        Err(e) => {
            report.check("net.identify", || Err(e.clone()));
            if want_bench {
                report.check("bench.net", || Err(format!("driver init: {e}")));
            }
            return;
        }
    };
    report.check("net.identify", || {
        println!("probe: net features {:#x}", nic.offered);
        println!("probe: net mac={} mtu={}", fmt_mac(&nic.mac), nic.mtu);
        if nic.mac[0] & 1 != 0 || nic.mac == [0; 6] {
            fail!("MAC {} is multicast or zero", fmt_mac(&nic.mac));
        }
        if nic.mtu < 68 {
            fail!("MTU {} is below IPv4's minimum of 68", nic.mtu);
        }
        Ok(())
    });
    let mut stack = Stack {
        mac: nic.mac,
        ip: o.net_ip.map(|(a, _)| a),
        ip6: o.net_ip6,
        peer: o.net_peer,
        peer_mac: None,
        counts: Counts::default(),
        first_malformed: None,
        tso_rsts: 0,
    };

    if report.selects("net.udp_send") {
        if o.net_ip.is_none() || o.net_peer.is_none() {
            println!("probe: net.udp_send skipped: needs probe.net.ip and probe.net.peer");
        } else {
            report.check("net.udp_send", || udp_send(&mut nic, &mut stack));
        }
    }

    if report.selects("net.tso") {
        if nic.extra & F_HOST_TSO4 == 0 {
            println!("probe: net.tso skipped: the device does not offer HOST_TSO4 with CSUM");
        } else if o.net_ip.is_none() || o.net_peer.is_none() {
            println!("probe: net.tso skipped: needs probe.net.ip and probe.net.peer");
        } else {
            report.check("net.tso", || tso(&mut nic, &mut stack));
        }
    }

    if let Some(b) = o.bench_net.filter(|_| want_bench) {
        report.check("bench.net", || bench(&mut nic, &mut stack, b));
    }

    if report.selects("net.serve") {
        match o.net_serve_ms {
            None => println!("probe: net.serve skipped: no probe.net.serve_ms"),
            Some(ms) => report.check("net.serve", || serve(&mut nic, &mut stack, ms)),
        }
    }
}

fn udp_send(nic: &mut Nic, stack: &mut Stack) -> Result<(), String> {
    let (Some(ip), Some(peer)) = (stack.ip, stack.peer) else {
        fail!("needs probe.net.ip and probe.net.peer");
    };
    let peer_mac = stack.resolve_peer(nic)?;
    println!("probe: net peer mac={}", fmt_mac(&peer_mac));
    let max = usize::from(nic.mtu).saturating_sub(28);
    let mut sizes: Vec<usize> = [1, 512, 1400, max]
        .into_iter()
        .filter(|&s| s >= 1 && s <= max)
        .collect();
    sizes.dedup();
    for &size in &sizes {
        let payload: Vec<u8> = (0..size).map(|i| udp_send_pattern(size, i)).collect();
        let u = udp4(&ip, &peer, UDP_SEND_PORT, UDP_SEND_PORT, &payload);
        nic.send(&ipv4_frame(
            &peer_mac, &stack.mac, &ip, &peer, PROTO_UDP, &u,
        ))?;
    }
    nic.flush()?;
    println!("probe: net udp sent sizes={sizes:?}");
    Ok(())
}

/// One TCP segment of four MSS and a bit, handed to the device as a
/// single GSO frame (gso_type TCPV4, NEEDS_CSUM with the pseudo-header sum
/// in the checksum field, as Linux's drivers send them) to the peer's
/// closed port: the peer's stack answers with RST once the host has taken
/// the frame as valid TCP.
fn tso(nic: &mut Nic, stack: &mut Stack) -> Result<(), String> {
    let (Some(ip), Some(peer)) = (stack.ip, stack.peer) else {
        fail!("needs probe.net.ip and probe.net.peer");
    };
    let peer_mac = stack.resolve_peer(nic)?;
    let mss = usize::from(nic.mtu).saturating_sub(40).max(536);
    let payload = 4 * mss + 100;
    let tcp_len = 20 + payload;
    if 20 + tcp_len > 0xffff {
        fail!("MTU {} too large for a 4-MSS IPv4 packet", nic.mtu);
    }
    let mut t = Vec::with_capacity(tcp_len);
    t.extend_from_slice(&TSO_LOCAL_PORT.to_be_bytes());
    t.extend_from_slice(&TSO_PORT.to_be_bytes());
    t.extend_from_slice(&1000u32.to_be_bytes()); // seq
    t.extend_from_slice(&1u32.to_be_bytes()); // ack
    t.extend_from_slice(&[0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]); // ACK|PSH
    t.extend((0..payload).map(|i| (i % 251) as u8));
    // The pseudo-header sum, not complemented: the device (the host's GSO)
    // completes it per segment.
    let partial = !fold(pseudo4(&ip, &peer, PROTO_TCP, tcp_len));
    t[16..18].copy_from_slice(&partial.to_be_bytes());
    let f = ipv4_frame(&peer_mac, &stack.mac, &ip, &peer, PROTO_TCP, &t);
    // struct virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size,
    // csum_start, csum_offset, num_buffers.
    let mut hdr = vec![1u8, 1];
    for v in [14 + 20 + 20, mss as u16, 14 + 20, 16, 0] {
        hdr.extend_from_slice(&u16::to_le_bytes(v));
    }
    let before = stack.tso_rsts;
    nic.send_with(Some(&hdr), &f)?;
    nic.flush()?;
    let deadline = Deadline::after_us(TSO_RST_US);
    while stack.tso_rsts == before && !deadline.passed() {
        stack.poll(nic)?;
        core::hint::spin_loop();
    }
    println!(
        "probe: net tso frame of {} bytes (TCP payload {payload}, gso_size {mss}) to port {TSO_PORT}: {} RST",
        f.len(),
        stack.tso_rsts - before
    );
    if stack.tso_rsts == before {
        fail!(
            "no RST from the peer's closed port {TSO_PORT} within {} s: the GSO frame did not arrive as valid TCP",
            TSO_RST_US / 1_000_000
        );
    }
    Ok(())
}

fn serve(nic: &mut Nic, stack: &mut Stack, ms: u64) -> Result<(), String> {
    println!("probe: net serving for {ms} ms");
    let deadline = Deadline::after_us(ms.saturating_mul(1000));
    let mut error = None;
    while !deadline.passed() {
        if let Err(e) = stack.poll(nic) {
            error = Some(e);
            break;
        }
        core::hint::spin_loop();
    }
    if error.is_none() {
        error = nic.flush().err();
    }
    let c = &stack.counts;
    println!(
        "probe: net served arp={} icmp={} nd={} icmp6={} udp={} malformed={}",
        c.arp, c.icmp, c.nd, c.icmp6, c.udp, c.malformed
    );
    if let Some(e) = error {
        fail!("{e}");
    }
    if let Some(why) = &stack.first_malformed {
        fail!("{} malformed frames, the first: {why}", c.malformed);
    }
    Ok(())
}

fn bench(nic: &mut Nic, stack: &mut Stack, b: NetBench) -> Result<(), String> {
    let frame = b.frame as usize;
    let max_frame = usize::from(nic.mtu) + 14;
    if frame > max_frame {
        fail!("frame size {frame} exceeds MTU {} + 14", nic.mtu);
    }
    let (Some(ip), Some(peer)) = (stack.ip, stack.peer) else {
        fail!("needs probe.net.ip and probe.net.peer");
    };
    let info = || match tsc::khz() {
        Some((khz, src)) => format!("tsc {khz} kHz from {}", src.name()),
        None => String::from("tsc rate unknown"),
    };
    let elapsed = |cycles: u64| match tsc::cycles_to_ns(cycles) {
        Some(ns) => format!("ns={ns}"),
        None => format!("cycles={cycles}"),
    };
    match b.dir {
        VsockDir::Tx => {
            let peer_mac = stack.resolve_peer(nic)?;
            let payload = vec![0x5au8; frame - 42];
            let u = udp4(&ip, &peer, BENCH_TX_PORT, BENCH_TX_PORT, &payload);
            let f = ipv4_frame(&peer_mac, &stack.mac, &ip, &peer, PROTO_UDP, &u);
            let start = tsc::rdtsc();
            for _ in 0..b.count {
                nic.send(&f)?;
                // Answer the host meanwhile (cheap: no exit when idle).
                stack.poll(nic)?;
            }
            nic.flush()?;
            let cycles = tsc::rdtsc().wrapping_sub(start);
            println!(
                "probe: bench info: {}, {} frames returned",
                info(),
                nic.tx_done
            );
            println!(
                "probe: bench net tx size={frame} frames={} {}",
                b.count,
                elapsed(cycles)
            );
        }
        VsockDir::Rx => {
            println!("probe: bench net rx ready on port {BENCH_RX_PORT}");
            let mut got = 0u64;
            let mut bytes = 0u64;
            let mut first = None;
            let mut last = tsc::rdtsc();
            let mut idle = Deadline::after_us(BENCH_RX_FIRST_US);
            while got < b.count {
                let datagrams = stack.poll(nic)?;
                for d in datagrams.iter().filter(|d| d.dst_port == BENCH_RX_PORT) {
                    got += 1;
                    bytes += d.len as u64;
                    last = tsc::rdtsc();
                    first.get_or_insert(last);
                    idle = Deadline::after_us(BENCH_RX_IDLE_US);
                }
                if idle.passed() {
                    break;
                }
                core::hint::spin_loop();
            }
            let cycles = first.map_or(0, |f| last.wrapping_sub(f));
            println!(
                "probe: bench info: {}, {bytes} payload bytes, {} of {} frames missing",
                info(),
                b.count - got,
                b.count
            );
            println!(
                "probe: bench net rx size={frame} frames={got} {}",
                elapsed(cycles)
            );
            if got == 0 {
                fail!(
                    "no frame to port {BENCH_RX_PORT} within {} s",
                    BENCH_RX_FIRST_US / 1_000_000
                );
            }
        }
    }
    if tsc::khz().is_none() {
        fail!("no TSC rate: elapsed time in cycles only");
    }
    Ok(())
}
