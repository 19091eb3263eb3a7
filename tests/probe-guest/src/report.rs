//! Running checks and reporting them in the probe's line protocol:
//! `PROBE ok <name>` or `PROBE FAIL <name>: <why>`, then a summary.

use alloc::string::String;

use crate::cmdline::Options;
use crate::println;

/// What a check returns: `Err` carries the reason for the FAIL line.
pub type CheckResult = Result<(), String>;

/// Returns early from a check with a formatted failure reason.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)*) => {
        return Err(alloc::format!($($arg)*))
    };
}

/// Counts and prints check results.
pub struct Report<'o> {
    options: &'o Options<'o>,
    passed: u32,
    failed: u32,
}

impl<'o> Report<'o> {
    /// A report honouring the `probe.check` selection in `options`.
    pub fn new(options: &'o Options<'o>) -> Self {
        Report {
            options,
            passed: 0,
            failed: 0,
        }
    }

    /// Whether check `name` is selected by `probe.check`.
    pub fn selects(&self, name: &str) -> bool {
        self.options.selects(name)
    }

    /// Whether some check whose name starts with `prefix` may be selected.
    pub fn selects_prefix(&self, prefix: &str) -> bool {
        self.options.checks.is_empty()
            || self
                .options
                .checks
                .iter()
                .any(|p| p.starts_with(prefix) || prefix.starts_with(p))
    }

    /// Runs check `name` if selected and prints its line.
    pub fn check(&mut self, name: &str, check: impl FnOnce() -> CheckResult) {
        if !self.options.selects(name) {
            return;
        }
        self.record(name, check());
    }

    fn record(&mut self, name: &str, result: CheckResult) {
        match result {
            Ok(()) => {
                self.passed += 1;
                println!("PROBE ok {name}");
            }
            Err(why) => {
                self.failed += 1;
                println!("PROBE FAIL {name}: {}", one_line(&why));
            }
        }
    }

    /// Prints `probe: N passed, M failed`.
    pub fn summary(&self) {
        println!("probe: {} passed, {} failed", self.passed, self.failed);
    }
}

/// `text` on one line: line breaks and tabs become spaces, other control
/// characters `?`.
pub fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\n' | '\r' | '\t' => ' ',
            c if c.is_control() => '?',
            c => c,
        })
        .collect()
}
