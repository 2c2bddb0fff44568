//! `fuzzdev=<seed>`: a random driver against every virtio-mmio device on the
//! command line. Each round picks a device and does one of: a write of an
//! interesting or random value to any register or config offset (any width,
//! aligned or not), a read, a reset, random bytes over the rings, or a whole
//! queue set-up (random size, ring addresses in scratch memory or outside RAM,
//! descriptors with random addresses, lengths, flags and links, a random avail
//! index) followed by a notify. Every descriptor a chain can reach is one this
//! scenario wrote, and its buffer lies inside the scenario's scratch pages or
//! outside guest RAM (128 MiB expected), so the device may write wherever the
//! chains say without hurting the guest itself.
//! Prints `fuzzdev: <rounds> rounds on <n> devices, seed <s>` and, after
//! resetting every device, `fuzzdev: survived` once all RAM outside the guest's
//! own image (which holds the scratch pages) is found as it was before the
//! rounds: the first page exactly, the rest by hash, leaving out the last page
//! of RAM, which the chains straddling its end may rightly reach. The host side
//! checks the rest: the VMM keeps running, later scenarios (`blk`, `rng`) still
//! work on the same devices.

use crate::rand::XorShift;
use crate::hw::{mmio_read16, mmio_read32, mmio_read8, mmio_write16, mmio_write32, mmio_write8};
use crate::virtio::mmio::{self, Transport};
use crate::virtio::queue::PAGE;
use crate::virtio::{delay_us, devices, Dma};
use crate::Ctx;
use core::hint::spin_loop;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

const ROUNDS: u32 = 3000;
/// Queue q's descriptor table is page 2q, its avail and used rings page 2q + 1 (queues
/// 0-3); buffers (and an indirect table) start at page 8 and end by page 16. Pages 16-23
/// are a guard: a device reading a descriptor while this scenario rewrites it may pair a
/// new address with an old length, which reaches at most 8 pages further.
const SCRATCH_PAGES: usize = 24;
const BUFFERS: usize = 8 * PAGE;
const BUFFERS_END: usize = 16 * PAGE;
static SCRATCH: Dma<{ SCRATCH_PAGES * PAGE }> = Dma::new();

/// Guest-physical addresses no buffer may use: outside 128 MiB of RAM, inside the MMIO
/// hole, at and straddling the end of RAM, and ones that overflow when a length is added.
const BAD: [u64; 6] = [
    0x10_0000_0000 - 0x1000,
    0xd000_0000,
    0x0800_0000,
    0x0800_0000 - 0x10,
    0xffff_ffff_ffff_f000,
    u64::MAX,
];

fn scratch(off: usize) -> u64 {
    SCRATCH.addr() + off as u64
}

fn poke<T>(off: usize, v: T) {
    if off + core::mem::size_of::<T>() <= SCRATCH.len() {
        // SAFETY: inside the static scratch pages, which only this scenario and the devices use.
        unsafe { core::ptr::write_volatile(scratch(off) as *mut T, v) }
    }
}

/// A buffer: mostly inside the scratch buffer pages (and then never past their end, so the
/// device writes only where this scenario allows), sometimes at a bad address with any
/// length.
fn buffer(r: &mut XorShift) -> (u64, u32) {
    let any = r.next() as u32;
    let len = r.pick(&[0, 1, 12, 16, 17, 512, 4096, 65536, 0x7fff_ffff, u32::MAX, any]);
    if r.below(5) == 0 {
        return (r.pick(&BAD), len);
    }
    let off = BUFFERS + r.below((BUFFERS_END - BUFFERS) as u64) as usize;
    let room = (BUFFERS_END - off) as u32;
    (scratch(off), len % (room + 1))
}

fn interesting(r: &mut XorShift) -> u32 {
    match r.below(4) {
        0 => r.next() as u32,
        1 => r.pick(&[0, 1, 2, 3, 4, 7, 8, 15, 16, 0x40, 0x80, 0xff, 0x100, 0x8000, 0xffff]),
        2 => r.pick(&[0x7fff_ffff, 0x8000_0000, 0xffff_fffe, 0xffff_ffff]),
        _ => (mmio::S_ACKNOWLEDGE | mmio::S_DRIVER | mmio::S_FEATURES_OK | mmio::S_DRIVER_OK) & r.next() as u32,
    }
}

