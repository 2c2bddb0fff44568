//! ember: a microVM monitor for KVM that speaks Firecracker's control surface.
//!
//! Where things are: `config` (what a user asks for), `builder` (turns that into a running
//! VM), `arch` (the x86-64 guest platform: memory layout, boot structures, CPUID, ACPI),
//! `vstate` (KVM VM and vCPUs), `devices` (device models and the bus), `vmm` (the event
//! loop), `logger`, `metrics`, `signal`, `stdio` (writing to the stdout shared with the parent), `uds`
//! (Unix-socket helpers).

pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod controller;
pub mod devices;
pub mod logger;
pub mod metrics;
pub mod seccomp;
pub mod signal;
pub mod stdio;
pub mod time;
pub mod uds;
pub mod vmm;
pub mod vstate;

/// ember's version, also reported as `firecracker_version` for clients that check it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
