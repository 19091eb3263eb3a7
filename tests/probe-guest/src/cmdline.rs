//! The probe's kernel command line options.
//!
//! - `probe.idle`: after the checks, print `probe: idle` and halt between
//!   interrupts forever instead of ending the VM (ignoring Ctrl-Alt-Del).
//! - `probe.interactive`: after the checks, print `probe: interactive` and
//!   poll the console and keyboard until Ctrl-Alt-Del (see
//!   [`crate::interactive`]); `probe.heartbeat=<ms>` adds `probe: tick <n>`
//!   lines every `<ms>` milliseconds there.
//! - `probe.check=<prefix>[,<prefix>...]` (repeatable): run only the checks
//!   whose names start with one of the prefixes.
//! - `probe.mem=<bytes>`, `probe.cpus=<n>`, `probe.topo=<s>,<c>,<t>`,
//!   `probe.echo=<word>`, `probe.blk=<n>`: what the VMM was configured
//!   with, checked.
//! - `probe.numa=<nodes>`: the NUMA nodes the ACPI SRAT and SLIT must
//!   describe (0: none; check `acpi.numa`, needs `probe.topo` and `probe.mem`).
//! - `probe.boot=<success|failure>`: after the summary, print HostOS's
//!   `GUESTOS BOOT SUCCESS` or `GUESTOS BOOT FAILURE` marker.
//! - `probe.bench.blk=<read|write|randread|randwrite>,<bs>,<qd>,<count>`:
//!   a virtio-blk benchmark on disk 0 (check `bench.blk`).
//! - `probe.bench.blkmq=<kind>,<bs>,<qd>,<count>`: the same over one
//!   request queue on one vCPU, then over two queues on two vCPUs (check
//!   `bench.blkmq`, see `checks::blkmq`).
//! - `probe.bench.blkmq.work=<passes>`: in bench.blkmq, each vCPU hashes
//!   every block it read that many times before it reuses the slot: the
//!   guest's own CPU work per request (default 0).
//! - `probe.vsock.cid=<n>`, `probe.vsock.transfer=<port>,<bytes>`,
//!   `probe.vsock.closed_port=<port>`, `probe.vsock.listen=<port>[,refused]`,
//!   `probe.vsock.flood=<packets>[,sync]`,
//!   `probe.bench.vsock=<port>,<write size>,<total bytes>,<tx|rx>`: the
//!   virtio-vsock checks and benchmark (see `checks::vsock`).
//! - `probe.net.ip=<a.b.c.d>/<prefix>`, `probe.net.ip6=<ipv6>`,
//!   `probe.net.peer=<a.b.c.d>`, `probe.net.serve_ms=<ms>`,
//!   `probe.bench.net=<tx|rx>,<frame bytes>,<count>`: the virtio-net
//!   checks, responder and benchmark (see `checks::net`).
//!
//! Other tokens (the VMM's own, such as `virtio_mmio.device=`) are ignored.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// Longest heartbeat period: a day.
const HEARTBEAT_MAX_MS: u64 = 86_400_000;

/// CPU topology: sockets, cores per socket, threads per core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Sockets.
    pub sockets: u32,
    /// Cores per socket.
    pub cores: u32,
    /// Threads per core.
    pub threads: u32,
}

impl Topology {
    /// Number of vCPUs.
    pub fn vcpus(&self) -> u32 {
        self.sockets * self.cores * self.threads
    }

    /// Width of the thread field of an APIC ID.
    pub fn thread_bits(&self) -> u32 {
        ceil_log2(self.threads)
    }

    /// Width of the core field of an APIC ID.
    pub fn core_bits(&self) -> u32 {
        ceil_log2(self.cores)
    }

    /// The APIC ID of vCPU `index` (socket-major numbering).
    pub fn apic_id(&self, index: u32) -> u32 {
        let thread = index % self.threads;
        let core = (index / self.threads) % self.cores;
        let socket = index / (self.threads * self.cores);
        socket << (self.thread_bits() + self.core_bits()) | core << self.thread_bits() | thread
    }
}

