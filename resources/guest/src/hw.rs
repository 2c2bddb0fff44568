//! Port I/O, MMIO, the boot timer, the LAPIC, reset and triple fault.
//! MMIO goes through inline `mov`s so every access has exactly the size asked.

use core::arch::asm;
use core::hint::spin_loop;
use core::sync::atomic::{AtomicBool, Ordering};

pub fn outb(port: u16, v: u8) {
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}
/// `b.len()` byte writes to `port`, in order (DF is clear throughout the guest).
pub fn outsb(port: u16, b: &[u8]) {
    unsafe {
        asm!(
            "rep outsb",
            in("dx") port,
            inout("rsi") b.as_ptr() => _,
            inout("rcx") b.len() => _,
            options(nostack, readonly, preserves_flags)
        )
    }
}
pub fn outw(port: u16, v: u16) {
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack, preserves_flags))
    }
}
pub fn outl(port: u16, v: u32) {
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    }
}
pub fn inb(port: u16) -> u8 {
    let v: u8;
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}
pub fn inw(port: u16) -> u16 {
    let v: u16;
    unsafe {
        asm!("in ax, dx", out("ax") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}
pub fn inl(port: u16) -> u32 {
    let v: u32;
    unsafe {
        asm!("in eax, dx", out("eax") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}

pub unsafe fn mmio_read8(a: u64) -> u8 {
    let v: u8;
    asm!("mov {v}, byte ptr [{a}]", a = in(reg) a, v = out(reg_byte) v, options(nostack, preserves_flags));
    v
}
pub unsafe fn mmio_read16(a: u64) -> u16 {
    let v: u16;
    asm!("mov {v:x}, word ptr [{a}]", a = in(reg) a, v = out(reg) v, options(nostack, preserves_flags));
    v
}
pub unsafe fn mmio_read32(a: u64) -> u32 {
    let v: u32;
    asm!("mov {v:e}, dword ptr [{a}]", a = in(reg) a, v = out(reg) v, options(nostack, preserves_flags));
    v
}
pub unsafe fn mmio_read64(a: u64) -> u64 {
    let v: u64;
    asm!("mov {v}, qword ptr [{a}]", a = in(reg) a, v = out(reg) v, options(nostack, preserves_flags));
    v
}
pub unsafe fn mmio_write8(a: u64, v: u8) {
    asm!("mov byte ptr [{a}], {v}", a = in(reg) a, v = in(reg_byte) v, options(nostack, preserves_flags));
}
pub unsafe fn mmio_write16(a: u64, v: u16) {
    asm!("mov word ptr [{a}], {v:x}", a = in(reg) a, v = in(reg) v, options(nostack, preserves_flags));
}
pub unsafe fn mmio_write32(a: u64, v: u32) {
    asm!("mov dword ptr [{a}], {v:e}", a = in(reg) a, v = in(reg) v, options(nostack, preserves_flags));
}
pub unsafe fn mmio_write64(a: u64, v: u64) {
    asm!("mov qword ptr [{a}], {v}", a = in(reg) a, v = in(reg) v, options(nostack, preserves_flags));
}

// ---- boot timer (MMIO 0xC000_0000) ----

pub const BOOT_TIMER: u64 = 0xC000_0000;
static BOOT_TIMER_PRESENT: AtomicBool = AtomicBool::new(false);

/// Must be the guest's first MMIO access (before any port I/O): without an
/// ember boot timer the read leaves KVM's exit data untouched, and that is 0
/// only while nothing has used it yet; ember fills a read with no device with
/// all ones.
pub fn init_boot_timer() {
    let us = unsafe { mmio_read64(BOOT_TIMER + 8) };
    BOOT_TIMER_PRESENT.store(us != 0 && us != u64::MAX, Ordering::Relaxed);
}

pub fn boot_timer_present() -> bool {
    BOOT_TIMER_PRESENT.load(Ordering::Relaxed)
}

/// Microseconds since the VMM's start request, or 0 when unknown.
pub fn boot_time_us() -> u64 {
    if boot_timer_present() {
        unsafe { mmio_read64(BOOT_TIMER + 8) }
    } else {
        0
    }
}

/// Marks "boot done" (the VMM logs `Guest-boot-time = ...`).
pub fn boot_done() {
    unsafe { mmio_write8(BOOT_TIMER, 123) }
}

// ---- LAPIC (xAPIC MMIO) ----

pub const LAPIC: u64 = 0xFEE0_0000;

pub fn lapic_id() -> u32 {
    unsafe { mmio_read32(LAPIC + 0x20) >> 24 }
}

pub fn lapic_enable() {
    unsafe { mmio_write32(LAPIC + 0xf0, 0x1ff) } // SVR: APIC enabled, spurious vector 0xff
}

/// Sends an IPI: ICR high (destination) then ICR low (which sends).
pub fn lapic_ipi(dest_apic_id: u32, icr_low: u32) {
    unsafe {
        mmio_write32(LAPIC + 0x310, dest_apic_id << 24);
        mmio_write32(LAPIC + 0x300, icr_low);
    }
}

// ---- misc ----

pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    ((hi as u64) << 32) | lo as u64
}

/// i8042 reset: the VMM stops and exits 0.
pub fn reset() -> ! {
    outb(0x64, 0xfe);
    loop {
        spin_loop();
    }
}

/// `ud2` with an IDT of limit 0: #UD -> #GP -> #DF -> triple fault.
pub fn triple_fault() -> ! {
    unsafe { asm!("ud2", options(noreturn, nomem, nostack)) }
}
