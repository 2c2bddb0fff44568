//! Process-wide signal handling and the host terminal.
//!
//! SIGTERM and SIGINT ask for a clean stop through the event loop. Fatal signals (SIGBUS,
//! SIGSEGV, ...) count in the metrics, flush them, restore the terminal and exit with
//! Firecracker's code for the signal. Everything here is async-signal-safe: atomics, `write`,
//! `tcsetattr`, `_exit`.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

use vmm_sys_util::signal::register_signal_handler;

use crate::metrics::METRICS;
use crate::vstate::vcpu::exit_code;

/// The eventfd that wakes the event loop on SIGTERM/SIGINT, and which signal arrived.
static STOP_FD: AtomicI32 = AtomicI32::new(-1);
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// The terminal settings to put back on exit, when stdin is a terminal we changed.
static SAVED_TERMIOS: OnceLock<libc::termios> = OnceLock::new();

extern "C" fn stop_handler(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STOP_SIGNAL.store(num, Ordering::SeqCst);
    let fd = STOP_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) on an eventfd with a pointer to a live u64; async-signal-safe.
        unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
    }
}

fn fatal_code(num: libc::c_int) -> i32 {
    match num {
        libc::SIGBUS => exit_code::SIGBUS,
        libc::SIGSEGV => exit_code::SIGSEGV,
        libc::SIGXFSZ => exit_code::SIGXFSZ,
        libc::SIGXCPU => exit_code::SIGXCPU,
        libc::SIGHUP => exit_code::SIGHUP,
        libc::SIGILL => exit_code::SIGILL,
        _ => exit_code::UNEXPECTED_ERROR,
    }
}

/// As Firecracker: count it and go on; the write that raised it fails with EPIPE.
extern "C" fn sigpipe_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    METRICS.signals.sigpipe.inc();
}

extern "C" fn fatal_handler(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let m = &METRICS.signals;
    match num {
        libc::SIGBUS => m.sigbus.inc(),
        libc::SIGSEGV => m.sigsegv.inc(),
        libc::SIGXFSZ => m.sigxfsz.inc(),
        libc::SIGXCPU => m.sigxcpu.inc(),
        libc::SIGHUP => m.sighup.inc(),
        libc::SIGILL => m.sigill.inc(),
        _ => {}
    }
    let thread = crate::seccomp::thread_name();
    crate::logger::emergency(
        thread,
        format_args!("Shutting down VM after intercepting signal {num} on thread {thread}"),
    );
    crate::metrics::try_flush();
    restore_terminal();
    // SAFETY: _exit is async-signal-safe and never returns.
    unsafe { libc::_exit(fatal_code(num)) };
}

/// Installs the handlers; `stop_fd` is the eventfd the event loop watches.
pub fn install(stop_fd: i32) -> std::io::Result<()> {
    STOP_FD.store(stop_fd, Ordering::SeqCst);
    let err = |e: vmm_sys_util::errno::Error| std::io::Error::from_raw_os_error(e.errno());
    register_signal_handler(libc::SIGTERM, stop_handler).map_err(err)?;
    register_signal_handler(libc::SIGINT, stop_handler).map_err(err)?;
    for s in [
        libc::SIGBUS,
        libc::SIGSEGV,
        libc::SIGXFSZ,
        libc::SIGXCPU,
        libc::SIGHUP,
        libc::SIGILL,
    ] {
        register_signal_handler(s, fatal_handler).map_err(err)?;
    }
    register_signal_handler(libc::SIGPIPE, sigpipe_handler).map_err(err)?;
    install_panic_hook();
    Ok(())
}

/// As on a fatal signal: a panic (which aborts) counts in the metrics, logs, flushes them and
/// restores the terminal. Only non-blocking paths: the panicking thread may hold the logger's
/// or the metrics' lock. Rust's default report follows only while no seccomp filter is on: with
/// RUST_BACKTRACE set it walks the stack with syscalls (getcwd, ...) the filters forbid, which
/// would turn the panic into a seccomp violation; the log line already has the message and
/// where it happened. abort() then raises SIGABRT, which every filter allows.
fn install_panic_hook() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        METRICS.vmm.panic_count.inc();
        let current = std::thread::current();
        crate::logger::emergency(
            crate::logger::thread_name(&current),
            format_args!("ember {info}"),
        );
        crate::metrics::try_flush();
        restore_terminal();
        if !crate::seccomp::filtered() {
            default_hook(info);
        }
    }));
}

/// The signal that asked for a stop, if any.
pub fn stop_signal() -> Option<i32> {
    match STOP_SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        n => Some(n),
    }
}

/// Puts stdin, when it is a terminal, in raw mode so the guest gets every key as typed.
/// `keep_signals` leaves Ctrl-C to the host (the `ember run` front-end); Firecracker's
/// behaviour is to pass it to the guest.
pub fn set_raw_terminal(keep_signals: bool) {
    // SAFETY: isatty/tcgetattr/tcsetattr on fd 0 with a termios on this stack.
    unsafe {
        if libc::isatty(0) != 1 {
            return;
        }
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(0, &mut t) != 0 {
            return;
        }
        let _ = SAVED_TERMIOS.set(t);
        t.c_lflag &= !(libc::ICANON | libc::ECHO);
        if !keep_signals {
            t.c_lflag &= !libc::ISIG;
        }
        t.c_cc[libc::VMIN] = 1;
        t.c_cc[libc::VTIME] = 0;
        libc::tcsetattr(0, libc::TCSANOW, &t);
    }
}

/// Restores the terminal if we changed it. Safe to call from any exit path and any thread,
/// handlers included: every thread's seccomp filter allows TCSETS (and the TCGETS glibc
/// follows it with).
pub fn restore_terminal() {
    if let Some(t) = SAVED_TERMIOS.get() {
        // SAFETY: tcsetattr with a termios we saved earlier; async-signal-safe.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The child half of the test below: panics with the hook installed.
    #[test]
    fn panic_child() {
        let Ok(path) = std::env::var("EMBER_TEST_PANIC_METRICS") else {
            return;
        };
        crate::metrics::init(&path).unwrap();
        install_panic_hook();
        panic!("on purpose");
    }

    #[test]
    fn a_panic_counts_logs_and_flushes_the_metrics() {
        let path = std::env::temp_dir().join(format!("ember-panic-{}", std::process::id()));
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "signal::tests::panic_child", "--nocapture"])
            .env("EMBER_TEST_PANIC_METRICS", &path)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains(":ERROR] ember panicked at"), "{stdout}");
        assert!(stdout.contains("on purpose"), "{stdout}");
        let m = std::fs::read_to_string(&path).unwrap_or_default();
        let _ = std::fs::remove_file(&path);
        let last = m.lines().last().unwrap_or("{}");
        let v: serde_json::Value = serde_json::from_str(last).unwrap();
        assert_eq!(v["vmm"]["panic_count"], 1, "{m}");
    }
}
