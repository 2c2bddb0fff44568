//! ACPI tables: RSDP -> XSDT -> FADT (-> DSDT), MADT.
//!
//! The tables are built with the acpi_tables crate and copied into the reserved area after the
//! MPTable; only the RSDP sits at a fixed address (`RSDP_ADDR`), where both `boot_params` and
//! the kernel's BIOS-area scan find it.

use std::fmt;

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    COM1_GSI, COM1_PORT, I8042_COMMAND_PORT, I8042_DATA_PORT, I8042_GSI, IOAPIC_ADDR, LAPIC_ADDR,
    RSDP_ADDR,
};
use super::memory::GuestMemoryMmap;

/// OEM identity carried by every table.
pub const OEM_ID: [u8; 6] = *b"EMBER ";
pub const OEM_TABLE_ID: [u8; 8] = *b"EMBERVM ";
pub const OEM_REVISION: u32 = 1;
/// FADT "Hypervisor Vendor Identity".
pub const HYPERVISOR_VENDOR_ID: [u8; 8] = *b"EMBERKVM";

/// IA-PC boot architecture flags: no VGA, no MSI, no PCIe ASPM control. The 8042 flag stays
/// clear as on Firecracker: Linux then finds the i8042 through its DSDT device (PNP0303).
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_BOOT_ARCH_MSI_NOT_PRESENT: u16 = 1 << 3;
const IAPC_BOOT_ARCH_PCIE_ASPM_CONTROLS: u16 = 1 << 4;

/// Tables are placed on this alignment.
const TABLE_ALIGN: u64 = 16;
/// DSDT device names are "V" plus three hex digits.
const MAX_MMIO_DEVICES: usize = 0x1000;

/// A virtio-mmio window the guest should find, described in the DSDT as "LNRO0005".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    pub addr: u64,
    pub len: u64,
    pub irq: u32,
}

/// Errors building or writing the ACPI tables.
#[derive(Debug, PartialEq, Eq)]
pub enum AcpiError {
    /// A virtio-mmio window that a 32-bit Memory32Fixed descriptor cannot describe.
    MmioDeviceNot32Bit {
        index: usize,
        addr: u64,
        len: u64,
    },
    TooManyMmioDevices {
        count: usize,
        max: usize,
    },
    /// The tables run into the RSDP at 0xe0000.
    TablesTooLarge {
        start: u64,
        end: u64,
    },
    /// Writing a table failed (outside guest RAM).
    Write {
        table: &'static str,
        addr: u64,
        len: usize,
    },
}

impl fmt::Display for AcpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AcpiError::MmioDeviceNot32Bit { index, addr, len } => write!(
                f,
                "ACPI: virtio-mmio device {index} window [{addr:#x}, +{len:#x}) is not below 4 GiB"
            ),
            AcpiError::TooManyMmioDevices { count, max } => write!(
                f,
                "ACPI: {count} virtio-mmio devices is more than the DSDT supports ({max})"
            ),
            AcpiError::TablesTooLarge { start, end } => write!(
                f,
                "ACPI: the tables [{start:#x}, {end:#x}) run past the RSDP at {RSDP_ADDR:#x}"
            ),
            AcpiError::Write { table, addr, len } => write!(
                f,
                "ACPI: cannot write the {table} ({len} bytes) at guest address {addr:#x} \
                 (outside guest RAM)"
            ),
        }
    }
}

impl std::error::Error for AcpiError {}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

