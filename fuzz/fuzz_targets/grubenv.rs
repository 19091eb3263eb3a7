//! The GRUB environment block: `grubenv::parse` on any bytes, and for every
//! block it accepts, encode → parse gives the same variables back; the same
//! for keel-agent's `GrubEnv` model on top of it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(vars) = grubenv::parse(data) {
        // Names GRUB itself could not read back are refused by the encoder.
        if vars.iter().all(|(k, _)| grubenv::check_name(k).is_ok()) {
            if let Ok(block) = grubenv::encode(vars.iter().map(|(k, v)| (k, v))) {
                assert_eq!(block.len(), grubenv::BLOCK_SIZE);
                assert_eq!(grubenv::parse(&block).ok(), Some(vars));
            }
        }
    }
    if let Ok(env) = host_agent::grubenv::GrubEnv::parse(data) {
        if let Ok(block) = env.encode() {
            let again = host_agent::grubenv::GrubEnv::parse(&block).expect("own block parses");
            assert_eq!(again.entries(), env.entries());
        }
    }
});
