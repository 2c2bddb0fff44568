//! `ember-jailer` end to end: it jails the real `ember` binary, which boots the test guest, and
//! every property of the jail is checked from the host while the VMM is alive.
//!
//! Keeping the VMM alive at a known point: its configuration file `/vm.json` is a named pipe.
//! Opening a FIFO for reading blocks until a writer comes, so the VMM (already exec'd, as uid
//! 10000, in the jail, its log file open) waits there while the test inspects `/proc/<pid>`;
//! then the test writes the configuration into the FIFO and the guest boots to its greeting.
//!
//! The jailer binary belongs to another package of the workspace, so `CARGO_BIN_EXE_` cannot name
//! it: it is built once per run with `cargo build -p ember-jailer` next to `ember` (or taken
//! from `EMBER_JAILER`).
//!
//! Everything but the input-validation tests needs root; without it they fail unless
//! `EMBER_SKIP_ROOT_TESTS=1`.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::Outcome;

const EMBER: &str = env!("CARGO_BIN_EXE_ember");
const GUEST: &str = concat!(env!("OUT_DIR"), "/ember-guest");
const GREETING: &str = "Hello from the ember guest!";
const UID: u32 = 10000;
const GID: u32 = 10000;
/// Generous hang guard, never a performance assertion.
const GUARD: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The jailer tests need root (chroot, cgroups, namespaces, uid changes) and boot a guest.
fn require_root() -> bool {
    if !common::require_root("chroot, cgroups, namespaces and uid changes") {
        return false;
    }
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: the jailer tests boot a real guest"
    );
    true
}

/// The ember-jailer binary, built once per test run next to `ember`.
fn jailer() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("EMBER_JAILER") {
            return PathBuf::from(p);
        }
        let ember = Path::new(EMBER);
        let dir = ember.parent().expect("ember has a directory");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
        // <target dir>[/<triple>]/<profile>/ember: build into the same target directory.
        let above = dir.parent().expect("a profile directory has a parent");
        let target_dir = match above.file_name().and_then(|n| n.to_str()) {
            Some(n) if n.contains("-linux-") => above.parent().unwrap_or(above),
            _ => above,
        };
        let mut cmd = Command::new(cargo);
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["build", "--quiet", "-p", "ember-jailer", "--target-dir"])
            .arg(target_dir);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let st = cmd
            .status()
            .expect("cannot run cargo to build ember-jailer");
        assert!(st.success(), "cargo build -p ember-jailer failed: {st}");
        let bin = dir.join("ember-jailer");
        assert!(bin.is_file(), "{bin:?} missing after the build");
        bin
    })
}

fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "jt-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

fn dev_ino(p: &Path) -> (u64, u64) {
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("stat {p:?}: {e}"));
    (m.dev(), m.ino())
}

fn mkfifo_owned(p: &Path, uid: u32, gid: u32) {
    common::mkfifo(p);
    std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
}

/// One jail: a unique id and its own base directory; removes both, and kills whatever still
/// runs in the jail, when dropped.
struct Jail {
    id: String,
    base: PathBuf,
    /// Leaf cgroups (then their parents) to remove once the VMM is gone.
    cgroups: Vec<PathBuf>,
}

impl Jail {
    fn new(tag: &str) -> Jail {
        let id = unique(tag);
        let base = std::env::temp_dir().join(format!("ember-jailer-test-{id}"));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        Jail {
            id,
            base,
            cgroups: Vec::new(),
        }
    }

    fn root(&self) -> PathBuf {
        self.base.join("ember").join(&self.id).join("root")
    }

    /// Pre-populates the root as a Firecracker user does: kernel, log file, and the
    /// configuration as a FIFO that [`Jail::release`] fills.
    fn populate(&self) {
        let root = self.root();
        std::fs::create_dir_all(&root).unwrap();
        std::fs::copy(GUEST, root.join("kernel")).unwrap();
        let log = root.join("log");
        std::fs::write(&log, "").unwrap();
        std::os::unix::fs::chown(&log, Some(UID), Some(GID)).unwrap();
        mkfifo_owned(&root.join("vm.json"), UID, GID);
    }

