//! `wild`: accesses where no device is; the VMM must log, ignore and go on.

use crate::hw::*;
use crate::Ctx;

const MMIO: [u64; 3] = [0xD000_0000, 0xC000_0000 + 0x10_0000, 0xFEB0_0000];
const PIO: [u16; 3] = [0x510, 0x2f8, 0xcf8];
const WILD_BOOT_DONE: u32 = 1000;

pub fn run(_ctx: &Ctx, _arg: &[u8]) {
    let mut sink = 0u64;
    for &a in &MMIO {
        unsafe {
            sink ^= mmio_read8(a) as u64;
            sink ^= mmio_read16(a + 2) as u64;
            sink ^= mmio_read32(a + 4) as u64;
            sink ^= mmio_read64(a + 8);
            mmio_write8(a, 0x5a);
            mmio_write16(a + 2, 0x5a5a);
            mmio_write32(a + 4, 0x5a5a_5a5a);
            mmio_write64(a + 8, 0x5a5a_5a5a_5a5a_5a5a);
        }
    }
    for &p in &PIO {
        sink ^= inb(p) as u64;
        sink ^= inw(p) as u64;
        sink ^= inl(p) as u64;
        outb(p, 0x5a);
        outw(p, 0x5a5a);
        outl(p, 0x8000_0000);
    }
    core::hint::black_box(sink);
    // The boot timer's "booted" write, over and over: the VMM's log must not follow.
    for _ in 0..WILD_BOOT_DONE {
        boot_done();
    }
    say!("wild: survived");
}
