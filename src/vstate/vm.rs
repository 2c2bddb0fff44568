//! The KVM VM: its guest memory, the in-kernel irqchip and PIT.

use std::fmt;
use std::os::fd::RawFd;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::mmap::{MmapRegionBuilder, MmapRegionError};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{self, GuestMemoryMmap};
use crate::config::machine::HugePages;

#[derive(Debug)]
pub enum VmError {
    /// A KVM ioctl failed; names it.
    Kvm(&'static str, kvm_ioctls::Error),
    Memory(String),
    /// The host's pool of 2 MiB pages cannot hold the guest: pages needed, pages free.
    HugePages(u64, String),
}

impl fmt::Display for VmError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            VmError::Kvm(what, e) => write!(f, "{what} failed: {e}"),
            VmError::Memory(e) => write!(f, "cannot allocate guest memory: {e}"),
            VmError::HugePages(need, free) => write!(
                f,
                "cannot allocate guest memory: huge_pages 2M needs {need} free 2 MiB pages, \
                 the host has {free} (see /proc/sys/vm/nr_hugepages)"
            ),
        }
    }
}

impl std::error::Error for VmError {}

/// The part of a VM that does not depend on its configuration: the VM itself, its TSS, the
/// in-kernel irqchip and PIT.
pub fn create_vm_fd(kvm: &Kvm) -> Result<VmFd, VmError> {
    let fd = kvm
        .create_vm()
        .map_err(|e| VmError::Kvm("KVM_CREATE_VM", e))?;
    add_irqchip_and_pit(&fd)?;
    Ok(fd)
}

