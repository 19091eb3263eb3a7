//! Crash injection for tests: with `KEEL_AGENT_ABORT_AT=<point>` in its
//! environment the agent calls `abort()` when it reaches that point, the way
//! a crash or power cut would stop it. Points (in upgrade order) are listed
//! in [`UPGRADE_POINTS`]. Unset (always, in production), this does nothing.

use std::sync::OnceLock;

pub const ENV: &str = "KEEL_AGENT_ABORT_AT";

/// Every point of an upgrade, in the order they are reached.
pub const UPGRADE_POINTS: &[&str] = &[
    "accepted",
    "download-partial",
    "downloaded",
    "verified",
    "validated",
    "boot-partial",
    "boot-written",
    "root-partial",
    "root-written",
    "var-zeroed",
    "grubenv-temp-written",
    "grubenv-renamed",
    "answered",
    "shutdown-requested",
    "guest-stopped",
];

fn target() -> Option<&'static str> {
    static T: OnceLock<Option<String>> = OnceLock::new();
    T.get_or_init(|| std::env::var(ENV).ok().filter(|s| !s.is_empty()))
        .as_deref()
}

/// Abort here if this is the configured point.
pub fn point(name: &str) {
    if target() == Some(name) {
        log::error!("fault injection: aborting at {name}");
        std::process::abort();
    }
}
