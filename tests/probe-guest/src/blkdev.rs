//! A virtio-blk disk driven by the `virtio-drivers` crate, with bounded
//! waits: requests go through its non-blocking API and the used ring is
//! polled against a TSC deadline, so a device that stops answering gives a
//! failure instead of a hung probe.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use core::mem::ManuallyDrop;

use virtio_drivers::device::blk::{BlkReq, BlkResp, RespStatus, VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::transport::{DeviceStatus, DeviceType, Transport};

use crate::arch::{phys, tsc};
use crate::virtio::{ProbeHal, ProbeTransport, VirtioDevice};

/// virtio-mmio status register.
const REG_STATUS: u64 = 0x70;

/// How long one data request may take (at the highest TSC rate).
pub const REQUEST_US: u64 = 5_000_000;

/// An initialized disk.
pub struct Disk {
    /// Dropped by hand (see `Drop`), before the request buffers go.
    blk: ManuallyDrop<VirtIOBlk<ProbeHal, ProbeTransport>>,
    /// virtio-mmio register window (`None` over virtio-pci, whose driver
    /// resets the device itself when dropped).
    base: Option<u64>,
    /// Features the device offers (read before the driver negotiates).
    pub offered: u64,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// The device offers VIRTIO_BLK_F_RO.
    pub readonly: bool,
    /// A request never came back: the queue is not used again.
    broken: Option<String>,
    /// Header and status of the one request out, outliving a timeout.
    slot: Box<(BlkReq, BlkResp)>,
}

/// The status byte of a response, as a number where it is a known one.
pub fn status_text(status: RespStatus) -> String {
    match status {
        RespStatus::OK => String::from("0 (OK)"),
        RespStatus::IO_ERR => String::from("1 (IOERR)"),
        RespStatus::UNSUPPORTED => String::from("2 (UNSUPP)"),
        RespStatus::NOT_READY => String::from("none (not written)"),
        other => format!("{other:?}"),
    }
}

impl Disk {
    /// Resets the device, reads what it offers and initializes the driver.
    pub fn open(dev: &VirtioDevice) -> Result<Self, String> {
        Self::open_transport(dev.transport()?, dev.mmio_base())
    }

    /// As [`open`](Self::open), on `transport` (`base`: its virtio-mmio
    /// window, if it is one).
    pub fn open_transport(
        mut transport: ProbeTransport,
        base: Option<u64>,
    ) -> Result<Self, String> {
        if transport.device_type() != DeviceType::Block {
            return Err(format!(
                "device is {:?}, not a block device",
                transport.device_type()
            ));
        }
        transport.set_status(DeviceStatus::empty());
        transport.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        let offered = transport.read_device_features();
        let blk = VirtIOBlk::<ProbeHal, _>::new(transport)
            .map_err(|e| format!("virtio-drivers init: {e}"))?;
        Ok(Disk {
            capacity: blk.capacity(),
            readonly: blk.readonly(),
            blk: ManuallyDrop::new(blk),
            base,
            offered,
            broken: None,
            slot: Box::new((BlkReq::default(), BlkResp::default())),
        })
    }

    /// The GET_ID string (up to 20 bytes), or the reason there is none.
    pub fn serial(&mut self) -> Result<String, String> {
        let mut id = [0u8; 20];
        let len = self
            .blk
            .device_id(&mut id)
            .map_err(|e| format!("GET_ID: {e}"))?;
        Ok(id[..len]
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() {
                    char::from(b)
                } else {
                    '?'
                }
            })
            .collect())
    }

    /// Sends a FLUSH (the driver only does so when FLUSH was negotiated).
    pub fn flush(&mut self) -> Result<(), String> {
        self.usable()?;
        self.blk.flush().map_err(|e| format!("FLUSH: {e}"))
    }

    fn usable(&self) -> Result<(), String> {
        match &self.broken {
            Some(why) => Err(format!("device unusable since an earlier request: {why}")),
            None => Ok(()),
        }
    }

    /// Waits until `token` is next in the used ring.
    fn wait(&mut self, token: u16, what: &str) -> Result<(), String> {
        let start = tsc::rdtsc();
        let limit = tsc::cycles_at_least(REQUEST_US);
        loop {
            match self.blk.peek_used() {
                Some(t) if t == token => return Ok(()),
                Some(t) => {
                    let why = format!("{what}: device returned chain {t}, expected {token}");
                    self.broken = Some(why.clone());
                    return Err(why);
                }
                None if tsc::rdtsc().wrapping_sub(start) > limit => {
                    let why = format!("{what}: no completion within {} s", REQUEST_US / 1_000_000);
                    self.broken = Some(why.clone());
                    return Err(why);
                }
                None => core::hint::spin_loop(),
            }
        }
    }

    /// Reads `buf.len()` bytes (a multiple of 512) from `sector`. Returns
    /// the status; `Err` when there is none.
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<RespStatus, String> {
        self.usable()?;
        let what = format!("read of {} bytes at sector {sector}", buf.len());
        let (req, resp) = &mut *self.slot;
        // SAFETY: req, resp (boxed, kept until the device is reset) and buf
        // are not touched until the request completes; on a timeout the
        // queue is never used again and the buffer's owner outlives the
        // disk (the device is reset when `blk` drops).
        let token = unsafe { self.blk.read_blocks_nb(sector as usize, req, buf, resp) }
            .map_err(|e| format!("{what}: {e}"))?;
        self.wait(token, &what)?;
        let (req, resp) = &mut *self.slot;
        // SAFETY: the same buffers as submitted with `token`.
        let result = unsafe { self.blk.complete_read_blocks(token, req, buf, resp) };
        finish(result, resp.status(), &what)
    }

    /// Writes `buf` (a multiple of 512 bytes) at `sector`. Returns the
    /// status; `Err` when there is none.
    pub fn write(&mut self, sector: u64, buf: &[u8]) -> Result<RespStatus, String> {
        self.usable()?;
        let what = format!("write of {} bytes at sector {sector}", buf.len());
        let (req, resp) = &mut *self.slot;
        // SAFETY: as in `read`.
        let token = unsafe { self.blk.write_blocks_nb(sector as usize, req, buf, resp) }
            .map_err(|e| format!("{what}: {e}"))?;
        self.wait(token, &what)?;
        let (req, resp) = &mut *self.slot;
        // SAFETY: the same buffers as submitted with `token`.
        let result = unsafe { self.blk.complete_write_blocks(token, req, buf, resp) };
        finish(result, resp.status(), &what)
    }

    /// Resets the device (it stops using every buffer it was given) and
    /// marks the disk unusable.
    pub fn abandon(&mut self, why: &str) {
        if let Some(base) = self.base {
            phys::write_u32(base + REG_STATUS, 0);
        }
        self.broken = Some(String::from(why));
    }

    /// The driver itself, for the benchmark's own request loop.
    pub fn driver(&mut self) -> &mut VirtIOBlk<ProbeHal, ProbeTransport> {
        &mut self.blk
    }
}

impl Drop for Disk {
    /// Stops the queue as virtio-drivers would (QueueReady = 0, read back),
    /// but with a bounded wait: virtio-drivers spins until the register
    /// reads 0, forever on a device that ignores the write. Then resets the
    /// device and lets the driver go; if even a reset leaves QueueReady set,
    /// the driver is leaked rather than hang the probe.
    fn drop(&mut self) {
        if let Some(base) = self.base {
            if !crate::virtio::quiesce(base, 1, true) {
                return;
            }
        }
        // SAFETY: dropped once, here; `blk` is not used afterwards.
        unsafe { ManuallyDrop::drop(&mut self.blk) };
    }
}

/// A completed request: its status when the driver popped it (a non-OK
/// status is an error to the driver but a result here).
fn finish(
    result: virtio_drivers::Result<()>,
    status: RespStatus,
    what: &str,
) -> Result<RespStatus, String> {
    match result {
        Ok(()) => Ok(status),
        Err(_) if status != RespStatus::NOT_READY => Ok(status),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// Bytes per sector.
pub const SECTOR: u64 = SECTOR_SIZE as u64;
