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

    /// ember booting the config file `path` inside the namespace, console and log piped.
    fn spawn_ember(&self, path: &std::path::Path) -> std::process::Child {
        Command::new("ip")
            .args(["netns", "exec", &self.0, EMBER, "--no-api", "--boot-timer"])
            .arg("--config-file")
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start ember in the namespace")
    }
}

/// The test guest running `boot_args` with eth0 on tap0 (MAC 06:00:ac:10:00:02).
fn tap0_config(boot_args: &str) -> serde_json::Value {
    let mut cfg = guest_config(boot_args, 1, 128);
    cfg["network-interfaces"] = json!([{
        "iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"
    }]);
    cfg
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
    bound_packet_socket(tap, ETHERTYPE, &[])
}

/// An AF_PACKET socket for `proto` frames bound to `dev` (in the calling thread's namespace),
/// with the integer socket options `opts` (level, name, value, what) and a 200 ms receive
/// timeout; the socket and the interface index.
fn bound_packet_socket(
    dev: &str,
    proto: u16,
    opts: &[(libc::c_int, libc::c_int, libc::c_int, &str)],
) -> (OwnedFd, libc::c_int) {
    // SAFETY: plain socket creation.
    let fd = check(
        unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                proto.to_be() as libc::c_int,
            )
        },
        "socket(AF_PACKET)",
    );
    // SAFETY: we own the new fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    for &(level, name, v, what) in opts {
        // SAFETY: an int option.
        check(
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    level,
                    name,
                    (&v as *const libc::c_int).cast(),
                    4,
                )
            },
            what,
        );
    }
    let name = std::ffi::CString::new(dev).unwrap();
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as libc::c_int;
    assert!(ifindex > 0, "no {dev}");
    // SAFETY: zeroed sockaddr_ll is valid; filled below.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto.to_be();
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

