//! `fuzzblk=<seed>`: 3000 well-formed chains with random contents on every
//! block device: request types valid and not (IN, OUT, FLUSH, GET_ID,
//! DISCARD, WRITE_ZEROES, any), sectors in range, at and past the end, and
//! ones whose byte offset overflows, data of any length (0, odd, whole
//! sectors, the 64 KiB buffer) in either direction. Every chain must come
//! back within 5 s, and a write to a read-only drive, or anything that
//! reaches past the drive's end, must not succeed. Prints per drive
//! `fuzzblk: drive <n> (ro=<0|1>): <requests> requests, ok <a>, ioerr <b>,
//! unsupp <c>, other <d>`, then `fuzzblk: survived`.

use crate::rand::XorShift;
use crate::virtio::blk::*;
use crate::Ctx;

const REQUESTS: u32 = 3000;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

pub fn run(ctx: &Ctx, arg: &[u8]) {
    let seed = crate::scenarios::parse_dec(arg).unwrap_or(1);
    let mut r = XorShift::new(seed);
    let mut nth = 0;
    while let Some(base) = Blk::find(ctx.bp.cmdline(), nth) {
        let mut b = match Blk::open(base) {
            Ok(b) => b,
            Err(e) => fail!("fuzzblk: drive ", nth as u64, ": ", e),
        };
        let cap = b.capacity;
        let mut counts = [0u64; 4];
        for i in 0..REQUESTS {
            let any = r.next();
            let kind = r.pick(&[T_IN, T_IN, T_OUT, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES, any as u32]);
            let sector = match r.below(6) {
                0 => cap.saturating_sub(r.below(4)),
                1 => cap + r.below(4),
                2 => r.pick(&[u64::MAX, u64::MAX / 512, 1 << 55, any]),
                _ => r.below(cap.max(1)),
            };
            let len = match r.below(6) {
                0 => 0,
                1 => r.pick(&[1u32, 511, 513]),
                2 => DATA_LEN as u32,
                _ => 512 * (1 + r.below((DATA_LEN / 512) as u64) as u32),
            };
            let dev_writes = match kind {
                T_IN | T_GET_ID => r.below(8) != 0,
                _ => r.below(8) == 0,
            };
            let status = match b.request(kind, sector, DATA.addr(), len, dev_writes) {
                Done::Status(s, _) => s,
                Done::Timeout => fail!(
                    "fuzzblk: drive ", nth as u64, ": request ", i as u64, " (type ", kind as u64,
                    ", sector ", sector, ", ", len as u64, " bytes) never came back"
                ),
            };
            let writes = matches!(kind, T_OUT | T_DISCARD | T_WRITE_ZEROES);
            let past_end = matches!(kind, T_IN | T_OUT)
                && (sector > cap || u64::from(len).div_ceil(512) > cap - sector);
            if status == S_OK && ((writes && b.ro) || past_end) {
                fail!(
                    "fuzzblk: drive ", nth as u64, ": request ", i as u64, " (type ", kind as u64,
                    ", sector ", sector, ", ", len as u64, " bytes, ro=", b.ro as u64, ") succeeded"
                );
            }
            counts[match status {
                S_OK => 0,
                S_IOERR => 1,
                S_UNSUPP => 2,
                _ => 3,
            }] += 1;
        }
        say!(
            "fuzzblk: drive ", nth as u64, " (ro=", b.ro as u64, "): ", REQUESTS, " requests, ok ",
            counts[0], ", ioerr ", counts[1], ", unsupp ", counts[2], ", other ", counts[3]
        );
        b.t.reset();
        nth += 1;
    }
    if nth == 0 {
        fail!("fuzzblk: no block device on the command line");
    }
    say!("fuzzblk: survived");
}
