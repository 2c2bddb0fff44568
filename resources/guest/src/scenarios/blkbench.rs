//! `blkbench`: throughput of the first virtio block device, one request in
//! flight at a time. The TSC is calibrated against ember's boot timer (10 ms),
//! then: sequential read of min(capacity, 64 MiB) in 64 KiB requests,
//! sequential write of the same range in 64 KiB requests followed by a FLUSH
//! (timed together), and 2000 random 4 KiB reads (xorshift64 over the
//! capacity, 4 KiB aligned). Prints
//! `blkbench: seqread <MB/s> MB/s, seqwrite <MB/s> MB/s, randread <IOPS> IOPS`
//! (MB = 10^6 bytes). Without a boot timer the TSC is assumed to run at 2 GHz.

use super::blk::{open_first, status_of};
use crate::virtio::blk::{Blk, DATA_LEN, SECTOR};
use crate::{hw, Ctx};

const MAX_BYTES: u64 = 64 << 20;
const RAND_READS: u64 = 2000;
const RAND_SECTORS: u64 = 4096 / SECTOR as u64;

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

/// Sequential pass over sectors 0..`sectors` in DATA_LEN chunks.
fn sequential(b: &mut Blk, sectors: u64, write: bool) {
    let per = (DATA_LEN / SECTOR) as u64;
    let mut s = 0;
    while s < sectors {
        let n = (sectors - s).min(per) as usize;
        let d = if write { b.write(s, n) } else { b.read(s, n) };
        let st = status_of(if write { "write" } else { "read" }, d);
        if st != 0 {
            fail!("blkbench: request at sector ", s, " status ", st);
        }
        s += n as u64;
    }
}

pub fn run(ctx: &Ctx, _arg: &[u8]) {
    let mut b = open_first(ctx, "blkbench");
    if b.ro {
        fail!("blkbench: the block device is read-only");
    }
    let hz = tsc_hz();
    let sectors = b.capacity.min(MAX_BYTES / SECTOR as u64);
    if sectors < RAND_SECTORS {
        fail!("blkbench: capacity ", b.capacity, " sectors is too small");
    }
    let bytes = sectors * SECTOR as u64;

    let t0 = hw::rdtsc();
    sequential(&mut b, sectors, false);
    let t1 = hw::rdtsc();
    let seqread = rate(bytes, t1 - t0, hz) / 1_000_000;

    for (i, c) in Blk::data_mut().iter_mut().enumerate() {
        *c = (i as u8) ^ 0x5a;
    }
    let t0 = hw::rdtsc();
    sequential(&mut b, sectors, true);
    let f = status_of("flush", b.flush());
    if f != 0 {
        fail!("blkbench: flush status ", f);
    }
    let t1 = hw::rdtsc();
    let seqwrite = rate(bytes, t1 - t0, hz) / 1_000_000;

    let blocks = b.capacity / RAND_SECTORS;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ hw::rdtsc();
    let t0 = hw::rdtsc();
    for _ in 0..RAND_READS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let s = (x % blocks) * RAND_SECTORS;
        let st = status_of("random read", b.read(s, RAND_SECTORS as usize));
        if st != 0 {
            fail!("blkbench: random read at sector ", s, " status ", st);
        }
    }
    let t1 = hw::rdtsc();
    let iops = rate(RAND_READS, t1 - t0, hz);

    say!(
        "blkbench: seqread ",
        seqread,
        " MB/s, seqwrite ",
        seqwrite,
        " MB/s, randread ",
        iops,
        " IOPS"
    );
}
