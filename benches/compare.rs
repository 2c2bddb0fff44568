//! Side-by-side benchmarks of ember and any Firecracker-compatible VMM.
//!
//! Drives a VMM only through the Firecracker surface (command line, `--config-file` with
//! `--no-api`, the REST API on a Unix socket), so the same code measures ember and a peer
//! given with `--peer PATH`; runs are interleaved (A, B, A, B, ...) so drift on a shared
//! machine hits both alike. Reports min / median / max, and with a peer the ratio
//! ember / peer of the medians. Writes `results.md` and `results.svg` to the output folder.
//!
//! cargo bench --bench compare -- [--peer PATH] [--runs N] [--only a,b] [--out DIR]
//!                                [--jailer PATH] [--launch 10,50,200] [--launch-runs K]
//!                                [--idle-host]
//!
//! Scenario names for `--only`: `whole` (1), `warm` (1 with runs back to back), `socket` (2),
//! `api` (3), `memory` (4), `launch` (5), `jailer` (6, with `--jailer`), `seccomp` (11: scenario
//! 1 with the filters on and with `--no-seccomp`, and their ratio), `floors` (12: scenario 1's
//! CPU against a minimal KVM program and a trivial guest); these run by default.
//! Device scenarios run only when named in `--only`: `devices` (7, block throughput), `net`
//! (8, as root: guest -> TAP and TAP -> guest in a network namespace the bench creates and
//! deletes, 1514- and 65535-byte frames, packets/s, Gbit/s, VMM CPU ms per Gbit), `vsock`
//! (9, bulk transfer both ways over the hybrid Unix-socket backend, Gbit/s, VMM CPU per Gbit)
//! and `linux` (10, InstanceStart's round trip with Debian's kernel, mostly loading it).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "compare/floor.rs"]
mod floor;

const EMBER: &str = env!("CARGO_BIN_EXE_ember");
const GUEST: &str = concat!(env!("OUT_DIR"), "/ember-guest");
/// What the test guest prints when its scenario finished.
const BOOT_MARK: &str = "ember-guest: done";

struct Opts {
    peer: Option<PathBuf>,
    /// Extra arguments for every peer invocation (e.g. `--no-seccomp` to compare ember
    /// against itself without filters).
    peer_args: Vec<String>,
    jailer: Option<PathBuf>,
    runs: usize,
    only: Option<Vec<String>>,
    out: PathBuf,
    launch: Vec<usize>,
    launch_runs: usize,
    /// Run without the idle VM the bench otherwise holds (see `hold_host_vm`).
    idle_host: bool,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        peer: None,
        peer_args: Vec::new(),
        jailer: None,
        runs: 20,
        only: None,
        out: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/results"),
        launch: vec![10, 50, 200],
        launch_runs: 5,
        idle_host: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--peer" => o.peer = Some(PathBuf::from(val())),
            "--peer-args" => o.peer_args = val().split_whitespace().map(String::from).collect(),
            "--jailer" => o.jailer = Some(PathBuf::from(val())),
            "--runs" => o.runs = val().parse().expect("--runs N"),
            "--only" => o.only = Some(val().split(',').map(String::from).collect()),
            "--out" => o.out = PathBuf::from(val()),
            "--idle-host" => o.idle_host = true,
            "--launch-runs" => {
                o.launch_runs = val().parse::<usize>().expect("--launch-runs K").max(1)
            }
            "--launch" => {
                o.launch = val()
                    .split(',')
                    .map(|n| n.parse().expect("--launch N,N"))
                    .collect()
            }
            // cargo bench passes --bench; ignore it and anything else of libtest's.
            _ => {}
        }
    }
    o
}

#[derive(Clone)]
struct Vmm {
    name: String,
    bin: PathBuf,
    args: Vec<String>,
}

impl Vmm {
    fn command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(&self.args);
        c
    }
}

/// Samples of one metric for one VMM.
#[derive(Default, Clone)]
struct Samples(Vec<f64>);

impl Samples {
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v
    }
    fn median(&self) -> f64 {
        let v = self.sorted();
        if v.is_empty() {
            return f64::NAN;
        }
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }
    fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }
    fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }
}

/// One row of the report: a metric, its unit, and samples per VMM.
struct Row {
    scenario: String,
    metric: String,
    unit: &'static str,
    by_vmm: BTreeMap<String, Samples>,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    /// Raw boot-time samples per VMM for the chart.
    boot_ms: BTreeMap<String, Vec<f64>>,
    /// (VMM, N, VMs/s) for the chart.
    launch: Vec<(String, usize, f64)>,
    notes: Vec<String>,
}

impl Report {
    fn add(&mut self, scenario: &str, metric: &str, unit: &'static str, vmm: &str, v: f64) {
        let row = match self
            .rows
            .iter_mut()
            .position(|r| r.scenario == scenario && r.metric == metric)
        {
            Some(i) => &mut self.rows[i],
            None => {
                self.rows.push(Row {
                    scenario: scenario.into(),
                    metric: metric.into(),
                    unit,
                    by_vmm: BTreeMap::new(),
                });
                self.rows.last_mut().unwrap()
            }
        };
        row.by_vmm.entry(vmm.into()).or_default().0.push(v);
    }
}

/// Reaps every child left (a VMM may leave a short-lived child that finishes the kernel's VM
/// teardown after the VMM itself exited; as a subreaper we inherit it). Waiting for them
/// between runs keeps one run's teardown from slowing the next one's measurement.
fn settle() {
    reap_all();
    // Let the kernel finish deferred work of the last teardown (RCU callbacks, workqueues).
    // Spin rather than sleep, on every CPU: on a VM host an idle vCPU is descheduled, and
    // whatever starts next on it runs slowly (with only the bench's CPU spinning, the boot
    // that followed took ~0.2 ms more CPU: its vCPU thread lands on the other one).
    let spin = || {
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(50) {
            std::hint::spin_loop();
        }
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|s| {
        for _ in 1..cpus {
            s.spawn(spin);
        }
        spin();
    });
}

/// The host's (busy, total) jiffies from /proc/stat.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = s
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    // idle and iowait
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Between scenarios: waits (up to 10 s) until the host has been at least 95% idle for 200 ms,
/// so that the deferred work of the last one (jail and cgroup removal, freeing big guests,
/// writeback) does not land on the next one's figures.
fn quiesce() {
    reap_all();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        let Some((b0, t0)) = cpu_jiffies() else {
            return;
        };
        std::thread::sleep(Duration::from_millis(200));
        let Some((b1, t1)) = cpu_jiffies() else {
            return;
        };
        if t1 > t0 && (b1 - b0) * 20 <= t1 - t0 {
            return;
        }
    }
}

/// Waits for every child (and orphan we inherited) to exit.
fn reap_all() {
    loop {
        let mut status = 0;
        // SAFETY: plain waitpid on any child.
        let r = unsafe { libc::waitpid(-1, &mut status, 0) };
        if r <= 0 {
            break;
        }
    }
}

fn tmpdir(tag: &str) -> PathBuf {
    tmpdir_in(&std::env::temp_dir(), tag)
}

/// A scratch directory in memory (/dev/shm, tmpfs) when the host has one: for files that only
/// stand in for a sink the VMM writes to, whose file system's costs are the bench's, not the
/// VMM's (creating a file on this host's ext4 takes ~60 us).
fn shm_tmpdir(tag: &str) -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tmpdir_in(shm, tag)
    } else {
        tmpdir(tag)
    }
}

