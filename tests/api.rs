//! The control socket end to end: roles from SO_PEERCRED, info and
//! counters, pause/resume, graceful shutdown (API and SIGTERM), forced stop
//! after the timeout, console attach, systemd notifications, bad requests.

use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use keel_tests::{api_call, keelctl_as, probe_guest, scratch_dir, RunningKeel, ScratchDir};

const T: Duration = Duration::from_secs(30);
/// Groups of the test's config (numeric, so no /etc/group entries needed).
const RO_GID: u32 = 4343;
const ADMIN_GID: u32 = 4344;
const TEST_UID: u32 = 4242;

fn start(
    name: &str,
    cmdline: &str,
    timeout_s: u64,
    envs: &[(&str, String)],
) -> (ScratchDir, RunningKeel) {
    start_with(name, cmdline, timeout_s, envs, "")
}

/// As [`start`], with more lines for the `[control]` table.
fn start_with(
    name: &str,
    cmdline: &str,
    timeout_s: u64,
    envs: &[(&str, String)],
    control: &str,
) -> (ScratchDir, RunningKeel) {
    let dir = scratch_dir(name);
    // The socket's directory must be reachable by the unprivileged caller.
    let _ = std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755));
    let sock = dir.join("api.sock");
    let cfg = dir.join("vm.toml");
    std::fs::write(
        &cfg,
        format!(
            "[payload]\nkernel = \"{}\"\ncmdline = \"console=ttyS0 probe.check=boot.cpl3 {cmdline}\"\n[memory]\nsize = \"128M\"\n[cpus]\nboot = 2\n[control]\napi_socket = \"{}\"\nadmin_group = \"{ADMIN_GID}\"\nreadonly_group = \"{RO_GID}\"\nshutdown_timeout_s = {timeout_s}\n{control}",
            probe_guest().display(),
            sock.display()
        ),
    )
    .unwrap();
    let k = RunningKeel::start(&["--config".into(), cfg.display().to_string()], &sock, envs);
    (dir, k)
}

/// Every vCPU exit counted so far, per vCPU and kind, from `GET /v1/counters`.
fn vcpu_exits(sock: &Path) -> Vec<(u64, String, u64)> {
    let (code, body) = api_call(sock, "GET", "/v1/counters", "").expect("API answers");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("counters JSON");
    let vcpus = v["vcpus"].as_array().expect("vcpus in the counters");
    let mut out = Vec::new();
    for c in vcpus {
        let index = c["index"].as_u64().expect("vCPU index");
        let exits = c["exits"].as_object().expect("exits of a vCPU");
        for (kind, n) in exits {
            out.push((index, kind.clone(), n.as_u64().expect("exit count")));
        }
    }
    assert!(!out.is_empty(), "no vCPU exit counters: {body}");
    out
}

