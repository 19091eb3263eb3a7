//! A small stderr logger: `keel: LEVEL message`, or with a syslog priority
//! prefix (`<3>message`) when stderr is the journal, so journald keeps the
//! levels.

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger {
    journal: bool,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        if self.journal {
            let prio = match record.level() {
                Level::Error => 3,
                Level::Warn => 4,
                Level::Info => 6,
                Level::Debug | Level::Trace => 7,
            };
            eprintln!("<{prio}>{}", record.args());
        } else {
            eprintln!("keel: {:<5} {}", record.level(), record.args());
        }
    }

    fn flush(&self) {}
}

/// Installs the logger at `level`.
pub fn init(level: LevelFilter) {
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    if log::set_boxed_logger(Box::new(StderrLogger { journal })).is_ok() {
        log::set_max_level(level);
    }
}
