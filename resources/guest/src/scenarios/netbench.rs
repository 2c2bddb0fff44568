//! `netbench=<len>`: throughput of the first virtio net device with Ethernet frames of `<len>`
//! bytes (60 to 65536; broadcast, ethertype 0x88b5). Rings of up to 64 entries with EVENT_IDX
//! (interrupts suppressed, notifications only when the device asks), all buffers in guest RAM at
//! 16..40 MiB (so the image's bss stays small).
//!
//! 1. Prints `netbench: tx start`, waits 100 ms, then keeps the TX ring full for 1 s and waits
//!    for the last frame: `netbench: tx <frames> frames <bytes> bytes in <us> us`.
//! 2. Posts every RX buffer, prints `netbench: rx ready`, counts the 0x88b5 frames that arrive
//!    until none came for 500 ms (60 s at most):
//!    `netbench: rx <frames> frames <bytes> bytes in <us> us`, the time from the first frame to
//!    the last (FAIL when none came within 20 s).
//!
//! Times come from ember's boot timer (the TSC, calibrated against it, in between).

use crate::virtio::mmio::{Transport, F_VERSION_1, QUEUE_NUM_MAX, QUEUE_SEL};
use crate::virtio::net::{Net, F_MAC, HDR_LEN};
use crate::virtio::queue::{Queue, DESC_F_WRITE, PAGE};
use crate::virtio::{deadline, delay_us, tsc_per_us};
use crate::{hw, Ctx};
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

pub const F_EVENT_IDX: u64 = 1 << 29;
/// The benchmarks' memory: rings, then buffers.
pub const REGION: u64 = 16 << 20;
pub const REGION_LEN: u64 = 24 << 20;
/// Largest ring the benchmarks use (what one queue page holds).
pub const MAX_RING: u32 = 64;

const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const TX_US: u64 = 1_000_000;
const IDLE_US: u64 = 500_000;
const FIRST_US: u64 = 20_000_000;
/// RX ends after this even while frames keep coming.
const RX_MAX_US: u64 = 60_000_000;
const DRAIN_US: u64 = 5_000_000;

/// A split queue of up to 64 entries driven with EVENT_IDX when negotiated.
pub struct Ring {
    pub q: Queue,
    pub idx: u32,
    pub event_idx: bool,
}

impl Ring {
    /// Queue `idx` of `t`, sized min(QueueNumMax, 64) rounded down to a power of two, on the
    /// page at `mem`, made ready.
    pub fn setup(t: &Transport, idx: u32, mem: u64, event_idx: bool) -> Result<Ring, &'static str> {
        t.write(QUEUE_SEL, idx);
        let max = t.read(QUEUE_NUM_MAX).min(MAX_RING);
        if max == 0 {
            return Err("a queue has QueueNumMax 0");
        }
        let q = Queue::new(mem, 1 << (31 - max.leading_zeros()));
        t.setup_queue(idx, &q)?;
        let r = Ring { q, idx, event_idx };
        r.quiet();
        Ok(r)
    }

    pub fn size(&self) -> u16 {
        self.q.size
    }

    /// Moves `used_event` half the index space away: no interrupts (there are none here
    /// anyway, but each one would cost the VMM an irqfd write).
    pub fn quiet(&self) {
        let a = self.q.avail_addr() + 4 + 2 * self.q.size as u64;
        // SAFETY: inside the queue page (64 entries at most).
        unsafe { write_volatile(a as *mut u16, self.q.last_used.wrapping_add(0x8000)) };
    }

    /// After heads were pushed since avail index `old`: notifies unless the device said
    /// (avail_event) it will look anyway.
    pub fn kick(&self, t: &Transport, old: u16) {
        let new = self.q.next_avail;
        if new == old {
            return;
        }
        fence(Ordering::SeqCst);
        if self.event_idx {
            let a = self.q.used_addr() + 4 + 8 * self.q.size as u64;
            // SAFETY: inside the queue page.
            let event = unsafe { read_volatile(a as *const u16) };
            if new.wrapping_sub(event).wrapping_sub(1) >= new.wrapping_sub(old) {
                return;
            }
        }
        t.notify(self.idx);
    }
}

/// TSC cycles to microseconds, calibrated over a window whose boot-timer ends are known.
pub struct Clock {
    us0: u64,
    tsc0: u64,
}

impl Clock {
    pub fn start() -> Clock {
        tsc_per_us();
        Clock {
            us0: hw::boot_time_us(),
            tsc0: hw::rdtsc(),
        }
    }

    /// Microseconds between TSC values `a` and `b` (b >= a), measured now.
    pub fn us(&self, a: u64, b: u64) -> u64 {
        let (us1, tsc1) = (hw::boot_time_us(), hw::rdtsc());
        let cycles = b.saturating_sub(a) as u128;
        if self.us0 == 0 || us1 <= self.us0 || tsc1 <= self.tsc0 {
            return (cycles / tsc_per_us() as u128) as u64;
        }
        (cycles * (us1 - self.us0) as u128 / (tsc1 - self.tsc0) as u128) as u64
    }
}

/// Whether [REGION, REGION + REGION_LEN) is RAM, else FAIL.
pub fn check_region(ctx: &Ctx, who: &str) {
    if !ctx.bp.is_ram(REGION, REGION_LEN) {
        fail!(
            who,
            ": needs RAM at 16..40 MiB (give the VM 64 MiB or more)"
        );
    }
}

