//! KVM state: the VM (memory slots, irqchip, PIT) and its vCPUs (threads running `KVM_RUN`).

pub mod coalesced;
pub mod vcpu;
pub mod vm;
