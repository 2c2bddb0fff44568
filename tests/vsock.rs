//! virtio-vsock with the hybrid Unix-socket backend, end to end: the test guest's `vsock`
//! scenario echoes a host-initiated connection (`CONNECT 5000`) and connects to the host's
//! port 6000 (`<uds_path>_6000`).

mod common;

use common::*;
use serde_json::json;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

const ECHO_BYTES: usize = 100 * 1024;

fn pattern(i: usize) -> u8 {
    (i * 7 + i / 251) as u8
}

/// The host's side of the guest's port 5000: connects as soon as the socket exists, sends
/// `CONNECT 5000`, writes `ECHO_BYTES` and reads them back; gives the `OK` line and the echo.
fn echo_port_5000(path: std::path::PathBuf) -> std::thread::JoinHandle<(String, Vec<u8>)> {
    std::thread::spawn(move || {
        let start = Instant::now();
        let s = loop {
            match UnixStream::connect(&path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() > Duration::from_secs(20) => {
                    panic!("cannot connect to {}: {e}", path.display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        (&s).write_all(b"CONNECT 5000\n").unwrap();
        // Byte by byte up to the newline: the echo follows on the same stream.
        let mut ok = Vec::new();
        let mut b = [0u8; 1];
        while ok.last() != Some(&b'\n') {
            assert_eq!((&s).read(&mut b).unwrap(), 1, "EOF before OK: {ok:?}");
            ok.push(b[0]);
        }
        let ok = String::from_utf8(ok).unwrap();
        let data: Vec<u8> = (0..ECHO_BYTES).map(pattern).collect();
        let w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            (&w).write_all(&data).unwrap();
            w.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut back = vec![0u8; ECHO_BYTES];
        (&s).read_exact(&mut back).unwrap();
        writer.join().unwrap();
        (ok, back)
    })
}

#[test]
fn vsock_echo_and_guest_connect() {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("vsock");
    let uds = dir.path("v.sock");
    let uds_str = uds.to_str().unwrap().to_string();

    // The guest connects to port 6000: <uds_path>_6000.
    let listener = UnixListener::bind(format!("{uds_str}_6000")).unwrap();
    let host_port = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        (&s).write_all(b"hello from the host\n").unwrap();
        line
    });

    let echo = echo_port_5000(uds.clone());

    let mut cfg = guest_config("vsock", 1, 128);
    cfg["vsock"] = json!({"guest_cid": 3, "uds_path": uds_str});
    let out = boot(&cfg);
    out.expect("vsock: cid 3")
        .expect(&format!("vsock: echoed {ECHO_BYTES} bytes for port 5000"))
        .expect("vsock: host said hello from the host")
        .expect("ember-guest: done")
        .expect_code(0);

    let (ok, back) = echo.join().unwrap();
    let port: u32 = ok
        .strip_prefix("OK ")
        .and_then(|p| p.strip_suffix('\n'))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("bad OK line {ok:?}"));
    assert!(port >= 1024, "{ok:?}");
    assert!(
        back.iter().enumerate().all(|(i, b)| *b == pattern(i)),
        "the echo differs"
    );
    assert_eq!(host_port.join().unwrap(), "hello from the guest\n");
}

/// A host service on port 6000 that stopped accepting, its listen backlog full: the guest's
/// connection is refused with a RST at once, and ember goes on serving the guest and exits
/// with it. (A blocking connect(2) held ember's VMM thread, and every device, until the
/// host accepted: here, for ever.)
#[test]
fn host_listener_with_a_full_backlog_is_refused_at_once() {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("vsock-backlog");
    let uds = dir.path("v.sock");
    let uds_str = uds.to_str().unwrap().to_string();
    let port_6000 = format!("{uds_str}_6000");
    let listener = UnixListener::bind(&port_6000).unwrap();
    // Backlog 0 (listen(2) again changes it): one connection waits, never accepted, and
    // fills it.
    // SAFETY: listen(2) on a listening socket this test owns.
    assert_eq!(
        unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 0) },
        0
    );
    let _waiting = UnixStream::connect(&port_6000).unwrap();

    let echo = echo_port_5000(uds.clone());
    let mut cfg = guest_config("vsock", 1, 128);
    cfg["vsock"] = json!({"guest_cid": 3, "uds_path": uds_str});
    let metrics = dir.path("metrics.json");
    cfg["metrics"] = json!({"metrics_path": metrics.to_str().unwrap()});
    let out = boot(&cfg);
    out.expect(&format!("vsock: echoed {ECHO_BYTES} bytes for port 5000"))
        .expect("ember-guest: FAIL: vsock: the host refused port 6000")
        .expect_code(1);
    let (_, back) = echo.join().unwrap();
    assert!(back.iter().enumerate().all(|(i, b)| *b == pattern(i)));
    let m = std::fs::read_to_string(&metrics).unwrap_or_default();
    assert!(
        counter_sum(&m, "vsock", "conn_event_fails") >= 1,
        "the refused connection was not counted: {m}"
    );
}

