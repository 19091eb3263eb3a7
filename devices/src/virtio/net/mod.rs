//! virtio-net on a tap device: MAC, MTU and link status in the config
//! space, mergeable receive buffers, checksum and segmentation offloads
//! negotiated with the guest and mirrored to the tap, and multi-queue
//! (one tap queue per queue pair, a control queue for VQ_PAIRS_SET).
//! [`host`] sets the tap up on the host (bridge, MTU) and undoes it.

mod counters;
mod device;
pub mod host;
mod mac;
pub mod netlink;
pub mod tap;
#[cfg(test)]
mod tests;

pub use counters::NetCounters;
pub use device::{NetConfig, VirtioNet, MAX_FRAME, MAX_QUEUE_PAIRS};
pub use host::{HostTap, TapError, TapSetup, TapTeardown};
pub use mac::{deterministic_mac, format_mac, parse_mac, random_mac, resolve_mac, MacNodeType};
pub use tap::Tap;
