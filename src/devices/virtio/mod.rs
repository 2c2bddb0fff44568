//! virtio devices over the virtio-mmio transport (version 2 registers).
//!
//! A device model ([`VirtioDevice`]) is a plain state machine: it sees guest memory (through
//! `vm_memory`) and its queues, never KVM or a thread. The transport ([`mmio::MmioTransport`])
//! is a `BusDevice` on the MMIO bus; its interrupt is an `EventFdTrigger` (a KVM irqfd) and its
//! queue notifications arrive on an `EventFd` (a KVM ioeventfd on QueueNotify), handled on the
//! VMM thread by a [`QueueNotifier`] subscriber. A QueueNotify write that reaches the bus (no
//! ioeventfd) processes the queue right away.

pub mod block;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod tap;
pub mod vsock;

use std::cell::Cell;
use std::fmt;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::lock;
use crate::metrics::METRICS;

/// `VIRTIO_F_VERSION_1`: every device offers it.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_EVENT_IDX`: the driver and the device tell each other, through `used_event`
/// and `avail_event`, at which index they next want an interrupt or a notification.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// Every queue holds up to this many descriptors.
pub const QUEUE_MAX_SIZE: u16 = 256;

pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;

/// Why a device cannot go on: the transport then sets DEVICE_NEEDS_RESET.
#[derive(Debug, PartialEq, Eq)]
pub enum DeviceError {
    /// The available ring index moved by more than the queue size.
    AvailRing(String),
    /// The used ring cannot be written.
    UsedRing(String),
}

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            DeviceError::AvailRing(e) => write!(f, "bad available ring: {e}"),
            DeviceError::UsedRing(e) => write!(f, "cannot write the used ring: {e}"),
        }
    }
}

impl std::error::Error for DeviceError {}

/// A malformed descriptor chain, as the device sees it.
#[derive(Debug, PartialEq, Eq)]
pub enum ChainError {
    /// The chain ended on a descriptor that still says NEXT: it loops, is longer than the
    /// queue, names a descriptor outside the table, or exceeds 4 GiB.
    Truncated,
    /// A descriptor's buffer is not inside guest memory.
    OutsideMemory { addr: u64, len: u32 },
    /// A descriptor the device must write is read-only, or the other way round.
    WrongDirection { index: usize },
    /// A descriptor is too short for what it must hold.
    TooShort { index: usize, len: u32 },
    /// A chain without the descriptors the request needs.
    TooFewDescriptors(usize),
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            ChainError::Truncated => write!(
                f,
                "descriptor chain loops, is too long or points outside the table"
            ),
            ChainError::OutsideMemory { addr, len } => {
                write!(f, "buffer {addr:#x}+{len:#x} is outside guest memory")
            }
            ChainError::WrongDirection { index } => {
                write!(f, "descriptor {index} has the wrong direction")
            }
            ChainError::TooShort { index, len } => {
                write!(f, "descriptor {index} is too short ({len} bytes)")
            }
            ChainError::TooFewDescriptors(n) => write!(f, "chain of only {n} descriptors"),
        }
    }
}

impl std::error::Error for ChainError {}

/// The descriptors of one chain, checked for structure only: no loop, no truncation, not
/// longer than a queue. Buffers are not checked against guest memory (see [`check_buffer`]).
/// Counts a malformed chain in the `virtio` metrics.
pub fn collect_chain_structure<I: Iterator<Item = Descriptor>>(
    chain: I,
) -> Result<Vec<Descriptor>, ChainError> {
    let descs: Vec<Descriptor> = chain.take(usize::from(QUEUE_MAX_SIZE) + 1).collect();
    let res = match descs.last() {
        None => Err(ChainError::TooFewDescriptors(0)),
        Some(d) if d.has_next() => Err(ChainError::Truncated),
        Some(_) => Ok(descs),
    };
    if res.is_err() {
        METRICS.virtio.malformed_chains.inc();
    }
    res
}

/// Whether `d`'s buffer lies inside guest memory with the access its direction needs.
pub fn check_buffer(mem: &GuestMemoryMmap, d: &Descriptor) -> Result<(), ChainError> {
    let access = if d.is_write_only() {
        Permissions::Write
    } else {
        Permissions::Read
    };
    if d.len() > 0 && !mem.check_range(d.addr(), d.len() as usize, access) {
        return Err(ChainError::OutsideMemory {
            addr: d.addr().0,
            len: d.len(),
        });
    }
    Ok(())
}

