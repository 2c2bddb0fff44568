//! Token-bucket rate limiting for the virtio devices (`RateLimiter` in the API).
//!
//! [`RateLimiter`] is a plain state machine: every call takes the current time in nanoseconds
//! (`now`), so the bucket arithmetic is tested without sleeping. A device asks
//! [`RateLimiter::consume`] before taking a request; when it is refused, the device leaves the
//! request in its queue, arms its [`ThrottleTimer`] and takes nothing more from that queue
//! until the timer fires (see `VirtioDevice::process_throttled`).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use vmm_sys_util::eventfd::EventFd;

use crate::api::models::{RateLimiter as RateLimiterConfig, TokenBucket as BucketConfig};

/// How long a throttled device waits before it tries its queue again.
pub const RETRY_MS: u64 = 100;

const NS_PER_MS: u128 = 1_000_000;

/// One token bucket: `size` tokens refilled continuously over `refill_time` ms, plus a
/// one-time burst spent first and never refilled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    size: u64,
    refill_ns: u128,
    /// Tokens left in the bucket; negative after one request larger than the bucket.
    budget: i128,
    burst: u64,
    /// The time the budget was last brought up to date.
    last: u64,
}

impl TokenBucket {
    /// None when the bucket is off (size 0 or refill_time 0). A bucket starts full.
    pub fn new(cfg: &BucketConfig, now: u64) -> Option<TokenBucket> {
        if cfg.size == 0 || cfg.refill_time == 0 {
            return None;
        }
        Some(TokenBucket {
            size: cfg.size,
            refill_ns: u128::from(cfg.refill_time) * NS_PER_MS,
            budget: i128::from(cfg.size),
            burst: cfg.one_time_burst.unwrap_or(0),
            last: now,
        })
    }

    /// Adds the tokens earned since the last update, continuously: size per refill time.
    fn refill(&mut self, now: u64) {
        let elapsed = u128::from(now.saturating_sub(self.last));
        let size = i128::from(self.size);
        if self.budget >= size {
            self.last = now;
            return;
        }
        let earned = elapsed * u128::from(self.size) / self.refill_ns;
        if earned == 0 {
            return;
        }
        let room = (size - self.budget) as u128;
        if earned >= room {
            self.budget = size;
            self.last = now;
        } else {
            self.budget += earned as i128;
            // Keep the fraction of a token not yet earned: move `last` only by the time the
            // whole tokens took.
            let used = earned * self.refill_ns / u128::from(self.size);
            self.last += used as u64;
        }
    }

    /// Whether `n` tokens can be taken now (after a refill). A request larger than the bucket
    /// passes when the bucket is full, and leaves it in debt.
    fn can_take(&self, n: u64) -> bool {
        if n <= self.burst {
            return true;
        }
        let rest = i128::from(n - self.burst);
        rest <= self.budget
            || (rest > i128::from(self.size) && self.budget >= i128::from(self.size))
    }

    fn take(&mut self, n: u64) {
        if n <= self.burst {
            self.burst -= n;
        } else {
            self.budget -= i128::from(n - self.burst);
            self.burst = 0;
        }
    }

    /// Takes `n` tokens (the one-time burst first) if the bucket holds them now, after a
    /// refill; never goes into debt. For output that is dropped rather than delayed when over
    /// the limit (the serial console).
    pub fn try_take(&mut self, n: u64, now: u64) -> bool {
        self.refill(now);
        let ok = n <= self.burst || i128::from(n - self.burst) <= self.budget;
        if ok {
            self.take(n);
        }
        ok
    }

    /// Tokens available now, burst included (negative: in debt).
    pub fn available(&mut self, now: u64) -> i128 {
        self.refill(now);
        self.budget + i128::from(self.burst)
    }

    pub fn size(&self) -> u64 {
        self.size
    }
}

/// The two buckets of one device queue (or one device): bandwidth in bytes, ops in requests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    /// A request was refused; the device waits for its timer.
    blocked: bool,
}

impl RateLimiter {
    pub fn new(cfg: &RateLimiterConfig, now: u64) -> RateLimiter {
        RateLimiter {
            bandwidth: cfg
                .bandwidth
                .as_ref()
                .and_then(|b| TokenBucket::new(b, now)),
            ops: cfg.ops.as_ref().and_then(|b| TokenBucket::new(b, now)),
            blocked: false,
        }
    }

