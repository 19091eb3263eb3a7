//! Read-only byte windows over the guest disk's backing file or block
//! device: the whole disk for the GPT, one partition for its filesystem.
//! Reads are positional (`pread`), so windows on one file never share a
//! seek offset; writes are refused, so no filesystem library can change
//! the disk behind Keel's back.

use std::fs::File;
use std::io::{Error, ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// `[start, start + len)` of `file`, as a read-only, seekable stream.
#[derive(Clone, Debug)]
pub struct Window {
    file: Arc<File>,
    start: u64,
    len: u64,
    pos: u64,
}

impl Window {
    /// The window `[start, start + len)` of `file`.
    pub fn new(file: Arc<File>, start: u64, len: u64) -> Self {
        Window {
            file,
            start,
            len,
            pos: 0,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where the window starts in the file.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Reads exactly `buf.len()` bytes at window offset `at`.
    pub fn read_exact_at(&self, buf: &mut [u8], at: u64) -> std::io::Result<()> {
        let end = at.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(Error::new(
                ErrorKind::UnexpectedEof,
                format!(
                    "read of {} bytes at {at} past the end ({} bytes)",
                    buf.len(),
                    self.len
                ),
            ));
        }
        self.file.read_exact_at(buf, self.start + at)
    }
}

impl Read for Window {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.read_exact_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Window {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let new = match to {
            SeekFrom::Start(o) => Some(o),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = new.ok_or_else(|| Error::new(ErrorKind::InvalidInput, "seek out of range"))?;
        Ok(self.pos)
    }
}

/// Refused: the filesystem libraries get a read-only view.
impl Write for Window {
    fn write(&mut self, _buf: &[u8]) -> std::io::Result<usize> {
        Err(Error::new(
            ErrorKind::PermissionDenied,
            "the boot disk is read through a read-only view",
        ))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ext4_view::Ext4Read for Window {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.read_exact_at(dst, start_byte).map_err(Into::into)
    }
}
