//! I/O engines: io_uring (a whole queue's requests per submission,
//! completions found by polling the ring's fd) and a synchronous fallback.

use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, types, IoUring};

/// Which engine a disk uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring; falls back to `Sync` (with a warning) when the kernel
    /// refuses to create a ring.
    #[default]
    IoUring,
    /// preadv/pwritev/fdatasync on the device thread.
    Sync,
}

/// An io_uring; its fd polls readable while completions wait.
pub struct Uring {
    ring: IoUring,
    pending: usize,
}

/// One finished operation: its tag and result (bytes or -errno).
pub type Completion = (u64, i32);

impl Uring {
    /// A ring of `entries` entries.
    pub fn new(entries: u32) -> std::io::Result<Self> {
        let ring = IoUring::new(entries)?;
        Ok(Uring { ring, pending: 0 })
    }

    fn push(&mut self, entry: io_uring::squeue::Entry) -> std::io::Result<()> {
        // SAFETY: the caller of `readv`/`writev` guarantees the buffers
        // outlive the operation; fsync entries reference no memory.
        while unsafe { self.ring.submission().push(&entry) }.is_err() {
            // Submission queue full: hand what is queued to the kernel.
            self.ring.submit()?;
        }
        self.pending += 1;
        Ok(())
    }

    /// Queues a vectored read (or, with `write`, write) of `fd` at
    /// `offset` into (from) `iovecs`.
    ///
    /// # Safety
    /// `iovecs` and the memory it describes must stay valid and untouched
    /// until this operation's completion is returned by [`Self::complete`].
    pub unsafe fn rw(
        &mut self,
        write: bool,
        fd: RawFd,
        iovecs: &[libc::iovec],
        offset: u64,
        tag: u64,
    ) -> std::io::Result<()> {
        let (fd, ptr, n) = (types::Fd(fd), iovecs.as_ptr(), iovecs.len() as u32);
        let e = if write {
            opcode::Writev::new(fd, ptr, n).offset(offset).build()
        } else {
            opcode::Readv::new(fd, ptr, n).offset(offset).build()
        };
        self.push(e.user_data(tag))
    }

    /// Queues an fdatasync. It is not ordered against the other operations
    /// in the ring: the caller queues it once the writes it must cover have
    /// completed (see `FlushBarrier`).
    pub fn fsync(&mut self, fd: RawFd, tag: u64) -> std::io::Result<()> {
        let e = opcode::Fsync::new(types::Fd(fd))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(tag);
        self.push(e)
    }

    /// Queues an fallocate of `[offset, offset + len)` with `mode` (a
    /// discard or write-zeroes, which may take long: it must not run on the
    /// device thread).
    pub fn fallocate(
        &mut self,
        fd: RawFd,
        mode: i32,
        offset: u64,
        len: u64,
        tag: u64,
    ) -> std::io::Result<()> {
        let e = opcode::Fallocate::new(types::Fd(fd), len)
            .offset(offset)
            .mode(mode)
            .build()
            .user_data(tag);
        self.push(e)
    }

    /// Submits everything queued, in one system call (none when nothing
    /// is queued).
    pub fn submit(&mut self) -> std::io::Result<()> {
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        self.ring.submit().map(|_| ())
    }

    /// Hands every available completion to `f`.
    pub fn complete(&mut self, mut f: impl FnMut(Completion)) {
        for cqe in self.ring.completion() {
            self.pending = self.pending.saturating_sub(1);
            f((cqe.user_data(), cqe.result()));
        }
    }

    /// Operations queued and not completed yet.
    pub fn in_flight(&self) -> usize {
        self.pending
    }
}

/// The ring's fd: poll it (readable) for completions, as an eventfd
/// registered with the ring would signal them, minus a read per wake-up.
impl AsRawFd for Uring {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

/// Synchronous vectored read or write of exactly the iovecs' total length
/// (continuing after short transfers). Returns the bytes moved or -errno.
pub fn sync_rw(fd: RawFd, iovecs: &mut [libc::iovec], mut offset: u64, write: bool) -> i32 {
    let total: usize = iovecs.iter().map(|v| v.iov_len).sum();
    let mut done = 0usize;
    let mut first = 0usize;
    while done < total {
        let rest = &iovecs[first..];
        let off = match i64::try_from(offset) {
            Ok(o) => o,
            Err(_) => return -libc::EINVAL,
        };
        // SAFETY: the iovecs describe guest memory validated by the
        // request parser; the kernel reads/writes only within them.
        let n = unsafe {
            if write {
                libc::pwritev(fd, rest.as_ptr(), rest.len() as i32, off)
            } else {
                libc::preadv(fd, rest.as_ptr(), rest.len() as i32, off)
            }
        };
        if n < 0 {
            let e = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            if e == libc::EINTR {
                continue;
            }
            return -e;
        }
        if n == 0 {
            // EOF inside the disk: the file shrank under us.
            return -libc::EIO;
        }
        let mut n = n as usize;
        done += n;
        offset += n as u64;
        // Skip fully transferred iovecs, trim a partial one.
        while n > 0 && first < iovecs.len() {
            let v = &mut iovecs[first];
            if n >= v.iov_len {
                n -= v.iov_len;
                first += 1;
            } else {
                // SAFETY: advancing within the same buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                n = 0;
            }
        }
    }
    i32::try_from(done).unwrap_or(i32::MAX)
}
