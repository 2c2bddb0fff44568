//! virtio-mmio block and entropy devices, driven by the test guest's own drivers
//! (`resources/guest/src/virtio/`): reads, writes, flush, GET_ID, read-only drives,
//! out-of-range requests, a malicious driver, the command line the VMM builds.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;

const MIB: usize = 1 << 20;
const SECTOR: usize = 512;

/// Deterministic "random" bytes (xorshift64*), so failures are reproducible.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// What the guest's `blk` scenario writes at sector 8: byte i is (i*7+3) & 0xff.
fn pattern() -> Vec<u8> {
    (0..8 * SECTOR)
        .map(|i| ((i * 7 + 3) & 0xff) as u8)
        .collect()
}

fn drive(id: &str, path: &Path, root: bool, ro: bool) -> Value {
    json!({
        "drive_id": id,
        "path_on_host": path.to_str().unwrap(),
        "is_root_device": root,
        "is_read_only": ro,
    })
}

fn config(boot_args: &str, drives: Vec<Value>, entropy: bool) -> Value {
    let mut cfg = guest_config(boot_args, 1, 128);
    cfg["drives"] = Value::Array(drives);
    if entropy {
        cfg["entropy"] = json!({});
    }
    cfg
}

/// Like `common::boot`, with extra ember arguments.
fn boot_with(cfg: &Value, extra: &[&str]) -> Outcome {
    let dir = TempDir::new("virtio-cfg");
    let path = dir.write("vm.json", serde_json::to_vec(cfg).unwrap());
    let mut args = vec![
        "--no-api",
        "--boot-timer",
        "--config-file",
        path.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(&args)
}

/// The rest of the first stdout line starting with `prefix`; panics with the output if none.
fn line_after(out: &Outcome, prefix: &str) -> String {
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .map(|s| s.trim_end_matches('\r').to_string())
        .unwrap_or_else(|| {
            panic!(
                "no line starting with {prefix:?} (exit {:?}):\n--- stdout\n{}\n--- stderr\n{}",
                out.status, out.stdout, out.stderr
            )
        })
}

/// The GET_ID answer for the drive backed by `path`: its file's device, special-device and
/// inode numbers (decimal, one after the other, as Firecracker writes them), at most 20 bytes.
fn expected_id(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap();
    let mut id = format!("{}{}{}", m.dev(), m.rdev(), m.ino());
    id.truncate(20);
    id
}

fn fnv_of_first_sectors(data: &[u8]) -> (usize, u64) {
    let n = (data.len() / SECTOR).min(128);
    (n, fnv1a64(&data[..n * SECTOR]))
}

#[test]
fn blk_reads_writes_flushes_and_reports_its_id() {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("blk");
    let data = random_bytes(MIB, 0x0b1c_0001);
    let img = dir.write("rootfs.img", &data);
    let out = boot(&config(
        "blk",
        vec![drive("rootfs", &img, true, false)],
        false,
    ));
    let (n, h) = fnv_of_first_sectors(&data);
    out.expect_code(0)
        .expect(&format!("blk: capacity {} sectors, ro=0", MIB / SECTOR))
        .expect(&format!("blk: read {n} sectors fnv1a64={h:016x}"))
        .expect("blk: wrote 8 sectors at 8, flush status 0")
        .expect("blk: out of range status 1")
        .expect("ember-guest: done");
    assert_eq!(
        line_after(&out, "blk: id "),
        expected_id(&img),
        "GET_ID:\n{}",
        out.stdout
    );

    let after = std::fs::read(&img).unwrap();
    assert_eq!(after.len(), data.len(), "the image changed size");
    assert!(
        after[8 * SECTOR..16 * SECTOR] == pattern()[..],
        "sectors 8..16 do not hold the guest's pattern"
    );
    assert!(
        after[..8 * SECTOR] == data[..8 * SECTOR] && after[16 * SECTOR..] == data[16 * SECTOR..],
        "the guest's write touched bytes outside sectors 8..16"
    );
}

#[test]
fn blk_read_only_drive_refuses_writes() {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("blk-ro");
    let data = random_bytes(MIB, 0x0b1c_0002);
    let img = dir.write("rootfs.img", &data);
    let out = boot(&config(
        "blk",
        vec![drive("rootfs", &img, true, true)],
        false,
    ));
    let (n, h) = fnv_of_first_sectors(&data);
    out.expect_code(0)
        .expect(&format!("blk: capacity {} sectors, ro=1", MIB / SECTOR))
        .expect(&format!("blk: read {n} sectors fnv1a64={h:016x}"))
        .expect("blk: write refused status 1")
        .expect("blk: out of range status 1")
        .expect("ember-guest: done");
    assert_eq!(
        line_after(&out, "blk: id "),
        expected_id(&img),
        "GET_ID:\n{}",
        out.stdout
    );
    assert!(
        std::fs::read(&img).unwrap() == data,
        "a read-only drive's file changed"
    );
}

#[test]
fn root_drive_is_attached_first_whatever_its_place_in_the_list() {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("blk-order");
    let other = random_bytes(MIB / 2, 0x0b1c_0003);
    let root = random_bytes(MIB, 0x0b1c_0004);
    let other_img = dir.write("data.img", &other);
    let root_img = dir.write("rootfs.img", &root);
    let cfg = config(
        "cmdline blk rng",
        vec![
            drive("data", &other_img, false, true),
            drive("rootfs", &root_img, true, false),
        ],
        true,
    );
    let out = boot(&cfg);
    let (n, h) = fnv_of_first_sectors(&root);
    out.expect_code(0)
        .expect(&format!("blk: capacity {} sectors, ro=0", MIB / SECTOR))
        .expect(&format!("blk: read {n} sectors fnv1a64={h:016x}"))
        .expect("rng: 32 and 32 bytes, differ=1")
        .expect("ember-guest: done");
    let cmdline = line_after(&out, "cmdline: ");
    let devices: Vec<&str> = cmdline
        .split_whitespace()
        .filter(|t| t.starts_with("virtio_mmio.device="))
        .collect();
    assert_eq!(
        devices.len(),
        3,
        "two drives and an entropy device expected: {cmdline}"
    );
    assert!(
        devices[0].starts_with("virtio_mmio.device=4K@0xc0001000:"),
        "the first device is not at 0xc0001000: {cmdline}"
    );
    assert!(
        std::fs::read(&other_img).unwrap() == other,
        "the non-root drive was written"
    );
}

#[test]
fn rng_two_requests_differ() {
    if !require_kvm() {
        return;
    }
    boot(&config("rng", vec![], true))
        .expect_code(0)
        .expect("rng: 32 and 32 bytes, differ=1")
        .expect("ember-guest: done");
}

const EVIL_CASES: &[&str] = &[
    "bad address",
    "looping chain",
    "overlong chain",
    "zero-length data",
    "read-only status",
    "avail index jump",
    "notify before DRIVER_OK",
    "queue size 3",
    "config out of range",
];

/// Sum of the numeric counters whose names say "invalid", "fail", "malformed" or "err", in
/// every metrics group named `block*` or `virtio*`, over every metrics line.
fn malformed_count(metrics: &str) -> u64 {
    let mut sum = 0;
    for line in metrics.lines() {
        let Ok(Value::Object(groups)) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        for (group, v) in groups {
            if !(group.starts_with("block") || group.starts_with("virtio")) {
                continue;
            }
            let Value::Object(fields) = v else { continue };
            for (name, v) in fields {
                let n = name.to_ascii_lowercase();
                if ["invalid", "fail", "malformed", "err", "needs_reset"]
                    .iter()
                    .any(|k| n.contains(k))
                {
                    sum += v.as_u64().unwrap_or(0);
                }
            }
        }
    }
    sum
}

/// Sum of one counter of one metrics group over every metrics line.
fn counter_sum(metrics: &str, group: &str, name: &str) -> u64 {
    metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v[group][name].as_u64())
        .sum()
}

