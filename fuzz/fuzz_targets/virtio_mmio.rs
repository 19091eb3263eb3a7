//! The virtio-mmio transport's registers: a fuzzed sequence of reads and
//! writes (any offset in the window's first 0x200 bytes, any size) on a
//! transport in front of a real virtio-blk device (synchronous engine, a
//! 64 KiB temp file), whose event loop runs after every write, so a
//! driver-like sequence ends in requests served from guest memory.
//!
//! Input: an access count u8, that many accesses of 7 bytes (kind u8: bit
//! 0 write, bits 1-2 size 1/2/4/8; offset u16 mod 0x200; value u32), then
//! the bytes at DATA.
#![no_main]

use std::sync::{Arc, Mutex};

use devices::bus::BusDevice;
use devices::virtio::mmio::MmioTransport;
use devices::virtio::{Interrupt, VirtioDevice};
use keel_fuzz::{fill_data, guest_memory, sync_block_in_loop, Input};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let n = input.u8();
    let ops: Vec<(u8, u16, u32)> = (0..n)
        .map(|_| (input.u8(), input.u16() % 0x200, input.u32()))
        .collect();
    let mem = guest_memory();
    fill_data(&mem, input.rest());
    let Some((blk, mut em, irq, notify)) = sync_block_in_loop("mmio") else {
        return;
    };
    let device: Arc<Mutex<dyn VirtioDevice>> = blk;
    let mut t = MmioTransport::new(mem, device, Arc::new(Interrupt::new(irq)), vec![notify]);
    let mut buf = [0u8; 8];
    for (kind, offset, value) in ops {
        let size = 1usize << ((kind >> 1) & 3);
        let offset = u64::from(offset);
        if kind & 1 == 0 {
            t.read(offset, &mut buf[..size]);
            if offset == 0 && size == 4 {
                assert_eq!(buf[..4], *b"virt", "magic value");
            }
        } else {
            buf[..4].copy_from_slice(&value.to_le_bytes());
            buf[4..].fill(0);
            t.write(offset, &buf[..size]);
            let _ = em.run_with_timeout(0);
        }
    }
});
