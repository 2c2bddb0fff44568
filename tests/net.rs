//! virtio-net over a TAP device, end to end: the test guest's `net` scenario sends frames the
//! host captures on the TAP (an AF_PACKET socket) and echoes frames the host injects. Every TAP
//! lives in a network namespace the test creates and deletes; no traffic leaves it.

mod common;

use common::*;
use serde_json::json;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const GUEST_MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x10, 0x00, 0x02];
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0xaa];
const ETHERTYPE: u16 = 0x88b5;

/// These tests need root (TAP devices, network namespaces). Without it they fail loudly,
/// unless EMBER_SKIP_ROOT_TESTS=1 says to skip.
fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("EMBER_SKIP_ROOT_TESTS").as_deref() == Ok("1") {
        eprintln!("!!! not root: SKIPPING this test because EMBER_SKIP_ROOT_TESTS=1");
        return false;
    }
    panic!("these tests need root for TAP devices and network namespaces (set EMBER_SKIP_ROOT_TESTS=1 to skip)");
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted when dropped (also when the test fails).
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "ember-net-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        sh(&["ip", "netns", "add", &name]);
        Netns(name)
    }

    fn exec(&self, args: &[&str]) {
        let mut v = vec!["ip", "netns", "exec", &self.0];
        v.extend_from_slice(args);
        sh(&v);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn check(r: libc::c_int, what: &str) -> libc::c_int {
    if r < 0 {
        panic!("{what}: {}", std::io::Error::last_os_error());
    }
    r
}

/// An AF_PACKET socket on `tap` inside namespace `ns`, for ethertype 0x88b5. Moves the calling
/// thread into the namespace.
fn packet_socket(ns: &str, tap: &str) -> (OwnedFd, libc::c_int) {
    let nsf = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
    // SAFETY: a namespace fd; only this (test helper) thread changes namespace.
    check(
        unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) },
        "setns",
    );
    let proto = (ETHERTYPE).to_be() as libc::c_int;
    // SAFETY: plain socket creation.
    let fd = check(
        unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) },
        "socket(AF_PACKET)",
    );
    // SAFETY: we own the new fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(tap).unwrap();
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as libc::c_int;
    assert!(ifindex > 0, "no {tap} in {ns}");
    // SAFETY: zeroed sockaddr_ll is valid; filled below.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETHERTYPE.to_be();
    sll.sll_ifindex = ifindex;
    // SAFETY: a valid sockaddr_ll of the given length.
    check(
        unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        },
        "bind",
    );
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    // SAFETY: a valid timeval option.
    check(
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        },
        "SO_RCVTIMEO",
    );
    (fd, ifindex)
}

/// The next incoming frame, or None after the socket's timeout.
fn recv_frame(fd: &OwnedFd) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 2048];
    // SAFETY: zeroed sockaddr_ll is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
    // SAFETY: live buffers of the given sizes.
    let n = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            0,
            (&mut sll as *mut libc::sockaddr_ll).cast(),
            &mut len,
        )
    };
    if n < 0 || sll.sll_pkttype == libc::PACKET_OUTGOING {
        return if n < 0 { None } else { Some(Vec::new()) };
    }
    buf.truncate(n as usize);
    Some(buf)
}

fn send_frame(fd: &OwnedFd, ifindex: libc::c_int, frame: &[u8]) {
    // SAFETY: zeroed sockaddr_ll is valid; filled below.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETHERTYPE.to_be();
    sll.sll_ifindex = ifindex;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&GUEST_MAC);
    // SAFETY: live buffers of the given sizes.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(
        n,
        frame.len() as isize,
        "sendto: {}",
        std::io::Error::last_os_error()
    );
}

fn payload(text: &str) -> Vec<u8> {
    let mut p = text.as_bytes().to_vec();
    p.resize(64, 0);
    p
}

struct Seen {
    sent: Vec<Vec<u8>>,
    echoes: Vec<Vec<u8>>,
}

