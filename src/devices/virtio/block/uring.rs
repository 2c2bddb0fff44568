//! The `Async` io_engine: one io_uring per drive (128 entries), the backing file registered
//! as fixed file 0, the ring restricted to READV, WRITEV and FSYNC on fixed files, its
//! completions signalled on an eventfd that the VMM thread watches. Requests are queued with
//! [`Uring::push`] and handed to the kernel together, one `io_uring_enter` per batch
//! ([`Uring::submit`]). One operation may carry several guest requests that are adjacent in
//! the file ([`Part`]s): the block device merges sequential writes.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use io_uring::{opcode, register::Restriction, squeue, types, IoUring};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use virtio_queue::desc::split::Descriptor;

pub const RING_ENTRIES: u32 = 128;
/// `IORING_REGISTER_FILES_UPDATE`: a PATCH of the drive swaps fixed file 0.
const REGISTER_FILES_UPDATE: u8 = 6;

/// One guest request of an operation.
#[derive(Clone, Copy, Debug)]
pub struct Part {
    /// The chain's head index, for the used ring.
    pub head: u16,
    pub status: GuestAddress,
    /// Its data bytes.
    pub len: u64,
}

/// An operation in flight: one or more guest requests.
pub struct Pending {
    pub parts: Vec<Part>,
    /// The bytes the operation must move (0 for FSYNC).
    pub expected: u64,
    pub op: Op,
    /// Kept alive until completion: the kernel reads it at submission, or later from io-wq.
    _iovecs: Vec<libc::iovec>,
}

// SAFETY: the iovecs point into guest memory, which every thread of the VMM may access; they
// are only handed to the kernel.
unsafe impl Send for Pending {}

/// Guest buffers for one operation, each checked to lie inside guest memory.
pub struct Buffers {
    iovecs: Vec<libc::iovec>,
    /// Their total length.
    len: u64,
}

// SAFETY: the iovecs point into guest memory, which every thread of the VMM may access; they
// are only handed to the kernel.
unsafe impl Send for Buffers {}

impl Buffers {
    /// The buffers of `data` (empty ones left out); an error names one outside guest memory
    /// (or across two of its regions).
    pub fn new(mem: &GuestMemoryMmap, data: &[Descriptor]) -> Result<Buffers, String> {
        let mut iovecs = Vec::with_capacity(data.len());
        let mut len = 0u64;
        for d in data.iter().filter(|d| d.len() > 0) {
            // Range-checked by vm-memory: fails unless the whole buffer is inside one region.
            let slice = mem
                .get_slice(d.addr(), d.len() as usize)
                .map_err(|e| format!("buffer {:#x}+{:#x}: {e}", d.addr().0, d.len()))?;
            iovecs.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: d.len() as usize,
            });
            len += u64::from(d.len());
        }
        Ok(Buffers { iovecs, len })
    }

    /// How many buffers.
    pub fn count(&self) -> usize {
        self.iovecs.len()
    }

    /// Their total length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Appends `other`'s buffers.
    pub fn append(&mut self, other: Buffers) {
        self.iovecs.extend(other.iovecs);
        self.len = self.len.saturating_add(other.len);
    }
}

pub struct Uring {
    ring: IoUring,
    evt: EventFd,
    slots: Vec<Option<Pending>>,
    free: Vec<u16>,
    /// Keeps guest memory mapped while requests are in flight.
    mem: Option<GuestMemoryMmap>,
    /// Entries pushed on the submission queue since the last `io_uring_enter`.
    unsubmitted: usize,
    /// Operations pushed so far (for tests).
    #[cfg(test)]
    pushed: u64,
}

impl Uring {
    pub fn new(file: &File) -> io::Result<Uring> {
        let ring = IoUring::builder().setup_r_disabled().build(RING_ENTRIES)?;
        let evt = EventFd::new(libc::EFD_NONBLOCK)?;
        let sub = ring.submitter();
        sub.register_files(&[file.as_raw_fd()])?;
        sub.register_eventfd(evt.as_raw_fd())?;
        let mut res = [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
            Restriction::sqe_flags_required(squeue::Flags::FIXED_FILE.bits()),
            Restriction::register_op(REGISTER_FILES_UPDATE),
        ];
        sub.register_restrictions(&mut res)?;
        sub.register_enable_rings()?;
        Ok(Uring {
            ring,
            evt,
            slots: (0..RING_ENTRIES).map(|_| None).collect(),
            free: (0..RING_ENTRIES as u16).rev().collect(),
            mem: None,
            unsubmitted: 0,
            #[cfg(test)]
            pushed: 0,
        })
    }

