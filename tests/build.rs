//! Builds the probe guest (its own no_std workspace in `probe-guest/`) with
//! the same cargo, and installs it next to Keel's binaries as
//! `target/<profile>/probe-guest`, so a plain `cargo build --release`
//! produces `target/release/probe-guest`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let probe = manifest_dir.join("probe-guest");
    for p in ["Cargo.toml", "Cargo.lock", "build.rs", "link.ld", "src"] {
        println!("cargo:rerun-if-changed={}", probe.join(p).display());
    }
    // OUT_DIR = <target>/<profile>/build/keel-tests-<hash>/out
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let profile_dir = out_dir
        .ancestors()
        .nth(3)
        .expect("OUT_DIR is target/<profile>/build/<pkg>/out")
        .to_path_buf();
    let target_dir = profile_dir
        .parent()
        .expect("target/<profile> has a parent")
        .join("probe-guest");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&probe)
        .args(["build", "--release", "--target-dir"])
        .arg(&target_dir);
    // The outer build's settings are for the host crates, not the guest.
    for var in [
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("run cargo for the probe guest");
    assert!(
        status.success(),
        "building the probe guest failed: {status}"
    );
    let built = target_dir.join("release").join("probe-guest");
    install(&built, &profile_dir.join("probe-guest"));
}

fn install(from: &Path, to: &Path) {
    // Copy to a temporary name and rename, so a running test never sees a
    // half-written guest.
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    std::fs::rename(&tmp, to).unwrap_or_else(|e| panic!("install {}: {e}", to.display()));
}
