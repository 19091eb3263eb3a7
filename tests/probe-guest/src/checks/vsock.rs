//! vsock.* checks and the vsock benchmark (`bench.vsock`), on the first
//! virtio-vsock device announced on the command line or, on a PCI machine,
//! the first virtio-vsock function (the same checks over either transport).
//!
//! The host side (the test) provides:
//! - port 19090, HostOS's agent pattern: reads a request to end of stream,
//!   answers one line and closes;
//! - with `probe.vsock.transfer=<port>,<bytes>`: an echo server on `<port>`;
//! - with `probe.vsock.listen=<port>`: a host process that connects to the
//!   guest's `<port>` through the device socket (`CONNECT <port>\n`);
//! - with `probe.bench.vsock=<port>,...`: a benchmark server on `<port>`
//!   (protocol in [`bench`]).
//!
//! The checks first use virtio-drivers' `VirtIOSocket` (`vsockdev`), then
//! reset the device and send malformed packets on hand-built rings
//! (`rawvsock`), then, with `probe.vsock.flood=<packets>[,sync]`, flood it
//! (`vsock_flood`).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use virtio_drivers::transport::DeviceType;

use super::Context;
use crate::arch::tsc::{self, Deadline};
use crate::cmdline::{VsockBench, VsockDir, VSOCK_MAX_WRITE};
use crate::fail;
use crate::println;
use crate::rawblk::Wait;
use crate::rawvsock::{
    Hdr, RawVsock, Received, HDR_LEN, HOST_CID, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, TYPE_STREAM,
};
use crate::report::{CheckResult, Report};
use crate::virtio::VirtioDevice;
use crate::vsockdev::{Conn, SendError, State, Vsock};

/// HostOS's agent port: request to end of stream, one answer, close.
pub const AGENT_PORT: u32 = 19090;
/// Default port nobody listens on.
const DEFAULT_CLOSED_PORT: u32 = 19999;
/// Time for a REQUEST to be answered.
const CONNECT_US: u64 = 2_000_000;
/// Time without progress before a transfer fails.
pub(super) const IO_US: u64 = 10_000_000;
/// Time for the host to connect to a listening port.
pub(super) const LISTEN_US: u64 = 30_000_000;
/// With host connections refused: how long the probe listens anyway.
const REFUSED_US: u64 = 5_000_000;
/// Credit granted per connection (the device's receive window).
const SMALL_CREDIT: u32 = 16 * 1024;
const TRANSFER_CREDIT: u32 = 64 * 1024;
const BENCH_CREDIT: u32 = 256 * 1024;
/// Transfer: bytes per packet sent.
const TRANSFER_CHUNK: usize = 32 * 1024;
/// Transmit benchmark: how long the host may take to close after the
/// half-close before the probe shuts down both ways.
const HALF_CLOSE_US: u64 = 1_000_000;
/// Raw checks: time for the device to return a transmit chain or answer.
const RAW_US: u64 = 1_000_000;
/// Raw checks: how long to watch for an answer that must not come.
const QUIET_US: u64 = 300_000;
/// Raw checks: first local port.
const RAW_FIRST_PORT: u32 = 60000;

/// The transfer pattern: byte `i` of the stream.
pub fn transfer_pattern(i: u64) -> u8 {
    (i.wrapping_mul(31).wrapping_add(7)) as u8
}

/// FNV-1a, 32 bits: the transfer's checksum line.
fn fnv1a(mut h: u32, bytes: &[u8]) -> u32 {
    for &b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}
const FNV_INIT: u32 = 0x811c_9dc5;

/// `bytes` as printable ASCII (others as `?`), at most `max` characters.
pub(super) fn printable(bytes: &[u8], max: usize) -> String {
    bytes
        .iter()
        .take(max)
        .map(|&b| {
            if (0x20..=0x7e).contains(&b) {
                char::from(b)
            } else {
                '?'
            }
        })
        .collect()
}

/// The first virtio-vsock device (announced, or on PCI).
fn vsock_device(ctx: &Context<'_>) -> Option<VirtioDevice> {
    ctx.virtio_devices(DeviceType::Socket).into_iter().next()
}

