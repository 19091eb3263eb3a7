//! blk.* checks: every virtio-blk device announced on the command line, in
//! announcement order (disk i = the i-th virtio-blk device), or on a PCI
//! machine every virtio-blk function, by slot; and the benchmark
//! (`bench.blk`). The same checks over either transport, raw ones included.
//!
//! Disk layout the checks use (absolute byte offsets):
//! - [1 MiB, 1 MiB + 64 KiB): filled by the host with
//!   H(o) = ((o >> 12) as u8).wrapping_mul(7) ^ (o as u8); read and compared.
//! - [4 MiB, 4 MiB + 256 KiB): written with
//!   G(o) = ((o >> 9) as u8) ^ (o as u8) ^ 0xa5 (writable disks), read back;
//!   the host checks it after the VM ends.
//! - [8 MiB, 8 MiB + 64 KiB): WRITE_ZEROES, read back as zeroes.
//! - [12 MiB, 13 MiB): DISCARD.
//!
//! `tools/blk_pattern.py` prepares and verifies disk images the same way.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use virtio_drivers::device::blk::{BlkReq, BlkResp, RespStatus};
use virtio_drivers::transport::DeviceType;
use virtio_drivers::Error as VirtioError;

use super::Context;
use crate::arch::tsc;
use crate::blkdev::{status_text, Disk, SECTOR};
use crate::cmdline::BlkBench;
use crate::fail;
use crate::println;
use crate::rawblk::{
    self, RawBlk, Seg, Wait, F_DISCARD, F_FLUSH, F_RO, F_WRITE_ZEROES, S_IOERR, S_OK, S_UNSUPP,
};
use crate::report::{CheckResult, Report};
use crate::scratch::Scratch;
use crate::virtio::VirtioDevice;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// Host-pattern region.
const HOST_AT: u64 = MIB;
const HOST_LEN: u64 = 64 * KIB;
/// Guest-pattern region.
const GUEST_AT: u64 = 4 * MIB;
const GUEST_LEN: u64 = 256 * KIB;
/// WRITE_ZEROES region.
const ZERO_AT: u64 = 8 * MIB;
const ZERO_LEN: u64 = 64 * KIB;
/// DISCARD region.
const DISCARD_AT: u64 = 12 * MIB;
const DISCARD_LEN: u64 = MIB;
/// Time allowed for each raw request (malformed or not).
const RAW_US: u64 = 1_000_000;
/// The benchmark spans at most this much of the disk.
const BENCH_SPAN: u64 = 1 << 30;
/// The benchmark gives up when nothing completes for this long.
const BENCH_STALL_US: u64 = 10_000_000;
/// virtio-drivers' queue size: at most this many requests in flight.
const DRIVER_QUEUE: usize = 16;

/// The host pattern: byte at absolute disk offset `o`.
pub fn host_pattern(o: u64) -> u8 {
    ((o >> 12) as u8).wrapping_mul(7) ^ (o as u8)
}

/// The guest pattern: byte at absolute disk offset `o`.
pub fn guest_pattern(o: u64) -> u8 {
    ((o >> 9) as u8) ^ (o as u8) ^ 0xa5
}

/// The virtio-blk devices, in announcement (or slot) order.
fn blk_devices(ctx: &Context<'_>) -> Vec<VirtioDevice> {
    ctx.virtio_devices(DeviceType::Block)
}

/// Runs the blk.* checks, and `bench.blk` right after disk 0's
/// virtio-drivers checks (the same driver instance, no reset between).
/// Returns whether the benchmark ran.
pub fn run(ctx: &Context<'_>, report: &mut Report<'_>) -> bool {
    let disks = blk_devices(ctx);
    let mut malformed_done = false;
    let mut bench_done = false;
    for (i, dev) in disks.iter().enumerate() {
        disk_checks(ctx, report, i, dev, &mut malformed_done, &mut bench_done);
    }
    if let (Some((inside, outside)), Some(dev)) = (ctx.options.cow, disks.first()) {
        report.check("blk.cow", || cow(ctx, dev, inside, outside));
    }
    if let Some(want) = ctx.options.blk {
        report.check("blk.count", || {
            if disks.len() != want as usize {
                fail!("{} virtio-blk devices found, probe.blk={want}", disks.len());
            }
            Ok(())
        });
    }
    bench_done
}