#[test]
fn blk_rate_limiter_throttles_and_the_guest_still_finishes() {
    if !require_kvm() {
        return;
    }
    for engine in ["Sync", "Async"] {
        let dir = TempDir::new("blk-limited");
        let data = random_bytes(MIB, 0x0b1c_0007);
        let img = dir.write("rootfs.img", &data);
        let metrics = dir.path("metrics.json");
        let mut d = drive("rootfs", &img, true, false);
        d["io_engine"] = json!(engine);
        // Two requests at once, then one every 50 ms: the scenario's requests must wait.
        d["rate_limiter"] = json!({"ops": {"size": 2, "refill_time": 100},
                                   "bandwidth": {"size": 0, "refill_time": 0}});
        let out = boot_with(
            &config("blk", vec![d], false),
            &["--metrics-path", metrics.to_str().unwrap()],
        );
        let (n, h) = fnv_of_first_sectors(&data);
        out.expect_code(0)
            .expect(&format!("blk: read {n} sectors fnv1a64={h:016x}"))
            .expect("blk: wrote 8 sectors at 8, flush status 0")
            .expect("ember-guest: done");
        let m = std::fs::read_to_string(&metrics).unwrap_or_default();
        assert!(
            counter_sum(&m, "block", "rate_limiter_throttled_events") > 0,
            "{engine}: no throttling counted; metrics:\n{m}\n--- stdout\n{}",
            out.stdout
        );
        // The drive's own group counts its requests; with one drive it matches the aggregate.
        assert!(
            counter_sum(&m, "block_rootfs", "read_count") > 0,
            "{engine}: no block_rootfs reads counted; metrics:\n{m}"
        );
        assert_eq!(
            counter_sum(&m, "block_rootfs", "rate_limiter_throttled_events"),
            counter_sum(&m, "block", "rate_limiter_throttled_events"),
            "{engine}: block_rootfs and block disagree; metrics:\n{m}"
        );
    }
}