/// `uds_path` naming something that is not ember's to replace: a regular file is refused by
/// the request (and keeps its bytes), another process's live socket by the start (and keeps
/// serving its owner); the VMM answers throughout.
#[test]
fn uds_path_never_replaces_a_file_or_a_live_socket() {
    if !require_kvm() {
        return;
    }
    let vm = ApiVm::start(&[]);
    let mut c = vm.client();
    let file = vm.dir.write("precious", b"not a socket");
    let body = json!({"guest_cid": 3, "uds_path": file.to_str().unwrap()}).to_string();
    let r = c.put("/vsock", &body);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("is not a socket"), "{}", r.body);
    assert_eq!(std::fs::read(&file).unwrap(), b"not a socket");

    let live = vm.dir.path("live.sock");
    let owner = UnixListener::bind(&live).unwrap();
    let body = json!({"guest_cid": 3, "uds_path": live.to_str().unwrap()}).to_string();
    assert_eq!(c.put("/vsock", &body).status, 204);
    let body = json!({"kernel_image_path": GUEST, "boot_args": "ticks"}).to_string();
    assert_eq!(c.put("/boot-source", &body).status, 204);
    let r = c.put("/actions", r#"{"action_type":"InstanceStart"}"#);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("another process serves"), "{}", r.body);
    assert_eq!(c.get("/").status, 200);
    // Still the owner's: a client reaches it.
    let _client = UnixStream::connect(&live).unwrap();
    owner.set_nonblocking(true).unwrap();
    assert!(owner.accept().is_ok(), "the owner's socket was taken over");
}

