//! virtio-rng: one queue whose device-writable buffers are filled from the host's random
//! source (getrandom), at most 64 KiB per request.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestMemoryMmap};

use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{collect_chain, ChainError, DeviceError, VirtioDevice, TYPE_RNG, VIRTIO_F_VERSION_1};
use crate::api::models::RateLimiter as RateLimiterConfig;
use crate::devices::rate_limiter::{now_ns, RateLimiter, Throttle};
use crate::metrics::METRICS;

/// The most bytes one request gets.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Default)]
pub struct Rng {
    buf: Vec<u8>,
    /// Ops (one per request) and bandwidth (bytes given); a timer when the device has a
    /// rate limiter.
    throttle: Throttle,
}

impl Rng {
    pub fn new() -> Rng {
        Rng::default()
    }

    /// A device limited by `cfg`.
    pub fn with_rate_limiter(cfg: &RateLimiterConfig) -> std::io::Result<Rng> {
        let limiter = RateLimiter::new(cfg, now_ns());
        let active = limiter.is_active();
        Ok(Rng {
            buf: Vec::new(),
            throttle: Throttle::new([limiter], active)?,
        })
    }

    /// The bytes a request would get.
    fn cost(descs: &[Descriptor]) -> u64 {
        let room: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
        room.min(MAX_REQUEST_BYTES as u64)
    }

    /// Fills the chain's buffers; returns the bytes written.
    fn fill(&mut self, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Result<u32, String> {
        if let Some(i) = descs.iter().position(|d| !d.is_write_only()) {
            return Err(ChainError::WrongDirection { index: i }.to_string());
        }
        let mut written = 0usize;
        for d in descs {
            let room = MAX_REQUEST_BYTES - written;
            let n = (d.len() as usize).min(room);
            if n == 0 {
                continue;
            }
            self.buf.resize(n, 0);
            getrandom(&mut self.buf[..n]).map_err(|e| format!("getrandom: {e}"))?;
            mem.write_slice(&self.buf[..n], d.addr())
                .map_err(|e| e.to_string())?;
            written += n;
        }
        Ok(written as u32)
    }
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the pointer and length describe a live, writable slice.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

impl Rng {
    /// Handles the chains the driver made available on the one queue.
    pub fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, DeviceError> {
        if self.throttle.is_blocked(0) {
            return Ok(false);
        }
        let mut used_any = false;
        while let Some(chain) = super::pop_chain(mem, queue)? {
            let head = chain.head_index();
            let descs = collect_chain(mem, chain);
            if let Ok(d) = &descs {
                if !self.throttle.try_consume(0, Self::cost(d), 1) {
                    METRICS.entropy.rate_limiter_throttled_events.inc();
                    queue.go_to_previous_position();
                    break;
                }
            }
            let res = descs
                .map_err(|e| e.to_string())
                .and_then(|d| self.fill(mem, &d));
            let len = match res {
                Ok(n) => {
                    METRICS.entropy.entropy_bytes.add(u64::from(n));
                    n
                }
                Err(e) => {
                    log::debug!("virtio-rng: refused request: {e}");
                    METRICS.entropy.invalid_reqs.inc();
                    0
                }
            };
            queue
                .add_used(mem, head, len)
                .map_err(|e| DeviceError::UsedRing(e.to_string()))?;
            used_any = true;
        }
        Ok(used_any)
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | super::VIRTIO_RING_F_EVENT_IDX
    }

    fn config_space(&self) -> Vec<u8> {
        Vec::new()
    }

    fn process_queues(
        &mut self,
        _index: usize,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
    ) -> Result<bool, DeviceError> {
        match queues.first_mut() {
            Some(q) => self.process_queue(mem, q),
            None => Ok(false),
        }
    }

    fn reset(&mut self) {
        self.throttle.release();
    }

    fn throttle_timer(&self) -> Option<EventFd> {
        self.throttle.watch_fd("virtio-rng")
    }

    fn process_throttled(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
    ) -> Result<bool, DeviceError> {
        self.throttle.release();
        match queues.first_mut() {
            Some(q) => self.process_queue(mem, q),
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn fills_writable_buffers_up_to_64k() {
        let mem = memory();
        let mut q = queue(&mem, 16);
        let mut rng = Rng::new();
        // Two descriptors, 32 bytes each.
        write_desc(&mem, 0, 0x8000, 32, WRITE | NEXT, 1);
        write_desc(&mem, 1, 0x9000, 32, WRITE, 0);
        make_avail(&mem, 0, 0);
        assert!(rng.process_queue(&mem, &mut q).unwrap());
        assert_eq!(used_elem(&mem, 0), (0, 64));
        let mut got = [0u8; 32];
        mem.read_slice(&mut got, GuestAddress(0x8000)).unwrap();
        assert_ne!(got, [0u8; 32]);

        // 128 KiB asked: 64 KiB given.
        write_desc(&mem, 2, 0x10000, 0x20000, WRITE, 0);
        make_avail(&mem, 1, 2);
        rng.process_queue(&mem, &mut q).unwrap();
        assert_eq!(used_elem(&mem, 1), (2, 65536));
    }

    #[test]
    fn refuses_read_only_and_outside_memory() {
        let mem = memory();
        let mut q = queue(&mem, 16);
        let mut rng = Rng::new();
        write_desc(&mem, 0, 0x8000, 32, 0, 0);
        make_avail(&mem, 0, 0);
        let before = METRICS.entropy.invalid_reqs.count();
        rng.process_queue(&mem, &mut q).unwrap();
        assert_eq!(used_elem(&mem, 0), (0, 0));
        assert_eq!(METRICS.entropy.invalid_reqs.count(), before + 1);

        write_desc(&mem, 1, 0xff000, 0x2000, WRITE, 0);
        make_avail(&mem, 1, 1);
        rng.process_queue(&mem, &mut q).unwrap();
        assert_eq!(used_elem(&mem, 1), (1, 0));

        // A loop: 2 -> 3 -> 2.
        write_desc(&mem, 2, 0x8000, 8, WRITE | NEXT, 3);
        write_desc(&mem, 3, 0x8000, 8, WRITE | NEXT, 2);
        make_avail(&mem, 2, 2);
        let before = METRICS.virtio.malformed_chains.count();
        rng.process_queue(&mem, &mut q).unwrap();
        assert_eq!(used_elem(&mem, 2), (2, 0));
        assert!(METRICS.virtio.malformed_chains.count() > before);

        // A next index outside the table.
        write_desc(&mem, 4, 0x8000, 8, WRITE | NEXT, 999);
        make_avail(&mem, 3, 4);
        rng.process_queue(&mem, &mut q).unwrap();
        assert_eq!(used_elem(&mem, 3), (4, 0));
        assert_eq!(used_idx(&mem), 4);
    }
}
