//! Turning a descriptor chain into a block request, validating everything
//! the guest controls: descriptor count and directions, lengths, addresses,
//! the request type and the sectors it touches.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::device::SECTOR_SIZE;

/// Size of the request header (type, reserved, sector).
pub const HEADER_LEN: u32 = 16;
/// Size of one discard/write-zeroes segment.
pub const SEGMENT_LEN: u32 = 16;
/// Segments one discard / write-zeroes request may have (the
/// `max_discard_seg` and `max_write_zeroes_seg` the device advertises).
pub const MAX_TRIM_SEGMENTS: u32 = 1;
/// Length of the GET_ID string.
pub const ID_LEN: usize = 20;

/// The operation a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Read sectors.
    In,
    /// Write sectors.
    Out,
    /// Make written data durable.
    Flush,
    /// Return the disk's serial.
    GetId,
    /// Deallocate ranges.
    Discard,
    /// Zero ranges.
    WriteZeroes,
}

/// Why a request is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No usable status descriptor: the request can only be returned to
    /// the guest unanswered (used length 0).
    #[error("chain has no writable status byte")]
    NoStatus,
    /// More descriptors than a request may have (header, SEG_MAX data
    /// segments, status): returned unanswered too, since its last collected
    /// descriptor is no status byte.
    #[error("chain longer than a request may be")]
    ChainTooLong,
    /// The header is missing, short or device-writable.
    #[error("bad request header")]
    BadHeader,
    /// More data descriptors than SEG_MAX.
    #[error("too many segments")]
    TooManySegments,
    /// A data descriptor has the wrong direction for the request.
    #[error("data descriptor with the wrong direction")]
    WrongDirection,
    /// A descriptor points outside guest memory.
    #[error("descriptor outside guest memory")]
    BadAddress,
    /// Data length not a multiple of the sector size (or of a segment).
    #[error("data length not a multiple of the unit")]
    BadLength,
    /// The request reaches past the end of the disk.
    #[error("request past the end of the disk")]
    OutOfRange,
    /// A write to a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// A type this device does not implement.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

/// A validated request. Its data buffers are in the `iovecs` (host
/// addresses of guest memory) and `data` (guest addresses) given to
/// [`parse`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// The operation.
    pub kind: RequestKind,
    /// First sector.
    pub sector: u64,
    /// Its byte offset, validated for reads and writes (0 for the other
    /// kinds, whose sector field the spec leaves unused).
    pub offset: u64,
    /// Total data bytes.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Where the status byte of a chain goes, if it has a usable one.
pub fn status_addr(descs: &[Descriptor]) -> Option<GuestAddress> {
    let last = descs.last()?;
    (descs.len() >= 2 && last.is_write_only() && last.len() >= 1).then(|| last.addr())
}

