//! The VMM thread's state machine: the configuration accumulated before start, the running
//! microVM after it, and the answers to API requests. It is the event-loop subscriber for the
//! API's wake-up eventfd and for the guest console's input.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde_json::json;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::api::{ApiResponse, SerialConfig, VmmAction};
use crate::builder::{build_microvm, BootImages, KvmPrep, Microvm, StartError};
use crate::config::{OpenedFiles, VmConfig};
use crate::devices::bus::lock;
use crate::devices::legacy::serial::{ConsoleSink, SerialOut};
use crate::devices::rate_limiter::{now_ns, TokenBucket};
use crate::metrics::METRICS;
use crate::seccomp::Filters;
use crate::time::Timestamp;
use crate::vmm::SerialInput;
use crate::vstate::vcpu::{self, ExitSignal};

/// The API version ember implements; Firecracker clients check it to pick features.
pub const FIRECRACKER_API_VERSION: &str = "1.16.1";

const NOT_BEFORE_START: &str =
    "The requested operation is not supported before starting the microVM.";
const NOT_AFTER_START: &str =
    "The requested operation is not supported after starting the microVM.";

/// The API's end of the VMM thread.
pub struct ApiLink {
    pub evt: EventFd,
    pub requests: Receiver<VmmAction>,
    pub responses: Sender<ApiResponse>,
}

pub struct Controller {
    instance_id: String,
    config: VmConfig,
    /// The files the configuration names, opened when it was given.
    files: OpenedFiles,
    serial_config: SerialConfig,
    vm: Option<Microvm>,
    paused: bool,
    exit: Arc<ExitSignal>,
    api: Option<ApiLink>,
    serial_input: Option<SerialInput>,
    seccomp: Filters,
    /// Drains coalesced console writes of a guest that stopped exiting; armed only while
    /// output flows (see `vstate::coalesced`).
    drain_timer: Option<TimerFd>,
    /// The ring's drained-entries count at the last tick of `drain_timer`.
    drained_at_tick: u64,
    /// Ticks in a row that found no new console output.
    quiet_ticks: u32,
    /// Flushes the metrics every minute.
    metrics_timer: Option<TimerFd>,
    /// KVM state made ahead of an API start.
    prep: Option<KvmPrep>,
}

const METRICS_PERIOD: Duration = Duration::from_secs(60);

/// How long console output of a busy guest may sit in the coalesced ring.
const DRAIN_PERIOD: Duration = Duration::from_millis(10);
/// Drain ticks without new output before ember stops coalescing: a guest printing every tick
/// or so should not flip it on and off.
const QUIET_TICKS: u32 = 3;

impl Controller {
    pub fn new(
        instance_id: &str,
        config: VmConfig,
        exit: Arc<ExitSignal>,
        seccomp: Filters,
    ) -> Controller {
        Controller {
            instance_id: instance_id.to_string(),
            config,
            files: OpenedFiles::default(),
            serial_config: SerialConfig::default(),
            vm: None,
            paused: false,
            exit,
            api: None,
            serial_input: None,
            seccomp,
            drain_timer: None,
            drained_at_tick: 0,
            quiet_ticks: 0,
            metrics_timer: TimerFd::new()
                .and_then(|mut t| t.reset(METRICS_PERIOD, Some(METRICS_PERIOD)).map(|_| t))
                .map_err(|e| log::warn!("no periodic metrics flush: {e}"))
                .ok(),
            prep: None,
        }
    }

    pub fn with_api(mut self, api: ApiLink) -> Controller {
        self.api = Some(api);
        self
    }

    pub fn microvm(&self) -> Option<&Microvm> {
        self.vm.as_ref()
    }

    /// Makes the configuration-independent KVM state now, while waiting for the API; a
    /// failure is left for `InstanceStart` to report.
    pub fn prepare_kvm(&mut self) {
        let vcpus = self.config.machine_config.vcpu_count;
        match KvmPrep::new(vcpus, &self.seccomp, &self.exit) {
            Ok(p) => self.prep = Some(p),
            Err(e) => log::debug!("no KVM state made ahead of the start: {e}"),
        }
    }

