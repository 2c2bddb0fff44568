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

/// Runs ember with EMBER_TEST_SECCOMP=`which`, which must be a violation; returns the outcome.
fn violate(which: &str) -> Outcome {
    let (out, sums) = run_test_hook(which, &[("seccomp", "num_faults")]);
    assert_eq!(
        sums[0],
        1,
        "the fault is counted in the flushed metrics:\n{}",
        out.all()
    );
    out
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
    let getcwd = format!("bad syscall ({})", libc::SYS_getcwd);
    for (kind, thread) in [
        ("vmm", "main"),
        ("api", "ember_api"),
        ("vcpu", "ember_vcpu0"),
    ] {
        let out = violate(kind);
        out.expect_code(148)
            .expect(&getcwd)
            .expect(&format!("on thread {thread}"));
    }
}

#[test]
#[cfg_attr(
    not(feature = "seccomp-test"),
    ignore = "needs --features seccomp-test"
)]
fn vcpu_thread_cannot_create_a_vm() {
    if !require_kvm() {
        return;
    }
    violate("vcpu-create-vm")
        .expect_code(148)
        .expect(&format!("bad syscall ({})", libc::SYS_ioctl))
        .expect("on thread ember_vcpu0");
}

#[test]
#[cfg_attr(
    not(feature = "seccomp-test"),
    ignore = "needs --features seccomp-test"
)]
fn no_thread_kind_may_make_memory_executable() {
    if !require_kvm() {
        return;
    }
    for (kind, thread) in [
        ("vmm", "main"),
        ("api", "ember_api"),
        ("vcpu", "ember_vcpu0"),
    ] {
        for (how, nr) in [("exec", libc::SYS_mprotect), ("exec-map", libc::SYS_mmap)] {
            violate(&format!("{kind}-{how}"))
                .expect_code(148)
                .expect(&format!("bad syscall ({nr})"))
                .expect(&format!("on thread {thread}"));
        }
    }
}

#[test]
#[cfg_attr(
    not(feature = "seccomp-test"),
    ignore = "needs --features seccomp-test"
)]
fn vmm_thread_may_only_clone_threads_and_its_teardown_helper() {
    if !require_kvm() {
        return;
    }
    violate("vmm-clone")
        .expect_code(148)
        .expect(&format!("bad syscall ({})", libc::SYS_clone))
        .expect("on thread main");
}

/// A ring's operations escape seccomp: the vCPU threads, which face the guest's MMIO, may
/// submit to the drives' (restricted) rings but not make one.
#[test]
#[cfg_attr(
    not(feature = "seccomp-test"),
    ignore = "needs --features seccomp-test"
)]
fn vcpu_thread_cannot_set_up_an_io_uring() {
    if !require_kvm() {
        return;
    }
    violate("vcpu-uring")
        .expect_code(148)
        .expect(&format!("bad syscall ({})", libc::SYS_io_uring_setup))
        .expect("on thread ember_vcpu0");
}

/// The vmm thread signals only to kick its vCPU threads (and SIGABRT, for abort()).
#[test]
#[cfg_attr(
    not(feature = "seccomp-test"),
    ignore = "needs --features seccomp-test"
)]
fn vmm_thread_sends_only_the_vcpu_kick() {
    if !require_kvm() {
        return;
    }
    violate("vmm-signal")
        .expect_code(148)
        .expect(&format!("bad syscall ({})", libc::SYS_tgkill))
        .expect("on thread main");
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
    for (kind, thread) in [
        ("vmm", "main"),
        ("api", "ember_api"),
        ("vcpu", "ember_vcpu0"),
    ] {
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
