//! `grubenv` in the grub partition (FAT): reading it, and rewriting it in
//! place, crash-safe.
//!
//! Reading goes through the `fatfs` crate on a read-only view of the
//! partition. `fatfs` 0.3 does not say where a file's clusters are (0.4's
//! `File::extents` is not released), so [`locate`] finds them itself: the
//! boot sector's geometry, the root directory's 8.3 entry `GRUBENV` and its
//! FAT cluster chain. The bytes found there must equal what `fatfs` read, or
//! nothing is written.
//!
//! # Why the in-place write is crash-safe
//!
//! The FAT metadata (directory entry, size, cluster chain, dirty flag) is
//! never written: only the file's data bytes, in the clusters it already
//! has, so the filesystem is consistent whatever happens. Of the block,
//! only the 512-byte units that differ are written, each with one aligned
//! `pwrite` (a FAT cluster is a whole number of 512-byte sectors, and the
//! partition starts on one), then `fdatasync`, then a read-back check.
//! Keel refuses the write (before booting anything) when more than one
//! unit would change; GuestOS's grubenv (two short variables, the rest
//! `#` padding) only ever changes in its first unit. One sector is the unit
//! a disk writes atomically on power loss (a 4K-sector disk writes its
//! whole 4 KiB block atomically, and the page cache turns the 512-byte
//! write into that block's read-modify-write), and a process killed during
//! `pwrite` either has or has not copied those 512 bytes into the page
//! cache, never part of them (one copy within one page). So after a crash,
//! power loss or kill, the block is the old one or the new one.
//!
//! For tests, `KEEL_TEST_GRUBENV_STOP=before-write|before-sync` makes Keel
//! stop itself (SIGSTOP) at that point, so a test can kill it there.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;

use super::disk::Window;
use super::grubenv::BLOCK_SIZE;

/// Unit of the in-place write.
pub const UNIT: usize = 512;

/// What can go wrong with grubenv.
#[derive(Debug, thiserror::Error)]
pub enum FatError {
    /// `fatfs` refused the partition.
    #[error("not a readable FAT filesystem: {0}")]
    Fs(std::io::Error),
    /// No `grubenv` in the partition's root directory.
    #[error("no grubenv file in the root directory: {0}")]
    NoFile(std::io::Error),
    /// Reading it failed.
    #[error("cannot read grubenv: {0}")]
    Read(std::io::Error),
    /// It is not 1024 bytes long.
    #[error("grubenv has {0} bytes, want {BLOCK_SIZE}")]
    Size(u64),
    /// The boot sector or FAT is inconsistent.
    #[error("corrupt FAT filesystem: {0}")]
    Corrupt(String),
    /// The located clusters do not hold what `fatfs` read.
    #[error("grubenv's clusters (found through the FAT) do not hold what the filesystem read; not writing")]
    Mismatch,
    /// More than one 512-byte unit would change.
    #[error("the new grubenv differs from the old one in {0} 512-byte units; only a one-unit change can be written atomically")]
    NotAtomic(usize),
    /// The write, sync or read-back failed.
    #[error("cannot write grubenv: {0}")]
    Write(std::io::Error),
    /// The read-back differs from what was written.
    #[error("grubenv reads back differently after the write")]
    ReadBack,
}

