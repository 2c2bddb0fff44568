//! The boot-timer device: the guest writes 123 to offset 0 when it considers itself booted,
//! and ember logs how long that took since the start request. ember extension: an 8-byte
//! read at offset 8 returns those microseconds, so a guest can print its own boot time.

use crate::devices::bus::BusDevice;
use crate::time::{process_cpu_us, Timestamp};

pub const BOOT_TIMER_MAGIC: u8 = 123;
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
const ELAPSED_OFFSET: u64 = 8;

pub struct BootTimer {
    start: Timestamp,
}

impl BootTimer {
    pub fn new(start: Timestamp) -> BootTimer {
        BootTimer { start }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == ELAPSED_OFFSET && data.len() == 8 {
            data.copy_from_slice(&self.start.elapsed_us().to_le_bytes());
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&BOOT_TIMER_MAGIC) {
            let us = self.start.elapsed_us();
            let cpu_us = process_cpu_us().saturating_sub(self.start.cpu_us);
            // The guest may write it again and again: rate-limited like any message a guest
            // can cause.
            crate::log_guest!(
                log::Level::Info,
                "Guest-boot-time = {:>6} us {} ms, {:>6} CPU us {} CPU ms",
                us,
                us / 1000,
                cpu_us,
                cpu_us / 1000
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elapsed_read_advances() {
        let mut t = BootTimer::new(Timestamp::now());
        std::thread::sleep(std::time::Duration::from_millis(2));
        let mut d = [0u8; 8];
        t.read(8, &mut d);
        assert!(u64::from_le_bytes(d) >= 2000);
        // Other offsets and sizes leave the data alone.
        let mut d = [0xaau8; 4];
        t.read(8, &mut d);
        assert_eq!(d, [0xaa; 4]);
        t.write(0, &[BOOT_TIMER_MAGIC]);
    }
}
