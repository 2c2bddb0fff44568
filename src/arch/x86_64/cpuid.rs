//! CPUID as the guest sees it.
//!
//! Starting from `KVM_GET_SUPPORTED_CPUID`, each vCPU gets its identity (APIC id) and a
//! topology that matches the VM: all vCPUs in one package, 1 or 2 threads per core. The values
//! follow Firecracker's normalisation so guests see the same topology on both VMMs.

use std::fmt;

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Most vCPUs a package can describe: leaf 1 EBX[23:16] is 8 bits wide and rounds up to a power
/// of two, and the core level of leaf 0xB shifts by 7 bits.
pub const MAX_VCPUS: u8 = 128;

// Leaf 1.
const LEAF1_ECX_PDCM: u32 = 1 << 15;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// CLFLUSH line size in 8-byte units (64 bytes).
const LEAF1_EBX_CLFLUSH_LINE: u32 = 8;

// Leaf 6 (Intel power management).
const LEAF6_EAX_TURBO_BOOST: u32 = 1 << 1;
const LEAF6_ECX_ENERGY_PERF_BIAS: u32 = 1 << 3;

// Leaf 7 subleaf 0 (AMD): KVM reports IA32_ARCH_CAPABILITIES, which AMD CPUs do not have.
const LEAF7_EDX_ARCH_CAPABILITIES: u32 = 1 << 29;
// AMD extended leaves: the largest one offered (0x8000001D and 0x8000001E are used) and the
// topology-extensions bit that makes them valid.
const AMD_LARGEST_EXTENDED_LEAF: u32 = 0x8000_001f;
const LEAF80000001_ECX_TOPOEXT: u32 = 1 << 22;
/// AMD brand string (leaves 0x80000002..4), the same on every host, as Firecracker reports it.
const AMD_BRAND_STRING: &[u8; 8] = b"AMD EPYC";

// Leaf 0xB / 0x1F.
const LEVEL_TYPE_THREAD: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;
/// x2APIC id bits below the package level; 7 allows 128 logical processors per package.
const CORE_LEVEL_APIC_ID_SHIFT: u32 = 7;

// Cache descriptor fields, shared by leaf 4 (Intel) and 0x8000001D (AMD).
const CACHE_TYPE_MASK: u32 = 0x1f;
const CACHE_LEVEL_SHIFT: u32 = 5;
const CACHE_SHARING_SHIFT: u32 = 14;
const CACHE_SHARING_MASK: u32 = 0xfff << CACHE_SHARING_SHIFT;
const CACHE_CORES_SHIFT: u32 = 26;
const CACHE_CORES_MASK: u32 = 0x3f << CACHE_CORES_SHIFT;

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuidRegister {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// Sets the bits under `mask` of one register to the bits of `value`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuidRegisterModifier {
    pub register: CpuidRegister,
    pub mask: u32,
    pub value: u32,
}

/// The modifiers for one (leaf, subleaf) entry, as in a Firecracker custom CPU template.
/// `flags` (KVM_CPUID_FLAG_*) is used when the entry has to be created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuidLeafModifier {
    pub leaf: u32,
    pub subleaf: u32,
    pub flags: u32,
    pub modifiers: Vec<CpuidRegisterModifier>,
}

/// Errors normalising or modifying CPUID.
#[derive(Debug, PartialEq, Eq)]
pub enum CpuidError {
    NoVcpus,
    TooManyVcpus {
        count: u8,
        max: u8,
    },
    VcpuIndexOutOfRange {
        index: u8,
        count: u8,
    },
    /// KVM's answer has no leaf 1, so the guest could not identify itself.
    MissingLeaf(u32),
    /// The CPUID array is full (KVM accepts at most 256 entries).
    TooManyEntries {
        leaf: u32,
        subleaf: u32,
    },
}

impl fmt::Display for CpuidError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CpuidError::NoVcpus => write!(f, "CPUID: the VM has no vCPU"),
            CpuidError::TooManyVcpus { count, max } => write!(
                f,
                "CPUID: {count} vCPUs is more than the {max} one package can describe"
            ),
            CpuidError::VcpuIndexOutOfRange { index, count } => write!(
                f,
                "CPUID: vCPU index {index} is out of range for {count} vCPUs"
            ),
            CpuidError::MissingLeaf(leaf) => write!(
                f,
                "CPUID: KVM_GET_SUPPORTED_CPUID returned no leaf {leaf:#x}"
            ),
            CpuidError::TooManyEntries { leaf, subleaf } => write!(
                f,
                "CPUID: cannot add leaf {leaf:#x} subleaf {subleaf:#x}: the CPUID table is full \
                 (KVM allows {} entries)",
                kvm_bindings::KVM_MAX_CPUID_ENTRIES
            ),
        }
    }
}

