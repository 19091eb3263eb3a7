//! A/B upgrades end to end: HTTPS download from a local server with a
//! throwaway CA, files as the six volumes, a fake Keel API, a reboot script.

mod common;

use common::*;
use host_agent::grub_model;
use host_agent::grubenv::Slot;
use std::sync::Arc;
use std::time::Duration;

const OK: &str = r#"{"Ok":"NoPayload"}"#;

fn status_json(e: &Env) -> serde_json::Value {
    let (ok, out) = e.run_cli(&["status", "--json"]);
    assert!(ok, "{out}");
    serde_json::from_str(out.trim()).unwrap()
}

#[test]
fn full_upgrade_confirm_and_back() {
    let mut e = Env::new("full", Options::default());
    e.start(None);
    let img = standard_image(7);
    let url = e.https.route(
        "/update-img.tar.zst",
        Route::Ok(Arc::new(img.archive.clone())),
    );

    // The guest asks; the answer comes after the commit.
    let r = e.request(&e.upgrade_request(&url, &img.hash.to_uppercase()));
    assert_eq!(r, OK, "{}", e.log_text());

    // The right bytes landed on the inactive slot B; A is untouched.
    e.assert_slot_has("B", &img);
    for k in ["A_boot", "A_root", "A_var"] {
        assert!(e.volume(k) == e.initial[k], "{k} changed");
    }
    // grubenv: exactly 1024 bytes, B / first_boot.
    let g = e.grubenv_now();
    assert_eq!(
        g,
        grubenv_bytes(&[("boot_alternative", "B"), ("boot_cycle", "first_boot")])
    );
    assert_eq!(g.len(), 1024);
    assert!(g.starts_with(b"# GRUB Environment Block\nboot_alternative=B\nboot_cycle=first_boot\n"));

    // Then: graceful shutdown through Keel's API, and the reboot command.
    e.wait_for("the reboot command", Duration::from_secs(15), || {
        e.marker.exists()
    });
    assert_eq!(std::fs::read_to_string(&e.marker).unwrap(), "reboot now\n");
    {
        let k = e.keel.state.lock().unwrap();
        assert_eq!(k.shutdown_bodies, vec![r#"{"timeout_s":120}"#.to_string()]);
        assert_eq!(k.state, "stopped");
    }
    // No download left behind.
    assert!(!e.dir.join("state").join("upgrade.download").exists());
    // Progress was logged.
    let log = e.log_text();
    assert!(
        log.contains("downloaded") && log.contains("SHA-256 verified") && log.contains("committed")
    );

    // A second upgrade is refused until the new slot is confirmed.
    let r = e.request(&e.upgrade_request(&url, &img.hash));
    assert!(
        r.contains("boot_cycle is \\\"first_boot\\\", not \\\"stable\\\""),
        "{r}"
    );

    // Status before the reboot: running A, B boots next.
    let st = status_json(&e);
    assert_eq!(st["current"], "A");
    assert_eq!(st["next_boot"], "B");
    assert_eq!(st["boot_cycle"], "first_boot");
    // `confirm` now must not make the unbooted slot stable.
    let (ok, out) = e.run_cli(&["confirm"]);
    assert!(ok && out.contains("awaits its first boot"), "{out}");
    assert_eq!(e.grubenv_now(), g);

    // The host reboots: GRUB boots B and marks it failsafe_check.
    let b = grub_model::boot_file(&e.grubenv).unwrap();
    assert_eq!(b.slot, Slot::B);
    let st = status_json(&e);
    assert_eq!(
        (st["current"].as_str(), st["boot_cycle"].as_str()),
        (Some("B"), Some("failsafe_check"))
    );
    assert_eq!(st["next_boot"], "A");
    // HostOS confirms once the guest runs.
    let (ok, out) = e.run_cli(&["confirm"]);
    assert!(ok && out.contains("confirmed slot B"), "{out}");
    assert_eq!(
        e.grubenv_now(),
        grubenv_bytes(&[("boot_alternative", "B"), ("boot_cycle", "stable")])
    );
    assert_eq!(grub_model::boot_file(&e.grubenv).unwrap().slot, Slot::B);
    let (ok, out) = e.run_cli(&["confirm"]);
    assert!(ok && out.contains("already stable"), "{out}");
    let (ok, out) = e.run_cli(&["status"]);
    assert!(ok && out.contains("running slot:     B"), "{out}");

    // Next upgrade goes back to A (after the agent restarts on the new slot).
    e.stop();
    std::fs::remove_file(&e.marker).unwrap();
    e.keel.state.lock().unwrap().state = "running".into();
    e.start(None);
    let img2 = standard_image(70);
    let url2 = e.https.route(
        "/update2.tar.zst",
        Route::Ok(Arc::new(img2.archive.clone())),
    );
    assert_eq!(e.request(&e.upgrade_request(&url2, &img2.hash)), OK);
    e.assert_slot_has("A", &img2);
    e.assert_slot_has("B", &img);
    assert_eq!(
        e.grubenv_now(),
        grubenv_bytes(&[("boot_alternative", "A"), ("boot_cycle", "first_boot")])
    );
    e.wait_for("the second reboot", Duration::from_secs(15), || {
        e.marker.exists()
    });

    // Never confirmed: the first boot runs A, the second rolls back to B.
    assert_eq!(grub_model::boot_file(&e.grubenv).unwrap().slot, Slot::A);
    assert_eq!(grub_model::boot_file(&e.grubenv).unwrap().slot, Slot::B);
    assert_eq!(
        e.grubenv_now(),
        grubenv_bytes(&[("boot_alternative", "B"), ("boot_cycle", "stable")])
    );
    e.assert_slot_has("B", &img);

    let m = parse_metrics(&e.scrape(false).1);
    assert_eq!(m["keel_agent_upgrades_succeeded_total"], 1.0);
}

/// One failure: the guest gets `Err` with `reason`, nothing active changes,
/// no shutdown, no reboot.
fn expect_failure(e: &Env, url: &str, hash: &str, reason: &str) -> String {
    let r = e.request(&e.upgrade_request(url, hash));
    assert!(r.starts_with(r#"{"Err":"upgrade failed: "#), "{r}");
    assert!(r.contains(reason), "expected {reason:?} in {r}");
    e.assert_active_untouched();
    assert!(!e.marker.exists(), "rebooted after a failure");
    assert!(e.keel.state.lock().unwrap().shutdown_bodies.is_empty());
    assert!(!e.dir.join("state").join("upgrade.download").exists());
    r
}

/// A failure whose detail (from the download) is for the host's log only:
/// the guest gets the fixed `category` message, the log has `detail`.
fn expect_failure_logged(e: &Env, url: &str, hash: &str, category: &str, detail: &str) -> String {
    let r = expect_failure(e, url, hash, category);
    assert!(!r.contains(detail), "{detail:?} reached the guest: {r}");
    assert!(e.log_text().contains(detail), "{detail:?} not logged");
    r
}

#[test]
fn failures_leave_the_active_slot_and_grubenv_untouched() {
    let mut e = Env::new(
        "failures",
        Options {
            max_download_bytes: 8 << 20,
            ..Options::default()
        },
    );
    e.start(None);
    let img = standard_image(11);
    let good = e
        .https
        .route("/good.tar.zst", Route::Ok(Arc::new(img.archive.clone())));

    // Bad hash: nothing written anywhere.
    expect_failure(
        &e,
        &good,
        &sha256_hex(b"something else"),
        "SHA-256 mismatch",
    );
    e.assert_inactive_untouched();
    // Malformed hash and non-HTTPS URL.
    expect_failure(&e, &good, "abc", "target-hash must be a SHA-256");
    let plain = good.replace("https://", "http://");
    expect_failure(&e, &plain, &img.hash, "only https:// URLs");
    // HTTP error and unreachable server.
    let missing = e.https.route("/gone", Route::Status(404));
    // Exactly the fixed message: nothing of the server's answer.
    let r = expect_failure_logged(&e, &missing, &img.hash, "download failed", "404");
    assert_eq!(
        r,
        r#"{"Err":"upgrade failed: download failed (details in the host's log)"}"#
    );
    let closed = format!("https://127.0.0.1:{}/x", free_port());
    expect_failure(&e, &closed, &img.hash, "download failed");

    // Truncated download (Content-Length promises more than arrives).
    let trunc = e
        .https
        .route("/trunc", Route::Truncated(Arc::new(img.archive.clone())));
    expect_failure(&e, &trunc, &img.hash, "download failed");

    // Oversized: announced, and streamed without a length.
    let big = Arc::new(pattern(99, 9 << 20));
    let big_hash = sha256_hex(&big);
    let announced = e.https.route("/big", Route::Ok(big.clone()));
    expect_failure(&e, &announced, &big_hash, "more than max_download_bytes");
    let streamed = e.https.route("/big-stream", Route::NoLength(big.clone()));
    expect_failure_logged(
        &e,
        &streamed,
        &big_hash,
        "more than max_download_bytes",
        "passed max_download_bytes",
    );

    // Corrupt archives whose hash matches (the guest vouched for bad bytes).
    let mut cut = img.archive.clone();
    cut.truncate(cut.len() * 2 / 3);
    let url = e.https.route("/cut", Route::Ok(Arc::new(cut.clone())));
    expect_failure(&e, &url, &sha256_hex(&cut), "invalid upgrade image");
    let mut flipped = img.archive.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0xff;
    flipped[mid + 1] ^= 0x55;
    let url = e
        .https
        .route("/flipped", Route::Ok(Arc::new(flipped.clone())));
    expect_failure(&e, &url, &sha256_hex(&flipped), "invalid upgrade image");
    let not_zstd = b"plain bytes, not an archive".to_vec();
    let url = e
        .https
        .route("/notzstd", Route::Ok(Arc::new(not_zstd.clone())));
    expect_failure(&e, &url, &sha256_hex(&not_zstd), "invalid upgrade image");
    // The validation pass runs before any write: B untouched by all of these.
    e.assert_inactive_untouched();

    // Missing root.img / boot.img, duplicate entry, image larger than its volume.
    let only_boot = make_image(&[("boot.img", &img.boot)]);
    let url = e
        .https
        .route("/noroot", Route::Ok(Arc::new(only_boot.clone())));
    expect_failure_logged(
        &e,
        &url,
        &sha256_hex(&only_boot),
        "invalid upgrade image",
        "root.img is missing",
    );
    let only_root = make_image(&[("root.img", &img.root)]);
    let url = e
        .https
        .route("/noboot", Route::Ok(Arc::new(only_root.clone())));
    expect_failure_logged(
        &e,
        &url,
        &sha256_hex(&only_root),
        "invalid upgrade image",
        "boot.img is missing",
    );
    let dup = make_image(&[
        ("boot.img", &img.boot),
        ("boot.img", &img.boot),
        ("root.img", &img.root),
    ]);
    let url = e.https.route("/dup", Route::Ok(Arc::new(dup.clone())));
    expect_failure_logged(
        &e,
        &url,
        &sha256_hex(&dup),
        "invalid upgrade image",
        "boot.img appears twice",
    );
    let huge_boot = pattern(5, BOOT_SIZE + 1);
    let too_big = make_image(&[("boot.img", &huge_boot), ("root.img", &img.root)]);
    let url = e
        .https
        .route("/toobig", Route::Ok(Arc::new(too_big.clone())));
    expect_failure_logged(
        &e,
        &url,
        &sha256_hex(&too_big),
        "invalid upgrade image",
        "larger than its volume",
    );
    e.assert_inactive_untouched();

    // boot_cycle not stable: refused before downloading.
    for cycle in ["first_boot", "failsafe_check", "install"] {
        let g = grubenv_bytes(&[("boot_alternative", "A"), ("boot_cycle", cycle)]);
        std::fs::write(&e.grubenv, &g).unwrap();
        let hits = e.https.hits.load(std::sync::atomic::Ordering::SeqCst);
        let r = e.request(&e.upgrade_request(&good, &img.hash));
        assert!(r.contains("not \\\"stable\\\""), "{r}");
        assert_eq!(std::fs::read(&e.grubenv).unwrap(), g);
        assert_eq!(
            hits,
            e.https.hits.load(std::sync::atomic::Ordering::SeqCst),
            "downloaded anyway"
        );
    }
    std::fs::write(&e.grubenv, &e.initial_grubenv).unwrap();
    // A corrupt grubenv is not guessed at.
    std::fs::write(&e.grubenv, b"garbage").unwrap();
    let r = e.request(&e.upgrade_request(&good, &img.hash));
    assert!(r.contains("cannot read the boot state"), "{r}");
    std::fs::write(&e.grubenv, &e.initial_grubenv).unwrap();
    e.assert_active_untouched();
    e.assert_inactive_untouched();

    // Every failure was counted.
    let m = parse_metrics(&e.scrape(false).1);
    let failed = |r: &str| m[&format!("keel_agent_upgrades_failed_total{{reason=\"{r}\"}}")];
    assert_eq!(failed("hash_mismatch"), 1.0);
    assert_eq!(failed("invalid_request"), 2.0);
    assert_eq!(failed("download"), 3.0);
    assert_eq!(failed("too_large"), 2.0);
    assert_eq!(failed("archive"), 7.0);
    assert_eq!(failed("not_stable"), 3.0);
    assert_eq!(failed("boot_state"), 1.0);
    assert_eq!(m["keel_agent_upgrades_started_total"], 19.0);
    assert_eq!(m["keel_agent_upgrades_succeeded_total"], 0.0);
    assert_eq!(m["keel_agent_upgrade_phase{phase=\"idle\"}"], 1.0);

    // And after all that, a good upgrade still works.
    assert_eq!(e.request(&e.upgrade_request(&good, &img.hash)), OK);
    e.assert_slot_has("B", &img);
}

#[test]
fn untrusted_certificate_is_refused() {
    let mut e = Env::new(
        "untrusted",
        Options {
            extra_ca: false,
            ..Options::default()
        },
    );
    e.start(None);
    let img = standard_image(3);
    let url = e
        .https
        .route("/u", Route::Ok(Arc::new(img.archive.clone())));
    expect_failure(&e, &url, &img.hash, "download failed");
    e.assert_inactive_untouched();
}

#[test]
fn unwritable_volume_is_refused_before_any_write() {
    let mut e = Env::new(
        "unwritable",
        Options {
            volume_override: vec![("B", "root", "/nonexistent/B_root".into())],
            ..Options::default()
        },
    );
    e.start(None);
    let img = standard_image(4);
    let url = e
        .https
        .route("/u", Route::Ok(Arc::new(img.archive.clone())));
    let hits = e.https.hits.load(std::sync::atomic::Ordering::SeqCst);
    expect_failure(&e, &url, &img.hash, "volume error: /nonexistent/B_root");
    assert_eq!(hits, e.https.hits.load(std::sync::atomic::Ordering::SeqCst));
    e.assert_inactive_untouched();
    // A directory is not a volume either.
    drop(e);
    let dir_vol = ScratchDir::new("dirvol");
    let mut e = Env::new(
        "dirvol",
        Options {
            volume_override: vec![("B", "var", dir_vol.to_path_buf())],
            ..Options::default()
        },
    );
    e.start(None);
    let url = e
        .https
        .route("/u", Route::Ok(Arc::new(img.archive.clone())));
    expect_failure(&e, &url, &img.hash, "volume error");
    e.assert_inactive_untouched();
}

#[test]
fn only_allowed_url_hosts_are_fetched_from() {
    let mut e = Env::new(
        "allowhosts",
        Options {
            upgrade_url_hosts: vec!["localhost"],
            ..Options::default()
        },
    );
    e.start(None);
    let img = standard_image(6);
    let url = e
        .https
        .route("/u", Route::Ok(Arc::new(img.archive.clone())));
    // The same server by another name: refused before any connection.
    let by_ip = url.replace("://localhost:", "://127.0.0.1:");
    let hits = e.https.hits.load(std::sync::atomic::Ordering::SeqCst);
    expect_failure(
        &e,
        &by_ip,
        &img.hash,
        "not in this host's upgrade_url_hosts",
    );
    assert_eq!(hits, e.https.hits.load(std::sync::atomic::Ordering::SeqCst));
    e.assert_inactive_untouched();
    // The allowed name: installed.
    assert_eq!(
        e.request(&e.upgrade_request(&url, &img.hash)),
        OK,
        "{}",
        e.log_text()
    );
    e.assert_slot_has("B", &img);
}

#[test]
fn write_error_midway_never_commits() {
    // /dev/full as the inactive root volume: every write fails with ENOSPC.
    let mut e = Env::new(
        "writeerr",
        Options {
            volume_override: vec![("B", "root", "/dev/full".into())],
            ..Options::default()
        },
    );
    e.start(None);
    let img = standard_image(5);
    let url = e
        .https
        .route("/u", Route::Ok(Arc::new(img.archive.clone())));
    expect_failure(&e, &url, &img.hash, "No space left on device");
    // The GRUB state machine still boots A, the untouched slot.
    assert_eq!(grub_model::boot_file(&e.grubenv).unwrap().slot, Slot::A);
    let m = parse_metrics(&e.scrape(false).1);
    assert_eq!(
        m["keel_agent_upgrades_failed_total{reason=\"volume\"}"],
        1.0
    );
}

/// Boot the grubenv with the GRUB model and check the slot it picks is whole:
/// either the untouched old slot A or the complete new slot B.
fn boots_a_complete_slot(e: &Env, img: &Image) -> Slot {
    let slot = grub_model::boot_file(&e.grubenv).unwrap().slot;
    match slot {
        Slot::A => {
            for k in ["A_boot", "A_root", "A_var"] {
                assert!(e.volume(k) == e.initial[k], "{k} changed");
            }
        }
        Slot::B => e.assert_slot_has("B", img),
    }
    slot
}

#[test]
fn crash_at_every_step_still_boots_a_complete_slot() {
    let points = host_agent::fault::UPGRADE_POINTS;
    let commit_at = points.iter().position(|p| *p == "grubenv-renamed").unwrap();
    for (i, point) in points.iter().enumerate() {
        let mut e = Env::new("crash", Options::default());
        let img = standard_image(20 + i as u64);
        let url = e
            .https
            .route("/u", Route::Ok(Arc::new(img.archive.clone())));
        e.start(Some(point));
        let r = e.request(&e.upgrade_request(&url, &img.hash));
        let st = e.wait_exit(Duration::from_secs(30));
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(6), "{point}: expected SIGABRT, got {st}");
        assert!(
            e.log_text().contains(&format!("aborting at {point}")),
            "{point}"
        );
        // The answer, if any, is Ok only once the commit is done.
        if i < commit_at {
            assert_eq!(r, "", "{point}");
            assert_eq!(
                e.grubenv_now(),
                e.initial_grubenv,
                "{point}: grubenv changed"
            );
        } else if *point == "grubenv-renamed" {
            assert_eq!(r, "", "{point}");
        } else {
            assert_eq!(r, OK, "{point}");
        }

        // Power comes back: GRUB boots a complete slot.
        let booted = boots_a_complete_slot(&e, &img);
        let expect = if i < commit_at { Slot::A } else { Slot::B };
        assert_eq!(booted, expect, "{point}");

        if booted == Slot::A {
            // The agent restarts, cleans up, and the retried upgrade succeeds.
            e.start(None);
            assert!(
                !host_agent::grubenv::temp_path(&e.grubenv).exists(),
                "{point}: temp grubenv left"
            );
            assert!(
                !e.dir.join("state").join("upgrade.download").exists(),
                "{point}"
            );
            assert_eq!(
                e.request(&e.upgrade_request(&url, &img.hash)),
                OK,
                "{point}"
            );
            e.assert_slot_has("B", &img);
            e.wait_for("reboot", Duration::from_secs(15), || e.marker.exists());
            e.stop();
            assert_eq!(grub_model::boot_file(&e.grubenv).unwrap().slot, Slot::B);
        }
        // Unconfirmed, the next boot returns to A, which is still intact.
        assert_eq!(boots_a_complete_slot(&e, &img), Slot::A, "{point}");
    }
}

/// A loop device over a file; detached on drop.
struct Loop(String);

impl Loop {
    /// Attaches `file` to a free loop device; panics with what went wrong
    /// (the tests run as root with util-linux installed).
    fn attach(file: &std::path::Path) -> Loop {
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .unwrap_or_else(|e| panic!("cannot run losetup ({e}): install util-linux"));
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            out.status.success() && dev.starts_with("/dev/loop"),
            "losetup -f --show {} failed (this test needs root and loop devices): {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(dev)
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

#[test]
fn loop_devices_as_volumes() {
    let mut e = Env::new("loop", Options::default());
    let mut loops = Vec::new();
    let mut toml = std::fs::read_to_string(&e.config).unwrap();
    for k in ["B_boot", "B_root", "B_var"] {
        let file = e.dir.join("vol").join(k);
        let l = Loop::attach(&file);
        toml = toml.replace(&format!("{}\"", file.display()), &format!("{}\"", l.0));
        loops.push(l);
    }
    std::fs::write(&e.config, toml).unwrap();
    e.start(None);
    let img = standard_image(42);
    let url = e
        .https
        .route("/u", Route::Ok(Arc::new(img.archive.clone())));

    // A volume someone holds exclusively (as a mount would) is refused.
    let held = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(&loops[1].0)
            .unwrap()
    };
    expect_failure(&e, &url, &img.hash, "Device or resource busy");
    drop(held);

    assert_eq!(
        e.request(&e.upgrade_request(&url, &img.hash)),
        OK,
        "{}",
        e.log_text()
    );
    e.wait_for("reboot", Duration::from_secs(15), || e.marker.exists());
    e.stop();
    drop(loops);
    e.assert_slot_has("B", &img);
    for k in ["A_boot", "A_root", "A_var"] {
        assert!(e.volume(k) == e.initial[k], "{k} changed");
    }
    assert_eq!(grub_model::boot_file(&e.grubenv).unwrap().slot, Slot::B);
}

#[test]
fn one_upgrade_at_a_time_and_download_time_limit() {
    let mut e = Env::new(
        "busy",
        Options {
            download_timeout_s: 3,
            ..Options::default()
        },
    );
    e.start(None);
    let img = standard_image(8);
    let slow = e.https.route(
        "/slow",
        Route::Stall(Arc::new(img.archive.clone()), Duration::from_secs(6)),
    );
    let req = e.upgrade_request(&slow, &img.hash);
    let sock = e.sock.clone();
    let first = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        let t0 = std::time::Instant::now();
        s.read_to_string(&mut out).unwrap();
        (out, t0.elapsed())
    });
    // While the first one downloads, a second is refused.
    e.wait_for("the first download", Duration::from_secs(10), || {
        e.log_text().contains("downloaded")
    });
    let r = e.request(&e.upgrade_request(&slow, &img.hash));
    assert_eq!(
        r,
        r#"{"Err":"upgrade failed: an upgrade is already in progress"}"#
    );
    // The first hits the 3 s download limit.
    let (out, took) = first.join().unwrap();
    assert!(
        out.starts_with(r#"{"Err":"upgrade failed: download failed"#),
        "{out}"
    );
    assert!(took < Duration::from_secs(6), "{took:?}");
    e.assert_active_untouched();
    e.assert_inactive_untouched();
    let m = parse_metrics(&e.scrape(false).1);
    assert_eq!(m["keel_agent_upgrades_failed_total{reason=\"busy\"}"], 1.0);
    assert_eq!(
        m["keel_agent_upgrades_failed_total{reason=\"download\"}"],
        1.0
    );
}
