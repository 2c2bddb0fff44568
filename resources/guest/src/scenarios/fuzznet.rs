//! `fuzznet=<seed>`: 2000 frames with random `virtio_net_hdr`s through the
//! first net device. Every 250 frames the device is set up again with a
//! random set of offloads (checksum, TSO4/6, UFO both ways, mergeable RX
//! buffers). Each frame gets a header whose flags, GSO type (TCPv4, UDP,
//! TCPv6, ECN, any), `hdr_len`, `gso_size`, `csum_start` and `csum_offset`
//! are drawn near and far from plausible values, and a body of 0 to 64 KiB
//! (an Ethernet header with an IPv4, IPv6 or other EtherType, then bytes)
//! split over one to three descriptors. Every chain must come back within
//! 5 s; what the host's TAP makes of the frame is the kernel's business.
//! Received frames are taken and their buffers given back. Prints
//! `fuzznet: <n> frames, <m> received, seed <s>`, then `fuzznet: survived`.

use crate::rand::XorShift;
use crate::virtio::net::*;
use crate::virtio::queue::DESC_F_NEXT;
use crate::virtio::Dma;
use crate::Ctx;

const FRAMES: u32 = 2000;
const BODY_MAX: usize = 65536;
static BODY: Dma<{ BODY_MAX + HDR_LEN }> = Dma::new();

fn put(off: usize, b: &[u8]) {
    let end = (off + b.len()).min(BODY.len());
    if off < end {
        // SAFETY: inside BODY; no TX chain is in flight while this scenario writes it.
        unsafe {
            core::ptr::copy_nonoverlapping(b.as_ptr(), (BODY.addr() + off as u64) as *mut u8, end - off)
        }
    }
}

/// A header and body in BODY; returns the body's length.
fn frame(r: &mut XorShift, mac: [u8; 6]) -> usize {
    let len = match r.below(4) {
        0 => r.below(64) as usize,
        1 => r.below(1515) as usize,
        _ => r.below(BODY_MAX as u64 + 1) as usize,
    };
    let any = r.next();
    let l4 = r.pick(&[14u16 + 20, 14 + 40, 14 + 24, any as u16]);
    let flags = r.pick(&[0u8, 1, 2, 3, any as u8]);
    let gso = r.pick(&[0u8, 1, 3, 4, 0x81, 0x84, (any >> 8) as u8]);
    let hdr_len = r.pick(&[0u16, l4 + 20, l4 + 8, 54, (any >> 16) as u16]);
    let gso_size = r.pick(&[0u16, 1, 536, 1448, 1500, 65535, (any >> 32) as u16]);
    let csum_start = r.pick(&[0u16, l4, 34, 54, len as u16, (any >> 48) as u16]);
    let csum_offset = r.pick(&[0u16, 6, 16, 0xffff, (any >> 40) as u16]);
    let mut h = [0u8; HDR_LEN];
    h[0] = flags;
    h[1] = gso;
    h[2..4].copy_from_slice(&hdr_len.to_le_bytes());
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&csum_start.to_le_bytes());
    h[8..10].copy_from_slice(&csum_offset.to_le_bytes());
    put(0, &h);
    // Ethernet: broadcast or random destination, our MAC, an EtherType, then IP-ish bytes.
    let mut eth = [0u8; 14];
    if r.below(2) == 0 {
        eth[..6].copy_from_slice(&[0xff; 6]);
    } else {
        eth[..6].copy_from_slice(&r.next().to_le_bytes()[..6]);
    }
    eth[6..12].copy_from_slice(&mac);
    let ethertype = r.pick(&[0x0800u16, 0x86dd, 0x88b5, any as u16]);
    eth[12..14].copy_from_slice(&ethertype.to_be_bytes());
    put(HDR_LEN, &eth);
    let mut ip = [0u8; 60];
    for chunk in ip.chunks_mut(8) {
        chunk.copy_from_slice(&r.next().to_le_bytes()[..chunk.len()]);
    }
    if ethertype == 0x0800 {
        ip[0] = 0x45;
        ip[9] = r.pick(&[6, 17, ip[9]]);
    } else if ethertype == 0x86dd {
        ip[0] = 0x60;
        ip[6] = r.pick(&[6, 17, ip[6]]);
    }
    put(HDR_LEN + 14, &ip);
    len
}

pub fn run(ctx: &Ctx, arg: &[u8]) {
    let seed = crate::scenarios::parse_dec(arg).unwrap_or(1);
    let mut r = XorShift::new(seed);
    let Some(base) = Net::find(ctx.bp.cmdline()) else {
        fail!("fuzznet: no virtio net device on the command line");
    };
    let all = F_CSUM
        | F_GUEST_CSUM
        | F_GUEST_TSO4
        | F_GUEST_TSO6
        | F_GUEST_UFO
        | F_HOST_TSO4
        | F_HOST_TSO6
        | F_HOST_UFO
        | F_MRG_RXBUF;
    let mut received = 0u64;
    let mut net: Option<Net> = None;
    for i in 0..FRAMES {
        if i % 250 == 0 {
            net = match Net::open_with(base, F_MAC | (all & r.next())) {
                Ok(n) => Some(n),
                Err(e) => fail!("fuzznet: ", e),
            };
        }
        let Some(n) = net.as_mut() else {
            fail!("fuzznet: no device");
        };
        let mac = n.mac.unwrap_or([2, 0, 0, 0, 0, 1]);
        let len = frame(&mut r, mac);
        // The header alone, or with the body's start; the body in one to three pieces.
        let mut at = 0usize;
        let mut d = 0u16;
        let head = if r.below(4) == 0 {
            HDR_LEN + (r.below(len as u64 + 1) as usize).min(64)
        } else {
            HDR_LEN
        };
        let total = HDR_LEN + len;
        let mut cuts = [head, total, total];
        if r.below(2) == 0 {
            cuts[1] = head + r.below((total - head) as u64 + 1) as usize;
        }
        for &end in &cuts {
            if end <= at && !(at == 0 && end == 0) {
                continue;
            }
            let last = end == total;
            n.tx.set_desc(
                d,
                BODY.addr() + at as u64,
                (end - at) as u32,
                if last { 0 } else { DESC_F_NEXT },
                d + 1,
            );
            d += 1;
            at = end;
            if last {
                break;
            }
        }
        n.tx.push(0);
        n.t.notify(1);
        if n.tx.wait(TIMEOUT_US).is_none() {
            fail!("fuzznet: frame ", i as u64, " (", len as u64, " bytes) never came back");
        }
        n.t.ack_interrupts();
        while let Some((id, _)) = n.poll_rx() {
            received += 1;
            n.repost(id);
        }
    }
    say!("fuzznet: ", FRAMES, " frames, ", received, " received, seed ", seed);
    if let Some(n) = net {
        n.t.reset();
    }
    say!("fuzznet: survived");
}
