//! `netgso`: segmentation offloads and mergeable RX buffers on the first virtio net device,
//! both ways. Negotiates VERSION_1, MAC, CSUM, GUEST_CSUM, GUEST_TSO4, GUEST_TSO6, HOST_TSO4,
//! HOST_TSO6, HOST_UFO and MRG_RXBUF (FAIL when one is not offered) and prints `netgso:
//! negotiated csum guest_csum guest_tso4 guest_tso6 host_tso4 host_tso6 host_ufo mrg_rxbuf`. Rings of up to 64 entries, buffers in RAM at 16..40 MiB.
//!
//! 1. RX: posts one 4 KiB buffer per RX ring entry (fewer bytes each than a big frame needs),
//!    prints `netgso: rx ready` and waits (30 s at most) for an IPv4 TCP frame to port
//!    [`GUEST_PORT`], gathering its `num_buffers` buffers (other frames are counted and
//!    ignored). Prints what it saw:
//!    `netgso: rx frame <len> bytes in <n> buffers, all but the last full: <yes|no>`,
//!    `netgso: rx hdr flags <f> gso_type <t> gso_size <s> hdr_len <h> csum_start <a>
//!    csum_offset <b>`, `netgso: rx ipv4 tot_len <l> tcp seq <q> payload <p> bytes
//!    fnv1a64=<hex>`; then the same for an IPv6 TCP frame to that port:
//!    `netgso: rx6 frame <len> bytes in <n> buffers, gso_type <t> gso_size <s> csum_start <a>
//!    payload_len <l> tcp seq <q> payload <p> bytes fnv1a64=<hex>`; and
//!    `netgso: rx ignored <k> other frames`.
//! 2. TX: sends one TCP/IPv4 frame of [`TX_PAYLOAD`] payload bytes (pattern [`pattern`] with
//!    seed [`TX_SEED`]) to 02:00:00:00:00:aa with a header asking for TSO (NEEDS_CSUM,
//!    csum_start 34, csum_offset 16, GSO TCPV4, gso_size [`TX_MSS`], hdr_len 54), the TCP
//!    checksum field holding the pseudo-header sum:
//!    `netgso: tx sent <len> byte frame gso_size <s> payload fnv1a64=<hex>`.
//! 3. TX over IPv6: one TCP/IPv6 frame of [`TX6_PAYLOAD`] payload bytes (seed [`TX6_SEED`])
//!    from fd00::2 to fd00::1, GSO TCPV6 with gso_size [`TX6_MSS`] (csum_start 54, hdr_len 74):
//!    `netgso: tx6 sent <len> byte frame gso_size <s> payload fnv1a64=<hex>`.
//! 4. TX with UFO: one UDP/IPv4 datagram of [`UFO_PAYLOAD`] payload bytes (seed [`UFO_SEED`])
//!    to UDP port [`HOST_PORT`], GSO UDP with gso_size [`UFO_FRAG`] (csum_start 34,
//!    csum_offset 6, the pseudo-header's sum in the checksum field), which the host fragments:
//!    `netgso: ufo sent <len> byte frame gso_size <s> payload fnv1a64=<hex>`.

use super::initrd::fnv1a64;
use super::netbench::{check_region, Ring, REGION};
use crate::serial::Hex;
use crate::virtio::mmio::{Transport, F_VERSION_1};
use crate::virtio::net::{
    Net, F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_HOST_TSO4, F_HOST_TSO6, F_HOST_UFO, F_MAC,
    F_MRG_RXBUF, HDR_LEN,
};
use crate::virtio::queue::{DESC_F_WRITE, PAGE};
use crate::virtio::{deadline, tsc_per_us};
use crate::{hw, Ctx};

const HDR_F_NEEDS_CSUM: u8 = 1;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP: u8 = 3;

/// One RX buffer.
const RX_BUF: usize = 4096;
/// The TCP port the host sends to, and the guest's source port on TX.
pub const GUEST_PORT: u16 = 40000;
/// The host's TCP port.
pub const HOST_PORT: u16 = 5001;
pub const TX_PAYLOAD: usize = 40000;
pub const TX_MSS: u16 = 1448;
pub const TX_SEED: u8 = 0x5a;
pub const TX6_PAYLOAD: usize = 30000;
/// A 1500-byte MTU less the IPv6 and TCP headers.
pub const TX6_MSS: u16 = 1440;
pub const TX6_SEED: u8 = 0xa6;
const GUEST_IP6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const HOST_IP6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const UFO_PAYLOAD: usize = 20000;
/// IP fragment payload: a 1500-byte MTU less the IPv4 header.
pub const UFO_FRAG: u16 = 1480;
pub const UFO_SEED: u8 = 0x3c;
/// Ethernet + IPv6 + TCP headers, none with options or extensions.
const HDRS6: usize = 14 + 40 + 20;
const GUEST_IP: [u8; 4] = [10, 0, 0, 2];
const HOST_IP: [u8; 4] = [10, 0, 0, 1];
const HOST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xaa];
/// Ethernet + IPv4 + TCP headers, none with options.
const HDRS: usize = 14 + 20 + 20;