const REGS: [u64; 20] = [
    mmio::DEVICE_FEATURES_SEL,
    mmio::DRIVER_FEATURES,
    mmio::DRIVER_FEATURES_SEL,
    mmio::QUEUE_SEL,
    mmio::QUEUE_NUM,
    mmio::QUEUE_NOTIFY,
    mmio::INTERRUPT_ACK,
    mmio::QUEUE_DESC_LOW,
    mmio::QUEUE_DESC_HIGH,
    mmio::QUEUE_DRIVER_LOW,
    mmio::QUEUE_DRIVER_HIGH,
    mmio::QUEUE_DEVICE_LOW,
    mmio::QUEUE_DEVICE_HIGH,
    mmio::MAGIC_VALUE,
    mmio::DEVICE_ID,
    mmio::CONFIG_GENERATION,
    mmio::CONFIG,
    mmio::CONFIG + 8,
    0x0a8,
    0xffc,
];

fn register_write(r: &mut XorShift, t: &Transport) {
    let off = if r.below(4) == 0 {
        r.below(0x1000)
    } else {
        r.pick(&REGS)
    };
    // Only `queue_attack` makes a queue ready or the device live, after it gave every queue
    // its rings: a queue nobody placed has its rings at address 0 (the reset value), where
    // the device would rightly write over the boot TSS, GDT and IDT.
    if off & !3 == mmio::STATUS || off & !3 == mmio::QUEUE_READY {
        return;
    }
    let a = t.base + off;
    let v = interesting(r);
    // SAFETY: an address inside the device's MMIO window; the VMM decides what it means.
    unsafe {
        match r.below(6) {
            0 => mmio_write8(a, v as u8),
            1 => mmio_write16(a, v as u16),
            _ => mmio_write32(a, v),
        }
    }
}

fn register_read(r: &mut XorShift, t: &Transport) {
    let a = t.base + r.below(0x1000);
    // SAFETY: as above.
    unsafe {
        match r.below(3) {
            0 => {
                mmio_read8(a);
            }
            1 => {
                mmio_read16(a);
            }
            _ => {
                mmio_read32(a);
            }
        }
    }
}

/// Offsets in a queue's ring page (a 256-entry avail ring takes 518 bytes, a used ring
/// 2054). All 256 descriptors of the largest queue are written at each fill, so whatever
/// index a chain reaches is one this scenario chose.
const AVAIL: usize = 0;
const USED: usize = 0x400;
const ENTRIES: usize = 256;

fn peek16(off: usize) -> u16 {
    // SAFETY: inside the static scratch pages (callers pass ring offsets).
    unsafe { core::ptr::read_volatile(scratch(off) as *const u16) }
}

/// Queue `q` set up the way the dice say: a random size, rings in its scratch page or at a
/// bad address, ready or not.
fn queue_setup(r: &mut XorShift, t: &Transport, q: u32) {
    t.write(mmio::QUEUE_SEL, q);
    let max = t.read(mmio::QUEUE_NUM_MAX);
    let size = match r.below(6) {
        0 => interesting(r) & 0xffff,
        _ => r.pick(&[1u32, 2, 4, 8, 16, 32, 64, 256]).min(max.max(1)),
    };
    t.write(mmio::QUEUE_NUM, size);
    let desc = 2 * q as usize * PAGE;
    let page = desc + PAGE;
    for (i, (lo, off)) in [
        (mmio::QUEUE_DESC_LOW, desc),
        (mmio::QUEUE_DRIVER_LOW, page + AVAIL),
        (mmio::QUEUE_DEVICE_LOW, page + USED),
    ]
    .into_iter()
    .enumerate()
    {
        // Now and then misaligned (by less than the alignment each ring needs).
        let v = if r.below(16) == 0 {
            r.pick(&BAD)
        } else {
            scratch(off + if r.below(16) == 0 { 1 + i } else { 0 })
        };
        t.write(lo, v as u32);
        t.write(lo + 4, (v >> 32) as u32);
    }
    poke::<u16>(page + AVAIL + 2, 0);
    poke::<u16>(page + USED + 2, 0);
    t.write(mmio::QUEUE_READY, (r.below(16) != 0) as u32);
}

