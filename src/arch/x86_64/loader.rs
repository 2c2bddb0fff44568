//! Kernel and initrd loading.
//!
//! linux-loader does the copying; this module decides which format an image is, checks what
//! linux-loader does not (segment placement, boot protocol version, sizes) so that a bad image
//! gives a message a user can act on, and picks the entry point and boot protocol.

use std::fmt;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile};

use super::layout::{BZIMAGE_64BIT_ENTRY_OFFSET, HIMEM_START, MMIO_GAP_START};
use super::memory::{prepare_fill, GuestMemoryMmap, RamLayout};

/// How the vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// Linux 64-bit boot protocol: long mode, RSI = zero page.
    LinuxBoot,
    /// PVH: 32-bit protected mode, paging off, RBX = `hvm_start_info`.
    PvhBoot,
}

/// Where and how the BSP starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryPoint {
    pub entry_addr: GuestAddress,
    pub protocol: BootProtocol,
}

/// The image format that was detected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// What `load_kernel` placed in guest memory.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoadedKernel {
    pub entry: EntryPoint,
    pub format: KernelFormat,
    /// Lowest guest address the kernel occupies (ELF: its lowest PT_LOAD segment; bzImage: the
    /// 1 MiB load address).
    pub kernel_load: GuestAddress,
    /// First guest address past the kernel (ELF: its highest PT_LOAD segment, bss included;
    /// bzImage: the end of the area it decompresses into, see `bzimage_end`).
    pub kernel_end: u64,
    /// The bzImage setup header (seeds the zero page); `None` for ELF.
    pub setup_header: Option<setup_header>,
}

/// Where the initrd was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdConfig {
    pub address: GuestAddress,
    pub size: usize,
}

/// Errors while loading a kernel or an initrd. The caller adds the file path.
#[derive(Debug)]
pub enum LoadError {
    /// Reading or seeking in the image failed.
    Read {
        what: &'static str,
        source: std::io::Error,
    },
    /// Neither the ELF magic nor a bzImage `HdrS` header.
    UnknownFormat,
    ElfNot64Bit {
        class: u8,
    },
    ElfNotX86_64 {
        machine: u16,
    },
    ElfBadHeader(&'static str),
    ElfNoLoadableSegment,
    ElfSegmentBelowHimem {
        index: usize,
        paddr: u64,
    },
    ElfSegmentOutsideRam {
        index: usize,
        paddr: u64,
        memsz: u64,
        ram: RamLayout,
    },
    ElfSegmentPastFileEnd {
        index: usize,
        offset: u64,
        filesz: u64,
        file_len: u64,
    },
    BzImageProtocolTooOld {
        version: u16,
    },
    BzImageNot64Bit {
        xloadflags: u16,
    },
    BzImageNotLoadedHigh,
    BzImageTooSmall {
        file_len: u64,
        setup_size: u64,
    },
    BzImageOutsideRam {
        size: u64,
        ram: RamLayout,
    },
    /// linux-loader refused the image.
    Loader(linux_loader::loader::Error),
    InitrdEmpty,
    InitrdTooLarge {
        size: u64,
        low_ram_end: u64,
    },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use LoadError::*;
        match self {
            Read { what, source } => write!(f, "cannot read the {what}: {source}"),
            UnknownFormat => write!(
                f,
                "kernel image: not an ELF or bzImage kernel (no ELF magic at offset 0, no \
                 'HdrS' setup header at offset 0x202)"
            ),
            ElfNot64Bit { class } => write!(
                f,
                "kernel image: ELF class {class} is not ELFCLASS64; only 64-bit x86 kernels boot"
            ),
            ElfNotX86_64 { machine } => write!(
                f,
                "kernel image: ELF machine {machine} is not x86-64 (EM_X86_64 = 62)"
            ),
            ElfBadHeader(what) => write!(f, "kernel image: malformed ELF header: {what}"),
            ElfNoLoadableSegment => write!(f, "kernel image: ELF has no PT_LOAD segment"),
            ElfSegmentBelowHimem { index, paddr } => write!(
                f,
                "kernel image: ELF PT_LOAD segment {index} at physical address {paddr:#x} lies \
                 below 1 MiB ({HIMEM_START:#x}); the kernel must be linked to load at or above \
                 1 MiB"
            ),
            ElfSegmentOutsideRam {
                index,
                paddr,
                memsz,
                ram,
            } => write!(
                f,
                "kernel image: ELF PT_LOAD segment {index} [{paddr:#x}, +{memsz:#x}) does not \
                 fit in guest RAM ({}); give the guest more memory",
                describe_ram(ram)
            ),
            ElfSegmentPastFileEnd {
                index,
                offset,
                filesz,
                file_len,
            } => write!(
                f,
                "kernel image: ELF PT_LOAD segment {index} (file offset {offset:#x}, {filesz:#x} \
                 bytes) runs past the end of the file ({file_len:#x} bytes); truncated image?"
            ),
            BzImageProtocolTooOld { version } => write!(
                f,
                "kernel image: bzImage boot protocol {}.{:02} is older than 2.12, the first \
                 with a 64-bit entry point",
                version >> 8,
                version & 0xff
            ),
            BzImageNot64Bit { xloadflags } => write!(
                f,
                "kernel image: bzImage has no 64-bit entry point (xloadflags {xloadflags:#x} \
                 lacks XLF_KERNEL_64)"
            ),
            BzImageNotLoadedHigh => write!(
                f,
                "kernel image: bzImage is not a 'loaded high' kernel (loadflags bit 0 clear); \
                 a zImage cannot be booted"
            ),
            BzImageTooSmall {
                file_len,
                setup_size,
            } => write!(
                f,
                "kernel image: bzImage of {file_len:#x} bytes is shorter than its setup code \
                 ({setup_size:#x} bytes); truncated image?"
            ),
            BzImageOutsideRam { size, ram } => write!(
                f,
                "kernel image: bzImage payload of {size:#x} bytes at {HIMEM_START:#x} does not \
                 fit in guest RAM ({}); give the guest more memory",
                describe_ram(ram)
            ),
            Loader(e) => write!(f, "kernel image: {e}"),
            InitrdEmpty => write!(f, "initrd: the file is empty"),
            InitrdTooLarge { size, low_ram_end } => write!(
                f,
                "initrd: {size:#x} bytes do not fit in guest RAM between 1 MiB and the end of \
                 low RAM ({low_ram_end:#x}); give the guest more memory"
            ),
        }
    }
}

