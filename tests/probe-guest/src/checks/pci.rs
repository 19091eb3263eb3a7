//! pci.* checks, on a PCI machine only (ACPI has an MCFG):
//!
//! - `pci.enumerate`: bus 0 through ECAM; prints one
//!   `probe: pci 00:SS.0 VVVV:DDDD rev R class CCSSPP bar0 ADDR` line per
//!   function (the host compares the slots and device IDs with its
//!   configuration); every function but the host bridge (00:00.0) must be a
//!   modern virtio device (vendor 0x1af4, device 0x1041-0x107f, revision 1).
//! - `pci.blk.host_pattern`, `pci.blk.write_read`: disk 0 (the first
//!   virtio-blk function) through virtio-drivers' virtio-pci transport, the
//!   same checks and disk layout as `blk.0.*` (see `blk.rs`).
//! - The three interrupt checks below drive disk 0 through the hand-built
//!   driver without EVENT_IDX, so that every completion is signalled.
//! - `pci.isr`: MSI-X off (INTx), a completed request sets the ISR's
//!   queue bit and reading the ISR clears it.
//! - `pci.intx_disable`: MSI-X off, the command register's INTx disable
//!   bit set: it reads back, and a completed request still sets the ISR's
//!   queue bit and the status register's interrupt bit (reading the ISR
//!   clears both). Whether the line stays down is not visible here (the
//!   probe does not program the I/O APIC); Keel's unit tests cover it.
//! - `pci.msix`: disk 0's queue on MSI-X vector 0 (vector 46 at this
//!   CPU's local APIC): with the vector masked a completed request sets
//!   its pending bit in the PBA and reaches no APIC; unmasking delivers
//!   it (the local APIC's IRR has the vector, and the probe takes the
//!   interrupt); unmasked, the next request is delivered at once.
//! - `pci.blk.mq`: disk 0 with two request queues (VIRTIO_BLK_F_MQ; the
//!   host gives it `num_queues=2`) through the hand-built driver
//!   (`rawblk.rs`) on both: `num_queues` reads 2 in the device
//!   configuration; a read on each queue returns the host pattern, each
//!   found in its own queue's used ring; a write on queue 0, a FLUSH on
//!   queue 1 after it completed, and a read on queue 1 sees the write.
//! - `pci.bar_move`: disk 0's BAR 0 moved up 1 MiB through ECAM: the old
//!   address answers all ones, the device works at the new one (host
//!   pattern read again).

use alloc::format;
use alloc::string::String;

use virtio_drivers::transport::pci::bus::DeviceFunction;

use super::blk::{answers, compare, expect_ok, guest_pattern, host_pattern, write_read};
use super::Context;
use crate::arch::{idt, lapic, phys, syscall, tsc};
use crate::blkdev::{Disk, SECTOR};
use crate::fail;
use crate::pci::{self, Bus};
use crate::println;
use crate::rawblk::{RawBlk, Seg, F_FLUSH, F_MQ, S_OK, T_IN};
use crate::report::{CheckResult, Report};
use crate::scratch::Scratch;

/// virtio-pci's vendor ID and modern device IDs.
const VIRTIO_VENDOR: u16 = 0x1af4;
const MODERN_IDS: core::ops::RangeInclusive<u16> = 0x1041..=0x107f;
/// The block device's ID (0x1040 + 2).
const BLK_ID: u16 = 0x1042;
/// The interrupt vector the MSI-X check uses (in the probe's IRQ range).
const MSI_VECTOR: u8 = idt::IRQ_VECTOR_BASE + 14;
/// Host-pattern region (as `blk.rs`).
const HOST_AT: u64 = 1 << 20;
const HOST_LEN: u64 = 64 << 10;
/// How far the BAR move goes.
const BAR_MOVE: u64 = 1 << 20;
/// virtio-pci common configuration: queue_select and queue_msix_vector.
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_VECTOR: u64 = 0x1a;
/// Bytes of Keel's virtio-pci BAR 0.
const BAR_LEN: u64 = 0x8000;
/// virtio-pci ISR status, in BAR 0.
const ISR: u64 = 0x1000;
/// How long an MSI may take to reach the local APIC.
const DELIVERY_US: u64 = 1_000_000;

