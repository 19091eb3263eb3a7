//! virtio over PCI (`machine.transport = "pci"`): the probe guest finds
//! Keel's devices on bus 0 through ECAM (the MCFG says where), checks that
//! each sits in its documented slot with its virtio-pci device ID, drives
//! disk 0 through virtio-drivers' virtio-pci transport, sees the ISR and
//! the status register's interrupt bit with INTx disabled, takes an MSI-X
//! vector (pending while masked, delivered at unmask) and moves a BAR.
//! The blk, vsock and net checks over PCI are in `blk.rs`, `vsock.rs` and
//! `net.rs`, next to their virtio-mmio versions.

use std::time::Duration;

use keel_tests::{guest_pattern, make_test_disk, probe_guest, run_keel, scratch_dir, ProbeReport};

const DEADLINE: Duration = Duration::from_secs(120);

const PCI_CHECKS: &[&str] = &[
    "pci.enumerate",
    "pci.blk.host_pattern",
    "pci.blk.write_read",
    "pci.isr",
    "pci.intx_disable",
    "pci.msix",
    "pci.blk.mq",
    "pci.bar_move",
];

/// Two disks and vsock: slots 1 and 2 are the disks in configuration
/// order (device 0x1042), slot 3 vsock (0x1040 + 19); nothing is announced
/// as virtio-mmio; disk 0 (two request queues: virtio-drivers uses queue 0,
/// `pci.blk.mq` both) ends up with the guest's pattern.
#[test]
fn devices_take_their_slots_and_work_over_virtio_pci() {
    let dir = scratch_dir("pci-devices");
    let (d0, d1) = (dir.path().join("d0.img"), dir.path().join("d1.img"));
    make_test_disk(&d0);
    make_test_disk(&d1);
    let sock = dir.path().join("vsock.sock");
    let kernel = probe_guest().display().to_string();
    let args = [
        "--kernel".to_string(),
        kernel,
        "--memory".into(),
        "size=256M".into(),
        "--transport".into(),
        "pci".into(),
        "--cmdline".into(),
        "console=ttyS0 probe.check=pci".into(),
        "--disk".into(),
        format!("path={},num_queues=2", d0.display()),
        "--disk".into(),
        format!("path={},readonly=on", d1.display()),
        "--vsock".into(),
        format!("cid=3,socket={}", sock.display()),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = run_keel(&args, DEADLINE);
    ProbeReport::parse(&r.stdout).assert_all_passed(PCI_CHECKS, &r.stdout);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    for want in [
        "probe: pci 00:00.0 8086:0d57 ",
        "probe: pci 00:01.0 1af4:1042 rev 1 class 018000",
        "probe: pci 00:02.0 1af4:1042 rev 1 class 018000",
        "probe: pci 00:03.0 1af4:1053 rev 1 class 088000",
        "probe: pci msix vector 0 pending while masked",
        "probe: pci msix delivered",
        "probe: pci intx disabled: status interrupt bit 1, ISR 0x1, then bit 0",
        "probe: pci blk num_queues=Some(2)",
    ] {
        assert!(r.stdout.contains(want), "no {want:?} in\n{}", r.stdout);
    }
    assert!(
        !r.stdout.contains("probe: pci 00:04.0"),
        "one slot per device\n{}",
        r.stdout
    );
    assert!(
        !r.stdout.contains("virtio_mmio.device="),
        "nothing announced as virtio-mmio\n{}",
        r.stdout
    );
    assert!(
        r.stderr.contains("BAR 0 now at"),
        "Keel saw the BAR move\n{}",
        r.stderr
    );
    let bytes = std::fs::read(&d0).unwrap();
    let w = 4usize << 20;
    let bad = (w..w + (256 << 10)).find(|&o| bytes[o] != guest_pattern(o as u64));
    assert_eq!(bad, None, "guest pattern missing at offset {bad:?}");
}
