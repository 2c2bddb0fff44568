//! The API's HTTP server against hostile or broken clients, on the real `ember` binary.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::*;

/// The lowest descriptor number `pid` has free: with RLIMIT_NOFILE set to it, the process
/// can open nothing more.
fn lowest_free_fd(pid: u32) -> u64 {
    let used: std::collections::BTreeSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !used.contains(n)).unwrap()
}

fn set_nofile(pid: u32, soft: u64) -> u64 {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reads the limit of our own child into a live struct.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // SAFETY: sets the soft limit of our own child from a live struct.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    old.rlim_cur
}

#[test]
fn a_huge_payload_limit_still_reads_whole_bodies() {
    // head + limit + chunk used to wrap around to ~24 KiB, so a bigger body was never read.
    let vm = ApiVm::start(&["--http-api-max-payload-size", &usize::MAX.to_string()]);
    let mut c = vm.client();
    let body = format!(r#"{{"level":"Info"{}}}"#, " ".repeat(40_000));
    let r = c.put("/logger", &body);
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(c.get("/").status, 200);
}

#[test]
fn the_connection_over_the_cap_is_told_why() {
    let vm = ApiVm::start(&[]);
    // One at a time, each served before the next connects: by then the server has also
    // dropped the probe connection ApiVm::start made.
    let mut held: Vec<Client> = (0..ember::api::server::MAX_CONNECTIONS)
        .map(|_| {
            let mut c = vm.client();
            assert_eq!(c.get("/version").status, 200);
            c
        })
        .collect();
    let mut extra = vm.client();
    let r = extra.read_response().expect("a 503 before the close");
    assert_eq!(r.status, 503);
    assert_eq!(r.fault(), "Too many open connections");
    assert!(extra.read_response().is_none());
    // The held ones still work, and a freed slot is usable again.
    drop(held.pop());
    let start = Instant::now();
    loop {
        let mut c = vm.client();
        // Until the server reaps the dropped one, a newcomer may still get the 503.
        if c.stream.write_all(b"GET /version HTTP/1.1\r\n\r\n").is_ok() {
            match c.read_response() {
                Some(r) if r.status == 200 => break,
                Some(r) => assert_eq!(r.status, 503),
                None => {}
            }
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no slot freed");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(held[0].get("/").status, 200);
}

#[test]
fn accepting_resumes_once_descriptors_are_free_again() {
    if !require_root("prlimit on the ember process") {
        return;
    }
    let vm = ApiVm::start(&[]);
    // A keep-alive client stays connected throughout, so no connection closes to wake the
    // server: only a retry can.
    let mut keeper = vm.client();
    // Twice: the server drops ApiVm::start's probe connection only after the first answer,
    // and its descriptor must be gone before the limit is counted.
    assert_eq!(keeper.get("/version").status, 200);
    assert_eq!(keeper.get("/version").status, 200);
    let pid = vm.child.as_ref().unwrap().id();
    let old = set_nofile(pid, lowest_free_fd(pid));
    // Connecting works (the kernel queues it), but ember cannot accept it yet.
    let mut late = UnixStream::connect(&vm.sock).unwrap();
    late.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    late.write_all(b"GET /version HTTP/1.1\r\n\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    set_nofile(pid, old);
    let mut head = [0u8; 12];
    late.read_exact(&mut head)
        .expect("the queued client was never accepted");
    assert_eq!(&head, b"HTTP/1.1 200");
    assert_eq!(keeper.get("/").status, 200);
}

#[test]
fn hostile_clients_do_not_hold_up_others() {
    let vm = ApiVm::start(&[]);
    // Half a request, then silence.
    let mut stalled = vm.client();
    stalled.send_raw(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 38\r\n\r\n{\"vc");
    // Pipelined requests, never reading the answers, until the sockets are full.
    let mut flood = vm.client();
    flood
        .stream
        .set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let burst = b"GET /version HTTP/1.1\r\n\r\n".repeat(256);
    let mut sent = 0usize;
    while sent < 64 << 20 {
        match flood.stream.write(&burst) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    assert!(sent < 64 << 20, "ember never stopped reading the flood");

    // Another client is served, its requests split at every byte, with 100-continue, an
    // absolute-form target and HTTP/1.0 keep-alive, in order.
    let mut c = vm.client();
    let head: &[u8] = b"PATCH /machine-config HTTP/1.1\r\nExpect: 100-continue\r\n\
        Content-Length: 20\r\n\r\n";
    let rest: &[u8] = b"{\"mem_size_mib\":256}\
        GET http://localhost/machine-config HTTP/1.0\r\nConnection: keep-alive\r\n\r\n\
        GET /version HTTP/1.1\r\nConnection: close\r\n\r\n";
    for b in head {
        c.send_raw(&[*b]);
    }
    assert_eq!(c.read_response().unwrap().status, 100);
    for b in rest {
        c.send_raw(&[*b]);
    }
    assert_eq!(c.read_response().unwrap().status, 204);
    let r = c.read_response().unwrap();
    assert_eq!(r.json()["mem_size_mib"], 256);
    assert!(c.read_response().unwrap().json()["firecracker_version"].is_string());
    assert!(
        c.read_response().is_none(),
        "Connection: close was not honoured"
    );

    // The stalled client finishes later and is answered.
    stalled.send_raw(b"pu_count\":1,\"mem_size_mib\":128} \r\n");
    let r = stalled.read_response().unwrap();
    assert_eq!(r.status, 204, "{}", r.body);
    // The flooder gets its answers in order once it reads.
    for _ in 0..100 {
        assert_eq!(flood.read_response().unwrap().status, 200);
    }
}
