//! Every kind of bad configuration makes `keel` exit non-zero before the
//! guest starts, with a message naming what to fix.

use std::time::Duration;

use keel_tests::{probe_guest, run_keel, scratch_dir};

fn expect_error(args: &[&str], code: i32, needle: &str) {
    let r = run_keel(args, Duration::from_secs(30));
    assert_eq!(r.code(), code, "args {args:?}\nstderr:\n{}", r.stderr);
    assert!(
        r.stderr.contains(needle),
        "args {args:?}: expected {needle:?} in:\n{}",
        r.stderr
    );
    assert!(
        !r.stdout.contains("probe: start"),
        "the guest must not start"
    );
}

#[test]
fn bad_flags_name_the_field() {
    let probe = probe_guest().display().to_string();
    let k = probe.as_str();
    expect_error(&[], 1, "missing kernel");
    expect_error(&["--kernel", "/nonexistent/vmlinux"], 1, "payload.kernel");
    expect_error(&["--kernel", "/tmp"], 1, "not a regular file");
    expect_error(&["--kernel", k, "--memory", "size=12X"], 1, "memory.size");
    expect_error(&["--kernel", k, "--memory", "size=1M"], 1, "memory.size");
    expect_error(
        &["--kernel", k, "--memory", "sise=1G"],
        1,
        "unknown key `sise`",
    );
    expect_error(
        &["--kernel", k, "--memory", "size=1G,hugepages=maybe"],
        1,
        "memory.hugepages",
    );
    expect_error(&["--kernel", k, "--cpus", "boot=0"], 1, "cpus.boot");
    expect_error(
        &["--kernel", k, "--user", "no-such-user-keel"],
        1,
        "security.user",
    );
    expect_error(
        &["--kernel", k, "--user", "nobody:no-such-group-keel"],
        1,
        "no-such-group-keel",
    );
    expect_error(
        &["--kernel", k, "--cpus", "boot=4,sockets=3"],
        1,
        "cpus.cores",
    );
    expect_error(
        &[
            "--kernel",
            k,
            "--cpus",
            "boot=4,sockets=2,cores=1,threads=1",
        ],
        1,
        "cpus.topology",
    );
    expect_error(
        &["--kernel", k, "--cpus", "boot=1,mask=avx512f:warp-drive"],
        1,
        "warp-drive",
    );
    expect_error(&["--kernel", k, "--serial", "tty"], 1, "serial");
    expect_error(
        &["--kernel", k, "--serial", "file=/nonexistent/dir/log"],
        1,
        "serial.path",
    );
    expect_error(
        &["--kernel", k, "--disk", "path=/nonexistent.img"],
        1,
        "disks[0].path",
    );
    expect_error(
        &["--kernel", k, "--disk", "readonly=on"],
        1,
        "disks[0].path",
    );
    expect_error(
        &["--kernel", k, "--disk", "path=/dev/null"],
        1,
        "not a block device or regular file",
    );
    expect_error(
        &["--kernel", k, "--disk", &format!("path={k},engine=aio")],
        1,
        "disks[0].engine",
    );
    for n in ["0", "17"] {
        expect_error(
            &[
                "--kernel",
                k,
                "--disk",
                &format!("path={k},readonly=on,num_queues={n}"),
            ],
            1,
            "disks[0].num_queues",
        );
    }
    // The second --disk is disks[1].
    expect_error(
        &[
            "--kernel",
            k,
            "--disk",
            &format!("path={k},readonly=on"),
            "--disk",
            &format!("path={k},readonly=on,cache=none"),
        ],
        1,
        "unknown key `cache` in disks[1]",
    );
    expect_error(
        &["--kernel", k, "--net", "tap=t0,mtu=big"],
        1,
        "nets[0].mtu",
    );
    // Values are shown as typed.
    expect_error(
        &["--kernel", k, "--memory", "size=1K"],
        1,
        "invalid value for memory.size: \"1K\"",
    );
    expect_error(&["--kernel", k, "--bogus-flag"], 2, "--bogus-flag");
}

