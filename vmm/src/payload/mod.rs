//! Booting the GuestOS from its own disk (`--boot-slot guestos|upgrade`),
//! as HostOS's direct-boot runner does, without mounting anything:
//!
//! 1. the disk's GPT gives the grub, A_boot and B_boot partitions by their
//!    unique GUIDs ([`gpt`]);
//! 2. grub's `grubenv` ([`fat`], [`grubenv`]) and the role select the slot
//!    ([`slot`]);
//! 3. the slot's boot partition gives `vmlinuz`, `initrd.img` and
//!    `boot_args` ([`ext4`], [`boot_args`]);
//! 4. only then, and only for the GuestOS VM, grubenv is rewritten in place
//!    when its boot cycle advances ([`fat::write_in_place`]).
//!
//! Every failure is an error before the VM is built, with grubenv as it
//! was. The disk is opened as the virtio-blk device will open it (same
//! advisory lock), and closed again before the device opens it.

pub mod boot_args;
pub mod disk;
pub mod ext4;
pub mod fat;
pub mod gpt;
pub mod grubenv;
pub mod slot;

use std::path::Path;
use std::sync::Arc;

use devices::virtio::block::{DiskBackend, DiskError};
use log::info;

use self::grubenv::{GrubEnv, Slot};
use crate::config::{BootSlot, DiskConfig, MAX_CMDLINE};
use disk::Window;

/// Unique partition GUID of the GuestOS grub partition (vfat).
pub const GRUB_GUID: &str = "6788E4CF-F456-104E-9A34-A2C58CFB0EE6";
/// Unique partition GUID of A_boot (ext4).
pub const A_BOOT_GUID: &str = "DDF618FE-7244-B446-A175-3296E6B9D02E";
/// Unique partition GUID of B_boot (ext4).
pub const B_BOOT_GUID: &str = "D5214E4F-F7B0-B945-9A9B-52B9188DF4C5";

/// Why the GuestOS cannot be booted from its disk.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// The disk cannot be opened (or is locked by another process).
    #[error("boot disk: {0}")]
    Disk(#[from] DiskError),
    /// The GPT or a partition.
    #[error("boot disk {path}: {source}")]
    Gpt {
        /// The disk.
        path: String,
        /// Why.
        source: gpt::GptError,
    },
    /// The grub partition or its grubenv.
    #[error("boot disk {path}: grub partition: {source}")]
    Grub {
        /// The disk.
        path: String,
        /// Why.
        source: fat::FatError,
    },
    /// grubenv's contents.
    #[error("boot disk {path}: grubenv: {source}")]
    GrubEnv {
        /// The disk.
        path: String,
        /// Why.
        source: grubenv::GrubEnvError,
    },
    /// The upgrade VM needs `boot_alternative`.
    #[error("boot disk {path}: {source}")]
    NoAlternative {
        /// The disk.
        path: String,
        /// Why.
        source: slot::NoAlternative,
    },
    /// The slot's boot partition.
    #[error("boot disk {path}: {slot}_boot: {source}")]
    BootPart {
        /// The disk.
        path: String,
        /// The slot.
        slot: Slot,
        /// Why.
        source: ext4::BootPartError,
    },
    /// The slot's `boot_args`.
    #[error("boot disk {path}: {slot}_boot: /boot_args: {source}")]
    BootArgs {
        /// The disk.
        path: String,
        /// The slot.
        slot: Slot,
        /// Why.
        source: boot_args::BootArgsError,
    },
    /// The command line from `boot_args` is unusable.
    #[error("boot disk {path}: {slot}_boot: /boot_args: BOOT_ARGS_{slot} {why}")]
    Cmdline {
        /// The disk.
        path: String,
        /// The slot.
        slot: Slot,
        /// What is wrong.
        why: String,
    },
    /// grubenv must change but the disk is read-only.
    #[error("boot disk {0}: grubenv must be updated but the disk is readonly")]
    ReadOnly(String),
}

/// What a boot slot yields: the payload and where it came from.
#[derive(Debug)]
pub struct BootPayload {
    /// The slot booted.
    pub slot: Slot,
    /// The kernel image.
    pub kernel: Vec<u8>,
    /// The initrd, if the boot partition has one.
    pub initrd: Option<Vec<u8>>,
    /// The kernel command line (`BOOT_ARGS_<slot>`).
    pub cmdline: String,
    /// A description for logs and the API (`/dev/x A_boot:/vmlinuz`).
    pub source: String,
}

