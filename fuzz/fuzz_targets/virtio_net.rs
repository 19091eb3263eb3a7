//! virtio-net TX and RX: fuzzed TX chains (virtio-net header + frame) and
//! RX buffers on mock split queues, and fuzzed frames from the "tap" (one
//! end of a SOCK_SEQPACKET socketpair, so no real tap is needed).
//!
//! Input: acked features u64, the RX queue, the TX queue (see
//! `keel_fuzz::Ring::from_input`), a frame count (mod 8) and that many
//! frames (length u16 mod 4096, then its bytes, virtio-net header first),
//! then the bytes at DATA.
#![no_main]

use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;

use devices::virtio::net::{NetConfig, Tap, VirtioNet};
use keel_fuzz::{fill_data, guest_memory, Input, Rig, Ring};
use libfuzzer_sys::fuzz_target;

/// A non-blocking SOCK_SEQPACKET pair: (the device's "tap", the host side).
fn seqpacket_pair() -> Option<(File, File)> {
    let mut fds = [0i32; 2];
    // SAFETY: socketpair writes two fds into the array we own.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return None;
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Some((File::from(a), File::from(b)))
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let features = input.u64();
    let mem = guest_memory();
    let rx = Ring::from_input(&mem, 0, &mut input);
    let tx = Ring::from_input(&mem, 1, &mut input);
    let Some((tap_end, mut host)) = seqpacket_pair() else {
        return;
    };
    let host_dgram = UnixDatagram::from(OwnedFd::from(host.try_clone().expect("dup")));
    for _ in 0..input.u8() % 8 {
        let len = usize::from(input.u16() % 4096);
        let _ = host_dgram.send(input.take(len));
    }
    fill_data(&mem, input.rest());
    let Ok(dev) = VirtioNet::new(
        vec![Tap::from_file(tap_end, "fuzz0")],
        NetConfig {
            mac: [0x6a, 0, 0, 0, 0, 1],
            mtu: 1500,
        },
    ) else {
        return;
    };
    let mut rig = Rig::new(dev, features, mem, vec![rx, tx]);
    rig.kick(1);
    rig.kick(0);
    rig.spin();
    // What the guest sent: frames with their header, never empty.
    let mut frame = vec![0u8; 1 << 16];
    while let Ok(n) = host.read(&mut frame) {
        if n == 0 {
            break;
        }
    }
});
