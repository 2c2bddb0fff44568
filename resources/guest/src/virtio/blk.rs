//! virtio-blk: one request queue, polled. Requests are a device-readable
//! header {type, reserved, sector}, data buffers, and a device-writable
//! status byte.

use super::mmio::{Transport, F_VERSION_1};
use super::queue::{Queue, DESC_F_NEXT, DESC_F_WRITE};
use super::{Dma, DEVICE_ID_BLOCK};
use core::ptr::{read_volatile, write_volatile};

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

pub const F_RO: u64 = 1 << 5;
pub const SECTOR: usize = 512;
pub const ID_LEN: usize = 20;

/// Default timeout of one request: a hang guard.
pub const TIMEOUT_US: u64 = 5_000_000;

static QUEUE: Dma<4096> = Dma::new();
/// Header at 0, status byte at 0x100, GET_ID buffer at 0x200.
static REQ: Dma<4096> = Dma::new();
/// Data buffer of `DATA_LEN` bytes.
pub static DATA: Dma<65536> = Dma::new();
pub const DATA_LEN: usize = 65536;

pub const HDR_OFF: u64 = 0;
pub const STATUS_OFF: u64 = 0x100;
pub const ID_OFF: u64 = 0x200;

/// What became of a request.
#[derive(Clone, Copy)]
pub enum Done {
    /// The device used the chain: (status byte, used len).
    Status(u8, u32),
    /// Nothing on the used ring before the deadline.
    Timeout,
}

pub struct Blk {
    pub t: Transport,
    pub q: Queue,
    pub features: u64,
    pub capacity: u64,
    pub ro: bool,
}

impl Blk {
    /// The `nth` block device on the command line.
    pub fn find(cmdline: &[u8], nth: usize) -> Option<u64> {
        super::find(cmdline, DEVICE_ID_BLOCK, nth)
    }

    /// Full initialisation (reset first) of the device at `base`.
    pub fn open(base: u64) -> Result<Blk, &'static str> {
        let t = Transport::new(base);
        let features = t.begin(F_VERSION_1)?;
        let size = t.queue_size(0);
        if size == 0 {
            return Err("queue 0 has QueueNumMax 0");
        }
        let q = Queue::new(QUEUE.addr(), size);
        t.setup_queue(0, &q)?;
        t.driver_ok()?;
        let capacity = t.config64(0);
        Ok(Blk {
            t,
            q,
            features,
            capacity,
            ro: features & F_RO != 0,
        })
    }

    /// The queue page (for scenarios that set queues up by hand).
    pub fn queue_mem() -> u64 {
        QUEUE.addr()
    }

    pub fn req_addr(off: u64) -> u64 {
        REQ.addr() + off
    }

    /// Writes the request header.
    pub fn set_header(kind: u32, sector: u64) {
        let h = REQ.addr() + HDR_OFF;
        // SAFETY: inside REQ; no request in flight.
        unsafe {
            write_volatile(h as *mut u32, kind);
            write_volatile((h + 4) as *mut u32, 0);
            write_volatile((h + 8) as *mut u64, sector);
            write_volatile((REQ.addr() + STATUS_OFF) as *mut u8, 0xff);
        }
    }

    pub fn status_byte() -> u8 {
        // SAFETY: inside REQ.
        unsafe { read_volatile((REQ.addr() + STATUS_OFF) as *const u8) }
    }

    /// Publishes the chain at descriptor 0, notifies, waits up to `us`.
    pub fn submit(&mut self, us: u64) -> Done {
        self.q.push(0);
        self.t.notify(0);
        let r = self.q.wait(us);
        self.t.ack_interrupts();
        match r {
            Some((_, len)) => Done::Status(Self::status_byte(), len),
            None => Done::Timeout,
        }
    }

    /// One request: header, then (if `len` > 0) one data descriptor at
    /// `data` (device-writable when `dev_writes`), then the status byte.
    pub fn request(
        &mut self,
        kind: u32,
        sector: u64,
        data: u64,
        len: u32,
        dev_writes: bool,
    ) -> Done {
        Self::set_header(kind, sector);
        let q = &self.q;
        q.set_desc(0, REQ.addr() + HDR_OFF, 16, DESC_F_NEXT, 1);
        let mut next = 1;
        if len > 0 {
            let f = DESC_F_NEXT | if dev_writes { DESC_F_WRITE } else { 0 };
            q.set_desc(1, data, len, f, 2);
            next = 2;
        }
        q.set_desc(next, REQ.addr() + STATUS_OFF, 1, DESC_F_WRITE, 0);
        self.submit(TIMEOUT_US)
    }

    /// Reads `n` sectors at `sector` into DATA (n * 512 <= DATA_LEN).
    pub fn read(&mut self, sector: u64, n: usize) -> Done {
        let len = (n * SECTOR).min(DATA_LEN) as u32;
        self.request(T_IN, sector, DATA.addr(), len, true)
    }

    /// Writes the first `n` sectors of DATA at `sector`.
    pub fn write(&mut self, sector: u64, n: usize) -> Done {
        let len = (n * SECTOR).min(DATA_LEN) as u32;
        self.request(T_OUT, sector, DATA.addr(), len, false)
    }

    pub fn flush(&mut self) -> Done {
        self.request(T_FLUSH, 0, 0, 0, false)
    }

    /// GET_ID into the 20-byte id buffer; the bytes are returned on success.
    pub fn get_id(&mut self) -> (Done, [u8; ID_LEN]) {
        let a = REQ.addr() + ID_OFF;
        // SAFETY: inside REQ; no request in flight.
        unsafe { core::ptr::write_bytes(a as *mut u8, 0, ID_LEN) };
        let d = self.request(T_GET_ID, 0, a, ID_LEN as u32, true);
        let mut id = [0u8; ID_LEN];
        for (i, b) in id.iter_mut().enumerate() {
            // SAFETY: inside REQ.
            *b = unsafe { read_volatile((a + i as u64) as *const u8) };
        }
        (d, id)
    }

    /// DATA as a mutable byte slice (no request in flight).
    pub fn data_mut() -> &'static mut [u8] {
        // SAFETY: only the BSP uses it, between requests.
        unsafe { core::slice::from_raw_parts_mut(DATA.addr() as *mut u8, DATA_LEN) }
    }

    pub fn data(len: usize) -> &'static [u8] {
        DATA.bytes(len)
    }
}
