//! The one place that assembles a running microVM from its configuration: KVM VM and memory,
//! kernel and initrd, platform devices, boot structures, vCPUs.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{Cap, IoEventAddress, Kvm};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{self, BootConfig, LoadedKernel};
use crate::config::{BootFiles, ConfigError, VmConfig, CMDLINE_MAX_SIZE};
use crate::devices::boot_timer::{BootTimer, BOOT_TIMER_SIZE};
use crate::devices::legacy::i8042::{I8042, I8042_BASE, I8042_SIZE};
use crate::devices::legacy::serial::{ConsoleSink, SerialDevice, COM1_BASE, COM1_GSI, COM1_SIZE};
use crate::devices::legacy::EventFdTrigger;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::{
    MmioTransport, BACKEND_EVENT, REG_QUEUE_NOTIFY, RESUME_EVENT, THROTTLE_EVENT,
};
use crate::devices::virtio::net::{Net, TapWatcher};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::{QueueHandler, QueueNotifier, VirtioDevice};
use crate::devices::{Bus, BusDevice};
use crate::seccomp::Filters;
use crate::time::Timestamp;
use crate::vstate::coalesced::CoalescedRing;
use crate::vstate::vcpu::{
    ExitSignal, PendingVcpu, ResetLine, Vcpu, VcpuContext, VcpuControl, VcpuHandle,
};
use crate::vstate::vm::{Vm, VmError};

const I8042_GSI: u32 = 1;
const MMIO_WINDOW: u64 = arch::layout::VIRTIO_MMIO_WINDOW_SIZE;

/// What the VM gets: the kernel, initrd and drive files opened when the configuration was
/// given, or the guest built into the ember binary (which has no drives).
#[derive(Clone, Copy)]
pub enum BootImages<'a> {
    Files(&'a BootFiles, &'a BTreeMap<String, File>),
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
    match CoalescedRing::new(vm.fd(), vcpu0, COM1_BASE as u16) {
        Ok(r) => Some(Arc::new(r)),
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
    /// The VMM thread's subscribers for the virtio queues' ioeventfds.
    pub queue_notifiers: Vec<QueueNotifier>,
    /// The VMM thread's subscribers for the net devices' TAPs.
    pub tap_watchers: Vec<TapWatcher>,
    /// Each drive's transport, by drive id (`PATCH /drives` reaches the device through it).
    pub block_devices: Vec<(String, Arc<Mutex<MmioTransport>>)>,
    /// Each network interface's transport, by iface id (`PATCH /network-interfaces`).
    pub net_devices: Vec<(String, Arc<Mutex<MmioTransport>>)>,
}

/// Where a virtio device goes: its window and GSI, fixed by attach order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioSlot {
    pub addr: u64,
    pub gsi: u32,
}

/// The virtio slots for `count` devices in attach order, or an error when the GSIs run out.
pub fn virtio_slots(count: usize) -> Result<Vec<VirtioSlot>, StartError> {
    use arch::layout::{
        GSI_VIRTIO_FIRST, GSI_VIRTIO_LAST, VIRTIO_MMIO_START, VIRTIO_MMIO_WINDOW_SIZE,
    };
    let max = (GSI_VIRTIO_LAST - GSI_VIRTIO_FIRST + 1) as usize;
    if count > max {
        return Err(StartError::Device(format!(
            "{count} virtio devices configured; at most {max} fit"
        )));
    }
    Ok((0..count)
        .map(|i| VirtioSlot {
            addr: VIRTIO_MMIO_START + i as u64 * VIRTIO_MMIO_WINDOW_SIZE,
            gsi: GSI_VIRTIO_FIRST + i as u32,
        })
        .collect())
}

