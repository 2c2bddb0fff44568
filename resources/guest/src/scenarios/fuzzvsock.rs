//! `fuzzvsock=<seed>`: a random vsock peer. Over a properly set-up vsock
//! device it sends 4000 packets whose every header field is drawn at random
//! around what matters: ops mostly valid (REQUEST, RESPONSE, RW, SHUTDOWN,
//! RST, credit update and request), sometimes not; its own CID or another;
//! host ports 6000-6003 (where the test listens) or any; a few local ports;
//! `len` mostly true, sometimes larger or smaller than the payload; any
//! `buf_alloc`, `fwd_cnt` and flags. Between packets it takes what the device
//! delivered (answering a host's REQUEST with RESPONSE or RST at random) and
//! gives the buffers back. Before that, one connection to host port 6004 is
//! made properly and half-closed (SHUTDOWN with "no more sends"), so that the
//! device still holds it, with data the host has not taken, when the guest
//! resets it at the end. Prints `fuzzvsock: connection to host port 6004
//! half-closed, <n> KiB still in the device`, `fuzzvsock: <sent> sent, <received>
//! received, seed <s>`, then `fuzzvsock: survived` after a reset; a packet
//! the device does not take within 2 s is a FAIL.

use crate::rand::XorShift;
use crate::virtio::vsock::*;
use crate::Ctx;

const PACKETS: u32 = 4000;
static PAYLOAD: [u8; MAX_PAYLOAD] = [b'f'; MAX_PAYLOAD];

fn random_packet(r: &mut XorShift, cid: u64) -> (Hdr, usize) {
    let op = match r.below(20) {
        0..=4 => OP_REQUEST,
        5..=10 => OP_RW,
        11..=12 => OP_SHUTDOWN,
        13..=14 => OP_RST,
        15 => OP_CREDIT_UPDATE,
        16 => OP_CREDIT_REQUEST,
        17 => OP_RESPONSE,
        _ => r.next() as u16,
    };
    let n = match r.below(4) {
        0 => 0,
        1 => r.below(64) as usize,
        2 => r.below(MAX_PAYLOAD as u64 + 1) as usize,
        _ => r.pick(&[1usize, 512, 4096]),
    };
    let len = match r.below(16) {
        0 => r.next() as u32,
        1 => (n as u32).saturating_add(1 + r.below(64) as u32),
        2 => (n as u32).saturating_sub(1),
        _ => n as u32,
    };
    let any = r.next();
    let h = Hdr {
        src_cid: if r.below(16) == 0 { r.next() } else { cid },
        dst_cid: if r.below(16) == 0 {
            r.pick(&[0, 1, 3, u64::MAX, any])
        } else {
            HOST_CID
        },
        src_port: if r.below(16) == 0 {
            r.next() as u32
        } else {
            1024 + r.below(8) as u32
        },
        dst_port: if r.below(8) == 0 {
            r.next() as u32
        } else {
            6000 + r.below(4) as u32
        },
        len,
        type_: if r.below(32) == 0 {
            r.next() as u16
        } else {
            TYPE_STREAM
        },
        op,
        flags: if op == OP_SHUTDOWN && r.below(4) != 0 {
            1 + r.below(3) as u32
        } else if r.below(8) == 0 {
            r.next() as u32
        } else {
            0
        },
        buf_alloc: r.pick(&[0, 1, 4096, BUF_ALLOC, u32::MAX, any as u32]),
        fwd_cnt: r.pick(&[0, 4096, u32::MAX, (any >> 32) as u32]),
    };
    (h, n)
}

