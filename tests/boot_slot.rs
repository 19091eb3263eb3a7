//! Booting the GuestOS from its own disk (`--boot-slot`): GuestOS-shaped
//! disks (10 GPT partitions with the GuestOS's unique GUIDs, a FAT grub
//! partition with grubenv, ext4 A_boot/B_boot holding the probe guest as
//! `vmlinuz` behind a symlink and per-slot `boot_args`), built with sfdisk,
//! mkfs.vfat, mcopy and mke2fs. Each slot's command line carries
//! `probe.echo=slotA|slotB`, so the probe's `probe: echo` line tells which
//! slot booted. Also the copy-on-write view (`cow = "partition:10"`).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keel_tests::guestos_disk::{
    build_disk, disk_size, grubenv, part_len, part_start, read_grubenv, Spec, GRUB_GUID,
};
use keel_tests::{guest_pattern, probe_guest, run_keel, scratch_dir, ProbeReport, RunResult};

const DEADLINE: Duration = Duration::from_secs(120);
fn boot(disk: &Path, role: &str) -> RunResult {
    run_keel(
        &[
            "--boot-slot",
            role,
            "--memory",
            "size=256M",
            "--disk",
            &format!("path={}", disk.display()),
        ],
        DEADLINE,
    )
}

/// Asserts the run booted `slot` and the probe's checks passed.
fn assert_booted(r: &RunResult, slot: &str) {
    ProbeReport::parse(&r.stdout).assert_all_passed(&["boot.cmdline"], &r.stdout);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(
        r.stdout.contains(&format!("probe: echo slot{slot}\n")),
        "slot {slot} did not boot:\n{}\n{}",
        r.stdout,
        r.stderr
    );
    assert!(
        r.stderr.contains(&format!("booting slot {slot}")),
        "the log names the slot:\n{}",
        r.stderr
    );
}

#[test]
fn each_row_of_the_boot_table_boots_the_right_slot_and_writes_grubenv() {
    let dir = scratch_dir("bootslot-table");
    // (grubenv before, slot booted, grubenv after)
    let rows = [
        ("", "A", "boot_alternative=A\nboot_cycle=stable\n"),
        (
            "boot_alternative=B\nboot_cycle=stable\n",
            "B",
            "boot_alternative=B\nboot_cycle=stable\n",
        ),
        (
            "boot_alternative=A\nboot_cycle=install\n",
            "A",
            "boot_alternative=A\nboot_cycle=stable\n",
        ),
        (
            "boot_alternative=B\nboot_cycle=first_boot\n",
            "B",
            "boot_alternative=B\nboot_cycle=failsafe_check\n",
        ),
        (
            "boot_alternative=B\nboot_cycle=failsafe_check\n",
            "A",
            "boot_alternative=A\nboot_cycle=stable\n",
        ),
    ];
    for (before, slot, after) in rows {
        let disk = build_disk(&dir, &Spec::new(before));
        let r = boot(&disk, "guestos");
        assert_booted(&r, slot);
        assert_eq!(
            read_grubenv(&disk),
            grubenv(after),
            "grubenv after {before:?}:\n{}",
            r.stderr
        );
        // mtools still reads the filesystem, and an unchanged row wrote nothing.
        if before == after {
            assert!(r.stderr.contains("grubenv unchanged"), "{}", r.stderr);
        }
    }
}

#[test]
fn the_upgrade_vm_boots_the_opposite_slot_and_never_writes() {
    let dir = scratch_dir("bootslot-upgrade");
    for (before, slot) in [
        ("boot_alternative=A\nboot_cycle=stable\n", "B"),
        ("boot_alternative=B\nboot_cycle=first_boot\n", "A"),
    ] {
        let disk = build_disk(&dir, &Spec::new(before));
        let whole = std::fs::read(&disk).unwrap();
        let r = boot(&disk, "upgrade");
        assert_booted(&r, slot);
        assert!(
            std::fs::read(&disk).unwrap() == whole,
            "the disk is untouched"
        );
    }
}

