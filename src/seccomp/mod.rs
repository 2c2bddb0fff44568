//! Seccomp: each thread kind (`vmm`, `api`, `vcpu`) runs under its own allow-list, compiled
//! at build time from resources/seccomp/x86_64-unknown-linux-gnu.json and embedded in the
//! binary. A forbidden syscall raises SIGSYS: ember logs its number, counts it, flushes the
//! metrics and exits 148.

mod bpf_tree;

use std::fmt;
use std::sync::Arc;

use seccompiler::{sock_filter, BpfProgram};

use crate::metrics::METRICS;
use crate::vstate::vcpu::exit_code;

thread_local! {
    /// The filtered thread's name for the SIGSYS message; const-initialised, so reading it in
    /// a signal handler neither allocates nor registers anything.
    static THREAD: std::cell::Cell<&'static str> = const { std::cell::Cell::new("?") };
}

static BUILTIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp.bin"));

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    Vmm,
    Api,
    Vcpu,
}

impl ThreadKind {
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Api => "api",
            ThreadKind::Vcpu => "vcpu",
        }
    }
}

#[derive(Debug)]
pub enum SeccompError {
    Read(String, std::io::Error),
    Compile(String, String),
    MissingThread(String, &'static str),
    Corrupt,
    Apply(&'static str, String),
}

impl fmt::Display for SeccompError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            SeccompError::Read(p, e) => write!(f, "cannot read the seccomp filter {p:?}: {e}"),
            SeccompError::Compile(p, e) => write!(f, "invalid seccomp filter {p:?}: {e}"),
            SeccompError::MissingThread(p, t) => {
                write!(f, "the seccomp filter {p:?} has no {t:?} thread filter")
            }
            SeccompError::Corrupt => write!(f, "the built-in seccomp filters are corrupt"),
            SeccompError::Apply(t, e) => write!(f, "cannot install the {t} seccomp filter: {e}"),
        }
    }
}

impl std::error::Error for SeccompError {}

/// The filter of each thread kind; `None` everywhere with `--no-seccomp`.
#[derive(Clone, Default)]
pub struct Filters {
    vmm: Option<Arc<BpfProgram>>,
    api: Option<Arc<BpfProgram>>,
    vcpu: Option<Arc<BpfProgram>>,
}

impl Filters {
    /// No filtering (`--no-seccomp`).
    pub fn none() -> Filters {
        Filters::default()
    }

    /// The policy built into the binary.
    pub fn builtin() -> Result<Filters, SeccompError> {
        let mut rest = BUILTIN;
        let mut next = || -> Result<Arc<BpfProgram>, SeccompError> {
            let (n, tail) = rest.split_first_chunk::<4>().ok_or(SeccompError::Corrupt)?;
            let n = u32::from_le_bytes(*n) as usize;
            let bytes = tail.get(..n * 8).ok_or(SeccompError::Corrupt)?;
            rest = &tail[n * 8..];
            Ok(Arc::new(
                bytes
                    .chunks_exact(8)
                    .map(|c| sock_filter {
                        code: u16::from_le_bytes([c[0], c[1]]),
                        jt: c[2],
                        jf: c[3],
                        k: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
                    })
                    .collect(),
            ))
        };
        Ok(Filters {
            vmm: Some(next()?),
            api: Some(next()?),
            vcpu: Some(next()?),
        })
    }

    /// A policy in the same JSON format as the built-in one (`--seccomp-filter`).
    pub fn from_json_file(path: &str) -> Result<Filters, SeccompError> {
        let json = std::fs::read(path).map_err(|e| SeccompError::Read(path.to_string(), e))?;
        let mut map =
            bpf_tree::compile(&json).map_err(|e| SeccompError::Compile(path.to_string(), e))?;
        let mut take = |k: ThreadKind| {
            map.remove(k.name())
                .map(Arc::new)
                .ok_or_else(|| SeccompError::MissingThread(path.to_string(), k.name()))
        };
        Ok(Filters {
            vmm: Some(take(ThreadKind::Vmm)?),
            api: Some(take(ThreadKind::Api)?),
            vcpu: Some(take(ThreadKind::Vcpu)?),
        })
    }

    /// Installs the filter of `kind` on the calling thread.
    pub fn apply(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        let prog = match kind {
            ThreadKind::Vmm => &self.vmm,
            ThreadKind::Api => &self.api,
            ThreadKind::Vcpu => &self.vcpu,
        };
        // Leaked once per thread (a handful per VM) so the handler can name it without
        // allocating.
        let name: &'static str = Box::leak(
            crate::logger::thread_name(&std::thread::current())
                .to_string()
                .into_boxed_str(),
        );
        THREAD.with(|t| t.set(name));
        if let Some(p) = prog {
            seccompiler::apply_filter(p)
                .map_err(|e| SeccompError::Apply(kind.name(), e.to_string()))?;
            FILTERED.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        #[cfg(feature = "seccomp-test")]
        violate_on_request(kind);
        Ok(())
    }
}

/// Whether some thread of this process runs under a filter (the panic hook then leaves out
/// Rust's default report, whose backtrace needs syscalls no filter allows).
pub fn filtered() -> bool {
    FILTERED.load(std::sync::atomic::Ordering::Relaxed)
}

static FILTERED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The calling thread's name as recorded when its filter went on ("?" before that). Safe in a
/// signal handler: it neither allocates nor locks.
pub fn thread_name() -> &'static str {
    THREAD.with(|t| t.get())
}

