//! Architecture-specific code. ember only targets x86_64.

pub mod x86_64;
pub use x86_64::*;
