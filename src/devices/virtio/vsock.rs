//! virtio-vsock (device type 19) over Firecracker's hybrid Unix-socket backend.
//!
//! Queues: RX (0, device to driver), TX (1, driver to device) and event (2: its sound buffers
//! stay with the device, malformed ones are given back at once). The configuration space is
//! the guest's CID (u64).
//!
//! Host-initiated connections: a process connects to `uds_path` and writes `CONNECT <port>\n`;
//! the device sends the guest a REQUEST from CID 2 and a local port (1024 up) to `port`, and
//! on the guest's RESPONSE answers `OK <local port>\n` on the Unix socket. Guest-initiated:
//! a REQUEST to CID 2 port P connects to `<uds_path>_P` (RST when that fails). Data then flows
//! as RW packets, within the credit each side advertises.
//!
//! The backend's sockets and a timer live in an epoll set of the device's own; the VMM thread
//! watches that set's fd (edge-triggered, through the transport's backend hook) and every
//! event or queue notification polls all the sockets: nothing is read from a host socket
//! unless the guest has credit and an RX buffer for it, so host-side buffering is bounded by
//! the guest's packets still to write to the host (at most our advertised `buf_alloc`).

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryMmap};

use super::{collect_chain, DeviceError, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::metrics::METRICS;

pub const TYPE_VSOCK: u32 = 19;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;

pub const HOST_CID: u64 = 2;
pub const HDR_LEN: usize = 44;
pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// What each connection advertises to the guest.
pub const CONN_BUF_ALLOC: u32 = 64 * 1024;
/// The most connections at once.
pub const MAX_CONNECTIONS: usize = 1023;
/// The largest payload the device accepts in one TX packet, or puts in one RX packet.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// A SHUTDOWN (or REQUEST) the guest does not answer within this gets a RST.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// First local port for host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1024;
/// `struct virtio_vsock_event`: a le32 event id.
const EVENT_LEN: usize = 4;
/// The longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// The most control packets waiting for RX buffers before RSTs and CREDIT_UPDATEs, which a
/// guest can ask for with every TX packet, are dropped. The other packets are bounded by the
/// connections (a REQUEST or RESPONSE and a SHUTDOWN or two each).
const MAX_QUEUED_CTRL: usize = 4 * (MAX_CONNECTIONS + 1);

/// `struct virtio_vsock_hdr`, little-endian on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn parse(b: &[u8]) -> Option<Header> {
        if b.len() < HDR_LEN {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or_default());
        let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().unwrap_or_default());
        Some(Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        })
    }

    pub fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST sent (or queued), waiting for the guest's RESPONSE.
    Connecting,
    Established,
    /// The device sent a full SHUTDOWN and waits for the guest's RST.
    Closing,
}

/// (host port, guest port).
type Key = (u32, u32);

struct Conn {
    stream: UnixStream,
    state: State,
    /// The guest's receive buffer and how much of it it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Payload bytes sent to the guest.
    rx_cnt: u32,
    /// Payload bytes received from the guest and written to the host socket.
    fwd_cnt: u32,
    /// fwd_cnt as last told to the guest.
    last_fwd_cnt_sent: u32,
    /// Guest bytes (or our `OK` line) not yet written to the host socket.
    tx_pending: Vec<u8>,
    /// The host socket reached EOF (a SHUTDOWN was queued).
    host_eof: bool,
    /// The guest will send no more: shut the host socket's write side once drained.
    guest_send_done: bool,
    /// The guest will receive no more: stop reading the host socket.
    guest_rcv_done: bool,
    /// When the guest's answer (RESPONSE or RST) is overdue.
    deadline: Option<Instant>,
    /// The poller also watches the socket for room to write (`tx_pending` is not empty).
    out_armed: bool,
}

impl Conn {
    fn new(stream: UnixStream, state: State) -> Conn {
        Conn {
            stream,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            tx_pending: Vec::new(),
            host_eof: false,
            guest_send_done: false,
            guest_rcv_done: false,
            deadline: None,
            out_armed: false,
        }
    }

    /// How many bytes the guest can take now.
    fn peer_credit(&self) -> usize {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight) as usize
    }

    /// Writes what it can of `tx_pending` to the host socket.
    fn flush(&mut self) -> io::Result<()> {
        while !self.tx_pending.is_empty() {
            match self.stream.write(&self.tx_pending) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        if self.guest_send_done {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }
}

/// A host process connected to `uds_path` that has not finished its `CONNECT` line.
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

/// A header-only packet waiting for an RX buffer.
#[derive(Clone, Copy, Debug)]
struct Ctrl {
    key: Key,
    op: u16,
    flags: u32,
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // fcntl rather than std's FIONBIO ioctl: the VMM thread's seccomp filter pins ioctls.
    // SAFETY: plain fcntl calls on an fd the caller owns.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The device's own epoll set (sockets and the timer), edge-triggered.
struct Poller {
    epoll: File,
    timer: File,
}

impl Poller {
    fn new() -> io::Result<Poller> {
        // SAFETY: creating fds; ownership passes to the Files on success.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        let epoll = unsafe { File::from_raw_fd(epoll) };
        // SAFETY: as above.
        let timer = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if timer < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        let timer = unsafe { File::from_raw_fd(timer) };
        let p = Poller { epoll, timer };
        p.add(p.timer.as_raw_fd())?;
        Ok(p)
    }

    /// Watches `fd` for input (and hang-ups), not for room to write: see [`Poller::watch_out`].
    fn add(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, false)
    }

    /// Also wakes the device when `fd` has room to write (`out`), or no longer. Only a
    /// connection with guest data still to write needs that: watched always, a host socket
    /// that its reader drains wakes the VMM thread at every read.
    fn watch_out(&self, fd: RawFd, out: bool) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, out)
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, out: bool) -> io::Result<()> {
        let mut events = libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET;
        if out {
            events |= libc::EPOLLOUT;
        }
        let mut ev = libc::epoll_event {
            events: events as u32,
            u64: fd as u64,
        };
        // SAFETY: valid fds and a valid event.
        if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Empties the ready list (the sockets are polled anyway) and the timer.
    fn drain(&self) {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 64];
        loop {
            // SAFETY: the buffer holds 64 events.
            let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), evs.as_mut_ptr(), 64, 0) };
            if n < 64 {
                break;
            }
        }
        let mut b = [0u8; 8];
        let _ = (&self.timer).read(&mut b);
    }

    /// Arms the one-shot timer `d` from now.
    fn arm(&self, d: Duration) {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: libc::c_long::from(d.subsec_nanos().max(1)),
            },
        };
        // SAFETY: a valid timerfd and itimerspec.
        unsafe {
            libc::timerfd_settime(self.timer.as_raw_fd(), 0, &spec, std::ptr::null_mut());
        }
    }
}

