//! `blk`: the first virtio block device: capacity, read, write + flush (or
//! a refused write on a read-only drive), an out-of-range read, GET_ID.
//! `blkwait` (or `blkwait=<n>`): waits (up to 30 s each) for one (or n)
//! configuration changes of the first block device (the host swapped its file)
//! and prints the new capacity after each.

use super::initrd::fnv1a64;
use crate::serial::Hex;
use crate::virtio::blk::{Blk, Done, DATA, SECTOR, T_IN};
use crate::Ctx;

/// Bytes of sectors 8.. written by the scenario: byte i is (i*7+3) & 0xff.
pub fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(7).wrapping_add(3) & 0xff) as u8
}

/// The status byte of a completed request; FAIL on a timeout.
pub fn status_of(what: &str, d: Done) -> u8 {
    match d {
        Done::Status(s, _) => s,
        Done::Timeout => fail!("blk: ", what, " request timed out"),
    }
}

pub fn open_first(ctx: &Ctx, who: &str) -> Blk {
    let Some(base) = Blk::find(ctx.bp.cmdline(), 0) else {
        fail!(who, ": no virtio block device on the command line");
    };
    match Blk::open(base) {
        Ok(b) => b,
        Err(e) => fail!(who, ": block device at ", Hex(base, 8), ": ", e),
    }
}

pub fn run(ctx: &Ctx, _arg: &[u8]) {
    let mut b = open_first(ctx, "blk");
    say!("blk: capacity ", b.capacity, " sectors, ro=", b.ro as u8);

    // Sectors 0..min(capacity, 128) into DATA (64 KiB), 32 at a time.
    let total = b.capacity.min(128) as usize;
    let mut done = 0usize;
    while done < total {
        let n = (total - done).min(32);
        let addr = DATA.addr() + (done * SECTOR) as u64;
        let d = b.request(T_IN, done as u64, addr, (n * SECTOR) as u32, true);
        let s = status_of("read", d);
        if s != 0 {
            fail!("blk: read of sectors ", done, "..", done + n, " status ", s);
        }
        done += n;
    }
    let h = fnv1a64(Blk::data(total * SECTOR));
    say!("blk: read ", total, " sectors fnv1a64=", Hex(h, 16));

    // 8 sectors of the pattern at sector 8.
    let data = Blk::data_mut();
    for (i, c) in data[..8 * SECTOR].iter_mut().enumerate() {
        *c = pattern(i);
    }
    let w = status_of("write", b.write(8, 8));
    if b.ro {
        say!("blk: write refused status ", w);
    } else {
        if w != 0 {
            fail!("blk: write status ", w);
        }
        let f = status_of("flush", b.flush());
        say!("blk: wrote 8 sectors at 8, flush status ", f);
    }

    let s = status_of("out-of-range read", b.read(b.capacity, 1));
    say!("blk: out of range status ", s);

    let (d, id) = b.get_id();
    let s = status_of("get-id", d);
    if s != 0 {
        fail!("blk: GET_ID status ", s);
    }
    let mut text = [0u8; 20];
    let mut n = 0;
    for &c in id.iter().take_while(|&&c| c != 0) {
        text[n] = if (0x20..0x7f).contains(&c) { c } else { b'.' };
        n += 1;
    }
    say!("blk: id ", &text[..n]);
}

pub fn wait_config(ctx: &Ctx, arg: &[u8]) {
    use crate::virtio::mmio::{CONFIG_GENERATION, INTERRUPT_ACK, INTERRUPT_STATUS};
    let changes = super::parse_dec(arg).unwrap_or(1);
    let b = open_first(ctx, "blkwait");
    let mut gen = b.t.read(CONFIG_GENERATION);
    say!("blkwait: capacity ", b.capacity, " sectors, generation ", gen);
    for _ in 0..changes {
        let st;
        let deadline = crate::hw::rdtsc() + super::ticks::tsc_per_us() * 30_000_000;
        loop {
            // The generation is the signal (ember moves it and raises the interrupt under one
            // lock); the interrupt bit is only acknowledged, so a bit set by this change but
            // read before it cannot count as the next one.
            let now = b.t.read(CONFIG_GENERATION);
            if now != gen {
                st = b.t.read(INTERRUPT_STATUS);
                b.t.write(INTERRUPT_ACK, st & 2);
                gen = now;
                break;
            }
            if crate::hw::rdtsc() > deadline {
                fail!("blkwait: no configuration change within 30 s");
            }
            core::hint::spin_loop();
        }
        say!(
            "blk: capacity changed to ",
            b.t.config64(0),
            " sectors, configuration interrupt ",
            (st >> 1) & 1
        );
    }
}
