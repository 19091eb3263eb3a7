//! A model of the boot-time A/B state machine in `resources/grub/keel-ab.cfg`,
//! step for step, so tests can boot the grubenv files the agent writes.
//!
//! At each boot GRUB (the snippet):
//! 1. `load_env`; a `boot_alternative` other than `B` means `A`;
//! 2. `install` -> `stable` (saved);
//!    `first_boot` -> `failsafe_check` (saved), boot the new slot;
//!    `failsafe_check` (the new slot was never confirmed) -> the other slot,
//!    `stable` (saved): the rollback;
//!    `stable`, empty or anything else -> nothing saved;
//! 3. boots `boot_alternative`.

use crate::grubenv::{GrubEnv, Slot, KEY_ALTERNATIVE, KEY_CYCLE};
use std::path::Path;

/// What one boot did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootOutcome {
    pub slot: Slot,
    /// Whether GRUB wrote the environment block (`save_env`).
    pub saved: bool,
}

/// Run the state machine on an environment (as `load_env` read it) and
/// return the slot booted; `env` is left as `save_env` would leave it.
pub fn boot(env: &mut GrubEnv) -> BootOutcome {
    let alt = if env.get(KEY_ALTERNATIVE) == Some("B") {
        Slot::B
    } else {
        Slot::A
    };
    let cycle = env.get(KEY_CYCLE).unwrap_or("").to_string();
    let (alt, saved) = match cycle.as_str() {
        "install" => {
            save(env, alt, "stable");
            (alt, true)
        }
        "first_boot" => {
            save(env, alt, "failsafe_check");
            (alt, true)
        }
        "failsafe_check" => {
            let back = alt.other();
            save(env, back, "stable");
            (back, true)
        }
        _ => (alt, false),
    };
    BootOutcome { slot: alt, saved }
}

fn save(env: &mut GrubEnv, alt: Slot, cycle: &str) {
    env.set(KEY_ALTERNATIVE, alt.as_str());
    env.set(KEY_CYCLE, cycle);
}

/// Boot a grubenv file: what GRUB does on power-on. A file GRUB cannot load
/// (missing, corrupt) leaves the variables empty, i.e. A/stable, and
/// `save_env` then fails (nothing written); that is modelled too.
pub fn boot_file(path: &Path) -> std::io::Result<BootOutcome> {
    let (mut env, loadable) = match GrubEnv::load(path) {
        Ok(env) if path.exists() => (env, true),
        _ => (GrubEnv::new(), false),
    };
    let out = boot(&mut env);
    if out.saved && loadable {
        // GRUB's save_env rewrites the block in place; same bytes as a full write.
        let bytes = env
            .encode()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
        std::fs::write(path, bytes)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(a: &str, c: &str) -> GrubEnv {
        let mut e = GrubEnv::new();
        if !a.is_empty() {
            e.set(KEY_ALTERNATIVE, a);
        }
        if !c.is_empty() {
            e.set(KEY_CYCLE, c);
        }
        e
    }

    #[test]
    fn transitions() {
        // (alt, cycle) -> (booted, alt after, cycle after, saved)
        let cases = [
            ("", "", Slot::A, "", "", false),
            ("A", "stable", Slot::A, "A", "stable", false),
            ("B", "stable", Slot::B, "B", "stable", false),
            ("B", "install", Slot::B, "B", "stable", true),
            ("B", "first_boot", Slot::B, "B", "failsafe_check", true),
            ("B", "failsafe_check", Slot::A, "A", "stable", true),
            ("A", "failsafe_check", Slot::B, "B", "stable", true),
            ("", "first_boot", Slot::A, "A", "failsafe_check", true),
            ("C", "weird", Slot::A, "C", "weird", false),
        ];
        for (a, c, slot, a2, c2, saved) in cases {
            let mut e = env(a, c);
            let out = boot(&mut e);
            assert_eq!(out, BootOutcome { slot, saved }, "{a}/{c}");
            assert_eq!(e.get(KEY_ALTERNATIVE).unwrap_or(""), a2, "{a}/{c}");
            assert_eq!(e.get(KEY_CYCLE).unwrap_or(""), c2, "{a}/{c}");
        }
    }

    #[test]
    fn unconfirmed_upgrade_rolls_back_on_the_second_boot() {
        let mut e = env("B", "first_boot");
        assert_eq!(boot(&mut e).slot, Slot::B);
        assert_eq!(boot(&mut e).slot, Slot::A);
        assert_eq!(boot(&mut e).slot, Slot::A);
    }
}