extern "C" fn sigsys_handler(num: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    if num != libc::SIGSYS || info.is_null() {
        return;
    }
    // SAFETY: for SIGSYS the kernel fills `si_syscall` (an int) right after the 8-byte
    // `si_call_addr` in the union that starts at offset 16 of siginfo_t.
    let syscall = unsafe { *((info as *const u8).add(24) as *const libc::c_int) };
    METRICS.seccomp.num_faults.inc();
    let thread = thread_name();
    crate::logger::emergency(
        thread,
        format_args!(
            "Shutting down VM after intercepting a bad syscall ({syscall}) on thread {thread}"
        ),
    );
    crate::metrics::try_flush();
    crate::signal::restore_terminal();
    // SAFETY: _exit is async-signal-safe and does not return.
    unsafe { libc::_exit(exit_code::BAD_SYSCALL) };
}

/// Installs the SIGSYS handler that turns a violation into exit code 148.
pub fn install_sigsys_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, sigsys_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Test-only: `EMBER_TEST_SECCOMP=<vmm|api|vcpu|vcpu-create-vm>` makes that thread kind issue a
/// syscall its filter forbids, right after installing it; `<kind>-exec` makes it turn memory
/// executable (mprotect) and `<kind>-exec-map` map executable memory (mmap); `vmm-clone` makes
/// the vmm thread clone with flags its filter does not name, `vmm-signal` send a signal other
/// than the vCPU kick or SIGABRT, `vcpu-uring` a vCPU thread set up an io_uring, `<kind>-panic`
/// panic.
#[cfg(feature = "seccomp-test")]
fn violate_on_request(kind: ThreadKind) {
    let Ok(want) = std::env::var("EMBER_TEST_SECCOMP") else {
        return;
    };
    if want == kind.name() {
        // SAFETY: getcwd into a stack buffer; it is forbidden for every thread kind.
        unsafe {
            let mut buf = [0u8; 64];
            libc::syscall(libc::SYS_getcwd, buf.as_mut_ptr(), buf.len());
        }
    } else if want == format!("{}-exec", kind.name()) {
        // SAFETY: maps a fresh anonymous page, then asks to make it executable, which the
        // filter must refuse; nothing else uses the page.
        unsafe {
            let page = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            libc::mprotect(page, 4096, libc::PROT_READ | libc::PROT_EXEC);
        }
    } else if want == format!("{}-exec-map", kind.name()) {
        // SAFETY: an anonymous mapping nothing uses, which the filter must refuse.
        unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
    } else if want == "vmm-clone" && kind == ThreadKind::Vmm {
        // SAFETY: CLONE_SIGHAND without CLONE_VM is invalid, so were the filter to let it
        // through, the kernel would refuse it (EINVAL) rather than start anything.
        unsafe { libc::syscall(libc::SYS_clone, libc::CLONE_SIGHAND, 0, 0, 0, 0) };
    } else if want == format!("{}-panic", kind.name()) {
        panic!("EMBER_TEST_SECCOMP asked this thread to panic");
    } else if want == "vmm-signal" && kind == ThreadKind::Vmm {
        // SAFETY: SIGWINCH to this very thread, ignored by default: were the filter to let it
        // through, nothing would happen.
        unsafe {
            libc::syscall(
                libc::SYS_tgkill,
                libc::getpid(),
                libc::gettid(),
                libc::SIGWINCH,
            )
        };
    } else if want == "vcpu-uring" && kind == ThreadKind::Vcpu {
        // SAFETY: a NULL parameter block: were the filter to let it through, the kernel would
        // answer EFAULT and make no ring.
        unsafe { libc::syscall(libc::SYS_io_uring_setup, 1, std::ptr::null_mut::<u8>()) };
    } else if want == "vcpu-create-vm" && kind == ThreadKind::Vcpu {
        // SAFETY: an ioctl on an invalid fd; the filter must stop it before the kernel sees it.
        unsafe { libc::ioctl(-1, 0xAE01 as _, 0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_filters_parse() {
        let f = Filters::builtin().unwrap();
        for p in [&f.vmm, &f.api, &f.vcpu] {
            assert!(p.as_ref().unwrap().len() > 10);
        }
    }

    #[test]
    fn policy_file_round_trip_and_errors() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/resources/seccomp/x86_64-unknown-linux-gnu.json"
        );
        let f = Filters::from_json_file(path).unwrap();
        // The file compiled at run time gives exactly the programs built into the binary.
        let b = Filters::builtin().unwrap();
        let words = |p: &Option<Arc<BpfProgram>>| -> Vec<(u16, u8, u8, u32)> {
            p.as_ref()
                .unwrap()
                .iter()
                .map(|i| (i.code, i.jt, i.jf, i.k))
                .collect()
        };
        for (x, y) in [(&f.vmm, &b.vmm), (&f.api, &b.api), (&f.vcpu, &b.vcpu)] {
            assert_eq!(words(x), words(y));
        }
        assert!(Filters::from_json_file("/nonexistent.json").is_err());
        let dir = std::env::temp_dir().join(format!("ember-seccomp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("partial.json");
        std::fs::write(
            &p,
            r#"{"vmm":{"mismatch_action":"trap","match_action":"allow","filter":[]}}"#,
        )
        .unwrap();
        let e = Filters::from_json_file(p.to_str().unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("api"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
