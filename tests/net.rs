//! virtio-net's host side end to end, in a network namespace of the test's
//! own: `--net tap=..,bridge=..` puts the tap on the bridge (with the MTU
//! asked for), the API reports the NIC, and when Keel exits nothing it
//! made is left (a tap it created is gone, a tap that existed is off the
//! bridge). Set-up errors (missing bridge, tap in use, no CAP_NET_ADMIN)
//! stop Keel with exit code 1 before the guest starts.
//!
//! The last test boots the probe guest with its network responder on the
//! bridge and talks to it from the namespace: the datagrams of
//! `net.udp_send`, ping and ping -6, and UDP echoes up to the MTU.
//!
//! Needs root and `ip` (iproute2; tests/run-all.sh installs it), and
//! `ping` (iputils) for the responder test.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use keel_tests::{api_call, keel, probe_guest, scratch_dir, ProbeReport, ScratchDir};

const T: Duration = Duration::from_secs(30);
const BRIDGE: &str = "br6";
const BRIDGE_ADDR: &str = "10.66.0.1/24";
const BRIDGE_ADDR6: &str = "fd66::1/64";

/// A network namespace with a bridge (with an IPv4 address) in it;
/// deleted, with everything in it, when dropped.
struct Netns {
    name: String,
}

fn ip(args: &[&str]) -> Output {
    Command::new("ip")
        .args(args)
        .output()
        .expect("run `ip` (iproute2 is needed)")
}