pub struct Vsock {
    cid: u64,
    uds_path: String,
    /// The listener's socket file, removed when the device goes.
    uds_file: crate::uds::SocketFile,
    listener: UnixListener,
    poller: Poller,
    pending: Vec<PendingHost>,
    conns: BTreeMap<Key, Conn>,
    ctrl: VecDeque<Ctrl>,
    next_port: u32,
    /// Where the next RX round-robin starts.
    rr_next: Key,
    tx_buf: Vec<u8>,
    rx_buf: Vec<u8>,
}

impl Vsock {
    /// Binds `uds_path`: a stale socket there is replaced; a live one, or any other file, is
    /// an error (and stays as it was).
    pub fn new(guest_cid: u64, uds_path: &str) -> io::Result<Vsock> {
        let (listener, uds_file) = crate::uds::bind_listener(std::path::Path::new(uds_path))?;
        set_nonblocking(listener.as_raw_fd())?;
        let poller = Poller::new()?;
        poller.add(listener.as_raw_fd())?;
        Ok(Vsock {
            cid: guest_cid,
            uds_path: uds_path.to_string(),
            uds_file,
            listener,
            poller,
            pending: Vec::new(),
            conns: BTreeMap::new(),
            ctrl: VecDeque::new(),
            next_port: FIRST_LOCAL_PORT,
            rr_next: (0, 0),
            tx_buf: Vec::with_capacity(HDR_LEN + MAX_PAYLOAD),
            rx_buf: vec![0; MAX_PAYLOAD],
        })
    }

    /// A duplicate of the epoll fd the VMM thread watches.
    pub fn backend_fd(&self) -> io::Result<File> {
        self.poller.epoll.try_clone()
    }

