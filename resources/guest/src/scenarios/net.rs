//! `net`: the first virtio net device: prints its MAC, sends 8 broadcast
//! frames (ethertype 0x88b5, payload "ember-net <i>" padded to 64 bytes),
//! then for about 3 s echoes every 0x88b5 frame it receives, source and
//! destination swapped (source = its MAC).

use crate::serial::Hex;
use crate::virtio::net::Net;
use crate::virtio::{deadline, tsc_per_us};
use crate::{hw, Ctx};

const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const FRAMES: usize = 8;
const ECHO_US: u64 = 3_000_000;
const DEFAULT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

pub fn run(ctx: &Ctx, _arg: &[u8]) {
    let Some(base) = Net::find(ctx.bp.cmdline()) else {
        fail!("net: no virtio net device on the command line");
    };
    let mut n = match Net::open(base) {
        Ok(n) => n,
        Err(e) => fail!("net: net device at ", Hex(base, 8), ": ", e),
    };
    let mac = n.mac.unwrap_or(DEFAULT_MAC);
    let h = |i: usize| Hex(mac[i] as u64, 2);
    say!(
        "net: mac ",
        h(0),
        ":",
        h(1),
        ":",
        h(2),
        ":",
        h(3),
        ":",
        h(4),
        ":",
        h(5)
    );

    let mut frame = [0u8; 14 + 64];
    for i in 0..FRAMES {
        frame.fill(0);
        frame[..6].fill(0xff);
        frame[6..12].copy_from_slice(&mac);
        frame[12..14].copy_from_slice(&ETHERTYPE);
        let p = &mut frame[14..];
        p[..10].copy_from_slice(b"ember-net ");
        p[10] = b'0' + i as u8;
        if !n.send(&frame) {
            fail!("net: sending frame ", i, " timed out");
        }
    }
    say!("net: sent ", FRAMES, " frames");

    tsc_per_us();
    let end = deadline(ECHO_US);
    let mut echoed = 0u32;
    let mut out = [0u8; 1514];
    while hw::rdtsc() < end {
        let Some((id, f)) = n.poll_rx() else {
            core::hint::spin_loop();
            continue;
        };
        let len = f.len().min(out.len());
        let mine = len >= 14 && f[12..14] == ETHERTYPE;
        if mine {
            out[..len].copy_from_slice(&f[..len]);
        }
        n.repost(id);
        if mine {
            out[..6].copy_from_slice(&f[6..12]);
            out[6..12].copy_from_slice(&mac);
            if !n.send(&out[..len]) {
                fail!("net: echo timed out");
            }
            echoed += 1;
        }
    }
    say!("net: echoed ", echoed, " frames");
}
