//! `mem=<MiB>`: e820 adds up, and every page above the image holds what was written.

use crate::bootparams::MIB;
use crate::serial::Hex;
use crate::Ctx;
use core::ptr::{read_volatile, write_volatile};

const PAGE: u64 = 4096;
/// The guest's page tables map 0 .. 8 GiB.
const MAPPED: u64 = 8 << 30;

extern "C" {
    static _end: u8;
}

fn pattern(addr: u64) -> u64 {
    !addr ^ 0x5eed_0000_0000_0000
}

pub fn run(ctx: &Ctx, arg: &[u8]) {
    let Some(want) = super::parse_dec(arg) else {
        fail!("mem: bad size '", arg, "'");
    };
    let have = ctx.bp.ram_mib();
    if have != want {
        fail!("mem: e820 RAM is ", have, " MiB, expected ", want, " MiB");
    }
    let image_end = (core::ptr::addr_of!(_end) as u64).next_multiple_of(PAGE);
    let regions = || {
        ctx.bp.ram().filter_map(move |e| {
            let start = e.addr.max(image_end).next_multiple_of(PAGE);
            let end = e.end() & !(PAGE - 1);
            (start < end).then_some((start, end))
        })
    };
    for (_, end) in regions() {
        if end > MAPPED {
            fail!(
                "mem: RAM up to ",
                Hex(end, 9),
                " is beyond the guest's 8 GiB map"
            );
        }
    }
    let mut pages = 0u64;
    for (start, end) in regions() {
        let mut p = start;
        while p < end {
            unsafe {
                write_volatile(p as *mut u64, p);
                write_volatile((p + PAGE - 8) as *mut u64, pattern(p));
            }
            p += PAGE;
            pages += 1;
        }
    }
    for (start, end) in regions() {
        let mut p = start;
        while p < end {
            let (a, b) = unsafe {
                (
                    read_volatile(p as *const u64),
                    read_volatile((p + PAGE - 8) as *const u64),
                )
            };
            if a != p || b != pattern(p) {
                fail!(
                    "mem: page ",
                    Hex(p, 9),
                    " reads ",
                    Hex(a, 16),
                    "/",
                    Hex(b, 16)
                );
            }
            p += PAGE;
        }
    }
    // The rest of RAM (below the image end: low memory, the image and its zero-filled
    // statics) is read, one word per page, so that every page of guest RAM has been touched.
    let mut below = 0u64;
    for e in ctx.bp.ram() {
        let mut p = e.addr.max(PAGE).next_multiple_of(PAGE);
        while p < e.end().min(image_end) {
            // SAFETY: identity-mapped guest RAM, only read.
            unsafe { read_volatile(p as *const u64) };
            p += PAGE;
            below += 1;
        }
    }
    say!(
        "mem: ",
        pages,
        " pages (",
        pages * PAGE / MIB,
        " MiB) above the image written and verified, ",
        below,
        " below it read"
    );
    say!("mem: ", want, " MiB ok");
}
