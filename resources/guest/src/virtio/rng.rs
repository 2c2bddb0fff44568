//! virtio-rng: one queue of device-writable buffers; the used length says
//! how many bytes the device filled.

use super::mmio::{Transport, F_VERSION_1};
use super::queue::{Queue, DESC_F_WRITE};
use super::{Dma, DEVICE_ID_ENTROPY};

static QUEUE: Dma<4096> = Dma::new();
static BUF: Dma<4096> = Dma::new();

pub const TIMEOUT_US: u64 = 5_000_000;

pub struct Rng {
    pub t: Transport,
    pub q: Queue,
}

impl Rng {
    pub fn find(cmdline: &[u8]) -> Option<u64> {
        super::find(cmdline, DEVICE_ID_ENTROPY, 0)
    }

    pub fn open(base: u64) -> Result<Rng, &'static str> {
        let t = Transport::new(base);
        t.begin(F_VERSION_1)?;
        let size = t.queue_size(0);
        if size == 0 {
            return Err("queue 0 has QueueNumMax 0");
        }
        let q = Queue::new(QUEUE.addr(), size);
        t.setup_queue(0, &q)?;
        t.driver_ok()?;
        Ok(Rng { t, q })
    }

    /// Asks for `len` (<= 4096) random bytes; returns the bytes filled, or
    /// None on timeout.
    pub fn fill(&mut self, len: usize) -> Option<&'static [u8]> {
        let len = len.min(BUF.len());
        // SAFETY: inside BUF; no request in flight.
        unsafe { core::ptr::write_bytes(BUF.addr() as *mut u8, 0, len) };
        self.q.set_desc(0, BUF.addr(), len as u32, DESC_F_WRITE, 0);
        self.q.push(0);
        self.t.notify(0);
        let r = self.q.wait(TIMEOUT_US);
        self.t.ack_interrupts();
        let (_, used) = r?;
        Some(BUF.bytes((used as usize).min(len)))
    }
}
