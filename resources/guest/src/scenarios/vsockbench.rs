//! `vsockbench=<MiB>`: bulk throughput of the first virtio vsock device, both directions on one
//! stream connection. Rings of up to 64 entries with EVENT_IDX, 64 KiB packets, buffers in RAM
//! at 16..40 MiB (see `netbench`); the guest advertises a 1 MiB receive buffer.
//!
//! Prints `vsockbench: listening`, accepts the host's connection to port 5000, then:
//! 1. counts the payload the host sends until it shuts its side down (SHUTDOWN with SEND):
//!    `vsockbench: rx <bytes> bytes in <us> us` (first RW to last RW);
//! 2. sends `<MiB>` MiB within the host's credit, as fast as it allows, and waits until the
//!    device reports all of it forwarded to the host socket (fwd_cnt):
//!    `vsockbench: tx <bytes> bytes in <us> us`;
//! 3. shuts the connection down. FAIL when anything takes over 60 s.

use super::netbench::{check_region, Clock, Ring, F_EVENT_IDX, MAX_RING, REGION};
use crate::virtio::mmio::{Transport, F_VERSION_1};
use crate::virtio::queue::{DESC_F_WRITE, PAGE};
use crate::virtio::vsock::*;
use crate::virtio::{deadline, tsc_per_us};
use crate::{hw, Ctx};

const PORT: u32 = 5000;
const CHUNK: usize = 65536;
/// One buffer: header + 64 KiB, page-rounded.
const STRIDE: u64 = 17 * PAGE as u64;
const RCV_BUF: u32 = 1 << 20;
const TOTAL_US: u64 = 60_000_000;

struct Bench {
    t: Transport,
    rx: Ring,
    tx: Ring,
    cid: u64,
    rx_bufs: u64,
    tx_bufs: u64,
    free: [u16; MAX_RING as usize],
    nfree: usize,
    end: u64,
    peer: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    fwd_cnt: u32,
    fwd_sent: u32,
}

impl Bench {
    fn check_time(&self, what: &str) {
        if hw::rdtsc() > self.end {
            fail!("vsockbench: timed out ", what);
        }
    }

    fn reclaim(&mut self) {
        while let Some((id, _)) = self.tx.q.poll() {
            if self.nfree < self.tx.size() as usize {
                self.free[self.nfree] = (id % self.tx.size() as u32) as u16;
                self.nfree += 1;
            }
        }
    }

    /// Queues one packet to the peer; an RW's `n` payload bytes are already in every slot.
    fn send(&mut self, op: u16, n: usize, flags: u32) {
        while self.nfree == 0 {
            self.reclaim();
            self.check_time("waiting for a TX slot");
        }
        self.nfree -= 1;
        let id = self.free[self.nfree];
        let a = self.tx_bufs + id as u64 * STRIDE;
        let h = Hdr {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port: PORT,
            dst_port: self.peer,
            len: n as u32,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: RCV_BUF,
            fwd_cnt: self.fwd_cnt,
        };
        // SAFETY: inside the region; the device does not own this slot.
        h.write(unsafe { core::slice::from_raw_parts_mut(a as *mut u8, HDR_LEN) });
        self.fwd_sent = self.fwd_cnt;
        self.tx.q.set_desc(id, a, (HDR_LEN + n) as u32, 0, 0);
        let old = self.tx.q.next_avail;
        self.tx.q.push(id);
        self.tx.quiet();
        self.tx.kick(&self.t, old);
    }

    /// Every received packet: header and payload length; the buffers go straight back.
    fn receive(&mut self, mut each: impl FnMut(&mut Bench, Hdr, usize)) {
        let old = self.rx.q.next_avail;
        while let Some((id, len)) = self.rx.q.poll() {
            let id = (id % self.rx.size() as u32) as u16;
            let a = self.rx_bufs + id as u64 * STRIDE;
            // SAFETY: inside the region; the device is done with this buffer.
            let h = Hdr::parse(unsafe { core::slice::from_raw_parts(a as *const u8, HDR_LEN) });
            let n = (h.len as usize).min((len as usize).saturating_sub(HDR_LEN));
            self.rx.q.push(id);
            if len as usize >= HDR_LEN
                && h.dst_cid == self.cid
                && h.src_cid == HOST_CID
                && h.dst_port == PORT
            {
                each(self, h, n);
            }
        }
        self.rx.quiet();
        self.rx.kick(&self.t, old);
    }

    fn track(&mut self, h: &Hdr) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
    }
}