fn ip_ok(args: &[&str]) {
    let out = ip(args);
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("keel-{tag}-{}", std::process::id());
        let _ = ip(&["netns", "del", &name]);
        ip_ok(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip_ok(&["link", "add", BRIDGE, "type", "bridge"]);
        ns.ip_ok(&["addr", "add", BRIDGE_ADDR, "dev", BRIDGE]);
        ns.ip_ok(&["link", "set", BRIDGE, "up"]);
        ns
    }

    fn ip_ok(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip_ok(&all);
    }

    /// Runs `cmd` inside the namespace (sysfs there shows its devices).
    fn exec(&self, cmd: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", self.name.as_str()];
        all.extend_from_slice(cmd);
        ip(&all)
    }

    /// `/sys/class/net/<dev>/<attr>` inside the namespace.
    fn sys(&self, dev: &str, attr: &str) -> Option<String> {
        let path = format!("/sys/class/net/{dev}/{attr}");
        let out = if attr == "master" {
            self.exec(&["readlink", &path])
        } else {
            self.exec(&["cat", &path])
        };
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn exists(&self, dev: &str) -> bool {
        self.exec(&["test", "-e", &format!("/sys/class/net/{dev}")])
            .status
            .success()
    }

    /// The bridge's ports.
    fn bridge_ports(&self) -> Vec<String> {
        let out = self.exec(&["ls", &format!("/sys/class/net/{BRIDGE}/brif")]);
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }

    /// Starts keel inside the namespace (`ip netns exec` execs it: the
    /// child's pid is keel's). `drop_net_admin` removes CAP_NET_ADMIN from
    /// the capability bounding set first, so keel runs without it.
    fn keel(&self, args: &[String], drop_net_admin: bool) -> Child {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .arg(keel())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if drop_net_admin {
            // SAFETY: prctl is async-signal-safe; it only changes the
            // child's own capability bounding set.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_CAPBSET_DROP, 12 /* CAP_NET_ADMIN */, 0, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.spawn().expect("spawn ip netns exec keel")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn guest_args(dir: &Path, api: bool, nets: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "--kernel".into(),
        probe_guest().display().to_string(),
        "--cmdline".into(),
        "console=ttyS0 probe.check=boot.cpl3 probe.idle".into(),
        "--memory".into(),
        "size=128M".into(),
        "--shutdown-timeout".into(),
        "1".into(),
    ];
    if api {
        a.push("--api-socket".into());
        a.push(dir.join("api.sock").display().to_string());
    }
    for n in nets {
        a.push("--net".into());
        a.push(n.to_string());
    }
    a
}

/// Waits for a keel that should fail; returns (exit code, stderr).
fn failed_run(mut child: Child) -> (i32, String) {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            return (
                st.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
        }
        if start.elapsed() > T {
            let _ = child.kill();
            panic!("keel did not exit");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until the API answers; panics (with keel's log) if keel exits.
fn wait_api(child: &mut Child, sock: &Path) {
    let start = Instant::now();
    while api_call(sock, "GET", "/v1/vm", "").map(|r| r.0) != Some(200) {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("keel exited ({st:?}) before its API came up:\n{err}");
        }
        assert!(start.elapsed() < T, "API never came up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM (graceful shutdown; the idle probe ignores Ctrl-Alt-Del, so
/// `--shutdown-timeout 1` stops it a second later); returns the exit code
/// and keel's log.
fn stop(child: Child) -> (i32, String) {
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    failed_run(child)
}

fn dir(name: &str) -> ScratchDir {
    scratch_dir(name)
}

#[test]
fn a_created_tap_joins_the_bridge_and_is_gone_after_exit() {
    let ns = Netns::new("c");
    let d = dir("net-created");
    let sock = d.join("api.sock");
    let mac = "6a:01:12:34:56:78";
    let mut k = ns.keel(
        &guest_args(
            &d,
            true,
            &[&format!("tap=vnet1,bridge={BRIDGE},mac={mac},mtu=1400")],
        ),
        false,
    );
    wait_api(&mut k, &sock);
    assert!(
        ns.sys("vnet1", "master")
            .is_some_and(|m| m.ends_with(&format!("/{BRIDGE}"))),
        "vnet1 is on {BRIDGE}: {:?}",
        ns.sys("vnet1", "master")
    );
    assert_eq!(ns.sys("vnet1", "mtu").as_deref(), Some("1400"));
    let flags = ns.sys("vnet1", "flags").unwrap_or_default();
    let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).unwrap_or(0);
    assert!(flags & 1 != 0, "vnet1 is up");
    assert_eq!(ns.bridge_ports(), ["vnet1"]);
    // The API reports the NIC and its counters.
    let (code, body) = api_call(&sock, "GET", "/v1/counters", "").unwrap();
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let net = v["net"].as_array().expect("net array");
    assert_eq!(net.len(), 1, "{body}");
    assert_eq!(net[0]["tap"], "vnet1");
    assert_eq!(net[0]["mac"], mac);
    for key in [
        "rx_frames",
        "rx_bytes",
        "tx_frames",
        "tx_bytes",
        "rx_dropped",
        "tx_dropped",
        "rx_stalls",
        "tap_errors",
    ] {
        assert!(net[0][key].is_u64(), "{key} in {body}");
    }
    let (_, body) = api_call(&sock, "GET", "/v1/vm", "").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let nic = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["kind"] == "virtio-net")
        .cloned()
        .expect("virtio-net in the device list");
    assert_eq!(
        (nic["path"].as_str(), nic["mac"].as_str()),
        (Some("vnet1"), Some(mac))
    );
    // A second VM on the same tap: refused (EBUSY), before its guest starts,
    // and the first VM's tap stays on the bridge.
    let (code, err) = failed_run(ns.keel(
        &guest_args(&d, false, &[&format!("tap=vnet1,bridge={BRIDGE}")]),
        false,
    ));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("vnet1") && err.contains("in use"), "{err}");
    assert_eq!(ns.bridge_ports(), ["vnet1"]);
    let (code, log) = stop(k);
    assert_eq!(code, 0, "{log}");
    assert!(!ns.exists("vnet1"), "created tap removed:\n{log}");
    assert!(ns.bridge_ports().is_empty(), "bridge membership gone");
    assert!(
        log.contains("net 0 (vnet1):"),
        "counters logged at exit:\n{log}"
    );
}

#[test]
fn a_pre_existing_tap_is_left_in_place_but_taken_off_the_bridge() {
    pre_existing_tap("p", &[]);
}

/// Without CAP_NET_ADMIN after set-up, the teardown helper does it.
#[test]
fn a_pre_existing_tap_is_taken_off_the_bridge_after_the_privilege_drop() {
    pre_existing_tap("u", &["--user", "65534:65534"]);
}

fn pre_existing_tap(tag: &str, extra: &[&str]) {
    let ns = Netns::new(tag);
    ns.ip_ok(&["tuntap", "add", "dev", "vnet1", "mode", "tap", "vnet_hdr"]);
    let d = dir(&format!("net-existing-{tag}"));
    let sock = d.join("api.sock");
    let mut args = guest_args(&d, true, &[&format!("tap=vnet1,bridge={BRIDGE}")]);
    args.extend(extra.iter().map(|a| a.to_string()));
    let mut k = ns.keel(&args, false);
    wait_api(&mut k, &sock);
    assert_eq!(ns.bridge_ports(), ["vnet1"]);
    // The teardown helper (a child process; `ip netns exec` execs keel)
    // keeps CAP_NET_ADMIN but is confined by its own seccomp filter.
    let pid = k.id();
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let helper: Vec<String> = children
        .split_whitespace()
        .map(|c| std::fs::read_to_string(format!("/proc/{c}/status")).unwrap())
        .filter(|st| st.lines().any(|l| l == "Name:\tkeel-teardown"))
        .collect();
    assert_eq!(helper.len(), 1, "one teardown helper among {children:?}");
    assert!(
        helper[0].lines().any(|l| l == "Seccomp:\t2"),
        "{}",
        helper[0]
    );
    let (code, log) = stop(k);
    assert_eq!(code, 0, "{log}");
    assert!(ns.exists("vnet1"), "a tap Keel did not create stays");
    assert_eq!(ns.sys("vnet1", "master"), None, "but is off the bridge");
    assert!(ns.bridge_ports().is_empty());
}

#[test]
fn set_up_errors_stop_keel_before_the_guest_starts() {
    let ns = Netns::new("e");
    let d = dir("net-errors");
    // No such bridge.
    let (code, err) =
        failed_run(ns.keel(&guest_args(&d, false, &["tap=vnet1,bridge=nobr0"]), false));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("bridge nobr0 does not exist"), "{err}");
    assert!(!ns.exists("vnet1"), "nothing created");
    // Without CAP_NET_ADMIN.
    let (code, err) = failed_run(ns.keel(
        &guest_args(&d, false, &[&format!("tap=vnet1,bridge={BRIDGE}")]),
        true,
    ));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("CAP_NET_ADMIN"), "{err}");
    assert!(!ns.exists("vnet1"));
    // Bad values are configuration errors naming the field.
    let (code, err) = failed_run(ns.keel(
        &guest_args(&d, false, &["tap=vnet1,mac=01:02:03:04:05:06"]),
        false,
    ));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("nets[0].mac"), "{err}");
    // The bridge's name used as a tap: it is not a tap.
    let (code, err) =
        failed_run(ns.keel(&guest_args(&d, false, &[&format!("tap={BRIDGE}")]), false));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot be opened as a tap"), "{err}");
    assert!(ns.exists(BRIDGE), "the bridge is untouched");
}

/// Runs `f` on a thread that has entered the namespace's network
/// namespace: sockets made there stay in it, wherever they are used.
fn in_netns<R: Send + 'static>(ns: &Netns, f: impl FnOnce() -> R + Send + 'static) -> R {
    let path = format!("/var/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open the namespace");
        // SAFETY: setns on a descriptor we own; it changes only this
        // thread's network namespace.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("namespace thread")
}