#[test]
fn impossible_numa_guests_are_refused() {
    let probe = probe_guest().display().to_string();
    let k = probe.as_str();
    let numa = |memory: &str, cpus: &str, extra: &[&str], needle: &str| {
        let mut args = vec!["--kernel", k, "--memory", memory, "--cpus", cpus];
        args.extend_from_slice(extra);
        expect_error(&args, 1, "invalid value for memory.numa");
        expect_error(&args, 1, needle);
    };
    numa(
        "size=1G,numa=on",
        "boot=2,sockets=2",
        &["--machine", "acpi=off"],
        "needs machine.acpi = true",
    );
    numa("size=1G,numa=on", "boot=2", &[], "at least 2 sockets");
    numa(
        "size=1G,numa=on",
        "boot=3,sockets=3",
        &[],
        "multiple of 6 MiB",
    );
    numa(
        "size=32M,numa=on",
        "boot=4,sockets=4",
        &[],
        "at least 16 MiB each",
    );
    expect_error(
        &["--kernel", k, "--memory", "size=1G,numa=perhaps"],
        1,
        "memory.numa",
    );
}

#[test]
fn impossible_pci_machines_are_refused() {
    let probe = probe_guest().display().to_string();
    let k = probe.as_str();
    expect_error(
        &["--kernel", k, "--transport", "isa"],
        1,
        "machine.transport",
    );
    expect_error(
        &["--kernel", k, "--transport", "pci", "--machine", "acpi=off"],
        1,
        "needs machine.acpi = true",
    );
    // pci is the default: a machine without ACPI is told to choose mmio.
    expect_error(
        &["--kernel", k, "--machine", "acpi=off"],
        1,
        "choose machine.transport = \"mmio\"",
    );
}

#[test]
fn bad_payloads_are_refused() {
    let dir = scratch_dir("bad-payload");
    let junk = dir.join("junk");
    std::fs::write(&junk, vec![0x5au8; 8192]).unwrap();
    let junk = junk.display().to_string();
    expect_error(&["--kernel", &junk], 1, "not an x86-64 ELF");
    let probe = probe_guest().display().to_string();
    // An initrd larger than the guest's memory.
    let big = dir.join("big-initrd");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(64 << 20).unwrap();
    let big = big.display().to_string();
    expect_error(
        &["--kernel", &probe, "--initrd", &big, "--memory", "size=32M"],
        1,
        "initrd",
    );
}

