//! The virtio-vsock packet header (`struct virtio_vsock_hdr`, 44 bytes,
//! little endian) and its constants.

use vm_memory::ByteValued;

/// Connection-oriented stream socket type.
pub const TYPE_STREAM: u16 = 1;
/// Ops.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection reset.
pub const OP_RST: u16 = 3;
/// Half or full close.
pub const OP_SHUTDOWN: u16 = 4;
/// Data.
pub const OP_RW: u16 = 5;
/// Credit information.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Asks for a credit update.
pub const OP_CREDIT_REQUEST: u16 = 7;
/// SHUTDOWN flag: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Header size.
pub const HDR_LEN: usize = 44;

/// `struct virtio_vsock_hdr`.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Op-specific flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

// SAFETY: plain old data: integers only, packed, no padding, any bit pattern
// is valid.
unsafe impl ByteValued for Header {}

const _: () = assert!(std::mem::size_of::<Header>() == HDR_LEN);
