//! virtio-net: an RX queue (0) and a TX queue (1) over a TAP backend. Every frame carries the
//! 12-byte `virtio_net_hdr_v1`, passed between the guest and the TAP as it is (the device only
//! sets `num_buffers` on RX). Checksum and segmentation offloads are offered and passed to the
//! TAP with `TUNSETOFFLOAD` from what the driver accepted (and turned off at a reset); a frame
//! the TAP queued with more than the driver accepted (before a reset and a renegotiation) has
//! its checksum completed here or, GSO, is dropped. Without MRG_RXBUF each RX chain must
//! hold a whole frame and its header (`num_buffers` = 1); with it a frame spans as many chains
//! as it needs, and `num_buffers` in the first one says how many.
//!
//! RX is driven by the TAP's readiness (edge-triggered, see [`TapWatcher`]) and by RX queue
//! notifications: the device reads frames while it has RX chains for them, and keeps at most one
//! frame pending when it has none; the next RX notification resumes it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::mmio::MmioTransport;
use super::tap::{NetBackend, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_UFO, VNET_HDR_LEN};
use vmm_sys_util::eventfd::EventFd;

use super::{collect_chain, DeviceError, VirtioDevice, TYPE_NET};
use super::{ChainError, VIRTIO_F_VERSION_1};
use crate::api::models::RateLimiter as RateLimiterConfig;
use crate::devices::bus::lock;
use crate::devices::rate_limiter::{now_ns, RateLimiter, Throttle};
use crate::metrics::{IncMetric, NetMetrics, METRICS};

pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
pub const VIRTIO_NET_F_GUEST_UFO: u64 = 1 << 10;
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
pub const VIRTIO_NET_F_HOST_UFO: u64 = 1 << 14;
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;

/// Offered whatever the configuration.
const BASE_FEATURES: u64 = VIRTIO_F_VERSION_1
    | super::VIRTIO_RING_F_EVENT_IDX
    | VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_GUEST_UFO
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
    | VIRTIO_NET_F_HOST_UFO
    | VIRTIO_NET_F_MRG_RXBUF;

/// The TAP offloads (TUN_F_*) matching the features the driver accepted: what the guest can
/// take on RX.
pub fn tun_offloads(features: u64) -> u32 {
    let mut f = 0;
    if features & VIRTIO_NET_F_GUEST_CSUM != 0 {
        f |= TUN_F_CSUM;
        // The TAP refuses segmentation offloads without the checksum one.
        if features & VIRTIO_NET_F_GUEST_TSO4 != 0 {
            f |= TUN_F_TSO4;
        }
        if features & VIRTIO_NET_F_GUEST_TSO6 != 0 {
            f |= TUN_F_TSO6;
        }
        if features & VIRTIO_NET_F_GUEST_UFO != 0 {
            f |= TUN_F_UFO;
        }
    }
    f
}

/// `virtio_net_hdr.flags`: the checksum from `csum_start` on is still to be computed.
const HDR_F_NEEDS_CSUM: u8 = 1;
/// `virtio_net_hdr.gso_type`: none, TCP/IPv4, UDP (UFO), TCP/IPv6; the ECN bit.
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_UDP: u8 = 3;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;

/// Whether a frame read from the TAP (header included) may go to a driver that accepted
/// `features`, after making it fit them: a checksum left to the driver (NEEDS_CSUM) is
/// computed here when the driver did not accept GUEST_CSUM; a GSO frame of a kind the driver
/// did not accept cannot be made to fit (false). The TAP only makes such frames when its
/// offloads are wider than what the driver accepted: frames it queued before a reset and a
/// renegotiation with fewer features.
fn fit_rx_header(frame: &mut [u8], features: u64) -> bool {
    let gso = frame[1];
    let accepted = match gso & !GSO_ECN {
        GSO_NONE => true,
        GSO_TCPV4 => features & VIRTIO_NET_F_GUEST_TSO4 != 0,
        GSO_TCPV6 => features & VIRTIO_NET_F_GUEST_TSO6 != 0,
        GSO_UDP => features & VIRTIO_NET_F_GUEST_UFO != 0,
        _ => false,
    };
    // GUEST_ECN is never offered.
    if !accepted || gso & GSO_ECN != 0 {
        return false;
    }
    if frame[0] & HDR_F_NEEDS_CSUM == 0 || features & VIRTIO_NET_F_GUEST_CSUM != 0 {
        return true;
    }
    let start = VNET_HDR_LEN + usize::from(u16::from_le_bytes([frame[6], frame[7]]));
    let at = start + usize::from(u16::from_le_bytes([frame[8], frame[9]]));
    if at + 2 > frame.len() {
        return false;
    }
    let mut sum = 0u64;
    for c in frame[start..].chunks(2) {
        sum += u64::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]));
    }
    // The 64-bit sum of at most 64 Ki 16-bit words folds in two rounds; loop anyway.
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The field held the pseudo-header's sum: the sum over csum_start.. includes it.
    let csum = !(sum as u16);
    frame[at..at + 2].copy_from_slice(&csum.to_be_bytes());
    frame[0] &= !HDR_F_NEEDS_CSUM;
    true
}

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;

/// The largest frame with its header: 65550 bytes of Ethernet frame plus the header.
pub const MAX_BUFFER: usize = 65562;
const ETH_HLEN: usize = 14;

/// What became of a frame offered to the RX queue with MRG_RXBUF.
enum Merged {
    /// In the used ring.
    Delivered,
    /// A malformed chain: the chains taken were used with length 0, the frame still pending.
    Unusable,
    /// Larger than the whole ring: dropped.
    Dropped,
    /// Not enough chains yet: none taken, the frame still pending.
    NoRoom,
}

