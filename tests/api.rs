//! The REST API over the real socket, driving the real `ember` and the test guest.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn boot_driven_entirely_through_the_api() {
    if !require_kvm() {
        return;
    }
    let mut vm = ApiVm::start(&["--boot-timer"]);
    let mut c = vm.client();
    let info = c.get("/").json();
    assert_eq!(info["state"], "Not started");
    assert_eq!(info["id"], "anonymous-instance");
    api_boot(&mut c, "hello", 2);
    assert_eq!(vm.wait_exit(), 0);
    let out = vm.output();
    assert!(out.contains("vCPUs: 2"), "{out}");
    assert!(out.contains("ember-guest: done"), "{out}");
    assert!(out.contains("Guest-boot-time ="), "{out}");
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    if !require_kvm() {
        return;
    }
    let mut vm = ApiVm::start(&["--boot-timer"]);
    let mut c = vm.client();
    api_boot(&mut c, "ticks", 2);
    vm.wait_for("tick 3");
    assert_eq!(c.patch("/vm", r#"{"state":"Paused"}"#).status, 204);
    assert_eq!(c.get("/").json()["state"], "Paused");
    let paused_at = vm.last_tick();
    // Ticks come every 10 ms of guest time: 300 ms paused would show ~30 more.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(vm.last_tick(), paused_at, "the guest ran while paused");
    assert_eq!(c.patch("/vm", r#"{"state":"Resumed"}"#).status, 204);
    assert_eq!(c.get("/").json()["state"], "Running");
    vm.wait_for(&format!("tick {}", paused_at + 3));
    // Pausing twice and resuming twice is harmless.
    assert_eq!(c.patch("/vm", r#"{"state":"Paused"}"#).status, 204);
    assert_eq!(c.patch("/vm", r#"{"state":"Paused"}"#).status, 204);
    assert_eq!(c.patch("/vm", r#"{"state":"Resumed"}"#).status, 204);
    assert_eq!(c.patch("/vm", r#"{"state":"Resumed"}"#).status, 204);
    assert_eq!(vm.terminate(), 0, "SIGTERM is a clean stop");
}

/// After the start, `FlushMetrics` succeeds whether or not metrics are configured (Firecracker
/// writes nothing then and answers 204); before it, it is refused like every other action but
/// `InstanceStart`.
#[test]
fn flush_metrics_after_start_without_metrics_succeeds() {
    if !require_kvm() {
        return;
    }
    let mut vm = ApiVm::start(&[]);
    let mut c = vm.client();
    let r = c.put("/actions", r#"{"action_type":"FlushMetrics"}"#);
    assert_eq!(r.status, 400);
    api_boot(&mut c, "ticks", 1);
    vm.wait_for("tick 1");
    let r = c.put("/actions", r#"{"action_type":"FlushMetrics"}"#);
    assert_eq!(r.status, 204, "{}", r.body);
    let r = c.put("/actions", r#"{"action_type":"InstanceStart"}"#);
    assert_eq!(r.status, 400);
    assert_eq!(vm.terminate(), 0);
}

#[test]
fn endpoints_before_start() {
    let mut vm = ApiVm::start(&[]);
    let mut c = vm.client();
    let v = c.get("/version");
    assert_eq!(v.status, 200);
    assert!(v.json()["firecracker_version"].is_string());

    let m = c.get("/machine-config").json();
    assert_eq!(m["vcpu_count"], 1);
    assert_eq!(m["mem_size_mib"], 128);
    assert_eq!(m["smt"], false);

    // PUT: required fields, validation, and fields left out go back to defaults.
    let r = c.put("/machine-config", r#"{"vcpu_count":2}"#);
    assert_eq!(r.status, 400);
    assert!(r.fault().contains("mem_size_mib"), "{}", r.body);
    let r = c.put("/machine-config", r#"{"vcpu_count":0,"mem_size_mib":128}"#);
    assert_eq!(r.status, 400);
    let r = c.put(
        "/machine-config",
        r#"{"vcpu_count":3,"mem_size_mib":64,"smt":true}"#,
    );
    assert_eq!(r.status, 400);
    assert!(r.fault().contains("SMT"), "{}", r.body);
    assert_eq!(
        c.put(
            "/machine-config",
            r#"{"vcpu_count":2,"mem_size_mib":256,"smt":true}"#
        )
        .status,
        204
    );
    assert_eq!(
        c.put("/machine-config", r#"{"vcpu_count":2,"mem_size_mib":256}"#)
            .status,
        204
    );
    assert_eq!(c.get("/machine-config").json()["smt"], false);
    assert_eq!(
        c.patch("/machine-config", r#"{"mem_size_mib":512}"#).status,
        204
    );
    let m = c.get("/machine-config").json();
    assert_eq!(
        (m["vcpu_count"].as_u64(), m["mem_size_mib"].as_u64()),
        (Some(2), Some(512))
    );
    // huge_pages: 2M wants RAM in whole 2 MiB pages; None leaves it as it was.
    let r = c.patch(
        "/machine-config",
        r#"{"mem_size_mib":513,"huge_pages":"2M"}"#,
    );
    assert_eq!(r.status, 400);
    assert!(
        r.fault().contains("multiple of the configured page size"),
        "{}",
        r.body
    );
    assert_eq!(c.get("/machine-config").json()["mem_size_mib"], 512);
    assert_eq!(
        c.patch("/machine-config", r#"{"huge_pages":"2M"}"#).status,
        204
    );
    assert_eq!(c.get("/machine-config").json()["huge_pages"], "2M");
    assert_eq!(
        c.patch("/machine-config", r#"{"huge_pages":"None"}"#)
            .status,
        204
    );

    // CPU template: a CPUID mask.
    let tpl = r#"{"cpuid_modifiers":[{"leaf":"0x1","subleaf":"0x0","flags":0,
        "modifiers":[{"register":"ecx","bitmap":"0bxxxxxxxxxxxxxxxxxxxxxxxxxxx0xxxx"}]}]}"#;
    assert_eq!(c.put("/cpu-config", tpl).status, 204);
    let r = c.put(
        "/cpu-config",
        r#"{"cpuid_modifiers":[{"leaf":"0x1","subleaf":"0x0","flags":0,"modifiers":[{"register":"exx","bitmap":"0b1"}]}]}"#,
    );
    assert_eq!(r.status, 400);
    assert!(r.fault().contains("exx"), "{}", r.body);

    // Boot source: files are checked when set.
    let r = c.put(
        "/boot-source",
        r#"{"kernel_image_path":"/nonexistent/kernel"}"#,
    );
    assert_eq!(r.status, 400);
    assert!(r.fault().contains("/nonexistent/kernel"), "{}", r.body);

    // Phase rules.
    for (m, p, b) in [
        ("PUT", "/actions", r#"{"action_type":"SendCtrlAltDel"}"#),
        ("PATCH", "/vm", r#"{"state":"Paused"}"#),
    ] {
        let r = c.request(m, p, Some(b));
        assert_eq!(r.status, 400, "{m} {p}");
        assert_eq!(
            r.fault(),
            "The requested operation is not supported before starting the microVM."
        );
    }
    let r = c.put("/actions", r#"{"action_type":"InstanceStart"}"#);
    assert_eq!(r.status, 400, "start without a boot source");

    // Metrics and logger: once each. FlushMetrics waits for the start, as in Firecracker,
    // metrics configured or not; the exit flushes them.
    let flush = |c: &mut Client| c.put("/actions", r#"{"action_type":"FlushMetrics"}"#);
    let r = flush(&mut c);
    assert_eq!(r.status, 400);
    assert_eq!(
        r.fault(),
        "The requested operation is not supported before starting the microVM."
    );
    let metrics = vm.dir.path("metrics.json");
    let body = format!(r#"{{"metrics_path":"{}"}}"#, metrics.display());
    assert_eq!(c.put("/metrics", &body).status, 204);
    assert_eq!(c.put("/metrics", &body).status, 400);
    let r = flush(&mut c);
    assert_eq!(r.status, 400);
    assert_eq!(
        r.fault(),
        "The requested operation is not supported before starting the microVM."
    );
    let log = vm.dir.path("ember.log");
    let body = format!(
        r#"{{"log_path":"{}","level":"debug","show_level":true}}"#,
        log.display()
    );
    assert_eq!(c.put("/logger", &body).status, 204);
    assert_eq!(c.put("/logger", &body).status, 400);
    assert_eq!(c.get("/").status, 200);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains(":DEBUG]") || logged.contains(":INFO]"),
        "{logged}"
    );

    // A drive whose file is missing is refused, naming the path.
    let r = c.put(
        "/drives/rootfs",
        r#"{"drive_id":"rootfs","is_root_device":true,"path_on_host":"/nonexistent/ember-rootfs"}"#,
    );
    assert_eq!(r.status, 400);
    assert!(
        r.fault().contains("/nonexistent/ember-rootfs"),
        "{}",
        r.body
    );
    // Features ember lacks answer 400 and say so.
    let r = c.put("/balloon", r#"{"amount_mib":1,"deflate_on_oom":true}"#);
    assert_eq!(r.status, 400);
    assert!(r.fault().contains("not supported"), "{}", r.body);
    // vsock is configured before start and shows in /vm/config.
    let r = c.put("/vsock", r#"{"guest_cid":2,"uds_path":"/tmp/v.sock"}"#);
    assert_eq!(r.status, 400);
    let r = c.put("/vsock", r#"{"guest_cid":3,"uds_path":"/tmp/v.sock"}"#);
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(c.get("/vm/config").json()["vsock"]["guest_cid"], 3);

    // /vm/config shows what was configured.
    let cfg = c.get("/vm/config").json();
    assert_eq!(cfg["machine-config"]["mem_size_mib"], 512);
    // As Firecracker: the API's CPU template never shows here (the config file's key is a
    // path), nor do the logger and metrics.
    assert!(cfg["cpu-config"].is_null());
    assert_eq!(cfg["drives"], serde_json::json!([]));

    assert_eq!(vm.terminate(), 0);
    let text = std::fs::read_to_string(&metrics).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    for key in [
        "utc_timestamp_ms",
        "api_server",
        "get_api_requests",
        "put_api_requests",
        "patch_api_requests",
        "latencies_us",
        "seccomp",
        "signals",
        "vcpu",
        "uart",
        "i8042",
    ] {
        assert!(last.get(key).is_some(), "metrics lack {key}: {last}");
    }
    assert!(
        last["put_api_requests"]["machine_cfg_count"]
            .as_u64()
            .unwrap()
            >= 4
    );
    assert!(
        last["put_api_requests"]["machine_cfg_fails"]
            .as_u64()
            .unwrap()
            >= 3
    );
}

/// What Firecracker's clients read off the command line and `GET /vm/config`: `--version`'s
/// first line is Firecracker's (Kata parses its second word), a bad `--level` exits 152 and a
/// metrics file the flags name that cannot be opened exits 1, as in Firecracker.
#[test]
fn cli_version_exit_codes_and_vm_config_shapes_match_firecracker() {
    let out = run(&["--version"]);
    out.expect_code(0);
    let first = out.stdout.lines().next().unwrap_or("");

    let dir = TempDir::new("cli");
    let sock = dir.path("api.sock");
    let sock = sock.to_str().unwrap();
    run(&["--api-sock", sock, "--level", "loud"])
        .expect_code(152)
        .expect("--level");
    run(&[
        "--api-sock",
        sock,
        "--metrics-path",
        "/nonexistent/ember/metrics.json",
    ])
    .expect_code(1);

    // Instance ids are letters and digits of any script, and `-`.
    let mut vm = ApiVm::start(&["--id", "vm-é1"]);
    let mut c = vm.client();
    assert_eq!(c.get("/").json()["id"], "vm-é1");
    let version = c.get("/version").json()["firecracker_version"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(first, format!("Firecracker v{version}"), "{}", out.stdout);

    let cfg = c.get("/vm/config").json();
    assert_eq!(
        cfg["boot-source"],
        serde_json::json!({"kernel_image_path": "", "initrd_path": null})
    );
    let tpl = r#"{"cpuid_modifiers":[{"leaf":"0x1","subleaf":"0x0","flags":0,
        "modifiers":[{"register":"ecx","bitmap":"0bxxxxxxxxxxxxxxxxxxxxxxxxxxx0xxxx"}]}]}"#;
    assert_eq!(c.put("/cpu-config", tpl).status, 204);
    let log = vm.dir.path("ember.log");
    let body = format!(r#"{{"log_path":"{}"}}"#, log.display());
    assert_eq!(c.put("/logger", &body).status, 204);
    let body = format!(r#"{{"kernel_image_path":"{GUEST}","boot_args":"x"}}"#);
    assert_eq!(c.put("/boot-source", &body).status, 204);
    let cfg = c.get("/vm/config").json();
    for key in ["cpu-config", "logger", "metrics"] {
        assert!(cfg[key].is_null(), "{key}: {cfg}");
    }
    assert_eq!(
        cfg["boot-source"],
        serde_json::json!({"kernel_image_path": GUEST, "initrd_path": null, "boot_args": "x"})
    );
    assert_eq!(vm.terminate(), 0);
}

#[test]
fn malformed_requests_get_4xx_and_the_vm_keeps_running() {
    if !require_kvm() {
        return;
    }
    let vm = ApiVm::start(&["--boot-timer"]);
    let mut c = vm.client();
    api_boot(&mut c, "ticks", 1);
    vm.wait_for("tick 2");

    let cases: &[(&str, &str, Option<&str>, &str)] = &[
        ("GET", "/nope", None, "Invalid request method and/or path"),
        (
            "DELETE",
            "/machine-config",
            None,
            "Invalid request method and/or path",
        ),
        ("GET", "/", Some("{}"), "body"),
        ("PUT", "/machine-config", None, "Empty"),
        ("PUT", "/machine-config", Some("{not json"), "deserializing"),
        (
            "PUT",
            "/boot-source",
            Some(r#"{"kernel_image_path":"/x","bogus":1}"#),
            "bogus",
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":"two","mem_size_mib":1}"#),
            "invalid type",
        ),
        (
            "PUT",
            "/drives/a",
            Some(r#"{"drive_id":"b","is_root_device":false}"#),
            "does not match",
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":1,"mem_size_mib":64}"#),
            "after starting",
        ),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type":"InstanceStart"}"#),
            "after starting",
        ),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type":"Explode"}"#),
            "deserializing",
        ),
    ];
    for (m, p, b, why) in cases {
        let r = c.request(m, p, *b);
        assert_eq!(r.status, 400, "{m} {p}: {}", r.body);
        assert!(r.fault().contains(why), "{m} {p}: {}", r.body);
    }

    // A bad request line and a huge header close the connection with a 400.
    let mut bad = vm.client();
    bad.send_raw(b"THIS IS NOT HTTP\r\n\r\n");
    assert_eq!(bad.read_response().map(|r| r.status), Some(400));
    let mut huge = vm.client();
    let header = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(64 * 1024));
    huge.send_raw(header.as_bytes());
    let r = huge.read_response();
    assert!(r.is_none() || r.unwrap().status == 400);
    // A body over the payload limit.
    let mut big = vm.client();
    let body = format!(r#"{{"kernel_image_path":"{}"}}"#, "x".repeat(60_000));
    let r = big.request("PUT", "/boot-source", Some(&body));
    assert_eq!(r.status, 400);
    assert!(r.fault().contains("larger than the limit"), "{}", r.body);
    // A client that sends half a request and stalls, and one that disconnects mid-request,
    // do not stop a third client.
    let mut stalled = vm.client();
    stalled.send_raw(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"vcpu");
    {
        let mut gone = vm.client();
        gone.send_raw(b"PUT /actions HTTP/1.1\r\nContent-Len");
    }
    let mut fine = vm.client();
    assert_eq!(fine.get("/").json()["state"], "Running");
    // The guest still runs and the first connection still works (keep-alive).
    let t = vm.last_tick();
    vm.wait_for(&format!("tick {}", t + 2));
    assert_eq!(c.get("/").status, 200);
    drop(stalled);
}

#[test]
fn several_clients_at_once() {
    let vm = ApiVm::start(&[]);
    let sock = vm.sock.clone();
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(&sock);
                for j in 0..25 {
                    if (i + j) % 2 == 0 {
                        assert_eq!(c.get("/").status, 200);
                    } else {
                        let r = c.patch(
                            "/machine-config",
                            &format!(r#"{{"mem_size_mib":{}}}"#, 128 + j),
                        );
                        assert_eq!(r.status, 204);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    // Pipelined requests on one connection are answered in order.
    let mut c = vm.client();
    c.send_raw(
        b"GET /version HTTP/1.1\r\n\r\nGET /machine-config HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n",
    );
    let a = c.read_response().unwrap();
    let b = c.read_response().unwrap();
    let d = c.read_response().unwrap();
    assert!(a.json().get("firecracker_version").is_some());
    assert!(b.json().get("vcpu_count").is_some());
    assert!(d.json().get("state").is_some());
}

#[test]
fn stale_socket_is_replaced_and_a_live_one_refused() {
    let dir = TempDir::new("sock");
    let sock = dir.path("api.sock");
    // A socket file left by a dead process.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let mut first = spawn(&["--api-sock", sock.to_str().unwrap()]);
    let start = Instant::now();
    while Client::connect_opt(&sock).is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "first ember never served"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let second = run(&["--api-sock", sock.to_str().unwrap()]);
    assert_ne!(second.code(), 0);
    second.expect(sock.to_str().unwrap());
    // The first is unaffected.
    assert_eq!(Client::connect(&sock).get("/").status, 200);
    let _ = first.kill();
    let _ = first.wait();
}

#[test]
fn config_file_boot_keeps_serving_the_api() {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("cfgapi");
    let cfg = dir.write(
        "vm.json",
        serde_json::to_vec(&guest_config("ticks", 1, 128)).unwrap(),
    );
    let mut vm = ApiVm::start(&["--config-file", cfg.to_str().unwrap()]);
    vm.wait_for("tick 1");
    let mut c = vm.client();
    assert_eq!(c.get("/").json()["state"], "Running");
    assert_eq!(
        c.get("/vm/config").json()["boot-source"]["boot_args"],
        "ticks"
    );
    assert_eq!(vm.terminate(), 0);
}

/// Boots the `flood=<lines>` guest through the API with its console in a file and the given
/// `PUT /serial` body fields; returns the console file's bytes and the metrics text.
fn flood_to_file(lines: u64, rate_limiter: Option<&str>) -> (Vec<u8>, String) {
    let mut vm = ApiVm::start(&[]);
    let mut c = vm.client();
    let console = vm.dir.path("console.log");
    let metrics = vm.dir.path("metrics.json");
    let r = c.put(
        "/metrics",
        &format!(r#"{{"metrics_path": "{}"}}"#, metrics.display()),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let limiter = rate_limiter
        .map(|l| format!(r#", "rate_limiter": {l}"#))
        .unwrap_or_default();
    let r = c.put(
        "/serial",
        &format!(r#"{{"serial_out_path": "{}"{limiter}}}"#, console.display()),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    api_boot(&mut c, &format!("flood={lines}"), 1);
    assert_eq!(vm.wait_exit(), 0, "{}", vm.output());
    (
        std::fs::read(&console).unwrap_or_default(),
        std::fs::read_to_string(&metrics).unwrap_or_default(),
    )
}

fn uart_dropped(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["uart"]["rate_limiter_dropped_bytes"].as_u64())
        .sum()
}

#[test]
fn serial_rate_limiter_drops_console_output_over_the_limit() {
    if !require_kvm() {
        return;
    }
    const LINES: u64 = 2000;
    let flood = (LINES * 64) as usize;

    // Without a limiter every line arrives and nothing is dropped.
    let (all, m) = flood_to_file(LINES, None);
    let text = String::from_utf8_lossy(&all);
    assert!(
        text.contains(&format!("flood: printed {LINES} lines, {flood} bytes")),
        "{text}"
    );
    assert!(all.len() > flood, "{} bytes", all.len());
    assert_eq!(uart_dropped(&m), 0, "metrics:\n{m}");

    // 5 KiB now, then 4 KiB every 10 s: most of the flood is dropped, not queued, and the VM
    // still runs to its end and exits cleanly.
    let (some, m) = flood_to_file(
        LINES,
        Some(r#"{"size": 4096, "one_time_burst": 1024, "refill_time": 10000}"#),
    );
    let dropped = uart_dropped(&m);
    assert!(
        some.len() < flood / 4,
        "{} of {} bytes went through the limiter",
        some.len(),
        all.len()
    );
    assert!(
        some.starts_with(b"ember-guest: cmdline"),
        "the full bucket did not let the first line through: {:?}",
        String::from_utf8_lossy(&some[..some.len().min(200)])
    );
    assert!(dropped > 0, "no dropped bytes counted; metrics:\n{m}");
    // Every byte the guest wrote either reached the file or was counted as dropped.
    assert_eq!(
        some.len() as u64 + dropped,
        all.len() as u64,
        "written {} + dropped {dropped} != {} unlimited; metrics:\n{m}",
        some.len(),
        all.len()
    );
}

#[test]
fn closed_standard_fds_are_reopened_on_dev_null() {
    // ember takes the C `main` itself, so Rust's start-up no longer does this for it: with
    // fds 0-2 closed, the first file ember opened would become its stdout and receive its log.
    let dir = TempDir::new("stdfds");
    let sock = dir.path("api.sock");
    let log = dir.path("ember.log");
    let mut cmd = std::process::Command::new(EMBER);
    cmd.args(["--api-sock", sock.to_str().unwrap()])
        .args(["--log-path", log.to_str().unwrap()]);
    // SAFETY: only async-signal-safe close() calls between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            for fd in 0..3 {
                libc::close(fd);
            }
            Ok(())
        });
    }
    std::fs::write(&log, b"").unwrap();
    let mut child = cmd.spawn().expect("cannot start ember");
    let start = Instant::now();
    while Client::connect_opt(&sock).is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "ember never served"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    for fd in 0..3 {
        let target = std::fs::read_link(format!("/proc/{}/fd/{fd}", child.id())).unwrap();
        assert_eq!(target, std::path::Path::new("/dev/null"), "fd {fd}");
    }
    let mut c = Client::connect(&sock);
    assert_eq!(c.get("/").status, 200);
    let _ = child.kill();
    let _ = child.wait();
    // The log went to its file, under the main thread's usual name.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("[anonymous-instance:main] Running ember"),
        "{text}"
    );
}

/// A small deterministic generator (xorshift64*), so a failing case replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

/// Every request a client can make, valid, with paths inside `dir`.
fn request_corpus(dir: &TempDir) -> Vec<(&'static str, String, Option<serde_json::Value>)> {
    use serde_json::json;
    let disk = dir.write("disk.img", vec![0u8; 1 << 20]);
    let p = |name: &str| dir.path(name).to_str().unwrap().to_string();
    vec![
        (
            "PUT",
            "/boot-source".into(),
            Some(json!({"kernel_image_path": GUEST, "boot_args": "ticks", "initrd_path": GUEST})),
        ),
        (
            "PUT",
            "/machine-config".into(),
            Some(
                json!({"vcpu_count": 2, "mem_size_mib": 64, "smt": false, "track_dirty_pages": false, "huge_pages": "None"}),
            ),
        ),
        (
            "PATCH",
            "/machine-config".into(),
            Some(json!({"vcpu_count": 1, "mem_size_mib": 32})),
        ),
        (
            "PUT",
            "/cpu-config".into(),
            Some(
                json!({"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0, "modifiers": [{"register": "ecx", "bitmap": "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx0"}]}]}),
            ),
        ),
        (
            "PUT",
            "/drives/rootfs".into(),
            Some(
                json!({"drive_id": "rootfs", "path_on_host": disk, "is_root_device": false, "is_read_only": true, "cache_type": "Unsafe", "io_engine": "Sync", "rate_limiter": {"bandwidth": {"size": 4096, "refill_time": 100}}}),
            ),
        ),
        (
            "PATCH",
            "/drives/rootfs".into(),
            Some(json!({"drive_id": "rootfs", "path_on_host": disk})),
        ),
        (
            "PUT",
            "/network-interfaces/eth0".into(),
            Some(
                json!({"iface_id": "eth0", "host_dev_name": "nosuchtap0", "guest_mac": "06:00:00:00:00:01"}),
            ),
        ),
        (
            "PATCH",
            "/network-interfaces/eth0".into(),
            Some(
                json!({"iface_id": "eth0", "rx_rate_limiter": {"ops": {"size": 10, "one_time_burst": 5, "refill_time": 100}}}),
            ),
        ),
        (
            "PUT",
            "/vsock".into(),
            Some(json!({"guest_cid": 3, "uds_path": p("v.sock")})),
        ),
        (
            "PUT",
            "/entropy".into(),
            Some(json!({"rate_limiter": {"bandwidth": {"size": 100, "refill_time": 1000}}})),
        ),
        (
            "PUT",
            "/logger".into(),
            Some(
                json!({"log_path": p("log"), "level": "Debug", "show_level": true, "show_log_origin": true}),
            ),
        ),
        (
            "PUT",
            "/metrics".into(),
            Some(json!({"metrics_path": p("metrics")})),
        ),
        (
            "PUT",
            "/serial".into(),
            Some(json!({"serial_out_path": p("serial")})),
        ),
        (
            "PUT",
            "/mmds".into(),
            Some(json!({"latest": {"meta-data": {"instance-id": "i-1", "keys": ["a", "b"]}}})),
        ),
        (
            "PATCH",
            "/mmds".into(),
            Some(json!({"latest": {"meta-data": {"instance-id": null, "n": 1.5}}})),
        ),
        (
            "PUT",
            "/mmds/config".into(),
            Some(
                json!({"network_interfaces": ["eth0"], "version": "V2", "ipv4_address": "169.254.169.254"}),
            ),
        ),
        (
            "PUT",
            "/balloon".into(),
            Some(json!({"amount_mib": 1, "deflate_on_oom": true})),
        ),
        (
            "PUT",
            "/snapshot/create".into(),
            Some(json!({"snapshot_path": p("snap"), "mem_file_path": p("mem")})),
        ),
        (
            "PUT",
            "/snapshot/load".into(),
            Some(
                json!({"snapshot_path": p("snap"), "mem_backend": {"backend_path": p("mem"), "backend_type": "File"}}),
            ),
        ),
        (
            "PUT",
            "/actions".into(),
            Some(json!({"action_type": "FlushMetrics"})),
        ),
        ("PATCH", "/vm".into(), Some(json!({"state": "Paused"}))),
        ("PATCH", "/vm".into(), Some(json!({"state": "Resumed"}))),
        ("GET", "/".into(), None),
        ("GET", "/vm/config".into(), None),
        ("GET", "/machine-config".into(), None),
        ("GET", "/mmds".into(), None),
        ("GET", "/version".into(), None),
    ]
}

/// A JSON value mutated the ways a careless or hostile client gets it wrong: wrong types,
/// extreme numbers, missing and unknown fields, strings that are not paths.
fn mutate(rng: &mut Rng, v: &serde_json::Value, dir: &TempDir) -> serde_json::Value {
    use serde_json::{json, Value};
    let weird = [
        Value::Null,
        json!(true),
        json!(0),
        json!(-1),
        json!(255),
        json!(256),
        json!(u32::MAX),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(1.5),
        json!(1e300),
        json!(""),
        json!("x".repeat(3000)),
        json!("\u{0}"),
        json!("0x"),
        json!("é\u{202e}"),
        json!("/"),
        json!("/dev/null"),
        json!(dir.path("missing").to_str().unwrap()),
        json!([]),
        json!([1, 2, 3]),
        json!({}),
        json!({"a": {"b": {"c": [{}]}}}),
        json!("2M"),
        json!("None"),
        json!("Async"),
        json!("V1"),
    ];
    match v {
        Value::Object(m) if !m.is_empty() || rng.below(2) == 0 => {
            let mut m = m.clone();
            let keys: Vec<String> = m.keys().cloned().collect();
            match rng.below(4) {
                0 if !keys.is_empty() => {
                    let k = rng.pick(&keys).clone();
                    m.remove(&k);
                }
                1 => {
                    let k = (*rng.pick(&[
                        "bogus",
                        "vcpu_count",
                        "mem_size_mib",
                        "rate_limiter",
                        "is_root_device",
                        "partuuid",
                        "guest_mac",
                        "huge_pages",
                        "io_engine",
                    ]))
                    .to_string();
                    m.insert(k, rng.pick(&weird).clone());
                }
                _ if !keys.is_empty() => {
                    let k = rng.pick(&keys).clone();
                    let new = if rng.below(2) == 0 {
                        mutate(rng, &m[&k], dir)
                    } else {
                        rng.pick(&weird).clone()
                    };
                    m.insert(k, new);
                }
                _ => {}
            }
            Value::Object(m)
        }
        Value::Array(a) if !a.is_empty() && rng.below(2) == 0 => {
            let mut a = a.clone();
            let i = rng.below(a.len());
            a[i] = mutate(rng, &a[i], dir);
            Value::Array(a)
        }
        _ => rng.pick(&weird).clone(),
    }
}

/// The JSON text with a few bytes flipped, inserted or cut (Content-Length stays right).
fn corrupt(rng: &mut Rng, text: &str) -> String {
    let mut b = text.as_bytes().to_vec();
    for _ in 0..1 + rng.below(4) {
        let i = rng.below(b.len() + 1);
        match rng.below(3) {
            0 if i < b.len() => b[i] = rng.next() as u8,
            1 => b.insert(i, *rng.pick(b"{}[]\":,\\0e-9")),
            _ if i < b.len() => {
                b.remove(i);
            }
            _ => {}
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

/// Sends `n` requests mutated from the corpus; every one must get a 2xx or 4xx answer and
/// leave the VMM running.
fn send_mutated(vm: &mut ApiVm, rng: &mut Rng, n: usize, started: bool) {
    let corpus = request_corpus(&vm.dir);
    let mut c = vm.client();
    for i in 0..n {
        let (method, path, body) = rng.pick(&corpus).clone();
        let body = body.map(|b| match rng.below(4) {
            0 => b.to_string(),
            1 => corrupt(rng, &b.to_string()),
            _ => mutate(rng, &b, &vm.dir).to_string(),
        });
        // Pausing is a valid request the fuzz may make; the checks below need the guest
        // running, so a pause is followed by a resume.
        let r = c.request(method, &path, body.as_deref());
        assert!(
            (200..300).contains(&r.status) || (400..500).contains(&r.status),
            "request {i}: {method} {path} {body:?} got {}: {}",
            r.status,
            r.body
        );
        if r.status >= 400 {
            assert!(
                !r.fault().is_empty(),
                "request {i}: {method} {path} {body:?}: a 4xx without a reason: {}",
                r.body
            );
        }
        assert!(
            vm.is_running(),
            "request {i}: {method} {path} {body:?} ended the VMM:\n{}",
            vm.output()
        );
        if started && path == "/vm" {
            assert_eq!(c.patch("/vm", r#"{"state":"Resumed"}"#).status, 204);
        }
    }
}

#[test]
fn mutated_requests_get_answers_and_never_end_the_vmm() {
    if !require_kvm() {
        return;
    }
    let mut rng = Rng(0x0e3b_e12a_5eed_0001);
    // Before InstanceStart, when every endpoint still accepts configuration.
    let mut vm = ApiVm::start(&[]);
    send_mutated(&mut vm, &mut rng, 800, false);
    assert_eq!(vm.client().get("/").json()["state"], "Not started");
    drop(vm);

    // With a guest running: configuration is refused, the guest keeps ticking throughout.
    let mut vm = ApiVm::start(&[]);
    api_boot(&mut vm.client(), "ticks", 1);
    vm.wait_for("tick 2");
    send_mutated(&mut vm, &mut rng, 800, true);
    let before = vm.last_tick();
    vm.wait_for(&format!("tick {}", before + 2));
    assert_eq!(vm.client().get("/").json()["state"], "Running");
    assert_eq!(vm.terminate(), 0);
}

/// Whole requests mangled at the byte level (request line, headers, lengths, bodies; bytes
/// flipped, inserted or cut, headers such as `Transfer-Encoding: chunked` or a negative
/// Content-Length added), each on its own connection whose write side is then shut: the
/// server answers 2xx or 4xx, or closes, but never answers 5xx, never hangs, and the VMM
/// with its guest keeps running.
#[test]
fn mangled_http_gets_4xx_or_a_close_never_a_hang() {
    if !require_kvm() {
        return;
    }
    use std::io::{Read, Write};
    let mut rng = Rng(0x0e3b_e12a_5eed_0002);
    let mut vm = ApiVm::start(&[]);
    api_boot(&mut vm.client(), "ticks", 1);
    vm.wait_for("tick 2");
    let corpus = request_corpus(&vm.dir);
    let inserts: [&[u8]; 9] = [
        b"\r\n",
        b"\r\n\r\n",
        b"Content-Length: 99999999\r\n",
        b"Content-Length: -5\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"Expect: 100-continue\r\n",
        b" HTTP/1.0",
        b"\xff\xfe\x00",
        b"%2e%2e/",
    ];
    let (mut answered, mut closed) = (0, 0);
    for i in 0..400 {
        let (method, path, body) = rng.pick(&corpus).clone();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(req.len() + 1);
            match rng.below(4) {
                0 if at < req.len() => req[at] = rng.next() as u8,
                1 if at < req.len() => {
                    let end = (at + 1 + rng.below(20)).min(req.len());
                    req.drain(at..end);
                }
                _ => {
                    let ins = *rng.pick(&inserts);
                    req.splice(at..at, ins.iter().copied());
                }
            }
        }
        let mut s = std::os::unix::net::UnixStream::connect(&vm.sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // The server may close first (a bad request line): a failed write is an answer too.
        let _ = s.write_all(&req);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut reply = Vec::new();
        match s.read_to_end(&mut reply) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!(
                "request {i}: no answer and no close ({e}): {:?}",
                String::from_utf8_lossy(&req)
            ),
        }
        // An `Expect: 100-continue` whose headers arrive before the shutdown gets the interim
        // answer first, depending on timing; what counts is what follows it.
        let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
        if reply.starts_with(interim) {
            reply.drain(..interim.len());
        }
        if reply.is_empty() {
            closed += 1;
        } else {
            let head = String::from_utf8_lossy(&reply[..reply.len().min(12)]).to_string();
            let status: u16 = head
                .strip_prefix("HTTP/1.1 ")
                .and_then(|r| r.get(..3))
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| panic!("request {i}: not an HTTP answer: {head:?}"));
            assert!(
                (200..300).contains(&status) || (400..500).contains(&status),
                "request {i}: {status} for {:?}",
                String::from_utf8_lossy(&req)
            );
            answered += 1;
        }
        assert!(
            vm.is_running(),
            "request {i} ended the VMM:\n{}",
            vm.output()
        );
    }
    assert!(answered > 100, "only {answered} answers ({closed} closes)");
    let before = vm.last_tick();
    vm.wait_for(&format!("tick {}", before + 2));
    assert_eq!(vm.client().get("/").json()["state"], "Running");
    assert_eq!(vm.terminate(), 0);
}

/// Log and metrics named pipes that nobody reads yet (a collector that starts later): PUT
/// /logger and PUT /metrics answer at once and the VMM goes on serving, as Firecracker's do;
/// a reader that comes later gets the lines. (Opened for writing only, each open waited for a
/// reader, and the API with it.)
#[test]
fn log_and_metrics_pipes_without_a_reader_do_not_stall_the_api() {
    use std::os::unix::fs::OpenOptionsExt;
    let vm = ApiVm::start(&[]);
    let mut c = vm.client();
    let mut pipes = Vec::new();
    for name in ["log.fifo", "metrics.fifo"] {
        let p = vm.dir.path(name);
        mkfifo(&p);
        pipes.push(p);
    }
    let started = std::time::Instant::now();
    let body = format!(r#"{{"log_path":"{}","level":"Info"}}"#, pipes[0].display());
    assert_eq!(c.put("/logger", &body).status, 204);
    let body = format!(r#"{{"metrics_path":"{}"}}"#, pipes[1].display());
    assert_eq!(c.put("/metrics", &body).status, 204);
    assert_eq!(c.get("/").status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the API waited for a reader"
    );
    // FlushMetrics needs a started microVM, as in Firecracker.
    if !require_kvm() {
        return;
    }
    api_boot(&mut c, "ticks", 1);
    // Fill the metrics pipe: 40 flushes of lines of several KiB overflow its 64 KiB. The
    // ones that did not fit are dropped whole and counted, and the API keeps answering.
    for _ in 0..40 {
        assert_eq!(
            c.put("/actions", r#"{"action_type":"FlushMetrics"}"#)
                .status,
            204
        );
    }
    // A reader now: it drains the pipe, and one more flush carries the count of the others.
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&pipes[1])
        .unwrap();
    let mut got = Vec::new();
    let mut drain = |got: &mut Vec<u8>| loop {
        let mut buf = [0u8; 65536];
        match std::io::Read::read(&mut reader, &mut buf) {
            Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    };
    drain(&mut got);
    assert_eq!(
        c.put("/actions", r#"{"action_type":"FlushMetrics"}"#)
            .status,
        204
    );
    // Only whole lines, each one JSON object; the last flush's carries the dropped ones' count
    // (it first finishes a line the pipe had taken in part, if there was one).
    let parse = |got: &[u8]| -> Vec<serde_json::Value> {
        got.split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("a metrics line run into another"))
            .collect()
    };
    let missed_in = |v: &serde_json::Value| v["logger"]["missed_metrics_count"].as_u64().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let lines = loop {
        drain(&mut got);
        if got.ends_with(b"\n") {
            let lines = parse(&got);
            if lines.iter().any(|v| missed_in(v) > 0) {
                break lines;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no line counted the dropped ones"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let missed: u64 = lines.iter().map(missed_in).sum();
    let flushes = lines.len() as u64 + missed;
    assert!(
        (41..=42).contains(&flushes),
        "{} lines, {missed} missed",
        lines.len()
    );
    // Firecracker's logger group, whole.
    for key in [
        "missed_metrics_count",
        "metrics_fails",
        "missed_log_count",
        "log_fails",
    ] {
        assert!(lines.iter().all(|v| v["logger"][key].is_u64()), "{key}");
    }
    assert!(lines.iter().all(|v| v["logger"]["metrics_fails"] == 0));
}

/// Paths a client names are opened without waiting on them: a named pipe as the kernel, the
/// initrd or a drive (whose open(2) would wait for a writer, and the whole VMM with it) is
/// refused at once, and one as the serial output with no reader yet does not hold the start.
#[test]
fn named_pipes_never_hold_the_api() {
    use std::os::unix::fs::OpenOptionsExt;
    if !require_kvm() {
        return;
    }
    let vm = ApiVm::start(&[]);
    let mut c = vm.client();
    let fifo = vm.dir.path("pipe");
    mkfifo(&fifo);
    let p = fifo.display();
    let refused = [
        ("/boot-source", format!(r#"{{"kernel_image_path":"{p}"}}"#)),
        (
            "/boot-source",
            format!(r#"{{"kernel_image_path":"{GUEST}","initrd_path":"{p}"}}"#),
        ),
        (
            "/drives/d1",
            format!(
                r#"{{"drive_id":"d1","path_on_host":"{p}","is_root_device":false,"is_read_only":true}}"#
            ),
        ),
    ];
    for (path, body) in &refused {
        let r = c.put(path, body);
        assert_eq!(r.status, 400, "{path} {body}: {}", r.body);
        assert!(r.body.contains("not a regular file") || r.body.contains("nor a block device"));
        assert_eq!(c.get("/").status, 200);
    }
    // The serial output: accepted, and the start goes on with nobody reading yet.
    assert_eq!(
        c.put("/serial", &format!(r#"{{"serial_out_path":"{p}"}}"#))
            .status,
        204
    );
    let body = format!(r#"{{"kernel_image_path":"{GUEST}","boot_args":"ticks"}}"#);
    assert_eq!(c.put("/boot-source", &body).status, 204);
    assert_eq!(
        c.put("/actions", r#"{"action_type":"InstanceStart"}"#)
            .status,
        204
    );
    // A reader now gets what the guest printed meanwhile.
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let mut got = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !got.contains("tick 3\n") {
        assert!(
            Instant::now() < deadline,
            "console via the pipe: {:?}",
            &got[..got.len().min(300)]
        );
        let mut buf = [0u8; 4096];
        match std::io::Read::read(&mut reader, &mut buf) {
            Ok(n) if n > 0 => got.push_str(&String::from_utf8_lossy(&buf[..n])),
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    assert_eq!(c.get("/").json()["state"], "Running");
}

/// A serial output pipe nobody ever reads: once its buffer is full the console's lines are
/// dropped and counted, and the guest (320 KB of output) runs to its end: a blocking write
/// would have stopped its vCPU for good at the 64 KiB-th byte.
#[test]
fn serial_pipe_nobody_reads_drops_lines_and_never_stalls() {
    if !require_kvm() {
        return;
    }
    let mut vm = ApiVm::start(&[]);
    let mut c = vm.client();
    let metrics = vm.dir.path("metrics.json");
    let r = c.put(
        "/metrics",
        &format!(r#"{{"metrics_path": "{}"}}"#, metrics.display()),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let fifo = vm.dir.path("console.pipe");
    mkfifo(&fifo);
    let r = c.put(
        "/serial",
        &format!(r#"{{"serial_out_path": "{}"}}"#, fifo.display()),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    api_boot(&mut c, "flood=5000", 1);
    assert_eq!(vm.wait_exit(), 0, "{}", vm.output());
    let m = std::fs::read_to_string(&metrics).unwrap_or_default();
    let missed: u64 = m
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["uart"]["missed_write_count"].as_u64())
        .sum();
    assert!(missed > 0, "no console write was counted as dropped:\n{m}");
}

/// A config-file boot that fails after the API socket is bound exits 152 and, like every
/// other exit, removes the socket (it stayed behind).
#[test]
fn a_failed_config_file_boot_removes_the_api_socket() {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("failsock");
    let kernel = dir.write("junk-kernel", b"\x7fELFnot a kernel".repeat(64));
    let cfg = serde_json::json!({
        "boot-source": {"kernel_image_path": kernel},
        "drives": [],
    });
    let cfg = dir.write("vm.json", serde_json::to_vec(&cfg).unwrap());
    let sock = dir.path("api.sock");
    run(&[
        "--api-sock",
        sock.to_str().unwrap(),
        "--config-file",
        cfg.to_str().unwrap(),
    ])
    .expect_code(152)
    .expect("cannot load the kernel");
    assert!(!sock.exists(), "the API socket stayed behind");
}

/// ember's stdout is a pipe that its parent keeps open but never reads (an orchestrator that
/// forgot to drain it), and the guest floods the console. Once the pipe is full, console and
/// log lines are dropped, and the API and SIGTERM keep working. Before, a vCPU blocked in
/// write(2) held the console's lock and the VMM thread waited behind it, while the API
/// thread blocked writing its own log line.
#[test]
fn stdout_pipe_nobody_reads_never_holds_the_vmm() {
    use std::os::fd::FromRawFd;
    if !require_kvm() {
        return;
    }
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills both descriptors, which the two Files below then own alone.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh descriptors from pipe2, owned by nothing else.
    let (unread, w) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    let mut vm = ApiVm::start_with_stdout(&[], std::process::Stdio::from(w));
    let mut c = vm.client();
    api_boot(&mut c, "flood=100000", 1);
    // By now the 64 KiB pipe is long full. Every request is still answered (the client gives
    // up after 20 s, and a held VMM never answers).
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(c.get("/").status, 200);
        assert_eq!(c.patch("/vm", r#"{"state":"Paused"}"#).status, 204, "pause");
        assert_eq!(c.patch("/vm", r#"{"state":"Resumed"}"#).status, 204);
    }
    assert_eq!(vm.terminate(), 0, "SIGTERM");
    drop(unread);
}

/// As in Firecracker, the kernel and initrd are opened when the boot source is set, and that
/// is what boots: a path replaced or removed before InstanceStart changes nothing.
#[test]
fn boot_source_files_are_the_ones_opened_at_put() {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("bootfiles");
    let kernel = dir.path("guest.elf");
    std::fs::copy(GUEST, &kernel).unwrap();
    let initrd = dir.path("initrd.img");
    let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(&initrd, &data).unwrap();
    let vm = ApiVm::start(&[]);
    let mut c = vm.client();
    let r = c.put(
        "/boot-source",
        &serde_json::json!({
            "kernel_image_path": kernel,
            "initrd_path": initrd,
            "boot_args": "initrd",
        })
        .to_string(),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    // Both paths now name something that cannot boot, or nothing at all.
    std::fs::remove_file(&kernel).unwrap();
    std::fs::write(&kernel, b"not a kernel").unwrap();
    std::fs::remove_file(&initrd).unwrap();
    let r = c.put("/actions", r#"{"action_type":"InstanceStart"}"#);
    assert_eq!(r.status, 204, "{}", r.body);
    vm.wait_for(&format!(
        "initrd: size={} fnv1a64={:016x}",
        data.len(),
        fnv1a64(&data)
    ));
    vm.wait_for("ember-guest: done");
}