/// Runs the vsock checks: when a vsock device is announced or a vsock
/// option is given, and some vsock check is selected.
pub fn run(ctx: &Context<'_>, report: &mut Report<'_>) {
    let o = ctx.options;
    let asked = o.vsock_cid.is_some()
        || o.vsock_transfer.is_some()
        || o.vsock_closed_port.is_some()
        || o.vsock_listen.is_some()
        || o.vsock_flood.is_some()
        || o.bench_vsock.is_some();
    let want_bench = o.bench_vsock.is_some() && report.selects("bench.vsock");
    if !report.selects_prefix("vsock.") && !want_bench {
        return;
    }
    let dev = vsock_device(ctx);
    if dev.is_none() && !asked {
        return;
    }
    let Some(dev) = dev else {
        report.check("vsock.identify", || {
            Err(String::from("no virtio-vsock device (ID 19) announced"))
        });
        if want_bench {
            report.check("bench.vsock", || {
                Err(String::from("no virtio-vsock device"))
            });
        }
        return;
    };
    driver_checks(ctx, report, || Vsock::open(&dev), want_bench);
    if report.selects_prefix("vsock.malformed.") {
        malformed(report, &dev);
    }
    match o.vsock_flood {
        Some(cfg) => report.check("vsock.flood", || super::vsock_flood::flood(&dev, cfg)),
        None if !o.checks.is_empty() && report.selects("vsock.flood") => {
            println!("probe: vsock.flood skipped: no probe.vsock.flood=<packets>[,sync]");
        }
        None => {}
    }
}

fn driver_checks(
    ctx: &Context<'_>,
    report: &mut Report<'_>,
    open: impl FnOnce() -> Result<Vsock, String>,
    want_bench: bool,
) {
    let o = ctx.options;
    let names = [
        "vsock.identify",
        "vsock.request_reply",
        "vsock.half_close",
        "vsock.transfer",
        "vsock.rst",
        "vsock.listen",
    ];
    if !want_bench && !names.iter().any(|n| report.selects(n)) {
        return;
    }
    let mut vs = match open() {
        Ok(v) => v,
        Err(e) => {
            report.check("vsock.identify", || Err(e.clone()));
            if want_bench {
                report.check("bench.vsock", || Err(format!("driver init: {e}")));
            }
            return;
        }
    };

    report.check("vsock.identify", || {
        println!("probe: vsock features {:#x}", vs.offered);
        println!("probe: vsock cid={}", vs.cid);
        if let Some(want) = o.vsock_cid {
            if vs.cid != want {
                fail!(
                    "the device's guest_cid is {}, probe.vsock.cid={want}",
                    vs.cid
                );
            }
        }
        if vs.cid < 3 || vs.cid > u64::from(u32::MAX) {
            fail!("guest_cid {} is reserved or out of range", vs.cid);
        }
        Ok(())
    });

    if report.selects("vsock.request_reply") || report.selects("vsock.half_close") {
        let t0 = tsc::rdtsc();
        let exchange = request_reply(&mut vs);
        // Connect, request, half-close, reply to EOF, close: the HostOS
        // agent's round trip, timed in the guest (keel-bench vsock uses it).
        if let (Ok(_), Some(ns)) = (&exchange, tsc::cycles_to_ns(tsc::rdtsc() - t0)) {
            println!("probe: vsock request_reply ns={ns}");
        }
        report.check("vsock.request_reply", || {
            let x = exchange.as_ref().map_err(Clone::clone)?;
            println!("probe: vsock reply {}", printable(&x.reply, 200));
            if x.reply.is_empty() {
                fail!("the host's answer was empty");
            }
            if let Some(why) = &x.overrun {
                fail!("{why}");
            }
            Ok(())
        });
        report.check("vsock.half_close", || {
            let x = exchange
                .as_ref()
                .map_err(|e| format!("request_reply failed: {e}"))?;
            println!(
                "probe: vsock half-close: SHUTDOWN(SEND) sent with {} bytes received, then {} bytes and {}",
                x.before_shutdown,
                x.reply.len(),
                if x.ended_by_shutdown { "the host's SHUTDOWN" } else { "RST" }
            );
            if x.before_shutdown != 0 {
                fail!("{} bytes arrived before the request was complete", x.before_shutdown);
            }
            if x.reply.is_empty() {
                fail!("nothing received after SHUTDOWN(SEND)");
            }
            if !x.ended_by_shutdown {
                fail!("the stream ended with RST, not SHUTDOWN");
            }
            Ok(())
        });
    }

    match o.vsock_transfer {
        Some((port, bytes)) => report.check("vsock.transfer", || transfer(&mut vs, port, bytes)),
        None if !o.checks.is_empty() && report.selects("vsock.transfer") => {
            println!("probe: vsock.transfer skipped: no probe.vsock.transfer=<port>,<bytes>");
        }
        None => {}
    }

    report.check("vsock.rst", || {
        rst(&mut vs, o.vsock_closed_port.unwrap_or(DEFAULT_CLOSED_PORT))
    });

    if report.selects("vsock.listen") {
        match o.vsock_listen {
            None => {
                if !o.checks.is_empty() {
                    println!("probe: vsock.listen skipped: no probe.vsock.listen=<port>");
                }
            }
            Some(l) if l.refused => {
                vs.listen(l.port);
                println!("probe: vsock listening on port {}", l.port);
                match vs.accept(REFUSED_US, SMALL_CREDIT) {
                    Ok(None) => println!(
                        "probe: vsock.listen skipped: host-initiated connections are refused (probe.vsock.listen=...,refused); none arrived in {} s",
                        REFUSED_US / 1_000_000
                    ),
                    Ok(Some(mut c)) => {
                        let _ = vs.close(&mut c);
                        report.check("vsock.listen", || {
                            Err(format!(
                                "host port {} connected to port {} although host connections are refused",
                                c.peer_port(),
                                l.port
                            ))
                        });
                    }
                    Err(e) => report.check("vsock.listen", || Err(e)),
                }
            }
            Some(l) => report.check("vsock.listen", || listen(&mut vs, l.port)),
        }
    }

    if want_bench {
        if let Some(cfg) = o.bench_vsock {
            report.check("bench.vsock", || bench(&mut vs, cfg));
        }
    }
    if vs.stray != 0 || vs.refused_requests != 0 {
        println!(
            "probe: vsock {} packets for no open connection, {} connection requests refused",
            vs.stray, vs.refused_requests
        );
    }
}