pub fn run(ctx: &Ctx, arg: &[u8]) {
    let seed = crate::scenarios::parse_dec(arg).unwrap_or(1);
    let mut r = XorShift::new(seed);
    let Some(base) = Vsock::find(ctx.bp.cmdline()) else {
        fail!("fuzzvsock: no vsock device on the command line");
    };
    let mut v = match Vsock::open(base) {
        Ok(v) => v,
        Err(e) => fail!("fuzzvsock: ", e),
    };
    // First one connection done right and then half-closed (SHUTDOWN, "will send no more")
    // to host port 6004, which the host keeps open: the device still holds it at the reset.
    let cid = v.cid;
    let hdr = |op: u16, flags: u32| Hdr {
        src_cid: cid,
        dst_cid: HOST_CID,
        src_port: 2000,
        dst_port: 6004,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags,
        buf_alloc: BUF_ALLOC,
        fwd_cnt: 0,
    };
    if !v.send(&hdr(OP_REQUEST, 0), &[]) {
        fail!("fuzzvsock: the REQUEST to port 6004 was not taken");
    }
    let until = crate::virtio::deadline(TIMEOUT_US);
    loop {
        if crate::hw::rdtsc() > until {
            fail!("fuzzvsock: no RESPONSE from host port 6004");
        }
        if let Some((id, h, _)) = v.poll_rx() {
            v.repost(id);
            if h.op == OP_RESPONSE && h.src_port == 6004 && h.dst_port == 2000 {
                break;
            }
        }
    }
    // Data until the host socket (which nobody reads) is full and the device holds some of
    // it: it asks for credit after each 4 KiB and stops once 16 KiB wait in the device.
    let (mut pushed, mut fwd) = (0u32, 0u32);
    while pushed.wrapping_sub(fwd) < 16 * 1024 && pushed < 4 << 20 {
        if pushed.wrapping_sub(fwd) + 4096 > 48 * 1024 {
            break;
        }
        if !v.send(&hdr(OP_RW, 0), &PAYLOAD[..4096]) {
            fail!("fuzzvsock: RW to port 6004 was not taken");
        }
        pushed += 4096;
        if !v.send(&hdr(OP_CREDIT_REQUEST, 0), &[]) {
            fail!("fuzzvsock: CREDIT_REQUEST to port 6004 was not taken");
        }
        let until = crate::virtio::deadline(TIMEOUT_US);
        loop {
            if crate::hw::rdtsc() > until {
                fail!("fuzzvsock: no CREDIT_UPDATE from host port 6004");
            }
            if let Some((id, h, _)) = v.poll_rx() {
                v.repost(id);
                if h.op == OP_CREDIT_UPDATE && h.src_port == 6004 && h.dst_port == 2000 {
                    fwd = h.fwd_cnt;
                    break;
                }
            }
        }
    }
    if !v.send(&hdr(OP_SHUTDOWN, 2), &[]) {
        fail!("fuzzvsock: the SHUTDOWN to port 6004 was not taken");
    }
    say!(
        "fuzzvsock: connection to host port 6004 half-closed, ",
        pushed.wrapping_sub(fwd) as u64 / 1024,
        " KiB still in the device"
    );
    let (mut sent, mut received) = (0u64, 0u64);
    for _ in 0..PACKETS {
        let (h, n) = random_packet(&mut r, v.cid);
        if !v.send_as_is(&h, &PAYLOAD[..n], 2_000_000) {
            fail!("fuzzvsock: the device did not take packet ", sent, " (op ", h.op, ")");
        }
        sent += 1;
        while let Some((id, h, _)) = v.poll_rx() {
            received += 1;
            let answer = match h.op {
                OP_REQUEST => Some(if r.below(2) == 0 { OP_RESPONSE } else { OP_RST }),
                OP_RW if r.below(4) == 0 => Some(OP_CREDIT_UPDATE),
                OP_CREDIT_REQUEST => Some(OP_CREDIT_UPDATE),
                _ => None,
            };
            v.repost(id);
            if let Some(op) = answer {
                let reply = Hdr {
                    src_cid: v.cid,
                    dst_cid: h.src_cid,
                    src_port: h.dst_port,
                    dst_port: h.src_port,
                    len: 0,
                    type_: TYPE_STREAM,
                    op,
                    flags: 0,
                    buf_alloc: BUF_ALLOC,
                    fwd_cnt: 0,
                };
                if !v.send_as_is(&reply, &[], 2_000_000) {
                    fail!("fuzzvsock: the device did not take an answer (op ", op, ")");
                }
                sent += 1;
            }
        }
    }
    say!("fuzzvsock: ", sent, " sent, ", received, " received, seed ", seed);
    v.t.reset();
    say!("fuzzvsock: survived");
}