    /// `ember-jailer --id .. --exec-file ember --uid --gid --chroot-base-dir ..` + `extra`.
    fn command(&self, extra: &[&str]) -> Command {
        let mut cmd = Command::new(jailer());
        cmd.args(["--id", &self.id, "--exec-file", EMBER])
            .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
            .arg("--chroot-base-dir")
            .arg(&self.base)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Starts the jailer with the VMM booting the guest from `/vm.json`, paused on that FIFO.
    fn spawn_paused(&self, jailer_args: &[&str]) -> Child {
        let mut args = jailer_args.to_vec();
        args.extend([
            "--",
            "--no-api",
            "--boot-timer",
            "--config-file",
            "/vm.json",
            "--log-path",
            "/log",
        ]);
        self.command(&args)
            .spawn()
            .expect("cannot start ember-jailer")
    }

    /// Lets the paused VMM go on: writes its configuration into the FIFO from a thread.
    fn release(&self) -> Released {
        let fifo = self.root().join("vm.json");
        let writer = std::thread::spawn(move || {
            // Non-blocking: a VMM that died before opening the FIFO fails the test (ENXIO
            // until GUARD) instead of leaving this thread blocked in open(2) for good.
            let start = Instant::now();
            let mut f = loop {
                match std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&fifo)
                {
                    Ok(f) => break f,
                    Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                        assert!(start.elapsed() < GUARD, "the VMM never opened {fifo:?}");
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("{fifo:?}: {e}"),
                }
            };
            // Well under a pipe's 4 KiB: written whole at once.
            f.write_all(
                br#"{"boot-source": {"kernel_image_path": "/kernel", "boot_args": "hello"},
                    "drives": [],
                    "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}}"#,
            )
            .unwrap();
        });
        Released {
            writer,
            log: self.root().join("log"),
        }
    }

    /// Remembers `<mount>/<parent>/<id>` for removal.
    fn cgroup(&mut self, mount: &str, parent: &str) -> PathBuf {
        let leaf = Path::new(mount).join(parent).join(&self.id);
        self.cgroups.push(leaf.clone());
        leaf
    }

