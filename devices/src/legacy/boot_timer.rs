//! Boot timer: the guest writes a milestone byte to port 0x80 and the VMM
//! records when, relative to the VMM's own start.
//!
//! Cloud Hypervisor and Firecracker offer the same to measure boot time; the
//! probe guest writes 0x01 at entry, 0x02 on reaching user mode and 0x03 when
//! its checks are done.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::info;

use crate::bus::BusDevice;

/// The POST/debug port the boot timer listens on.
pub const BOOT_TIMER_PORT: u64 = 0x80;

/// Milestones kept at most (a guest cannot grow the list without bound).
const MAX_MILESTONES: usize = 64;

/// One guest milestone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Milestone {
    /// The byte the guest wrote.
    pub code: u8,
    /// Time since the VMM started.
    pub since_start: Duration,
}

/// The boot-timer device.
pub struct BootTimer {
    start: Instant,
    milestones: Arc<Mutex<Vec<Milestone>>>,
}

impl BootTimer {
    /// A timer counting from `start` (the VMM's exec).
    pub fn new(start: Instant) -> Self {
        BootTimer {
            start,
            milestones: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// A handle on the recorded milestones, for the control API and logs.
    pub fn milestones(&self) -> Arc<Mutex<Vec<Milestone>>> {
        self.milestones.clone()
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let [code] = data else { return };
        let since_start = self.start.elapsed();
        let mut list = self.milestones.lock().unwrap_or_else(|p| p.into_inner());
        // Repeated writes of the same code (Linux's io delay writes to port
        // 0x80) are timestamped only the first time.
        if list.len() < MAX_MILESTONES && !list.iter().any(|m| m.code == *code) {
            info!(
                "boot-timer: guest milestone {code:#04x} at {:.3} ms",
                since_start.as_secs_f64() * 1000.0
            );
            list.push(Milestone {
                code: *code,
                since_start,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_each_milestone_once_in_order() {
        let mut t = BootTimer::new(Instant::now());
        let seen = t.milestones();
        t.write(0, &[1]);
        t.write(0, &[1]);
        t.write(0, &[2]);
        t.write(0, &[3, 4]); // not a byte write: ignored
        let list = seen.lock().unwrap();
        assert_eq!(list.iter().map(|m| m.code).collect::<Vec<_>>(), [1, 2]);
        assert!(list[0].since_start <= list[1].since_start);
    }
}