/// First mismatch between `buf` (disk bytes from `at`) and `pattern`.
pub(super) fn compare(buf: &[u8], at: u64, pattern: impl Fn(u64) -> u8) -> CheckResult {
    let mut bad = buf
        .iter()
        .enumerate()
        .filter(|&(i, &b)| b != pattern(at + i as u64));
    if let Some((i, &b)) = bad.next() {
        let o = at + i as u64;
        fail!(
            "byte at disk offset {o:#x} is {b:#04x}, want {:#04x} ({} bytes differ)",
            pattern(o),
            1 + bad.count()
        );
    }
    Ok(())
}

pub(super) fn expect_ok(status: RespStatus, what: &str) -> CheckResult {
    if status != RespStatus::OK {
        fail!("{what}: status {}", status_text(status));
    }
    Ok(())
}

/// virtio-drivers waits for GET_ID and FLUSH without a time limit: before
/// either, a bounded read of sector 0 makes sure the queue answers at all.
pub(super) fn answers(disk: &mut Disk, scratch: &Scratch) -> CheckResult {
    let sector0 = scratch.take(SECTOR as usize)?;
    let status = disk
        .read(0, sector0)
        .map_err(|e| format!("the queue does not answer: {e}"))?;
    expect_ok(status, "read of sector 0")
}

fn need_capacity(disk_sectors: u64, end: u64) -> CheckResult {
    if disk_sectors * SECTOR < end {
        fail!(
            "disk has {} bytes, the check needs {end}",
            disk_sectors * SECTOR
        );
    }
    Ok(())
}

fn disk_checks(
    ctx: &Context<'_>,
    report: &mut Report<'_>,
    i: usize,
    dev: &VirtioDevice,
    malformed_done: &mut bool,
    bench_done: &mut bool,
) {
    let name = |what: &str| format!("blk.{i}.{what}");
    if !report.selects_prefix(&format!("blk.{i}."))
        && (*malformed_done || !report.selects_prefix("blk.malformed."))
    {
        return;
    }
    let scratch = ctx.start_info().and_then(Scratch::new);
    let scratch = match scratch {
        Ok(s) => s,
        Err(e) => {
            report.check(&name("identify"), || {
                Err(format!("no scratch RAM for buffers: {e}"))
            });
            return;
        }
    };
    let mut disk = match Disk::open(dev) {
        Ok(d) => d,
        Err(e) => {
            report.check(&name("identify"), || Err(e));
            return;
        }
    };
    let capacity = disk.capacity;
    let readonly = disk.readonly;
    let offered = disk.offered;

    report.check(&name("identify"), || {
        println!("probe: blk{i} features {offered:#x}");
        answers(&mut disk, &scratch)?;
        let serial = disk.serial().unwrap_or_else(|why| {
            println!("probe: blk{i} no serial: {why}");
            String::from("-")
        });
        println!(
            "probe: blk{i} capacity={capacity} ro={} serial={serial}",
            u8::from(readonly)
        );
        if capacity == 0 {
            fail!("capacity 0");
        }
        Ok(())
    });

    report.check(&name("host_pattern"), || {
        need_capacity(capacity, HOST_AT + HOST_LEN)?;
        let buf = scratch.take(HOST_LEN as usize)?;
        let status = disk.read(HOST_AT / SECTOR, buf)?;
        expect_ok(status, "read")?;
        compare(buf, HOST_AT, host_pattern)
    });

    if !readonly {
        report.check(&name("write_read"), || {
            write_read(&mut disk, &scratch, capacity)
        });
        report.check(&name("flush"), || {
            if offered & F_FLUSH == 0 {
                fail!("the device does not offer VIRTIO_BLK_F_FLUSH");
            }
            answers(&mut disk, &scratch)?;
            disk.flush()?;
            println!("probe: blk{i} flushed");
            Ok(())
        });
    } else {
        report.check(&name("readonly"), || {
            need_capacity(capacity, GUEST_AT + SECTOR)?;
            let buf = scratch.take(SECTOR as usize)?;
            buf.iter_mut()
                .enumerate()
                .for_each(|(k, b)| *b = guest_pattern(GUEST_AT + k as u64));
            let status = disk.write(GUEST_AT / SECTOR, buf)?;
            println!(
                "probe: blk{i} write to read-only disk: status {}",
                status_text(status)
            );
            if status != RespStatus::IO_ERR {
                fail!(
                    "write of one sector at {GUEST_AT:#x}: status {}, want 1 (IOERR)",
                    status_text(status)
                );
            }
            Ok(())
        });
    }
    if i == 0 {
        if let Some(cfg) = ctx.options.bench_blk {
            report.check("bench.blk", || {
                if cfg.kind.writes() && readonly {
                    fail!("disk 0 is read-only");
                }
                run_bench(&mut disk, &scratch, cfg)
            });
            *bench_done = true;
        }
    }
    // Done with virtio-drivers on this disk: the raw queue takes over.
    drop(disk);

    if readonly {
        return;
    }
    let want_zd = report.selects(&name("write_zeroes")) || report.selects(&name("discard"));
    let want_malformed = !*malformed_done && report.selects_prefix("blk.malformed.");
    if !want_zd && !want_malformed {
        *malformed_done = true;
        return;
    }
    let mut raw = match RawBlk::new(dev, F_WRITE_ZEROES | F_DISCARD | F_RO) {
        Ok(r) => r,
        Err(e) => {
            for what in ["write_zeroes", "discard"] {
                report.check(&name(what), || Err(format!("raw queue setup: {e}")));
            }
            return;
        }
    };
    if offered & (F_WRITE_ZEROES | F_DISCARD) != F_WRITE_ZEROES | F_DISCARD {
        let missing = match (offered & F_WRITE_ZEROES != 0, offered & F_DISCARD != 0) {
            (false, false) => "write-zeroes/discard",
            (false, true) => "write-zeroes",
            _ => "discard",
        };
        println!("probe: blk{i} no {missing}");
    }
    if offered & F_WRITE_ZEROES != 0 {
        report.check(&name("write_zeroes"), || {
            write_zeroes(&mut raw, &scratch, i)
        });
    }
    if offered & F_DISCARD != 0 {
        report.check(&name("discard"), || discard(&mut raw, i));
    }
    if want_malformed {
        *malformed_done = true;
        malformed(&mut raw, report);
    }
}

