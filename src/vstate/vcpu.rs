//! vCPU threads: each runs `KVM_RUN` in a loop and dispatches port I/O and MMIO exits to the
//! device buses. Anything unexpected stops the VM with a message that names the exit, and for
//! an emulation failure the guest's RIP and instruction bytes: never a hang.

use std::fmt;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::GuestMemoryMmap;
use crate::devices::Bus;
use crate::log_guest;
use crate::metrics::METRICS;

/// Process exit codes (Firecracker's).
pub mod exit_code {
    pub const OK: i32 = 0;
    pub const GENERIC_ERROR: i32 = 1;
    pub const UNEXPECTED_ERROR: i32 = 2;
    pub const BAD_SYSCALL: i32 = 148;
    pub const SIGBUS: i32 = 149;
    pub const SIGSEGV: i32 = 150;
    pub const SIGXFSZ: i32 = 151;
    pub const BAD_CONFIGURATION: i32 = 152;
    pub const ARG_PARSING: i32 = 153;
    pub const SIGXCPU: i32 = 154;
    pub const SIGPIPE: i32 = 155;
    pub const SIGHUP: i32 = 156;
    pub const SIGILL: i32 = 157;
}

/// How the VM asks the VMM thread to stop: the first code set wins, and the eventfd wakes the
/// event loop.
pub struct ExitSignal {
    code: AtomicI32,
    pub evt: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<ExitSignal> {
        Ok(ExitSignal {
            code: AtomicI32::new(-1),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    pub fn stop(&self, code: i32) {
        let _ = self
            .code
            .compare_exchange(-1, code, Ordering::SeqCst, Ordering::SeqCst);
        let _ = self.evt.write(1);
    }

    /// The code to exit with, once `stop` was called.
    pub fn code(&self) -> Option<i32> {
        let c = self.code.load(Ordering::SeqCst);
        (c >= 0).then_some(c)
    }
}

/// The i8042's reset line: a reset is a clean stop.
pub struct ResetLine(pub Arc<ExitSignal>);

impl vm_superio::Trigger for ResetLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        log::info!("Guest requested a reset through the i8042; stopping.");
        self.0.stop(exit_code::OK);
        Ok(())
    }
}

/// Pausing: the VMM thread raises `paused` and kicks each vCPU out of KVM_RUN with a signal
/// until all are parked (or have stopped for good); they wait on the condvar until `paused`
/// drops.
#[derive(Default)]
pub struct VcpuControl {
    paused: AtomicBool,
    counts: Mutex<Counts>,
    cv: Condvar,
}

#[derive(Default)]
struct Counts {
    /// vCPUs waiting in `park_if_paused`.
    parked: usize,
    /// vCPUs that stopped the VM or saw it stopping: they never run the guest again, nor park.
    stopped: usize,
}

impl VcpuControl {
    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn park_if_paused(&self) {
        if !self.paused.load(Ordering::Acquire) {
            return;
        }
        let mut counts = self.counts();
        counts.parked += 1;
        self.cv.notify_all();
        while self.paused.load(Ordering::Acquire) {
            counts = self.cv.wait(counts).unwrap_or_else(|e| e.into_inner());
        }
        counts.parked -= 1;
        self.cv.notify_all();
    }

    /// A vCPU leaves the run loop for good: a pause need not wait for it.
    fn stopped(&self) {
        self.counts().stopped += 1;
        self.cv.notify_all();
    }
}

/// What every vCPU thread shares.
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub memory: GuestMemoryMmap,
    pub exit: Arc<ExitSignal>,
    pub control: Arc<VcpuControl>,
    /// COM1 writes queued by KVM instead of exiting, when the host supports it.
    pub coalesced: Option<Arc<super::coalesced::CoalescedRing>>,
}

