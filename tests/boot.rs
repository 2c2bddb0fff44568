//! Boots the test guest with the `ember` binary and checks what the guest reported and how
//! ember exited.

mod common;

use common::*;
use std::time::Duration;

fn hello(vcpus: u8) {
    if !require_kvm() {
        return;
    }
    let out = boot(&guest_config("hello", vcpus, 128));
    out.expect_code(0)
        .expect(&format!("vCPUs: {vcpus}, memory: 128 MiB"))
        .expect("ember-guest: done")
        .expect("Guest-boot-time =");
}

#[test]
fn hello_1_vcpu() {
    hello(1);
}

#[test]
fn hello_2_vcpus() {
    hello(2);
}

#[test]
fn hello_4_vcpus() {
    hello(4);
}

#[test]
fn smp_every_vcpu_reports_in() {
    if !require_kvm() {
        return;
    }
    let out = boot(&guest_config("smp", 4, 128));
    out.expect_code(0).expect("smp: 4 of 4 vCPUs online");
    for id in 1..4 {
        out.expect(&format!("smp: cpu {id} online"));
    }
}

#[test]
fn memory_128_mib_verified() {
    if !require_kvm() {
        return;
    }
    boot(&guest_config("mem=128", 1, 128))
        .expect_code(0)
        .expect("mem: 128 MiB ok");
}

#[test]
fn memory_4_gib_above_the_hole_verified() {
    if !require_kvm() {
        return;
    }
    boot(&guest_config("mem=4096", 1, 4096))
        .expect_code(0)
        .expect("mem: 4096 MiB ok");
}

#[test]
fn triple_fault_is_reported_and_exits_non_zero() {
    if !require_kvm() {
        return;
    }
    let out = boot(&guest_config("panic", 1, 128));
    out.expect("panic: triple fault now")
        .expect("KVM_EXIT_SHUTDOWN");
    // Where it happened: the panic scenario ends in `ud2` (0f 0b).
    out.expect("at RIP 0x").expect("instruction bytes: 0f 0b");
    assert_ne!(out.code(), 0, "a triple fault must not exit 0");
    // `ember run` logs nothing before the guest runs, so the vCPU thread logs first, under
    // its filter: the log's first timestamp must not need a file (148 and SIGSYS if it did).
    let out = run(&["run", "--kernel", GUEST, "--cmdline", "panic"]);
    out.expect("KVM_EXIT_SHUTDOWN").expect_code(1);
}

#[test]
fn wild_accesses_are_logged_and_ignored() {
    if !require_kvm() {
        return;
    }
    let out = boot(&guest_config("wild", 1, 128));
    out.expect_code(0)
        .expect("Unhandled MMIO")
        .expect("Unhandled PIO")
        .expect("wild: survived")
        .expect("ember-guest: done");
    // `wild` also signals the boot timer 1000 times (then once more at the end): logged,
    // but rate-limited (10 a second), not a line each.
    let logged = out.all().matches("Guest-boot-time =").count();
    assert!((1..=21).contains(&logged), "{logged} boot-time lines");
}

/// 20,000 random port and MMIO accesses of every width (`fuzzio`): COM1, the i8042, the PIT
/// and PICs, any port, the boot timer, unbacked memory and the 32-bit hole. The guest goes on
/// to greet normally, and the VMM's log, which a guest can otherwise fill, stays short.
#[test]
fn random_port_and_mmio_accesses_are_survived_quietly() {
    if !require_kvm() {
        return;
    }
    for seed in 1..=3u64 {
        let dir = TempDir::new("fuzzio");
        let metrics = dir.path("metrics.json");
        let disk = dir.write("disk.img", vec![0u8; 1 << 20]);
        let mut cfg = guest_config(&format!("fuzzio={seed} hello"), 1, 128);
        // A virtio window the accesses must keep out of (fuzzdev's business).
        cfg["drives"] = serde_json::json!([{"drive_id": "rootfs", "path_on_host": disk,
            "is_root_device": true, "is_read_only": false}]);
        let path = dir.write("vm.json", serde_json::to_vec(&cfg).unwrap());
        let out = run(&[
            "--no-api",
            "--config-file",
            path.to_str().unwrap(),
            "--metrics-path",
            metrics.to_str().unwrap(),
        ]);
        out.expect_code(0)
            .expect(&format!("fuzzio: 20000 rounds, seed {seed}"))
            .expect("fuzzio: survived")
            .expect("Hello from the ember guest!")
            .expect("ember-guest: done");
        let m = std::fs::read_to_string(&metrics).unwrap_or_default();
        let unhandled: u64 = m
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| {
                v["vcpu"]["unhandled_io"].as_u64().unwrap_or(0)
                    + v["vcpu"]["unhandled_mmio"].as_u64().unwrap_or(0)
            })
            .sum();
        let logged = out.all().matches("Unhandled").count() as u64;
        assert!(
            unhandled > 5000,
            "seed {seed}: {unhandled} unhandled accesses counted:\n{m}"
        );
        assert!(
            logged < unhandled / 10,
            "seed {seed}: {logged} log lines for {unhandled} unhandled accesses"
        );
    }
}

