//! How a VM ended, and the process exit code `keel` reports for it.
//!
//! The codes and their meanings are [`EXIT_CODES`], which `keel --help` prints.

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOutcome {
    /// Guest power-off.
    PowerOff,
    /// Stopped on a signal.
    Stopped(&'static str),
    /// Guest reset/reboot.
    Reset,
    /// Triple fault (with the vCPU's registers).
    TripleFault(String),
    /// Guest crash report.
    Crash,
    /// Fatal error while running.
    Fatal(String),
}

/// Every exit code of `keel` with its meaning, as `keel --help` lists them.
pub const EXIT_CODES: &[(u8, &str)] = &[
    (
        0,
        "the guest powered off, or Keel stopped it on request: a graceful shutdown \
         (SIGTERM/SIGINT or PUT /v1/vm/shutdown, also when its timeout forced the stop) \
         or PUT /v1/vm/stop",
    ),
    (1, "configuration or set-up error: the guest never started"),
    (2, "command-line usage error"),
    (
        3,
        "the guest reset or rebooted itself (i8042 reset, KVM reset event)",
    ),
    (4, "the guest triple-faulted (its registers are logged)"),
    (5, "the guest reported a crash (KVM crash event)"),
    (
        6,
        "fatal VMM or KVM error while running (internal or emulation error, unhandled exit)",
    ),
    (
        7,
        "a Keel thread made a system call its seccomp filter forbids (the thread kind and \
         the call's number are logged), or a filter could not be installed",
    ),
];

/// The exit-code table as text, for `keel --help`.
pub fn exit_codes_help() -> String {
    let mut s = String::from("Exit codes:\n");
    for (code, meaning) in EXIT_CODES {
        s.push_str(&format!("  {code}  {meaning}\n"));
    }
    s
}

/// `keel`'s exit code for a configuration or set-up error.
pub const EXIT_CONFIG_ERROR: u8 = 1;
/// `keel`'s exit code for a usage error (clap's own).
pub const EXIT_USAGE_ERROR: u8 = 2;

impl VmOutcome {
    /// The process exit code (see the module table).
    pub fn exit_code(&self) -> u8 {
        match self {
            VmOutcome::PowerOff | VmOutcome::Stopped(_) => 0,
            VmOutcome::Reset => 3,
            VmOutcome::TripleFault(_) => 4,
            VmOutcome::Crash => 5,
            VmOutcome::Fatal(_) => 6,
        }
    }

    /// A one-line description for the log.
    pub fn describe(&self) -> String {
        match self {
            VmOutcome::PowerOff => "guest powered off".into(),
            VmOutcome::Stopped(sig) => format!("stopped on {sig}"),
            VmOutcome::Reset => "guest requested a reset".into(),
            VmOutcome::TripleFault(_) => "guest triple-faulted".into(),
            VmOutcome::Crash => "guest reported a crash".into(),
            VmOutcome::Fatal(reason) => format!("fatal error: {reason}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_per_kind() {
        let all = [
            VmOutcome::PowerOff,
            VmOutcome::Reset,
            VmOutcome::TripleFault(String::new()),
            VmOutcome::Crash,
            VmOutcome::Fatal(String::new()),
        ];
        let mut codes: Vec<u8> = all.iter().map(VmOutcome::exit_code).collect();
        codes.extend([
            EXIT_CONFIG_ERROR,
            EXIT_USAGE_ERROR,
            crate::seccomp::EXIT_SECCOMP,
        ]);
        let n = codes.len();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), n);
        assert_eq!(VmOutcome::Stopped("SIGTERM").exit_code(), 0);
        // Every code has exactly one line in the table --help prints.
        for code in codes {
            assert_eq!(
                EXIT_CODES.iter().filter(|(c, _)| *c == code).count(),
                1,
                "exit code {code}"
            );
        }
        assert_eq!(EXIT_CODES.len(), n);
    }
}