/// blk.<i>.write_read: G at [4 MiB, 4 MiB + 256 KiB) in one 128 KiB
/// request, 31 of 4 KiB and 8 of one sector; read back in 64 KiB requests.
pub(super) fn write_read(disk: &mut Disk, scratch: &Scratch, capacity: u64) -> CheckResult {
    need_capacity(capacity, GUEST_AT + GUEST_LEN)?;
    let data = scratch.take(GUEST_LEN as usize)?;
    for (k, b) in data.iter_mut().enumerate() {
        *b = guest_pattern(GUEST_AT + k as u64);
    }
    let mut pieces: Vec<(u64, u64)> = Vec::new();
    pieces.push((0, 128 * KIB));
    let mut at = 128 * KIB;
    while at < GUEST_LEN - 4 * KIB {
        pieces.push((at, 4 * KIB));
        at += 4 * KIB;
    }
    while at < GUEST_LEN {
        pieces.push((at, SECTOR));
        at += SECTOR;
    }
    for &(off, len) in &pieces {
        let status = disk.write(
            (GUEST_AT + off) / SECTOR,
            &data[off as usize..(off + len) as usize],
        )?;
        expect_ok(
            status,
            &format!("write of {len} bytes at {:#x}", GUEST_AT + off),
        )?;
    }
    let back = scratch.take(GUEST_LEN as usize)?;
    for off in (0..GUEST_LEN).step_by(64 * KIB as usize) {
        let status = disk.read(
            (GUEST_AT + off) / SECTOR,
            &mut back[off as usize..(off + 64 * KIB) as usize],
        )?;
        expect_ok(status, &format!("read of 64 KiB at {:#x}", GUEST_AT + off))?;
    }
    compare(back, GUEST_AT, guest_pattern)
}