/// The kernel command line: the user's (or the default), then one `virtio_mmio.device=` per
/// virtio device in attach order, then the root device if a drive is one.
pub fn full_cmdline(cfg: &VmConfig, slots: &[VirtioSlot]) -> Result<String, StartError> {
    use std::fmt::Write;
    let mut cmdline = cfg
        .boot_source
        .as_ref()
        .map(|b| b.cmdline())
        .unwrap_or(crate::config::DEFAULT_KERNEL_CMDLINE)
        .to_string();
    for s in slots {
        let _ = write!(cmdline, " virtio_mmio.device=4K@0x{:x}:{}", s.addr, s.gsi);
    }
    let drives = crate::config::drive::attach_order(&cfg.drives);
    if let Some(root) = drives.first().filter(|d| d.is_root_device) {
        match &root.partuuid {
            Some(p) => {
                let _ = write!(cmdline, " root=PARTUUID={p}");
            }
            None => cmdline.push_str(" root=/dev/vda"),
        }
        cmdline.push_str(if root.read_only() { " ro" } else { " rw" });
    }
    if cmdline.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(StartError::Config(ConfigError::CmdlineTooLong(
            cmdline.len() + 1,
        )));
    }
    Ok(cmdline)
}

/// The device models to attach, in attach order: drives (root first), network interfaces,
/// vsock, then entropy. `taps` gets (device index, TAP fd to watch) for each net device.
fn virtio_devices(
    cfg: &VmConfig,
    images: BootImages,
    taps: &mut Vec<(usize, File)>,
) -> Result<Vec<Box<dyn VirtioDevice>>, StartError> {
    let mut devs: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for d in crate::config::drive::attach_order(&cfg.drives) {
        let opened = match images {
            BootImages::Files(_, drives) => drives.get(&d.drive_id),
            BootImages::Builtin(_) => None,
        };
        // A copy of the descriptor: a start that fails keeps the file for the next one.
        let file = opened
            .ok_or_else(|| "no file was opened for it".to_string())
            .and_then(|f| f.try_clone().map_err(|e| e.to_string()))
            .map_err(|e| StartError::Device(format!("drive {}: {e}", d.drive_id)))?;
        let writeback = d.cache_type == crate::config::CacheType::Writeback;
        let blk = match d.io_engine {
            crate::config::drive::IoEngine::Sync => Block::new(file, d.read_only(), writeback),
            crate::config::drive::IoEngine::Async => {
                Block::new_async(file, d.read_only(), writeback)
            }
        }
        .and_then(|b| b.with_rate_limiter(d.rate_limiter.as_ref()))
        .map(|b| b.with_metrics_id(&d.drive_id))
        .map_err(|e| StartError::Device(format!("drive {}: {e}", d.drive_id)))?;
        devs.push(Box::new(blk));
    }
    for n in &cfg.network_interfaces {
        let tap = n.open().map_err(StartError::Config)?;
        let watch = tap
            .try_clone_file()
            .map_err(|e| StartError::Device(format!("network interface {}: {e}", n.iface_id)))?;
        taps.push((devs.len(), watch));
        let mac = n.mac().map_err(StartError::Config)?;
        let net = Net::new(tap, mac, n.mtu)
            .with_metrics_id(&n.iface_id)
            .with_rate_limiters(n.rx_rate_limiter.as_ref(), n.tx_rate_limiter.as_ref())
            .map_err(|e| StartError::Device(format!("network interface {}: {e}", n.iface_id)))?;
        devs.push(Box::new(net));
    }
    if let Some(v) = &cfg.vsock {
        v.validate().map_err(StartError::Config)?;
        let dev = crate::devices::virtio::vsock::Vsock::new(u64::from(v.guest_cid), &v.uds_path)
            .map_err(|e| StartError::Device(format!("vsock {}: {e}", v.uds_path)))?;
        // Its backend (an epoll set of its sockets) is watched like a TAP.
        let watch = dev.backend_fd().map_err(device_err)?;
        taps.push((devs.len(), watch));
        devs.push(Box::new(dev));
    }
    if let Some(e) = &cfg.entropy {
        e.validate().map_err(StartError::Config)?;
        let rng = match &e.rate_limiter {
            Some(rl) => Rng::with_rate_limiter(rl)
                .map_err(|e| StartError::Device(format!("entropy device: {e}")))?,
            None => Rng::new(),
        };
        devs.push(Box::new(rng));
    }
    Ok(devs)
}