impl VcpuContext {
    /// Hands queued port writes to their devices, in order.
    pub fn drain_coalesced(&self) {
        let Some(ring) = &self.coalesced else { return };
        // Consecutive one-byte writes to the same port (a line of console output) go to the
        // device as one write: one host write(2) per line instead of per byte, and a log
        // line from another thread cannot land in the middle of it.
        let mut run = [0u8; 256];
        let mut len = 0;
        let mut at: Option<(u64, bool)> = None;
        let flush = |at: Option<(u64, bool)>, bytes: &[u8]| {
            if let (Some((addr, pio)), false) = (at, bytes.is_empty()) {
                let bus = if pio { &self.pio } else { &self.mmio };
                bus.write_bytes_to(addr, bytes);
            }
        };
        let held = ring.lock();
        ring.drain(&held, |addr, data, pio| {
            if data.len() == 1 && at == Some((addr, pio)) && len < run.len() {
                run[len] = data[0];
                len += 1;
                return;
            }
            flush(at, &run[..len]);
            len = 0;
            if data.len() == 1 {
                at = Some((addr, pio));
                run[0] = data[0];
                len = 1;
            } else {
                at = None;
                let bus = if pio { &self.pio } else { &self.mmio };
                bus.write(addr, data);
            }
        });
        flush(at, &run[..len]);
        drop(held);
    }
}

pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
}

/// A vCPU thread started before its vCPU exists: it installs its seccomp filter (which the
/// kernel compiles, a fraction of a millisecond) while the VMM thread still builds the VM, then
/// waits for its vCPU. Dropping it before `start` ends the thread.
pub struct PendingVcpu {
    start: std::sync::mpsc::Sender<(Vcpu, Arc<VcpuContext>)>,
    thread: JoinHandle<()>,
}

impl PendingVcpu {
    pub fn spawn(
        index: u8,
        seccomp: crate::seccomp::Filters,
        exit: Arc<ExitSignal>,
    ) -> std::io::Result<PendingVcpu> {
        let (tx, rx) = std::sync::mpsc::channel::<(Vcpu, Arc<VcpuContext>)>();
        let thread = std::thread::Builder::new()
            .name(format!("ember_vcpu{index}"))
            // vCPU threads need little stack: exits are handled without deep recursion.
            .stack_size(256 * 1024)
            .spawn(move || {
                // Before the first KVM_RUN: from here on the guest drives this thread.
                if let Err(e) = seccomp.apply(crate::seccomp::ThreadKind::Vcpu) {
                    log::error!("vCPU {index}: {e}");
                    exit.stop(exit_code::GENERIC_ERROR);
                    return;
                }
                if let Ok((vcpu, ctx)) = rx.recv() {
                    vcpu.run(&ctx);
                }
            })?;
        Ok(PendingVcpu { start: tx, thread })
    }

    /// Hands the thread its vCPU: it enters the guest at once.
    pub fn start(self, vcpu: Vcpu, ctx: Arc<VcpuContext>) -> std::io::Result<VcpuHandle> {
        self.start
            .send((vcpu, ctx))
            .map_err(|_| std::io::Error::other("the vCPU thread has ended"))?;
        Ok(VcpuHandle {
            thread: self.thread,
        })
    }
}

/// Why a vCPU stopped the VM.
#[derive(Debug)]
pub enum VcpuError {
    /// KVM_EXIT_SHUTDOWN, with where the guest was.
    TripleFault {
        rip: u64,
        bytes: Option<Vec<u8>>,
    },
    EmulationFailure {
        suberror: u32,
        rip: u64,
        bytes: Option<Vec<u8>>,
    },
    FailEntry(u64),
    UnexpectedExit(String),
    Run(kvm_ioctls::Error),
}

impl fmt::Display for VcpuError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            VcpuError::TripleFault { rip, bytes } => {
                write!(
                    f,
                    "KVM_EXIT_SHUTDOWN: the guest triple-faulted (an exception it could not \
                     handle) at RIP {rip:#x}, instruction bytes: "
                )?;
                write_bytes(f, bytes)
            }
            VcpuError::EmulationFailure {
                suberror,
                rip,
                bytes,
            } => {
                let what = match suberror {
                    1 => "emulation failure: KVM could not emulate a guest instruction",
                    2 => "simultaneous exceptions",
                    3 => "delivery event failure",
                    _ => "internal error",
                };
                write!(
                    f,
                    "KVM_EXIT_INTERNAL_ERROR, suberror {suberror} ({what}) at RIP {rip:#x}, instruction bytes: "
                )?;
                write_bytes(f, bytes)
            }
            VcpuError::FailEntry(reason) => write!(
                f,
                "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x}"
            ),
            VcpuError::UnexpectedExit(e) => write!(f, "unexpected exit: {e}"),
            VcpuError::Run(e) => write!(f, "KVM_RUN failed: {e}"),
        }
    }
}

impl std::error::Error for VcpuError {}

