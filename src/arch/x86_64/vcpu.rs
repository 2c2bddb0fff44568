//! Per-vCPU setup before the first KVM_RUN.

use std::fmt;

use kvm_bindings::{kvm_msr_entry, CpuId, Msrs};
use kvm_ioctls::VcpuFd;

use super::loader::EntryPoint;
use super::msr::{apply_msr_modifiers, boot_msr_entries, MsrModifier};
use super::regs::{boot_fpu, boot_regs, configure_lint, configure_sregs};

/// Errors configuring a vCPU; each names the KVM call that failed.
#[derive(Debug)]
pub enum VcpuSetupError {
    Ioctl {
        vcpu: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// KVM stopped at this MSR (it does not exist or the value is not allowed).
    MsrRejected {
        vcpu: u8,
        index: u32,
        value: u64,
    },
    /// An MsrModifier names an MSR that KVM cannot read.
    MsrUnreadable {
        vcpu: u8,
        index: u32,
    },
    TooManyMsrs {
        vcpu: u8,
        count: usize,
    },
}

impl fmt::Display for VcpuSetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VcpuSetupError::Ioctl { vcpu, what, source } => {
                write!(f, "vCPU {vcpu}: {what} failed: {source}")?;
                if *what == "KVM_GET_LAPIC" || *what == "KVM_SET_LAPIC" {
                    write!(
                        f,
                        " (the in-kernel irqchip must be created before the vCPUs)"
                    )?;
                }
                Ok(())
            }
            VcpuSetupError::MsrRejected { vcpu, index, value } => {
                write!(f, "vCPU {vcpu}: KVM rejected MSR {index:#x} = {value:#x}")
            }
            VcpuSetupError::MsrUnreadable { vcpu, index } => write!(
                f,
                "vCPU {vcpu}: MSR {index:#x} named in an MSR modifier cannot be read from KVM"
            ),
            VcpuSetupError::TooManyMsrs { vcpu, count } => write!(
                f,
                "vCPU {vcpu}: {count} MSRs is more than KVM accepts in one call"
            ),
        }
    }
}

