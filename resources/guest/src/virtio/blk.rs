//! virtio-blk: one request queue, polled. Requests are a device-readable
//! header {type, reserved, sector}, data buffers, and a device-writable
//! status byte. [`Blk`] has one request in flight at a time; [`BlkQ`] keeps
//! up to `MAX_QD` in flight, with VIRTIO_RING_F_EVENT_IDX.

use super::mmio::{Transport, F_VERSION_1, QUEUE_NUM_MAX, QUEUE_SEL};
use super::queue::{Queue, BIG_BYTES, BIG_MAX, DESC_F_NEXT, DESC_F_WRITE};
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

// ---- Many requests in flight ----

/// VIRTIO_RING_F_EVENT_IDX.
pub const F_EVENT_IDX: u64 = 1 << 29;
/// Most requests a [`BlkQ`] keeps in flight (three descriptors each).
pub const MAX_QD: usize = 32;
/// Room for MAX_QD buffers of DATA_LEN bytes, for [`BlkQ`] users (one
/// buffer per slot, or one region read or written in pieces).
pub const AREA_LEN: usize = MAX_QD * DATA_LEN;
pub static AREA: Dma<AREA_LEN> = Dma::new();
static BIGQ: Dma<BIG_BYTES> = Dma::new();
/// Per slot: the header at 16 * slot, the status byte at SLOT_STATUS + slot.
static SLOTS: Dma<4096> = Dma::new();
const SLOT_STATUS: u64 = 0x800;
/// How far `used_event` is kept ahead of the used entries consumed.
const USED_EVENT_AHEAD: u16 = 0x8000;

/// A request the device has used.
#[derive(Clone, Copy)]
pub struct Completion {
    /// What the caller gave [`BlkQ::queue`].
    pub tag: u32,
    pub slot: usize,
    pub status: u8,
    /// The used length the device reported.
    pub len: u32,
}

/// virtio-blk with up to `qd` requests in flight, completions polled. With
/// EVENT_IDX (when the device offers it and the caller wants it) the driver
/// notifies only when the device's `avail_event` asks for it, and keeps
/// `used_event` half the index space (USED_EVENT_AHEAD) ahead of what it
/// consumed, so the device, whose used index never runs that far ahead,
/// never needs to interrupt this polling driver. (One behind would not do:
/// the device checks `used_event` only after a batch of used entries, and
/// the driver may already have consumed them all and moved `used_event`
/// into the range the batch covered.) Slot s owns descriptors 3s..3s+2.
pub struct BlkQ {
    pub t: Transport,
    pub q: Queue,
    pub capacity: u64,
    pub ro: bool,
    pub event_idx: bool,
    pub qd: usize,
    /// Bit s set: slot s is free.
    free: u64,
    /// Requests put on the available ring, not yet published.
    queued: u16,
    tags: [u32; MAX_QD],
    /// Requests queued, and notifications sent, so far.
    pub requests: u64,
    pub notifies: u64,
}

