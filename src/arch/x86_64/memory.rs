//! Guest RAM regions.

use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::{FIRST_ADDR_PAST_32BITS, MMIO_GAP_START};

/// The guest memory type the whole of ember uses.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// RAM regions for a guest of `mem_size` bytes: [0, min(size, 3 GiB)) then [4 GiB, ...) for the
/// rest, leaving the 32-bit MMIO hole empty. A size of 0 gives no regions.
pub fn arch_memory_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    if mem_size == 0 {
        return Vec::new();
    }
    let low = mem_size.min(MMIO_GAP_START);
    let mut regions = vec![(GuestAddress(0), low as usize)];
    if mem_size > MMIO_GAP_START {
        regions.push((
            GuestAddress(FIRST_ADDR_PAST_32BITS),
            (mem_size - MMIO_GAP_START) as usize,
        ));
    }
    regions
}

/// Asks the host kernel to back the 2 MiB-aligned part of guest RAM [addr, addr + len) with
/// transparent huge pages, for a range ember is about to fill whole (a kernel segment, an
/// initrd): no memory is wasted, the copy takes one page fault per 2 MiB instead of 512 (a
/// 25 MiB kernel segment loads in half the time), and KVM can map it 2 MiB at a time. Only a
/// hint: with THP off, on hugetlb memory, or for a range under 2 MiB nothing changes; on a
/// fragmented host the kernel may compact memory first or fall back to 4 KiB pages, as its THP
/// `defrag` setting says (QEMU asks the same for all of a guest's RAM).
pub fn prefer_huge_pages(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) {
    const HUGE: usize = 2 << 20;
    let Some(region) = mem.find_region(addr) else {
        return;
    };
    if region.is_hugetlbfs() == Some(true) {
        return;
    }
    let offset = addr.0 - region.start_addr().0;
    let end = offset.saturating_add(len).min(region.len());
    let Ok(base) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
        return;
    };
    // THP works on 2 MiB-aligned host addresses.
    let host_start = (base as usize).saturating_add(offset as usize);
    let host_end = (base as usize).saturating_add(end as usize);
    let start = host_start.next_multiple_of(HUGE);
    let end = host_end & !(HUGE - 1);
    if end <= start {
        return;
    }
    // SAFETY: [start, end) lies inside the region's own anonymous mapping, which `mem` keeps
    // mapped; MADV_HUGEPAGE only changes how the kernel backs it and reads or writes nothing.
    unsafe {
        libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
    }
}

/// Where the guest's RAM is, as the e820 map and the loaders see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamLayout {
    /// End (exclusive) of the RAM region that starts at 0.
    pub low_end: u64,
    /// Size of the RAM at 4 GiB (0 when the guest has at most 3 GiB).
    pub high_size: u64,
}

impl RamLayout {
    /// Reads the layout back from a guest memory built by `arch_memory_regions`.
    pub fn of(mem: &GuestMemoryMmap) -> Self {
        let mut layout = RamLayout {
            low_end: 0,
            high_size: 0,
        };
        for region in mem.iter() {
            let start = region.start_addr().raw_value();
            if start == 0 {
                layout.low_end = region.len();
            } else if start == FIRST_ADDR_PAST_32BITS {
                layout.high_size = region.len();
            }
        }
        layout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn regions_128mib() {
        assert_eq!(
            arch_memory_regions(128 * MIB),
            vec![(GuestAddress(0), (128 * MIB) as usize)]
        );
    }

    #[test]
    fn regions_3gib_fits_below_hole() {
        assert_eq!(
            arch_memory_regions(3 * GIB),
            vec![(GuestAddress(0), (3 * GIB) as usize)]
        );
    }

    #[test]
    fn regions_4gib_and_5gib_split_around_hole() {
        assert_eq!(
            arch_memory_regions(4 * GIB),
            vec![
                (GuestAddress(0), (3 * GIB) as usize),
                (GuestAddress(4 * GIB), GIB as usize)
            ]
        );
        assert_eq!(
            arch_memory_regions(5 * GIB),
            vec![
                (GuestAddress(0), (3 * GIB) as usize),
                (GuestAddress(4 * GIB), (2 * GIB) as usize)
            ]
        );
        assert!(arch_memory_regions(0).is_empty());
    }

    #[test]
    fn ram_layout_reads_back() {
        let mem = GuestMemoryMmap::from_ranges(&arch_memory_regions(128 * MIB)).unwrap();
        assert_eq!(
            RamLayout::of(&mem),
            RamLayout {
                low_end: 128 * MIB,
                high_size: 0
            }
        );
    }
}
