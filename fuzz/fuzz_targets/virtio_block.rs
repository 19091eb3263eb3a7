//! virtio-blk requests through the device: fuzzed descriptor chains and
//! request bytes on a mock split queue, served by the synchronous engine
//! from a 64 KiB temp file (optionally read-only, optionally with a
//! copy-on-write range).
//!
//! Input: flags u8 (bit 0 read-only, bit 1 CoW range), acked features u64,
//! the queue (see `keel_fuzz::Ring::from_input`), then the bytes at DATA.
#![no_main]

use devices::virtio::block::{BlockConfig, CowRange, DiskBackend, EngineKind, VirtioBlock};
use keel_fuzz::{fill_data, guest_memory, temp_disk, Input, Rig, Ring};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let flags = input.u8();
    let features = input.u64();
    let mem = guest_memory();
    let ring = Ring::from_input(&mem, 0, &mut input);
    fill_data(&mem, input.rest());
    let Ok(backend) = DiskBackend::open(temp_disk("blk"), flags & 1 != 0, false) else {
        return;
    };
    let cow = (flags & 2 != 0).then_some(CowRange {
        start: 16 * 512,
        len: 32 * 512,
        limit: 8 << 10,
    });
    let Ok(dev) = VirtioBlock::new(
        backend,
        BlockConfig {
            serial: Some("keel-fuzz".into()),
            engine: EngineKind::Sync,
            cow,
            num_queues: 1,
        },
    ) else {
        return;
    };
    let mut rig = Rig::new(dev, features, mem, vec![ring]);
    rig.kick(0);
    rig.spin();
});
