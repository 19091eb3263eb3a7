//! Links the probe guest as a static, non-relocatable ELF at a fixed address
//! with the layout of `link.ld` (no C runtime, no libc).

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let script = dir.join("link.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    for arg in [
        // No crt*.o and no default libraries: everything the image needs
        // (memcpy and friends included) is in this crate.
        "-nostdlib".to_string(),
        "-static".to_string(),
        "-no-pie".to_string(),
        "-Wl,--build-id=none".to_string(),
        "-Wl,-z,noexecstack".to_string(),
        "-Wl,-z,max-page-size=4096".to_string(),
        format!("-T{}", script.display()),
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}
