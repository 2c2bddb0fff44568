//! Coalesced port I/O: KVM appends guest writes to registered ports (COM1's data register)
//! to a ring page instead of exiting to user space for each byte. A guest printing a line
//! then costs one exit instead of one per character — on these software-nested hosts an
//! exit costs ~20 µs, so this is most of a small guest's boot time.
//!
//! Every vCPU drains the ring before it handles an exit (so a write is always seen before a
//! later access of the same guest), and the VMM thread drains it on a timer (so output of a
//! guest that writes and then computes without exiting still appears).
//!
//! The timer runs only while output flows: once a tick finds nothing new, the VMM thread stops
//! coalescing (the guest's next write exits to ember as usual) and lets the timer lapse, so a
//! quiet guest costs no wake-ups at all. That next write has its vCPU ask the VMM thread,
//! through `wake`, to coalesce again and restart the timer.

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use kvm_bindings::{kvm_coalesced_mmio, kvm_coalesced_mmio_ring, KVM_COALESCED_MMIO_PAGE_OFFSET};
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

/// The ring page shared with KVM.
pub struct CoalescedRing {
    ring: NonNull<kvm_coalesced_mmio_ring>,
    page_size: usize,
    /// One consumer at a time: vCPU threads and the VMM thread all drain.
    lock: Mutex<()>,
    /// The coalesced port (one byte wide).
    port: u16,
    /// Whether KVM currently queues writes to `port`.
    active: AtomicBool,
    /// Entries drained so far: the VMM thread's timer compares it between ticks.
    drained: AtomicU64,
    /// Set by the vCPU that asked for coalescing again, until the VMM thread acts on it.
    wake_requested: AtomicBool,
    /// Signalled by a vCPU that wrote `port` while not coalescing; the VMM thread polls it.
    pub wake: EventFd,
}

// SAFETY: the mapping is process-wide and lives as long as this struct; every access to the
// consumer index goes through `lock`, and the producer (KVM) synchronises through the indices.
unsafe impl Send for CoalescedRing {}
// SAFETY: as above.
unsafe impl Sync for CoalescedRing {}

impl CoalescedRing {
    /// Maps the VM's ring through one of its vCPU fds and has KVM queue writes to `port`.
    pub fn new(vm: &VmFd, vcpu_fd: &impl AsRawFd, port: u16) -> std::io::Result<CoalescedRing> {
        let ring = CoalescedRing::map(vcpu_fd, port)?;
        ring.set_active(vm, true)?;
        Ok(ring)
    }

    fn map(vcpu_fd: &impl AsRawFd, port: u16) -> std::io::Result<CoalescedRing> {
        // SAFETY: sysconf has no preconditions.
        let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let offset = KVM_COALESCED_MMIO_PAGE_OFFSET as libc::off_t * page_size as libc::off_t;
        // SAFETY: KVM provides the ring page at this offset of a vCPU fd when the capability is
        // present (the call fails otherwise); we map exactly one page and check the result.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu_fd.as_raw_fd(),
                offset,
            )
        };
        CoalescedRing::on_page(addr, page_size, port)
    }

    /// Takes over `addr`, a mapping of one ring page (unmapped on drop), or mmap's failure.
    fn on_page(addr: *mut libc::c_void, page_size: usize, port: u16) -> std::io::Result<Self> {
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ring = NonNull::new(addr as *mut kvm_coalesced_mmio_ring)
            .ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        Ok(CoalescedRing {
            ring,
            page_size,
            lock: Mutex::new(()),
            port,
            active: AtomicBool::new(false),
            drained: AtomicU64::new(0),
            wake_requested: AtomicBool::new(false),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Entries drained so far.
    pub fn drained(&self) -> u64 {
        self.drained.load(Ordering::Relaxed)
    }

    /// Starts or stops KVM queueing writes to the port (VMM thread). Stopping marks the ring
    /// inactive first, so that a vCPU exiting on a write in between asks for it back rather
    /// than be ignored; the caller drains afterwards for writes queued before the stop.
    pub fn set_active(&self, vm: &VmFd, on: bool) -> std::io::Result<()> {
        let zone = IoEventAddress::Pio(u64::from(self.port));
        if on {
            // On failure the request stays pending, so vCPUs stop asking: the console then
            // simply exits for every byte.
            vm.register_coalesced_mmio(zone, 1)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
            self.active.store(true, Ordering::Release);
            self.wake_requested.store(false, Ordering::Release);
        } else {
            self.active.store(false, Ordering::Release);
            if let Err(e) = vm.unregister_coalesced_mmio(zone, 1) {
                self.active.store(true, Ordering::Release);
                return Err(std::io::Error::from_raw_os_error(e.errno()));
            }
        }
        Ok(())
    }

    /// A vCPU wrote the port and it exited: asks the VMM thread, once, to coalesce again.
    pub fn wrote_while_inactive(&self) {
        if !self.is_active() && !self.wake_requested.swap(true, Ordering::AcqRel) {
            let _ = self.wake.write(1);
        }
    }

    fn capacity(&self) -> u32 {
        ((self.page_size - std::mem::size_of::<kvm_coalesced_mmio_ring>())
            / std::mem::size_of::<kvm_coalesced_mmio>()) as u32
    }

    /// Takes the consumer lock. Hold it until the drained writes have been handed on: a vCPU
    /// that finds the ring empty and then hands on the write it exited for must not overtake
    /// writes another thread took from the ring a moment earlier.
    pub fn lock(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands every write queued when it is called, oldest first, to `f(port_or_addr, data,
    /// is_pio)`; the caller holds `lock()`. Writes queued meanwhile wait for the next drain: a
    /// guest whose vCPUs refill the ring as fast as it is drained must not keep the drainer
    /// (possibly the VMM thread, and everyone waiting for this lock) here for ever.
    pub fn drain(&self, _held: &MutexGuard<'_, ()>, mut f: impl FnMut(u64, &[u8], bool)) {
        let base = self.ring.as_ptr();
        // SAFETY (for the raw accesses below): `base` is our live mapping of the ring page;
        // `first` is ours to write, `last` is KVM's; entries below `capacity` lie in the page.
        let cap = self.capacity();
        let mut first = unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*base).first)) };
        let end = unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*base).last)) };
        // Entries up to `last` are fully written before KVM publishes `last`.
        fence(Ordering::Acquire);
        let mut n = 0;
        while first != end && first < cap && end < cap {
            let entry: kvm_coalesced_mmio = unsafe {
                let entries =
                    std::ptr::addr_of!((*base).coalesced_mmio) as *const kvm_coalesced_mmio;
                std::ptr::read_volatile(entries.add(first as usize))
            };
            // SAFETY: both union members are u32; reading either is defined.
            let pio = unsafe { entry.__bindgen_anon_1.pio } != 0;
            let len = (entry.len as usize).min(entry.data.len());
            f(entry.phys_addr, &entry.data[..len], pio);
            n += 1;
            first = (first + 1) % cap;
            fence(Ordering::Release);
            unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*base).first), first) };
        }
        if n > 0 {
            self.drained.fetch_add(n, Ordering::Relaxed);
        }
    }
}

