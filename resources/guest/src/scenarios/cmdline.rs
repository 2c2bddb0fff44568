//! `cmdline`: prints the whole kernel command line, `cmdline: <line>`.

use crate::Ctx;

pub fn run(ctx: &Ctx, _arg: &[u8]) {
    crate::serial::say_long(&[b"cmdline: ", ctx.bp.cmdline()]);
}