fn keelctl(sock: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(keel_tests::workspace_binary("keelctl"))
        .arg("--socket")
        .arg(sock)
        .args(args)
        .output()
        .expect("run keelctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn roles_decide_who_may_do_what() {
    let (_dir, mut k) = start("api-roles", "probe.idle", 5, &[]);
    let sock = k.socket.clone();
    // Root: everything.
    let (code, out, _) = keelctl(&sock, &["--json", "info"]);
    assert_eq!(code, 0);
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["state"], "running");
    assert_eq!(info["vcpus"], 2);
    assert_eq!(info["topology"]["cores"], 2);
    assert_eq!(info["memory"]["size_bytes"], 128u64 << 20);
    assert_eq!(info["boot"]["protocol"], "pvh");
    assert_eq!(info["pid"], k.child.id());
    // A read-only member may query, not change state.
    let (code, out, err) = keelctl_as(TEST_UID, &[RO_GID], &sock, &["--json", "counters"]);
    assert_eq!(code, 0, "{err}");
    let counters: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(counters["vcpus"][0]["exits"]["io_out"].as_u64().unwrap() > 0);
    let (code, _, err) = keelctl_as(TEST_UID, &[RO_GID], &sock, &["pause"]);
    assert_eq!(code, 4, "denied: {err}");
    assert!(
        k.log()
            .contains(&format!("denied PUT /v1/vm/pause to uid {TEST_UID}")),
        "{}",
        k.log()
    );
    // An admin member may.
    let (code, _, err) = keelctl_as(TEST_UID + 1, &[ADMIN_GID, RO_GID], &sock, &["pause"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, _) = keelctl(&sock, &["resume"]);
    assert_eq!(code, 0);
    // No group: the socket itself (0660) refuses.
    let (code, _, err) = keelctl_as(TEST_UID, &[TEST_UID], &sock, &["info"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.to_lowercase().contains("permission denied"), "{err}");
    let (code, _, _) = keelctl(&sock, &["stop"]);
    assert_eq!(code, 0);
    assert_eq!(k.wait_exit(T), 0);
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    let (_dir, mut k) = start("api-pause", "probe.interactive probe.heartbeat=50", 5, &[]);
    k.wait_console("probe: tick 3", T);
    let (code, out, _) = keelctl(&k.socket, &["pause"]);
    assert_eq!(code, 0);
    assert!(out.contains("paused"));
    let (_, info, _) = keelctl(&k.socket, &["--json", "info"]);
    assert!(info.contains("\"state\":\"paused\""), "{info}");
    // `pause` answers once every vCPU is parked outside KVM_RUN, so from
    // here on no vCPU exit may be counted. (The console is no measure of
    // that: a tick printed before the pause may still be in the pipe.)
    // Watch for as long as ten heartbeats of the running guest would take;
    // the window decides how sensitive the check is, not whether it passes.
    let paused_exits = vcpu_exits(&k.socket);
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_millis(500) {
        let now = vcpu_exits(&k.socket);
        assert_eq!(now, paused_exits, "vCPU exits were counted while paused");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ticks = |s: &str| s.matches("probe: tick").count();
    let during = ticks(&k.console());
    assert_eq!(keelctl(&k.socket, &["resume"]).0, 0);
    k.wait_console(&format!("probe: tick {}", during + 4), T);
    // Resuming a running VM is fine; pausing twice too.
    assert_eq!(keelctl(&k.socket, &["resume"]).0, 0);
    assert_eq!(keelctl(&k.socket, &["stop"]).0, 0);
    assert_eq!(k.wait_exit(T), 0);
}

#[test]
fn graceful_shutdown_round_trip() {
    // The default: the ACPI power button (a GED event the probe polls).
    let (_dir, mut k) = start("api-shutdown", "probe.interactive", 30, &[]);
    k.wait_console("probe: interactive", T);
    let (code, out, _) = keelctl(&k.socket, &["shutdown", "--timeout", "20"]);
    assert_eq!(code, 0);
    assert!(out.contains("shutting-down"), "{out}");
    assert_eq!(k.wait_exit(T), 0);
    let console = k.console();
    assert!(console.contains("probe: power-button"), "{console}");
    assert!(!console.contains("probe: ctrl-alt-del"), "{console}");
    assert!(
        k.log()
            .contains("graceful shutdown (API request): ACPI power button"),
        "{}",
        k.log()
    );
}

#[test]
fn graceful_shutdown_by_ctrl_alt_del_when_configured() {
    let (_dir, mut k) = start_with(
        "api-shutdown-cad",
        "probe.interactive",
        30,
        &[],
        "shutdown_method = \"ctrl-alt-del\"\n",
    );
    k.wait_console("probe: interactive", T);
    assert_eq!(keelctl(&k.socket, &["shutdown", "--timeout", "20"]).0, 0);
    assert_eq!(k.wait_exit(T), 0);
    let console = k.console();
    assert!(console.contains("probe: ctrl-alt-del"), "{console}");
    assert!(!console.contains("probe: power-button"), "{console}");
    assert!(
        k.log()
            .contains("graceful shutdown (API request): Ctrl-Alt-Del"),
        "{}",
        k.log()
    );
}

#[test]
fn a_guest_that_ignores_shutdown_is_stopped_after_the_timeout() {
    let (_dir, mut k) = start("api-timeout", "probe.idle", 30, &[]);
    k.wait_console("probe: idle", T);
    let t0 = Instant::now();
    assert_eq!(keelctl(&k.socket, &["shutdown", "--timeout", "1"]).0, 0);
    assert_eq!(k.wait_exit(T), 0);
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "stopped before the timeout"
    );
    assert!(k.log().contains("forced stop"), "{}", k.log());
}

#[test]
fn sigterm_is_a_graceful_shutdown_and_systemd_hears_about_it() {
    let dir = scratch_dir("api-notify");
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let (_d, mut k) = start(
        "api-sigterm",
        "probe.interactive",
        30,
        &[("NOTIFY_SOCKET", notify_path.display().to_string())],
    );
    k.wait_console("probe: interactive", T);
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(k.child.id() as i32, libc::SIGTERM) }, 0);
    assert_eq!(k.wait_exit(T), 0);
    assert!(
        k.console().contains("probe: power-button"),
        "{}",
        k.console()
    );
    let mut msgs = String::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = notify.recv(&mut buf) {
        msgs.push_str(&String::from_utf8_lossy(&buf[..n]));
        msgs.push('\n');
    }
    assert!(msgs.contains("READY=1"), "{msgs}");
    assert!(msgs.contains("STATUS=VM running"), "{msgs}");
    assert!(msgs.contains("STATUS=VM shutting-down"), "{msgs}");
    assert!(msgs.contains("STOPPING=1"), "{msgs}");
}

