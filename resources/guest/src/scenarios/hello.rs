//! The greeting (also ember's built-in demo guest for `ember run`).

use crate::{acpi, hw, Ctx};

pub fn run(ctx: &Ctx, _arg: &[u8]) {
    let cpus = acpi::cpus_or_fail(&ctx.bp).count();
    let mib = ctx.bp.ram_mib();
    let us = hw::boot_time_us();
    if us != 0 {
        say!(
            "Hello from the ember guest! vCPUs: ",
            cpus,
            ", memory: ",
            mib,
            " MiB, boot: ",
            us,
            " us"
        );
    } else {
        say!(
            "Hello from the ember guest! vCPUs: ",
            cpus,
            ", memory: ",
            mib,
            " MiB"
        );
    }
}
