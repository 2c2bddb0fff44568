//! The API thread: one epoll loop over the listening socket and every client connection, all
//! non-blocking, so a slow or hostile client (half a request, never reading its answers,
//! flooding) only ever stalls itself. Requests are handed to the VMM one at a time; the thread
//! blocks on each answer, which the VMM gives promptly and in order.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::http::{self, Parse, Version};
use super::{parse, ApiResponse, VmmAction};

/// More clients than this are refused (accepted and closed at once).
pub const MAX_CONNECTIONS: usize = 64;
/// Answers queued for a client that does not read them; past this, that client's requests wait.
const OUT_CAP: usize = 64 * 1024;
const READ_CHUNK: usize = 16 * 1024;
/// Requests served from one connection before giving the others a turn.
const BATCH: usize = 16;
const LISTENER_TOKEN: u64 = u64::MAX;

/// The bound API socket, before its thread starts.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
}

/// Asks whether something accepts connections on the socket at `path`, without blocking.
fn socket_is_live(path: &Path) -> io::Result<bool> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path {path:?} is too long"),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: creates a new socket; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a socket just created and owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: addr is a valid sockaddr_un and len does not exceed its size.
    let r = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len as libc::socklen_t,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ECONNREFUSED) => Ok(false),
        // A listener with a full backlog is still a live one.
        Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => Ok(true),
        _ => Err(err),
    }
}

impl ApiServer {
    /// Binds the API socket. A stale socket (nobody listening) is replaced; a live one, or
    /// any other file at `path`, is an error.
    pub fn bind(path: &Path) -> io::Result<ApiServer> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) => {
                if !meta.file_type().is_socket() {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("{} exists and is not a socket", path.display()),
                    ));
                }
                match socket_is_live(path) {
                    Ok(false) => std::fs::remove_file(path)?,
                    Ok(true) => {
                        return Err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            format!("another process serves the socket {}", path.display()),
                        ))
                    }
                    Err(e) => {
                        return Err(io::Error::new(
                            e.kind(),
                            format!("cannot tell whether {} is in use: {e}", path.display()),
                        ))
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        Ok(ApiServer {
            listener,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts the `ember_api` thread. It sends each action on `to_vmm`, writes 1 to
    /// `vmm_evt`, then waits for exactly one answer on `from_vmm`. The thread ends when the
    /// VMM side of either channel is gone.
    pub fn spawn(
        self,
        max_payload: usize,
        to_vmm: Sender<VmmAction>,
        vmm_evt: EventFd,
        from_vmm: Receiver<ApiResponse>,
    ) -> io::Result<JoinHandle<()>> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            self.listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
        )?;
        let mut server = Server {
            listener: self.listener,
            listener_paused: false,
            epoll,
            conns: BTreeMap::new(),
            next_id: 0,
            max_payload,
            // A request is at most its head plus its body; reading further ahead is pointless.
            read_limit: http::MAX_HEAD_BYTES + max_payload + READ_CHUNK,
            link: VmmLink {
                to_vmm,
                vmm_evt,
                from_vmm,
            },
        };
        std::thread::Builder::new()
            .name("ember_api".into())
            .spawn(move || server.run())
    }
}

/// The VMM went away; the API has nobody left to serve.
struct VmmGone;

struct VmmLink {
    to_vmm: Sender<VmmAction>,
    vmm_evt: EventFd,
    from_vmm: Receiver<ApiResponse>,
}

impl VmmLink {
    fn call(&self, action: VmmAction) -> Result<ApiResponse, VmmGone> {
        self.to_vmm.send(action).map_err(|_| VmmGone)?;
        if let Err(e) = self.vmm_evt.write(1) {
            log::error!("cannot wake the VMM thread: {e}");
        }
        self.from_vmm.recv().map_err(|_| VmmGone)
    }

    fn handle(&self, req: &http::Request) -> Result<ApiResponse, VmmGone> {
        log::info!(
            "The API server received a {} request on {:?}.",
            req.method,
            req.path
        );
        let routed = parse::route(&req.method, &req.path, req.body.as_deref());
        let response = match routed.outcome {
            Ok(action) => self.call(action)?,
            Err(response) => response,
        };
        routed.counters.record(response.is_success());
        match &response {
            ApiResponse::Error(status, message) => {
                log::error!("Received Error. Status code: {status}. Message: {message}")
            }
            _ => log::debug!("The request was executed successfully."),
        }
        Ok(response)
    }
}