    /// From an optional configuration: no configuration limits nothing.
    pub fn from_config(cfg: Option<&RateLimiterConfig>, now: u64) -> RateLimiter {
        cfg.map(|c| RateLimiter::new(c, now)).unwrap_or_default()
    }

    /// Whether either bucket limits anything.
    pub fn is_active(&self) -> bool {
        self.bandwidth.is_some() || self.ops.is_some()
    }

    /// Takes `bytes` from the bandwidth bucket and `ops` from the ops bucket, both or neither.
    /// A refusal marks the limiter blocked until [`RateLimiter::unblock`].
    pub fn consume(&mut self, bytes: u64, ops: u64, now: u64) -> bool {
        for b in [&mut self.bandwidth, &mut self.ops].into_iter().flatten() {
            b.refill(now);
        }
        let ok = self.bandwidth.as_ref().is_none_or(|b| b.can_take(bytes))
            && self.ops.as_ref().is_none_or(|b| b.can_take(ops));
        if ok {
            if let Some(b) = self.bandwidth.as_mut() {
                b.take(bytes);
            }
            if let Some(b) = self.ops.as_mut() {
                b.take(ops);
            }
        } else {
            self.blocked = true;
        }
        ok
    }

    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The retry timer fired: the device may try again.
    pub fn unblock(&mut self) {
        self.blocked = false;
    }

    /// `PATCH`: a bucket present in `cfg` replaces the current one (size 0 turns it off), an
    /// absent one is kept.
    pub fn update(&mut self, cfg: &RateLimiterConfig, now: u64) {
        if let Some(b) = &cfg.bandwidth {
            self.bandwidth = TokenBucket::new(b, now);
        }
        if let Some(b) = &cfg.ops {
            self.ops = TokenBucket::new(b, now);
        }
    }

    pub fn bandwidth(&self) -> Option<&TokenBucket> {
        self.bandwidth.as_ref()
    }

    pub fn ops(&self) -> Option<&TokenBucket> {
        self.ops.as_ref()
    }
}

/// Nanoseconds of CLOCK_MONOTONIC: the clock the devices give their limiters.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass, which lives on this stack.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A one-shot, non-blocking timerfd a throttled device arms; the VMM thread watches a
/// duplicate of it (see [`ThrottleTimer::watch_fd`]).
pub struct ThrottleTimer {
    fd: File,
    armed: bool,
}

impl ThrottleTimer {
    pub fn new() -> std::io::Result<ThrottleTimer> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor this File now owns.
        Ok(ThrottleTimer {
            fd: unsafe { File::from_raw_fd(fd) },
            armed: false,
        })
    }

    /// Fires once in [`RETRY_MS`]; a timer already armed is left as it is.
    pub fn arm(&mut self) {
        if self.armed {
            return;
        }
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: 0,
                tv_nsec: (RETRY_MS * 1_000_000) as i64,
            },
        };
        // SAFETY: the fd is a timerfd we own; the spec lives on this stack.
        let r =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if r < 0 {
            log::error!(
                "cannot arm a rate limiter timer: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        self.armed = true;
    }

    /// The timer fired (the watcher read it).
    pub fn fired(&mut self) {
        self.armed = false;
    }

    /// A duplicate of the timerfd for the VMM thread's event loop. Wrapped as an `EventFd`:
    /// a timerfd is read like one (8 bytes, the expiration count), so the queue notifier
    /// machinery serves it unchanged.
    pub fn watch_fd(&self) -> std::io::Result<EventFd> {
        let f = self.fd.try_clone()?;
        // SAFETY: `f` owns a fresh duplicate, handed over to the EventFd.
        Ok(unsafe { EventFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(f)) })
    }
}

/// The rate limiters of one device (one per limited queue, `N` of them) and the retry timer
/// they share: the timer is armed when any limiter refuses.
pub struct Throttle<const N: usize = 1> {
    limiters: [RateLimiter; N],
    /// None for a device made without one (unlimited, or tests): never armed nor watched.
    timer: Option<ThrottleTimer>,
}

impl<const N: usize> Default for Throttle<N> {
    fn default() -> Self {
        Throttle {
            limiters: std::array::from_fn(|_| RateLimiter::default()),
            timer: None,
        }
    }
}

