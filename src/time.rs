//! Wall-clock and CPU-time stamps for start-up and boot-time figures.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn clock_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass, which lives on this stack.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

/// Microseconds of CLOCK_MONOTONIC: the clock the jailer's `--start-time-us` is read from.
pub fn monotonic_us() -> u64 {
    clock_us(libc::CLOCK_MONOTONIC)
}

/// CPU time this process has used, in microseconds.
pub fn process_cpu_us() -> u64 {
    clock_us(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// Milliseconds since the Unix epoch, for metrics.
pub fn utc_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

/// A moment, in wall (monotonic) and process CPU time.
#[derive(Clone, Copy, Debug)]
pub struct Timestamp {
    pub wall_us: u64,
    pub cpu_us: u64,
}

impl Timestamp {
    pub fn now() -> Timestamp {
        Timestamp {
            wall_us: monotonic_us(),
            cpu_us: process_cpu_us(),
        }
    }

    pub fn elapsed_us(&self) -> u64 {
        monotonic_us().saturating_sub(self.wall_us)
    }
}