/// Instruction bytes as hex pairs, or "unreadable" when RIP did not translate.
fn write_bytes(f: &mut fmt::Formatter, bytes: &Option<Vec<u8>>) -> fmt::Result {
    match bytes {
        Some(b) => {
            for (i, x) in b.iter().enumerate() {
                write!(f, "{}{x:02x}", if i > 0 { " " } else { "" })?;
            }
            Ok(())
        }
        None => write!(f, "unreadable"),
    }
}

/// What the run loop does after an exit.
enum Next {
    Continue,
    Stop(i32),
}

/// The signal that kicks a vCPU out of KVM_RUN; its handler does nothing, the EINTR is the
/// point.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

pub fn register_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

impl Vcpu {
    fn run(mut self, ctx: &VcpuContext) {
        loop {
            let result = self.fd.run();
            // Queued writes happened before this exit: the device sees them first.
            ctx.drain_coalesced();
            let next = match result {
                // String I/O comes as one exit for several accesses: the width is in kvm_run.
                Ok(VcpuExit::IoIn(..) | VcpuExit::IoOut(..)) => self.handle_pio(ctx),
                Ok(exit) => handle_exit(self.index, exit, ctx),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Next::Continue,
                Err(e) => Next::Stop(self.fail(VcpuError::Run(e))),
            };
            match next {
                Next::Continue => {}
                Next::Stop(code) => {
                    ctx.exit.stop(code);
                    return stop(ctx);
                }
            }
            if let Some(err) = self.take_failure(ctx) {
                ctx.exit.stop(self.fail(err));
                return stop(ctx);
            }
            // The VM is stopping (this vCPU may have just asked for it through the i8042):
            // don't re-enter the guest, so that exiting never waits for a vCPU to be kicked
            // out of it.
            if ctx.exit.code().is_some() {
                return stop(ctx);
            }
            ctx.control.park_if_paused();
        }
    }

    /// A KVM_EXIT_IO: `count` accesses of `size` bytes each to one port (more than one for
    /// string I/O, `rep insb` and the like), each handed to the device on its own, in order.
    fn handle_pio(&mut self, ctx: &VcpuContext) -> Next {
        let run = self.fd.get_kvm_run();
        // SAFETY: the caller saw KVM_EXIT_IO, so `io` is the valid member of the union.
        let io = unsafe { run.__bindgen_anon_1.io };
        let size = usize::from(io.size);
        let len = size * io.count as usize;
        // SAFETY: for KVM_EXIT_IO the kernel puts the data `data_offset` bytes into the vCPU's
        // kvm_run mapping (its PIO page), `size * count` bytes of it, as kvm-ioctls' own
        // `run` reads it; the mapping lives as long as the vCPU fd, and nothing else refers to
        // those bytes while this slice lives.
        let data = unsafe {
            let base = (run as *mut kvm_bindings::kvm_run).cast::<u8>();
            std::slice::from_raw_parts_mut(base.add(io.data_offset as usize), len)
        };
        if size == 0 {
            return Next::Continue;
        }
        let port = io.port;
        if u32::from(io.direction) == kvm_bindings::KVM_EXIT_IO_IN {
            METRICS.vcpu.exit_io_in.inc();
            let mut handled = true;
            for access in data.chunks_mut(size) {
                if !ctx.pio.read(u64::from(port), access) {
                    access.fill(0xff);
                    handled = false;
                }
            }
            if !handled {
                METRICS.vcpu.unhandled_io.inc();
                log_guest!(
                    log::Level::Warn,
                    "Unhandled PIO read of {size} bytes at port {port:#x}"
                );
            }
        } else {
            METRICS.vcpu.exit_io_out.inc();
            if let Some(ring) = ctx.coalesced.as_ref().filter(|r| r.port() == port) {
                ring.wrote_while_inactive();
            }
            let mut handled = true;
            for access in data.chunks(size) {
                handled &= ctx.pio.write(u64::from(port), access);
            }
            if !handled {
                METRICS.vcpu.unhandled_io.inc();
                log_guest!(
                    log::Level::Warn,
                    "Unhandled PIO write of {size} bytes at port {port:#x}"
                );
            }
        }
        Next::Continue
    }

