//! The config disk: HostOS hands its GuestOS a small FAT filesystem
//! labelled `CONFIG` (holding `ic-bootstrap.tar`), found by that label.
//! Keel builds it from a directory at start, formatted and filled with the
//! `fatfs` crate in a sealed memfd (nothing on the host's filesystems to
//! clean up, nothing anyone can change afterwards), and attaches it as a
//! read-only virtio-blk disk without a serial (a disk whose serial is
//! `config` makes the GuestOS assume a Kubernetes testnet).

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use devices::virtio::block::{DiskBackend, DiskError};
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};

/// The filesystem label the GuestOS looks for.
pub const LABEL: &[u8; 11] = b"CONFIG     ";
/// Smallest image built (FAT needs some room for itself).
const MIN_IMAGE: u64 = 8 << 20;
/// Largest image built: the config disk carries configuration, not data.
pub const MAX_IMAGE: u64 = 1 << 30;
/// Name of the memfd (shown in `/proc/<pid>/fd`).
pub const MEMFD_NAME: &str = "keel-config-disk";

/// Errors of building the config disk.
#[derive(Debug, thiserror::Error)]
pub enum ConfigDiskError {
    /// The directory or one of its entries cannot be read.
    #[error("config disk: cannot read {path}: {source}")]
    Read {
        /// The entry.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An entry that cannot go on the disk.
    #[error("config disk: {path}: {why}")]
    Entry {
        /// The entry.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The directory holds more than a config disk may.
    #[error("config disk: {dir} holds {bytes} bytes; at most {max} fit on a config disk")]
    TooLarge {
        /// The directory.
        dir: PathBuf,
        /// What it holds.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// Creating, formatting or writing the image failed.
    #[error("config disk: cannot build the image: {0}")]
    Image(std::io::Error),
    /// The finished image cannot be opened as a disk.
    #[error("config disk: {0}")]
    Disk(#[from] DiskError),
}

/// A file or directory to copy, relative to the source directory.
enum Item {
    Dir(String),
    File(String, PathBuf),
}

/// Lists `dir` recursively (sorted, so images are reproducible); symbolic
/// links are followed; anything but files and directories is refused.
fn collect(
    dir: &Path,
    rel: &str,
    out: &mut Vec<Item>,
    bytes: &mut u64,
) -> Result<(), ConfigDiskError> {
    let read = |source| ConfigDiskError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(read)?
        .collect::<Result<_, _>>()
        .map_err(read)?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let name = e
            .file_name()
            .into_string()
            .map_err(|_| ConfigDiskError::Entry {
                path: path.clone(),
                why: "the name is not UTF-8".into(),
            })?;
        let rel = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let meta = std::fs::metadata(&path).map_err(|source| ConfigDiskError::Read {
            path: path.clone(),
            source,
        })?;
        if meta.is_dir() {
            out.push(Item::Dir(rel.clone()));
            collect(&path, &rel, out, bytes)?;
        } else if meta.is_file() {
            // Whole 4 KiB clusters, and room for the directory entries.
            *bytes = bytes.saturating_add(meta.len().div_ceil(4096) * 4096 + 4096);
            out.push(Item::File(rel, path));
        } else {
            return Err(ConfigDiskError::Entry {
                path,
                why: "neither a regular file nor a directory".into(),
            });
        }
    }
    Ok(())
}

/// Builds the FAT image of `dir` in `out` (a file of the right size is
/// made here): label `CONFIG`, the directory's files and subdirectories.
pub fn build_image(dir: &Path, out: &mut File) -> Result<u64, ConfigDiskError> {
    let mut items = Vec::new();
    let mut bytes = 0u64;
    collect(dir, "", &mut items, &mut bytes)?;
    // A quarter more for FAT's own structures, then whole MiB.
    let size = (bytes.saturating_add(bytes / 4).saturating_add(1 << 20))
        .max(MIN_IMAGE)
        .div_ceil(1 << 20)
        .saturating_mul(1 << 20);
    if size > MAX_IMAGE {
        return Err(ConfigDiskError::TooLarge {
            dir: dir.to_path_buf(),
            bytes,
            max: MAX_IMAGE,
        });
    }
    let img = ConfigDiskError::Image;
    out.set_len(size).map_err(img)?;
    out.seek(SeekFrom::Start(0)).map_err(img)?;
    fatfs::format_volume(
        &mut *out,
        fatfs::FormatVolumeOptions::new().volume_label(*LABEL),
    )
    .map_err(img)?;
    out.seek(SeekFrom::Start(0)).map_err(img)?;
    let fs = fatfs::FileSystem::new(&mut *out, fatfs::FsOptions::new()).map_err(img)?;
    fill(&fs.root_dir(), &items)?;
    fs.unmount().map_err(img)?;
    Ok(size)
}

/// Copies `items` into the new filesystem's root directory.
fn fill<T: fatfs::ReadWriteSeek>(
    root: &fatfs::Dir<'_, T>,
    items: &[Item],
) -> Result<(), ConfigDiskError> {
    let img = ConfigDiskError::Image;
    for item in items {
        match item {
            Item::Dir(rel) => {
                root.create_dir(rel).map_err(img)?;
            }
            Item::File(rel, src) => {
                let data = std::fs::read(src).map_err(|source| ConfigDiskError::Read {
                    path: src.clone(),
                    source,
                })?;
                let mut f = root.create_file(rel).map_err(img)?;
                f.truncate().map_err(img)?;
                f.write_all(&data).map_err(img)?;
                f.flush().map_err(img)?;
            }
        }
    }
    Ok(())
}

/// Builds the config disk of `dir` in a sealed memfd and opens it as a
/// read-only disk.
pub fn open(dir: &Path) -> Result<DiskBackend, ConfigDiskError> {
    let img = ConfigDiskError::Image;
    let fd: OwnedFd = memfd_create(
        MEMFD_NAME,
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(|e| img(e.into()))?;
    let mut file = File::from(fd);
    let size = build_image(dir, &mut file)?;
    // From here on nobody (Keel included) can change the image.
    fcntl(
        &file,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_WRITE
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_SEAL,
        ),
    )
    .map_err(|e| img(e.into()))?;
    // The disk reopens the memfd read-only through /proc; that descriptor
    // keeps it alive once `file` is closed.
    let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let disk = DiskBackend::open(&path, true, false)?;
    log::info!(
        "config disk: {} as a {} MiB FAT image labelled CONFIG, read-only",
        dir.display(),
        size >> 20
    );
    Ok(disk)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn the_image_has_the_label_and_the_files_byte_for_byte() {
        let dir = std::env::temp_dir().join(format!("keel-cfgdisk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let tar: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        std::fs::write(dir.join("ic-bootstrap.tar"), &tar).unwrap();
        std::fs::write(dir.join("sub/a long file name.json"), b"{\"x\":1}\n").unwrap();
        std::fs::write(dir.join("empty"), b"").unwrap();

        let mut img = tempfile_in(&dir);
        let size = build_image(&dir, &mut img).unwrap();
        assert_eq!(img.metadata().unwrap().len(), size);
        img.seek(SeekFrom::Start(0)).unwrap();
        let fs = fatfs::FileSystem::new(&mut img, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label(), "CONFIG");
        let read = |name: &str| {
            let mut v = Vec::new();
            fs.root_dir()
                .open_file(name)
                .unwrap()
                .read_to_end(&mut v)
                .unwrap();
            v
        };
        assert_eq!(read("ic-bootstrap.tar"), tar);
        assert_eq!(read("sub/a long file name.json"), b"{\"x\":1}\n");
        assert_eq!(read("empty"), b"");
        let names: Vec<String> = fs
            .root_dir()
            .iter()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != "." && n != "..")
            .collect();
        assert_eq!(names, ["empty", "ic-bootstrap.tar", "sub"]);
        drop(fs);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn odd_directories_are_clear_errors() {
        let e = open(Path::new("/nonexistent/config")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/config"), "{e}");
        let dir = std::env::temp_dir().join(format!("keel-cfgdisk-fifo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        nix::unistd::mkfifo(&dir.join("pipe"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = open(&dir).unwrap_err();
        assert!(e.to_string().contains("neither a regular file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_disk_is_sealed_and_read_only() {
        let dir = std::env::temp_dir().join(format!("keel-cfgdisk-ro-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("f"), b"x").unwrap();
        let disk = open(&dir).unwrap();
        assert!(disk.read_only());
        assert!(disk.capacity() >= MIN_IMAGE);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// An unnamed scratch file for an image.
    fn tempfile_in(dir: &Path) -> File {
        let path = dir.join("image");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }
}
