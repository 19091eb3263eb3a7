//! GuestOS-shaped disks for the tests: 10 GPT partitions with the
//! GuestOS's unique partition GUIDs, a FAT grub partition holding `grubenv`,
//! ext4 A_boot/B_boot partitions holding `vmlinuz` and `initrd.img` behind
//! symlinks and a `boot_args` file; built with sfdisk, mkfs.vfat, mcopy and
//! mke2fs (packages fdisk, dosfstools, mtools, e2fsprogs).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::probe_guest;

/// A mebibyte.
pub const MIB: u64 = 1 << 20;
/// Unique partition GUID of the GuestOS's grub partition.
pub const GRUB_GUID: &str = "6788E4CF-F456-104E-9A34-A2C58CFB0EE6";
/// Unique partition GUID of A_boot.
pub const A_BOOT_GUID: &str = "DDF618FE-7244-B446-A175-3296E6B9D02E";
/// Unique partition GUID of B_boot.
pub const B_BOOT_GUID: &str = "D5214E4F-F7B0-B945-9A9B-52B9188DF4C5";

/// Size of each boot partition: room for a real kernel and initramfs (the
/// Linux guest tier boots the project's Linux guest from it). The images are
/// sparse.
pub const BOOT_MIB: u64 = 40;

/// The ten partitions: name, size in MiB, unique GUID.
pub const LAYOUT: [(&str, u64, &str); 10] = [
    ("esp", 1, "0A7E2B1C-0000-4000-8000-000000000001"),
    ("grub", 2, GRUB_GUID),
    ("config", 1, "0A7E2B1C-0000-4000-8000-000000000003"),
    ("A_boot", BOOT_MIB, A_BOOT_GUID),
    ("A_root", 1, "0A7E2B1C-0000-4000-8000-000000000005"),
    ("A_var", 1, "0A7E2B1C-0000-4000-8000-000000000006"),
    ("B_boot", BOOT_MIB, B_BOOT_GUID),
    ("B_root", 1, "0A7E2B1C-0000-4000-8000-000000000008"),
    ("B_var", 1, "0A7E2B1C-0000-4000-8000-000000000009"),
    ("store", 4, "0A7E2B1C-0000-4000-8000-00000000000A"),
];

/// Byte offset of partition `n` (1-based): 1 MiB, then packed.
pub fn part_start(n: usize) -> u64 {
    MIB + LAYOUT[..n - 1].iter().map(|p| p.1 * MIB).sum::<u64>()
}

/// Byte length of partition `n` (1-based).
pub fn part_len(n: usize) -> u64 {
    LAYOUT[n - 1].1 * MIB
}

/// Size of the whole disk.
pub fn disk_size() -> u64 {
    part_start(11) + MIB
}