fn add_irqchip_and_pit(fd: &VmFd) -> Result<(), VmError> {
    fd.set_tss_address(arch::layout::KVM_TSS_ADDR as usize)
        .map_err(|e| VmError::Kvm("KVM_SET_TSS_ADDR", e))?;
    fd.create_irq_chip()
        .map_err(|e| VmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    fd.create_pit2(pit)
        .map_err(|e| VmError::Kvm("KVM_CREATE_PIT2", e))?;
    Ok(())
}

pub struct Vm {
    fd: VmFd,
    memory: GuestMemoryMmap,
}

impl Vm {
    /// Creates the VM with `mem_size` bytes of RAM laid out as the platform spec says.
    pub fn new(kvm: &Kvm, mem_size: u64, huge_pages: HugePages) -> Result<Vm, VmError> {
        let fd = kvm
            .create_vm()
            .map_err(|e| VmError::Kvm("KVM_CREATE_VM", e))?;
        // Memory first: a memory slot added after the irqchip and PIT exist waits for an SRCU
        // grace period, which costs milliseconds here.
        let vm = Vm::with_memory(fd, mem_size, huge_pages)?;
        add_irqchip_and_pit(&vm.fd)?;
        Ok(vm)
    }

    /// Gives a VM made by [`create_vm_fd`] its RAM. KVM accepts memory slots at any time
    /// before the vCPUs run, so this may come after the irqchip.
    pub fn with_memory(fd: VmFd, mem_size: u64, huge_pages: HugePages) -> Result<Vm, VmError> {
        let memory = guest_memory(mem_size, huge_pages)?;
        for (slot, region) in memory.iter().enumerate() {
            let mr = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the mapping belongs to `memory`, which this Vm owns and keeps alive for
            // as long as the VM fd (and so the slot) exists.
            unsafe { fd.set_user_memory_region(mr) }
                .map_err(|e| VmError::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
        }
        Ok(Vm { fd, memory })
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Routes `evt` to the guest interrupt `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|e| VmError::Kvm("KVM_IRQFD", e))
    }
}

/// Maps the guest's RAM. Without huge pages: anonymous, private, MAP_NORESERVE, so untouched
/// guest pages cost the host nothing. With `2M`: from the host's hugetlb pool, reserved now
/// (no MAP_NORESERVE), so a pool too small fails here with a reason instead of a SIGBUS when
/// the guest first touches the page the pool lacks.
fn guest_memory(mem_size: u64, huge_pages: HugePages) -> Result<GuestMemoryMmap, VmError> {
    let ranges = arch::arch_memory_regions(mem_size);
    if huge_pages == HugePages::None {
        return GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmError::Memory(e.to_string()));
    }
    let mut regions = Vec::with_capacity(ranges.len());
    for (start, len) in ranges {
        let mapping = MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_HUGE_2MB,
            )
            .with_hugetlbfs(true)
            .build()
            .map_err(|e| match e {
                MmapRegionError::Mmap(io) if io.raw_os_error() == Some(libc::ENOMEM) => {
                    VmError::HugePages(mem_size >> 21, huge_pages_free())
                }
                e => VmError::Memory(format!("huge_pages 2M: {e}")),
            })?;
        regions.push(
            GuestRegionMmap::new(mapping, start)
                .ok_or_else(|| VmError::Memory(format!("region at {:#x} overflows", start.0)))?,
        );
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| VmError::Memory(e.to_string()))
}

/// The host's 2 MiB pages that nobody holds or reserved (`HugePages_Free - HugePages_Rsvd` of
/// /proc/meminfo), for the error that says the pool is too small.
fn huge_pages_free() -> String {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> Option<u64> {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    match (field("HugePages_Free:"), field("HugePages_Rsvd:")) {
        (Some(free), Some(rsvd)) => free.saturating_sub(rsvd).to_string(),
        _ => "an unknown number of".into(),
    }
}

/// Destroying a VM with an in-kernel irqchip and PIT takes the kernel some 20 ms (it waits
/// for SRCU grace periods as it unregisters each device), and it happens in the exiting
/// process before its parent can reap it. So at exit a child that shares our memory and
/// holds the VM fd waits until ember is entirely gone and then drops the last reference:
/// ember exits at once, and the kernel finishes the teardown in that short-lived child.
pub fn detach_teardown(vm_fd: RawFd) {
    #[repr(C)]
    struct Args {
        vm_fd: libc::c_uint,
        parent: libc::pid_t,
    }
    extern "C" fn teardown(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` points to the leaked `Args` below; this child only makes syscalls on
        // its own (copied) fd table and never returns into Rust code.
        unsafe {
            let args = &*(arg as *const Args);
            let keep = args.vm_fd;
            if keep > 0 {
                libc::close_range(0, keep - 1, 0);
            }
            libc::close_range(keep + 1, libc::c_uint::MAX, 0);
            // A pidfd polls readable once the whole thread group has exited, and so after
            // its file table (with its KVM fds) was released. ESRCH: already gone.
            let pidfd = libc::syscall(libc::SYS_pidfd_open, args.parent, 0) as libc::c_int;
            if pidfd >= 0 {
                let mut pfd = libc::pollfd {
                    fd: pidfd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                while libc::poll(&mut pfd, 1, -1) < 0 {}
            }
            libc::_exit(0)
        }
    }
    const STACK: usize = 16 * 1024;
    // The child only makes a few syscalls; a small stack it owns for its short life is enough.
    let stack = Box::leak(vec![0u8; STACK].into_boxed_slice());
    let args = Box::leak(Box::new(Args {
        vm_fd: vm_fd as libc::c_uint,
        // SAFETY: getpid has no preconditions.
        parent: unsafe { libc::getpid() },
    }));
    // SAFETY: the child runs `teardown` on its own stack; it shares our address space
    // (CLONE_VM) but only reads `args`, and gets a copy of the fd table (no CLONE_FILES).
    let pid = unsafe {
        libc::clone(
            teardown,
            stack.as_mut_ptr().add(STACK) as *mut libc::c_void,
            libc::CLONE_VM,
            args as *mut Args as *mut libc::c_void,
        )
    };
    if pid < 0 {
        log::debug!(
            "cannot detach the VM teardown: {}",
            std::io::Error::last_os_error()
        );
    }
}
