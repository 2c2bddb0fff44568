//! virtio drivers for the test guest: the virtio-mmio (version 2) transport,
//! split virtqueues, and small block and entropy drivers. Interrupts are off
//! in this guest, so every request is polled on the used ring with a TSC
//! deadline.
//!
//! Devices are found through the kernel command-line tokens
//! `virtio_mmio.device=4K@0x<addr>:<gsi>` the VMM appends (attach order).
//! Memory the devices see (rings, request buffers) lives in page-aligned
//! statics: physical = virtual addresses in this guest.

#![allow(dead_code)] // a library for later scenarios (net, vsock) too

pub mod blk;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod rng;
pub mod vsock;

use crate::hw;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

pub const DEVICE_ID_NET: u32 = 1;
pub const DEVICE_ID_BLOCK: u32 = 2;
pub const DEVICE_ID_ENTROPY: u32 = 4;
pub const DEVICE_ID_VSOCK: u32 = 19;

/// Page-aligned memory shared with a device.
#[repr(C, align(4096))]
pub struct Dma<const N: usize>(UnsafeCell<[u8; N]>);

// SAFETY: only the BSP uses the virtio drivers; the device is the other party.
unsafe impl<const N: usize> Sync for Dma<N> {}

impl<const N: usize> Dma<N> {
    pub const fn new() -> Self {
        Dma(UnsafeCell::new([0; N]))
    }
    /// Guest-physical (= virtual) address.
    pub fn addr(&self) -> u64 {
        self.0.get() as u64
    }
    pub const fn len(&self) -> usize {
        N
    }
    /// The bytes, read after the device finished with them.
    pub fn bytes(&self, len: usize) -> &[u8] {
        let n = len.min(N);
        // SAFETY: inside the static; no request is in flight when this is read.
        unsafe { core::slice::from_raw_parts(self.0.get() as *const u8, n) }
    }
}

/// One `virtio_mmio.device=<size>@<addr>:<gsi>` token: (window address, GSI).
pub fn parse_token(token: &[u8]) -> Option<(u64, u32)> {
    let rest = token.strip_prefix(b"virtio_mmio.device=")?;
    let at = rest.iter().position(|&c| c == b'@')?;
    let rest = &rest[at + 1..];
    let rest = rest
        .strip_prefix(b"0x")
        .or_else(|| rest.strip_prefix(b"0X"))?;
    let colon = rest.iter().position(|&c| c == b':').unwrap_or(rest.len());
    let mut addr = 0u64;
    if colon == 0 || colon > 16 {
        return None;
    }
    for &c in &rest[..colon] {
        let d = (c as char).to_digit(16)? as u64;
        addr = addr << 4 | d;
    }
    let gsi = if colon < rest.len() {
        crate::scenarios::parse_dec(&rest[colon + 1..])? as u32
    } else {
        0
    };
    Some((addr, gsi))
}

/// Every virtio-mmio device on the command line, in order.
pub fn devices(cmdline: &[u8]) -> impl Iterator<Item = (u64, u32)> + '_ {
    cmdline
        .split(|c| c.is_ascii_whitespace())
        .filter_map(parse_token)
}

/// The `nth` (from 0) device with this device id: its window address.
pub fn find(cmdline: &[u8], device_id: u32, nth: usize) -> Option<u64> {
    devices(cmdline)
        .map(|(a, _)| a)
        .filter(|&a| {
            let t = mmio::Transport::new(a);
            t.magic_ok() && t.device_id() == device_id
        })
        .nth(nth)
}

static TSC_PER_US: AtomicU64 = AtomicU64::new(0);

/// TSC cycles per microsecond, measured once against ember's boot timer (a
/// 3 GHz guess without it: timeouts are hang guards, not measurements).
pub fn tsc_per_us() -> u64 {
    let cached = TSC_PER_US.load(Ordering::Relaxed);
    if cached != 0 {
        return cached;
    }
    let us0 = hw::boot_time_us();
    let v = if us0 == 0 {
        3000
    } else {
        let t0 = hw::rdtsc();
        while hw::boot_time_us() < us0 + 1000 {
            core::hint::spin_loop();
        }
        let us1 = hw::boot_time_us();
        ((hw::rdtsc() - t0) / (us1 - us0).max(1)).max(1)
    };
    TSC_PER_US.store(v, Ordering::Relaxed);
    v
}

/// A deadline `us` microseconds from now, in TSC cycles.
pub fn deadline(us: u64) -> u64 {
    hw::rdtsc().saturating_add(tsc_per_us().saturating_mul(us))
}

/// Spins for `us` microseconds.
pub fn delay_us(us: u64) {
    let end = deadline(us);
    while hw::rdtsc() < end {
        core::hint::spin_loop();
    }
}