/// ceil(log2(n)), 0 for n <= 1.
pub fn ceil_log2(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// How the probe ends the VM once its checks are done (`probe.end=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum End {
    /// `poweroff` (default): S5, then the fallbacks of [`crate::power::off`].
    #[default]
    PowerOff,
    /// `reset`: an i8042 reset pulse, as a rebooting Linux guest does.
    Reset,
    /// `triple-fault`: a triple fault, as a crashing kernel does.
    TripleFault,
    /// `acpi-reset`: a write to the FADT's reset register (port 0x602).
    AcpiReset,
}

/// A GuestOS boot marker the probe prints (`probe.boot=`), as HostOS's
/// GuestOS does on its console, for the VMM's boot monitor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootMarker {
    /// `success`: `GUESTOS BOOT SUCCESS`.
    Success,
    /// `failure`: `GUESTOS BOOT FAILURE`.
    Failure,
}

/// The access pattern of a block benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchKind {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Reads at random block-aligned offsets.
    RandRead,
    /// Writes at random block-aligned offsets.
    RandWrite,
}

impl BenchKind {
    /// The name used on the command line and in the result line.
    pub fn name(self) -> &'static str {
        match self {
            BenchKind::Read => "read",
            BenchKind::Write => "write",
            BenchKind::RandRead => "randread",
            BenchKind::RandWrite => "randwrite",
        }
    }

    /// Whether requests write to the disk.
    pub fn writes(self) -> bool {
        matches!(self, BenchKind::Write | BenchKind::RandWrite)
    }

    /// Whether offsets are random (else sequential, wrapping around).
    pub fn random(self) -> bool {
        matches!(self, BenchKind::RandRead | BenchKind::RandWrite)
    }
}

/// `probe.bench.blk=<kind>,<block size>,<queue depth>,<count>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkBench {
    /// Access pattern.
    pub kind: BenchKind,
    /// Bytes per request: a non-zero multiple of 512.
    pub block_size: u32,
    /// Requests kept in flight (at least 1).
    pub queue_depth: u32,
    /// Requests in all (at least 1).
    pub count: u64,
}

/// Direction of a vsock benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VsockDir {
    /// Guest to host.
    Tx,
    /// Host to guest.
    Rx,
}

impl VsockDir {
    /// The name used on the command line and in the result line.
    pub fn name(self) -> &'static str {
        match self {
            VsockDir::Tx => "tx",
            VsockDir::Rx => "rx",
        }
    }
}

/// `probe.bench.vsock=<port>,<write size>,<total bytes>,<tx|rx>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VsockBench {
    /// Host port to connect to.
    pub port: u32,
    /// Bytes per write (one packet each): 1..=65536.
    pub write_size: u32,
    /// Bytes in all (at least 1).
    pub total: u64,
    /// Direction.
    pub dir: VsockDir,
}

/// `probe.vsock.listen=<port>[,refused]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VsockListen {
    /// Guest port to listen on.
    pub port: u32,
    /// The VMM refuses host-initiated connections: none may arrive.
    pub refused: bool,
}

/// `probe.vsock.flood=<packets>[,sync]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VsockFlood {
    /// Packets to send without receive buffers (at least 1).
    pub packets: u64,
    /// Wait for a byte on COM1 before the flood and after it.
    pub sync: bool,
}

/// `probe.bench.net=<tx|rx>,<frame bytes>,<count>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetBench {
    /// Direction (tx: guest to host).
    pub dir: VsockDir,
    /// Ethernet frame size in bytes (headers included, no virtio header).
    pub frame: u32,
    /// Frames in all (at least 1).
    pub count: u64,
}

/// Largest vsock packet payload (Linux's and Keel's limit).
pub const VSOCK_MAX_WRITE: u64 = 64 * 1024;

