//! Device models. None of them knows about KVM or threads: each is a state machine driven
//! through the bus, with its interrupts and events injected as triggers.

pub mod boot_timer;
pub mod bus;
pub mod legacy;
pub mod rate_limiter;
pub mod virtio;

pub use bus::{Bus, BusDevice};