#[test]
fn console_attach_reads_output_and_types_into_the_guest() {
    let (_dir, mut k) = start(
        "api-console",
        "probe.interactive probe.heartbeat=100",
        5,
        &[],
    );
    k.wait_console("probe: interactive", T);
    let mut s = UnixStream::connect(&k.socket).unwrap();
    s.write_all(b"GET /v1/console?mode=rw HTTP/1.1\r\nHost: k\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 512];
    while !seen.contains("probe: tick") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "console closed:\n{seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    // A second writer is refused while this one is attached; a reader is not.
    let (code, _) = api_call(&k.socket, "GET", "/v1/console?mode=rw", "").unwrap();
    assert_eq!(code, 409);
    s.write_all(b"hello keel\n").unwrap();
    while !seen.contains("probe: console got hello keel") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "console closed:\n{seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    drop(s);
    assert_eq!(keelctl(&k.socket, &["stop"]).0, 0);
    assert_eq!(k.wait_exit(T), 0);
}

#[test]
fn bad_requests_get_clear_answers_and_bounded_resources() {
    let (_dir, mut k) = start("api-bad", "probe.idle", 5, &[]);
    let sock = k.socket.clone();
    let call = |m: &str, p: &str, b: &str| api_call(&sock, m, p, b).expect("reachable");
    assert_eq!(call("GET", "/v1/nope", "").0, 404);
    assert_eq!(call("DELETE", "/v1/vm", "").0, 405);
    let (code, body) = call("PUT", "/v1/vm/shutdown", "{not json");
    assert_eq!(code, 400);
    assert!(body.contains("bad JSON"), "{body}");
    assert_eq!(call("PUT", "/v1/vm/shutdown", r#"{"timeout_s":0}"#).0, 400);
    assert_eq!(call("PUT", "/v1/vm/shutdown", &"x".repeat(20 << 10)).0, 413);
    // Garbage instead of HTTP.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(b"\x00\x01\x02 hello\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    // Slow and half-open clients: each holds a thread at most for the
    // request deadline, and others are served meanwhile.
    let idle: Vec<UnixStream> = (0..20)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    let mut slow = UnixStream::connect(&sock).unwrap();
    slow.write_all(b"GET /v1/vm HTTP/1.1\r\n").unwrap(); // never finishes
    let t0 = Instant::now();
    assert_eq!(call("GET", "/v1/vm", "").0, 200);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "served while others stall"
    );
    // Many clients at once: everyone gets an answer (200 or 503).
    let handles: Vec<_> = (0..100)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || api_call(&sock, "GET", "/v1/counters", "").map(|r| r.0))
        })
        .collect();
    let codes: Vec<Option<u16>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(
        codes.iter().all(|c| matches!(c, Some(200) | Some(503))),
        "{codes:?}"
    );
    assert!(codes.iter().filter(|c| **c == Some(200)).count() >= 30);
    // The slow client is cut off with 408 after the deadline.
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut resp = String::new();
    let _ = slow.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    drop(idle);
    // The guest kept running throughout.
    assert!(call("GET", "/v1/vm", "")
        .1
        .contains("\"state\":\"running\""));
    assert_eq!(call("PUT", "/v1/vm/stop", "").0, 202);
    assert_eq!(k.wait_exit(T), 0);
}

#[test]
fn systemd_unit_is_valid() {
    let unit =
        std::fs::read_to_string(keel_tests::repo_root().join("resources/systemd/keel.service"))
            .unwrap();
    for needle in [
        "Type=notify",
        "ExecStart=/usr/bin/keel ",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "DeviceAllow=/dev/kvm rw",
        "WatchdogSec=",
    ] {
        assert!(unit.contains(needle), "unit lacks {needle}");
    }
    // systemd's own parser, with ExecStart pointing at the built binary.
    let dir = scratch_dir("unit");
    let keel = keel_tests::keel();
    std::fs::write(
        dir.join("keel.service"),
        unit.replace("/usr/bin/keel ", &format!("{} ", keel.display())),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.join("keel.service"))
        .output();
    match out {
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            let real: Vec<&str> = err
                .lines()
                .filter(|l| {
                    l.contains("keel.service")
                        && !l.contains("Documentation")
                        && !l.contains("Cannot add dependency")
                })
                .collect();
            assert!(real.is_empty(), "systemd-analyze verify:\n{err}");
        }
        Err(e) => panic!("systemd-analyze not available: {e} (install systemd)"),
    }
}