/// Runs a tool; a missing tool or a failure fails the test loudly.
pub fn tool(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (install fdisk, dosfstools, mtools, e2fsprogs; tests/run-all.sh does): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A grubenv block with `text` after the header.
pub fn grubenv(text: &str) -> Vec<u8> {
    let mut b = b"# GRUB Environment Block\n".to_vec();
    b.extend_from_slice(text.as_bytes());
    b.resize(1024, b'#');
    b
}

/// What goes into a slot's boot partition.
#[derive(Clone)]
pub struct Slot {
    /// `vmlinuz` (behind a symlink to `vmlinuz-1.0`); none: missing.
    pub kernel: Option<Vec<u8>>,
    /// `initrd.img` (behind a symlink to `initrd.img-1.0`).
    pub initrd: Vec<u8>,
    /// The `boot_args` file.
    pub boot_args: String,
}

impl Slot {
    /// The probe guest, with `probe.echo=slotA|slotB` (and `extra`) on each
    /// slot's command line.
    pub fn probe(extra: &str) -> Self {
        Slot {
            kernel: Some(std::fs::read(probe_guest()).expect("probe guest")),
            initrd: vec![0x5a; 4096],
            boot_args: format!(
                "# boot arguments of both slots\nBOOT_ARGS_A=\"console=ttyS0 probe.check=boot.cmdline probe.echo=slotA {extra}\"\nBOOT_ARGS_B='console=ttyS0 probe.check=boot.cmdline probe.echo=slotB {extra}'\n"
            ),
        }
    }
}

/// Options of a test disk.
pub struct Spec {
    /// The grubenv file.
    pub grubenv: Vec<u8>,
    /// Slot A's boot partition.
    pub a: Slot,
    /// Slot B's boot partition.
    pub b: Slot,
    /// Unique GUID of the grub partition (another one: "partition missing").
    pub grub_guid: &'static str,
}

impl Spec {
    /// The probe guest in both slots, grubenv `env` (after the header).
    pub fn new(env: &str) -> Self {
        Spec {
            grubenv: grubenv(env),
            a: Slot::probe(""),
            b: Slot::probe(""),
            grub_guid: GRUB_GUID,
        }
    }
}

fn ext4_image(dir: &Path, name: &str, slot: &Slot) -> PathBuf {
    let root = dir.join(format!("{name}-root"));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    if let Some(k) = &slot.kernel {
        std::fs::write(root.join("vmlinuz-1.0"), k).unwrap();
        std::os::unix::fs::symlink("vmlinuz-1.0", root.join("vmlinuz")).unwrap();
    }
    std::fs::write(root.join("initrd.img-1.0"), &slot.initrd).unwrap();
    std::os::unix::fs::symlink("initrd.img-1.0", root.join("initrd.img")).unwrap();
    std::fs::write(root.join("boot_args"), &slot.boot_args).unwrap();
    let img = dir.join(format!("{name}.img"));
    tool(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-d"])
            .arg(&root)
            .arg(&img)
            .arg(format!("{BOOT_MIB}M")),
    );
    img
}

/// Builds the disk image `dir/disk.img`.
pub fn build_disk(dir: &Path, spec: &Spec) -> PathBuf {
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(disk_size())
        .unwrap();
    let mut script = String::from("label: gpt\nunit: sectors\n");
    for (n, (name, _, guid)) in LAYOUT.iter().enumerate() {
        let guid = if *name == "grub" {
            spec.grub_guid
        } else {
            guid
        };
        script.push_str(&format!(
            "start={}, size={}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid={guid}, name={name}\n",
            part_start(n + 1) / 512,
            part_len(n + 1) / 512
        ));
    }
    let mut child = Command::new("sfdisk")
        .arg("-q")
        .arg(&disk)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("sfdisk (package fdisk) is needed");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk failed");
    // The grub partition: FAT with grubenv.
    let grub = dir.join("grub.img");
    let _ = std::fs::remove_file(&grub);
    tool(
        Command::new("mkfs.vfat")
            .args(["-C", "-n", "GRUB"])
            .arg(&grub)
            .arg((part_len(2) / 1024).to_string()),
    );
    let env = dir.join("grubenv");
    std::fs::write(&env, &spec.grubenv).unwrap();
    tool(
        Command::new("mcopy")
            .arg("-i")
            .arg(&grub)
            .arg(&env)
            .arg("::grubenv"),
    );
    let a = ext4_image(dir, "a", &spec.a);
    let b = ext4_image(dir, "b", &spec.b);
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    for (n, img) in [(2, &grub), (4, &a), (7, &b)] {
        let bytes = std::fs::read(img).unwrap();
        assert!(bytes.len() as u64 <= part_len(n));
        f.write_all_at(&bytes, part_start(n)).unwrap();
    }
    disk
}

/// grubenv as the FAT filesystem holds it now (read with mtools).
pub fn read_grubenv(disk: &Path) -> Vec<u8> {
    let out = Command::new("mcopy")
        .arg("-i")
        .arg(format!("{}@@{}", disk.display(), part_start(2)))
        .args(["::grubenv", "-"])
        .output()
        .expect("mcopy (package mtools) is needed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