fn tmpdir_in(base: &Path, tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let p = base.join(format!(
        "ember-bench-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn guest_config(dir: &Path, boot_args: &str, vcpus: u8, mem: usize) -> PathBuf {
    kernel_config(dir, Path::new(GUEST), boot_args, vcpus, mem)
}

fn kernel_config(dir: &Path, kernel: &Path, boot_args: &str, vcpus: u8, mem: usize) -> PathBuf {
    let cfg = serde_json::json!({
        "boot-source": {"kernel_image_path": kernel, "boot_args": boot_args},
        "drives": [],
        "machine-config": {"vcpu_count": vcpus, "mem_size_mib": mem}
    });
    let p = dir.join("vm.json");
    std::fs::write(&p, serde_json::to_vec(&cfg).unwrap()).unwrap();
    p
}

/// wait4 for the child: exit status and the CPU time (user + system) it used, in us.
fn wait_rusage(child: &mut Child) -> (i32, f64) {
    let (r, status, cpu_us) = wait4(child.id() as i32, 0);
    assert!(r > 0, "wait4 failed");
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    (code, cpu_us)
}

/// wait4(2) on the child `pid`: what it returned (0: still running, with WNOHANG; < 0: not
/// ours), the status, and the CPU time in us.
fn wait4(pid: i32, flags: libc::c_int) -> (i32, i32, f64) {
    let mut status = 0;
    // SAFETY: plain zeroed C struct that wait4 fills in.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child; both pointers are to live locals.
    let r = unsafe { libc::wait4(pid, &mut status, flags, &mut ru) };
    let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    (r, status, us(ru.ru_utime) + us(ru.ru_stime))
}

/// CPU time of `<vmm> --version`: exec, the C and language run-time start-up, exit. What any
/// process of that binary costs on this host, so a boot's cost above it is the VMM's work.
fn version_cpu_ms(vmm: &Vmm) -> f64 {
    let mut child = vmm
        .command()
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let (code, cpu_us) = wait_rusage(&mut child);
    assert_eq!(code, 0, "{} --version exited {code}", vmm.name);
    cpu_us / 1e3
}

fn boot_time_us(output: &str) -> Option<f64> {
    let l = output.lines().find(|l| l.contains("Guest-boot-time ="))?;
    let after = l.split("Guest-boot-time =").nth(1)?;
    after.split_whitespace().next()?.parse().ok()
}

/// Scenario 1's row, runs separated by `settle()` (50 ms of the bench spinning on every CPU).
const WHOLE: &str = "1. whole process (hello, 1 vCPU, 128 MiB)";
/// Scenario 1 again with runs back to back, as a host starting VMs one after another sees it:
/// caches and the kernel's allocators are warm, the last VM's teardown may still be running.
const WHOLE_WARM: &str = "1. whole process, back to back (hello, 1 vCPU, 128 MiB)";

/// One run of scenario 1: exec, boot the hello guest, reset, exit.
struct Boot {
    wall_ms: f64,
    /// CPU of the VMM process itself (wait4's rusage).
    cpu_ms: f64,
    /// The VMM's boot timer, in us.
    boot_us: Option<f64>,
    /// Processes the VMM left behind that became ours (its teardown helper): their CPU is
    /// part of what the boot cost, so it is counted once they are gone.
    helpers: Vec<i32>,
    /// The CPU of the helpers reaped so far.
    helper_ms: f64,
}

/// Our children right now, from every thread's /proc `children` list. The bench is a
/// subreaper, so a VMM's orphans (ember's teardown helper) are among them.
fn children() -> Vec<i32> {
    let mut pids = Vec::new();
    for t in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            pids.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    pids
}

/// The CPU in ms of `pid`, a child, once it has exited: `None` if it still runs and `block`
/// is false.
fn reap_cpu_ms(pid: i32, block: bool) -> Option<f64> {
    match wait4(pid, if block { 0 } else { libc::WNOHANG }) {
        (0, ..) => None,
        (r, ..) if r < 0 => Some(0.0), // not ours after all (reaped elsewhere): nothing to count
        (_, _, cpu_us) => Some(cpu_us / 1e3),
    }
}

fn boot_hello(vmm: &Vmm, extra: &[&str]) -> Boot {
    boot_guest(vmm, extra, Guest::Hello)
}

/// The guest a run of scenario 1 (or 12) boots.
#[derive(Clone, Copy)]
enum Guest {
    /// ember's test guest, scenario `hello`.
    Hello,
    /// The nine-instruction guest of scenario 12 (floor.rs).
    Trivial,
}

fn boot_guest(vmm: &Vmm, extra: &[&str], guest: Guest) -> Boot {
    let dir = tmpdir("whole");
    let (cfg, mark) = match guest {
        Guest::Hello => (guest_config(&dir, "hello", 1, 128), BOOT_MARK),
        Guest::Trivial => {
            let kernel = dir.join("trivial.elf");
            std::fs::write(&kernel, floor::elf()).expect("write the trivial guest");
            (kernel_config(&dir, &kernel, "", 1, 128), floor::LINE)
        }
    };
    let before = children();
    let start = Instant::now();
    let mut child = vmm
        .command()
        .args(extra)
        .args(["--no-api", "--boot-timer", "--config-file"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut out = String::new();
    let _ = child.stdout.take().unwrap().read_to_string(&mut out);
    let (code, cpu_us) = wait_rusage(&mut child);
    let wall = start.elapsed().as_secs_f64() * 1e3;
    let helpers = children()
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, 0, "{} exited {code}: {out}", vmm.name);
    assert!(
        out.contains(mark),
        "{}: guest did not boot: {out}",
        vmm.name
    );
    Boot {
        wall_ms: wall,
        cpu_ms: cpu_us / 1e3,
        boot_us: boot_time_us(&out),
        helpers,
        helper_ms: 0.0,
    }
}

/// Scenario 1's CPU rows: the process and its helpers together (what the boot cost the
/// host), and the helpers alone.
const CPU_TOTAL: &str = "exec to exit, CPU (with the teardown helper)";
const CPU_HELPER: &str = "teardown helper after exit, CPU";

/// Adds the CPU rows of `boot` once its helpers are gone; false (and nothing added) while one
/// still runs and `block` is false.
fn add_cpu(
    report: &mut Report,
    s: &str,
    tag: &str,
    vmm: &str,
    boot: &mut Boot,
    block: bool,
) -> bool {
    if !reap_helpers(boot, block) {
        return false;
    }
    let total = boot.cpu_ms + boot.helper_ms;
    report.add(s, &format!("{CPU_TOTAL}{tag}"), "ms", vmm, total);
    if tag.is_empty() {
        report.add(s, CPU_HELPER, "ms", vmm, boot.helper_ms);
    }
    true
}

/// Scenario 11: what the seccomp filters cost scenario 1 (issue: "no measurable cost").
const SECCOMP: &str = "11. seccomp filters (scenario 1, with and without `--no-seccomp`)";

/// One run of scenario 1 with the VMM's filters on or off (`--no-seccomp`, Firecracker's flag).
fn seccomp_cost(vmm: &Vmm, report: &mut Report, filters: bool) {
    let (extra, tag): (&[&str], _) = if filters {
        (&[], "filters on")
    } else {
        (&["--no-seccomp"], "`--no-seccomp`")
    };
    let mut boot = boot_hello(vmm, extra);
    report.add(
        SECCOMP,
        &format!("exec to exit, wall, {tag}"),
        "ms",
        &vmm.name,
        boot.wall_ms,
    );
    add_cpu(
        report,
        SECCOMP,
        &format!(", {tag}"),
        &vmm.name,
        &mut boot,
        true,
    );
    if let Some(b) = boot.boot_us {
        report.add(
            SECCOMP,
            &format!("VMM's own boot timer, {tag}"),
            "ms",
            &vmm.name,
            b / 1e3,
        );
    }
}

/// The ratio filters on / off of each metric's medians, as rows of scenario 11.
fn seccomp_ratios(vmm: &Vmm, report: &mut Report) {
    let median = |r: &Report, metric: &str| {
        r.rows
            .iter()
            .find(|row| row.scenario == SECCOMP && row.metric == metric)
            .and_then(|row| row.by_vmm.get(&vmm.name))
            .map(Samples::median)
    };
    for what in ["exec to exit, wall", CPU_TOTAL, "VMM's own boot timer"] {
        let on = median(report, &format!("{what}, filters on"));
        let off = median(report, &format!("{what}, `--no-seccomp`"));
        if let (Some(on), Some(off)) = (on, off) {
            report.add(
                SECCOMP,
                &format!("{what}: filters on / off (of the medians)"),
                "ratio",
                &vmm.name,
                on / off,
            );
        }
    }
}

/// Scenario 12: where scenario 1's CPU goes. Three runs spaced out like scenario 1: the
/// minimal KVM program with the trivial guest (floor.rs), the VMM with the trivial guest, the
/// VMM with the hello guest; `floors_split` turns their medians into differences.
const FLOORS: &str = "12. where scenario 1's CPU goes";
const FLOOR_MIN: &str = "minimal KVM program (this bench, KVM calls only), trivial guest, CPU";
const FLOOR_TRIVIAL: &str = "VMM, trivial guest, CPU (with the teardown helper)";
const FLOOR_HELLO: &str = "VMM, hello guest, CPU (with the teardown helper)";

fn floors(vmm: &Vmm, report: &mut Report) {
    settle();
    let start = Instant::now();
    let mut child = Command::new(std::env::current_exe().expect("the bench's own path"))
        .arg("--kvm-floor")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the minimal KVM program");
    let mut text = String::new();
    let _ = child.stdout.take().unwrap().read_to_string(&mut text);
    let (code, cpu_us) = wait_rusage(&mut child);
    let wall = start.elapsed().as_secs_f64() * 1e3;
    if code != 0 || !text.contains(floor::LINE) {
        let mut err = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut err);
        report.notes.push(format!(
            "12. the minimal KVM program failed ({code}): {err}"
        ));
    } else {
        report.add(FLOORS, FLOOR_MIN, "ms", &vmm.name, cpu_us / 1e3);
        report.add(
            FLOORS,
            "minimal KVM program, exec to exit, wall",
            "ms",
            &vmm.name,
            wall,
        );
    }
    for (guest, cpu, wall) in [
        (
            Guest::Trivial,
            FLOOR_TRIVIAL,
            Some("VMM, trivial guest, exec to exit, wall"),
        ),
        (Guest::Hello, FLOOR_HELLO, None),
    ] {
        settle();
        let mut boot = boot_guest(vmm, &[], guest);
        reap_helpers(&mut boot, true);
        report.add(FLOORS, cpu, "ms", &vmm.name, boot.cpu_ms + boot.helper_ms);
        if let Some(wall) = wall {
            report.add(FLOORS, wall, "ms", &vmm.name, boot.wall_ms);
        }
    }
}

/// Reaps the helpers `boot` left that are gone (waiting for all when `block`) and adds their
/// CPU to it; whether none is left.
fn reap_helpers(boot: &mut Boot, block: bool) -> bool {
    let mut left = Vec::new();
    for &pid in &boot.helpers {
        match reap_cpu_ms(pid, block) {
            Some(ms) => boot.helper_ms += ms,
            None => left.push(pid),
        }
    }
    boot.helpers = left;
    boot.helpers.is_empty()
}

/// Scenario 12's differences of the medians: what the VMM adds to the minimal program, and
/// what the hello guest adds to the trivial one.
fn floors_split(vmm: &Vmm, report: &mut Report) {
    let median = |r: &Report, metric: &str| {
        r.rows
            .iter()
            .find(|row| row.scenario == FLOORS && row.metric == metric)
            .and_then(|row| row.by_vmm.get(&vmm.name))
            .map(Samples::median)
    };
    let (min, trivial, hello) = (
        median(report, FLOOR_MIN),
        median(report, FLOOR_TRIVIAL),
        median(report, FLOOR_HELLO),
    );
    if let (Some(m), Some(t)) = (min, trivial) {
        report.add(
            FLOORS,
            "what the VMM adds to the minimal program (trivial guest; of the medians)",
            "ms",
            &vmm.name,
            t - m,
        );
    }
    if let (Some(t), Some(h)) = (trivial, hello) {
        report.add(
            FLOORS,
            "what the hello guest adds to the trivial one (of the medians)",
            "ms",
            &vmm.name,
            h - t,
        );
    }
}

/// Scenario 1: exec, boot the hello guest, reset, exit. Returns the boot if its CPU rows wait
/// for a helper still running (only when `block` is false).
fn whole_process(vmm: &Vmm, report: &mut Report, s: &str, block: bool) -> Option<Boot> {
    let mut boot = boot_hello(vmm, &[]);
    report.add(s, "exec to exit, wall", "ms", &vmm.name, boot.wall_ms);
    if s == WHOLE {
        report.add(
            s,
            "same binary's `--version`, CPU (the process floor)",
            "ms",
            &vmm.name,
            version_cpu_ms(vmm),
        );
    }
    if let Some(b) = boot.boot_us {
        report.add(s, "VMM's own boot timer", "ms", &vmm.name, b / 1e3);
        if s == WHOLE {
            report
                .boot_ms
                .entry(vmm.name.clone())
                .or_default()
                .push(boot.wall_ms);
        }
    }
    (!add_cpu(report, s, "", &vmm.name, &mut boot, block)).then_some(boot)
}

fn wait_for_socket(path: &Path, guard: Duration) -> Option<UnixStream> {
    let start = Instant::now();
    while start.elapsed() < guard {
        if let Ok(s) = UnixStream::connect(path) {
            return Some(s);
        }
        std::hint::spin_loop();
    }
    None
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Debian's cloud kernel as get-linux-kernel.sh leaves it: (row label, path) of those present.
fn linux_images() -> Vec<(&'static str, PathBuf)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("resources/images");
    [
        ("Debian 6.1 vmlinux (ELF)", "vmlinux"),
        ("Debian 6.1 vmlinuz (bzImage)", "vmlinuz"),
    ]
    .into_iter()
    .map(|(label, name)| (label, dir.join(name)))
    .filter(|(_, p)| p.exists())
    .collect()
}

/// Scenario 10: InstanceStart's round trip with a real Linux kernel, which is mostly loading it.
fn linux_start(vmm: &Vmm, label: &str, kernel: &Path, report: &mut Report) {
    let dir = tmpdir("linux");
    let sock = dir.join("api.sock");
    let Some((mut child, mut s)) = start_api(vmm, &sock, &[], Stdio::null(), report) else {
        return;
    };
    let body = format!(
        r#"{{"kernel_image_path":"{}","boot_args":"console=ttyS0 reboot=k panic=1"}}"#,
        kernel.display()
    );
    let a = http(&mut s, "PUT", "/boot-source", Some(&body));
    let b = http(
        &mut s,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count":1,"mem_size_mib":256}"#),
    );
    let t = Instant::now();
    let c = http(
        &mut s,
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
    );
    let ms = t.elapsed().as_secs_f64() * 1e3;
    kill(&mut child);
    let _ = std::fs::remove_dir_all(&dir);
    if (a, b, c) != (204, 204, 204) {
        report.notes.push(format!(
            "{}: {label}: the API answered {a}/{b}/{c}",
            vmm.name
        ));
        return;
    }
    report.add(
        "10. Linux kernel start (API, 256 MiB)",
        &format!("{label}: InstanceStart round trip"),
        "ms",
        &vmm.name,
        ms,
    );
}

/// Starts `vmm` serving its API on `sock` and connects; on failure notes it and returns None.
fn start_api(
    vmm: &Vmm,
    sock: &Path,
    args: &[&str],
    stdout: Stdio,
    report: &mut Report,
) -> Option<(Child, UnixStream)> {
    let mut child = vmm
        .command()
        .arg("--api-sock")
        .arg(sock)
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let Some(s) = wait_for_socket(sock, Duration::from_secs(5)) else {
        kill(&mut child);
        report
            .notes
            .push(format!("{}: API socket never accepted", vmm.name));
        return None;
    };
    Some((child, s))
}

/// Scenario 2: exec to the API socket accepting connections.
fn exec_to_socket(vmm: &Vmm, report: &mut Report) {
    let dir = tmpdir("sock");
    let sock = dir.join("api.sock");
    let mut cmd = vmm.command();
    cmd.arg("--api-sock").arg(&sock);
    time_to_socket(cmd, &sock, "2. exec to API socket accepting", vmm, report);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts `cmd` and times it until `sock` accepts a connection; then kills it.
fn time_to_socket(mut cmd: Command, sock: &Path, scenario: &str, vmm: &Vmm, report: &mut Report) {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let ok = wait_for_socket(sock, Duration::from_secs(5)).is_some();
    let t = start.elapsed().as_secs_f64() * 1e3;
    kill(&mut child);
    if ok {
        report.add(scenario, "wall", "ms", &vmm.name, t);
    } else {
        report.notes.push(format!(
            "{}: {scenario}: the socket never accepted",
            vmm.name
        ));
    }
}

/// A minimal HTTP/1.1 client for the API socket: returns the status code.
fn http(stream: &mut UnixStream, method: &str, path: &str, body: Option<&str>) -> u16 {
    let req = match body {
        Some(b) => format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ),
        None => format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n"),
    };
    stream.write_all(req.as_bytes()).expect("write request");
    // One request in flight at a time, so everything read belongs to this response.
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return 0,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Scenario 3: configure through the API, InstanceStart, to the boot-timer marker and exit.
fn api_boot(vmm: &Vmm, report: &mut Report) {
    let dir = tmpdir("api");
    let sock = dir.join("api.sock");
    let Some((mut child, mut s)) = start_api(vmm, &sock, &["--boot-timer"], Stdio::piped(), report)
    else {
        return;
    };
    // The API's round trip, on a keep-alive connection, before the boot.
    let mut rtts = Vec::with_capacity(200);
    for _ in 0..200 {
        let t = Instant::now();
        if http(&mut s, "GET", "/", None) != 200 {
            break;
        }
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    if rtts.len() == 200 {
        report.add(
            "3. API: configure + InstanceStart",
            "GET / round trip (median of 200)",
            "us",
            &vmm.name,
            Samples(rtts).median(),
        );
    }
    let marker = Arc::new(AtomicU64::new(0));
    let exited_ok = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let stdout = child.stdout.take().unwrap();
    let reader = {
        let marker = marker.clone();
        let booted = exited_ok.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("Guest-boot-time") {
                    marker.store(t0.elapsed().as_nanos() as u64, Ordering::SeqCst);
                }
                if line.contains(BOOT_MARK) {
                    booted.store(true, Ordering::SeqCst);
                }
            }
        })
    };
    let t_cfg = Instant::now();
    let body = format!(r#"{{"kernel_image_path":"{GUEST}","boot_args":"hello"}}"#);
    let a = http(&mut s, "PUT", "/boot-source", Some(&body));
    let b = http(
        &mut s,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count":1,"mem_size_mib":128}"#),
    );
    let start_sent = t0.elapsed();
    let c = http(
        &mut s,
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
    );
    if (a, b, c) != (204, 204, 204) {
        kill(&mut child);
        report
            .notes
            .push(format!("{}: API boot answered {a}/{b}/{c}", vmm.name));
        return;
    }
    let (code, _) = wait_rusage(&mut child);
    let to_exit = t_cfg.elapsed().as_secs_f64() * 1e3;
    let _ = reader.join();
    let _ = std::fs::remove_dir_all(&dir);
    let m = marker.load(Ordering::SeqCst);
    if code != 0 || m == 0 || !exited_ok.load(Ordering::SeqCst) {
        report.notes.push(format!(
            "{}: API boot did not finish cleanly (exit {code})",
            vmm.name
        ));
        return;
    }
    let sc = "3. API: configure + InstanceStart";
    let marker_ms = (Duration::from_nanos(m) - start_sent).as_secs_f64() * 1e3;
    report.add(
        sc,
        "InstanceStart to boot-timer marker",
        "ms",
        &vmm.name,
        marker_ms,
    );
    report.add(sc, "configure to process exit", "ms", &vmm.name, to_exit);
}

/// Sum of RSS in KiB of every mapping except guest memory (the anonymous mappings whose sizes
/// are the guest's RAM regions).
fn rss_outside_guest_kib(pid: u32, mem_mib: usize) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mem = (mem_mib as u64) << 20;
    let low = mem.min(3 << 30);
    let high = mem.saturating_sub(3 << 30);
    let mut total = 0;
    let mut skip = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            let (a, b) = first.split_once('-')?;
            let size = u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()?;
            skip = size == low || (high > 0 && size == high);
        } else if let Some(v) = line.strip_prefix("Rss:") {
            if !skip {
                total += v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()?;
            }
        }
    }
    Some(total)
}

