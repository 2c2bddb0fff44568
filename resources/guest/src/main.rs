//! ember test guest: a tiny unikernel entered through the Linux 64-bit boot
//! protocol (like a vmlinux). The ring-0 part is a few dozen instructions in
//! `entry.S`; everything here runs at CPL 3 with IOPL 3.
//!
//! The kernel command line selects scenarios (see `scenarios/mod.rs`); other
//! tokens (ordinary Linux parameters) are ignored.

#![no_std]
#![no_main]

core::arch::global_asm!(include_str!("entry.S"), options(att_syntax));

#[macro_use]
mod serial;
mod acpi;
mod bootparams;
mod hw;
mod rand;
mod rt;
mod scenarios;
mod virtio;

use bootparams::BootParams;

/// What every scenario gets.
pub struct Ctx {
    pub bp: BootParams,
}

/// BSP entry at CPL 3 (from `_start`), with the zero page address.
#[no_mangle]
extern "C" fn bsp_main(zero_page: u64) -> ! {
    // First MMIO access, before any port I/O: on ember the boot timer reports
    // the time since the start request; elsewhere it reads as 0.
    hw::init_boot_timer();

    let ctx = Ctx {
        bp: BootParams::new(zero_page),
    };
    let cmdline = ctx.bp.cmdline();
    say!("ember-guest: cmdline ", cmdline.len(), " bytes");

    if !scenarios::run_all(&ctx, cmdline) {
        scenarios::hello::run(&ctx, b"");
    }

    say!("ember-guest: done");
    hw::boot_done();
    hw::reset()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut line = serial::Line::new();
    line.bytes(b"ember-guest: FAIL: panic");
    if let Some(msg) = info.message().as_str() {
        line.bytes(b": ");
        line.bytes(msg.as_bytes());
    }
    if let Some(loc) = info.location() {
        line.bytes(b" at ");
        line.bytes(loc.file().as_bytes());
        line.bytes(b":");
        line.dec(loc.line() as u64);
    }
    line.end_unlocked();
    hw::triple_fault()
}
