//! The virtio-mmio version 2 transport: 32-bit register accesses in a 4 KiB
//! window, device configuration space at 0x100.

use super::queue::Queue;
use crate::hw::{mmio_read32, mmio_read8, mmio_write32};

pub const MAGIC_VALUE: u64 = 0x000;
pub const VERSION: u64 = 0x004;
pub const DEVICE_ID: u64 = 0x008;
pub const VENDOR_ID: u64 = 0x00c;
pub const DEVICE_FEATURES: u64 = 0x010;
pub const DEVICE_FEATURES_SEL: u64 = 0x014;
pub const DRIVER_FEATURES: u64 = 0x020;
pub const DRIVER_FEATURES_SEL: u64 = 0x024;
pub const QUEUE_SEL: u64 = 0x030;
pub const QUEUE_NUM_MAX: u64 = 0x034;
pub const QUEUE_NUM: u64 = 0x038;
pub const QUEUE_READY: u64 = 0x044;
pub const QUEUE_NOTIFY: u64 = 0x050;
pub const INTERRUPT_STATUS: u64 = 0x060;
pub const INTERRUPT_ACK: u64 = 0x064;
pub const STATUS: u64 = 0x070;
pub const QUEUE_DESC_LOW: u64 = 0x080;
pub const QUEUE_DESC_HIGH: u64 = 0x084;
pub const QUEUE_DRIVER_LOW: u64 = 0x090;
pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const CONFIG_GENERATION: u64 = 0x0fc;
pub const CONFIG: u64 = 0x100;

pub const MAGIC: u32 = 0x7472_6976; // "virt"

pub const S_ACKNOWLEDGE: u32 = 1;
pub const S_DRIVER: u32 = 2;
pub const S_DRIVER_OK: u32 = 4;
pub const S_FEATURES_OK: u32 = 8;
pub const S_NEEDS_RESET: u32 = 0x40;
pub const S_FAILED: u32 = 0x80;

pub const F_VERSION_1: u64 = 1 << 32;

/// Largest queue this driver sets up (the rings fit one page).
pub const MAX_QUEUE: u16 = 16;

#[derive(Clone, Copy)]
pub struct Transport {
    pub base: u64,
}

impl Transport {
    pub const fn new(base: u64) -> Transport {
        Transport { base }
    }

    pub fn read(&self, reg: u64) -> u32 {
        // SAFETY: the window is identity-mapped MMIO.
        unsafe { mmio_read32(self.base + reg) }
    }

    pub fn write(&self, reg: u64, v: u32) {
        // SAFETY: as above.
        unsafe { mmio_write32(self.base + reg, v) }
    }

    pub fn magic_ok(&self) -> bool {
        self.read(MAGIC_VALUE) == MAGIC && self.read(VERSION) == 2
    }

    pub fn device_id(&self) -> u32 {
        self.read(DEVICE_ID)
    }

    pub fn status(&self) -> u32 {
        self.read(STATUS)
    }

    pub fn set_status(&self, s: u32) {
        self.write(STATUS, s)
    }

    pub fn reset(&self) {
        self.set_status(0);
    }

    /// The device's 64 feature bits.
    pub fn device_features(&self) -> u64 {
        self.write(DEVICE_FEATURES_SEL, 0);
        let lo = self.read(DEVICE_FEATURES) as u64;
        self.write(DEVICE_FEATURES_SEL, 1);
        let hi = self.read(DEVICE_FEATURES) as u64;
        hi << 32 | lo
    }

    pub fn write_driver_features(&self, f: u64) {
        self.write(DRIVER_FEATURES_SEL, 0);
        self.write(DRIVER_FEATURES, f as u32);
        self.write(DRIVER_FEATURES_SEL, 1);
        self.write(DRIVER_FEATURES, (f >> 32) as u32);
    }

