//! virtio-vsock in userspace, host side on Unix sockets, wire-compatible
//! with Firecracker's scheme: a guest connect to (CID 2, port P) becomes a
//! connection to the Unix socket `<path>_P`; a host process may connect to
//! `<path>` and write `CONNECT <port>\n` to reach guest port P (answered
//! `OK <host port>\n`), but only when host-initiated connections are
//! allowed. HostOS leaves them off: the guest always starts.

mod connection;
mod control;
mod device;
pub mod packet;
mod segments;

pub use connection::CONN_TX_BUF;
pub use control::MAX_CONTROL;
pub use device::{VirtioVsock, VsockConfig, VsockCounters, VsockError, MAX_CONNECTIONS};