    /// The fd of the KVM VM this process holds, started or not.
    pub fn kvm_vm_fd(&self) -> Option<std::os::fd::RawFd> {
        match (&self.vm, &self.prep) {
            (Some(vm), _) => Some(vm.vm.fd().as_raw_fd()),
            (None, Some(p)) => Some(p.vm_fd()),
            _ => None,
        }
    }

    /// Builds and starts the microVM from the current configuration. `start` is the moment
    /// the boot timer counts from.
    pub fn start(&mut self, images: BootImages, start: Timestamp) -> Result<(), StartError> {
        let console = ConsoleSink {
            out: self.serial_out()?,
            // The console's bucket starts full when the VM is built.
            limiter: self
                .serial_config
                .rate_limiter
                .as_ref()
                .and_then(|b| TokenBucket::new(b, now_ns())),
        };
        let vm = build_microvm(
            &self.config,
            images,
            start,
            console,
            self.exit.clone(),
            &self.seccomp,
            self.prep.take(),
        )?;
        let ready = vm
            .serial_buffer_ready
            .try_clone()
            .map_err(|e| StartError::Device(e.to_string()))?;
        self.serial_input = Some(SerialInput::new(vm.serial.clone(), ready));
        if vm.vcpu_ctx.coalesced.is_some() {
            let mut t = TimerFd::new().map_err(|e| StartError::Device(e.to_string()))?;
            t.reset(DRAIN_PERIOD, None)
                .map_err(|e| StartError::Device(e.to_string()))?;
            self.drain_timer = Some(t);
        }
        self.vm = Some(vm);
        METRICS.latencies_us.vmm_start_us.store(start.elapsed_us());
        log::info!("Successfully started microvm");
        Ok(())
    }

    fn serial_out(&self) -> Result<SerialOut, StartError> {
        let err = |what: String| StartError::Device(what);
        match &self.serial_config.serial_out_path {
            Some(p) => open_serial_out(p)
                .map(|f| Box::new(f) as SerialOut)
                .map_err(|e| err(format!("cannot open the serial output {p:?}: {e}"))),
            None => crate::stdio::stdout_writer()
                .map_err(|e| err(format!("cannot use stdout for the serial console: {e}"))),
        }
    }