#[test]
fn initrd_is_placed_and_read_back() {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("initrd");
    // Not a multiple of the page size, so placement and size are both checked.
    let data: Vec<u8> = (0..300_001u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let initrd = dir.write("initrd.img", &data);
    let mut cfg = guest_config("initrd", 1, 128);
    cfg["boot-source"]["initrd_path"] = initrd.to_str().unwrap().into();
    boot(&cfg).expect_code(0).expect(&format!(
        "initrd: size={} fnv1a64={:016x}",
        data.len(),
        fnv1a64(&data)
    ));
}

#[test]
fn command_line_of_2048_bytes_with_its_nul_is_accepted() {
    if !require_kvm() {
        return;
    }
    let mut line = String::from("hello ");
    line.push_str(&"x".repeat(2047 - line.len()));
    assert_eq!(line.len() + 1, 2048);
    boot(&guest_config(&line, 1, 128))
        .expect_code(0)
        .expect("ember-guest: cmdline 2047 bytes");
}

#[test]
fn command_line_of_2049_bytes_is_refused() {
    if !require_kvm() {
        return;
    }
    let line = format!("hello {}", "x".repeat(2048 - 6));
    assert_eq!(line.len() + 1, 2049);
    let out = boot(&guest_config(&line, 1, 128));
    out.expect_code(152).expect("2049").expect("2048");
}

#[test]
fn missing_kernel_is_a_clear_error() {
    let mut cfg = guest_config("hello", 1, 128);
    cfg["boot-source"]["kernel_image_path"] = "/nonexistent/vmlinux".into();
    boot(&cfg)
        .expect_code(152)
        .expect("/nonexistent/vmlinux")
        .expect("No such file");
}

#[test]
fn kernel_that_is_neither_elf_nor_bzimage_is_a_clear_error() {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("badkernel");
    let k = dir.write(
        "kernel.txt",
        b"#!/bin/sh\necho this is not a kernel\n".repeat(100),
    );
    let mut cfg = guest_config("hello", 1, 128);
    cfg["boot-source"]["kernel_image_path"] = k.to_str().unwrap().into();
    boot(&cfg).expect_code(152).expect("not an ELF or bzImage");
}

#[test]
fn bad_config_file_exits_152_naming_the_field() {
    let mut cfg = guest_config("hello", 1, 128);
    cfg["machine-config"]["vcpu_count"] = "two".into();
    boot(&cfg)
        .expect_code(152)
        .expect("machine-config")
        .expect("vcpu_count");
    let mut cfg = guest_config("hello", 1, 128);
    cfg["machine-config"]["vcpus"] = 2.into();
    boot(&cfg).expect_code(152).expect("vcpus");
}

#[test]
fn builtin_guest_greets() {
    if !require_kvm() {
        return;
    }
    run(&["run"])
        .expect_code(0)
        .expect("Hello from the ember guest!")
        .expect("vCPUs: 1")
        .expect("memory: 128 MiB");
    run(&["run", "--vcpus", "2", "--mem", "256"])
        .expect_code(0)
        .expect("vCPUs: 2")
        .expect("memory: 256 MiB");
}

#[test]
fn command_line_flags() {
    run(&["--version"]).expect_code(0).expect("ember v");
    run(&["--no-such-flag"]).expect_code(153);
    run(&["--id", "bad/id", "--no-api"]).expect_code(153);
    run(&["--no-api"]).expect_code(153).expect("--config-file");
}

/// Voluntary context switches of a process's main thread (ember's VMM thread) so far.
fn vmm_thread_wakeups(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

#[test]
fn console_output_of_a_quiet_guest_arrives_and_a_quiet_guest_costs_no_wakeups() {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("quiet");
    let cfg = dir.write(
        "vm.json",
        serde_json::to_vec(&guest_config("quiet=2000", 1, 128)).unwrap(),
    );
    let vm = ApiVm::start(&["--config-file", cfg.to_str().unwrap()]);
    let pid = vm.child.as_ref().unwrap().id();
    // The guest makes no exit after this line: only the VMM's drain of the coalesced
    // console brings it out.
    vm.wait_for("quiet: start");
    let quiet_for = |what: &str| {
        // Three ticks of the drain timer (30 ms) find nothing new and stop it; generous for
        // a loaded machine.
        std::thread::sleep(Duration::from_millis(300));
        let before = vmm_thread_wakeups(pid);
        std::thread::sleep(Duration::from_millis(300));
        let woke = vmm_thread_wakeups(pid) - before;
        // A periodic 10 ms drain would wake it ~30 times.
        assert!(
            woke <= 3,
            "{what}: the VMM thread woke {woke} times in 300 ms"
        );
    };
    quiet_for("while the guest is quiet");
    // Written while ember no longer coalesces: it comes out all the same, and ember goes
    // back to sleep afterwards.
    vm.wait_for("quiet: end");
    quiet_for("after the last line");
    assert!(
        vm.output().contains("quiet: start\nquiet: end"),
        "{}",
        vm.output()
    );
}

#[test]
fn console_lines_stay_whole_and_in_order_as_coalescing_stops_and_resumes() {
    if !require_kvm() {
        return;
    }
    // 40 lines, each after 20-44 ms of silence: ember stops coalescing after 30 ms without
    // output, so lines start before, at and after the switch.
    let rounds = 40;
    let dir = TempDir::new("quietrounds");
    let cfg = dir.write(
        "vm.json",
        serde_json::to_vec(&guest_config(&format!("quiet=10,{rounds}"), 1, 128)).unwrap(),
    );
    let vm = ApiVm::start(&["--config-file", cfg.to_str().unwrap()]);
    vm.wait_for("quiet: end");
    let out = vm.output();
    let got: Vec<&str> = out.lines().filter(|l| l.contains("quiet: round")).collect();
    let want: Vec<String> = (0..rounds)
        .map(|i| format!("quiet: round {i} abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUV"))
        .collect();
    assert_eq!(got, want, "{out}");
}

/// /proc/sys/vm/nr_hugepages raised for a test, put back when dropped.
struct HugePagePool(String);

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

impl HugePagePool {
    /// Adds `pages` 2 MiB pages to the host's pool.
    fn grow(pages: u64) -> HugePagePool {
        let old = std::fs::read_to_string(NR_HUGEPAGES).unwrap();
        let want = old.trim().parse::<u64>().unwrap() + pages;
        std::fs::write(NR_HUGEPAGES, want.to_string()).unwrap();
        let pool = HugePagePool(old);
        let got: u64 = std::fs::read_to_string(NR_HUGEPAGES)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(
            got, want,
            "the kernel could not make {pages} more 2 MiB pages"
        );
        pool
    }
}

impl Drop for HugePagePool {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.0.trim());
    }
}