/// Reads grubenv from the grub partition `part` with `fatfs`.
pub fn read_grubenv(part: &Window) -> Result<Vec<u8>, FatError> {
    let fs = fatfs::FileSystem::new(part.clone(), fatfs::FsOptions::new()).map_err(FatError::Fs)?;
    let mut f = fs
        .root_dir()
        .open_file("grubenv")
        .map_err(FatError::NoFile)?;
    let mut bytes = Vec::with_capacity(BLOCK_SIZE);
    f.by_ref()
        .take(BLOCK_SIZE as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(FatError::Read)?;
    if bytes.len() != BLOCK_SIZE {
        return Err(FatError::Size(bytes.len() as u64));
    }
    Ok(bytes)
}

fn le16(b: &[u8], at: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn le32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}

fn corrupt(why: impl Into<String>) -> FatError {
    FatError::Corrupt(why.into())
}

/// FAT geometry from the boot sector.
struct Geometry {
    cluster_bytes: u64,
    fat_start: u64,
    root_dir: Option<(u64, u64)>,
    root_cluster: u64,
    data_start: u64,
    clusters: u64,
    bits: u32,
}

impl Geometry {
    fn read(part: &Window) -> Result<Self, FatError> {
        let mut bs = [0u8; 512];
        part.read_exact_at(&mut bs, 0).map_err(FatError::Read)?;
        let bps = le16(&bs, 11);
        let spc = u64::from(bs[13]);
        let reserved = le16(&bs, 14);
        let fats = u64::from(bs[16]);
        let root_entries = le16(&bs, 17);
        let total = match le16(&bs, 19) {
            0 => le32(&bs, 32),
            n => n,
        };
        let fat_size = match le16(&bs, 22) {
            0 => le32(&bs, 36),
            n => n,
        };
        if !bps.is_power_of_two() || !(512..=4096).contains(&bps) {
            return Err(corrupt(format!("bytes per sector {bps}")));
        }
        if !spc.is_power_of_two() || reserved == 0 || fats == 0 || fat_size == 0 {
            return Err(corrupt("bad boot sector geometry"));
        }
        let root_sectors = (root_entries * 32).div_ceil(bps);
        let data_sector = reserved + fats * fat_size + root_sectors;
        let clusters = total
            .checked_sub(data_sector)
            .ok_or_else(|| corrupt("data region past the end"))?
            / spc;
        if total * bps > part.len() {
            return Err(corrupt("filesystem larger than its partition"));
        }
        let bits = if clusters < 4085 {
            12
        } else if clusters < 65525 {
            16
        } else {
            32
        };
        let root_dir =
            (bits != 32).then(|| ((reserved + fats * fat_size) * bps, root_entries * 32));
        Ok(Geometry {
            cluster_bytes: bps * spc,
            fat_start: reserved * bps,
            root_dir,
            root_cluster: le32(&bs, 44) & 0x0fff_ffff,
            data_start: data_sector * bps,
            clusters,
            bits,
        })
    }

    fn cluster_offset(&self, c: u64) -> Result<u64, FatError> {
        if c < 2 || c >= self.clusters + 2 {
            return Err(corrupt(format!("cluster {c} out of range")));
        }
        Ok(self.data_start + (c - 2) * self.cluster_bytes)
    }

    /// The next cluster of a chain, `None` at its end.
    fn next(&self, part: &Window, c: u64) -> Result<Option<u64>, FatError> {
        let mut b = [0u8; 4];
        let (at, len) = match self.bits {
            12 => (c + c / 2, 2),
            16 => (c * 2, 2),
            _ => (c * 4, 4),
        };
        part.read_exact_at(&mut b[..len], self.fat_start + at)
            .map_err(FatError::Read)?;
        let v = le32(&b, 0);
        let (v, end) = match self.bits {
            12 => (if c & 1 == 1 { v >> 4 } else { v & 0xfff }, 0xff8),
            16 => (v, 0xfff8),
            _ => (v & 0x0fff_ffff, 0x0fff_fff8),
        };
        Ok((v < end).then_some(v))
    }

    /// Byte ranges (partition offsets) holding the first `len` bytes of the
    /// chain starting at `first`.
    fn extents(&self, part: &Window, first: u64, len: u64) -> Result<Vec<(u64, u64)>, FatError> {
        let mut out = Vec::new();
        let mut c = Some(first);
        let mut left = len;
        while left > 0 {
            let cl = c.ok_or_else(|| corrupt("cluster chain shorter than the file"))?;
            let n = left.min(self.cluster_bytes);
            out.push((self.cluster_offset(cl)?, n));
            left -= n;
            if out.len() as u64 > self.clusters {
                return Err(corrupt("cluster chain loops"));
            }
            if left > 0 {
                c = self.next(part, cl)?;
            }
        }
        Ok(out)
    }
}

/// Where in the partition the 1024 bytes of grubenv are, as byte ranges in
/// file order, found through the root directory's `GRUBENV` 8.3 entry.
pub fn locate(part: &Window) -> Result<Vec<(u64, u64)>, FatError> {
    let g = Geometry::read(part)?;
    // The root directory: fixed region (FAT12/16) or a cluster chain.
    let dir: Vec<(u64, u64)> = match g.root_dir {
        Some(region) => vec![region],
        None => {
            let mut v = Vec::new();
            let mut c = Some(g.root_cluster);
            while let Some(cl) = c {
                v.push((g.cluster_offset(cl)?, g.cluster_bytes));
                if v.len() as u64 > g.clusters {
                    return Err(corrupt("root directory chain loops"));
                }
                c = g.next(part, cl)?;
            }
            v
        }
    };
    for (at, len) in dir {
        let mut buf = vec![0u8; usize::try_from(len).map_err(|_| corrupt("huge directory"))?];
        part.read_exact_at(&mut buf, at).map_err(FatError::Read)?;
        for e in buf.chunks_exact(32) {
            if e[0] == 0 {
                break;
            }
            let attr = e[11];
            if e[0] == 0xe5 || attr & 0x0f == 0x0f || attr & 0x18 != 0 {
                continue;
            }
            if &e[..11] == b"GRUBENV    " {
                let first = (le16(e, 20) << 16) | le16(e, 26);
                let size = le32(e, 28);
                if size != BLOCK_SIZE as u64 {
                    return Err(FatError::Size(size));
                }
                return g.extents(part, first, size);
            }
        }
    }
    Err(FatError::NoFile(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        "no GRUBENV 8.3 entry in the root directory",
    )))
}