    fn state(&self) -> &'static str {
        match (&self.vm, self.paused) {
            (None, _) => "Not started",
            (Some(_), false) => "Running",
            (Some(_), true) => "Paused",
        }
    }

    /// The configuration as `GET /vm/config` shows it: the config file's keys, as Firecracker
    /// fills them: `cpu-config`, `logger` and `metrics` are always null (the config file's
    /// `cpu-config` is a path, which the API never had), and `boot-source` is always an object
    /// with `kernel_image_path` and `initrd_path`, empty and null before it is set.
    fn vm_config_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.config).unwrap_or_else(|_| json!({}));
        if let Some(map) = v.as_object_mut() {
            for k in ["cpu-config", "logger", "metrics"] {
                map.insert(k.into(), json!(null));
            }
            let boot = map
                .entry("boot-source")
                .or_insert_with(|| json!({"kernel_image_path": ""}));
            if let Some(boot) = boot.as_object_mut() {
                boot.entry("initrd_path").or_insert(json!(null));
            }
            for (k, empty) in [
                ("drives", json!([])),
                ("network-interfaces", json!([])),
                ("vsock", json!(null)),
                ("balloon", json!(null)),
                ("mmds-config", json!(null)),
                ("entropy", json!(null)),
            ] {
                map.entry(k).or_insert(empty);
            }
        }
        v
    }

    fn before_start(&self) -> Result<(), ApiResponse> {
        match self.vm {
            None => Ok(()),
            Some(_) => Err(ApiResponse::bad_request(NOT_AFTER_START)),
        }
    }

    fn after_start(&self) -> Result<&Microvm, ApiResponse> {
        self.vm
            .as_ref()
            .ok_or_else(|| ApiResponse::bad_request(NOT_BEFORE_START))
    }

    /// Performs one API action.
    pub fn handle(&mut self, action: VmmAction) -> ApiResponse {
        match self.try_handle(action) {
            Ok(r) | Err(r) => r,
        }
    }

    fn try_handle(&mut self, action: VmmAction) -> Result<ApiResponse, ApiResponse> {
        use VmmAction::*;
        let bad = |e: &dyn std::fmt::Display| ApiResponse::bad_request(e.to_string());
        Ok(match action {
            GetInstanceInfo => ApiResponse::json(&json!({
                "id": self.instance_id,
                "state": self.state(),
                "vmm_version": FIRECRACKER_API_VERSION,
                "app_name": "Firecracker",
            })),
            GetVersion => ApiResponse::json(&json!({
                "firecracker_version": FIRECRACKER_API_VERSION,
            })),
            GetVmConfig => ApiResponse::json(&self.vm_config_json()),
            GetMachineConfig => ApiResponse::json(&self.config.machine_config),
            GetBalloon | GetBalloonStats => ApiResponse::not_supported("The balloon device"),
            GetMmds => ApiResponse::not_supported("The metadata service (MMDS)"),
            PutMachineConfig(m) => {
                self.before_start()?;
                m.validate().map_err(|e| bad(&e))?;
                self.config.machine_config = m;
                ApiResponse::NoContent
            }
            PatchMachineConfig(u) => {
                self.before_start()?;
                let m = self.config.machine_config.apply(&u);
                m.validate().map_err(|e| bad(&e))?;
                self.config.machine_config = m;
                ApiResponse::NoContent
            }
            PutCpuConfig(c) => {
                self.before_start()?;
                c.to_modifiers().map_err(|e| bad(&e))?;
                self.config.cpu_config = Some(c);
                ApiResponse::NoContent
            }
            PutBootSource(b) => {
                self.before_start()?;
                self.files.boot = Some(b.open().map_err(|e| bad(&e))?);
                self.config.boot_source = Some(b);
                ApiResponse::NoContent
            }
            PutLogger(l) => {
                self.before_start()?;
                crate::logger::configure(&l).map_err(|e| bad(&e))?;
                self.config.logger = Some(l);
                ApiResponse::NoContent
            }
            PutMetrics(m) => {
                self.before_start()?;
                crate::metrics::init(&m.metrics_path).map_err(|e| bad(&e))?;
                self.config.metrics = Some(m);
                ApiResponse::NoContent
            }
            PutSerial(s) => {
                self.before_start()?;
                self.serial_config = s;
                ApiResponse::NoContent
            }
            PutDrive(d) => {
                self.before_start()?;
                let id = d.drive_id.clone();
                let file = self.config.add_drive(d).map_err(|e| bad(&e))?;
                self.files.drives.insert(id, file);
                ApiResponse::NoContent
            }
            PatchDrive(u) => {
                let vm = self.after_start()?;
                let Some(cfg) = self.config.drives.iter().find(|d| d.drive_id == u.drive_id) else {
                    return Err(ApiResponse::bad_request(format!(
                        "Invalid block device ID: {}",
                        u.drive_id
                    )));
                };
                if let Some(path) = &u.path_on_host {
                    let mut new = cfg.clone();
                    new.path_on_host = Some(path.clone());
                    // Opened as the drive's mode wants: read-only for a read-only drive; a
                    // regular file or a block device.
                    let file = new.open().map_err(|e| bad(&e))?;
                    let Some((_, transport)) =
                        vm.block_devices.iter().find(|(id, _)| *id == u.drive_id)
                    else {
                        return Err(ApiResponse::bad_request(format!(
                            "Invalid block device ID: {}",
                            u.drive_id
                        )));
                    };
                    lock(transport).swap_backing_file(file).map_err(|e| {
                        ApiResponse::bad_request(format!("Unable to patch the block device: {e}"))
                    })?;
                    if let Some(d) = self
                        .config
                        .drives
                        .iter_mut()
                        .find(|d| d.drive_id == u.drive_id)
                    {
                        d.path_on_host = Some(path.clone());
                    }
                }
                if let Some(rl) = &u.rate_limiter {
                    let vm = self.after_start()?;
                    let Some((_, transport)) =
                        vm.block_devices.iter().find(|(id, _)| *id == u.drive_id)
                    else {
                        return Err(ApiResponse::bad_request(format!(
                            "Invalid block device ID: {}",
                            u.drive_id
                        )));
                    };
                    lock(transport)
                        .update_rate_limiters(Some(rl), None)
                        .map_err(|e| {
                            ApiResponse::bad_request(format!(
                                "Unable to patch the block device: {e}"
                            ))
                        })?;
                    if let Some(d) = self
                        .config
                        .drives
                        .iter_mut()
                        .find(|d| d.drive_id == u.drive_id)
                    {
                        d.rate_limiter = Some(merge_rate_limiter(d.rate_limiter, rl));
                    }
                }
                ApiResponse::NoContent
            }
            PatchNetworkInterface(u) => {
                let vm = self.after_start()?;
                let Some((_, transport)) = vm.net_devices.iter().find(|(id, _)| *id == u.iface_id)
                else {
                    return Err(ApiResponse::bad_request(format!(
                        "Invalid network interface ID: {}",
                        u.iface_id
                    )));
                };
                lock(transport)
                    .update_rate_limiters(u.rx_rate_limiter.as_ref(), u.tx_rate_limiter.as_ref())
                    .map_err(|e| {
                        ApiResponse::bad_request(format!(
                            "Unable to patch the network interface: {e}"
                        ))
                    })?;
                if let Some(n) = self
                    .config
                    .network_interfaces
                    .iter_mut()
                    .find(|n| n.iface_id == u.iface_id)
                {
                    if let Some(rl) = &u.rx_rate_limiter {
                        n.rx_rate_limiter = Some(merge_rate_limiter(n.rx_rate_limiter, rl));
                    }
                    if let Some(rl) = &u.tx_rate_limiter {
                        n.tx_rate_limiter = Some(merge_rate_limiter(n.tx_rate_limiter, rl));
                    }
                }
                ApiResponse::NoContent
            }
            PutNetworkInterface(n) => {
                self.before_start()?;
                self.config.add_network_interface(n).map_err(|e| bad(&e))?;
                ApiResponse::NoContent
            }
            PutVsock(v) => {
                self.before_start()?;
                v.validate().map_err(|e| bad(&e))?;
                self.config.vsock = Some(v);
                ApiResponse::NoContent
            }
            PutEntropy(e) => {
                self.before_start()?;
                e.validate().map_err(|e| bad(&e))?;
                self.config.entropy = Some(e);
                ApiResponse::NoContent
            }
            InstanceStart => {
                self.before_start()?;
                let start = Timestamp::now();
                let files = std::mem::take(&mut self.files);
                let Some(boot) = &files.boot else {
                    self.files = files;
                    return Err(ApiResponse::bad_request(
                        "Cannot start the microVM without a boot source: PUT /boot-source first.",
                    ));
                };
                let started = self.start(BootImages::Files(boot, &files.drives), start);
                // Kept for another try if the start failed; the devices have their own copies.
                if started.is_err() {
                    self.files = files;
                }
                started.map_err(|e| {
                    ApiResponse::bad_request(format!("Cannot start the microVM: {e}"))
                })?;
                ApiResponse::NoContent
            }
            SendCtrlAltDel => {
                let vm = self.after_start()?;
                lock(&vm.i8042)
                    .trigger_ctrl_alt_del()
                    .map_err(|e| bad(&e))?;
                ApiResponse::NoContent
            }
            FlushMetrics => {
                // As in Firecracker: refused before the start; after it, a flush without a
                // metrics file configured writes nothing and still succeeds.
                self.after_start()?;
                crate::metrics::flush();
                ApiResponse::NoContent
            }
            Pause => {
                let vm = self.after_start()?;
                let t = Timestamp::now();
                vcpu::pause_all(&vm.control, &vm.vcpus);
                self.paused = true;
                METRICS.latencies_us.pause_vm.store(t.elapsed_us());
                ApiResponse::NoContent
            }
            Resume => {
                let vm = self.after_start()?;
                let t = Timestamp::now();
                vcpu::resume_all(&vm.control);
                self.paused = false;
                METRICS.latencies_us.resume_vm.store(t.elapsed_us());
                ApiResponse::NoContent
            }
            NotSupported(feature) => ApiResponse::not_supported(feature),
        })
    }

    fn serve_api(&mut self) {
        let Some(api) = &self.api else { return };
        let _ = api.evt.read();
        loop {
            let Some(api) = &self.api else { return };
            let Ok(action) = api.requests.try_recv() else {
                return;
            };
            log::debug!("API request: {action:?}");
            let response = self.handle(action);
            if let Some(api) = &self.api {
                crate::api::server::response_sent();
                if api.responses.send(response).is_err() {
                    crate::api::server::response_not_sent();
                    log::warn!("The API thread is gone; serving no more requests.");
                    self.api = None;
                    return;
                }
            }
        }
    }
}