impl std::error::Error for LoadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LoadError::Read { source, .. } => Some(source),
            LoadError::Loader(e) => Some(e),
            _ => None,
        }
    }
}

fn describe_ram(ram: &RamLayout) -> String {
    if ram.high_size == 0 {
        format!("[0, {:#x})", ram.low_end)
    } else {
        format!("[0, {:#x}) and [4 GiB, +{:#x})", ram.low_end, ram.high_size)
    }
}

fn read_err(what: &'static str) -> impl FnOnce(std::io::Error) -> LoadError {
    move |source| LoadError::Read { what, source }
}

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const ELFCLASS64: u8 = 2;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const ELF64_EHDR_SIZE: usize = 64;
const ELF64_PHDR_SIZE: usize = 56;
/// Refuse absurd program header counts before allocating for them.
const ELF_MAX_PHNUM: u16 = 512;

/// Offset of the bzImage setup header in the image, and of its `HdrS` magic.
const SETUP_HEADER_OFFSET: u64 = 0x1f1;
const HDRS_MAGIC: u32 = 0x5372_6448;
const BOOT_PROTOCOL_2_12: u16 = 0x020c;
const XLF_KERNEL_64: u16 = 1 << 0;
const LOADFLAGS_LOADED_HIGH: u8 = 1 << 0;

/// Loads an ELF or bzImage kernel from any seekable reader: a `std::fs::File`, or an in-memory
/// image through `std::io::Cursor<&[u8]>` (see `load_kernel_bytes`).
pub fn load_kernel<F>(mem: &GuestMemoryMmap, kernel: &mut F) -> Result<LoadedKernel, LoadError>
where
    F: Read + ReadVolatile + Seek,
{
    let file_len = kernel
        .seek(SeekFrom::End(0))
        .map_err(read_err("kernel image"))?;
    let mut magic = [0u8; 4];
    if file_len >= 4 {
        kernel.rewind().map_err(read_err("kernel image"))?;
        kernel
            .read_exact(&mut magic)
            .map_err(read_err("kernel image"))?;
    }
    if magic == ELF_MAGIC {
        return load_elf(mem, kernel, file_len);
    }
    if let Some(hdr) = read_setup_header(kernel, file_len)? {
        return load_bzimage(mem, kernel, file_len, hdr);
    }
    Err(LoadError::UnknownFormat)
}

