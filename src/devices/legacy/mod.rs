//! The legacy platform devices of a PC that a microVM keeps: COM1 and the i8042 reset line.

pub mod i8042;
pub mod serial;

use std::ops::Deref;

use vmm_sys_util::eventfd::EventFd;

/// An `EventFd` as a vm-superio `Trigger`: the irqfd of a device's GSI, or the VMM's reset
/// event. Devices only see the trait.
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl Deref for EventFdTrigger {
    type Target = EventFd;
    fn deref(&self) -> &EventFd {
        &self.0
    }
}

impl EventFdTrigger {
    pub fn new() -> std::io::Result<EventFdTrigger> {
        Ok(EventFdTrigger(EventFd::new(libc::EFD_NONBLOCK)?))
    }

    pub fn try_clone(&self) -> std::io::Result<EventFdTrigger> {
        Ok(EventFdTrigger(self.0.try_clone()?))
    }
}
