//! Shared helpers for integration tests: they run the real `ember` binary on real KVM.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const EMBER: &str = env!("CARGO_BIN_EXE_ember");
pub const GUEST: &str = concat!(env!("OUT_DIR"), "/ember-guest");

/// Tests that need root (`what` says for what) fail loudly without it, unless
/// EMBER_SKIP_ROOT_TESTS=1 says to skip (and then they still say so).
pub fn require_root(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("EMBER_SKIP_ROOT_TESTS").as_deref() == Ok("1") {
        eprintln!("!!! not root: SKIPPING this test because EMBER_SKIP_ROOT_TESTS=1");
        return false;
    }
    panic!("this test needs root for {what} (set EMBER_SKIP_ROOT_TESTS=1 to skip)");
}

/// Tests need /dev/kvm. Without it they fail loudly, unless EMBER_SKIP_KVM_TESTS=1 says to
/// skip (and then they still say so).
/// Makes a named pipe at `path` (mode 0600).
pub fn mkfifo(path: &Path) {
    let c =
        std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str())).unwrap();
    // SAFETY: mkfifo(3) with a valid NUL-terminated path.
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o600) },
        0,
        "mkfifo {path:?}"
    );
}

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

/// Waits for `child` to exit. Past `guard` (a hang guard, not a performance assertion) it
/// kills the child and fails the test with `context()`, what the child printed say.
pub fn status_within(
    child: &mut Child,
    guard: Duration,
    context: impl FnOnce() -> String,
) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if start.elapsed() > guard {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ember hung for more than {guard:?}; killed. {}", context());
        }
        std::thread::sleep(Duration::from_millis(5));
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
    let mut t_out = Some(t_out);
    let mut stdout =
        || String::from_utf8_lossy(&t_out.take().unwrap().join().unwrap()).into_owned();
    let status = status_within(&mut child, guard, || format!("stdout:\n{}", stdout()));
    Outcome {
        status,
        stdout: stdout(),
        stderr: String::from_utf8_lossy(&t_err.join().unwrap()).into_owned(),
    }
}

pub fn spawn(args: &[&str]) -> Child {
    spawn_in(Path::new("."), args)
}

/// `spawn` with `cwd` as the working directory, where relative paths a request names land.
pub fn spawn_in(cwd: &Path, args: &[&str]) -> Child {
    spawn_with_stdout(cwd, args, Stdio::piped())
}

fn spawn_with_stdout(cwd: &Path, args: &[&str], stdout: Stdio) -> Child {
    Command::new(EMBER)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(stdout)
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

/// A running `ember` serving its API on a socket in its own temp dir; killed when dropped.
pub struct ApiVm {
    pub dir: TempDir,
    pub sock: PathBuf,
    pub child: Option<Child>,
    pub lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl ApiVm {
    pub fn start(extra: &[&str]) -> ApiVm {
        ApiVm::start_with_stdout(extra, Stdio::piped())
    }

    /// `start` with ember's stdout given; `output` sees it only when it is `Stdio::piped()`.
    pub fn start_with_stdout(extra: &[&str], stdout: Stdio) -> ApiVm {
        let dir = TempDir::new("api");
        let sock = dir.path("api.sock");
        let mut args = vec!["--api-sock", sock.to_str().unwrap()];
        args.extend_from_slice(extra);
        // In its own directory: a relative path in a request (the API tests send some on
        // purpose) must not leave files in the source tree.
        let mut child = spawn_with_stdout(&dir.0, &args, stdout);
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        if let Some(out) = child.stdout.take() {
            let sink = lines.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for l in std::io::BufReader::new(out).lines() {
                    let Ok(l) = l else { break };
                    sink.lock().unwrap().push(l);
                }
            });
        }
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            if let Ok(Some(s)) = child.try_wait() {
                panic!("ember exited before serving its API: {s}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "API socket never came up"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        ApiVm {
            dir,
            sock,
            child: Some(child),
            lines,
        }
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.sock)
    }

    pub fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits (hang guard only) until a console or log line contains `needle`.
    pub fn wait_for(&self, needle: &str) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return l.clone();
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{needle:?} never appeared:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The highest `tick N` the ticks scenario printed so far.
    pub fn last_tick(&self) -> u64 {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.strip_prefix("tick ")?.trim().parse().ok())
            .max()
            .unwrap_or(0)
    }

    /// Waits for the process to end by itself.
    pub fn wait_exit(&mut self) -> i32 {
        let mut c = self.child.take().unwrap();
        let start = Instant::now();
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "ember did not exit"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Sends SIGTERM and returns the exit code.
    pub fn terminate(&mut self) -> i32 {
        let pid = self.child.as_ref().unwrap().id() as i32;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        self.wait_exit()
    }
}

impl Drop for ApiVm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A keep-alive HTTP/1.1 client on the API socket.
pub struct Client {
    pub stream: std::os::unix::net::UnixStream,
}

pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
    pub fn fault(&self) -> String {
        self.json()["fault_message"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

impl Client {
    pub fn connect(path: &Path) -> Client {
        let stream = std::os::unix::net::UnixStream::connect(path).expect("connect to the API");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Client { stream }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.stream.write_all(bytes).unwrap();
    }

    pub fn request(&mut self, method: &str, path: &str, body: Option<&str>) -> Response {
        let req = match body {
            Some(b) => format!(
                "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            ),
            None => format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        };
        self.send_raw(req.as_bytes());
        self.read_response().expect("no response")
    }

    /// Reads one response; None when the server closed the connection.
    pub fn read_response(&mut self) -> Option<Response> {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match self.stream.read(&mut b) {
                Ok(1) => head.push(b[0]),
                _ => return None,
            }
        }
        let head = String::from_utf8_lossy(&head).to_string();
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        let len = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body).ok()?;
        Some(Response {
            status,
            body: String::from_utf8_lossy(&body).to_string(),
        })
    }

    pub fn get(&mut self, path: &str) -> Response {
        self.request("GET", path, None)
    }
    pub fn put(&mut self, path: &str, body: &str) -> Response {
        self.request("PUT", path, Some(body))
    }
    pub fn patch(&mut self, path: &str, body: &str) -> Response {
        self.request("PATCH", path, Some(body))
    }
}

/// Configures the test guest through the API and starts it.
pub fn api_boot(c: &mut Client, boot_args: &str, vcpus: u8) {
    let r = c.put(
        "/boot-source",
        &format!(r#"{{"kernel_image_path":"{GUEST}","boot_args":"{boot_args}"}}"#),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let r = c.put(
        "/machine-config",
        &format!(r#"{{"vcpu_count":{vcpus},"mem_size_mib":128}}"#),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let r = c.put("/actions", r#"{"action_type":"InstanceStart"}"#);
    assert_eq!(r.status, 204, "{}", r.body);
}

impl Client {
    pub fn connect_opt(path: &Path) -> Option<Client> {
        std::os::unix::net::UnixStream::connect(path)
            .ok()
            .map(|stream| Client { stream })
    }
}