impl<const N: usize> Throttle<N> {
    /// `limiters`, with a timer when `timer` is set (needed to be throttled or `PATCH`ed).
    pub fn new(limiters: [RateLimiter; N], timer: bool) -> std::io::Result<Self> {
        let timer = if timer {
            Some(ThrottleTimer::new()?)
        } else {
            None
        };
        Ok(Throttle { limiters, timer })
    }

    /// Whether limiter `i` refused and waits for the timer.
    pub fn is_blocked(&self, i: usize) -> bool {
        self.limiters[i].is_blocked()
    }

    /// Takes `bytes` and `ops` from limiter `i`; a refusal arms the timer.
    pub fn try_consume(&mut self, i: usize, bytes: u64, ops: u64) -> bool {
        let l = &mut self.limiters[i];
        if !l.is_active() || l.consume(bytes, ops, now_ns()) {
            return true;
        }
        if let Some(t) = self.timer.as_mut() {
            t.arm();
        }
        false
    }

    /// The timer fired (or the device is reset): every limiter may try again. Returns which
    /// ones were blocked.
    pub fn release(&mut self) -> [bool; N] {
        if let Some(t) = self.timer.as_mut() {
            t.fired();
        }
        std::array::from_fn(|i| {
            let blocked = self.limiters[i].is_blocked();
            self.limiters[i].unblock();
            blocked
        })
    }

    /// A duplicate of the timer for the VMM thread (see [`ThrottleTimer::watch_fd`]); errors
    /// are logged under `device`'s name.
    pub fn watch_fd(&self, device: &str) -> Option<EventFd> {
        let t = self.timer.as_ref()?;
        t.watch_fd()
            .map_err(|e| log::error!("{device}: cannot duplicate the throttle timer: {e}"))
            .ok()
    }

