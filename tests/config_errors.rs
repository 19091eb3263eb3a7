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
    expect_error(&["--kernel", k, "--disk", "readonly=on"], 1, "disk.path");
    expect_error(
        &["--kernel", k, "--disk", "path=/dev/null"],
        1,
        "not a block device or regular file",
    );
    expect_error(
        &["--kernel", k, "--disk", &format!("path={k},engine=aio")],
        1,
        "disk.engine",
    );
    expect_error(&["--kernel", k, "--bogus-flag"], 2, "--bogus-flag");
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
    // More hugepages than any test host has free.
    expect_error(
        &["--kernel", &probe, "--memory", "size=4T,hugepages=on"],
        1,
        "hugepage",
    );
}
