//! A small stderr logger. Under systemd (JOURNAL_STREAM set) each line gets a
//! `<N>` priority prefix that journald understands; otherwise a timestamp.

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

struct Logger {
    journald: bool,
}

impl Log for Logger {
    fn enabled(&self, _: &Metadata) -> bool {
        true
    }
    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = if self.journald {
            let prio = match record.level() {
                Level::Error => 3,
                Level::Warn => 4,
                Level::Info => 6,
                Level::Debug | Level::Trace => 7,
            };
            format!("<{prio}>{}\n", record.args())
        } else {
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            format!(
                "[{}.{:03} {:5} keel-agent] {}\n",
                t.as_secs(),
                t.subsec_millis(),
                record.level(),
                record.args()
            )
        };
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
    fn flush(&self) {}
}

pub fn init(level: LevelFilter) {
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let logger: &'static Logger = Box::leak(Box::new(Logger { journald }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}
