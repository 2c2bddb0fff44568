//! `evil`: a malicious driver against the first virtio block device. Each
//! case breaks one rule, waits at most ~100 ms for the used ring, prints
//! what the device did (`evil: <case>: ...`) and `evil: <case> survived`,
//! then resets and re-initialises the device. Ends with a well-behaved read
//! of sector 0: `evil: well-behaved read ok fnv1a64=<hex>`.

use super::blk::open_first;
use super::initrd::fnv1a64;
use crate::serial::Hex;
use crate::virtio::blk::{Blk, Done, DATA, SECTOR, STATUS_OFF, T_IN};
use crate::virtio::mmio::{self, Transport, S_ACKNOWLEDGE, S_DRIVER, S_DRIVER_OK, S_FEATURES_OK};
use crate::virtio::queue::{Queue, DESC_F_NEXT, DESC_F_WRITE};
use crate::Ctx;

/// How long a case waits for the used ring.
const CASE_US: u64 = 100_000;
/// Outside any guest RAM this guest is given (64 GiB - 4 KiB).
const BAD_ADDR: u64 = 0x10_0000_0000 - 0x1000;

fn reinit(base: u64) -> Blk {
    match Blk::open(base) {
        Ok(b) => b,
        Err(e) => fail!("evil: re-initialisation failed: ", e),
    }
}

fn report(t: &Transport, case: &str, d: Done) {
    let st = t.status();
    match d {
        Done::Status(s, len) => say!(
            "evil: ",
            case,
            ": completed, status ",
            s,
            ", len ",
            len,
            ", device status 0x",
            Hex(st as u64, 2)
        ),
        Done::Timeout => say!(
            "evil: ",
            case,
            ": no completion, device status 0x",
            Hex(st as u64, 2)
        ),
    }
    say!("evil: ", case, " survived");
}

/// Header descriptor 0 of an IN request for sector 0, chained to 1.
fn header(q: &Queue) {
    Blk::set_header(T_IN, 0);
    q.set_desc(0, Blk::req_addr(0), 16, DESC_F_NEXT, 1);
}

fn status_desc(q: &Queue, i: u16, flags: u16) {
    q.set_desc(i, Blk::req_addr(STATUS_OFF), 1, flags, 0);
}

/// A well-formed IN request of one sector at descriptors 0..3.
fn good_read(q: &Queue) {
    header(q);
    q.set_desc(1, DATA.addr(), SECTOR as u32, DESC_F_NEXT | DESC_F_WRITE, 2);
    status_desc(q, 2, DESC_F_WRITE);
}

pub fn run(ctx: &Ctx, _arg: &[u8]) {
    let mut b = open_first(ctx, "evil");
    let base = b.t.base;
    let nw = DESC_F_NEXT | DESC_F_WRITE;

    // A data descriptor outside guest RAM.
    header(&b.q);
    b.q.set_desc(1, BAD_ADDR, SECTOR as u32, nw, 2);
    status_desc(&b.q, 2, DESC_F_WRITE);
    let d = b.submit(CASE_US);
    report(&b.t, "bad address", d);
    b = reinit(base);

    // A chain that loops: data descriptor 1 points back to the header.
    header(&b.q);
    b.q.set_desc(1, DATA.addr(), SECTOR as u32, nw, 0);
    let d = b.submit(CASE_US);
    report(&b.t, "looping chain", d);
    b = reinit(base);

    // A chain longer than the queue: 0 -> 1 -> ... -> size-1 -> size (past
    // the table; the slot after it holds a status descriptor).
    let size = b.q.size;
    header(&b.q);
    for i in 1..size {
        let a = DATA.addr() + (i as u64 - 1) * SECTOR as u64;
        b.q.set_desc(i, a, SECTOR as u32, nw, i + 1);
    }
    status_desc(&b.q, size, DESC_F_WRITE);
    let d = b.submit(CASE_US);
    report(&b.t, "overlong chain", d);
    b = reinit(base);

    // A zero-length data descriptor.
    header(&b.q);
    b.q.set_desc(1, DATA.addr(), 0, nw, 2);
    status_desc(&b.q, 2, DESC_F_WRITE);
    let d = b.submit(CASE_US);
    report(&b.t, "zero-length data", d);
    b = reinit(base);

    // The status descriptor is device-readable.
    header(&b.q);
    b.q.set_desc(1, DATA.addr(), SECTOR as u32, nw, 2);
    status_desc(&b.q, 2, 0);
    let d = b.submit(CASE_US);
    report(&b.t, "read-only status", d);
    b = reinit(base);

    // avail.idx far beyond the queue size (every slot names a good chain).
    good_read(&b.q);
    for slot in 0..size {
        b.q.put_avail(slot, 0);
    }
    b.q.set_avail_idx(b.q.next_avail.wrapping_add(1000));
    b.t.notify(0);
    let d = match b.q.wait(CASE_US) {
        Some((_, len)) => Done::Status(Blk::status_byte(), len),
        None => Done::Timeout,
    };
    b.t.ack_interrupts();
    report(&b.t, "avail index jump", d);
    b = reinit(base);

    // QueueNotify on a freshly reset device, then on a configured queue
    // before DRIVER_OK.
    b.t.reset();
    b.t.notify(0);
    b.t.notify(7);
    let mut d = Done::Timeout;
    if b.t.begin(mmio::F_VERSION_1).is_ok() {
        let mut q = Queue::new(Blk::queue_mem(), size);
        if b.t.setup_queue(0, &q).is_ok() {
            good_read(&q);
            q.push(0);
            b.t.notify(0);
            if let Some((_, len)) = q.wait(CASE_US) {
                d = Done::Status(Blk::status_byte(), len);
            }
        }
    }
    report(&b.t, "notify before DRIVER_OK", d);
    b = reinit(base);

    // QueueNum 3: not a power of two.
    let t = b.t;
    t.reset();
    let mut ready = 0xffff_ffff;
    if t.begin(mmio::F_VERSION_1).is_ok() {
        let q = Queue::new(Blk::queue_mem(), 3);
        t.program_queue(0, 3, &q);
        t.write(mmio::QUEUE_READY, 1);
        ready = t.read(mmio::QUEUE_READY);
        t.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        t.notify(0);
    }
    say!(
        "evil: queue size 3: QueueReady=",
        ready,
        ", device status 0x",
        Hex(t.status() as u64, 2)
    );
    say!("evil: queue size 3 survived");
    b = reinit(base);

    // Config space accesses past the end (inside the 4 KiB window).
    let r1 = b.t.read(mmio::CONFIG + 0x800);
    b.t.write(mmio::CONFIG + 0x800, 0xdead_beef);
    let r2 = b.t.read(mmio::CONFIG + 0x800);
    b.t.write(mmio::CONFIG, 0x1234_5678); // capacity is read-only
    let cap = b.t.config64(0);
    say!(
        "evil: config out of range: read 0x",
        Hex(r1 as u64, 8),
        ", after write 0x",
        Hex(r2 as u64, 8),
        ", capacity ",
        cap
    );
    say!("evil: config out of range survived");
    b = reinit(base);

    // And the device still works.
    let d = b.read(0, 1);
    match d {
        Done::Status(0, _) => {}
        Done::Status(s, _) => fail!("evil: well-behaved read status ", s),
        Done::Timeout => fail!("evil: well-behaved read timed out"),
    }
    say!(
        "evil: well-behaved read ok fnv1a64=",
        Hex(fnv1a64(Blk::data(SECTOR)), 16)
    );
}