/// What the request/reply exchange saw.
struct Exchange {
    reply: Vec<u8>,
    /// Bytes received before the probe's SHUTDOWN(SEND).
    before_shutdown: usize,
    /// The host's end of stream came as SHUTDOWN (not RST).
    ended_by_shutdown: bool,
    overrun: Option<String>,
}

/// Connects to the agent port, sends the request, shuts down the send
/// side, reads the answer to end of stream, then resets the connection
/// (the RST that completes a clean close).
fn request_reply(vs: &mut Vsock) -> Result<Exchange, String> {
    let mut c = vs.connect(AGENT_PORT, SMALL_CREDIT, CONNECT_US)?;
    let request = format!(
        "{{\"sender_cid\": {}, \"message\": \"GetVsockProtocol\"}}",
        vs.cid
    );
    let result = (|| {
        vs.send_all(&mut c, request.as_bytes(), request.len(), IO_US)?;
        let before_shutdown = c.available();
        vs.shutdown_send(&mut c)?;
        let reply = vs.read_to_eof(&mut c, 4096, IO_US)?;
        Ok(Exchange {
            reply,
            before_shutdown,
            ended_by_shutdown: c.peer_shutdown && c.state == State::Open,
            overrun: c.overrun.clone(),
        })
    })();
    vs.close(&mut c)?;
    result
}

/// vsock.transfer: `bytes` of the pattern to an echo server, read back
/// while sending, compared.
fn transfer(vs: &mut Vsock, port: u32, bytes: u64) -> CheckResult {
    let mut c = vs.connect(port, TRANSFER_CREDIT, CONNECT_US)?;
    let result = transfer_on(vs, &mut c, port, bytes);
    let _ = vs.close(&mut c);
    result
}

