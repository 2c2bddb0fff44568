//! The logger: Firecracker's line format,
//! `<local time> [<instance id>:<thread>[:<LEVEL>][:<file>:<line>]] <message>`,
//! to stdout or a file (a named pipe works too), with a module filter, and rate limiting for
//! every message a guest can trigger.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::config::{LogLevel, LoggerConfig};

struct State {
    instance_id: String,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
    /// None: stdout.
    file: Option<Sink>,
    /// stdout, as [`crate::stdio::stdout_writer`] gives it (set up by `init`, before any
    /// thread's filter forbids the fstat it takes); None: std's stdout.
    stdout: Option<Box<dyn Write + Send>>,
}

pub struct Logger {
    state: Mutex<State>,
    configured: AtomicBool,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// The log destination as a raw fd, for the signal-safe path.
static LOG_FD: AtomicI32 = AtomicI32::new(1);
/// Whether that is stdout and a pipe or a socket, which the signal-safe path must not wait
/// on (see [`crate::stdio`]); a log file is opened non-blocking anyway.
static LOG_FD_IS_STREAM: AtomicBool = AtomicBool::new(false);
/// The log file holds part of a line whose rest is still to be written (see [`Sink`]).
static LOG_MID_LINE: AtomicBool = AtomicBool::new(false);
static INSTANCE_ID: Mutex<[u8; 64]> = Mutex::new([0; 64]);
/// Local time minus UTC, in seconds, read at `init`: the signal-safe path cannot call
/// localtime_r (it takes libc's time-zone lock) but must print the same local time.
static UTC_OFFSET_S: AtomicI64 = AtomicI64::new(0);

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
            stdout: None,
        }),
        configured: AtomicBool::new(false),
    })
}

extern "C" {
    // POSIX; the libc crate does not bind it.
    fn tzset();
}

/// Installs the logger with the default level (Info) and the instance id.
pub fn init(instance_id: &str, level: LevelFilter) {
    let l = logger();
    {
        let mut st = l.lock();
        st.instance_id = instance_id.to_string();
        if st.stdout.is_none() {
            st.stdout = crate::stdio::stdout_writer().ok();
        }
    }
    LOG_FD_IS_STREAM.store(crate::stdio::is_stream(1), Ordering::SeqCst);
    if let Ok(mut id) = INSTANCE_ID.lock() {
        let n = instance_id.len().min(id.len());
        *id = [0; 64];
        id[..n].copy_from_slice(&instance_id.as_bytes()[..n]);
    }
    // localtime_r reads the time zone on its first call; read it now, while opening
    // /etc/localtime is still allowed, not on whichever thread logs first under its filter.
    // SAFETY: tzset only initialises libc's time-zone state.
    unsafe { tzset() };
    let now = crate::time::utc_ms() as i64 / 1000;
    // SAFETY: all-zero bytes are a valid `tm`; localtime_r writes only into it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: as above; both pointers are to live locals.
    if !unsafe { libc::localtime_r(&now, &mut tm) }.is_null() {
        UTC_OFFSET_S.store(tm.tm_gmtoff, Ordering::Relaxed);
    }
    // A second init (tests) keeps the first logger; only the level changes.
    let _ = log::set_logger(l);
    log::set_max_level(level);
}

/// What became of a line given to [`Sink::write_line`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// All of it (or all but a tail the sink finishes before the next line).
    Whole,
    /// None of it: the pipe was full (Firecracker's "missed" count).
    Full,
    /// None of it: the write failed otherwise, e.g. a full disk (Firecracker's "fails").
    Failed,
}

/// A log or metrics destination, a file or a named pipe, opened the way Firecracker opens
/// it: read and write, non-blocking. A pipe with no reader yet would otherwise block the open
/// (and with it the API request or the start-up) until one came, and a reader that stops
/// reading would block every thread that logs. A line the pipe cannot take is dropped whole;
/// one it took in part (a pipe takes at most 4 KiB at once) is finished before the next one,
/// so the reader never sees two lines run together.
pub struct Sink {
    file: File,
    unfinished: Vec<u8>,
}

