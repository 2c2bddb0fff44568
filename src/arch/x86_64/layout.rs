//! Guest-physical memory layout, as listed in shared/spec/platform-x86_64.md.
//!
//! The addresses follow what Firecracker guests expect, so a kernel built for Firecracker boots
//! here unchanged. Nothing else in ember should hard-code these numbers.

/// Global descriptor table: NULL, code (0x08), data (0x10), TSS (0x18).
pub const GDT_ADDR: u64 = 0x500;
/// Interrupt descriptor table (empty, limit 7).
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`; RBX points here at the PVH entry.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map (shares its address with the zero page: only one protocol is used at a time).
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux `boot_params` (the "zero page"); RSI points here at the 64-bit entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer (RSP = RBP) for the 64-bit Linux entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables: one PML4, one PDPT, one PD of 2 MiB pages (first 1 GiB).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum command-line size, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area; RAM below it is usable, from here to 1 MiB is reserved.
pub const EBDA_START: u64 = 0x9fc00;
/// MPTable, followed by the ACPI tables (except the RSDP), live in [SYSTEM_MEM_START, RSDP_ADDR).
pub const SYSTEM_MEM_START: u64 = EBDA_START;
pub const MPTABLE_START: u64 = SYSTEM_MEM_START;
/// ACPI root pointer (where the kernel's BIOS-area scan finds it too).
pub const RSDP_ADDR: u64 = 0xe0000;
/// End of the reserved legacy area; the kernel is loaded here.
pub const HIMEM_START: u64 = 0x10_0000;
pub const KERNEL_START: u64 = HIMEM_START;
/// Offset of the 64-bit entry point inside a loaded bzImage protected-mode kernel.
pub const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// The 32-bit MMIO hole: RAM stops here and resumes at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xC000_0000;
pub const MMIO_GAP_END: u64 = 1 << 32;
pub const MMIO_GAP_SIZE: u64 = MMIO_GAP_END - MMIO_GAP_START;
/// First address above the 32-bit space (start of high RAM).
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;

/// Boot timer device (one page).
pub const BOOT_TIMER_ADDR: u64 = 0xC000_0000;
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
/// virtio-mmio windows, 4 KiB each, allocated first-fit in attach order from here.
pub const VIRTIO_MMIO_START: u64 = 0xC000_1000;
pub const VIRTIO_MMIO_WINDOW_SIZE: u64 = 0x1000;

/// In-kernel IOAPIC and local APIC.
pub const IOAPIC_ADDR: u64 = 0xFEC0_0000;
pub const LAPIC_ADDR: u64 = 0xFEE0_0000;
/// Where KVM keeps its real-mode TSS (`KVM_SET_TSS_ADDR`); three pages inside the MMIO hole.
pub const KVM_TSS_ADDR: u64 = 0xFFFB_D000;

/// Legacy ISA interrupts routed through the IOAPIC.
pub const IRQ_MAX: u32 = 23;
/// GSIs handed out to virtio-mmio devices, one each.
pub const GSI_VIRTIO_FIRST: u32 = 5;
pub const GSI_VIRTIO_LAST: u32 = IRQ_MAX;
/// COM1 and the i8042.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_GSI: u32 = 4;
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
pub const I8042_GSI: u32 = 1;