    /// Reset, ACKNOWLEDGE, DRIVER, feature negotiation (VERSION_1 and
    /// `wanted & offered`), FEATURES_OK checked. Returns the device's features.
    pub fn begin(&self, wanted: u64) -> Result<u64, &'static str> {
        if !self.magic_ok() {
            return Err("no virtio-mmio v2 device there");
        }
        self.reset();
        if self.status() != 0 {
            return Err("status did not reset to 0");
        }
        self.set_status(S_ACKNOWLEDGE);
        self.set_status(S_ACKNOWLEDGE | S_DRIVER);
        let offered = self.device_features();
        if offered & F_VERSION_1 == 0 {
            return Err("device does not offer VIRTIO_F_VERSION_1");
        }
        self.write_driver_features(F_VERSION_1 | (wanted & offered));
        self.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        if self.status() & S_FEATURES_OK == 0 {
            return Err("FEATURES_OK did not stick");
        }
        Ok(offered)
    }

    /// The queue size this driver would use for queue `idx` (0 if none).
    pub fn queue_size(&self, idx: u32) -> u16 {
        self.write(QUEUE_SEL, idx);
        let max = self.read(QUEUE_NUM_MAX).min(MAX_QUEUE as u32);
        if max == 0 {
            return 0;
        }
        // Largest power of two <= max.
        1 << (31 - max.leading_zeros())
    }

    /// Writes queue `idx`'s size and ring addresses, without QueueReady.
    pub fn program_queue(&self, idx: u32, num: u32, q: &Queue) {
        self.write(QUEUE_SEL, idx);
        self.write(QUEUE_NUM, num);
        let (d, a, u) = (q.desc_addr(), q.avail_addr(), q.used_addr());
        self.write(QUEUE_DESC_LOW, d as u32);
        self.write(QUEUE_DESC_HIGH, (d >> 32) as u32);
        self.write(QUEUE_DRIVER_LOW, a as u32);
        self.write(QUEUE_DRIVER_HIGH, (a >> 32) as u32);
        self.write(QUEUE_DEVICE_LOW, u as u32);
        self.write(QUEUE_DEVICE_HIGH, (u >> 32) as u32);
    }

    /// Sets up queue `idx` on `q` (already sized) and makes it ready.
    pub fn setup_queue(&self, idx: u32, q: &Queue) -> Result<(), &'static str> {
        self.write(QUEUE_SEL, idx);
        if self.read(QUEUE_READY) != 0 {
            return Err("queue already ready after reset");
        }
        self.program_queue(idx, q.size as u32, q);
        self.write(QUEUE_READY, 1);
        if self.read(QUEUE_READY) != 1 {
            return Err("QueueReady did not stick");
        }
        Ok(())
    }

    pub fn driver_ok(&self) -> Result<(), &'static str> {
        self.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        let s = self.status();
        if s & (S_NEEDS_RESET | S_FAILED) != 0 || s & S_DRIVER_OK == 0 {
            return Err("DRIVER_OK refused");
        }
        Ok(())
    }

    pub fn notify(&self, queue: u32) {
        self.write(QUEUE_NOTIFY, queue);
    }

    /// Reads and acknowledges InterruptStatus (interrupts are off here).
    pub fn ack_interrupts(&self) -> u32 {
        let s = self.read(INTERRUPT_STATUS);
        if s != 0 {
            self.write(INTERRUPT_ACK, s);
        }
        s
    }

    pub fn config32(&self, off: u64) -> u32 {
        self.read(CONFIG + off)
    }

    pub fn config8(&self, off: u64) -> u8 {
        // SAFETY: as above.
        unsafe { mmio_read8(self.base + CONFIG + off) }
    }

    /// A 64-bit config field read as two 32-bit halves, consistent under
    /// ConfigGeneration.
    pub fn config64(&self, off: u64) -> u64 {
        let mut v = 0;
        for _ in 0..100 {
            let g = self.read(CONFIG_GENERATION);
            let lo = self.config32(off) as u64;
            let hi = self.config32(off + 4) as u64;
            v = hi << 32 | lo;
            if self.read(CONFIG_GENERATION) == g {
                break;
            }
        }
        v
    }
}