/// Scenario 4: VMM memory outside guest memory with a guest running (`ticks` keeps it alive).
fn memory(vmm: &Vmm, report: &mut Report, mem: usize, vcpus: u8) {
    let dir = tmpdir("mem");
    let cfg = guest_config(&dir, "ticks", vcpus, mem);
    let mut child = vmm
        .command()
        .args(["--no-api", "--config-file"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    // Wait until the guest runs its payload (first tick), then measure.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let running = lines.any(|l| l.map(|l| l.contains("tick")).unwrap_or(false));
    std::thread::sleep(Duration::from_millis(50));
    let rss = rss_outside_guest_kib(child.id(), mem);
    kill(&mut child);
    let _ = std::fs::remove_dir_all(&dir);
    match (running, rss) {
        (true, Some(kib)) => report.add(
            "4. VMM RSS outside guest memory (running guest)",
            &format!("{mem} MiB, {vcpus} vCPU"),
            "MiB",
            &vmm.name,
            kib as f64 / 1024.0,
        ),
        _ => report
            .notes
            .push(format!("{}: memory scenario: guest did not run", vmm.name)),
    }
}

/// Threads that start the VMMs of a launch (the machine's cores).
const SPAWNERS: usize = 2;

/// Scenario 5: N VMs started at once; VMs per second from the first exec to the last exit,
/// the peak of their memory together, and every guest confirmed booted. Returns the rate.
fn launch_rate(vmm: &Vmm, report: &mut Report, n: usize) -> f64 {
    // The console files are in memory: on this host's ext4 their creation and the VMMs'
    // writes to them cost the launch ~10% of its rate.
    let dir = shm_tmpdir("launch");
    let cfg = guest_config(&dir, "hello", 1, 128);
    // Every VMM (and its teardown helper) starts in a memory cgroup of its own, so the kernel
    // records the peak of their memory together (processes, page tables, KVM's structures)
    // without a sampler taking CPU from the VMs being measured.
    // The bench itself is in the group only while it forks them (children start in their
    // parent's group; posix_spawn stays usable).
    let cgroup = MemCgroup::new(&format!("launch-{n}"));
    if let Some(cg) = &cgroup {
        cg.enter();
    }
    // Each VMM writes its console to a file of its own that the bench closes right after the
    // spawn: with a pipe per VMM kept open here, every later spawn copied and closed all of
    // them (the fd table is duplicated at fork and cleared at exec), a cost growing with N.
    let outs: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("out-{i}"))).collect();
    let spawn = |out: &PathBuf| -> Child {
        let file = std::fs::File::create(out).expect("create a console file");
        let mut cmd = vmm.command();
        cmd.args(["--no-api", "--config-file"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(Stdio::inherit())
            .process_group(0);
        cmd.spawn().expect("spawn")
    };
    let start = Instant::now();
    // "At once": one spawner per core, as a fork takes a few hundred microseconds here and a
    // single spawner left a core idle at the start of every launch.
    let mut children: Vec<Child> = std::thread::scope(|s| {
        let handles: Vec<_> = outs
            .chunks(n.div_ceil(SPAWNERS).max(1))
            .map(|chunk| s.spawn(move || chunk.iter().map(spawn).collect::<Vec<Child>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a spawner panicked"))
            .collect()
    });
    if let Some(cg) = &cgroup {
        cg.leave();
    }
    let statuses: Vec<_> = children.iter_mut().map(|c| c.wait()).collect();
    let secs = start.elapsed().as_secs_f64();
    let mut booted = 0;
    let mut failure = None;
    for (status, path) in statuses.into_iter().zip(&outs) {
        let out = std::fs::read_to_string(path).unwrap_or_default();
        let ok = status.as_ref().map(|s| s.success()).unwrap_or(false);
        if ok && out.contains(BOOT_MARK) {
            booted += 1;
        } else if failure.is_none() {
            let tail: Vec<&str> = out.lines().rev().take(3).collect();
            failure = Some(format!("{status:?}: {}", tail.join(" | ")));
        }
    }
    reap_all();
    let secs_all = start.elapsed().as_secs_f64();
    let peak_mib = cgroup.as_ref().and_then(MemCgroup::peak_bytes);
    let _ = std::fs::remove_dir_all(&dir);
    if booted != n {
        report.notes.push(format!(
            "{}: launch of {n}: only {booted} guests confirmed booted; first failure: {}",
            vmm.name,
            failure.unwrap_or_default()
        ));
    }
    let sc = "5. launch rate (N at once, hello guest)";
    let rate = n as f64 / secs;
    report.add(sc, &format!("N = {n}: VMs/s"), "VMs/s", &vmm.name, rate);
    report.add(
        sc,
        &format!("N = {n}: VMs/s, counting until every helper process is gone"),
        "VMs/s",
        &vmm.name,
        n as f64 / secs_all,
    );
    match peak_mib {
        Some(b) => report.add(
            sc,
            &format!("N = {n}: peak memory of all the VMMs (memory cgroup)"),
            "MiB",
            &vmm.name,
            b as f64 / 1048576.0,
        ),
        None => report.notes.push(
            "5. launch rate: peak memory not measured (needs root and cgroup v1 memory)".into(),
        ),
    }
    rate
}

/// A cgroup v1 memory group for one launch; removed when dropped.
struct MemCgroup {
    dir: PathBuf,
    /// The group this process was in.
    home: PathBuf,
}

impl MemCgroup {
    fn new(tag: &str) -> Option<MemCgroup> {
        let dir = PathBuf::from(format!(
            "/sys/fs/cgroup/memory/ember-bench-{}-{tag}",
            std::process::id()
        ));
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let rel = own.lines().find_map(|l| {
            l.split_once(":memory:")
                .map(|(_, p)| p.trim_start_matches('/'))
        })?;
        let home = Path::new("/sys/fs/cgroup/memory").join(rel);
        std::fs::create_dir(&dir).ok()?;
        Some(MemCgroup { dir, home })
    }

    /// This process joins the group.
    fn enter(&self) {
        let _ = std::fs::write(self.dir.join("cgroup.procs"), "0");
    }

    /// This process goes back to its own group.
    fn leave(&self) {
        let _ = std::fs::write(self.home.join("cgroup.procs"), "0");
    }

    fn peak_bytes(&self) -> Option<u64> {
        std::fs::read_to_string(self.dir.join("memory.max_usage_in_bytes"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        // Empty once every VMM and teardown helper has been reaped (reap_all), which the
        // caller did; a straggler only delays the removal.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Scenario 6: jailer exec to the VMM's API socket accepting.
fn jailer_to_socket(vmm: &Vmm, jailer: &Path, report: &mut Report) {
    let base = tmpdir("jail");
    static ID: AtomicU64 = AtomicU64::new(0);
    let id = format!(
        "bench-{}-{}",
        std::process::id(),
        ID.fetch_add(1, Ordering::SeqCst)
    );
    let exec_name = vmm.bin.file_name().unwrap().to_string_lossy().to_string();
    let sock = base
        .join(&exec_name)
        .join(&id)
        .join("root/run/firecracker.socket");
    let mut cmd = Command::new(jailer);
    cmd.args([
        "--id",
        &id,
        "--uid",
        "10000",
        "--gid",
        "10000",
        "--exec-file",
    ])
    .arg(&vmm.bin)
    .arg("--chroot-base-dir")
    .arg(&base);
    time_to_socket(
        cmd,
        &sock,
        "6. jailer exec to API socket accepting",
        vmm,
        report,
    );
    let _ = std::fs::remove_dir_all(&base);
}

fn fmt(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0);
    let kvm = if Path::new("/sys/module/kvm_pvm").exists() {
        "kvm_pvm (software-nested)"
    } else {
        "kvm"
    };
    format!(
        "{} x {cpu}, {} GiB, {kvm}, kernel {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        mem_kib / 1024 / 1024,
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    )
}

fn markdown(report: &Report, vmms: &[Vmm], runs: usize, launch_runs: usize) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "Machine: {}. Runs per scenario: {runs} (launch rate: {launch_runs} runs per N). Date: {}.\n\n",
        machine(),
        String::from_utf8_lossy(
            &Command::new("date")
                .arg("-u")
                .arg("+%Y-%m-%d")
                .output()
                .map(|o| o.stdout)
                .unwrap_or_default()
        )
        .trim()
    ));
    s.push_str("| scenario | metric | unit |");
    for v in vmms {
        s.push_str(&format!(" {} min / median / max |", v.name));
    }
    if vmms.len() > 1 {
        s.push_str(&format!(" {} / {} (median) |", vmms[0].name, vmms[1].name));
    }
    s.push_str("\n|---|---|---|");
    for _ in vmms {
        s.push_str("---|");
    }
    if vmms.len() > 1 {
        s.push_str("---|");
    }
    s.push('\n');
    // By scenario number; rows of one scenario stay in the order they were first measured.
    let mut rows: Vec<&Row> = report.rows.iter().collect();
    rows.sort_by_key(|r| {
        let n: String = r
            .scenario
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        n.parse::<u32>().unwrap_or(u32::MAX)
    });
    for r in rows {
        s.push_str(&format!("| {} | {} | {} |", r.scenario, r.metric, r.unit));
        for v in vmms {
            match r.by_vmm.get(&v.name) {
                Some(x) => s.push_str(&format!(
                    " {} / **{}** / {} |",
                    fmt(x.min()),
                    fmt(x.median()),
                    fmt(x.max())
                )),
                None => s.push_str(" - |"),
            }
        }
        if vmms.len() > 1 {
            let a = r.by_vmm.get(&vmms[0].name).map(Samples::median);
            let b = r.by_vmm.get(&vmms[1].name).map(Samples::median);
            match (a, b) {
                (Some(a), Some(b)) if b != 0.0 => s.push_str(&format!(" {:.2} |", a / b)),
                _ => s.push_str(" - |"),
            }
        }
        s.push('\n');
    }
    for n in &report.notes {
        s.push_str(&format!("\n- note: {n}"));
    }
    s.push('\n');
    s
}

/// Two panels: the whole-process boot time distribution (one dot per run, median bar), and
/// the launch rate per N.
fn svg(report: &Report) -> String {
    let colors = ["#d9480f", "#1c7ed6", "#2f9e44"];
    let (w, h) = (760.0, 330.0);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="20" y="22" font-size="14">Whole process, exec to exit (ms), one dot per run</text>
<text x="420" y="22" font-size="14">Launch rate (VMs/s) by N</text>
"#
    );
    // Panel 1.
    let all: Vec<f64> = report.boot_ms.values().flatten().copied().collect();
    let max = all.iter().copied().fold(1.0f64, f64::max) * 1.1;
    let (x0, y0, pw, ph) = (50.0, 40.0, 320.0, 240.0);
    s.push_str(&format!(
        r#"<line x1="{x0}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{x0}" y1="{y0}" x2="{x0}" y2="{}" stroke="black"/>"#,
        y0 + ph,
        x0 + pw,
        y0 + ph,
        y0 + ph
    ));
    for i in 0..=4 {
        let v = max * i as f64 / 4.0;
        let y = y0 + ph - ph * i as f64 / 4.0;
        s.push_str(&format!(
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            x0 - 4.0,
            y + 4.0,
            fmt(v)
        ));
    }
    let n = report.boot_ms.len().max(1) as f64;
    for (i, (name, vals)) in report.boot_ms.iter().enumerate() {
        let cx = x0 + pw * (i as f64 + 0.5) / n;
        let c = colors[i % colors.len()];
        for (j, v) in vals.iter().enumerate() {
            let jitter = ((j * 37) % 21) as f64 - 10.0;
            s.push_str(&format!(
                r#"<circle cx="{}" cy="{}" r="3" fill="{c}" fill-opacity="0.6"/>"#,
                cx + jitter,
                y0 + ph - ph * v / max
            ));
        }
        let med = Samples(vals.clone()).median();
        let y = y0 + ph - ph * med / max;
        s.push_str(&format!(
            r#"<line x1="{}" y1="{y}" x2="{}" y2="{y}" stroke="black" stroke-width="2"/><text x="{cx}" y="{}" text-anchor="middle">{name} (median {})</text>"#,
            cx - 25.0,
            cx + 25.0,
            y0 + ph + 16.0,
            fmt(med)
        ));
    }
    // Panel 2.
    let (x0, pw) = (440.0, 300.0);
    let rmax = report.launch.iter().map(|l| l.2).fold(1.0f64, f64::max) * 1.1;
    s.push_str(&format!(
        r#"<line x1="{x0}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#,
        y0 + ph,
        x0 + pw,
        y0 + ph
    ));
    let ns: Vec<usize> = {
        let mut v: Vec<usize> = report.launch.iter().map(|l| l.1).collect();
        v.sort();
        v.dedup();
        v
    };
    let names: Vec<String> = report.boot_ms.keys().cloned().collect();
    let groups = ns.len().max(1) as f64;
    let bw = pw / groups / (names.len().max(1) as f64 + 1.0);
    for (gi, nn) in ns.iter().enumerate() {
        let gx = x0 + pw * gi as f64 / groups;
        for (vi, name) in names.iter().enumerate() {
            if let Some(l) = report.launch.iter().find(|l| &l.0 == name && l.1 == *nn) {
                let bh = ph * l.2 / rmax;
                let x = gx + bw * (vi as f64 + 0.5);
                s.push_str(&format!(
                    r#"<rect x="{x}" y="{}" width="{}" height="{bh}" fill="{}"/><text x="{}" y="{}" text-anchor="middle">{}</text>"#,
                    y0 + ph - bh,
                    bw * 0.9,
                    colors[vi % colors.len()],
                    x + bw * 0.45,
                    y0 + ph - bh - 4.0,
                    fmt(l.2)
                ));
            }
        }
        s.push_str(&format!(
            r#"<text x="{}" y="{}" text-anchor="middle">N = {nn}</text>"#,
            gx + pw / groups / 2.0,
            y0 + ph + 16.0
        ));
    }
    s.push_str("</svg>\n");
    s
}

/// One benchmark scenario, run once for one VMM.
/// Scenario 7 label.
const DEV_SCENARIO: &str = "7. block (guest, 64 KiB sequential)";
/// Size of scenario 7's disk image.
const DEV_IMAGE: usize = 64 << 20;
/// Request size of the host's own sequential pass (and of the guest's).
const DEV_CHUNK: usize = 64 << 10;

/// The host's own sequential write (64 KiB writes, then fsync) and read (64 KiB reads) of
/// `path`, in MB/s (10^6 bytes). A first, untimed pass creates the file (real data, not
/// sparse), so that the timed write overwrites allocated blocks, as the guest's writes do
/// (allocating them makes the host's pass about 1.5 times as long). The read comes right
/// after the write, so it is mostly served from the page cache, as is most of what a
/// Writeback guest sees.
/// Sequential read passes over the image, on the host and in the guest's blkbench.
const DEV_READ_PASSES: usize = 4;

fn host_seq(path: &Path) -> (f64, f64) {
    use std::fs::OpenOptions;
    let mut chunk = vec![0u8; DEV_CHUNK];
    for (i, c) in chunk.iter_mut().enumerate() {
        *c = (i as u8) ^ 0xa5;
    }
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .read(true)
        .open(path)
        .expect("open the image");
    let pass = |f: &mut std::fs::File| {
        std::io::Seek::rewind(f).expect("seek the image");
        let t = Instant::now();
        let mut done = 0;
        while done < DEV_IMAGE {
            f.write_all(&chunk).expect("write the image");
            done += DEV_CHUNK;
        }
        f.sync_all().expect("fsync the image");
        DEV_IMAGE as f64 / t.elapsed().as_secs_f64() / 1e6
    };
    pass(&mut f);
    let write = pass(&mut f);
    drop(f);
    let mut f = std::fs::File::open(path).expect("open the image");
    // As many passes as the guest's blkbench makes.
    let t = Instant::now();
    for _ in 0..DEV_READ_PASSES {
        std::io::Seek::rewind(&mut f).expect("seek the image");
        let mut done = 0;
        while done < DEV_IMAGE {
            let n = f.read(&mut chunk).expect("read the image");
            assert!(n > 0, "short image");
            done += n;
        }
    }
    let read = (DEV_IMAGE * DEV_READ_PASSES) as f64 / t.elapsed().as_secs_f64() / 1e6;
    (read, write)
}

/// Parses `blkbench: seqread <r> MB/s, seqwrite <w> MB/s, randread <i> IOPS`.
fn parse_blkbench(out: &str) -> Option<(f64, f64, f64)> {
    let l = out.lines().find(|l| l.contains("blkbench: seqread"))?;
    let nums: Vec<f64> = l
        .split(|c: char| !c.is_ascii_digit())
        .filter(|t| !t.is_empty())
        .filter_map(|t| t.parse().ok())
        .collect();
    match nums[..] {
        [r, w, i] => Some((r, w, i)),
        _ => None,
    }
}

/// Boots the test guest's `blkbench` on `image` with `engine` (Sync or Async); the guest's
/// (seqread MB/s, seqwrite MB/s, randread IOPS), or why not.
fn guest_blkbench(
    vmm: &Vmm,
    dir: &Path,
    image: &Path,
    engine: &str,
) -> Result<(f64, f64, f64), String> {
    let cfg = serde_json::json!({
        "boot-source": {"kernel_image_path": GUEST, "boot_args": "blkbench"},
        "drives": [{
            "drive_id": "rootfs",
            "path_on_host": image,
            "is_root_device": true,
            "is_read_only": false,
            "cache_type": "Writeback",
            "io_engine": engine
        }],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128}
    });
    let p = dir.join(format!("vm-{engine}.json"));
    std::fs::write(&p, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let mut child = vmm
        .command()
        .args(["--no-api", "--boot-timer", "--config-file"])
        .arg(&p)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // A hang guard: the guest's own requests time out after 5 s each.
    let pid = child.id();
    let guard = HangGuard::new(pid, Duration::from_secs(300));
    let mut out = String::new();
    let _ = child.stdout.take().unwrap().read_to_string(&mut out);
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    let status = child.wait().expect("wait");
    drop(guard);
    match parse_blkbench(&out) {
        Some(v) if status.success() => Ok(v),
        _ => Err(format!(
            "{engine}: {status}; stdout tail: {}; stderr tail: {}",
            tail(&out),
            tail(&err)
        )),
    }
}

/// Kills our child `pid` (not yet waited for) if it outlives `limit`: a hung guest must not
/// hang the bench. Stops watching when dropped, which the caller does after waiting.
struct HangGuard {
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HangGuard {
    fn new(pid: u32, limit: Duration) -> HangGuard {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let thread = std::thread::spawn(move || {
            let t = Instant::now();
            while !flag.load(Ordering::SeqCst) {
                if t.elapsed() > limit {
                    // SAFETY: signalling our own child, which has not been waited for yet.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        HangGuard {
            done,
            thread: Some(thread),
        }
    }
}

impl Drop for HangGuard {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

/// Scenario 7 (only with `--only devices`): the guest's block throughput with the Sync and
/// Async io_engines against the host's own sequential pass over the same 64 MiB file.
fn devices(vmm: &Vmm, report: &mut Report, host: bool) {
    let dir = tmpdir("dev");
    let image = dir.join("disk.img");
    // Creates the image (real data, not sparse) and measures the host on it.
    let (hr, hw) = host_seq(&image);
    for engine in ["Sync", "Async"] {
        settle();
        match guest_blkbench(vmm, &dir, &image, engine) {
            Ok((r, w, i)) => {
                report.add(
                    DEV_SCENARIO,
                    &format!("seqread, {engine}"),
                    "MB/s",
                    &vmm.name,
                    r,
                );
                report.add(
                    DEV_SCENARIO,
                    &format!("seqwrite + FLUSH, {engine}"),
                    "MB/s",
                    &vmm.name,
                    w,
                );
                report.add(
                    "7. block (guest, 4 KiB random read)",
                    &format!("randread, {engine}"),
                    "IOPS",
                    &vmm.name,
                    i,
                );
            }
            Err(e) => report.notes.push(format!("{}: blkbench {e}", vmm.name)),
        }
    }
    if host {
        report.add(
            DEV_SCENARIO,
            "seqread, host's own (page cache)",
            "MB/s",
            &vmm.name,
            hr,
        );
        report.add(
            DEV_SCENARIO,
            "seqwrite + fsync, host's own",
            "MB/s",
            &vmm.name,
            hw,
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Median of one row of scenario 7 for `vmm`.
fn dev_median(report: &Report, metric: &str, vmm: &str) -> Option<f64> {
    let r = report
        .rows
        .iter()
        .find(|r| r.scenario == DEV_SCENARIO && r.metric == metric)?;
    Some(r.by_vmm.get(vmm)?.median())
}

// ---- Scenario 8: network (only with `--only net`) ----

/// Scenario 8 labels and the frame sizes measured.
const NET_SCENARIO: &str = "8. net (guest <-> TAP)";
const NET_FRAMES: [(usize, &str); 2] = [(1514, "1514-byte"), (65535, "65535-byte")];
const NET_GUEST_MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x10, 0x00, 0x02];
const NET_HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0xaa];
const NET_ETHERTYPE: u16 = 0x88b5;
/// How long the host injects frames into the TAP.
const NET_SEND: Duration = Duration::from_secs(1);
/// Frames the host lets wait in the TAP's queue (its ring holds 1000) before it waits for the
/// VMM to read some: a sender that ran ahead would only fill the ring and lose frames.
const NET_WINDOW: u64 = 512;
/// Frames per sendmmsg.
const NET_BURST: usize = 32;

fn run_ok(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace of our own with `tap0` (MTU 65521, up, no IPv6 chatter), deleted when
/// dropped: every frame of scenario 8 stays inside it.
struct Netns(String);

impl Netns {
    fn new() -> Result<Netns, String> {
        static N: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "ember-bench-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        run_ok(&["ip", "netns", "add", &name])?;
        let ns = Netns(name);
        let n = ns.0.as_str();
        run_ok(&[
            "ip",
            "netns",
            "exec",
            n,
            "sysctl",
            "-qw",
            "net.ipv6.conf.default.disable_ipv6=1",
        ])?;
        run_ok(&["ip", "-n", n, "tuntap", "add", "dev", "tap0", "mode", "tap"])?;
        run_ok(&["ip", "-n", n, "link", "set", "tap0", "mtu", "65521", "up"])?;
        Ok(ns)
    }

    /// tap0's (rx packets, rx bytes): what the VMM wrote into it.
    fn tap_rx(&self) -> Option<(u64, u64)> {
        let out = run_ok(&[
            "ip", "-n", &self.0, "-s", "-j", "link", "show", "dev", "tap0",
        ])
        .ok()?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        let rx = &v[0]["stats64"]["rx"];
        Some((rx["packets"].as_u64()?, rx["bytes"].as_u64()?))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.0])
            .stdin(Stdio::null())
            .status();
    }
}

/// On-CPU time (ns, from schedstat) of `pid`'s threads other than its vCPUs: the VMM's own
/// work (device emulation, event loop, API), not the guest's.
fn vmm_cpu_ns(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    let mut ns = 0;
    for t in dir.flatten() {
        let p = t.path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        if comm.starts_with("ember_vcpu") || comm.starts_with("fc_vcpu") {
            continue;
        }
        ns += std::fs::read_to_string(p.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
    }
    ns
}

/// The numbers in a guest result line after `prefix`.
fn numbers_after(line: &str, prefix: &str) -> Vec<f64> {
    line.split(prefix)
        .nth(1)
        .unwrap_or("")
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|t| t.parse().ok())
        .collect()
}

fn check_fd(r: libc::c_int, what: &str) -> Result<libc::c_int, String> {
    if r < 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(r)
}

/// tap0's TX packet count (frames the VMM read from it) as this thread's namespace sees it.
fn tap_tx_packets() -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap_or_default();
    text.lines()
        .find_map(|l| l.trim_start().strip_prefix("tap0:"))
        .and_then(|rest| rest.split_whitespace().nth(9)?.parse().ok())
        .unwrap_or(0)
}

/// In `ns`: an AF_PACKET socket on tap0, then (on `go`) frames of `len` bytes to the guest
/// for NET_SEND, at most NET_WINDOW of them waiting in the TAP. Returns the frames sent.
fn inject_frames(
    ns: String,
    len: usize,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
    go: std::sync::mpsc::Receiver<()>,
) -> u64 {
    let setup = || -> Result<(libc::c_int, libc::sockaddr_ll), String> {
        let nsf = std::fs::File::open(format!("/var/run/netns/{ns}")).map_err(|e| e.to_string())?;
        // SAFETY: a namespace fd; only this helper thread changes namespace.
        check_fd(
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&nsf), libc::CLONE_NEWNET) },
            "setns",
        )?;
        let proto = NET_ETHERTYPE.to_be() as libc::c_int;
        // SAFETY: plain socket creation.
        let fd = check_fd(
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) },
            "socket(AF_PACKET)",
        )?;
        let one: libc::c_int = 1;
        // SAFETY: an int option (PACKET_QDISC_BYPASS) on our socket. Best effort.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_PACKET,
                20,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c"tap0".as_ptr()) } as libc::c_int;
        if ifindex <= 0 {
            return Err("no tap0 in the namespace".into());
        }
        // SAFETY: zeroed sockaddr_ll is valid; filled below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = NET_ETHERTYPE.to_be();
        sll.sll_ifindex = ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&NET_GUEST_MAC);
        Ok((fd, sll))
    };
    let (fd, sll) = match setup() {
        Ok(v) => {
            let _ = ready.send(Ok(()));
            v
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return 0;
        }
    };
    let mut frame = vec![0u8; len];
    frame[..6].copy_from_slice(&NET_GUEST_MAC);
    frame[6..12].copy_from_slice(&NET_HOST_MAC);
    frame[12..14].copy_from_slice(&NET_ETHERTYPE.to_be_bytes());
    let mut sent = 0u64;
    // One sendmmsg of NET_BURST frames at a time, all the same buffer and address.
    let mut iov = libc::iovec {
        iov_base: frame.as_mut_ptr().cast(),
        iov_len: len,
    };
    // SAFETY: zeroed mmsghdr is valid; filled below.
    let mut msgs: Vec<libc::mmsghdr> = (0..NET_BURST)
        .map(|_| unsafe { std::mem::zeroed() })
        .collect();
    for m in &mut msgs {
        m.msg_hdr.msg_name = (&sll as *const libc::sockaddr_ll).cast_mut().cast();
        m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        m.msg_hdr.msg_iov = &mut iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    if go.recv().is_ok() {
        let base = tap_tx_packets();
        // Frames the VMM has read, as last looked up (reading it costs a /proc read).
        let mut done = 0u64;
        let t = Instant::now();
        while t.elapsed() < NET_SEND {
            if sent - done.min(sent) < NET_WINDOW {
                // SAFETY: NET_BURST live headers pointing to the live frame and address.
                let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), NET_BURST as u32, 0) };
                sent += n.max(0) as u64;
                continue;
            }
            done = tap_tx_packets().saturating_sub(base);
            if sent - done.min(sent) >= NET_WINDOW {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }
    // SAFETY: our own socket, closed once.
    unsafe { libc::close(fd) };
    sent
}

