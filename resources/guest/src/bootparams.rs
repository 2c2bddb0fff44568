//! The Linux zero page (`struct boot_params`) the VMM left at RSI.

use core::ptr::read_unaligned;

const E820_ENTRIES: u64 = 0x1e8; // u8
const E820_TABLE: u64 = 0x2d0; // 20-byte entries
const E820_MAX: u64 = 128;
const RAMDISK_IMAGE: u64 = 0x218; // u32
const RAMDISK_SIZE: u64 = 0x21c; // u32
const CMD_LINE_PTR: u64 = 0x228; // u32
const EXT_RAMDISK_IMAGE: u64 = 0x0c0; // u32, high half
const EXT_RAMDISK_SIZE: u64 = 0x0c4; // u32, high half
const EXT_CMD_LINE_PTR: u64 = 0x0c8; // u32, high half
const ACPI_RSDP_ADDR: u64 = 0x070; // u64

pub const E820_RAM: u32 = 1;
pub const MIB: u64 = 1 << 20;

#[derive(Clone, Copy)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl E820Entry {
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

pub struct BootParams {
    base: u64,
}

/// Reads guest-physical memory (identity-mapped, user-accessible).
pub fn peek<T: Copy>(addr: u64) -> T {
    unsafe { read_unaligned(addr as *const T) }
}

impl BootParams {
    pub fn new(base: u64) -> Self {
        BootParams { base }
    }

    fn get<T: Copy>(&self, off: u64) -> T {
        peek(self.base + off)
    }

    fn u32_pair(&self, lo: u64, hi: u64) -> u64 {
        self.get::<u32>(lo) as u64 | (self.get::<u32>(hi) as u64) << 32
    }

    /// The NUL-terminated kernel command line, without the NUL.
    pub fn cmdline(&self) -> &'static [u8] {
        let p = self.u32_pair(CMD_LINE_PTR, EXT_CMD_LINE_PTR);
        if p == 0 {
            return &[];
        }
        let mut n = 0u64;
        while n < 65536 && peek::<u8>(p + n) != 0 {
            n += 1;
        }
        unsafe { core::slice::from_raw_parts(p as *const u8, n as usize) }
    }

    pub fn e820(&self) -> impl Iterator<Item = E820Entry> + '_ {
        let n = (self.get::<u8>(E820_ENTRIES) as u64).min(E820_MAX);
        (0..n).map(move |i| {
            let e = E820_TABLE + i * 20;
            E820Entry {
                addr: self.get(e),
                size: self.get(e + 8),
                kind: self.get(e + 16),
            }
        })
    }

    pub fn ram(&self) -> impl Iterator<Item = E820Entry> + '_ {
        self.e820().filter(|e| e.kind == E820_RAM)
    }

    /// Total RAM in e820, in MiB rounded up (the low-memory holes are < 1 MiB).
    pub fn ram_mib(&self) -> u64 {
        let bytes: u64 = self.ram().map(|e| e.size).sum();
        bytes.div_ceil(MIB)
    }

    /// True when [addr, addr+len) lies inside one e820 RAM region.
    pub fn is_ram(&self, addr: u64, len: u64) -> bool {
        self.ram().any(|e| e.addr <= addr && addr + len <= e.end())
    }

    /// (address, size) of the initrd, if any.
    pub fn ramdisk(&self) -> Option<(u64, u64)> {
        let image = self.u32_pair(RAMDISK_IMAGE, EXT_RAMDISK_IMAGE);
        let size = self.u32_pair(RAMDISK_SIZE, EXT_RAMDISK_SIZE);
        if image == 0 || size == 0 {
            None
        } else {
            Some((image, size))
        }
    }

    pub fn acpi_rsdp_addr(&self) -> u64 {
        self.get(ACPI_RSDP_ADDR)
    }
}