/// Loads a kernel held in memory (for example a guest built into the ember binary).
pub fn load_kernel_bytes(mem: &GuestMemoryMmap, image: &[u8]) -> Result<LoadedKernel, LoadError> {
    load_kernel(mem, &mut std::io::Cursor::new(image))
}

fn le_u16(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[off..off + 2]);
    u16::from_le_bytes(a)
}

fn le_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn load_elf<F>(
    mem: &GuestMemoryMmap,
    kernel: &mut F,
    file_len: u64,
) -> Result<LoadedKernel, LoadError>
where
    F: Read + ReadVolatile + Seek,
{
    let ram = RamLayout::of(mem);
    let mut ehdr = [0u8; ELF64_EHDR_SIZE];
    kernel.rewind().map_err(read_err("ELF header"))?;
    kernel
        .read_exact(&mut ehdr)
        .map_err(read_err("ELF header"))?;
    if ehdr[4] != ELFCLASS64 {
        return Err(LoadError::ElfNot64Bit { class: ehdr[4] });
    }
    let machine = le_u16(&ehdr, 18);
    if machine != EM_X86_64 {
        return Err(LoadError::ElfNotX86_64 { machine });
    }
    let phoff = le_u64(&ehdr, 32);
    let phentsize = le_u16(&ehdr, 54);
    let phnum = le_u16(&ehdr, 56);
    if usize::from(phentsize) != ELF64_PHDR_SIZE {
        return Err(LoadError::ElfBadHeader("e_phentsize is not 56"));
    }
    if phnum > ELF_MAX_PHNUM {
        return Err(LoadError::ElfBadHeader("more than 512 program headers"));
    }
    let ph_end = u64::from(phnum)
        .checked_mul(ELF64_PHDR_SIZE as u64)
        .and_then(|n| n.checked_add(phoff));
    if ph_end.is_none_or(|end| end > file_len) {
        return Err(LoadError::ElfBadHeader(
            "program headers run past the end of the file",
        ));
    }

    // Check every PT_LOAD segment before writing anything: linux-loader copies them blindly.
    kernel
        .seek(SeekFrom::Start(phoff))
        .map_err(read_err("ELF program headers"))?;
    let mut loadable = Vec::new();
    // The extent of every PT_LOAD segment, bss-only ones included: linux-loader reports the
    // entry as the start and ignores segments without file bytes, so an initrd placed there
    // would pass the overlap check and then be cleared or overwritten by the guest.
    let mut extent: Option<(u64, u64)> = None;
    for index in 0..usize::from(phnum) {
        let mut ph = [0u8; ELF64_PHDR_SIZE];
        kernel
            .read_exact(&mut ph)
            .map_err(read_err("ELF program headers"))?;
        let p_type = le_u32(&ph, 0);
        let offset = le_u64(&ph, 8);
        let paddr = le_u64(&ph, 24);
        let filesz = le_u64(&ph, 32);
        let memsz = le_u64(&ph, 40);
        if p_type != PT_LOAD || memsz.max(filesz) == 0 {
            continue;
        }
        // linux-loader copies only segments with file bytes; pure-bss segments must still be
        // in RAM (which starts zeroed).
        if filesz > 0 {
            loadable.push((paddr, filesz));
        }
        if paddr < HIMEM_START {
            return Err(LoadError::ElfSegmentBelowHimem { index, paddr });
        }
        if offset.checked_add(filesz).is_none_or(|end| end > file_len) {
            return Err(LoadError::ElfSegmentPastFileEnd {
                index,
                offset,
                filesz,
                file_len,
            });
        }
        let size = memsz.max(filesz);
        let fits = usize::try_from(size)
            .ok()
            .is_some_and(|len| mem.check_range(GuestAddress(paddr), len));
        if !fits {
            return Err(LoadError::ElfSegmentOutsideRam {
                index,
                paddr,
                memsz: size,
                ram,
            });
        }
        // `fits` guarantees that paddr + size does not overflow.
        let (lo, hi) = extent.unwrap_or((paddr, paddr + size));
        extent = Some((lo.min(paddr), hi.max(paddr + size)));
    }
    if loadable.is_empty() {
        return Err(LoadError::ElfNoLoadableSegment);
    }
    for (paddr, filesz) in loadable {
        prepare_fill(mem, GuestAddress(paddr), filesz);
    }

    let result =
        Elf::load(mem, None, kernel, Some(GuestAddress(HIMEM_START))).map_err(LoadError::Loader)?;
    let entry = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => EntryPoint {
            entry_addr: addr,
            protocol: BootProtocol::PvhBoot,
        },
        _ => EntryPoint {
            entry_addr: result.kernel_load,
            protocol: BootProtocol::LinuxBoot,
        },
    };
    let (lo, hi) = extent.unwrap_or((result.kernel_load.raw_value(), result.kernel_end));
    Ok(LoadedKernel {
        entry,
        format: KernelFormat::Elf,
        kernel_load: GuestAddress(lo),
        kernel_end: hi,
        setup_header: None,
    })
}