impl std::error::Error for CpuidError {}

/// CPU vendor, from leaf 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuVendor {
    Intel,
    Amd,
    Other,
}

/// Reads the vendor string of leaf 0.
pub fn cpu_vendor(cpuid: &CpuId) -> CpuVendor {
    let Some(leaf0) = cpuid.as_slice().iter().find(|e| e.function == 0) else {
        return CpuVendor::Other;
    };
    let mut id = [0u8; 12];
    id[0..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    id[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    id[8..12].copy_from_slice(&leaf0.ecx.to_le_bytes());
    match &id {
        b"GenuineIntel" => CpuVendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => CpuVendor::Amd,
        _ => CpuVendor::Other,
    }
}

fn max_leaf(cpuid: &CpuId, base: u32) -> u32 {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == base)
        .map_or(0, |e| e.eax)
}

fn set_bits(reg: &mut u32, mask: u32, value: u32) {
    *reg = (*reg & !mask) | (value & mask);
}

fn set_flag(reg: &mut u32, bit: u32, on: bool) {
    set_bits(reg, bit, if on { bit } else { 0 });
}

/// The VM's topology as seen by one vCPU.
#[derive(Clone, Copy, Debug)]
struct Topology {
    index: u32,
    count: u32,
    threads_per_core: u32,
    /// `count` rounded up to a power of two.
    max_per_package: u32,
}

impl Topology {
    fn cores(&self) -> u32 {
        self.count.div_ceil(self.threads_per_core)
    }
}

/// Makes `cpuid` (a copy of KVM's supported CPUID) describe vCPU `vcpu_index` of `vcpu_count`.
/// With `smt`, cores have two threads (HTT set when there is more than one vCPU).
pub fn normalize_cpuid(
    cpuid: &mut CpuId,
    vcpu_index: u8,
    vcpu_count: u8,
    smt: bool,
) -> Result<(), CpuidError> {
    if vcpu_count == 0 {
        return Err(CpuidError::NoVcpus);
    }
    if vcpu_count > MAX_VCPUS {
        return Err(CpuidError::TooManyVcpus {
            count: vcpu_count,
            max: MAX_VCPUS,
        });
    }
    if vcpu_index >= vcpu_count {
        return Err(CpuidError::VcpuIndexOutOfRange {
            index: vcpu_index,
            count: vcpu_count,
        });
    }
    if !cpuid.as_slice().iter().any(|e| e.function == 1) {
        return Err(CpuidError::MissingLeaf(1));
    }
    let topo = Topology {
        index: u32::from(vcpu_index),
        count: u32::from(vcpu_count),
        threads_per_core: if smt && vcpu_count > 1 { 2 } else { 1 },
        max_per_package: u32::from(vcpu_count).next_power_of_two(),
    };
    let vendor = cpu_vendor(cpuid);

    for entry in cpuid.as_mut_slice() {
        match entry.function {
            0x1 => update_feature_info(entry, &topo),
            0x4 if vendor != CpuVendor::Amd => update_cache_entry(entry, &topo, true),
            0x6 if vendor == CpuVendor::Intel => {
                entry.eax &= !LEAF6_EAX_TURBO_BOOST;
                entry.ecx &= !LEAF6_ECX_ENERGY_PERF_BIAS;
            }
            // No virtual PMU is offered: architectural performance monitoring reads as absent.
            0xa => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            0x7 if vendor == CpuVendor::Amd && entry.index == 0 => {
                entry.edx &= !LEAF7_EDX_ARCH_CAPABILITIES;
            }
            0x8000_0000 if vendor == CpuVendor::Amd => entry.eax = AMD_LARGEST_EXTENDED_LEAF,
            0x8000_0001 if vendor == CpuVendor::Amd => entry.ecx |= LEAF80000001_ECX_TOPOEXT,
            0x8000_0002..=0x8000_0004 if vendor == CpuVendor::Amd => {
                set_brand_string_part(entry, AMD_BRAND_STRING);
            }
            0x8000_0008 if vendor == CpuVendor::Amd => {
                // NC = threads - 1; ApicIdSize = the APIC id bits below the package, the same
                // shift as leaf 0xB's core level.
                set_bits(&mut entry.ecx, 0xff, topo.count - 1);
                set_bits(&mut entry.ecx, 0xf << 12, CORE_LEVEL_APIC_ID_SHIFT << 12);
            }
            0x8000_001d if vendor == CpuVendor::Amd => update_cache_entry(entry, &topo, false),
            0x8000_001e if vendor == CpuVendor::Amd => {
                entry.eax = topo.index;
                entry.ebx = (entry.ebx & !0xffff)
                    | ((topo.threads_per_core - 1) << 8)
                    | (topo.index / topo.threads_per_core);
                // One node, node id 0.
                entry.ecx = 0;
            }
            _ => {}
        }
    }

    // The extended topology leaves are rebuilt whole: recent KVMs report only subleaf 0.
    if max_leaf(cpuid, 0) >= 0xb || cpuid.as_slice().iter().any(|e| e.function == 0xb) {
        rebuild_topology_leaf(cpuid, 0xb, &topo)?;
    }
    if cpuid.as_slice().iter().any(|e| e.function == 0x1f) {
        rebuild_topology_leaf(cpuid, 0x1f, &topo)?;
    }
    Ok(())
}

/// Fills one of the brand-string leaves 0x80000002..4 (16 bytes each) with its part of `brand`,
/// NUL-padded to 48 bytes.
fn set_brand_string_part(entry: &mut kvm_cpuid_entry2, brand: &[u8]) {
    let part = (entry.function - 0x8000_0002) as usize;
    let mut bytes = [0u8; 16];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = brand.get(part * 16 + i).copied().unwrap_or(0);
    }
    let reg = |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    entry.eax = reg(0);
    entry.ebx = reg(4);
    entry.ecx = reg(8);
    entry.edx = reg(12);
}