#[test]
fn evil_guest_is_survived_and_counted() {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("evil");
    let data = random_bytes(MIB, 0x0b1c_0005);
    let img = dir.write("rootfs.img", &data);
    let metrics = dir.path("metrics.json");
    let out = boot_with(
        &config("evil", vec![drive("rootfs", &img, true, false)], false),
        &["--metrics-path", metrics.to_str().unwrap()],
    );
    out.expect_code(0);
    for case in EVIL_CASES {
        out.expect(&format!("evil: {case} survived"));
    }
    out.expect(&format!(
        "evil: well-behaved read ok fnv1a64={:016x}",
        fnv1a64(&data[..SECTOR])
    ))
    .expect("ember-guest: done");
    // The guest prints what the device did before each "survived" line; a malformed chain must
    // never complete with status 0 (OK). (255 means the device did not write the status byte.)
    for case in [
        "bad address",
        "looping chain",
        "overlong chain",
        "read-only status",
    ] {
        let what = line_after(&out, &format!("evil: {case}: "));
        assert!(
            !what.starts_with("completed, status 0,"),
            "a malformed request ({case}) succeeded: {what}\n{}",
            out.stdout
        );
    }
    // A sound chain whose data buffer lies outside guest memory is answered IOERR.
    let what = line_after(&out, "evil: bad address: ");
    assert!(
        what.starts_with("completed, status 1,"),
        "a data buffer outside guest memory was not answered IOERR: {what}\n{}",
        out.stdout
    );
    assert!(
        std::fs::read(&img).unwrap() == data,
        "the evil guest's requests changed the file"
    );
    let m = std::fs::read_to_string(&metrics).unwrap_or_default();
    assert!(
        malformed_count(&m) > 0,
        "no block/virtio error counter counted the malformed requests; metrics:\n{m}\n--- stdout\n{}",
        out.stdout
    );
}

/// The guest's `fuzzdev` scenario drives every device at random (registers of any width and
/// offset, resets, queues of any size with rings misaligned or outside RAM, chains with wild
/// addresses, lengths, flags and links) and then checks that RAM outside its own image (the
/// boot TSS, GDT and tables included), which no chain designates, is as it was. Afterwards the same devices must still serve a
/// well-behaved driver, a read-only drive must be untouched and no file may have grown.
#[test]
fn random_driver_leaves_the_vmm_and_unchosen_memory_intact() {
    if !require_kvm() {
        return;
    }
    // The last seed drives the devices from two vCPUs at once.
    for (seed, vcpus) in [(1u64, 1u8), (2, 1), (3, 2)] {
        let dir = TempDir::new("fuzzdev");
        let rw = dir.write("rootfs.img", random_bytes(MIB, 0x0b1c_0100 + seed));
        let ro_data = random_bytes(MIB, 0x0b1c_0200 + seed);
        let ro = dir.write("data.img", &ro_data);
        let metrics = dir.path("metrics.json");
        let mut cfg = config(
            &format!("fuzzdev={seed} rng blk"),
            vec![
                drive("rootfs", &rw, true, false),
                drive("data", &ro, false, true),
            ],
            true,
        );
        cfg["vsock"] = json!({"guest_cid": 3, "uds_path": dir.path("v.sock").to_str().unwrap()});
        cfg["machine-config"]["vcpu_count"] = vcpus.into();
        let out = boot_with(&cfg, &["--metrics-path", metrics.to_str().unwrap()]);
        if vcpus > 1 {
            out.expect(&format!("fuzzdev: {vcpus} vCPUs at once"));
        }
        out.expect_code(0)
            .expect(&format!("fuzzdev: 3000 rounds on 4 devices, seed {seed}"))
            .expect("fuzzdev: survived")
            .expect("rng: 32 and 32 bytes, differ=1")
            .expect("blk: wrote 8 sectors at 8, flush status 0")
            .expect("ember-guest: done");
        assert!(
            std::fs::read(&ro).unwrap() == ro_data,
            "seed {seed}: the read-only drive changed"
        );
        assert_eq!(
            std::fs::metadata(&rw).unwrap().len(),
            MIB as u64,
            "seed {seed}: the drive grew"
        );
        // The random chains reached the devices' checks (not only the transport's).
        let m = std::fs::read_to_string(&metrics).unwrap_or_default();
        assert!(
            counter_sum(&m, "virtio", "malformed_chains") > 0,
            "seed {seed}: no malformed chain was counted; metrics:\n{m}"
        );
    }
}

