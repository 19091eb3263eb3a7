//! The GRUB environment block (`grubenv`) and the names of the A/B boot
//! state kept in it, shared by Keel (the GuestOS's grubenv on its disk) and
//! keel-agent (the HostOS's own grubenv).
//!
//! Format (GRUB's `save_env` / `grub-editenv`): exactly [`BLOCK_SIZE`]
//! bytes, the line `# GRUB Environment Block` ([`HEADER`]), `name=value`
//! lines (a backslash escapes the next byte), padded with `#`. When a name
//! appears more than once, the last occurrence wins.
//!
//! This crate is only the codec and the names. What a caller accepts (a
//! block of any other length, an unknown `boot_cycle`, an empty value) is
//! its own policy: [`Slot::parse`] and [`BootCycle::parse`] return an
//! [`Option`] so that each caller decides what an unknown value means.

#![deny(missing_docs)]

use std::fmt;

/// Size of a GRUB environment block.
pub const BLOCK_SIZE: usize = 1024;
/// The block's first line.
pub const HEADER: &str = "# GRUB Environment Block\n";
/// The variable naming the slot GRUB boots (`A` or `B`).
pub const BOOT_ALTERNATIVE: &str = "boot_alternative";
/// The variable holding the A/B upgrade state ([`BootCycle`]).
pub const BOOT_CYCLE: &str = "boot_cycle";

/// A block that cannot be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The block does not start with [`HEADER`].
    #[error("no `# GRUB Environment Block` line")]
    NoHeader,
    /// A variable's line has no (unescaped) newline before the end.
    #[error("a line runs past the block's end")]
    Unterminated,
    /// A non-empty, non-`#` line without `=` (its bytes, unescaped).
    #[error("line {:?} is not name=value", String::from_utf8_lossy(.0))]
    NotNameValue(Vec<u8>),
}

/// Variables that cannot be encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The header and the lines do not fit in [`BLOCK_SIZE`] bytes.
    #[error("the environment does not fit in {BLOCK_SIZE} bytes")]
    TooLarge,
    /// A name that GRUB could not read back (see [`check_name`]).
    #[error("grubenv name {:?} is not allowed", String::from_utf8_lossy(.0))]
    BadName(Vec<u8>),
}

/// One variable: its name and its value, unescaped.
pub type Var = (Vec<u8>, Vec<u8>);

/// The variables of a block, one item per `name=value` line in file order
/// (repeated names included; [`parse`] applies last-wins). `#` lines and
/// empty lines are skipped, escapes are undone. After an error the iterator
/// ends.
#[derive(Clone, Debug)]
pub struct Entries<'a> {
    rest: &'a [u8],
}

/// The variables of `block`, which must start with [`HEADER`]; its length
/// is not checked (see [`BLOCK_SIZE`]).
pub fn entries(block: &[u8]) -> Result<Entries<'_>, ParseError> {
    let rest = block
        .strip_prefix(HEADER.as_bytes())
        .ok_or(ParseError::NoHeader)?;
    Ok(Entries { rest })
}

impl Iterator for Entries<'_> {
    type Item = Result<Var, ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let &first = self.rest.first()?;
            if first == b'#' {
                // Padding (or a comment line) up to the end of its line.
                let end = self
                    .rest
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(self.rest.len(), |p| p + 1);
                self.rest = &self.rest[end..];
                continue;
            }
            let rest = std::mem::take(&mut self.rest);
            let mut line = Vec::new();
            let mut i = 0;
            loop {
                match rest.get(i) {
                    None => return Some(Err(ParseError::Unterminated)),
                    Some(b'\\') if i + 1 < rest.len() => {
                        line.push(rest[i + 1]);
                        i += 2;
                    }
                    Some(b'\n') => break,
                    Some(&b) => {
                        line.push(b);
                        i += 1;
                    }
                }
            }
            if line.is_empty() {
                self.rest = &rest[i + 1..];
                continue;
            }
            let Some(eq) = line.iter().position(|&b| b == b'=') else {
                return Some(Err(ParseError::NotNameValue(line)));
            };
            self.rest = &rest[i + 1..];
            let value = line.split_off(eq + 1);
            line.pop();
            return Some(Ok((line, value)));
        }
    }
}

/// Parses a block into its variables: each name once, in the order of its
/// first appearance, with the value of its last. The block must start with
/// [`HEADER`]; its length is not checked.
pub fn parse(block: &[u8]) -> Result<Vec<Var>, ParseError> {
    let mut vars: Vec<Var> = Vec::new();
    for entry in entries(block)? {
        let (name, value) = entry?;
        match vars.iter_mut().find(|(n, _)| *n == name) {
            Some(v) => v.1 = value,
            None => vars.push((name, value)),
        }
    }
    Ok(vars)
}

