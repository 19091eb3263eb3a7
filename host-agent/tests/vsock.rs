//! The vsock command server, end to end through the agent binary: every
//! command with the exact JSON of HostOS protocol v1, and the refusals.

mod common;

use common::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn env(name: &str, opts: Options) -> Env {
    let mut e = Env::new(name, opts);
    e.start(None);
    e
}

#[test]
fn commands_answer_with_the_reference_encodings() {
    let e = env("cmds", Options::default());
    assert_eq!(
        e.request(r#"{"sender_cid":3,"message":"GetVsockProtocol"}"#),
        r#"{"Ok":{"HostOSVsockVersion":{"major":1,"minor":0,"patch":0}}}"#
    );
    assert_eq!(
        e.request(r#"{"sender_cid":3,"message":"GetHostOSVersion"}"#),
        r#"{"Ok":{"HostOSVersion":"1.2.3-test"}}"#
    );
    for cmd in ["attach-hsm", "detach-hsm"] {
        let r = e.request(&format!(r#"{{"sender_cid":3,"message":"{cmd}"}}"#));
        assert!(
            r.starts_with(r#"{"Err":""#) && r.contains("no USB passthrough") && r.contains(cmd),
            "{r}"
        );
    }
    // start-upgrade-guest-vm: `systemctl start <unit>`, argv only.
    assert_eq!(
        e.request(r#"{"sender_cid":3,"message":"start-upgrade-guest-vm"}"#),
        r#"{"Ok":"NoPayload"}"#
    );
    assert_eq!(
        std::fs::read_to_string(&e.systemctl_log).unwrap(),
        "start guestos-upgrader.service\n"
    );
    std::fs::write(e.dir.join("systemctl.fail"), "").unwrap();
    let r = e.request(r#"{"sender_cid":3,"message":"start-upgrade-guest-vm"}"#);
    assert!(
        r.starts_with(r#"{"Err":"could not start guestos-upgrader.service"#),
        "{r}"
    );
    assert!(r.contains("Job for unit failed"), "{r}");
    // A client that does not half-close still gets its answer (the JSON is complete).
    let mut s = UnixStream::connect(&e.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(br#"{"sender_cid":3,"message":"GetVsockProtocol"}"#)
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    assert_eq!(
        std::str::from_utf8(&buf[..n]).unwrap(),
        r#"{"Ok":{"HostOSVsockVersion":{"major":1,"minor":0,"patch":0}}}"#
    );
}

/// How many times `line` is printed on `console`.
fn prints(console: &std::path::Path, line: &str) -> usize {
    std::fs::read_to_string(console)
        .unwrap()
        .matches(line)
        .count()
}

#[test]
fn notify_prints_sanitized_text_min_count_10_times_in_the_background() {
    // The HostOS default: prints 2 s apart.
    let e = env("notify", Options::default());
    let msg = "Node \u{1b}[31mupgrade\u{1b}[0m\u{1b}]0;pwned\u{7} done\r\u{8}!";
    let req =
        serde_json::json!({"sender_cid": 3, "message": {"notify": {"count": 2, "message": msg}}});
    let want = "\nNode upgrade done!\n";
    let t0 = Instant::now();
    assert_eq!(e.request(&req.to_string()), r#"{"Ok":"NoPayload"}"#);
    // The answer does not wait for the prints: the second is 2 s away.
    for c in &e.consoles {
        assert!(
            prints(c, want) < 2,
            "notify answered only after printing everything"
        );
    }
    e.wait_for("two prints 2 s apart", Duration::from_secs(10), || {
        e.consoles
            .iter()
            .all(|c| std::fs::read_to_string(c).unwrap() == want.repeat(2))
    });
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "prints are 2 s apart"
    );

    // The count is capped at 10 (with prints 10 ms apart, so that the cap
    // is reached quickly): exactly 10 copies once the agent says it is done.
    let e = env(
        "notify-cap",
        Options {
            notify_interval_s: Some(0.01),
            ..Options::default()
        },
    );
    let req = serde_json::json!({"sender_cid": 3, "message": {"notify": {"count": 4_000_000_000u32, "message": "x"}}});
    assert_eq!(e.request(&req.to_string()), r#"{"Ok":"NoPayload"}"#);
    let done = "notify: done, printed ";
    e.wait_for(
        "the end of the notification",
        Duration::from_secs(20),
        || {
            // Either the printer finished, or it went past the cap.
            e.log_text().contains(done) || e.consoles.iter().any(|c| prints(c, "\nx\n") > 10)
        },
    );
    for c in &e.consoles {
        let text = std::fs::read_to_string(c).unwrap();
        assert_eq!(text, "\nx\n".repeat(10), "{}", c.display());
    }
    let log = e.log_text();
    assert!(log.contains("printing a guest message 10 time(s)"), "{log}");
    assert!(log.contains("notify: done, printed 10 time(s)"), "{log}");
}

#[test]
fn wrong_sender_cid_is_refused_and_logged() {
    let e = env("cid", Options::default());
    for cid in [2u32, 4, 0, u32::MAX] {
        let r = e.request(&format!(
            r#"{{"sender_cid":{cid},"message":"GetHostOSVersion"}}"#
        ));
        assert_eq!(
            r,
            format!(
                r#"{{"Err":"sender_cid {cid} does not match the guest's CID; request refused"}}"#
            )
        );
    }
    // Nothing ran: no upgrade, no notification. A notification starts
    // (and logs so) before its answer is sent; a refused one never did.
    let r = e.request(
        r#"{"sender_cid":5,"message":{"notify":{"count":1,"message":"should not print"}}}"#,
    );
    assert!(r.starts_with(r#"{"Err":"#));
    assert!(
        !e.log_text().contains("notify: printing"),
        "{}",
        e.log_text()
    );
    // A valid notification afterwards prints alone.
    let r = e.request(r#"{"sender_cid":3,"message":{"notify":{"count":1,"message":"marker"}}}"#);
    assert_eq!(r, r#"{"Ok":"NoPayload"}"#);
    e.wait_for("the marker notification", Duration::from_secs(10), || {
        e.log_text().contains("notify: done, printed 1 time(s)")
    });
    for c in &e.consoles {
        assert_eq!(std::fs::read_to_string(c).unwrap(), "\nmarker\n");
    }
    assert_eq!(e.log_text().matches("notify: printing").count(), 1);
    assert!(e
        .log_text()
        .contains("refused GetHostOSVersion from sender_cid 4"));
    let m = parse_metrics(&e.scrape(false).1);
    assert_eq!(
        m["keel_agent_vsock_rejected_total{reason=\"sender_cid\"}"],
        5.0
    );
}

#[test]
fn malformed_and_oversized_requests_get_err() {
    let e = env("malformed", Options::default());
    for bad in [
        "",
        "not json",
        "{\"sender_cid\":3",
        "{\"sender_cid\":3,\"message\":\"set-node-id\"}",
        "{\"sender_cid\":\"3\",\"message\":\"GetVsockProtocol\"}",
        "{\"message\":\"GetVsockProtocol\"}",
        "[1,2,3]",
        "\u{0}\u{1}\u{2}",
    ] {
        let r = e.request(bad);
        assert!(
            r.starts_with(r#"{"Err":"malformed request"#),
            "{bad:?} -> {r}"
        );
    }
    // Oversized: more than max_request_bytes (64 KiB here), never completed.
    let mut s = UnixStream::connect(&e.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let big = format!(
        "{{\"sender_cid\":3,\"message\":{{\"notify\":{{\"count\":1,\"message\":\"{}",
        "a".repeat(70_000)
    );
    let _ = s.write_all(big.as_bytes());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert_eq!(
        out,
        r#"{"Err":"request too large (more than 65536 bytes)"}"#
    );
    // The server still works.
    assert!(e
        .request(r#"{"sender_cid":3,"message":"GetVsockProtocol"}"#)
        .starts_with(r#"{"Ok""#));
}

#[test]
fn slow_client_hits_the_5s_read_timeout() {
    let e = env("slow", Options::default());
    let mut s = UnixStream::connect(&e.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
    // Before the write: the 5 s count from when the server reads it.
    let t0 = Instant::now();
    s.write_all(b"{\"sender_cid\":3,").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let waited = t0.elapsed();
    assert_eq!(out, r#"{"Err":"timed out reading the request"}"#);
    // The 5 s read timeout, not the 30 s total deadline, ended it.
    assert!(
        waited >= Duration::from_millis(4500) && waited < Duration::from_secs(30),
        "{waited:?}"
    );
    // A client that connects and sends nothing at all is dropped the same way.
    let mut s = UnixStream::connect(&e.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert_eq!(out, r#"{"Err":"timed out reading the request"}"#);
}

#[test]
fn dribbling_client_hits_the_total_deadline() {
    // Bytes keep arriving far within the per-read timeout (60 s), but the
    // request never completes (blanks inside the JSON object): only the
    // total deadline (2 s) can end it.
    let e = env(
        "dribble",
        Options {
            read_timeout_s: 60.0,
            total_timeout_s: 2.0,
            ..Options::default()
        },
    );
    // Before connecting: the server's deadline starts when it accepts.
    let t0 = Instant::now();
    let mut s = UnixStream::connect(&e.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut r2 = s.try_clone().unwrap();
    let (answered, answer) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = String::new();
        let _ = r2.read_to_string(&mut out);
        let _ = answered.send(out);
    });
    s.write_all(br#"{"sender_cid":3,"#).unwrap();
    // A blank every 50 ms until the answer comes (or the server closes).
    let out = loop {
        match answer.recv_timeout(Duration::from_millis(50)) {
            Ok(out) => break out,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("reader thread: {e}"),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no answer: the total deadline was not enforced"
        );
        let _ = s.write_all(b" ");
    };
    assert_eq!(out, r#"{"Err":"timed out reading the request"}"#);
    let t = t0.elapsed();
    assert!(
        t >= Duration::from_secs(2),
        "answered before the deadline: {t:?}"
    );
}

#[test]
fn unconfigured_upgrade_vm_and_missing_version_file() {
    let e = env(
        "unconfigured",
        Options {
            upgrade_vm_unit: None,
            ..Options::default()
        },
    );
    let r = e.request(r#"{"sender_cid":3,"message":"start-upgrade-guest-vm"}"#);
    assert_eq!(
        r,
        r#"{"Err":"start-upgrade-guest-vm: no upgrade VM unit is configured on this host"}"#
    );
    std::fs::remove_file(e.dir.join("version.txt")).unwrap();
    let r = e.request(r#"{"sender_cid":3,"message":"GetHostOSVersion"}"#);
    assert!(
        r.starts_with(r#"{"Err":"could not read the HostOS version"#),
        "{r}"
    );
}

#[test]
fn many_parallel_clients_are_all_answered() {
    let e = env("parallel", Options::default());
    let handles: Vec<_> = (0..12)
        .map(|_| {
            let sock = e.sock.clone();
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&sock).unwrap();
                s.write_all(br#"{"sender_cid":3,"message":"GetHostOSVersion"}"#)
                    .unwrap();
                s.shutdown(std::net::Shutdown::Write).unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).unwrap();
                out
            })
        })
        .collect();
    for h in handles {
        assert_eq!(
            h.join().unwrap(),
            r#"{"Ok":{"HostOSVersion":"1.2.3-test"}}"#
        );
    }
}