/// The guest's `fuzzblk`: 3000 well-formed chains with random types, sectors (in range, at
/// and past the end, overflowing), lengths and directions on a read-write and a read-only
/// drive. In the guest: every chain comes back, no write to the read-only drive and nothing
/// past a drive's end succeeds. Here: the read-only file is unchanged, nothing grew, and the
/// Sync and Async engines, given the same requests, answer them alike and leave the same bytes.
#[test]
fn random_block_requests_are_answered_alike_by_both_engines() {
    if !require_kvm() {
        return;
    }
    for seed in 1..=2u64 {
        let data = random_bytes(MIB, 0x0b1c_0300 + seed);
        let ro_data = random_bytes(MIB, 0x0b1c_0400 + seed);
        let mut seen = Vec::new();
        // The same files (rewritten in place) for both engines: a drive's GET_ID answer comes
        // from its file's device and inode, and the guest may write what it read to the disk.
        let dir = TempDir::new("fuzzblk");
        for engine in ["Sync", "Async"] {
            let rw = dir.write("rootfs.img", &data);
            let ro = dir.write("data.img", &ro_data);
            let mut drives = vec![
                drive("rootfs", &rw, true, false),
                drive("data", &ro, false, true),
            ];
            for d in drives.iter_mut() {
                d["io_engine"] = engine.into();
            }
            let out = boot(&config(&format!("fuzzblk={seed}"), drives, false));
            out.expect_code(0)
                .expect("fuzzblk: survived")
                .expect("ember-guest: done");
            let answers: Vec<String> = out
                .stdout
                .lines()
                .filter(|l| l.starts_with("fuzzblk: drive"))
                .map(str::to_string)
                .collect();
            assert_eq!(answers.len(), 2, "{}", out.stdout);
            assert!(
                std::fs::read(&ro).unwrap() == ro_data,
                "seed {seed}, {engine}: the read-only drive changed"
            );
            let after = std::fs::read(&rw).unwrap();
            assert_eq!(
                after.len(),
                MIB,
                "seed {seed}, {engine}: the drive changed size"
            );
            seen.push((engine, answers, fnv1a64(&after)));
        }
        assert_eq!(
            (&seen[0].1, seen[0].2),
            (&seen[1].1, seen[1].2),
            "seed {seed}: Sync and Async differ"
        );
    }
}

#[test]
fn missing_drive_file_exits_152_naming_the_path() {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("blk-missing");
    let img = dir.path("no-such-rootfs.img");
    boot(&config(
        "blk",
        vec![drive("rootfs", &img, true, false)],
        false,
    ))
    .expect_code(152)
    .expect(img.to_str().unwrap());
}