/// The descriptors of one chain, checked: no loop, no truncation, every buffer inside guest
/// memory. Counts a malformed chain in the `virtio` metrics.
pub fn collect_chain<I: Iterator<Item = Descriptor>>(
    mem: &GuestMemoryMmap,
    chain: I,
) -> Result<Vec<Descriptor>, ChainError> {
    let descs = collect_chain_structure(chain)?;
    if let Err(e) = descs.iter().try_for_each(|d| check_buffer(mem, d)) {
        METRICS.virtio.malformed_chains.inc();
        return Err(e);
    }
    Ok(descs)
}

/// The next available chain of `queue`, or None when the driver has made none available.
///
/// With EVENT_IDX negotiated, an empty queue re-enables notifications (writes `avail_event`
/// = the next index the device will read) and then checks the available ring again, so a
/// chain published between the two is not left waiting for a notification that the driver
/// will not send. Without EVENT_IDX the queue is only read, as before.
pub fn pop_chain<'a>(
    mem: &'a GuestMemoryMmap,
    queue: &mut Queue,
) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, DeviceError> {
    pop_chain_rearm(mem, queue, true)
}

/// Chains one pass over a device's queues may pop, as the transport runs it. A guest that
/// keeps refilling a queue from another vCPU would otherwise hold the VMM thread in one pass
/// for as long as it likes, and with it the API and every other device. A pass that spends
/// its budget sees its queues as empty; the transport then runs it again after the events
/// already waiting. A full ring is one pass.
pub const PASS_BUDGET: usize = QUEUE_MAX_SIZE as usize;

thread_local! {
    /// What the current pass may still pop (None: no limit, as for a device driven directly)
    /// and whether it wanted more.
    static PASS: Cell<(Option<usize>, bool)> = const { Cell::new((None, false)) };
}

/// Runs `f` as one pass that may pop `budget` chains; returns what `f` returned and whether
/// the pass stopped for want of budget.
pub fn with_pass_budget<T>(budget: usize, f: impl FnOnce() -> T) -> (T, bool) {
    PASS.with(|p| p.set((Some(budget), false)));
    let out = f();
    let (_, spent) = PASS.with(|p| p.replace((None, false)));
    (out, spent)
}

/// Whether the current pass may pop one more chain; if not, records that it wanted to.
fn pass_may_pop() -> bool {
    PASS.with(|p| match p.get() {
        (Some(0), _) => {
            p.set((Some(0), true));
            false
        }
        _ => true,
    })
}

fn pass_popped() {
    PASS.with(|p| {
        if let (Some(n), spent) = p.get() {
            p.set((Some(n.saturating_sub(1)), spent));
        }
    });
}

/// Like [`pop_chain`]; `rearm` false leaves notifications as they are when the queue is
/// empty. For a device with requests still in flight, which looks at the queue again when
/// they complete: with EVENT_IDX the driver then does not notify for chains it adds
/// meanwhile (`avail_event` stays behind), and the device picks them up with the
/// completions. Once nothing is in flight the device must pop with `rearm` true.
pub fn pop_chain_rearm<'a>(
    mem: &'a GuestMemoryMmap,
    queue: &mut Queue,
    rearm: bool,
) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, DeviceError> {
    // Out of budget: the transport runs the pass again (notifications need not be re-enabled).
    if !pass_may_pop() {
        return Ok(None);
    }
    // A guest flipping its avail index back and forth could keep the re-check going: after a
    // few rounds give up; `avail_event` is set, so the driver notifies for its next chain.
    let size = queue.size();
    for _ in 0..4 {
        let next = {
            let mut iter = queue
                .iter(mem)
                .map_err(|e| DeviceError::AvailRing(e.to_string()))?;
            iter.next()
        };
        // A head the device could never give back in the used ring.
        if let Some(head) = next.as_ref().map(|c| c.head_index()).filter(|&h| h >= size) {
            METRICS.virtio.malformed_chains.inc();
            return Err(DeviceError::AvailRing(format!(
                "head index {head} beyond the queue of {size}"
            )));
        }
        if next.is_some() {
            pass_popped();
            return Ok(next);
        }
        if !queue.event_idx_enabled() || !rearm {
            return Ok(None);
        }
        match queue.enable_notification(mem) {
            Ok(true) => continue,
            Ok(false) => return Ok(None),
            Err(e) => return Err(DeviceError::UsedRing(e.to_string())),
        }
    }
    Ok(None)
}

