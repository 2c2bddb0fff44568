//! The logger: Firecracker's line format,
//! `<local time> [<instance id>:<thread>[:<LEVEL>][:<file>:<line>]] <message>`,
//! to stdout or a file (a named pipe works too), with a module filter, and rate limiting for
//! every message a guest can trigger.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::config::{LogLevel, LoggerConfig};

struct State {
    instance_id: String,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
    /// None: stdout.
    file: Option<File>,
}

pub struct Logger {
    state: Mutex<State>,
    configured: AtomicBool,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

#[derive(Debug)]
pub enum LoggerError {
    AlreadyConfigured,
    Open(String, std::io::Error),
}

impl std::fmt::Display for LoggerError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            LoggerError::AlreadyConfigured => write!(f, "Reinitialization of logger not allowed."),
            LoggerError::Open(p, e) => write!(f, "Cannot open the log file {p:?}: {e}"),
        }
    }
}

impl std::error::Error for LoggerError {}

fn logger() -> &'static Logger {
    LOGGER.get_or_init(|| Logger {
        state: Mutex::new(State {
            instance_id: "anonymous-instance".into(),
            show_level: false,
            show_origin: false,
            module: None,
            file: None,
        }),
        configured: AtomicBool::new(false),
    })
}

/// Installs the logger with the default level (Info) and the instance id.
pub fn init(instance_id: &str, level: LevelFilter) {
    let l = logger();
    l.lock().instance_id = instance_id.to_string();
    // A second init (tests) keeps the first logger; only the level changes.
    let _ = log::set_logger(l);
    log::set_max_level(level);
}

/// Applies `--level`/`--log-path`/... or `PUT /logger`; allowed once.
pub fn configure(cfg: &LoggerConfig) -> Result<(), LoggerError> {
    let l = logger();
    if l.configured.swap(true, Ordering::SeqCst) {
        return Err(LoggerError::AlreadyConfigured);
    }
    let file = match &cfg.log_path {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(p)
                .map_err(|e| {
                    l.configured.store(false, Ordering::SeqCst);
                    LoggerError::Open(p.clone(), e)
                })?,
        ),
        None => None,
    };
    let mut st = l.lock();
    if file.is_some() {
        st.file = file;
    }
    if let Some(v) = cfg.show_level {
        st.show_level = v;
    }
    if let Some(v) = cfg.show_log_origin {
        st.show_origin = v;
    }
    if cfg.module.is_some() {
        st.module = cfg.module.clone();
    }
    log::set_max_level(cfg.level.unwrap_or(LogLevel::Info).to_filter());
    Ok(())
}

impl Logger {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn level_name(l: Level) -> &'static str {
    match l {
        Level::Error => "ERROR",
        Level::Warn => "WARN",
        Level::Info => "INFO",
        Level::Debug => "DEBUG",
        Level::Trace => "TRACE",
    }
}

/// Local time as `YYYY-MM-DDTHH:MM:SS.nnnnnnnnn`.
pub fn local_timestamp() -> String {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: both calls only write to the structs on this stack that we pass them.
    let tm = unsafe {
        libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts);
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&ts.tv_sec, &mut tm);
        tm
    };
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        ts.tv_nsec
    )
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let mut st = self.lock();
        if let Some(m) = &st.module {
            if !r.module_path().unwrap_or("").starts_with(m.as_str()) {
                return;
            }
        }
        let thread = std::thread::current();
        let mut line = format!(
            "{} [{}:{}",
            local_timestamp(),
            st.instance_id,
            thread.name().unwrap_or("?")
        );
        if st.show_level {
            line.push(':');
            line.push_str(level_name(r.level()));
        }
        if st.show_origin {
            line.push_str(&format!(
                ":{}:{}",
                r.file().unwrap_or("?"),
                r.line().unwrap_or(0)
            ));
        }
        line.push_str(&format!("] {}\n", r.args()));
        let _ = match st.file.as_mut() {
            Some(f) => f.write_all(line.as_bytes()),
            None => std::io::stdout().lock().write_all(line.as_bytes()),
        };
    }

    fn flush(&self) {}
}

/// Per call site limit for messages a guest can cause: at most `BURST` in each second, then
/// one summary of how many were dropped. Keeps a misbehaving guest from filling the disk.
pub struct RateLimit {
    window_start_s: AtomicU64,
    in_window: AtomicU64,
    suppressed: AtomicU64,
}

const BURST: u64 = 10;

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimit {
    pub const fn new() -> Self {
        RateLimit {
            window_start_s: AtomicU64::new(0),
            in_window: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Some(n): log now, `n` messages were suppressed since the last one. None: drop it.
    pub fn check(&self) -> Option<u64> {
        let now_s = crate::time::monotonic_us() / 1_000_000;
        if self.window_start_s.swap(now_s, Ordering::Relaxed) != now_s {
            self.in_window.store(0, Ordering::Relaxed);
        }
        if self.in_window.fetch_add(1, Ordering::Relaxed) < BURST {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// `log::log!` with a per-call-site rate limit; use it for anything a guest can trigger.
#[macro_export]
macro_rules! log_guest {
    ($lvl:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::logger::RateLimit = $crate::logger::RateLimit::new();
        if let Some(dropped) = LIMIT.check() {
            if dropped > 0 {
                log::log!($lvl, "{} ({} similar messages suppressed)", format_args!($($arg)+), dropped);
            } else {
                log::log!($lvl, $($arg)+);
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_drops_after_burst() {
        let r = RateLimit::new();
        let allowed = (0..100).filter(|_| r.check().is_some()).count();
        // All 100 calls happen within one or two seconds: at most two bursts pass.
        assert!(
            (BURST as usize..=2 * BURST as usize).contains(&allowed),
            "{allowed}"
        );
    }

    #[test]
    fn timestamp_shape() {
        let t = local_timestamp();
        assert_eq!(t.len(), 29, "{t}");
        assert_eq!(&t[10..11], "T");
    }
}