#[test]
fn root_drive_grows_the_command_line() {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("blk-cmdline");
    let img = dir.write("rootfs.img", random_bytes(MIB, 0x0b1c_0006));

    let plain = boot(&config("cmdline", vec![], false));
    plain.expect_code(0);
    let with = boot(&config(
        "cmdline",
        vec![drive("rootfs", &img, true, false)],
        false,
    ));
    with.expect_code(0);

    let len = |o: &Outcome| -> usize {
        line_after(o, "ember-guest: cmdline ")
            .trim_end_matches(" bytes")
            .parse()
            .unwrap()
    };
    assert!(
        len(&with) > len(&plain),
        "the command line did not grow:\n{}\n{}",
        plain.stdout,
        with.stdout
    );
    let line = line_after(&with, "cmdline: ");
    let tokens: Vec<&str> = line.split_whitespace().collect();
    assert!(
        tokens.contains(&"root=/dev/vda"),
        "no root=/dev/vda: {line}"
    );
    assert!(tokens.contains(&"rw"), "no rw for a writable root: {line}");
    assert!(
        tokens
            .iter()
            .any(|t| t.starts_with("virtio_mmio.device=4K@0xc0001000:")),
        "no virtio_mmio.device entry: {line}"
    );
    assert!(
        !line_after(&plain, "cmdline: ").contains("root="),
        "root= without a root drive"
    );
}