/// The `evilvsock` guest's chain-level cases, run on every queue.
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
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("vsock-evil");
    let uds = dir.path("v.sock");
    let uds_str = uds.to_str().unwrap().to_string();
    let metrics = dir.path("metrics.json");

    // The well-behaved exchange at the end: the guest connects to port 6000 and the host
    // echoes its line.
    let listener = UnixListener::bind(format!("{uds_str}_6000")).unwrap();
    let echo = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        (&s).write_all(line.as_bytes()).unwrap();
        line
    });
    // Every malformed TX chain carries a REQUEST to port 6001: none may get through.
    let trap = UnixListener::bind(format!("{uds_str}_6001")).unwrap();
    trap.set_nonblocking(true).unwrap();

    let mut cfg = guest_config("evilvsock", 1, 128);
    cfg["vsock"] = json!({"guest_cid": 3, "uds_path": uds_str});
    cfg["metrics"] = json!({"metrics_path": metrics.to_str().unwrap()});
    let out = boot(&cfg);
    out.expect_code(0)
        .expect("evilvsock: well-behaved echo hello from the evil guest")
        .expect("ember-guest: done");
    // Malformed chains the device gave back: each one must have been counted. (The guest
    // waits 100 ms per case; on a loaded host the VMM thread may look at a chain later, and
    // the guest reports no completion.)
    let mut completed = 0;
    for q in ["tx", "rx", "event"] {
        for case in EVIL_CHAIN_CASES {
            out.expect(&format!("evilvsock: {q} {case} survived"));
            let prefix = format!("evilvsock: {q} {case}: ");
            let what = out
                .stdout
                .lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()))
                .unwrap_or_else(|| panic!("no {prefix:?} line:\n{}", out.stdout));
            completed += u64::from(what.starts_with("completed"));
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
        out.expect(&format!("evilvsock: {case} survived"));
    }
    out.expect("evilvsock: notify before DRIVER_OK: no completion")
        .expect("evilvsock: config out of range: read 0x00000000, after write 0x00000000, first field 0x0000000000000003");
    assert_eq!(
        echo.join().unwrap(),
        "hello from the evil guest\n",
        "the host's end of the well-behaved exchange"
    );
    assert!(
        matches!(trap.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a malformed TX chain reached the host"
    );

    // Every case the guest saw end in NEEDS_RESET (normally the head beyond the queue and the
    // avail index jump on each queue, and queue size 3) must have been counted.
    let needs_reset = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("evilvsock: "))
        .filter_map(|l| l.split("device status 0x").nth(1))
        .filter_map(|v| u32::from_str_radix(v.get(..2)?, 16).ok())
        .filter(|status| status & 0x40 != 0)
        .count() as u64;
    let m = std::fs::read_to_string(&metrics).unwrap_or_default();
    for (group, name, least) in [
        ("vsock", "malformed_packets", completed.max(1)),
        ("virtio", "malformed_chains", 1),
        ("virtio", "needs_reset", needs_reset.max(1)),
        ("virtio", "invalid_notifications", 1),
        ("virtio", "invalid_register_writes", 1),
    ] {
        assert!(
            counter_sum(&m, group, name) >= least,
            "{group}.{name} counted fewer than {least}; metrics:\n{m}\n--- stdout\n{}",
            out.stdout
        );
    }
}

