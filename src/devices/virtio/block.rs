//! virtio-blk backed by a host file, with plain positional reads and writes (io_engine Sync)
//! or io_uring (io_engine Async, [`uring`]).

mod uring;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{
    check_buffer, collect_chain_structure, ChainError, DeviceError, VirtioDevice, TYPE_BLOCK,
    VIRTIO_F_VERSION_1,
};
use crate::api::models::RateLimiter as RateLimiterConfig;
use crate::devices::rate_limiter::{now_ns, RateLimiter, Throttle};
use crate::metrics::{BlockMetrics, IncMetric, METRICS};

pub const SECTOR_SIZE: u64 = 512;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

pub const ID_BYTES: usize = 20;
const HEADER_LEN: u32 = 16;
/// Data moves through a bounce buffer of at most this size.
const CHUNK: usize = 64 * 1024;

/// A request whose descriptors were checked.
struct Request {
    req_type: u32,
    sector: u64,
    /// The descriptors between the header and the status byte.
    data: Vec<Descriptor>,
    status: GuestAddress,
}

/// Rounds of popping, submitting and reaping one `Async` processing pass makes at most.
const MAX_ROUNDS: usize = 16;

/// Most buffers one merged `Async` operation carries (the kernel takes up to 1024).
const MAX_MERGED_BUFFERS: usize = 256;

/// An `Async` read, write or flush, checked, waiting for [`Block::start_staged`].
struct Staged {
    part: uring::Part,
    op: uring::Op,
    /// Its first byte in the file (0 for a flush).
    pos: u64,
    bufs: uring::Buffers,
}

/// A request the device answers with a status byte.
#[derive(Debug)]
enum RequestError {
    /// Answered VIRTIO_BLK_S_IOERR.
    Io(String),
    /// Answered VIRTIO_BLK_S_UNSUPP.
    Unsupported(u32),
}

pub struct Block {
    file: File,
    capacity: u64,
    read_only: bool,
    writeback: bool,
    id: [u8; ID_BYTES],
    buf: Vec<u8>,
    /// The io_uring of an `Async` drive; None for `Sync`.
    uring: Option<uring::Uring>,
    /// `Async` requests popped in this pass, not yet on the ring.
    staged: Vec<Staged>,
    /// Ops (one per request) and bandwidth (data bytes) of the queue, and the timer armed
    /// while the limiter refuses (none for a drive made without one: tests).
    throttle: Throttle,
    /// The drive's own group (`block_<drive_id>` once named by [`Block::with_metrics_id`]).
    metrics: Arc<BlockMetrics>,
}

/// Adds `n` to one block counter in the aggregate `block` group and in the drive's own.
fn bump(dev: &BlockMetrics, field: fn(&BlockMetrics) -> &IncMetric, n: u64) {
    field(&METRICS.block).add(n);
    field(dev).add(n);
}

impl Block {
    /// `file` is opened read-only for a read-only drive. `writeback` offers FLUSH and makes
    /// it an fsync.
    pub fn new(file: File, read_only: bool, writeback: bool) -> std::io::Result<Block> {
        let meta = file.metadata()?;
        // A block device's st_size is 0; its end is its size (a regular file's too).
        let size = std::io::Seek::seek(&mut &file, std::io::SeekFrom::End(0))?;
        let mut id = [0u8; ID_BYTES];
        // As Firecracker (and kvmtool) build it, so the serial a guest sees is the same.
        let s = format!("{}{}{}", meta.dev(), meta.rdev(), meta.ino());
        let n = s.len().min(ID_BYTES);
        id[..n].copy_from_slice(&s.as_bytes()[..n]);
        Ok(Block {
            file,
            capacity: size / SECTOR_SIZE,
            read_only,
            writeback,
            id,
            buf: Vec::new(),
            uring: None,
            staged: Vec::new(),
            throttle: Throttle::default(),
            metrics: Arc::new(BlockMetrics::new()),
        })
    }

    /// Counts the drive's requests also in the group `block_<drive_id>`.
    pub fn with_metrics_id(mut self, drive_id: &str) -> Block {
        self.metrics = crate::metrics::block_metrics(drive_id);
        self
    }

    /// Gives the drive its rate limiter (none: unlimited) and the timer that lets it be set
    /// or changed later by `PATCH`.
    pub fn with_rate_limiter(mut self, cfg: Option<&RateLimiterConfig>) -> std::io::Result<Block> {
        self.throttle = Throttle::new([RateLimiter::from_config(cfg, now_ns())], true)?;
        Ok(self)
    }

    /// The tokens a request costs: its data bytes for a read or a write.
    fn cost(req: &Request) -> u64 {
        match req.req_type {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => req.data.iter().map(|d| u64::from(d.len())).sum(),
            _ => 0,
        }
    }

    /// An `Async` drive: requests go through an io_uring whose completions are signalled on
    /// [`VirtioDevice::completion_event`].
    pub fn new_async(file: File, read_only: bool, writeback: bool) -> std::io::Result<Block> {
        let mut b = Block::new(file, read_only, writeback)?;
        b.uring = Some(uring::Uring::new(&b.file)?);
        Ok(b)
    }

    /// Checks a read or write against the drive; returns its first byte in the file.
    fn check_rw(&self, write: bool, sector: u64, data: &[Descriptor]) -> Result<u64, RequestError> {
        let io = |e: String| RequestError::Io(e);
        if write && self.read_only {
            return Err(io("write to a read-only drive".into()));
        }
        // Data buffers: device-writable for IN, readable for OUT.
        if data.iter().any(|d| d.is_write_only() == write) {
            METRICS.virtio.malformed_chains.inc();
            return Err(io("data buffer with the wrong direction".into()));
        }
        let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
        let start = sector.checked_mul(SECTOR_SIZE);
        let end = start.and_then(|s| s.checked_add(total));
        let (Some(start), Some(end)) = (start, end) else {
            return Err(io("sector out of range".into()));
        };
        if end > self.capacity * SECTOR_SIZE {
            return Err(io(format!(
                "request {start:#x}..{end:#x} beyond the capacity of {} sectors",
                self.capacity
            )));
        }
        Ok(start)
    }