/// The byte-level operations of the in-place write (a trait so tests can
/// inject failures).
pub trait BlockWriter {
    /// Writes all of `buf` at disk offset `at`.
    fn write_at(&mut self, buf: &[u8], at: u64) -> std::io::Result<()>;
    /// Makes the writes durable.
    fn sync(&mut self) -> std::io::Result<()>;
    /// Reads exactly `buf.len()` bytes at disk offset `at`.
    fn read_at(&mut self, buf: &mut [u8], at: u64) -> std::io::Result<()>;
}

impl BlockWriter for &File {
    fn write_at(&mut self, buf: &[u8], at: u64) -> std::io::Result<()> {
        FileExt::write_all_at(*self, buf, at)
    }

    fn sync(&mut self) -> std::io::Result<()> {
        self.sync_data()
    }

    fn read_at(&mut self, buf: &mut [u8], at: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(*self, buf, at)
    }
}

/// The disk offset of each 512-byte unit of the block, from the extents
/// (partition offsets) and the partition's start on the disk.
fn unit_offsets(extents: &[(u64, u64)], part_start: u64) -> Result<Vec<u64>, FatError> {
    let mut out = Vec::with_capacity(BLOCK_SIZE / UNIT);
    for &(at, len) in extents {
        if at % UNIT as u64 != 0 || len % UNIT as u64 != 0 {
            return Err(corrupt("grubenv's clusters are not sector aligned"));
        }
        out.extend((0..len / UNIT as u64).map(|k| part_start + at + k * UNIT as u64));
    }
    if out.len() != BLOCK_SIZE / UNIT {
        return Err(corrupt("grubenv's clusters do not cover 1024 bytes"));
    }
    Ok(out)
}

/// Replaces `old` (what was read) with `new` in place: checks that the
/// located units hold `old`, writes the one unit that differs, syncs,
/// reads back. See the module documentation for why this is crash-safe.
pub fn write_in_place(
    w: &mut impl BlockWriter,
    extents: &[(u64, u64)],
    part_start: u64,
    old: &[u8],
    new: &[u8],
) -> Result<(), FatError> {
    let units = unit_offsets(extents, part_start)?;
    let mut on_disk = vec![0u8; BLOCK_SIZE];
    for (k, &at) in units.iter().enumerate() {
        w.read_at(&mut on_disk[k * UNIT..(k + 1) * UNIT], at)
            .map_err(FatError::Read)?;
    }
    if on_disk != old || new.len() != BLOCK_SIZE {
        return Err(FatError::Mismatch);
    }
    let changed: Vec<usize> = (0..units.len())
        .filter(|&k| old[k * UNIT..(k + 1) * UNIT] != new[k * UNIT..(k + 1) * UNIT])
        .collect();
    let k = match changed.as_slice() {
        [] => return Ok(()),
        [k] => *k,
        more => return Err(FatError::NotAtomic(more.len())),
    };
    test_stop("before-write");
    w.write_at(&new[k * UNIT..(k + 1) * UNIT], units[k])
        .map_err(FatError::Write)?;
    test_stop("before-sync");
    w.sync().map_err(FatError::Write)?;
    let mut back = [0u8; UNIT];
    w.read_at(&mut back, units[k]).map_err(FatError::Write)?;
    if back[..] != new[k * UNIT..(k + 1) * UNIT] {
        return Err(FatError::ReadBack);
    }
    Ok(())
}