    fn header(&self, key: Key, op: u16, flags: u32, len: u32) -> Header {
        let fwd_cnt = self.conns.get(&key).map_or(0, |c| c.fwd_cnt);
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt,
        }
    }

    fn push_ctrl(&mut self, key: Key, op: u16, flags: u32) {
        // A guest that sends packets to no connection (each asks for a RST) or CREDIT_REQUESTs
        // and takes no RX packet would grow the queue without bound: the same RST or
        // CREDIT_UPDATE is queued once, and none past MAX_QUEUED_CTRL (the guest hears of the
        // connection again when it next sends on it).
        if matches!(op, OP_RST | OP_CREDIT_UPDATE)
            && (self.ctrl.len() >= MAX_QUEUED_CTRL
                || self.ctrl.iter().any(|p| p.key == key && p.op == op))
        {
            log::debug!("vsock: control packet {op} for {key:?} not queued");
            return;
        }
        if op == OP_RST {
            METRICS.vsock.rst_sent.inc();
        }
        self.ctrl.push_back(Ctrl { key, op, flags });
    }

    /// Removes a connection and queues a RST for it.
    fn reset_conn(&mut self, key: Key) {
        if let Some(mut c) = self.conns.remove(&key) {
            let _ = c.flush();
            METRICS.vsock.conns_removed.inc();
        }
        self.ctrl.retain(|p| p.key != key);
        self.push_ctrl(key, OP_RST, 0);
    }

    fn remove_conn(&mut self, key: Key) {
        if let Some(mut c) = self.conns.remove(&key) {
            let _ = c.flush();
            METRICS.vsock.conns_removed.inc();
        }
        self.ctrl.retain(|p| p.key != key);
    }

    fn alloc_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_port;
            self.next_port = if p == u32::MAX {
                FIRST_LOCAL_PORT
            } else {
                p + 1
            };
            if !self.conns.keys().any(|k| k.0 == p) {
                return Some(p);
            }
        }
        None
    }

    /// Accepts host connections, reads their `CONNECT` lines, fires overdue timers.
    fn poll_host(&mut self) {
        self.poller.drain();
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if self.pending.len() >= MAX_CONNECTIONS {
                        METRICS.vsock.conn_event_fails.inc();
                        continue;
                    }
                    if set_nonblocking(s.as_raw_fd()).is_err()
                        || self.poller.add(s.as_raw_fd()).is_err()
                    {
                        METRICS.vsock.conn_event_fails.inc();
                        continue;
                    }
                    self.pending.push(PendingHost {
                        stream: s,
                        line: Vec::new(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::warn!("vsock: accept on {} failed: {e}", self.uds_path);
                    METRICS.vsock.conn_event_fails.inc();
                    break;
                }
            }
        }
        let mut i = 0;
        while i < self.pending.len() {
            match self.read_connect_line(i) {
                None => i += 1,
                Some(Err(e)) => {
                    log::debug!("vsock: host connection refused: {e}");
                    self.pending.swap_remove(i);
                }
                Some(Ok(port)) => {
                    let p = self.pending.swap_remove(i);
                    self.connect_guest(p.stream, port);
                }
            }
        }
        self.fire_timers();
    }

    /// None while the line is incomplete.
    fn read_connect_line(&mut self, i: usize) -> Option<Result<u32, String>> {
        let p = &mut self.pending[i];
        let mut b = [0u8; 1];
        // Byte by byte: nothing past the newline belongs to us.
        loop {
            match p.stream.read(&mut b) {
                Ok(0) => return Some(Err("EOF before the CONNECT line".into())),
                Ok(_) => {
                    if b[0] == b'\n' {
                        break;
                    }
                    p.line.push(b[0]);
                    if p.line.len() > MAX_CONNECT_LINE {
                        return Some(Err("CONNECT line too long".into()));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) => return Some(Err(e.to_string())),
            }
        }
        let line = String::from_utf8_lossy(&p.line).trim().to_string();
        let mut words = line.split_whitespace();
        match (
            words.next(),
            words.next().map(str::parse::<u32>),
            words.next(),
        ) {
            (Some(w), Some(Ok(port)), None) if w.eq_ignore_ascii_case("CONNECT") => Some(Ok(port)),
            _ => Some(Err(format!("bad CONNECT line {line:?}"))),
        }
    }

    fn connect_guest(&mut self, stream: UnixStream, guest_port: u32) {
        if self.conns.len() >= MAX_CONNECTIONS {
            log::debug!("vsock: too many connections");
            METRICS.vsock.conn_event_fails.inc();
            return;
        }
        let Some(local) = self.alloc_port() else {
            METRICS.vsock.conn_event_fails.inc();
            return;
        };
        let key = (local, guest_port);
        let mut c = Conn::new(stream, State::Connecting);
        c.deadline = Some(Instant::now() + SHUTDOWN_TIMEOUT);
        self.poller.arm(SHUTDOWN_TIMEOUT);
        self.conns.insert(key, c);
        METRICS.vsock.conns_added.inc();
        self.push_ctrl(key, OP_REQUEST, 0);
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        let overdue: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for k in overdue {
            log::debug!("vsock: connection {k:?} timed out");
            self.reset_conn(k);
        }
        if let Some(next) = self.conns.values().filter_map(|c| c.deadline).min() {
            self.poller.arm(next.saturating_duration_since(now));
        }
    }

    /// Starts a full shutdown by the device: SHUTDOWN to the guest, RST if unanswered.
    fn close_conn(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key) {
            if c.state == State::Closing {
                return;
            }
            c.state = State::Closing;
            c.deadline = Some(Instant::now() + SHUTDOWN_TIMEOUT);
            self.poller.arm(SHUTDOWN_TIMEOUT);
            self.push_ctrl(key, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND);
        }
    }

    /// Gathers one TX chain into `tx_buf`.
    fn gather(&mut self, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Result<(), String> {
        self.tx_buf.clear();
        for d in descs {
            if d.is_write_only() {
                return Err("write-only buffer in a TX chain".into());
            }
            let at = self.tx_buf.len();
            let len = d.len() as usize;
            if at + len > HDR_LEN + MAX_PAYLOAD {
                return Err("TX packet too long".into());
            }
            self.tx_buf.resize(at + len, 0);
            mem.read_slice(&mut self.tx_buf[at..], d.addr())
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn process_tx(&mut self, mem: &GuestMemoryMmap, q: &mut Queue) -> Result<bool, DeviceError> {
        let mut used_any = false;
        while let Some(chain) = super::pop_chain(mem, q)? {
            let head = chain.head_index();
            let res = collect_chain(mem, chain)
                .map_err(|e| e.to_string())
                .and_then(|d| self.gather(mem, &d));
            match res {
                Ok(()) => self.handle_packet(),
                Err(e) => {
                    log::debug!("vsock: malformed TX chain: {e}");
                    METRICS.vsock.malformed_packets.inc();
                }
            }
            q.add_used(mem, head, 0)
                .map_err(|e| DeviceError::UsedRing(e.to_string()))?;
            used_any = true;
        }
        Ok(used_any)
    }

    /// Handles the packet in `tx_buf`.
    fn handle_packet(&mut self) {
        let Some(h) = Header::parse(&self.tx_buf) else {
            log::debug!("vsock: TX packet shorter than a header");
            METRICS.vsock.malformed_packets.inc();
            return;
        };
        let key = (h.dst_port, h.src_port);
        let malformed = h.src_cid != self.cid
            || h.dst_cid != HOST_CID
            || h.type_ != TYPE_STREAM
            || !(OP_REQUEST..=OP_CREDIT_REQUEST).contains(&h.op)
            || h.len as usize > self.tx_buf.len() - HDR_LEN
            || (h.op != OP_RW && h.len != 0);
        if malformed {
            log::debug!("vsock: malformed TX packet {h:?}");
            METRICS.vsock.malformed_packets.inc();
            // Answer with a RST only what the guest could take for one of its connections.
            if h.src_cid == self.cid && h.dst_cid == HOST_CID && h.op != OP_RST {
                self.reset_conn(key);
            }
            return;
        }
        METRICS.vsock.tx_packets_count.inc();
        if h.op == OP_REQUEST {
            self.guest_connect(key, &h);
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            if h.op != OP_RST {
                self.push_ctrl(key, OP_RST, 0);
            }
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        if c.host_eof && c.state == State::Established {
            c.deadline = Some(Instant::now() + SHUTDOWN_TIMEOUT);
        }
        match h.op {
            OP_RESPONSE => {
                if c.state != State::Connecting {
                    self.reset_conn(key);
                    return;
                }
                c.state = State::Established;
                c.deadline = None;
                c.tx_pending
                    .extend_from_slice(format!("OK {}\n", key.0).as_bytes());
                if c.flush().is_err() {
                    self.reset_conn(key);
                }
            }
            OP_RW => {
                if c.state == State::Connecting || c.guest_send_done {
                    self.reset_conn(key);
                    return;
                }
                let data = &self.tx_buf[HDR_LEN..HDR_LEN + h.len as usize];
                if c.tx_pending.len() + data.len() > CONN_BUF_ALLOC as usize {
                    // The guest ignored our credit.
                    log::debug!("vsock: connection {key:?} overran its credit");
                    METRICS.vsock.malformed_packets.inc();
                    self.reset_conn(key);
                    return;
                }
                METRICS.vsock.tx_bytes_count.add(data.len() as u64);
                let total = c.tx_pending.len() + data.len();
                c.tx_pending.extend_from_slice(data);
                let res = c.flush();
                // Consumed bytes: only what went into the host socket.
                c.fwd_cnt = c.fwd_cnt.wrapping_add((total - c.tx_pending.len()) as u32);
                if res.is_err() {
                    self.close_conn(key);
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => self.push_ctrl(key, OP_CREDIT_UPDATE, 0),
            OP_SHUTDOWN => {
                if h.flags & SHUTDOWN_SEND != 0 {
                    c.guest_send_done = true;
                }
                if h.flags & SHUTDOWN_RCV != 0 {
                    c.guest_rcv_done = true;
                }
                if c.guest_send_done && c.guest_rcv_done {
                    // A full shutdown: acknowledged with a RST.
                    self.reset_conn(key);
                } else if c.flush().is_err() {
                    self.close_conn(key);
                }
            }
            OP_RST => self.remove_conn(key),
            _ => {}
        }
    }

    fn guest_connect(&mut self, key: Key, h: &Header) {
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            self.push_ctrl(key, OP_RST, 0);
            return;
        }
        let path = format!("{}_{}", self.uds_path, key.0);
        let stream = match crate::uds::connect_nonblocking(path.as_ref()) {
            Ok(s) => s,
            Err(e) => {
                log::debug!("vsock: cannot connect to {path}: {e}");
                METRICS.vsock.conn_event_fails.inc();
                self.push_ctrl(key, OP_RST, 0);
                return;
            }
        };
        if self.poller.add(stream.as_raw_fd()).is_err() {
            METRICS.vsock.conn_event_fails.inc();
            self.push_ctrl(key, OP_RST, 0);
            return;
        }
        let mut c = Conn::new(stream, State::Established);
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        self.conns.insert(key, c);
        METRICS.vsock.conns_added.inc();
        self.push_ctrl(key, OP_RESPONSE, 0);
    }

    /// Flushes guest data still pending for the host; a guest that freed our buffer
    /// enough hears about it. Connections with data left wake the device when they can take
    /// more; the others do not.
    fn flush_all(&mut self) {
        let mut broken = Vec::new();
        for (k, c) in self.conns.iter_mut() {
            if c.tx_pending.is_empty() {
                continue;
            }
            let before = c.tx_pending.len();
            let res = c.flush();
            c.fwd_cnt = c.fwd_cnt.wrapping_add((before - c.tx_pending.len()) as u32);
            if res.is_err() {
                broken.push(*k);
            }
        }
        for k in broken {
            self.close_conn(k);
        }
        let stale: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.state == State::Established
                    && c.fwd_cnt.wrapping_sub(c.last_fwd_cnt_sent) >= CONN_BUF_ALLOC / 2
            })
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            if !self
                .ctrl
                .iter()
                .any(|p| p.key == k && p.op == OP_CREDIT_UPDATE)
            {
                self.push_ctrl(k, OP_CREDIT_UPDATE, 0);
            }
        }
        for c in self.conns.values_mut() {
            let want = !c.tx_pending.is_empty();
            if want != c.out_armed && self.poller.watch_out(c.stream.as_raw_fd(), want).is_ok() {
                c.out_armed = want;
            }
        }
    }

    /// The next packet for the guest, with at most `room` payload bytes, in `rx_buf`:
    /// control packets first, then data round-robin.
    fn next_rx_packet(&mut self, room: usize) -> Option<Header> {
        while let Some(p) = self.ctrl.pop_front() {
            let live = self.conns.contains_key(&p.key);
            if !live && p.op != OP_RST {
                continue;
            }
            let h = self.header(p.key, p.op, p.flags, 0);
            if let Some(c) = self.conns.get_mut(&p.key) {
                c.last_fwd_cnt_sent = c.fwd_cnt;
            }
            return Some(h);
        }
        let keys: Vec<Key> = self
            .conns
            .range(self.rr_next..)
            .chain(self.conns.range(..self.rr_next))
            .filter(|(_, c)| c.state == State::Established && !c.host_eof && !c.guest_rcv_done)
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            let Some(c) = self.conns.get_mut(&k) else {
                continue;
            };
            let n = c.peer_credit().min(room).min(self.rx_buf.len());
            if n == 0 {
                continue;
            }
            match c.stream.read(&mut self.rx_buf[..n]) {
                Ok(0) => {
                    c.host_eof = true;
                    if c.guest_send_done {
                        self.close_conn(k);
                    } else {
                        // A half close: the guest may still send, but must not go silent
                        // for 2 s (every packet of it restarts the timer).
                        c.deadline = Some(Instant::now() + SHUTDOWN_TIMEOUT);
                        self.poller.arm(SHUTDOWN_TIMEOUT);
                        self.push_ctrl(k, OP_SHUTDOWN, SHUTDOWN_SEND);
                    }
                    return self.next_rx_packet(room);
                }
                Ok(got) => {
                    c.rx_cnt = c.rx_cnt.wrapping_add(got as u32);
                    c.last_fwd_cnt_sent = c.fwd_cnt;
                    self.rr_next = (k.0, k.1.wrapping_add(1));
                    METRICS.vsock.rx_bytes_count.add(got as u64);
                    return Some(self.header(k, OP_RW, 0, got as u32));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("vsock: host socket of {k:?}: {e}");
                    self.reset_conn(k);
                    return self.next_rx_packet(room);
                }
            }
        }
        None
    }

    fn process_rx(&mut self, mem: &GuestMemoryMmap, q: &mut Queue) -> Result<bool, DeviceError> {
        let mut used_any = false;
        while let Some(chain) = super::pop_chain(mem, q)? {
            let head = chain.head_index();
            let descs = match collect_chain(mem, chain) {
                Ok(d) if d.iter().all(|d| d.is_write_only()) => d,
                _ => {
                    log::debug!("vsock: malformed RX chain");
                    METRICS.vsock.malformed_packets.inc();
                    q.add_used(mem, head, 0)
                        .map_err(|e| DeviceError::UsedRing(e.to_string()))?;
                    used_any = true;
                    continue;
                }
            };
            let total: usize = descs.iter().map(|d| d.len() as usize).sum();
            if total < HDR_LEN {
                METRICS.vsock.malformed_packets.inc();
                q.add_used(mem, head, 0)
                    .map_err(|e| DeviceError::UsedRing(e.to_string()))?;
                used_any = true;
                continue;
            }
            let Some(h) = self.next_rx_packet(total - HDR_LEN) else {
                // Nothing to send: the chain waits.
                q.go_to_previous_position();
                break;
            };
            let hdr = h.to_bytes();
            let written = scatter(mem, &descs, [&hdr, &self.rx_buf[..h.len as usize]]);
            METRICS.vsock.rx_packets_count.inc();
            q.add_used(mem, head, written)
                .map_err(|e| DeviceError::UsedRing(e.to_string()))?;
            used_any = true;
        }
        Ok(used_any)
    }

    /// The event queue: its buffers stay with the device until it has an event (a transport
    /// reset) to put there. A chain that could never hold one (malformed, device-readable, or
    /// shorter than `struct virtio_vsock_event`) is counted and given back with length 0 as
    /// soon as the driver makes it available; the first sound one is left in place.
    fn check_event_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        q: &mut Queue,
    ) -> Result<bool, DeviceError> {
        let mut used_any = false;
        while let Some(chain) = super::pop_chain(mem, q)? {
            let head = chain.head_index();
            match collect_chain(mem, chain) {
                Ok(d)
                    if d.iter().all(|d| d.is_write_only())
                        && d.iter().map(|d| d.len() as usize).sum::<usize>() >= EVENT_LEN =>
                {
                    q.go_to_previous_position();
                    break;
                }
                _ => {
                    log::debug!("vsock: malformed event queue chain");
                    METRICS.vsock.malformed_packets.inc();
                    q.add_used(mem, head, 0)
                        .map_err(|e| DeviceError::UsedRing(e.to_string()))?;
                    used_any = true;
                }
            }
        }
        Ok(used_any)
    }

    fn run(
        &mut self,
        tx: bool,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
    ) -> Result<bool, DeviceError> {
        self.poll_host();
        let mut used = false;
        if tx {
            used |= self.process_tx(mem, &mut queues[TX_QUEUE])?;
        }
        self.flush_all();
        used |= self.process_rx(mem, &mut queues[RX_QUEUE])?;
        Ok(used)
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | super::VIRTIO_RING_F_EVENT_IDX
    }

    /// guest_cid u64.
    fn config_space(&self) -> Vec<u8> {
        self.cid.to_le_bytes().to_vec()
    }

    fn queue_count(&self) -> usize {
        3
    }

    fn process_queues(
        &mut self,
        index: usize,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
    ) -> Result<bool, DeviceError> {
        match index {
            EVENT_QUEUE => self.check_event_queue(mem, &mut queues[EVENT_QUEUE]),
            i => self.run(i == TX_QUEUE, mem, queues),
        }
    }

    fn process_backend(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
    ) -> Result<bool, DeviceError> {
        self.run(true, mem, queues)
    }

    fn reset(&mut self) {
        // A reset ends every connection at once, as a RST does: the streams are closed and
        // what the host had not yet taken of the guest's data is dropped. It runs on the vCPU
        // thread (the guest's STATUS write), whose filter allows closing a socket but neither
        // writing to it (sendto) nor shutting it down.
        METRICS.vsock.conns_removed.add(self.conns.len() as u64);
        self.conns.clear();
        self.ctrl.clear();
        self.pending.clear();
    }
}

