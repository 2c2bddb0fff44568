//! `blk=<args>`: the first virtio block device driven with many requests in
//! flight ([`BlkQ`]). Arguments, comma-separated: `qd<N>` (requests in flight,
//! default 8) and `noidx` (do not negotiate VIRTIO_RING_F_EVENT_IDX).
//!
//! Reads the first min(capacity, 2 MiB) in requests of mixed sizes into one
//! region and prints its fnv1a64; writes the second half of that range with
//! [`qpattern`] (mixed sizes again), FLUSHes, reads it back and compares (a
//! read-only drive must refuse the write instead); then prints the requests,
//! the notifications sent and InterruptStatus (with EVENT_IDX the driver
//! never asks for an interrupt, so it must read 0).

use super::initrd::fnv1a64;
use super::parse_dec;
use crate::serial::Hex;
use crate::virtio::blk::{BlkQ, Completion, AREA, AREA_LEN, SECTOR, S_OK, T_FLUSH, T_IN, T_OUT};
use crate::virtio::mmio::INTERRUPT_STATUS;
use crate::Ctx;

/// Request sizes, in sectors, cycled through.
const SIZES: [u64; 10] = [8, 1, 128, 24, 3, 64, 16, 128, 7, 32];
/// Most requests one pass makes (the expected lengths are kept per request).
const MAX_REQS: usize = 1024;

/// Byte `off` (from the start of the drive) of what the scenario writes.
pub fn qpattern(off: usize) -> u8 {
    ((off.wrapping_mul(13) ^ (off >> 9) ^ 0x5c) & 0xff) as u8
}

/// (qd, event_idx) from the scenario's argument.
pub fn parse_args(arg: &[u8], default_qd: usize) -> (usize, bool) {
    let mut qd = default_qd;
    let mut event_idx = true;
    for a in arg.split(|&c| c == b',').filter(|a| !a.is_empty()) {
        if a == b"noidx" {
            event_idx = false;
        } else if let Some(n) = a.strip_prefix(b"qd").and_then(parse_dec) {
            qd = n as usize;
        } else {
            fail!("blk: unknown argument ", a);
        }
    }
    (qd, event_idx)
}

pub fn open(ctx: &Ctx, who: &str, qd: usize, event_idx: bool) -> BlkQ {
    let Some(base) = crate::virtio::blk::Blk::find(ctx.bp.cmdline(), 0) else {
        fail!(who, ": no virtio block device on the command line");
    };
    match BlkQ::open(base, qd, event_idx) {
        Ok(b) => b,
        Err(e) => fail!(who, ": block device at ", Hex(base, 8), ": ", e),
    }
}

/// Moves sectors `first..first + n` between the drive and AREA (AREA byte i
/// is drive byte i), `kind` T_IN or T_OUT, in requests of SIZES starting at
/// SIZES[`phase`]; every request must succeed with the right used length.
/// Returns the number of requests.
fn transfer(b: &mut BlkQ, kind: u32, first: u64, n: u64, phase: usize) -> u32 {
    let mut plan = [(0u64, 0u32); MAX_REQS];
    let mut reqs = 0usize;
    let mut s = first;
    while s < first + n {
        if reqs == MAX_REQS {
            fail!("blkq: too many requests");
        }
        let k = SIZES[(phase + reqs) % SIZES.len()].min(first + n - s);
        plan[reqs] = (s, (k as usize * SECTOR) as u32);
        reqs += 1;
        s += k;
    }
    let mut bad: Option<Completion> = None;
    b.pipeline(
        reqs as u32,
        |i, _slot| {
            let (sector, len) = plan[i as usize];
            let data = AREA.addr() + sector * SECTOR as u64;
            (kind, sector, data, len)
        },
        |c| {
            let want = if kind == T_IN {
                plan[c.tag as usize].1 + 1
            } else {
                1
            };
            if c.status != S_OK || c.len != want {
                bad.get_or_insert(*c);
            }
        },
    );
    if let Some(c) = bad {
        let (sector, len) = plan[c.tag as usize];
        fail!(
            "blkq: request at sector ",
            sector,
            " (",
            len,
            " bytes): status ",
            c.status,
            ", used length ",
            c.len
        );
    }
    reqs as u32
}

pub fn run(ctx: &Ctx, arg: &[u8]) {
    let (qd, event_idx) = parse_args(arg, 8);
    let mut b = open(ctx, "blkq", qd, event_idx);
    say!(
        "blkq: capacity ",
        b.capacity,
        " sectors, ro=",
        b.ro as u8,
        ", qd ",
        b.qd,
        ", event_idx ",
        b.event_idx as u8,
        ", queue ",
        b.q.size
    );
    let total = b.capacity.min((AREA_LEN / SECTOR) as u64);
    if total < 2 {
        fail!("blkq: the drive is too small");
    }
    // SAFETY: AREA is this scenario's; no request is in flight.
    let area = unsafe { core::slice::from_raw_parts_mut(AREA.addr() as *mut u8, AREA_LEN) };
    area.fill(0);
    let r = transfer(&mut b, T_IN, 0, total, 0);
    let bytes = total as usize * SECTOR;
    say!(
        "blkq: read ",
        total,
        " sectors in ",
        r,
        " requests fnv1a64=",
        Hex(fnv1a64(&area[..bytes]), 16)
    );

    let half = total / 2;
    let (lo, hi) = (half as usize * SECTOR, bytes);
    if b.ro {
        let c = b.one(T_OUT, half, AREA.addr(), SECTOR as u32);
        say!("blkq: write refused status ", c.status);
    } else {
        for (i, c) in area[lo..hi].iter_mut().enumerate() {
            *c = qpattern(lo + i);
        }
        let w = transfer(&mut b, T_OUT, half, total - half, 3);
        let f = b.one(T_FLUSH, 0, 0, 0);
        say!(
            "blkq: wrote ",
            total - half,
            " sectors at ",
            half,
            " in ",
            w,
            " requests, flush status ",
            f.status
        );
        area[lo..hi].fill(0);
        let r = transfer(&mut b, T_IN, half, total - half, 6);
        if let Some(i) = (lo..hi).find(|&i| area[i] != qpattern(i)) {
            fail!(
                "blkq: read back byte ",
                i,
                " is ",
                area[i],
                ", not ",
                qpattern(i)
            );
        }
        say!(
            "blkq: read back ",
            total - half,
            " sectors in ",
            r,
            " requests: ok"
        );
    }
    say!(
        "blkq: requests ",
        b.requests,
        ", notifications ",
        b.notifies,
        ", interrupt status ",
        b.t.read(INTERRUPT_STATUS)
    );
}