    /// Stages a request for the io_uring; `Some` used length when it finished at once.
    fn stage_async(&mut self, mem: &GuestMemoryMmap, head: u16, req: Request) -> Option<u32> {
        let op = match req.req_type {
            VIRTIO_BLK_T_IN => uring::Op::Read,
            VIRTIO_BLK_T_OUT => uring::Op::Write,
            VIRTIO_BLK_T_FLUSH if self.writeback => uring::Op::Flush,
            _ => {
                let (res, written) = self.execute(mem, req.req_type, req.sector, &req.data);
                return Some(Self::finish(&self.metrics, mem, req.status, res, written));
            }
        };
        let pos = match op {
            uring::Op::Flush => 0,
            _ => match self.check_rw(op == uring::Op::Write, req.sector, &req.data) {
                Ok(p) => p,
                Err(e) => return Some(Self::finish(&self.metrics, mem, req.status, Err(e), 0)),
            },
        };
        let bufs = match uring::Buffers::new(mem, &req.data) {
            Ok(b) => b,
            Err(e) => {
                let res = Err(RequestError::Io(e));
                return Some(Self::finish(&self.metrics, mem, req.status, res, 0));
            }
        };
        self.staged.push(Staged {
            part: uring::Part {
                head,
                status: req.status,
                len: bufs.len(),
            },
            op,
            pos,
            bufs,
        });
        None
    }