fn meminfo(field: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The smaps block of `pid`'s mapping of exactly `size_kib`.
fn smaps_block(pid: u32, size_kib: u64) -> Option<String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut blocks = Vec::new();
    for line in smaps.lines() {
        // A mapping's block starts with its address range.
        if line
            .split_whitespace()
            .next()
            .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
        {
            blocks.push(String::new());
        }
        if let Some(b) = blocks.last_mut() {
            b.push_str(line);
            b.push('\n');
        }
    }
    let size = format!("Size: {size_kib} kB");
    blocks.into_iter().find(|b| {
        b.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>().join(" ") == size)
    })
}

/// One test for all of it: the host's huge page pool is global.
#[test]
fn huge_pages_back_guest_memory_with_2mib_pages() {
    if !require_kvm() || !require_root("the host's pool of huge pages") {
        return;
    }
    let _pool = HugePagePool::grow(130);
    let dir = TempDir::new("hugepages");

    // 256 MiB of guest RAM in 128 pages of 2 MiB, every page of it touched and verified by the
    // guest, and seen from the host as hugetlb memory.
    let mut cfg = guest_config("mem=256 quiet=100", 1, 256);
    cfg["machine-config"]["huge_pages"] = "2M".into();
    let path = dir.write("hp.json", serde_json::to_vec(&cfg).unwrap());
    let free_before = meminfo("HugePages_Free:");
    let mut vm = ApiVm::start(&["--config-file", path.to_str().unwrap()]);
    let pid = vm.child.as_ref().unwrap().id();
    vm.wait_for("mem: 256 MiB ok");
    vm.wait_for("quiet: end");
    let block = smaps_block(pid, 256 * 1024).expect("no 256 MiB mapping in the VMM");
    let field = |name: &str| {
        block
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    assert_eq!(field("KernelPageSize:"), "2048 kB", "{block}");
    assert_eq!(field("Private_Hugetlb:"), "262144 kB", "{block}");
    assert_eq!(free_before - meminfo("HugePages_Free:"), 128);
    vm.terminate();
    // The VM's teardown finishes in a helper process after ember exits; its pages return then.
    let t = std::time::Instant::now();
    while meminfo("HugePages_Free:") != free_before {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the guest's huge pages never came back"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    // A pool too small for the guest: a clear error before the guest runs, nothing left
    // reserved.
    let free = meminfo("HugePages_Free:") - meminfo("HugePages_Rsvd:");
    let mut cfg = guest_config("hello", 1, ((free + 1) * 2) as usize);
    cfg["machine-config"]["huge_pages"] = "2M".into();
    boot(&cfg).expect_code(1).expect(&format!(
        "huge_pages 2M needs {} free 2 MiB pages, the host has {free}",
        free + 1
    ));
    assert_eq!(meminfo("HugePages_Rsvd:"), 0);

    // Guest RAM must be a whole number of huge pages.
    let mut cfg = guest_config("hello", 1, 129);
    cfg["machine-config"]["huge_pages"] = "2M".into();
    boot(&cfg)
        .expect_code(152)
        .expect("not a multiple of the configured page size");
}

/// `--log-path /dev/stdout` with stdout redirected to a file, as in `ember ... > vm.log`: the
/// log and the console share the file's offset, so neither overwrites the other.
#[test]
fn log_path_dev_stdout_into_a_file_keeps_log_and_console() {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("stdout-log");
    let cfg = dir.write(
        "vm.json",
        serde_json::to_vec(&guest_config("hello", 1, 128)).unwrap(),
    );
    let out_path = dir.path("vm.log");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut child = std::process::Command::new(EMBER)
        .args(["--no-api", "--boot-timer", "--log-path", "/dev/stdout"])
        .arg("--config-file")
        .arg(&cfg)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .spawn()
        .unwrap();
    let status = status_within(&mut child, Duration::from_secs(60), || {
        let text = std::fs::read_to_string(&out_path).unwrap_or_default();
        format!("output:\n{text}")
    });
    assert!(status.success(), "{status:?}");
    let text = std::fs::read_to_string(&out_path).unwrap();
    for needle in [
        "Running ember",
        "Hello from the ember guest!",
        "Guest-boot-time =",
        "ember-guest: done",
        "Stopping the microVM with exit code 0",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
}

/// A config file naming a named pipe as the kernel: refused at once (exit 152), where open(2)
/// would have waited for a writer for good.
#[test]
fn kernel_that_is_a_named_pipe_is_refused_at_once() {
    let dir = TempDir::new("fifo-kernel");
    let fifo = dir.path("kernel");
    mkfifo(&fifo);
    let mut cfg = guest_config("hello", 1, 128);
    cfg["boot-source"]["kernel_image_path"] = fifo.to_str().unwrap().into();
    let path = dir.write("vm.json", serde_json::to_vec(&cfg).unwrap());
    let out = wait_with_guard(
        spawn(&["--no-api", "--config-file", path.to_str().unwrap()]),
        Duration::from_secs(20),
    );
    out.expect_code(152).expect("not a regular file");
}