/// What a device model implements; the transport does the rest.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// The features offered, VIRTIO_F_VERSION_1 included.
    fn avail_features(&self) -> u64;
    /// The device's configuration space; bytes past its end read as 0.
    fn config_space(&self) -> Vec<u8>;
    /// How many queues the device has.
    fn queue_count(&self) -> usize {
        1
    }
    /// Handles the chains the driver made available on queue `index` (below `queue_count`);
    /// returns whether any was used (the driver may need an interrupt).
    fn process_queues(
        &mut self,
        index: usize,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
    ) -> Result<bool, DeviceError>;
    /// The backend has work for the device (a readable TAP); returns whether a chain was used.
    fn process_backend(
        &mut self,
        _mem: &GuestMemoryMmap,
        _queues: &mut [Queue],
    ) -> Result<bool, DeviceError> {
        Ok(false)
    }
    /// The driver set FEATURES_OK with these features (a subset of `avail_features`).
    fn ack_features(&mut self, _features: u64) {}
    /// The driver reset the device.
    fn reset(&mut self) {}
    /// An eventfd the VMM thread watches for the device's backend (io_uring completions);
    /// when it fires the transport calls [`VirtioDevice::process_backend`].
    fn completion_event(&self) -> Option<EventFd> {
        None
    }
    /// Replaces the device's backing file (`PATCH /drives`); the transport then signals a
    /// configuration change.
    fn swap_backing_file(&mut self, _file: std::fs::File) -> Result<(), String> {
        Err("this device has no backing file".into())
    }
    /// The timer a rate-limited device arms when it is throttled (a timerfd read like an
    /// eventfd); when it fires the transport calls [`VirtioDevice::process_throttled`].
    fn throttle_timer(&self) -> Option<EventFd> {
        None
    }
    /// The throttle timer fired: the device takes requests again.
    fn process_throttled(
        &mut self,
        _mem: &GuestMemoryMmap,
        _queues: &mut [Queue],
    ) -> Result<bool, DeviceError> {
        Ok(false)
    }
    /// `PATCH` of the device's rate limiters: `first` is a drive's (or an interface's RX)
    /// limiter, `second` an interface's TX limiter. Present buckets replace, absent ones stay.
    fn update_rate_limiters(
        &mut self,
        _first: Option<&crate::api::models::RateLimiter>,
        _second: Option<&crate::api::models::RateLimiter>,
    ) -> Result<(), String> {
        Err("this device has no rate limiter".into())
    }
}

/// Pops every available chain of `queue` and hands it to `handle`, which returns the used
/// length. Shared by the devices.
pub fn for_each_chain<F>(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    mut handle: F,
) -> Result<bool, DeviceError>
where
    F: FnMut(&GuestMemoryMmap, Result<Vec<Descriptor>, ChainError>) -> u32,
{
    for_each_chain_with(mem, queue, true, |mem, _head, descs| {
        Some(handle(mem, descs))
    })
}

/// Like [`for_each_chain`]; `check_memory` false leaves the buffers' memory check to
/// `handle`, and `handle` may return None to complete the chain later itself (with
/// `Queue::add_used`, given the head index it receives).
pub fn for_each_chain_with<F>(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    check_memory: bool,
    mut handle: F,
) -> Result<bool, DeviceError>
where
    F: FnMut(&GuestMemoryMmap, u16, Result<Vec<Descriptor>, ChainError>) -> Option<u32>,
{
    let mut used_any = false;
    while let Some(chain) = pop_chain(mem, queue)? {
        let head = chain.head_index();
        let descs = if check_memory {
            collect_chain(mem, chain)
        } else {
            collect_chain_structure(chain)
        };
        if let Some(len) = handle(mem, head, descs) {
            queue
                .add_used(mem, head, len)
                .map_err(|e| DeviceError::UsedRing(e.to_string()))?;
            used_any = true;
        }
    }
    Ok(used_any)
}

/// Something that can process a queue on notification: the transport.
pub trait QueueHandler: Send {
    fn notified(&mut self, queue_index: u32);
}

