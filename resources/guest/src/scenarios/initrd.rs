//! `initrd`: FNV-1a 64 of the ramdisk the VMM loaded.

use crate::serial::Hex;
use crate::Ctx;

pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

pub fn run(ctx: &Ctx, _arg: &[u8]) {
    match ctx.bp.ramdisk() {
        None => say!("initrd: none"),
        Some((addr, size)) => {
            if !ctx.bp.is_ram(addr, size) {
                fail!(
                    "initrd: [",
                    Hex(addr, 8),
                    ", +",
                    size,
                    ") is not in e820 RAM"
                );
            }
            let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, size as usize) };
            say!("initrd: size=", size, " fnv1a64=", Hex(fnv1a64(bytes), 16));
        }
    }
}
