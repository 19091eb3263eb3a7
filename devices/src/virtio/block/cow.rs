//! Copy-on-write range of a disk (`[[disks]] cow`): HostOS gives its
//! upgrade VM the store partition through a device-mapper snapshot onto a
//! 512 MiB temporary device; this does the same inside virtio-blk, where
//! device-mapper may be absent.
//!
//! Writes to `[start, start + len)` go to an overlay: an unlinked temporary
//! file (`O_TMPFILE`, so it is gone when Keel exits, even when killed) that
//! holds each written 512-byte sector once, in the order first written, with
//! a map from disk sector to overlay slot. Reads of the range see the
//! overlay's sectors and the disk's elsewhere. The overlay holds at most
//! `limit` bytes: a write that would need more fails as a whole (IOERR,
//! counted), before anything of it is written. DISCARD in the range does
//! nothing (the disk's bytes stay readable, which DISCARD allows);
//! WRITE_ZEROES there writes zeroed sectors to the overlay.
//! Requests that touch the range are served synchronously on the device
//! thread; the rest of the disk keeps the configured engine.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::device::SECTOR_SIZE;

/// A disk's copy-on-write range and the overlay's size limit, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CowRange {
    /// First byte of the range (sector aligned).
    pub start: u64,
    /// Length of the range in bytes (whole sectors).
    pub len: u64,
    /// Most bytes the overlay may hold.
    pub limit: u64,
}

/// Why an overlay operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CowError {
    /// The write needs more than the overlay's limit.
    #[error("copy-on-write overlay full ({limit} bytes)")]
    Limit {
        /// The limit.
        limit: u64,
    },
    /// The disk or the overlay file failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The overlay of one disk.
#[derive(Debug)]
pub struct CowOverlay {
    range: CowRange,
    file: File,
    slots: HashMap<u64, u64>,
}

const SECTOR: usize = SECTOR_SIZE as usize;

impl CowOverlay {
    /// An empty overlay for `range`, its file unlinked in `dir`.
    pub fn new(range: CowRange, dir: &Path) -> std::io::Result<Self> {
        if !range.start.is_multiple_of(SECTOR_SIZE) || !range.len.is_multiple_of(SECTOR_SIZE) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "copy-on-write range not sector aligned",
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
            .open(dir)?;
        Ok(CowOverlay {
            range,
            file,
            slots: HashMap::new(),
        })
    }

    /// The range and limit.
    pub fn range(&self) -> CowRange {
        self.range
    }

    /// Bytes the overlay holds now.
    pub fn used(&self) -> u64 {
        self.slots.len() as u64 * SECTOR_SIZE
    }

    /// Whether `[off, off + len)` touches the range.
    pub fn overlaps(&self, off: u64, len: u64) -> bool {
        off < self.range.start + self.range.len && off.saturating_add(len) > self.range.start
    }

    fn in_range(&self, sector_off: u64) -> bool {
        sector_off >= self.range.start && sector_off < self.range.start + self.range.len
    }

    /// Reads `buf.len()` bytes at disk offset `off` (whole sectors): the
    /// disk's bytes, then the overlay's sectors over them.
    pub fn read(&self, disk: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        disk.read_exact_at(buf, off)?;
        for (k, chunk) in buf.chunks_exact_mut(SECTOR).enumerate() {
            let at = off + (k * SECTOR) as u64;
            if let Some(slot) = self.slots.get(&at) {
                self.file.read_exact_at(chunk, slot * SECTOR_SIZE)?;
            }
        }
        Ok(())
    }

    /// Writes `buf` at disk offset `off` (whole sectors): the range's
    /// sectors to the overlay, the rest to the disk. Nothing is written
    /// when the overlay would exceed its limit.
    pub fn write(&mut self, disk: &File, buf: &[u8], off: u64) -> Result<(), CowError> {
        let fresh = (0..buf.len() / SECTOR)
            .map(|k| off + (k * SECTOR) as u64)
            .filter(|&at| self.in_range(at) && !self.slots.contains_key(&at))
            .count() as u64;
        if self.used() + fresh * SECTOR_SIZE > self.range.limit {
            return Err(CowError::Limit {
                limit: self.range.limit,
            });
        }
        for (k, chunk) in buf.chunks_exact(SECTOR).enumerate() {
            let at = off + (k * SECTOR) as u64;
            if self.in_range(at) {
                let next = self.slots.len() as u64;
                let slot = *self.slots.entry(at).or_insert(next);
                self.file.write_all_at(chunk, slot * SECTOR_SIZE)?;
            }
        }
        // The parts outside the range, before and after it.
        let end = off + buf.len() as u64;
        let (r0, r1) = (self.range.start, self.range.start + self.range.len);
        if off < r0 {
            disk.write_all_at(&buf[..(r0.min(end) - off) as usize], off)?;
        }
        if end > r1 {
            let from = r1.max(off);
            disk.write_all_at(&buf[(from - off) as usize..], from)?;
        }
        Ok(())
    }

    /// The part of `[off, off + len)` outside the range, as up to two
    /// pieces (before and after it), for DISCARD and WRITE_ZEROES on the
    /// disk itself.
    pub fn outside(&self, off: u64, len: u64) -> Vec<(u64, u64)> {
        let end = off + len;
        let (r0, r1) = (self.range.start, self.range.start + self.range.len);
        let mut v = Vec::new();
        if off < r0 {
            v.push((off, r0.min(end) - off));
        }
        if end > r1 {
            let from = r1.max(off);
            v.push((from, end - from));
        }
        v
    }

