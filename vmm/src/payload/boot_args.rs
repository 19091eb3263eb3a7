//! The boot partition's `boot_args` file: shell-style assignments
//! `BOOT_ARGS_A="..."` and `BOOT_ARGS_B="..."`, each the whole kernel
//! command line of its slot, used verbatim.
//!
//! Accepted, as a POSIX shell reads them: values double-quoted (a backslash
//! escapes `"`, `\`, `$`, `` ` `` and a newline), single-quoted (no
//! escapes) or unquoted (a backslash escapes any character), and pieces of
//! each run together (`"a b"'c'd`); `#` starts a comment at the start of a
//! word; blank lines. The last assignment of a name wins. Anything a shell
//! would expand or run (`$`, `` ` ``, a line that is not an assignment) is
//! refused rather than guessed at.

use super::grubenv::Slot;

/// A `boot_args` file that cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BootArgsError {
    /// Shell syntax this parser does not accept.
    #[error("line {line}: {why}")]
    Syntax {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// The slot's variable is not assigned.
    #[error("no BOOT_ARGS_{0} assignment")]
    Missing(Slot),
}

/// The assignments of a `boot_args` file, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BootArgs {
    vars: Vec<(String, String)>,
}

impl BootArgs {
    /// Parses the file's text.
    pub fn parse(text: &str) -> Result<Self, BootArgsError> {
        let mut vars = Vec::new();
        let mut p = Parser {
            chars: text.chars().collect(),
            at: 0,
            line: 1,
        };
        loop {
            p.skip_blanks_and_comments();
            if p.at >= p.chars.len() {
                break;
            }
            let line = p.line;
            let name = p.name();
            if name.is_empty() || p.peek() != Some('=') {
                return Err(p.error(line, "not a NAME=value assignment"));
            }
            p.at += 1;
            let value = p.word()?;
            // Only blanks or a comment may follow on the line.
            while matches!(p.peek(), Some(' ' | '\t')) {
                p.at += 1;
            }
            match p.peek() {
                None | Some('\n') | Some('#') => {}
                Some(c) => {
                    return Err(p.error(
                        p.line,
                        &format!("unexpected {c:?} after the value of {name}"),
                    ))
                }
            }
            vars.push((name, value));
        }
        Ok(BootArgs { vars })
    }

    /// The command line of `slot` (the last `BOOT_ARGS_<slot>` assignment).
    pub fn for_slot(&self, slot: Slot) -> Result<&str, BootArgsError> {
        let name = format!("BOOT_ARGS_{slot}");
        self.vars
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .ok_or(BootArgsError::Missing(slot))
    }
}