/// `systemd-analyze verify` of `units` (paths in `dir`); every complaint
/// about our files (the unit, its drop-ins) fails the test.
fn systemd_verify(dir: &Path, units: &[&str]) {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(units.iter().map(|u| dir.join(u)))
        .output()
        .unwrap_or_else(|e| panic!("systemd-analyze not available: {e} (install systemd)"));
    let err = String::from_utf8_lossy(&out.stderr);
    let real: Vec<&str> = err
        .lines()
        .filter(|l| {
            (l.contains("keel@") || l.contains(".conf"))
                && !l.contains("Documentation")
                && !l.contains("Cannot add dependency")
        })
        .collect();
    assert!(real.is_empty(), "systemd-analyze verify:\n{err}");
}

#[test]
fn keel_template_unit_and_its_two_instances_are_valid() {
    let root = keel_tests::repo_root().join("resources/systemd");
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let unit = read("keel@.service");
    let guestos = read("keel@guestos.service.d/guestos.conf");
    let upgrade = read("keel@upgrade.service.d/upgrade.conf");
    for needle in [
        "Type=notify",
        "ExecStart=/usr/bin/keel --config /etc/keel/%i.toml --boot-slot %i",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "DeviceAllow=/dev/kvm rw",
        "WatchdogSec=",
    ] {
        assert!(unit.contains(needle), "keel@.service lacks {needle}");
    }
    for needle in [
        "Restart=always",
        "RestartSec=60",
        "ExecStartPost=-+/usr/bin/keel-agent --config /etc/keel/keel-agent.toml confirm",
    ] {
        assert!(
            guestos.contains(needle),
            "the GuestOS drop-in lacks {needle}"
        );
    }
    assert!(upgrade.contains("Restart=no"), "{upgrade}");
    assert!(!upgrade.contains("ExecStartPost"), "{upgrade}");

    // systemd's own parser on both instances, the drop-ins beside the
    // template, with the built binaries.
    let dir = scratch_dir("unit-template");
    let bin = |name: &str| keel_tests::workspace_binary(name).display().to_string();
    std::fs::write(
        dir.join("keel@.service"),
        unit.replace("/usr/bin/keel ", &format!("{} ", bin("keel"))),
    )
    .unwrap();
    for (d, text) in [
        (
            "keel@guestos.service.d",
            guestos.replace("/usr/bin/keel-agent", &bin("keel-agent")),
        ),
        ("keel@upgrade.service.d", upgrade.clone()),
    ] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
        let name = if d.starts_with("keel@guestos") {
            "guestos.conf"
        } else {
            "upgrade.conf"
        };
        std::fs::write(dir.join(d).join(name), text).unwrap();
    }
    systemd_verify(&dir, &["keel@guestos.service", "keel@upgrade.service"]);
    // The check can fail: a misspelt key in a drop-in is reported.
    std::fs::write(
        dir.join("keel@upgrade.service.d/upgrade.conf"),
        format!("{upgrade}\nRestrt=no\n"),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.join("keel@upgrade.service"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Restrt"),
        "systemd-analyze did not read the drop-in: {out:?}"
    );
}

#[test]
fn example_configs_parse_and_the_vm_roles_are_as_documented() {
    let examples = keel_tests::repo_root().join("resources/examples");
    let mut seen = Vec::new();
    for e in std::fs::read_dir(&examples).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        let out = Command::new(keel_tests::keel())
            .arg("--config")
            .arg(&path)
            .arg("--print-config")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}: {out:?}", path.display());
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        seen.push((name, String::from_utf8_lossy(&out.stdout).into_owned()));
    }
    let printed = |n: &str| {
        seen.iter()
            .find(|(name, _)| name == n)
            .map(|(_, t)| t.clone())
            .unwrap_or_else(|| panic!("no resources/examples/{n}.toml"))
    };
    let guestos = printed("guestos");
    let upgrade = printed("upgrade");
    assert!(upgrade.contains("size = \"4G\""), "{upgrade}");
    for (name, text) in [("guestos", &guestos), ("upgrade", &upgrade)] {
        for needle in [
            "hugepages = \"auto\"",
            "[config_disk]",
            "[boot_monitor]",
            "timeout_s = 300",
            "\"/dev/tty1\"",
        ] {
            assert!(text.contains(needle), "{name}: no {needle} in\n{text}");
        }
        // The payload comes from the disk (--boot-slot in the unit).
        assert!(!text.contains("kernel ="), "{name}:\n{text}");
    }
    // The two VMs run side by side: nothing they would both claim.
    for key in ["api_socket", "tap", "cid", "path = \"/var/log"] {
        let line = |t: &str| t.lines().find(|l| l.contains(key)).map(str::to_string);
        assert_ne!(
            line(&guestos),
            line(&upgrade),
            "both VMs use the same {key}"
        );
    }
}
