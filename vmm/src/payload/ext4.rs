//! A slot's boot partition (ext4, read with the `ext4-view` crate through a
//! read-only view): `vmlinuz`, `initrd.img` (symlinks followed, as the
//! GuestOS ships versioned files behind them) and `boot_args`.

use ext4_view::{Ext4, Ext4Error};

use super::disk::Window;

/// A boot partition that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BootPartError {
    /// Not an ext4 filesystem `ext4-view` can read.
    #[error("not a readable ext4 filesystem: {0}")]
    Fs(Ext4Error),
    /// A file is missing or unreadable.
    #[error("cannot read /{file}: {source}")]
    File {
        /// The file.
        file: &'static str,
        /// Why.
        source: Ext4Error,
    },
    /// A file is empty.
    #[error("/{0} is empty")]
    Empty(&'static str),
    /// `boot_args` is not UTF-8.
    #[error("/boot_args is not UTF-8 text")]
    NotText,
}

/// The files of one boot partition.
#[derive(Debug)]
pub struct BootFiles {
    /// `vmlinuz`.
    pub kernel: Vec<u8>,
    /// `initrd.img`, when the partition has one.
    pub initrd: Option<Vec<u8>>,
    /// `boot_args`, as text.
    pub boot_args: String,
}

fn read(fs: &Ext4, file: &'static str) -> Result<Vec<u8>, BootPartError> {
    let bytes = fs
        .read(format!("/{file}").as_str())
        .map_err(|source| BootPartError::File { file, source })?;
    if bytes.is_empty() {
        return Err(BootPartError::Empty(file));
    }
    Ok(bytes)
}

/// Reads the boot files of the partition `part`.
pub fn read_boot_files(part: &Window) -> Result<BootFiles, BootPartError> {
    let fs = Ext4::load(Box::new(part.clone())).map_err(BootPartError::Fs)?;
    let kernel = read(&fs, "vmlinuz")?;
    // Absent: no initrd. Present (a dangling symlink too): it must read.
    let initrd = match fs.symlink_metadata("/initrd.img") {
        Err(Ext4Error::NotFound) => None,
        _ => Some(read(&fs, "initrd.img")?),
    };
    let boot_args =
        String::from_utf8(read(&fs, "boot_args")?).map_err(|_| BootPartError::NotText)?;
    Ok(BootFiles {
        kernel,
        initrd,
        boot_args,
    })
}
