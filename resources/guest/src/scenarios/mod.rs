//! Scenarios, selected by whitespace-separated tokens on the kernel command
//! line. A token selects a scenario when it equals the scenario's name, or,
//! for names ending in '=', when it starts with the name (the rest is the
//! argument). Scenarios run in command-line order; all other tokens are
//! ignored. To add one: write a module with `pub fn run(ctx: &Ctx, arg: &[u8])`
//! and list it in `ALL`.

use crate::Ctx;

pub mod blk;
pub mod blkbench;
pub mod blkq;
pub mod cmdline;
pub mod evil;
pub mod evildev;
pub mod flood;
pub mod fuzzblk;
pub mod fuzzdev;
pub mod fuzzio;
pub mod fuzznet;
pub mod fuzzvsock;
pub mod hello;
pub mod initrd;
pub mod mem;
pub mod net;
pub mod netbench;
pub mod netgso;
pub mod panic;
pub mod quiet;
pub mod rng;
pub mod smp;
pub mod ticks;
pub mod vsock;
pub mod vsockbench;
pub mod wild;

pub struct Scenario {
    pub name: &'static str,
    pub run: fn(&Ctx, &[u8]),
}

pub const ALL: &[Scenario] = &[
    Scenario {
        name: "hello",
        run: hello::run,
    },
    Scenario {
        name: "smp",
        run: smp::run,
    },
    Scenario {
        name: "mem=",
        run: mem::run,
    },
    Scenario {
        name: "panic",
        run: panic::run,
    },
    Scenario {
        name: "wild",
        run: wild::run,
    },
    Scenario {
        name: "initrd",
        run: initrd::run,
    },
    Scenario {
        name: "ticks",
        run: ticks::run,
    },
    Scenario {
        name: "quiet=",
        run: quiet::run,
    },
    Scenario {
        name: "cmdline",
        run: cmdline::run,
    },
    Scenario {
        name: "blkwait",
        run: blk::wait_config,
    },
    Scenario {
        name: "blkwait=",
        run: blk::wait_config,
    },
    Scenario {
        name: "blk",
        run: blk::run,
    },
    Scenario {
        name: "blkbench",
        run: blkbench::run,
    },
    Scenario {
        name: "blk=",
        run: blkq::run,
    },
    Scenario {
        name: "blkbench=",
        run: blkbench::run,
    },
    Scenario {
        name: "rng",
        run: rng::run,
    },
    Scenario {
        name: "fuzzblk=",
        run: fuzzblk::run,
    },
    Scenario {
        name: "fuzzdev=",
        run: fuzzdev::run,
    },
    Scenario {
        name: "fuzzio=",
        run: fuzzio::run,
    },
    Scenario {
        name: "fuzznet=",
        run: fuzznet::run,
    },
    Scenario {
        name: "fuzzvsock=",
        run: fuzzvsock::run,
    },
    Scenario {
        name: "net",
        run: net::run,
    },
    Scenario {
        name: "vsock",
        run: vsock::run,
    },
    Scenario {
        name: "netbench=",
        run: netbench::run,
    },
    Scenario {
        name: "netgso",
        run: netgso::run,
    },
    Scenario {
        name: "vsockbench=",
        run: vsockbench::run,
    },
    Scenario {
        name: "evil",
        run: evil::run,
    },
    Scenario {
        name: "evilnet",
        run: evildev::net,
    },
    Scenario {
        name: "evilvsock",
        run: evildev::vsock,
    },
    Scenario {
        name: "flood=",
        run: flood::run,
    },
];

/// The argument (empty for plain names) when `token` selects `s`.
fn matches<'a>(s: &Scenario, token: &'a [u8]) -> Option<&'a [u8]> {
    let name = s.name.as_bytes();
    if name.last() == Some(&b'=') {
        token.strip_prefix(name)
    } else if token == name {
        Some(&[])
    } else {
        None
    }
}

/// Runs every scenario named on the command line; false if there was none.
pub fn run_all(ctx: &Ctx, cmdline: &[u8]) -> bool {
    let mut ran = false;
    for token in cmdline
        .split(|c| c.is_ascii_whitespace())
        .filter(|t| !t.is_empty())
    {
        for s in ALL {
            if let Some(arg) = matches(s, token) {
                (s.run)(ctx, arg);
                ran = true;
            }
        }
    }
    ran
}

/// Parses a decimal number (no sign, no suffix).
pub fn parse_dec(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    let mut v = 0u64;
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (c - b'0') as u64;
    }
    Some(v)
}