/// Runs the pci.* checks when the machine has a PCI bus.
pub fn run(ctx: &Context<'_>, report: &mut Report<'_>) {
    if !report.selects_prefix("pci.") {
        return;
    }
    let rsdp = match ctx.start_info() {
        Ok(i) => i.rsdp_paddr,
        Err(_) => return,
    };
    let mut bus = match pci::machine_bus(rsdp) {
        None => return,
        Some(Ok(b)) => b,
        Some(Err(e)) => {
            report.check("pci.enumerate", || Err(e));
            return;
        }
    };
    let mut disk0 = None;
    report.check("pci.enumerate", || enumerate(&mut bus, &mut disk0));
    let Some(at) = disk0 else {
        return;
    };
    let scratch = match ctx.start_info().and_then(Scratch::new) {
        Ok(s) => s,
        Err(e) => {
            report.check("pci.blk.host_pattern", || Err(e));
            return;
        }
    };
    let mut disk = match bus
        .transport(at)
        .and_then(|t| Disk::open_transport(t, None))
    {
        Ok(d) => d,
        Err(e) => {
            report.check("pci.blk.host_pattern", || Err(e));
            return;
        }
    };
    report.check("pci.blk.host_pattern", || host(&mut disk, &scratch));
    if !disk.readonly {
        let capacity = disk.capacity;
        report.check("pci.blk.write_read", || {
            write_read(&mut disk, &scratch, capacity)
        });
    }
    let readonly = disk.readonly;
    drop(disk);
    // The interrupt checks need an interrupt for every completion: the
    // hand-built driver, without EVENT_IDX (see `IrqDisk`).
    let mut raw = match IrqDisk::open(&mut bus, at, &scratch) {
        Ok(r) => Some(r),
        Err(e) => {
            report.check("pci.isr", || Err(e));
            None
        }
    };
    if let Some(raw) = raw.as_mut() {
        report.check("pci.isr", || isr(&mut bus, at, raw));
        report.check("pci.intx_disable", || intx_disable(&mut bus, at, raw));
        report.check("pci.msix", || msix(&mut bus, at, raw));
    }
    drop(raw);
    if !readonly {
        report.check("pci.blk.mq", || mq(&mut bus, at, &scratch));
    }
    report.check("pci.bar_move", || bar_move(&mut bus, at, &scratch));
}

/// Where `pci.blk.mq` writes (the guest pattern, as `write_read` left it).
const MQ_WRITE_AT: u64 = 4 << 20;
/// Bytes per request of `pci.blk.mq`.
const MQ_LEN: usize = 4096;
/// How long one request of the raw driver may take (`pci.blk.mq` and the
/// interrupt checks).
const REQUEST_US: u64 = 1_000_000;
/// virtio_blk_config.num_queues (le16 at 34), in the u32 at 32.
const CFG_NUM_QUEUES: usize = 32;
/// Request types of `pci.blk.mq`.
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;

fn mq(bus: &mut Bus, at: DeviceFunction, scratch: &Scratch) -> CheckResult {
    let t = bus.transport(at)?;
    let mut raw = RawBlk::with_queues(t, F_MQ | F_FLUSH, 2)?;
    if raw.features & F_MQ == 0 {
        fail!("VIRTIO_BLK_F_MQ not offered (features {:#x})", raw.offered);
    }
    let n = raw.config_u32(CFG_NUM_QUEUES).map(|v| v >> 16);
    println!("probe: pci blk num_queues={n:?}");
    if n != Some(2) {
        fail!("num_queues {n:?}, want 2 (the host gives num_queues=2)");
    }
    let buf = scratch.take(2 * MQ_LEN)?;
    let seg = |b: &[u8], write: bool| Seg {
        addr: b.as_ptr() as u64,
        len: MQ_LEN as u32,
        write,
    };
    // A read on each queue: queue q's 4 KiB of the host pattern, found in
    // queue q's used ring (the driver looks nowhere else).
    for q in 0..2usize {
        let part = &buf[q * MQ_LEN..(q + 1) * MQ_LEN];
        let from = HOST_AT + (q * MQ_LEN) as u64;
        let (status, _) = raw
            .request_on(
                q,
                0,
                64 * q,
                T_IN,
                from / SECTOR,
                Some(seg(part, true)),
                REQUEST_US,
            )
            .map_err(|e| format!("read on queue {q}: {e}"))?;
        if status != S_OK {
            fail!("read on queue {q}: status {status}");
        }
        compare(&volatile_copy(part), from, host_pattern)
            .map_err(|e| format!("read on queue {q}: {e}"))?;
    }
    // A write on queue 0, then (completed) a FLUSH and a read on queue 1.
    let (data, back) = buf.split_at_mut(MQ_LEN);
    for (k, b) in data.iter_mut().enumerate() {
        *b = guest_pattern(MQ_WRITE_AT + k as u64);
    }
    let sector = MQ_WRITE_AT / SECTOR;
    let (status, _) = raw
        .request_on(0, 0, 0, T_OUT, sector, Some(seg(data, false)), REQUEST_US)
        .map_err(|e| format!("write on queue 0: {e}"))?;
    if status != S_OK {
        fail!("write on queue 0: status {status}");
    }
    let (status, _) = raw
        .request_on(1, 0, 64, T_FLUSH, 0, None, REQUEST_US)
        .map_err(|e| format!("flush on queue 1: {e}"))?;
    if status != S_OK {
        fail!("flush on queue 1: status {status}");
    }
    back.fill(0);
    let (status, _) = raw
        .request_on(1, 4, 128, T_IN, sector, Some(seg(back, true)), REQUEST_US)
        .map_err(|e| format!("read on queue 1: {e}"))?;
    if status != S_OK {
        fail!("read back on queue 1: status {status}");
    }
    compare(&volatile_copy(back), MQ_WRITE_AT, guest_pattern)
        .map_err(|e| format!("queue 0's write read on queue 1: {e}"))
}