    /// WRITE_ZEROES of `[off, off + len)` inside the range: zeroed sectors
    /// in the overlay (the limit applies, to the whole request, before
    /// anything is written; the zeroes are written from a small buffer, so a
    /// large request costs no large allocation).
    pub fn zero_inside(&mut self, disk: &File, off: u64, len: u64) -> Result<(), CowError> {
        let r0 = self.range.start.max(off);
        let r1 = (self.range.start + self.range.len).min(off.saturating_add(len));
        if r0 >= r1 {
            return Ok(());
        }
        let held = self.slots.keys().filter(|&&at| at >= r0 && at < r1).count() as u64;
        let fresh = (r1 - r0) / SECTOR_SIZE - held;
        if self.used() + fresh * SECTOR_SIZE > self.range.limit {
            return Err(CowError::Limit {
                limit: self.range.limit,
            });
        }
        let zeroes = vec![0u8; ZERO_CHUNK.min((r1 - r0) as usize)];
        let mut at = r0;
        while at < r1 {
            let n = zeroes.len().min((r1 - at) as usize);
            self.write(disk, &zeroes[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }
}

/// Bytes of zeroes written to the overlay at a time.
const ZERO_CHUNK: usize = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str) -> (std::path::PathBuf, File) {
        let p = std::env::temp_dir().join(format!("keel-cow-{name}-{}", std::process::id()));
        std::fs::write(&p, vec![0x11u8; 64 * 512]).unwrap();
        let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        (p, f)
    }

    #[test]
    fn writes_in_the_range_stay_in_the_overlay_and_read_back() {
        let (p, f) = disk("rw");
        let range = CowRange {
            start: 16 * 512,
            len: 16 * 512,
            limit: 8 * 512,
        };
        let mut c = CowOverlay::new(range, &std::env::temp_dir()).unwrap();
        // Straddles the range's start: 4 sectors before, 4 inside.
        let data: Vec<u8> = (0..8 * 512).map(|i| (i % 251) as u8).collect();
        c.write(&f, &data, 12 * 512).unwrap();
        assert_eq!(c.used(), 4 * 512);
        let mut back = vec![0u8; 8 * 512];
        c.read(&f, &mut back, 12 * 512).unwrap();
        assert_eq!(back, data, "reads see the overlay");
        let host = std::fs::read(&p).unwrap();
        assert_eq!(
            &host[12 * 512..16 * 512],
            &data[..4 * 512],
            "outside: on disk"
        );
        assert!(
            host[16 * 512..32 * 512].iter().all(|b| *b == 0x11),
            "inside: not"
        );
        // Rewriting the same sectors takes no more room.
        c.write(&f, &data[4 * 512..], 16 * 512).unwrap();
        assert_eq!(c.used(), 4 * 512);
        // Over the limit: refused as a whole, nothing written anywhere.
        let err = c.write(&f, &vec![0xeeu8; 8 * 512], 24 * 512).unwrap_err();
        assert!(matches!(err, CowError::Limit { limit: 4096 }), "{err}");
        let host2 = std::fs::read(&p).unwrap();
        assert_eq!(host, host2);
        c.read(&f, &mut back[..512], 24 * 512).unwrap();
        assert!(back[..512].iter().all(|b| *b == 0x11));
        // Zeroes inside the range, pieces outside it.
        c.zero_inside(&f, 30 * 512, 4 * 512).unwrap();
        c.read(&f, &mut back[..1024], 31 * 512).unwrap();
        assert!(back[..512].iter().all(|b| *b == 0) && back[512..1024].iter().all(|b| *b == 0x11));
        assert_eq!(c.outside(30 * 512, 4 * 512), vec![(32 * 512, 2 * 512)]);
        assert_eq!(
            c.outside(8 * 512, 32 * 512),
            vec![(8 * 512, 8 * 512), (32 * 512, 8 * 512)]
        );
        assert!(!c.overlaps(32 * 512, 512) && c.overlaps(31 * 512, 1024));
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn zeroes_inside_a_large_range_are_checked_whole_then_written_in_chunks() {
        let (p, f) = disk("zeroes");
        let mib = 1u64 << 20;
        // A range far larger than the disk file and the limit: the request
        // is refused as a whole before anything (or any buffer its size)
        // is made.
        let range = CowRange {
            start: 0,
            len: 1 << 40,
            limit: 3 * mib,
        };
        let mut c = CowOverlay::new(range, &std::env::temp_dir()).unwrap();
        let err = c.zero_inside(&f, 0, 1 << 40).unwrap_err();
        assert!(matches!(err, CowError::Limit { .. }), "{err}");
        assert_eq!(c.used(), 0);
        // Sectors already held count once: 1 MiB written, then 3 MiB of
        // zeroes over it fit a 3 MiB limit, across several chunks.
        c.write(&f, &vec![0x5au8; mib as usize], 0).unwrap();
        c.zero_inside(&f, 0, 3 * mib).unwrap();
        assert_eq!(c.used(), 3 * mib);
        let mut back = vec![0xffu8; 3 * mib as usize];
        c.file.read_exact_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|b| *b == 0));
        // One more sector is over the limit.
        assert!(c.zero_inside(&f, 3 * mib, 512).is_err());
        std::fs::remove_file(&p).unwrap();
    }
}