/// The DSDT's AML: COM1, the i8042 and every virtio-mmio device, under `\_SB_`.
pub fn dsdt_aml(mmio_devices: &[MmioDeviceInfo]) -> Result<Vec<u8>, AcpiError> {
    if mmio_devices.len() > MAX_MMIO_DEVICES {
        return Err(AcpiError::TooManyMmioDevices {
            count: mmio_devices.len(),
            max: MAX_MMIO_DEVICES,
        });
    }
    // _HID as a string: the PNP ids are valid in string form and stay greppable in the table.
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_GSI);
    let com1_io = aml::IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_irq, &com1_io]);
    let com1_hid = aml::Name::new("_HID".into(), &"PNP0501");
    let com1_uid = aml::Name::new("_UID".into(), &0u8);
    let com1_ddn = aml::Name::new("_DDN".into(), &"COM1");
    let com1_crs = aml::Name::new("_CRS".into(), &com1_crs);
    let com1 = aml::Device::new(
        "COM1".into(),
        vec![&com1_hid, &com1_uid, &com1_ddn, &com1_crs],
    );

    let kbd_data = aml::IO::new(I8042_DATA_PORT, I8042_DATA_PORT, 1, 1);
    let kbd_cmd = aml::IO::new(I8042_COMMAND_PORT, I8042_COMMAND_PORT, 1, 1);
    let kbd_irq = aml::Interrupt::new(true, true, false, false, I8042_GSI);
    let kbd_crs = aml::ResourceTemplate::new(vec![&kbd_data, &kbd_cmd, &kbd_irq]);
    let kbd_hid = aml::Name::new("_HID".into(), &"PNP0303");
    let kbd_sta = aml::Name::new("_STA".into(), &0x0fu8);
    let kbd_crs = aml::Name::new("_CRS".into(), &kbd_crs);
    let kbd = aml::Device::new("PS2_".into(), vec![&kbd_hid, &kbd_sta, &kbd_crs]);

    let mut virtio = Vec::with_capacity(mmio_devices.len());
    for (index, dev) in mmio_devices.iter().enumerate() {
        let (base, len) = match (u32::try_from(dev.addr), u32::try_from(dev.len)) {
            (Ok(b), Ok(l)) if dev.addr.checked_add(dev.len).is_some_and(|e| e <= 1 << 32) => (b, l),
            _ => {
                return Err(AcpiError::MmioDeviceNot32Bit {
                    index,
                    addr: dev.addr,
                    len: dev.len,
                })
            }
        };
        let window = aml::Memory32Fixed::new(true, base, len);
        let irq = aml::Interrupt::new(true, true, false, false, dev.irq);
        let crs = aml::ResourceTemplate::new(vec![&window, &irq]);
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uid = aml::Name::new("_UID".into(), &(index as u32));
        let crs = aml::Name::new("_CRS".into(), &crs);
        let name = format!("V{index:03X}");
        virtio.push(to_bytes(&aml::Device::new(
            name.as_str().into(),
            vec![&hid, &uid, &crs],
        )));
    }

    let mut children = to_bytes(&com1);
    children.extend(to_bytes(&kbd));
    for dev in virtio {
        children.extend(dev);
    }
    Ok(aml::Scope::raw("\\_SB_".into(), children))
}

/// Where each table went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiLayout {
    pub rsdp: u64,
    pub xsdt: u64,
    pub fadt: u64,
    pub madt: u64,
    pub dsdt: u64,
    /// First address past the last table (before the RSDP).
    pub end: u64,
}

fn align_up(addr: u64) -> u64 {
    (addr + TABLE_ALIGN - 1) & !(TABLE_ALIGN - 1)
}

fn write_table(
    mem: &GuestMemoryMmap,
    table: &'static str,
    bytes: &[u8],
    addr: u64,
) -> Result<(), AcpiError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|_| AcpiError::Write {
            table,
            addr,
            len: bytes.len(),
        })
}