/// A copy of `b` read volatile (the device wrote it behind the compiler).
fn volatile_copy(b: &[u8]) -> alloc::vec::Vec<u8> {
    (0..b.len())
        // SAFETY: k < b.len().
        .map(|k| unsafe { b.as_ptr().add(k).read_volatile() })
        .collect()
}

fn enumerate(bus: &mut Bus, disk0: &mut Option<DeviceFunction>) -> CheckResult {
    println!("probe: pci ecam {:#x}", bus.ecam());
    for f in bus.functions() {
        let i = &f.info;
        let bar0 = if f.at.device == 0 {
            String::from("-")
        } else {
            bus.bar0(f.at).map_or_else(|e| e, |a| format!("{a:#x}"))
        };
        println!(
            "probe: pci 00:{:02x}.{} {:04x}:{:04x} rev {} class {:02x}{:02x}{:02x} bar0 {bar0}",
            f.at.device,
            f.at.function,
            i.vendor_id,
            i.device_id,
            i.revision,
            i.class,
            i.subclass,
            i.prog_if
        );
        if f.at.device == 0 {
            continue;
        }
        if i.vendor_id != VIRTIO_VENDOR || !MODERN_IDS.contains(&i.device_id) || i.revision != 1 {
            fail!(
                "00:{:02x}.{} is {:04x}:{:04x} rev {}, not a modern virtio device",
                f.at.device,
                f.at.function,
                i.vendor_id,
                i.device_id,
                i.revision
            );
        }
        if bus.capability(f.at, pci::CAP_MSIX).is_none() {
            fail!("00:{:02x}.0 has no MSI-X capability", f.at.device);
        }
        if i.device_id == BLK_ID && disk0.is_none() {
            *disk0 = Some(f.at);
        }
    }
    Ok(())
}

fn host(disk: &mut Disk, scratch: &Scratch) -> CheckResult {
    answers(disk, scratch)?;
    let buf = scratch.take(HOST_LEN as usize)?;
    let status = disk.read(HOST_AT / SECTOR, buf)?;
    expect_ok(status, "read")?;
    compare(buf, HOST_AT, host_pattern)
}

/// BAR 0's address, mapped.
fn mapped_bar0(bus: &mut Bus, at: DeviceFunction) -> Result<u64, String> {
    let bar = bus.bar0(at)?;
    phys::map(bar, BAR_LEN).map_err(|e| format!("BAR 0: {e}"))?;
    Ok(bar)
}

/// MSI-X off, the INTx side: a completed request sets the ISR's queue
/// bit, and reading the ISR clears it.
fn isr(bus: &mut Bus, at: DeviceFunction, disk: &mut IrqDisk) -> CheckResult {
    let bar = mapped_bar0(bus, at)?;
    let isr = bar + ISR;
    // Earlier requests' bit, if any.
    phys::read_u8(isr);
    disk.read_sector()?;
    // The device writes the used ring before it sets the ISR and raises
    // the interrupt: the bit may come a moment after the completion.
    let first = first_isr(isr);
    let second = phys::read_u8(isr);
    if (first, second) != (1, 0) {
        fail!("ISR reads {first:#x} then {second:#x} after a request, want 0x1 then 0x0");
    }
    Ok(())
}

