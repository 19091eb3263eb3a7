//! Metrics: the endpoint scraped and parsed, the textfile, TLS.

mod common;

use common::*;
use std::io::{Read, Write};
use std::time::Duration;

#[test]
fn endpoint_exports_hostos_agent_and_keel_metrics() {
    let mut e = Env::new("metrics", Options::default());
    e.start(None);
    // Some traffic to count.
    e.request(r#"{"sender_cid":3,"message":"GetVsockProtocol"}"#);
    e.request(r#"{"sender_cid":3,"message":"attach-hsm"}"#);
    e.request(r#"{"sender_cid":9,"message":"GetVsockProtocol"}"#);
    e.request("{{{");

    let (head, body) = e.scrape(false);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    assert!(!body.contains("# EOF"));
    assert!(
        body.contains("# TYPE keel_vcpus_exits_io_in_total counter"),
        "{body}"
    );
    let m = parse_metrics(&body);
    let want = [
        ("hostos_guestos_state{vm=\"guestos\"}", 0.0),
        ("hostos_boot_stable", 1.0),
        (
            "hostos_boot_action{current=\"A\",next_boot=\"A\",boot_cycle=\"stable\"}",
            0.0,
        ),
        ("hostos_version{version=\"1.2.3-test\"}", 1.0),
        ("keel_api_up", 1.0),
        ("keel_guest_boot{vm=\"guestos\",state=\"pending\"}", 1.0),
        ("keel_guest_boot{vm=\"guestos\",state=\"success\"}", 0.0),
        ("keel_guest_boot{vm=\"guestos\",state=\"timeout\"}", 0.0),
        ("keel_vm_uptime_s", 12.5),
        ("keel_vm_vcpus", 2.0),
        ("keel_vcpus_exits_io_in_total{index=\"0\"}", 11.0),
        ("keel_vcpus_exits_mmio_write_total{index=\"1\"}", 24.0),
        ("keel_vcpus_exits_other_total{index=\"1\"}", 1.0),
        ("keel_disks_read_bytes_total{index=\"0\"}", 20480.0),
        ("keel_disks_write_ops_total{index=\"0\"}", 2.0),
        ("keel_disks_io_errors_total{index=\"0\"}", 0.0),
        ("keel_something_new_nested_value_total", 7.0),
        ("keel_agent_upgrades_started_total", 0.0),
        (
            "keel_agent_upgrades_failed_total{reason=\"hash_mismatch\"}",
            0.0,
        ),
        ("keel_agent_upgrade_phase{phase=\"idle\"}", 1.0),
        (
            "keel_agent_vsock_requests_total{command=\"GetVsockProtocol\",result=\"ok\"}",
            1.0,
        ),
        (
            "keel_agent_vsock_requests_total{command=\"attach-hsm\",result=\"err\"}",
            1.0,
        ),
        (
            "keel_agent_vsock_rejected_total{reason=\"sender_cid\"}",
            1.0,
        ),
        ("keel_agent_vsock_rejected_total{reason=\"malformed\"}", 1.0),
    ];
    for (series, v) in want {
        assert_eq!(m.get(series), Some(&v), "{series} in\n{body}");
    }

    // OpenMetrics when asked for.
    let (head, body) = e.scrape(true);
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(body.ends_with("# EOF\n"));
    assert!(body.contains("# TYPE keel_vcpus_exits_io_in counter"));
    assert_eq!(
        parse_metrics(&body)["keel_vcpus_exits_io_in_total{index=\"0\"}"],
        11.0
    );

    // Unknown paths.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", e.metrics_port)).unwrap();
    s.write_all(b"GET /nope HTTP/1.1\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 404"));

    // The boot monitor decides.
    e.keel.state.lock().unwrap().guest_boot = "timeout".into();
    let m = parse_metrics(&e.scrape(false).1);
    assert_eq!(m["keel_guest_boot{vm=\"guestos\",state=\"timeout\"}"], 1.0);
    assert_eq!(m["keel_guest_boot{vm=\"guestos\",state=\"pending\"}"], 0.0);

    // The guest stops, an upgrade is pending, Keel goes away.
    e.keel.state.lock().unwrap().state = "paused".into();
    assert_eq!(
        parse_metrics(&e.scrape(false).1)["hostos_guestos_state{vm=\"guestos\"}"],
        1.0
    );
    e.keel.state.lock().unwrap().state = "stopped".into();
    assert_eq!(
        parse_metrics(&e.scrape(false).1)["hostos_guestos_state{vm=\"guestos\"}"],
        2.0
    );
    std::fs::write(
        &e.grubenv,
        grubenv_bytes(&[("boot_alternative", "B"), ("boot_cycle", "first_boot")]),
    )
    .unwrap();
    let m = parse_metrics(&e.scrape(false).1);
    assert_eq!(m["hostos_boot_stable"], 0.0);
    assert_eq!(
        m["hostos_boot_action{current=\"A\",next_boot=\"B\",boot_cycle=\"first_boot\"}"],
        1.0
    );
    std::fs::write(
        &e.grubenv,
        grubenv_bytes(&[("boot_alternative", "B"), ("boot_cycle", "failsafe_check")]),
    )
    .unwrap();
    let m = parse_metrics(&e.scrape(false).1);
    assert_eq!(
        m["hostos_boot_action{current=\"B\",next_boot=\"A\",boot_cycle=\"failsafe_check\"}"],
        2.0
    );
    std::fs::remove_file(&e.keel.socket).unwrap();
    let m = parse_metrics(&e.scrape(false).1);
    assert_eq!(m["hostos_guestos_state{vm=\"guestos\"}"], 2.0);
    assert_eq!(m["keel_api_up"], 0.0);
    assert!(!m.keys().any(|k| k.starts_with("keel_vcpus")));
    assert!(!m.keys().any(|k| k.starts_with("keel_guest_boot")));
    std::fs::remove_file(e.dir.join("version.txt")).unwrap();
    assert_eq!(
        parse_metrics(&e.scrape(false).1)["hostos_version{version=\"unknown\"}"],
        0.0
    );
}

#[test]
fn textfile_is_written_atomically_and_refreshed() {
    let mut e = Env::new("textfile", Options::default());
    e.start(None);
    e.wait_for("the textfile", Duration::from_secs(10), || {
        e.textfile.exists()
    });
    let text = std::fs::read_to_string(&e.textfile).unwrap();
    assert!(!text.contains("# EOF"));
    assert!(text.contains("# HELP hostos_boot_stable"));
    assert!(text.contains("# TYPE keel_agent_upgrades_started_total counter"));
    let m = parse_metrics(&text);
    assert_eq!(m["hostos_guestos_state{vm=\"guestos\"}"], 0.0);
    assert_eq!(m["keel_disks_flush_ops_total{index=\"0\"}"], 1.0);
    // Only the .prom file is in the directory (the temp file is renamed away).
    let names: Vec<_> = std::fs::read_dir(e.textfile.parent().unwrap())
        .unwrap()
        .map(|d| d.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(names, vec!["keel_agent.prom".to_string()]);
    // Refreshed (interval 1 s here).
    e.keel.state.lock().unwrap().state = "stopped".into();
    e.wait_for("the refreshed textfile", Duration::from_secs(10), || {
        let t = std::fs::read_to_string(&e.textfile).unwrap_or_default();
        parse_metrics(&t).get("hostos_guestos_state{vm=\"guestos\"}") == Some(&2.0)
    });
}

#[test]
fn endpoint_over_tls() {
    let mut e = Env::new(
        "metrics-tls",
        Options {
            metrics_tls: true,
            ..Options::default()
        },
    );
    e.start(None);
    let pem = std::fs::read(&e.https.ca_file).unwrap();
    let certs: Vec<_> = ureq::tls::parse_pem(&pem)
        .filter_map(|i| match i {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c.to_owned()),
            _ => None,
        })
        .collect();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
                .build(),
        )
        .build()
        .into();
    let body = agent
        .get(&format!("https://localhost:{}/metrics", e.metrics_port))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    assert_eq!(parse_metrics(&body)["hostos_boot_stable"], 1.0);
    // Plain HTTP on the TLS port gets nothing useful.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", e.metrics_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(!String::from_utf8_lossy(&out).contains("hostos_boot_stable"));
}
