//! `evilnet` and `evilvsock`: the `evil` driver against the first virtio net
//! device (RX queue 0, TX queue 1) and the first vsock device (RX 0, TX 1,
//! event 2). On every queue each case breaks one rule on a freshly set-up
//! device (rings zeroed, no other buffer posted), waits at most ~200 ms for
//! the used ring and prints `<who>: <queue> <case>: completed, len <n>` (or
//! `no completion`), whether the device wrote the case's buffers
//! (`buffers untouched` / `buffers WRITTEN`) and the device status, then
//! `<who>: <queue> <case> survived`. Then the transport cases (a notify
//! before DRIVER_OK, queue size 3, config space out of range), and at last a
//! well-behaved exchange with the real driver:
//! - net: sends a frame whose payload starts `ember-evil well-behaved`, then
//!   waits (5 s) for any 0x88b5 frame from the host:
//!   `evilnet: well-behaved tx ok`, `evilnet: well-behaved rx ok`;
//! - vsock: connects to host port 6000, sends `hello from the evil guest\n`
//!   and prints the line the host sends back:
//!   `evilvsock: well-behaved echo <line>`.
//!
//! Malformed TX chains carry something the host would notice if the device
//! took them: a net frame with payload `ember-evil-bad`, a vsock REQUEST to
//! host port 6001.

use super::initrd::fnv1a64;
use crate::serial::Hex;
use crate::virtio::mmio::{self, Transport, S_ACKNOWLEDGE, S_DRIVER, S_DRIVER_OK, S_FEATURES_OK};
use crate::virtio::net::{self as vnet, Net};
use crate::virtio::queue::{Queue, DESC_F_NEXT, DESC_F_WRITE, PAGE};
use crate::virtio::vsock::{self as vvs, Hdr, Vsock};
use crate::virtio::{deadline, tsc_per_us, Dma};
use crate::{hw, Ctx};

/// How long a case waits for the used ring (the host injects a frame every
/// ~10 ms, so a net RX chain is looked at well within it).
const CASE_US: u64 = 200_000;
/// Outside any guest RAM this guest is given (64 GiB - 4 KiB).
const BAD_ADDR: u64 = 0x10_0000_0000 - 0x1000;
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const DEFAULT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
/// Bytes after the header in the cases' two-descriptor chains.
const BODY: u32 = 64;

/// Ring pages of up to three queues.
static QMEM: Dma<{ 3 * PAGE }> = Dma::new();
/// The cases' buffers.
static BUF: Dma<{ 2 * PAGE }> = Dma::new();

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Net,
    Vsock,
}

struct Dev {
    who: &'static str,
    kind: Kind,
    t: Transport,
    nq: usize,
    /// The device's header length (virtio_net_hdr_v1 or virtio_vsock_hdr).
    hlen: u32,
    mac: [u8; 6],
    cid: u64,
}

/// A queue of the case under way: index, name, whether the device writes its buffers.
#[derive(Clone, Copy)]
struct Q {
    index: usize,
    name: &'static str,
    writable: bool,
}

fn qmem(i: usize) -> u64 {
    QMEM.addr() + (i * PAGE) as u64
}

fn buf_bytes() -> &'static mut [u8] {
    // SAFETY: inside BUF; no request of this scenario is in flight when it is used.
    unsafe { core::slice::from_raw_parts_mut(BUF.addr() as *mut u8, BUF.len()) }
}

impl Dev {
    /// Reset, negotiation (VERSION_1 only), every queue set up on zeroed rings, DRIVER_OK.
    fn setup(&self) -> [Queue; 3] {
        if let Err(e) = self.t.begin(mmio::F_VERSION_1) {
            fail!(self.who, ": re-initialisation failed: ", e);
        }
        let qs: [Queue; 3] = core::array::from_fn(|i| {
            let size = if i < self.nq {
                self.t.queue_size(i as u32)
            } else {
                1
            };
            Queue::new(qmem(i), size.max(1))
        });
        for (i, q) in qs.iter().enumerate().take(self.nq) {
            if let Err(e) = self.t.setup_queue(i as u32, q) {
                fail!(self.who, ": queue ", i, ": ", e);
            }
        }
        if let Err(e) = self.t.driver_ok() {
            fail!(self.who, ": ", e);
        }
        qs
    }