/// In the namespace: captures the guest's 8 frames, injects 5, captures their echoes.
fn host_side(ns: String, ready: mpsc::Sender<()>) -> Seen {
    let (fd, ifindex) = packet_socket(&ns, "tap0");
    ready.send(()).unwrap();
    let mut seen = Seen {
        sent: Vec::new(),
        echoes: Vec::new(),
    };
    let until = Instant::now() + Duration::from_secs(30);
    while seen.sent.len() < 8 && Instant::now() < until {
        if let Some(f) = recv_frame(&fd) {
            if f.len() >= 14 && f[6..12] == GUEST_MAC {
                seen.sent.push(f);
            }
        }
    }
    if seen.sent.len() < 8 {
        return seen;
    }
    for i in 0..5 {
        let mut f = GUEST_MAC.to_vec();
        f.extend_from_slice(&HOST_MAC);
        f.extend_from_slice(&ETHERTYPE.to_be_bytes());
        f.extend_from_slice(&payload(&format!("host-echo {i}")));
        send_frame(&fd, ifindex, &f);
    }
    let until = Instant::now() + Duration::from_secs(10);
    while seen.echoes.len() < 5 && Instant::now() < until {
        if let Some(f) = recv_frame(&fd) {
            if f.len() >= 14 && f[..6] == HOST_MAC {
                seen.echoes.push(f);
            }
        }
    }
    seen
}

#[test]
fn net_frames_go_out_and_echo_back_through_a_tap() {
    if !require_root() || !require_kvm() {
        return;
    }
    let ns = Netns::new();
    ns.exec(&["ip", "tuntap", "add", "dev", "tap0", "mode", "tap"]);
    ns.exec(&["ip", "link", "set", "tap0", "up"]);

    let (tx, rx) = mpsc::channel();
    let name = ns.0.clone();
    let helper = std::thread::spawn(move || host_side(name, tx));
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the capture helper did not start");

    let dir = TempDir::new("net");
    let metrics = dir.path("metrics.json");
    let mut cfg = guest_config("net", 1, 128);
    cfg["network-interfaces"] = json!([{
        "iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"
    }]);
    cfg["metrics"] = json!({"metrics_path": metrics.to_str().unwrap()});
    let path = dir.write("vm.json", serde_json::to_vec(&cfg).unwrap());
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            EMBER,
            "--no-api",
            "--boot-timer",
            "--config-file",
        ])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start ember in the namespace");
    let out = wait_with_guard(child, Duration::from_secs(60));
    let seen = helper.join().expect("the capture helper panicked");

    out.expect_code(0)
        .expect("net: mac 06:00:ac:10:00:02")
        .expect("net: sent 8 frames")
        .expect("net: echoed 5 frames")
        .expect("ember-guest: done");

    assert_eq!(seen.sent.len(), 8, "guest frames seen on tap0");
    for (i, f) in seen.sent.iter().enumerate() {
        assert_eq!(f[..6], [0xff; 6], "frame {i}: destination");
        assert_eq!(f[6..12], GUEST_MAC, "frame {i}: source");
        assert_eq!(f[12..14], ETHERTYPE.to_be_bytes(), "frame {i}: ethertype");
        assert_eq!(
            f[14..78],
            payload(&format!("ember-net {i}"))[..],
            "frame {i}: payload"
        );
    }
    assert_eq!(seen.echoes.len(), 5, "echoed frames seen on tap0");
    for (i, f) in seen.echoes.iter().enumerate() {
        assert_eq!(f[..6], HOST_MAC, "echo {i}: destination");
        assert_eq!(f[6..12], GUEST_MAC, "echo {i}: source");
        assert_eq!(f[12..14], ETHERTYPE.to_be_bytes(), "echo {i}: ethertype");
        assert_eq!(
            f[14..78],
            payload(&format!("host-echo {i}"))[..],
            "echo {i}: payload"
        );
    }

    let text = std::fs::read_to_string(&metrics).unwrap();
    let sum = |key: &str| -> u64 {
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| v["net"][key].as_u64().unwrap_or(0))
            .sum()
    };
    assert!(sum("tx_packets_count") >= 13, "metrics:\n{text}");
    assert!(sum("rx_packets_count") >= 5, "metrics:\n{text}");
    assert_eq!(sum("tx_spoofed_mac_count"), 0, "metrics:\n{text}");
}