fn update_feature_info(entry: &mut kvm_cpuid_entry2, topo: &Topology) {
    // EBX: [31:24] initial APIC id, [23:16] addressable logical processor ids, [15:8] CLFLUSH
    // line size, [7:0] brand index (kept).
    entry.ebx = (topo.index << 24)
        | ((topo.max_per_package.min(0xff)) << 16)
        | (LEAF1_EBX_CLFLUSH_LINE << 8)
        | (entry.ebx & 0xff);
    entry.ecx |= LEAF1_ECX_TSC_DEADLINE | LEAF1_ECX_HYPERVISOR;
    // Without a PMU there is no IA32_PERF_CAPABILITIES either.
    entry.ecx &= !LEAF1_ECX_PDCM;
    set_flag(&mut entry.edx, LEAF1_EDX_HTT, topo.count > 1);
}

/// Leaf 4 (Intel) and 0x8000001D (AMD): which logical processors share each cache.
fn update_cache_entry(entry: &mut kvm_cpuid_entry2, topo: &Topology, intel: bool) {
    if entry.eax & CACHE_TYPE_MASK == 0 {
        return;
    }
    let level = (entry.eax >> CACHE_LEVEL_SHIFT) & 0x7;
    let sharing = match level {
        1 | 2 => Some(topo.threads_per_core - 1),
        3 if intel => Some(topo.max_per_package - 1),
        3 => Some(topo.count - 1),
        _ => None,
    };
    if let Some(sharing) = sharing {
        set_bits(
            &mut entry.eax,
            CACHE_SHARING_MASK,
            sharing << CACHE_SHARING_SHIFT,
        );
    }
    if intel {
        let cores = (topo.cores() - 1).min(0x3f);
        set_bits(&mut entry.eax, CACHE_CORES_MASK, cores << CACHE_CORES_SHIFT);
    }
}