/// Reads the setup header if the image carries the `HdrS` magic; `None` if it does not.
fn read_setup_header<F>(kernel: &mut F, file_len: u64) -> Result<Option<setup_header>, LoadError>
where
    F: Read + Seek,
{
    let size = std::mem::size_of::<setup_header>();
    if file_len < SETUP_HEADER_OFFSET + size as u64 {
        return Ok(None);
    }
    let mut raw = vec![0u8; size];
    kernel
        .seek(SeekFrom::Start(SETUP_HEADER_OFFSET))
        .map_err(read_err("bzImage setup header"))?;
    kernel
        .read_exact(&mut raw)
        .map_err(read_err("bzImage setup header"))?;
    let mut hdr = setup_header::default();
    // Every field of the packed header is a plain integer, so any bytes make a valid value.
    vm_memory::ByteValued::as_mut_slice(&mut hdr).copy_from_slice(&raw);
    if { hdr.header } != HDRS_MAGIC {
        return Ok(None);
    }
    Ok(Some(hdr))
}

fn load_bzimage<F>(
    mem: &GuestMemoryMmap,
    kernel: &mut F,
    file_len: u64,
    hdr: setup_header,
) -> Result<LoadedKernel, LoadError>
where
    F: Read + ReadVolatile + Seek,
{
    let version = hdr.version;
    if version < BOOT_PROTOCOL_2_12 {
        return Err(LoadError::BzImageProtocolTooOld { version });
    }
    let xloadflags = hdr.xloadflags;
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LoadError::BzImageNot64Bit { xloadflags });
    }
    if hdr.loadflags & LOADFLAGS_LOADED_HIGH == 0 {
        return Err(LoadError::BzImageNotLoadedHigh);
    }
    // A setup_sects of 0 means 4, as in the boot protocol.
    let setup_sects = match hdr.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    let setup_size = (setup_sects + 1) * 512;
    let payload =
        file_len
            .checked_sub(setup_size)
            .filter(|n| *n > 0)
            .ok_or(LoadError::BzImageTooSmall {
                file_len,
                setup_size,
            })?;
    let fits = usize::try_from(payload)
        .ok()
        .is_some_and(|len| mem.check_range(GuestAddress(HIMEM_START), len));
    if !fits {
        return Err(LoadError::BzImageOutsideRam {
            size: payload,
            ram: RamLayout::of(mem),
        });
    }

    let load_addr = GuestAddress(HIMEM_START);
    prepare_fill(mem, load_addr, payload);
    let result =
        BzImage::load(mem, Some(load_addr), kernel, Some(load_addr)).map_err(LoadError::Loader)?;
    Ok(LoadedKernel {
        entry: EntryPoint {
            entry_addr: load_addr.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
            protocol: BootProtocol::LinuxBoot,
        },
        format: KernelFormat::BzImage,
        kernel_load: result.kernel_load,
        kernel_end: bzimage_end(&hdr, result.kernel_end),
        setup_header: result.setup_header.or(Some(hdr)),
    })
}

/// End of the memory a bzImage loaded at `HIMEM_START` uses before it reads the e820 map: its
/// decompressor works in [runtime start, + init_size) (boot protocol 2.10+, "init_size"), which
/// for a relocatable kernel starts at the load address raised to pref_address and aligned up to
/// kernel_alignment. An initrd there would be overwritten during decompression.
fn bzimage_end(hdr: &setup_header, payload_end: u64) -> u64 {
    if hdr.init_size == 0 {
        return payload_end;
    }
    let pref = hdr.pref_address;
    let runtime_start = if hdr.relocatable_kernel != 0 {
        let align = u64::from(hdr.kernel_alignment).max(1);
        HIMEM_START
            .max(pref)
            .checked_next_multiple_of(align)
            .unwrap_or(u64::MAX)
    } else {
        pref
    };
    runtime_start
        .saturating_add(u64::from(hdr.init_size))
        .max(payload_end)
}

