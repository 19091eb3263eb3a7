//! What a process holds in memory, from `/proc/<pid>/smaps`, split into its
//! guest RAM and everything else.
//!
//! Keel's resident set includes the guest's RAM (an anonymous mapping the
//! guest fills as it touches pages, 2 MiB at a time with transparent huge
//! pages, and which khugepaged may fill further at any moment), so a bound
//! on what Keel itself allocates has to leave that mapping out: the sum of
//! `Rss` over every other mapping is Keel's own memory (heap, thread
//! stacks, code, buffers).

use std::path::PathBuf;

/// Resident memory of a process at one moment, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resident {
    /// Every mapping but the guest's RAM.
    pub own: u64,
    /// The guest's RAM mapping.
    pub guest: u64,
}

/// Reads `/proc/<pid>/smaps`: the guest RAM is the one anonymous mapping
/// (no path) of exactly `guest_bytes`. Panics if there is not exactly one.
pub fn resident(pid: u32, guest_bytes: u64) -> Resident {
    let path = PathBuf::from(format!("/proc/{pid}/smaps"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    // (is a nameless mapping, Size in kB, Rss in kB) per mapping.
    let mut maps: Vec<(bool, u64, u64)> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            // address perms offset dev inode [path]
            maps.push((words.nth(4).is_none(), 0, 0));
            continue;
        }
        let kb = || words.clone().next().and_then(|v| v.parse::<u64>().ok());
        match (first, maps.last_mut()) {
            ("Size:", Some(m)) => m.1 = kb().expect("Size: <n> kB"),
            ("Rss:", Some(m)) => m.2 = kb().expect("Rss: <n> kB"),
            _ => {}
        }
    }
    let is_guest = |m: &&(bool, u64, u64)| m.0 && m.1 * 1024 == guest_bytes;
    let guest: Vec<&(bool, u64, u64)> = maps.iter().filter(is_guest).collect();
    assert_eq!(
        guest.len(),
        1,
        "want one anonymous mapping of {guest_bytes} bytes (the guest's RAM) in {}",
        path.display()
    );
    let total: u64 = maps.iter().map(|m| m.2).sum();
    Resident {
        own: (total - guest[0].2) * 1024,
        guest: guest[0].2 * 1024,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_an_anonymous_mapping_by_size_and_leaves_it_out() {
        const SIZE: usize = 8 << 20;
        // SAFETY: a fresh private anonymous mapping, touched below and
        // unmapped at the end; nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SIZE + 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // As Keel does with guest RAM: a flag of its own keeps the kernel
        // from merging it with a neighbouring anonymous mapping.
        // SAFETY: advice on the mapping just made.
        assert_eq!(
            unsafe { libc::madvise(p, SIZE + 4096, libc::MADV_DONTDUMP) },
            0
        );
        let before = resident(std::process::id(), (SIZE + 4096) as u64);
        // SAFETY: inside the mapping just made.
        unsafe { p.cast::<u8>().write_bytes(1, SIZE) };
        let after = resident(std::process::id(), (SIZE + 4096) as u64);
        assert!(
            after.guest >= before.guest + SIZE as u64,
            "{before:?} {after:?}"
        );
        assert!(
            after.own < before.own + (SIZE as u64) / 2,
            "the touched mapping counted as the process's own: {before:?} {after:?}"
        );
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(p, SIZE + 4096) };
    }
}