fn device_err(e: impl fmt::Display) -> StartError {
    StartError::Device(e.to_string())
}

/// What KVM gives before the configuration is known: made ahead of `InstanceStart` while the
/// API waits, so that a start through the API does not pay for it.
pub struct KvmPrep {
    kvm: Kvm,
    vm_fd: kvm_ioctls::VmFd,
    supported_cpuid: kvm_bindings::CpuId,
    /// vCPU threads for the vCPU count configured when this was made, filters installed; a
    /// start with more makes the rest, one with fewer ends the extra ones.
    vcpu_threads: Vec<PendingVcpu>,
}

impl KvmPrep {
    pub fn new(
        vcpus: u8,
        seccomp: &Filters,
        exit: &Arc<ExitSignal>,
    ) -> Result<KvmPrep, StartError> {
        let kvm = Kvm::new().map_err(StartError::KvmOpen)?;
        let vm_fd = crate::vstate::vm::create_vm_fd(&kvm)?;
        let supported_cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| StartError::Vcpu(0, format!("KVM_GET_SUPPORTED_CPUID: {e}")))?;
        Ok(KvmPrep {
            kvm,
            vm_fd,
            supported_cpuid,
            vcpu_threads: spawn_vcpu_threads(Vec::new(), vcpus, seccomp, exit)?,
        })
    }

    /// The VM fd, for the teardown at exit of a VM that never started.
    pub fn vm_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.vm_fd.as_raw_fd()
    }
}

/// `count` vCPU threads: those of `ready` first (the extra ones end when dropped), then new ones.
fn spawn_vcpu_threads(
    mut ready: Vec<PendingVcpu>,
    count: u8,
    seccomp: &Filters,
    exit: &Arc<ExitSignal>,
) -> Result<Vec<PendingVcpu>, StartError> {
    ready.truncate(usize::from(count));
    for i in ready.len() as u8..count {
        let t = PendingVcpu::spawn(i, seccomp.clone(), exit.clone())
            .map_err(|e| StartError::Vcpu(i, format!("cannot start its thread: {e}")))?;
        ready.push(t);
    }
    Ok(ready)
}