#[test]
fn an_invalid_tap_is_a_configuration_error_with_or_without_rate_limiters() {
    if !require_root() || !require_kvm() {
        return;
    }
    // Run inside a namespace of our own, so that nothing can touch the host's interfaces.
    let ns = Netns::new();
    let dir = TempDir::new("net-bad");
    let mut cfg = guest_config("net", 1, 128);
    cfg["network-interfaces"] = json!([{"iface_id": "eth0", "host_dev_name": "bad/name"}]);
    let path = dir.write("bad.json", serde_json::to_vec(&cfg).unwrap());
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.0, EMBER, "--no-api", "--config-file"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_with_guard(child, Duration::from_secs(60))
        .expect_code(152)
        .expect("TAP device \"bad/name\"");

    let mut vm = ApiVm::start(&[]);
    let mut c = vm.client();
    let r = c.put(
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "host_dev_name": "bad/name"}"#,
    );
    assert_eq!(r.status, 400);
    assert!(r.fault().contains("bad/name"), "{}", r.fault());
    let r = c.put(
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "host_dev_name": "bad/name",
            "tx_rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}"#,
    );
    // Rate limiters are accepted: the TAP is what fails.
    assert_eq!(r.status, 400);
    assert!(r.fault().contains("bad/name"), "{}", r.fault());
    let r = c.patch("/network-interfaces/eth0", r#"{"iface_id": "eth0"}"#);
    assert_eq!(r.status, 400);
    assert_eq!(c.get("/vm/config").json()["network-interfaces"], json!([]));
    vm.terminate();
}

/// The `evilnet` guest's chain-level cases, run on the TX and the RX queue.
const EVIL_CHAIN_CASES: &[&str] = &[
    "bad address",
    "looping chain",
    "overlong chain",
    "zero length",
    "wrong direction",
    "head beyond the queue",
    "avail index jump",
];

/// Sum of one counter of one metrics group over every metrics line.
fn counter_sum(metrics: &str, group: &str, name: &str) -> u64 {
    metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v[group][name].as_u64())
        .sum()
}

#[test]
fn evil_guest_is_survived_and_counted() {
    if !require_root() || !require_kvm() {
        return;
    }
    let ns = Netns::new();
    ns.exec(&["ip", "tuntap", "add", "dev", "tap0", "mode", "tap"]);
    ns.exec(&["ip", "link", "set", "tap0", "up"]);

    // One thread injects a frame for the guest every 10 ms (so that the device has frames
    // to put in the RX chains the guest attacks with), one captures what the guest sends.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let (name, stop2, tx2) = (ns.0.clone(), stop.clone(), tx.clone());
    let injector = std::thread::spawn(move || {
        let (fd, ifindex) = packet_socket(&name, "tap0");
        tx2.send(()).unwrap();
        let mut f = GUEST_MAC.to_vec();
        f.extend_from_slice(&HOST_MAC);
        f.extend_from_slice(&ETHERTYPE.to_be_bytes());
        f.extend_from_slice(&payload("host-inject"));
        let mut n = 0u32;
        while !stop2.load(Ordering::Relaxed) {
            send_frame(&fd, ifindex, &f);
            n += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
        n
    });
    let (name, stop2) = (ns.0.clone(), stop.clone());
    let capture = std::thread::spawn(move || {
        let (fd, _) = packet_socket(&name, "tap0");
        tx.send(()).unwrap();
        let mut seen = Vec::new();
        while !stop2.load(Ordering::Relaxed) {
            if let Some(f) = recv_frame(&fd) {
                if f.len() >= 14 && f[6..12] == GUEST_MAC {
                    seen.push(f);
                }
            }
        }
        seen
    });
    for _ in 0..2 {
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the capture helpers did not start");
    }

    let dir = TempDir::new("net-evil");
    let metrics = dir.path("metrics.json");
    let mut cfg = guest_config("evilnet", 1, 128);
    cfg["network-interfaces"] = json!([{
        "iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"
    }]);
    cfg["metrics"] = json!({"metrics_path": metrics.to_str().unwrap()});
    let path = dir.write("vm.json", serde_json::to_vec(&cfg).unwrap());
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            EMBER,
            "--no-api",
            "--boot-timer",
            "--config-file",
        ])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start ember in the namespace");
    let out = wait_with_guard(child, Duration::from_secs(60));
    // Frames still on their way out of the TAP.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let injected = injector.join().expect("the injector panicked");
    let seen = capture.join().expect("the capture helper panicked");

    out.expect_code(0)
        .expect("evilnet: well-behaved tx ok")
        .expect("evilnet: well-behaved rx ok")
        .expect("ember-guest: done");
    for q in ["tx", "rx"] {
        for case in EVIL_CHAIN_CASES {
            out.expect(&format!("evilnet: {q} {case} survived"));
            let prefix = format!("evilnet: {q} {case}: ");
            let what = out
                .stdout
                .lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()))
                .unwrap_or_else(|| panic!("no {prefix:?} line:\n{}", out.stdout));
            assert!(
                what.contains("buffers untouched"),
                "the device wrote a malformed chain's buffers: {prefix}{what}"
            );
            assert!(
                what.starts_with("no completion") || what.starts_with("completed, len 0,"),
                "a malformed chain was used: {prefix}{what}"
            );
        }
    }
    for case in [
        "notify before DRIVER_OK",
        "queue size 3",
        "config out of range",
    ] {
        out.expect(&format!("evilnet: {case} survived"));
    }
    out.expect("evilnet: notify before DRIVER_OK: no completion")
        .expect("evilnet: config out of range: read 0x00000000, after write 0x00000000");

    // What reached the TAP: the well-behaved frame, and nothing of the malformed chains.
    let has = |f: &Vec<u8>, text: &[u8]| f.windows(text.len()).any(|w| w == text);
    assert!(
        seen.iter().any(|f| has(f, b"ember-evil well-behaved")),
        "the well-behaved frame did not reach the TAP ({} frames seen)",
        seen.len()
    );
    assert!(
        !seen.iter().any(|f| has(f, b"ember-evil-bad")),
        "a malformed TX chain reached the TAP"
    );

    let m = std::fs::read_to_string(&metrics).unwrap_or_default();
    // The five malformed TX chains are refused one by one; RX chains are looked at when a frame
    // arrives (timing: at least one); the TX head and avail index, the RX avail index and queue
    // size 3 mark the device NEEDS_RESET.
    for (group, name, least) in [
        ("net_eth0", "tx_malformed", 5),
        ("net_eth0", "rx_malformed", 1),
        ("net", "tx_malformed", 5),
        ("virtio", "malformed_chains", 1),
        ("virtio", "needs_reset", 4),
        ("virtio", "invalid_notifications", 1),
        ("virtio", "invalid_register_writes", 1),
    ] {
        assert!(
            counter_sum(&m, group, name) >= least,
            "{group}.{name} counted fewer than {least} ({injected} frames injected); metrics:\n{m}\n--- stdout\n{}",
            out.stdout
        );
    }
}

