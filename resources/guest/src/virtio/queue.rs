//! A split virtqueue in one 4 KiB page: descriptor table at 0, available
//! ring at 0x400, used ring at 0x800 (room for 64 entries; the driver uses
//! at most `mmio::MAX_QUEUE`). One request is in flight at a time, so the
//! drivers simply rebuild descriptors from index 0 for each request.

use super::deadline;
use crate::hw;
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;

const AVAIL: u64 = 0x400;
const USED: u64 = 0x800;
pub const PAGE: usize = 4096;

pub struct Queue {
    /// Page-aligned base of the rings.
    pub mem: u64,
    pub size: u16,
    /// The driver's next avail index (free-running).
    pub next_avail: u16,
    /// The used index consumed so far (free-running).
    pub last_used: u16,
}

impl Queue {
    /// A queue of `size` entries on the page at `mem`, rings zeroed.
    pub fn new(mem: u64, size: u16) -> Queue {
        // SAFETY: `mem` is a page the caller owns; no device uses it now.
        unsafe { core::ptr::write_bytes(mem as *mut u8, 0, PAGE) };
        fence(Ordering::SeqCst);
        Queue {
            mem,
            size,
            next_avail: 0,
            last_used: 0,
        }
    }

    pub fn desc_addr(&self) -> u64 {
        self.mem
    }
    pub fn avail_addr(&self) -> u64 {
        self.mem + AVAIL
    }
    pub fn used_addr(&self) -> u64 {
        self.mem + USED
    }

    fn w16(a: u64, v: u16) {
        // SAFETY: inside the queue page.
        unsafe { write_volatile(a as *mut u16, v) }
    }
    fn r16(a: u64) -> u16 {
        // SAFETY: inside the queue page.
        unsafe { read_volatile(a as *const u16) }
    }
    fn r32(a: u64) -> u32 {
        // SAFETY: inside the queue page.
        unsafe { read_volatile(a as *const u32) }
    }

    /// Writes descriptor `i` (any index below 64, even past `size`).
    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.mem + 16 * (i as u64 % 64);
        // SAFETY: inside the descriptor table.
        unsafe {
            write_volatile(d as *mut u64, addr);
            write_volatile((d + 8) as *mut u32, len);
            write_volatile((d + 12) as *mut u16, flags);
            write_volatile((d + 14) as *mut u16, next);
        }
    }

    /// Puts `head` in the next avail slot (without publishing it).
    pub fn put_avail(&self, slot: u16, head: u16) {
        Self::w16(
            self.avail_addr() + 4 + 2 * (slot % self.size.max(1)) as u64,
            head,
        );
    }

    /// Publishes avail.idx (any value: the evil scenario lies here).
    pub fn set_avail_idx(&self, idx: u16) {
        fence(Ordering::SeqCst);
        Self::w16(self.avail_addr() + 2, idx);
        fence(Ordering::SeqCst);
    }

    /// Makes the chain starting at `head` available.
    pub fn push(&mut self, head: u16) {
        self.put_avail(self.next_avail, head);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.set_avail_idx(self.next_avail);
    }

    pub fn used_idx(&self) -> u16 {
        Self::r16(self.used_addr() + 2)
    }

    /// The next used element (id, len), if the device published one.
    pub fn poll(&mut self) -> Option<(u32, u32)> {
        if self.used_idx() == self.last_used {
            return None;
        }
        fence(Ordering::SeqCst);
        let e = self.used_addr() + 4 + 8 * (self.last_used % self.size.max(1)) as u64;
        let id = Self::r32(e);
        let len = Self::r32(e + 4);
        self.last_used = self.last_used.wrapping_add(1);
        Some((id, len))
    }

    /// Polls for up to `us` microseconds.
    pub fn wait(&mut self, us: u64) -> Option<(u32, u32)> {
        let end = deadline(us);
        loop {
            if let Some(e) = self.poll() {
                return Some(e);
            }
            if hw::rdtsc() >= end {
                return None;
            }
            core::hint::spin_loop();
        }
    }
}
