//! virtio-vsock packets and the connection state machine: fuzzed TX
//! packets (header + payload) and RX buffers on mock split queues, a host
//! service listening on port 1024 (`<socket>_1024`) that answers and hangs
//! up, and optionally a host-initiated connection with a fuzzed
//! `CONNECT <port>` line.
//!
//! Input: flags u8 (bit 0: host connects), acked features u64, the RX
//! queue, the TX queue (see `keel_fuzz::Ring::from_input`), the host's
//! CONNECT line (length u8 mod 32, bytes), the bytes the host sends on
//! every connection (length u8, bytes), then the bytes at DATA.
#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::OnceLock;

use devices::virtio::vsock::{VirtioVsock, VsockConfig};
use keel_fuzz::{fill_data, guest_memory, Input, Rig, Ring};
use libfuzzer_sys::fuzz_target;

/// This process's socket directory and the host service on port 1024.
fn host() -> &'static (PathBuf, UnixListener) {
    static HOST: OnceLock<(PathBuf, UnixListener)> = OnceLock::new();
    HOST.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("keel-fuzz-vsock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let l = UnixListener::bind(dir.join("v.sock_1024")).expect("port 1024 listener");
        l.set_nonblocking(true).expect("non-blocking listener");
        (dir, l)
    })
}

fuzz_target!(|data: &[u8]| {
    let (dir, service) = host();
    let mut input = Input(data);
    let flags = input.u8();
    let features = input.u64();
    let mem = guest_memory();
    let rx = Ring::from_input(&mem, 0, &mut input);
    let tx = Ring::from_input(&mem, 1, &mut input);
    let ev = Ring::from_input(&mem, 2, &mut Input(&[]));
    let n = usize::from(input.u8() % 32);
    let line = input.take(n);
    let n = usize::from(input.u8());
    let reply = input.take(n);
    fill_data(&mem, input.rest());
    let uds = dir.join("v.sock");
    let Ok(dev) = VirtioVsock::new(VsockConfig {
        guest_cid: 3,
        uds_path: uds.clone(),
        allow_host_connect: flags & 1 != 0,
    }) else {
        return;
    };
    let mut rig = Rig::new(dev, features, mem, vec![rx, tx, ev]);
    let mut streams = Vec::new();
    if flags & 1 != 0 {
        if let Ok(mut s) = UnixStream::connect(&uds) {
            let _ = s.set_nonblocking(true);
            let _ = s.write_all(line);
            streams.push(s);
        }
    }
    rig.kick(1);
    rig.kick(0);
    rig.spin();
    // The host service answers every connection the guest opened...
    while let Ok((s, _)) = service.accept() {
        streams.push(s);
    }
    for s in &mut streams {
        let _ = s.set_nonblocking(true);
        let _ = s.write_all(reply);
    }
    rig.kick(0);
    rig.spin();
    // ... and hangs up.
    streams.clear();
    rig.kick(0);
    rig.spin();
});
