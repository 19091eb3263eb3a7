//! Per-interface counters, read by the control API.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Live counters of one guest NIC. Frame bytes exclude the virtio-net
/// header.
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Their bytes.
    pub rx_bytes: AtomicU64,
    /// Frames read from the tap but not delivered: too large for the
    /// guest's buffers or for a virtio-net frame, or pending when the
    /// driver reset the device.
    pub rx_dropped: AtomicU64,
    /// Times receiving stopped because the guest had no free buffers (the
    /// frame waits, the tap is no longer polled until the guest adds
    /// buffers: nothing is dropped).
    pub rx_stalls: AtomicU64,
    /// Of the delivered frames, those copied through the host's bounce
    /// buffer because they did not fit in the receive buffers the device
    /// held when the frame was read (the rest went straight from the tap
    /// into guest memory).
    pub rx_copied: AtomicU64,
    /// Frames the guest sent that reached the tap.
    pub tx_frames: AtomicU64,
    /// Their bytes.
    pub tx_bytes: AtomicU64,
    /// Frames the guest sent that did not reach the tap: the tap write
    /// failed, or the frame is over 65562 bytes with its header.
    pub tx_dropped: AtomicU64,
    /// Of the drops (either direction), frames too large: over 65562
    /// bytes with the header, or larger than the guest's receive buffers
    /// can hold.
    pub oversize: AtomicU64,
    /// Malformed descriptor chains (short header, wrong direction,
    /// address outside guest memory, unusable receive buffers, bad
    /// control commands): returned to the guest unused.
    pub invalid_chains: AtomicU64,
    /// Tap read/write errors (the tap went away, was set down, ...).
    pub tap_errors: AtomicU64,
    /// Control-queue commands handled.
    pub ctrl_commands: AtomicU64,
}

impl NetCounters {
    /// The counters as (name, value) pairs, for the API and logs.
    pub fn pairs(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("rx_frames", self.rx_frames.load(Relaxed)),
            ("rx_bytes", self.rx_bytes.load(Relaxed)),
            ("rx_dropped", self.rx_dropped.load(Relaxed)),
            ("rx_stalls", self.rx_stalls.load(Relaxed)),
            ("rx_copied", self.rx_copied.load(Relaxed)),
            ("tx_frames", self.tx_frames.load(Relaxed)),
            ("tx_bytes", self.tx_bytes.load(Relaxed)),
            ("tx_dropped", self.tx_dropped.load(Relaxed)),
            ("oversize", self.oversize.load(Relaxed)),
            ("invalid_chains", self.invalid_chains.load(Relaxed)),
            ("tap_errors", self.tap_errors.load(Relaxed)),
            ("ctrl_commands", self.ctrl_commands.load(Relaxed)),
        ]
    }

    /// One counter by name (0 for an unknown name).
    pub fn get(&self, name: &str) -> u64 {
        self.pairs()
            .into_iter()
            .find(|(k, _)| *k == name)
            .map_or(0, |(_, v)| v)
    }
}

pub(crate) fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}