/// How long a completed request's ISR bit may lag its used-ring entry.
const ISR_WAIT_US: u64 = 1_000_000;

/// Whether `set` holds within [`ISR_WAIT_US`] (polled; the last poll's
/// answer): for what a completed request sets after its used-ring entry.
fn settles(mut set: impl FnMut() -> bool) -> bool {
    let deadline = tsc::Deadline::after_us(ISR_WAIT_US);
    while !set() {
        if deadline.passed() {
            return set();
        }
    }
    true
}

/// The first non-zero ISR read (which clears it) within [`ISR_WAIT_US`],
/// or 0.
fn first_isr(isr: u64) -> u8 {
    let deadline = tsc::Deadline::after_us(ISR_WAIT_US);
    loop {
        let v = phys::read_u8(isr);
        if v != 0 || deadline.passed() {
            return v;
        }
    }
}

/// Configuration dword 1: the command register, the status register above.
const COMMAND: u8 = 0x04;
/// Command: INTx disable; status (in the upper half): interrupt pending.
const INTX_DISABLE: u32 = 1 << 10;
const STATUS_INTERRUPT: u32 = 1 << (16 + 3);

/// INTx disable set: the ISR and the status register's interrupt bit
/// still report a completed request. The command register is restored.
fn intx_disable(bus: &mut Bus, at: DeviceFunction, disk: &mut IrqDisk) -> CheckResult {
    let isr = mapped_bar0(bus, at)? + ISR;
    phys::read_u8(isr);
    let before = bus.read(at, COMMAND);
    if before & STATUS_INTERRUPT != 0 {
        fail!("the status register's interrupt bit is set with the ISR clear");
    }
    let command = before & 0xffff;
    bus.write(at, COMMAND, command | INTX_DISABLE);
    let result = intx_disabled_request(bus, at, isr, disk);
    bus.write(at, COMMAND, command);
    result
}

fn intx_disabled_request(
    bus: &mut Bus,
    at: DeviceFunction,
    isr: u64,
    disk: &mut IrqDisk,
) -> CheckResult {
    if bus.read(at, COMMAND) & INTX_DISABLE == 0 {
        fail!("the command register does not keep INTx disable");
    }
    disk.read_sector()?;
    // (The status bit follows the ISR, which may come a moment after the
    // completion; reading the status register changes nothing.)
    let pending = settles(|| bus.read(at, COMMAND) & STATUS_INTERRUPT != 0);
    let got = phys::read_u8(isr);
    let still = bus.read(at, COMMAND) & STATUS_INTERRUPT != 0;
    println!(
        "probe: pci intx disabled: status interrupt bit {}, ISR {got:#x}, then bit {}",
        u8::from(pending),
        u8::from(still)
    );
    if got != 1 {
        fail!("ISR reads {got:#x} after a request with INTx disabled, want 0x1");
    }
    if !pending || still {
        fail!(
            "the status register's interrupt bit reads {} before the ISR read and {} after, want 1 then 0",
            u8::from(pending),
            u8::from(still)
        );
    }
    Ok(())
}

/// The MSI-X table entry `n`'s dword `word` and the PBA's first dword.
struct Msix {
    table: u64,
    pba: u64,
}

impl Msix {
    fn entry(&self, n: u64, word: u64) -> u64 {
        self.table + 16 * n + 4 * word
    }
}

/// Disk 0 for the interrupt checks, through the hand-built driver
/// (`rawblk.rs`), which negotiates no EVENT_IDX: the device then signals
/// every completion. (With EVENT_IDX, as virtio-drivers negotiates it, a
/// polling driver that pops a used entry before the device looks at
/// `used_event` has asked for no interrupt, and rightly gets none.)
struct IrqDisk {
    raw: RawBlk,
    /// Where sector 0 is read to.
    buf: u64,
}

impl IrqDisk {
    fn open(bus: &mut Bus, at: DeviceFunction, scratch: &Scratch) -> Result<Self, String> {
        let raw = RawBlk::with_queues(bus.transport(at)?, 0, 1)?;
        let buf = scratch.take(SECTOR as usize)?.as_ptr() as u64;
        Ok(IrqDisk { raw, buf })
    }

    /// Reads sector 0 (and waits for its used-ring entry by polling).
    fn read_sector(&mut self) -> CheckResult {
        let data = Seg {
            addr: self.buf,
            len: SECTOR as u32,
            write: true,
        };
        let (status, _) = self
            .raw
            .request(0, 0, T_IN, 0, Some(data), REQUEST_US)
            .map_err(|e| format!("read of sector 0: {e}"))?;
        if status != S_OK {
            fail!("read of sector 0: status {status}");
        }
        Ok(())
    }
}