/// One boot of the guest's `netbench=<len>` in a fresh namespace.
struct NetRun {
    /// Frames, bytes (Ethernet frames, no virtio header), seconds, VMM CPU seconds.
    tx: (f64, f64, f64, f64),
    rx: (f64, f64, f64, f64),
    /// Frames the host injected.
    offered: u64,
    /// When tap0 did not see what the guest says it sent.
    note: Option<String>,
}

fn guest_netbench(vmm: &Vmm, dir: &Path, len: usize) -> Result<NetRun, String> {
    let ns = Netns::new()?;
    let mac = NET_GUEST_MAC.map(|b| format!("{b:02x}")).join(":");
    let cfg = serde_json::json!({
        "boot-source": {"kernel_image_path": GUEST, "boot_args": format!("netbench={len}")},
        "drives": [],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": mac}]
    });
    let p = dir.join(format!("vm-net-{len}.json"));
    std::fs::write(&p, serde_json::to_vec(&cfg).unwrap()).unwrap();

    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel();
    let name = ns.0.clone();
    let sender = std::thread::spawn(move || inject_frames(name, len, ready_tx, go_rx));
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| "the frame injector did not start".to_string())??;

    // `ip netns exec` execs the VMM: the child's pid is the VMM's.
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(&vmm.bin)
        .args(&vmm.args)
        .args(["--no-api", "--boot-timer", "--config-file"])
        .arg(&p)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    let pid = child.id();
    let guard = HangGuard::new(pid, Duration::from_secs(120));
    let mut err = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut out = String::new();
    let (mut cpu_tx, mut cpu_rx, mut tap0) = (0u64, 0u64, None);
    let (mut tx, mut rx) = (None, None);
    let mut note = None;
    let mut go = Some(go_tx);
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let Ok(line) = line else { break };
        if line.contains("netbench: tx start") {
            tap0 = ns.tap_rx();
            cpu_tx = vmm_cpu_ns(pid);
        } else if line.contains("netbench: tx ") {
            let cpu = vmm_cpu_ns(pid).saturating_sub(cpu_tx);
            let n = numbers_after(&line, "netbench: tx ");
            let tap = ns.tap_rx();
            if let ([f, b, us], Some((p0, b0)), Some((p1, b1))) = (&n[..], tap0, tap) {
                if (p1 - p0) as f64 != *f || (b1 - b0) as f64 != *b {
                    note = Some(format!(
                        "netbench={len}: the guest sent {f} frames / {b} bytes, tap0 got {} / {}",
                        p1 - p0,
                        b1 - b0
                    ));
                }
                tx = Some((
                    (p1 - p0) as f64,
                    (b1 - b0) as f64,
                    us / 1e6,
                    cpu as f64 / 1e9,
                ));
            }
        } else if line.contains("netbench: rx ready") {
            cpu_rx = vmm_cpu_ns(pid);
            if let Some(g) = go.take() {
                let _ = g.send(());
            }
        } else if line.contains("netbench: rx ") {
            let cpu = vmm_cpu_ns(pid).saturating_sub(cpu_rx);
            if let [f, b, us] = numbers_after(&line, "netbench: rx ")[..] {
                rx = Some((f, b, us / 1e6, cpu as f64 / 1e9));
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    drop(go);
    let status = child.wait().map_err(|e| e.to_string())?;
    drop(guard);
    let err = err_reader.join().unwrap_or_default();
    let offered = sender.join().unwrap_or(0);
    match (tx, rx) {
        (Some(tx), Some(rx)) if status.success() => Ok(NetRun {
            tx,
            rx,
            offered,
            note,
        }),
        _ => Err(format!(
            "netbench={len}: {status}; stdout tail: {}; stderr tail: {}",
            tail(&out),
            tail(&err)
        )),
    }
}

/// Scenario 8 (only with `--only net`, needs root): guest -> TAP and TAP -> guest with
/// 1514-byte (MTU 1500) and 65535-byte frames (the TAP's MTU raised to its maximum, 65521; plain jumbo
/// frames, no segmentation offload): packets/s, Gbit/s (Ethernet frame bytes) and the VMM
/// threads' CPU time (vCPU threads excluded) per Gbit moved.
fn net(vmm: &Vmm, report: &mut Report) {
    let dir = tmpdir("net");
    for (len, label) in NET_FRAMES {
        settle();
        match guest_netbench(vmm, &dir, len) {
            Ok(r) => {
                for (what, (frames, bytes, secs, cpu)) in
                    [("guest -> TAP", r.tx), ("TAP -> guest", r.rx)]
                {
                    let gbit = bytes * 8.0 / 1e9;
                    let row = |m: &str| format!("{what}, {label} frames, {m}");
                    report.add(
                        NET_SCENARIO,
                        &row("packets/s"),
                        "pps",
                        &vmm.name,
                        frames / secs,
                    );
                    report.add(
                        NET_SCENARIO,
                        &row("throughput"),
                        "Gbit/s",
                        &vmm.name,
                        gbit / secs,
                    );
                    if gbit > 0.0 {
                        report.add(
                            NET_SCENARIO,
                            &row("VMM CPU per Gbit"),
                            "ms",
                            &vmm.name,
                            cpu * 1e3 / gbit,
                        );
                    }
                }
                report
                    .notes
                    .extend(r.note.map(|n| format!("{}: {n}", vmm.name)));
                if r.offered > 0 {
                    report.add(
                        NET_SCENARIO,
                        &format!("TAP -> guest, {label} frames, delivered / injected"),
                        "%",
                        &vmm.name,
                        r.rx.0 * 100.0 / r.offered as f64,
                    );
                }
            }
            Err(e) => report.notes.push(format!("{}: {e}", vmm.name)),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- Scenario 9: vsock (only with `--only vsock`) ----

const VSOCK_SCENARIO: &str = "9. vsock (guest <-> host Unix socket)";
/// MiB moved in each direction.
const VSOCK_MIB: usize = 256;

/// (bytes, seconds, VMM CPU seconds) of each direction of one `vsockbench` boot.
type VsockRun = ((f64, f64, f64), (f64, f64, f64));

fn guest_vsockbench(vmm: &Vmm, dir: &Path) -> Result<VsockRun, String> {
    use std::os::unix::net::UnixStream;
    let uds = dir.join("v.sock");
    let _ = std::fs::remove_file(&uds);
    let cfg = serde_json::json!({
        "boot-source": {"kernel_image_path": GUEST, "boot_args": format!("vsockbench={VSOCK_MIB}")},
        "drives": [],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "vsock": {"guest_cid": 3, "uds_path": uds}
    });
    let p = dir.join("vm-vsock.json");
    std::fs::write(&p, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let mut child = vmm
        .command()
        .args(["--no-api", "--boot-timer", "--config-file"])
        .arg(&p)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    let pid = child.id();
    let guard = HangGuard::new(pid, Duration::from_secs(180));
    let mut err = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut out = String::new();
    let mut cpu0 = 0u64;
    let (mut rx, mut tx) = (None, None);
    let mut host: Option<std::thread::JoinHandle<Result<u64, String>>> = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let Ok(line) = line else { break };
        if line.contains("vsockbench: listening") && host.is_none() {
            cpu0 = vmm_cpu_ns(pid);
            let uds = uds.clone();
            // Connects to port 5000, sends VSOCK_MIB MiB, half-closes, and reads what the
            // guest sends back until EOF.
            host = Some(std::thread::spawn(move || -> Result<u64, String> {
                let s = UnixStream::connect(&uds).map_err(|e| format!("connect: {e}"))?;
                s.set_read_timeout(Some(Duration::from_secs(60)))
                    .map_err(|e| e.to_string())?;
                (&s).write_all(b"CONNECT 5000\n")
                    .map_err(|e| e.to_string())?;
                let mut ok = Vec::new();
                let mut b = [0u8; 1];
                while ok.last() != Some(&b'\n') {
                    match (&s).read(&mut b) {
                        Ok(1) => ok.push(b[0]),
                        _ => return Err(format!("no OK line: {ok:?}")),
                    }
                }
                let w = s.try_clone().map_err(|e| e.to_string())?;
                let writer = std::thread::spawn(move || {
                    let chunk = vec![0x5au8; 256 << 10];
                    for _ in 0..(VSOCK_MIB << 20) / chunk.len() {
                        if (&w).write_all(&chunk).is_err() {
                            return;
                        }
                    }
                    let _ = w.shutdown(std::net::Shutdown::Write);
                });
                let mut buf = vec![0u8; 256 << 10];
                let mut got = 0u64;
                loop {
                    match (&s).read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => got += n as u64,
                        Err(e) => return Err(format!("read after {got} bytes: {e}")),
                    }
                }
                let _ = writer.join();
                Ok(got)
            }));
        } else if line.contains("vsockbench: rx ") {
            let cpu = vmm_cpu_ns(pid);
            if let [b, us] = numbers_after(&line, "vsockbench: rx ")[..] {
                rx = Some((b, us / 1e6, cpu.saturating_sub(cpu0) as f64 / 1e9));
            }
            cpu0 = cpu;
        } else if line.contains("vsockbench: tx ") {
            let cpu = vmm_cpu_ns(pid);
            if let [b, us] = numbers_after(&line, "vsockbench: tx ")[..] {
                tx = Some((b, us / 1e6, cpu.saturating_sub(cpu0) as f64 / 1e9));
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    drop(guard);
    let err = err_reader.join().unwrap_or_default();
    let host = host.map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())));
    let _ = std::fs::remove_file(&uds);
    match (rx, tx, host) {
        (Some(rx), Some(tx), Some(Ok(got))) if status.success() && got as f64 == tx.0 => {
            Ok((rx, tx))
        }
        (_, _, host) => Err(format!(
            "vsockbench: {status}; host side: {host:?}; stdout tail: {}; stderr tail: {}",
            tail(&out),
            tail(&err)
        )),
    }
}

/// Scenario 9 (only with `--only vsock`): bulk transfer over one vsock stream connection,
/// host -> guest then guest -> host, VSOCK_MIB MiB each way, through the hybrid Unix-socket
/// backend: Gbit/s of payload and the VMM threads' CPU time per Gbit.
fn vsock(vmm: &Vmm, report: &mut Report) {
    let dir = tmpdir("vsock");
    settle();
    match guest_vsockbench(vmm, &dir) {
        Ok((rx, tx)) => {
            for (what, (bytes, secs, cpu)) in [("host -> guest", rx), ("guest -> host", tx)] {
                let gbit = bytes * 8.0 / 1e9;
                report.add(
                    VSOCK_SCENARIO,
                    &format!("{what}, throughput"),
                    "Gbit/s",
                    &vmm.name,
                    gbit / secs,
                );
                if gbit > 0.0 {
                    report.add(
                        VSOCK_SCENARIO,
                        &format!("{what}, VMM CPU per Gbit"),
                        "ms",
                        &vmm.name,
                        cpu * 1e3 / gbit,
                    );
                }
            }
        }
        Err(e) => report.notes.push(format!("{}: {e}", vmm.name)),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

type Scenario<'a> = Box<dyn Fn(&Vmm, &mut Report) + 'a>;

/// An idle KVM VM (no memory, no vCPU) held for the whole run. A host that runs VMs always
/// has one; with none, KVM's first VM sets up host-wide state (it turns on the scheduler's
/// preempt-notifier static key, patching kernel text on every CPU) and the last one takes it
/// down again, ~0.2 ms of CPU per boot here that a busy host never pays. `--idle-host`
/// measures that case.
fn hold_host_vm() -> Option<(kvm_ioctls::Kvm, kvm_ioctls::VmFd)> {
    let kvm = kvm_ioctls::Kvm::new().ok()?;
    let vm = kvm.create_vm().ok()?;
    Some((kvm, vm))
}

fn main() {
    // Scenario 12's minimal KVM program is this binary run again.
    if std::env::args().nth(1).as_deref() == Some("--kvm-floor") {
        match floor::run() {
            Ok(()) => std::process::exit(0),
            Err(e) => {
                eprintln!("minimal KVM program: {e}");
                std::process::exit(1)
            }
        }
    }
    let o = parse_opts();
    let host_vm = (!o.idle_host).then(hold_host_vm).flatten();
    // Orphans of the VMMs we start (teardown helpers) become our children, so we can wait for
    // them and count them.
    // SAFETY: prctl on our own process.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
    let want = |s: &str| o.only.as_ref().is_none_or(|l| l.iter().any(|x| x == s));
    let mut vmms = vec![Vmm {
        name: "ember".into(),
        bin: PathBuf::from(EMBER),
        args: Vec::new(),
    }];
    if let Some(p) = &o.peer {
        vmms.push(Vmm {
            name: "peer".into(),
            bin: p.clone(),
            args: o.peer_args.clone(),
        });
    }
    let mut report = Report {
        rows: Vec::new(),
        boot_ms: BTreeMap::new(),
        launch: Vec::new(),
        notes: Vec::new(),
    };
    report.notes.push(if host_vm.is_some() {
        "the bench holds one idle KVM VM for the whole run, as a host that runs VMs has one \
         (--idle-host: without it, every VM is the host's first and pays KVM's host-wide set-up)"
            .into()
    } else {
        "idle host: no other KVM VM exists while a measured VM starts (--idle-host)".into()
    });
    // Scenario by scenario; within one, runs alternate between the VMMs (A, B, A, B, ...).
    let scenarios: Vec<(&str, Scenario)> = vec![
        (
            "whole",
            Box::new(|v: &Vmm, r: &mut Report| {
                whole_process(v, r, WHOLE, true);
            }),
        ),
        ("socket", Box::new(exec_to_socket)),
        ("api", Box::new(api_boot)),
        (
            "memory",
            Box::new(|v: &Vmm, r: &mut Report| {
                for (mem, vcpus) in [(128, 1), (128, 2), (1024, 1), (1024, 2)] {
                    settle();
                    memory(v, r, mem, vcpus);
                }
            }),
        ),
        (
            "jailer",
            Box::new(|v: &Vmm, r: &mut Report| {
                if let Some(j) = &o.jailer {
                    jailer_to_socket(v, j, r);
                }
            }),
        ),
    ];
    for (name, run) in &scenarios {
        if !want(name) {
            continue;
        }
        quiesce();
        for _ in 0..o.runs {
            for v in &vmms {
                settle();
                run(v, &mut report);
            }
        }
    }
    if want("warm") {
        quiesce();
        // Three unrecorded rounds first, so the first recorded run is as warm as the rest.
        // A run's teardown helper may still work while the next VMM starts, as on a host
        // starting VMs one after another; its CPU joins its own run's row once it is gone.
        let mut pending: Vec<(String, Boot, bool)> = Vec::new();
        let mut scratch = Report::default();
        for round in 0..o.runs + 3 {
            for v in &vmms {
                pending.retain_mut(|(name, b, keep)| {
                    let r = if *keep { &mut report } else { &mut scratch };
                    !add_cpu(r, WHOLE_WARM, "", name, b, false)
                });
                let keep = round >= 3;
                let r = if keep { &mut report } else { &mut scratch };
                if let Some(b) = whole_process(v, r, WHOLE_WARM, false) {
                    pending.push((v.name.clone(), b, keep));
                }
            }
        }
        for (name, mut b, keep) in pending {
            let r = if keep { &mut report } else { &mut scratch };
            add_cpu(r, WHOLE_WARM, "", &name, &mut b, true);
        }
    }
    if want("seccomp") {
        quiesce();
        // A VMM whose own arguments already choose its filters cannot be measured both ways.
        let (both, fixed): (Vec<&Vmm>, Vec<&Vmm>) = vmms.iter().partition(|v| {
            !v.args
                .iter()
                .any(|a| a == "--no-seccomp" || a == "--seccomp-filter")
        });
        for v in fixed {
            report.notes.push(format!(
                "11. seccomp: {} not measured, its arguments already set its filters",
                v.name
            ));
        }
        // Spaced out like scenario 1; which of the pair goes first alternates.
        for run in 0..o.runs {
            for v in &both {
                for filters in [run % 2 == 0, run % 2 == 1] {
                    settle();
                    seccomp_cost(v, &mut report, filters);
                }
            }
        }
        for v in &both {
            seccomp_ratios(v, &mut report);
        }
    }
    if want("floors") {
        quiesce();
        for _ in 0..o.runs {
            for v in &vmms {
                floors(v, &mut report);
            }
        }
        for v in &vmms {
            floors_split(v, &mut report);
        }
    }
    // Launches before the device scenarios: their fsyncs and bulk transfers leave the host
    // busier (writeback, reclaim) for a while, which showed as a 20% lower launch rate.
    if want("launch") {
        quiesce();
        for &n in &o.launch {
            let mut rates: Vec<Vec<f64>> = vec![Vec::new(); vmms.len()];
            for _ in 0..o.launch_runs {
                for (i, v) in vmms.iter().enumerate() {
                    settle();
                    rates[i].push(launch_rate(v, &mut report, n));
                }
            }
            for (v, mut r) in vmms.iter().zip(rates) {
                r.sort_by(f64::total_cmp);
                report.launch.push((v.name.clone(), n, r[r.len() / 2]));
            }
        }
    }
    // Scenario 7 only when asked for by name: it writes 64 MiB several times per run.
    if o.only
        .as_ref()
        .is_some_and(|l| l.iter().any(|x| x == "devices"))
    {
        quiesce();
        for _ in 0..o.runs {
            for (k, v) in vmms.iter().enumerate() {
                settle();
                devices(v, &mut report, k == 0);
            }
        }
        let host = &vmms[0].name;
        for v in &vmms {
            for (what, guest, own) in [
                (
                    "seqread",
                    "seqread, Async",
                    "seqread, host's own (page cache)",
                ),
                (
                    "seqwrite",
                    "seqwrite + FLUSH, Async",
                    "seqwrite + fsync, host's own",
                ),
            ] {
                if let (Some(g), Some(h)) = (
                    dev_median(&report, guest, &v.name),
                    dev_median(&report, own, host),
                ) {
                    report.notes.push(format!(
                        "{}: 7. block: {what} Async / host = {:.2} (medians {} / {} MB/s)",
                        v.name,
                        g / h,
                        fmt(g),
                        fmt(h)
                    ));
                }
            }
        }
        report.notes.push(
            "7. block: the guest keeps 16 requests in flight (blkbench: polled driver, \
             interrupts off, VIRTIO_RING_F_EVENT_IDX: it notifies only when the device asks); \
             64 MiB image, cache_type Writeback; the host's read follows its own write, so it \
             is served from the page cache, as are most of the guest's reads"
                .into(),
        );
    }
    let asked = |s: &str| o.only.as_ref().is_some_and(|l| l.iter().any(|x| x == s));
    // Scenario 8 only when asked for by name: it needs root (a network namespace, a TAP).
    if asked("net") {
        quiesce();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("!!! 8. net needs root (network namespaces, TAP devices): not run");
            report.notes.push("8. net: not run (needs root)".into());
        } else {
            for _ in 0..o.runs {
                for v in &vmms {
                    net(v, &mut report);
                }
            }
            report.notes.push(format!(
                "8. net: the guest keeps its TX ring (up to 64 frames, EVENT_IDX) full for 1 s; \
                 the host injects frames into the TAP with an AF_PACKET socket for {} s, at most \
                 {NET_WINDOW} waiting in the TAP; Gbit/s counts Ethernet frame bytes; VMM CPU \
                 is the on-CPU time of the VMM's threads other than the vCPUs (whose guest spins \
                 on its rings); 64 KiB frames are jumbo frames (TAP MTU 65521, its maximum), not GSO",
                NET_SEND.as_secs()
            ));
        }
    }
    // Scenario 9 only when asked for by name.
    if asked("vsock") {
        quiesce();
        for _ in 0..o.runs {
            for v in &vmms {
                vsock(v, &mut report);
            }
        }
        report.notes.push(format!(
            "9. vsock: one stream connection, {VSOCK_MIB} MiB host -> guest (the guest counts \
             it, crediting 1 MiB), then {VSOCK_MIB} MiB guest -> host in packets of up to 64 KiB \
             within the device's credit; timed by the guest from the first to the last RW \
             (host -> guest) and until the device reported every byte forwarded (guest -> host)"
        ));
    }
    // Scenario 10 only when asked for by name: it needs resources/scripts/get-linux-kernel.sh.
    if asked("linux") {
        quiesce();
        let images = linux_images();
        if images.is_empty() {
            report.notes.push(
                "10. Linux: not run (no kernel in resources/images: run \
                 resources/scripts/get-linux-kernel.sh)"
                    .into(),
            );
        }
        for _ in 0..o.runs {
            for v in &vmms {
                for (label, path) in &images {
                    settle();
                    linux_start(v, label, path, &mut report);
                }
            }
        }
        if !images.is_empty() {
            report.notes.push(
                "10. Linux: configured through the API (256 MiB, 1 vCPU), timed from sending \
                 InstanceStart to its answer, by which the kernel is in guest memory and the \
                 vCPU runs; the guest is not waited for"
                    .into(),
            );
        }
    }
    report.notes.sort();
    report.notes.dedup();
    let md = markdown(&report, &vmms, o.runs, o.launch_runs);
    print!("{md}");
    std::fs::create_dir_all(&o.out).expect("create the results folder");
    std::fs::write(o.out.join("results.md"), &md).expect("write results.md");
    std::fs::write(o.out.join("results.svg"), svg(&report)).expect("write results.svg");
    eprintln!("results written to {}", o.out.display());
}
