//! Everything the guest finds in memory at boot: command line, zero page or PVH start info,
//! e820 map, GDT/IDT, page tables, MPTable and ACPI tables.

use std::fmt;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, E820_MAX_ENTRIES_ZEROPAGE};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Address, Bytes, GuestAddress};

use super::acpi::{create_acpi_tables, AcpiError, MmioDeviceInfo};
use super::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, FIRST_ADDR_PAST_32BITS, HIMEM_START,
    MPTABLE_START, PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START, RSDP_ADDR, ZERO_PAGE_START,
};
use super::loader::{BootProtocol, InitrdConfig, KernelFormat, LoadedKernel};
use super::memory::{GuestMemoryMmap, RamLayout};
use super::mptable::{setup_mptable, MptableError, MAX_SUPPORTED_CPUS};
use super::regs::write_boot_tables;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader id.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Alignment a relocatable ELF kernel is told it may rely on.
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// bzImage xloadflags: the kernel accepts an initrd anywhere in memory.
const XLF_CAN_BE_LOADED_ABOVE_4G: u16 = 1 << 1;

/// What `configure_system` needs to know about the VM.
#[derive(Clone, Copy, Debug)]
pub struct BootConfig<'a> {
    pub kernel: &'a LoadedKernel,
    pub cmdline: &'a str,
    pub initrd: Option<InitrdConfig>,
    pub vcpu_count: u8,
    pub mmio_devices: &'a [MmioDeviceInfo],
}

/// Errors writing the boot-time guest memory contents.
#[derive(Debug)]
pub enum ConfigureError {
    /// `len` counts the terminating NUL.
    CmdlineTooLong {
        len: usize,
        max: usize,
    },
    CmdlineContainsNul {
        position: usize,
    },
    VcpuCount {
        count: u8,
        max: u8,
    },
    InitrdOverlapsKernel {
        initrd: InitrdConfig,
        kernel_end: u64,
    },
    InitrdAboveKernelLimit {
        initrd_end: u64,
        limit: u32,
    },
    /// A structure did not fit in guest RAM.
    GuestMemory {
        what: &'static str,
        addr: u64,
        len: usize,
        ram: RamLayout,
    },
    Mptable(MptableError),
    Acpi(AcpiError),
    BootParams(linux_loader::configurator::Error),
}

impl fmt::Display for ConfigureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ConfigureError::*;
        match self {
            CmdlineTooLong { len, max } => write!(
                f,
                "kernel command line is {len} bytes including the terminating NUL; the limit \
                 is {max} bytes ({} characters)",
                max - 1
            ),
            CmdlineContainsNul { position } => {
                write!(
                    f,
                    "kernel command line contains a NUL byte at position {position}"
                )
            }
            VcpuCount { count, max } => {
                write!(f, "vCPU count {count} is out of range (1 to {max})")
            }
            InitrdOverlapsKernel { initrd, kernel_end } => write!(
                f,
                "initrd at [{:#x}, +{:#x}) overlaps the kernel, which ends at {kernel_end:#x}; \
                 give the guest more memory",
                initrd.address.raw_value(),
                initrd.size
            ),
            InitrdAboveKernelLimit { initrd_end, limit } => write!(
                f,
                "initrd ends at {initrd_end:#x}, above the kernel's initrd_addr_max \
                 {limit:#x}; give the guest less memory or use a 64-bit relocatable kernel"
            ),
            GuestMemory {
                what,
                addr,
                len,
                ram,
            } => write!(
                f,
                "cannot write the {what} ({len} bytes) at guest address {addr:#x}: guest RAM \
                 ends at {:#x}",
                ram.low_end
            ),
            Mptable(e) => write!(f, "{e}"),
            Acpi(e) => write!(f, "{e}"),
            BootParams(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ConfigureError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigureError::Mptable(e) => Some(e),
            ConfigureError::Acpi(e) => Some(e),
            ConfigureError::BootParams(e) => Some(e),
            _ => None,
        }
    }
}

/// The e820 map, in the spec's order: low RAM below the EBDA, the reserved legacy area up to
/// 1 MiB, RAM from 1 MiB to the end of low RAM, RAM above 4 GiB. Entries are (addr, size, type).
pub fn e820_entries(ram: &RamLayout) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, ram.low_end.min(EBDA_START), E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    if ram.low_end > HIMEM_START {
        map.push((HIMEM_START, ram.low_end - HIMEM_START, E820_RAM));
    }
    if ram.high_size > 0 {
        map.push((FIRST_ADDR_PAST_32BITS, ram.high_size, E820_RAM));
    }
    map
}