/// Options the probe understands, parsed from the command line.
#[derive(Debug, Default)]
pub struct Options<'a> {
    /// `probe.idle`.
    pub idle: bool,
    /// `probe.interactive`.
    pub interactive: bool,
    /// `probe.heartbeat`: milliseconds between ticks in interactive mode.
    pub heartbeat_ms: Option<u64>,
    /// `probe.check` prefixes (empty: run everything).
    pub checks: Vec<&'a str>,
    /// `probe.mem`: configured guest memory in bytes.
    pub mem: Option<u64>,
    /// `probe.cpus`: configured vCPU count.
    pub cpus: Option<u32>,
    /// `probe.topo`: configured topology.
    pub topo: Option<Topology>,
    /// `probe.echo`: a word that must appear on the command line.
    pub echo: Option<&'a str>,
    /// `probe.numa`: NUMA nodes the SRAT and SLIT describe (0: no tables).
    pub numa: Option<u32>,
    /// `probe.end`: how to end the VM after the checks.
    pub end: End,
    /// `probe.boot`: the HostOS boot marker to print after the summary.
    pub boot_marker: Option<BootMarker>,
    /// `probe.blk`: number of virtio-blk devices configured.
    pub blk: Option<u32>,
    /// `probe.bench.blk`: the block benchmark to run.
    pub bench_blk: Option<BlkBench>,
    /// `probe.bench.blkmq`: the multi-queue block benchmark (1 queue on
    /// one vCPU, then 2 queues on two), same fields as `probe.bench.blk`.
    pub bench_blk_mq: Option<BlkBench>,
    /// `probe.bench.blkmq.work`: hash passes over each block read in
    /// bench.blkmq (0: none).
    pub bench_blk_mq_work: u32,
    /// `probe.cow=<inside sector>,<outside sector>`: the `blk.cow` check's
    /// sectors on disk 0 (in and out of its copy-on-write range).
    pub cow: Option<(u64, u64)>,
    /// `probe.vsock.cid`: the guest CID the VMM was configured with.
    pub vsock_cid: Option<u64>,
    /// `probe.vsock.transfer=<port>,<bytes>`: the echo transfer.
    pub vsock_transfer: Option<(u32, u64)>,
    /// `probe.vsock.closed_port`: a host port nobody listens on.
    pub vsock_closed_port: Option<u32>,
    /// `probe.vsock.listen`: the guest port the host connects to.
    pub vsock_listen: Option<VsockListen>,
    /// `probe.vsock.flood`: the flood check's size and host handshake.
    pub vsock_flood: Option<VsockFlood>,
    /// `probe.bench.vsock`: the vsock benchmark to run.
    pub bench_vsock: Option<VsockBench>,
    /// `probe.net.ip`: the probe's IPv4 address and prefix length.
    pub net_ip: Option<([u8; 4], u8)>,
    /// `probe.net.ip6`: the probe's IPv6 address.
    pub net_ip6: Option<[u8; 16]>,
    /// `probe.net.peer`: the host's IPv4 address.
    pub net_peer: Option<[u8; 4]>,
    /// `probe.net.serve_ms`: how long the responder answers.
    pub net_serve_ms: Option<u64>,
    /// `probe.bench.net`: the network benchmark to run.
    pub bench_net: Option<NetBench>,
    /// `virtio_mmio.device=` values, as given.
    pub virtio_mmio: Vec<&'a str>,
    /// Malformed probe options (reported by the boot.cmdline check).
    pub errors: Vec<String>,
}

