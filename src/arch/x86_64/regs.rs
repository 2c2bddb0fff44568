//! Register state for the boot vCPU, the identity page tables, FPU and local APIC setup.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::gdt::{gdt_table, kvm_segment_from_gdt, GDT_ENTRIES};
use super::layout::{
    BOOT_STACK_POINTER, GDT_ADDR, IDT_ADDR, PDE_START, PDPTE_START, PML4_START, PVH_INFO_START,
    ZERO_PAGE_START,
};
use super::loader::{BootProtocol, EntryPoint};
use super::memory::GuestMemoryMmap;

pub const X86_CR0_PE: u64 = 1 << 0;
pub const X86_CR0_ET: u64 = 1 << 4;
pub const X86_CR0_PG: u64 = 1 << 31;
pub const X86_CR4_PAE: u64 = 1 << 5;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;

/// Bit 1 of RFLAGS is reserved and always set.
const RFLAGS_RESERVED: u64 = 0x2;
/// Page-table entry bits: present, writable, and (for PD entries) a 2 MiB page.
const PTE_PRESENT_RW: u64 = 0x3;
const PDE_2MIB_PAGE: u64 = 0x83;

/// x87 control word and SSE control/status at reset (all exceptions masked).
pub const FPU_FCW: u16 = 0x37f;
pub const FPU_MXCSR: u32 = 0x1f80;

/// Local APIC register offsets and delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// General registers at the kernel entry.
pub fn boot_regs(entry: &EntryPoint) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: entry.entry_addr.0,
        ..Default::default()
    };
    match entry.protocol {
        BootProtocol::LinuxBoot => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        BootProtocol::PvhBoot => regs.rbx = PVH_INFO_START,
    }
    regs
}

/// Fills the segment, descriptor-table and control registers of `sregs` (as read from KVM, so
/// that the APIC base and other state stay as KVM set them) for the entry protocol.
pub fn configure_sregs(sregs: &mut kvm_sregs, protocol: BootProtocol) {
    let gdt = gdt_table(protocol);
    let code = kvm_segment_from_gdt(gdt[1], 1);
    let data = kvm_segment_from_gdt(gdt[2], 2);
    let tss = kvm_segment_from_gdt(gdt[3], 3);

    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of::<u64>() * GDT_ENTRIES - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;

    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    match protocol {
        BootProtocol::LinuxBoot => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        BootProtocol::PvhBoot => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
}

/// The identity map: PML4[0] -> PDPT[0] -> PD with 512 x 2 MiB pages (the first 1 GiB).
pub fn page_tables() -> Vec<(u64, Vec<u8>)> {
    let pml4 = (PDPTE_START | PTE_PRESENT_RW).to_le_bytes().to_vec();
    let pdpt = (PDE_START | PTE_PRESENT_RW).to_le_bytes().to_vec();
    let pd: Vec<u8> = (0..512u64)
        .flat_map(|i| ((i << 21) | PDE_2MIB_PAGE).to_le_bytes())
        .collect();
    vec![(PML4_START, pml4), (PDPTE_START, pdpt), (PDE_START, pd)]
}

/// Writes the GDT, the (empty) IDT and the identity page tables.
pub fn write_boot_tables(
    mem: &GuestMemoryMmap,
    protocol: BootProtocol,
) -> Result<(), (&'static str, u64, usize)> {
    let gdt: Vec<u8> = gdt_table(protocol)
        .iter()
        .flat_map(|e| e.to_le_bytes())
        .collect();
    let mut writes = vec![("GDT", GDT_ADDR, gdt), ("IDT", IDT_ADDR, vec![0u8; 8])];
    for (addr, bytes) in page_tables() {
        writes.push(("page tables", addr, bytes));
    }
    for (what, addr, bytes) in writes {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(|_| (what, addr, bytes.len()))?;
    }
    Ok(())
}

/// FPU state at boot.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: FPU_FCW,
        mxcsr: FPU_MXCSR,
        ..Default::default()
    }
}

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let mut b = [0u8; 4];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = lapic.regs[offset + i] as u8;
    }
    u32::from_le_bytes(b)
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *byte as std::os::raw::c_char;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// LINT0 = ExtINT (the PIC), LINT1 = NMI, as a BIOS leaves them.
pub fn configure_lint(lapic: &mut kvm_lapic_state) {
    let lvt0 = lapic_reg(lapic, APIC_LVT0);
    set_lapic_reg(lapic, APIC_LVT0, with_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(lapic, APIC_LVT1);
    set_lapic_reg(lapic, APIC_LVT1, with_delivery_mode(lvt1, APIC_MODE_NMI));
}

/// Reads a local APIC register (for tests and diagnostics).
pub fn lapic_register(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    lapic_reg(lapic, offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_entry_registers() {
        let entry = EntryPoint {
            entry_addr: GuestAddress(0x100_0000),
            protocol: BootProtocol::LinuxBoot,
        };
        let r = boot_regs(&entry);
        assert_eq!(
            (r.rip, r.rsi, r.rsp, r.rbp, r.rflags),
            (0x100_0000, 0x7000, 0x8ff0, 0x8ff0, 2)
        );
        let mut s = kvm_sregs::default();
        configure_sregs(&mut s, BootProtocol::LinuxBoot);
        assert_eq!(s.cr0, 0x8000_0011);
        assert_eq!((s.cr3, s.cr4, s.efer), (0x9000, 0x20, 0x500));
        assert_eq!(
            (s.cs.selector, s.cs.l, s.ds.selector, s.tr.selector),
            (8, 1, 0x10, 0x18)
        );
        assert_eq!(
            (s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit),
            (0x500, 31, 0x520, 7)
        );
    }

    #[test]
    fn pvh_entry_registers() {
        let entry = EntryPoint {
            entry_addr: GuestAddress(0x100_0008),
            protocol: BootProtocol::PvhBoot,
        };
        let r = boot_regs(&entry);
        assert_eq!((r.rip, r.rbx, r.rsi, r.rflags), (0x100_0008, 0x6000, 0, 2));
        let mut s = kvm_sregs::default();
        configure_sregs(&mut s, BootProtocol::PvhBoot);
        assert_eq!((s.cr0 & X86_CR0_PG, s.cr0 & X86_CR0_PE, s.efer), (0, 1, 0));
        assert_eq!((s.cs.l, s.cs.db, s.cs.selector), (0, 1, 8));
    }

    #[test]
    fn identity_map() {
        let t = page_tables();
        assert_eq!(t[0], (0x9000, 0xa003u64.to_le_bytes().to_vec()));
        assert_eq!(t[1], (0xa000, 0xb003u64.to_le_bytes().to_vec()));
        let pd = &t[2].1;
        assert_eq!(pd.len(), 4096);
        assert_eq!(&pd[0..8], &0x83u64.to_le_bytes());
        assert_eq!(&pd[4088..4096], &((511u64 << 21) | 0x83).to_le_bytes());
    }

    #[test]
    fn lint_delivery_modes() {
        let mut l = kvm_lapic_state::default();
        set_lapic_reg(&mut l, APIC_LVT0, 0x1_0000); // masked, fixed
        configure_lint(&mut l);
        assert_eq!(lapic_register(&l, APIC_LVT0), 0x1_0700);
        assert_eq!(lapic_register(&l, APIC_LVT1), 0x400);
        let f = boot_fpu();
        assert_eq!((f.fcw, f.mxcsr), (0x37f, 0x1f80));
    }
}