/// Copies the initrd page-aligned as high as possible at the end of low RAM (below 3 GiB and
/// below the end of RAM). Works with a `std::fs::File` or a `Cursor<&[u8]>`.
pub fn load_initrd<F>(mem: &GuestMemoryMmap, initrd: &mut F) -> Result<InitrdConfig, LoadError>
where
    F: Read + ReadVolatile + Seek,
{
    let size = initrd.seek(SeekFrom::End(0)).map_err(read_err("initrd"))?;
    if size == 0 {
        return Err(LoadError::InitrdEmpty);
    }
    let low_ram_end = RamLayout::of(mem).low_end.min(MMIO_GAP_START);
    let too_large = LoadError::InitrdTooLarge { size, low_ram_end };
    let address = low_ram_end
        .checked_sub(size)
        .map(|a| a & !(page_size() - 1))
        .filter(|a| *a >= HIMEM_START)
        .ok_or(too_large)?;
    let len = usize::try_from(size).map_err(|_| LoadError::InitrdTooLarge { size, low_ram_end })?;
    initrd.rewind().map_err(read_err("initrd"))?;
    prepare_fill(mem, GuestAddress(address), size);
    mem.read_exact_volatile_from(GuestAddress(address), initrd, len)
        .map_err(|e| LoadError::Read {
            what: "initrd",
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok(InitrdConfig {
        address: GuestAddress(address),
        size: len,
    })
}

/// Loads an initrd held in memory.
pub fn load_initrd_bytes(mem: &GuestMemoryMmap, image: &[u8]) -> Result<InitrdConfig, LoadError> {
    load_initrd(mem, &mut std::io::Cursor::new(image))
}

fn page_size() -> u64 {
    0x1000
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::Bytes;

    use crate::arch::x86_64::memory::arch_memory_regions;

    const MIB: u64 = 1 << 20;

    pub(crate) fn guest_mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&arch_memory_regions(size)).unwrap()
    }

    /// A minimal ELF64 x86-64 executable: one PT_LOAD of `code` at `paddr`, plus a PT_NOTE with
    /// the Xen PVH entry note when `pvh_entry` is given.
    pub(crate) fn make_elf(paddr: u64, code: &[u8], pvh_entry: Option<u32>) -> Vec<u8> {
        let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
        let data_off = 64 + 56 * u64::from(phnum);
        let mut note = Vec::new();
        if let Some(entry) = pvh_entry {
            note.extend_from_slice(&4u32.to_le_bytes()); // namesz: "Xen\0"
            note.extend_from_slice(&4u32.to_le_bytes()); // descsz
            note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
            note.extend_from_slice(b"Xen\0");
            note.extend_from_slice(&entry.to_le_bytes());
        }
        let code_off = data_off + note.len() as u64;

        let mut v = Vec::new();
        v.extend_from_slice(b"\x7fELF");
        v.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV
        v.extend_from_slice(&[0; 8]);
        v.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        v.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        v.extend_from_slice(&1u32.to_le_bytes());
        v.extend_from_slice(&paddr.to_le_bytes()); // e_entry
        v.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
        v.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        v.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        v.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
        v.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
        v.extend_from_slice(&phnum.to_le_bytes());
        v.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
        v.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
        v.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
        assert_eq!(v.len(), 64);
        let mut phdr = |p_type: u32, off: u64, addr: u64, filesz: u64, memsz: u64| {
            v.extend_from_slice(&p_type.to_le_bytes());
            v.extend_from_slice(&5u32.to_le_bytes()); // R+X
            v.extend_from_slice(&off.to_le_bytes());
            v.extend_from_slice(&addr.to_le_bytes()); // vaddr
            v.extend_from_slice(&addr.to_le_bytes()); // paddr
            v.extend_from_slice(&filesz.to_le_bytes());
            v.extend_from_slice(&memsz.to_le_bytes());
            v.extend_from_slice(&4u64.to_le_bytes());
        };
        phdr(PT_LOAD, code_off, paddr, code.len() as u64, 0x2000);
        if pvh_entry.is_some() {
            phdr(4, data_off, 0, note.len() as u64, note.len() as u64); // PT_NOTE
        }
        v.extend_from_slice(&note);
        v.extend_from_slice(code);
        v
    }

    /// A synthetic bzImage: boot sector + `setup_sects` sectors of setup, then `payload`.
    pub(crate) fn make_bzimage(version: u16, xloadflags: u16, payload: &[u8]) -> Vec<u8> {
        let setup_sects = 4u8;
        let mut v = vec![0u8; (usize::from(setup_sects) + 1) * 512];
        v[0x1f1] = setup_sects;
        v[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        v[0x202..0x206].copy_from_slice(b"HdrS");
        v[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        v[0x211] = LOADFLAGS_LOADED_HIGH;
        v[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        v[0x218..0x21c].copy_from_slice(&0xdead_beefu32.to_le_bytes()); // ramdisk_image
        v[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        v[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
        v[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        v[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn elf_loads_at_its_physical_address() {
        let mem = guest_mem(128 * MIB);
        let code = [0xf4u8, 0x90, 0x90, 0xeb];
        let elf = make_elf(0x20_0000, &code, None);
        let k = load_kernel_bytes(&mem, &elf).unwrap();
        assert_eq!(k.format, KernelFormat::Elf);
        assert_eq!(k.entry.protocol, BootProtocol::LinuxBoot);
        assert_eq!(k.entry.entry_addr, GuestAddress(0x20_0000));
        assert_eq!(k.kernel_end, 0x20_2000);
        assert!(k.setup_header.is_none());
        let mut got = [0u8; 4];
        mem.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(got, code);
    }

    #[test]
    fn elf_from_a_file() {
        let mem = guest_mem(128 * MIB);
        let elf = make_elf(0x10_0000, &[1, 2, 3], None);
        let path = std::env::temp_dir().join(format!("ember-arch-elf-{}", std::process::id()));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&elf)
            .unwrap();
        let mut f = std::fs::File::open(&path).unwrap();
        let k = load_kernel(&mem, &mut f).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(k.entry.entry_addr, GuestAddress(0x10_0000));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_0002)).unwrap(), 3);
    }

    #[test]
    fn elf_with_pvh_note_uses_pvh() {
        let mem = guest_mem(128 * MIB);
        let elf = make_elf(0x100_0000, &[0x90; 16], Some(0x100_0008));
        let k = load_kernel_bytes(&mem, &elf).unwrap();
        assert_eq!(k.entry.protocol, BootProtocol::PvhBoot);
        assert_eq!(k.entry.entry_addr, GuestAddress(0x100_0008));
    }

    #[test]
    fn elf_segment_below_1mib_or_outside_ram_rejected() {
        let mem = guest_mem(16 * MIB);
        let low = make_elf(0x8_0000, &[0x90; 16], None);
        let e = load_kernel_bytes(&mem, &low).unwrap_err();
        assert!(matches!(e, LoadError::ElfSegmentBelowHimem { .. }), "{e}");
        assert!(e.to_string().contains("0x80000"), "{e}");

        let high = make_elf(0x200_0000, &[0x90; 16], None);
        let e = load_kernel_bytes(&mem, &high).unwrap_err();
        assert!(matches!(e, LoadError::ElfSegmentOutsideRam { .. }), "{e}");
        assert!(e.to_string().contains("0x2000000"), "{e}");

        let mut truncated = make_elf(0x10_0000, &[0x90; 16], None);
        truncated.truncate(truncated.len() - 4);
        let e = load_kernel_bytes(&mem, &truncated).unwrap_err();
        assert!(matches!(e, LoadError::ElfSegmentPastFileEnd { .. }), "{e}");
    }

    #[test]
    fn unknown_format_rejected() {
        let mem = guest_mem(16 * MIB);
        for image in [&b""[..], b"hello", &[0u8; 4096][..]] {
            let e = load_kernel_bytes(&mem, image).unwrap_err();
            assert!(matches!(e, LoadError::UnknownFormat));
            assert!(e.to_string().contains("not an ELF or bzImage kernel"));
        }
    }

    #[test]
    fn bzimage_loads_at_1mib() {
        let mem = guest_mem(64 * MIB);
        let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let img = make_bzimage(0x020f, XLF_KERNEL_64 | 2, &payload);
        let k = load_kernel_bytes(&mem, &img).unwrap();
        assert_eq!(k.format, KernelFormat::BzImage);
        assert_eq!(k.entry.protocol, BootProtocol::LinuxBoot);
        assert_eq!(k.entry.entry_addr, GuestAddress(0x10_0200));
        assert_eq!(k.kernel_end, 0x10_0000 + payload.len() as u64);
        let hdr = k.setup_header.unwrap();
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        assert_eq!({ hdr.version }, 0x020f);
        let mut got = vec![0u8; payload.len()];
        mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(got, payload);
    }

    #[test]
    fn bzimage_old_protocol_or_32bit_rejected() {
        let mem = guest_mem(64 * MIB);
        let e =
            load_kernel_bytes(&mem, &make_bzimage(0x020b, XLF_KERNEL_64, &[1; 64])).unwrap_err();
        assert!(matches!(
            e,
            LoadError::BzImageProtocolTooOld { version: 0x020b }
        ));
        assert!(e.to_string().contains("2.11"), "{e}");
        let e = load_kernel_bytes(&mem, &make_bzimage(0x020c, 0, &[1; 64])).unwrap_err();
        assert!(matches!(e, LoadError::BzImageNot64Bit { .. }), "{e}");
        let e = load_kernel_bytes(&mem, &make_bzimage(0x020c, XLF_KERNEL_64, &[])).unwrap_err();
        assert!(matches!(e, LoadError::BzImageTooSmall { .. }), "{e}");
    }

    #[test]
    fn initrd_at_top_of_low_ram_page_aligned() {
        let mem = guest_mem(128 * MIB);
        let data = vec![0x5au8; 10_000];
        let cfg = load_initrd_bytes(&mem, &data).unwrap();
        assert_eq!(cfg.size, data.len());
        assert_eq!(cfg.address.raw_value() % 0x1000, 0);
        assert!(cfg.address.raw_value() + data.len() as u64 <= 128 * MIB);
        assert!(cfg.address.raw_value() + data.len() as u64 > 128 * MIB - 0x1000);
        assert_eq!(mem.read_obj::<u8>(cfg.address).unwrap(), 0x5a);
    }

    #[test]
    fn initrd_below_the_mmio_hole_for_big_guests() {
        let mem = guest_mem(5 << 30);
        let cfg = load_initrd_bytes(&mem, &[1u8; 100]).unwrap();
        assert_eq!(cfg.address.raw_value(), MMIO_GAP_START - 0x1000);
    }

    /// AnonHugePages of the mapping of this process that holds host address `addr`, in KiB.
    fn anon_huge_kib(addr: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = first.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    inside = a <= addr && addr < b;
                    continue;
                }
            }
            if let Some(v) = line.strip_prefix("AnonHugePages:").filter(|_| inside) {
                return v.trim().trim_end_matches("kB").trim().parse().unwrap();
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[test]
    fn big_kernel_segments_and_initrds_get_huge_pages() {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        if thp.is_empty() || thp.contains("[never]") {
            eprintln!("transparent huge pages are off on this host: nothing to check");
            return;
        }
        let mem = guest_mem(256 * MIB);
        let host = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as usize;
        // A 6 MiB segment holds at least two whole 2 MiB pages wherever the mapping starts.
        let code = vec![0x90u8; (6 * MIB) as usize];
        load_kernel_bytes(&mem, &make_elf(16 * MIB, &code, None)).unwrap();
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(22 * MIB - 1)).unwrap(),
            0x90
        );
        assert!(anon_huge_kib(host(16 * MIB)) >= 4096);
        let cfg = load_initrd_bytes(&mem, &code).unwrap();
        assert!(anon_huge_kib(host(cfg.address.raw_value())) >= 4096);
        // A small image leaves RAM in 4 KiB pages: a 2 MiB page would cost more to clear than
        // the copy saves.
        let mem = guest_mem(128 * MIB);
        load_kernel_bytes(&mem, &make_elf(MIB, &[0x90; 4096], None)).unwrap();
        assert_eq!(
            anon_huge_kib(mem.get_host_address(GuestAddress(MIB)).unwrap() as usize),
            0
        );
    }

    #[test]
    fn initrd_too_large_or_empty_rejected() {
        let mem = guest_mem(4 * MIB);
        let e = load_initrd_bytes(&mem, &vec![0u8; (4 * MIB) as usize]).unwrap_err();
        assert!(matches!(e, LoadError::InitrdTooLarge { .. }), "{e}");
        assert!(e.to_string().contains("0x400000"), "{e}");
        assert!(matches!(
            load_initrd_bytes(&mem, &[]).unwrap_err(),
            LoadError::InitrdEmpty
        ));
    }
}