/// Validates the command line and writes it, NUL-terminated, at `CMDLINE_START`.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), ConfigureError> {
    let len = cmdline.len() + 1;
    if len > CMDLINE_MAX_SIZE {
        return Err(ConfigureError::CmdlineTooLong {
            len,
            max: CMDLINE_MAX_SIZE,
        });
    }
    if let Some(position) = cmdline.bytes().position(|b| b == 0) {
        return Err(ConfigureError::CmdlineContainsNul { position });
    }
    let mut bytes = Vec::with_capacity(len);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    write(mem, "kernel command line", &bytes, CMDLINE_START)
}

fn write(
    mem: &GuestMemoryMmap,
    what: &'static str,
    bytes: &[u8],
    addr: u64,
) -> Result<(), ConfigureError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|_| ConfigureError::GuestMemory {
            what,
            addr,
            len: bytes.len(),
            ram: RamLayout::of(mem),
        })
}

fn check_initrd(kernel: &LoadedKernel, initrd: &InitrdConfig) -> Result<(), ConfigureError> {
    let start = initrd.address.raw_value();
    let end = start.saturating_add(initrd.size as u64);
    if start < kernel.kernel_end && end > kernel.kernel_load.raw_value() {
        return Err(ConfigureError::InitrdOverlapsKernel {
            initrd: *initrd,
            kernel_end: kernel.kernel_end,
        });
    }
    if let Some(hdr) = kernel.setup_header {
        let limit = hdr.initrd_addr_max;
        let anywhere = hdr.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G != 0;
        if !anywhere && limit != 0 && end.saturating_sub(1) > u64::from(limit) {
            return Err(ConfigureError::InitrdAboveKernelLimit {
                initrd_end: end,
                limit,
            });
        }
    }
    Ok(())
}

