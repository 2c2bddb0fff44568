//! Logger, metrics, signals and exit paths of the real `ember` binary.

mod common;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A pseudo-terminal pair: ember's stdin is the slave, as when run from a shell.
struct Pty {
    _master: File,
    slave: File,
}

impl Pty {
    fn open() -> Pty {
        let (mut m, mut s) = (0, 0);
        // SAFETY: openpty fills the two descriptors, which the Files below then own alone.
        let r = unsafe {
            libc::openpty(
                &mut m,
                &mut s,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: fresh descriptors from openpty, owned by nothing else.
        unsafe {
            Pty {
                _master: File::from_raw_fd(m),
                slave: File::from_raw_fd(s),
            }
        }
    }

    fn lflag(&self) -> libc::tcflag_t {
        // SAFETY: all-zero bytes are a valid termios for tcgetattr to fill.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes only into `t`.
        assert_eq!(
            unsafe { libc::tcgetattr(self.slave.as_raw_fd(), &mut t) },
            0
        );
        t.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG)
    }
}

/// The id of the thread of `pid` named `name`, waiting for it to appear.
fn thread_id(pid: u32, name: &str) -> i32 {
    let start = Instant::now();
    loop {
        for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let t = t.unwrap();
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim() == name {
                return t.file_name().to_str().unwrap().parse().unwrap();
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no thread {name}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The sum of `group.key` over the metrics lines in `path`.
fn metric_sum(path: &std::path::Path, group: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v[group][key].as_u64())
        .sum()
}

/// Boots the ticks guest from a config file with a terminal as stdin.
fn boot_on_a_terminal(dir: &TempDir, pty: &Pty, env: &[(&str, &str)]) -> Child {
    let cfg = dir.write(
        "vm.json",
        serde_json::to_vec(&guest_config("ticks", 1, 128)).unwrap(),
    );
    let metrics = dir.path("metrics.json");
    Command::new(EMBER)
        .args(["--no-api", "--config-file", cfg.to_str().unwrap()])
        .args(["--metrics-path", metrics.to_str().unwrap()])
        .envs(env.iter().copied())
        .stdin(pty.slave.try_clone().unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A vCPU thread's filter forbids the ioctl that restores the terminal: issued from its
/// signal handler, it got the whole process killed by SIGSYS, with the terminal left raw.
#[test]
fn a_fatal_signal_on_a_vcpu_thread_exits_with_its_code_and_restores_the_terminal() {
    if !require_kvm() {
        return;
    }
    let pty = Pty::open();
    let before = pty.lflag();
    let dir = TempDir::new("obs-sigbus");
    let child = boot_on_a_terminal(&dir, &pty, &[]);
    let pid = child.id();
    let vcpu = thread_id(pid, "ember_vcpu0");
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: tgkill(2) to a thread of our own child.
    unsafe { libc::syscall(libc::SYS_tgkill, pid as i32, vcpu, libc::SIGBUS) };
    let out = wait_with_guard(child, Duration::from_secs(30));
    out.expect_code(149);
    assert!(
        out.stdout
            .contains("intercepting signal 7 on thread ember_vcpu0"),
        "{}",
        out.stdout
    );
    assert_eq!(pty.lflag(), before, "the terminal is left raw");
    assert_eq!(
        metric_sum(&dir.path("metrics.json"), "signals", "sigbus"),
        1
    );
}

#[test]
#[cfg_attr(
    not(feature = "seccomp-test"),
    ignore = "needs --features seccomp-test"
)]
fn a_seccomp_violation_on_a_vcpu_thread_exits_148_and_restores_the_terminal() {
    if !require_kvm() {
        return;
    }
    let pty = Pty::open();
    let before = pty.lflag();
    let dir = TempDir::new("obs-sigsys");
    let child = boot_on_a_terminal(&dir, &pty, &[("EMBER_TEST_SECCOMP", "vcpu")]);
    let out = wait_with_guard(child, Duration::from_secs(30));
    out.expect_code(148).expect("bad syscall");
    assert_eq!(pty.lflag(), before, "the terminal is left raw");
}

/// A stdout whose reader went away: as Firecracker, SIGPIPE is counted and survived.
#[test]
fn sigpipe_is_counted_and_survived() {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("obs-sigpipe");
    let sock = dir.path("api.sock");
    let metrics = dir.path("metrics.json");
    let mut child = Command::new(EMBER)
        .args(["--api-sock", sock.to_str().unwrap()])
        .args(["--metrics-path", metrics.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let start = Instant::now();
    let mut c = loop {
        if let Some(c) = Client::connect_opt(&sock) {
            break c;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no API socket");
        std::thread::sleep(Duration::from_millis(2));
    };
    // The guest's console and ember's log now write to a pipe with no reader.
    api_boot(&mut c, "ticks", 1);
    std::thread::sleep(Duration::from_millis(300));
    let r = c.put("/actions", r#"{"action_type":"FlushMetrics"}"#);
    assert_eq!(r.status, 204, "{}", r.body);
    assert!(metric_sum(&metrics, "signals", "sigpipe") >= 1);
    assert!(matches!(child.try_wait(), Ok(None)), "ember died");
    let _ = child.kill();
    let _ = child.wait();
}

/// A fatal signal on a vCPU thread that holds the console (SIGXFSZ from the guest's own output
/// reaching the file-size limit): the owner restores the terminal before it touches the
/// console, or it waits for the console lock the dying thread holds and the terminal stays raw.
#[test]
fn a_fatal_signal_while_a_vcpu_holds_the_console_still_restores_the_terminal() {
    use std::os::unix::process::CommandExt;
    if !require_kvm() {
        return;
    }
    let pty = Pty::open();
    let before = pty.lflag();
    let dir = TempDir::new("obs-sigxfsz");
    let cfg = dir.write(
        "vm.json",
        serde_json::to_vec(&guest_config("hello", 1, 128)).unwrap(),
    );
    let console = File::create(dir.path("console.txt")).unwrap();
    let mut cmd = Command::new(EMBER);
    cmd.args(["--no-api", "--config-file", cfg.to_str().unwrap()])
        .args(["--log-path", "/dev/null"])
        .stdin(pty.slave.try_clone().unwrap())
        .stdout(console)
        .stderr(Stdio::null());
    // SAFETY: setrlimit is async-signal-safe; it limits only the child's file sizes, so the
    // guest's console (its only regular file) overflows on its second line, which the vCPU
    // thread writes.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 40,
                rlim_max: 40,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let mut child = cmd.spawn().unwrap();
    let status = status_within(&mut child, Duration::from_secs(30), String::new);
    assert_eq!(status.code(), Some(151), "{status:?}");
    assert_eq!(pty.lflag(), before, "the terminal is left raw");
}
