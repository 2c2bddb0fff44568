//! `ticks`: never finishes; prints `tick <n>` about every 10 ms of guest time, counting its
//! own ticks. While the VM is paused no tick is printed and none is skipped, so a host test
//! sees the count stop and resume where it was. Also keeps a guest running for measurements.

use crate::{hw, Ctx};

const TICK_US: u64 = 10_000;

/// TSC cycles per microsecond, measured against the boot timer (or a 2 GHz guess without it).
pub fn tsc_per_us() -> u64 {
    let us0 = hw::boot_time_us();
    if us0 == 0 {
        return 2000;
    }
    let t0 = hw::rdtsc();
    while hw::boot_time_us() < us0 + 2000 {
        core::hint::spin_loop();
    }
    let us1 = hw::boot_time_us();
    ((hw::rdtsc() - t0) / (us1 - us0).max(1)).max(1)
}

pub fn run(_ctx: &Ctx, _arg: &[u8]) {
    let per_tick = tsc_per_us() * TICK_US;
    let mut n: u64 = 0;
    let mut next = hw::rdtsc() + per_tick;
    loop {
        // A pause stops the TSC's consumer, not the TSC: after a resume, tick once and then
        // re-arm from now rather than printing the ticks "missed" while paused.
        let now = hw::rdtsc();
        if now >= next {
            n += 1;
            say!("tick ", n);
            next = now + per_tick;
        }
        core::hint::spin_loop();
    }
}
