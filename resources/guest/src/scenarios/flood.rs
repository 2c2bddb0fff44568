//! `flood=<lines>`: prints `<lines>` (default 1000) console lines of exactly
//! 64 bytes each, newline included (`flood: 00000042 ` and filler), then
//! `flood: printed <lines> lines, <bytes> bytes`. Exercises the serial
//! console's rate limiter: a guest that prints far more than the host allows.

use super::parse_dec;
use crate::Ctx;

/// Bytes per line, newline included.
const LINE: usize = 64;

pub fn run(_ctx: &Ctx, arg: &[u8]) {
    let n = parse_dec(arg).unwrap_or(1000).min(10_000_000);
    let mut line = [b'.'; LINE - 1];
    line[..7].copy_from_slice(b"flood: ");
    line[15] = b' ';
    for (i, c) in line[16..].iter_mut().enumerate() {
        *c = b'a' + (i % 26) as u8;
    }
    for i in 0..n {
        let mut v = i;
        for d in line[7..15].iter_mut().rev() {
            *d = b'0' + (v % 10) as u8;
            v /= 10;
        }
        say!(&line[..]);
    }
    say!("flood: printed ", n, " lines, ", n * LINE as u64, " bytes");
}
