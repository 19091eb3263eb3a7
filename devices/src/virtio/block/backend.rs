//! The disk's backing: a block device (LVM volume, loop device) or a
//! regular file. Capacity of a block device comes from BLKGETSIZE64;
//! discard and write-zeroes use BLKDISCARD/BLKZEROOUT on block devices and
//! fallocate on files.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use super::device::SECTOR_SIZE;

// <linux/fs.h> ioctls.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// Errors of opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// open(2) failed.
    #[error("cannot open disk {path}: {source}")]
    Open {
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Another process holds the disk.
    #[error("disk {0} is in use by another process (locked)")]
    Locked(String),
    /// Neither a block device nor a regular file.
    #[error("disk {0} is neither a block device nor a regular file")]
    NotADisk(String),
    /// Size query failed.
    #[error("cannot read the size of disk {path}: {source}")]
    Size {
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Size not a whole number of sectors, or zero.
    #[error("disk {path} has {size} bytes: not a positive multiple of 512")]
    BadSize {
        /// The path.
        path: String,
        /// Its size.
        size: u64,
    },
}

/// An open disk.
#[derive(Debug)]
pub struct DiskBackend {
    file: File,
    capacity: u64,
    block_device: bool,
    read_only: bool,
}

impl DiskBackend {
    /// Opens `path` (O_DIRECT when `direct`), takes an advisory lock
    /// (exclusive for read-write, shared for read-only) so two VMMs never
    /// share a writable disk, and reads its capacity.
    pub fn open(path: &Path, read_only: bool, direct: bool) -> Result<Self, DiskError> {
        Self::open_locked(path, read_only, direct, false)
    }

    /// [`open`](Self::open), but with `shared` a read-write disk takes a
    /// shared lock too: processes that all say so may use it at the same time
    /// (each writing its own part of it), and none of them can while another
    /// holds it exclusively.
    pub fn open_locked(
        path: &Path,
        read_only: bool,
        direct: bool,
        shared: bool,
    ) -> Result<Self, DiskError> {
        let shown = path.display().to_string();
        let mut flags = libc::O_CLOEXEC;
        if direct {
            flags |= libc::O_DIRECT;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(flags)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: shown.clone(),
                source,
            })?;
        let lock = if read_only || shared {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
            return Err(DiskError::Locked(shown));
        }
        let meta = file.metadata().map_err(|source| DiskError::Size {
            path: shown.clone(),
            source,
        })?;
        let (capacity, block_device) = if meta.file_type().is_block_device() {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 to the pointer given,
            // which points at a live local.
            let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
            if r != 0 {
                return Err(DiskError::Size {
                    path: shown,
                    source: std::io::Error::last_os_error(),
                });
            }
            (size, true)
        } else if meta.is_file() {
            (meta.len(), false)
        } else {
            return Err(DiskError::NotADisk(shown));
        };
        if capacity == 0 || capacity % SECTOR_SIZE != 0 {
            return Err(DiskError::BadSize {
                path: shown,
                size: capacity,
            });
        }
        Ok(DiskBackend {
            file,
            capacity,
            block_device,
            read_only,
        })
    }

    /// Size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the backing is a block device (rather than a file).
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// Whether the disk was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The open file (for reading a partition table before the device
    /// takes the disk); its lock goes with it.
    pub fn into_file(self) -> File {
        self.file
    }

    /// Another descriptor of the open file (sharing its lock).
    pub fn try_clone_file(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }

    /// A second handle on the same disk (a duplicated descriptor, sharing
    /// the lock), for the trim worker.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(DiskBackend {
            file: self.file.try_clone()?,
            capacity: self.capacity,
            block_device: self.block_device,
            read_only: self.read_only,
        })
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The file descriptor, for the I/O engines.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }

    /// Makes written data durable (fdatasync).
    pub fn flush(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocates `[offset, offset + len)`; reads of it return zeros after.
    pub fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if self.block_device {
            self.range_ioctl(BLKDISCARD, offset, len)
        } else {
            self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        }
    }

    /// Zeroes `[offset, offset + len)`, deallocating it if `unmap`.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> std::io::Result<()> {
        if self.block_device {
            return self.range_ioctl(BLKZEROOUT, offset, len);
        }
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        self.fallocate(mode, offset, len).or_else(|e| {
            // Some file systems lack ZERO_RANGE; a punched hole reads as zeros.
            if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                self.fallocate(
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                )
            } else {
                Err(e)
            }
        })
    }

    /// The fallocate mode that discards (`zeroes` false) or zeroes a range
    /// (deallocating it if `unmap`) on this disk, for an asynchronous
    /// fallocate; `None` where only an ioctl does it (discard on a block
    /// device).
    pub fn trim_mode(&self, zeroes: bool, unmap: bool) -> Option<i32> {
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        match (self.block_device, zeroes, unmap) {
            // On a block device ZERO_RANGE is BLKZEROOUT.
            (true, true, _) => Some(libc::FALLOC_FL_ZERO_RANGE | keep),
            (true, false, _) => None,
            (false, true, false) => Some(libc::FALLOC_FL_ZERO_RANGE | keep),
            (false, _, _) => Some(libc::FALLOC_FL_PUNCH_HOLE | keep),
        }
    }

    fn range_ioctl(&self, req: libc::c_ulong, offset: u64, len: u64) -> std::io::Result<()> {
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKDISCARD/BLKZEROOUT read two u64s from the pointer,
        // which points at a live local array.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), req, range.as_ptr()) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
        let (off, len) = match (i64::try_from(offset), i64::try_from(len)) {
            (Ok(o), Ok(l)) => (o, l),
            _ => return Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
        };
        // SAFETY: fallocate on a descriptor we own; no memory is involved.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}
