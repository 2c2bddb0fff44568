//! The virtio-mmio transport, version 2 registers, one 4 KiB window per device.

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{
    DeviceError, QueueHandler, VirtioDevice, QUEUE_MAX_SIZE, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::devices::bus::BusDevice;
use crate::devices::legacy::EventFdTrigger;
use crate::metrics::METRICS;

pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
pub const MAGIC_VALUE: u32 = 0x7472_6976;

pub const REG_MAGIC: u64 = 0x00;
pub const REG_VERSION: u64 = 0x04;
pub const REG_DEVICE_ID: u64 = 0x08;
pub const REG_VENDOR_ID: u64 = 0x0c;
pub const REG_DEVICE_FEATURES: u64 = 0x10;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x14;
pub const REG_DRIVER_FEATURES: u64 = 0x20;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x24;
pub const REG_QUEUE_SEL: u64 = 0x30;
pub const REG_QUEUE_NUM_MAX: u64 = 0x34;
pub const REG_QUEUE_NUM: u64 = 0x38;
pub const REG_QUEUE_READY: u64 = 0x44;
pub const REG_QUEUE_NOTIFY: u64 = 0x50;
pub const REG_INTERRUPT_STATUS: u64 = 0x60;
pub const REG_INTERRUPT_ACK: u64 = 0x64;
pub const REG_STATUS: u64 = 0x70;
pub const REG_QUEUE_DESC_LOW: u64 = 0x80;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x84;
pub const REG_QUEUE_AVAIL_LOW: u64 = 0x90;
pub const REG_QUEUE_AVAIL_HIGH: u64 = 0x94;
pub const REG_QUEUE_USED_LOW: u64 = 0xa0;
pub const REG_QUEUE_USED_HIGH: u64 = 0xa4;
pub const REG_CONFIG_GENERATION: u64 = 0xfc;
pub const CONFIG_SPACE: u64 = 0x100;

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 64;
pub const STATUS_FAILED: u32 = 128;

pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// One device behind its virtio-mmio window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: EventFdTrigger,
    queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    /// Written when a pass ran out of budget (see [`super::PASS_BUDGET`]); the VMM thread
    /// then calls `notified(RESUME_EVENT)`.
    resume_evt: Option<EventFd>,
    /// The passes that ran out of budget, to run again on `RESUME_EVENT`.
    deferred: Deferred,
}

/// Passes to run again: queues by bit, the backend's and the throttle timer's.
#[derive(Clone, Copy, Default)]
struct Deferred {
    queues: u64,
    backend: bool,
    throttled: bool,
}