    /// Puts the staged requests on the ring, in order. Writes that follow each other in the
    /// file, as a guest's sequential writes do, become one operation: one io-wq work item and
    /// one completion instead of many (buffered writes on a file system without non-blocking
    /// buffered writes, ext4 for one, all go through io-wq). Reads are left alone: from the
    /// page cache they complete within the submission anyway, and a large merged read
    /// sometimes does not (part of it then goes to io-wq), which halved the guest's
    /// sequential read in about one run out of three. Returns whether a request was used (one
    /// the ring refused).
    fn start_staged(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, DeviceError> {
        let staged = std::mem::take(&mut self.staged);
        let Some(ring) = self.uring.as_mut() else {
            return Ok(false);
        };
        let mut refused = Vec::new();
        let mut iter = staged.into_iter().peekable();
        while let Some(first) = iter.next() {
            let (op, pos) = (first.op, first.pos);
            let mut end = pos.saturating_add(first.part.len);
            let mut parts = vec![first.part];
            let mut bufs = first.bufs;
            while let Some(next) = iter.next_if(|n| {
                op == uring::Op::Write
                    && n.op == op
                    && n.pos == end
                    && bufs.count() + n.bufs.count() <= MAX_MERGED_BUFFERS
            }) {
                end = end.saturating_add(next.part.len);
                parts.push(next.part);
                bufs.append(next.bufs);
            }
            if let Err((parts, e)) = ring.push(mem, parts, op, pos, bufs) {
                refused.extend(parts.into_iter().map(|p| (p, e.clone())));
            }
        }
        let mut used_any = false;
        for (p, e) in refused {
            let len = Self::finish(&self.metrics, mem, p.status, Err(RequestError::Io(e)), 0);
            queue
                .add_used(mem, p.head, len)
                .map_err(|e| DeviceError::UsedRing(e.to_string()))?;
            used_any = true;
        }
        Ok(used_any)
    }

    /// Pops chains while the rate limiter allows (and, for `Async`, while the ring has room);
    /// a throttled request goes back to the queue and the timer is armed. `Async` requests
    /// reach the kernel together, in one `io_uring_enter` at the end, and those it completed
    /// at once are used right away.
    fn process_chains(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, DeviceError> {
        let mut used_any = false;
        for _ in 0..MAX_ROUNDS {
            let res = self.pop_and_start(mem, queue);
            let started = self.start_staged(mem, queue);
            let submitted = self.uring.as_mut().is_some_and(|u| u.submit());
            used_any |= res?;
            used_any |= started?;
            // Requests the kernel finished within io_uring_enter (buffered reads from the page
            // cache, mostly) go back to the guest now, not after a trip through the event
            // loop; the slots they free may take more chains.
            if !submitted || !self.reap(mem, queue)? {
                return Ok(used_any);
            }
            used_any = true;
        }
        // A guest that keeps the queue full does not keep the VMM thread here: the event loop
        // serves the rest first and comes back through the completion event.
        if let Some(u) = self.uring.as_ref() {
            u.kick();
        }
        Ok(used_any)
    }

    /// [`Block::process_chains`] up to the submission. While `Async` requests are in flight
    /// an empty queue does not re-arm the driver's notifications: their completions bring
    /// the device back to the queue anyway, so with EVENT_IDX the driver can add requests
    /// meanwhile without an exit; the last completion re-arms them.
    fn pop_and_start(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, DeviceError> {
        let m = Arc::clone(&self.metrics);
        let mut used_any = false;
        if self.throttle.is_blocked(0) {
            return Ok(false);
        }
        loop {
            // Room for every staged request, should none be merged.
            if self
                .uring
                .as_ref()
                .is_some_and(|u| u.room() <= self.staged.len())
            {
                break;
            }
            let busy =
                !self.staged.is_empty() || self.uring.as_ref().is_some_and(|u| u.in_flight() > 0);
            let Some(chain) = super::pop_chain_rearm(mem, queue, !busy)? else {
                break;
            };
            let head = chain.head_index();
            let len = match collect_chain_structure(chain).and_then(|d| Self::parse(&m, mem, d)) {
                Ok(Ok(req)) => {
                    if !self.throttle.try_consume(0, Self::cost(&req), 1) {
                        bump(&m, |b| &b.rate_limiter_throttled_events, 1);
                        queue.go_to_previous_position();
                        break;
                    }
                    if self.uring.is_some() {
                        self.stage_async(mem, head, req)
                    } else {
                        let (res, written) = self.execute(mem, req.req_type, req.sector, &req.data);
                        Some(Self::finish(&m, mem, req.status, res, written))
                    }
                }
                Ok(Err(status)) => {
                    let res = Err(RequestError::Io("malformed request".into()));
                    Some(Self::finish(&m, mem, status, res, 0))
                }
                Err(e) => {
                    log::debug!("virtio-blk: malformed request: {e}");
                    bump(&m, |b| &b.invalid_reqs_count, 1);
                    Some(0)
                }
            };
            if let Some(len) = len {
                queue
                    .add_used(mem, head, len)
                    .map_err(|e| DeviceError::UsedRing(e.to_string()))?;
                used_any = true;
            }
        }
        Ok(used_any)
    }

    /// Gives the guest every request the io_uring completed: status byte, used element.
    /// Returns whether any was used.
    fn reap(&mut self, mem: &GuestMemoryMmap, queue: &mut Queue) -> Result<bool, DeviceError> {
        let m = Arc::clone(&self.metrics);
        let Some(u) = self.uring.as_mut() else {
            return Ok(false);
        };
        let mut used_any = false;
        for (p, outcome) in u.completions() {
            for part in &p.parts {
                let (res, written) = match &outcome {
                    Ok(_) => {
                        let n = part.len;
                        match p.op {
                            uring::Op::Read => {
                                bump(&m, |b| &b.read_count, 1);
                                bump(&m, |b| &b.read_bytes, n);
                            }
                            uring::Op::Write => {
                                bump(&m, |b| &b.write_count, 1);
                                bump(&m, |b| &b.write_bytes, n);
                            }
                            uring::Op::Flush => bump(&m, |b| &b.flush_count, 1),
                        }
                        // The used length is a u32: more than 4 GiB saturates it.
                        let w = if p.op == uring::Op::Read {
                            u32::try_from(n).unwrap_or(u32::MAX)
                        } else {
                            0
                        };
                        (Ok(()), w)
                    }
                    // A merged operation that failed, or moved fewer bytes than all its
                    // requests want, fails every one of them.
                    Err(e) => (Err(RequestError::Io(e.clone())), 0),
                };
                let len = Self::finish(&m, mem, part.status, res, written);
                queue
                    .add_used(mem, part.head, len)
                    .map_err(|e| DeviceError::UsedRing(e.to_string()))?;
                used_any = true;
            }
        }
        Ok(used_any)
    }

    /// In 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn id(&self) -> &[u8; ID_BYTES] {
        &self.id
    }

    /// Checks a chain's descriptors and reads its header. `Err`: no status byte can be
    /// written (the chain is answered with used length 0). `Ok(Err(status))`: the request is
    /// malformed but its status byte is usable: the device answers IOERR there.
    fn parse(
        m: &BlockMetrics,
        mem: &GuestMemoryMmap,
        descs: Vec<Descriptor>,
    ) -> Result<Result<Request, GuestAddress>, ChainError> {
        if descs.len() < 2 {
            return Err(ChainError::TooFewDescriptors(descs.len()));
        }
        let status = descs[descs.len() - 1];
        if !status.is_write_only() {
            return Err(ChainError::WrongDirection {
                index: descs.len() - 1,
            });
        }
        if status.len() < 1 {
            return Err(ChainError::TooShort {
                index: descs.len() - 1,
                len: 0,
            });
        }
        check_buffer(mem, &status)?;
        let header = descs[0];
        let checked = (|| {
            if header.is_write_only() {
                return Err(ChainError::WrongDirection { index: 0 });
            }
            if header.len() < HEADER_LEN {
                return Err(ChainError::TooShort {
                    index: 0,
                    len: header.len(),
                });
            }
            descs[..descs.len() - 1]
                .iter()
                .try_for_each(|d| check_buffer(mem, d))?;
            let read_u32 = |off: u64| -> Result<u32, ChainError> {
                mem.read_obj::<u32>(header.addr().unchecked_add(off))
                    .map(u32::from_le)
                    .map_err(|_| ChainError::OutsideMemory {
                        addr: header.addr().0,
                        len: header.len(),
                    })
            };
            let req_type = read_u32(0)?;
            let sector = u64::from(read_u32(8)?) | (u64::from(read_u32(12)?) << 32);
            Ok((req_type, sector))
        })();
        match checked {
            Ok((req_type, sector)) => Ok(Ok(Request {
                req_type,
                sector,
                data: descs[1..descs.len() - 1].to_vec(),
                status: status.addr(),
            })),
            Err(e) => {
                log::debug!("virtio-blk: malformed request answered IOERR: {e}");
                METRICS.virtio.malformed_chains.inc();
                bump(m, |b| &b.invalid_reqs_count, 1);
                Ok(Err(status.addr()))
            }
        }
    }

    /// Writes the status byte of a finished request and counts its outcome; returns the used
    /// length (`written` data bytes and the status byte).
    fn finish(
        m: &BlockMetrics,
        mem: &GuestMemoryMmap,
        status: GuestAddress,
        res: Result<(), RequestError>,
        written: u32,
    ) -> u32 {
        let code = match &res {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(RequestError::Io(e)) => {
                log::debug!("virtio-blk: I/O error: {e}");
                bump(m, |b| &b.io_errors, 1);
                VIRTIO_BLK_S_IOERR
            }
            Err(RequestError::Unsupported(t)) => {
                log::debug!("virtio-blk: unsupported request type {t}");
                bump(m, |b| &b.invalid_reqs_count, 1);
                VIRTIO_BLK_S_UNSUPP
            }
        };
        // The status byte was checked to be inside guest memory.
        if let Err(e) = mem.write_obj(code, status) {
            log::debug!("virtio-blk: cannot write the status: {e}");
            return 0;
        }
        written.saturating_add(1)
    }

    /// Returns the outcome and the data bytes written to the guest.
    fn execute(
        &mut self,
        mem: &GuestMemoryMmap,
        req_type: u32,
        sector: u64,
        data: &[Descriptor],
    ) -> (Result<(), RequestError>, u32) {
        let io = |e: String| RequestError::Io(e);
        match req_type {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let write = req_type == VIRTIO_BLK_T_OUT;
                let start = match self.check_rw(write, sector, data) {
                    Ok(s) => s,
                    Err(e) => return (Err(e), 0),
                };
                let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
                let mut pos = start;
                let mut written = 0u32;
                for d in data {
                    let r = if write {
                        self.write_from_guest(mem, d.addr(), d.len(), pos)
                    } else {
                        self.read_to_guest(mem, d.addr(), d.len(), pos)
                    };
                    if let Err(e) = r {
                        return (Err(io(e)), written);
                    }
                    pos += u64::from(d.len());
                    if !write {
                        written = written.saturating_add(d.len());
                    }
                }
                if write {
                    bump(&self.metrics, |b| &b.write_count, 1);
                    bump(&self.metrics, |b| &b.write_bytes, total);
                } else {
                    bump(&self.metrics, |b| &b.read_count, 1);
                    bump(&self.metrics, |b| &b.read_bytes, total);
                }
                (Ok(()), written)
            }
            VIRTIO_BLK_T_FLUSH => {
                bump(&self.metrics, |b| &b.flush_count, 1);
                if self.writeback {
                    if let Err(e) = self.file.sync_all() {
                        return (Err(io(format!("fsync: {e}"))), 0);
                    }
                }
                (Ok(()), 0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let mut left = ID_BYTES;
                let mut written = 0u32;
                for d in data {
                    if !d.is_write_only() {
                        METRICS.virtio.malformed_chains.inc();
                        return (Err(io("GET_ID buffer is read-only".into())), written);
                    }
                    let n = (d.len() as usize).min(left);
                    let from = ID_BYTES - left;
                    if let Err(e) = mem.write_slice(&self.id[from..from + n], d.addr()) {
                        return (Err(io(e.to_string())), written);
                    }
                    left -= n;
                    written += n as u32;
                }
                (Ok(()), written)
            }
            t => (Err(RequestError::Unsupported(t)), 0),
        }
    }

    /// Moves `len` bytes between guest memory at `addr` and the file at `pos` with pread64 /
    /// pwrite64 right on guest memory (no bounce buffer); None when the buffer is not inside
    /// one memory region (the caller then copies through `buf`).
    fn direct_io(
        &self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: u32,
        pos: u64,
        write: bool,
    ) -> Option<Result<(), String>> {
        let len = len as usize;
        // Range-checked by vm-memory: fails unless the whole buffer is inside one region.
        let slice = mem.get_slice(addr, len).ok()?;
        let guard = slice.ptr_guard_mut();
        let base = guard.as_ptr();
        let fd = self.file.as_raw_fd();
        let mut done = 0usize;
        while done < len {
            let at = pos + done as u64;
            let Ok(off) = i64::try_from(at) else {
                return Some(Err(format!("offset {at:#x} out of range")));
            };
            let n = len - done;
            // SAFETY: `base..base + len` is guest memory (checked above), mapped as long as
            // `mem` lives, which outlives this call; the kernel reads or writes at most `n`
            // bytes from `base + done`, inside it. Guest memory is shared with the guest
            // anyway: nothing in the VMM holds a reference into it.
            let r = unsafe {
                if write {
                    libc::pwrite64(fd, base.add(done).cast(), n, off)
                } else {
                    libc::pread64(fd, base.add(done).cast(), n, off)
                }
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                let what = if write { "write" } else { "read" };
                return Some(Err(format!("{what} at {at:#x}: {e}")));
            }
            if r == 0 {
                return Some(Err(format!("end of file at {at:#x}")));
            }
            done += r as usize;
        }
        Some(Ok(()))
    }

    fn read_to_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: u32,
        pos: u64,
    ) -> Result<(), String> {
        if let Some(r) = self.direct_io(mem, addr, len, pos, false) {
            return r;
        }
        let mut done = 0usize;
        let len = len as usize;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.buf.resize(n, 0);
            self.file
                .read_exact_at(&mut self.buf[..n], pos + done as u64)
                .map_err(|e| format!("read at {:#x}: {e}", pos + done as u64))?;
            mem.write_slice(&self.buf[..n], addr.unchecked_add(done as u64))
                .map_err(|e| e.to_string())?;
            done += n;
        }
        Ok(())
    }