#[test]
fn every_failure_is_an_error_before_boot_and_leaves_the_disk_untouched() {
    let dir = scratch_dir("bootslot-fail");
    let first_boot_b = "boot_alternative=B\nboot_cycle=first_boot\n";
    let no_gpt = |d: &Path| {
        let f = std::fs::OpenOptions::new().write(true).open(d).unwrap();
        f.write_all_at(&[0u8; 34 * 512], 0).unwrap();
        f.write_all_at(&[0u8; 33 * 512], disk_size() - 33 * 512)
            .unwrap();
    };
    let corrupt_b = |d: &Path| {
        // The ext4 superblock of B_boot (at 1024 in the partition).
        let f = std::fs::OpenOptions::new().write(true).open(d).unwrap();
        f.write_all_at(&[0u8; 1024], part_start(7) + 1024).unwrap();
    };
    let nothing = |_: &Path| {};
    type Case<'a> = (&'a str, Spec, &'a str, &'a dyn Fn(&Path));
    let mut cases: Vec<Case> = Vec::new();
    cases.push(("no GPT", Spec::new(first_boot_b), "no valid GPT", &no_gpt));
    let mut s = Spec::new(first_boot_b);
    s.grub_guid = "0A7E2B1C-0000-4000-8000-0000000000FF";
    cases.push(("grub partition missing", s, GRUB_GUID, &nothing));
    cases.push((
        "corrupt ext4",
        Spec::new(first_boot_b),
        "B_boot: not a readable ext4",
        &corrupt_b,
    ));
    let mut s = Spec::new(first_boot_b);
    s.b.kernel = None;
    cases.push((
        "missing kernel",
        s,
        "B_boot: cannot read /vmlinuz",
        &nothing,
    ));
    let mut s = Spec::new(first_boot_b);
    s.b.kernel = Some(Vec::new());
    cases.push(("empty kernel", s, "/vmlinuz is empty", &nothing));
    let mut s = Spec::new(first_boot_b);
    s.b.boot_args = "BOOT_ARGS_B=\"console=ttyS0\n".into();
    cases.push(("bad boot_args", s, "unterminated double quote", &nothing));
    let mut s = Spec::new(first_boot_b);
    s.b.boot_args = "BOOT_ARGS_A=\"console=ttyS0\"\n".into();
    cases.push(("no BOOT_ARGS_B", s, "no BOOT_ARGS_B assignment", &nothing));
    cases.push((
        "unknown grubenv value",
        Spec::new("boot_alternative=B\nboot_cycle=rollback\n"),
        "boot_cycle=\"rollback\"",
        &nothing,
    ));
    cases.push((
        "unknown boot_alternative",
        Spec::new("boot_alternative=C\nboot_cycle=stable\n"),
        "boot_alternative=\"C\"",
        &nothing,
    ));
    for (what, spec, message, damage) in cases {
        let disk = build_disk(&dir, &spec);
        damage(&disk);
        let whole = std::fs::read(&disk).unwrap();
        let r = boot(&disk, "guestos");
        assert_eq!(r.code(), 1, "{what}: {}", r.stderr);
        assert!(
            r.stderr.contains(message),
            "{what}: want {message:?} in:\n{}",
            r.stderr
        );
        assert!(!r.stdout.contains("probe: start"), "{what}: nothing booted");
        assert!(
            std::fs::read(&disk).unwrap() == whole,
            "{what}: the disk (and grubenv) changed"
        );
    }
    // A read-only disk whose grubenv would have to change.
    let disk = build_disk(&dir, &Spec::new(first_boot_b));
    let whole = std::fs::read(&disk).unwrap();
    let r = run_keel(
        &[
            "--boot-slot",
            "guestos",
            "--memory",
            "size=256M",
            "--disk",
            &format!("path={},readonly=on", disk.display()),
        ],
        DEADLINE,
    );
    assert_eq!(r.code(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("disk is readonly"), "{}", r.stderr);
    assert!(std::fs::read(&disk).unwrap() == whole);
    // The upgrade VM without boot_alternative.
    let disk = build_disk(&dir, &Spec::new("boot_cycle=stable\n"));
    let r = boot(&disk, "upgrade");
    assert_eq!(r.code(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("no boot_alternative"), "{}", r.stderr);
}

#[test]
fn boot_slot_excludes_kernel_and_needs_a_disk() {
    let r = run_keel(
        &["--boot-slot", "guestos", "--memory", "size=256M"],
        DEADLINE,
    );
    assert_eq!(r.code(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("payload.boot_disk"), "{}", r.stderr);
    let probe = probe_guest().display().to_string();
    let r = run_keel(&["--boot-slot", "guestos", "--kernel", &probe], DEADLINE);
    assert_eq!(r.code(), 2, "clap refuses the pair: {}", r.stderr);
    assert!(r.stderr.contains("cannot be used with"), "{}", r.stderr);
}

#[test]
fn boots_through_a_loop_block_device() {
    let dir = scratch_dir("bootslot-loop");
    let disk = build_disk(
        &dir,
        &Spec::new("boot_alternative=B\nboot_cycle=first_boot\n"),
    );
    let lo = keel_tests::LoopDevice::attach(&disk);
    let r = boot(&lo.path, "guestos");
    assert_booted(&r, "B");
    drop(lo);
    assert_eq!(
        read_grubenv(&disk),
        grubenv("boot_alternative=B\nboot_cycle=failsafe_check\n")
    );
}

/// Waits until process `pid` is stopped (state `T` in /proc/pid/stat).
fn wait_stopped(pid: u32) {
    let start = Instant::now();
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next());
        if state == Some('T') {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "keel never stopped at the hook: {stat}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn killing_keel_during_the_grubenv_write_leaves_a_valid_block() {
    let dir = scratch_dir("bootslot-kill");
    let before = "boot_alternative=B\nboot_cycle=first_boot\n";
    let after = "boot_alternative=B\nboot_cycle=failsafe_check\n";
    // Stopped before the write: the old block; after it (not synced): the new one.
    for (point, want) in [("before-write", before), ("before-sync", after)] {
        let disk = build_disk(&dir, &Spec::new(before));
        let mut child = Command::new(keel_tests::keel())
            .args(["--boot-slot", "guestos", "--memory", "size=256M", "--disk"])
            .arg(format!("path={}", disk.display()))
            .env("KEEL_TEST_GRUBENV_STOP", point)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_stopped(child.id());
        child.kill().unwrap(); // SIGKILL while stopped inside the write
        child.wait().unwrap();
        assert_eq!(read_grubenv(&disk), grubenv(want), "killed at {point}");
        // And the next start goes on from there as the table says.
        let r = boot(&disk, "guestos");
        let slot = if point == "before-write" { "B" } else { "A" };
        assert_booted(&r, slot);
    }
}

#[test]
fn cow_partition_keeps_the_hosts_bytes_and_enforces_its_limit() {
    let dir = scratch_dir("bootslot-cow");
    let disk = build_disk(&dir, &Spec::new("boot_alternative=A\nboot_cycle=stable\n"));
    let whole = std::fs::read(&disk).unwrap();
    let inside = part_start(10) + 256 * 1024; // in the store partition
    let outside = part_start(9) + 256 * 1024; // in B_var
    let probe = probe_guest().display().to_string();
    let r = run_keel(
        &[
            "--kernel",
            &probe,
            "--memory",
            "size=256M",
            "--cmdline",
            &format!(
                "console=ttyS0 probe.check=blk.cow probe.cow={},{}",
                inside / 512,
                outside / 512
            ),
            "--disk",
            &format!("path={},cow=partition:10,cow_limit=64K", disk.display()),
        ],
        DEADLINE,
    );
    ProbeReport::parse(&r.stdout).assert_all_passed(&["blk.cow"], &r.stdout);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let now = std::fs::read(&disk).unwrap();
    let (o, len) = (outside as usize, 8192usize);
    let bad = (o..o + len).find(|&x| now[x] != guest_pattern(x as u64));
    assert_eq!(bad, None, "the write to partition 9 reached the disk");
    let p10 = part_start(10) as usize..(part_start(10) + part_len(10)) as usize;
    assert!(
        now[p10.clone()] == whole[p10],
        "partition 10 unchanged on the host"
    );
    assert!(now[..o] == whole[..o] && now[o + len..] == whole[o + len..]);
    assert!(
        r.stderr.contains(" 1 cow_limit_errors"),
        "the refused write is counted:\n{}",
        r.stderr
    );
}