/// Which device entry point a pass runs.
#[derive(Clone, Copy)]
enum Pass {
    Queue(usize),
    Backend,
    Throttled,
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irq: EventFdTrigger) -> Self {
        // QUEUE_MAX_SIZE is a power of two: this cannot fail.
        let queues = (0..device.queue_count().max(1))
            .map(|_| Queue::new(QUEUE_MAX_SIZE).unwrap_or_else(|_| unreachable!()))
            .collect();
        MmioTransport {
            device,
            mem,
            irq,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            resume_evt: None,
            deferred: Deferred::default(),
        }
    }

    /// The eventfd to write when a pass must be run again; the VMM thread watches it and
    /// calls `notified(RESUME_EVENT)`.
    pub fn with_resume_event(mut self, evt: EventFd) -> Self {
        self.resume_evt = Some(evt);
        self
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    fn reset(&mut self) {
        for q in self.queues.iter_mut() {
            q.reset();
        }
        self.device.reset();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.deferred = Deferred::default();
    }

    fn raise(&mut self, bit: u32) {
        self.interrupt_status |= bit;
        if let Err(e) = self.irq.0.write(1) {
            log::warn!("virtio: cannot raise an interrupt: {e}");
        }
    }

    /// Gives the device a new backing file, then tells the driver its configuration changed:
    /// ConfigGeneration moves and the configuration-change interrupt is raised.
    pub fn swap_backing_file(&mut self, file: std::fs::File) -> Result<(), String> {
        self.device.swap_backing_file(file)?;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.raise(INT_CONFIG);
        Ok(())
    }

    pub fn config_generation(&self) -> u32 {
        self.config_generation
    }

    /// The device cannot go on until the driver resets it.
    fn needs_reset(&mut self, why: &str) {
        crate::log_guest!(
            log::Level::Warn,
            "virtio device {}: {why}; it needs a reset",
            self.device.device_type()
        );
        METRICS.virtio.needs_reset.inc();
        if self.status & STATUS_NEEDS_RESET == 0 {
            self.status |= STATUS_NEEDS_RESET;
            if self.status & STATUS_DRIVER_OK != 0 {
                self.raise(INT_CONFIG);
            }
        }
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK.
    fn queue_setup_allowed(&self) -> bool {
        self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED | STATUS_NEEDS_RESET)
            == STATUS_FEATURES_OK
            && (self.queue_sel as usize) < self.queues.len()
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // Bits are only ever added; clearing one other than by a reset is a driver bug.
        if v & old != old {
            METRICS.virtio.invalid_register_writes.inc();
            return;
        }
        let new = v & !old;
        if new & STATUS_FAILED != 0 {
            self.status |= STATUS_FAILED;
            return;
        }
        let ok = match new & !STATUS_NEEDS_RESET {
            STATUS_ACKNOWLEDGE => old == 0,
            STATUS_DRIVER => old == STATUS_ACKNOWLEDGE,
            STATUS_FEATURES_OK => {
                old == STATUS_ACKNOWLEDGE | STATUS_DRIVER && self.features_acceptable()
            }
            STATUS_DRIVER_OK => old & STATUS_FEATURES_OK != 0 && old & STATUS_DRIVER_OK == 0,
            0 => true,
            _ => false,
        };
        if !ok {
            // A refused FEATURES_OK simply stays clear, as the spec wants; anything else out
            // of order is counted.
            if new != STATUS_FEATURES_OK {
                METRICS.virtio.invalid_register_writes.inc();
            }
            return;
        }
        self.status |= new & !STATUS_NEEDS_RESET;
        if new & STATUS_FEATURES_OK != 0 {
            self.device.ack_features(self.driver_features);
        }
        if new & STATUS_DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.avail_features();
        self.driver_features & !offered == 0 && self.driver_features & VIRTIO_F_VERSION_1 != 0
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        for q in self.queues.iter_mut() {
            q.set_event_idx(event_idx);
        }
        if !self.queues.iter().all(|q| q.ready()) {
            self.needs_reset("DRIVER_OK without a ready queue");
        } else if !self.queues.iter().all(|q| q.is_valid(&self.mem)) {
            self.needs_reset("its queue lies outside guest memory");
        }
    }

    /// Processes queue `index` if the device is live.
    pub fn process(&mut self, index: u32) {
        let i = index as usize;
        if i >= self.queues.len() || !self.live() {
            METRICS.virtio.invalid_notifications.inc();
            return;
        }
        self.run_pass(Pass::Queue(i));
    }

    /// Runs one pass of the device within [`super::PASS_BUDGET`]; one that wanted more is
    /// run again after the events already waiting.
    fn run_pass(&mut self, pass: Pass) {
        let (device, mem, queues) = (&mut self.device, &self.mem, &mut self.queues);
        let (res, spent) = super::with_pass_budget(super::PASS_BUDGET, || match pass {
            Pass::Queue(i) => device.process_queues(i, mem, queues),
            Pass::Backend => device.process_backend(mem, queues),
            Pass::Throttled => device.process_throttled(mem, queues),
        });
        if spent && res.is_ok() {
            match pass {
                Pass::Queue(i) => self.deferred.queues |= 1 << i,
                Pass::Backend => self.deferred.backend = true,
                Pass::Throttled => self.deferred.throttled = true,
            }
            METRICS.virtio.deferred_passes.inc();
            if let Some(evt) = &self.resume_evt {
                if let Err(e) = evt.write(1) {
                    log::warn!("virtio: cannot schedule the rest of a queue pass: {e}");
                }
            }
        }
        self.after_processing(res);
    }

    /// Runs again the passes that ran out of budget.
    fn resume(&mut self) {
        let d = std::mem::take(&mut self.deferred);
        if !self.live() {
            return;
        }
        for i in 0..self.queues.len() {
            if d.queues & (1 << i) != 0 {
                self.run_pass(Pass::Queue(i));
            }
        }
        if d.backend {
            self.run_pass(Pass::Backend);
        }
        if d.throttled {
            self.run_pass(Pass::Throttled);
        }
    }

    fn live(&self) -> bool {
        self.status & (STATUS_DRIVER_OK | STATUS_NEEDS_RESET | STATUS_FAILED) == STATUS_DRIVER_OK
            && self.queues.iter().all(|q| q.ready())
    }

    fn after_processing(&mut self, res: Result<bool, DeviceError>) {
        match res {
            Ok(false) => {}
            Ok(true) => {
                // Every queue is asked (no short cut), so that each one's count of used
                // elements since its last check restarts. Without EVENT_IDX the answer is
                // always yes; with it, only a queue whose used index passed the driver's
                // `used_event` needs the interrupt.
                let mem = &self.mem;
                let notify = self.queues.iter_mut().fold(false, |acc, q| {
                    !matches!(q.needs_notification(mem), Ok(false)) | acc
                });
                if notify {
                    self.raise(INT_USED_RING);
                }
            }
            Err(e) => self.needs_reset(&e.to_string()),
        }
    }

    /// The device's backend has work (e.g. a TAP became readable): lets a live device use it.
    pub fn process_backend(&mut self) {
        if !self.live() {
            return;
        }
        self.run_pass(Pass::Backend);
    }

    /// The device's rate-limiter timer fired: a live device takes requests again.
    pub fn process_throttled(&mut self) {
        if !self.live() {
            return;
        }
        self.run_pass(Pass::Throttled);
    }

    /// `PATCH` of the device's rate limiters (see [`VirtioDevice::update_rate_limiters`]).
    pub fn update_rate_limiters(
        &mut self,
        first: Option<&crate::api::models::RateLimiter>,
        second: Option<&crate::api::models::RateLimiter>,
    ) -> Result<(), String> {
        self.device.update_rate_limiters(first, second)
    }

    /// One half of a ring's address. A misaligned address is refused with NEEDS_RESET: the
    /// queue must not go live with the address it had before (after a reset, 0), which the
    /// driver never chose.
    fn set_ring_address(&mut self, sel: usize, offset: u64, v: u32) {
        type Set = fn(&mut Queue, GuestAddress) -> Result<(), virtio_queue::Error>;
        let q = &mut self.queues[sel];
        let (ring, old, set): (&str, u64, Set) = match offset & !4 {
            REG_QUEUE_DESC_LOW => (
                "descriptor table",
                q.desc_table(),
                Queue::try_set_desc_table_address,
            ),
            REG_QUEUE_AVAIL_LOW => (
                "available ring",
                q.avail_ring(),
                Queue::try_set_avail_ring_address,
            ),
            _ => ("used ring", q.used_ring(), Queue::try_set_used_ring_address),
        };
        // Bit 2 of the offset picks the high half.
        let addr = if offset & 4 == 0 {
            (old & !0xffff_ffff) | u64::from(v)
        } else {
            (old & 0xffff_ffff) | (u64::from(v) << 32)
        };
        if set(q, GuestAddress(addr)).is_err() {
            self.needs_reset(&format!("misaligned {ring} address {addr:#x}"));
        }
    }

    fn sel(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => 2,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => 0,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX if self.sel().is_some() => u32::from(QUEUE_MAX_SIZE),
            REG_QUEUE_NUM => self.sel().map_or(0, |q| u32::from(q.size())),
            REG_QUEUE_READY => self.sel().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt_status,
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let q = self.queue_setup_allowed();
        let sel = (self.queue_sel as usize).min(self.queues.len() - 1);
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES
                if self.status & !STATUS_NEEDS_RESET == STATUS_ACKNOWLEDGE | STATUS_DRIVER =>
            {
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => METRICS.virtio.invalid_register_writes.inc(),
                }
            }
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM if q => {
                let ok = v > 0
                    && v <= u32::from(QUEUE_MAX_SIZE)
                    && v.is_power_of_two()
                    && self.queues[sel].try_set_size(v as u16).is_ok();
                if !ok {
                    self.needs_reset(&format!("bad queue size {v}"));
                }
            }
            REG_QUEUE_READY if q => match v {
                0 => self.queues[sel].set_ready(false),
                1 => self.queues[sel].set_ready(true),
                _ => METRICS.virtio.invalid_register_writes.inc(),
            },
            REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH | REG_QUEUE_AVAIL_LOW
            | REG_QUEUE_AVAIL_HIGH | REG_QUEUE_USED_LOW | REG_QUEUE_USED_HIGH
                if q =>
            {
                self.set_ring_address(sel, offset, v)
            }
            REG_QUEUE_NOTIFY => self.process(v),
            REG_INTERRUPT_ACK => self.interrupt_status &= !v,
            REG_STATUS => self.set_status(v),
            _ => METRICS.virtio.invalid_register_writes.inc(),
        }
    }
}

