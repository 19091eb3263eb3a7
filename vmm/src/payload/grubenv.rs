//! The GuestOS's GRUB environment block (`grubenv` in its grub partition):
//! parsing the two variables the A/B boot uses, and encoding a new block.
//!
//! Format (GRUB's `save_env` / `grub-editenv`): exactly 1024 bytes, the line
//! `# GRUB Environment Block`, `name=value` lines (a backslash escapes the
//! next byte), padded with `#`. When a name appears more than once, the last
//! occurrence wins. An empty value is the same as a missing one (GRUB's
//! script tests `= ""`).

pub use ::grubenv::{BootCycle, Slot, BLOCK_SIZE};

/// The block's first line.
pub const HEADER: &[u8] = ::grubenv::HEADER.as_bytes();

/// A grubenv that cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum GrubEnvError {
    /// Not a GRUB environment block at all.
    #[error("not a GRUB environment block: {0}")]
    Malformed(String),
    /// `boot_alternative` is neither `A` nor `B`.
    #[error("boot_alternative={0:?} is neither A nor B")]
    BadAlternative(String),
    /// `boot_cycle` is none of the four known values.
    #[error("boot_cycle={0:?} is not stable, install, first_boot or failsafe_check")]
    BadCycle(String),
    /// The new text does not fit in the block.
    #[error("the new environment does not fit in {BLOCK_SIZE} bytes")]
    TooLarge,
}

/// A parsed block: every variable (first-appearance order, last value) and
/// the two A/B ones, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrubEnv {
    vars: Vec<(Vec<u8>, Vec<u8>)>,
    /// `boot_alternative`, if set (non-empty).
    pub alternative: Option<Slot>,
    /// `boot_cycle`, if set (non-empty).
    pub cycle: Option<BootCycle>,
}

/// `boot_alternative`.
const ALTERNATIVE: &[u8] = ::grubenv::BOOT_ALTERNATIVE.as_bytes();
/// `boot_cycle`.
const CYCLE: &[u8] = ::grubenv::BOOT_CYCLE.as_bytes();

impl GrubEnv {
    /// Parses a 1024-byte block.
    pub fn parse(block: &[u8]) -> Result<Self, GrubEnvError> {
        if block.len() != BLOCK_SIZE {
            return Err(GrubEnvError::Malformed(format!(
                "{} bytes, want {BLOCK_SIZE}",
                block.len()
            )));
        }
        // The codec's messages are this error's (`Malformed`) own.
        let vars = ::grubenv::parse(block).map_err(|e| GrubEnvError::Malformed(e.to_string()))?;
        let get = |name: &[u8]| {
            vars.iter()
                .find(|(n, v)| n == name && !v.is_empty())
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        let alternative = get(ALTERNATIVE)
            .map(|v| Slot::parse(&v).ok_or(GrubEnvError::BadAlternative(v)))
            .transpose()?;
        let cycle = get(CYCLE)
            .map(|v| BootCycle::parse(&v).ok_or(GrubEnvError::BadCycle(v)))
            .transpose()?;
        Ok(GrubEnv {
            vars,
            alternative,
            cycle,
        })
    }

    /// The block with `boot_alternative` and `boot_cycle` set to these
    /// values: header, those two lines, then every other variable in its
    /// original order, padded with `#` to 1024 bytes.
    pub fn encode_with(&self, slot: Slot, cycle: BootCycle) -> Result<Vec<u8>, GrubEnvError> {
        // Names are written back as they were read (unchecked), values
        // escaped: the codec's `Encoder` with `push_raw_name`.
        let mut enc = ::grubenv::Encoder::new();
        enc.push_raw_name(ALTERNATIVE, slot.as_str().as_bytes());
        enc.push_raw_name(CYCLE, cycle.as_str().as_bytes());
        for (n, v) in &self.vars {
            if n != ALTERNATIVE && n != CYCLE {
                enc.push_raw_name(n, v);
            }
        }
        // `finish` fails only when the block is too large.
        enc.finish().map_err(|_| GrubEnvError::TooLarge)
    }
}

#[cfg(test)]
pub(crate) fn block(text: &str) -> Vec<u8> {
    let mut b = HEADER.to_vec();
    b.extend_from_slice(text.as_bytes());
    b.resize(BLOCK_SIZE, b'#');
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_occurrence_wins_and_other_variables_are_kept() {
        let env = GrubEnv::parse(&block(
            "boot_cycle=install\nsaved_entry=x\\\\y\nboot_alternative=A\nboot_cycle=first_boot\nboot_alternative=B\n",
        ))
        .unwrap();
        assert_eq!(env.alternative, Some(Slot::B));
        assert_eq!(env.cycle, Some(BootCycle::FirstBoot));
        let out = env.encode_with(Slot::B, BootCycle::FailsafeCheck).unwrap();
        assert_eq!(
            out,
            block("boot_alternative=B\nboot_cycle=failsafe_check\nsaved_entry=x\\\\y\n")
        );
        assert_eq!(
            GrubEnv::parse(&out).unwrap().cycle,
            Some(BootCycle::FailsafeCheck)
        );
    }

    #[test]
    fn missing_and_empty_values_are_unset() {
        let env = GrubEnv::parse(&block("")).unwrap();
        assert_eq!((env.alternative, env.cycle), (None, None));
        let env = GrubEnv::parse(&block("boot_alternative=\nboot_cycle=\n")).unwrap();
        assert_eq!((env.alternative, env.cycle), (None, None));
    }

    #[test]
    fn unknown_values_and_malformed_blocks_are_errors() {
        assert_eq!(
            GrubEnv::parse(&block("boot_alternative=C\n")).unwrap_err(),
            GrubEnvError::BadAlternative("C".into())
        );
        assert_eq!(
            GrubEnv::parse(&block("boot_cycle=stabel\n")).unwrap_err(),
            GrubEnvError::BadCycle("stabel".into())
        );
        assert!(GrubEnv::parse(&[b'#'; BLOCK_SIZE]).is_err(), "no header");
        assert!(GrubEnv::parse(&block("")[..1000]).is_err(), "short");
        assert!(GrubEnv::parse(&block("no_equals_sign\n")).is_err());
        let mut unterminated = block("");
        unterminated[BLOCK_SIZE - 4..].copy_from_slice(b"\nx=y");
        assert!(GrubEnv::parse(&unterminated).is_err());
    }

    #[test]
    fn an_oversized_environment_is_refused() {
        let long = format!("big={}\n", "v".repeat(990));
        let env = GrubEnv::parse(&block(&long)).unwrap();
        assert_eq!(
            env.encode_with(Slot::A, BootCycle::Stable).unwrap_err(),
            GrubEnvError::TooLarge
        );
    }
}
