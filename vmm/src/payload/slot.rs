//! Which slot to boot, and what grubenv becomes: the GuestOS GRUB
//! script's rules (dfinity/ic `ic-os/bootloader/guestos_grub.cfg`), as
//! HostOS's direct-boot runner applies them.
//!
//! | role | `boot_cycle` before | after | slot booted |
//! |---|---|---|---|
//! | guestos | missing | `A`, `stable` (`boot_alternative` missing: A) | `boot_alternative` |
//! | guestos | `stable` | unchanged | `boot_alternative` |
//! | guestos | `install` | `stable` | `boot_alternative` |
//! | guestos | `first_boot` | `failsafe_check` | `boot_alternative` (the new slot) |
//! | guestos | `failsafe_check` | opposite slot, `stable` | the opposite slot (rollback) |
//! | upgrade | anything | never written | the opposite of `boot_alternative` (missing: error) |

use super::grubenv::{BootCycle, GrubEnv, Slot};
use crate::config::BootSlot;

/// The slot to boot and the grubenv values to write first, if any change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The slot whose kernel, initrd and arguments are booted.
    pub slot: Slot,
    /// New `boot_alternative` and `boot_cycle`, when grubenv must change.
    pub write: Option<(Slot, BootCycle)>,
    /// Why, for the log.
    pub reason: String,
}

/// The upgrade VM found no `boot_alternative`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "grubenv has no boot_alternative: the upgrade VM cannot tell which slot is the opposite one"
)]
pub struct NoAlternative;

/// Applies the table above to `env` for `role`.
pub fn decide(role: BootSlot, env: &GrubEnv) -> Result<Decision, NoAlternative> {
    if role == BootSlot::Upgrade {
        let current = env.alternative.ok_or(NoAlternative)?;
        return Ok(Decision {
            slot: current.other(),
            write: None,
            reason: format!(
                "upgrade VM: boot_alternative={current}, booting the opposite slot; grubenv is not written"
            ),
        });
    }
    let alt = env.alternative.unwrap_or(Slot::A);
    let shown_alt = env.alternative.map_or("missing", Slot::as_str);
    let (slot, after, why) = match env.cycle {
        None => (alt, (alt, BootCycle::Stable), "boot_cycle missing"),
        Some(BootCycle::Stable) => (alt, (alt, BootCycle::Stable), "stable"),
        Some(BootCycle::Install) => (
            alt,
            (alt, BootCycle::Stable),
            "install: first boot after installation",
        ),
        Some(BootCycle::FirstBoot) => (
            alt,
            (alt, BootCycle::FailsafeCheck),
            "first_boot: trying the upgraded slot",
        ),
        Some(BootCycle::FailsafeCheck) => (
            alt.other(),
            (alt.other(), BootCycle::Stable),
            "failsafe_check: the upgraded slot was not confirmed, rolling back",
        ),
    };
    let unchanged = env.alternative == Some(after.0) && env.cycle == Some(after.1);
    let write = (!unchanged).then_some(after);
    let reason = match write {
        Some((a, c)) => format!(
            "boot_alternative={shown_alt}, {why}; grubenv becomes boot_alternative={a} boot_cycle={c}"
        ),
        None => format!("boot_alternative={shown_alt}, {why}; grubenv unchanged"),
    };
    Ok(Decision {
        slot,
        write,
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::super::grubenv::block;
    use super::*;

    fn run(role: BootSlot, text: &str) -> Result<Decision, NoAlternative> {
        decide(role, &GrubEnv::parse(&block(text)).unwrap())
    }

    #[test]
    fn guestos_table() {
        use BootCycle::*;
        use Slot::*;
        type Row = (&'static str, Slot, Option<(Slot, BootCycle)>);
        let rows: &[Row] = &[
            ("", A, Some((A, Stable))),
            ("boot_alternative=B\n", B, Some((B, Stable))),
            ("boot_cycle=stable\n", A, Some((A, Stable))),
            ("boot_alternative=B\nboot_cycle=stable\n", B, None),
            (
                "boot_alternative=A\nboot_cycle=install\n",
                A,
                Some((A, Stable)),
            ),
            (
                "boot_alternative=B\nboot_cycle=first_boot\n",
                B,
                Some((B, FailsafeCheck)),
            ),
            (
                "boot_alternative=B\nboot_cycle=failsafe_check\n",
                A,
                Some((A, Stable)),
            ),
            (
                "boot_alternative=A\nboot_cycle=failsafe_check\n",
                B,
                Some((B, Stable)),
            ),
        ];
        for (text, slot, write) in rows {
            let d = run(BootSlot::Guestos, text).unwrap();
            assert_eq!((d.slot, d.write), (*slot, *write), "{text:?}: {}", d.reason);
        }
    }

    #[test]
    fn upgrade_boots_the_opposite_slot_and_never_writes() {
        for (text, slot) in [
            ("boot_alternative=A\nboot_cycle=stable\n", Slot::B),
            ("boot_alternative=B\nboot_cycle=first_boot\n", Slot::A),
        ] {
            let d = run(BootSlot::Upgrade, text).unwrap();
            assert_eq!((d.slot, d.write), (slot, None), "{text:?}");
        }
        assert_eq!(
            run(BootSlot::Upgrade, "boot_cycle=stable\n"),
            Err(NoAlternative)
        );
    }
}