#[test]
fn bad_config_files_name_the_key() {
    let dir = scratch_dir("bad-config");
    let probe = probe_guest().display().to_string();
    let cases = [
        ("[memory]\nsise = \"1G\"\n", "sise"),
        ("[memory]\nsize = \"1Q\"\n", "suffix"),
        ("[cpus]\nboot = \"two\"\n", "boot"),
        ("[serial]\nmode = \"printer\"\n", "printer"),
        ("[payload\n", "config file"),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let path = dir.join(format!("c{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let p = path.display().to_string();
        expect_error(&["--config", &p, "--kernel", &probe], 1, needle);
    }
    expect_error(
        &["--config", "/nonexistent.toml"],
        1,
        "cannot read config file",
    );
}

#[test]
fn hugepage_shortage_is_reported_before_boot() {
    let probe = probe_guest().display().to_string();
    // More hugepages than any test host has free (overcommit=on: past the MemTotal check).
    expect_error(
        &[
            "--kernel",
            &probe,
            "--memory",
            "size=4T,hugepages=on,overcommit=on",
        ],
        1,
        "hugepage",
    );
}

#[test]
fn memory_larger_than_the_host_needs_overcommit() {
    let probe = probe_guest().display().to_string();
    expect_error(
        &["--kernel", &probe, "--memory", "size=1T"],
        1,
        "invalid value for memory.size: \"1T\": more than this host's physical memory",
    );
    let r = run_keel(
        &["--kernel", &probe, "--memory", "size=1T"],
        Duration::from_secs(30),
    );
    assert!(r.stderr.contains("overcommit=on"), "{}", r.stderr);
}

/// Runs `cmd args`, panicking with its output when it fails.
fn sh(cmd: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (the tests need root and util-linux/e2fsprogs)"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs its command (argv) when dropped: undoes a test's host set-up.
struct Undo(Vec<String>);

impl Drop for Undo {
    fn drop(&mut self) {
        if let Some((program, args)) = self.0.split_first() {
            let _ = std::process::Command::new(program).args(args).status();
        }
    }
}

/// A disk the kernel would refuse to write must be given with readonly=on:
/// otherwise the guest sees a writable disk whose every write fails.
#[test]
fn read_only_host_disks_need_readonly_on() {
    let dir = scratch_dir("ro-disks");
    let probe = probe_guest().display().to_string();
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let expect_refusal = |path: &str, why: &str| {
        expect_error(
            &["--kernel", &probe, "--disk", &format!("path={path}")],
            1,
            "invalid value for disks[0].readonly: \"off\"",
        );
        let r = run_keel(
            &["--kernel", &probe, "--disk", &format!("path={path}")],
            Duration::from_secs(30),
        );
        assert!(
            r.stderr.contains(why) && r.stderr.contains("use readonly=on"),
            "{path}: expected {why:?}:\n{}",
            r.stderr
        );
    };

    // A read-only loop device (losetup -r): BLKROGET says 1.
    let dev = sh(
        "losetup",
        &["-r", "-f", "--show", &img.display().to_string()],
    );
    let _detach = Undo(vec!["losetup".into(), "-d".into(), dev.clone()]);
    expect_refusal(&dev, "reports read-only (BLKROGET)");

    // An immutable file (chattr +i): EPERM.
    let imm = dir.join("immutable.img");
    std::fs::write(&imm, vec![0u8; 1 << 20]).unwrap();
    let imm_s = imm.display().to_string();
    sh("chattr", &["+i", &imm_s]);
    let _mutable = Undo(vec!["chattr".into(), "-i".into(), imm_s.clone()]);
    expect_refusal(&imm_s, "immutable");

    // A file on a read-only mount: EROFS.
    let mnt = dir.join("ro-mount");
    std::fs::create_dir(&mnt).unwrap();
    let mnt_s = mnt.display().to_string();
    sh("mount", &["-t", "tmpfs", "-o", "size=4m", "tmpfs", &mnt_s]);
    let _unmount = Undo(vec!["umount".into(), mnt_s.clone()]);
    let on_ro = mnt.join("disk.img");
    std::fs::write(&on_ro, vec![0u8; 1 << 20]).unwrap();
    sh("mount", &["-o", "remount,ro", &mnt_s]);
    expect_refusal(&on_ro.display().to_string(), "read-only filesystem (EROFS)");

    // Each is accepted with readonly=on: the refusal is only the missing flag
    // (--print-config stops before the device is opened, so boot the probe).
    for path in [dev.clone(), imm_s.clone(), on_ro.display().to_string()] {
        let r = run_keel(
            &[
                "--kernel",
                &probe,
                "--cmdline",
                "console=ttyS0 probe.check=boot.cmdline",
                "--disk",
                &format!("path={path},readonly=on"),
            ],
            Duration::from_secs(60),
        );
        assert_eq!(
            r.code(),
            0,
            "{path} readonly=on:\n{}\n{}",
            r.stdout,
            r.stderr
        );
    }
}

#[test]
fn help_lists_every_exit_code() {
    let r = run_keel(&["--help"], Duration::from_secs(30));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(r.stdout.contains("Exit codes:"), "{}", r.stdout);
    for line in [
        "  0  the guest powered off",
        "  1  configuration or set-up error",
        "  2  command-line usage error",
        "  3  the guest reset or rebooted",
        "  4  the guest triple-faulted",
        "  5  the guest reported a crash",
        "  6  fatal VMM or KVM error",
    ] {
        assert!(r.stdout.contains(line), "no {line:?} in:\n{}", r.stdout);
    }
    // 0 also covers a stop through the API.
    assert!(r.stdout.contains("PUT /v1/vm/stop"), "{}", r.stdout);
}
