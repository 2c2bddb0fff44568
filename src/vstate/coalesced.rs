//! Coalesced port I/O: KVM appends guest writes to registered ports (COM1's data register)
//! to a ring page instead of exiting to user space for each byte. A guest printing a line
//! then costs one exit instead of one per character — on these software-nested hosts an
//! exit costs ~20 µs, so this is most of a small guest's boot time.
//!
//! Every vCPU drains the ring before it handles an exit (so a write is always seen before a
//! later access of the same guest), and the VMM thread drains it on a timer (so output of a
//! guest that writes and then computes without exiting still appears).

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{fence, Ordering};
use std::sync::Mutex;

use kvm_bindings::{kvm_coalesced_mmio, kvm_coalesced_mmio_ring, KVM_COALESCED_MMIO_PAGE_OFFSET};

/// The ring page shared with KVM.
pub struct CoalescedRing {
    ring: NonNull<kvm_coalesced_mmio_ring>,
    page_size: usize,
    /// One consumer at a time: vCPU threads and the VMM thread all drain.
    lock: Mutex<()>,
}

// SAFETY: the mapping is process-wide and lives as long as this struct; every access to the
// consumer index goes through `lock`, and the producer (KVM) synchronises through the indices.
unsafe impl Send for CoalescedRing {}
// SAFETY: as above.
unsafe impl Sync for CoalescedRing {}

impl CoalescedRing {
    /// Maps the VM's ring through one of its vCPU fds.
    pub fn map(vcpu_fd: &impl AsRawFd) -> std::io::Result<CoalescedRing> {
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
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ring = NonNull::new(addr as *mut kvm_coalesced_mmio_ring)
            .ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        Ok(CoalescedRing {
            ring,
            page_size,
            lock: Mutex::new(()),
        })
    }

    fn capacity(&self) -> u32 {
        ((self.page_size - std::mem::size_of::<kvm_coalesced_mmio_ring>())
            / std::mem::size_of::<kvm_coalesced_mmio>()) as u32
    }

    /// Hands every queued write, oldest first, to `f(port_or_addr, data, is_pio)`.
    pub fn drain(&self, mut f: impl FnMut(u64, &[u8], bool)) {
        let base = self.ring.as_ptr();
        // SAFETY (for the raw accesses below): `base` is our live mapping of the ring page;
        // `first` is ours to write, `last` is KVM's; entries below `capacity` lie in the page.
        let last = |b: *mut kvm_coalesced_mmio_ring| unsafe {
            std::ptr::read_volatile(std::ptr::addr_of!((*b).last))
        };
        // Cheap check without the lock: nothing queued is the common case on every exit.
        let first_now = unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*base).first)) };
        if first_now == last(base) {
            return;
        }
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let cap = self.capacity();
        let mut first = unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*base).first)) };
        loop {
            let end = last(base);
            // Entries up to `last` are fully written before KVM publishes `last`.
            fence(Ordering::Acquire);
            if first == end || first >= cap || end >= cap {
                break;
            }
            let entry: kvm_coalesced_mmio = unsafe {
                let entries =
                    std::ptr::addr_of!((*base).coalesced_mmio) as *const kvm_coalesced_mmio;
                std::ptr::read_volatile(entries.add(first as usize))
            };
            // SAFETY: both union members are u32; reading either is defined.
            let pio = unsafe { entry.__bindgen_anon_1.pio } != 0;
            let len = (entry.len as usize).min(entry.data.len());
            f(entry.phys_addr, &entry.data[..len], pio);
            first = (first + 1) % cap;
            fence(Ordering::Release);
            unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*base).first), first) };
        }
    }
}

impl Drop for CoalescedRing {
    fn drop(&mut self) {
        // SAFETY: unmapping the page we mapped; nobody holds a reference past our lifetime.
        unsafe { libc::munmap(self.ring.as_ptr() as *mut libc::c_void, self.page_size) };
    }
}