/// blk.cow (`probe.cow=<in>,<out>`, disk 0 with a copy-on-write range of
/// at most 64 KiB): 8 KiB of G written at sector `in` (inside the range)
/// and at `out` (outside) read back; 128 KiB more inside fail with IOERR
/// (the overlay is full) and leave the first write readable. The host
/// checks that `out` reached the disk and the range did not.
fn cow(ctx: &Context<'_>, dev: &VirtioDevice, inside: u64, outside: u64) -> CheckResult {
    let scratch = ctx.start_info().and_then(Scratch::new)?;
    let mut disk = Disk::open(dev)?;
    const LEN: u64 = 8 * KIB;
    for sector in [inside, outside] {
        let at = sector * SECTOR;
        let data = scratch.take(LEN as usize)?;
        data.iter_mut()
            .enumerate()
            .for_each(|(k, b)| *b = guest_pattern(at + k as u64));
        expect_ok(
            disk.write(sector, data)?,
            &format!("write at sector {sector}"),
        )?;
        let back = scratch.take(LEN as usize)?;
        expect_ok(
            disk.read(sector, back)?,
            &format!("read at sector {sector}"),
        )?;
        compare(back, at, guest_pattern)?;
    }
    let big = scratch.take(128 * KIB as usize)?;
    big.fill(0xee);
    let status = disk.write(inside + LEN / SECTOR, big)?;
    println!(
        "probe: cow write past the limit: status {}",
        status_text(status)
    );
    if status != RespStatus::IO_ERR {
        fail!(
            "128 KiB past the overlay's limit: status {}, want IOERR",
            status_text(status)
        );
    }
    let back = scratch.take(LEN as usize)?;
    expect_ok(disk.read(inside, back)?, "read after the refused write")?;
    compare(back, inside * SECTOR, guest_pattern)
}

/// Config space: max_discard_sectors, max_write_zeroes_sectors.
const CFG_MAX_DISCARD_SECTORS: usize = 36;
const CFG_MAX_WRITE_ZEROES_SECTORS: usize = 48;

/// Sends `kind` (WRITE_ZEROES or DISCARD) for [at, at + len), in pieces of
/// at most `max` sectors (0: no limit), one segment each.
fn ranged(raw: &mut RawBlk, kind: u32, at: u64, len: u64, max: u32, flags: u32) -> CheckResult {
    let per = if max == 0 { u32::MAX } else { max };
    let mut sector = at / SECTOR;
    let end = (at + len) / SECTOR;
    while sector < end {
        let n = (end - sector).min(u64::from(per)) as u32;
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&sector.to_le_bytes());
        seg[8..12].copy_from_slice(&n.to_le_bytes());
        seg[12..16].copy_from_slice(&flags.to_le_bytes());
        raw.put(128, &seg);
        let data = Seg {
            addr: raw.buf(128),
            len: 16,
            write: false,
        };
        let (status, _) = raw.request(0, 0, kind, 0, Some(data), RAW_US)?;
        if status != S_OK {
            fail!("{n} sectors at sector {sector}: status {status}");
        }
        sector += u64::from(n);
    }
    Ok(())
}

/// blk.<i>.write_zeroes: WRITE_ZEROES on [8 MiB, 8 MiB + 64 KiB), read
/// back as zeroes.
fn write_zeroes(raw: &mut RawBlk, scratch: &Scratch, i: usize) -> CheckResult {
    need_capacity(raw.capacity, ZERO_AT + ZERO_LEN)?;
    let max = raw.config_u32(CFG_MAX_WRITE_ZEROES_SECTORS).unwrap_or(0);
    println!("probe: blk{i} max_write_zeroes_sectors={max}");
    ranged(raw, rawblk::T_WRITE_ZEROES, ZERO_AT, ZERO_LEN, max, 0)?;
    let buf = scratch.take(ZERO_LEN as usize)?;
    buf.fill(0x5a);
    let data = Seg {
        addr: buf.as_ptr() as u64,
        len: ZERO_LEN as u32,
        write: true,
    };
    let (status, _) = raw.request(0, 0, rawblk::T_IN, ZERO_AT / SECTOR, Some(data), RAW_US)?;
    if status != S_OK {
        fail!("read back: status {status}");
    }
    // The device wrote `buf` behind the compiler's back: read it volatile.
    let nonzero = (0..buf.len())
        // SAFETY: k < buf.len().
        .filter(|&k| unsafe { buf.as_ptr().add(k).read_volatile() } != 0)
        .collect::<Vec<_>>();
    if let Some(&k) = nonzero.first() {
        fail!(
            "read back: byte at disk offset {:#x} is not zero ({} bytes not zero)",
            ZERO_AT + k as u64,
            nonzero.len()
        );
    }
    Ok(())
}