/// Parses the chain `descs` of a disk of `capacity` bytes. On success the
/// data descriptors are in `data` and, for reads and writes, as host
/// iovecs in `iovecs` (both cleared first; their capacity is reused).
pub fn parse(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    capacity: u64,
    read_only: bool,
    seg_max: usize,
    data: &mut Vec<(GuestAddress, u32)>,
    iovecs: &mut Vec<libc::iovec>,
) -> Result<Request, RequestError> {
    data.clear();
    iovecs.clear();
    if descs.len() > seg_max + 2 {
        return Err(RequestError::ChainTooLong);
    }
    let status = status_addr(descs).ok_or(RequestError::NoStatus)?;
    let header = descs[0];
    if header.is_write_only() || header.len() < HEADER_LEN {
        return Err(RequestError::BadHeader);
    }
    let kind_raw: u32 = mem
        .read_obj(header.addr())
        .map_err(|_| RequestError::BadAddress)?;
    let sector: u64 = mem
        .read_obj(
            header
                .addr()
                .checked_add(8)
                .ok_or(RequestError::BadAddress)?,
        )
        .map_err(|_| RequestError::BadAddress)?;
    let kind = match kind_raw {
        VIRTIO_BLK_T_IN => RequestKind::In,
        VIRTIO_BLK_T_OUT => RequestKind::Out,
        VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
        VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
        VIRTIO_BLK_T_DISCARD => RequestKind::Discard,
        VIRTIO_BLK_T_WRITE_ZEROES => RequestKind::WriteZeroes,
        other => return Err(RequestError::Unsupported(other)),
    };
    let middle = &descs[1..descs.len() - 1];
    if middle.len() > seg_max {
        return Err(RequestError::TooManySegments);
    }
    let device_writes = matches!(kind, RequestKind::In | RequestKind::GetId);
    let mut data_len: u64 = 0;
    for d in middle {
        if d.is_write_only() != device_writes {
            return Err(RequestError::WrongDirection);
        }
        data.push((d.addr(), d.len()));
        data_len = data_len.saturating_add(u64::from(d.len()));
        if matches!(kind, RequestKind::In | RequestKind::Out) {
            let slice = mem
                .get_slice(d.addr(), d.len() as usize)
                .map_err(|_| RequestError::BadAddress)?;
            iovecs.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: d.len() as usize,
            });
        } else if !mem.check_range(d.addr(), d.len() as usize) {
            return Err(RequestError::BadAddress);
        }
    }
    let mut offset = 0;
    match kind {
        RequestKind::In | RequestKind::Out => {
            if !data_len.is_multiple_of(SECTOR_SIZE) {
                return Err(RequestError::BadLength);
            }
            offset = sector
                .checked_mul(SECTOR_SIZE)
                .ok_or(RequestError::OutOfRange)?;
            let end = offset
                .checked_add(data_len)
                .ok_or(RequestError::OutOfRange)?;
            if end > capacity {
                return Err(RequestError::OutOfRange);
            }
            if kind == RequestKind::Out && read_only {
                return Err(RequestError::ReadOnly);
            }
        }
        RequestKind::Discard | RequestKind::WriteZeroes => {
            if read_only {
                return Err(RequestError::ReadOnly);
            }
            if data_len == 0 || !data_len.is_multiple_of(u64::from(SEGMENT_LEN)) {
                return Err(RequestError::BadLength);
            }
            // max_discard_seg / max_write_zeroes_seg.
            if data_len / u64::from(SEGMENT_LEN) > u64::from(MAX_TRIM_SEGMENTS) {
                return Err(RequestError::TooManySegments);
            }
        }
        RequestKind::Flush | RequestKind::GetId => {}
    }
    Ok(Request {
        kind,
        sector,
        offset,
        data_len,
        status,
    })
}

/// One discard/write-zeroes range, as the guest gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// The UNMAP flag (write-zeroes may deallocate).
    pub unmap: bool,
}

/// Reads segment `index` of a discard/write-zeroes request whose data
/// descriptors are `data`, checking it lies within a disk of `capacity`
/// bytes.
pub fn read_segment(
    mem: &GuestMemoryMmap,
    data: &[(GuestAddress, u32)],
    index: u64,
    capacity: u64,
) -> Result<Segment, RequestError> {
    // Segments may straddle descriptors: read 16 bytes at a logical offset.
    let mut raw = [0u8; SEGMENT_LEN as usize];
    let mut want = index
        .checked_mul(u64::from(SEGMENT_LEN))
        .ok_or(RequestError::BadLength)?;
    let mut filled = 0usize;
    for &(addr, len) in data {
        let len = u64::from(len);
        if want >= len {
            want -= len;
            continue;
        }
        let take = ((len - want) as usize).min(raw.len() - filled);
        let at = addr.checked_add(want).ok_or(RequestError::BadAddress)?;
        mem.read_slice(&mut raw[filled..filled + take], at)
            .map_err(|_| RequestError::BadAddress)?;
        filled += take;
        want = 0;
        if filled == raw.len() {
            break;
        }
    }
    if filled != raw.len() {
        return Err(RequestError::BadLength);
    }
    let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
    let sectors = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
    let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap_or_default());
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(RequestError::OutOfRange)?;
    let len = u64::from(sectors) * SECTOR_SIZE;
    if offset.checked_add(len).is_none_or(|end| end > capacity) {
        return Err(RequestError::OutOfRange);
    }
    Ok(Segment {
        offset,
        len,
        unmap: flags & 1 != 0,
    })
}
