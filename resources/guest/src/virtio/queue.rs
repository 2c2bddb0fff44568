//! A split virtqueue in one 4 KiB page: descriptor table at 0, available
//! ring at 0x400, used ring at 0x800 (room for 64 entries; the driver uses
//! at most `mmio::MAX_QUEUE`). One request is in flight at a time, so the
//! drivers simply rebuild descriptors from index 0 for each request.
//!
//! [`Queue::big`] lays a queue of up to 256 entries out over four pages
//! (descriptors at 0, available ring at 0x1000, used ring at 0x2000), for
//! drivers that keep many requests in flight; with VIRTIO_RING_F_EVENT_IDX
//! such a driver uses `used_event` / `avail_event` ([`Queue::set_used_event`],
//! [`Queue::publish`]).

use super::deadline;
use crate::hw;
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;

const AVAIL: u64 = 0x400;
const USED: u64 = 0x800;
pub const PAGE: usize = 4096;
/// The memory of a [`Queue::big`] queue.
pub const BIG_BYTES: usize = 4 * PAGE;
pub const BIG_MAX: u16 = 256;

pub struct Queue {
    /// Page-aligned base of the rings.
    pub mem: u64,
    pub size: u16,
    /// The driver's next avail index (free-running).
    pub next_avail: u16,
    /// The used index consumed so far (free-running).
    pub last_used: u16,
    /// Offsets of the available and used rings from `mem`.
    avail_off: u64,
    used_off: u64,
    /// Descriptor indexes are taken modulo this (the table's room).
    desc_room: u16,
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
            avail_off: AVAIL,
            used_off: USED,
            desc_room: 64,
        }
    }

    /// A queue of `size` (a power of two, at most `BIG_MAX`) entries on the
    /// `BIG_BYTES` of page-aligned memory at `mem`, rings zeroed.
    pub fn big(mem: u64, size: u16) -> Queue {
        // SAFETY: `mem` is BIG_BYTES the caller owns; no device uses them now.
        unsafe { core::ptr::write_bytes(mem as *mut u8, 0, BIG_BYTES) };
        fence(Ordering::SeqCst);
        Queue {
            mem,
            size: size.clamp(1, BIG_MAX),
            next_avail: 0,
            last_used: 0,
            avail_off: 0x1000,
            used_off: 0x2000,
            desc_room: BIG_MAX,
        }
    }

    pub fn desc_addr(&self) -> u64 {
        self.mem
    }
    pub fn avail_addr(&self) -> u64 {
        self.mem + self.avail_off
    }
    pub fn used_addr(&self) -> u64 {
        self.mem + self.used_off
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
        let d = self.mem + 16 * (i % self.desc_room) as u64;
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

    /// EVENT_IDX: the driver's `used_event` (after the available ring): the
    /// device interrupts when its used index moves past it.
    pub fn set_used_event(&self, v: u16) {
        Self::w16(self.avail_addr() + 4 + 2 * self.size as u64, v);
        fence(Ordering::SeqCst);
    }

    /// EVENT_IDX: the device's `avail_event` (after the used ring): it wants a
    /// notification when the available index moves past it.
    pub fn avail_event(&self) -> u16 {
        Self::r16(self.used_addr() + 4 + 8 * self.size as u64)
    }

    /// Publishes the entries put since the last publication (`put_avail` at
    /// slots `next_avail..next_avail + n`); returns whether the device must
    /// be notified. With `event_idx`, only when the new entries move the
    /// available index past the device's `avail_event` (the virtio spec's
    /// `vring_need_event`); without it, unless the device set
    /// VIRTQ_USED_F_NO_NOTIFY.
    pub fn publish(&mut self, n: u16, event_idx: bool) -> bool {
        if n == 0 {
            return false;
        }
        let old = self.next_avail;
        self.next_avail = old.wrapping_add(n);
        // set_avail_idx fences on both sides: the index is visible before
        // avail_event or the used flags are read.
        self.set_avail_idx(self.next_avail);
        if event_idx {
            let event = self.avail_event();
            self.next_avail.wrapping_sub(event).wrapping_sub(1) < self.next_avail.wrapping_sub(old)
        } else {
            Self::r16(self.used_addr()) & 1 == 0
        }
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