    /// Fills BUF with a canary and, for a queue the device reads, a packet the
    /// host would notice; returns BUF's checksum.
    fn fill(&self, q: Q) -> u64 {
        let b = buf_bytes();
        b.fill(0x5a);
        if !q.writable {
            let h = self.hlen as usize;
            b[..h].fill(0);
            match self.kind {
                Kind::Net => {
                    let f = &mut b[h..h + BODY as usize];
                    f[..6].fill(0xff);
                    f[6..12].copy_from_slice(&self.mac);
                    f[12..14].copy_from_slice(&ETHERTYPE);
                    f[14..28].copy_from_slice(b"ember-evil-bad");
                }
                Kind::Vsock => Hdr {
                    src_cid: self.cid,
                    dst_cid: vvs::HOST_CID,
                    src_port: 40000,
                    dst_port: 6001,
                    type_: vvs::TYPE_STREAM,
                    op: vvs::OP_REQUEST,
                    buf_alloc: vvs::BUF_ALLOC,
                    ..Hdr::default()
                }
                .write(&mut b[..h]),
            }
        }
        fnv1a64(b)
    }

    /// Header descriptor `i` -> body descriptor `i + 1` (which says `next`).
    fn two(&self, q: &Queue, flags: u16, next_flags: u16, next: u16) {
        let a = BUF.addr();
        q.set_desc(0, a, self.hlen, flags | DESC_F_NEXT, 1);
        q.set_desc(1, a + self.hlen as u64, BODY, flags | next_flags, next);
    }

    /// Notifies queue `q`, waits for its used ring and reports.
    fn finish(&self, qs: &mut [Queue; 3], q: Q, case: &str, sum: u64) {
        self.t.notify(q.index as u32);
        let done = qs[q.index].wait(CASE_US);
        self.t.ack_interrupts();
        let touched = fnv1a64(buf_bytes()) != sum;
        let st = Hex(self.t.status() as u64, 2);
        let buffers = if touched {
            "buffers WRITTEN"
        } else {
            "buffers untouched"
        };
        match done {
            Some((_, len)) => say!(
                self.who,
                ": ",
                q.name,
                " ",
                case,
                ": completed, len ",
                len,
                ", ",
                buffers,
                ", device status 0x",
                st
            ),
            None => say!(
                self.who,
                ": ",
                q.name,
                " ",
                case,
                ": no completion, ",
                buffers,
                ", device status 0x",
                st
            ),
        }
        say!(self.who, ": ", q.name, " ", case, " survived");
    }

    /// Every chain-level case on queue `q`.
    fn attack_queue(&self, q: Q) {
        let f = if q.writable { DESC_F_WRITE } else { 0 };
        let wrong = if q.writable { 0 } else { DESC_F_WRITE };
        let a = BUF.addr();

        // The body descriptor lies outside guest memory.
        let mut qs = self.setup();
        let sum = self.fill(q);
        qs[q.index].set_desc(0, a, self.hlen, f | DESC_F_NEXT, 1);
        qs[q.index].set_desc(1, BAD_ADDR, BODY, f, 0);
        qs[q.index].push(0);
        self.finish(&mut qs, q, "bad address", sum);

        // Header -> body -> header.
        let mut qs = self.setup();
        let sum = self.fill(q);
        self.two(&qs[q.index], f, DESC_F_NEXT, 0);
        qs[q.index].push(0);
        self.finish(&mut qs, q, "looping chain", sum);

        // 0 -> 1 -> ... -> size-1 -> size: past the table.
        let mut qs = self.setup();
        let sum = self.fill(q);
        let size = qs[q.index].size;
        for i in 0..size {
            qs[q.index].set_desc(i, a + 16 * i as u64, 16, f | DESC_F_NEXT, i + 1);
        }
        qs[q.index].set_desc(size, a, 16, f, 0);
        qs[q.index].push(0);
        self.finish(&mut qs, q, "overlong chain", sum);

        // A single zero-length descriptor.
        let mut qs = self.setup();
        let sum = self.fill(q);
        qs[q.index].set_desc(0, a, 0, f, 0);
        qs[q.index].push(0);
        self.finish(&mut qs, q, "zero length", sum);

        // Device-writable where the device must read, and the reverse.
        let mut qs = self.setup();
        let sum = self.fill(q);
        self.two(&qs[q.index], wrong, 0, 0);
        qs[q.index].push(0);
        self.finish(&mut qs, q, "wrong direction", sum);

        // A head index beyond the queue (its slot holds a sound chain).
        let mut qs = self.setup();
        let sum = self.fill(q);
        let head = qs[q.index].size + 3;
        qs[q.index].set_desc(head, a, self.hlen + BODY, f, 0);
        qs[q.index].push(head);
        self.finish(&mut qs, q, "head beyond the queue", sum);

        // avail.idx far beyond the queue size (every slot names a sound chain).
        let mut qs = self.setup();
        let sum = self.fill(q);
        let qq = &mut qs[q.index];
        qq.set_desc(0, a, self.hlen + BODY, f, 0);
        for slot in 0..qq.size {
            qq.put_avail(slot, 0);
        }
        qq.set_avail_idx(qq.next_avail.wrapping_add(1000));
        self.finish(&mut qs, q, "avail index jump", sum);
    }