/// Builds all tables and writes them from `start` (up to the RSDP), the RSDP at `RSDP_ADDR`.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    start: u64,
    vcpu_count: u8,
    mmio_devices: &[MmioDeviceInfo],
) -> Result<AcpiLayout, AcpiError> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&dsdt_aml(mmio_devices)?);
    let dsdt = to_bytes(&dsdt);
    let dsdt_addr = align_up(start);

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = (IAPC_BOOT_ARCH_VGA_NOT_PRESENT
        | IAPC_BOOT_ARCH_MSI_NOT_PRESENT
        | IAPC_BOOT_ARCH_PCIE_ASPM_CONTROLS)
        .into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR_ID).into();
    let fadt = to_bytes(&fadt.finalize());
    let fadt_addr = align_up(dsdt_addr + dsdt.len() as u64);

    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR as u32),
    );
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR as u32, 0));
    for cpu in 0..vcpu_count {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    let madt = to_bytes(&madt);
    let madt_addr = align_up(fadt_addr + fadt.len() as u64);

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = to_bytes(&xsdt);
    let xsdt_addr = align_up(madt_addr + madt.len() as u64);
    let end = xsdt_addr + xsdt.len() as u64;
    if end > RSDP_ADDR {
        return Err(AcpiError::TablesTooLarge { start, end });
    }

    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    write_table(mem, "DSDT", &dsdt, dsdt_addr)?;
    write_table(mem, "FADT", &fadt, fadt_addr)?;
    write_table(mem, "MADT", &madt, madt_addr)?;
    write_table(mem, "XSDT", &xsdt, xsdt_addr)?;
    write_table(mem, "RSDP", &rsdp, RSDP_ADDR)?;
    Ok(AcpiLayout {
        rsdp: RSDP_ADDR,
        xsdt: xsdt_addr,
        fadt: fadt_addr,
        madt: madt_addr,
        dsdt: dsdt_addr,
        end,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::arch::x86_64::loader::tests::guest_mem;

    pub(crate) fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Reads a whole SDT (header length at offset 4).
    pub(crate) fn read_sdt(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let hdr = read(mem, addr, 8);
        let len = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
        read(mem, addr, len)
    }

    pub(crate) fn sums_to_zero(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    fn contains(hay: &[u8], needle: &[u8]) -> usize {
        hay.windows(needle.len()).filter(|w| *w == needle).count()
    }

    pub(crate) fn check_tables(mem: &GuestMemoryMmap, vcpus: u8, mmio: &[MmioDeviceInfo]) {
        let rsdp = read(mem, RSDP_ADDR, 36);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(&rsdp[9..15], b"EMBER ");
        assert!(sums_to_zero(&rsdp[..20]), "RSDP v1 checksum");
        assert!(sums_to_zero(&rsdp), "RSDP extended checksum");
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let xsdt = read_sdt(mem, xsdt_addr);
        assert_eq!(&xsdt[0..4], b"XSDT");
        assert!(sums_to_zero(&xsdt), "XSDT checksum");
        assert_eq!(&xsdt[10..16], b"EMBER ");
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(entries.len(), 2);
        let fadt = read_sdt(mem, entries[0]);
        assert_eq!(&fadt[0..4], b"FACP");
        assert!(sums_to_zero(&fadt), "FADT checksum");
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "hardware reduced");
        assert_ne!(flags & (1 << 4), 0, "power button");
        assert_ne!(flags & (1 << 5), 0, "sleep button");
        assert_eq!(&fadt[268..276], b"EMBERKVM");
        // IAPC_BOOT_ARCH as Firecracker sets it: VGA not present, MSI not supported, PCIe
        // ASPM controls; no 8042 or legacy-devices bit.
        assert_eq!(u16::from_le_bytes([fadt[109], fadt[110]]), 0x1c);
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let madt = read_sdt(mem, entries[1]);
        assert_eq!(&madt[0..4], b"APIC");
        assert!(sums_to_zero(&madt), "MADT checksum");
        // Walk the MADT structures: count local APICs and check their ids.
        let (mut off, mut lapics, mut ioapics) = (44usize, Vec::new(), 0);
        while off < madt.len() {
            let (kind, len) = (madt[off], usize::from(madt[off + 1]));
            match kind {
                0 => lapics.push(madt[off + 3]),
                1 => ioapics += 1,
                _ => {}
            }
            off += len;
        }
        assert_eq!(lapics, (0..vcpus).collect::<Vec<_>>());
        assert_eq!(ioapics, 1);
        let dsdt = read_sdt(mem, dsdt_addr);
        assert_eq!(&dsdt[0..4], b"DSDT");
        assert!(sums_to_zero(&dsdt), "DSDT checksum");
        assert_eq!(contains(&dsdt, b"PNP0501"), 1);
        assert_eq!(contains(&dsdt, b"PNP0303"), 1);
        assert_eq!(contains(&dsdt, b"LNRO0005"), mmio.len());
        for dev in mmio {
            // Memory32Fixed descriptor: 0x86, length 9, read-write, base, length.
            let mut desc = vec![0x86, 9, 0, 1];
            desc.extend_from_slice(&(dev.addr as u32).to_le_bytes());
            desc.extend_from_slice(&(dev.len as u32).to_le_bytes());
            assert_eq!(contains(&dsdt, &desc), 1);
        }
    }

    #[test]
    fn tables_are_consistent() {
        let mem = guest_mem(128 << 20);
        let mmio: Vec<MmioDeviceInfo> = (0..3)
            .map(|i| MmioDeviceInfo {
                addr: 0xc000_1000 + i * 0x1000,
                len: 0x1000,
                irq: 5 + i as u32,
            })
            .collect();
        let layout = create_acpi_tables(&mem, 0xa0000, 4, &mmio).unwrap();
        assert!(layout.end <= RSDP_ADDR);
        check_tables(&mem, 4, &mmio);
    }

    #[test]
    fn no_mmio_devices_and_max_cpus() {
        let mem = guest_mem(128 << 20);
        create_acpi_tables(&mem, 0xa0000, 254, &[]).unwrap();
        check_tables(&mem, 254, &[]);
    }

    #[test]
    fn mmio_above_4gib_rejected() {
        let dev = MmioDeviceInfo {
            addr: 0x1_0000_0000,
            len: 0x1000,
            irq: 5,
        };
        let e = dsdt_aml(&[dev]).unwrap_err();
        assert!(matches!(e, AcpiError::MmioDeviceNot32Bit { index: 0, .. }));
        assert!(e.to_string().contains("0x100000000"));
    }
}
