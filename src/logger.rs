//! A small stderr logger for the `log` facade: logs never mix into protocol output.

use std::io::Write;

use log::{LevelFilter, Metadata, Record};

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        // tract's own warnings concern its CPU detection (under qemu-user /proc/cpuinfo is the
        // host's) and are no business of the user's at the default level: shown from -v on.
        !metadata.target().starts_with("tract") || log::max_level() >= LevelFilter::Info
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            let mut err = std::io::stderr().lock();
            // A closed stderr must not take the program down.
            let _ = writeln!(
                err,
                "[{}] {}",
                record.level().as_str().to_lowercase(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Installs the logger; `verbosity` 0 = warnings, 1 = info, 2 = debug, 3+ = trace.
/// `EDGELM_LOG=<level>` overrides it.
pub fn init(verbosity: u8) {
    let from_flag = match verbosity {
        0 => LevelFilter::Warn,
        1 => LevelFilter::Info,
        2 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    };
    let level = std::env::var("EDGELM_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(from_flag);
    // A second init (tests) keeps the first logger.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