impl Sink {
    pub fn open(path: &str) -> std::io::Result<Sink> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        Ok(Sink {
            file: share_std_stream(file),
            unfinished: Vec::new(),
        })
    }

    /// Writes `line` (ending in a newline) whole, or nothing of it and says why.
    pub fn write_line(&mut self, line: &[u8]) -> Written {
        if !self.unfinished.is_empty() {
            let rest = std::mem::take(&mut self.unfinished);
            let (n, why) = self.write_some(&rest);
            if n < rest.len() {
                self.unfinished = rest[n..].to_vec();
                return why;
            }
        }
        let (n, why) = self.write_some(line);
        if n == 0 && !line.is_empty() {
            return why;
        }
        self.unfinished = line[n..].to_vec();
        Written::Whole
    }

    /// Writes what the destination takes now, without waiting: how much, and why no more.
    fn write_some(&mut self, buf: &[u8]) -> (usize, Written) {
        let mut done = 0;
        while done < buf.len() {
            match self.file.write(&buf[done..]) {
                Ok(0) => return (done, Written::Failed),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return (done, Written::Full)
                }
                Err(_) => return (done, Written::Failed),
            }
        }
        (done, Written::Whole)
    }

    /// For paths that cannot allocate (signal handlers): finishes a line the destination took
    /// only in part, then writes `line` if that worked. False if `line` was not written whole.
    pub fn write_line_raw(&self, line: &[u8]) -> bool {
        // Opened non-blocking: a plain write does not wait.
        write_all_raw(self.file.as_raw_fd(), &self.unfinished, false)
            && write_all_raw(self.file.as_raw_fd(), line, false)
    }
}

/// `--log-path /dev/stdout` with stdout redirected to a file (`ember ... > vm.log`): opening the
/// path again gives a second file offset, and the console's writes through fd 1 overwrite the
/// log's. When the file opened is the regular file behind our stdout or stderr, the sink
/// writes through that descriptor (a duplicate, sharing its offset) instead.
fn share_std_stream(file: File) -> File {
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = file.metadata() else {
        return file;
    };
    if !m.is_file() {
        return file;
    }
    for fd in [1, 2] {
        // SAFETY: all-zero bytes are a valid `stat` (plain integers) for fstat(2) to fill.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat(2) writes only into `st`; a closed fd only makes it fail.
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            continue;
        }
        if st.st_dev == m.dev() && st.st_ino == m.ino() {
            // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor that only this File will own.
            let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
            if dup >= 0 {
                // SAFETY: `dup` is a fresh descriptor owned by nothing else.
                return unsafe { File::from_raw_fd(dup) };
            }
        }
    }
    file
}

/// Writes `buf` whole; false at the first error or short write. A pipe or socket (`stream`) is
/// not waited on (see [`crate::stdio::write_nowait`]). Allocates nothing: signal handlers use it.
fn write_all_raw(fd: std::os::fd::RawFd, mut buf: &[u8], stream: bool) -> bool {
    while !buf.is_empty() {
        match crate::stdio::write_nowait(fd, buf, stream) {
            Ok(n) if n > 0 => buf = &buf[n..],
            _ => return false,
        }
    }
    true
}

