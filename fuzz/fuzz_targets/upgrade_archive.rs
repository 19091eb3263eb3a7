//! keel-agent's upgrade archive reader (zstd + tar, streaming): any bytes
//! as an `update-img.tar.zst`, checked as before an upgrade writes anything.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Small volume caps, as a real upgrade has (the images' sizes are
    // checked against the volumes' while streaming).
    let _ = host_agent::upgrade::check_archive(data, Some(1 << 20), Some(1 << 20));
});
