//! Model-specific registers set before the first KVM_RUN.

use kvm_bindings::kvm_msr_entry;

pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// IA32_MISC_ENABLE bit 0: fast string operations.
pub const MISC_ENABLE_FAST_STRING: u64 = 1;
/// IA32_MTRR_DEF_TYPE: MTRRs enabled (bit 11), default type write-back (6).
pub const MTRR_ENABLE: u64 = 1 << 11;
pub const MTRR_MEM_TYPE_WB: u64 = 6;

/// Changes an MSR's boot value: bits under `mask` become the bits of `value`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsrModifier {
    pub addr: u32,
    pub mask: u64,
    pub value: u64,
}

fn msr(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

/// The MSR values every vCPU starts with (the spec's list).
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    vec![
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        msr(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// Applies modifiers to `entries`. A modifier for an MSR not in the list is returned so that the
/// caller can read its current value from KVM and apply it there.
pub fn apply_msr_modifiers(
    entries: &mut [kvm_msr_entry],
    mods: &[MsrModifier],
) -> Vec<MsrModifier> {
    let mut missing = Vec::new();
    for m in mods {
        match entries.iter_mut().find(|e| e.index == m.addr) {
            Some(e) => e.data = (e.data & !m.mask) | (m.value & m.mask),
            None => missing.push(*m),
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_list_matches_spec() {
        let e = boot_msr_entries();
        let get = |i: u32| e.iter().find(|m| m.index == i).map(|m| m.data);
        for zeroed in [
            MSR_IA32_SYSENTER_CS,
            MSR_IA32_SYSENTER_ESP,
            MSR_IA32_SYSENTER_EIP,
            MSR_STAR,
            MSR_CSTAR,
            MSR_KERNEL_GS_BASE,
            MSR_SYSCALL_MASK,
            MSR_LSTAR,
            MSR_IA32_TSC,
        ] {
            assert_eq!(get(zeroed), Some(0), "{zeroed:#x}");
        }
        assert_eq!(get(MSR_IA32_MISC_ENABLE), Some(1));
        assert_eq!(get(MSR_MTRR_DEF_TYPE), Some(0x806));
    }

    #[test]
    fn modifiers() {
        let mut e = boot_msr_entries();
        let missing = apply_msr_modifiers(
            &mut e,
            &[
                MsrModifier {
                    addr: MSR_MTRR_DEF_TYPE,
                    mask: 0xff,
                    value: 0x1,
                },
                MsrModifier {
                    addr: 0x1234,
                    mask: 1,
                    value: 1,
                },
            ],
        );
        let mtrr = e.iter().find(|m| m.index == MSR_MTRR_DEF_TYPE).unwrap();
        assert_eq!(mtrr.data, 0x801);
        assert_eq!(missing.len(), 1);
        assert_eq!(missing[0].addr, 0x1234);
    }
}