impl<'a> Options<'a> {
    /// Parses whitespace-separated tokens.
    pub fn parse(cmdline: &'a str) -> Self {
        let mut opts = Options::default();
        for token in cmdline.split_ascii_whitespace() {
            let (key, value) = match token.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (token, None),
            };
            match (key, value) {
                ("probe.idle", None) => opts.idle = true,
                ("probe.interactive", None) => opts.interactive = true,
                ("probe.heartbeat", Some(v)) => {
                    opts.heartbeat_ms = opts.number(token, v).and_then(|ms| {
                        (1..=HEARTBEAT_MAX_MS)
                            .contains(&ms)
                            .then_some(ms)
                            .or_else(|| {
                                opts.errors.push(format!(
                                    "{token:?}: want milliseconds, 1..={HEARTBEAT_MAX_MS}"
                                ));
                                None
                            })
                    })
                }
                ("probe.check", Some(v)) => {
                    opts.checks.extend(v.split(',').filter(|p| !p.is_empty()))
                }
                ("probe.mem", Some(v)) => opts.mem = opts.number(token, v),
                ("probe.cpus", Some(v)) => {
                    opts.cpus = opts.number(token, v).and_then(|n| opts.u32(token, n))
                }
                ("probe.topo", Some(v)) => opts.topo = opts.topology(token, v),
                ("probe.echo", Some(v)) => opts.echo = Some(v),
                ("probe.numa", Some(v)) => {
                    opts.numa = opts.number(token, v).and_then(|n| opts.u32(token, n))
                }
                ("probe.boot", Some("success")) => opts.boot_marker = Some(BootMarker::Success),
                ("probe.boot", Some("failure")) => opts.boot_marker = Some(BootMarker::Failure),
                ("probe.end", Some("poweroff")) => opts.end = End::PowerOff,
                ("probe.end", Some("reset")) => opts.end = End::Reset,
                ("probe.end", Some("triple-fault")) => opts.end = End::TripleFault,
                ("probe.end", Some("acpi-reset")) => opts.end = End::AcpiReset,
                ("probe.blk", Some(v)) => {
                    opts.blk = opts.number(token, v).and_then(|n| opts.u32(token, n))
                }
                ("probe.bench.blk", Some(v)) => opts.bench_blk = opts.blk_bench(token, v),
                ("probe.bench.blkmq", Some(v)) => opts.bench_blk_mq = opts.blk_bench(token, v),
                ("probe.bench.blkmq.work", Some(v)) => {
                    opts.bench_blk_mq_work = opts
                        .number(token, v)
                        .and_then(|n| opts.u32(token, n))
                        .unwrap_or(0)
                }
                ("probe.cow", Some(v)) => {
                    opts.cow = match v.split_once(',') {
                        Some((a, b)) => opts.number(token, a).zip(opts.number(token, b)),
                        None => {
                            opts.errors
                                .push(format!("{token:?}: want <sector>,<sector>"));
                            None
                        }
                    }
                }
                ("probe.vsock.cid", Some(v)) => opts.vsock_cid = opts.number(token, v),
                ("probe.vsock.transfer", Some(v)) => {
                    opts.vsock_transfer = opts.vsock_transfer(token, v)
                }
                ("probe.vsock.closed_port", Some(v)) => {
                    opts.vsock_closed_port = opts.number(token, v).and_then(|n| opts.u32(token, n))
                }
                ("probe.vsock.listen", Some(v)) => opts.vsock_listen = opts.vsock_listen(token, v),
                ("probe.vsock.flood", Some(v)) => opts.vsock_flood = opts.vsock_flood(token, v),
                ("probe.bench.vsock", Some(v)) => opts.bench_vsock = opts.vsock_bench(token, v),
                ("probe.net.ip", Some(v)) => {
                    opts.net_ip = v
                        .split_once('/')
                        .and_then(|(a, p)| Some((parse_ipv4(a)?, p.parse::<u8>().ok()?)))
                        .filter(|&(_, p)| (1..=32).contains(&p))
                        .or_else(|| {
                            opts.errors
                                .push(format!("{token:?}: want <a.b.c.d>/<prefix 1..=32>"));
                            None
                        })
                }
                ("probe.net.ip6", Some(v)) => {
                    opts.net_ip6 = parse_ipv6(v).or_else(|| {
                        opts.errors.push(format!("{token:?}: want an IPv6 address"));
                        None
                    })
                }
                ("probe.net.peer", Some(v)) => {
                    opts.net_peer = parse_ipv4(v).or_else(|| {
                        opts.errors.push(format!("{token:?}: want <a.b.c.d>"));
                        None
                    })
                }
                ("probe.net.serve_ms", Some(v)) => {
                    opts.net_serve_ms = opts
                        .number(token, v)
                        .filter(|&ms| ms <= HEARTBEAT_MAX_MS)
                        .or_else(|| {
                            opts.errors
                                .push(format!("{token:?}: want 0..={HEARTBEAT_MAX_MS} ms"));
                            None
                        })
                }
                ("probe.bench.net", Some(v)) => opts.bench_net = opts.net_bench(token, v),
                ("virtio_mmio.device", Some(v)) => opts.virtio_mmio.push(v),
                _ if key.starts_with("probe.") => opts
                    .errors
                    .push(format!("unknown or malformed option {token:?}")),
                _ => {}
            }
        }
        if opts.heartbeat_ms.is_some() && !opts.interactive {
            opts.errors
                .push(String::from("probe.heartbeat without probe.interactive"));
        }
        if opts.idle && opts.interactive {
            opts.errors.push(String::from(
                "probe.idle and probe.interactive together (interactive wins)",
            ));
        }
        opts
    }

    /// Whether check `name` is selected by `probe.check`.
    pub fn selects(&self, name: &str) -> bool {
        self.checks.is_empty() || self.checks.iter().any(|p| name.starts_with(p))
    }

    fn number(&mut self, token: &str, value: &str) -> Option<u64> {
        let parsed = match value.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => value.parse(),
        };
        parsed
            .map_err(|_| self.errors.push(format!("bad number in {token:?}")))
            .ok()
    }

    fn u32(&mut self, token: &str, n: u64) -> Option<u32> {
        u32::try_from(n)
            .map_err(|_| self.errors.push(format!("{token:?} out of range")))
            .ok()
    }

    fn blk_bench(&mut self, token: &str, value: &str) -> Option<BlkBench> {
        let mut parts = value.split(',');
        let kind = match parts.next() {
            Some("read") => Some(BenchKind::Read),
            Some("write") => Some(BenchKind::Write),
            Some("randread") => Some(BenchKind::RandRead),
            Some("randwrite") => Some(BenchKind::RandWrite),
            _ => None,
        };
        let mut number = || parts.next().and_then(|p| p.parse::<u64>().ok());
        let (block_size, queue_depth, count) = (number(), number(), number());
        match (kind, block_size, queue_depth, count, parts.next()) {
            (Some(kind), Some(bs), Some(qd), Some(count), None)
                if bs > 0
                    && bs % 512 == 0
                    && bs <= 1 << 30
                    && (1..=1024).contains(&qd)
                    && count > 0 =>
            {
                Some(BlkBench {
                    kind,
                    block_size: bs as u32,
                    queue_depth: qd as u32,
                    count,
                })
            }
            _ => {
                self.errors.push(format!(
                    "{token:?}: want <read|write|randread|randwrite>,<block size: multiple of 512>,<queue depth 1..=1024>,<count >= 1>"
                ));
                None
            }
        }
    }

    fn vsock_transfer(&mut self, token: &str, value: &str) -> Option<(u32, u64)> {
        let mut parts = value.split(',');
        let port = parts.next().and_then(|p| p.parse::<u32>().ok());
        let bytes = parts.next().and_then(|p| p.parse::<u64>().ok());
        match (port, bytes, parts.next()) {
            (Some(port), Some(bytes), None) if bytes > 0 => Some((port, bytes)),
            _ => {
                self.errors
                    .push(format!("{token:?}: want <port>,<bytes >= 1>"));
                None
            }
        }
    }

    fn vsock_listen(&mut self, token: &str, value: &str) -> Option<VsockListen> {
        let parsed = number_and_flag(value, "refused").and_then(|(port, refused)| {
            let port = u32::try_from(port).ok()?;
            Some(VsockListen { port, refused })
        });
        if parsed.is_none() {
            self.errors
                .push(format!("{token:?}: want <port>[,refused]"));
        }
        parsed
    }

    fn vsock_flood(&mut self, token: &str, value: &str) -> Option<VsockFlood> {
        let parsed = number_and_flag(value, "sync")
            .filter(|&(packets, _)| packets > 0)
            .map(|(packets, sync)| VsockFlood { packets, sync });
        if parsed.is_none() {
            self.errors
                .push(format!("{token:?}: want <packets >= 1>[,sync]"));
        }
        parsed
    }

    fn vsock_bench(&mut self, token: &str, value: &str) -> Option<VsockBench> {
        let mut parts = value.split(',');
        let mut number = || parts.next().and_then(|p| p.parse::<u64>().ok());
        let (port, size, total) = (number(), number(), number());
        let dir = match parts.next() {
            Some("tx") => Some(VsockDir::Tx),
            Some("rx") => Some(VsockDir::Rx),
            _ => None,
        };
        match (port, size, total, dir, parts.next()) {
            (Some(port), Some(size), Some(total), Some(dir), None)
                if port <= u64::from(u32::MAX)
                    && (1..=VSOCK_MAX_WRITE).contains(&size)
                    && total > 0 =>
            {
                Some(VsockBench {
                    port: port as u32,
                    write_size: size as u32,
                    total,
                    dir,
                })
            }
            _ => {
                self.errors.push(format!(
                    "{token:?}: want <port>,<write size 1..={VSOCK_MAX_WRITE}>,<total bytes >= 1>,<tx|rx>"
                ));
                None
            }
        }
    }

    fn net_bench(&mut self, token: &str, value: &str) -> Option<NetBench> {
        let mut parts = value.split(',');
        let dir = match parts.next() {
            Some("tx") => Some(VsockDir::Tx),
            Some("rx") => Some(VsockDir::Rx),
            _ => None,
        };
        let mut number = || parts.next().and_then(|p| p.parse::<u64>().ok());
        let (frame, count) = (number(), number());
        match (dir, frame, count, parts.next()) {
            (Some(dir), Some(frame), Some(count), None)
                if (NET_MIN_FRAME..=65535).contains(&frame) && count > 0 =>
            {
                Some(NetBench {
                    dir,
                    frame: frame as u32,
                    count,
                })
            }
            _ => {
                self.errors.push(format!(
                    "{token:?}: want <tx|rx>,<frame bytes {NET_MIN_FRAME}..=65535>,<count >= 1>"
                ));
                None
            }
        }
    }

    fn topology(&mut self, token: &str, value: &str) -> Option<Topology> {
        let mut parts = value
            .split(',')
            .map(|p| p.parse::<u32>().ok().filter(|&n| (1..=256).contains(&n)));
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(Some(sockets)), Some(Some(cores)), Some(Some(threads)), None) => Some(Topology {
                sockets,
                cores,
                threads,
            }),
            _ => {
                self.errors.push(format!(
                    "{token:?}: want <sockets>,<cores>,<threads>, each 1..=256"
                ));
                None
            }
        }
    }
}