    /// Signals the completion eventfd: the VMM thread comes back to the device.
    pub fn kick(&self) {
        if let Err(e) = self.evt.write(1) {
            log::warn!("virtio-blk: cannot signal the io_uring eventfd: {e}");
        }
    }

    /// A duplicate of the completion eventfd, for the VMM thread's event loop.
    pub fn event(&self) -> io::Result<EventFd> {
        self.evt.try_clone()
    }

    /// Makes `file` the backing file of later requests.
    pub fn swap_file(&mut self, file: &File) -> io::Result<()> {
        self.ring
            .submitter()
            .register_files_update(0, &[file.as_raw_fd()])
            .map(|_| ())
    }

    /// Operations pushed so far (merged requests count once).
    #[cfg(test)]
    pub fn pushed(&self) -> u64 {
        self.pushed
    }

    /// How many more operations the ring takes.
    pub fn room(&self) -> usize {
        self.free.len()
    }

    /// Queues a READV/WRITEV at byte `pos` over `bufs` (the buffers of `parts`, in order),
    /// or an FSYNC (`op` Flush); the kernel sees it at the next [`Uring::submit`]. An error
    /// means nothing was queued (and gives `parts` back).
    pub fn push(
        &mut self,
        mem: &GuestMemoryMmap,
        parts: Vec<Part>,
        op: Op,
        pos: u64,
        bufs: Buffers,
    ) -> Result<(), (Vec<Part>, String)> {
        let Buffers {
            iovecs,
            len: expected,
        } = bufs;
        let Ok(count) = u32::try_from(iovecs.len()) else {
            return Err((parts, "too many buffers".into()));
        };
        let Some(slot) = self.free.pop() else {
            return Err((parts, "the ring is full".into()));
        };
        let fd = types::Fixed(0);
        let entry = match op {
            Op::Read => opcode::Readv::new(fd, iovecs.as_ptr(), count)
                .offset(pos)
                .build(),
            Op::Write => opcode::Writev::new(fd, iovecs.as_ptr(), count)
                .offset(pos)
                .build(),
            Op::Flush => opcode::Fsync::new(fd).build(),
        }
        .user_data(u64::from(slot));
        // SAFETY: the iovecs are kept in `slots` until the request completes (and `Drop`
        // waits for requests in flight); they point into guest memory, range-checked by
        // `Buffers::new` (their only source), which stays mapped as long as `self.mem` (a
        // clone of the VM's memory) lives, which is at least until every request has
        // completed.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            self.free.push(slot);
            return Err((parts, "the submission queue is full".into()));
        }
        self.mem.get_or_insert_with(|| mem.clone());
        self.slots[usize::from(slot)] = Some(Pending {
            parts,
            expected,
            op,
            _iovecs: iovecs,
        });
        self.unsubmitted += 1;
        #[cfg(test)]
        {
            self.pushed += 1;
        }
        Ok(())
    }

    /// Hands every pushed request to the kernel, in one `io_uring_enter`; whether there were
    /// any.
    pub fn submit(&mut self) -> bool {
        if self.unsubmitted == 0 {
            return false;
        }
        match self.ring.submit() {
            Ok(_) => {
                self.unsubmitted = 0;
                true
            }
            // The entries stay queued: the next submit (or `drain`) hands them over.
            Err(e) => {
                log::warn!("virtio-blk: io_uring_enter: {e}");
                false
            }
        }
    }

    /// The requests that completed: each with its outcome (the bytes moved, or an error).
    pub fn completions(&mut self) -> Vec<(Pending, Result<u64, String>)> {
        let _ = self.evt.read();
        let mut done = Vec::new();
        for cqe in self.ring.completion() {
            let slot = cqe.user_data() as u16;
            let Some(p) = self.slots.get_mut(usize::from(slot)).and_then(Option::take) else {
                continue;
            };
            self.free.push(slot);
            let res = cqe.result();
            let outcome = if res < 0 {
                Err(io::Error::from_raw_os_error(-res).to_string())
            } else if res as u64 != p.expected {
                Err(format!("short transfer: {res} of {} bytes", p.expected))
            } else {
                Ok(res as u64)
            };
            done.push((p, outcome));
        }
        done
    }

    /// Requests pushed and not yet completed.
    pub fn in_flight(&self) -> usize {
        RING_ENTRIES as usize - self.free.len()
    }
}

impl Uring {
    /// Waits for every request in flight and forgets them (a device reset, or the end).
    pub fn drain(&mut self) {
        while self.in_flight() > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                // A reset runs on a vCPU thread, which ember's kick signal can interrupt:
                // leaving then would let the requests complete into the re-initialised queue.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
            self.unsubmitted = 0;
            let _ = self.completions();
        }
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // Guest buffers must not be unmapped under the kernel's feet.
        self.drain();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
}