/// The `probe.net.udp_send` payload of a datagram of `size` bytes (as
/// tests/probe-guest/src/checks/net.rs makes it).
fn udp_send_pattern(size: usize, i: usize) -> u8 {
    (i.wrapping_mul(13).wrapping_add(size)) as u8
}

/// Keel in the namespace with its console collected by a thread.
struct Console {
    text: std::sync::Arc<std::sync::Mutex<String>>,
    /// Receives one message when the reader hits end of stream.
    ended: std::sync::mpsc::Receiver<()>,
}

impl Console {
    fn follow(child: &mut Child) -> Console {
        let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = text.clone();
        let mut out = child.stdout.take().expect("stdout");
        let (done, ended) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut out, &mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
            let _ = done.send(());
        });
        Console { text, ended }
    }

    /// The whole console output, once keel has exited: waits (up to
    /// `deadline`) for the reader to reach end of stream.
    fn finish(&self, deadline: Duration) -> String {
        assert!(
            self.ended.recv_timeout(deadline).is_ok(),
            "the console did not end within {deadline:?} of keel's exit:\n{}",
            self.get()
        );
        self.get()
    }

    fn get(&self) -> String {
        self.text.lock().unwrap().clone()
    }

    /// Waits for a line starting with `prefix`; returns it.
    fn wait_line(&self, child: &mut Child, prefix: &str, deadline: Duration) -> String {
        let start = Instant::now();
        loop {
            let text = self.get();
            if let Some(l) = text.lines().find(|l| l.starts_with(prefix)) {
                if text.contains(&format!("{l}\n")) {
                    return l.to_string();
                }
            }
            if let Some(st) = child.try_wait().unwrap() {
                panic!("keel exited ({st:?}) before {prefix:?}:\n{text}");
            }
            assert!(
                start.elapsed() < deadline,
                "no {prefix:?} on the console:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// On virtio-mmio.
#[test]
fn the_probe_answers_arp_ping_nd_and_udp_echo_through_the_tap() {
    probe_net_responder("r", &["--transport", "mmio"]);
}

/// The same with privileges dropped (on the default transport, PCI): the
/// guest's traffic still flows and
/// the tap Keel created is gone after exit (deleted by the teardown helper).
#[test]
fn the_probe_net_checks_pass_with_privileges_dropped() {
    probe_net_responder("q", &["--user", "65534:65534"]);
}

/// The same with the NIC on PCI (`--transport pci`): the probe finds it
/// through ECAM and drives it with virtio-drivers' virtio-pci transport.
#[test]
fn the_probe_net_checks_pass_over_virtio_pci() {
    probe_net_responder("p", &["--transport", "pci"]);
}

fn probe_net_responder(tag: &str, extra: &[&str]) {
    assert!(
        Command::new("ping").arg("-V").output().is_ok(),
        "this test needs `ping` (iputils-ping)"
    );
    let ns = Netns::new(tag);
    ns.ip_ok(&["addr", "add", BRIDGE_ADDR6, "dev", BRIDGE, "nodad"]);
    let d = dir(&format!("net-responder-{tag}"));
    // The receiver of net.udp_send, bound before the guest starts.
    let rx = in_netns(&ns, || {
        let s = std::net::UdpSocket::bind("10.66.0.1:9000").expect("bind 10.66.0.1:9000");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    });
    let mut args = guest_args(&d, false, &[&format!("tap=vnet1,bridge={BRIDGE}")]);
    let cmdline = args.iter().position(|a| a == "--cmdline").unwrap() + 1;
    args[cmdline] = "console=ttyS0 probe.check=net probe.net.ip=10.66.0.2/24 \
         probe.net.ip6=fd66::2 probe.net.peer=10.66.0.1 probe.net.serve_ms=10000"
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    args.extend(extra.iter().map(|a| a.to_string()));
    let mut k = ns.keel(&args, false);
    let console = Console::follow(&mut k);
    let id = console.wait_line(&mut k, "probe: net mac=", T);
    let mtu: usize = id
        .rsplit("mtu=")
        .next()
        .and_then(|m| m.trim().parse().ok())
        .unwrap_or_else(|| panic!("no MTU in {id:?}"));
    assert!(mtu >= 576, "{id}");

    // net.udp_send: sizes 1, 512, 1400 and MTU - 28, from 10.66.0.2:9000.
    let mut want: Vec<usize> = vec![1, 512, 1400, mtu - 28];
    want.retain(|&s| s <= mtu - 28);
    want.dedup();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    for _ in &want {
        let (n, from) = rx
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("net.udp_send datagram: {e}\n{}", console.get()));
        assert_eq!(from.to_string(), "10.66.0.2:9000");
        assert!(
            (0..n).all(|i| buf[i] == udp_send_pattern(n, i)),
            "payload of the {n}-byte datagram"
        );
        got.push(n);
    }
    assert_eq!(got, want, "datagram sizes");

    console.wait_line(&mut k, "probe: net serving", T);
    // ping and ping -6 (the probe answers ARP and neighbour solicitation).
    for v6 in [false, true] {
        let target = if v6 { "fd66::2" } else { "10.66.0.2" };
        let mut cmd = vec!["ping"];
        if v6 {
            cmd.push("-6");
        }
        cmd.extend(["-c", "3", "-W", "2", "-i", "0.2", target]);
        let out = ns.exec(&cmd);
        assert!(
            out.status.success(),
            "{}: {}{}\nconsole:\n{}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            console.get()
        );
    }

    // UDP echo on port 7, sizes up to the MTU.
    let sizes: Vec<usize> = [0, 1, 100, 512, 1000, 1400, mtu - 28]
        .into_iter()
        .filter(|&s| s <= mtu - 28)
        .collect();
    let echoed = in_netns(&ns, move || {
        let s = std::net::UdpSocket::bind("10.66.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.connect("10.66.0.2:7").unwrap();
        let mut buf = vec![0u8; 65536];
        let mut res = Vec::new();
        for &size in &sizes {
            let msg: Vec<u8> = (0..size).map(|i| (i * 7 + size) as u8).collect();
            // A datagram (or its echo) may be lost: three tries.
            let mut ok = false;
            for _ in 0..3 {
                s.send(&msg).unwrap();
                if let Ok(n) = s.recv(&mut buf) {
                    ok = buf[..n] == msg[..];
                    break;
                }
            }
            res.push((size, ok));
        }
        res
    });
    for (size, ok) in echoed {
        assert!(ok, "UDP echo of {size} bytes\nconsole:\n{}", console.get());
    }

    // The probe stops serving after 10 s and powers off.
    let start = Instant::now();
    let status = loop {
        if let Some(st) = k.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "keel did not exit:\n{}",
            console.get()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = console.finish(T);
    let mut log = String::new();
    if let Some(mut e) = k.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut log);
    }
    assert_eq!(status.code(), Some(0), "{text}\n{log}");
    let served = text
        .lines()
        .find(|l| l.starts_with("probe: net served "))
        .unwrap_or_else(|| panic!("no counters:\n{text}"));
    let count = |key: &str| -> u64 {
        served
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key} in {served:?}"))
    };
    assert!(count("arp") >= 1, "{served}");
    assert!(count("icmp") >= 3, "{served}");
    assert!(count("nd") >= 1, "{served}");
    assert!(count("icmp6") >= 3, "{served}");
    assert!(count("udp") >= 1, "{served}");
    assert_eq!(count("malformed"), 0, "{served}");
    ProbeReport::parse(&text).assert_all_passed(
        &["net.identify", "net.udp_send", "net.tso", "net.serve"],
        &text,
    );
    assert!(!ns.exists("vnet1"), "the created tap is gone:\n{log}");
    assert!(ns.bridge_ports().is_empty());
}