    fn write_from_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: u32,
        pos: u64,
    ) -> Result<(), String> {
        if let Some(r) = self.direct_io(mem, addr, len, pos, true) {
            return r;
        }
        let mut done = 0usize;
        let len = len as usize;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.buf.resize(n, 0);
            mem.read_slice(&mut self.buf[..n], addr.unchecked_add(done as u64))
                .map_err(|e| e.to_string())?;
            self.file
                .write_all_at(&self.buf[..n], pos + done as u64)
                .map_err(|e| format!("write at {:#x}: {e}", pos + done as u64))?;
            done += n;
        }
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn avail_features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1 | super::VIRTIO_RING_F_EVENT_IDX;
        if self.read_only {
            f |= VIRTIO_BLK_F_RO;
        }
        if self.writeback {
            f |= VIRTIO_BLK_F_FLUSH;
        }
        f
    }

    fn config_space(&self) -> Vec<u8> {
        self.capacity.to_le_bytes().to_vec()
    }

    fn swap_backing_file(&mut self, file: File) -> Result<(), String> {
        let new = Block::new(file, self.read_only, self.writeback).map_err(|e| e.to_string())?;
        if let Some(u) = self.uring.as_mut() {
            u.swap_file(&new.file)
                .map_err(|e| format!("cannot register the new file with io_uring: {e}"))?;
        }
        self.file = new.file;
        self.capacity = new.capacity;
        self.id = new.id;
        Ok(())
    }

    fn completion_event(&self) -> Option<EventFd> {
        let u = self.uring.as_ref()?;
        u.event()
            .map_err(|e| log::error!("virtio-blk: cannot duplicate the io_uring eventfd: {e}"))
            .ok()
    }

    /// io_uring completions: status bytes, used elements, then the chains that waited for
    /// room in the ring.
    fn process_backend(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
    ) -> Result<bool, DeviceError> {
        let Some(queue) = queues.first_mut() else {
            return Ok(false);
        };
        let used_any = self.reap(mem, queue)?;
        // Also without completions: a pass cut short by MAX_ROUNDS comes back this way.
        Ok(self.process_chains(mem, queue)? | used_any)
    }

    fn reset(&mut self) {
        if let Some(u) = self.uring.as_mut() {
            u.drain();
        }
        self.throttle.release();
    }

    fn throttle_timer(&self) -> Option<EventFd> {
        self.throttle.watch_fd("virtio-blk")
    }

    fn process_throttled(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
    ) -> Result<bool, DeviceError> {
        self.throttle.release();
        match queues.first_mut() {
            Some(q) => self.process_chains(mem, q),
            None => Ok(false),
        }
    }

    fn update_rate_limiters(
        &mut self,
        first: Option<&RateLimiterConfig>,
        _second: Option<&RateLimiterConfig>,
    ) -> Result<(), String> {
        self.throttle.update([first], "drive")
    }

    fn process_queues(
        &mut self,
        _index: usize,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
    ) -> Result<bool, DeviceError> {
        match queues.first_mut() {
            Some(q) => self.process_chains(mem, q),
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;
    use std::io::Write;

    const HDR: u64 = 0x8000;
    const DATA: u64 = 0x9000;
    const STATUS: u64 = 0xa000;

    /// A block device as the backing file: its capacity is its size (st_size says 0). Needs
    /// root and losetup (as CI has); elsewhere it says so and checks nothing.
    #[test]
    fn block_device_capacity_is_its_size() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("!!! block_device_capacity_is_its_size needs root: not run");
            return;
        }
        let (_, image) = disk(2048, false, false);
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&image)
            .output()
            .expect("losetup");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let f = crate::config::open_host_file(
            "drive",
            &dev,
            crate::config::HostFile::Disk { write: false },
        );
        let capacity = f
            .map_err(|e| e.to_string())
            .and_then(|f| Block::new(f, true, false).map_err(|e| e.to_string()))
            .map(|b| b.capacity());
        let _ = std::process::Command::new("losetup")
            .args(["-d", &dev])
            .status();
        let _ = std::fs::remove_file(&image);
        assert_eq!(capacity, Ok(2048), "{dev}");
    }

    /// A writable Writeback drive of `sectors` on the `Async` engine.
    fn async_disk(sectors: usize) -> (Block, std::path::PathBuf) {
        let (sync, path) = disk(sectors, false, true);
        drop(sync);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (Block::new_async(f, false, true).unwrap(), path)
    }

    fn disk(sectors: usize, read_only: bool, writeback: bool) -> (Block, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "ember-blk-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        let mut f = File::create(&path).unwrap();
        let bytes: Vec<u8> = (0..sectors * 512).map(|i| (i / 512) as u8).collect();
        f.write_all(&bytes).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .unwrap();
        (Block::new(f, read_only, writeback).unwrap(), path)
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    fn header(mem: &GuestMemoryMmap, t: u32, sector: u64) {
        mem.write_obj(t, GuestAddress(HDR)).unwrap();
        mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    fn request(mem: &GuestMemoryMmap, slot: u16, data_len: u32, data_flags: u16) {
        write_desc(mem, 0, HDR, 16, NEXT, 1);
        write_desc(mem, 1, DATA, data_len, data_flags | NEXT, 2);
        write_desc(mem, 2, STATUS, 1, WRITE, 0);
        make_avail(mem, slot, 0);
    }

    fn status(mem: &GuestMemoryMmap) -> u8 {
        mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    #[test]
    fn read_write_flush_get_id_round_trip() {
        let mem = memory();
        let mut q = queue(&mem, 16);
        let (mut blk, path) = disk(8, false, true);
        assert_eq!(blk.capacity(), 8);
        assert_eq!(blk.config_space(), 8u64.to_le_bytes().to_vec());
        assert_eq!(
            blk.avail_features(),
            VIRTIO_F_VERSION_1 | super::super::VIRTIO_RING_F_EVENT_IDX | VIRTIO_BLK_F_FLUSH
        );

        // Read sectors 2 and 3.
        header(&mem, VIRTIO_BLK_T_IN, 2);
        request(&mem, 0, 1024, WRITE);
        assert!(blk.process_chains(&mem, &mut q).unwrap());
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        assert_eq!(used_elem(&mem, 0), (0, 1025));
        let mut got = [0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert!(got[..512].iter().all(|&b| b == 2) && got[512..].iter().all(|&b| b == 3));

        // Write sector 5, read it back.
        mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        header(&mem, VIRTIO_BLK_T_OUT, 5);
        request(&mem, 1, 512, 0);
        blk.process_chains(&mem, &mut q).unwrap();
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        assert_eq!(used_elem(&mem, 1), (0, 1));
        let on_disk = std::fs::read(&path).unwrap();
        assert!(on_disk[5 * 512..6 * 512].iter().all(|&b| b == 0xab));

        // Flush: header and status only.
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        write_desc(&mem, 0, HDR, 16, NEXT, 2);
        make_avail(&mem, 2, 0);
        blk.process_chains(&mem, &mut q).unwrap();
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);

        // GET_ID.
        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        request(&mem, 3, 20, WRITE);
        blk.process_chains(&mem, &mut q).unwrap();
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        assert_eq!(used_elem(&mem, 3), (0, 21));
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, blk.id());
        assert_ne!(id[0], 0);

        // Unknown type.
        header(&mem, 42, 0);
        request(&mem, 4, 512, WRITE);
        blk.process_chains(&mem, &mut q).unwrap();
        assert_eq!(status(&mem), VIRTIO_BLK_S_UNSUPP);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn per_drive_metrics_groups_count_their_own_requests() {
        let before = (
            METRICS.block.read_count.count(),
            METRICS.block.write_count.count(),
            METRICS.block.read_bytes.count(),
        );
        let run = |blk: &mut Block, reqs: &[(u32, u32)]| {
            let mem = memory();
            let mut q = queue(&mem, 16);
            for (slot, &(t, len)) in reqs.iter().enumerate() {
                header(&mem, t, 0);
                let flags = if t == VIRTIO_BLK_T_IN { WRITE } else { 0 };
                request(&mem, slot as u16, len, flags);
                blk.process_chains(&mem, &mut q).unwrap();
                assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
            }
        };
        let (a, path_a) = disk(8, false, false);
        let (b, path_b) = disk(8, false, false);
        let mut a = a.with_metrics_id("metrics_test_a");
        let mut b = b.with_metrics_id("metrics_test_b");
        run(&mut a, &[(VIRTIO_BLK_T_IN, 1024), (VIRTIO_BLK_T_IN, 512)]);
        run(&mut b, &[(VIRTIO_BLK_T_IN, 512), (VIRTIO_BLK_T_OUT, 512)]);

        // Each drive's group counts its own requests only.
        let count = |blk: &Block| {
            let m = &blk.metrics;
            [
                m.read_count.count(),
                m.read_bytes.count(),
                m.write_count.count(),
                m.write_bytes.count(),
            ]
        };
        assert_eq!(count(&a), [2, 1536, 0, 0]);
        assert_eq!(count(&b), [1, 512, 1, 512]);
        // The aggregate got both drives' counts (at least: other tests count there too).
        assert!(METRICS.block.read_count.count() - before.0 >= 3);
        assert!(METRICS.block.write_count.count() - before.1 >= 1);
        assert!(METRICS.block.read_bytes.count() - before.2 >= 2048);
        // Both groups are serialised under their keys, with the aggregate's keys. (Values are
        // deltas since the last serialisation, which other tests may do: not checked here.)
        let v = serde_json::to_value(&METRICS).unwrap();
        let keys =
            |g: &serde_json::Value| g.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&v["block_metrics_test_a"]), keys(&v["block"]));
        assert_eq!(keys(&v["block_metrics_test_b"]), keys(&v["block"]));
        // A drive made again with the same id keeps its group.
        assert!(Arc::ptr_eq(
            &crate::metrics::block_metrics("metrics_test_a"),
            &a.metrics
        ));
        std::fs::remove_file(path_a).unwrap();
        std::fs::remove_file(path_b).unwrap();
    }

    #[test]
    fn async_engine_completes_through_the_eventfd_and_swaps_files() {
        let mem = memory();
        let mut qs = [queue(&mem, 16)];
        let (mut blk, path) = async_disk(8);
        let evt = blk.completion_event().unwrap();

        // Read sectors 2 and 3: used at once if the kernel finished it within the submission
        // (from the page cache), else when the completion is processed.
        header(&mem, VIRTIO_BLK_T_IN, 2);
        request(&mem, 0, 1024, WRITE);
        let mut used = blk.process_chains(&mem, &mut qs[0]).unwrap();
        assert_eq!(used_idx(&mem), u16::from(used));
        for _ in 0..1000 {
            if used {
                break;
            }
            if evt.read().is_ok() && blk.process_backend(&mem, &mut qs).unwrap() {
                used = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(used, "no completion");
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        assert_eq!(used_elem(&mem, 0), (0, 1025));
        let mut got = [0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert!(got[..512].iter().all(|&b| b == 2) && got[512..].iter().all(|&b| b == 3));

        // Data outside guest memory: IOERR at once, nothing submitted.
        header(&mem, VIRTIO_BLK_T_IN, 0);
        request(&mem, 1, 512, WRITE);
        write_desc(&mem, 1, 0xfff00, 512, WRITE | NEXT, 2);
        assert!(blk.process_chains(&mem, &mut qs[0]).unwrap());
        assert_eq!(used_elem(&mem, 1), (0, 1));
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);

        // A bigger file: the capacity follows.
        let (_, bigger) = disk(16, false, false);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&bigger)
            .unwrap();
        blk.swap_backing_file(f).unwrap();
        assert_eq!(blk.capacity(), 16);
        assert_eq!(blk.config_space(), 16u64.to_le_bytes().to_vec());
        std::fs::remove_file(path).unwrap();
        std::fs::remove_file(bigger).unwrap();
    }

    #[test]
    fn async_engine_batches_and_re_arms_notifications_only_when_idle() {
        let mem = memory();
        let mut qs = [queue(&mem, 16)];
        qs[0].set_event_idx(true);
        let (mut blk, path) = async_disk(8);
        let evt = blk.completion_event().unwrap();
        let avail_event = GuestAddress(USED + 4 + 8 * 16);
        mem.write_obj(0xabcdu16, avail_event).unwrap();

        // Two reads of sector 3 made available at once, into two buffers.
        header(&mem, VIRTIO_BLK_T_IN, 3);
        request(&mem, 0, 512, WRITE);
        write_desc(&mem, 3, HDR, 16, NEXT, 4);
        write_desc(&mem, 4, DATA + 0x800, 512, WRITE | NEXT, 5);
        write_desc(&mem, 5, STATUS + 1, 1, WRITE, 0);
        make_avail(&mem, 1, 3);
        blk.process_chains(&mem, &mut qs[0]).unwrap();
        // Both went to the kernel in one batch. While any is in flight the device does not ask
        // for notifications (their completions bring it back to the queue); once none is, it
        // does (avail_event = the next index).
        // Processes completions until none is in flight, checking that after every step.
        let until_idle = |blk: &mut Block, qs: &mut [Queue], next: u16| {
            for _ in 0..1000 {
                let in_flight = blk.uring.as_ref().unwrap().in_flight();
                let ev = mem.read_obj::<u16>(avail_event).unwrap();
                assert_eq!(
                    in_flight == 0,
                    ev == next,
                    "{in_flight} in flight, avail_event {ev}"
                );
                if in_flight == 0 {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
                if evt.read().is_ok() {
                    blk.process_backend(&mem, qs).unwrap();
                }
            }
            panic!("requests still in flight");
        };
        until_idle(&mut blk, &mut qs, 2);
        let used = used_idx(&mem);
        assert_eq!(used, 2, "both requests complete");
        for (slot, data) in [(0, DATA), (1, DATA + 0x800)] {
            assert_eq!(used_elem(&mem, slot).1, 513);
            let mut got = [0u8; 512];
            mem.read_slice(&mut got, GuestAddress(data)).unwrap();
            assert!(got.iter().all(|&b| b == 3));
        }
        // Now a FLUSH, which the kernel always completes later (io-wq): the same holds.
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        write_desc(&mem, 6, HDR, 16, NEXT, 7);
        write_desc(&mem, 7, STATUS, 1, WRITE, 0);
        make_avail(&mem, 2, 6);
        mem.write_obj(0xabcdu16, avail_event).unwrap();
        blk.process_chains(&mem, &mut qs[0]).unwrap();
        until_idle(&mut blk, &mut qs, 3);
        assert_eq!(used_idx(&mem), 3);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn async_engine_merges_adjacent_requests() {
        let mem = memory();
        let mut qs = [queue(&mem, 16)];
        let (mut blk, path) = async_disk(8);
        let evt = blk.completion_event().unwrap();

        // Writes of sectors 4, 5 and 6 (adjacent: one operation), then of sector 1 (not
        // adjacent: another), then a read of sectors 4..7 (a third), all made available at
        // once. Each has its own header and status byte.
        let reqs: [(u32, u64, u16); 5] = [
            (VIRTIO_BLK_T_OUT, 4, 0),
            (VIRTIO_BLK_T_OUT, 5, 0),
            (VIRTIO_BLK_T_OUT, 6, 0),
            (VIRTIO_BLK_T_OUT, 1, 0),
            (VIRTIO_BLK_T_IN, 4, WRITE),
        ];
        for (i, &(t, sector, flags)) in reqs.iter().enumerate() {
            let i16 = i as u16;
            let i64 = i as u64;
            let hdr = HDR + 0x10 * i64;
            mem.write_obj(t, GuestAddress(hdr)).unwrap();
            mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
            mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
            mem.write_obj(0xffu8, GuestAddress(STATUS + i64)).unwrap();
            let len = if t == VIRTIO_BLK_T_IN { 3 * 512 } else { 512 };
            let data = 0x10000 + 0x1000 * i64;
            mem.write_slice(&[0x40 + i as u8; 512], GuestAddress(data))
                .unwrap();
            write_desc(&mem, 3 * i16, hdr, 16, NEXT, 3 * i16 + 1);
            write_desc(&mem, 3 * i16 + 1, data, len, flags | NEXT, 3 * i16 + 2);
            write_desc(&mem, 3 * i16 + 2, STATUS + i64, 1, WRITE, 0);
            make_avail(&mem, i16, 3 * i16);
        }
        // Only the writes go first: the read must see them.
        make_avail(&mem, 3, 9);
        blk.process_chains(&mem, &mut qs[0]).unwrap();
        assert_eq!(
            blk.uring.as_ref().unwrap().pushed(),
            2,
            "4, 5, 6 merged; 1 alone"
        );
        for _ in 0..1000 {
            if used_idx(&mem) == 4 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            if evt.read().is_ok() {
                blk.process_backend(&mem, &mut qs).unwrap();
            }
        }
        assert_eq!(used_idx(&mem), 4);
        make_avail(&mem, 4, 12);
        blk.process_chains(&mem, &mut qs[0]).unwrap();
        for _ in 0..1000 {
            if used_idx(&mem) == 5 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            if evt.read().is_ok() {
                blk.process_backend(&mem, &mut qs).unwrap();
            }
        }
        assert_eq!(blk.uring.as_ref().unwrap().pushed(), 3);
        for i in 0..5u16 {
            let st: u8 = mem.read_obj(GuestAddress(STATUS + u64::from(i))).unwrap();
            assert_eq!(st, VIRTIO_BLK_S_OK, "request {i}");
        }
        let mut lens: Vec<(u32, u32)> = (0..5).map(|s| used_elem(&mem, s)).collect();
        lens.sort();
        assert_eq!(lens, [(0, 1), (3, 1), (6, 1), (9, 1), (12, 3 * 512 + 1)]);
        let on_disk = std::fs::read(&path).unwrap();
        for (sector, byte) in [(1, 0x43), (4, 0x40), (5, 0x41), (6, 0x42), (0, 0), (2, 2)] {
            let s = &on_disk[sector * 512..(sector + 1) * 512];
            assert!(s.iter().all(|&b| b == byte), "sector {sector}");
        }
        let mut got = vec![0u8; 3 * 512];
        mem.read_slice(&mut got, GuestAddress(0x14000)).unwrap();
        assert_eq!(got, on_disk[4 * 512..7 * 512]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn async_engine_fails_only_the_bad_request_of_adjacent_ones() {
        let mem = memory();
        let mut qs = [queue(&mem, 16)];
        let (mut blk, path) = async_disk(8);
        let evt = blk.completion_event().unwrap();
        // Writes of sectors 4, 5 and 6; 5's buffer is outside guest memory.
        for i in 0..3u16 {
            let i64 = u64::from(i);
            let hdr = HDR + 0x10 * i64;
            mem.write_obj(VIRTIO_BLK_T_OUT, GuestAddress(hdr)).unwrap();
            mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
            mem.write_obj(4 + i64, GuestAddress(hdr + 8)).unwrap();
            mem.write_obj(0xffu8, GuestAddress(STATUS + i64)).unwrap();
            let data = if i == 1 {
                0x20_0000
            } else {
                0x10000 + 0x1000 * i64
            };
            if i != 1 {
                mem.write_slice(&[0x70 + i as u8; 512], GuestAddress(data))
                    .unwrap();
            }
            write_desc(&mem, 3 * i, hdr, 16, NEXT, 3 * i + 1);
            write_desc(&mem, 3 * i + 1, data, 512, NEXT, 3 * i + 2);
            write_desc(&mem, 3 * i + 2, STATUS + i64, 1, WRITE, 0);
            make_avail(&mem, i, 3 * i);
        }
        blk.process_chains(&mem, &mut qs[0]).unwrap();
        for _ in 0..1000 {
            if used_idx(&mem) == 3 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            if evt.read().is_ok() {
                blk.process_backend(&mem, &mut qs).unwrap();
            }
        }
        assert_eq!(used_idx(&mem), 3);
        let st = |i: u64| mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap();
        assert_eq!(
            [st(0), st(1), st(2)],
            [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK]
        );
        let on_disk = std::fs::read(&path).unwrap();
        for (sector, byte) in [(4, 0x70), (5, 5), (6, 0x72)] {
            let s = &on_disk[sector * 512..(sector + 1) * 512];
            assert!(s.iter().all(|&b| b == byte), "sector {sector}");
        }
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn errors_and_malicious_requests() {
        let mem = memory();
        let mut q = queue(&mem, 16);
        let (mut blk, path) = disk(4, true, false);
        assert_eq!(
            blk.avail_features(),
            VIRTIO_F_VERSION_1 | super::super::VIRTIO_RING_F_EVENT_IDX | VIRTIO_BLK_F_RO
        );
        let mut slot = 0;
        macro_rules! run {
            ($blk:expr) => {{
                $blk.process_chains(&mem, &mut q).unwrap();
                slot += 1;
                used_elem(&mem, slot - 1)
            }};
        }

        // Write to a read-only drive.
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        request(&mem, slot, 512, 0);
        assert_eq!(run!(blk), (0, 1));
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);

        // Beyond capacity, and a sector that overflows.
        for sector in [3, u64::MAX / 2] {
            header(&mem, VIRTIO_BLK_T_IN, sector);
            request(&mem, slot, 1024, WRITE);
            assert_eq!(run!(blk), (0, 1));
            assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
        }

        // Data buffer with the wrong direction for a read.
        header(&mem, VIRTIO_BLK_T_IN, 0);
        request(&mem, slot, 512, 0);
        assert_eq!(run!(blk), (0, 1));
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);

        // Zero-length data: fine, nothing moves.
        header(&mem, VIRTIO_BLK_T_IN, 0);
        request(&mem, slot, 0, WRITE);
        assert_eq!(run!(blk), (0, 1));
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);

        // Status descriptor read-only: no status can be given, used length 0.
        header(&mem, VIRTIO_BLK_T_IN, 0);
        request(&mem, slot, 512, WRITE);
        write_desc(&mem, 2, STATUS, 1, 0, 0);
        assert_eq!(run!(blk), (0, 0));
        assert_eq!(status(&mem), 0xff);

        // Zero-length header: the status byte is fine, so IOERR.
        header(&mem, VIRTIO_BLK_T_IN, 0);
        write_desc(&mem, 0, HDR, 0, NEXT, 2);
        write_desc(&mem, 2, STATUS, 1, WRITE, 0);
        make_avail(&mem, slot, 0);
        assert_eq!(run!(blk), (0, 1));
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);

        // Data outside guest memory: IOERR in the status byte.
        header(&mem, VIRTIO_BLK_T_IN, 0);
        request(&mem, slot, 512, WRITE);
        write_desc(&mem, 1, 0xfff00, 512, WRITE | NEXT, 2);
        let before = METRICS.virtio.malformed_chains.count();
        assert_eq!(run!(blk), (0, 1));
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
        assert!(METRICS.virtio.malformed_chains.count() > before);

        // A header outside guest memory: IOERR too.
        header(&mem, VIRTIO_BLK_T_IN, 0);
        request(&mem, slot, 512, WRITE);
        write_desc(&mem, 0, 0x20_0000, 16, NEXT, 1);
        assert_eq!(run!(blk), (0, 1));
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);

        // A status byte outside guest memory: no status, used length 0.
        header(&mem, VIRTIO_BLK_T_IN, 0);
        request(&mem, slot, 512, WRITE);
        write_desc(&mem, 2, 0x20_0000, 1, WRITE, 0);
        assert_eq!(run!(blk), (0, 0));
        assert_eq!(status(&mem), 0xff);

        // A chain that loops on itself.
        write_desc(&mem, 0, HDR, 16, NEXT, 0);
        make_avail(&mem, slot, 0);
        assert_eq!(run!(blk), (0, 0));

        // A single descriptor.
        write_desc(&mem, 0, HDR, 16, 0, 0);
        make_avail(&mem, slot, 0);
        assert_eq!(run!(blk), (0, 0));
        std::fs::remove_file(path).unwrap();
    }
}