/// Whether GRUB reads `name` back as written: not empty, and without `=`,
/// newline, backslash or `#` (names are written unescaped).
pub fn check_name(name: &[u8]) -> Result<(), EncodeError> {
    if name.is_empty()
        || name
            .iter()
            .any(|b| matches!(b, b'=' | b'\n' | b'\\' | b'#'))
    {
        return Err(EncodeError::BadName(name.to_vec()));
    }
    Ok(())
}

/// Builds a block: [`HEADER`], one `name=value` line per variable (a
/// backslash or newline in the value escaped with a backslash), `#` padding.
#[derive(Clone, Debug)]
pub struct Encoder {
    out: Vec<u8>,
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder::new()
    }
}

impl Encoder {
    /// An empty environment: the header alone.
    pub fn new() -> Encoder {
        Encoder {
            out: HEADER.as_bytes().to_vec(),
        }
    }

    /// Appends `name=value` after checking the name ([`check_name`]).
    pub fn push(&mut self, name: &[u8], value: &[u8]) -> Result<(), EncodeError> {
        check_name(name)?;
        self.push_raw_name(name, value);
        Ok(())
    }

    /// Appends `name=value` with the name written as it is, unchecked: for
    /// names as [`parse`] returned them, re-encoded byte for byte.
    pub fn push_raw_name(&mut self, name: &[u8], value: &[u8]) {
        self.out.extend_from_slice(name);
        self.out.push(b'=');
        for &b in value {
            if b == b'\\' || b == b'\n' {
                self.out.push(b'\\');
            }
            self.out.push(b);
        }
        self.out.push(b'\n');
    }

    /// The block, padded with `#` to exactly [`BLOCK_SIZE`] bytes; fails
    /// only with [`EncodeError::TooLarge`].
    pub fn finish(self) -> Result<Vec<u8>, EncodeError> {
        let mut out = self.out;
        if out.len() > BLOCK_SIZE {
            return Err(EncodeError::TooLarge);
        }
        out.resize(BLOCK_SIZE, b'#');
        Ok(out)
    }
}

/// Encodes these variables, in this order, as a [`BLOCK_SIZE`]-byte block.
/// Every name is checked ([`check_name`]) before the size.
pub fn encode<N, V>(vars: impl IntoIterator<Item = (N, V)>) -> Result<Vec<u8>, EncodeError>
where
    N: AsRef<[u8]>,
    V: AsRef<[u8]>,
{
    let mut enc = Encoder::new();
    for (name, value) in vars {
        enc.push(name.as_ref(), value.as_ref())?;
    }
    enc.finish()
}