#[test]
fn patch_drive_swaps_the_file_and_signals_the_guest() {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("blk-patch");
    let first = dir.write("first.img", random_bytes(MIB, 0x0b1c_0007));
    let second = dir.write("second.img", random_bytes(2 * MIB, 0x0b1c_0008));
    let vm = ApiVm::start(&[]);
    let mut c = vm.client();
    // Before the start: Firecracker's phase rule.
    let r = c.put(
        "/drives/rootfs",
        &drive("rootfs", &first, true, false).to_string(),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let patch = json!({"drive_id": "rootfs", "path_on_host": second.to_str().unwrap()});
    let r = c.patch("/drives/rootfs", &patch.to_string());
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.fault().contains("before starting"), "{}", r.body);

    // Two swaps: the guest stays up (waiting for the second) while the first is checked
    // through the API; with one it could see the change, finish and stop ember first.
    api_boot(&mut c, "blkwait=2", 1);
    vm.wait_for(&format!("blkwait: capacity {} sectors", MIB / SECTOR));

    // A rate limiter can be set after start: the bucket given is set, the other kept (none);
    // an unknown drive is refused.
    let r = c.patch(
        "/drives/rootfs",
        r#"{"drive_id": "rootfs", "rate_limiter": {"bandwidth": {"size": 100000000, "refill_time": 100}}}"#,
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let r = c.patch(
        "/drives/rootfs",
        r#"{"drive_id": "rootfs", "rate_limiter": {"ops": {"size": 1000, "refill_time": 100}}}"#,
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let cfg = c.get("/vm/config").json();
    assert_eq!(
        cfg["drives"][0]["rate_limiter"],
        json!({"bandwidth": {"size": 100000000, "refill_time": 100},
               "ops": {"size": 1000, "refill_time": 100}}),
        "{cfg}"
    );
    let r = c.patch(
        "/drives/other",
        &json!({"drive_id": "other", "path_on_host": second.to_str().unwrap()}).to_string(),
    );
    assert_eq!(r.status, 400, "{}", r.body);

    let r = c.patch("/drives/rootfs", &patch.to_string());
    assert_eq!(r.status, 204, "{}", r.body);
    let cfg = c.get("/vm/config").json();
    assert_eq!(
        cfg["drives"][0]["path_on_host"].as_str(),
        second.to_str(),
        "{cfg}"
    );
    // The guest reads the interrupt status as it sees the new generation: the
    // configuration-change bit must be up by then.
    vm.wait_for(&format!(
        "blk: capacity changed to {} sectors, configuration interrupt 1",
        2 * MIB / SECTOR
    ));
    let back = json!({"drive_id": "rootfs", "path_on_host": first.to_str().unwrap()});
    let r = c.patch("/drives/rootfs", &back.to_string());
    assert_eq!(r.status, 204, "{}", r.body);
    vm.wait_for(&format!(
        "blk: capacity changed to {} sectors, configuration interrupt 1",
        MIB / SECTOR
    ));
}

#[test]
fn blk_async_engine_reads_writes_and_flushes() {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("blk-async");
    let data = random_bytes(MIB, 0x0b1c_0009);
    let img = dir.write("rootfs.img", &data);
    let mut d = drive("rootfs", &img, true, false);
    d["io_engine"] = json!("Async");
    d["cache_type"] = json!("Writeback");
    let out = boot(&config("blk", vec![d], false));
    let (n, h) = fnv_of_first_sectors(&data);
    out.expect_code(0)
        .expect(&format!("blk: capacity {} sectors, ro=0", MIB / SECTOR))
        .expect(&format!("blk: read {n} sectors fnv1a64={h:016x}"))
        .expect("blk: wrote 8 sectors at 8, flush status 0")
        .expect("blk: out of range status 1")
        .expect("ember-guest: done");
    let after = std::fs::read(&img).unwrap();
    assert_eq!(after.len(), data.len(), "the image changed size");
    assert!(
        after[8 * SECTOR..16 * SECTOR] == pattern()[..],
        "sectors 8..16 do not hold the guest's pattern"
    );
    assert!(
        after[..8 * SECTOR] == data[..8 * SECTOR] && after[16 * SECTOR..] == data[16 * SECTOR..],
        "the guest's write touched bytes outside sectors 8..16"
    );
}

/// What the guest's `blk=` scenario writes over the second half of the drive: byte `off` (from
/// the start of the drive) is ((off*13) ^ (off>>9) ^ 0x5c) & 0xff.
fn qpattern(off: usize) -> u8 {
    ((off.wrapping_mul(13) ^ (off >> 9) ^ 0x5c) & 0xff) as u8
}

/// The number after `key` in `line` (e.g. "requests 12, ...").
fn number_after(line: &str, key: &str) -> u64 {
    let rest = line
        .split_once(key)
        .unwrap_or_else(|| panic!("no {key:?} in {line:?}"))
        .1;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number after {key:?} in {line:?}"))
}

/// Boots the guest's `blk=<args>` (many requests in flight) on a fresh 1 MiB image with
/// `engine`; checks what the guest read, wrote and read back, and the file afterwards.
/// Returns (requests, notifications, interrupt status) as the guest counted them.
fn blk_in_flight(engine: &str, args: &str, qd: usize, event_idx: bool, seed: u64) -> [u64; 3] {
    let dir = TempDir::new("blk-qd");
    let data = random_bytes(MIB, seed);
    let img = dir.write("rootfs.img", &data);
    let mut d = drive("rootfs", &img, true, false);
    d["io_engine"] = json!(engine);
    d["cache_type"] = json!("Writeback");
    let out = boot(&config(&format!("blk={args}"), vec![d], false));
    let sectors = MIB / SECTOR;
    let half = sectors / 2;
    // The queue: the smallest power of two with room for qd requests of 3 descriptors.
    let queue = (3 * qd).next_power_of_two();
    out.expect_code(0)
        .expect(&format!(
            "blkq: capacity {sectors} sectors, ro=0, qd {qd}, event_idx {}, queue {queue}",
            event_idx as u8
        ))
        .expect(&format!(
            "blkq: read {sectors} sectors in 50 requests fnv1a64={:016x}",
            fnv1a64(&data)
        ))
        .expect(&format!(
            "blkq: wrote {half} sectors at {half} in 25 requests, flush status 0"
        ))
        .expect(&format!(
            "blkq: read back {half} sectors in 27 requests: ok"
        ))
        .expect("ember-guest: done");

    let after = std::fs::read(&img).unwrap();
    assert_eq!(after.len(), data.len(), "the image changed size");
    let lo = half * SECTOR;
    assert!(
        after[..lo] == data[..lo],
        "{engine} {args}: the first half of the drive changed"
    );
    if let Some(i) = (lo..MIB).find(|&i| after[i] != qpattern(i)) {
        panic!(
            "{engine} {args}: byte {i:#x} of the file is {:#x}, not the guest's {:#x}",
            after[i],
            qpattern(i)
        );
    }
    let line = line_after(&out, "blkq: requests ");
    let line = format!("requests {line}");
    [
        number_after(&line, "requests "),
        number_after(&line, "notifications "),
        number_after(&line, "interrupt status "),
    ]
}

#[test]
fn blk_many_requests_in_flight_with_event_idx_sync_and_async() {
    if !require_kvm() {
        return;
    }
    for (i, engine) in ["Sync", "Async"].into_iter().enumerate() {
        for qd in [8, 32] {
            let [requests, notifies, irq] =
                blk_in_flight(engine, &format!("qd{qd}"), qd, true, 0x0b1c_0020 + i as u64);
            // 50 + 25 + 27 data requests (mixed sizes) and a FLUSH.
            assert_eq!(requests, 103, "{engine} qd{qd}");
            // The driver notifies only when the device's avail_event asks for it: never more
            // than once per publication, and the first publication carries qd requests.
            assert!(
                notifies >= 1 && notifies < requests,
                "{engine} qd{qd}: {notifies} notifications for {requests} requests"
            );
            // used_event stays far ahead of the used index: the device must not have
            // interrupted.
            assert_eq!(
                irq, 0,
                "{engine} qd{qd}: the device interrupted although used_event said not to"
            );
        }
    }
}

#[test]
fn blk_many_requests_in_flight_without_event_idx() {
    if !require_kvm() {
        return;
    }
    for (i, engine) in ["Sync", "Async"].into_iter().enumerate() {
        let [requests, _, irq] =
            blk_in_flight(engine, "qd16,noidx", 16, false, 0x0b1c_0030 + i as u64);
        assert_eq!(requests, 103, "{engine}");
        // Without EVENT_IDX the device interrupts for used buffers (this driver never
        // acknowledges): the contrast to the test above.
        assert_eq!(
            irq, 1,
            "{engine}: no used-buffer interrupt without EVENT_IDX"
        );
    }
}

#[test]
fn blk_many_requests_in_flight_read_only_drive() {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("blk-qd-ro");
    let data = random_bytes(MIB, 0x0b1c_0040);
    let img = dir.write("rootfs.img", &data);
    let mut d = drive("rootfs", &img, true, true);
    d["io_engine"] = json!("Async");
    let out = boot(&config("blk=qd4", vec![d], false));
    out.expect_code(0)
        .expect(&format!(
            "blkq: capacity {} sectors, ro=1, qd 4, event_idx 1, queue 16",
            MIB / SECTOR
        ))
        .expect(&format!(
            "blkq: read {} sectors in 50 requests fnv1a64={:016x}",
            MIB / SECTOR,
            fnv1a64(&data)
        ))
        .expect("blkq: write refused status 1")
        .expect("ember-guest: done");
    assert!(
        std::fs::read(&img).unwrap() == data,
        "a read-only drive changed"
    );
}

#[test]
fn blk_async_engine_survives_the_evil_guest() {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("evil-async");
    let data = random_bytes(MIB, 0x0b1c_000a);
    let img = dir.write("rootfs.img", &data);
    let mut d = drive("rootfs", &img, true, false);
    d["io_engine"] = json!("Async");
    let out = boot(&config("evil", vec![d], false));
    out.expect_code(0);
    for case in EVIL_CASES {
        out.expect(&format!("evil: {case} survived"));
    }
    out.expect(&format!(
        "evil: well-behaved read ok fnv1a64={:016x}",
        fnv1a64(&data[..SECTOR])
    ))
    .expect("ember-guest: done");
    let what = line_after(&out, "evil: bad address: ");
    assert!(
        what.starts_with("completed, status 1,"),
        "a data buffer outside guest memory was not answered IOERR: {what}\n{}",
        out.stdout
    );
    assert!(
        std::fs::read(&img).unwrap() == data,
        "the evil guest's requests changed the file"
    );
}

/// As in Firecracker, a drive's file is opened by `PUT /drives` and that is what the guest
/// gets: a file renamed over the path before InstanceStart is not the disk.
#[test]
fn drive_file_is_the_one_opened_at_put() {
    if !require_kvm() {
        return;
    }
    let dir = TempDir::new("blk-put");
    let data = random_bytes(MIB, 0x0b1c_0011);
    let img = dir.write("rootfs.img", &data);
    let other = random_bytes(MIB, 0x0b1c_0012);
    let swap = dir.write("other.img", &other);
    let vm = ApiVm::start(&[]);
    let mut c = vm.client();
    let r = c.put(
        "/boot-source",
        &format!(r#"{{"kernel_image_path":"{GUEST}","boot_args":"blk"}}"#),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let r = c.put(
        "/drives/rootfs",
        &serde_json::to_string(&drive("rootfs", &img, true, false)).unwrap(),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    std::fs::rename(&swap, &img).unwrap();
    let r = c.put("/actions", r#"{"action_type":"InstanceStart"}"#);
    assert_eq!(r.status, 204, "{}", r.body);
    let (n, h) = fnv_of_first_sectors(&data);
    vm.wait_for(&format!("blk: read {n} sectors fnv1a64={h:016x}"));
    vm.wait_for("ember-guest: done");
    assert!(
        std::fs::read(&img).unwrap() == other,
        "the file now at the path was written"
    );
}