/// The "queue index" of a device's backend event (its `completion_event`).
pub const BACKEND_EVENT: u32 = u32::MAX;
/// The "queue index" of a device's rate-limiter timer (its `throttle_timer`).
pub const THROTTLE_EVENT: u32 = u32::MAX - 1;
/// The "queue index" of the transport's own resume event (see `with_resume_event`).
pub const RESUME_EVENT: u32 = u32::MAX - 2;

impl QueueHandler for MmioTransport {
    fn notified(&mut self, queue_index: u32) {
        if queue_index == BACKEND_EVENT {
            self.process_backend();
        } else if queue_index == THROTTLE_EVENT {
            self.process_throttled();
        } else if queue_index == RESUME_EVENT {
            self.resume();
        } else {
            self.process(queue_index);
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_SPACE {
            let config = self.device.config_space();
            let start = (offset - CONFIG_SPACE) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                if let Some(v) = start.checked_add(i).and_then(|j| config.get(j)) {
                    *b = *v;
                }
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            METRICS.virtio.invalid_register_writes.inc();
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            // Neither block nor rng has a writable configuration field ember offers.
            METRICS.virtio.invalid_register_writes.inc();
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            METRICS.virtio.invalid_register_writes.inc();
            return;
        };
        if !offset.is_multiple_of(4) {
            METRICS.virtio.invalid_register_writes.inc();
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::super::rng::Rng;
    use super::super::test_util::*;
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn transport(mem: &GuestMemoryMmap) -> MmioTransport {
        MmioTransport::new(
            Box::new(Rng::new()),
            mem.clone(),
            EventFdTrigger::new().unwrap(),
        )
    }

    fn setup(t: &mut MmioTransport, size: u32) {
        setup_with(t, size, 0);
    }

    /// Negotiates VERSION_1 and the low feature word `low`, then sets queue 0 up.
    fn setup_with(t: &mut MmioTransport, size: u32, low: u32) {
        wr(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        wr(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        wr(t, REG_DRIVER_FEATURES_SEL, 0);
        wr(t, REG_DRIVER_FEATURES, low);
        wr(t, REG_DRIVER_FEATURES_SEL, 1);
        wr(t, REG_DRIVER_FEATURES, 1);
        wr(
            t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(rd(t, REG_STATUS) & STATUS_FEATURES_OK, STATUS_FEATURES_OK);
        wr(t, REG_QUEUE_SEL, 0);
        wr(t, REG_QUEUE_NUM, size);
        wr(t, REG_QUEUE_DESC_LOW, DESC as u32);
        wr(t, REG_QUEUE_DESC_HIGH, 0);
        wr(t, REG_QUEUE_AVAIL_LOW, AVAIL as u32);
        wr(t, REG_QUEUE_USED_LOW, USED as u32);
        wr(t, REG_QUEUE_READY, 1);
    }

    #[test]
    fn identity_registers() {
        let mem = memory();
        let mut t = transport(&mem);
        assert_eq!(rd(&mut t, REG_MAGIC), MAGIC_VALUE);
        assert_eq!(rd(&mut t, REG_VERSION), 2);
        assert_eq!(rd(&mut t, REG_DEVICE_ID), 4);
        assert_eq!(rd(&mut t, REG_VENDOR_ID), 0);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 256);
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 1);
        wr(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 0);
        // Unaligned or narrow register access reads 0.
        let mut b = [0xffu8; 2];
        t.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn status_state_machine() {
        let mem = memory();
        let mut t = transport(&mem);
        // Out of order: DRIVER before ACKNOWLEDGE.
        wr(&mut t, REG_STATUS, STATUS_DRIVER);
        assert_eq!(t.status(), 0);
        wr(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        wr(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        // Features without VERSION_1: FEATURES_OK stays clear.
        wr(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(t.status() & STATUS_FEATURES_OK, 0);
        // A feature not offered: refused too.
        wr(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        wr(&mut t, REG_DRIVER_FEATURES, 1 << 5);
        wr(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, REG_DRIVER_FEATURES, 1);
        wr(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(t.status() & STATUS_FEATURES_OK, 0);
        wr(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        wr(&mut t, REG_DRIVER_FEATURES, 0);
        wr(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_ne!(t.status() & STATUS_FEATURES_OK, 0);
        // Features are frozen after FEATURES_OK.
        wr(&mut t, REG_DRIVER_FEATURES, 1 << 5);
        assert_eq!(t.driver_features, VIRTIO_F_VERSION_1);
        // DRIVER_OK without a ready queue: needs reset.
        wr(&mut t, REG_STATUS, 0xf);
        assert_ne!(t.status() & STATUS_NEEDS_RESET, 0);
        assert_ne!(t.interrupt_status() & INT_CONFIG, 0);
        // Writing 0 resets everything.
        wr(&mut t, REG_STATUS, 0);
        assert_eq!(t.status(), 0);
        assert_eq!(t.interrupt_status(), 0);
        assert_eq!(t.driver_features, 0);
    }

    #[test]
    fn queue_setup_checks() {
        let mem = memory();
        let mut t = transport(&mem);
        // Queue registers before FEATURES_OK are ignored.
        wr(&mut t, REG_QUEUE_NUM, 16);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM), 256);
        setup(&mut t, 16);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM), 16);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 1);
        wr(&mut t, REG_STATUS, 0xf);
        assert_eq!(t.status(), 0xf);
        // After DRIVER_OK the queue cannot move.
        wr(&mut t, REG_QUEUE_DESC_LOW, 0x8000);
        assert_eq!(t.queues[0].desc_table(), DESC);

        // A bad size: needs reset.
        let mut t = transport(&mem);
        setup(&mut t, 3);
        assert_ne!(t.status() & STATUS_NEEDS_RESET, 0);
        let mut t = transport(&mem);
        setup(&mut t, 512);
        assert_ne!(t.status() & STATUS_NEEDS_RESET, 0);

        // Rings outside guest memory: DRIVER_OK gives NEEDS_RESET.
        let mut t = transport(&mem);
        setup(&mut t, 16);
        wr(&mut t, REG_QUEUE_USED_HIGH, 1);
        wr(&mut t, REG_STATUS, 0xf);
        assert_ne!(t.status() & STATUS_NEEDS_RESET, 0);

        // A misaligned ring: needs reset at once, and the queue never goes live with the
        // address it had before (0 after a reset), which the driver did not choose.
        for (reg, bad) in [
            (REG_QUEUE_DESC_LOW, DESC as u32 + 8),
            (REG_QUEUE_AVAIL_LOW, AVAIL as u32 + 1),
            (REG_QUEUE_USED_LOW, USED as u32 + 2),
        ] {
            let mut t = transport(&mem);
            setup(&mut t, 16);
            wr(&mut t, REG_STATUS, 0);
            wr(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
            wr(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
            wr(&mut t, REG_DRIVER_FEATURES_SEL, 1);
            wr(&mut t, REG_DRIVER_FEATURES, 1);
            wr(&mut t, REG_STATUS, 0xb);
            wr(&mut t, REG_QUEUE_NUM, 16);
            for r in [REG_QUEUE_DESC_LOW, REG_QUEUE_AVAIL_LOW, REG_QUEUE_USED_LOW] {
                wr(&mut t, r, if r == reg { bad } else { r as u32 * 0x100 });
            }
            wr(&mut t, REG_QUEUE_READY, 1);
            assert_ne!(t.status() & STATUS_NEEDS_RESET, 0, "{reg:#x}");
            wr(&mut t, REG_STATUS, 0xf);
            assert!(!t.live(), "{reg:#x}");
        }
    }

    #[test]
    fn notify_before_driver_ok_is_ignored_and_after_works() {
        let mem = memory();
        let mut t = transport(&mem);
        setup(&mut t, 16);
        write_desc(&mem, 0, 0x8000, 64, WRITE, 0);
        make_avail(&mem, 0, 0);
        let before = METRICS.virtio.invalid_notifications.count();
        wr(&mut t, REG_QUEUE_NOTIFY, 0);
        assert!(METRICS.virtio.invalid_notifications.count() > before);
        assert_eq!(used_idx(&mem), 0);
        wr(&mut t, REG_STATUS, 0xf);
        wr(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(used_idx(&mem), 1);
        assert_eq!(used_elem(&mem, 0), (0, 64));
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), INT_USED_RING);
        assert_eq!(t.irq.0.read().unwrap(), 1);
        wr(&mut t, REG_INTERRUPT_ACK, INT_USED_RING);
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 0);
        // Through the notifier path too.
        make_avail(&mem, 1, 0);
        t.notified(0);
        assert_eq!(used_idx(&mem), 2);
    }

    /// A device whose driver hands every chain it gets back at once, as a second vCPU
    /// refilling the queue could, `left` more times in all.
    struct Refiller {
        left: usize,
    }

    impl VirtioDevice for Refiller {
        fn device_type(&self) -> u32 {
            super::super::TYPE_RNG
        }
        fn avail_features(&self) -> u64 {
            VIRTIO_F_VERSION_1
        }
        fn config_space(&self) -> Vec<u8> {
            Vec::new()
        }
        fn process_queues(
            &mut self,
            _index: usize,
            mem: &GuestMemoryMmap,
            queues: &mut [Queue],
        ) -> Result<bool, DeviceError> {
            let q = &mut queues[0];
            let mut used = false;
            while let Some(chain) = super::super::pop_chain(mem, q)? {
                let head = chain.head_index();
                q.add_used(mem, head, 0).unwrap();
                used = true;
                if self.left > 0 {
                    self.left -= 1;
                    let idx: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).unwrap();
                    let slot = GuestAddress(AVAIL + 4 + 2 * u64::from(idx % 16));
                    mem.write_obj(head, slot).unwrap();
                    mem.write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2))
                        .unwrap();
                }
            }
            Ok(used)
        }
    }

    #[test]
    fn a_queue_refilled_as_fast_as_it_is_emptied_gets_bounded_passes() {
        let mem = memory();
        let resume = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let budget = super::super::PASS_BUDGET;
        let dev = Box::new(Refiller { left: 3 * budget });
        let mut t = MmioTransport::new(dev, mem.clone(), EventFdTrigger::new().unwrap())
            .with_resume_event(resume.try_clone().unwrap());
        setup(&mut t, 16);
        wr(&mut t, REG_STATUS, 0xf);
        write_desc(&mem, 0, 0x8000, 64, WRITE, 0);
        make_avail(&mem, 0, 0);
        let deferred = METRICS.virtio.deferred_passes.count();
        // The notification's pass stops at its budget and asks to be run again; the rest
        // comes in passes of the same size, until the driver stops refilling.
        t.notified(0);
        assert_eq!(usize::from(used_idx(&mem)), budget);
        let mut passes = 1;
        while resume.read().is_ok() {
            t.notified(RESUME_EVENT);
            passes += 1;
            assert!(usize::from(used_idx(&mem)) <= passes * budget);
        }
        assert_eq!(usize::from(used_idx(&mem)), 3 * budget + 1);
        assert_eq!(passes, 4);
        assert!(METRICS.virtio.deferred_passes.count() >= deferred + 3);
        // The interrupt was raised for the chains used.
        assert_ne!(rd(&mut t, REG_INTERRUPT_STATUS) & INT_USED_RING, 0);
    }

    /// The driver's `used_event` (after the avail ring of a 16-entry queue).
    fn set_used_event(mem: &GuestMemoryMmap, v: u16) {
        mem.write_obj(v, GuestAddress(AVAIL + 4 + 2 * 16)).unwrap();
    }

    /// The device's `avail_event` (after the used ring of a 16-entry queue).
    fn avail_event(mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(USED + 4 + 8 * 16)).unwrap()
    }

    #[test]
    fn event_idx_suppresses_interrupts_the_driver_does_not_ask_for() {
        let mem = memory();
        let mut t = transport(&mem);
        assert_ne!(
            u64::from(rd(&mut t, REG_DEVICE_FEATURES)) & VIRTIO_RING_F_EVENT_IDX,
            0
        );
        setup_with(&mut t, 16, VIRTIO_RING_F_EVENT_IDX as u32);
        wr(&mut t, REG_STATUS, 0xf);
        assert!(t.queues[0].event_idx_enabled());
        write_desc(&mem, 0, 0x8000, 64, WRITE, 0);
        write_desc(&mem, 1, 0x9000, 64, WRITE, 0);
        // The driver wants an interrupt only once used idx passes 1.
        set_used_event(&mem, 1);
        make_avail(&mem, 0, 0);
        wr(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(used_idx(&mem), 1);
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 0);
        assert!(t.irq.0.read().is_err(), "no irqfd write expected");
        // The queue ran dry: notifications re-enabled at the next index the device reads.
        assert_eq!(avail_event(&mem), 1);

        make_avail(&mem, 1, 1);
        t.notified(0);
        assert_eq!(used_idx(&mem), 2);
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), INT_USED_RING);
        assert_eq!(t.irq.0.read().unwrap(), 1);
        assert_eq!(avail_event(&mem), 2);

        // used_event left behind (1): used idx 3 does not cross it again.
        make_avail(&mem, 2, 0);
        t.notified(0);
        assert_eq!(used_idx(&mem), 3);
        assert!(t.irq.0.read().is_err());
        // The driver catches up and asks for the next one.
        set_used_event(&mem, 3);
        make_avail(&mem, 3, 1);
        t.notified(0);
        assert_eq!(used_idx(&mem), 4);
        assert_eq!(t.irq.0.read().unwrap(), 1);

        // After a reset without EVENT_IDX every used chain interrupts again.
        wr(&mut t, REG_STATUS, 0);
        setup(&mut t, 16);
        wr(&mut t, REG_STATUS, 0xf);
        assert!(!t.queues[0].event_idx_enabled());
        mem.write_obj(0u16, GuestAddress(USED + 2)).unwrap();
        make_avail(&mem, 0, 0);
        set_used_event(&mem, 100);
        t.notified(0);
        assert_eq!(used_idx(&mem), 1);
        assert_eq!(t.irq.0.read().unwrap(), 1);
    }

    #[test]
    fn bogus_avail_index_needs_reset() {
        let mem = memory();
        let mut t = transport(&mem);
        setup(&mut t, 16);
        wr(&mut t, REG_STATUS, 0xf);
        mem.write_obj(1000u16, GuestAddress(AVAIL + 2)).unwrap();
        wr(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_ne!(t.status() & STATUS_NEEDS_RESET, 0);
        // Further notifications are ignored until a reset.
        wr(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(used_idx(&mem), 0);
    }

    #[test]
    fn config_space_reads_and_refuses_writes() {
        let mem = memory();
        let mut t = transport(&mem);
        let mut b = [0xffu8; 8];
        t.read(CONFIG_SPACE + 0xe00, &mut b);
        assert_eq!(b, [0; 8]);
        let before = METRICS.virtio.invalid_register_writes.count();
        t.write(CONFIG_SPACE + 0x10, &[1, 2, 3]);
        assert!(METRICS.virtio.invalid_register_writes.count() > before);
    }
}