/// blk.<i>.discard: DISCARD on [12 MiB, 13 MiB) completes OK.
fn discard(raw: &mut RawBlk, i: usize) -> CheckResult {
    need_capacity(raw.capacity, DISCARD_AT + DISCARD_LEN)?;
    let max = raw.config_u32(CFG_MAX_DISCARD_SECTORS).unwrap_or(0);
    println!("probe: blk{i} max_discard_sectors={max}");
    ranged(raw, rawblk::T_DISCARD, DISCARD_AT, DISCARD_LEN, max, 0)
}

/// The malformed requests, each followed by a valid read.
#[derive(Clone, Copy)]
enum Case {
    PastEnd,
    UnknownType,
    BadAddress,
    WrongDirection,
    ShortStatus,
    HeaderOnly,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::PastEnd => "past_end",
            Case::UnknownType => "unknown_type",
            Case::BadAddress => "bad_address",
            Case::WrongDirection => "wrong_direction",
            Case::ShortStatus => "short_status",
            Case::HeaderOnly => "header_only",
        }
    }
}

/// Far outside any guest RAM.
const BAD_ADDRESS: u64 = 0x7f00_0000_0000;
/// Small-buffer layout: malformed header/status, follow-up header/status,
/// their data sectors.
const BAD_HDR: usize = 0;
const GOOD_HDR: usize = 64;
const BAD_DATA: usize = 1024;
const GOOD_DATA: usize = 2048;
/// Descriptors: the malformed chain from 0, the follow-up from 8.
const BAD_DESC: u16 = 0;
const GOOD_DESC: u16 = 8;
/// What the status byte holds before the device writes it.
const SENTINEL: u8 = 0xee;

fn malformed(raw: &mut RawBlk, report: &mut Report<'_>) {
    for bad in [
        Case::PastEnd,
        Case::UnknownType,
        Case::BadAddress,
        Case::WrongDirection,
        Case::ShortStatus,
        Case::HeaderOnly,
    ] {
        report.check(&format!("blk.malformed.{}", bad.name()), || {
            // Each case starts from a queue with nothing out.
            if !raw.clean {
                raw.reinit().map_err(|e| format!("re-initializing: {e}"))?;
            }
            malformed_one(raw, bad)
        });
    }
}