impl std::error::Error for VcpuSetupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            VcpuSetupError::Ioctl { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn ioctl(vcpu: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuSetupError {
    move |source| VcpuSetupError::Ioctl { vcpu, what, source }
}

fn msrs_from(vcpu: u8, entries: &[kvm_msr_entry]) -> Result<Msrs, VcpuSetupError> {
    Msrs::from_entries(entries).map_err(|_| VcpuSetupError::TooManyMsrs {
        vcpu,
        count: entries.len(),
    })
}

/// The boot MSR list with `mods` applied; MSRs only named by a modifier are read from KVM first.
fn boot_msrs(
    vcpu: &VcpuFd,
    index: u8,
    mods: &[MsrModifier],
) -> Result<Vec<kvm_msr_entry>, VcpuSetupError> {
    let mut entries = boot_msr_entries();
    let extra = apply_msr_modifiers(&mut entries, mods);
    if extra.is_empty() {
        return Ok(entries);
    }
    let mut wanted: Vec<kvm_msr_entry> = Vec::new();
    for m in &extra {
        if !wanted.iter().any(|e| e.index == m.addr) {
            wanted.push(kvm_msr_entry {
                index: m.addr,
                ..Default::default()
            });
        }
    }
    let mut current = msrs_from(index, &wanted)?;
    let read = vcpu
        .get_msrs(&mut current)
        .map_err(ioctl(index, "KVM_GET_MSRS"))?;
    if read < wanted.len() {
        return Err(VcpuSetupError::MsrUnreadable {
            vcpu: index,
            index: wanted[read].index,
        });
    }
    let mut current = current.as_slice().to_vec();
    apply_msr_modifiers(&mut current, &extra);
    entries.extend(current);
    Ok(entries)
}

/// Configures vCPU `index` before its first KVM_RUN: CPUID (already normalised for this
/// vCPU), boot MSRs plus `msr_mods`, FPU and LAPIC LINT0/LINT1; for the BSP (index 0) also the
/// registers for `entry`. APs are left in the wait-for-SIPI state KVM gives them.
///
/// Needs the in-kernel irqchip (KVM_CREATE_IRQCHIP) created before the vCPU, and
/// `configure_system` to have written the GDT and page tables the BSP's registers point to.
pub fn setup_vcpu(
    vcpu: &VcpuFd,
    index: u8,
    entry: &EntryPoint,
    cpuid: &CpuId,
    msr_mods: &[MsrModifier],
) -> Result<(), VcpuSetupError> {
    vcpu.set_cpuid2(cpuid)
        .map_err(ioctl(index, "KVM_SET_CPUID2"))?;

    let entries = boot_msrs(vcpu, index, msr_mods)?;
    let msrs = msrs_from(index, &entries)?;
    let written = vcpu.set_msrs(&msrs).map_err(ioctl(index, "KVM_SET_MSRS"))?;
    if written < entries.len() {
        return Err(VcpuSetupError::MsrRejected {
            vcpu: index,
            index: entries[written].index,
            value: entries[written].data,
        });
    }

    if index == 0 {
        vcpu.set_regs(&boot_regs(entry))
            .map_err(ioctl(index, "KVM_SET_REGS"))?;
        let mut sregs = vcpu.get_sregs().map_err(ioctl(index, "KVM_GET_SREGS"))?;
        configure_sregs(&mut sregs, entry.protocol);
        vcpu.set_sregs(&sregs)
            .map_err(ioctl(index, "KVM_SET_SREGS"))?;
    }

    vcpu.set_fpu(&boot_fpu())
        .map_err(ioctl(index, "KVM_SET_FPU"))?;

    let mut lapic = vcpu.get_lapic().map_err(ioctl(index, "KVM_GET_LAPIC"))?;
    configure_lint(&mut lapic);
    vcpu.set_lapic(&lapic)
        .map_err(ioctl(index, "KVM_SET_LAPIC"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
    use kvm_ioctls::{Kvm, VcpuExit, VmFd};
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

    use crate::arch::x86_64::boot::{configure_system, BootConfig};
    use crate::arch::x86_64::cpuid::normalize_cpuid;
    use crate::arch::x86_64::layout::KVM_TSS_ADDR;
    use crate::arch::x86_64::loader::tests::{guest_mem, make_elf};
    use crate::arch::x86_64::loader::{load_kernel_bytes, BootProtocol};
    use crate::arch::x86_64::memory::GuestMemoryMmap;
    use crate::arch::x86_64::msr::{MSR_IA32_MISC_ENABLE, MSR_MTRR_DEF_TYPE};
    use crate::arch::x86_64::regs::lapic_register;

    const MSR_IA32_PAT: u32 = 0x277;

    fn kvm() -> Kvm {
        Kvm::new().expect("this test needs /dev/kvm (KVM_CREATE_VM and vCPUs); it is not optional")
    }

    fn vm_with_memory(kvm: &Kvm, mem: &GuestMemoryMmap) -> VmFd {
        let vm = kvm.create_vm().unwrap();
        vm.set_tss_address(KVM_TSS_ADDR as usize).unwrap();
        vm.create_irq_chip().unwrap();
        for (slot, region) in mem.iter().enumerate() {
            let host = region.get_host_address(MemoryRegionAddress(0)).unwrap();
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the mapping belongs to `mem`, which outlives the VM in every test.
            unsafe { vm.set_user_memory_region(r) }.unwrap();
        }
        vm
    }

    /// Boots `code` with the given protocol and returns the dword the guest writes to port 0x80.
    fn run_to_port_80(code: &[u8], pvh: bool) -> u32 {
        let kvm = kvm();
        let mem = guest_mem(64 << 20);
        let elf = make_elf(0x10_0000, code, pvh.then_some(0x10_0000));
        let kernel = load_kernel_bytes(&mem, &elf).unwrap();
        assert_eq!(kernel.entry.protocol == BootProtocol::PvhBoot, pvh);
        let cfg = BootConfig {
            kernel: &kernel,
            cmdline: "console=ttyS0",
            initrd: None,
            vcpu_count: 2,
            mmio_devices: &[],
        };
        configure_system(&mem, &cfg).unwrap();
        let vm = vm_with_memory(&kvm, &mem);
        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let mut vcpus = Vec::new();
        for index in 0..2u8 {
            let vcpu = vm.create_vcpu(u64::from(index)).unwrap();
            let mut cpuid = supported.clone();
            normalize_cpuid(&mut cpuid, index, 2, false).unwrap();
            setup_vcpu(&vcpu, index, &kernel.entry, &cpuid, &[]).unwrap();
            vcpus.push(vcpu);
        }
        let bsp = &mut vcpus[0];
        for _ in 0..100 {
            match bsp.run().unwrap() {
                VcpuExit::IoOut(0x80, data) => {
                    let mut b = [0u8; 4];
                    b[..data.len()].copy_from_slice(data);
                    return u32::from_le_bytes(b);
                }
                VcpuExit::IoOut(..) | VcpuExit::IoIn(..) => continue,
                other => {
                    let exit = format!("{other:?}");
                    panic!("unexpected exit {exit}, regs {:?}", bsp.get_regs());
                }
            }
        }
        panic!("the guest never wrote to port 0x80");
    }

    #[test]
    fn linux_entry_runs_in_long_mode_with_zero_page() {
        // mov eax, [rsi + 0x202] ; out 0x80, eax ; hlt
        let code = [0x8b, 0x86, 0x02, 0x02, 0, 0, 0xe7, 0x80, 0xf4];
        assert_eq!(run_to_port_80(&code, false), 0x5372_6448, "HdrS via RSI");
    }

    #[test]
    fn pvh_entry_runs_with_start_info() {
        // mov eax, [ebx] ; out 0x80, eax ; hlt
        let code = [0x8b, 0x03, 0xe7, 0x80, 0xf4];
        assert_eq!(
            run_to_port_80(&code, true),
            0x336e_c578,
            "PVH magic via RBX"
        );
    }

    #[test]
    fn vcpu_state_after_setup() {
        let kvm = kvm();
        let mem = guest_mem(16 << 20);
        let vm = vm_with_memory(&kvm, &mem);
        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let entry = EntryPoint {
            entry_addr: vm_memory::GuestAddress(0x100_0000),
            protocol: BootProtocol::LinuxBoot,
        };
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut cpuid = supported.clone();
        normalize_cpuid(&mut cpuid, 0, 1, false).unwrap();
        // Rewrite PAT's low byte to its reset value: exercises the read-modify-write path.
        let pat_mod = MsrModifier {
            addr: MSR_IA32_PAT,
            mask: 0xff,
            value: 0x06,
        };
        setup_vcpu(&vcpu, 0, &entry, &cpuid, &[pat_mod]).unwrap();

        let regs = vcpu.get_regs().unwrap();
        assert_eq!(
            (regs.rip, regs.rsi, regs.rsp, regs.rflags),
            (0x100_0000, 0x7000, 0x8ff0, 2)
        );
        let sregs = vcpu.get_sregs().unwrap();
        assert_eq!(sregs.cr3, 0x9000);
        assert_eq!(sregs.cr0 & 0x8000_0001, 0x8000_0001);
        assert_eq!(sregs.efer & 0x500, 0x500);
        assert_eq!((sregs.cs.selector, sregs.cs.l), (8, 1));
        assert_eq!(vcpu.get_fpu().unwrap().fcw, 0x37f);
        // KVM_GET_FPU may report MXCSR as 0 (seen on this host); the XSAVE image (legacy
        // area, byte 24) holds what the guest will load.
        assert_eq!(vcpu.get_xsave().unwrap().region[6], 0x1f80);
        let lapic = vcpu.get_lapic().unwrap();
        assert_eq!((lapic_register(&lapic, 0x350) >> 8) & 7, 7, "LINT0 ExtINT");
        assert_eq!((lapic_register(&lapic, 0x360) >> 8) & 7, 4, "LINT1 NMI");

        let mut msrs = Msrs::from_entries(&[
            kvm_msr_entry {
                index: MSR_MTRR_DEF_TYPE,
                ..Default::default()
            },
            kvm_msr_entry {
                index: MSR_IA32_MISC_ENABLE,
                ..Default::default()
            },
            kvm_msr_entry {
                index: MSR_IA32_PAT,
                ..Default::default()
            },
        ])
        .unwrap();
        assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), 3);
        let got: Vec<u64> = msrs.as_slice().iter().map(|m| m.data).collect();
        assert_eq!(got[0], 0x806);
        assert_eq!(got[1] & 1, 1);
        assert_eq!(got[2] & 0xff, 0x06);

        // An AP gets CPUID/MSRs/FPU/LAPIC but keeps KVM's reset registers.
        let ap = vm.create_vcpu(1).unwrap();
        let mut cpuid = supported.clone();
        normalize_cpuid(&mut cpuid, 1, 2, false).unwrap();
        setup_vcpu(&ap, 1, &entry, &cpuid, &[]).unwrap();
        assert_eq!(ap.get_regs().unwrap().rip, 0xfff0);
    }

    #[test]
    fn missing_irqchip_is_explained() {
        let kvm = kvm();
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        normalize_cpuid(&mut cpuid, 0, 1, false).unwrap();
        let entry = EntryPoint {
            entry_addr: vm_memory::GuestAddress(0x100_0000),
            protocol: BootProtocol::LinuxBoot,
        };
        let e = setup_vcpu(&vcpu, 0, &entry, &cpuid, &[]).unwrap_err();
        assert!(e.to_string().contains("irqchip"), "{e}");
    }
}