/// The `netbench` scenario (benchmark 8) end to end: the guest's TX burst reaches tap0 and
/// frames the host injects are counted by the guest.
#[test]
fn netbench_sends_and_receives_through_a_tap() {
    if !require_root() || !require_kvm() {
        return;
    }
    let ns = Netns::new();
    ns.exec(&["ip", "tuntap", "add", "dev", "tap0", "mode", "tap"]);
    ns.exec(&["ip", "link", "set", "tap0", "up"]);

    // A frame to the guest every millisecond for 4 s: through the guest's TX second and into
    // its RX phase (frames that find no RX buffer yet are dropped by the TAP).
    let (tx, rx) = mpsc::channel();
    let name = ns.0.clone();
    let injector = std::thread::spawn(move || {
        let (fd, ifindex) = packet_socket(&name, "tap0");
        tx.send(()).unwrap();
        let mut f = GUEST_MAC.to_vec();
        f.extend_from_slice(&HOST_MAC);
        f.extend_from_slice(&ETHERTYPE.to_be_bytes());
        f.resize(1514, 0x42);
        let until = Instant::now() + Duration::from_secs(4);
        while Instant::now() < until {
            send_frame(&fd, ifindex, &f);
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the injector did not start");

    let dir = TempDir::new("netbench");
    let mut cfg = guest_config("netbench=1514", 1, 128);
    cfg["network-interfaces"] = json!([{
        "iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"
    }]);
    let path = dir.write("vm.json", serde_json::to_vec(&cfg).unwrap());
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.0, EMBER, "--no-api", "--boot-timer"])
        .arg("--config-file")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start ember in the namespace");
    let out = wait_with_guard(child, Duration::from_secs(60));
    injector.join().expect("the injector panicked");
    out.expect_code(0)
        .expect("netbench: tx start")
        .expect("netbench: rx ready")
        .expect("ember-guest: done");
    let text = out.all();
    // The result lines (not `tx start` / `rx ready`): their first number.
    let count = |prefix: &str| -> u64 {
        text.lines()
            .find_map(|l| {
                l.split(prefix)
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    };
    assert!(count("netbench: tx ") > 0, "{text}");
    assert!(count("netbench: rx ") > 0, "{text}");
}
