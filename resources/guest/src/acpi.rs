//! Just enough ACPI to list the CPUs: RSDP -> XSDT (or RSDT) -> MADT.

use crate::bootparams::{peek, BootParams};

pub const MAX_CPUS: usize = 64;

pub struct Cpus {
    apic_ids: [u32; MAX_CPUS],
    count: usize,
}

impl Cpus {
    pub fn apic_ids(&self) -> &[u32] {
        self.apic_ids.get(..self.count).unwrap_or(&[])
    }
    pub fn count(&self) -> usize {
        self.count
    }
}

fn sum_ok(addr: u64, len: u64) -> bool {
    let mut s = 0u8;
    for i in 0..len {
        s = s.wrapping_add(peek::<u8>(addr + i));
    }
    s == 0
}

fn sig(addr: u64) -> [u8; 4] {
    peek(addr)
}

fn valid_rsdp(a: u64) -> bool {
    peek::<[u8; 8]>(a) == *b"RSD PTR " && sum_ok(a, 20)
}

fn find_rsdp(bp: &BootParams) -> Option<u64> {
    let a = bp.acpi_rsdp_addr();
    if a != 0 && valid_rsdp(a) {
        return Some(a);
    }
    (0xe0000u64..0x100000).step_by(16).find(|&a| valid_rsdp(a))
}

/// Finds the MADT ("APIC") through the XSDT (revision >= 2) or the RSDT.
fn find_madt(bp: &BootParams) -> Result<u64, &'static str> {
    let rsdp = find_rsdp(bp).ok_or("ACPI: no RSDP")?;
    let (root, entry_size) = if peek::<u8>(rsdp + 15) >= 2 {
        if !sum_ok(rsdp, peek::<u32>(rsdp + 20) as u64) {
            return Err("ACPI: bad RSDP extended checksum");
        }
        (peek::<u64>(rsdp + 24), 8)
    } else {
        (peek::<u32>(rsdp + 16) as u64, 4)
    };
    if root == 0 || root >= 1 << 33 {
        return Err("ACPI: no XSDT/RSDT");
    }
    let len = peek::<u32>(root + 4) as u64;
    if len < 36 || !sum_ok(root, len) {
        return Err("ACPI: bad XSDT/RSDT checksum");
    }
    let mut p = root + 36;
    while p + entry_size <= root + len {
        let t = if entry_size == 8 {
            peek::<u64>(p)
        } else {
            peek::<u32>(p) as u64
        };
        if t != 0 && t < 1 << 33 && sig(t) == *b"APIC" {
            return Ok(t);
        }
        p += entry_size;
    }
    Err("ACPI: no MADT")
}

/// Enabled local APICs (x)APIC ids from the MADT, in table order.
pub fn cpus(bp: &BootParams) -> Result<Cpus, &'static str> {
    let madt = find_madt(bp)?;
    let len = peek::<u32>(madt + 4) as u64;
    if len < 44 || !sum_ok(madt, len) {
        return Err("ACPI: bad MADT checksum");
    }
    let mut cpus = Cpus {
        apic_ids: [0; MAX_CPUS],
        count: 0,
    };
    let mut p = madt + 44;
    while p + 2 <= madt + len {
        let (kind, elen) = (peek::<u8>(p), peek::<u8>(p + 1) as u64);
        if elen < 2 || p + elen > madt + len {
            return Err("ACPI: bad MADT entry");
        }
        let cpu = match kind {
            0 if elen >= 8 => Some((peek::<u8>(p + 3) as u32, peek::<u32>(p + 4))),
            9 if elen >= 16 => Some((peek::<u32>(p + 4), peek::<u32>(p + 8))),
            _ => None,
        };
        if let Some((id, flags)) = cpu {
            if flags & 1 != 0 {
                match cpus.apic_ids.get_mut(cpus.count) {
                    Some(slot) => *slot = id,
                    None => return Err("ACPI: more CPUs than the guest supports"),
                }
                cpus.count += 1;
            }
        }
        p += elen;
    }
    if cpus.count == 0 {
        return Err("ACPI: no enabled CPU in the MADT");
    }
    Ok(cpus)
}

/// The CPU list, or FAIL.
pub fn cpus_or_fail(bp: &BootParams) -> Cpus {
    match cpus(bp) {
        Ok(c) => c,
        Err(e) => fail!(e),
    }
}