struct Parser {
    chars: Vec<char>,
    at: usize,
    line: usize,
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).copied()
    }

    fn error(&self, line: usize, why: &str) -> BootArgsError {
        BootArgsError::Syntax {
            line,
            why: why.to_string(),
        }
    }

    fn skip_blanks_and_comments(&mut self) {
        while let Some(c) = self.peek() {
            match c {
                ' ' | '\t' | '\r' => self.at += 1,
                '\n' => {
                    self.at += 1;
                    self.line += 1;
                }
                '#' => {
                    while self.peek().is_some_and(|c| c != '\n') {
                        self.at += 1;
                    }
                }
                _ => break,
            }
        }
    }

    fn name(&mut self) -> String {
        let start = self.at;
        while self
            .peek()
            .is_some_and(|c| c == '_' || c.is_ascii_alphanumeric())
        {
            self.at += 1;
        }
        let name: String = self.chars[start..self.at].iter().collect();
        if name.starts_with(|c: char| c.is_ascii_digit()) {
            String::new()
        } else {
            name
        }
    }

    /// One shell word: quoted and unquoted pieces up to a blank, a newline
    /// or the end.
    fn word(&mut self) -> Result<String, BootArgsError> {
        let mut out = String::new();
        while let Some(c) = self.peek() {
            let line = self.line;
            match c {
                ' ' | '\t' | '\n' | '\r' => break,
                '\'' => self.single_quoted(&mut out)?,
                '"' => self.double_quoted(&mut out)?,
                '\\' => {
                    self.at += 1;
                    match self.peek() {
                        Some('\n') => self.skip_newline(),
                        Some(e) => self.take(&mut out, e),
                        None => return Err(self.error(line, "a backslash at the end of the file")),
                    }
                }
                '$' | '`' | ';' | '&' | '|' | '<' | '>' | '(' | ')' => {
                    return Err(self.error(
                        line,
                        &format!(
                        "unquoted {c:?}: expansions, commands and redirections are not supported"
                    ),
                    ))
                }
                c => self.take(&mut out, c),
            }
        }
        Ok(out)
    }

    /// `'...'`: everything literal up to the closing quote.
    fn single_quoted(&mut self, out: &mut String) -> Result<(), BootArgsError> {
        let line = self.line;
        self.at += 1;
        loop {
            match self.peek() {
                None => return Err(self.error(line, "unterminated single quote")),
                Some('\'') => break,
                Some(c) => self.take(out, c),
            }
        }
        self.at += 1;
        Ok(())
    }

    /// `"..."`: a backslash escapes `"`, `\`, `$`, `` ` `` and a newline
    /// (and stays before anything else); `$` and `` ` `` are refused.
    fn double_quoted(&mut self, out: &mut String) -> Result<(), BootArgsError> {
        let line = self.line;
        self.at += 1;
        loop {
            match self.peek() {
                None => return Err(self.error(line, "unterminated double quote")),
                Some('"') => break,
                Some('\\') => {
                    self.at += 1;
                    match self.peek() {
                        Some('\n') => self.skip_newline(),
                        Some(e @ ('"' | '\\' | '$' | '`')) => self.take(out, e),
                        Some(e) => {
                            out.push('\\');
                            self.take(out, e);
                        }
                        None => return Err(self.error(line, "unterminated double quote")),
                    }
                }
                Some('$' | '`') => {
                    return Err(self.error(
                        self.line,
                        "`$` or a backquote: expansions are not supported",
                    ))
                }
                Some(c) => self.take(out, c),
            }
        }
        self.at += 1;
        Ok(())
    }

    /// Appends `c` (the current character) and moves past it.
    fn take(&mut self, out: &mut String, c: char) {
        if c == '\n' {
            self.line += 1;
        }
        out.push(c);
        self.at += 1;
    }

    /// Moves past an escaped newline (a line continuation).
    fn skip_newline(&mut self) {
        self.line += 1;
        self.at += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guestos_template() {
        let a = BootArgs::parse(
            "# Boot arguments\n\nBOOT_ARGS_A=\"root=/dev/vda5 console=ttyS0 dfinity.system=A\"\n  BOOT_ARGS_B=\"root=/dev/vda8 console=ttyS0 dfinity.system=B\" # B\n",
        )
        .unwrap();
        assert_eq!(
            a.for_slot(Slot::A).unwrap(),
            "root=/dev/vda5 console=ttyS0 dfinity.system=A"
        );
        assert_eq!(
            a.for_slot(Slot::B).unwrap(),
            "root=/dev/vda8 console=ttyS0 dfinity.system=B"
        );
    }

    #[test]
    fn quoting_escapes_and_last_assignment() {
        let a = BootArgs::parse(
            "BOOT_ARGS_A=first\nBOOT_ARGS_A='single \"quoted\" \\n'\" and \\\"double\\\" \\x\"un\\ quoted#not-a-comment\nBOOT_ARGS_B=\n",
        )
        .unwrap();
        assert_eq!(
            a.for_slot(Slot::A).unwrap(),
            "single \"quoted\" \\n and \"double\" \\xun quoted#not-a-comment"
        );
        assert_eq!(a.for_slot(Slot::B).unwrap(), "");
    }

    #[test]
    fn refused_syntax_and_missing_slots() {
        for bad in [
            "BOOT_ARGS_A=\"open",
            "BOOT_ARGS_A='open",
            "BOOT_ARGS_A=$HOME",
            "BOOT_ARGS_A=\"$(reboot)\"",
            "BOOT_ARGS_A=a b",
            "echo hi",
            "export BOOT_ARGS_A=x",
            "1X=y",
            "BOOT_ARGS_A=x;reboot",
        ] {
            assert!(
                matches!(BootArgs::parse(bad), Err(BootArgsError::Syntax { .. })),
                "{bad:?}"
            );
        }
        let e = BootArgs::parse("x=1\n\nBOOT_ARGS_A=\"a\nb\" c\n").unwrap_err();
        assert_eq!(
            e,
            BootArgsError::Syntax {
                line: 4,
                why: "unexpected 'c' after the value of BOOT_ARGS_A".into()
            }
        );
        let only_a = BootArgs::parse("BOOT_ARGS_A=x\n").unwrap();
        assert_eq!(
            only_a.for_slot(Slot::B).unwrap_err(),
            BootArgsError::Missing(Slot::B)
        );
    }
}