/// Sends one malformed request and the follow-up read.
fn malformed_one(raw: &mut RawBlk, bad: Case) -> CheckResult {
    let name = bad.name();
    let sector = match bad {
        Case::PastEnd => raw.capacity,
        _ => 0,
    };
    let kind = match bad {
        Case::UnknownType => 0xff,
        _ => rawblk::T_IN,
    };
    raw.put_header(BAD_HDR, kind, sector);
    raw.put(BAD_HDR + 16, &[SENTINEL]);
    let header = Seg {
        addr: raw.buf(BAD_HDR),
        len: 16,
        write: false,
    };
    let data = Seg {
        addr: raw.buf(BAD_DATA),
        len: SECTOR as u32,
        write: true,
    };
    let status = Seg {
        addr: raw.buf(BAD_HDR + 16),
        len: 1,
        write: true,
    };
    let chain: Vec<Seg> = match bad {
        Case::PastEnd => alloc::vec![header, data, status],
        Case::UnknownType => alloc::vec![header, status],
        Case::BadAddress => alloc::vec![
            header,
            Seg {
                addr: BAD_ADDRESS,
                ..data
            },
            status
        ],
        Case::WrongDirection => alloc::vec![
            header,
            Seg {
                write: false,
                ..data
            },
            status
        ],
        Case::ShortStatus => alloc::vec![header, data, Seg { len: 0, ..status }],
        Case::HeaderOnly => alloc::vec![header],
    };
    let head = raw.submit(BAD_DESC, &chain);
    let waited = raw.wait(head, RAW_US);
    let got = raw.get(BAD_HDR + 16);
    let got_text = if got == SENTINEL {
        String::from("not written")
    } else {
        format!("{got}")
    };
    let verdict: CheckResult = match waited {
        Wait::Done(len) => {
            println!("probe: blk malformed {name}: status {got_text} used.len {len}");
            match bad {
                Case::PastEnd | Case::BadAddress | Case::WrongDirection if got != S_IOERR => Err(
                    format!("status {got_text}, want {S_IOERR} (IOERR); used.len {len}"),
                ),
                Case::UnknownType if got != S_UNSUPP => Err(format!(
                    "status {got_text}, want {S_UNSUPP} (UNSUPP); used.len {len}"
                )),
                Case::ShortStatus if got != SENTINEL => Err(format!(
                    "the device wrote {got} through a zero-length status descriptor"
                )),
                Case::ShortStatus if len > SECTOR as u32 => Err(format!(
                    "used.len {len} is more than the {SECTOR} writable bytes offered"
                )),
                Case::HeaderOnly if len != 0 => Err(format!(
                    "used.len {len} for a chain with no writable buffer"
                )),
                _ => Ok(()),
            }
        }
        Wait::NeedsReset => {
            println!(
                "probe: blk malformed {name}: status {got_text}, device set DEVICE_NEEDS_RESET (status {:#x})",
                raw.status()
            );
            match bad {
                // Accepted (documented): giving up on the queue is what the
                // spec allows a device that cannot complete a chain.
                Case::BadAddress => {
                    raw.reinit()
                        .map_err(|e| format!("re-initializing: {e}"))?;
                    Ok(())
                }
                _ => Err(format!(
                    "device set DEVICE_NEEDS_RESET instead of completing the request (status {:#x})",
                    raw.status()
                )),
            }
        }
        Wait::Timeout => {
            println!("probe: blk malformed {name}: status {got_text}, no completion");
            Err(format!(
                "no completion within {} ms (device status {:#x})",
                RAW_US / 1000,
                raw.status()
            ))
        }
    };
    // The follow-up: a valid 512-byte read at sector 0.
    let data = Seg {
        addr: raw.buf(GOOD_DATA),
        len: SECTOR as u32,
        write: true,
    };
    let follow = raw.request(GOOD_DESC, GOOD_HDR, rawblk::T_IN, 0, Some(data), RAW_US);
    let follow_err = match follow {
        Ok((S_OK, _)) => None,
        Ok((s, len)) => Some(format!("status {s} used.len {len}")),
        Err(e) => Some(e),
    };
    match (verdict, follow_err) {
        (Ok(()), None) => Ok(()),
        (Ok(()), Some(f)) => Err(format!("valid read at sector 0 afterwards: {f}")),
        (Err(v), None) => Err(format!("{v}; valid read afterwards OK")),
        (Err(v), Some(f)) => Err(format!("{v}; valid read at sector 0 afterwards: {f}")),
    }
}

/// bench.blk: `probe.bench.blk` on disk 0, when the blk checks did not
/// run it already (none of disk 0's was selected).
pub fn bench(ctx: &Context<'_>, report: &mut Report<'_>) {
    let Some(cfg) = ctx.options.bench_blk else {
        return;
    };
    report.check("bench.blk", || {
        let dev = *blk_devices(ctx).first().ok_or("no virtio-blk device")?;
        let scratch = Scratch::new(ctx.start_info()?)?;
        let mut disk = Disk::open(&dev)?;
        if cfg.kind.writes() && disk.readonly {
            fail!("disk 0 is read-only");
        }
        run_bench(&mut disk, &scratch, cfg)
    });
}

struct Slot<'b> {
    req: BlkReq,
    resp: BlkResp,
    buf: &'b mut [u8],
    token: Option<u16>,
}

fn run_bench(disk: &mut Disk, scratch: &Scratch, cfg: BlkBench) -> CheckResult {
    let bs = u64::from(cfg.block_size);
    let span = (disk.capacity * SECTOR).min(BENCH_SPAN);
    let blocks = span / bs;
    if blocks == 0 {
        fail!("block size {bs} is larger than the disk");
    }
    let slots_n = (cfg.queue_depth as usize).min(DRIVER_QUEUE);
    if slots_n < cfg.queue_depth as usize {
        println!(
            "probe: bench info: queue depth capped at {DRIVER_QUEUE} (virtio-drivers queue size)"
        );
    }
    let mut slots: Vec<Slot<'_>> = Vec::with_capacity(slots_n);
    for _ in 0..slots_n {
        let buf = scratch.take(bs as usize)?;
        buf.fill(0x5a);
        slots.push(Slot {
            req: BlkReq::default(),
            resp: BlkResp::default(),
            buf,
            token: None,
        });
    }
    let result = bench_loop(disk, &mut slots, blocks, cfg);
    if result.is_err() {
        // Requests may still be out: the device lets go of the slots
        // before they are freed.
        disk.abandon("the benchmark failed");
    }
    result
}