    /// The transport-level cases.
    fn attack_transport(&self, tx: Q) {
        // QueueNotify on a freshly reset device, then on configured queues
        // before DRIVER_OK (TX holds a packet the host would notice).
        let t = self.t;
        t.reset();
        for i in 0..self.nq as u32 {
            t.notify(i);
        }
        t.notify(7);
        let mut sent = false;
        if t.begin(mmio::F_VERSION_1).is_ok() {
            let mut qs: [Queue; 3] = core::array::from_fn(|i| Queue::new(qmem(i), 16));
            let ok = (0..self.nq).all(|i| t.setup_queue(i as u32, &qs[i]).is_ok());
            if ok {
                self.fill(tx);
                self.two(&qs[tx.index], 0, 0, 0);
                qs[tx.index].push(0);
                for i in 0..self.nq as u32 {
                    t.notify(i);
                }
                sent = qs[tx.index].wait(CASE_US).is_some();
            }
        }
        say!(
            self.who,
            ": notify before DRIVER_OK: ",
            if sent { "completed" } else { "no completion" },
            ", device status 0x",
            Hex(t.status() as u64, 2)
        );
        say!(self.who, ": notify before DRIVER_OK survived");

        // QueueNum 3: not a power of two.
        t.reset();
        let mut ready = 0xffff_ffff;
        if t.begin(mmio::F_VERSION_1).is_ok() {
            let q = Queue::new(qmem(0), 3);
            t.program_queue(0, 3, &q);
            t.write(mmio::QUEUE_READY, 1);
            ready = t.read(mmio::QUEUE_READY);
            t.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
            t.notify(0);
        }
        say!(
            self.who,
            ": queue size 3: QueueReady=",
            ready,
            ", device status 0x",
            Hex(t.status() as u64, 2)
        );
        say!(self.who, ": queue size 3 survived");

        // Config space accesses past the end (inside the 4 KiB window) and a
        // write to a read-only field.
        self.setup();
        let r1 = t.read(mmio::CONFIG + 0x800);
        t.write(mmio::CONFIG + 0x800, 0xdead_beef);
        let r2 = t.read(mmio::CONFIG + 0x800);
        t.write(mmio::CONFIG, 0x1234_5678);
        let first = t.config64(0);
        say!(
            self.who,
            ": config out of range: read 0x",
            Hex(r1 as u64, 8),
            ", after write 0x",
            Hex(r2 as u64, 8),
            ", first field 0x",
            Hex(first, 16)
        );
        say!(self.who, ": config out of range survived");
    }

    fn attack(&self, queues: &[Q], tx: Q) {
        for &q in queues {
            self.attack_queue(q);
        }
        self.attack_transport(tx);
        self.t.reset();
    }
}

const RX: Q = Q {
    index: 0,
    name: "rx",
    writable: true,
};
const TX: Q = Q {
    index: 1,
    name: "tx",
    writable: false,
};
const EVENT: Q = Q {
    index: 2,
    name: "event",
    writable: true,
};