/// Sends `frame` (with a virtio_net_hdr in front if the socket asked for one) to the guest's
/// MAC on `ifindex`, as an `ethertype` packet.
fn send_frame(fd: &OwnedFd, ifindex: libc::c_int, ethertype: u16, frame: &[u8]) {
    // SAFETY: zeroed sockaddr_ll is valid; filled below.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ethertype.to_be();
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
        send_frame(&fd, ifindex, ETHERTYPE, &f);
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
    if !require_root("TAP devices and network namespaces") || !require_kvm() {
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
    let mut cfg = tap0_config("net");
    cfg["metrics"] = json!({"metrics_path": metrics.to_str().unwrap()});
    let path = dir.write("vm.json", serde_json::to_vec(&cfg).unwrap());
    let child = ns.spawn_ember(&path);
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
    if !require_root("TAP devices and network namespaces") || !require_kvm() {
        return;
    }
    // Run inside a namespace of our own, so that nothing can touch the host's interfaces.
    let ns = Netns::new();
    let dir = TempDir::new("net-bad");
    let mut cfg = guest_config("net", 1, 128);
    cfg["network-interfaces"] = json!([{"iface_id": "eth0", "host_dev_name": "bad/name"}]);
    let path = dir.write("bad.json", serde_json::to_vec(&cfg).unwrap());
    let child = ns.spawn_ember(&path);
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

/// A thread that sends the guest a frame through the TAP every `period` until stopped.
struct Injector {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u32>,
}

impl Injector {
    /// Starts injecting on `tap0` in `ns`, once its packet socket is open.
    fn start(ns: &Netns, period: Duration) -> Injector {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let (name, stop2) = (ns.0.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let (fd, ifindex) = packet_socket(&name, "tap0");
            tx.send(()).unwrap();
            let mut f = GUEST_MAC.to_vec();
            f.extend_from_slice(&HOST_MAC);
            f.extend_from_slice(&ETHERTYPE.to_be_bytes());
            f.extend_from_slice(&payload("host-inject"));
            let mut n = 0u32;
            while !stop2.load(Ordering::Relaxed) {
                send_frame(&fd, ifindex, ETHERTYPE, &f);
                n += 1;
                std::thread::sleep(period);
            }
            n
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the injector did not start");
        Injector { stop, thread }
    }

    /// Stops it; how many frames it sent.
    fn stop(self) -> u32 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the injector panicked")
    }
}

/// Boots the test guest with `boot_args` on a TAP in a fresh namespace that gets a frame
/// every `period`: ember's outcome and its metrics.
fn boot_with_traffic(boot_args: &str, period: Duration) -> (Outcome, String) {
    let ns = Netns::new();
    ns.exec(&["ip", "tuntap", "add", "dev", "tap0", "mode", "tap"]);
    ns.exec(&["ip", "link", "set", "tap0", "up"]);
    let injector = Injector::start(&ns, period);
    let dir = TempDir::new("net-traffic");
    let metrics = dir.path("metrics.json");
    let mut cfg = tap0_config(boot_args);
    cfg["metrics"] = json!({"metrics_path": metrics.to_str().unwrap()});
    let path = dir.write("vm.json", serde_json::to_vec(&cfg).unwrap());
    let out = wait_with_guard(ns.spawn_ember(&path), Duration::from_secs(60));
    injector.stop();
    (out, std::fs::read_to_string(&metrics).unwrap_or_default())
}

/// The guest's random driver (`fuzzdev`, see tests/virtio.rs) against a net device whose
/// TAP gets a frame every 5 ms, so RX chains meet real frames: the VMM stays up, the first
/// page of RAM stays untouched, the device's checks count malformed chains.
#[test]
fn random_driver_against_a_net_device_with_traffic() {
    if !require_root("TAP devices and network namespaces") || !require_kvm() {
        return;
    }
    for seed in 1..=2u64 {
        let (out, m) = boot_with_traffic(&format!("fuzzdev={seed}"), Duration::from_millis(5));
        out.expect_code(0)
            .expect(&format!("fuzzdev: 3000 rounds on 1 devices, seed {seed}"))
            .expect("fuzzdev: survived")
            .expect("ember-guest: done");
        assert!(
            counter_sum(&m, "virtio", "malformed_chains") > 0,
            "seed {seed}: no malformed chain was counted; metrics:\n{m}"
        );
    }
}

/// The guest's `fuzznet`: 2000 frames with random `virtio_net_hdr`s (flags, GSO types, header
/// and segment sizes, checksum offsets near and far from plausible) and bodies up to 64 KiB in
/// one to three descriptors, with the offloads renegotiated every 250 frames, while the host
/// injects frames. Every chain comes back, ember keeps running, and what the TAP refused is
/// counted, not fatal.
#[test]
fn random_net_headers_and_offloads_are_survived() {
    if !require_root("TAP devices and network namespaces") || !require_kvm() {
        return;
    }
    for seed in 1..=2u64 {
        let (out, m) = boot_with_traffic(&format!("fuzznet={seed}"), Duration::from_millis(2));
        out.expect_code(0)
            .expect("fuzznet: 2000 frames, ")
            .expect("fuzznet: survived")
            .expect("ember-guest: done");
        let (sent, refused) = (
            counter_sum(&m, "net", "tx_packets_count"),
            counter_sum(&m, "net", "tx_fails") + counter_sum(&m, "net", "tx_malformed"),
        );
        assert!(
            sent > 0 && refused > 0,
            "seed {seed}: {sent} frames out, {refused} refused; metrics:\n{m}"
        );
    }
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
    if !require_root("TAP devices and network namespaces") || !require_kvm() {
        return;
    }
    let ns = Netns::new();
    ns.exec(&["ip", "tuntap", "add", "dev", "tap0", "mode", "tap"]);
    ns.exec(&["ip", "link", "set", "tap0", "up"]);

    // One thread captures what the guest sends, one injects a frame for the guest every
    // 10 ms (so that the device has frames to put in the RX chains the guest attacks with).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
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
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the capture helper did not start");
    let injector = Injector::start(&ns, Duration::from_millis(10));

    let dir = TempDir::new("net-evil");
    let metrics = dir.path("metrics.json");
    let mut cfg = tap0_config("evilnet");
    cfg["metrics"] = json!({"metrics_path": metrics.to_str().unwrap()});
    let path = dir.write("vm.json", serde_json::to_vec(&cfg).unwrap());
    let child = ns.spawn_ember(&path);
    let out = wait_with_guard(child, Duration::from_secs(60));
    // Frames still on their way out of the TAP.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let injected = injector.stop();
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
    if !require_root("TAP devices and network namespaces") || !require_kvm() {
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
            send_frame(&fd, ifindex, ETHERTYPE, &f);
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the injector did not start");
    // And one that counts the guest's benchmark frames as they leave tap0: 1514 bytes,
    // broadcast, from the guest's MAC, payload byte k = k.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let (name, stop2) = (ns.0.clone(), stop.clone());
    let capture = std::thread::spawn(move || {
        let (fd, _) = packet_socket(&name, "tap0");
        tx.send(()).unwrap();
        let (mut good, mut bad) = (0u64, 0u64);
        while !stop2.load(Ordering::Relaxed) {
            let Some(f) = recv_frame(&fd) else { continue };
            if f.len() < 14 || f[6..12] != GUEST_MAC {
                continue;
            }
            let whole = f.len() == 1514
                && f[..6] == [0xff; 6]
                && f[12..14] == ETHERTYPE.to_be_bytes()
                && f[14..].iter().enumerate().all(|(k, &b)| b == k as u8);
            if whole {
                good += 1;
            } else {
                bad += 1;
            }
        }
        (good, bad)
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the capture helper did not start");

    let dir = TempDir::new("netbench");
    let metrics = dir.path("metrics.json");
    let mut cfg = tap0_config("netbench=1514");
    cfg["metrics"] = json!({"metrics_path": metrics.to_str().unwrap()});
    let path = dir.write("vm.json", serde_json::to_vec(&cfg).unwrap());
    let child = ns.spawn_ember(&path);
    let out = wait_with_guard(child, Duration::from_secs(60));
    injector.join().expect("the injector panicked");
    // Frames still on their way out of the TAP.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (captured, mangled) = capture.join().expect("the capture helper panicked");
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
    let (sent, received) = (count("netbench: tx "), count("netbench: rx "));
    assert!(sent > 0, "{text}");
    assert!(received > 0, "{text}");
    // The guest's count is of completed TX chains; the host must have seen the frames
    // themselves (a capture socket may drop some of a burst, never invent them).
    let m = std::fs::read_to_string(&metrics).unwrap_or_default();
    assert_eq!(
        mangled, 0,
        "frames from the guest's MAC that are not its own"
    );
    assert!(
        captured > 0 && captured <= sent,
        "{captured} of the guest's {sent} frames seen on tap0"
    );
    assert_eq!(
        counter_sum(&m, "net", "tx_packets_count"),
        sent,
        "frames written to the TAP vs the guest's count; metrics:\n{m}"
    );
    assert!(
        counter_sum(&m, "net", "rx_packets_count") >= received,
        "the guest counted {received} frames the device never delivered; metrics:\n{m}"
    );
}

// ---- netgso: segmentation offloads and mergeable RX buffers, both ways ----

/// `setsockopt(SOL_PACKET, PACKET_VNET_HDR)`: a `virtio_net_hdr` (10 bytes) in front of every
/// frame sent and received.
const PACKET_VNET_HDR: libc::c_int = 15;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_STXCSUM: u32 = 0x17;
const ETHTOOL_STSO: u32 = 0x1f;
const ETHTOOL_GTSO: u32 = 0x1e;
/// What the `netgso` guest uses (resources/guest/src/scenarios/netgso.rs).
const GSO_GUEST_PORT: u16 = 40000;
const GSO_HOST_PORT: u16 = 5001;
const GSO_GUEST_IP: [u8; 4] = [10, 0, 0, 2];
const GSO_HOST_IP: [u8; 4] = [10, 0, 0, 1];
const GSO_TX_PAYLOAD: usize = 40000;
const GSO_TX_SEED: u8 = 0x5a;
/// What this test sends to the guest: one 60 KiB TCP segment offloaded with MSS 1448.
const GSO_RX_PAYLOAD: usize = 60 << 10;
const GSO_RX_SEED: u8 = 0xc3;
const GSO_RX_SEQ: u32 = 0x0bad_cafe;
const GSO_MSS: u16 = 1448;
/// The guest's TCP/IPv6 TSO frame: fd00::2 -> fd00::1, MSS 1440 (a 1500-byte MTU).
const GSO6_GUEST_IP: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const GSO6_HOST_IP: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const GSO6_TX_PAYLOAD: usize = 30000;
const GSO6_TX_SEED: u8 = 0xa6;
const GSO6_MSS: u16 = 1440;
/// What this test sends to the guest over IPv6: 48 KiB offloaded with MSS 1440.
const GSO6_RX_PAYLOAD: usize = 48 << 10;
const GSO6_RX_SEED: u8 = 0x96;
const GSO6_RX_SEQ: u32 = 0x0600_d00d;
/// The guest's UFO datagram: UDP 10.0.0.2:40000 -> 10.0.0.1:5001, fragments of 1480 bytes.
const UFO_PAYLOAD: usize = 20000;
const UFO_SEED: u8 = 0x3c;
const UFO_FRAG: usize = 1480;

/// Byte `k` of a test payload (the guest's `netgso::pattern`).
fn gso_pattern(k: usize, seed: u8) -> u8 {
    ((k as u32).wrapping_mul(2_654_435_761).rotate_right(13) as u8) ^ seed
}

/// The 16-bit one's complement sum of `b` added to `sum`, not folded.
fn sum16(mut sum: u32, b: &[u8]) -> u32 {
    for c in b.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The TCP/IPv6 pseudo-header's sum for `tcp_len` bytes of TCP from `src` to `dst`.
fn pseudo_sum6(src: [u8; 16], dst: [u8; 16], tcp_len: usize) -> u32 {
    sum16(sum16(6 + tcp_len as u32, &src), &dst)
}

/// The TCP pseudo-header's sum for `tcp_len` bytes of TCP from `src` to `dst`.
fn pseudo_sum(src: [u8; 4], dst: [u8; 4], tcp_len: usize) -> u32 {
    sum16(sum16(6 + tcp_len as u32, &src), &dst)
}

/// An Ethernet/IPv4/TCP frame with a valid IP checksum and, as CHECKSUM_PARTIAL wants it, the
/// pseudo-header's sum in the TCP checksum field.
#[allow(clippy::too_many_arguments)]
fn tcp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    ports: (u16, u16),
    seq: u32,
    payload: &[u8],
) -> Vec<u8> {
    let tcp_len = 20 + payload.len();
    let mut f = dst_mac.to_vec();
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&ETH_P_IP.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&0x4321u16.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let c = !fold(sum16(0, &ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp_header(ports, seq, pseudo_sum(src, dst, tcp_len)));
    f.extend_from_slice(payload);
    f
}

/// A TCP header without options (PSH, ACK), its checksum field holding `pseudo` folded.
fn tcp_header(ports: (u16, u16), seq: u32, pseudo: u32) -> [u8; 20] {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&ports.0.to_be_bytes());
    tcp[2..4].copy_from_slice(&ports.1.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // PSH, ACK
    tcp[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    tcp[16..18].copy_from_slice(&fold(pseudo).to_be_bytes());
    tcp
}

/// An Ethernet/IPv6/TCP frame with, as CHECKSUM_PARTIAL wants it, the pseudo-header's sum in
/// the TCP checksum field.
fn tcp6_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: [u8; 16],
    dst: [u8; 16],
    ports: (u16, u16),
    seq: u32,
    payload: &[u8],
) -> Vec<u8> {
    let tcp_len = 20 + payload.len();
    let mut f = dst_mac.to_vec();
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    let mut ip = [0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
    ip[6] = 6;
    ip[7] = 64;
    ip[8..24].copy_from_slice(&src);
    ip[24..40].copy_from_slice(&dst);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp_header(ports, seq, pseudo_sum6(src, dst, tcp_len)));
    f.extend_from_slice(payload);
    f
}

/// `virtio_net_hdr.gso_type` for TCP over IPv4 and over IPv6.
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;

/// A virtio_net_hdr (10 bytes, little-endian as with VERSION_1) asking for TSO of `gso_type`,
/// the TCP checksum to be finished from `csum_start` (at offset 16 there).
fn gso_hdr(gso_type: u8, csum_start: u16, hdr_len: u16, mss: u16) -> [u8; 10] {
    let mut h = [0u8; 10];
    h[0] = 1; // NEEDS_CSUM
    h[1] = gso_type;
    h[2..4].copy_from_slice(&hdr_len.to_le_bytes());
    h[4..6].copy_from_slice(&mss.to_le_bytes());
    h[6..8].copy_from_slice(&csum_start.to_le_bytes());
    h[8..10].copy_from_slice(&16u16.to_le_bytes());
    h
}

/// An AF_PACKET socket for every frame on `dev` (in the calling thread's namespace; ETH_P_ALL,
/// so that it sees them before a bridge takes them), with a virtio_net_hdr in front of every
/// frame when `vnet_hdr`.
fn all_packet_socket(dev: &str, vnet_hdr: bool) -> (OwnedFd, libc::c_int) {
    let rcvbuf = (libc::SOL_SOCKET, libc::SO_RCVBUF, 4 << 20, "SO_RCVBUF");
    let vnet = (libc::SOL_PACKET, PACKET_VNET_HDR, 1, "PACKET_VNET_HDR");
    let opts: &[_] = if vnet_hdr { &[vnet, rcvbuf] } else { &[rcvbuf] };
    bound_packet_socket(dev, libc::ETH_P_ALL as u16, opts)
}

/// The next incoming (not outgoing) packet, whole, or None after the socket's timeout.
fn recv_big(fd: &OwnedFd) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 1 << 17];
    loop {
        // SAFETY: zeroed sockaddr_ll is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: live buffers of the given sizes.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
                (&mut sll as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        if n < 0 {
            return None;
        }
        assert!(n as usize <= buf.len(), "a {n}-byte packet was truncated");
        if sll.sll_pkttype != libc::PACKET_OUTGOING {
            buf.truncate(n as usize);
            return Some(buf);
        }
    }
}

/// `ETHTOOL_S*` with a value on `dev` (the calling thread's namespace), or `ETHTOOL_G*`:
/// returns the value.
fn ethtool(dev: &str, cmd: u32, value: u32) -> u32 {
    // struct ethtool_value { u32 cmd; u32 data; }
    let mut v = [cmd, value];
    // struct ifreq: the name, then ifr_data.
    let mut ifr = [0u8; 40];
    ifr[..dev.len()].copy_from_slice(dev.as_bytes());
    ifr[16..24].copy_from_slice(&(v.as_mut_ptr() as u64).to_ne_bytes());
    // SAFETY: plain socket creation.
    let s = check(
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) },
        "socket(AF_INET)",
    );
    // SAFETY: we own the new fd.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    // SAFETY: a 40-byte ifreq whose ifr_data points at a live ethtool_value.
    check(
        unsafe { libc::ioctl(s.as_raw_fd(), SIOCETHTOOL, ifr.as_mut_ptr()) },
        "SIOCETHTOOL",
    );
    v[1]
}

/// What the host side of `netgso` saw.
struct GsoSeen {
    /// The guest's frame on tap0: virtio_net_hdr and frame.
    tso: Option<Vec<u8>>,
    /// The frames the kernel made of it on their way through br0 to veth1 (TSO and checksum
    /// offloads off there), seen on its peer veth2.
    segments: Vec<Vec<u8>>,
    /// The same for the guest's TCP/IPv6 frame.
    tso6: Option<Vec<u8>>,
    segments6: Vec<Vec<u8>>,
    /// The IPv4 fragments the kernel made of the guest's UFO datagram.
    fragments: Vec<Vec<u8>>,
    /// tap0's TSO (ETHTOOL_GTSO) while the `netgso` driver runs, and once the `net` scenario
    /// that follows has reset the device and negotiated no offloads.
    tso_during: Option<u32>,
    tso_after_reset: Option<u32>,
}

/// In the namespace: waits for `go`, injects the 60 KiB GSO packet for the guest on tap0, then
/// captures the guest's TSO frame on tap0 and its segments on veth2.
fn gso_host_side(ns: String, ready: mpsc::Sender<()>, go: mpsc::Receiver<()>) -> GsoSeen {
    let nsf = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
    // SAFETY: a namespace fd; only this (test helper) thread changes namespace.
    check(
        unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) },
        "setns",
    );
    // The kernel segments what br0 forwards to veth1 in software, checksums included.
    ethtool("veth1", ETHTOOL_STXCSUM, 0);
    ethtool("veth1", ETHTOOL_STSO, 0);
    let (tap, ifindex) = all_packet_socket("tap0", true);
    let (veth, _) = all_packet_socket("veth2", false);
    ready.send(()).unwrap();
    let mut seen = GsoSeen {
        tso: None,
        segments: Vec::new(),
        tso6: None,
        segments6: Vec::new(),
        fragments: Vec::new(),
        tso_during: None,
        tso_after_reset: None,
    };
    if go.recv_timeout(Duration::from_secs(60)).is_err() {
        return seen;
    }
    seen.tso_during = Some(ethtool("tap0", ETHTOOL_GTSO, 0));

    let payload: Vec<u8> = (0..GSO_RX_PAYLOAD)
        .map(|k| gso_pattern(k, GSO_RX_SEED))
        .collect();
    let frame = tcp_frame(
        GUEST_MAC,
        HOST_MAC,
        GSO_HOST_IP,
        GSO_GUEST_IP,
        (GSO_HOST_PORT, GSO_GUEST_PORT),
        GSO_RX_SEQ,
        &payload,
    );
    let mut pkt = gso_hdr(GSO_TCPV4, 34, 54, GSO_MSS).to_vec();
    pkt.extend_from_slice(&frame);
    send_frame(&tap, ifindex, ETH_P_IP, &pkt);
    // The same over IPv6, for GUEST_TSO6.
    let payload6: Vec<u8> = (0..GSO6_RX_PAYLOAD)
        .map(|k| gso_pattern(k, GSO6_RX_SEED))
        .collect();
    let frame6 = tcp6_frame(
        GUEST_MAC,
        HOST_MAC,
        GSO6_HOST_IP,
        GSO6_GUEST_IP,
        (GSO_HOST_PORT, GSO_GUEST_PORT),
        GSO6_RX_SEQ,
        &payload6,
    );
    let mut pkt6 = gso_hdr(GSO_TCPV6, 54, 74, GSO6_MSS).to_vec();
    pkt6.extend_from_slice(&frame6);
    send_frame(&tap, ifindex, ETH_P_IPV6, &pkt6);

    let from_guest =
        |f: &[u8]| f.len() >= 54 && f[6..12] == GUEST_MAC && f[12..14] == [8, 0] && f[23] == 6;
    let until = Instant::now() + Duration::from_secs(30);
    while seen.tso.is_none() && Instant::now() < until {
        if let Some(p) = recv_big(&tap) {
            if p.len() >= 10 && from_guest(&p[10..]) {
                seen.tso = Some(p);
            }
        }
    }
    let from_guest6 = |f: &[u8]| {
        f.len() >= 74 && f[6..12] == GUEST_MAC && f[12..14] == [0x86, 0xdd] && f[20] == 6
    };
    let until = Instant::now() + Duration::from_secs(10);
    while seen.tso.is_some() && seen.tso6.is_none() && Instant::now() < until {
        if let Some(p) = recv_big(&tap) {
            if p.len() >= 10 && from_guest6(&p[10..]) {
                seen.tso6 = Some(p);
            }
        }
    }
    // The segments were made as the frames crossed br0: they are queued on veth2 already.
    let from_guest_udp =
        |f: &[u8]| f.len() >= 34 && f[6..12] == GUEST_MAC && f[12..14] == [8, 0] && f[23] == 17;
    let want = GSO_TX_PAYLOAD.div_ceil(usize::from(GSO_MSS));
    let want6 = GSO6_TX_PAYLOAD.div_ceil(usize::from(GSO6_MSS));
    let want_frags = (8 + UFO_PAYLOAD).div_ceil(UFO_FRAG);
    let until = Instant::now() + Duration::from_secs(5);
    while seen.tso.is_some()
        && (seen.segments.len() < want
            || seen.segments6.len() < want6
            || seen.fragments.len() < want_frags)
        && Instant::now() < until
    {
        if let Some(f) = recv_big(&veth) {
            if from_guest(&f) {
                seen.segments.push(f);
            } else if from_guest6(&f) {
                seen.segments6.push(f);
            } else if from_guest_udp(&f) {
                seen.fragments.push(f);
            }
        }
    }
    if go.recv_timeout(Duration::from_secs(30)).is_ok() {
        seen.tso_after_reset = Some(ethtool("tap0", ETHTOOL_GTSO, 0));
    }
    seen
}

/// The `netgso` scenario: host -> guest, a 60 KiB TCP/IPv4 GSO packet injected on tap0 reaches
/// the guest whole, as a GSO frame spread over 4 KiB mergeable RX buffers (TUNSETOFFLOAD from
/// GUEST_CSUM + GUEST_TSO4), and so does a 48 KiB TCP/IPv6 one (GUEST_TSO6); guest -> host, a 40 000-byte TSO frame (and a 30 000-byte one
/// over IPv6, HOST_TSO6) leaves tap0 as one GSO packet, and the kernel's software segmentation
/// (through a bridge to a veth without offloads) makes valid MSS-sized TCP segments of it; a
/// UDP datagram sent with UFO (HOST_UFO) becomes IPv4 fragments that reassemble into it. The `net` scenario then resets the
/// device and negotiates no offloads: tap0's TSO goes off again.
#[test]
fn netgso_offloads_and_mergeable_buffers_work_both_ways() {
    if !require_root("TAP devices and network namespaces") || !require_kvm() {
        return;
    }
    let ns = Netns::new();
    ns.exec(&["ip", "tuntap", "add", "dev", "tap0", "mode", "tap"]);
    ns.exec(&["ip", "link", "add", "br0", "type", "bridge"]);
    ns.exec(&[
        "ip", "link", "add", "veth1", "type", "veth", "peer", "name", "veth2",
    ]);
    // No IPv6 chatter on the way (best effort: the guest ignores other frames anyway).
    let _ = Command::new("ip")
        .args(["netns", "exec", &ns.0, "sysctl", "-qw"])
        .arg("net.ipv6.conf.all.disable_ipv6=1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    ns.exec(&["ip", "link", "set", "tap0", "master", "br0"]);
    ns.exec(&["ip", "link", "set", "veth1", "master", "br0"]);
    for dev in ["tap0", "veth1", "veth2", "br0"] {
        ns.exec(&["ip", "link", "set", dev, "up"]);
    }

    let (ready_tx, ready_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel();
    let name = ns.0.clone();
    let helper = std::thread::spawn(move || gso_host_side(name, ready_tx, go_rx));
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the host helper did not start");

    let dir = TempDir::new("netgso");
    let metrics = dir.path("metrics.json");
    let mut cfg = tap0_config("netgso net");
    cfg["metrics"] = json!({"metrics_path": metrics.to_str().unwrap()});
    let path = dir.write("vm.json", serde_json::to_vec(&cfg).unwrap());
    let mut child = ns.spawn_ember(&path);
    // Read the console as it comes: the packet goes in once the guest's buffers are posted.
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let console = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for l in std::io::BufReader::new(stdout).lines() {
            let Ok(l) = l else { break };
            // The packet goes in once the guest's buffers are posted; the TAP's offloads are
            // looked at again once `net` has reset the device.
            if l.contains("netgso: rx ready") || l.starts_with("net: mac") {
                let _ = go_tx.send(());
            }
            all.push_str(&l);
            all.push('\n');
        }
        all
    });
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let mut console = Some(console);
    let mut stdout = || {
        let reader = console.take().expect("read once");
        reader.join().expect("the console reader panicked")
    };
    let status = status_within(&mut child, Duration::from_secs(90), || {
        format!("stdout:\n{}", stdout())
    });
    let out = Outcome {
        status,
        stdout: stdout(),
        stderr: errors.join().expect("the stderr reader panicked"),
    };
    let seen = helper.join().expect("the host helper panicked");

    out.expect_code(0)
        .expect(
            "netgso: negotiated csum guest_csum guest_tso4 guest_tso6 host_tso4 host_tso6 \
             host_ufo mrg_rxbuf",
        )
        .expect("net: sent 8 frames")
        .expect("ember-guest: done");
    // TUNSETOFFLOAD follows the drivers: on with netgso's, off after the reset and net's.
    assert_eq!(seen.tso_during, Some(1), "tap0's TSO under netgso");
    assert_eq!(seen.tso_after_reset, Some(0), "tap0's TSO under net");

    // Host -> guest: one frame of 54 + 61440 bytes; with its 12-byte header that is 16 buffers
    // of 4 KiB, each full but the last.
    let payload: Vec<u8> = (0..GSO_RX_PAYLOAD)
        .map(|k| gso_pattern(k, GSO_RX_SEED))
        .collect();
    let len = 54 + GSO_RX_PAYLOAD;
    out.expect(&format!(
        "netgso: rx frame {len} bytes in {} buffers, all but the last full: yes",
        (12 + len).div_ceil(4096)
    ))
    .expect(&format!(
        "netgso: rx ipv4 tot_len {} tcp seq {GSO_RX_SEQ} payload {GSO_RX_PAYLOAD} bytes fnv1a64={:016x}",
        len - 14,
        fnv1a64(&payload)
    ));
    let hdr = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("netgso: rx hdr "))
        .unwrap_or_else(|| panic!("no rx hdr line:\n{}", out.stdout));
    let field = |name: &str| -> u64 {
        let mut it = hdr.split_whitespace();
        while let Some(w) = it.next() {
            if w == name {
                return it.next().and_then(|v| v.parse().ok()).unwrap_or(u64::MAX);
            }
        }
        panic!("no {name} in {hdr:?}");
    };
    // NEEDS_CSUM over the TCP header and payload, GSO TCPV4 with the MSS the host asked for.
    assert_eq!(field("flags") & 1, 1, "rx hdr: {hdr}");
    assert_eq!(field("gso_type"), 1, "rx hdr: {hdr}");
    assert_eq!(field("gso_size"), u64::from(GSO_MSS), "rx hdr: {hdr}");
    assert_eq!(field("csum_start"), 34, "rx hdr: {hdr}");
    assert_eq!(field("csum_offset"), 16, "rx hdr: {hdr}");
    assert!(
        (54..=len as u64).contains(&field("hdr_len")),
        "rx hdr: {hdr}"
    );
    // Host -> guest over IPv6 (GUEST_TSO6): whole, as one TCPV6 GSO frame.
    let payload6: Vec<u8> = (0..GSO6_RX_PAYLOAD)
        .map(|k| gso_pattern(k, GSO6_RX_SEED))
        .collect();
    let len6 = 74 + GSO6_RX_PAYLOAD;
    out.expect(&format!(
        "netgso: rx6 frame {len6} bytes in {} buffers, gso_type 4 gso_size {GSO6_MSS} \
         csum_start 54 payload_len {} tcp seq {GSO6_RX_SEQ} payload {GSO6_RX_PAYLOAD} bytes \
         fnv1a64={:016x}",
        (12 + len6).div_ceil(4096),
        20 + GSO6_RX_PAYLOAD,
        fnv1a64(&payload6)
    ));

    // Guest -> host: one GSO packet on tap0, as the guest built it.
    let tx_payload: Vec<u8> = (0..GSO_TX_PAYLOAD)
        .map(|k| gso_pattern(k, GSO_TX_SEED))
        .collect();
    out.expect(&format!(
        "netgso: tx sent {} byte frame gso_size {GSO_MSS} payload fnv1a64={:016x}",
        54 + GSO_TX_PAYLOAD,
        fnv1a64(&tx_payload)
    ));
    let m = std::fs::read_to_string(&metrics).unwrap_or_default();
    let pkt = seen.tso.unwrap_or_else(|| {
        panic!(
            "the guest's TSO frame never reached tap0; tx_fails {}; stdout:\n{}",
            counter_sum(&m, "net", "tx_fails"),
            out.stdout
        )
    });
    let (h, f) = pkt.split_at(10);
    assert_eq!(h[0] & 1, 1, "NEEDS_CSUM: {h:?}");
    assert_eq!(h[1], 1, "gso_type TCPV4: {h:?}");
    assert_eq!(u16::from_le_bytes([h[4], h[5]]), GSO_MSS, "gso_size: {h:?}");
    assert_eq!(u16::from_le_bytes([h[6], h[7]]), 34, "csum_start: {h:?}");
    assert_eq!(u16::from_le_bytes([h[8], h[9]]), 16, "csum_offset: {h:?}");
    assert_eq!(f.len(), 54 + GSO_TX_PAYLOAD, "frame length");
    assert_eq!(f[..6], [2, 0, 0, 0, 0, 0xaa], "destination");
    assert_eq!(fold(sum16(0, &f[14..34])), 0xffff, "IPv4 header checksum");
    assert_eq!(u16::from_be_bytes([f[34], f[35]]), GSO_GUEST_PORT);
    assert_eq!(u16::from_be_bytes([f[36], f[37]]), GSO_HOST_PORT);
    assert!(f[54..] == tx_payload[..], "the TSO frame's payload differs");
    // Finishing the checksum as NEEDS_CSUM says (over csum_start..) gives a valid TCP checksum.
    let mut done = f.to_vec();
    let c = !fold(sum16(0, &done[34..]));
    done[50..52].copy_from_slice(&c.to_be_bytes());
    let tcp_len = done.len() - 34;
    assert_eq!(
        fold(sum16(
            pseudo_sum(GSO_GUEST_IP, GSO_HOST_IP, tcp_len),
            &done[34..]
        )),
        0xffff,
        "the guest's partial TCP checksum is not the pseudo-header's sum"
    );

    // The kernel's segments: MSS-sized, consecutive sequence numbers, valid checksums, the
    // payload in order.
    let segs = &seen.segments;
    assert_eq!(
        segs.len(),
        GSO_TX_PAYLOAD.div_ceil(usize::from(GSO_MSS)),
        "segments seen on veth2"
    );
    let mut joined = Vec::new();
    for (i, s) in segs.iter().enumerate() {
        let ip_len = usize::from(u16::from_be_bytes([s[16], s[17]]));
        assert!(s.len() >= 14 + ip_len, "segment {i}: short");
        let s = &s[..14 + ip_len];
        let data = &s[54..];
        let want = (GSO_TX_PAYLOAD - i * usize::from(GSO_MSS)).min(usize::from(GSO_MSS));
        assert_eq!(data.len(), want, "segment {i}: payload length");
        assert_eq!(
            fold(sum16(0, &s[14..34])),
            0xffff,
            "segment {i}: IPv4 checksum"
        );
        let seq = u32::from_be_bytes([s[38], s[39], s[40], s[41]]);
        assert_eq!(
            seq,
            0x1000_0000 + (i * usize::from(GSO_MSS)) as u32,
            "segment {i}: sequence number"
        );
        assert_eq!(
            fold(sum16(
                pseudo_sum(GSO_GUEST_IP, GSO_HOST_IP, s.len() - 34),
                &s[34..]
            )),
            0xffff,
            "segment {i}: TCP checksum"
        );
        joined.extend_from_slice(data);
    }
    assert!(joined == tx_payload, "the segments' payload differs");

    // Guest -> host over IPv6 (HOST_TSO6): the same, with the IPv6 pseudo-header.
    let tx6_payload: Vec<u8> = (0..GSO6_TX_PAYLOAD)
        .map(|k| gso_pattern(k, GSO6_TX_SEED))
        .collect();
    out.expect(&format!(
        "netgso: tx6 sent {} byte frame gso_size {GSO6_MSS} payload fnv1a64={:016x}",
        74 + GSO6_TX_PAYLOAD,
        fnv1a64(&tx6_payload)
    ));
    let pkt = seen.tso6.unwrap_or_else(|| {
        panic!(
            "the guest's IPv6 TSO frame never reached tap0; tx_fails {}; stdout:\n{}",
            counter_sum(&m, "net", "tx_fails"),
            out.stdout
        )
    });
    let (h, f) = pkt.split_at(10);
    assert_eq!(h[0] & 1, 1, "NEEDS_CSUM: {h:?}");
    assert_eq!(h[1], 4, "gso_type TCPV6: {h:?}");
    assert_eq!(
        u16::from_le_bytes([h[4], h[5]]),
        GSO6_MSS,
        "gso_size: {h:?}"
    );
    assert_eq!(u16::from_le_bytes([h[6], h[7]]), 54, "csum_start: {h:?}");
    assert_eq!(u16::from_le_bytes([h[8], h[9]]), 16, "csum_offset: {h:?}");
    assert_eq!(f.len(), 74 + GSO6_TX_PAYLOAD, "IPv6 frame length");
    assert!(
        f[74..] == tx6_payload[..],
        "the IPv6 TSO frame's payload differs"
    );
    let segs = &seen.segments6;
    assert_eq!(
        segs.len(),
        GSO6_TX_PAYLOAD.div_ceil(usize::from(GSO6_MSS)),
        "IPv6 segments seen on veth2"
    );
    let mut joined = Vec::new();
    for (i, s) in segs.iter().enumerate() {
        let plen = usize::from(u16::from_be_bytes([s[18], s[19]]));
        assert!(s.len() >= 54 + plen, "IPv6 segment {i}: short");
        let s = &s[..54 + plen];
        let data = &s[74..];
        let want = (GSO6_TX_PAYLOAD - i * usize::from(GSO6_MSS)).min(usize::from(GSO6_MSS));
        assert_eq!(data.len(), want, "IPv6 segment {i}: payload length");
        let seq = u32::from_be_bytes([s[58], s[59], s[60], s[61]]);
        assert_eq!(
            seq,
            0x2000_0000 + (i * usize::from(GSO6_MSS)) as u32,
            "IPv6 segment {i}: sequence number"
        );
        assert_eq!(
            fold(sum16(
                pseudo_sum6(GSO6_GUEST_IP, GSO6_HOST_IP, s.len() - 54),
                &s[54..]
            )),
            0xffff,
            "IPv6 segment {i}: TCP checksum"
        );
        joined.extend_from_slice(data);
    }
    assert!(joined == tx6_payload, "the IPv6 segments' payload differs");

    // Guest -> host with UFO (HOST_UFO): the datagram leaves as IPv4 fragments of 1480 bytes
    // that reassemble into it, its UDP checksum completed.
    let ufo_payload: Vec<u8> = (0..UFO_PAYLOAD).map(|k| gso_pattern(k, UFO_SEED)).collect();
    out.expect(&format!(
        "netgso: ufo sent {} byte frame gso_size {UFO_FRAG} payload fnv1a64={:016x}",
        42 + UFO_PAYLOAD,
        fnv1a64(&ufo_payload)
    ));
    let frags = &seen.fragments;
    assert_eq!(
        frags.len(),
        (8 + UFO_PAYLOAD).div_ceil(UFO_FRAG),
        "UFO fragments seen on veth2"
    );
    let mut datagram = vec![0u8; 8 + UFO_PAYLOAD];
    let mut covered = 0;
    for (i, f) in frags.iter().enumerate() {
        let tot = usize::from(u16::from_be_bytes([f[16], f[17]]));
        assert!(f.len() >= 14 + tot && tot > 20, "fragment {i}: short");
        assert_eq!(
            fold(sum16(0, &f[14..34])),
            0xffff,
            "fragment {i}: IPv4 checksum"
        );
        let flags_off = u16::from_be_bytes([f[20], f[21]]);
        let off = usize::from(flags_off & 0x1fff) * 8;
        let more = flags_off & 0x2000 != 0;
        let data = &f[34..14 + tot];
        assert!(
            off + data.len() <= datagram.len(),
            "fragment {i}: past the end"
        );
        assert_eq!(
            more,
            off + data.len() < datagram.len(),
            "fragment {i}: MF flag"
        );
        datagram[off..off + data.len()].copy_from_slice(data);
        covered += data.len();
    }
    assert_eq!(
        covered,
        datagram.len(),
        "the fragments do not cover the datagram"
    );
    assert_eq!(
        u16::from_be_bytes([datagram[4], datagram[5]]) as usize,
        8 + UFO_PAYLOAD,
        "UDP length"
    );
    assert!(
        datagram[8..] == ufo_payload[..],
        "the reassembled payload differs"
    );
    let udp_sum = sum16(
        sum16(
            sum16(17 + datagram.len() as u32, &GSO_GUEST_IP),
            &GSO_HOST_IP,
        ),
        &datagram,
    );
    assert_eq!(
        fold(udp_sum),
        0xffff,
        "UDP checksum of the reassembled datagram"
    );
    assert_eq!(counter_sum(&m, "net", "tx_fails"), 0, "metrics:\n{m}");
}