/// New random chains on queue `q`, published by moving the avail index (mostly forward by
/// a few, sometimes anywhere), then a notify.
fn queue_fill(r: &mut XorShift, t: &Transport, q: u32) {
    let desc = 2 * (q as usize % 4) * PAGE;
    let page = desc + PAGE;
    for i in 0..ENTRIES {
        let d = desc + i * 16;
        let (addr, len) = buffer(r);
        poke::<u64>(d, addr);
        poke::<u32>(d + 8, len);
        poke::<u16>(d + 12, (r.next() & 7) as u16);
        poke::<u16>(d + 14, r.below(ENTRIES as u64 + 2) as u16);
    }
    let idx = peek16(page + AVAIL + 2);
    for k in 0..ENTRIES {
        let slot = (idx as usize + k) % ENTRIES;
        poke::<u16>(page + AVAIL + 4 + 2 * slot, r.below(ENTRIES as u64 + 2) as u16);
    }
    let next = match r.below(8) {
        0 => r.next() as u16,
        _ => idx.wrapping_add(1 + r.below(4) as u16),
    };
    poke::<u16>(page + AVAIL + 2, next);
    // An indirect table in a buffer page, for chains that set VIRTQ_DESC_F_INDIRECT.
    for i in 0..8 {
        let d = BUFFERS + i * 16;
        let (addr, len) = buffer(r);
        poke::<u64>(d, addr);
        poke::<u32>(d + 8, len);
        poke::<u16>(d + 12, (r.next() & 7) as u16);
        poke::<u16>(d + 14, r.below(10) as u16);
    }
    t.write(mmio::QUEUE_NOTIFY, if r.below(16) == 0 { r.next() as u32 } else { q });
    // Give the device's thread a moment to look at it before the next round changes it.
    delay_us(r.below(100));
    let isr = t.read(mmio::INTERRUPT_STATUS);
    t.write(mmio::INTERRUPT_ACK, isr);
}

/// Mostly a fresh negotiation with every queue set up and DRIVER_OK (so the device runs and
/// meets the chains), sometimes more chains on a device already running.
fn queue_attack(r: &mut XorShift, t: &Transport) {
    if r.below(3) != 0 {
        t.reset();
        t.set_status(mmio::S_ACKNOWLEDGE);
        t.set_status(mmio::S_ACKNOWLEDGE | mmio::S_DRIVER);
        let f = t.device_features() & (r.next() | r.next());
        t.write_driver_features(f | mmio::F_VERSION_1);
        t.set_status(mmio::S_ACKNOWLEDGE | mmio::S_DRIVER | mmio::S_FEATURES_OK);
        for q in 0..4 {
            queue_setup(r, t, q);
        }
        if r.below(16) != 0 {
            t.set_status(t.status() | mmio::S_DRIVER_OK);
        }
    }
    for _ in 0..1 + r.below(4) {
        let q = r.below(4) as u32;
        queue_fill(r, t, q);
    }
}

/// The first page of guest RAM, through asm loads (address 0 is a null pointer to Rust).
fn first_page(out: &mut [u64; 512]) {
    for (i, w) in out.iter_mut().enumerate() {
        // SAFETY: the identity-mapped first page of guest RAM, only read.
        *w = unsafe { crate::hw::mmio_read64(8 * i as u64) };
    }
}

extern "C" {
    static _end: u8;
}

/// A 64-bit FNV-1a over the words of RAM outside the guest image: from page 1 to 1 MiB, and
/// from the image's end to the last page of RAM (128 MiB at most: the limit `BAD` assumes).
fn outside_image_hash(ctx: &Ctx) -> u64 {
    let image_end = (core::ptr::addr_of!(_end) as u64).next_multiple_of(PAGE as u64);
    let ram_end = (ctx.bp.ram_mib() << 20).min(0x0800_0000);
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for (start, end) in [(PAGE as u64, 0x10_0000), (image_end, ram_end - PAGE as u64)] {
        let mut a = start;
        while a < end {
            // SAFETY: identity-mapped guest RAM, only read; no Rust object lives there.
            h = (h ^ unsafe { core::ptr::read_volatile(a as *const u64) })
                .wrapping_mul(0x100_0000_01b3);
            a += 8;
        }
    }
    h
}

/// The devices and seed the APs fuzz with, and the BSP's signal to start.
static DEVS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
static NDEVS: AtomicUsize = AtomicUsize::new(0);
static SEED: AtomicU64 = AtomicU64::new(0);
static GO: AtomicBool = AtomicBool::new(false);
static DONE: AtomicU32 = AtomicU32::new(0);