fn bench_loop(disk: &mut Disk, slots: &mut [Slot<'_>], blocks: u64, cfg: BlkBench) -> CheckResult {
    let bs = u64::from(cfg.block_size);
    let slots_n = slots.len();
    let tsc_rate = tsc::khz();
    let mut free: Vec<usize> = (0..slots_n).rev().collect();
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let (mut submitted, mut completed, mut errors) = (0u64, 0u64, 0u64);
    let (mut in_flight, mut max_in_flight) = (0usize, 0usize);
    let stall = tsc::cycles_at_least(BENCH_STALL_US);
    let blk = disk.driver();
    let start = tsc::rdtsc();
    let mut progress = start;
    while completed < cfg.count {
        while submitted < cfg.count {
            let Some(&s) = free.last() else { break };
            let block = if cfg.kind.random() {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % blocks
            } else {
                submitted % blocks
            };
            let sector = (block * bs / SECTOR) as usize;
            let slot = &mut slots[s];
            // SAFETY: the slot's request, response and buffer are left alone
            // until its token comes back; on a stall the check returns and
            // the device is reset (the disk drops) before the slots do.
            let added = unsafe {
                if cfg.kind.writes() {
                    blk.write_blocks_nb(sector, &mut slot.req, slot.buf, &mut slot.resp)
                } else {
                    blk.read_blocks_nb(sector, &mut slot.req, slot.buf, &mut slot.resp)
                }
            };
            match added {
                Ok(token) => {
                    slot.token = Some(token);
                    free.pop();
                    submitted += 1;
                    in_flight += 1;
                    max_in_flight = max_in_flight.max(in_flight);
                }
                Err(VirtioError::QueueFull) if in_flight > 0 => break,
                Err(e) => fail!("request {submitted}: {e}"),
            }
        }
        match blk.peek_used() {
            Some(token) => {
                let Some(s) = slots.iter().position(|x| x.token == Some(token)) else {
                    fail!("the device returned chain {token}, which is not out");
                };
                let slot = &mut slots[s];
                // SAFETY: the buffers submitted with `token`.
                let result = unsafe {
                    if cfg.kind.writes() {
                        blk.complete_write_blocks(token, &slot.req, slot.buf, &mut slot.resp)
                    } else {
                        blk.complete_read_blocks(token, &slot.req, slot.buf, &mut slot.resp)
                    }
                };
                if result.is_err() {
                    errors += 1;
                }
                slot.token = None;
                free.push(s);
                completed += 1;
                in_flight -= 1;
                progress = tsc::rdtsc();
            }
            None => {
                if tsc::rdtsc().wrapping_sub(progress) > stall {
                    fail!(
                        "stalled: {completed} of {submitted} submitted requests completed, none for {} s",
                        BENCH_STALL_US / 1_000_000
                    );
                }
                core::hint::spin_loop();
            }
        }
    }
    let cycles = tsc::rdtsc().wrapping_sub(start);
    let (kind, qd, n) = (cfg.kind.name(), cfg.queue_depth, cfg.count);
    match tsc_rate {
        Some((khz, source)) => {
            println!(
                "probe: bench info: tsc {khz} kHz from {}, max in flight {max_in_flight}, {errors} errors",
                source.name()
            );
            println!(
                "probe: bench blk {kind} bs={bs} qd={qd} n={n} ns={}",
                tsc::cycles_to_ns(cycles).unwrap_or(0)
            );
        }
        None => {
            println!("probe: bench blk {kind} bs={bs} qd={qd} n={n} cycles={cycles}");
            fail!("no TSC rate (cpuid 0x40000010, 0x15, 0x16, kvmclock all failed)");
        }
    }
    if errors != 0 {
        fail!("{errors} of {n} requests completed with a status other than OK");
    }
    Ok(())
}
