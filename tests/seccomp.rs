//! Seccomp: every thread of a running ember is filtered, and a forbidden syscall on any
//! thread kind ends the process with exit code 148 and the syscall in the log.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(t.join("status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .unwrap_or("")
            .trim()
            .to_string();
        out.push((comm.trim().to_string(), mode));
    }
    out
}

#[test]
fn every_thread_runs_filtered() {
    if !require_kvm() {
        return;
    }
    let mut vm = ApiVm::start(&["--boot-timer"]);
    let mut c = vm.client();
    api_boot(&mut c, "ticks", 2);
    vm.wait_for("tick 2");
    let pid = vm.child.as_ref().unwrap().id();
    let modes = seccomp_modes(pid);
    let names: Vec<&str> = modes.iter().map(|(n, _)| n.as_str()).collect();
    for want in ["ember_api", "ember_vcpu0", "ember_vcpu1"] {
        assert!(names.contains(&want), "no {want} thread in {names:?}");
    }
    for (name, mode) in &modes {
        assert_eq!(mode, "2", "thread {name} is not filtered: {modes:?}");
    }
    assert_eq!(vm.terminate(), 0);
}

#[test]
fn no_seccomp_turns_filters_off() {
    if !require_kvm() {
        return;
    }
    // With a running guest, so that the vCPU threads (filtered on their own) are there too.
    let mut vm = ApiVm::start(&["--no-seccomp"]);
    let mut c = vm.client();
    api_boot(&mut c, "ticks", 2);
    vm.wait_for("tick 2");
    let pid = vm.child.as_ref().unwrap().id();
    let modes = seccomp_modes(pid);
    let names: Vec<&str> = modes.iter().map(|(n, _)| n.as_str()).collect();
    for want in ["ember_api", "ember_vcpu0", "ember_vcpu1"] {
        assert!(names.contains(&want), "no {want} thread in {names:?}");
    }
    for (name, mode) in &modes {
        assert_eq!(mode, "0", "thread {name} is filtered: {modes:?}");
    }
    assert_eq!(vm.terminate(), 0);
    run(&["--no-seccomp", "--seccomp-filter", "/x.json"]).expect_code(153);
}

#[test]
fn custom_filter_file_is_used() {
    if !require_kvm() {
        return;
    }
    // The built-in policy without KVM_RUN for vCPUs: the first entry into the guest ends the
    // VM with 148.
    let policy: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/resources/seccomp/x86_64-unknown-linux-gnu.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut p = policy.clone();
    let rules = p["vcpu"]["filter"].as_array_mut().unwrap();
    rules.retain(|r| r["args"][0]["comment"] != "KVM_RUN");
    let dir = TempDir::new("seccomp");
    let file = dir.write("policy.json", serde_json::to_vec(&p).unwrap());
    let cfg = dir.write(
        "vm.json",
        serde_json::to_vec(&guest_config("hello", 1, 128)).unwrap(),
    );
    let out = run(&[
        "--no-api",
        "--seccomp-filter",
        file.to_str().unwrap(),
        "--config-file",
        cfg.to_str().unwrap(),
    ]);
    out.expect_code(148)
        .expect(&format!("bad syscall ({})", libc::SYS_ioctl))
        .expect("on thread ember_vcpu0");
    // A malformed policy is a configuration error.
    let bad = dir.write("bad.json", b"{\"vmm\": 1}");
    run(&[
        "--no-api",
        "--seccomp-filter",
        bad.to_str().unwrap(),
        "--config-file",
        cfg.to_str().unwrap(),
    ])
    .expect_code(152)
    .expect("invalid seccomp filter");
}