pub fn run(ctx: &Ctx, arg: &[u8]) {
    let mib = match crate::scenarios::parse_dec(arg) {
        Some(n) if (1..=4096).contains(&n) => n,
        _ => fail!("vsockbench: the size must be 1 to 4096 MiB"),
    };
    check_region(ctx, "vsockbench");
    let Some(base) = Vsock::find(ctx.bp.cmdline()) else {
        fail!("vsockbench: no virtio vsock device on the command line");
    };
    let t = Transport::new(base);
    let offered = match t.begin(F_VERSION_1 | F_EVENT_IDX) {
        Ok(f) => f,
        Err(e) => fail!("vsockbench: ", e),
    };
    let ev = offered & F_EVENT_IDX != 0;
    let p = PAGE as u64;
    let (rx, tx) = match (
        Ring::setup(&t, 0, REGION, ev),
        Ring::setup(&t, 1, REGION + p, ev),
        Ring::setup(&t, 2, REGION + 2 * p, ev),
    ) {
        (Ok(r), Ok(x), Ok(_)) => (r, x),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => fail!("vsockbench: ", e),
    };
    if let Err(e) = t.driver_ok() {
        fail!("vsockbench: ", e);
    }
    tsc_per_us();
    let rx_bufs = REGION + 4 * p;
    let mut b = Bench {
        t,
        rx,
        tx,
        cid: t.config64(0),
        rx_bufs,
        tx_bufs: rx_bufs + MAX_RING as u64 * STRIDE,
        free: [0; MAX_RING as usize],
        nfree: 0,
        end: deadline(TOTAL_US),
        peer: 0,
        peer_buf_alloc: 0,
        peer_fwd_cnt: 0,
        tx_cnt: 0,
        fwd_cnt: 0,
        fwd_sent: 0,
    };
    for i in 0..b.tx.size() {
        b.free[i as usize] = i;
        let a = b.tx_bufs + i as u64 * STRIDE + HDR_LEN as u64;
        // SAFETY: inside the region; no buffer is with the device yet.
        let s = unsafe { core::slice::from_raw_parts_mut(a as *mut u8, CHUNK) };
        for (k, c) in s.iter_mut().enumerate() {
            *c = (k * 7 + k / 251) as u8;
        }
    }
    b.nfree = b.tx.size() as usize;
    for i in 0..b.rx.size() {
        let a = b.rx_bufs + i as u64 * STRIDE;
        b.rx.q.set_desc(i, a, STRIDE as u32, DESC_F_WRITE, 0);
        b.rx.q.push(i);
    }
    b.rx.quiet();
    b.t.notify(0);
    say!("vsockbench: listening");

    // The host's REQUEST to our port.
    while b.peer == 0 {
        b.check_time("waiting for the host's connection");
        b.receive(|b, h, _| {
            if h.op == OP_REQUEST && b.peer == 0 && h.src_port != 0 {
                b.peer = h.src_port;
                b.track(&h);
            }
        });
    }
    b.send(OP_RESPONSE, 0, 0);

    // 1. Host to guest until the host's SHUTDOWN.
    let clock = Clock::start();
    let (mut first, mut last, mut got) = (0u64, 0u64, 0u64);
    let mut done = false;
    while !done {
        b.check_time("receiving");
        let mut reply = 0u16;
        b.receive(|b, h, n| {
            if h.src_port != b.peer {
                return;
            }
            b.track(&h);
            match h.op {
                OP_RW => {
                    last = hw::rdtsc();
                    if got == 0 {
                        first = last;
                    }
                    got += n as u64;
                    b.fwd_cnt = b.fwd_cnt.wrapping_add(n as u32);
                }
                OP_CREDIT_REQUEST => reply = OP_CREDIT_UPDATE,
                OP_SHUTDOWN => done = true,
                OP_RST => fail!("vsockbench: the host reset the connection"),
                _ => {}
            }
        });
        if reply != 0 || b.fwd_cnt.wrapping_sub(b.fwd_sent) >= RCV_BUF / 4 {
            b.send(OP_CREDIT_UPDATE, 0, 0);
        }
        b.reclaim();
    }
    let us = clock.us(first, last).max(1);
    say!("vsockbench: rx ", got, " bytes in ", us, " us");

    // 2. Guest to host.
    let total = mib << 20;
    let mut left = total;
    let clock = Clock::start();
    let t0 = hw::rdtsc();
    let mut asked = 0u64;
    loop {
        b.check_time("sending");
        b.receive(|b, h, _| {
            if h.src_port == b.peer {
                if h.op == OP_RST {
                    fail!("vsockbench: the host reset the connection");
                }
                b.track(&h);
            }
        });
        b.reclaim();
        let in_flight = b.tx_cnt.wrapping_sub(b.peer_fwd_cnt);
        let credit = b.peer_buf_alloc.saturating_sub(in_flight) as u64;
        if left > 0 && credit > 0 && b.nfree > 0 {
            let n = credit.min(CHUNK as u64).min(left) as usize;
            b.send(OP_RW, n, 0);
            b.tx_cnt = b.tx_cnt.wrapping_add(n as u32);
            left -= n as u64;
        } else if left == 0 {
            if in_flight == 0 {
                break;
            }
            // The device reports small remainders only when asked.
            if hw::rdtsc() > asked {
                b.send(OP_CREDIT_REQUEST, 0, 0);
                asked = deadline(10_000);
            }
        }
    }
    let us = clock.us(t0, hw::rdtsc()).max(1);
    say!("vsockbench: tx ", total, " bytes in ", us, " us");

    // 3. Full shutdown; the device answers with a RST.
    b.send(OP_SHUTDOWN, 0, 3);
    let bye = deadline(2_000_000);
    let mut closed = false;
    while !closed && hw::rdtsc() < bye {
        b.receive(|b, h, _| closed |= h.src_port == b.peer && h.op == OP_RST);
        b.reclaim();
    }
}