    /// `PATCH`: `cfgs[i]` updates limiter `i` (see [`RateLimiter::update`]). Refused when
    /// there is no timer, `what` naming the device in the error.
    pub fn update(
        &mut self,
        cfgs: [Option<&RateLimiterConfig>; N],
        what: &str,
    ) -> Result<(), String> {
        if self.timer.is_none() {
            return Err(format!("the {what} was built without a rate limiter timer"));
        }
        let now = now_ns();
        for (l, cfg) in self.limiters.iter_mut().zip(cfgs) {
            if let Some(c) = cfg {
                l.update(c, now);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn bucket(size: u64, refill_time: u64, burst: Option<u64>) -> BucketConfig {
        BucketConfig {
            size,
            one_time_burst: burst,
            refill_time,
        }
    }

    fn limiter(bw: Option<BucketConfig>, ops: Option<BucketConfig>) -> RateLimiter {
        RateLimiter::new(&RateLimiterConfig { bandwidth: bw, ops }, 0)
    }

    #[test]
    fn try_take_spends_the_burst_first_and_never_goes_into_debt() {
        // 100 tokens per 100 ms, a one-time burst of 10.
        let mut b = TokenBucket::new(&bucket(100, 100, Some(10)), 0).unwrap();
        assert!(b.try_take(60, 0));
        assert!(b.try_take(50, 0));
        // 10 + 100 - 110 = 0 left: one more is refused, and refusing takes nothing.
        assert!(!b.try_take(1, 0));
        assert_eq!(b.available(0), 0);
        // More than the bucket holds is never taken, not even when full.
        assert!(!b.try_take(101, 10 * MS * 100));
        assert_eq!(b.available(10 * MS * 100), 100);
        // Refill is continuous: 1 token per ms.
        let mut b = TokenBucket::new(&bucket(100, 100, None), 0).unwrap();
        assert!(b.try_take(100, 0));
        assert!(!b.try_take(5, 4 * MS));
        assert!(b.try_take(5, 5 * MS));
        assert!(!b.try_take(1, 5 * MS));
    }

    #[test]
    fn off_buckets_limit_nothing() {
        let mut r = limiter(Some(bucket(0, 100, None)), Some(bucket(10, 0, None)));
        assert!(!r.is_active());
        for _ in 0..1000 {
            assert!(r.consume(u64::MAX / 2, 1, 0));
        }
        assert!(!RateLimiter::from_config(None, 0).is_active());
    }

    #[test]
    fn starts_full_and_refills_continuously() {
        let mut r = limiter(None, Some(bucket(2, 100, None)));
        assert!(r.consume(0, 1, 0));
        assert!(r.consume(0, 1, 0));
        assert!(!r.consume(0, 1, 0));
        assert!(r.is_blocked());
        r.unblock();
        // 2 per 100 ms: one token every 50 ms; 49 ms is not enough.
        assert!(!r.consume(0, 1, 49 * MS));
        assert!(r.consume(0, 1, 50 * MS));
        assert!(!r.consume(0, 1, 50 * MS));
        // The fraction earned before a refill is not lost: 50 + 25 + 25 ms make one more.
        assert!(!r.consume(0, 1, 75 * MS));
        assert!(r.consume(0, 1, 100 * MS));
        // A long idle time refills to the size, no further.
        assert_eq!(r.ops.as_mut().unwrap().available(10_000 * MS), 2);
    }

    #[test]
    fn one_time_burst_is_spent_first_and_never_refills() {
        let mut r = limiter(Some(bucket(1000, 1000, Some(500))), None);
        assert!(r.consume(500, 1, 0));
        assert_eq!(r.bandwidth.as_mut().unwrap().available(0), 1000);
        assert!(r.consume(1000, 1, 0));
        assert!(!r.consume(1, 1, 0));
        // After a full refill time: the size again, no burst.
        assert_eq!(r.bandwidth.as_mut().unwrap().available(1000 * MS), 1000);
        assert!(r.consume(1000, 1, 1000 * MS));
        assert!(!r.consume(1, 1, 1000 * MS));
    }

    #[test]
    fn both_buckets_or_neither() {
        let mut r = limiter(Some(bucket(100, 100, None)), Some(bucket(10, 100, None)));
        assert!(r.consume(60, 1, 0));
        // Bandwidth refuses: the ops bucket is left untouched.
        assert!(!r.consume(60, 1, 0));
        assert_eq!(r.ops.as_mut().unwrap().available(0), 9);
        assert_eq!(r.bandwidth.as_mut().unwrap().available(0), 40);
    }

    #[test]
    fn a_request_bigger_than_the_bucket_passes_when_full_and_leaves_debt() {
        let mut r = limiter(Some(bucket(100, 100, None)), None);
        assert!(r.consume(250, 1, 0));
        assert_eq!(r.bandwidth.as_mut().unwrap().available(0), -150);
        // 150 ms to pay the debt, 100 more to fill again.
        assert!(!r.consume(1, 1, 100 * MS));
        assert!(r.consume(1, 1, 151 * MS));
        assert!(!r.consume(250, 1, 200 * MS));
        assert!(r.consume(250, 1, 300 * MS));
    }

    #[test]
    fn update_replaces_present_buckets_and_keeps_absent_ones() {
        let mut r = limiter(Some(bucket(100, 100, None)), Some(bucket(10, 100, None)));
        assert!(r.consume(100, 10, 0));
        r.update(
            &RateLimiterConfig {
                bandwidth: None,
                ops: Some(bucket(5, 1000, None)),
            },
            0,
        );
        // Ops replaced (and full), bandwidth kept (and empty).
        assert_eq!(r.ops().unwrap().size(), 5);
        assert_eq!(r.bandwidth.as_mut().unwrap().available(0), 0);
        r.update(
            &RateLimiterConfig {
                bandwidth: Some(bucket(0, 0, None)),
                ops: None,
            },
            0,
        );
        assert!(r.bandwidth().is_none());
        assert!(r.consume(1_000_000, 1, 0));
    }

    #[test]
    fn timer_fires_once_and_reads_like_an_eventfd() {
        let mut t = ThrottleTimer::new().unwrap();
        let w = t.watch_fd().unwrap();
        assert!(w.read().is_err(), "not armed: nothing to read");
        t.arm();
        t.arm();
        let mut fired = false;
        for _ in 0..100 {
            std::thread::sleep(std::time::Duration::from_millis(10));
            if let Ok(n) = w.read() {
                assert_eq!(n, 1);
                fired = true;
                break;
            }
        }
        assert!(fired);
        t.fired();
        assert!(!t.armed);
    }
}