/// Builds the VM described by `cfg` and starts its vCPUs; `prep` is made here when not given.
pub fn build_microvm(
    cfg: &VmConfig,
    images: BootImages,
    start: Timestamp,
    console: ConsoleSink,
    exit: Arc<ExitSignal>,
    seccomp: &Filters,
    prep: Option<KvmPrep>,
) -> Result<Microvm, StartError> {
    let mc = &cfg.machine_config;
    mc.validate().map_err(StartError::Config)?;
    let cpu_mods = match &cfg.cpu_config {
        Some(c) => c.to_modifiers().map_err(StartError::Config)?,
        None => Default::default(),
    };
    let mut taps = Vec::new();
    let virtio = virtio_devices(cfg, images, &mut taps)?;
    let slots = virtio_slots(virtio.len())?;
    let cmdline = full_cmdline(cfg, &slots)?;

    phase("build start", &start);
    let mut prep = prep;
    let ready = prep
        .as_mut()
        .map(|p| std::mem::take(&mut p.vcpu_threads))
        .unwrap_or_default();
    // The vCPU threads get ready (seccomp filter) while this thread builds the VM, if they
    // did not while the API waited.
    let threads = spawn_vcpu_threads(ready, mc.vcpu_count, seccomp, &exit)?;
    let mem_size = (mc.mem_size_mib as u64) << 20;
    let (kvm, vm, supported) = match prep {
        // Made while the API waited; its grace periods are long over.
        Some(p) => (
            p.kvm,
            Vm::with_memory(p.vm_fd, mem_size, mc.huge_pages)?,
            p.supported_cpuid,
        ),
        None => {
            let kvm = Kvm::new().map_err(StartError::KvmOpen)?;
            let vm = Vm::new(&kvm, mem_size, mc.huge_pages)?;
            let supported = kvm
                .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .map_err(|e| StartError::Vcpu(0, format!("KVM_GET_SUPPORTED_CPUID: {e}")))?;
            (kvm, vm, supported)
        }
    };
    phase("VM created", &start);
    let mem = vm.memory();

    let loaded: LoadedKernel = match images {
        BootImages::Files(f, _) => arch::load_kernel(mem, &mut &f.kernel),
        BootImages::Builtin(bytes) => arch::load_kernel_bytes(mem, bytes),
    }
    .map_err(StartError::Kernel)?;
    let initrd = match images {
        BootImages::Files(
            BootFiles {
                initrd: Some(f), ..
            },
            _,
        ) => {
            let path = cfg
                .boot_source
                .as_ref()
                .and_then(|b| b.initrd_path.clone())
                .unwrap_or_default();
            Some(arch::load_initrd(mem, &mut &*f).map_err(|e| StartError::Initrd(path, e))?)
        }
        _ => None,
    };

    phase("kernel loaded", &start);
    // Platform devices.
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let serial_irq = EventFdTrigger::new().map_err(device_err)?;
    vm.register_irqfd(&serial_irq, COM1_GSI)?;
    let serial_buffer_ready = EventFd::new(libc::EFD_NONBLOCK).map_err(device_err)?;
    let serial = Arc::new(Mutex::new(
        SerialDevice::new(
            serial_irq,
            serial_buffer_ready.try_clone().map_err(device_err)?,
            console.out,
        )
        .with_rate_limiter(console.limiter),
    ));
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

    let mut mmio_info = Vec::with_capacity(virtio.len());
    let mut queue_notifiers = Vec::with_capacity(virtio.len());
    let mut tap_watchers = Vec::with_capacity(taps.len());
    // Drives are attached first: the first transports are theirs.
    let drive_ids: Vec<String> = crate::config::drive::attach_order(&cfg.drives)
        .iter()
        .map(|d| d.drive_id.clone())
        .collect();
    let mut block_devices = Vec::with_capacity(drive_ids.len());
    let iface_ids: Vec<String> = cfg
        .network_interfaces
        .iter()
        .map(|n| n.iface_id.clone())
        .collect();
    let mut net_devices = Vec::with_capacity(iface_ids.len());
    for (i, (dev, slot)) in virtio.into_iter().zip(&slots).enumerate() {
        let queue_count = dev.queue_count();
        let irq = EventFdTrigger::new().map_err(device_err)?;
        vm.register_irqfd(&irq, slot.gsi)?;
        let backend_evt = dev.completion_event();
        let throttle_evt = dev.throttle_timer();
        // A queue pass cut at its budget asks the VMM thread, through this, to run it again.
        let resume = EventFd::new(libc::EFD_NONBLOCK).map_err(device_err)?;
        let transport = MmioTransport::new(dev, mem.clone(), irq)
            .with_resume_event(resume.try_clone().map_err(device_err)?);
        let transport = Arc::new(Mutex::new(transport));
        {
            let handler: Arc<Mutex<dyn QueueHandler>> = transport.clone();
            queue_notifiers.push(QueueNotifier::new(resume, RESUME_EVENT, handler));
        }
        if let Some(evt) = backend_evt {
            let handler: Arc<Mutex<dyn QueueHandler>> = transport.clone();
            queue_notifiers.push(QueueNotifier::new(evt, BACKEND_EVENT, handler));
        }
        if let Some(evt) = throttle_evt {
            let handler: Arc<Mutex<dyn QueueHandler>> = transport.clone();
            queue_notifiers.push(QueueNotifier::new(evt, THROTTLE_EVENT, handler));
        }
        mmio.insert(transport.clone(), slot.addr, MMIO_WINDOW)
            .map_err(device_err)?;
        if let Some(id) = drive_ids.get(i) {
            block_devices.push((id.clone(), transport.clone()));
        }
        if let Some(pos) = taps.iter().position(|(d, _)| *d == i) {
            if let Some(id) = iface_ids.get(i - drive_ids.len()) {
                net_devices.push((id.clone(), transport.clone()));
            }
            let (_, fd) = taps.swap_remove(pos);
            tap_watchers.push(TapWatcher::new(fd, transport.clone()));
        }
        // Queue notifications skip the vCPU exit (one ioeventfd per queue, matching its
        // index); without ioeventfd the bus write does it.
        for q in 0..queue_count as u32 {
            let notify = EventFd::new(libc::EFD_NONBLOCK).map_err(device_err)?;
            match vm.fd().register_ioevent(
                &notify,
                &IoEventAddress::Mmio(slot.addr + REG_QUEUE_NOTIFY),
                q,
            ) {
                Ok(()) => {
                    let handler: Arc<Mutex<dyn QueueHandler>> = transport.clone();
                    queue_notifiers.push(QueueNotifier::new(notify, q, handler));
                }
                Err(e) => log::warn!(
                    "no ioeventfd for the virtio device at {:#x}: {e}; notifications exit",
                    slot.addr
                ),
            }
        }
        mmio_info.push(arch::MmioDeviceInfo {
            addr: slot.addr,
            len: MMIO_WINDOW,
            irq: slot.gsi,
        });
    }

    arch::configure_system(
        mem,
        &BootConfig {
            kernel: &loaded,
            cmdline: &cmdline,
            initrd,
            vcpu_count: mc.vcpu_count,
            mmio_devices: &mmio_info,
        },
    )
    .map_err(|e| StartError::Boot(e.to_string()))?;

    phase("boot structures written", &start);
    // vCPUs: all are created and configured before any runs.
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
        coalesced,
    });
    // With writes coalesced the VMM flushes partial lines on a timer (see the controller).
    // Set before the vCPUs run, so that this never waits on a guest writing to the console.
    if ctx.coalesced.is_some() {
        crate::devices::bus::lock(&serial).set_line_buffered(true);
    }
    let mut handles = Vec::with_capacity(vcpus.len());
    for (v, thread) in vcpus.into_iter().zip(threads) {
        let index = v.index;
        handles.push(
            thread
                .start(v, ctx.clone())
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
        queue_notifiers,
        tap_watchers,
        block_devices,
        net_devices,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BootSourceConfig, DriveConfig};

    fn drive(id: &str, root: bool, ro: bool, partuuid: Option<&str>) -> DriveConfig {
        serde_json::from_value(serde_json::json!({
            "drive_id": id, "is_root_device": root, "path_on_host": "/x",
            "is_read_only": ro, "partuuid": partuuid,
        }))
        .unwrap()
    }

    #[test]
    fn cmdline_lists_virtio_devices_and_root() {
        let mut cfg = VmConfig {
            boot_source: Some(BootSourceConfig {
                kernel_image_path: "/k".into(),
                boot_args: Some("console=ttyS0".into()),
                initrd_path: None,
            }),
            ..Default::default()
        };
        cfg.drives = vec![
            drive("data", false, false, None),
            drive("root", true, true, None),
        ];
        let slots = virtio_slots(3).unwrap();
        assert_eq!(
            slots[2],
            VirtioSlot {
                addr: 0xc000_3000,
                gsi: 7
            }
        );
        assert_eq!(
            full_cmdline(&cfg, &slots).unwrap(),
            "console=ttyS0 virtio_mmio.device=4K@0xc0001000:5 \
             virtio_mmio.device=4K@0xc0002000:6 virtio_mmio.device=4K@0xc0003000:7 \
             root=/dev/vda ro"
        );
        cfg.drives = vec![drive("root", true, false, Some("abcd-01"))];
        let c = full_cmdline(&cfg, &slots[..1]).unwrap();
        assert!(c.ends_with(" root=PARTUUID=abcd-01 rw"), "{c}");
        cfg.drives.clear();
        assert_eq!(full_cmdline(&cfg, &[]).unwrap(), "console=ttyS0");
        assert!(virtio_slots(20).is_err());
        // The limit applies to the final line.
        cfg.boot_source.as_mut().unwrap().boot_args = Some("a".repeat(2000));
        assert!(matches!(
            full_cmdline(&cfg, &slots),
            Err(StartError::Config(ConfigError::CmdlineTooLong(_)))
        ));
    }
}