    /// Exits whose detail needs the vCPU fd (registers, kvm_run) are recognised here, after
    /// the borrow of the exit has ended.
    fn take_failure(&mut self, ctx: &VcpuContext) -> Option<VcpuError> {
        let run = self.fd.get_kvm_run();
        match run.exit_reason {
            kvm_bindings::KVM_EXIT_SHUTDOWN => {
                run.exit_reason = kvm_bindings::KVM_EXIT_UNKNOWN;
                let (rip, bytes) = self.instruction_at_rip(&ctx.memory);
                Some(VcpuError::TripleFault { rip, bytes })
            }
            kvm_bindings::KVM_EXIT_INTERNAL_ERROR => {
                // SAFETY: exit_reason says the `internal` member of the union is the valid one.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                // Mark it consumed so a later EINTR does not report it again.
                run.exit_reason = kvm_bindings::KVM_EXIT_UNKNOWN;
                let (rip, bytes) = self.instruction_at_rip(&ctx.memory);
                Some(VcpuError::EmulationFailure {
                    suberror,
                    rip,
                    bytes,
                })
            }
            _ => None,
        }
    }

    fn instruction_at_rip(&self, mem: &GuestMemoryMmap) -> (u64, Option<Vec<u8>>) {
        let Ok(regs) = self.fd.get_regs() else {
            return (0, None);
        };
        let bytes = self.fd.translate_gva(regs.rip).ok().and_then(|t| {
            if t.valid == 0 {
                return None;
            }
            // The longest x86 instruction is 15 bytes; take what lies in memory.
            (1..=15).rev().find_map(|n| {
                let mut b = vec![0u8; n];
                mem.read_slice(&mut b, GuestAddress(t.physical_address))
                    .ok()
                    .map(|_| b)
            })
        });
        (regs.rip, bytes)
    }

    fn fail(&self, err: VcpuError) -> i32 {
        METRICS.vcpu.failures.inc();
        log::error!("vCPU {} stopped the VM: {err}", self.index);
        exit_code::GENERIC_ERROR
    }
}

/// A stopped vCPU waits for the process to end rather than tearing down its KVM state: the
/// VMM thread is about to exit, and nothing here needs to be released first. It tells a pause
/// (one the VMM thread may be in already) not to wait for it.
fn stop(ctx: &VcpuContext) {
    ctx.control.stopped();
    park_forever()
}

fn park_forever() {
    loop {
        std::thread::park();
    }
}

fn handle_exit(index: u8, exit: VcpuExit, ctx: &VcpuContext) -> Next {
    match exit {
        // Handled by `Vcpu::handle_pio`, which reads the access width.
        VcpuExit::IoIn(..) | VcpuExit::IoOut(..) => Next::Continue,
        VcpuExit::MmioRead(addr, data) => {
            METRICS.vcpu.exit_mmio_read.inc();
            if !ctx.mmio.read(addr, data) {
                METRICS.vcpu.unhandled_mmio.inc();
                data.fill(0xff);
                log_guest!(
                    log::Level::Warn,
                    "Unhandled MMIO read of {} bytes at {addr:#x}",
                    data.len()
                );
            }
            Next::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            METRICS.vcpu.exit_mmio_write.inc();
            if !ctx.mmio.write(addr, data) {
                METRICS.vcpu.unhandled_mmio.inc();
                log_guest!(
                    log::Level::Warn,
                    "Unhandled MMIO write of {} bytes at {addr:#x}",
                    data.len()
                );
            }
            Next::Continue
        }
        // Reported by `take_failure`, which can read the registers.
        VcpuExit::Shutdown => Next::Continue,
        // A power-off or reboot the guest asked for ends the VM cleanly; any other event (a
        // guest crash report, a suspend ember does not offer) is a failure, as in Firecracker.
        VcpuExit::SystemEvent(kind, _)
            if kind == kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN
                || kind == kvm_bindings::KVM_SYSTEM_EVENT_RESET =>
        {
            log::info!("vCPU {index}: system event {kind}; stopping.");
            Next::Stop(exit_code::OK)
        }
        VcpuExit::SystemEvent(kind, _) => {
            METRICS.vcpu.failures.inc();
            log::error!("vCPU {index}: unexpected system event {kind}; stopping the VM.");
            Next::Stop(exit_code::GENERIC_ERROR)
        }
        VcpuExit::Hlt => {
            log::info!("vCPU {index} halted; stopping.");
            Next::Stop(exit_code::OK)
        }
        // Reported with registers and instruction bytes by the caller.
        VcpuExit::InternalError => Next::Continue,
        VcpuExit::FailEntry(reason, _cpu) => {
            METRICS.vcpu.failures.inc();
            log::error!(
                "vCPU {index} stopped the VM: {}",
                VcpuError::FailEntry(reason)
            );
            Next::Stop(exit_code::GENERIC_ERROR)
        }
        other => {
            METRICS.vcpu.failures.inc();
            log::error!(
                "vCPU {index} stopped the VM: {}",
                VcpuError::UnexpectedExit(format!("{other:?}"))
            );
            Next::Stop(exit_code::GENERIC_ERROR)
        }
    }
}

