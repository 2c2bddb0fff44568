//! The one place that assembles a running microVM from its configuration: KVM VM and memory,
//! kernel and initrd, platform devices, boot structures, vCPUs.

use std::fmt;
use std::fs::File;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{Cap, IoEventAddress, Kvm};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{self, BootConfig, LoadedKernel};
use crate::config::{ConfigError, VmConfig, CMDLINE_MAX_SIZE};
use crate::devices::boot_timer::{BootTimer, BOOT_TIMER_SIZE};
use crate::devices::legacy::i8042::{I8042, I8042_BASE, I8042_SIZE};
use crate::devices::legacy::serial::{SerialDevice, SerialOut, COM1_BASE, COM1_GSI, COM1_SIZE};
use crate::devices::legacy::EventFdTrigger;
use crate::devices::{Bus, BusDevice};
use crate::seccomp::Filters;
use crate::time::Timestamp;
use crate::vstate::coalesced::CoalescedRing;
use crate::vstate::vcpu::{ExitSignal, ResetLine, Vcpu, VcpuContext, VcpuControl, VcpuHandle};
use crate::vstate::vm::{Vm, VmError};

const I8042_GSI: u32 = 1;

/// The kernel to boot: a file, or the guest built into the ember binary.
pub enum KernelImage {
    File(File),
    Builtin(&'static [u8]),
}

/// The guest that `ember run` boots when no kernel is given.
pub static BUILTIN_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ember-guest"));

#[derive(Debug)]
pub enum StartError {
    KvmOpen(kvm_ioctls::Error),
    Vm(VmError),
    Config(ConfigError),
    Kernel(arch::LoadError),
    Initrd(String, arch::LoadError),
    Boot(String),
    Vcpu(u8, String),
    Device(String),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            StartError::KvmOpen(e) => write!(
                f,
                "cannot open /dev/kvm: {e} (is KVM available and are you allowed to use it?)"
            ),
            StartError::Vm(e) => write!(f, "{e}"),
            StartError::Config(e) => write!(f, "{e}"),
            StartError::Kernel(e) => write!(f, "cannot load the kernel: {e}"),
            StartError::Initrd(p, e) => write!(f, "cannot load the initrd {p:?}: {e}"),
            StartError::Boot(e) => write!(f, "cannot write the boot structures: {e}"),
            StartError::Vcpu(i, e) => write!(f, "cannot set up vCPU {i}: {e}"),
            StartError::Device(e) => write!(f, "cannot set up a device: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

impl From<VmError> for StartError {
    fn from(e: VmError) -> Self {
        StartError::Vm(e)
    }
}

/// Lets KVM queue guest writes to COM1's data register instead of exiting for each byte.
/// Without support, every byte simply exits as before.
fn coalesce_com1(vm: &Vm, vcpu0: &kvm_ioctls::VcpuFd) -> Option<Arc<CoalescedRing>> {
    let ring = match CoalescedRing::map(vcpu0) {
        Ok(r) => r,
        Err(e) => {
            log::debug!("no coalesced I/O ring: {e}");
            return None;
        }
    };
    match vm
        .fd()
        .register_coalesced_mmio(IoEventAddress::Pio(COM1_BASE), 1)
    {
        Ok(()) => Some(Arc::new(ring)),
        Err(e) => {
            log::debug!("cannot coalesce COM1 writes: {e}");
            None
        }
    }
}

/// Start-up phases at debug level: where the milliseconds of a boot go.
fn phase(what: &str, start: &Timestamp) {
    if log::log_enabled!(log::Level::Debug) {
        let now = Timestamp::now();
        log::debug!(
            "{what}: {} us wall, {} us CPU since start",
            now.wall_us.saturating_sub(start.wall_us),
            now.cpu_us.saturating_sub(start.cpu_us)
        );
    }
}

type I8042Device = I8042<ResetLine, EventFdTrigger>;

/// A booted microVM and the handles the VMM thread needs to drive it.
pub struct Microvm {
    pub vm: Vm,
    /// What the vCPU threads share; the VMM thread drains coalesced writes through it.
    pub vcpu_ctx: Arc<VcpuContext>,
    pub vcpus: Vec<VcpuHandle>,
    pub control: Arc<VcpuControl>,
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Signalled when the guest drained the serial input FIFO.
    pub serial_buffer_ready: EventFd,
    pub i8042: Arc<Mutex<I8042Device>>,
}

fn device_err(e: impl fmt::Display) -> StartError {
    StartError::Device(e.to_string())
}

/// Builds the VM described by `cfg` and starts its vCPUs.
pub fn build_microvm(
    cfg: &VmConfig,
    kernel: KernelImage,
    start: Timestamp,
    serial_out: SerialOut,
    exit: Arc<ExitSignal>,
    seccomp: &Filters,
) -> Result<Microvm, StartError> {
    let mc = &cfg.machine_config;
    mc.validate().map_err(StartError::Config)?;
    let cpu_mods = match &cfg.cpu_config {
        Some(c) => c.to_modifiers().map_err(StartError::Config)?,
        None => Default::default(),
    };
    let cmdline = cfg
        .boot_source
        .as_ref()
        .map(|b| b.cmdline())
        .unwrap_or(crate::config::DEFAULT_KERNEL_CMDLINE)
        .to_string();
    if cmdline.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(StartError::Config(ConfigError::CmdlineTooLong(
            cmdline.len() + 1,
        )));
    }

    phase("build start", &start);
    let kvm = Kvm::new().map_err(StartError::KvmOpen)?;
    let vm = Vm::new(&kvm, (mc.mem_size_mib as u64) << 20)?;
    phase("VM created", &start);
    let mem = vm.memory();

    let loaded: LoadedKernel = match kernel {
        KernelImage::File(mut f) => arch::load_kernel(mem, &mut f),
        KernelImage::Builtin(bytes) => arch::load_kernel_bytes(mem, bytes),
    }
    .map_err(StartError::Kernel)?;
    let initrd = match cfg
        .boot_source
        .as_ref()
        .and_then(|b| b.initrd_path.as_ref())
    {
        Some(p) => {
            let mut f = File::open(p).map_err(|e| {
                StartError::Config(ConfigError::File {
                    what: "initrd",
                    path: p.clone(),
                    reason: e.to_string(),
                })
            })?;
            Some(arch::load_initrd(mem, &mut f).map_err(|e| StartError::Initrd(p.clone(), e))?)
        }
        None => None,
    };

    phase("kernel loaded", &start);
    // Platform devices.
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let serial_irq = EventFdTrigger::new().map_err(device_err)?;
    vm.register_irqfd(&serial_irq, COM1_GSI)?;
    let serial_buffer_ready = EventFd::new(libc::EFD_NONBLOCK).map_err(device_err)?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        serial_irq,
        serial_buffer_ready.try_clone().map_err(device_err)?,
        serial_out,
    )));
    pio.insert(serial.clone(), COM1_BASE, COM1_SIZE)
        .map_err(device_err)?;
    let kbd_irq = EventFdTrigger::new().map_err(device_err)?;
    vm.register_irqfd(&kbd_irq, I8042_GSI)?;
    let i8042 = Arc::new(Mutex::new(I8042::new(ResetLine(exit.clone()), kbd_irq)));
    pio.insert(i8042.clone(), I8042_BASE, I8042_SIZE)
        .map_err(device_err)?;
    if cfg.boot_timer {
        let timer: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(BootTimer::new(start)));
        mmio.insert(timer, arch::layout::BOOT_TIMER_ADDR, BOOT_TIMER_SIZE)
            .map_err(device_err)?;
    }

    arch::configure_system(
        mem,
        &BootConfig {
            kernel: &loaded,
            cmdline: &cmdline,
            initrd,
            vcpu_count: mc.vcpu_count,
            mmio_devices: &[],
        },
    )
    .map_err(|e| StartError::Boot(e.to_string()))?;

    phase("boot structures written", &start);
    // vCPUs: all are created and configured before any runs.
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| StartError::Vcpu(0, format!("KVM_GET_SUPPORTED_CPUID: {e}")))?;
    let mut vcpus = Vec::with_capacity(mc.vcpu_count as usize);
    for index in 0..mc.vcpu_count {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|e| StartError::Vcpu(index, format!("KVM_CREATE_VCPU: {e}")))?;
        let mut cpuid = supported.clone();
        arch::normalize_cpuid(&mut cpuid, index, mc.vcpu_count, mc.smt)
            .map_err(|e| StartError::Vcpu(index, e.to_string()))?;
        arch::apply_cpuid_modifiers(&mut cpuid, &cpu_mods.cpuid);
        arch::setup_vcpu(&fd, index, &loaded.entry, &cpuid, &cpu_mods.msrs)
            .map_err(|e| StartError::Vcpu(index, e.to_string()))?;
        vcpus.push(Vcpu { index, fd });
    }

    phase("vCPUs configured", &start);
    let coalesced = match vcpus.first() {
        Some(v) if kvm.check_extension(Cap::CoalescedPio) => coalesce_com1(&vm, &v.fd),
        _ => None,
    };
    let control = Arc::new(VcpuControl::default());
    let ctx = Arc::new(VcpuContext {
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        memory: mem.clone(),
        exit,
        control: control.clone(),
        seccomp: seccomp.clone(),
        coalesced,
    });
    let mut handles = Vec::with_capacity(vcpus.len());
    for v in vcpus {
        let index = v.index;
        handles.push(
            v.start(ctx.clone())
                .map_err(|e| StartError::Vcpu(index, format!("cannot start its thread: {e}")))?,
        );
    }
    Ok(Microvm {
        vm,
        vcpu_ctx: ctx,
        vcpus: handles,
        control,
        serial,
        serial_buffer_ready,
        i8042,
    })
}