fn transfer_on(vs: &mut Vsock, c: &mut Conn, port: u32, bytes: u64) -> CheckResult {
    let mut out = alloc::vec![0u8; TRANSFER_CHUNK];
    let mut inb = alloc::vec![0u8; 16 * 1024];
    let (mut sent, mut got) = (0u64, 0u64);
    let mut pending = 0usize; // bytes of `out` filled for the next send
    let mut shut = false;
    let mut credit_stalls = 0u64;
    let mut stalled = false;
    let mut sum = FNV_INIT;
    let mut deadline = Deadline::after_us(IO_US);
    while got < bytes || !c.at_eof() {
        let mut progress = false;
        if sent < bytes {
            if pending == 0 {
                pending = (bytes - sent).min(TRANSFER_CHUNK as u64) as usize;
                for (k, b) in out[..pending].iter_mut().enumerate() {
                    *b = transfer_pattern(sent + k as u64);
                }
            }
            match vs.try_send(c, &out[..pending]) {
                Ok(()) => {
                    sent += pending as u64;
                    pending = 0;
                    stalled = false;
                    progress = true;
                }
                Err(SendError::NoCredit) => {
                    if !stalled {
                        credit_stalls += 1;
                        stalled = true;
                    }
                }
                Err(SendError::Failed(e)) => fail!("after {sent} bytes sent, {got} received: {e}"),
            }
        } else if !shut {
            vs.shutdown_send(c)?;
            shut = true;
        }
        for _ in 0..8 {
            if !vs.poll(&mut [&mut *c])? {
                break;
            }
            progress = true;
        }
        loop {
            let n = vs.read(c, &mut inb)?;
            if n == 0 {
                break;
            }
            progress = true;
            if got + n as u64 > bytes {
                fail!("the echo returned more than the {bytes} bytes sent");
            }
            if let Some(k) = (0..n).find(|&k| inb[k] != transfer_pattern(got + k as u64)) {
                fail!(
                    "byte {} of the echo is {:#04x}, want {:#04x}",
                    got + k as u64,
                    inb[k],
                    transfer_pattern(got + k as u64)
                );
            }
            sum = fnv1a(sum, &inb[..n]);
            got += n as u64;
        }
        if let Some(why) = &c.overrun {
            fail!("{why}");
        }
        if c.state == State::Reset {
            fail!("the device reset the connection after {sent} bytes sent, {got} received");
        }
        if c.at_eof() && got < bytes {
            fail!("the stream ended after {got} of {bytes} bytes echoed");
        }
        if progress {
            deadline = Deadline::after_us(IO_US);
        } else if deadline.passed() {
            fail!(
                "no progress for {} s: {sent} of {bytes} bytes sent, {got} received",
                IO_US / 1_000_000
            );
        } else {
            core::hint::spin_loop();
        }
    }
    println!(
        "probe: vsock transfer port={port} bytes={bytes} fnv1a={sum:#010x} credit_stalls={credit_stalls} credit_requests={} packets_in={}",
        c.credit_requests,
        c.packets.0
    );
    Ok(())
}

/// vsock.rst: a REQUEST to a port nobody listens on is answered with RST.
fn rst(vs: &mut Vsock, port: u32) -> CheckResult {
    let mut c = vs.connect_start(port, SMALL_CREDIT)?;
    let deadline = Deadline::after_us(CONNECT_US);
    while c.state == State::Connecting && !deadline.passed() {
        if !vs.poll(&mut [&mut c])? {
            core::hint::spin_loop();
        }
    }
    match c.state {
        State::Reset => {
            println!("probe: vsock connect to port {port}: RST");
            Ok(())
        }
        State::Open => {
            let _ = vs.close(&mut c);
            fail!("port {port} accepted the connection (does someone listen on it?)")
        }
        _ => fail!(
            "no answer to a REQUEST to port {port} within {} s",
            CONNECT_US / 1_000_000
        ),
    }
}

/// vsock.listen: the host connects to guest port `port`, sends a line; the
/// probe answers `guest got: <line>\n` and closes.
fn listen(vs: &mut Vsock, port: u32) -> CheckResult {
    vs.listen(port);
    println!("probe: vsock listening on port {port}");
    let mut c = vs.accept(LISTEN_US, SMALL_CREDIT)?.ok_or_else(|| {
        format!(
            "no connection from the host to port {port} within {} s",
            LISTEN_US / 1_000_000
        )
    })?;
    println!("probe: vsock accepted host port {}", c.peer_port());
    let result = (|| {
        let mut line = Vec::new();
        let mut b = [0u8; 256];
        let mut deadline = Deadline::after_us(IO_US);
        while !line.contains(&b'\n') {
            let n = vs.read(&mut c, &mut b)?;
            if n > 0 {
                line.extend_from_slice(&b[..n]);
                if line.len() > 1024 {
                    fail!("no line end in the first 1024 bytes");
                }
                deadline = Deadline::after_us(IO_US);
                continue;
            }
            if c.at_eof() {
                fail!("the stream ended before a line ({} bytes)", line.len());
            }
            if !vs.poll(&mut [&mut c])? {
                if deadline.passed() {
                    fail!("no line from the host within {} s", IO_US / 1_000_000);
                }
                core::hint::spin_loop();
            }
        }
        let end = line.iter().position(|&x| x == b'\n').unwrap_or(line.len());
        let text = printable(&line[..end], 200);
        println!("probe: vsock listen got {text}");
        let answer = format!("guest got: {text}\n");
        vs.send_all(&mut c, answer.as_bytes(), answer.len(), IO_US)?;
        // Full shutdown: the device answers RST.
        vs.shutdown(&mut c)?;
        let deadline = Deadline::after_us(CONNECT_US);
        while c.state == State::Open && !deadline.passed() {
            if !vs.poll(&mut [&mut c])? {
                core::hint::spin_loop();
            }
        }
        if c.state != State::Reset {
            fail!(
                "no RST within {} s after SHUTDOWN(SEND|RECEIVE)",
                CONNECT_US / 1_000_000
            );
        }
        Ok(())
    })();
    let _ = vs.close(&mut c);
    result
}