pub fn net(ctx: &Ctx, _arg: &[u8]) {
    let Some(base) = Net::find(ctx.bp.cmdline()) else {
        fail!("evilnet: no virtio net device on the command line");
    };
    let n = match Net::open(base) {
        Ok(n) => n,
        Err(e) => fail!("evilnet: net device at ", Hex(base, 8), ": ", e),
    };
    let mac = n.mac.unwrap_or(DEFAULT_MAC);
    tsc_per_us();
    let d = Dev {
        who: "evilnet",
        kind: Kind::Net,
        t: n.t,
        nq: 2,
        hlen: vnet::HDR_LEN as u32,
        mac,
        cid: 0,
    };
    d.attack(&[TX, RX], TX);

    // And the device still works.
    let mut n = match Net::open(base) {
        Ok(n) => n,
        Err(e) => fail!("evilnet: re-opening the device: ", e),
    };
    let mut frame = [0u8; 14 + 64];
    frame[..6].fill(0xff);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&ETHERTYPE);
    frame[14..37].copy_from_slice(b"ember-evil well-behaved");
    if !n.send(&frame) {
        fail!("evilnet: the well-behaved frame timed out");
    }
    say!("evilnet: well-behaved tx ok");
    let end = deadline(vnet::TIMEOUT_US);
    loop {
        if hw::rdtsc() >= end {
            fail!("evilnet: no frame from the host after the attacks");
        }
        let Some((id, f)) = n.poll_rx() else {
            core::hint::spin_loop();
            continue;
        };
        let mine = f.len() >= 14 && f[12..14] == ETHERTYPE;
        n.repost(id);
        if mine {
            break;
        }
    }
    say!("evilnet: well-behaved rx ok");
    n.t.reset();
}

pub fn vsock(ctx: &Ctx, _arg: &[u8]) {
    let Some(base) = Vsock::find(ctx.bp.cmdline()) else {
        fail!("evilvsock: no virtio vsock device on the command line");
    };
    let t = Transport::new(base);
    let cid = if t.begin(mmio::F_VERSION_1).is_ok() {
        t.config64(0)
    } else {
        fail!("evilvsock: the device does not initialise");
    };
    tsc_per_us();
    let d = Dev {
        who: "evilvsock",
        kind: Kind::Vsock,
        t,
        nq: 3,
        hlen: vvs::HDR_LEN as u32,
        mac: [0; 6],
        cid,
    };
    d.attack(&[TX, RX, EVENT], TX);

    let mut v = match Vsock::open(base) {
        Ok(v) => v,
        Err(e) => fail!("evilvsock: re-opening the device: ", e),
    };
    let mut line = [0u8; 64];
    let n = echo(&mut v, &mut line);
    let mut text = &line[..n];
    while let Some((&(b'\n' | b'\r'), rest)) = text.split_last() {
        text = rest;
    }
    say!("evilvsock: well-behaved echo ", text);
    v.t.reset();
}

/// Connects to host port 6000, sends a line, returns what came back (up to
/// its newline) in `reply`.
fn echo(v: &mut Vsock, reply: &mut [u8]) -> usize {
    const LOCAL: u32 = 49200;
    const PORT: u32 = 6000;
    let cid = v.cid;
    let hdr = |op: u16, flags: u32, fwd_cnt: u32| Hdr {
        src_cid: cid,
        dst_cid: vvs::HOST_CID,
        src_port: LOCAL,
        dst_port: PORT,
        type_: vvs::TYPE_STREAM,
        op,
        flags,
        buf_alloc: vvs::BUF_ALLOC,
        fwd_cnt,
        ..Hdr::default()
    };
    let send = |v: &mut Vsock, h: &Hdr, p: &[u8]| {
        if !v.send(h, p) {
            fail!("evilvsock: sending a packet (op ", h.op, ") timed out");
        }
    };
    send(v, &hdr(vvs::OP_REQUEST, 0, 0), &[]);
    let end = deadline(5_000_000);
    let mut got = 0usize;
    let mut fwd = 0u32;
    loop {
        if hw::rdtsc() >= end {
            fail!("evilvsock: the well-behaved exchange timed out");
        }
        let Some((id, h, p)) = v.poll_rx() else {
            core::hint::spin_loop();
            continue;
        };
        let k = p.len().min(reply.len() - got);
        reply[got..got + k].copy_from_slice(&p[..k]);
        let n = p.len() as u32;
        v.repost(id);
        if h.src_port != PORT || h.dst_port != LOCAL {
            continue;
        }
        match h.op {
            vvs::OP_RESPONSE => send(v, &hdr(vvs::OP_RW, 0, 0), b"hello from the evil guest\n"),
            vvs::OP_RW => {
                got += k;
                fwd = fwd.wrapping_add(n);
                if reply[..got].contains(&b'\n') || got == reply.len() {
                    break;
                }
            }
            vvs::OP_CREDIT_REQUEST => send(v, &hdr(vvs::OP_CREDIT_UPDATE, 0, fwd), &[]),
            vvs::OP_RST => fail!("evilvsock: the host refused port 6000"),
            _ => {}
        }
    }
    // A full shutdown; the device acknowledges it with a RST.
    send(v, &hdr(vvs::OP_SHUTDOWN, 3, fwd), &[]);
    got
}
