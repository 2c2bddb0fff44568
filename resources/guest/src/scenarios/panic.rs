//! `panic`: the guest dies by triple fault; the VMM must exit non-zero.

use crate::{hw, Ctx};

pub fn run(_ctx: &Ctx, _arg: &[u8]) {
    say!("panic: triple fault now");
    hw::triple_fault()
}
