//! `fuzzio=<seed>`: random port and MMIO accesses (reads and writes of 1, 2,
//! 4 and 8 bytes) for 20000 rounds: COM1's registers (its data port only ever
//! gets lower-case letters, so the console stays text), the i8042, the PIT and
//! PICs, any other port, the boot timer, unbacked guest-physical memory above
//! RAM and the rest of the 32-bit hole. Left alone: the i8042 commands that
//! pulse its output lines (0xf0-0xff, the reset among them), the LAPIC and
//! IOAPIC (an INIT to itself would be the guest's own doing) and the virtio
//! windows (`fuzzdev` covers them), and ports the boot TSS's I/O bitmap denies:
//! on PVM hosts a CPL 3 guest's IOPL 3 is not honoured, so the bitmap decides,
//! and with the TSS at address 0 it is low memory, where the GDT at 0x500 makes
//! some of ports 0x2800-0x29ff fault. Then COM1 is put back to 8N1 with no
//! loopback and interrupts off, and it prints `fuzzio: <n> rounds, seed <s>`
//! and `fuzzio: survived`.

use crate::rand::XorShift;
use crate::hw::*;
use crate::virtio::devices;
use crate::Ctx;

const ROUNDS: u32 = 20_000;

fn port(r: &mut XorShift) -> u16 {
    match r.below(8) {
        0..=2 => 0x3f8 + r.below(8) as u16,
        3 => [0x60, 0x64][r.below(2) as usize],
        4 => [0x20, 0x21, 0xa0, 0xa1, 0x40, 0x41, 0x42, 0x43, 0x61][r.below(9) as usize],
        _ => r.next() as u16,
    }
}

/// Whether the I/O bitmap of the boot TSS (at address 0, its I/O map base 0) allows the
/// `width` ports from `p`.
fn bitmap_allows(p: u16, width: u16) -> bool {
    (p..p.saturating_add(width)).all(|q| {
        // SAFETY: identity-mapped low guest RAM (the first 8 KiB), only read; asm loads,
        // as byte 0 is a null pointer to Rust.
        let byte = unsafe { mmio_read8(u64::from(q / 8)) };
        byte >> (q % 8) & 1 == 0
    })
}

fn pio(r: &mut XorShift) {
    let p = port(r);
    let v = r.next() as u32;
    let (dir, size) = (r.below(2), r.below(3));
    if !bitmap_allows(p, 1 << size) {
        return;
    }
    match (dir, size) {
        (0, 0) => {
            inb(p);
        }
        (0, 1) => {
            inw(p);
        }
        (0, _) => {
            inl(p);
        }
        // The i8042's "pulse output lines" commands: 0xfe resets the machine.
        _ if p == 0x64 && v as u8 >= 0xf0 => {}
        _ if p == 0x3f8 => outb(p, b'a' + (v % 26) as u8),
        (_, 0) => outb(p, v as u8),
        (_, 1) => outw(p, v as u16),
        _ => outl(p, v),
    }
}

fn in_virtio_window(ctx: &Ctx, a: u64) -> bool {
    devices(ctx.bp.cmdline()).any(|(base, _)| a.wrapping_add(8) >= base && a < base + 0x1000)
}

fn mmio(ctx: &Ctx, r: &mut XorShift) {
    let a = match r.below(4) {
        0 => BOOT_TIMER + r.below(16),
        1 => 0x0800_0000 + r.below(0xC000_0000 - 0x0800_0000),
        _ => 0xC000_0000 + r.below(0x3EC0_0000),
    };
    if in_virtio_window(ctx, a) {
        return;
    }
    let v = r.next();
    // SAFETY: not RAM (above the 128 MiB this scenario expects, or in the 32-bit hole below
    // the IOAPIC), and identity-mapped by the guest's page tables.
    unsafe {
        match r.below(8) {
            0 => {
                mmio_read8(a);
            }
            1 => {
                mmio_read16(a);
            }
            2 => {
                mmio_read32(a);
            }
            3 => {
                mmio_read64(a);
            }
            4 => mmio_write8(a, v as u8),
            5 => mmio_write16(a, v as u16),
            6 => mmio_write32(a, v as u32),
            _ => mmio_write64(a, v),
        }
    }
}

pub fn run(ctx: &Ctx, arg: &[u8]) {
    let seed = crate::scenarios::parse_dec(arg).unwrap_or(1);
    if ctx.bp.ram_mib() > 128 {
        fail!("fuzzio: expects at most 128 MiB of RAM");
    }
    let mut r = XorShift::new(seed);
    for _ in 0..ROUNDS {
        if r.below(2) == 0 {
            pio(&mut r);
        } else {
            mmio(ctx, &mut r);
        }
    }
    // COM1 as the rest of the guest expects it: 8N1, no loopback, no interrupts.
    outb(0x3fb, 0x03);
    outb(0x3f9, 0);
    outb(0x3fc, 0);
    say!("fuzzio: ", ROUNDS, " rounds, seed ", seed);
    say!("fuzzio: survived");
}