/// Waits until the local APIC has `MSI_VECTOR` requested, then takes it.
fn delivered(what: &str) -> CheckResult {
    let before = idt::irq_count(MSI_VECTOR);
    let start = tsc::rdtsc();
    let limit = tsc::cycles_at_least(DELIVERY_US);
    while !lapic::requested(MSI_VECTOR) {
        if tsc::rdtsc().wrapping_sub(start) > limit {
            fail!("{what}: vector {MSI_VECTOR} never reached the local APIC");
        }
        core::hint::spin_loop();
    }
    // Pending in the IRR: enabling interrupts takes it at once.
    syscall::idle();
    if idt::irq_count(MSI_VECTOR) != before + 1 {
        fail!("{what}: the interrupt was not taken");
    }
    Ok(())
}

fn msix(bus: &mut Bus, at: DeviceFunction, disk: &mut IrqDisk) -> CheckResult {
    lapic::enable().map_err(|e| format!("local APIC: {e}"))?;
    let cap = bus
        .capability(at, pci::CAP_MSIX)
        .ok_or("no MSI-X capability")?;
    let bar = mapped_bar0(bus, at)?;
    let table = bus.read(at, cap + 4);
    let pba = bus.read(at, cap + 8);
    if table & 7 != 0 || pba & 7 != 0 {
        fail!("MSI-X table or PBA not in BAR 0");
    }
    let m = Msix {
        table: bar + u64::from(table & !7),
        pba: bar + u64::from(pba & !7),
    };
    // Vector 0: this CPU, MSI_VECTOR, fixed, edge; masked.
    phys::write_u32(m.entry(0, 0), 0xfee0_0000 | (lapic::id() << 12));
    phys::write_u32(m.entry(0, 1), 0);
    phys::write_u32(m.entry(0, 2), u32::from(MSI_VECTOR));
    phys::write_u32(m.entry(0, 3), 1);
    // Queue 0 on vector 0 (16-bit registers, written as such).
    phys::write_u16(bar + QUEUE_SELECT, 0);
    phys::write_u16(bar + QUEUE_VECTOR, 0);
    let got = phys::read_u16(bar + QUEUE_VECTOR);
    if got != 0 {
        fail!("queue 0's vector reads {got:#x} after writing 0");
    }
    // Enable MSI-X (message control, bit 15).
    let ctrl = bus.read(at, cap);
    bus.write(at, cap, ctrl | (1 << 31));
    disk.read_sector()?;
    // (The pending bit, like the ISR, may come a moment after the
    // used-ring entry.)
    if !settles(|| phys::read_u32(m.pba) & 1 != 0) {
        fail!("a request completed with vector 0 masked, but its PBA bit is clear");
    }
    if lapic::requested(MSI_VECTOR) {
        fail!("the masked vector reached the local APIC");
    }
    println!("probe: pci msix vector 0 pending while masked");
    phys::write_u32(m.entry(0, 3), 0);
    delivered("after unmasking")?;
    if phys::read_u32(m.pba) & 1 != 0 {
        fail!("the PBA bit stayed set after delivery");
    }
    disk.read_sector()?;
    delivered("unmasked")?;
    println!("probe: pci msix delivered");
    // MSI-X off again: the next driver uses INTx/polling as before.
    bus.write(at, cap, ctrl & !(1 << 31));
    Ok(())
}

fn bar_move(bus: &mut Bus, at: DeviceFunction, scratch: &Scratch) -> CheckResult {
    let old = bus.bar0(at)?;
    let new = old + BAR_MOVE;
    bus.move_bar0(at, new);
    let now = bus.bar0(at)?;
    if now != new {
        fail!("BAR 0 reads {now:#x} after moving it to {new:#x}");
    }
    phys::map(old, BAR_LEN).map_err(|e| format!("old BAR: {e}"))?;
    let stale = phys::read_u32(old);
    if stale != u32::MAX {
        fail!("the old BAR address {old:#x} still answers ({stale:#x})");
    }
    phys::map(new, BAR_LEN).map_err(|e| format!("new BAR: {e}"))?;
    let mut disk = Disk::open_transport(bus.transport(at)?, None)?;
    host(&mut disk, scratch)?;
    println!("probe: pci bar0 moved {old:#x} -> {new:#x}");
    Ok(())
}