impl AsRawFd for Sink {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

/// Applies `--level`/`--log-path`/... or `PUT /logger`; allowed once.
pub fn configure(cfg: &LoggerConfig) -> Result<(), LoggerError> {
    let l = logger();
    if l.configured.swap(true, Ordering::SeqCst) {
        return Err(LoggerError::AlreadyConfigured);
    }
    let file = match &cfg.log_path {
        Some(p) => Some(Sink::open(p).map_err(|e| {
            l.configured.store(false, Ordering::SeqCst);
            LoggerError::Open(p.clone(), e)
        })?),
        None => None,
    };
    let mut st = l.lock();
    if let Some(f) = file {
        LOG_FD.store(f.as_raw_fd(), Ordering::SeqCst);
        LOG_FD_IS_STREAM.store(false, Ordering::SeqCst);
        st.file = Some(f);
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

/// The name a thread goes by in logs. Every thread ember starts has one; the one without is
/// the main thread (Rust's start-up, which would name it, is skipped: see main.rs).
pub fn thread_name(t: &std::thread::Thread) -> &str {
    t.name().unwrap_or("main")
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        // virtio-queue logs what a guest's driver got wrong (a ring outside guest memory, at
        // each DRIVER_OK): a guest can cause it at will, so it is rate-limited like log_guest!.
        let mut suppressed = 0;
        if r.target().starts_with("virtio_queue") {
            static LIMIT: RateLimit = RateLimit::new();
            match LIMIT.check() {
                Some(n) => suppressed = n,
                None => return,
            }
        }
        let mut st = self.lock();
        if let Some(m) = &st.module {
            if !r.module_path().unwrap_or("").starts_with(m.as_str()) {
                return;
            }
        }
        let mut line = format!(
            "{} [{}:{}",
            local_timestamp(),
            st.instance_id,
            thread_name(&std::thread::current())
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
        line.push_str(&format!("] {}", r.args()));
        if suppressed > 0 {
            line.push_str(&format!(" ({suppressed} similar messages suppressed)"));
        }
        line.push('\n');
        let written = match st.file.as_mut() {
            Some(f) => {
                let w = f.write_line(line.as_bytes());
                LOG_MID_LINE.store(!f.unfinished.is_empty(), Ordering::Relaxed);
                w
            }
            None => {
                let res = match st.stdout.as_mut() {
                    Some(out) => out.write_all(line.as_bytes()),
                    None => std::io::stdout().lock().write_all(line.as_bytes()),
                };
                match res {
                    Ok(()) => Written::Whole,
                    // A reader that stopped reading (see `crate::stdio`).
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Written::Full,
                    Err(_) => Written::Failed,
                }
            }
        };
        let m = &crate::metrics::METRICS.logger;
        match written {
            Written::Whole => {}
            Written::Full => m.missed_log_count.inc(),
            Written::Failed => m.log_fails.inc(),
        }
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
    fn sink_tells_a_failed_write_from_a_full_pipe() {
        // /dev/full fails every write with ENOSPC, as a full disk does.
        let mut sink = Sink::open("/dev/full").unwrap();
        assert_eq!(sink.write_line(b"a line\n"), Written::Failed);
        assert!(sink.unfinished.is_empty());
    }

    /// A named pipe whose reader stopped: lines that do not fit are dropped whole, one taken
    /// in part is finished first, and the reader sees only whole lines, in order.
    #[test]
    fn sink_on_a_full_pipe_drops_whole_lines_and_never_blocks() {
        let dir = std::env::temp_dir().join(format!("ember-sink-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pipe");
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) of a path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let mut sink = Sink::open(path.to_str().unwrap()).unwrap();
        let mut reader = std::fs::File::open(&path).unwrap();
        // 6 KiB lines: a pipe writes at most 4 KiB atomically, so they go in part.
        let line = |n: u8| {
            let mut l = vec![b'a' + n; 6000];
            l.push(b'\n');
            l
        };
        let mut accepted = Vec::new();
        for n in 0..40 {
            if sink.write_line(&line(n)) == Written::Whole {
                accepted.push(n);
            }
        }
        assert!(accepted.len() < 40, "a 64 KiB pipe took 240 KB");
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 20];
        // Drain, then let the sink finish what it started: the next line completes it.
        // SAFETY: fcntl(2) on a descriptor we own.
        unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        let mut drain = |got: &mut Vec<u8>| {
            while let Ok(n) = std::io::Read::read(&mut reader, &mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
        };
        drain(&mut got);
        assert_eq!(sink.write_line(&line(25)), Written::Whole);
        accepted.push(25);
        drain(&mut got);
        let lines: Vec<&[u8]> = got.split_inclusive(|&b| b == b'\n').collect();
        assert_eq!(lines.len(), accepted.len());
        for (l, n) in lines.iter().zip(&accepted) {
            assert_eq!(*l, &line(*n)[..]);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

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

/// A fixed buffer for text built where allocating is not allowed (signal handlers).
pub struct StackBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> StackBuf<N> {
    pub const fn new() -> Self {
        StackBuf {
            buf: [0; N],
            len: 0,
        }
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl<const N: usize> Default for StackBuf<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> std::fmt::Write for StackBuf<N> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let b = s.as_bytes();
        let n = b.len().min(N - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
        if n < b.len() {
            Err(std::fmt::Error)
        } else {
            Ok(())
        }
    }
}

impl<const N: usize> std::io::Write for StackBuf<N> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = b.len().min(N - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
        if n < b.len() {
            // An ErrorKind-only error: building it allocates nothing (this runs in signal handlers).
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// UTC civil time from Unix seconds (no locks, unlike localtime_r).
fn utc_parts(secs: i64) -> (i64, u32, u32, u32, u32, u32) {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        (rem % 3600 / 60) as u32,
        (rem % 60) as u32,
    )
}

/// Logs `msg` from a signal handler: no allocation and no locks that the interrupted code
/// could hold; one write(2) to the log destination.
pub fn emergency(thread: &str, msg: std::fmt::Arguments) {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the struct we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    let (y, mo, d, h, mi, se) = utc_parts(ts.tv_sec + UTC_OFFSET_S.load(Ordering::Relaxed));
    let mut id = [0u8; 64];
    if let Ok(g) = INSTANCE_ID.try_lock() {
        id = *g;
    }
    let id_len = id.iter().position(|&b| b == 0).unwrap_or(id.len());
    let id = std::str::from_utf8(&id[..id_len]).unwrap_or("?");
    let mut line = StackBuf::<512>::new();
    let _ = std::fmt::Write::write_fmt(
        &mut line,
        format_args!(
            "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{se:02}.{:09} [{id}:{thread}:ERROR] {msg}\n",
            ts.tv_nsec
        ),
    );
    // A line the log file took only in part is finished first, if its holder is not this very
    // thread, interrupted; otherwise this one starts on a line of its own.
    let fd = LOG_FD.load(Ordering::SeqCst);
    let state = LOGGER.get().map(|l| l.state.try_lock());
    let written = match state {
        Some(Ok(st)) => st.file.as_ref().map(|f| f.write_line_raw(line.as_bytes())),
        _ => None,
    };
    if written.is_none() {
        let sep: &[u8] = if LOG_MID_LINE.load(Ordering::Relaxed) {
            b"\n"
        } else {
            b""
        };
        let stream = LOG_FD_IS_STREAM.load(Ordering::SeqCst);
        let _ = write_all_raw(fd, sep, stream) && write_all_raw(fd, line.as_bytes(), stream);
    }
}

#[cfg(test)]
mod emergency_tests {
    use super::*;

    #[test]
    fn utc_conversion() {
        assert_eq!(utc_parts(0), (1970, 1, 1, 0, 0, 0));
        // 2026-11-23T01:54:07Z
        assert_eq!(utc_parts(1_795_398_847), (2026, 11, 23, 1, 54, 7));
        assert_eq!(utc_parts(951_782_400), (2000, 2, 29, 0, 0, 0));
    }

    /// Lines from signal handlers carry the same local time as the others, not UTC.
    #[test]
    fn the_signal_safe_path_uses_local_time() {
        init("emergency-test", LevelFilter::Info);
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two descriptors, closed below.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        let old = LOG_FD.swap(fds[1], Ordering::SeqCst);
        let before = local_timestamp();
        emergency("t", format_args!("hello"));
        let after = local_timestamp();
        LOG_FD.store(old, Ordering::SeqCst);
        let mut buf = [0u8; 512];
        // SAFETY: read(2) into a stack buffer; then closing the descriptors pipe2 gave us.
        let n = unsafe {
            let n = libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len());
            libc::close(fds[0]);
            libc::close(fds[1]);
            n
        };
        let line = String::from_utf8_lossy(&buf[..usize::try_from(n).unwrap()]).into_owned();
        assert!(
            line.ends_with(" [emergency-test:t:ERROR] hello\n"),
            "{line}"
        );
        assert_eq!(
            &line[29..31],
            " [",
            "a local time has no zone suffix: {line}"
        );
        let ts = &line[..29];
        assert!(
            before.as_str() <= ts && ts <= after.as_str(),
            "{before} {line} {after}"
        );
    }

    #[test]
    fn stack_buffer_truncates() {
        let mut b = StackBuf::<4>::new();
        assert!(std::fmt::Write::write_str(&mut b, "hello").is_err());
        assert_eq!(b.as_bytes(), b"hell");
    }
}