/// bench.vsock: connects to the benchmark port. tx: the probe sends
/// `total` bytes in packets of `write size`, then shuts down its send side;
/// the host reads to end of stream and closes, and the time runs until the
/// probe sees that close. rx: the host sends `total` bytes and closes; the
/// time runs from the connection's RESPONSE to the end of stream. Either
/// way the probe then resets the connection.
fn bench(vs: &mut Vsock, cfg: VsockBench) -> CheckResult {
    let mut c = vs.connect(cfg.port, BENCH_CREDIT, CONNECT_US)?;
    let result = bench_on(vs, &mut c, cfg);
    let _ = vs.close(&mut c);
    result
}

fn bench_on(vs: &mut Vsock, c: &mut Conn, cfg: VsockBench) -> CheckResult {
    let tsc_rate = tsc::khz();
    let size = cfg.write_size as usize;
    let mut credit_stalls = 0u64;
    let (start, end, moved) = match cfg.dir {
        VsockDir::Tx => {
            let data = alloc::vec![0x5au8; size];
            let start = tsc::rdtsc();
            let mut sent = 0u64;
            let mut stalled = false;
            let mut deadline = Deadline::after_us(IO_US);
            while sent < cfg.total {
                let n = (cfg.total - sent).min(size as u64) as usize;
                match vs.try_send(c, &data[..n]) {
                    Ok(()) => {
                        sent += n as u64;
                        stalled = false;
                        deadline = Deadline::after_us(IO_US);
                    }
                    Err(SendError::NoCredit) => {
                        if !stalled {
                            credit_stalls += 1;
                            stalled = true;
                        }
                        if !vs.poll(&mut [&mut *c])? && deadline.passed() {
                            fail!("no credit for {} s after {sent} bytes", IO_US / 1_000_000);
                        }
                    }
                    Err(SendError::Failed(e)) => fail!("after {sent} bytes: {e}"),
                }
            }
            // The end: the device reports every byte forwarded to the host
            // socket (fwd_cnt), which any conforming device does; then the
            // connection is closed, outside the timed part.
            vs.wait_forwarded(c, IO_US)?;
            let end = tsc::rdtsc();
            bench_tx_close(vs, c, sent)?;
            (start, end, sent)
        }
        VsockDir::Rx => {
            let mut buf = alloc::vec![0u8; VSOCK_MAX_WRITE as usize];
            let start = tsc::rdtsc();
            let mut got = 0u64;
            let mut deadline = Deadline::after_us(IO_US);
            loop {
                let n = vs.read(c, &mut buf)?;
                if n > 0 {
                    got += n as u64;
                    deadline = Deadline::after_us(IO_US);
                    continue;
                }
                if c.at_eof() {
                    break;
                }
                if !vs.poll(&mut [&mut *c])? && deadline.passed() {
                    fail!("no data for {} s after {got} bytes", IO_US / 1_000_000);
                }
            }
            if let Some(why) = &c.overrun {
                fail!("{why}");
            }
            if got != cfg.total || c.state == State::Reset {
                fail!(
                    "received {got} of {} bytes, then {}",
                    cfg.total,
                    if c.state == State::Reset {
                        "RST"
                    } else {
                        "end of stream"
                    }
                );
            }
            (start, tsc::rdtsc(), got)
        }
    };
    let cycles = end.wrapping_sub(start);
    let (dir, size, total) = (cfg.dir.name(), cfg.write_size, cfg.total);
    match tsc_rate {
        Some((khz, source)) => {
            println!(
                "probe: bench info: tsc {khz} kHz from {}, {} packets in, {credit_stalls} credit stalls, {} credit requests, {moved} bytes",
                source.name(),
                c.packets.0,
                c.credit_requests
            );
            println!(
                "probe: bench vsock {dir} size={size} bytes={total} ns={}",
                tsc::cycles_to_ns(cycles).unwrap_or(0)
            );
            Ok(())
        }
        None => {
            println!("probe: bench vsock {dir} size={size} bytes={total} cycles={cycles}");
            fail!("no TSC rate (cpuid 0x40000010, 0x15, 0x16, kvmclock all failed)");
        }
    }
}

