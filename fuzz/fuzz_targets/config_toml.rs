//! Keel's config file: TOML into the typed model, then validation; a
//! model that parses also serializes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = vmm::config::VmConfig::from_toml(text) {
        let _ = cfg.validate();
    }
});
