//! The serial log file, capped in size and rotated like virtlogd's
//! `max_size`/`max_backups`: when the next write would take `PATH` past
//! `max_size`, `PATH.N-1` becomes `PATH.N` (the oldest is replaced),
//! ..., `PATH` becomes `PATH.1`, and a new, empty `PATH` is opened.
//!
//! It runs on the vCPU thread whose `OUT` to COM1 fills the log, so that
//! thread needs, besides `write`: `rename` (glibc's `rename(3)` on x86_64;
//! one per kept backup), `openat` (`O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC`)
//! and `close`.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A log file of at most `max_size` bytes, with `max_backups` rotated
/// predecessors.
#[derive(Debug)]
pub struct RotatingLog {
    path: PathBuf,
    file: File,
    /// Bytes in the current file (it starts empty: truncated at open).
    len: u64,
    max_size: u64,
    max_backups: u32,
    rotations: u64,
}

impl RotatingLog {
    /// Creates (or truncates) `path`. Older backups are left alone until
    /// the first rotation replaces them.
    pub fn create(path: &Path, max_size: u64, max_backups: u32) -> io::Result<Self> {
        Ok(RotatingLog {
            file: File::create(path)?,
            path: path.to_path_buf(),
            len: 0,
            max_size,
            max_backups,
            rotations: 0,
        })
    }

    /// How many times the log was rotated.
    pub fn rotations(&self) -> u64 {
        self.rotations
    }

    /// `PATH.n`.
    fn backup(&self, n: u32) -> PathBuf {
        let mut name = OsString::from(self.path.as_os_str());
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    /// Shifts the backups up by one, makes `PATH` the first and opens a
    /// new `PATH`.
    fn rotate(&mut self) -> io::Result<()> {
        for n in (1..self.max_backups).rev() {
            match std::fs::rename(self.backup(n), self.backup(n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        if self.max_backups > 0 {
            std::fs::rename(&self.path, self.backup(1))?;
        }
        self.file = File::create(&self.path)?;
        self.len = 0;
        self.rotations = self.rotations.saturating_add(1);
        Ok(())
    }
}

impl Write for RotatingLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let incoming = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        if self.len > 0 && self.len.saturating_add(incoming) > self.max_size {
            self.rotate()?;
        }
        let n = self.file.write(buf)?;
        self.len = self
            .len
            .saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("keel-serial-log-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn read(p: &Path) -> Vec<u8> {
        std::fs::read(p).unwrap()
    }

    #[test]
    fn rotates_at_max_size_and_keeps_max_backups() {
        let dir = scratch("rotate");
        let path = dir.join("console.log");
        let mut log = RotatingLog::create(&path, 10, 2).unwrap();
        // One byte at a time, as the UART writes: 35 bytes = 4 files.
        for &b in b"0123456789abcdefghijABCDEFGHIJxyzXY" {
            log.write_all(&[b]).unwrap();
        }
        assert_eq!(read(&path), b"xyzXY");
        assert_eq!(read(&dir.join("console.log.1")), b"ABCDEFGHIJ");
        assert_eq!(read(&dir.join("console.log.2")), b"abcdefghij");
        assert!(!dir.join("console.log.3").exists(), "the oldest is dropped");
        assert_eq!(log.rotations(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_backups_truncates_in_place() {
        let dir = scratch("nobackup");
        let path = dir.join("console.log");
        let mut log = RotatingLog::create(&path, 4, 0).unwrap();
        log.write_all(b"abcd").unwrap();
        log.write_all(b"ef").unwrap();
        assert_eq!(read(&path), b"ef");
        assert!(!dir.join("console.log.1").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_rotation_is_an_error_not_an_unbounded_file() {
        let dir = scratch("fail");
        let path = dir.join("console.log");
        let mut log = RotatingLog::create(&path, 4, 1).unwrap();
        log.write_all(b"abcd").unwrap();
        // PATH.1 is a non-empty directory: renaming PATH onto it fails.
        std::fs::create_dir_all(dir.join("console.log.1").join("x")).unwrap();
        assert!(log.write(b"e").is_err());
        assert_eq!(read(&path), b"abcd", "nothing written past max_size");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
