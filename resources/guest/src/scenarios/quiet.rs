//! `quiet=<ms>[,<rounds>]`: prints `quiet: start`, stays silent for `<ms>` ms (default 300)
//! without a single exit to the VMM, prints `quiet: end`, and then stays silent forever. The
//! host sees whether console output that no later exit pushes out still arrives, both while
//! the VMM coalesces console writes and after it stopped doing so for a quiet guest, and
//! whether the VMM keeps waking up while the guest says nothing.
//!
//! With `<rounds>`, `quiet: round <i> ` and a 48-byte filler are printed `<rounds>` times
//! before `quiet: end`, each followed by a pause of 20 to 44 ms (varying round by round), so
//! that lines start just before, at and after the moment the VMM stops coalescing.

use super::parse_dec;
use crate::{hw, Ctx};

const FILLER: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUV";

pub fn run(_ctx: &Ctx, arg: &[u8]) {
    let mut parts = arg.splitn(2, |&c| c == b',');
    let ms = parts.next().and_then(parse_dec).unwrap_or(300);
    let rounds = parts.next().and_then(parse_dec).unwrap_or(0);
    // Calibrating reads the boot timer, which exits: done before the first line.
    let per_ms = super::ticks::tsc_per_us() * 1000;
    let spin = |ms: u64| {
        let end = hw::rdtsc() + ms * per_ms;
        while hw::rdtsc() < end {
            core::hint::spin_loop();
        }
    };
    say!("quiet: start");
    spin(ms);
    for i in 0..rounds {
        say!("quiet: round ", i, " ", FILLER);
        spin(20 + (i * 7) % 25);
    }
    say!("quiet: end");
    loop {
        core::hint::spin_loop();
    }
}