struct Conn {
    stream: UnixStream,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    /// How much of `out` is already sent.
    out_pos: usize,
    /// The events registered with epoll.
    interest: EventSet,
    /// `inbuf` may hold a request not yet served.
    ready: bool,
    /// Answer nothing more; close once `out` is sent.
    closing: bool,
    /// The client sends nothing more (it may still read).
    eof: bool,
    /// The socket failed or the client hung up: drop everything.
    dead: bool,
    /// `100 Continue` went out for the request being received.
    continue_sent: bool,
}

impl Conn {
    fn new(stream: UnixStream) -> Conn {
        Conn {
            stream,
            inbuf: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            interest: EventSet::IN,
            ready: false,
            closing: false,
            eof: false,
            dead: false,
            continue_sent: false,
        }
    }

    fn pending_out(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// Has requests to serve and room for their answers.
    fn runnable(&self) -> bool {
        self.ready && !self.closing && !self.dead && self.pending_out() < OUT_CAP
    }

    fn wants_read(&self, read_limit: usize) -> bool {
        !self.closing
            && !self.eof
            && !self.dead
            && self.pending_out() < OUT_CAP
            && self.inbuf.len() < read_limit
    }

    fn finished(&self) -> bool {
        self.dead || (self.pending_out() == 0 && (self.closing || (self.eof && !self.ready)))
    }

    fn read_some(&mut self, read_limit: usize) {
        let room = read_limit.saturating_sub(self.inbuf.len()).min(READ_CHUNK);
        if room == 0 || self.eof {
            return;
        }
        let old = self.inbuf.len();
        self.inbuf.resize(old + room, 0);
        let result = self.stream.read(&mut self.inbuf[old..]);
        self.inbuf.truncate(old + *result.as_ref().unwrap_or(&0));
        match result {
            Ok(0) => {
                self.eof = true;
                // Serve what is complete, then notice the rest never comes.
                self.ready = true;
            }
            Ok(_) => self.ready = true,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => self.dead = true,
        }
    }

    fn flush(&mut self) {
        while self.out_pos < self.out.len() {
            let pending = &self.out[self.out_pos..];
            // SAFETY: sends from a live buffer of the given length. MSG_NOSIGNAL: a client
            // that went away must give EPIPE, not a SIGPIPE for the whole process.
            let n = unsafe {
                libc::send(
                    self.stream.as_raw_fd(),
                    pending.as_ptr() as *const libc::c_void,
                    pending.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => break,
                    _ => {
                        self.dead = true;
                        return;
                    }
                }
            }
            self.out_pos += n as usize;
        }
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        } else if self.out_pos >= OUT_CAP {
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
    }

    fn respond(&mut self, version: Version, response: &ApiResponse, keep_alive: bool) {
        match response {
            ApiResponse::NoContent => {
                http::write_response(&mut self.out, version, 204, None, keep_alive)
            }
            ApiResponse::Ok(body) => {
                http::write_response(&mut self.out, version, 200, Some(body), keep_alive)
            }
            ApiResponse::Error(status, message) => http::write_response(
                &mut self.out,
                version,
                *status,
                Some(&http::fault_body(message)),
                keep_alive,
            ),
        }
    }

    /// Serves the requests buffered on this connection, at most `BATCH` of them.
    fn serve(&mut self, link: &VmmLink, max_payload: usize) -> Result<(), VmmGone> {
        let mut served = 0;
        while self.runnable() && served < BATCH {
            match http::parse(&self.inbuf, max_payload) {
                Parse::Incomplete { expect_continue } => {
                    if expect_continue && !self.continue_sent && !self.eof {
                        http::write_continue(&mut self.out, Version::Http11);
                        self.continue_sent = true;
                    }
                    self.ready = false;
                }
                Parse::Invalid(e) => {
                    log::warn!("Closing an API connection after a bad request: {}", e.message);
                    let response = ApiResponse::Error(e.status, e.message);
                    self.respond(Version::Http11, &response, false);
                    self.inbuf = Vec::new();
                    self.ready = false;
                    self.closing = true;
                }
                Parse::Complete { request, consumed } => {
                    self.inbuf.drain(..consumed);
                    self.continue_sent = false;
                    served += 1;
                    let response = link.handle(&request)?;
                    self.respond(request.version, &response, request.keep_alive);
                    if !request.keep_alive {
                        self.closing = true;
                    }
                }
            }
        }
        Ok(())
    }
}

struct Server {
    listener: UnixListener,
    /// Accepting failed for lack of resources; retried when a connection closes.
    listener_paused: bool,
    epoll: Epoll,
    /// Keyed by arrival order, which is the order connections are served in.
    conns: BTreeMap<u64, Conn>,
    next_id: u64,
    max_payload: usize,
    read_limit: usize,
    link: VmmLink,
}

impl Server {
    fn run(&mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            // Buffered requests left by the batch limit are served without waiting.
            let timeout = if self.conns.values().any(Conn::runnable) {
                0
            } else {
                -1
            };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("The API server's epoll failed: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                if ev.data() == LISTENER_TOKEN {
                    self.accept_all();
                    continue;
                }
                let Some(conn) = self.conns.get_mut(&ev.data()) else {
                    continue;
                };
                let set = ev.event_set();
                if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                    // The client is gone for good: nobody will read the answers.
                    conn.dead = true;
                    continue;
                }
                if set.contains(EventSet::OUT) {
                    conn.flush();
                }
                if set.contains(EventSet::IN) {
                    conn.read_some(self.read_limit);
                }
            }
            for conn in self.conns.values_mut() {
                if conn.runnable() && conn.serve(&self.link, self.max_payload).is_err() {
                    log::info!("The VMM is gone; the API server stops.");
                    return;
                }
                if conn.pending_out() > 0 && !conn.dead {
                    conn.flush();
                }
            }
            self.reap_and_rearm();
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() >= MAX_CONNECTIONS {
                        log::warn!(
                            "Refusing an API connection: {MAX_CONNECTIONS} are already open."
                        );
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        log::warn!("Dropping an API connection: {e}");
                        continue;
                    }
                    let id = self.next_id;
                    self.next_id += 1;
                    let ev = EpollEvent::new(EventSet::IN, id);
                    if let Err(e) = self.epoll.ctl(ControlOperation::Add, stream.as_raw_fd(), ev) {
                        log::warn!("Dropping an API connection: {e}");
                        continue;
                    }
                    self.conns.insert(id, Conn::new(stream));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.raw_os_error() == Some(libc::ECONNABORTED) => {}
                Err(e) => {
                    // Out of descriptors or memory: a level-triggered listener would spin, so
                    // stop watching it until a connection closes.
                    log::warn!("Cannot accept API connections: {e}");
                    self.set_listener(false);
                    return;
                }
            }
        }
    }

    fn set_listener(&mut self, on: bool) {
        let set = if on { EventSet::IN } else { EventSet::empty() };
        let ev = EpollEvent::new(set, LISTENER_TOKEN);
        let fd = self.listener.as_raw_fd();
        if let Err(e) = self.epoll.ctl(ControlOperation::Modify, fd, ev) {
            log::error!("Cannot watch the API socket: {e}");
        }
        self.listener_paused = !on;
    }

    fn reap_and_rearm(&mut self) {
        let done: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.finished())
            .map(|(id, _)| *id)
            .collect();
        for id in &done {
            if let Some(conn) = self.conns.remove(id) {
                let fd = conn.stream.as_raw_fd();
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
        }
        if !done.is_empty() && self.listener_paused {
            self.set_listener(true);
        }
        for (id, conn) in self.conns.iter_mut() {
            let mut want = EventSet::empty();
            if conn.wants_read(self.read_limit) {
                want |= EventSet::IN;
            }
            if conn.pending_out() > 0 {
                want |= EventSet::OUT;
            }
            if want != conn.interest {
                let ev = EpollEvent::new(want, *id);
                match self
                    .epoll
                    .ctl(ControlOperation::Modify, conn.stream.as_raw_fd(), ev)
                {
                    Ok(()) => conn.interest = want,
                    Err(e) => {
                        log::warn!("Dropping an API connection: {e}");
                        conn.dead = true;
                    }
                }
            }
        }
    }
}