fn rebuild_topology_leaf(cpuid: &mut CpuId, leaf: u32, topo: &Topology) -> Result<(), CpuidError> {
    cpuid.retain(|e| e.function != leaf);
    let smt_shift = topo.threads_per_core.trailing_zeros();
    let levels = [
        (smt_shift, topo.threads_per_core, LEVEL_TYPE_THREAD),
        (CORE_LEVEL_APIC_ID_SHIFT, topo.count, LEVEL_TYPE_CORE),
        // Subleaf 2 terminates the list (level type 0 = invalid).
        (0, 0, 0),
    ];
    for (subleaf, (shift, logical, level_type)) in levels.into_iter().enumerate() {
        let subleaf = subleaf as u32;
        let entry = kvm_cpuid_entry2 {
            function: leaf,
            index: subleaf,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax: shift,
            ebx: logical,
            ecx: (level_type << 8) | subleaf,
            edx: topo.index,
            ..Default::default()
        };
        cpuid
            .push(entry)
            .map_err(|_| CpuidError::TooManyEntries { leaf, subleaf })?;
    }
    Ok(())
}

fn register_mut(entry: &mut kvm_cpuid_entry2, reg: CpuidRegister) -> &mut u32 {
    match reg {
        CpuidRegister::Eax => &mut entry.eax,
        CpuidRegister::Ebx => &mut entry.ebx,
        CpuidRegister::Ecx => &mut entry.ecx,
        CpuidRegister::Edx => &mut entry.edx,
    }
}

/// Applies CPU-template modifiers: on entry (leaf, subleaf), bits under `mask` become `value`.
/// An entry that does not exist is created (zeroed, with the modifier's flags) first.
pub fn try_apply_cpuid_modifiers(
    cpuid: &mut CpuId,
    mods: &[CpuidLeafModifier],
) -> Result<(), CpuidError> {
    for m in mods {
        let exists = cpuid
            .as_slice()
            .iter()
            .any(|e| e.function == m.leaf && e.index == m.subleaf);
        if !exists {
            let entry = kvm_cpuid_entry2 {
                function: m.leaf,
                index: m.subleaf,
                flags: m.flags,
                ..Default::default()
            };
            cpuid.push(entry).map_err(|_| CpuidError::TooManyEntries {
                leaf: m.leaf,
                subleaf: m.subleaf,
            })?;
        }
        for entry in cpuid
            .as_mut_slice()
            .iter_mut()
            .filter(|e| e.function == m.leaf && e.index == m.subleaf)
        {
            for r in &m.modifiers {
                set_bits(register_mut(entry, r.register), r.mask, r.value);
            }
        }
    }
    Ok(())
}