impl BlkQ {
    /// Full initialisation (reset first) of the block device at `base`.
    pub fn open(base: u64, qd: usize, event_idx: bool) -> Result<BlkQ, &'static str> {
        let t = Transport::new(base);
        let features = t.begin(if event_idx { F_EVENT_IDX } else { 0 })?;
        let event_idx = event_idx && features & F_EVENT_IDX != 0;
        t.write(QUEUE_SEL, 0);
        let max = t.read(QUEUE_NUM_MAX).min(BIG_MAX as u32);
        if max < 4 {
            return Err("queue 0 is too small for a request");
        }
        let qd = qd.clamp(1, MAX_QD);
        let want = (3 * qd as u32).next_power_of_two().min(max);
        // Largest power of two <= want.
        let size = 1u32 << (31 - want.leading_zeros());
        let qd = qd.min(size as usize / 3);
        let q = Queue::big(BIGQ.addr(), size as u16);
        if event_idx {
            // No interrupt wanted.
            q.set_used_event(q.last_used.wrapping_add(USED_EVENT_AHEAD));
        }
        t.setup_queue(0, &q)?;
        t.driver_ok()?;
        let capacity = t.config64(0);
        Ok(BlkQ {
            t,
            q,
            capacity,
            ro: features & F_RO != 0,
            event_idx,
            qd,
            free: (1u64 << qd) - 1,
            queued: 0,
            tags: [0; MAX_QD],
            requests: 0,
            notifies: 0,
        })
    }

    /// The address of slot `s`'s DATA_LEN bytes in AREA.
    pub fn slot_buf(s: usize) -> u64 {
        AREA.addr() + (s % MAX_QD * DATA_LEN) as u64
    }

    pub fn free_slot(&self) -> Option<usize> {
        (self.free != 0).then(|| self.free.trailing_zeros() as usize)
    }

    pub fn in_flight(&self) -> usize {
        self.qd - self.free.count_ones() as usize
    }

    /// Puts a request on the available ring in free slot `slot` (unpublished
    /// until [`BlkQ::kick`]): `len` bytes at `data` (none for `len` 0),
    /// device-writable for T_IN.
    pub fn queue(&mut self, slot: usize, tag: u32, kind: u32, sector: u64, data: u64, len: u32) {
        if slot >= self.qd || self.free & (1 << slot) == 0 {
            fail!("blkq: slot ", slot, " is not free");
        }
        let h = SLOTS.addr() + 16 * slot as u64;
        let st = SLOTS.addr() + SLOT_STATUS + slot as u64;
        // SAFETY: inside SLOTS; the slot is free, so the device does not use it.
        unsafe {
            write_volatile(h as *mut u32, kind);
            write_volatile((h + 4) as *mut u32, 0);
            write_volatile((h + 8) as *mut u64, sector);
            write_volatile(st as *mut u8, 0xff);
        }
        let d = 3 * slot as u16;
        if len > 0 {
            self.q.set_desc(d, h, 16, DESC_F_NEXT, d + 1);
            let f = DESC_F_NEXT | if kind == T_IN { DESC_F_WRITE } else { 0 };
            self.q.set_desc(d + 1, data, len, f, d + 2);
        } else {
            self.q.set_desc(d, h, 16, DESC_F_NEXT, d + 2);
        }
        self.q.set_desc(d + 2, st, 1, DESC_F_WRITE, 0);
        self.q
            .put_avail(self.q.next_avail.wrapping_add(self.queued), d);
        self.queued += 1;
        self.free &= !(1 << slot);
        self.tags[slot] = tag;
        self.requests += 1;
    }

    /// Publishes the queued requests; notifies the device only if it asked.
    pub fn kick(&mut self) {
        if self.q.publish(self.queued, self.event_idx) {
            self.t.notify(0);
            self.notifies += 1;
        }
        self.queued = 0;
    }

    /// The next completion the device published, if any; its slot is free again.
    pub fn next_done(&mut self) -> Option<Completion> {
        let (id, len) = self.q.poll()?;
        let slot = (id / 3) as usize;
        if id % 3 != 0 || slot >= self.qd || self.free & (1 << slot) != 0 {
            fail!("blkq: the device used id ", id, ", not a request in flight");
        }
        if self.event_idx {
            self.q
                .set_used_event(self.q.last_used.wrapping_add(USED_EVENT_AHEAD));
        }
        self.free |= 1 << slot;
        // SAFETY: inside SLOTS; the device is done with this slot.
        let status =
            unsafe { read_volatile((SLOTS.addr() + SLOT_STATUS + slot as u64) as *const u8) };
        Some(Completion {
            tag: self.tags[slot],
            slot,
            status,
            len,
        })
    }

    /// Waits (up to TIMEOUT_US) for the next completion; FAIL on a timeout.
    pub fn wait_done(&mut self) -> Completion {
        let end = super::deadline(TIMEOUT_US);
        loop {
            if let Some(c) = self.next_done() {
                return c;
            }
            if crate::hw::rdtsc() >= end {
                fail!(
                    "blkq: no completion within ",
                    TIMEOUT_US / 1000,
                    " ms (",
                    self.in_flight(),
                    " in flight, avail ",
                    self.q.next_avail,
                    ", used ",
                    self.q.used_idx(),
                    ", avail_event ",
                    self.q.avail_event(),
                    ")"
                );
            }
            core::hint::spin_loop();
        }
    }

    /// Runs `n` requests with up to `qd` in flight. `prep(i, slot)` gives
    /// request i's (kind, sector, data address, len) when a slot is free
    /// (it may fill the slot's buffer); `done(i, completion)` sees each
    /// completion, in the order the device used them.
    pub fn pipeline(
        &mut self,
        n: u32,
        mut prep: impl FnMut(u32, usize) -> (u32, u64, u64, u32),
        mut done: impl FnMut(&Completion),
    ) {
        let mut next = 0u32;
        let mut finished = 0u32;
        while finished < n {
            while next < n {
                let Some(slot) = self.free_slot() else { break };
                let (kind, sector, data, len) = prep(next, slot);
                self.queue(slot, next, kind, sector, data, len);
                next += 1;
            }
            self.kick();
            let c = self.wait_done();
            done(&c);
            finished += 1;
            while let Some(c) = self.next_done() {
                done(&c);
                finished += 1;
            }
        }
    }

    /// One request alone (the pipeline empty), waited for: its completion.
    pub fn one(&mut self, kind: u32, sector: u64, data: u64, len: u32) -> Completion {
        let Some(slot) = self.free_slot() else {
            fail!("blkq: no free slot");
        };
        self.queue(slot, u32::MAX, kind, sector, data, len);
        self.kick();
        self.wait_done()
    }
}
