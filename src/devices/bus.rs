//! Routes a vCPU's port I/O and MMIO exits to the device that owns the address.

use std::fmt;
use std::sync::{Arc, Mutex};

/// A device on the PIO or MMIO bus. `offset` is relative to the base it was inserted at.
/// Devices are plain state machines: they never see KVM or a vCPU.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, PartialEq, Eq)]
pub enum BusError {
    Overlap { base: u64, len: u64 },
    ZeroLength { base: u64 },
}

impl fmt::Display for BusError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            BusError::Overlap { base, len } => write!(
                f,
                "device range {base:#x}+{len:#x} overlaps a device already on the bus"
            ),
            BusError::ZeroLength { base } => write!(f, "device at {base:#x} has zero length"),
        }
    }
}

impl std::error::Error for BusError {}

struct Range {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping address ranges. Few devices live on a bus, so a sorted vector
/// with a binary search beats any map.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

impl Bus {
    pub fn new() -> Bus {
        Bus::default()
    }

    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        if self
            .ranges
            .iter()
            .any(|r| base < r.base + r.len && r.base < end)
        {
            return Err(BusError::Overlap { base, len });
        }
        let at = self.ranges.partition_point(|r| r.base < base);
        self.ranges.insert(at, Range { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Range, u64)> {
        let idx = self
            .ranges
            .partition_point(|r| r.base <= addr)
            .checked_sub(1)?;
        let r = &self.ranges[idx];
        let offset = addr - r.base;
        // The whole access must fall inside the device's window.
        (offset.checked_add(size as u64)? <= r.len).then_some((r, offset))
    }

    /// Returns false when no device owns `addr`; the caller decides what that means.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((r, offset)) => {
                lock(&r.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((r, offset)) => {
                lock(&r.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

impl Bus {
    /// `data.len()` one-byte writes to the same address, in order, as one device call: how
    /// coalesced console writes arrive. Only devices with byte registers that
    /// treat such a slice as repeated writes (COM1) may receive it.
    pub fn write_bytes_to(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, 1) {
            Some((r, offset)) => {
                lock(&r.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device. A poisoned lock only means another thread panicked while holding it; the
/// device state is still the best we have, so keep going rather than take the VMM down.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlap() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder { last_write: None }));
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(Arc::new(Mutex::new(Recorder { last_write: None })), 0x60, 5)
            .unwrap();
        assert_eq!(
            bus.insert(
                Arc::new(Mutex::new(Recorder { last_write: None })),
                0x3fc,
                8
            ),
            Err(BusError::Overlap {
                base: 0x3fc,
                len: 8
            })
        );
        assert!(bus.insert(a.clone(), 0x100, 0).is_err());
        assert!(bus.write(0x3fb, &[7]));
        assert_eq!(a.lock().unwrap().last_write, Some((3, vec![7])));
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d[0], 5);
        // Outside every device, and straddling the end of one.
        assert!(!bus.read(0x400, &mut d));
        assert!(!bus.read(0x3ff, &mut [0u8; 2]));
        assert!(!bus.write(0x0, &[1]));
        assert!(!bus.write(u64::MAX, &[1]));
        // Repeated byte writes to one register arrive as one call, whatever their count.
        assert!(bus.write_bytes_to(0x3f8, b"a line longer than the window\n"));
        assert_eq!(
            a.lock().unwrap().last_write,
            Some((0, b"a line longer than the window\n".to_vec()))
        );
        assert!(!bus.write_bytes_to(0x400, b"x"));
    }
}
