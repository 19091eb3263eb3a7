//! Keel's command-line option values (`--disk path=...,readonly=on`, ...),
//! parsed into the same typed model as the config file: the first byte
//! picks the flag, the rest is its value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::config;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(v) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 10 {
        0 => drop(config::parse_memory_flag(v)),
        1 => {
            if let Ok(c) = config::parse_cpus_flag(v) {
                let _ = c.topology();
            }
        }
        2 => drop(config::parse_disk_flag(0, v)),
        3 => drop(config::parse_vsock_flag(v)),
        4 => drop(config::parse_net_flag(0, v)),
        5 => drop(config::parse_machine_flag(v)),
        6 => drop(config::parse_boot_monitor_flag(v)),
        7 => drop(config::parse_config_disk_flag(v)),
        8 => drop(config::parse_serial_flag(v)),
        _ => drop(config::parse_size(v)),
    }
});
