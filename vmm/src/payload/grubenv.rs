//! The GuestOS's GRUB environment block (`grubenv` in its grub partition):
//! parsing the two variables the A/B boot uses, and encoding a new block.
//!
//! Format (GRUB's `save_env` / `grub-editenv`): exactly 1024 bytes, the line
//! `# GRUB Environment Block`, `name=value` lines (a backslash escapes the
//! next byte), padded with `#`. When a name appears more than once, the last
//! occurrence wins. An empty value is the same as a missing one (GRUB's
//! script tests `= ""`).

use std::fmt;

/// Size of a GRUB environment block.
pub const BLOCK_SIZE: usize = 1024;
/// The block's first line.
pub const HEADER: &[u8] = b"# GRUB Environment Block\n";

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

/// One of the two GuestOS installations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// A_boot / A_root / A_var.
    A,
    /// B_boot / B_root / B_var.
    B,
}

impl Slot {
    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// `"A"` or `"B"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::A => "A",
            Slot::B => "B",
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `boot_cycle` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootCycle {
    /// The slot is confirmed.
    Stable,
    /// Freshly installed.
    Install,
    /// An upgrade was written to the other slot and `boot_alternative` points
    /// at it; not booted yet.
    FirstBoot,
    /// The new slot booted once and was not confirmed: the next boot rolls
    /// back.
    FailsafeCheck,
}

impl BootCycle {
    /// The value as written in grubenv.
    pub fn as_str(self) -> &'static str {
        match self {
            BootCycle::Stable => "stable",
            BootCycle::Install => "install",
            BootCycle::FirstBoot => "first_boot",
            BootCycle::FailsafeCheck => "failsafe_check",
        }
    }

    fn parse(v: &str) -> Result<Self, GrubEnvError> {
        Ok(match v {
            "stable" => BootCycle::Stable,
            "install" => BootCycle::Install,
            "first_boot" => BootCycle::FirstBoot,
            "failsafe_check" => BootCycle::FailsafeCheck,
            other => return Err(GrubEnvError::BadCycle(other.to_string())),
        })
    }
}

impl fmt::Display for BootCycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
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
const ALTERNATIVE: &[u8] = b"boot_alternative";
/// `boot_cycle`.
const CYCLE: &[u8] = b"boot_cycle";

impl GrubEnv {
    /// Parses a 1024-byte block.
    pub fn parse(block: &[u8]) -> Result<Self, GrubEnvError> {
        if block.len() != BLOCK_SIZE {
            return Err(GrubEnvError::Malformed(format!(
                "{} bytes, want {BLOCK_SIZE}",
                block.len()
            )));
        }
        let mut rest = block
            .strip_prefix(HEADER)
            .ok_or_else(|| GrubEnvError::Malformed("no `# GRUB Environment Block` line".into()))?;
        let mut vars: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        while let Some(&first) = rest.first() {
            if first == b'#' {
                // Padding (or a comment line) up to the end of its line.
                let end = rest
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(rest.len(), |p| p + 1);
                rest = &rest[end..];
                continue;
            }
            let mut line = Vec::new();
            let mut i = 0;
            let mut ended = false;
            while i < rest.len() {
                match rest[i] {
                    b'\\' if i + 1 < rest.len() => {
                        line.push(rest[i + 1]);
                        i += 2;
                    }
                    b'\n' => {
                        i += 1;
                        ended = true;
                        break;
                    }
                    b => {
                        line.push(b);
                        i += 1;
                    }
                }
            }
            if !ended {
                return Err(GrubEnvError::Malformed(
                    "a line runs past the block's end".into(),
                ));
            }
            rest = &rest[i..];
            if line.is_empty() {
                continue;
            }
            let eq = line.iter().position(|&b| b == b'=').ok_or_else(|| {
                GrubEnvError::Malformed(format!(
                    "line {:?} is not name=value",
                    String::from_utf8_lossy(&line)
                ))
            })?;
            let value = line.split_off(eq + 1);
            line.pop();
            match vars.iter_mut().find(|(n, _)| *n == line) {
                Some(v) => v.1 = value,
                None => vars.push((line, value)),
            }
        }
        let get = |name: &[u8]| {
            vars.iter()
                .find(|(n, v)| n == name && !v.is_empty())
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        let alternative = match get(ALTERNATIVE).as_deref() {
            None => None,
            Some("A") => Some(Slot::A),
            Some("B") => Some(Slot::B),
            Some(other) => return Err(GrubEnvError::BadAlternative(other.to_string())),
        };
        let cycle = get(CYCLE).as_deref().map(BootCycle::parse).transpose()?;
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
        let mut out = HEADER.to_vec();
        let mut line = |name: &[u8], value: &[u8]| {
            out.extend_from_slice(name);
            out.push(b'=');
            for &b in value {
                if b == b'\\' || b == b'\n' {
                    out.push(b'\\');
                }
                out.push(b);
            }
            out.push(b'\n');
        };
        line(ALTERNATIVE, slot.as_str().as_bytes());
        line(CYCLE, cycle.as_str().as_bytes());
        for (n, v) in &self.vars {
            if n != ALTERNATIVE && n != CYCLE {
                line(n, v);
            }
        }
        if out.len() > BLOCK_SIZE {
            return Err(GrubEnvError::TooLarge);
        }
        out.resize(BLOCK_SIZE, b'#');
        Ok(out)
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