/// The `vsockbench` scenario (benchmark 9) on a small transfer: both directions complete and
/// every byte arrives.
#[test]
fn vsockbench_moves_data_both_ways() {
    if !require_kvm() {
        return;
    }
    const MIB: usize = 1;
    let dir = TempDir::new("vsockbench");
    let uds = dir.path("v.sock");
    let path = uds.clone();
    let host = std::thread::spawn(move || {
        let start = Instant::now();
        // Until the guest has taken over the device (a reset drops waiting host connections).
        let s = loop {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no OK from the guest"
            );
            let Ok(s) = UnixStream::connect(&path) else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            (&s).write_all(b"CONNECT 5000\n").unwrap();
            let mut ok = Vec::new();
            let mut b = [0u8; 1];
            while ok.last() != Some(&b'\n') && matches!((&s).read(&mut b), Ok(1)) {
                ok.push(b[0]);
            }
            if ok.starts_with(b"OK ") {
                break s;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            (&w).write_all(&vec![0x5a; MIB << 20]).unwrap();
            w.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut back = Vec::new();
        (&s).read_to_end(&mut back).unwrap();
        writer.join().unwrap();
        back
    });
    let mut cfg = guest_config(&format!("vsockbench={MIB}"), 1, 128);
    cfg["vsock"] = json!({"guest_cid": 3, "uds_path": uds.to_str().unwrap()});
    let out = boot(&cfg);
    out.expect("vsockbench: listening")
        .expect(&format!("vsockbench: rx {} bytes in ", MIB << 20))
        .expect(&format!("vsockbench: tx {} bytes in ", MIB << 20))
        .expect("ember-guest: done")
        .expect_code(0);
    let back = host.join().unwrap();
    // Each packet carries the start of the guest's 64 KiB pattern (its size depends on the
    // credit at the time): only the count is known here.
    assert_eq!(back.len(), MIB << 20);
}

/// The guest's random vsock peer (`fuzzvsock`): 4000 packets with header fields drawn around
/// what matters, against host listeners on ports 6000-6003 that take each connection, read,
/// write up to 100 KB back and sometimes hang up, while a host client keeps connecting to the
/// guest's ports 1024-1031. First the guest fills a connection to a host port that keeps it
/// open and never reads, then half-closes it, so that the device holds it, with data, at the
/// final reset (which once ended the VMM: the reset wrote to and shut down the socket on the
/// vCPU thread, whose filter forbids both). The VMM keeps running, counts the malformed
/// packets, and every connection it opened is gone when it exits.
#[test]
fn random_vsock_peer_is_survived() {
    if !require_kvm() {
        return;
    }
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    for seed in 1..=2u64 {
        let dir = TempDir::new("vsock-fuzz");
        let uds = dir.path("v.sock");
        let uds_str = uds.to_str().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let mut helpers = Vec::new();
        for port in 6000..6004 {
            let listener = UnixListener::bind(format!("{uds_str}_{port}")).unwrap();
            listener.set_nonblocking(true).unwrap();
            let (stop, accepted) = (stop.clone(), accepted.clone());
            helpers.push(std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let Ok((s, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    };
                    accepted.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
                    let reply = vec![b'h'; (n as usize * 7919) % 100_000 + 1];
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 65536];
                        let _ = (&s).read(&mut buf);
                        if n.is_multiple_of(2) {
                            let _ = (&s).write_all(&reply);
                        }
                        if !n.is_multiple_of(3) {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    });
                }
            }));
        }
        // Port 6004 keeps every connection open until the guest is done: the guest
        // half-closes one there and resets the device while ember still holds it.
        let held = UnixListener::bind(format!("{uds_str}_6004")).unwrap();
        held.set_nonblocking(true).unwrap();
        let stop2 = stop.clone();
        helpers.push(std::thread::spawn(move || {
            let mut streams = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                match held.accept() {
                    Ok((s, _)) => streams.push(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        }));
        let (stop2, path) = (stop.clone(), uds.clone());
        helpers.push(std::thread::spawn(move || {
            let mut port = 1024;
            while !stop2.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(5));
                let Ok(s) = UnixStream::connect(&path) else {
                    continue;
                };
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                port = 1024 + (port + 1 - 1024) % 8;
                if (&s)
                    .write_all(format!("CONNECT {port}\n").as_bytes())
                    .is_ok()
                {
                    let mut b = [0u8; 64];
                    if matches!((&s).read(&mut b), Ok(n) if b[..n].starts_with(b"OK")) {
                        let _ = (&s).write_all(&[b'c'; 10_000]);
                    }
                }
            }
        }));

        let metrics = dir.path("metrics.json");
        let mut cfg = guest_config(&format!("fuzzvsock={seed}"), 1, 128);
        cfg["vsock"] = json!({"guest_cid": 3, "uds_path": uds_str});
        let path = dir.write("vm.json", serde_json::to_vec(&cfg).unwrap());
        let out = run(&[
            "--no-api",
            "--config-file",
            path.to_str().unwrap(),
            "--metrics-path",
            metrics.to_str().unwrap(),
        ]);
        stop.store(true, Ordering::Relaxed);
        for h in helpers {
            h.join().expect("a host helper panicked");
        }
        out.expect_code(0)
            .expect("fuzzvsock: connection to host port 6004 half-closed, ")
            .expect("fuzzvsock: survived")
            .expect("ember-guest: done");
        let sum = |name: &str| -> u64 {
            std::fs::read_to_string(&metrics)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter_map(|v| v["vsock"][name].as_u64())
                .sum()
        };
        assert!(
            sum("malformed_packets") > 0,
            "seed {seed}: nothing counted as malformed"
        );
        assert!(
            accepted.load(Ordering::Relaxed) > 0 && sum("conns_added") > 0,
            "seed {seed}: no connection was made"
        );
        assert_eq!(
            sum("conns_added"),
            sum("conns_removed"),
            "seed {seed}: connections left behind"
        );
    }
}