impl Drop for CoalescedRing {
    fn drop(&mut self) {
        // SAFETY: unmapping the page we mapped; nobody holds a reference past our lifetime.
        unsafe { libc::munmap(self.ring.as_ptr() as *mut libc::c_void, self.page_size) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ring on an anonymous page, and KVM's side of it: `push` queues a one-byte write.
    fn ring() -> CoalescedRing {
        // SAFETY: sysconf has no preconditions; an anonymous private page, checked by on_page.
        let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        CoalescedRing::on_page(addr, page_size, 0x3f8).unwrap()
    }

    fn push(r: &CoalescedRing, byte: u8) -> bool {
        let base = r.ring.as_ptr();
        let cap = r.capacity();
        // SAFETY: our own anonymous ring page; entries below `capacity` lie in it.
        unsafe {
            let first = std::ptr::read_volatile(std::ptr::addr_of!((*base).first));
            let last = std::ptr::read_volatile(std::ptr::addr_of!((*base).last));
            if (last + 1) % cap == first {
                return false;
            }
            let entries = std::ptr::addr_of_mut!((*base).coalesced_mmio) as *mut kvm_coalesced_mmio;
            let mut e: kvm_coalesced_mmio = std::mem::zeroed();
            e.phys_addr = u64::from(r.port);
            e.len = 1;
            e.data[0] = byte;
            e.__bindgen_anon_1.pio = 1;
            std::ptr::write_volatile(entries.add(last as usize), e);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*base).last), (last + 1) % cap);
        }
        true
    }

    #[test]
    fn drain_hands_on_writes_in_order() {
        let r = ring();
        for b in b"hi\n" {
            assert!(push(&r, *b));
        }
        let mut got = Vec::new();
        r.drain(&r.lock(), |addr, data, pio| {
            assert_eq!((addr, pio), (0x3f8, true));
            got.extend_from_slice(data);
        });
        assert_eq!(got, b"hi\n");
        assert_eq!(r.drained(), 3);
        r.drain(&r.lock(), |_, _, _| panic!("drained twice"));
    }

    /// vCPUs that queue a write for every one drained (several vCPUs printing at once, a
    /// slow console) must not keep the drainer, who may be the VMM thread, for ever: a drain
    /// takes what was queued when it began.
    #[test]
    fn a_drain_ends_while_the_guest_keeps_writing() {
        let r = ring();
        let cap = r.capacity() as usize;
        for _ in 0..10 {
            assert!(push(&r, b'a'));
        }
        let mut calls = 0;
        r.drain(&r.lock(), |_, _, _| {
            calls += 1;
            // The guest writes again meanwhile, bounded here only so a failing test ends.
            if calls < 100 * cap {
                push(&r, b'b');
            }
        });
        assert_eq!(calls, 10);
        // What came meanwhile is there for the next drain.
        let mut next = 0;
        r.drain(&r.lock(), |_, data, _| {
            assert_eq!(data, b"b");
            next += 1;
        });
        assert_eq!(next, 10);
    }
}
