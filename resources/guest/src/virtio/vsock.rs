//! virtio-vsock: RX queue 0, TX queue 1, event queue 2, VERSION_1 only. Every
//! packet starts with the 44-byte `virtio_vsock_hdr`. RX buffers (header +
//! 4 KiB) are posted once and reposted as they are used; TX is one
//! descriptor (header and payload together), waited for.

use super::mmio::{Transport, F_VERSION_1};
use super::queue::{Queue, DESC_F_WRITE};
use super::{Dma, DEVICE_ID_VSOCK};

pub const HDR_LEN: usize = 44;
pub const MAX_PAYLOAD: usize = 4096;
pub const RX_BUF_LEN: usize = HDR_LEN + MAX_PAYLOAD;
pub const RX_BUFS: usize = 8;
pub const EVENT_BUFS: usize = 4;
pub const TIMEOUT_US: u64 = 2_000_000;
pub const HOST_CID: u64 = 2;
pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// What this guest advertises for every connection.
pub const BUF_ALLOC: u32 = 64 * 1024;

static RXQ: Dma<4096> = Dma::new();
static TXQ: Dma<4096> = Dma::new();
static EVQ: Dma<4096> = Dma::new();
static RX: Dma<{ RX_BUF_LEN * RX_BUFS }> = Dma::new();
static EV: Dma<{ 8 * EVENT_BUFS }> = Dma::new();
static TX: Dma<{ HDR_LEN + MAX_PAYLOAD }> = Dma::new();

#[derive(Clone, Copy, Default, Debug)]
pub struct Hdr {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

fn get(b: &[u8], at: usize, n: usize) -> u64 {
    let mut v = 0u64;
    for i in (0..n).rev() {
        v = v << 8 | b[at + i] as u64;
    }
    v
}

fn put(b: &mut [u8], at: usize, n: usize, v: u64) {
    for i in 0..n {
        b[at + i] = (v >> (8 * i)) as u8;
    }
}

impl Hdr {
    pub fn parse(b: &[u8]) -> Hdr {
        Hdr {
            src_cid: get(b, 0, 8),
            dst_cid: get(b, 8, 8),
            src_port: get(b, 16, 4) as u32,
            dst_port: get(b, 20, 4) as u32,
            len: get(b, 24, 4) as u32,
            type_: get(b, 28, 2) as u16,
            op: get(b, 30, 2) as u16,
            flags: get(b, 32, 4) as u32,
            buf_alloc: get(b, 36, 4) as u32,
            fwd_cnt: get(b, 40, 4) as u32,
        }
    }

    pub fn write(&self, b: &mut [u8]) {
        put(b, 0, 8, self.src_cid);
        put(b, 8, 8, self.dst_cid);
        put(b, 16, 4, self.src_port as u64);
        put(b, 20, 4, self.dst_port as u64);
        put(b, 24, 4, self.len as u64);
        put(b, 28, 2, self.type_ as u64);
        put(b, 30, 2, self.op as u64);
        put(b, 32, 4, self.flags as u64);
        put(b, 36, 4, self.buf_alloc as u64);
        put(b, 40, 4, self.fwd_cnt as u64);
    }
}

pub struct Vsock {
    pub t: Transport,
    pub rx: Queue,
    pub tx: Queue,
    pub ev: Queue,
    pub cid: u64,
}

impl Vsock {
    pub fn find(cmdline: &[u8]) -> Option<u64> {
        super::find(cmdline, DEVICE_ID_VSOCK, 0)
    }

    pub fn open(base: u64) -> Result<Vsock, &'static str> {
        let t = Transport::new(base);
        t.begin(F_VERSION_1)?;
        let (rs, ts, es) = (t.queue_size(0), t.queue_size(1), t.queue_size(2));
        if rs == 0 || ts == 0 || es == 0 {
            return Err("a queue has QueueNumMax 0");
        }
        let rx = Queue::new(RXQ.addr(), rs);
        let tx = Queue::new(TXQ.addr(), ts);
        let ev = Queue::new(EVQ.addr(), es);
        t.setup_queue(0, &rx)?;
        t.setup_queue(1, &tx)?;
        t.setup_queue(2, &ev)?;
        t.driver_ok()?;
        let cid = t.config64(0);
        let mut v = Vsock { t, rx, tx, ev, cid };
        for i in 0..(rs as usize).min(RX_BUFS) as u16 {
            v.post_rx(i);
        }
        for i in 0..(es as usize).min(EVENT_BUFS) as u16 {
            v.ev.set_desc(i, EV.addr() + 8 * i as u64, 8, DESC_F_WRITE, 0);
            v.ev.push(i);
        }
        v.t.notify(0);
        v.t.notify(2);
        Ok(v)
    }

    fn post_rx(&mut self, i: u16) {
        let addr = RX.addr() + i as u64 * RX_BUF_LEN as u64;
        self.rx
            .set_desc(i, addr, RX_BUF_LEN as u32, DESC_F_WRITE, 0);
        self.rx.push(i);
    }

    /// The next received packet, if any: (buffer id, header, payload). A
    /// header claiming more payload than arrived is cut to what arrived.
    pub fn poll_rx(&mut self) -> Option<(u16, Hdr, &'static [u8])> {
        let (id, len) = self.rx.poll()?;
        self.t.ack_interrupts();
        let id = (id as usize % RX_BUFS) as u16;
        let len = (len as usize).clamp(HDR_LEN, RX_BUF_LEN);
        // SAFETY: inside RX; the device is done with this buffer until it is reposted.
        let all = unsafe {
            core::slice::from_raw_parts(
                (RX.addr() + id as u64 * RX_BUF_LEN as u64) as *const u8,
                len,
            )
        };
        let h = Hdr::parse(all);
        let n = (h.len as usize).min(len - HDR_LEN);
        Some((id, h, &all[HDR_LEN..HDR_LEN + n]))
    }

    /// Gives buffer `id` back to the device.
    pub fn repost(&mut self, id: u16) {
        self.post_rx(id);
        self.t.notify(0);
    }

    /// Sends one packet (its `len` set from `payload`); false on timeout.
    pub fn send(&mut self, h: &Hdr, payload: &[u8]) -> bool {
        let mut h = *h;
        h.len = payload.len().min(MAX_PAYLOAD) as u32;
        self.send_as_is(&h, payload, TIMEOUT_US)
    }

    /// Sends one packet with its header as given, `len` included (it may lie about the
    /// payload); false if the device did not take it within `us`.
    pub fn send_as_is(&mut self, h: &Hdr, payload: &[u8], us: u64) -> bool {
        let n = payload.len().min(MAX_PAYLOAD);
        // SAFETY: inside TX; no TX request in flight.
        let buf =
            unsafe { core::slice::from_raw_parts_mut(TX.addr() as *mut u8, HDR_LEN + MAX_PAYLOAD) };
        h.write(&mut buf[..HDR_LEN]);
        buf[HDR_LEN..HDR_LEN + n].copy_from_slice(&payload[..n]);
        self.tx.set_desc(0, TX.addr(), (HDR_LEN + n) as u32, 0, 0);
        self.tx.push(0);
        self.t.notify(1);
        let r = self.tx.wait(us);
        self.t.ack_interrupts();
        r.is_some()
    }
}