/// Smallest benchmark frame: Ethernet, IPv4 and UDP headers.
pub const NET_MIN_FRAME: u64 = 14 + 20 + 8;

/// `<decimal number>[,<flag>]`: the number and whether the flag is there.
fn number_and_flag(value: &str, flag: &str) -> Option<(u64, bool)> {
    let (number, with_flag) = match value.split_once(',') {
        None => (value, false),
        Some((n, f)) if f == flag => (n, true),
        Some(_) => return None,
    };
    Some((number.parse().ok()?, with_flag))
}

/// `a.b.c.d` (decimal octets).
pub fn parse_ipv4(text: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = text.split('.');
    for o in &mut out {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *o = p.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// An IPv6 address in the usual text form (groups of up to 4 hex digits,
/// at most one `::`; no embedded IPv4).
pub fn parse_ipv6(text: &str) -> Option<[u8; 16]> {
    fn groups(part: &str) -> Option<Vec<u16>> {
        if part.is_empty() {
            return Some(Vec::new());
        }
        part.split(':')
            .map(|g| {
                if g.is_empty() || g.len() > 4 {
                    None
                } else {
                    u16::from_str_radix(g, 16).ok()
                }
            })
            .collect()
    }
    let words: Vec<u16> = match text.split_once("::") {
        Some((head, tail)) => {
            let (h, t) = (groups(head)?, groups(tail)?);
            if h.len() + t.len() > 7 || tail.contains("::") {
                return None;
            }
            let mut w = h;
            w.resize(8 - t.len(), 0);
            w.extend(t);
            w
        }
        None => groups(text)?,
    };
    if words.len() != 8 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        out[2 * i..2 * i + 2].copy_from_slice(&w.to_be_bytes());
    }
    Some(out)
}