/// Writes `parts` one after the other into the chain's buffers, in order, slice by slice (a
/// zero-length buffer holds nothing; the rest of the chain still does). Returns the bytes
/// written, short when a buffer cannot be written.
fn scatter(mem: &GuestMemoryMmap, descs: &[Descriptor], parts: [&[u8]; 2]) -> u32 {
    let mut parts = parts.into_iter();
    let mut cur: &[u8] = &[];
    let mut written = 0u32;
    for d in descs {
        let mut off = 0usize;
        while off < d.len() as usize {
            if cur.is_empty() {
                match parts.next() {
                    Some(p) => {
                        cur = p;
                        continue;
                    }
                    None => return written,
                }
            }
            let n = (d.len() as usize - off).min(cur.len());
            let Some(at) = d.addr().checked_add(off as u64) else {
                return written;
            };
            if mem.write_slice(&cur[..n], at).is_err() {
                return written;
            }
            written += n as u32;
            cur = &cur[n..];
            off += n;
        }
    }
    written
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.uds_file.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Address, GuestAddress};

    const GUEST_CID: u64 = 3;
    const QSIZE: u16 = 16;
    const QBASE: [u64; 3] = [0x10000, 0x20000, 0x30000];
    const RX_BUFS: u64 = 0x40000;
    const TX_BUFS: u64 = 0x80000;
    const BUF: u64 = 0x2000;

    struct H {
        mem: GuestMemoryMmap,
        qs: Vec<Queue>,
        dev: Vsock,
        rx_avail: u16,
        rx_seen: u16,
        tx_avail: u16,
        _dir: Dir,
    }

    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn desc(mem: &GuestMemoryMmap, q: usize, i: u16, addr: u64, len: u32, flags: u16) {
        let at = GuestAddress(QBASE[q] + u64::from(i) * 16);
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, at.unchecked_add(8)).unwrap();
        mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        mem.write_obj(0u16, at.unchecked_add(14)).unwrap();
    }

    fn avail(mem: &GuestMemoryMmap, q: usize, slot: u16, head: u16) {
        let a = QBASE[q] + 0x1000;
        mem.write_obj(head, GuestAddress(a + 4 + 2 * u64::from(slot % QSIZE)))
            .unwrap();
        mem.write_obj(slot.wrapping_add(1), GuestAddress(a + 2))
            .unwrap();
    }

    impl H {
        fn new(tag: &str) -> H {
            let dir =
                std::env::temp_dir().join(format!("ember-vsock-unit-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let uds = dir.join("v.sock");
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
            let qs = QBASE
                .iter()
                .map(|&b| {
                    let mut q = Queue::new(super::super::QUEUE_MAX_SIZE).unwrap();
                    q.set_size(QSIZE);
                    q.set_desc_table_address(Some(b as u32), Some(0));
                    q.set_avail_ring_address(Some((b + 0x1000) as u32), Some(0));
                    q.set_used_ring_address(Some((b + 0x2000) as u32), Some(0));
                    q.set_ready(true);
                    assert!(q.is_valid(&mem));
                    q
                })
                .collect();
            let dev = Vsock::new(GUEST_CID, uds.to_str().unwrap()).unwrap();
            H {
                mem,
                qs,
                dev,
                rx_avail: 0,
                rx_seen: 0,
                tx_avail: 0,
                _dir: Dir(dir),
            }
        }

        fn uds(&self) -> String {
            self.dev.uds_path.clone()
        }

        fn post_rx(&mut self, n: u16) {
            for _ in 0..n {
                let i = self.rx_avail % QSIZE;
                let len = (HDR_LEN + 4096) as u32;
                desc(&self.mem, RX_QUEUE, i, RX_BUFS + u64::from(i) * BUF, len, 2);
                avail(&self.mem, RX_QUEUE, self.rx_avail, i);
                self.rx_avail = self.rx_avail.wrapping_add(1);
            }
            self.dev
                .process_queues(RX_QUEUE, &self.mem, &mut self.qs)
                .unwrap();
        }

        fn send_raw(&mut self, bytes: &[u8], len: u32) {
            let i = self.tx_avail % QSIZE;
            let addr = TX_BUFS + u64::from(i) * BUF;
            self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
            desc(&self.mem, TX_QUEUE, i, addr, len, 0);
            avail(&self.mem, TX_QUEUE, self.tx_avail, i);
            self.tx_avail = self.tx_avail.wrapping_add(1);
            self.dev
                .process_queues(TX_QUEUE, &self.mem, &mut self.qs)
                .unwrap();
        }

        fn send(&mut self, op: u16, src_port: u32, dst_port: u32, payload: &[u8]) {
            self.send_with(op, src_port, dst_port, payload, 0, 64 * 1024, 0);
        }

        #[allow(clippy::too_many_arguments)]
        fn send_with(
            &mut self,
            op: u16,
            src_port: u32,
            dst_port: u32,
            payload: &[u8],
            flags: u32,
            buf_alloc: u32,
            fwd_cnt: u32,
        ) {
            let h = Header {
                src_cid: GUEST_CID,
                dst_cid: HOST_CID,
                src_port,
                dst_port,
                len: payload.len() as u32,
                type_: TYPE_STREAM,
                op,
                flags,
                buf_alloc,
                fwd_cnt,
            };
            let mut b = h.to_bytes().to_vec();
            b.extend_from_slice(payload);
            let n = b.len() as u32;
            self.send_raw(&b, n);
        }

        fn backend(&mut self) {
            self.dev.process_backend(&self.mem, &mut self.qs).unwrap();
        }

        /// The next packet the device put in the RX queue.
        fn recv(&mut self) -> Option<(Header, Vec<u8>)> {
            let used = QBASE[RX_QUEUE] + 0x2000;
            let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
            if idx == self.rx_seen {
                return None;
            }
            let e = used + 4 + 8 * u64::from(self.rx_seen % QSIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let mut b = vec![0u8; len as usize];
            self.mem
                .read_slice(&mut b, GuestAddress(RX_BUFS + u64::from(id) * BUF))
                .unwrap();
            let h = Header::parse(&b).unwrap();
            assert_eq!(h.len as usize, b.len() - HDR_LEN);
            assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, GUEST_CID));
            Some((h, b[HDR_LEN..].to_vec()))
        }

        fn expect(&mut self, op: u16) -> (Header, Vec<u8>) {
            let p = self
                .recv()
                .unwrap_or_else(|| panic!("no packet, wanted op {op}"));
            assert_eq!(p.0.op, op, "{:?}", p.0);
            p
        }
    }

    fn read_some(s: &mut UnixStream, n: usize) -> Vec<u8> {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = vec![0u8; n];
        s.read_exact(&mut b).unwrap();
        b
    }

    #[test]
    fn header_layout_and_identity() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 5,
            dst_port: 6,
            len: 7,
            type_: 1,
            op: 5,
            flags: 8,
            buf_alloc: 9,
            fwd_cnt: 10,
        };
        let b = h.to_bytes();
        assert_eq!(b[16], 5);
        assert_eq!(b[24], 7);
        assert_eq!(b[30], 5);
        assert_eq!(b[40], 10);
        assert_eq!(Header::parse(&b), Some(h));
        assert_eq!(Header::parse(&b[..43]), None);
        let hh = H::new("id");
        assert_eq!(hh.dev.device_type(), 19);
        assert_eq!(hh.dev.queue_count(), 3);
        assert_eq!(
            hh.dev.avail_features(),
            VIRTIO_F_VERSION_1 | super::super::VIRTIO_RING_F_EVENT_IDX
        );
        assert_eq!(hh.dev.config_space(), 3u64.to_le_bytes().to_vec());
    }

    /// A host listener that stopped accepting, with its backlog full: the guest's REQUEST
    /// gets a RST at once (a blocking connect would have held the VMM thread until the
    /// listener accepted, here for ever).
    #[test]
    fn full_host_backlog_is_refused_without_waiting() {
        let mut h = H::new("backlog");
        let path = format!("{}_6002", h.uds());
        let l = UnixListener::bind(&path).unwrap();
        // Backlog 0 (listen(2) again changes it): one connection waits there, unaccepted,
        // and the next one finds it full.
        // SAFETY: listen(2) on a listening socket this test owns.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
        let _waiting = UnixStream::connect(&path).unwrap();
        h.post_rx(8);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let guest = std::thread::spawn(move || {
            h.send(OP_REQUEST, 49152, 6002, b"");
            let (r, _) = h.expect(OP_RST);
            done_tx.send((r.src_port, r.dst_port)).unwrap();
        });
        let ports = done_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the device waited on the host's listener");
        assert_eq!(ports, (6002, 49152));
        guest.join().unwrap();
    }

    #[test]
    fn guest_initiated_connection() {
        let mut h = H::new("guest");
        let l = UnixListener::bind(format!("{}_6000", h.uds())).unwrap();
        h.post_rx(8);
        // No listener on 6001: RST.
        h.send(OP_REQUEST, 49152, 6001, b"");
        h.expect(OP_RST);
        h.send(OP_REQUEST, 49152, 6000, b"");
        let (r, _) = h.expect(OP_RESPONSE);
        assert_eq!(
            (r.src_port, r.dst_port, r.buf_alloc),
            (6000, 49152, CONN_BUF_ALLOC)
        );
        let (mut s, _) = l.accept().unwrap();
        h.send(OP_RW, 49152, 6000, b"ping");
        assert_eq!(read_some(&mut s, 4), b"ping");
        s.write_all(b"pong").unwrap();
        h.backend();
        let (p, data) = h.expect(OP_RW);
        assert_eq!(data, b"pong");
        assert_eq!(p.fwd_cnt, 4);
        // CREDIT_REQUEST gets a CREDIT_UPDATE.
        h.send(OP_CREDIT_REQUEST, 49152, 6000, b"");
        let (u, _) = h.expect(OP_CREDIT_UPDATE);
        assert_eq!(u.fwd_cnt, 4);
        // The host closes: SHUTDOWN (no more sends); the guest's full shutdown gets a RST.
        drop(s);
        h.backend();
        let (sd, _) = h.expect(OP_SHUTDOWN);
        assert_eq!(sd.flags, SHUTDOWN_SEND);
        h.send_with(OP_SHUTDOWN, 49152, 6000, b"", 3, 65536, 4);
        h.expect(OP_RST);
        assert!(h.dev.conns.is_empty());
        // Packets for a gone connection: RST.
        h.send(OP_RW, 49152, 6000, b"late");
        h.expect(OP_RST);
    }

    #[test]
    fn host_initiated_connection_and_credit() {
        let mut h = H::new("host");
        let mut s = UnixStream::connect(h.uds()).unwrap();
        s.write_all(b"CONNECT 5000\n").unwrap();
        // Before the guest has an RX buffer nothing is lost.
        h.backend();
        h.post_rx(8);
        let (req, _) = h.expect(OP_REQUEST);
        assert_eq!((req.src_port, req.dst_port), (1024, 5000));
        // The guest answers with a small buffer: 8 bytes of credit.
        h.send_with(OP_RESPONSE, 5000, 1024, b"", 0, 8, 0);
        assert_eq!(read_some(&mut s, 8), b"OK 1024\n");
        s.write_all(&[7u8; 20]).unwrap();
        h.backend();
        let (_, d) = h.expect(OP_RW);
        assert_eq!(d.len(), 8);
        assert!(h.recv().is_none(), "credit exceeded");
        // The guest consumed 8 bytes: 8 more.
        h.send_with(OP_CREDIT_UPDATE, 5000, 1024, b"", 0, 8, 8);
        let (_, d) = h.expect(OP_RW);
        assert_eq!(d.len(), 8);
        h.send_with(OP_CREDIT_UPDATE, 5000, 1024, b"", 0, 8, 16);
        let (_, d) = h.expect(OP_RW);
        assert_eq!(d.len(), 4);
        // A second host connection gets the next port.
        let mut s2 = UnixStream::connect(h.uds()).unwrap();
        s2.write_all(b"CONNECT 5001\n").unwrap();
        h.backend();
        let (req, _) = h.expect(OP_REQUEST);
        assert_eq!((req.src_port, req.dst_port), (1025, 5001));
        // A bad CONNECT line closes the host socket.
        let mut s3 = UnixStream::connect(h.uds()).unwrap();
        s3.write_all(b"HELLO\n").unwrap();
        h.backend();
        let mut b = [0u8; 1];
        s3.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(s3.read(&mut b).unwrap(), 0);
        assert_eq!(h.dev.pending.len(), 0);
    }

    #[test]
    fn unanswered_requests_and_shutdowns_get_rst() {
        let mut h = H::new("timer");
        let mut s = UnixStream::connect(h.uds()).unwrap();
        s.write_all(b"CONNECT 5000\n").unwrap();
        h.post_rx(4);
        h.backend();
        h.expect(OP_REQUEST);
        // Pretend 2 s went by.
        for c in h.dev.conns.values_mut() {
            c.deadline = Some(Instant::now());
        }
        h.backend();
        h.expect(OP_RST);
        assert!(h.dev.conns.is_empty());
        let mut b = [0u8; 1];
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(s.read(&mut b).unwrap(), 0);
    }

    #[test]
    fn event_queue_gives_back_malformed_chains_and_keeps_sound_ones() {
        let mut h = H::new("evq");
        let before = METRICS.vsock.malformed_packets.count();
        // Device-readable, too short, outside guest memory: given back at once, counted.
        desc(&h.mem, EVENT_QUEUE, 0, 0x9000, 8, 0);
        desc(&h.mem, EVENT_QUEUE, 1, 0x9000, 2, 2);
        desc(&h.mem, EVENT_QUEUE, 2, 1 << 40, 8, 2);
        // A sound one stays with the device.
        desc(&h.mem, EVENT_QUEUE, 3, 0x9000, 8, 2);
        for i in 0..4 {
            avail(&h.mem, EVENT_QUEUE, i, i);
        }
        assert!(h
            .dev
            .process_queues(EVENT_QUEUE, &h.mem, &mut h.qs)
            .unwrap());
        let used = QBASE[EVENT_QUEUE] + 0x2000;
        let idx: u16 = h.mem.read_obj(GuestAddress(used + 2)).unwrap();
        assert_eq!(idx, 3);
        assert!(METRICS.vsock.malformed_packets.count() >= before + 3);
        // Notified again: the sound chain is still not used.
        assert!(!h
            .dev
            .process_queues(EVENT_QUEUE, &h.mem, &mut h.qs)
            .unwrap());
        let idx: u16 = h.mem.read_obj(GuestAddress(used + 2)).unwrap();
        assert_eq!(idx, 3);
        // An avail index beyond the queue is an error (the transport sets NEEDS_RESET).
        h.mem
            .write_obj(1000u16, GuestAddress(QBASE[EVENT_QUEUE] + 0x1000 + 2))
            .unwrap();
        assert!(matches!(
            h.dev.process_queues(EVENT_QUEUE, &h.mem, &mut h.qs),
            Err(DeviceError::AvailRing(_))
        ));
    }

    #[test]
    fn malformed_packets_are_counted_and_dropped() {
        let mut h = H::new("bad");
        let l = UnixListener::bind(format!("{}_7000", h.uds())).unwrap();
        h.post_rx(8);
        let before = METRICS.vsock.malformed_packets.count();
        // Short header.
        h.send_raw(&[0u8; 20], 20);
        assert!(h.recv().is_none());
        // Wrong source CID: dropped without an answer.
        let mut bad = Header {
            src_cid: 9,
            dst_cid: HOST_CID,
            src_port: 1,
            dst_port: 7000,
            type_: TYPE_STREAM,
            op: OP_REQUEST,
            ..Header::default()
        };
        h.send_raw(&bad.to_bytes(), HDR_LEN as u32);
        assert!(h.recv().is_none());
        // Unknown op: RST.
        bad.src_cid = GUEST_CID;
        bad.op = 42;
        h.send_raw(&bad.to_bytes(), HDR_LEN as u32);
        h.expect(OP_RST);
        // len beyond the chain.
        bad.op = OP_RW;
        bad.len = 100;
        h.send_raw(&bad.to_bytes(), HDR_LEN as u32 + 10);
        h.expect(OP_RST);
        // A write-only TX buffer.
        let i = h.tx_avail % QSIZE;
        desc(&h.mem, TX_QUEUE, i, TX_BUFS, 64, 2);
        avail(&h.mem, TX_QUEUE, h.tx_avail, i);
        h.tx_avail += 1;
        h.dev.process_queues(TX_QUEUE, &h.mem, &mut h.qs).unwrap();
        assert!(METRICS.vsock.malformed_packets.count() >= before + 5);
        // A guest overrunning our credit is reset.
        h.send(OP_REQUEST, 2, 7000, b"");
        h.expect(OP_RESPONSE);
        let (_s, _) = l.accept().unwrap();
        // Nobody reads the host side; the socket buffer fills and then our 64 KiB.
        let chunk = vec![1u8; 4096];
        let mut reset = false;
        for _ in 0..1024 {
            h.send(OP_RW, 2, 7000, &chunk);
            while let Some((p, _)) = h.recv() {
                reset |= p.op == OP_RST;
                h.post_rx(1);
            }
            if reset {
                break;
            }
        }
        assert!(reset);
        assert!(h.dev.conns.is_empty());
    }

    #[test]
    fn control_packets_for_a_guest_that_takes_none_stay_bounded() {
        let mut h = H::new("ctrlcap");
        let l = UnixListener::bind(format!("{}_7000", h.uds())).unwrap();
        h.post_rx(1);
        h.send(OP_REQUEST, 2, 7000, b"");
        h.expect(OP_RESPONSE);
        let (_s, _) = l.accept().unwrap();
        // No RX buffers from now on. CREDIT_REQUESTs on the live connection: one answer.
        for _ in 0..100 {
            h.send(OP_CREDIT_REQUEST, 2, 7000, b"");
        }
        assert_eq!(h.dev.ctrl.len(), 1);
        // Packets to connections that do not exist, each asking for a RST: bounded.
        for port in 0..3 * MAX_QUEUED_CTRL as u32 {
            h.send(OP_RW, 10_000 + port, 7001, b"x");
        }
        assert_eq!(h.dev.ctrl.len(), MAX_QUEUED_CTRL);
        // What was queued first still comes out first.
        h.post_rx(2);
        h.expect(OP_CREDIT_UPDATE);
        let (p, _) = h.expect(OP_RST);
        assert_eq!((p.src_port, p.dst_port), (7001, 10_000));
        assert_eq!(h.dev.conns.len(), 1);
    }

    #[test]
    fn scatter_spreads_header_and_payload_over_odd_buffers() {
        let mem = super::super::test_util::memory();
        let hdr = [0xabu8; HDR_LEN];
        let payload: Vec<u8> = (0..100u8).collect();
        let want: Vec<u8> = hdr.iter().chain(payload.iter()).copied().collect();
        // The header split over two buffers, an empty one, the payload split, room to spare.
        let layout = [
            (0x8000u64, 10u32),
            (0x9000, 40),
            (0xa000, 0),
            (0xb000, 60),
            (0xc000, 200),
        ];
        let descs: Vec<Descriptor> = layout
            .iter()
            .map(|&(a, l)| Descriptor::new(a, l, 2, 0))
            .collect();
        assert_eq!(scatter(&mem, &descs, [&hdr, &payload]), want.len() as u32);
        let mut got = Vec::new();
        for &(a, l) in &layout {
            let mut b = vec![0u8; l as usize];
            mem.read_slice(&mut b, GuestAddress(a)).unwrap();
            got.extend_from_slice(&b);
        }
        assert_eq!(&got[..want.len()], &want[..]);
        assert!(got[want.len()..].iter().all(|&b| b == 0));
        // Too little room: what fits is written; a header-only packet needs no payload part.
        assert_eq!(scatter(&mem, &descs[..2], [&hdr, &payload]), 50);
        assert_eq!(scatter(&mem, &descs, [&hdr, &[]]), HDR_LEN as u32);
        // A buffer outside guest memory stops the copy there.
        let bad = [
            Descriptor::new(0x8000, 8, 2, 0),
            Descriptor::new(u64::MAX - 4, 64, 2, 0),
        ];
        assert_eq!(scatter(&mem, &bad, [&hdr, &payload]), 8);
    }

    #[test]
    fn sockets_wake_the_device_for_room_to_write_only_while_data_waits() {
        let p = Poller::new().unwrap();
        let ready = |p: &Poller| {
            let mut ev = [libc::epoll_event { events: 0, u64: 0 }; 4];
            // SAFETY: the buffer holds 4 events.
            unsafe { libc::epoll_wait(p.epoll.as_raw_fd(), ev.as_mut_ptr(), 4, 0) > 0 }
        };
        let (ours, host) = UnixStream::pair().unwrap();
        p.add(ours.as_raw_fd()).unwrap();
        let mut b = [0u8; 8];
        // The host reading what we wrote frees room: no wake-up for that.
        (&ours).write_all(b"data").unwrap();
        assert_eq!((&host).read(&mut b).unwrap(), 4);
        assert!(!ready(&p));
        // With guest data waiting, room to write is news (at once, the socket has room).
        p.watch_out(ours.as_raw_fd(), true).unwrap();
        assert!(ready(&p));
        p.drain();
        p.watch_out(ours.as_raw_fd(), false).unwrap();
        (&ours).write_all(b"more").unwrap();
        assert_eq!((&host).read(&mut b).unwrap(), 4);
        assert!(!ready(&p));
        // Input from the host always wakes it.
        (&host).write_all(b"in").unwrap();
        assert!(ready(&p));
    }
}
