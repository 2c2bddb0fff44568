//! virtio-net: RX queue 0, TX queue 1, the 12-byte virtio_net_hdr_v1 in
//! front of every frame, no offloads, no MRG_RXBUF: every RX buffer holds a
//! whole frame. RX buffers are posted once and reposted as they are used.

use super::mmio::{Transport, F_VERSION_1};
use super::queue::{Queue, DESC_F_NEXT, DESC_F_WRITE};
use super::{Dma, DEVICE_ID_NET};

pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_MAC: u64 = 1 << 5;
pub const F_GUEST_TSO4: u64 = 1 << 7;
pub const F_GUEST_TSO6: u64 = 1 << 8;
pub const F_GUEST_UFO: u64 = 1 << 10;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_HOST_TSO6: u64 = 1 << 12;
pub const F_HOST_UFO: u64 = 1 << 14;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const HDR_LEN: usize = 12;
/// One RX buffer: header + a 1514-byte frame, rounded up.
pub const RX_BUF_LEN: usize = 2048;
pub const RX_BUFS: usize = 16;
pub const TIMEOUT_US: u64 = 5_000_000;

static RXQ: Dma<4096> = Dma::new();
static TXQ: Dma<4096> = Dma::new();
static RX: Dma<{ RX_BUF_LEN * RX_BUFS }> = Dma::new();
static TX: Dma<2048> = Dma::new();

pub struct Net {
    pub t: Transport,
    pub rx: Queue,
    pub tx: Queue,
    /// The device's MAC when it offers one.
    pub mac: Option<[u8; 6]>,
}

impl Net {
    pub fn find(cmdline: &[u8]) -> Option<u64> {
        super::find(cmdline, DEVICE_ID_NET, 0)
    }

    pub fn open(base: u64) -> Result<Net, &'static str> {
        Self::open_with(base, F_MAC)
    }

    /// `open`, asking for `wanted` (what the device offers of it is negotiated).
    pub fn open_with(base: u64, wanted: u64) -> Result<Net, &'static str> {
        let t = Transport::new(base);
        let offered = t.begin(F_VERSION_1 | wanted)?;
        let (rs, ts) = (t.queue_size(0), t.queue_size(1));
        if rs == 0 || ts == 0 {
            return Err("a queue has QueueNumMax 0");
        }
        let rx = Queue::new(RXQ.addr(), rs);
        let tx = Queue::new(TXQ.addr(), ts);
        t.setup_queue(0, &rx)?;
        t.setup_queue(1, &tx)?;
        t.driver_ok()?;
        let mac = if offered & F_MAC != 0 {
            let mut m = [0u8; 6];
            for (i, b) in m.iter_mut().enumerate() {
                *b = t.config8(i as u64);
            }
            Some(m)
        } else {
            None
        };
        let mut n = Net { t, rx, tx, mac };
        let bufs = (rs as usize).min(RX_BUFS);
        for i in 0..bufs as u16 {
            n.post_rx(i);
        }
        n.t.notify(0);
        Ok(n)
    }

    fn post_rx(&mut self, i: u16) {
        let addr = RX.addr() + i as u64 * RX_BUF_LEN as u64;
        self.rx
            .set_desc(i, addr, RX_BUF_LEN as u32, DESC_F_WRITE, 0);
        self.rx.push(i);
    }

    /// The next received frame (without its header), if any: (buffer id, frame).
    pub fn poll_rx(&mut self) -> Option<(u16, &'static [u8])> {
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
        Some((id, &all[HDR_LEN..]))
    }

    /// Gives buffer `id` back to the device.
    pub fn repost(&mut self, id: u16) {
        self.post_rx(id);
        self.t.notify(0);
    }

    /// Sends one frame (a zeroed header in front); false on timeout.
    pub fn send(&mut self, frame: &[u8]) -> bool {
        let len = frame.len().min(TX.len() - HDR_LEN);
        // SAFETY: inside TX; no TX request in flight.
        unsafe {
            let p = TX.addr() as *mut u8;
            core::ptr::write_bytes(p, 0, HDR_LEN);
            core::ptr::copy_nonoverlapping(frame.as_ptr(), p.add(HDR_LEN), len);
        }
        self.tx
            .set_desc(0, TX.addr(), HDR_LEN as u32, DESC_F_NEXT, 1);
        self.tx
            .set_desc(1, TX.addr() + HDR_LEN as u64, len as u32, 0, 0);
        self.tx.push(0);
        self.t.notify(1);
        let r = self.tx.wait(TIMEOUT_US);
        self.t.ack_interrupts();
        r.is_some()
    }
}