/// One of the two installations of an A/B system (`boot_alternative`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    /// The first installation (`A`).
    A,
    /// The second installation (`B`).
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

    /// `"A"` or `"B"`; anything else (the empty string included) is `None`.
    pub fn parse(s: &str) -> Option<Slot> {
        match s {
            "A" => Some(Slot::A),
            "B" => Some(Slot::B),
            _ => None,
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The four `boot_cycle` values GRUB's A/B script knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BootCycle {
    /// `stable`: the slot is confirmed.
    Stable,
    /// `install`: freshly installed; GRUB makes it stable.
    Install,
    /// `first_boot`: an upgrade was written to the other slot and
    /// `boot_alternative` points at it; not booted yet.
    FirstBoot,
    /// `failsafe_check`: the new slot booted and is not confirmed yet: the
    /// next boot rolls back unless it is.
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

    /// One of the four values; anything else (the empty string included)
    /// is `None`.
    pub fn parse(s: &str) -> Option<BootCycle> {
        Some(match s {
            "stable" => BootCycle::Stable,
            "install" => BootCycle::Install,
            "first_boot" => BootCycle::FirstBoot,
            "failsafe_check" => BootCycle::FailsafeCheck,
            _ => return None,
        })
    }
}

impl fmt::Display for BootCycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `text` after the header, padded to a whole block.
    fn padded(text: &str) -> Vec<u8> {
        let mut b = HEADER.as_bytes().to_vec();
        b.extend_from_slice(text.as_bytes());
        b.resize(BLOCK_SIZE, b'#');
        b
    }

    fn pairs(vars: &[(&str, &str)]) -> Vec<(Vec<u8>, Vec<u8>)> {
        vars.iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn the_last_occurrence_wins_in_first_appearance_order() {
        let text = "boot_cycle=install\nsaved_entry=x\\\\y\n\n# a comment\nboot_alternative=A\n\
                    boot_cycle=first_boot\nboot_alternative=B\nempty=\n";
        assert_eq!(
            parse(&padded(text)).unwrap(),
            pairs(&[
                ("boot_cycle", "first_boot"),
                ("saved_entry", "x\\y"),
                ("boot_alternative", "B"),
                ("empty", ""),
            ])
        );
        let all: Vec<_> = entries(&padded(text))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(all.len(), 6, "entries keeps every occurrence");
    }

    #[test]
    fn encoding_escapes_values_and_pads_to_the_block() {
        let out = encode([("saved_entry", "x\\y\nz"), (BOOT_CYCLE, "stable")]).unwrap();
        assert_eq!(out, padded("saved_entry=x\\\\y\\\nz\nboot_cycle=stable\n"));
        assert_eq!(
            parse(&out).unwrap(),
            pairs(&[("saved_entry", "x\\y\nz"), (BOOT_CYCLE, "stable")])
        );
        assert_eq!(encode::<&str, &str>([]).unwrap(), padded(""));
        assert_eq!(Encoder::new().finish().unwrap(), padded(""));
    }

    #[test]
    fn any_length_after_the_header_parses() {
        assert_eq!(parse(HEADER.as_bytes()).unwrap(), vec![]);
        assert_eq!(
            parse(b"# GRUB Environment Block\nk=v\n").unwrap(),
            pairs(&[("k", "v")])
        );
    }

    #[test]
    fn malformed_blocks_are_errors() {
        assert_eq!(parse(b"hello").unwrap_err(), ParseError::NoHeader);
        assert_eq!(
            parse(&[b'#'; BLOCK_SIZE]).unwrap_err(),
            ParseError::NoHeader
        );
        assert_eq!(
            parse(&padded("novalue\n")).unwrap_err(),
            ParseError::NotNameValue(b"novalue".to_vec())
        );
        assert_eq!(
            parse(b"# GRUB Environment Block\nk=v").unwrap_err(),
            ParseError::Unterminated
        );
        // An escaped newline does not end the line; a trailing backslash
        // escapes nothing.
        assert_eq!(
            parse(b"# GRUB Environment Block\nk=v\\\n").unwrap_err(),
            ParseError::Unterminated
        );
        let mut it = entries(b"# GRUB Environment Block\nbad\nk=v\n").unwrap();
        assert!(matches!(it.next(), Some(Err(ParseError::NotNameValue(_)))));
        assert!(it.next().is_none(), "the iterator ends after an error");
    }

    #[test]
    fn oversized_environments_and_bad_names_are_refused() {
        let big = "x".repeat(1000);
        assert_eq!(encode([("big", &big)]).unwrap_err(), EncodeError::TooLarge);
        let fits = "x".repeat(BLOCK_SIZE - HEADER.len() - "k=\n".len());
        assert_eq!(encode([("k", &fits)]).unwrap().len(), BLOCK_SIZE);
        for bad in ["", "a=b", "a\nb", "a\\b", "#a", "a#"] {
            assert_eq!(
                encode([(bad, "v")]).unwrap_err(),
                EncodeError::BadName(bad.as_bytes().to_vec()),
                "{bad:?}"
            );
        }
        // Names are checked before the size.
        assert!(matches!(
            encode([("big", big.as_str()), ("a=b", "v")]),
            Err(EncodeError::BadName(_))
        ));
        // Unchecked names are written as they are.
        let mut enc = Encoder::new();
        enc.push_raw_name(b"a#b", b"v");
        assert_eq!(enc.finish().unwrap(), padded("a#b=v\n"));
    }

    #[test]
    fn slot_and_boot_cycle_names() {
        assert_eq!((Slot::A.other(), Slot::B.other()), (Slot::B, Slot::A));
        for s in [Slot::A, Slot::B] {
            assert_eq!(Slot::parse(s.as_str()), Some(s));
            assert_eq!(s.to_string(), s.as_str());
        }
        assert_eq!(Slot::parse(""), None);
        assert_eq!(Slot::parse("a"), None);
        for c in [
            BootCycle::Stable,
            BootCycle::Install,
            BootCycle::FirstBoot,
            BootCycle::FailsafeCheck,
        ] {
            assert_eq!(BootCycle::parse(c.as_str()), Some(c));
            assert_eq!(c.to_string(), c.as_str());
        }
        assert_eq!(BootCycle::FirstBoot.as_str(), "first_boot");
        assert_eq!(BootCycle::parse(""), None);
        assert_eq!(BootCycle::parse("stabel"), None);
    }
}
