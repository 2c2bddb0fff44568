//! `blkbench` (or `blkbench=<args>`, as for `blk=`: `qd<N>`, `noidx`):
//! throughput of the first virtio block device with up to N requests in
//! flight (default 16), VIRTIO_RING_F_EVENT_IDX negotiated, completions
//! polled. The TSC is calibrated against ember's boot timer (10 ms), then:
//! sequential read of min(capacity, 64 MiB) in 64 KiB requests (four passes,
//! into buffers touched beforehand), sequential
//! write of the same range in 64 KiB requests followed (once all are done) by
//! a FLUSH (timed together), and 20000 random 4 KiB reads (xorshift64 over the
//! capacity, 4 KiB aligned). Prints
//! `blkbench: seqread <MB/s> MB/s, seqwrite <MB/s> MB/s, randread <IOPS> IOPS`
//! (MB = 10^6 bytes), then
//! `blkbench: qd <N>, event_idx <0|1>, requests <R>, notifications <M>;
//! seqwrite <us> us, of which FLUSH <us> us`.
//! Without a boot timer the TSC is assumed to run at 2 GHz.

use super::blkq::{open, parse_args};
use crate::virtio::blk::{BlkQ, Completion, AREA, DATA_LEN, SECTOR, S_OK, T_FLUSH, T_IN, T_OUT};
use crate::{hw, Ctx};

const MAX_BYTES: u64 = 64 << 20;
/// Sequential reads cover the range this many times: one pass from the page cache takes
/// under 10 ms, short enough for one descheduling to skew it.
const READ_PASSES: u64 = 4;
const RAND_READS: u32 = 20_000;
const RAND_SECTORS: u64 = 4096 / SECTOR as u64;
const DEFAULT_QD: usize = 16;

/// TSC cycles per second, measured over 10 ms of boot timer.
fn tsc_hz() -> u64 {
    let us0 = hw::boot_time_us();
    if us0 == 0 {
        return 2_000_000_000;
    }
    let t0 = hw::rdtsc();
    let mut us1 = us0;
    while us1 < us0 + 10_000 {
        core::hint::spin_loop();
        us1 = hw::boot_time_us();
    }
    let t1 = hw::rdtsc();
    ((t1 - t0) as u128 * 1_000_000 / (us1 - us0) as u128).max(1) as u64
}

/// `units` per second over `cycles` TSC cycles.
fn rate(units: u64, cycles: u64, hz: u64) -> u64 {
    (units as u128 * hz as u128 / cycles.max(1) as u128) as u64
}

/// Fails on the first request that did not succeed.
fn check(what: &str, c: &Completion) {
    if c.status != S_OK {
        fail!("blkbench: ", what, " request ", c.tag, " status ", c.status);
    }
}

/// Sequential pass over sectors 0..`sectors` in DATA_LEN requests, each
/// through its slot's buffer.
fn sequential(b: &mut BlkQ, sectors: u64, write: bool) {
    let per = (DATA_LEN / SECTOR) as u64;
    let n = sectors.div_ceil(per) as u32;
    let kind = if write { T_OUT } else { T_IN };
    let what = if write { "write" } else { "read" };
    b.pipeline(
        n,
        |i, slot| {
            let s = i as u64 * per;
            let len = ((sectors - s).min(per) as usize * SECTOR) as u32;
            (kind, s, BlkQ::slot_buf(slot), len)
        },
        |c| check(what, c),
    );
}

pub fn run(ctx: &Ctx, arg: &[u8]) {
    let (qd, event_idx) = parse_args(arg, DEFAULT_QD);
    let mut b = open(ctx, "blkbench", qd, event_idx);
    if b.ro {
        fail!("blkbench: the block device is read-only");
    }
    let hz = tsc_hz();
    let sectors = b.capacity.min(MAX_BYTES / SECTOR as u64);
    if sectors < RAND_SECTORS {
        fail!("blkbench: capacity ", b.capacity, " sectors is too small");
    }
    let bytes = sectors * SECTOR as u64;

    // Touching the buffers first keeps the one-time cost of their first use (a shadow-paging
    // fault in the guest, a page allocation on the host, ~4 µs per 4 KiB page here) out of the
    // timed passes; the write pass below writes this pattern.
    // SAFETY: AREA is this scenario's; no request is in flight.
    let area = unsafe { core::slice::from_raw_parts_mut(AREA.addr() as *mut u8, AREA.len()) };
    for (i, c) in area.iter_mut().enumerate() {
        *c = (i as u8) ^ 0x5a;
    }

    let t0 = hw::rdtsc();
    for _ in 0..READ_PASSES {
        sequential(&mut b, sectors, false);
    }
    let t1 = hw::rdtsc();
    let seqread = rate(bytes * READ_PASSES, t1 - t0, hz) / 1_000_000;

    // The read passes overwrote the pattern.
    for (i, c) in area.iter_mut().enumerate() {
        *c = (i as u8) ^ 0x5a;
    }
    let t0 = hw::rdtsc();
    sequential(&mut b, sectors, true);
    let tf = hw::rdtsc();
    let f = b.one(T_FLUSH, 0, 0, 0);
    check("flush", &f);
    let t1 = hw::rdtsc();
    let seqwrite = rate(bytes, t1 - t0, hz) / 1_000_000;
    let write_us = (t1 - t0) as u128 * 1_000_000 / hz as u128;
    let flush_us = (t1 - tf) as u128 * 1_000_000 / hz as u128;

    let blocks = b.capacity / RAND_SECTORS;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ hw::rdtsc();
    let t0 = hw::rdtsc();
    b.pipeline(
        RAND_READS,
        |_, slot| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let s = (x % blocks) * RAND_SECTORS;
            (
                T_IN,
                s,
                BlkQ::slot_buf(slot),
                RAND_SECTORS as u32 * SECTOR as u32,
            )
        },
        |c| check("random read", c),
    );
    let t1 = hw::rdtsc();
    let iops = rate(RAND_READS as u64, t1 - t0, hz);

    say!(
        "blkbench: seqread ",
        seqread,
        " MB/s, seqwrite ",
        seqwrite,
        " MB/s, randread ",
        iops,
        " IOPS"
    );
    say!(
        "blkbench: qd ",
        b.qd,
        ", event_idx ",
        b.event_idx as u8,
        ", requests ",
        b.requests,
        ", notifications ",
        b.notifies,
        "; seqwrite ",
        write_us as u64,
        " us, of which FLUSH ",
        flush_us as u64,
        " us"
    );
}
