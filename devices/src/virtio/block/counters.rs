//! Per-disk counters, read by the control API and metrics.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Live counters of one disk.
#[derive(Debug, Default)]
pub struct BlockCounters {
    /// Completed reads.
    pub read_ops: AtomicU64,
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Completed writes.
    pub write_ops: AtomicU64,
    /// Bytes written.
    pub write_bytes: AtomicU64,
    /// Completed flushes.
    pub flush_ops: AtomicU64,
    /// Completed discards.
    pub discard_ops: AtomicU64,
    /// Completed write-zeroes.
    pub write_zeroes_ops: AtomicU64,
    /// Requests the guest built wrongly (answered IOERR or dropped).
    pub invalid_requests: AtomicU64,
    /// Requests of a type the device does not support (answered UNSUPP).
    pub unsupported_requests: AtomicU64,
    /// Host I/O errors (EIO, ENOSPC, ...) passed to the guest as IOERR.
    pub io_errors: AtomicU64,
    /// Writes refused (IOERR) because the copy-on-write overlay is full.
    pub cow_limit_errors: AtomicU64,
    /// Sum of request latencies, nanoseconds.
    pub latency_ns_total: AtomicU64,
    /// Largest request latency, nanoseconds.
    pub latency_ns_max: AtomicU64,
    /// Requests whose latency is in the total.
    pub latency_samples: AtomicU64,
}

/// A point-in-time copy of [`BlockCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct BlockCountersSnapshot {
    pub read_ops: u64,
    pub read_bytes: u64,
    pub write_ops: u64,
    pub write_bytes: u64,
    pub flush_ops: u64,
    pub discard_ops: u64,
    pub write_zeroes_ops: u64,
    pub invalid_requests: u64,
    pub unsupported_requests: u64,
    pub io_errors: u64,
    pub cow_limit_errors: u64,
    pub latency_ns_total: u64,
    pub latency_ns_max: u64,
    pub latency_samples: u64,
}

impl BlockCounters {
    /// Copies the counters.
    pub fn snapshot(&self) -> BlockCountersSnapshot {
        BlockCountersSnapshot {
            read_ops: self.read_ops.load(Relaxed),
            read_bytes: self.read_bytes.load(Relaxed),
            write_ops: self.write_ops.load(Relaxed),
            write_bytes: self.write_bytes.load(Relaxed),
            flush_ops: self.flush_ops.load(Relaxed),
            discard_ops: self.discard_ops.load(Relaxed),
            write_zeroes_ops: self.write_zeroes_ops.load(Relaxed),
            invalid_requests: self.invalid_requests.load(Relaxed),
            unsupported_requests: self.unsupported_requests.load(Relaxed),
            io_errors: self.io_errors.load(Relaxed),
            cow_limit_errors: self.cow_limit_errors.load(Relaxed),
            latency_ns_total: self.latency_ns_total.load(Relaxed),
            latency_ns_max: self.latency_ns_max.load(Relaxed),
            latency_samples: self.latency_samples.load(Relaxed),
        }
    }

    pub(crate) fn latency(&self, ns: u64) {
        self.latency_ns_total.fetch_add(ns, Relaxed);
        self.latency_ns_max.fetch_max(ns, Relaxed);
        self.latency_samples.fetch_add(1, Relaxed);
    }
}

pub(crate) fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}