pub struct Net<B: NetBackend> {
    backend: B,
    guest_mac: Option<[u8; 6]>,
    mtu: Option<u16>,
    /// The frame read from the backend and not yet delivered, and its length.
    rx_pending: Option<usize>,
    /// Whether the RX rate limiter was charged for the pending frame: a frame that waits for
    /// buffers is charged once, not at every RX notification.
    rx_paid: bool,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    /// The limiters of the frames delivered to the guest (`RX_QUEUE`: ops 1, bandwidth the
    /// frame's bytes) and of the frames the guest sends (`TX_QUEUE`), and the timer armed
    /// while either refuses (none for a device made without one: tests).
    throttle: Throttle<2>,
    /// The driver accepted MRG_RXBUF: a frame may span several RX chains.
    mrg_rxbuf: bool,
    /// The TAP offloads last set (0 when the device was made).
    offloads: u32,
    /// The features the driver accepted (0 before FEATURES_OK and after a reset).
    acked: u64,
    /// The device's own group (`net_<iface_id>` once named by [`Net::with_metrics_id`]).
    metrics: Arc<NetMetrics>,
}

/// Adds `n` to one net counter in the aggregate `net` group and in the device's own.
fn bump(dev: &NetMetrics, field: fn(&NetMetrics) -> &IncMetric, n: u64) {
    field(&METRICS.net).add(n);
    field(dev).add(n);
}