/// One vCPU at a time writes a device's registers. Otherwise one vCPU could make a queue
/// ready between another's reset (or its random write to a ring address) and the placing of
/// that queue's rings, and the device would rightly write where the guest left them (address 0
/// after a reset): the guest's own doing, which the checks below would blame on the device.
/// Register reads, ring contents and the other devices stay concurrent.
static WRITING: [AtomicBool; 8] = [const { AtomicBool::new(false) }; 8];

fn writing<R>(dev: usize, f: impl FnOnce() -> R) -> R {
    while WRITING[dev].swap(true, Ordering::Acquire) {
        spin_loop();
    }
    let res = f();
    WRITING[dev].store(false, Ordering::Release);
    res
}

fn rounds(r: &mut XorShift) {
    let n = NDEVS.load(Ordering::Acquire);
    for _ in 0..ROUNDS {
        let dev = r.below(n as u64) as usize;
        let t = Transport::new(DEVS[dev].load(Ordering::Relaxed));
        match r.below(10) {
            0..=2 => writing(dev, || register_write(r, &t)),
            3 => register_read(r, &t),
            4 => writing(dev, || t.reset()),
            5 => {
                // Avail and used rings only: a descriptor stays one this scenario made.
                for _ in 0..8 {
                    let page = (2 * r.below(4) as usize + 1) * PAGE;
                    poke::<u64>(page + r.below(PAGE as u64) as usize & !7, r.next());
                }
            }
            _ => writing(dev, || queue_attack(r, &t)),
        }
    }
}

fn generator(seed: u64, cpu: u32) -> XorShift {
    XorShift::new(seed ^ u64::from(cpu) << 32)
}

/// An AP's share: its own rounds, from when the BSP has taken its snapshots of RAM.
fn ap_rounds() {
    while !GO.load(Ordering::Acquire) {
        spin_loop();
    }
    let mut r = generator(SEED.load(Ordering::Relaxed), crate::hw::lapic_id());
    rounds(&mut r);
    DONE.fetch_add(1, Ordering::Release);
}

pub fn run(ctx: &Ctx, arg: &[u8]) {
    let seed = crate::scenarios::parse_dec(arg).unwrap_or(1);
    let mut n = 0;
    for (base, _) in devices(ctx.bp.cmdline()) {
        if n < DEVS.len() && Transport::new(base).magic_ok() {
            DEVS[n].store(base, Ordering::Relaxed);
            n += 1;
        }
    }
    if n == 0 {
        fail!("fuzzdev: no virtio device on the command line");
    }
    NDEVS.store(n, Ordering::Release);
    SEED.store(seed, Ordering::Release);
    // With more than one vCPU, every AP drives the devices at the same time as the BSP.
    let aps = if crate::acpi::cpus_or_fail(&ctx.bp).count() > 1 {
        crate::scenarios::smp::start_aps(ctx, Some(ap_rounds))
    } else {
        0
    };
    // The first page of RAM (boot TSS, GDT, IDT) is nobody's buffer: it must come out as it
    // went in; so must the rest outside the image.
    let mut low = [0u64; 512];
    first_page(&mut low);
    let outside = outside_image_hash(ctx);
    GO.store(true, Ordering::Release);
    rounds(&mut generator(seed, crate::hw::lapic_id()));
    let t0 = crate::hw::rdtsc();
    while (DONE.load(Ordering::Acquire) as usize) < aps {
        if crate::hw::rdtsc().wrapping_sub(t0) > 100_000_000_000 {
            fail!("fuzzdev: the APs did not finish their rounds");
        }
        spin_loop();
    }
    if aps > 0 {
        crate::scenarios::smp::park_aps(ctx);
        say!("fuzzdev: ", aps as u64 + 1, " vCPUs at once");
    }
    say!("fuzzdev: ", ROUNDS, " rounds on ", n as u64, " devices, seed ", seed);
    for i in 0..n {
        Transport::new(DEVS[i].load(Ordering::Relaxed)).reset();
    }
    let mut now = [0u64; 512];
    first_page(&mut now);
    if let Some(at) = (0..512).find(|&i| now[i] != low[i]) {
        fail!("fuzzdev: a device wrote the first page of RAM, at ", 8 * at as u64);
    }
    if outside_image_hash(ctx) != outside {
        fail!("fuzzdev: a device wrote RAM outside the guest image and its buffers");
    }
    say!("fuzzdev: survived");
}