/// Ends the transmit benchmark's connection once all `sent` bytes are
/// forwarded: half-close and read to the host's end of stream, as the host
/// closes once it has read everything; a device that does not pass the
/// half-close on to the host socket (Firecracker) leaves the host waiting,
/// so after [`HALF_CLOSE_US`] the probe shuts down both ways, which such a
/// device answers with RST and by closing the host socket.
fn bench_tx_close(vs: &mut Vsock, c: &mut Conn, sent: u64) -> CheckResult {
    vs.shutdown_send(c)?;
    match vs.read_to_eof(c, 64, HALF_CLOSE_US) {
        Ok(answer) => {
            if c.state == State::Reset {
                fail!("the device reset the connection after all {sent} bytes were sent");
            }
            if !answer.is_empty() {
                println!(
                    "probe: bench info: the host sent {} bytes back",
                    answer.len()
                );
            }
        }
        Err(_) if c.state == State::Open => {
            println!(
                "probe: bench info: no end of stream {} ms after the half-close; shutting down both ways",
                HALF_CLOSE_US / 1000
            );
            vs.shutdown(c)?;
            vs.read_to_eof(c, 64, IO_US)?;
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

/// The malformed packets, each followed by a connection to the agent port.
#[derive(Clone, Copy)]
enum Case {
    WrongSrcCid,
    UnknownOp,
    RwNoConnection,
    LenPastDescriptor,
    WrongType,
    ShortHeader,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::WrongSrcCid => "wrong_src_cid",
            Case::UnknownOp => "unknown_op",
            Case::RwNoConnection => "rw_no_connection",
            Case::LenPastDescriptor => "len_past_descriptor",
            Case::WrongType => "wrong_type",
            Case::ShortHeader => "short_header",
        }
    }
}

/// Transmit page layout: header at 0, payload at 64.
const TX_HDR: usize = 0;
const TX_DATA: usize = 64;

struct RawPorts(u32);

impl RawPorts {
    fn next(&mut self) -> u32 {
        self.0 += 1;
        self.0
    }
}

fn malformed(report: &mut Report<'_>, dev: &VirtioDevice) {
    let mut raw = match RawVsock::new(dev) {
        Ok(r) => r,
        Err(e) => {
            report.check("vsock.malformed.setup", || {
                Err(format!("raw queue setup: {e}"))
            });
            return;
        }
    };
    let mut ports = RawPorts(RAW_FIRST_PORT);
    for case in [
        Case::WrongSrcCid,
        Case::UnknownOp,
        Case::RwNoConnection,
        Case::LenPastDescriptor,
        Case::WrongType,
        Case::ShortHeader,
    ] {
        report.check(&format!("vsock.malformed.{}", case.name()), || {
            if !raw.clean {
                raw.init().map_err(|e| format!("re-initializing: {e}"))?;
            }
            malformed_one(&mut raw, &mut ports, case)
        });
    }
}

/// A header from the guest to the host.
pub(super) fn hdr(raw: &RawVsock, op: u16, src_port: u32, dst_port: u32, len: u32) -> Hdr {
    Hdr {
        src_cid: raw.cid,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 4096,
        fwd_cnt: 0,
    }
}

/// Sends `h` (its first `hdr_len` bytes) and, if given, a payload
/// descriptor of `desc_len` bytes holding `payload`; waits for the
/// device to return the chain.
pub(super) fn raw_send(
    raw: &mut RawVsock,
    h: &Hdr,
    hdr_len: usize,
    payload: Option<(&[u8], u32)>,
) -> Result<(), String> {
    raw.put_tx(TX_HDR, &h.to_bytes());
    let mut segs = alloc::vec![(raw.tx_addr(TX_HDR), hdr_len as u32)];
    if let Some((bytes, desc_len)) = payload {
        raw.put_tx(TX_DATA, bytes);
        segs.push((raw.tx_addr(TX_DATA), desc_len));
    }
    match raw.send(&segs, RAW_US) {
        Wait::Done(_) => Ok(()),
        Wait::Timeout => Err(format!(
            "the device did not return the transmit chain within {} ms",
            RAW_US / 1000
        )),
        Wait::NeedsReset => Err(String::from(
            "the device set DEVICE_NEEDS_RESET instead of returning the transmit chain",
        )),
    }
}

fn op_name(op: u16) -> String {
    match op {
        1 => String::from("REQUEST"),
        2 => String::from("RESPONSE"),
        3 => String::from("RST"),
        4 => String::from("SHUTDOWN"),
        5 => String::from("RW"),
        6 => String::from("CREDIT_UPDATE"),
        7 => String::from("CREDIT_REQUEST"),
        other => format!("op {other}"),
    }
}

pub(super) fn describe(got: &[Received]) -> String {
    if got.is_empty() {
        return String::from("nothing");
    }
    got.iter()
        .map(|r| {
            let h = r.hdr;
            format!(
                "{} {}:{}->{}:{} len {}",
                op_name(h.op),
                { h.src_cid },
                { h.src_port },
                { h.dst_cid },
                { h.dst_port },
                r.used_len
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether `r` is the host's packet `op` for the connection (local port
/// `local`, host port `port`).
pub(super) fn is(r: &Hdr, op: u16, local: u32, port: u32) -> bool {
    r.op == op && r.src_port == port && r.dst_port == local && r.src_cid == HOST_CID
}

/// Opens a connection to host port `port` on the raw queues: REQUEST,
/// then a RESPONSE within RAW_US. Returns the local port.
fn raw_open(raw: &mut RawVsock, ports: &mut RawPorts, port: u32) -> Result<u32, String> {
    let local = ports.next();
    let h = hdr(raw, OP_REQUEST, local, port, 0);
    raw_send(raw, &h, HDR_LEN, None)?;
    let got = raw.receive(RAW_US, |r| {
        (r.op == OP_RESPONSE || r.op == OP_RST) && r.dst_port == local
    });
    match got.last() {
        Some(r) if is(&r.hdr, OP_RESPONSE, local, port) => Ok(local),
        _ => Err(format!(
            "REQUEST from port {local} to port {port}: got {}, want RESPONSE",
            describe(&got)
        )),
    }
}

/// Resets a raw connection (no answer expected).
fn raw_rst(raw: &mut RawVsock, local: u32, port: u32) -> Result<(), String> {
    let h = hdr(raw, OP_RST, local, port, 0);
    raw_send(raw, &h, HDR_LEN, None)
}

fn malformed_one(raw: &mut RawVsock, ports: &mut RawPorts, case: Case) -> CheckResult {
    let name = case.name();
    let verdict = malformed_case(raw, ports, case);
    match &verdict {
        Ok(what) => println!("probe: vsock malformed {name}: {what}"),
        Err(e) => println!("probe: vsock malformed {name}: {e}"),
    }
    if !raw.clean {
        raw.init().map_err(|e| format!("re-initializing: {e}"))?;
    }
    // The follow-up: a normal connection to the agent port.
    let follow = raw_open(raw, ports, AGENT_PORT).and_then(|local| raw_rst(raw, local, AGENT_PORT));
    match (verdict, follow) {
        (Ok(_), Ok(())) => Ok(()),
        (Ok(_), Err(f)) => Err(format!("a normal REQUEST afterwards: {f}")),
        (Err(v), Ok(())) => Err(format!("{v}; a normal REQUEST afterwards got RESPONSE")),
        (Err(v), Err(f)) => Err(format!("{v}; a normal REQUEST afterwards: {f}")),
    }
}

/// Sends the bad packet `h` on the open connection from `local` to the
/// agent port, then a valid 4-byte RW on it. The device must stay
/// consistent: if it answered the bad packet with RST, the connection must
/// be gone (the valid RW gets RST too); if it did not answer, the
/// connection is still open (no answer to the valid RW). The connection is
/// reset afterwards either way.
fn consistent_after(
    raw: &mut RawVsock,
    local: u32,
    what: &str,
    h: &Hdr,
    payload: Option<(&[u8], u32)>,
) -> Result<String, String> {
    raw_send(raw, h, HDR_LEN, payload)?;
    let first = raw.receive(QUIET_US, |r| r.dst_port == local && r.op == OP_RST);
    let reset = first.iter().any(|r| is(&r.hdr, OP_RST, local, AGENT_PORT));
    let valid = hdr(raw, OP_RW, local, AGENT_PORT, 4);
    raw_send(raw, &valid, HDR_LEN, Some((b"ping", 4)))?;
    let second = raw.receive(QUIET_US, |r| r.dst_port == local && r.op == OP_RST);
    let reset_again = second.iter().any(|r| is(&r.hdr, OP_RST, local, AGENT_PORT));
    raw_rst(raw, local, AGENT_PORT)?;
    let seen = format!(
        "{what}: {}; a valid RW afterwards: {}",
        describe(&first),
        describe(&second)
    );
    if reset && !reset_again {
        return Err(format!(
            "{seen}: the device answered RST but kept the connection (the valid RW went to the host)"
        ));
    }
    Ok(seen)
}

/// Sends the malformed packet; `Ok` describes what came back.
fn malformed_case(raw: &mut RawVsock, ports: &mut RawPorts, case: Case) -> Result<String, String> {
    match case {
        Case::WrongSrcCid => {
            // A REQUEST to a listening port, from someone else's CID: must
            // be dropped without an answer (and without a connection).
            let local = ports.next();
            let mut h = hdr(raw, OP_REQUEST, local, AGENT_PORT, 0);
            h.src_cid = raw.cid + 100;
            raw_send(raw, &h, HDR_LEN, None)?;
            let got = raw.receive(QUIET_US, |_| false);
            if !got.is_empty() {
                return Err(format!(
                    "a REQUEST with src_cid {} (guest is {}) was answered: {}",
                    { h.src_cid },
                    raw.cid,
                    describe(&got)
                ));
            }
            Ok(format!("src_cid {}: no answer", { h.src_cid }))
        }
        Case::UnknownOp => {
            // Op 0x55 on an open connection: the device resets it.
            let local = raw_open(raw, ports, AGENT_PORT)?;
            let h = hdr(raw, 0x55, local, AGENT_PORT, 0);
            raw_send(raw, &h, HDR_LEN, None)?;
            let got = raw.receive(RAW_US, |r| r.dst_port == local && r.op == OP_RST);
            if !got.iter().any(|r| is(&r.hdr, OP_RST, local, AGENT_PORT)) {
                let _ = raw_rst(raw, local, AGENT_PORT);
                return Err(format!(
                    "op 0x55 on an open connection: got {}, want RST",
                    describe(&got)
                ));
            }
            Ok(format!("op 0x55: {}", describe(&got)))
        }
        Case::RwNoConnection => {
            let local = ports.next();
            let h = hdr(raw, OP_RW, local, AGENT_PORT, 4);
            raw_send(raw, &h, HDR_LEN, Some((b"ping", 4)))?;
            let got = raw.receive(RAW_US, |r| r.dst_port == local && r.op == OP_RST);
            if !got.iter().any(|r| is(&r.hdr, OP_RST, local, AGENT_PORT)) {
                return Err(format!(
                    "RW on a connection that does not exist: got {}, want RST",
                    describe(&got)
                ));
            }
            Ok(format!("RW without a connection: {}", describe(&got)))
        }
        Case::LenPastDescriptor => {
            // An RW header saying 4096 bytes, with a 16-byte payload
            // descriptor: dropped (an RST is fine too).
            let local = raw_open(raw, ports, AGENT_PORT)?;
            let h = hdr(raw, OP_RW, local, AGENT_PORT, 4096);
            let what = "len 4096 in a 16-byte descriptor";
            consistent_after(raw, local, what, &h, Some((&[0x42; 16], 16)))
        }
        Case::WrongType => {
            // An RW of type 2 (SEQPACKET, not negotiated) on an open stream
            // connection: dropped or reset.
            let local = raw_open(raw, ports, AGENT_PORT)?;
            let mut h = hdr(raw, OP_RW, local, AGENT_PORT, 4);
            h.type_ = 2;
            consistent_after(raw, local, "RW of type 2", &h, Some((b"type", 4)))
        }
        Case::ShortHeader => {
            // A 20-byte chain: less than a header; dropped, no answer.
            let local = ports.next();
            let h = hdr(raw, OP_REQUEST, local, AGENT_PORT, 0);
            raw_send(raw, &h, 20, None)?;
            let got = raw.receive(QUIET_US, |_| false);
            if !got.is_empty() {
                return Err(format!("a 20-byte packet was answered: {}", describe(&got)));
            }
            Ok(String::from("20-byte chain: no answer"))
        }
    }
}