/// Runs ember with EMBER_TEST_SECCOMP=`which` and a ticks guest; returns the outcome and the
/// sum of each metrics field named by `fields` over the flushed metrics lines.
fn run_test_hook(which: &str, fields: &[(&str, &str)]) -> (Outcome, Vec<u64>) {
    let dir = TempDir::new("violate");
    let sock = dir.path("api.sock");
    let metrics = dir.path("metrics.json");
    let cfg = dir.write(
        "vm.json",
        serde_json::to_vec(&guest_config("ticks", 1, 128)).unwrap(),
    );
    let child = Command::new(EMBER)
        .args([
            "--api-sock",
            sock.to_str().unwrap(),
            "--config-file",
            cfg.to_str().unwrap(),
        ])
        .args(["--metrics-path", metrics.to_str().unwrap()])
        .env("EMBER_TEST_SECCOMP", which)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_with_guard(child, Duration::from_secs(30));
    let m = std::fs::read_to_string(&metrics).unwrap_or_default();
    let sums = fields
        .iter()
        .map(|(group, field)| {
            m.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter_map(|v| v[*group][*field].as_u64())
                .sum()
        })
        .collect();
    (out, sums)
}

/// Thread kinds and the names their log lines carry.
const KINDS: [(&str, &str); 3] = [
    ("vmm", "main"),
    ("api", "ember_api"),
    ("vcpu", "ember_vcpu0"),
];

/// Runs ember with EMBER_TEST_SECCOMP=`which`, which must be a violation: exit 148, syscall
/// `nr` named and counted, on `thread`.
fn violate(which: &str, nr: libc::c_long, thread: &str) {
    let (out, sums) = run_test_hook(which, &[("seccomp", "num_faults")]);
    out.expect_code(148)
        .expect(&format!("bad syscall ({nr})"))
        .expect(&format!("on thread {thread}"));
    assert_eq!(
        sums[0],
        1,
        "the fault is counted in the flushed metrics:\n{}",
        out.all()
    );
}

#[test]
#[cfg_attr(
    not(feature = "seccomp-test"),
    ignore = "needs --features seccomp-test"
)]
fn forbidden_syscall_on_each_thread_kind_exits_148() {
    if !require_kvm() {
        return;
    }
    for (kind, thread) in KINDS {
        violate(kind, libc::SYS_getcwd, thread);
    }
}

/// Rules pinned on arguments, one trigger each (see `violate_on_request` in src/seccomp):
/// a vCPU thread may not create a VM, nor set up an io_uring (a ring's operations escape
/// seccomp; the drives' rings, restricted, are made on the vmm thread); the vmm thread clones
/// only threads and its teardown helper and signals only to kick its vCPUs (or SIGABRT); no
/// thread may map or turn memory executable.
#[test]
#[cfg_attr(
    not(feature = "seccomp-test"),
    ignore = "needs --features seccomp-test"
)]
fn argument_rules_hold_on_every_thread() {
    if !require_kvm() {
        return;
    }
    violate("vcpu-create-vm", libc::SYS_ioctl, "ember_vcpu0");
    violate("vcpu-uring", libc::SYS_io_uring_setup, "ember_vcpu0");
    violate("vmm-clone", libc::SYS_clone, "main");
    violate("vmm-signal", libc::SYS_tgkill, "main");
    for (kind, thread) in KINDS {
        violate(&format!("{kind}-exec"), libc::SYS_mprotect, thread);
        violate(&format!("{kind}-exec-map"), libc::SYS_mmap, thread);
    }
}

/// A panic on any thread kind is a panic, not a seccomp violation: the hook logs it and
/// counts it, and abort() may raise SIGABRT through every filter, so the process ends by
/// SIGABRT (as Firecracker's does) rather than exit 148.
#[test]
#[cfg_attr(
    not(feature = "seccomp-test"),
    ignore = "needs --features seccomp-test"
)]
fn a_panic_on_any_thread_ends_by_sigabrt_not_as_a_violation() {
    use std::os::unix::process::ExitStatusExt;
    if !require_kvm() {
        return;
    }
    for (kind, thread) in KINDS {
        let (out, sums) = run_test_hook(
            &format!("{kind}-panic"),
            &[("seccomp", "num_faults"), ("vmm", "panic_count")],
        );
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGABRT),
            "{kind}: {:?}\n{}",
            out.status,
            out.all()
        );
        out.expect(&format!(
            "[anonymous-instance:{thread}:ERROR] ember panicked"
        ));
        assert_eq!(sums, vec![0, 1], "{kind}: faults, panics\n{}", out.all());
    }
}
