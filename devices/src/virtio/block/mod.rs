//! virtio-blk: a raw block device (an LVM volume, a loop device) or a
//! regular file, served through io_uring (whole queue batches per
//! submission) or synchronous I/O.

mod backend;
mod barrier;
mod counters;
mod cow;
mod device;
mod engine;
mod request;
mod trim_worker;

pub use backend::{DiskBackend, DiskError};
pub use counters::{BlockCounters, BlockCountersSnapshot};
pub use cow::{CowError, CowOverlay, CowRange};
pub use device::{BlockConfig, VirtioBlock, MAX_QUEUES, SECTOR_SIZE};
pub use engine::EngineKind;
pub use request::{RequestError, RequestKind};
pub use trim_worker::TrimWorker;