pub struct VcpuHandle {
    thread: JoinHandle<()>,
}

impl VcpuHandle {
    fn kick(&self) {
        // SAFETY: the thread is alive (we hold its JoinHandle and vCPU threads only end when
        // the process does or after setting the exit code); pthread_kill with a handled
        // signal has no other effect than interrupting KVM_RUN.
        unsafe { libc::pthread_kill(self.thread.as_pthread_t(), kick_signal()) };
    }
}

/// Stops every vCPU at its next exit (kicking each out of the guest) and waits until all are
/// parked, or have stopped for good (a vCPU that stopped the VM never parks).
pub fn pause_all(control: &VcpuControl, handles: &[VcpuHandle]) {
    control.paused.store(true, Ordering::Release);
    let mut counts = control.counts();
    while counts.parked + counts.stopped < handles.len() {
        // A kick that lands just before KVM_RUN is lost, so keep kicking until all report.
        for h in handles.iter().filter(|h| !h.thread.is_finished()) {
            h.kick();
        }
        let (c, _) = control
            .cv
            .wait_timeout(counts, Duration::from_millis(1))
            .unwrap_or_else(|e| e.into_inner());
        counts = c;
        if handles.iter().any(|h| h.thread.is_finished()) {
            break;
        }
    }
}

pub fn resume_all(control: &VcpuControl) {
    let _guard = control.counts();
    control.paused.store(false, Ordering::Release);
    control.cv.notify_all();
}