/// The test hook: stops the process (SIGSTOP) at `point` when
/// `KEEL_TEST_GRUBENV_STOP` names it.
fn test_stop(point: &str) {
    if std::env::var("KEEL_TEST_GRUBENV_STOP").is_ok_and(|v| v == point) {
        log::warn!("KEEL_TEST_GRUBENV_STOP={point}: stopping");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::grubenv::block;

    /// A disk in memory whose writer can fail at a chosen step.
    struct FaultyDisk {
        bytes: Vec<u8>,
        /// Fail the n-th write (0-based) before writing anything.
        fail_write: Option<usize>,
        fail_sync: bool,
        writes: usize,
    }

    impl BlockWriter for FaultyDisk {
        fn write_at(&mut self, buf: &[u8], at: u64) -> std::io::Result<()> {
            let n = self.writes;
            self.writes += 1;
            if self.fail_write == Some(n) {
                return Err(std::io::Error::other("injected write failure"));
            }
            self.bytes[at as usize..at as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn sync(&mut self) -> std::io::Result<()> {
            if self.fail_sync {
                return Err(std::io::Error::other("injected sync failure"));
            }
            Ok(())
        }
        fn read_at(&mut self, buf: &mut [u8], at: u64) -> std::io::Result<()> {
            buf.copy_from_slice(&self.bytes[at as usize..at as usize + buf.len()]);
            Ok(())
        }
    }

    fn disk(old: &[u8]) -> FaultyDisk {
        // Partition at 4096; grubenv split over two clusters: 512 bytes at
        // 0x3000, 512 at 0x1000 (a fragmented chain).
        let mut bytes = vec![0u8; 0x8000];
        bytes[4096 + 0x3000..4096 + 0x3200].copy_from_slice(&old[..512]);
        bytes[4096 + 0x1000..4096 + 0x1200].copy_from_slice(&old[512..]);
        FaultyDisk {
            bytes,
            fail_write: None,
            fail_sync: false,
            writes: 0,
        }
    }

    const EXTENTS: [(u64, u64); 2] = [(0x3000, 512), (0x1000, 512)];

    fn block_on(d: &FaultyDisk) -> Vec<u8> {
        let mut b = d.bytes[4096 + 0x3000..4096 + 0x3200].to_vec();
        b.extend_from_slice(&d.bytes[4096 + 0x1000..4096 + 0x1200]);
        b
    }

    #[test]
    fn only_the_changed_unit_is_written() {
        let old = block("boot_alternative=A\nboot_cycle=first_boot\n");
        let new = block("boot_alternative=A\nboot_cycle=failsafe_check\n");
        let mut d = disk(&old);
        write_in_place(&mut d, &EXTENTS, 4096, &old, &new).unwrap();
        assert_eq!(block_on(&d), new);
        assert_eq!(d.writes, 1);
        // Unchanged: nothing written.
        let mut d = disk(&new);
        write_in_place(&mut d, &EXTENTS, 4096, &new, &new).unwrap();
        assert_eq!(d.writes, 0);
    }

    #[test]
    fn a_failing_writer_leaves_the_old_or_the_new_block() {
        let old = block("boot_alternative=B\nboot_cycle=failsafe_check\n");
        let new = block("boot_alternative=A\nboot_cycle=stable\n");
        let mut d = disk(&old);
        d.fail_write = Some(0);
        assert!(matches!(
            write_in_place(&mut d, &EXTENTS, 4096, &old, &new),
            Err(FatError::Write(_))
        ));
        assert_eq!(block_on(&d), old, "a failed write leaves the old block");
        let mut d = disk(&old);
        d.fail_sync = true;
        assert!(write_in_place(&mut d, &EXTENTS, 4096, &old, &new).is_err());
        assert_eq!(block_on(&d), new, "written but not synced: the new block");
    }

    #[test]
    fn refuses_a_mismatch_and_a_two_unit_change() {
        let old = block("boot_cycle=stable\n");
        let new = block("boot_cycle=install\n");
        let mut d = disk(&old);
        d.bytes[4096 + 0x3000 + 30] ^= 1;
        assert!(matches!(
            write_in_place(&mut d, &EXTENTS, 4096, &old, &new),
            Err(FatError::Mismatch)
        ));
        assert_eq!(d.writes, 0);
        let long_old = block(&format!("x={}\nboot_cycle=install\n", "v".repeat(500)));
        let long_new = block(&format!("boot_cycle=stable\nx={}\n", "v".repeat(500)));
        let mut d = disk(&long_old);
        assert!(matches!(
            write_in_place(&mut d, &EXTENTS, 4096, &long_old, &long_new),
            Err(FatError::NotAtomic(2))
        ));
        assert_eq!(block_on(&d), long_old);
    }
}
