//! `smp`: start every AP with INIT-SIPI-SIPI from ring 3 and hear from each.
//!
//! The trampoline (real mode, `entry.S`) is copied to `TRAMPOLINE`; each AP
//! reaches `ap_main` at CPL 3 on its own stack, says hello and spins. Once all
//! have reported, the BSP parks them with an INIT IPI (wait-for-SIPI: the vCPU
//! blocks in KVM instead of spinning on a shared host core).

use crate::{acpi, hw, Ctx};
use core::hint::spin_loop;
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

/// Free page below 1 MiB (not the zero page, the VMM's tables, the command
/// line at 0x20000, or the EBDA/ACPI area).
const TRAMPOLINE: u64 = 0x10000;
const MAX_APS: usize = 63; // entry.S: EMBER_MAX_APS
/// Generous: at least a few seconds at any plausible TSC frequency.
const TIMEOUT_TSC: u64 = 20_000_000_000;

const ICR_INIT: u32 = 0x4500; // INIT, level assert
const ICR_SIPI: u32 = 0x4600; // start-up, level assert; | vector

static ONLINE: AtomicU32 = AtomicU32::new(0);

extern "C" {
    static ember_tramp_start: u8;
    static ember_tramp_end: u8;
}

/// What the APs run once online (a `fn()` as usize; 0: nothing, they just spin).
static AP_TASK: AtomicUsize = AtomicUsize::new(0);

#[no_mangle]
extern "C" fn ap_main() -> ! {
    let id = hw::lapic_id();
    if AP_TASK.load(Ordering::Acquire) == 0 {
        say!("smp: cpu ", id, " online");
    }
    ONLINE.fetch_add(1, Ordering::Release);
    let task = AP_TASK.load(Ordering::Acquire);
    if task != 0 {
        // SAFETY: only `start_aps` stores here, and it stores a `fn()`.
        let f: fn() = unsafe { core::mem::transmute::<usize, fn()>(task) };
        f();
    }
    loop {
        spin_loop();
    }
}

pub fn run(ctx: &Ctx, _arg: &[u8]) {
    let aps = start_aps(ctx, None);
    let n = aps + 1;
    say!("smp: ", n, " of ", n, " vCPUs online");
    park_aps(ctx);
}

/// Starts every AP (INIT-SIPI-SIPI from ring 3) and waits until all are online; each then
/// runs `task`, if any. Returns how many APs there are.
pub fn start_aps(ctx: &Ctx, task: Option<fn()>) -> usize {
    AP_TASK.store(task.map_or(0, |f| f as usize), Ordering::Release);
    ONLINE.store(0, Ordering::Release);
    let cpus = acpi::cpus_or_fail(&ctx.bp);
    let me = hw::lapic_id();
    let aps = cpus.apic_ids().iter().filter(|&&id| id != me).count();
    if aps + 1 != cpus.count() {
        fail!("smp: the BSP (APIC id ", me, ") is not in the MADT");
    }
    if aps > MAX_APS {
        fail!("smp: ", aps, " APs, the guest supports ", MAX_APS);
    }
    if let Some(&id) = cpus.apic_ids().iter().find(|&&id| id > 0xfe) {
        fail!("smp: APIC id ", id, " is not reachable through the xAPIC");
    }

    let (start, end) = (
        core::ptr::addr_of!(ember_tramp_start),
        core::ptr::addr_of!(ember_tramp_end),
    );
    let len = end as usize - start as usize;
    if !ctx.bp.is_ram(TRAMPOLINE, 4096) {
        fail!("smp: the trampoline page is not RAM");
    }
    unsafe { core::ptr::copy_nonoverlapping(start, TRAMPOLINE as *mut u8, len) };

    hw::lapic_enable();
    let vector = (TRAMPOLINE >> 12) as u32;
    for &id in cpus.apic_ids().iter().filter(|&&id| id != me) {
        hw::lapic_ipi(id, ICR_INIT);
        hw::lapic_ipi(id, ICR_SIPI | vector);
        hw::lapic_ipi(id, ICR_SIPI | vector);
    }

    let t0 = hw::rdtsc();
    while (ONLINE.load(Ordering::Acquire) as usize) < aps {
        if hw::rdtsc().wrapping_sub(t0) > TIMEOUT_TSC {
            let n = ONLINE.load(Ordering::Acquire);
            fail!("smp: only ", n, " of ", aps, " APs came online");
        }
        spin_loop();
    }
    aps
}

/// Puts every AP back in wait-for-SIPI (INIT), where its vCPU blocks in KVM instead of
/// spinning on a shared host core.
pub fn park_aps(ctx: &Ctx) {
    let cpus = acpi::cpus_or_fail(&ctx.bp);
    let me = hw::lapic_id();
    for &id in cpus.apic_ids().iter().filter(|&&id| id != me) {
        hw::lapic_ipi(id, ICR_INIT);
    }
}
