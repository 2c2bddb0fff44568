//! `vsock`: the first virtio vsock device. Prints its CID, then (1) listens
//! on port 5000: accepts the host's REQUEST and echoes every RW payload back
//! until the host shuts the connection down; (2) connects to the host (CID 2)
//! port 6000, sends `hello from the guest\n` and prints what the host answers
//! before it shuts down. Everything within ~10 s, or FAIL.

use crate::serial::Hex;
use crate::virtio::vsock::*;
use crate::virtio::{deadline, tsc_per_us};
use crate::{hw, Ctx};

const LISTEN_PORT: u32 = 5000;
const HOST_PORT: u32 = 6000;
const LOCAL_PORT: u32 = 49152;
const TOTAL_US: u64 = 10_000_000;

/// One connection as this guest sees it.
struct Conn {
    local: u32,
    peer: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    fwd_cnt: u32,
}

impl Conn {
    fn hdr(&self, cid: u64, op: u16, flags: u32) -> Hdr {
        Hdr {
            src_cid: cid,
            dst_cid: HOST_CID,
            src_port: self.local,
            dst_port: self.peer,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    fn is(&self, h: &Hdr) -> bool {
        h.src_cid == HOST_CID && h.src_port == self.peer && h.dst_port == self.local
    }

    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

fn send(v: &mut Vsock, h: &Hdr, payload: &[u8]) {
    if !v.send(h, payload) {
        fail!("vsock: sending a packet (op ", h.op, ") timed out");
    }
}

/// RST for a packet nobody here expects (not for a RST).
fn refuse(v: &mut Vsock, h: &Hdr) {
    if h.op == OP_RST {
        return;
    }
    let r = Hdr {
        src_cid: v.cid,
        dst_cid: h.src_cid,
        src_port: h.dst_port,
        dst_port: h.src_port,
        type_: TYPE_STREAM,
        op: OP_RST,
        ..Hdr::default()
    };
    send(v, &r, &[]);
}

pub fn run(ctx: &Ctx, _arg: &[u8]) {
    let Some(base) = Vsock::find(ctx.bp.cmdline()) else {
        fail!("vsock: no virtio vsock device on the command line");
    };
    let mut v = match Vsock::open(base) {
        Ok(v) => v,
        Err(e) => fail!("vsock: vsock device at ", Hex(base, 8), ": ", e),
    };
    say!("vsock: cid ", v.cid);
    tsc_per_us();
    let end = deadline(TOTAL_US);
    let cid = v.cid;

    // (1) Accept the host's connection to port 5000 and echo.
    let mut conn: Option<Conn> = None;
    let mut echoed = 0u64;
    let mut buf = [0u8; MAX_PAYLOAD];
    loop {
        if hw::rdtsc() >= end {
            fail!(
                "vsock: timed out on port 5000 after echoing ",
                echoed,
                " bytes"
            );
        }
        let Some((id, h, p)) = v.poll_rx() else {
            core::hint::spin_loop();
            continue;
        };
        let n = p.len();
        buf[..n].copy_from_slice(p);
        v.repost(id);
        if h.dst_cid != cid || h.type_ != TYPE_STREAM {
            continue;
        }
        let Some(c) = conn.as_mut().filter(|c| c.is(&h)) else {
            if h.op == OP_REQUEST && h.dst_port == LISTEN_PORT && conn.is_none() {
                let c = Conn {
                    local: LISTEN_PORT,
                    peer: h.src_port,
                    peer_buf_alloc: h.buf_alloc,
                    peer_fwd_cnt: h.fwd_cnt,
                    tx_cnt: 0,
                    fwd_cnt: 0,
                };
                send(&mut v, &c.hdr(cid, OP_RESPONSE, 0), &[]);
                conn = Some(c);
            } else {
                refuse(&mut v, &h);
            }
            continue;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            OP_RW => {
                c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                if c.credit() < n as u32 {
                    fail!("vsock: the host gave no credit for ", n, " bytes");
                }
                c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                let out = c.hdr(cid, OP_RW, 0);
                send(&mut v, &out, &buf[..n]);
                echoed += n as u64;
            }
            OP_CREDIT_REQUEST => {
                let out = c.hdr(cid, OP_CREDIT_UPDATE, 0);
                send(&mut v, &out, &[]);
            }
            OP_SHUTDOWN => {
                let out = c.hdr(cid, OP_RST, 0);
                send(&mut v, &out, &[]);
                break;
            }
            OP_RST => break,
            _ => {}
        }
    }
    say!("vsock: echoed ", echoed, " bytes for port 5000");

    // (2) Connect to the host's port 6000.
    let mut c = Conn {
        local: LOCAL_PORT,
        peer: HOST_PORT,
        peer_buf_alloc: 0,
        peer_fwd_cnt: 0,
        tx_cnt: 0,
        fwd_cnt: 0,
    };
    send(&mut v, &c.hdr(cid, OP_REQUEST, 0), &[]);
    let mut reply = [0u8; 256];
    let mut got = 0usize;
    let mut connected = false;
    loop {
        if hw::rdtsc() >= end {
            fail!("vsock: timed out talking to host port 6000");
        }
        let Some((id, h, p)) = v.poll_rx() else {
            core::hint::spin_loop();
            continue;
        };
        let n = p.len();
        buf[..n].copy_from_slice(p);
        v.repost(id);
        if h.dst_cid != cid || !c.is(&h) {
            refuse(&mut v, &h);
            continue;
        }
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            OP_RESPONSE if !connected => {
                connected = true;
                let line = b"hello from the guest\n";
                if c.credit() < line.len() as u32 {
                    fail!("vsock: the host gave no credit for our line");
                }
                c.tx_cnt = c.tx_cnt.wrapping_add(line.len() as u32);
                let out = c.hdr(cid, OP_RW, 0);
                send(&mut v, &out, line);
            }
            OP_RW if connected => {
                let k = n.min(reply.len() - got);
                reply[got..got + k].copy_from_slice(&buf[..k]);
                got += k;
                c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
            }
            OP_CREDIT_REQUEST => {
                let out = c.hdr(cid, OP_CREDIT_UPDATE, 0);
                send(&mut v, &out, &[]);
            }
            OP_SHUTDOWN if connected => {
                let out = c.hdr(cid, OP_RST, 0);
                send(&mut v, &out, &[]);
                break;
            }
            OP_RST => fail!("vsock: the host refused port 6000"),
            _ => {}
        }
    }
    let mut text = &reply[..got];
    while let Some((&last, rest)) = text.split_last() {
        if last == b'\n' || last == b'\r' {
            text = rest;
        } else {
            break;
        }
    }
    say!("vsock: host said ", text);
}
