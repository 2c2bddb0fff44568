//! `rng`: two 32-byte requests to the virtio entropy device.

use crate::serial::Hex;
use crate::virtio::rng::Rng;
use crate::Ctx;

pub fn run(ctx: &Ctx, _arg: &[u8]) {
    let Some(base) = Rng::find(ctx.bp.cmdline()) else {
        fail!("rng: no virtio entropy device on the command line");
    };
    let mut r = match Rng::open(base) {
        Ok(r) => r,
        Err(e) => fail!("rng: entropy device at ", Hex(base, 8), ": ", e),
    };
    let mut first = [0u8; 32];
    let Some(a) = r.fill(32) else {
        fail!("rng: first request timed out");
    };
    let n1 = a.len();
    first[..n1].copy_from_slice(a);
    let Some(b) = r.fill(32) else {
        fail!("rng: second request timed out");
    };
    let n2 = b.len();
    let differ = n1 != n2 || first[..n1] != *b;
    say!("rng: ", n1, " and ", n2, " bytes, differ=", differ as u8);
}