/// Writes everything the guest finds in memory at boot. Call after `load_kernel` (and
/// `load_initrd`), before the first KVM_RUN.
pub fn configure_system(mem: &GuestMemoryMmap, cfg: &BootConfig) -> Result<(), ConfigureError> {
    if cfg.vcpu_count == 0 || cfg.vcpu_count > MAX_SUPPORTED_CPUS {
        return Err(ConfigureError::VcpuCount {
            count: cfg.vcpu_count,
            max: MAX_SUPPORTED_CPUS,
        });
    }
    if let Some(initrd) = &cfg.initrd {
        check_initrd(cfg.kernel, initrd)?;
    }
    write_cmdline(mem, cfg.cmdline)?;

    let protocol = cfg.kernel.entry.protocol;
    write_boot_tables(mem, protocol).map_err(|(what, addr, len)| ConfigureError::GuestMemory {
        what,
        addr,
        len,
        ram: RamLayout::of(mem),
    })?;
    let mptable_end =
        setup_mptable(mem, MPTABLE_START, cfg.vcpu_count).map_err(ConfigureError::Mptable)?;
    create_acpi_tables(mem, mptable_end, cfg.vcpu_count, cfg.mmio_devices)
        .map_err(ConfigureError::Acpi)?;

    let e820 = e820_entries(&RamLayout::of(mem));
    match protocol {
        BootProtocol::LinuxBoot => write_zero_page(mem, cfg, &e820),
        BootProtocol::PvhBoot => write_pvh_info(mem, cfg, &e820),
    }
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    cfg: &BootConfig,
    e820: &[(u64, u64, u32)],
) -> Result<(), ConfigureError> {
    let mut params = boot_params::default();
    if let Some(hdr) = cfg.kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = (cfg.cmdline.len() + 1) as u32;
    if cfg.kernel.format == KernelFormat::Elf {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    // load_initrd keeps the initrd below 3 GiB, so it fits the 32-bit fields. Without one, any
    // value the bzImage header carried is cleared.
    let (image, size) = cfg
        .initrd
        .map_or((0, 0), |i| (i.address.raw_value() as u32, i.size as u32));
    params.hdr.ramdisk_image = image;
    params.hdr.ramdisk_size = size;
    params.acpi_rsdp_addr = RSDP_ADDR;
    for (slot, (addr, size, kind)) in params
        .e820_table
        .iter_mut()
        .zip(e820.iter().take(E820_MAX_ENTRIES_ZEROPAGE))
    {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind,
        };
    }
    params.e820_entries = e820.len().min(E820_MAX_ENTRIES_ZEROPAGE) as u8;

    let boot = BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&boot, mem)
        .map_err(ConfigureError::BootParams)
}

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    cfg: &BootConfig,
    e820: &[(u64, u64, u32)],
) -> Result<(), ConfigureError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|(addr, size, kind)| hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *kind,
            reserved: 0,
        })
        .collect();
    let modules: Vec<hvm_modlist_entry> = cfg
        .initrd
        .iter()
        .map(|initrd| hvm_modlist_entry {
            paddr: initrd.address.raw_value(),
            size: initrd.size as u64,
            ..Default::default()
        })
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            PVH_MODLIST_START
        },
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: RSDP_ADDR,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut boot = BootParams::new::<hvm_start_info>(&start_info, GuestAddress(PVH_INFO_START));
    boot.set_sections::<hvm_memmap_table_entry>(&memmap, GuestAddress(PVH_MEMMAP_START));
    if !modules.is_empty() {
        boot.set_modules::<hvm_modlist_entry>(&modules, GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&boot, mem)
        .map_err(ConfigureError::BootParams)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::acpi::tests::check_tables;
    use crate::arch::x86_64::loader::tests::{guest_mem, make_bzimage, make_elf};
    use crate::arch::x86_64::loader::{load_initrd_bytes, load_kernel_bytes};
    use crate::arch::x86_64::mptable::mptable_size;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn read_params(mem: &GuestMemoryMmap) -> boot_params {
        mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap()
    }

    fn e820_of(p: &boot_params) -> Vec<(u64, u64, u32)> {
        p.e820_table[..usize::from(p.e820_entries)]
            .iter()
            .map(|e| ({ e.addr }, { e.size }, { e.r#type }))
            .collect()
    }

    #[test]
    fn e820_order_and_contents() {
        let small = e820_entries(&RamLayout {
            low_end: 128 * MIB,
            high_size: 0,
        });
        assert_eq!(
            small,
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x100000 - 0x9fc00, E820_RESERVED),
                (0x100000, 128 * MIB - 0x100000, E820_RAM),
            ]
        );
        let big = e820_entries(&RAM_5G);
        assert_eq!(big.len(), 4);
        assert_eq!(big[2], (0x100000, 3 * GIB - 0x100000, E820_RAM));
        assert_eq!(big[3], (4 * GIB, 2 * GIB, E820_RAM));
    }

    const RAM_5G: RamLayout = RamLayout {
        low_end: 3 * GIB,
        high_size: 2 * GIB,
    };

    fn boot_cfg<'a>(kernel: &'a LoadedKernel, cmdline: &'a str) -> BootConfig<'a> {
        BootConfig {
            kernel,
            cmdline,
            initrd: None,
            vcpu_count: 2,
            mmio_devices: &[],
        }
    }

    #[test]
    fn cmdline_limit_2047_ok_2048_rejected() {
        let mem = guest_mem(64 * MIB);
        let ok = "a".repeat(2047);
        write_cmdline(&mem, &ok).unwrap();
        let mut got = vec![0u8; 2048];
        mem.read_slice(&mut got, GuestAddress(0x20000)).unwrap();
        assert_eq!(&got[..2047], ok.as_bytes());
        assert_eq!(got[2047], 0);

        let e = write_cmdline(&mem, &"a".repeat(2048)).unwrap_err();
        assert!(matches!(
            e,
            ConfigureError::CmdlineTooLong {
                len: 2049,
                max: 2048
            }
        ));
        assert!(e.to_string().contains("2048"), "{e}");
        assert!(matches!(
            write_cmdline(&mem, "a\0b").unwrap_err(),
            ConfigureError::CmdlineContainsNul { position: 1 }
        ));
    }

    #[test]
    fn elf_zero_page() {
        let mem = guest_mem(128 * MIB);
        let kernel = load_kernel_bytes(&mem, &make_elf(0x100_0000, &[0xf4], None)).unwrap();
        let initrd = load_initrd_bytes(&mem, &[7u8; 5000]).unwrap();
        let mmio = [MmioDeviceInfo {
            addr: 0xc000_1000,
            len: 0x1000,
            irq: 5,
        }];
        let cmdline = "console=ttyS0 reboot=k";
        let cfg = BootConfig {
            initrd: Some(initrd),
            mmio_devices: &mmio,
            ..boot_cfg(&kernel, cmdline)
        };
        configure_system(&mem, &cfg).unwrap();

        let p = read_params(&mem);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.cmdline_size }, cmdline.len() as u32 + 1);
        assert_eq!({ p.hdr.kernel_alignment }, 0x100_0000);
        assert_eq!({ p.hdr.ramdisk_image }, initrd.address.raw_value() as u32);
        assert_eq!({ p.hdr.ramdisk_size }, 5000);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(e820_of(&p), e820_entries(&RamLayout::of(&mem)));

        let mut got = vec![0u8; cmdline.len() + 1];
        mem.read_slice(&mut got, GuestAddress(0x20000)).unwrap();
        assert_eq!(&got[..cmdline.len()], cmdline.as_bytes());

        // GDT, IDT, page tables, MPTable, ACPI.
        let gdt: [u64; 4] = mem.read_obj(GuestAddress(0x500)).unwrap();
        assert_eq!(gdt[1], 0x00af_9b00_0000_ffff);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x520)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x9000)).unwrap(), 0xa003);
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0xb008)).unwrap(),
            0x20_0083
        );
        let mut mp = vec![0u8; mptable_size(2)];
        mem.read_slice(&mut mp, GuestAddress(0x9fc00)).unwrap();
        assert_eq!(&mp[0..4], b"_MP_");
        assert_eq!(mp.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        check_tables(&mem, 2, &mmio);
    }

    #[test]
    fn bzimage_header_seeds_zero_page() {
        let mem = guest_mem(128 * MIB);
        let img = make_bzimage(0x020c, 1 | XLF_CAN_BE_LOADED_ABOVE_4G, &[0x90; 4096]);
        let kernel = load_kernel_bytes(&mem, &img).unwrap();
        configure_system(&mem, &boot_cfg(&kernel, "quiet")).unwrap();
        let p = read_params(&mem);
        assert_eq!({ p.hdr.version }, 0x020c);
        assert_eq!({ p.hdr.setup_sects }, 4);
        assert_eq!({ p.hdr.initrd_addr_max }, 0x7fff_ffff);
        // The kernel's own alignment is kept; loader fields are ours.
        assert_eq!({ p.hdr.kernel_alignment }, 0x20_0000);
        assert_eq!({ p.hdr.code32_start }, 0x10_0000);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!(
            { p.hdr.ramdisk_image },
            0,
            "no initrd: the header's value is cleared"
        );
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(p.e820_entries, 3);
    }

    /// Loads a 16-byte initrd where the loader places it and configures the boot with it.
    fn with_small_initrd(
        mem: &GuestMemoryMmap,
        kernel: &LoadedKernel,
    ) -> Result<(), ConfigureError> {
        let initrd = load_initrd_bytes(mem, &[1u8; 16]).unwrap();
        let cfg = BootConfig {
            initrd: Some(initrd),
            ..boot_cfg(kernel, "")
        };
        configure_system(mem, &cfg)
    }

    #[test]
    fn bzimage_initrd_above_its_limit_rejected() {
        let mem = guest_mem(3 * GIB);
        let img = make_bzimage(0x020c, 1, &[0x90; 4096]);
        let kernel = load_kernel_bytes(&mem, &img).unwrap();
        let e = with_small_initrd(&mem, &kernel).unwrap_err();
        assert!(
            matches!(e, ConfigureError::InitrdAboveKernelLimit { .. }),
            "{e}"
        );
    }

    #[test]
    fn initrd_overlapping_kernel_rejected() {
        let mem = guest_mem(4 * MIB);
        let kernel = load_kernel_bytes(&mem, &make_elf(0x3f_e000, &[0x90; 16], None)).unwrap();
        assert!(matches!(
            with_small_initrd(&mem, &kernel).unwrap_err(),
            ConfigureError::InitrdOverlapsKernel { .. }
        ));
    }

    #[test]
    fn initrd_over_a_bss_only_elf_segment_rejected() {
        // Code at 1 MiB, then a segment with no file bytes (bss) at the top of a 4 MiB guest,
        // where the initrd goes.
        let mut elf = make_elf(0x10_0000, &[0x90; 16], None);
        let mut bss = Vec::new();
        for field in [1u32, 6] {
            bss.extend_from_slice(&field.to_le_bytes()); // PT_LOAD, RW
        }
        for field in [0u64, 0x30_0000, 0x30_0000, 0, 0x10_0000, 4] {
            bss.extend_from_slice(&field.to_le_bytes()); // offset, vaddr, paddr, filesz, memsz
        }
        elf[56..58].copy_from_slice(&2u16.to_le_bytes()); // e_phnum
        elf.splice(120..120, bss);
        // The first segment's file offset moves by the inserted header.
        let off = u64::from_le_bytes(elf[72..80].try_into().unwrap()) + 56;
        elf[72..80].copy_from_slice(&off.to_le_bytes());
        let mem = guest_mem(4 * MIB);
        let kernel = load_kernel_bytes(&mem, &elf).unwrap();
        assert_eq!(
            (kernel.kernel_load.raw_value(), kernel.kernel_end),
            (0x10_0000, 0x40_0000)
        );
        let e = with_small_initrd(&mem, &kernel).unwrap_err();
        assert!(
            matches!(e, ConfigureError::InitrdOverlapsKernel { .. }),
            "{e}"
        );
    }

    #[test]
    fn initrd_in_the_bzimage_decompression_area_rejected() {
        // A relocatable bzImage runs from pref_address (16 MiB) and needs init_size (8 MiB)
        // there before it reads the e820 map: an initrd at the top of 20 MiB of RAM is inside.
        let mut img = make_bzimage(0x020c, 1 | XLF_CAN_BE_LOADED_ABOVE_4G, &[0x90; 4096]);
        img[0x234] = 1; // relocatable_kernel
        img[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes()); // pref_address
        img[0x260..0x264].copy_from_slice(&0x80_0000u32.to_le_bytes()); // init_size
        let mem = guest_mem(20 * MIB);
        let kernel = load_kernel_bytes(&mem, &img).unwrap();
        assert_eq!(kernel.kernel_end, 0x180_0000);
        let e = with_small_initrd(&mem, &kernel).unwrap_err();
        assert!(
            matches!(e, ConfigureError::InitrdOverlapsKernel { .. }),
            "{e}"
        );
        // With room above it the same initrd is accepted.
        let mem = guest_mem(32 * MIB);
        let kernel = load_kernel_bytes(&mem, &img).unwrap();
        with_small_initrd(&mem, &kernel).unwrap();
    }

    #[test]
    fn pvh_start_info() {
        let mem = guest_mem(5 * GIB);
        let kernel =
            load_kernel_bytes(&mem, &make_elf(0x100_0000, &[0x90; 16], Some(0x100_0000))).unwrap();
        let initrd = load_initrd_bytes(&mem, &[3u8; 100]).unwrap();
        let cfg = BootConfig {
            initrd: Some(initrd),
            ..boot_cfg(&kernel, "root=/dev/vda")
        };
        configure_system(&mem, &cfg).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(0x6000)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.version, 1);
        assert_eq!((info.cmdline_paddr, info.rsdp_paddr), (0x20000, 0xe0000));
        assert_eq!((info.memmap_paddr, info.memmap_entries), (0x7000, 4));
        assert_eq!((info.nr_modules, info.modlist_paddr), (1, 0x6040));
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(0x6040)).unwrap();
        assert_eq!(
            (module.paddr, module.size),
            (initrd.address.raw_value(), 100)
        );
        let last: hvm_memmap_table_entry = mem.read_obj(GuestAddress(0x7000 + 3 * 24)).unwrap();
        assert_eq!(
            (last.addr, last.size, last.type_),
            (4 * GIB, 2 * GIB, E820_RAM)
        );
        // The 32-bit GDT for the PVH entry.
        let gdt: [u64; 4] = mem.read_obj(GuestAddress(0x500)).unwrap();
        assert_eq!(gdt[1], 0x00cf_9b00_0000_ffff);
    }

    #[test]
    fn vcpu_count_checked() {
        let mem = guest_mem(64 * MIB);
        let kernel = load_kernel_bytes(&mem, &make_elf(0x100_0000, &[0x90], None)).unwrap();
        let cfg = BootConfig {
            vcpu_count: 0,
            ..boot_cfg(&kernel, "")
        };
        assert!(matches!(
            configure_system(&mem, &cfg).unwrap_err(),
            ConfigureError::VcpuCount { count: 0, .. }
        ));
    }
}
