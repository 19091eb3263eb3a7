//! Where a VMM process spends host CPU: each thread's run time from
//! `/proc/PID/task/TID/schedstat`, split into vCPU threads (running the
//! guest) and the VMM's own threads (devices, event loops).

use std::collections::HashMap;

/// Whether a thread named `comm` runs a vCPU: Keel names them `vcpuN`,
/// QEMU `CPU N/KVM`, Firecracker `fc_vcpu N`.
pub fn is_vcpu(comm: &str) -> bool {
    comm.starts_with("vcpu") || comm.starts_with("CPU ") || comm.starts_with("fc_vcpu")
}

/// Run time (ns) of each live thread of a process, by thread ID, with
/// whether it is a vCPU thread.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    threads: HashMap<u32, (bool, u64)>,
}

impl Snapshot {
    /// Reads every thread of `pid` now. Threads that end between the
    /// directory listing and the read are left out; a process that is gone
    /// gives an empty snapshot.
    pub fn take(pid: u32) -> Snapshot {
        let mut s = Snapshot::default();
        s.update(pid);
        s
    }

    /// Reads every thread of `pid` again, keeping the last figure of a
    /// thread that has ended (so a snapshot taken just before the process
    /// exits loses at most the time since the previous call).
    pub fn update(&mut self, pid: u32) {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return;
        };
        for t in tasks.flatten() {
            let Some(tid) = t.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            let dir = t.path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            let ns = std::fs::read_to_string(dir.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
            if let Some(ns) = ns {
                self.threads.insert(tid, (is_vcpu(&comm), ns));
            }
        }
    }

    /// Total run time (ns) of the vCPU threads (`true`) or of the other
    /// threads (`false`).
    pub fn total(&self, vcpu: bool) -> u64 {
        self.threads
            .values()
            .filter(|(v, _)| *v == vcpu)
            .map(|(_, ns)| ns)
            .sum()
    }

    /// Run time (ns) spent since `earlier`, vCPU threads and the others:
    /// threads that started since count from zero.
    pub fn since(&self, earlier: &Snapshot) -> (u64, u64) {
        let mut d = (0, 0);
        for (tid, (vcpu, ns)) in &self.threads {
            let before = earlier.threads.get(tid).map_or(0, |(_, b)| *b);
            let part = ns.saturating_sub(before);
            if *vcpu {
                d.0 += part;
            } else {
                d.1 += part;
            }
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_thread_names_of_each_vmm() {
        assert!(is_vcpu("vcpu0\n"));
        assert!(is_vcpu("CPU 1/KVM\n"));
        assert!(is_vcpu("fc_vcpu 0\n"));
        assert!(!is_vcpu("keel\n"));
        assert!(!is_vcpu("blk0\n"));
        assert!(!is_vcpu("fc_vmm\n"));
    }

    #[test]
    fn since_splits_and_counts_new_threads_from_zero() {
        let mut a = Snapshot::default();
        a.threads.insert(1, (true, 100));
        a.threads.insert(2, (false, 50));
        let mut b = a.clone();
        b.threads.insert(1, (true, 400));
        b.threads.insert(2, (false, 70));
        b.threads.insert(3, (false, 5));
        assert_eq!(b.since(&a), (300, 25));
        assert_eq!(b.total(true), 400);
        assert_eq!(b.total(false), 75);
    }

    #[test]
    fn own_process_has_threads_that_ran() {
        let s = Snapshot::take(std::process::id());
        assert!(s.total(false) > 0, "{s:?}");
        assert_eq!(s.total(true), 0);
    }
}
