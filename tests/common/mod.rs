//! Shared helpers for integration tests: they run the real `ember` binary on real KVM.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const EMBER: &str = env!("CARGO_BIN_EXE_ember");
pub const GUEST: &str = concat!(env!("OUT_DIR"), "/ember-guest");

/// Tests need /dev/kvm. Without it they fail loudly, unless EMBER_SKIP_KVM_TESTS=1 says to
/// skip (and then they still say so).
pub fn require_kvm() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("EMBER_SKIP_KVM_TESTS").as_deref() == Ok("1") {
        eprintln!("!!! /dev/kvm is missing: SKIPPING this test because EMBER_SKIP_KVM_TESTS=1");
        return false;
    }
    panic!(
        "/dev/kvm is missing: these tests boot real guests (set EMBER_SKIP_KVM_TESTS=1 to skip)"
    );
}

/// A directory for one test's files, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "ember-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn write(&self, name: &str, data: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, data).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
    /// Panics with the whole output when `needle` is missing.
    pub fn expect(&self, needle: &str) -> &Self {
        assert!(
            self.all().contains(needle),
            "expected {needle:?} in the output (exit {:?}):\n--- stdout\n{}\n--- stderr\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code(),
            code,
            "unexpected exit status:\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Waits for `child` with a generous hang guard (not a performance assertion).
pub fn wait_with_guard(mut child: Child, guard: Duration) -> Outcome {
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > guard {
            let _ = child.kill();
            let _ = child.wait();
            let so = String::from_utf8_lossy(&t_out.join().unwrap()).into_owned();
            panic!("ember hung for more than {guard:?}; killed. stdout:\n{so}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Outcome {
        status,
        stdout: String::from_utf8_lossy(&t_out.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&t_err.join().unwrap()).into_owned(),
    }
}

pub fn spawn(args: &[&str]) -> Child {
    Command::new(EMBER)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start ember")
}

pub fn run(args: &[&str]) -> Outcome {
    wait_with_guard(spawn(args), Duration::from_secs(60))
}

/// A config file for the test guest.
pub fn guest_config(boot_args: &str, vcpus: u8, mem_mib: usize) -> serde_json::Value {
    serde_json::json!({
        "boot-source": {"kernel_image_path": GUEST, "boot_args": boot_args},
        "drives": [],
        "machine-config": {"vcpu_count": vcpus, "mem_size_mib": mem_mib}
    })
}

/// Boots with `--no-api --config-file --boot-timer` and waits for ember to exit.
pub fn boot(cfg: &serde_json::Value) -> Outcome {
    let dir = TempDir::new("cfg");
    let path = dir.write("vm.json", serde_json::to_vec(cfg).unwrap());
    run(&[
        "--no-api",
        "--boot-timer",
        "--config-file",
        path.to_str().unwrap(),
    ])
}

/// The FNV-1a 64 hash the test guest reports for an initrd.
pub fn fnv1a64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}