/// Counts parked vCPUs (for tests and `GET /`).
pub fn parked_count(control: &VcpuControl) -> usize {
    control.counts().parked
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::machine::HugePages;
    use crate::vstate::vm::Vm;
    use kvm_ioctls::Kvm;

    /// A VM without an in-kernel irqchip (so `hlt` exits to user space) whose first page of
    /// RAM holds `code`, and `n` vCPUs in real mode at `entries[i]`.
    fn real_mode_vm(code: &[u8], entries: &[u64]) -> (Vm, GuestMemoryMmap, Vec<Vcpu>) {
        let kvm = Kvm::new().expect("this test needs /dev/kvm; it is not optional");
        let vm = Vm::with_memory(kvm.create_vm().unwrap(), 0x1000, HugePages::None).unwrap();
        let mem = vm.memory().clone();
        mem.write_slice(code, GuestAddress(0)).unwrap();
        let vcpus = entries
            .iter()
            .enumerate()
            .map(|(i, &rip)| {
                let fd = vm.fd().create_vcpu(i as u64).unwrap();
                let mut sregs = fd.get_sregs().unwrap();
                sregs.cs.base = 0;
                sregs.cs.selector = 0;
                fd.set_sregs(&sregs).unwrap();
                let mut regs = fd.get_regs().unwrap();
                regs.rip = rip;
                regs.rflags = 2;
                fd.set_regs(&regs).unwrap();
                Vcpu { index: i as u8, fd }
            })
            .collect();
        (vm, mem, vcpus)
    }

    fn context(mem: GuestMemoryMmap, pio: Bus) -> Arc<VcpuContext> {
        Arc::new(VcpuContext {
            pio: Arc::new(pio),
            mmio: Arc::new(Bus::new()),
            memory: mem,
            exit: Arc::new(ExitSignal::new().unwrap()),
            control: Arc::new(VcpuControl::default()),
            coalesced: None,
        })
    }

    fn spawn(vcpu: Vcpu, ctx: &Arc<VcpuContext>) -> VcpuHandle {
        let ctx = ctx.clone();
        VcpuHandle {
            thread: std::thread::spawn(move || vcpu.run(&ctx)),
        }
    }

    /// The exit code a vCPU stopped the VM with; fails if none did within 10 s.
    fn wait_stopped(ctx: &VcpuContext) -> i32 {
        let t = std::time::Instant::now();
        loop {
            if let Some(code) = ctx.exit.code() {
                return code;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the vCPU never halted"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Runs `f` on another thread; fails if it does not return within `secs`.
    fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(secs))
            .expect("still waiting: hung")
    }

    /// A pause that comes while (or after) a vCPU stopped the VM, here by halting, must not
    /// wait forever for that vCPU to park: it never will.
    #[test]
    fn pause_returns_when_a_vcpu_has_stopped_the_vm() {
        register_kick_handler().unwrap();
        // 0: hlt; 1: jmp $ (spins in the guest until kicked).
        let (_vm, mem, vcpus) = real_mode_vm(&[0xf4, 0xeb, 0xfe], &[0, 1]);
        let ctx = context(mem, Bus::new());
        let handles: Vec<VcpuHandle> = vcpus.into_iter().map(|v| spawn(v, &ctx)).collect();
        assert_eq!(wait_stopped(&ctx), exit_code::OK);
        let c = ctx.clone();
        let handles = within(10, move || {
            pause_all(&c.control, &handles);
            handles
        });
        // The spinning vCPU, kicked out of the guest, saw the VM stopping and stopped too.
        assert_eq!(ctx.control.counts().stopped, 2);
        assert_eq!(parked_count(&ctx.control), 0);
        resume_all(&ctx.control);
        drop(handles);
    }

    #[test]
    fn only_power_off_and_reboot_events_end_the_vm_cleanly() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let ctx = context(mem, Bus::new());
        let next = |kind| handle_exit(0, VcpuExit::SystemEvent(kind, &[]), &ctx);
        assert!(matches!(
            next(kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN),
            Next::Stop(exit_code::OK)
        ));
        assert!(matches!(
            next(kvm_bindings::KVM_SYSTEM_EVENT_RESET),
            Next::Stop(exit_code::OK)
        ));
        assert!(matches!(
            next(kvm_bindings::KVM_SYSTEM_EVENT_CRASH),
            Next::Stop(exit_code::GENERIC_ERROR)
        ));
        assert!(matches!(next(99), Next::Stop(exit_code::GENERIC_ERROR)));
    }

    /// A register that answers each read with the next number, and remembers the sizes.
    #[derive(Default)]
    struct Counter {
        next: u8,
        reads: Vec<usize>,
    }

    impl crate::devices::BusDevice for Counter {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            self.next += 1;
            data.fill(self.next);
            self.reads.push(data.len());
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {}
    }

    /// String port I/O (`rep insb`, `rep insw`) exits with a count of several accesses at
    /// once; each is one access of the instruction's width to the device.
    #[test]
    fn string_port_input_is_one_device_access_per_element() {
        #[rustfmt::skip]
        let code = [
            0xba, 0xf8, 0x03, // mov dx, 0x3f8
            0xb9, 0x04, 0x00, // mov cx, 4
            0xbf, 0x00, 0x01, // mov di, 0x100
            0xf3, 0x6c,       // rep insb
            0xb9, 0x03, 0x00, // mov cx, 3
            0xf3, 0x6d,       // rep insw
            0xb9, 0x20, 0x00, // mov cx, 32
            0xba, 0x00, 0x05, // mov dx, 0x500 (nothing there)
            0xf3, 0x6c,       // rep insb
            0xf4,             // hlt
        ];
        let (_vm, mem, mut vcpus) = real_mode_vm(&code, &[0]);
        let dev = Arc::new(Mutex::new(Counter::default()));
        let mut pio = Bus::new();
        pio.insert(dev.clone(), 0x3f8, 8).unwrap();
        let ctx = context(mem, pio);
        let vcpu = vcpus.remove(0);
        let c = ctx.clone();
        let _handle = spawn(vcpu, &c);
        assert_eq!(wait_stopped(&ctx), exit_code::OK);
        let mut got = [0u8; 10 + 32];
        ctx.memory
            .read_slice(&mut got, GuestAddress(0x100))
            .unwrap();
        assert_eq!(&got[..10], &[1, 2, 3, 4, 5, 5, 6, 6, 7, 7]);
        // Reads where no device is read all ones, however many.
        assert!(got[10..].iter().all(|&b| b == 0xff), "{got:x?}");
        assert_eq!(dev.lock().unwrap().reads, [1, 1, 1, 1, 2, 2, 2]);
    }
}
