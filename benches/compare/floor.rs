//! Scenario 12's references: the least a process must do on this host to run a guest, so
//! that scenario 1's CPU can be split into what the host's KVM costs, what the VMM adds and
//! what the hello guest adds.
//!
//! - The trivial guest: an ELF loaded at 1 MiB through the Linux 64-bit boot protocol (so any
//!   Firecracker-compatible VMM boots it) whose nine instructions print one line to COM1 with
//!   a single `rep outsb` and reset through the i8042.
//! - The minimal KVM program (`compare --kvm-floor`): this binary creating a VM as a VMM must
//!   (in-kernel irqchip and PIT, 128 MiB, one vCPU with KVM's supported CPUID, long mode on an
//!   identity map, COM1 writes coalesced), running the trivial guest to its reset and exiting,
//!   with nothing else: no configuration, threads, devices, event loop, logging or seccomp.

use kvm_bindings::{kvm_pit_config, kvm_regs, kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// What the trivial guest prints.
pub const LINE: &str = "trivial guest: hello";

const LOAD: u64 = 0x10_0000;
const MEM_SIZE: usize = 128 << 20;
/// Identity map of the first GiB (2 MiB pages) for the minimal program's vCPU.
const PML4: u64 = 0x9000;
const PDPT: u64 = 0xa000;
const PD: u64 = 0xb000;
const GDT: u64 = 0x500;

/// The guest's code followed by its line: `lea line(%rip), %rsi; mov $0x3f8, %dx;
/// mov $len, %ecx; rep outsb; mov $0x64, %dx; mov $0xfe, %al; out %al, %dx; 1: hlt; jmp 1b`.
fn code() -> Vec<u8> {
    let line = format!("{LINE}\n");
    let mut c = vec![0x48, 0x8d, 0x35, 0, 0, 0, 0]; // lea rel32(%rip), %rsi
    c.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov $0x3f8, %dx
    c.push(0xb9); // mov $len, %ecx
    c.extend_from_slice(&(line.len() as u32).to_le_bytes());
    c.extend_from_slice(&[0xf3, 0x6e]); // rep outsb
    c.extend_from_slice(&[0x66, 0xba, 0x64, 0x00]); // mov $0x64, %dx
    c.extend_from_slice(&[0xb0, 0xfe, 0xee]); // mov $0xfe, %al; out %al, %dx
    c.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp to the hlt
    let rel = (c.len() - 7) as u32; // from the end of the lea to the line
    c[3..7].copy_from_slice(&rel.to_le_bytes());
    c.extend_from_slice(line.as_bytes());
    c
}

/// The trivial guest as an ELF64 file: one PT_LOAD segment (headers and code) at 1 MiB.
pub fn elf() -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let code = code();
    let size = (EHDR + PHDR + code.len()) as u64;
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0"); // 64-bit, LE, SysV
    f.extend_from_slice(&2u16.to_le_bytes()); // e_type: EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // e_machine: x86-64
    f.extend_from_slice(&1u32.to_le_bytes()); // e_version
    f.extend_from_slice(&(LOAD + (EHDR + PHDR) as u64).to_le_bytes()); // e_entry
    f.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for v in [EHDR as u16, PHDR as u16, 1, 64, 0, 0] {
        // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(&1u32.to_le_bytes()); // p_type: LOAD
    f.extend_from_slice(&7u32.to_le_bytes()); // p_flags: RWX
    f.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    for v in [LOAD, LOAD, size, size, 0x1000] {
        // p_vaddr, p_paddr, p_filesz, p_memsz, p_align
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(&code);
    f
}

/// `compare --kvm-floor`: boots the trivial guest with nothing but the KVM calls a VMM cannot
/// do without, copies its line to stdout and returns at its reset. The VM's teardown happens
/// in this process when its fds close, as in a VMM without a teardown helper.
pub fn run() -> Result<(), String> {
    let e = |what: &'static str| move |err: kvm_ioctls::Error| format!("{what}: {err}");
    // Declared first, so dropped last: the VM (and its memslot) goes before the memory.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
        .map_err(|err| format!("guest memory: {err}"))?;
    let kvm = Kvm::new().map_err(e("open /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(e("KVM_CREATE_VM"))?;
    vm.set_tss_address(0xfffb_d000)
        .map_err(e("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(e("KVM_CREATE_IRQCHIP"))?;
    vm.create_pit2(kvm_pit_config::default())
        .map_err(e("KVM_CREATE_PIT2"))?;
    let host = mem
        .get_host_address(GuestAddress(0))
        .map_err(|err| format!("guest memory: {err}"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: the region is `mem`'s own mapping, which outlives the VM (declared before it).
    unsafe { vm.set_user_memory_region(region) }.map_err(e("KVM_SET_USER_MEMORY_REGION"))?;
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(e("KVM_GET_SUPPORTED_CPUID"))?;

    let w = |addr: u64, v: u64| {
        mem.write_obj(v, GuestAddress(addr))
            .map_err(|err| format!("guest memory: {err}"))
    };
    w(PML4, PDPT | 3)?;
    w(PDPT, PD | 3)?;
    for i in 0..512u64 {
        w(PD + i * 8, (i << 21) | 0x83)?; // PS | RW | P
    }
    w(GDT + 8, 0x00af_9b00_0000_ffff)?; // 64-bit code
    w(GDT + 16, 0x00cf_9300_0000_ffff)?; // data
    mem.write_slice(&code(), GuestAddress(LOAD))
        .map_err(|err| format!("guest memory: {err}"))?;

    let mut vcpu = vm.create_vcpu(0).map_err(e("KVM_CREATE_VCPU"))?;
    // COM1 writes coalesced, as ember does (a Firecracker-compatible guest prints the same
    // way with or without): KVM emulates the guest's `rep outsb` in the kernel instead of
    // returning to user space for each byte.
    vm.register_coalesced_mmio(IoEventAddress::Pio(0x3f8), 1)
        .map_err(e("KVM_REGISTER_COALESCED_MMIO"))?;
    vcpu.map_coalesced_mmio_ring()
        .map_err(e("the coalesced ring"))?;
    vcpu.set_cpuid2(&cpuid).map_err(e("KVM_SET_CPUID2"))?;
    let mut sregs = vcpu.get_sregs().map_err(e("KVM_GET_SREGS"))?;
    let seg = |selector: u16, type_: u8, l: u8, db: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = seg(8, 11, 1, 0);
    sregs.ds = seg(0x10, 3, 0, 1);
    (sregs.es, sregs.fs, sregs.gs, sregs.ss) = (sregs.ds, sregs.ds, sregs.ds, sregs.ds);
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 23;
    sregs.cr0 = 0x8000_0011; // PG | ET | PE
    sregs.cr3 = PML4;
    sregs.cr4 = 0x20; // PAE
    sregs.efer = 0x500; // LMA | LME
    vcpu.set_sregs(&sregs).map_err(e("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rip: LOAD,
        rsp: 0x8ff0,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(e("KVM_SET_REGS"))?;

    let mut out = std::io::stdout().lock();
    loop {
        match vcpu.run().map_err(e("KVM_RUN"))? {
            VcpuExit::IoOut(0x3f8, data) => {
                let _ = std::io::Write::write_all(&mut out, data);
            }
            VcpuExit::IoOut(0x64, [0xfe]) => {
                while let Some(w) = vcpu
                    .coalesced_mmio_read()
                    .map_err(e("the coalesced ring"))?
                {
                    let len = (w.len as usize).min(w.data.len());
                    let _ = std::io::Write::write_all(&mut out, &w.data[..len]);
                }
                let _ = std::io::Write::flush(&mut out);
                return Ok(());
            }
            other => return Err(format!("unexpected exit: {other:?}")),
        }
    }
}