const RX_WAIT_US: u64 = 30_000_000;
const PART_WAIT_US: u64 = 5_000_000;

/// Byte `k` of a test payload (the host test computes the same).
pub fn pattern(k: usize, seed: u8) -> u8 {
    ((k as u32).wrapping_mul(2_654_435_761).rotate_right(13) as u8) ^ seed
}

/// The 16-bit one's complement sum of `b` added to `sum` (not folded).
fn sum16(mut sum: u32, b: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < b.len() {
        sum += u16::from_be_bytes([b[i], b[i + 1]]) as u32;
        i += 2;
    }
    if i < b.len() {
        sum += (b[i] as u32) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// The next used RX element within `us` microseconds, else FAIL with `what`.
fn next_used(rx: &mut Ring, us: u64, what: &str) -> (u16, usize) {
    let end = deadline(us);
    loop {
        if let Some((id, len)) = rx.q.poll() {
            return ((id % rx.size() as u32) as u16, (len as usize).min(RX_BUF));
        }
        if hw::rdtsc() > end {
            fail!("netgso: ", what);
        }
        core::hint::spin_loop();
    }
}

/// Gathers frames over their `num_buffers` RX buffers into `asm` until one satisfies `mine`
/// (the others are counted in `ignored`), recycling the buffers; its length (header
/// included), its buffer count and whether every buffer but the last was full.
fn gather(
    rx: &mut Ring,
    t: &Transport,
    rx_bufs: u64,
    asm: &mut [u8],
    mine: &dyn Fn(&[u8]) -> bool,
    ignored: &mut u32,
) -> (usize, usize, bool) {
    let buf = |id: u16| rx_bufs + id as u64 * RX_BUF as u64;
    loop {
        let (id, n) = next_used(rx, RX_WAIT_US, "no TCP frame for the guest within 30 s");
        // SAFETY: buffer `id` is in the region and the device is done with it.
        let first = unsafe { core::slice::from_raw_parts(buf(id) as *const u8, n) };
        if n < HDR_LEN {
            fail!(
                "netgso: an RX buffer of ",
                n,
                " bytes, shorter than the header"
            );
        }
        let nb = le16(first, 10) as usize;
        if nb == 0 || nb > rx.size() as usize {
            fail!("netgso: num_buffers ", nb, " with a ring of ", rx.size());
        }
        asm[..n].copy_from_slice(first);
        let mut len = n;
        let mut all_full = true;
        let mut ids = [0u16; 64];
        ids[0] = id;
        for slot in ids.iter_mut().take(nb).skip(1) {
            all_full &= len % RX_BUF == 0;
            let (id, n) = next_used(rx, PART_WAIT_US, "a frame's next buffer never came");
            if len + n > asm.len() {
                fail!("netgso: a frame larger than ", asm.len(), " bytes");
            }
            // SAFETY: as above.
            let part = unsafe { core::slice::from_raw_parts(buf(id) as *const u8, n) };
            asm[len..len + n].copy_from_slice(part);
            len += n;
            *slot = id;
        }
        for &id in ids.iter().take(nb) {
            rx.q.push(id);
        }
        t.notify(0);
        if mine(&asm[HDR_LEN..len]) {
            return (len, nb, all_full);
        }
        *ignored += 1;
    }
}

pub fn run(ctx: &Ctx, _arg: &[u8]) {
    check_region(ctx, "netgso");
    let Some(base) = Net::find(ctx.bp.cmdline()) else {
        fail!("netgso: no virtio net device on the command line");
    };
    let t = Transport::new(base);
    let want =
        F_MAC | F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_HOST_TSO4 | F_HOST_TSO6
            | F_HOST_UFO | F_MRG_RXBUF;
    let offered = match t.begin(F_VERSION_1 | want) {
        Ok(f) => f,
        Err(e) => fail!("netgso: ", e),
    };
    if offered & want != want {
        fail!(
            "netgso: features missing from the offer: ",
            Hex(want & !offered, 8)
        );
    }
    let (mut rx, mut tx) = match (
        Ring::setup(&t, 0, REGION, false),
        Ring::setup(&t, 1, REGION + PAGE as u64, false),
    ) {
        (Ok(r), Ok(x)) => (r, x),
        (Err(e), _) | (_, Err(e)) => fail!("netgso: ", e),
    };
    if let Err(e) = t.driver_ok() {
        fail!("netgso: ", e);
    }
    say!(
        "netgso: negotiated csum guest_csum guest_tso4 guest_tso6 host_tso4 host_tso6 host_ufo \
         mrg_rxbuf"
    );
    let mut mac = [0u8; 6];
    for (i, b) in mac.iter_mut().enumerate() {
        *b = t.config8(i as u64);
    }
    tsc_per_us();

    // Buffers: RX at +64 KiB (64 x 4 KiB), the reassembled frame at +1 MiB, TX at +2 MiB.
    let rx_bufs = REGION + (64 << 10);
    let whole = REGION + (1 << 20);
    let tx_buf = REGION + (2 << 20);
    let buf = |id: u16| rx_bufs + id as u64 * RX_BUF as u64;
    for i in 0..rx.size() {
        rx.q.set_desc(i, buf(i), RX_BUF as u32, DESC_F_WRITE, 0);
        rx.q.push(i);
    }
    t.notify(0);
    say!("netgso: rx ready");

    // SAFETY: inside the region checked above, used by nothing else; the device never
    // writes there (no descriptor points at it).
    let asm = unsafe { core::slice::from_raw_parts_mut(whole as *mut u8, 256 << 10) };
    let mut ignored = 0u32;
    let is_mine4 = |f: &[u8]| {
        f.len() >= HDRS
            && f[12..14] == [0x08, 0x00]
            && f[14] == 0x45
            && f[23] == 6
            && be16(f, 36) == GUEST_PORT
    };
    let (len, nbufs, all_full) = gather(&mut rx, &t, rx_bufs, asm, &is_mine4, &mut ignored);
    let h = &asm[..HDR_LEN];
    let f = &asm[HDR_LEN..len];
    say!(
        "netgso: rx frame ",
        f.len(),
        " bytes in ",
        nbufs,
        " buffers, all but the last full: ",
        if all_full { "yes" } else { "no" }
    );
    say!(
        "netgso: rx hdr flags ",
        h[0],
        " gso_type ",
        h[1],
        " gso_size ",
        le16(h, 4),
        " hdr_len ",
        le16(h, 2),
        " csum_start ",
        le16(h, 6),
        " csum_offset ",
        le16(h, 8)
    );
    let seq = u32::from_be_bytes([f[38], f[39], f[40], f[41]]);
    let payload = &f[HDRS..];
    say!(
        "netgso: rx ipv4 tot_len ",
        be16(f, 16),
        " tcp seq ",
        seq,
        " payload ",
        payload.len(),
        " bytes fnv1a64=",
        Hex(fnv1a64(payload), 16)
    );

    // The same over IPv6 (GUEST_TSO6).
    let is_mine6 = |f: &[u8]| {
        f.len() >= HDRS6
            && f[12..14] == [0x86, 0xdd]
            && f[14] >> 4 == 6
            && f[20] == 6
            && be16(f, 56) == GUEST_PORT
    };
    let (len, nbufs, _) = gather(&mut rx, &t, rx_bufs, asm, &is_mine6, &mut ignored);
    let h = &asm[..HDR_LEN];
    let f = &asm[HDR_LEN..len];
    let payload = &f[HDRS6..];
    say!(
        "netgso: rx6 frame ",
        f.len(),
        " bytes in ",
        nbufs,
        " buffers, gso_type ",
        h[1],
        " gso_size ",
        le16(h, 4),
        " csum_start ",
        le16(h, 6),
        " payload_len ",
        be16(f, 18),
        " tcp seq ",
        u32::from_be_bytes([f[58], f[59], f[60], f[61]]),
        " payload ",
        payload.len(),
        " bytes fnv1a64=",
        Hex(fnv1a64(payload), 16)
    );
    say!("netgso: rx ignored ", ignored, " other frames");

    // TX: TSO over IPv4 and IPv6, then UFO, one frame after the other in the same buffer.
    let tx_frames = [
        TxFrame {
            name: "tx",
            ipv6: false,
            udp: false,
            gso_type: GSO_TCPV4,
            gso_size: TX_MSS,
            seq: 0x1000_0000,
            payload: TX_PAYLOAD,
            seed: TX_SEED,
        },
        TxFrame {
            name: "tx6",
            ipv6: true,
            udp: false,
            gso_type: GSO_TCPV6,
            gso_size: TX6_MSS,
            seq: 0x2000_0000,
            payload: TX6_PAYLOAD,
            seed: TX6_SEED,
        },
        TxFrame {
            name: "ufo",
            ipv6: false,
            udp: true,
            gso_type: GSO_UDP,
            gso_size: UFO_FRAG,
            seq: 0,
            payload: UFO_PAYLOAD,
            seed: UFO_SEED,
        },
    ];
    for frame in &tx_frames {
        send_offloaded(&mut tx, &t, tx_buf, &mac, frame);
    }
}

/// A frame the guest sends asking the device for an offload.
struct TxFrame {
    /// In the report: `netgso: <name> sent ...`.
    name: &'static str,
    ipv6: bool,
    /// UDP rather than TCP.
    udp: bool,
    gso_type: u8,
    gso_size: u16,
    /// The TCP sequence number.
    seq: u32,
    payload: usize,
    seed: u8,
}

/// Builds `fr` at `tx_buf` (virtio_net_hdr asking for NEEDS_CSUM and GSO, the checksum field
/// holding the pseudo-header's sum over the whole length, which the device or the host
/// finishes per segment), sends it, waits until the device used it, and reports
/// `netgso: <name> sent <len> byte frame gso_size <s> payload fnv1a64=<hex>`.
fn send_offloaded(tx: &mut Ring, t: &Transport, tx_buf: u64, mac: &[u8; 6], fr: &TxFrame) {
    let l3 = if fr.ipv6 { 40 } else { 20 };
    let l4 = if fr.udp { 8 } else { 20 };
    let hdrs = 14 + l3 + l4;
    let l4_len = l4 + fr.payload;
    let total = HDR_LEN + hdrs + fr.payload;
    // SAFETY: inside the region; the device has used any earlier frame in this buffer.
    let b = unsafe { core::slice::from_raw_parts_mut(tx_buf as *mut u8, total) };
    b.fill(0);
    b[0] = HDR_F_NEEDS_CSUM;
    b[1] = fr.gso_type;
    b[2..4].copy_from_slice(&(hdrs as u16).to_le_bytes());
    b[4..6].copy_from_slice(&fr.gso_size.to_le_bytes());
    b[6..8].copy_from_slice(&((14 + l3) as u16).to_le_bytes());
    let csum_offset: u16 = if fr.udp { 6 } else { 16 };
    b[8..10].copy_from_slice(&csum_offset.to_le_bytes());
    let f = &mut b[HDR_LEN..];
    f[..6].copy_from_slice(&HOST_MAC);
    f[6..12].copy_from_slice(mac);
    let proto: u8 = if fr.udp { 17 } else { 6 };
    // The addresses' part of the pseudo-header's sum.
    let addrs = if fr.ipv6 {
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        let ip = &mut f[14..54];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        ip[6] = proto;
        ip[7] = 64;
        ip[8..24].copy_from_slice(&GUEST_IP6);
        ip[24..40].copy_from_slice(&HOST_IP6);
        sum16(sum16(0, &GUEST_IP6), &HOST_IP6)
    } else {
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        if !fr.udp {
            ip[6] = 0x40; // DF; UFO's datagram is to be fragmented
        }
        ip[8] = 64;
        ip[9] = proto;
        ip[12..16].copy_from_slice(&GUEST_IP);
        ip[16..20].copy_from_slice(&HOST_IP);
        let c = !fold(sum16(0, ip));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        sum16(sum16(0, &GUEST_IP), &HOST_IP)
    };
    let l4h = &mut f[14 + l3..hdrs];
    l4h[0..2].copy_from_slice(&GUEST_PORT.to_be_bytes());
    l4h[2..4].copy_from_slice(&HOST_PORT.to_be_bytes());
    if fr.udp {
        l4h[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    } else {
        l4h[4..8].copy_from_slice(&fr.seq.to_be_bytes());
        l4h[12] = 5 << 4;
        l4h[13] = 0x18; // PSH, ACK
        l4h[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    }
    let pseudo = fold(addrs + proto as u32 + l4_len as u32);
    let at = usize::from(csum_offset);
    l4h[at..at + 2].copy_from_slice(&pseudo.to_be_bytes());
    for (k, c) in f[hdrs..].iter_mut().enumerate() {
        *c = pattern(k, fr.seed);
    }
    let h = fnv1a64(&f[hdrs..]);
    tx.q.set_desc(0, tx_buf, total as u32, 0, 0);
    tx.q.push(0);
    t.notify(1);
    let end = deadline(PART_WAIT_US);
    while tx.q.poll().is_none() {
        if hw::rdtsc() > end {
            fail!("netgso: the ", fr.name, " frame was not used within 5 s");
        }
        core::hint::spin_loop();
    }
    say!(
        "netgso: ",
        fr.name,
        " sent ",
        total - HDR_LEN,
        " byte frame gso_size ",
        fr.gso_size,
        " payload fnv1a64=",
        Hex(h, 16)
    );
}
