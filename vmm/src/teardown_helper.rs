//! Undoing the NICs' host set-up at exit once Keel has no privileges left.
//!
//! Taking a pre-existing tap off the bridge Keel put it on (and deleting a
//! tap Keel created) needs CAP_NET_ADMIN, which the VMM drops before the
//! guest runs. So, before the drop and while it is the only thread, Keel
//! forks a helper that keeps its privileges and nothing else: it closes
//! every descriptor but its two pipes and waits. At the VM's end the VMM
//! tells it to go and waits for its answer; if the VMM dies instead (killed,
//! a seccomp violation), the helper sees its pipe close and cleans up all
//! the same.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use devices::virtio::net::TapTeardown;
use log::warn;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The helper process, seen from the VMM.
#[derive(Debug)]
pub struct TeardownHelper {
    go: File,
    done: File,
    pid: libc::pid_t,
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Forks the helper that will run `teardown` (nothing to fork for none).
/// Guest memory is marked `MADV_DONTFORK` first: the helper must not share
/// it copy-on-write (every guest write would then copy a page). Call while
/// the process has a single thread.
pub fn spawn(
    teardown: Vec<TapTeardown>,
    memory: &GuestMemoryMmap,
) -> std::io::Result<Option<TeardownHelper>> {
    if teardown.is_empty() {
        return Ok(None);
    }
    for region in memory.iter() {
        // SAFETY: madvise on a mapping vm-memory owns, for its whole length;
        // MADV_DONTFORK changes only what a fork inherits.
        let r = unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_DONTFORK,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let (go_r, go_w) = pipe()?;
    let (done_r, done_w) = pipe()?;
    // SAFETY: the caller guarantees a single thread, so the child's copy of
    // the process is consistent (no lock held by another thread).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        helper_main(teardown, go_r, done_w);
    }
    // The helper owns the teardown now: dropping it here would undo the
    // set-up at once.
    std::mem::forget(teardown);
    drop((go_r, done_w));
    Ok(Some(TeardownHelper {
        go: File::from(go_w),
        done: File::from(done_r),
        pid,
    }))
}

fn helper_main(teardown: Vec<TapTeardown>, go: OwnedFd, done: OwnedFd) -> ! {
    // Keep stdio (logs) and the two pipes, moved to 3 and 4.
    // SAFETY: dup2/close_range on descriptors; nothing else refers to the
    // closed ones in this single-threaded child.
    unsafe {
        let (g, d) = (go.as_raw_fd(), done.as_raw_fd());
        let g2 = libc::fcntl(g, libc::F_DUPFD_CLOEXEC, 10);
        let d2 = libc::fcntl(d, libc::F_DUPFD_CLOEXEC, 10);
        libc::dup2(g2, 3);
        libc::dup2(d2, 4);
        libc::close_range(5, u32::MAX, 0);
        let _ = libc::prctl(libc::PR_SET_NAME, c"keel-teardown".as_ptr());
    }
    std::mem::forget((go, done));
    // Confined like a thread of Keel (the filters and the SIGSYS handler
    // were set up before the fork). Unconfined it would not go on: it
    // holds CAP_NET_ADMIN.
    if let Err(e) = crate::seccomp::apply_current(crate::seccomp::ThreadKind::Teardown) {
        log::error!("net: the teardown helper cannot confine itself: {e}");
        // SAFETY: _exit ends the child without running the parent's exit code.
        unsafe { libc::_exit(i32::from(crate::seccomp::EXIT_SECCOMP)) }
    }
    // SAFETY: 3 and 4 are the pipes just placed there.
    let (mut go, mut done) = unsafe { (File::from_raw_fd(3), File::from_raw_fd(4)) };
    let mut b = [0u8; 1];
    // A byte: the VMM is done. End of file: the VMM is gone.
    let _ = go.read(&mut b);
    drop(teardown);
    let _ = done.write_all(b"1");
    // SAFETY: _exit ends the child without running the parent's exit code.
    unsafe { libc::_exit(0) }
}

impl TeardownHelper {
    /// Has the helper undo the set-up, waits for it to finish and reaps it.
    pub fn finish(mut self) {
        let mut b = [0u8; 1];
        if self.go.write_all(b"1").is_err() || self.done.read(&mut b).is_err() {
            warn!("net: the teardown helper did not answer; taps may be left as they are");
        }
        // SAFETY: waitpid on our own child, no status pointer.
        unsafe { libc::waitpid(self.pid, std::ptr::null_mut(), 0) };
    }
}