/// The VMM thread's end of one queue's ioeventfd: an event-loop subscriber owned by the
/// device, that processes the queue when the guest notifies it.
pub struct QueueNotifier {
    evt: EventFd,
    queue_index: u32,
    handler: Arc<Mutex<dyn QueueHandler>>,
}

impl QueueNotifier {
    pub fn new(evt: EventFd, queue_index: u32, handler: Arc<Mutex<dyn QueueHandler>>) -> Self {
        QueueNotifier {
            evt,
            queue_index,
            handler,
        }
    }

    pub fn fd(&self) -> i32 {
        self.evt.as_raw_fd()
    }
}

impl MutEventSubscriber for QueueNotifier {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        lock(&self.handler).notified(self.queue_index);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::error!("cannot watch a virtio queue notification: {e:?}");
        }
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    //! Builds split virtqueues in a test's guest memory.
    use super::*;
    use vm_memory::{Address, Bytes, GuestAddress};

    pub const DESC: u64 = 0x1000;
    pub const AVAIL: u64 = 0x3000;
    pub const USED: u64 = 0x4000;
    pub const NEXT: u16 = 1;
    pub const WRITE: u16 = 2;

    pub fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    pub fn queue(mem: &GuestMemoryMmap, size: u16) -> Queue {
        let mut q = Queue::new(QUEUE_MAX_SIZE).unwrap();
        q.set_size(size);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(mem));
        q
    }

    pub fn write_desc(mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC + u64::from(i) * 16);
        mem.write_obj(addr.to_le(), at).unwrap();
        mem.write_obj(len.to_le(), at.unchecked_add(8)).unwrap();
        mem.write_obj(flags.to_le(), at.unchecked_add(12)).unwrap();
        mem.write_obj(next.to_le(), at.unchecked_add(14)).unwrap();
    }

    /// Makes chain `head` available at ring slot `slot` and publishes avail idx `slot + 1`.
    pub fn make_avail(mem: &GuestMemoryMmap, slot: u16, head: u16) {
        mem.write_obj(head.to_le(), GuestAddress(AVAIL + 4 + 2 * u64::from(slot)))
            .unwrap();
        mem.write_obj((slot + 1).to_le(), GuestAddress(AVAIL + 2))
            .unwrap();
    }

    pub fn used_idx(mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// (id, len) of used ring entry `slot`.
    pub fn used_elem(mem: &GuestMemoryMmap, slot: u16) -> (u32, u32) {
        let at = USED + 4 + 8 * u64::from(slot);
        (
            mem.read_obj(GuestAddress(at)).unwrap(),
            mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn pop_chain_re_enables_notifications_only_with_event_idx() {
        let mem = memory();
        let avail_event = GuestAddress(USED + 4 + 8 * 16);
        // Without EVENT_IDX the rings are only read.
        let mut q = queue(&mem, 16);
        mem.write_obj(0xabcdu16, avail_event).unwrap();
        assert!(pop_chain(&mem, &mut q).unwrap().is_none());
        assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 0xabcd);

        // With it, an empty queue publishes avail_event = the next index to read.
        let mut q = queue(&mem, 16);
        q.set_event_idx(true);
        write_desc(&mem, 0, 0x8000, 16, WRITE, 0);
        make_avail(&mem, 0, 0);
        assert_eq!(pop_chain(&mem, &mut q).unwrap().unwrap().head_index(), 0);
        assert!(pop_chain(&mem, &mut q).unwrap().is_none());
        assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 1);
        make_avail(&mem, 1, 0);
        assert!(pop_chain(&mem, &mut q).unwrap().is_some());
        assert!(pop_chain(&mem, &mut q).unwrap().is_none());
        assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 2);
        // A head index beyond the queue is an error, before anything is read of it.
        make_avail(&mem, 2, 16);
        assert!(matches!(
            pop_chain(&mem, &mut q),
            Err(DeviceError::AvailRing(e)) if e.contains("head index 16")
        ));
        // A bogus avail index is still an error.
        mem.write_obj(1000u16, GuestAddress(AVAIL + 2)).unwrap();
        assert!(matches!(
            pop_chain(&mem, &mut q),
            Err(DeviceError::AvailRing(_))
        ));
    }
}