impl MutEventSubscriber for Controller {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        METRICS.vmm.device_events.inc();
        let api_fd = self.api.as_ref().map(|a| a.evt.as_raw_fd());
        let metrics_fd = self.metrics_timer.as_ref().map(|t| t.as_raw_fd());
        if Some(events.fd()) == metrics_fd {
            if let Some(t) = self.metrics_timer.as_mut() {
                let _ = t.wait();
            }
            crate::metrics::flush();
            return;
        }
        let timer_fd = self.drain_timer.as_ref().map(|t| t.as_raw_fd());
        if Some(events.fd()) == timer_fd {
            if let Some(t) = self.drain_timer.as_mut() {
                let _ = t.wait();
            }
            self.console_tick();
            return;
        }
        let wake_fd = self.vm.as_ref().and_then(|vm| {
            let ring = vm.vcpu_ctx.coalesced.as_ref()?;
            Some(ring.wake.as_raw_fd())
        });
        if Some(events.fd()) == wake_fd {
            self.console_wake();
            return;
        }
        if Some(events.fd()) == api_fd {
            let had_vm = self.vm.is_some();
            self.serve_api();
            // A start through the API brings a console and its drain timer to watch.
            if !had_vm && self.vm.is_some() {
                self.watch_vm(ops);
            }
            return;
        }
        if let Some(vm) = self.vm.as_mut() {
            if let Some(n) = vm
                .queue_notifiers
                .iter_mut()
                .find(|n| n.fd() == events.fd())
            {
                n.process(events, ops);
                return;
            }
            if let Some(w) = vm.tap_watchers.iter_mut().find(|w| w.fd() == events.fd()) {
                w.process(events, ops);
                return;
            }
        }
        if let Some(input) = self.serial_input.as_mut() {
            input.process(events, ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Some(t) = &self.metrics_timer {
            if let Err(e) = ops.add(Events::new(t, EventSet::IN)) {
                log::error!("cannot watch the metrics timer: {e:?}");
            }
        }
        if let Some(api) = &self.api {
            if let Err(e) = ops.add(Events::new(&api.evt, EventSet::IN)) {
                log::error!("cannot watch the API event: {e:?}");
            }
        }
        self.watch_vm(ops);
    }
}

/// The configuration after a `PATCH` of a rate limiter: each bucket in `patch` replaces the
/// old one, the others stay.
fn merge_rate_limiter(
    old: Option<crate::api::models::RateLimiter>,
    patch: &crate::api::models::RateLimiter,
) -> crate::api::models::RateLimiter {
    let old = old.unwrap_or_default();
    crate::api::models::RateLimiter {
        bandwidth: patch.bandwidth.or(old.bandwidth),
        ops: patch.ops.or(old.ops),
    }
}

impl Controller {
    /// The drain timer fired: hand queued console writes to the serial device, and keep
    /// ticking while they keep coming. After `QUIET_TICKS` ticks without any, stop coalescing
    /// instead, so that a quiet guest wakes this thread no more.
    fn console_tick(&mut self) {
        let Some(vm) = &self.vm else { return };
        let Some(ring) = vm.vcpu_ctx.coalesced.as_ref() else {
            return;
        };
        vm.vcpu_ctx.drain_coalesced();
        let drained = ring.drained();
        if drained == self.drained_at_tick {
            self.quiet_ticks += 1;
        } else {
            self.quiet_ticks = 0;
        }
        self.drained_at_tick = drained;
        let mut again = self.quiet_ticks < QUIET_TICKS;
        if !again && ring.is_active() {
            match ring.set_active(vm.vm.fd(), false) {
                // Writes queued before KVM stopped queueing.
                Ok(()) => vm.vcpu_ctx.drain_coalesced(),
                Err(e) => {
                    log::debug!("cannot stop coalescing console writes: {e}");
                    again = true;
                }
            }
        }
        lock(&vm.serial).flush_output();
        if again {
            self.arm_drain_timer();
        }
    }

