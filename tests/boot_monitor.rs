//! The boot monitor end to end: the probe guest prints HostOS's
//! `GUESTOS BOOT SUCCESS`/`FAILURE` marker (`probe.boot=`), or nothing, and
//! `GET /v1/vm` (`guest_boot`), `keelctl info`, systemd's `STATUS=` and the
//! configured consoles report pending, success, failure or timeout.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use keel_tests::{api_call, probe_guest, scratch_dir, RunningKeel, ScratchDir};

const T: Duration = Duration::from_secs(30);

/// A probe guest with an API socket, a notify socket, and a console file
/// for the monitor's line; `monitor` is the `[boot_monitor]` table's body.
struct Vm {
    keel: RunningKeel,
    notify: UnixDatagram,
    console_file: PathBuf,
    _dir: ScratchDir,
}

fn start(name: &str, probe_opts: &str, monitor: &str) -> Vm {
    let dir = scratch_dir(name);
    let sock = dir.join("api.sock");
    let console_file = dir.join("tty1");
    std::fs::write(&console_file, "").unwrap();
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_nonblocking(true).unwrap();
    let cfg = dir.join("vm.toml");
    std::fs::write(
        &cfg,
        format!(
            "[payload]\nkernel = \"{}\"\ncmdline = \"console=ttyS0 probe.check=boot.cpl3 probe.idle {probe_opts}\"\n\
             [memory]\nsize = \"128M\"\n[control]\napi_socket = \"{}\"\n\
             [boot_monitor]\nconsoles = [\"{}\"]\n{monitor}\n",
            probe_guest().display(),
            sock.display(),
            console_file.display(),
        ),
    )
    .unwrap();
    let keel = RunningKeel::start(
        &["--config".into(), cfg.display().to_string()],
        &sock,
        &[("NOTIFY_SOCKET", notify_path.display().to_string())],
    );
    Vm {
        keel,
        notify,
        console_file,
        _dir: dir,
    }
}

fn guest_boot(sock: &Path) -> String {
    let (code, body) = api_call(sock, "GET", "/v1/vm", "").expect("API answers");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("VM JSON");
    v["guest_boot"]
        .as_str()
        .unwrap_or_else(|| panic!("no guest_boot string in {body}"))
        .to_string()
}

impl Vm {
    /// Waits until `GET /v1/vm` reports `want`.
    fn wait_guest_boot(&self, want: &str) {
        let start = Instant::now();
        loop {
            let now = guest_boot(&self.keel.socket);
            if now == want {
                return;
            }
            assert!(
                start.elapsed() < T,
                "guest_boot is {now:?}, never {want:?}\nconsole:\n{}\nlog:\n{}",
                self.keel.console(),
                self.keel.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until systemd has been sent a message containing `needle`;
    /// returns every message so far.
    fn wait_notify(&self, needle: &str) -> String {
        let start = Instant::now();
        let mut msgs = String::new();
        let mut buf = [0u8; 4096];
        while !msgs.contains(needle) {
            match self.notify.recv(&mut buf) {
                Ok(n) => {
                    msgs.push_str(&String::from_utf8_lossy(&buf[..n]));
                    msgs.push('\n');
                }
                Err(_) => {
                    assert!(
                        start.elapsed() < T,
                        "no {needle:?} sent to systemd:\n{msgs}"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        msgs
    }

    /// `keelctl info`'s line for `guest_boot`.
    fn keelctl_info(&self) -> String {
        let out = Command::new(keel_tests::workspace_binary("keelctl"))
            .arg("--socket")
            .arg(&self.keel.socket)
            .arg("info")
            .output()
            .expect("run keelctl");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn stop(mut self) {
        self.keel.stop_with_keelctl(T);
    }
}

fn info_line<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.lines()
        .find(|l| l.split_whitespace().next() == Some(key))
}

#[test]
fn success_marker_is_reported_everywhere() {
    let vm = start("bootmon-success", "probe.boot=success", "");
    vm.wait_guest_boot("success");
    // The monitor sees the marker's last byte as the guest writes it, a
    // moment before the console's reader has it: wait, don't race.
    vm.keel.wait_console("GUESTOS BOOT SUCCESS", T);
    let msgs = vm.wait_notify("STATUS=VM running; guest boot success");
    assert!(msgs.contains("READY=1"), "{msgs}");
    assert_eq!(
        std::fs::read_to_string(&vm.console_file).unwrap(),
        "GuestOS boot succeeded\n"
    );
    let info = vm.keelctl_info();
    let line = info_line(&info, "guest_boot").unwrap_or_else(|| panic!("{info}"));
    assert!(line.ends_with("success"), "{line}");
    assert!(vm
        .keel
        .log()
        .contains("boot monitor: GuestOS boot succeeded"));
    vm.stop();
}

#[test]
fn failure_marker_is_reported_everywhere() {
    let vm = start("bootmon-failure", "probe.boot=failure", "");
    vm.wait_guest_boot("failure");
    vm.wait_notify("STATUS=VM running; guest boot failure");
    assert_eq!(
        std::fs::read_to_string(&vm.console_file).unwrap(),
        "GuestOS boot failed\n"
    );
    let info = vm.keelctl_info();
    let line = info_line(&info, "guest_boot").unwrap_or_else(|| panic!("{info}"));
    assert!(line.ends_with("failure"), "{line}");
    vm.stop();
}

#[test]
fn no_marker_is_pending_before_the_timeout() {
    // The default timeout (300 s) is far beyond this test.
    let vm = start("bootmon-pending", "", "");
    vm.keel.wait_console("probe: idle", T);
    assert_eq!(guest_boot(&vm.keel.socket), "pending");
    vm.wait_notify("STATUS=VM running; guest boot pending");
    assert_eq!(std::fs::read_to_string(&vm.console_file).unwrap(), "");
    vm.stop();
}

#[test]
fn no_marker_times_out() {
    let vm = start("bootmon-timeout", "", "timeout_s = 1");
    vm.wait_guest_boot("timeout");
    vm.wait_notify("STATUS=VM running; guest boot timeout");
    assert_eq!(
        std::fs::read_to_string(&vm.console_file).unwrap(),
        "GuestOS boot timed out\n"
    );
    assert!(
        vm.keel
            .log()
            .contains("boot monitor: GuestOS boot timed out"),
        "{}",
        vm.keel.log()
    );
    vm.stop();
}

#[test]
fn the_monitor_can_be_switched_off() {
    let vm = start("bootmon-off", "probe.boot=success", "enabled = false");
    vm.keel.wait_console("GUESTOS BOOT SUCCESS", T);
    assert_eq!(guest_boot(&vm.keel.socket), "off");
    let msgs = vm.wait_notify("STATUS=VM running");
    assert!(!msgs.contains("guest boot"), "{msgs}");
    assert_eq!(std::fs::read_to_string(&vm.console_file).unwrap(), "");
    vm.stop();
}
