//! `quiet=<ms>`: prints `quiet: start`, stays silent for `<ms>` ms (default 300) without a
//! single exit to the VMM, prints `quiet: end`, and then stays silent forever. The host sees
//! whether console output that no later exit pushes out still arrives, both while the VMM
//! coalesces console writes and after it stopped doing so for a quiet guest, and whether the
//! VMM keeps waking up while the guest says nothing.

use super::parse_dec;
use crate::{hw, Ctx};

pub fn run(_ctx: &Ctx, arg: &[u8]) {
    let ms = parse_dec(arg).unwrap_or(300);
    // Calibrating reads the boot timer, which exits: done before the first line.
    let per_ms = super::ticks::tsc_per_us() * 1000;
    say!("quiet: start");
    let end = hw::rdtsc() + ms * per_ms;
    while hw::rdtsc() < end {
        core::hint::spin_loop();
    }
    say!("quiet: end");
    loop {
        core::hint::spin_loop();
    }
}