pub fn run(ctx: &Ctx, arg: &[u8]) {
    let len = match crate::scenarios::parse_dec(arg) {
        Some(n) if (60..=65536).contains(&n) => n as usize,
        _ => fail!("netbench: the frame length must be 60 to 65536"),
    };
    check_region(ctx, "netbench");
    let Some(base) = Net::find(ctx.bp.cmdline()) else {
        fail!("netbench: no virtio net device on the command line");
    };
    let t = Transport::new(base);
    let offered = match t.begin(F_VERSION_1 | F_MAC | F_EVENT_IDX) {
        Ok(f) => f,
        Err(e) => fail!("netbench: ", e),
    };
    let ev = offered & F_EVENT_IDX != 0;
    let (mut rx, mut tx) = match (
        Ring::setup(&t, 0, REGION, ev),
        Ring::setup(&t, 1, REGION + PAGE as u64, ev),
    ) {
        (Ok(r), Ok(x)) => (r, x),
        (Err(e), _) | (_, Err(e)) => fail!("netbench: ", e),
    };
    if let Err(e) = t.driver_ok() {
        fail!("netbench: ", e);
    }
    let mut mac = [2u8, 0, 0, 0, 0, 1];
    if offered & F_MAC != 0 {
        for (i, b) in mac.iter_mut().enumerate() {
            *b = t.config8(i as u64);
        }
    }
    let stride = (HDR_LEN + len).next_multiple_of(PAGE) as u64;
    let tx_bufs = REGION + 2 * PAGE as u64;
    let rx_bufs = tx_bufs + stride * MAX_RING as u64;

    // One descriptor per frame: header and frame together, built once.
    for i in 0..tx.size() {
        let a = tx_bufs + i as u64 * stride;
        // SAFETY: inside the region checked above; the device has no buffer yet.
        let b = unsafe { core::slice::from_raw_parts_mut(a as *mut u8, HDR_LEN + len) };
        b[..HDR_LEN].fill(0);
        let f = &mut b[HDR_LEN..];
        f[..6].fill(0xff);
        f[6..12].copy_from_slice(&mac);
        f[12..14].copy_from_slice(&ETHERTYPE);
        for (k, c) in f[14..].iter_mut().enumerate() {
            *c = k as u8;
        }
        tx.q.set_desc(i, a, (HDR_LEN + len) as u32, 0, 0);
    }

    say!("netbench: tx start");
    delay_us(100_000);
    let clock = Clock::start();
    let t0 = hw::rdtsc();
    let end = deadline(TX_US);
    let mut free = [0u16; MAX_RING as usize];
    let mut nfree = tx.size() as usize;
    for (i, f) in free.iter_mut().take(nfree).enumerate() {
        *f = i as u16;
    }
    let mut sent = 0u64;
    let mut drain_end = 0;
    loop {
        while let Some((id, _)) = tx.q.poll() {
            if nfree < tx.size() as usize {
                free[nfree] = (id % tx.size() as u32) as u16;
                nfree += 1;
            }
            sent += 1;
        }
        let now = hw::rdtsc();
        if now < end {
            let old = tx.q.next_avail;
            while nfree > 0 {
                nfree -= 1;
                tx.q.push(free[nfree]);
            }
            tx.quiet();
            tx.kick(&t, old);
        } else if nfree == tx.size() as usize {
            break;
        } else if drain_end == 0 {
            drain_end = deadline(DRAIN_US);
        } else if now > drain_end {
            fail!("netbench: TX frames not used within 5 s");
        }
        core::hint::spin_loop();
    }
    let us = clock.us(t0, hw::rdtsc()).max(1);
    say!(
        "netbench: tx ",
        sent,
        " frames ",
        sent * len as u64,
        " bytes in ",
        us,
        " us"
    );

    // RX: every buffer posted, reposted as it is used, one kick per batch.
    for i in 0..rx.size() {
        let a = rx_bufs + i as u64 * stride;
        rx.q.set_desc(i, a, stride as u32, DESC_F_WRITE, 0);
        rx.q.push(i);
    }
    rx.quiet();
    t.notify(0);
    say!("netbench: rx ready");
    let clock = Clock::start();
    let (mut frames, mut bytes) = (0u64, 0u64);
    let (mut first, mut last) = (0u64, 0u64);
    let give_up = deadline(FIRST_US);
    let stop = deadline(RX_MAX_US);
    let idle = tsc_per_us() * IDLE_US;
    loop {
        let old = rx.q.next_avail;
        while let Some((id, n)) = rx.q.poll() {
            let id = (id % rx.size() as u32) as u16;
            let n = (n as u64).min(stride);
            let a = rx_bufs + id as u64 * stride + HDR_LEN as u64 + 12;
            // SAFETY: inside the region; the device is done with this buffer.
            let et = unsafe {
                [
                    read_volatile(a as *const u8),
                    read_volatile((a + 1) as *const u8),
                ]
            };
            if n >= (HDR_LEN + 14) as u64 && et == ETHERTYPE {
                last = hw::rdtsc();
                if frames == 0 {
                    first = last;
                }
                frames += 1;
                bytes += n - HDR_LEN as u64;
            }
            rx.q.push(id);
        }
        rx.quiet();
        rx.kick(&t, old);
        let now = hw::rdtsc();
        if frames == 0 && now > give_up {
            fail!("netbench: no frame arrived within 20 s");
        }
        if frames > 0 && (now > last + idle || now > stop) {
            break;
        }
        core::hint::spin_loop();
    }
    let us = clock.us(first, last).max(1);
    say!(
        "netbench: rx ",
        frames,
        " frames ",
        bytes,
        " bytes in ",
        us,
        " us"
    );
}