    /// Processes whose root is this jail (the VMM, or the jailer after its pivot).
    fn processes(&self) -> Vec<u32> {
        let Ok(root) = std::fs::metadata(self.root()) else {
            return Vec::new();
        };
        let want = (root.dev(), root.ino());
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Ok(m) = std::fs::metadata(format!("/proc/{pid}/root")) {
                if (m.dev(), m.ino()) == want && !is_zombie(pid) {
                    out.push(pid);
                }
            }
        }
        out
    }

    /// Waits for the VMM: a process in the jail, exec'd (comm "ember") and running as UID.
    fn find_vmm(&self) -> u32 {
        let start = Instant::now();
        loop {
            for pid in self.processes() {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim() == "ember" && status(pid, "Uid").first() == Some(&UID.to_string()) {
                    return pid;
                }
            }
            assert!(
                start.elapsed() < GUARD,
                "no VMM appeared in the jail {:?}",
                self.root()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_until_empty(&self) {
        let start = Instant::now();
        while !self.processes().is_empty() {
            assert!(start.elapsed() < GUARD, "the VMM did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A VMM let go by [`Jail::release`].
struct Released {
    writer: std::thread::JoinHandle<()>,
    log: PathBuf,
}

impl Released {
    /// The VMM's log, once it has exited.
    fn join(self) -> std::io::Result<String> {
        self.writer.join().expect("writing the configuration FIFO");
        std::fs::read_to_string(self.log)
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        for pid in self.processes() {
            // SAFETY: plain kill(2) of a process this test started (its root is our jail).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let start = Instant::now();
        while !self.processes().is_empty() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        for leaf in &self.cgroups {
            // The cgroup is busy until the killed process is fully gone: retry for a while.
            let start = Instant::now();
            while leaf.exists() && start.elapsed() < Duration::from_secs(10) {
                if std::fs::remove_dir(leaf).is_err() {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            if let Some(parent) = leaf.parent() {
                let _ = std::fs::remove_dir(parent); // fails while other jails use it: fine
            }
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// A network namespace created with `ip netns add`, deleted when dropped.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = unique(tag);
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("cannot run ip");
        assert!(st.success(), "ip netns add {name} failed");
        Netns(name)
    }
    fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn is_zombie(pid: u32) -> bool {
    status(pid, "State").first().is_some_and(|s| s == "Z")
}

/// The fields of a `/proc/<pid>/status` line.
fn status(pid: u32, key: &str) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Field `n` (1-based, as in proc(5)) of `/proc/<pid>/stat`.
fn stat_field(pid: u32, n: usize) -> i64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the ")" that closes comm come fields 3.. .
    let rest = &text[text.rfind(')').unwrap() + 2..];
    rest.split_whitespace().nth(n - 3).unwrap().parse().unwrap()
}

fn ns_inode(pid: &str, ns: &str) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/ns/{ns}"))
        .unwrap()
        .ino()
}

/// Waits for `child` (with a hang guard), collecting its output.
fn wait(child: Child) -> Outcome {
    common::wait_with_guard(child, GUARD)
}

/// What `dir` holds, recursively, as relative paths.
fn tree(dir: &Path) -> BTreeSet<PathBuf> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                out.insert(p.strip_prefix(base).unwrap().to_path_buf());
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    walk(base, &p, out);
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

fn read_trim(p: impl AsRef<Path>) -> String {
    let p = p.as_ref();
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("read {p:?}: {e}"))
        .trim()
        .to_string()
}

/// The checks every jailed VMM must pass, whatever the options.
fn check_jailed_vmm(jail: &Jail, pid: u32) {
    let root = jail.root();
    // Credentials: real, effective, saved and fs ids; no supplementary groups.
    assert_eq!(status(pid, "Uid"), vec![UID.to_string(); 4]);
    assert_eq!(status(pid, "Gid"), vec![GID.to_string(); 4]);
    assert!(
        status(pid, "Groups").is_empty(),
        "{:?}",
        status(pid, "Groups")
    );
    // Its root is the jail; its mount namespace is its own.
    assert_eq!(
        dev_ino(Path::new(&format!("/proc/{pid}/root"))),
        dev_ino(&root),
        "the VMM's / is not the jail root"
    );
    assert_ne!(ns_inode(&pid.to_string(), "mnt"), ns_inode("self", "mnt"));
    // The jail does not see the host: nothing of the host's tree is below its /.
    assert!(!Path::new(&format!("/proc/{pid}/root/proc/self")).exists());
    assert!(!Path::new(&format!("/proc/{pid}/root/old_root")).exists());
    // Empty environment; the jailer's arguments first.
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        environ.is_empty(),
        "environment: {}",
        String::from_utf8_lossy(&environ)
    );
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let argv: Vec<String> = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert_eq!(argv[0], "/ember");
    assert_eq!(argv[1..3], ["--id".to_string(), jail.id.clone()]);
    assert_eq!(argv[3], "--start-time-us");
    assert!(argv[4].parse::<u64>().is_ok(), "{argv:?}");
    assert_eq!(argv[5], "--start-time-cpu-us");
    assert!(argv[6].parse::<u64>().is_ok(), "{argv:?}");
    assert!(argv.ends_with(&[
        "--no-api".to_string(),
        "--boot-timer".into(),
        "--config-file".into(),
        "/vm.json".into(),
        "--log-path".into(),
        "/log".into(),
    ]));
    // Only stdio (and what ember itself opened) is open: nothing leaked from the test.
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        assert!(
            !target.to_string_lossy().contains("ember-jailer-test")
                && !target.to_string_lossy().contains("/proc/"),
            "fd {:?} -> {target:?} leaked into the VMM",
            fd.file_name()
        );
    }

    // The jail's files.
    let exec = root.join("ember");
    let m = std::fs::metadata(&exec).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (UID, GID, 0o755));
    assert_eq!(m.nlink(), 1, "the exec file must be a copy, not a link");
    assert_ne!(dev_ino(&exec), dev_ino(Path::new(EMBER)));
    assert_eq!(m.len(), std::fs::metadata(EMBER).unwrap().len());
    let run = std::fs::metadata(root.join("run")).unwrap();
    assert!(run.is_dir());
    assert_eq!((run.uid(), run.gid()), (UID, GID));
    let mut devices = vec![
        ("dev/kvm", 10, 232),
        ("dev/net/tun", 10, 200),
        ("dev/urandom", 1, 9),
    ];
    if let Ok(m) = std::fs::metadata("/dev/userfaultfd") {
        let (ma, mi) = (libc::major(m.rdev()), libc::minor(m.rdev()));
        devices.push(("dev/userfaultfd", ma, mi));
    }
    for (path, major, minor) in devices {
        let m = std::fs::metadata(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(m.file_type().is_char_device(), "{path}");
        let (ma, mi) = (libc::major(m.rdev()), libc::minor(m.rdev()));
        assert_eq!((ma, mi), (major, minor), "{path}");
        assert_eq!((m.uid(), m.gid()), (UID, GID), "{path}");
    }
}

/// The cgroup of `pid` in the hierarchy whose /proc/<pid>/cgroup line has `controllers`.
fn cgroup_of(pid: u32, controllers: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    text.lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, c, path) = (f.next()?, f.next()?, f.next()?);
            (c == controllers).then(|| path.to_string())
        })
        .unwrap_or_else(|| panic!("no {controllers:?} line in:\n{text}"))
}

fn limit(pid: u32, name: &str) -> (String, String) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"));
    let f: Vec<&str> = line[name.len()..].split_whitespace().collect();
    (f[0].to_string(), f[1].to_string())
}

// ---------------------------------------------------------------------------------------------
// A jailed VMM, from the host
// ---------------------------------------------------------------------------------------------

#[test]
fn jailed_vmm_boots_as_uid_in_the_jail_with_v1_cgroups() {
    if !require_root() {
        return;
    }
    let mut jail = Jail::new("v1");
    jail.populate();
    // The default parent cgroup is the exec file's name.
    let cpu = jail.cgroup("/sys/fs/cgroup/cpu", "ember");
    let cpuset = jail.cgroup("/sys/fs/cgroup/cpuset", "ember");
    // A descriptor the caller leaks into the jailer (fd 9, no CLOEXEC) must not reach the VMM.
    let marker = std::fs::File::create(jail.base.join("leaked-fd-marker")).unwrap();
    let marker_fd = std::os::fd::AsRawFd::as_raw_fd(&marker);
    let mut cmd = jail.command(&[
        "--cgroup",
        "cpu.shares=512",
        "--cgroup",
        "cpuset.cpus=0",
        "--",
        "--no-api",
        "--boot-timer",
        "--config-file",
        "/vm.json",
        "--log-path",
        "/log",
    ]);
    // SAFETY: dup2 is async-signal-safe; the hook touches nothing else.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            if libc::dup2(marker_fd, 9) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("cannot start ember-jailer");
    drop(marker);
    let pid = jail.find_vmm();
    assert_eq!(pid, child.id(), "without forks the jailer becomes the VMM");
    check_jailed_vmm(&jail, pid);
    assert!(
        std::fs::read_link(format!("/proc/{pid}/fd/9"))
            .map_or(true, |t| !t.ends_with("leaked-fd-marker")),
        "fd 9 leaked into the VMM"
    );

    // cgroups v1: created under <mount>/ember/<id>, values written, VMM inside.
    let rel = format!("/ember/{}", jail.id);
    assert_eq!(cgroup_of(pid, "cpu"), rel);
    assert_eq!(cgroup_of(pid, "cpuset"), rel);
    assert_eq!(read_trim(cpu.join("cpu.shares")), "512");
    assert_eq!(read_trim(cpuset.join("cpuset.cpus")), "0");
    // mems was empty in the new cgroup: inherited from the parent chain.
    assert_eq!(
        read_trim(cpuset.join("cpuset.mems")),
        read_trim("/sys/fs/cgroup/cpuset/cpuset.mems")
    );
    assert!(read_trim(cpu.join("tasks"))
        .lines()
        .any(|l| l == pid.to_string()));
    // Not asked for: the VMM stays where the test is.
    assert_eq!(
        cgroup_of(pid, "pids"),
        cgroup_of(std::process::id(), "pids")
    );
    // Default limits.
    assert_eq!(limit(pid, "Max open files"), ("2048".into(), "2048".into()));
    // Same PID and network namespaces as the host without --new-pid-ns / --netns.
    assert_eq!(status(pid, "NSpid").len(), 1);
    assert_eq!(ns_inode(&pid.to_string(), "net"), ns_inode("self", "net"));

    let log = jail.release();
    let out = wait(child);
    assert_eq!(out.status.code(), Some(0), "{}", out.all());
    assert!(out.stdout.contains(GREETING), "{}", out.all());
    assert!(out.stdout.contains("ember-guest: done"), "{}", out.all());
    let log = log.join().unwrap();
    assert!(log.contains("Running ember"), "log: {log}");
}

#[test]
fn jailed_vmm_in_a_netns_and_a_new_pid_ns_with_resource_limits() {
    if !require_root() {
        return;
    }
    let jail = Jail::new("pidns");
    jail.populate();
    let netns = Netns::new("ns");
    let ns_path = netns.path();
    let child = jail.spawn_paused(&[
        "--netns",
        ns_path.to_str().unwrap(),
        "--new-pid-ns",
        "--resource-limit",
        "no-file=1024",
        "--resource-limit",
        "fsize=1048576",
    ]);
    let pid = jail.find_vmm();
    check_jailed_vmm(&jail, pid);
    // The jailer's child is pid 1 of a new PID namespace; its host pid is in the pid file.
    let nspid = status(pid, "NSpid");
    assert_eq!(nspid, vec![pid.to_string(), "1".to_string()]);
    assert_ne!(ns_inode(&pid.to_string(), "pid"), ns_inode("self", "pid"));
    let pid_file = jail.root().join("ember.pid");
    let start = Instant::now();
    while !pid_file.exists() {
        assert!(start.elapsed() < GUARD, "no pid file");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The parent writes the file, then exits: wait for it before reading.
    let stdout_reader = wait_for_jailer_exit(child);
    assert_eq!(read_trim(&pid_file), pid.to_string());
    // The network namespace asked for.
    assert_eq!(
        ns_inode(&pid.to_string(), "net"),
        std::fs::metadata(&ns_path).unwrap().ino()
    );
    assert_ne!(ns_inode(&pid.to_string(), "net"), ns_inode("self", "net"));
    assert_eq!(limit(pid, "Max open files"), ("1024".into(), "1024".into()));
    assert_eq!(
        limit(pid, "Max file size"),
        ("1048576".into(), "1048576".into())
    );
    // The forked child's CPU clock restarted: the jailer reports its own time separately.
    let cmdline = String::from_utf8(std::fs::read(format!("/proc/{pid}/cmdline")).unwrap())
        .unwrap()
        .replace('\0', " ");
    assert!(cmdline.contains("--parent-cpu-time-us "), "{cmdline}");

    let log = jail.release();
    let stdout = stdout_reader.join().unwrap();
    assert!(stdout.contains(GREETING), "stdout:\n{stdout}");
    assert!(log.join().unwrap().contains("Running ember"));
    jail.wait_until_empty();
}

/// The jailer process (the pid-namespace parent) exits 0 at once; the VMM keeps our stdout and
/// stderr. Returns a thread that collects both to their end (when the VMM exits).
fn wait_for_jailer_exit(mut child: Child) -> std::thread::JoinHandle<String> {
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    // stderr stays open in the VMM too: read it alongside, never wait for its end here.
    let mut err = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < GUARD, "the jailer did not exit");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(status.code(), Some(0), "jailer: {status:?}");
    std::thread::spawn(move || {
        let out = reader.join().unwrap();
        let err = err_reader.join().unwrap();
        format!("{out}\n--- stderr\n{err}")
    })
}

#[test]
fn jailed_vmm_with_v2_cgroups() {
    if !require_root() {
        return;
    }
    let unified = "/sys/fs/cgroup/unified";
    let available = read_trim(format!("{unified}/cgroup.controllers"));
    let has = |c: &str| available.split_whitespace().any(|a| a == c);
    // A controller setting the v2 hierarchy here offers (the others may be bound to v1).
    let setting = if has("pids") {
        ("pids", "pids.max", "100")
    } else if has("memory") {
        ("memory", "memory.max", "268435456")
    } else if has("hugetlb") && Path::new("/sys/kernel/mm/hugepages/hugepages-2048kB").exists() {
        ("hugetlb", "hugetlb.2MB.max", "2097152")
    } else {
        panic!("the cgroup v2 hierarchy offers no controller to test with: {available:?}");
    };
    let mut jail = Jail::new("v2");
    jail.populate();
    let parent = format!("{}-parent", jail.id);
    let leaf = jail.cgroup(unified, &parent);
    let arg = format!("{}={}", setting.1, setting.2);
    let child = jail.spawn_paused(&[
        "--cgroup-version",
        "2",
        "--parent-cgroup",
        &parent,
        "--cgroup",
        &arg,
        "--cgroup",
        "cgroup.max.descendants=5",
    ]);
    let pid = jail.find_vmm();
    check_jailed_vmm(&jail, pid);
    assert_eq!(cgroup_of(pid, ""), format!("/{parent}/{}", jail.id));
    assert_eq!(read_trim(leaf.join(setting.1)), setting.2);
    assert_eq!(read_trim(leaf.join("cgroup.max.descendants")), "5");
    assert!(read_trim(leaf.join("cgroup.procs"))
        .lines()
        .any(|l| l == pid.to_string()));
    // Enabled down the hierarchy.
    for dir in [
        Path::new(unified).to_path_buf(),
        leaf.parent().unwrap().to_path_buf(),
    ] {
        let enabled = read_trim(dir.join("cgroup.subtree_control"));
        assert!(
            enabled.split_whitespace().any(|c| c == setting.0),
            "{dir:?}: {enabled:?}"
        );
    }

    let log = jail.release();
    let out = wait(child);
    assert_eq!(out.status.code(), Some(0), "{}", out.all());
    assert!(out.stdout.contains(GREETING), "{}", out.all());
    log.join().unwrap();
}

#[test]
fn daemonized_vmm_detaches_from_the_caller() {
    if !require_root() {
        return;
    }
    let jail = Jail::new("daemon");
    jail.populate();
    // The jailer returns at once: the VMM is still waiting on its configuration FIFO.
    let out = wait(jail.spawn_paused(&["--daemonize"]));
    assert_eq!(out.status.code(), Some(0), "{}", out.all());
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "{}",
        out.all()
    );
    let pid = jail.find_vmm();
    check_jailed_vmm(&jail, pid);
    assert_ne!(stat_field(pid, 4), i64::from(std::process::id()), "parent");
    // SAFETY: getsid(0) only queries this process.
    let our_sid = i64::from(unsafe { libc::getsid(0) });
    let sid = stat_field(pid, 6);
    assert_ne!(sid, our_sid, "still in the caller's session");
    // setsid, then a second fork: the session leader is gone, the VMM does not lead.
    assert_ne!(sid, i64::from(pid), "the VMM must not be a session leader");
    for fd in 0..3 {
        assert_eq!(
            std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap(),
            Path::new("/dev/null"),
            "fd {fd}"
        );
    }
    let log = jail.release();
    jail.wait_until_empty();
    assert!(log.join().unwrap().contains("Running ember"));
}

#[test]
fn daemonized_vmm_in_a_new_pid_ns_writes_its_pid_file() {
    if !require_root() {
        return;
    }
    let jail = Jail::new("daemonpid");
    jail.populate();
    let out = wait(jail.spawn_paused(&["--daemonize", "--new-pid-ns"]));
    assert_eq!(out.status.code(), Some(0), "{}", out.all());
    let pid = jail.find_vmm();
    check_jailed_vmm(&jail, pid);
    assert_eq!(status(pid, "NSpid"), vec![pid.to_string(), "1".to_string()]);
    let pid_file = jail.root().join("ember.pid");
    let start = Instant::now();
    while read_trim_opt(&pid_file).as_deref() != Some(&pid.to_string()) {
        assert!(
            start.elapsed() < GUARD,
            "pid file {pid_file:?} never named {pid}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let log = jail.release();
    jail.wait_until_empty();
    log.join().unwrap();
}

fn read_trim_opt(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

#[test]
fn jailed_vmm_serves_its_api_socket_inside_the_jail() {
    if !require_root() {
        return;
    }
    let jail = Jail::new("api");
    let child = jail
        .command(&[])
        .spawn()
        .expect("cannot start ember-jailer");
    let sock = jail.root().join("run/firecracker.socket");
    let start = Instant::now();
    let mut child = Some(child);
    while !sock.exists() {
        if let Some(st) = child.as_mut().unwrap().try_wait().unwrap() {
            let out = wait_exited(child.take().unwrap(), st);
            panic!(
                "the VMM exited before creating its API socket:\n{}",
                out.all()
            );
        }
        assert!(start.elapsed() < GUARD, "no API socket at {sock:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = jail.find_vmm();
    let m = std::fs::metadata(&sock).unwrap();
    assert!(m.file_type().is_socket());
    assert_eq!(m.uid(), UID, "the socket is created by the jailed VMM");
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(GUARD)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    let reply = String::from_utf8_lossy(&buf[..n]);
    assert!(reply.starts_with("HTTP/1.1 200"), "reply: {reply}");
    // SAFETY: kill(2) of the VMM this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let mut c = child.unwrap();
    let _ = c.wait();
}

fn wait_exited(mut child: Child, status: ExitStatus) -> Outcome {
    let mut stdout = String::new();
    let mut stderr = String::new();
    let _ = child.stdout.take().unwrap().read_to_string(&mut stdout);
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    Outcome {
        status,
        stdout,
        stderr,
    }
}

// ---------------------------------------------------------------------------------------------
// Bad input: refused with a clear message, exit 1, nothing created
// ---------------------------------------------------------------------------------------------

/// Runs the jailer with `args` (after the common ones, base dir `base`), expects exit 1 and
/// `needle` in its message.
fn refused(cmd: &mut Command, needle: &str) -> Outcome {
    let out = wait(cmd.spawn().expect("cannot start ember-jailer"));
    assert_eq!(out.status.code(), Some(1), "{}", out.all());
    assert!(out.stderr.starts_with("ember-jailer: "), "{}", out.all());
    assert!(
        out.stderr.contains(needle),
        "want {needle:?}: {}",
        out.all()
    );
    assert!(!out.stdout.contains(GREETING));
    out
}

/// A base directory path that does not exist yet, under a fresh test directory.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("ember-jailer-test-{}", unique(tag)));
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    fn base(&self) -> PathBuf {
        self.0.join("base")
    }
    fn jailer(&self, id: &str, exec: &str, extra: &[&str]) -> Command {
        let mut cmd = Command::new(jailer());
        cmd.args([
            "--id",
            id,
            "--exec-file",
            exec,
            "--uid",
            "10000",
            "--gid",
            "10000",
        ])
        .arg("--chroot-base-dir")
        .arg(self.base())
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        cmd
    }
    fn assert_nothing_created(&self) {
        assert!(!self.base().exists(), "{:?} was created", self.base());
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn id_with_a_slash_is_refused() {
    let s = Scratch::new("badid");
    refused(&mut s.jailer("a/b", EMBER, &[]), "invalid --id \"a/b\"");
    s.assert_nothing_created();
}

#[test]
fn dot_dot_id_is_refused() {
    let s = Scratch::new("dotdot");
    for id in ["..", "../x", "x..y", ""] {
        refused(&mut s.jailer(id, EMBER, &[]), "invalid --id");
    }
    let long = "a".repeat(65);
    refused(&mut s.jailer(&long, EMBER, &[]), "1 to 64 characters");
    s.assert_nothing_created();
}

#[test]
fn bad_cgroup_file_names_are_refused() {
    let s = Scratch::new("badcg");
    let id = unique("cg");
    let parent = format!("{id}-parent");
    for bad in ["cpu/shares=1", "../x.y=1", "cpu.shares/../../x=1"] {
        refused(
            &mut s.jailer(&id, EMBER, &["--parent-cgroup", &parent, "--cgroup", bad]),
            "must be a plain file name",
        );
    }
    for bad in ["cpu=1", "cpu.shares", ".shares=1"] {
        refused(
            &mut s.jailer(&id, EMBER, &["--parent-cgroup", &parent, "--cgroup", bad]),
            "invalid --cgroup",
        );
    }
    refused(
        &mut s.jailer(&id, EMBER, &["--cgroup", "nosuchcontroller.x=1"]),
        "no cgroup v1 hierarchy with the \"nosuchcontroller\" controller",
    );
    refused(
        &mut s.jailer(
            &id,
            EMBER,
            &["--parent-cgroup", "../up", "--cgroup", "cpu.shares=1"],
        ),
        "invalid --parent-cgroup",
    );
    refused(
        &mut s.jailer(&id, EMBER, &["--cgroup-version", "3"]),
        "invalid --cgroup-version",
    );
    s.assert_nothing_created();
    for mount in ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/unified"] {
        assert!(!Path::new(mount).join(&parent).exists());
    }
}

#[test]
fn controller_missing_from_cgroup_v2_is_refused() {
    let available =
        std::fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers").unwrap_or_default();
    // A name no kernel has comes last, so that the refusal is always exercised (a host whose
    // v2 hierarchy offers every real controller must not make this test pass untested).
    let missing = ["cpuset", "cpu", "memory", "pids", "io", "nosuchcontroller"]
        .into_iter()
        .find(|c| !available.split_whitespace().any(|a| a == *c))
        .expect("a made-up controller cannot be available");
    let s = Scratch::new("v2miss");
    let arg = format!("{missing}.max=1");
    refused(
        &mut s.jailer(
            &unique("v2"),
            EMBER,
            &["--cgroup-version", "2", "--cgroup", &arg],
        ),
        "not available in the cgroup v2 hierarchy",
    );
    s.assert_nothing_created();
}

#[test]
fn missing_exec_file_is_refused() {
    let s = Scratch::new("noexec");
    let missing = s.0.join("no-such-ember");
    refused(
        &mut s.jailer(&unique("x"), missing.to_str().unwrap(), &[]),
        "invalid --exec-file",
    );
    // A directory is not an exec file either.
    refused(
        &mut s.jailer(&unique("x"), s.0.to_str().unwrap(), &[]),
        "not a regular file",
    );
    // Nor is a file that is not an ELF executable: it could not run in the empty jail.
    let script = s.0.join("ember.sh");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    refused(
        &mut s.jailer(&unique("x"), script.to_str().unwrap(), &[]),
        "not an ELF executable",
    );
    std::fs::remove_file(&script).unwrap();
    s.assert_nothing_created();
}

#[test]
fn base_that_is_a_regular_file_is_refused() {
    let s = Scratch::new("basefile");
    std::fs::write(s.base(), b"not a directory").unwrap();
    refused(
        &mut s.jailer(&unique("x"), EMBER, &[]),
        "is not a directory",
    );
    assert_eq!(std::fs::read(s.base()).unwrap(), b"not a directory");
}

#[test]
fn id_already_jailed_is_refused() {
    let s = Scratch::new("again");
    let id = unique("again");
    let root = s.base().join("ember").join(&id).join("root");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("ember"), b"a previous jail's copy").unwrap();
    std::fs::write(root.join("vm.json"), b"{}").unwrap();
    let before = tree(&s.base());
    refused(&mut s.jailer(&id, EMBER, &[]), "already jailed");
    assert_eq!(tree(&s.base()), before, "the jail was changed");
    assert_eq!(
        std::fs::read(root.join("ember")).unwrap(),
        b"a previous jail's copy"
    );
}

#[test]
fn symlinked_jail_root_is_refused() {
    let s = Scratch::new("symlink");
    let id = unique("link");
    let elsewhere = s.0.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let jail = s.base().join("ember").join(&id);
    std::fs::create_dir_all(&jail).unwrap();
    std::os::unix::fs::symlink(&elsewhere, jail.join("root")).unwrap();
    let before = tree(&s.0);
    refused(&mut s.jailer(&id, EMBER, &[]), "is a symbolic link");
    assert_eq!(tree(&s.0), before, "something was created");
    assert_eq!(std::fs::metadata(&elsewhere).unwrap().uid(), 0);
}

#[test]
fn netns_that_is_not_a_namespace_is_refused() {
    let s = Scratch::new("netns");
    let not_ns = s.0.join("not-a-netns");
    std::fs::write(&not_ns, b"").unwrap();
    refused(
        &mut s.jailer(&unique("x"), EMBER, &["--netns", not_ns.to_str().unwrap()]),
        "not a network namespace",
    );
    let missing = s.0.join("missing-netns");
    refused(
        &mut s.jailer(&unique("x"), EMBER, &["--netns", missing.to_str().unwrap()]),
        "invalid --netns",
    );
    s.assert_nothing_created();
}

#[test]
fn bad_flags_are_refused() {
    let s = Scratch::new("flags");
    let id = unique("x");
    refused(
        &mut s.jailer(&id, EMBER, &["--resource-limit", "nproc=1"]),
        "unknown resource \"nproc\"",
    );
    refused(
        &mut s.jailer(&id, EMBER, &["--resource-limit", "no-file=lots"]),
        "invalid --resource-limit",
    );
    refused(
        &mut s.jailer(&id, EMBER, &["--no-such-flag"]),
        "no-such-flag",
    );
    let mut cmd = Command::new(jailer());
    cmd.args(["--id", &id, "--exec-file", EMBER])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    refused(&mut cmd, "--uid");
    s.assert_nothing_created();
}

/// A setting that only fails when written (a property the controller does not have): the
/// jail directory and the cgroups created for it are removed again.
#[test]
fn failure_after_validation_leaves_nothing_behind() {
    if !require_root() {
        return;
    }
    let s = Scratch::new("rollback");
    let id = unique("rb");
    let parent = format!("{id}-parent");
    refused(
        &mut s.jailer(
            &id,
            EMBER,
            &[
                "--parent-cgroup",
                &parent,
                "--cgroup",
                "cpu.shares=512",
                "--cgroup",
                "cpu.no_such_property=1",
            ],
        ),
        "cpu.no_such_property",
    );
    assert!(!Path::new("/sys/fs/cgroup/cpu").join(&parent).exists());
    s.assert_nothing_created();
}