/// Like `try_apply_cpuid_modifiers`; a modifier for a missing entry that cannot be added
/// because the table is full (256 entries) is skipped. Use the `try_` form to see that.
pub fn apply_cpuid_modifiers(cpuid: &mut CpuId, mods: &[CpuidLeafModifier]) {
    for m in mods {
        // Apply one at a time so that one full-table failure does not stop the others.
        let _ = try_apply_cpuid_modifiers(cpuid, std::slice::from_ref(m));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn entry(function: u32, index: u32, flags: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    /// A small Intel-like CPUID: vendor, leaf 1, two caches, PMU, 0xB subleaf 0 only, brand.
    pub(crate) fn synthetic_intel() -> CpuId {
        let sig = 1u32;
        CpuId::from_entries(&[
            entry(0, 0, 0, [0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]), // GenuineIntel
            entry(1, 0, 0, [0x806ec, 0x0a10_0800, LEAF1_ECX_PDCM, 0]),
            entry(4, 0, sig, [0x121 | (7 << 14) | (31 << 26), 0, 0, 0]), // L1d
            entry(4, 1, sig, [0x163 | (15 << 14), 0, 0, 0]),             // L3
            entry(4, 2, sig, [0, 0, 0, 0]),
            entry(0xa, 0, 0, [0x0704_8302, 0, 0, 0x603]),
            entry(0xb, 0, sig, [1, 2, 0x100, 7]),
            entry(0x8000_0002, 0, 0, [0x6c65_746e, 0, 0, 0]),
        ])
        .unwrap()
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("no leaf {function:#x}.{index}"))
    }

    /// Checks what every normalised CPUID must show for vCPU `index` of `count`.
    pub(crate) fn check_normalized(cpuid: &CpuId, index: u8, count: u8, smt: bool) {
        let l1 = find(cpuid, 1, 0);
        assert_eq!(l1.ebx >> 24, u32::from(index), "initial APIC id");
        assert_eq!(
            (l1.ebx >> 16) & 0xff,
            u32::from(count).next_power_of_two(),
            "logical processor count"
        );
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0, "hypervisor bit");
        assert_ne!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0, "TSC deadline");
        assert_eq!(l1.edx & LEAF1_EDX_HTT != 0, count > 1, "HTT");
        if let Some(a) = cpuid.as_slice().iter().find(|e| e.function == 0xa) {
            assert_eq!((a.eax, a.ebx, a.ecx, a.edx), (0, 0, 0, 0), "leaf 0xA");
        }
        if cpuid.as_slice().iter().any(|e| e.function == 0xb) {
            let threads = if smt && count > 1 { 2 } else { 1 };
            let s0 = find(cpuid, 0xb, 0);
            assert_eq!(
                (s0.ebx, s0.ecx >> 8, s0.edx),
                (threads, 1, u32::from(index))
            );
            let s1 = find(cpuid, 0xb, 1);
            assert_eq!(
                (s1.eax, s1.ebx, s1.ecx, s1.edx),
                (7, u32::from(count), 0x201, u32::from(index))
            );
            let s2 = find(cpuid, 0xb, 2);
            assert_eq!((s2.ebx, s2.ecx >> 8), (0, 0));
        }
    }

    #[test]
    fn normalize_synthetic() {
        for (index, count, smt) in [(0u8, 1u8, false), (0, 2, true), (3, 4, false), (5, 6, true)] {
            let mut c = synthetic_intel();
            normalize_cpuid(&mut c, index, count, smt).unwrap();
            check_normalized(&c, index, count, smt);
            assert_eq!(find(&c, 1, 0).ecx & LEAF1_ECX_PDCM, 0);
            // The brand string is untouched.
            assert_eq!(find(&c, 0x8000_0002, 0).eax, 0x6c65_746e);
            // L1 shared by the threads of a core, L3 by the package.
            let l1d = find(&c, 4, 0).eax;
            let threads = if smt && count > 1 { 2 } else { 1 };
            assert_eq!((l1d >> 14) & 0xfff, threads - 1);
            let l3 = find(&c, 4, 1).eax;
            assert_eq!((l3 >> 14) & 0xfff, u32::from(count).next_power_of_two() - 1);
            assert_eq!(l3 >> 26, u32::from(count).div_ceil(threads) - 1);
            assert_eq!(find(&c, 4, 2).eax, 0);
        }
    }

    /// An AMD-like CPUID as KVM reports it on this project's hosts (an AMD EPYC under PVM):
    /// ARCH_CAPABILITIES set, extended leaves up to 0x80000022, an empty brand string.
    fn synthetic_amd() -> CpuId {
        let sig = 1u32;
        CpuId::from_entries(&[
            entry(0, 0, 0, [0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65]), // AuthenticAMD
            entry(1, 0, 0, [0xa00f11, 0x0102_0800, 0x8120_2000, 0x078b_fbff]),
            entry(7, 0, sig, [0, 0x0180_0002, 4, 0xa800_0000]),
            entry(
                0x8000_0000,
                0,
                0,
                [0x8000_0022, 0x6874_7541, 0x444d_4163, 0x6974_6e65],
            ),
            entry(0x8000_0001, 0, 0, [0xa00f11, 0, 0x393, 0x23d3_fbff]),
            entry(0x8000_0002, 0, 0, [0; 4]),
            entry(0x8000_0003, 0, 0, [0; 4]),
            entry(0x8000_0004, 0, 0, [0; 4]),
            entry(0x8000_0008, 0, 0, [0x3030, 0x110a_d205, 0x7001, 0]),
            entry(0x8000_001d, 0, sig, [0x121, 0x01c0_003f, 0x3f, 0]),
            entry(0x8000_001d, 3, sig, [0x4163, 0x03c0_003f, 0x7fff, 1]),
            entry(0x8000_001e, 0, 0, [0; 4]),
        ])
        .unwrap()
    }

    fn brand_string(cpuid: &CpuId) -> Vec<u8> {
        (0x8000_0002..=0x8000_0004)
            .flat_map(|leaf| {
                let e = find(cpuid, leaf, 0);
                [e.eax, e.ebx, e.ecx, e.edx]
            })
            .flat_map(u32::to_le_bytes)
            .collect()
    }

    #[test]
    fn normalize_amd_as_firecracker() {
        for (index, count, smt) in [(0u8, 1u8, false), (1, 2, false), (3, 4, true)] {
            let mut c = synthetic_amd();
            normalize_cpuid(&mut c, index, count, smt).unwrap();
            check_normalized(&c, index, count, smt);
            assert_eq!(find(&c, 7, 0).edx & LEAF7_EDX_ARCH_CAPABILITIES, 0);
            assert_eq!(find(&c, 0x8000_0000, 0).eax, 0x8000_001f);
            assert_ne!(find(&c, 0x8000_0001, 0).ecx & LEAF80000001_ECX_TOPOEXT, 0);
            let brand = brand_string(&c);
            assert_eq!(&brand[..9], b"AMD EPYC\0");
            assert!(brand[8..].iter().all(|b| *b == 0));
            // NC = threads - 1, ApicIdSize 7 whatever the count.
            assert_eq!(
                find(&c, 0x8000_0008, 0).ecx & 0xf0ff,
                (7 << 12) | (u32::from(count) - 1)
            );
            let threads = if smt && count > 1 { 2 } else { 1 };
            let l3 = find(&c, 0x8000_001d, 3).eax;
            assert_eq!((l3 >> 14) & 0xfff, u32::from(count) - 1);
            let ext = find(&c, 0x8000_001e, 0);
            assert_eq!(ext.eax, u32::from(index));
            assert_eq!(
                ext.ebx & 0xffff,
                ((threads - 1) << 8) | (u32::from(index) / threads)
            );
        }
    }

    #[test]
    fn normalize_rejects_bad_indices() {
        let mut c = synthetic_intel();
        assert_eq!(
            normalize_cpuid(&mut c, 0, 0, false),
            Err(CpuidError::NoVcpus)
        );
        assert_eq!(
            normalize_cpuid(&mut c, 2, 2, false),
            Err(CpuidError::VcpuIndexOutOfRange { index: 2, count: 2 })
        );
        assert!(matches!(
            normalize_cpuid(&mut c, 0, 129, false),
            Err(CpuidError::TooManyVcpus { .. })
        ));
        let mut empty = CpuId::new(0).unwrap();
        assert_eq!(
            normalize_cpuid(&mut empty, 0, 1, false),
            Err(CpuidError::MissingLeaf(1))
        );
    }

    #[test]
    fn normalize_real_kvm_cpuid() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm is required for this test");
        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        for (index, count, smt) in [(0u8, 1u8, false), (1, 2, false), (3, 4, true)] {
            let mut c = supported.clone();
            normalize_cpuid(&mut c, index, count, smt).unwrap();
            check_normalized(&c, index, count, smt);
        }
    }

    #[test]
    fn modifiers_change_only_masked_bits() {
        let mut c = synthetic_intel();
        let mods = [
            CpuidLeafModifier {
                leaf: 1,
                subleaf: 0,
                flags: 0,
                modifiers: vec![
                    CpuidRegisterModifier {
                        register: CpuidRegister::Ecx,
                        mask: 0xff00,
                        value: 0xabcd,
                    },
                    CpuidRegisterModifier {
                        register: CpuidRegister::Edx,
                        mask: 1,
                        value: 1,
                    },
                ],
            },
            CpuidLeafModifier {
                leaf: 7,
                subleaf: 1,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                modifiers: vec![CpuidRegisterModifier {
                    register: CpuidRegister::Eax,
                    mask: 0xf0,
                    value: 0x30,
                }],
            },
        ];
        let before = find(&c, 1, 0);
        apply_cpuid_modifiers(&mut c, &mods);
        let after = find(&c, 1, 0);
        assert_eq!(after.ecx, (before.ecx & !0xff00) | 0xab00);
        assert_eq!(after.edx, before.edx | 1);
        assert_eq!((after.eax, after.ebx), (before.eax, before.ebx));
        let added = find(&c, 7, 1);
        assert_eq!(
            (added.eax, added.flags),
            (0x30, KVM_CPUID_FLAG_SIGNIFCANT_INDEX)
        );
    }

    #[test]
    fn vendor_detection() {
        assert_eq!(cpu_vendor(&synthetic_intel()), CpuVendor::Intel);
        assert_eq!(cpu_vendor(&CpuId::new(0).unwrap()), CpuVendor::Other);
    }
}