    /// A vCPU wrote the console while it was not coalesced: coalesce again, and tick.
    fn console_wake(&mut self) {
        let Some(vm) = &self.vm else { return };
        let Some(ring) = vm.vcpu_ctx.coalesced.as_ref() else {
            return;
        };
        let _ = ring.wake.read();
        if !ring.is_active() {
            if let Err(e) = ring.set_active(vm.vm.fd(), true) {
                log::debug!("cannot coalesce console writes again: {e}");
                return;
            }
        }
        self.drained_at_tick = ring.drained();
        self.quiet_ticks = 0;
        self.arm_drain_timer();
    }

    fn arm_drain_timer(&mut self) {
        if let Some(t) = self.drain_timer.as_mut() {
            if let Err(e) = t.reset(DRAIN_PERIOD, None) {
                log::error!("cannot arm the console drain timer: {e}");
            }
        }
    }

    fn watch_vm(&mut self, ops: &mut EventOps) {
        if let Some(input) = self.serial_input.as_mut() {
            input.init(ops);
        }
        if let Some(t) = &self.drain_timer {
            if let Err(e) = ops.add(Events::new(t, EventSet::IN)) {
                log::error!("cannot watch the console drain timer: {e:?}");
            }
        }
        if let Some(ring) = self
            .vm
            .as_ref()
            .and_then(|vm| vm.vcpu_ctx.coalesced.as_ref())
        {
            if let Err(e) = ops.add(Events::new(&ring.wake, EventSet::IN)) {
                log::error!("cannot watch the console wake-up: {e:?}");
            }
        }
        if let Some(vm) = self.vm.as_mut() {
            for n in vm.queue_notifiers.iter_mut() {
                n.init(ops);
            }
            for w in vm.tap_watchers.iter_mut() {
                w.init(ops);
            }
        }
    }
}

/// The serial output file. A named pipe with no reader yet would hold open(2), and the start
/// with it, until one came: it is opened non-blocking, and read-write when it has no reader
/// (so the console's bytes wait in the pipe for one). A pipe stays non-blocking, as
/// Firecracker keeps it: once it is full (nobody reads, or the reader left; ember holds a read
/// end itself, so there is no EPIPE) the console's lines are dropped and counted in
/// `uart.missed_write_count`, where a blocking write would stop the vCPU, and the VMM thread
/// that flushes the console. Anything else (a file, a terminal) gets blocking writes.
fn open_serial_out(path: &str) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = |read: bool| {
        std::fs::OpenOptions::new()
            .read(read)
            .append(true)
            .create(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
    };
    let f = match open(false) {
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => open(true)?,
        r => r?,
    };
    if !std::os::unix::fs::FileTypeExt::is_fifo(&f.metadata()?.file_type()) {
        crate::config::set_blocking(&f)?;
    }
    Ok(f)
}