/// Opens `disk` as Keel will serve it: read-write (an exclusive lock, shared
/// for a `shared` disk) unless `read_only`, read-only (shared lock) otherwise.
fn open_disk(disk: &DiskConfig, read_only: bool) -> Result<(Arc<std::fs::File>, u64), DiskError> {
    let backend = DiskBackend::open_locked(&disk.path, read_only, false, disk.shared)?;
    let size = backend.capacity();
    Ok((Arc::new(backend.into_file()), size))
}

/// Reads the payload of `role` from `disk`, advancing grubenv for the
/// GuestOS VM. Logs the slot chosen and why.
pub fn resolve(role: BootSlot, disk: &DiskConfig) -> Result<BootPayload, PayloadError> {
    let path = disk.path.display().to_string();
    // The upgrade VM never writes: a shared lock and a read-only fd.
    let read_only = disk.readonly || role == BootSlot::Upgrade;
    let (file, size) = open_disk(disk, read_only)?;
    let gpt_err = |source| PayloadError::Gpt {
        path: path.clone(),
        source,
    };
    let table = gpt::Table::read(file.clone(), size).map_err(gpt_err)?;
    let grub = table.by_guid(GRUB_GUID, "grub").map_err(gpt_err)?;
    let grub_win = Window::new(file.clone(), grub.start, grub.len);
    let grub_err = |source| PayloadError::Grub {
        path: path.clone(),
        source,
    };
    let old = fat::read_grubenv(&grub_win).map_err(grub_err)?;
    let env = GrubEnv::parse(&old).map_err(|source| PayloadError::GrubEnv {
        path: path.clone(),
        source,
    })?;
    let decision = slot::decide(role, &env).map_err(|source| PayloadError::NoAlternative {
        path: path.clone(),
        source,
    })?;
    let (guid, part_name) = match decision.slot {
        Slot::A => (A_BOOT_GUID, "A_boot"),
        Slot::B => (B_BOOT_GUID, "B_boot"),
    };
    let boot = table.by_guid(guid, part_name).map_err(gpt_err)?;
    let files = ext4::read_boot_files(&Window::new(file.clone(), boot.start, boot.len)).map_err(
        |source| PayloadError::BootPart {
            path: path.clone(),
            slot: decision.slot,
            source,
        },
    )?;
    let args =
        boot_args::BootArgs::parse(&files.boot_args).map_err(|source| PayloadError::BootArgs {
            path: path.clone(),
            slot: decision.slot,
            source,
        })?;
    let cmdline = args
        .for_slot(decision.slot)
        .map_err(|source| PayloadError::BootArgs {
            path: path.clone(),
            slot: decision.slot,
            source,
        })?;
    check_cmdline(cmdline).map_err(|why| PayloadError::Cmdline {
        path: path.clone(),
        slot: decision.slot,
        why,
    })?;
    // Everything the boot needs was found: now grubenv may change.
    let new_block = match decision.write {
        Some((alt, cycle)) => {
            if read_only {
                return Err(PayloadError::ReadOnly(path));
            }
            let new = env
                .encode_with(alt, cycle)
                .map_err(|source| PayloadError::GrubEnv {
                    path: path.clone(),
                    source,
                })?;
            let extents = fat::locate(&grub_win).map_err(grub_err)?;
            fat::write_in_place(&mut file.as_ref(), &extents, grub.start, &old, &new)
                .map_err(grub_err)?;
            true
        }
        None => false,
    };
    info!(
        "boot slot {role:?}: booting slot {} from {path} ({part_name}, partition {}): {}{}",
        decision.slot,
        boot.number,
        decision.reason,
        if new_block { " (written)" } else { "" }
    );
    Ok(BootPayload {
        slot: decision.slot,
        kernel: files.kernel,
        initrd: files.initrd,
        cmdline: cmdline.to_string(),
        source: format!("{path} {part_name}:/vmlinuz"),
    })
}

/// The byte range of partition `number` of the disk at `path`, for
/// `[[disks]] cow = "partition:N"`.
pub fn partition_range(
    path: &Path,
    file: Arc<std::fs::File>,
    size: u64,
    number: u32,
) -> Result<gpt::PartitionRange, PayloadError> {
    let err = |source| PayloadError::Gpt {
        path: path.display().to_string(),
        source,
    };
    gpt::Table::read(file, size)
        .map_err(err)?
        .by_number(number)
        .map_err(err)
}

/// A command line from `boot_args` must fit and be printable ASCII.
fn check_cmdline(c: &str) -> Result<(), String> {
    if c.is_empty() {
        return Err("is empty".into());
    }
    if c.len() > MAX_CMDLINE {
        return Err(format!("is longer than {MAX_CMDLINE} bytes"));
    }
    if !c.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return Err("must be printable ASCII on one line".into());
    }
    Ok(())
}
