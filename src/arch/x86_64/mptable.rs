//! Intel MultiProcessor Specification 1.4 table, for kernels built without ACPI.
//!
//! Layout: the floating pointer structure (16 bytes) followed directly by the configuration
//! table: one processor entry per vCPU, the ISA bus, the IOAPIC, one I/O interrupt entry per
//! IOAPIC pin and the two local interrupts (LINT0 = ExtINT, LINT1 = NMI). All fields are
//! little-endian and byte-packed, so the table is serialized field by field.

use std::fmt;

use vm_memory::{Bytes, GuestAddress};

use super::layout::{IOAPIC_ADDR, IRQ_MAX, LAPIC_ADDR};
use super::memory::GuestMemoryMmap;

const MPF_INTEL_SIZE: usize = 16;
const MPC_TABLE_SIZE: usize = 44;
const MPC_CPU_SIZE: usize = 20;
const MPC_ENTRY_SIZE: usize = 8;

const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;

const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MPC_APIC_USABLE: u8 = 1;
const APIC_VERSION: u8 = 0x14;
/// Family 6 signature and the FPU + APIC feature bits reported per processor.
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_FPU: u32 = 1 << 0;
const CPU_FEATURE_APIC: u32 = 1 << 9;
const MPC_SPEC_1_4: u8 = 4;
const MPC_OEM: &[u8; 8] = b"EMBER   ";
const MPC_PRODUCT_ID: &[u8; 12] = b"EMBERVM     ";
const BUS_TYPE_ISA: &[u8; 6] = b"ISA   ";

/// Errors writing the MPTable.
#[derive(Debug, PartialEq, Eq)]
pub enum MptableError {
    /// APIC ids are 8-bit and 0xff is broadcast, and the IOAPIC takes the id after the last CPU.
    TooManyCpus {
        count: u8,
        max: u8,
    },
    NoCpus,
    /// The table does not fit in guest RAM at the given address.
    Write {
        addr: u64,
        len: usize,
    },
}

impl fmt::Display for MptableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MptableError::TooManyCpus { count, max } => write!(
                f,
                "MPTable: {count} vCPUs is more than the {max} the table can describe"
            ),
            MptableError::NoCpus => write!(f, "MPTable: the guest has no vCPU"),
            MptableError::Write { addr, len } => write!(
                f,
                "MPTable: cannot write {len} bytes at guest address {addr:#x} (outside guest RAM)"
            ),
        }
    }
}

impl std::error::Error for MptableError {}

/// Largest vCPU count: APIC ids 0..n-1 for CPUs, n for the IOAPIC, 0xff is broadcast.
pub const MAX_SUPPORTED_CPUS: u8 = 254;

/// Size in bytes of the MPTable for `num_cpus` vCPUs.
pub fn mptable_size(num_cpus: u8) -> usize {
    let irqs = IRQ_MAX as usize + 1;
    MPF_INTEL_SIZE
        + MPC_TABLE_SIZE
        + MPC_CPU_SIZE * usize::from(num_cpus)
        + MPC_ENTRY_SIZE * (1 + 1 + irqs + 2)
}

fn checksum_fix(bytes: &[u8]) -> u8 {
    let sum = bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    0u8.wrapping_sub(sum)
}

/// Serializes the MPTable as it will sit at guest address `base`.
pub fn build_mptable(base: u64, num_cpus: u8) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 {
        return Err(MptableError::NoCpus);
    }
    if num_cpus > MAX_SUPPORTED_CPUS {
        return Err(MptableError::TooManyCpus {
            count: num_cpus,
            max: MAX_SUPPORTED_CPUS,
        });
    }
    let ioapic_id = num_cpus + 1;
    let irqs = IRQ_MAX as u8 + 1;

    // Configuration table entries first, so that the header can carry their count and checksum.
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, 0]);
    entries.extend_from_slice(BUS_TYPE_ISA);
    count += 1;
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, APIC_VERSION, MPC_APIC_USABLE]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    for irq in 0..irqs {
        // Conforming polarity and trigger, ISA bus 0 IRQ n to IOAPIC pin n.
        entries.extend_from_slice(&[MP_INTSRC, MP_IRQ_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = MPC_TABLE_SIZE + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(MPC_SPEC_1_4);
    table.push(0); // checksum, fixed below
    table.extend_from_slice(MPC_OEM);
    table.extend_from_slice(MPC_PRODUCT_ID);
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum + reserved
    table.extend_from_slice(&entries);
    table[7] = checksum_fix(&table);

    let mut out = Vec::with_capacity(MPF_INTEL_SIZE + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&((base + MPF_INTEL_SIZE as u64) as u32).to_le_bytes());
    out.push(1); // length in 16-byte paragraphs
    out.push(MPC_SPEC_1_4);
    out.push(0); // checksum, fixed below
    out.extend_from_slice(&[0u8; 5]); // feature bytes: 0 = configuration table present
    out[10] = checksum_fix(&out);
    out.extend_from_slice(&table);
    debug_assert_eq!(out.len(), mptable_size(num_cpus));
    Ok(out)
}

/// Writes the MPTable at `base`; returns the first address after it.
pub fn setup_mptable(mem: &GuestMemoryMmap, base: u64, num_cpus: u8) -> Result<u64, MptableError> {
    let bytes = build_mptable(base, num_cpus)?;
    mem.write_slice(&bytes, GuestAddress(base))
        .map_err(|_| MptableError::Write {
            addr: base,
            len: bytes.len(),
        })?;
    Ok(base + bytes.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_layout() {
        for cpus in [1u8, 2, 4, 32, 254] {
            let t = build_mptable(0x9fc00, cpus).unwrap();
            assert_eq!(t.len(), mptable_size(cpus));
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()), 0x9fc10);
            let table = &t[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "configuration table checksum");
            let count = u16::from_le_bytes([table[34], table[35]]) as usize;
            assert_eq!(count, usize::from(cpus) + 2 + 24 + 2);
            // Processor entries carry APIC ids 0..n, the first is the BSP.
            let cpu = &table[44..];
            assert_eq!((cpu[0], cpu[1], cpu[3]), (MP_PROCESSOR, 0, 3));
            if cpus > 1 {
                assert_eq!((cpu[20], cpu[21], cpu[23]), (MP_PROCESSOR, 1, 1));
            }
        }
    }

    #[test]
    fn bad_cpu_counts() {
        assert_eq!(build_mptable(0, 0), Err(MptableError::NoCpus));
        assert!(matches!(
            build_mptable(0, 255),
            Err(MptableError::TooManyCpus { count: 255, .. })
        ));
    }

    #[test]
    fn firecracker_limit_fits_before_0xa0000() {
        // 32 vCPUs (Firecracker's maximum) stay inside the 1 KiB EBDA area.
        assert!(0x9fc00 + mptable_size(32) as u64 <= 0xa0000);
    }
}
