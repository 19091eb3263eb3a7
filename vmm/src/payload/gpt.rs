//! Finding a partition in the disk's GPT (with the `gpt` crate, read-only):
//! by its unique partition GUID (how the GuestOS boot finds its grub and
//! boot partitions) or by its number (`[[disks]] cow = "partition:N"`).

use std::fs::File;
use std::sync::Arc;

use gpt::disk::LogicalBlockSize;
use gpt::partition::Partition;

use super::disk::Window;

/// A GPT that cannot be read, or a partition it lacks.
#[derive(Debug, thiserror::Error)]
pub enum GptError {
    /// No valid GPT header (primary or backup) or partition table.
    #[error("no valid GPT: {0}")]
    NoGpt(String),
    /// No partition with this unique GUID.
    #[error("no partition with unique GUID {guid} ({name})")]
    NoGuid {
        /// The GUID looked for.
        guid: String,
        /// What the partition is (grub, A_boot, ...).
        name: &'static str,
    },
    /// No partition with this number.
    #[error("the GPT has no partition {0}")]
    NoNumber(u32),
    /// A partition entry lies outside the disk.
    #[error("partition {number} ({first}..={last} in 512-byte sectors) lies outside the disk ({disk} bytes)")]
    OutOfDisk {
        /// Its number.
        number: u32,
        /// First LBA.
        first: u64,
        /// Last LBA.
        last: u64,
        /// Disk size in bytes.
        disk: u64,
    },
}

/// A partition's place on the disk, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionRange {
    /// Its number in the GPT (1-based).
    pub number: u32,
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The partitions of the disk `[0, size)` of `file`.
pub struct Table {
    parts: Vec<(u32, Partition)>,
    size: u64,
}

impl Table {
    /// Reads the GPT of `file` (`size` bytes), 512-byte logical blocks.
    pub fn read(file: Arc<File>, size: u64) -> Result<Self, GptError> {
        let disk = gpt::GptConfig::new()
            .writable(false)
            .logical_block_size(LogicalBlockSize::Lb512)
            .open_from_device(Window::new(file, 0, size))
            .map_err(|e| GptError::NoGpt(e.to_string()))?;
        let parts = disk
            .partitions()
            .iter()
            .filter(|(_, p)| p.is_used())
            .map(|(n, p)| (*n, p.clone()))
            .collect();
        Ok(Table { parts, size })
    }

    fn range(&self, number: u32, p: &Partition) -> Result<PartitionRange, GptError> {
        let out = GptError::OutOfDisk {
            number,
            first: p.first_lba,
            last: p.last_lba,
            disk: self.size,
        };
        let start = p.first_lba.checked_mul(512);
        let len = p
            .last_lba
            .checked_add(1)
            .and_then(|e| e.checked_sub(p.first_lba))
            .and_then(|n| n.checked_mul(512));
        match (start, len) {
            (Some(start), Some(len))
                if len > 0 && start.checked_add(len).is_some_and(|e| e <= self.size) =>
            {
                Ok(PartitionRange { number, start, len })
            }
            _ => Err(out),
        }
    }

    /// The partition whose unique GUID is `guid` (case-insensitive).
    pub fn by_guid(&self, guid: &str, name: &'static str) -> Result<PartitionRange, GptError> {
        let (n, p) = self
            .parts
            .iter()
            .find(|(_, p)| p.part_guid.to_string().eq_ignore_ascii_case(guid))
            .ok_or_else(|| GptError::NoGuid {
                guid: guid.to_string(),
                name,
            })?;
        self.range(*n, p)
    }

    /// Partition number `number` (1-based, as `sfdisk` and Linux count).
    pub fn by_number(&self, number: u32) -> Result<PartitionRange, GptError> {
        let (n, p) = self
            .parts
            .iter()
            .find(|(n, _)| *n == number)
            .ok_or(GptError::NoNumber(number))?;
        self.range(*n, p)
    }
}