/// Whether an RX chain (structure and memory checked) can take frames: every buffer
/// device-writable, and room for at least `min` bytes (the header and an Ethernet header; with
/// MRG_RXBUF, where a frame may span chains, the header: what the spec asks of every buffer).
fn rx_chain_usable(descs: &[Descriptor], min: usize) -> bool {
    descs.iter().all(|d| d.is_write_only())
        && descs.iter().map(|d| d.len() as usize).sum::<usize>() >= min
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl<B: NetBackend> Net<B> {
    pub fn new(backend: B, guest_mac: Option<[u8; 6]>, mtu: Option<u16>) -> Self {
        Net {
            backend,
            guest_mac,
            mtu,
            rx_pending: None,
            rx_paid: false,
            rx_buf: vec![0; MAX_BUFFER],
            tx_buf: Vec::with_capacity(MAX_BUFFER),
            throttle: Throttle::default(),
            mrg_rxbuf: false,
            offloads: 0,
            acked: 0,
            metrics: Arc::new(NetMetrics::new()),
        }
    }

    /// Counts the device's traffic also in the group `net_<iface_id>`.
    pub fn with_metrics_id(mut self, iface_id: &str) -> Self {
        self.metrics = crate::metrics::net_metrics(iface_id);
        self
    }

    /// Gives the device its RX and TX rate limiters (none: unlimited) and the timer that lets
    /// them be set or changed later by `PATCH`.
    pub fn with_rate_limiters(
        mut self,
        rx: Option<&RateLimiterConfig>,
        tx: Option<&RateLimiterConfig>,
    ) -> io::Result<Self> {
        let now = now_ns();
        let limiters = [
            RateLimiter::from_config(rx, now),
            RateLimiter::from_config(tx, now),
        ];
        self.throttle = Throttle::new(limiters, true)?;
        Ok(self)
    }

    /// Gathers one TX chain into `tx_buf`.
    fn gather(&mut self, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Result<(), String> {
        self.tx_buf.clear();
        for (i, d) in descs.iter().enumerate() {
            if d.is_write_only() {
                return Err(ChainError::WrongDirection { index: i }.to_string());
            }
            let len = d.len() as usize;
            let at = self.tx_buf.len();
            if at + len > MAX_BUFFER {
                return Err(format!("frame longer than {MAX_BUFFER} bytes"));
            }
            self.tx_buf.resize(at + len, 0);
            mem.read_slice(&mut self.tx_buf[at..], d.addr())
                .map_err(|e| e.to_string())?;
        }
        if self.tx_buf.len() < VNET_HDR_LEN + ETH_HLEN {
            return Err(format!("frame of only {} bytes", self.tx_buf.len()));
        }
        Ok(())
    }

    fn process_tx(&mut self, mem: &GuestMemoryMmap, q: &mut Queue) -> Result<bool, DeviceError> {
        if self.throttle.is_blocked(TX_QUEUE) {
            return Ok(false);
        }
        let mut used_any = false;
        while let Some(chain) = super::pop_chain(mem, q)? {
            let head = chain.head_index();
            let res = collect_chain(mem, chain)
                .map_err(|e| e.to_string())
                .and_then(|d| self.gather(mem, &d));
            match res {
                Err(e) => {
                    log::debug!("virtio-net: malformed TX chain: {e}");
                    bump(&self.metrics, |m| &m.tx_malformed, 1);
                }
                Ok(()) => {
                    let len = (self.tx_buf.len() - VNET_HDR_LEN) as u64;
                    if !self.throttle.try_consume(TX_QUEUE, len, 1) {
                        bump(&self.metrics, |m| &m.tx_rate_limiter_throttled, 1);
                        q.go_to_previous_position();
                        break;
                    }
                    self.send_gathered();
                }
            }
            q.add_used(mem, head, 0)
                .map_err(|e| DeviceError::UsedRing(e.to_string()))?;
            used_any = true;
        }
        Ok(used_any)
    }

    /// Sends the frame in `tx_buf` to the backend.
    fn send_gathered(&mut self) {
        let frame = &self.tx_buf[VNET_HDR_LEN..];
        if let Some(mac) = self.guest_mac {
            if frame[6..12] != mac {
                bump(&self.metrics, |m| &m.tx_spoofed_mac_count, 1);
            }
        }
        let len = frame.len() as u64;
        match self.backend.send(&self.tx_buf) {
            Ok(()) => {
                bump(&self.metrics, |m| &m.tx_bytes_count, len);
                bump(&self.metrics, |m| &m.tx_packets_count, 1);
            }
            Err(e) => {
                log::debug!("virtio-net: TAP write failed: {e}");
                bump(&self.metrics, |m| &m.tx_fails, 1);
            }
        }
    }

    /// Writes the pending frame into the chain's writable buffers; None when it does not fit.
    fn deliver(&self, mem: &GuestMemoryMmap, descs: &[Descriptor], len: usize) -> Option<u32> {
        let room: usize = descs
            .iter()
            .filter(|d| d.is_write_only())
            .map(|d| d.len() as usize)
            .sum();
        if room < len {
            return None;
        }
        let mut done = 0;
        for d in descs {
            if done == len {
                break;
            }
            // A zero-length descriptor in the middle holds nothing; the rest still count.
            let n = (d.len() as usize).min(len - done);
            mem.write_slice(&self.rx_buf[done..done + n], d.addr())
                .ok()?;
            done += n;
        }
        Some(done as u32)
    }

    /// With MRG_RXBUF: spreads the pending frame of `len` bytes over as many RX chains as it
    /// needs, in order; `num_buffers` in the first one is their count. All the chains are added
    /// to the used ring before the caller may notify.
    fn deliver_merged(
        &mut self,
        mem: &GuestMemoryMmap,
        q: &mut Queue,
        len: usize,
    ) -> Result<Merged, DeviceError> {
        let mut chains: Vec<(u16, Vec<Descriptor>)> = Vec::new();
        let mut room = 0usize;
        let mut bad = false;
        while room < len {
            let Some(chain) = super::pop_chain(mem, q)? else {
                break;
            };
            let head = chain.head_index();
            match collect_chain(mem, chain) {
                Ok(descs) if rx_chain_usable(&descs, VNET_HDR_LEN) => {
                    room += descs.iter().map(|d| d.len() as usize).sum::<usize>();
                    chains.push((head, descs));
                }
                res => {
                    self.rx_malformed(res.err());
                    chains.push((head, Vec::new()));
                    bad = true;
                    break;
                }
            }
        }
        if bad {
            // Every chain taken for this frame goes back to the driver empty; the frame waits
            // for good ones.
            for (head, _) in chains {
                q.add_used(mem, head, 0)
                    .map_err(|e| DeviceError::UsedRing(e.to_string()))?;
            }
            return Ok(Merged::Unusable);
        }
        if room < len {
            // Not enough chains (yet): give them back, unused, in reverse order of taking.
            let whole_ring = chains.len() >= usize::from(q.size());
            for _ in 0..chains.len() {
                q.go_to_previous_position();
            }
            if whole_ring {
                // Even the whole ring cannot hold the frame: drop it rather than stall.
                log::debug!("virtio-net: RX ring too small for {len} bytes");
                bump(&self.metrics, |m| &m.rx_dropped, 1);
                self.rx_pending = None;
                return Ok(Merged::Dropped);
            }
            return Ok(Merged::NoRoom);
        }
        let count = chains.len() as u16;
        self.rx_buf[10..12].copy_from_slice(&count.to_le_bytes());
        let mut done = 0usize;
        let mut lens = Vec::with_capacity(chains.len());
        for (_, descs) in &chains {
            let start = done;
            for d in descs {
                if done == len {
                    break;
                }
                let n = (d.len() as usize).min(len - done);
                if mem
                    .write_slice(&self.rx_buf[done..done + n], d.addr())
                    .is_err()
                {
                    // Checked by collect_chain; cannot happen.
                    break;
                }
                done += n;
            }
            lens.push((done - start) as u32);
        }
        for ((head, _), n) in chains.iter().zip(lens) {
            q.add_used(mem, *head, n)
                .map_err(|e| DeviceError::UsedRing(e.to_string()))?;
        }
        self.rx_pending = None;
        bump(
            &self.metrics,
            |m| &m.rx_bytes_count,
            (len - VNET_HDR_LEN) as u64,
        );
        bump(&self.metrics, |m| &m.rx_packets_count, 1);
        Ok(Merged::Delivered)
    }

    /// `TUNSETOFFLOAD` when `offloads` differ from the TAP's.
    fn set_tap_offloads(&mut self, offloads: u32) {
        if offloads != self.offloads {
            match self.backend.set_offload(offloads) {
                Ok(()) => self.offloads = offloads,
                Err(e) => log::warn!("virtio-net: cannot set the TAP offloads {offloads:#x}: {e}"),
            }
        }
    }

    /// Counts an RX chain the device cannot use (given back with length 0, the frame kept).
    fn rx_malformed(&self, err: Option<ChainError>) {
        match err {
            Some(e) => log::debug!("virtio-net: malformed RX chain: {e}"),
            None => log::debug!("virtio-net: RX chain with a read-only buffer or no room"),
        }
        bump(&self.metrics, |m| &m.rx_malformed, 1);
    }

    /// Moves frames from the backend into RX chains until either runs out.
    fn process_rx(&mut self, mem: &GuestMemoryMmap, q: &mut Queue) -> Result<bool, DeviceError> {
        let mut used_any = false;
        if self.throttle.is_blocked(RX_QUEUE) {
            return Ok(false);
        }
        loop {
            let len = match self.rx_pending {
                Some(n) => n,
                None => match self.backend.recv(&mut self.rx_buf) {
                    Ok(n) if n < VNET_HDR_LEN + ETH_HLEN => {
                        bump(&self.metrics, |m| &m.rx_dropped, 1);
                        continue;
                    }
                    Ok(n) if !fit_rx_header(&mut self.rx_buf[..n], self.acked) => {
                        log::debug!("virtio-net: an RX frame with offloads the driver refused");
                        bump(&self.metrics, |m| &m.rx_dropped, 1);
                        continue;
                    }
                    Ok(n) => {
                        // No MRG_RXBUF: every frame is in one chain.
                        self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes());
                        self.rx_pending = Some(n);
                        self.rx_paid = false;
                        n
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        log::warn!("virtio-net: TAP read failed: {e}");
                        break;
                    }
                },
            };
            // Throttled: the frame stays pending until the timer fires.
            if !self.rx_paid {
                if !self
                    .throttle
                    .try_consume(RX_QUEUE, (len - VNET_HDR_LEN) as u64, 1)
                {
                    bump(&self.metrics, |m| &m.rx_rate_limiter_throttled, 1);
                    break;
                }
                self.rx_paid = true;
            }
            if self.mrg_rxbuf {
                match self.deliver_merged(mem, q, len)? {
                    Merged::Delivered => used_any = true,
                    Merged::Unusable => {
                        // Chains answered with length 0; the frame stays pending.
                        used_any = true;
                        continue;
                    }
                    Merged::Dropped => continue,
                    Merged::NoRoom => break,
                }
                continue;
            }
            let Some(chain) = super::pop_chain(mem, q)? else {
                // No buffer: keep the frame and stop reading until the next RX notify.
                break;
            };
            let head = chain.head_index();
            let used = match collect_chain(mem, chain) {
                Ok(descs) if !rx_chain_usable(&descs, VNET_HDR_LEN + ETH_HLEN) => {
                    self.rx_malformed(None);
                    0
                }
                Err(e) => {
                    self.rx_malformed(Some(e));
                    0
                }
                Ok(descs) => match self.deliver(mem, &descs, len) {
                    Some(n) => {
                        self.rx_pending = None;
                        bump(
                            &self.metrics,
                            |m| &m.rx_bytes_count,
                            (len - VNET_HDR_LEN) as u64,
                        );
                        bump(&self.metrics, |m| &m.rx_packets_count, 1);
                        n
                    }
                    None => {
                        // Too small: the frame is dropped, the chain reused.
                        log::debug!("virtio-net: RX chain too small for {len} bytes");
                        bump(&self.metrics, |m| &m.rx_dropped, 1);
                        self.rx_pending = None;
                        q.go_to_previous_position();
                        continue;
                    }
                },
            };
            q.add_used(mem, head, used)
                .map_err(|e| DeviceError::UsedRing(e.to_string()))?;
            used_any = true;
        }
        Ok(used_any)
    }
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn avail_features(&self) -> u64 {
        let mut f = BASE_FEATURES;
        if self.guest_mac.is_some() {
            f |= VIRTIO_NET_F_MAC;
        }
        if self.mtu.is_some() {
            f |= VIRTIO_NET_F_MTU;
        }
        f
    }

    /// mac[6], status u16, max_virtqueue_pairs u16, mtu u16.
    fn config_space(&self) -> Vec<u8> {
        let mut c = vec![0u8; 12];
        c[..6].copy_from_slice(&self.guest_mac.unwrap_or_default());
        c[6..8].copy_from_slice(&1u16.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.unwrap_or(0).to_le_bytes());
        c
    }

    fn queue_count(&self) -> usize {
        2
    }

    fn process_queues(
        &mut self,
        index: usize,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
    ) -> Result<bool, DeviceError> {
        match index {
            RX_QUEUE => self.process_rx(mem, &mut queues[RX_QUEUE]),
            _ => {
                let tx = self.process_tx(mem, &mut queues[TX_QUEUE])?;
                // The TAP may have become readable meanwhile; nothing else to do for TX.
                Ok(tx)
            }
        }
    }

    fn process_backend(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
    ) -> Result<bool, DeviceError> {
        self.process_rx(mem, &mut queues[RX_QUEUE])
    }

    fn ack_features(&mut self, features: u64) {
        self.mrg_rxbuf = features & VIRTIO_NET_F_MRG_RXBUF != 0;
        self.acked = features;
        self.set_tap_offloads(tun_offloads(features));
    }

    fn reset(&mut self) {
        self.rx_pending = None;
        self.mrg_rxbuf = false;
        self.acked = 0;
        // No driver: the TAP stops making frames only the last one could take.
        self.set_tap_offloads(0);
        self.throttle.release();
    }

    fn throttle_timer(&self) -> Option<EventFd> {
        self.throttle.watch_fd("virtio-net")
    }

    fn process_throttled(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
    ) -> Result<bool, DeviceError> {
        let blocked = self.throttle.release();
        let mut used = false;
        if blocked[TX_QUEUE] {
            used |= self.process_tx(mem, &mut queues[TX_QUEUE])?;
        }
        if blocked[RX_QUEUE] {
            used |= self.process_rx(mem, &mut queues[RX_QUEUE])?;
        }
        Ok(used)
    }

    fn update_rate_limiters(
        &mut self,
        rx: Option<&RateLimiterConfig>,
        tx: Option<&RateLimiterConfig>,
    ) -> Result<(), String> {
        let mut cfgs = [None; 2];
        cfgs[RX_QUEUE] = rx;
        cfgs[TX_QUEUE] = tx;
        self.throttle.update(cfgs, "interface")
    }
}

/// The VMM thread's watch on a TAP: when it becomes readable, the device reads frames into the
/// RX queue. Edge-triggered: the device reads until the TAP is empty or RX chains run out, and
/// a later RX notification resumes it, so an idle guest costs no wake-ups but one per frame.
pub struct TapWatcher {
    fd: File,
    transport: Arc<Mutex<MmioTransport>>,
}

impl TapWatcher {
    /// `fd` is a duplicate of the TAP's fd.
    pub fn new(fd: File, transport: Arc<Mutex<MmioTransport>>) -> Self {
        TapWatcher { fd, transport }
    }

    pub fn fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

impl MutEventSubscriber for TapWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        lock(&self.transport).process_backend();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let set = EventSet::IN | EventSet::EDGE_TRIGGERED;
        if let Err(e) = ops.add(Events::new(&self.fd, set)) {
            log::error!("cannot watch a TAP device: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;
    use std::collections::VecDeque;
    use vm_memory::GuestAddress;

    #[derive(Default, Clone)]
    struct Fake {
        sent: Arc<Mutex<Vec<Vec<u8>>>>,
        inbox: Arc<Mutex<VecDeque<Vec<u8>>>>,
        offloads: Arc<Mutex<Vec<u32>>>,
    }

    impl NetBackend for Fake {
        fn send(&mut self, buf: &[u8]) -> io::Result<()> {
            self.sent.lock().unwrap().push(buf.to_vec());
            Ok(())
        }
        fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.inbox.lock().unwrap().pop_front() {
                Some(f) => {
                    buf[..f.len()].copy_from_slice(&f);
                    Ok(f.len())
                }
                None => Err(io::ErrorKind::WouldBlock.into()),
            }
        }
        fn set_offload(&mut self, flags: u32) -> io::Result<()> {
            self.offloads.lock().unwrap().push(flags);
            Ok(())
        }
    }

    const MAC: [u8; 6] = [6, 0, 0xac, 0x10, 0, 2];

    fn frame(src: [u8; 6], payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn config_and_features() {
        let n = Net::new(Fake::default(), Some(MAC), Some(1400));
        assert_eq!(
            n.avail_features(),
            BASE_FEATURES | VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU
        );
        assert_ne!(
            n.avail_features() & super::super::VIRTIO_RING_F_EVENT_IDX,
            0
        );
        assert_ne!(n.avail_features() & VIRTIO_NET_F_MRG_RXBUF, 0);
        let c = n.config_space();
        assert_eq!(&c[..6], &MAC);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 1400);
        let n = Net::new(Fake::default(), None, None);
        assert_eq!(n.avail_features(), BASE_FEATURES);
        assert_eq!(n.queue_count(), 2);
        assert_eq!(parse_mac("06:00:ac:10:00:02"), Some(MAC));
        assert_eq!(parse_mac("06:00:ac:10:00"), None);
        assert_eq!(parse_mac("06:00:ac:10:00:02:03"), None);
        assert_eq!(parse_mac("g6:00:ac:10:00:02"), None);
    }

    #[test]
    fn tx_sends_chains_and_counts_spoofed_macs() {
        let mem = memory();
        let fake = Fake::default();
        let mut n = Net::new(fake.clone(), Some(MAC), None);
        let mut qs = [queue(&mem, 16), queue(&mem, 16)];
        // Header and frame in two descriptors.
        let good = frame(MAC, b"hello");
        mem.write_slice(&good[..VNET_HDR_LEN], GuestAddress(0x8000))
            .unwrap();
        mem.write_slice(&good[VNET_HDR_LEN..], GuestAddress(0x9000))
            .unwrap();
        write_desc(&mem, 0, 0x8000, VNET_HDR_LEN as u32, NEXT, 1);
        write_desc(&mem, 1, 0x9000, (good.len() - VNET_HDR_LEN) as u32, 0, 0);
        make_avail(&mem, 0, 0);
        let spoofed = METRICS.net.tx_spoofed_mac_count.count();
        let malformed = METRICS.net.tx_malformed.count();
        assert!(n.process_queues(TX_QUEUE, &mem, &mut qs).unwrap());
        assert_eq!(used_elem(&mem, 0), (0, 0));
        assert_eq!(fake.sent.lock().unwrap().as_slice(), &[good]);
        assert_eq!(METRICS.net.tx_spoofed_mac_count.count(), spoofed);

        let bad = frame([2, 0, 0, 0, 0, 1], b"x");
        mem.write_slice(&bad, GuestAddress(0xa000)).unwrap();
        write_desc(&mem, 2, 0xa000, bad.len() as u32, 0, 0);
        make_avail(&mem, 1, 2);
        n.process_queues(TX_QUEUE, &mem, &mut qs).unwrap();
        assert_eq!(fake.sent.lock().unwrap().len(), 2);
        assert!(METRICS.net.tx_spoofed_mac_count.count() > spoofed);

        // Too short for a header and an Ethernet header; a write-only buffer.
        write_desc(&mem, 3, 0xa000, 20, 0, 0);
        make_avail(&mem, 2, 3);
        write_desc(&mem, 4, 0xa000, 64, WRITE, 0);
        make_avail(&mem, 3, 4);
        n.process_queues(TX_QUEUE, &mem, &mut qs).unwrap();
        assert_eq!(fake.sent.lock().unwrap().len(), 2);
        assert!(METRICS.net.tx_malformed.count() >= malformed + 2);
        assert_eq!(used_idx(&mem), 4);
    }

    #[test]
    fn rx_fills_chains_keeps_a_pending_frame_and_drops_oversized() {
        let mem = memory();
        let fake = Fake::default();
        let mut n = Net::new(fake.clone(), Some(MAC), None);
        let mut qs = [queue(&mem, 16), queue(&mem, 16)];
        let f1 = frame([2; 6], b"one");
        let f2 = frame([2; 6], &[7u8; 100]);
        let f3 = frame([2; 6], b"three");
        fake.inbox
            .lock()
            .unwrap()
            .extend([f1.clone(), f2.clone(), f3.clone()]);
        // No buffer yet: one frame is read and kept, the others stay in the backend.
        assert!(!n.process_backend(&mem, &mut qs).unwrap());
        assert_eq!(fake.inbox.lock().unwrap().len(), 2);

        // A 64-byte chain (16 + 48): f1 fits; f2 (126 bytes) does not and is dropped, the chain reused
        // for f3.
        write_desc(&mem, 0, 0x8000, 16, WRITE | NEXT, 1);
        write_desc(&mem, 1, 0x9000, 48, WRITE, 0);
        make_avail(&mem, 0, 0);
        let dropped = METRICS.net.rx_dropped.count();
        assert!(n.process_queues(RX_QUEUE, &mem, &mut qs).unwrap());
        assert_eq!(used_elem(&mem, 0), (0, f1.len() as u32));
        let mut got = vec![0u8; f1.len()];
        mem.read_slice(&mut got[..16], GuestAddress(0x8000))
            .unwrap();
        mem.read_slice(&mut got[16..], GuestAddress(0x9000))
            .unwrap();
        let mut want = f1.clone();
        want[10] = 1; // num_buffers
        assert_eq!(got, want);
        // f2 was read, found no chain and waits.
        assert_eq!(used_idx(&mem), 1);

        write_desc(&mem, 2, 0xa000, 64, WRITE, 0);
        make_avail(&mem, 1, 2);
        n.process_queues(RX_QUEUE, &mem, &mut qs).unwrap();
        assert!(METRICS.net.rx_dropped.count() > dropped);
        assert_eq!(used_idx(&mem), 2);
        assert_eq!(used_elem(&mem, 1), (2, f3.len() as u32));
        assert!(fake.inbox.lock().unwrap().is_empty());

        // A reset forgets a pending frame.
        fake.inbox.lock().unwrap().push_back(f1.clone());
        n.process_backend(&mem, &mut qs).unwrap();
        assert!(n.rx_pending.is_some());
        n.reset();
        assert!(n.rx_pending.is_none());
    }

    #[test]
    fn rx_limiter_charges_a_frame_that_waits_for_buffers_once() {
        let mem = memory();
        let fake = Fake::default();
        // Two frames' worth of operations, refilled only after 100 s.
        let ops = RateLimiterConfig {
            bandwidth: None,
            ops: Some(crate::api::models::TokenBucket {
                size: 2,
                one_time_burst: None,
                refill_time: 100_000,
            }),
        };
        let mut n = Net::new(fake.clone(), None, None)
            .with_rate_limiters(Some(&ops), None)
            .unwrap();
        let mut qs = [queue(&mem, 16), queue(&mem, 16)];
        fake.inbox
            .lock()
            .unwrap()
            .extend([frame([2; 6], b"one"), frame([2; 6], b"two")]);
        // The first frame is read and waits: a TAP event and three RX notifications without
        // buffers.
        n.process_backend(&mem, &mut qs).unwrap();
        for _ in 0..3 {
            n.process_queues(RX_QUEUE, &mem, &mut qs).unwrap();
        }
        assert!(n.rx_pending.is_some());
        // Buffers for both: the two operations of the bucket carry both frames.
        for i in 0..2u16 {
            write_desc(&mem, i, 0x8000 + 0x1000 * u64::from(i), 256, WRITE, 0);
            make_avail(&mem, i, i);
        }
        n.process_queues(RX_QUEUE, &mem, &mut qs).unwrap();
        assert_eq!(used_idx(&mem), 2);
        assert!(fake.inbox.lock().unwrap().is_empty());
    }

    #[test]
    fn rx_refuses_unusable_chains_and_skips_zero_length_descriptors() {
        let mem = memory();
        let fake = Fake::default();
        let mut n = Net::new(fake.clone(), Some(MAC), None).with_metrics_id("unit_rx_bad");
        let mut qs = [queue(&mem, 16), queue(&mem, 16)];
        let f = frame([2; 6], &[3u8; 40]);
        fake.inbox.lock().unwrap().push_back(f.clone());
        mem.write_slice(&[0x5au8; 256], GuestAddress(0x8000))
            .unwrap();
        // A read-only buffer, a zero-length one, one too short for any frame: each given back
        // empty, untouched and counted; the frame waits for a usable chain.
        write_desc(&mem, 0, 0x8000, 128, 0, 0);
        write_desc(&mem, 1, 0x8000, 0, WRITE, 0);
        write_desc(&mem, 2, 0x8000, 20, WRITE, 0);
        make_avail(&mem, 0, 0);
        make_avail(&mem, 1, 1);
        make_avail(&mem, 2, 2);
        let before = n.metrics.rx_malformed.count();
        assert!(n.process_queues(RX_QUEUE, &mem, &mut qs).unwrap());
        assert_eq!(used_idx(&mem), 3);
        for slot in 0..3 {
            assert_eq!(used_elem(&mem, slot), (u32::from(slot), 0));
        }
        assert_eq!(n.metrics.rx_malformed.count(), before + 3);
        let mut b = [0u8; 256];
        mem.read_slice(&mut b, GuestAddress(0x8000)).unwrap();
        assert_eq!(b, [0x5a; 256]);
        assert!(n.rx_pending.is_some());

        // A zero-length descriptor between two buffers: the frame goes around it.
        write_desc(&mem, 3, 0x8000, 30, WRITE | NEXT, 4);
        write_desc(&mem, 4, 0x8800, 0, WRITE | NEXT, 5);
        write_desc(&mem, 5, 0x9000, 64, WRITE, 0);
        make_avail(&mem, 3, 3);
        assert!(n.process_queues(RX_QUEUE, &mem, &mut qs).unwrap());
        assert_eq!(used_elem(&mem, 3), (3, f.len() as u32));
        let mut got = vec![0u8; f.len()];
        mem.read_slice(&mut got[..30], GuestAddress(0x8000))
            .unwrap();
        mem.read_slice(&mut got[30..], GuestAddress(0x9000))
            .unwrap();
        let mut want = f.clone();
        want[10] = 1;
        assert_eq!(got, want);
    }

    #[test]
    fn mrg_rxbuf_spreads_a_frame_over_chains() {
        let mem = memory();
        let fake = Fake::default();
        let mut n = Net::new(fake.clone(), Some(MAC), None);
        n.ack_features(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF);
        let mut qs = [queue(&mem, 16), queue(&mem, 16)];
        // 12 + 14 + 40 = 66 bytes over two 40-byte chains.
        let f = frame([2; 6], &[9u8; 40]);
        assert_eq!(f.len(), 66);
        write_desc(&mem, 0, 0x8000, 40, WRITE, 0);
        make_avail(&mem, 0, 0);
        fake.inbox.lock().unwrap().push_back(f.clone());
        // One chain is not enough: it is given back and the frame waits.
        assert!(!n.process_backend(&mem, &mut qs).unwrap());
        assert_eq!(used_idx(&mem), 0);
        assert!(n.rx_pending.is_some());

        write_desc(&mem, 1, 0x9000, 40, WRITE, 0);
        make_avail(&mem, 1, 1);
        assert!(n.process_queues(RX_QUEUE, &mem, &mut qs).unwrap());
        assert_eq!(used_idx(&mem), 2);
        assert_eq!(used_elem(&mem, 0), (0, 40));
        assert_eq!(used_elem(&mem, 1), (1, 26));
        let mut got = vec![0u8; 66];
        mem.read_slice(&mut got[..40], GuestAddress(0x8000))
            .unwrap();
        mem.read_slice(&mut got[40..], GuestAddress(0x9000))
            .unwrap();
        let mut want = f.clone();
        want[10..12].copy_from_slice(&2u16.to_le_bytes()); // num_buffers
        assert_eq!(got, want);
        assert!(n.rx_pending.is_none());

        // A frame that fits one chain says num_buffers = 1.
        let small = frame([2; 6], b"hi");
        fake.inbox.lock().unwrap().push_back(small.clone());
        write_desc(&mem, 2, 0xa000, 64, WRITE, 0);
        make_avail(&mem, 2, 2);
        assert!(n.process_backend(&mem, &mut qs).unwrap());
        assert_eq!(used_elem(&mem, 2), (2, small.len() as u32));
        let mut got = vec![0u8; small.len()];
        mem.read_slice(&mut got, GuestAddress(0xa000)).unwrap();
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);

        // A ring too small for the frame even when full: dropped, not stalled.
        let mut qs = [queue(&mem, 2), queue(&mem, 16)];
        mem.write_obj(0u16, GuestAddress(USED + 2)).unwrap();
        write_desc(&mem, 0, 0x8000, 30, WRITE, 0);
        write_desc(&mem, 1, 0x9000, 30, WRITE, 0);
        mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
        make_avail(&mem, 1, 1);
        let dropped = METRICS.net.rx_dropped.count();
        fake.inbox.lock().unwrap().push_back(f.clone());
        fake.inbox.lock().unwrap().push_back(small.clone());
        assert!(n.process_backend(&mem, &mut qs).unwrap());
        assert!(METRICS.net.rx_dropped.count() > dropped);
        assert_eq!(used_idx(&mem), 1);
        assert_eq!(used_elem(&mem, 0), (0, small.len() as u32));

        // Without MRG_RXBUF (after a reset) a frame needs one chain again.
        n.reset();
        assert!(!n.mrg_rxbuf);
    }

    #[test]
    fn offloads_follow_the_negotiated_features() {
        let fake = Fake::default();
        let mut n = Net::new(fake.clone(), None, None);
        // Nothing negotiated: the TAP keeps its offloads off (no ioctl needed).
        n.ack_features(VIRTIO_F_VERSION_1);
        assert!(fake.offloads.lock().unwrap().is_empty());
        n.ack_features(
            VIRTIO_F_VERSION_1
                | VIRTIO_NET_F_GUEST_CSUM
                | VIRTIO_NET_F_GUEST_TSO4
                | VIRTIO_NET_F_GUEST_TSO6
                | VIRTIO_NET_F_GUEST_UFO
                | VIRTIO_NET_F_HOST_TSO4,
        );
        assert_eq!(
            fake.offloads.lock().unwrap().as_slice(),
            &[TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO]
        );
        // TSO without GUEST_CSUM is not passed on.
        assert_eq!(tun_offloads(VIRTIO_NET_F_GUEST_TSO4), 0);
        assert_eq!(tun_offloads(VIRTIO_NET_F_GUEST_CSUM), TUN_F_CSUM);
        n.ack_features(VIRTIO_F_VERSION_1);
        assert_eq!(fake.offloads.lock().unwrap().last(), Some(&0));
        // A reset turns them off too: no driver takes the TAP's GSO frames any more.
        n.ack_features(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_GUEST_CSUM);
        n.reset();
        assert_eq!(
            fake.offloads.lock().unwrap().as_slice(),
            &[
                TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO,
                0,
                TUN_F_CSUM,
                0
            ]
        );
    }

    /// A TCP/IPv4 frame (header included) whose header asks for NEEDS_CSUM (csum_start 34,
    /// csum_offset 16, the pseudo-header's sum in the field) and GSO of `gso_type`.
    fn partial_tcp_frame(gso_type: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f[0] = HDR_F_NEEDS_CSUM;
        f[1] = gso_type;
        f[4..6].copy_from_slice(&1448u16.to_le_bytes());
        f[6..8].copy_from_slice(&34u16.to_le_bytes());
        f[8..10].copy_from_slice(&16u16.to_le_bytes());
        f.extend_from_slice(&MAC);
        f.extend_from_slice(&[2; 6]);
        f.extend_from_slice(&[8, 0]);
        let tcp_len = 20 + payload.len();
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
        ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
        f.extend_from_slice(&ip);
        let mut tcp = [0u8; 20];
        tcp[0..4].copy_from_slice(&[0x13, 0x89, 0x9c, 0x40]);
        tcp[12] = 5 << 4;
        // 10.0.0.1 + 10.0.0.2 + protocol 6 + the TCP length, folded.
        let pseudo = 0x0a00 + 0x0001 + 0x0a00 + 0x0002 + 6 + tcp_len as u32;
        let pseudo = (pseudo & 0xffff) + (pseudo >> 16);
        tcp[16..18].copy_from_slice(&(pseudo as u16).to_be_bytes());
        f.extend_from_slice(&tcp);
        f.extend_from_slice(payload);
        f
    }

    /// Whether the TCP checksum of a frame (header included) built by `partial_tcp_frame` is
    /// complete and right.
    fn tcp_checksum_ok(f: &[u8]) -> bool {
        let tcp = &f[VNET_HDR_LEN + 34..];
        let mut sum: u32 = 0x0a00 + 0x0001 + 0x0a00 + 0x0002 + 6 + tcp.len() as u32;
        for c in tcp.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum == 0xffff
    }

    #[test]
    fn rx_frames_fit_what_the_driver_accepted() {
        let mem = memory();
        let fake = Fake::default();
        let mut n = Net::new(fake.clone(), Some(MAC), None).with_metrics_id("unit_rx_fit");
        let mut qs = [queue(&mem, 16), queue(&mem, 16)];
        // A driver with GUEST_CSUM and GUEST_TSO4 gets the TAP's header as it is.
        n.ack_features(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4);
        let gso = partial_tcp_frame(GSO_TCPV4, &[0x61; 301]);
        fake.inbox.lock().unwrap().push_back(gso.clone());
        write_desc(&mem, 0, 0x8000, 1024, WRITE, 0);
        make_avail(&mem, 0, 0);
        assert!(n.process_queues(RX_QUEUE, &mem, &mut qs).unwrap());
        let mut got = vec![0u8; gso.len()];
        mem.read_slice(&mut got, GuestAddress(0x8000)).unwrap();
        let mut want = gso.clone();
        want[10] = 1;
        assert_eq!(got, want);

        // After a reset, a driver without offloads: frames the TAP queued before are made to
        // fit (the checksum computed here) or dropped (GSO it cannot take).
        n.reset();
        n.ack_features(VIRTIO_F_VERSION_1);
        let partial = partial_tcp_frame(GSO_NONE, &[0x62; 101]);
        assert!(!tcp_checksum_ok(&partial));
        fake.inbox.lock().unwrap().extend([
            gso.clone(),
            partial_tcp_frame(GSO_TCPV6, &[1; 8]),
            partial_tcp_frame(GSO_TCPV4 | GSO_ECN, &[1; 8]),
            partial.clone(),
        ]);
        let dropped = n.metrics.rx_dropped.count();
        write_desc(&mem, 1, 0x9000, 1024, WRITE, 0);
        make_avail(&mem, 1, 1);
        assert!(n.process_queues(RX_QUEUE, &mem, &mut qs).unwrap());
        assert_eq!(used_idx(&mem), 2);
        assert_eq!(used_elem(&mem, 1), (1, partial.len() as u32));
        assert_eq!(n.metrics.rx_dropped.count(), dropped + 3);
        let mut got = vec![0u8; partial.len()];
        mem.read_slice(&mut got, GuestAddress(0x9000)).unwrap();
        assert_eq!(got[0], 0, "NEEDS_CSUM cleared");
        assert!(tcp_checksum_ok(&got), "the checksum completed");
        assert_eq!(got[VNET_HDR_LEN + 54..], partial[VNET_HDR_LEN + 54..]);

        // A checksum position past the frame: dropped.
        let mut bad = partial_tcp_frame(GSO_NONE, &[]);
        bad[8..10].copy_from_slice(&500u16.to_le_bytes());
        assert!(!fit_rx_header(&mut bad, VIRTIO_F_VERSION_1));
        // With MRG_RXBUF the same holds.
        n.reset();
        n.ack_features(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF);
        fake.inbox
            .lock()
            .unwrap()
            .extend([gso.clone(), partial.clone()]);
        write_desc(&mem, 2, 0xa000, 1024, WRITE, 0);
        make_avail(&mem, 2, 2);
        assert!(n.process_queues(RX_QUEUE, &mem, &mut qs).unwrap());
        assert_eq!(used_elem(&mem, 2), (2, partial.len() as u32));
        let mut got = vec![0u8; partial.len()];
        mem.read_slice(&mut got, GuestAddress(0xa000)).unwrap();
        assert!(got[0] == 0 && tcp_checksum_ok(&got));
    }
}
