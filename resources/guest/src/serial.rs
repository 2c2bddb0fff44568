//! COM1 output, one line at a time under a spin lock (so that APs can print).
//!
//! A line goes out with one `rep outsb`. When the VMM coalesces COM1 writes
//! (ember does), KVM emulates the whole string in the kernel: one trap per line
//! instead of one per byte, about 5 µs less per byte on the PVM hosts. Without
//! coalescing each iteration is a separate exit with a count of 1, exactly as
//! single `out`s, so any Firecracker-compatible VMM prints it the same.

use crate::hw;
use core::hint::spin_loop;
use core::sync::atomic::{AtomicU32, Ordering};

pub const COM1: u16 = 0x3f8;
const CAP: usize = 256;

static LOCK: AtomicU32 = AtomicU32::new(0);
fn write_raw(b: &[u8]) {
    hw::outsb(COM1, b);
}

fn lock() {
    while LOCK.swap(1, Ordering::Acquire) != 0 {
        while LOCK.load(Ordering::Relaxed) != 0 {
            spin_loop();
        }
    }
}

fn unlock() {
    LOCK.store(0, Ordering::Release);
}

/// A line being built; `end` appends "\n" and writes it out atomically.
pub struct Line {
    len: usize,
    buf: [u8; CAP],
}

impl Line {
    pub const fn new() -> Line {
        Line {
            len: 0,
            buf: [0; CAP],
        }
    }

    /// Appends bytes; a line longer than the buffer is cut (never fails).
    pub fn bytes(&mut self, b: &[u8]) {
        for &c in b {
            if self.len < CAP - 1 {
                self.buf[self.len] = c;
                self.len += 1;
            }
        }
    }

    pub fn dec(&mut self, mut v: u64) {
        let mut tmp = [0u8; 20];
        let mut i = tmp.len();
        while i > 0 {
            i -= 1;
            tmp[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.bytes(tmp.get(i..).unwrap_or(&[]));
    }

    pub fn hex(&mut self, v: u64, digits: u32) {
        let mut d = digits.clamp(1, 16);
        while d > 0 {
            d -= 1;
            let nib = ((v >> (d * 4)) & 0xf) as u8;
            self.bytes(&[if nib < 10 {
                b'0' + nib
            } else {
                b'a' + nib - 10
            }]);
        }
    }

    fn finish(&mut self) -> &[u8] {
        let n = self.len.min(CAP - 1);
        self.buf[n] = b'\n';
        &self.buf[..n + 1]
    }

    pub fn end(mut self) {
        let b = self.finish();
        lock();
        write_raw(b);
        unlock();
    }

    /// For the panic path: take the lock if it frees up soon, else write anyway.
    pub fn end_unlocked(mut self) {
        let b = self.finish();
        let mut n = 0u32;
        while LOCK.swap(1, Ordering::Acquire) != 0 && n < 10_000_000 {
            spin_loop();
            n += 1;
        }
        write_raw(b);
        unlock();
    }
}

/// Things `say!` can print.
pub trait Put {
    fn put(self, l: &mut Line);
}

impl Put for &str {
    fn put(self, l: &mut Line) {
        l.bytes(self.as_bytes())
    }
}

impl Put for &[u8] {
    fn put(self, l: &mut Line) {
        l.bytes(self)
    }
}

macro_rules! put_unsigned {
    ($($t:ty),*) => {$(
        impl Put for $t {
            fn put(self, l: &mut Line) {
                l.dec(self as u64)
            }
        }
    )*};
}
put_unsigned!(u8, u16, u32, u64, usize);

/// Lowercase hexadecimal with a fixed number of digits.
pub struct Hex(pub u64, pub u32);

impl Put for Hex {
    fn put(self, l: &mut Line) {
        l.hex(self.0, self.1)
    }
}

/// Prints one line: `say!("a = ", 5, ", b = ", Hex(x, 8))`.
macro_rules! say {
    ($($e:expr),* $(,)?) => {{
        let mut line = $crate::serial::Line::new();
        $( $crate::serial::Put::put($e, &mut line); )*
        line.end();
    }};
}

/// Prints `ember-guest: FAIL: ...` and triple-faults.
macro_rules! fail {
    ($($e:expr),* $(,)?) => {{
        say!("ember-guest: FAIL: " $(, $e)*);
        $crate::hw::triple_fault()
    }};
}

/// Writes one line of any length (`Line` cuts at 255 bytes): the parts, then "\n".
pub fn say_long(parts: &[&[u8]]) {
    lock();
    for p in parts {
        write_raw(p);
    }
    write_raw(b"\n");
    unlock();
}
