//! x86_64 platform: guest memory layout, kernel loading, boot-time memory contents (zero page,
//! PVH start info, e820, MPTable, ACPI) and per-vCPU state (CPUID, MSRs, registers, LAPIC).
//!
//! Typical call order for a VMM:
//! 1. `arch_memory_regions` -> build the `GuestMemoryMmap`, register it with KVM;
//! 2. `KVM_SET_TSS_ADDR` (`layout::KVM_TSS_ADDR`), `KVM_CREATE_IRQCHIP`, `KVM_CREATE_PIT2`;
//! 3. `load_kernel` / `load_kernel_bytes`, then `load_initrd` if any;
//! 4. `configure_system`;
//! 5. per vCPU: copy KVM's supported CPUID, `normalize_cpuid`, `apply_cpuid_modifiers`,
//!    then `setup_vcpu`.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod loader;
pub mod memory;
pub mod mptable;
pub mod msr;
pub mod regs;
pub mod vcpu;

pub use acpi::{AcpiError, MmioDeviceInfo};
pub use boot::{configure_system, e820_entries, BootConfig, ConfigureError};
pub use cpuid::{
    apply_cpuid_modifiers, normalize_cpuid, try_apply_cpuid_modifiers, CpuidError,
    CpuidLeafModifier, CpuidRegister, CpuidRegisterModifier,
};
pub use loader::{
    load_initrd, load_initrd_bytes, load_kernel, load_kernel_bytes, BootProtocol, EntryPoint,
    InitrdConfig, KernelFormat, LoadError, LoadedKernel,
};
pub use memory::{arch_memory_regions, GuestMemoryMmap, RamLayout};
pub use msr::MsrModifier;
pub use vcpu::{setup_vcpu, VcpuSetupError};
