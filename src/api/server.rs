//! The API thread: one epoll loop over the listening socket and every client connection, all
//! non-blocking, so a slow or hostile client (half a request, never reading its answers,
//! flooding) only ever stalls itself. Requests are handed to the VMM one at a time; the thread
//! blocks on each answer, which the VMM gives promptly and in order.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
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
/// How long accepting stays paused after running out of descriptors.
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// The bound API socket, before its thread starts.
pub struct ApiServer {
    listener: UnixListener,
    file: crate::uds::SocketFile,
    /// Runs first on the API thread, before it reads anything a client sends (seccomp).
    thread_init: Option<Box<dyn FnOnce() + Send>>,
}

impl ApiServer {
    /// Binds the API socket. A stale socket (nobody listening) is replaced; a live one, or
    /// any other file at `path`, is an error.
    pub fn bind(path: &Path) -> io::Result<ApiServer> {
        let (listener, file) = crate::uds::bind_listener(path)?;
        listener.set_nonblocking(true)?;
        Ok(ApiServer {
            listener,
            file,
            thread_init: None,
        })
    }

    /// `f` runs on the API thread before it serves anything.
    pub fn with_thread_init(mut self, f: impl FnOnce() + Send + 'static) -> ApiServer {
        self.thread_init = Some(Box::new(f));
        self
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The socket file, to remove at exit while it is still ember's.
    pub fn socket_file(&self) -> crate::uds::SocketFile {
        self.file.clone()
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
        let thread_init = self.thread_init;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            self.listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
        )?;
        let mut server = Server {
            listener: self.listener,
            listener_paused: false,
            paused_at: std::time::Instant::now(),
            accept_failing: false,
            epoll,
            conns: BTreeMap::new(),
            next_id: 0,
            max_payload,
            // A request is at most its head plus its body; reading further ahead is pointless.
            // Saturating: a huge --http-api-max-payload-size must not wrap to a small limit
            // that leaves a large body forever unread.
            read_limit: http::MAX_HEAD_BYTES
                .saturating_add(max_payload)
                .saturating_add(READ_CHUNK),
            link: VmmLink {
                to_vmm,
                vmm_evt,
                from_vmm,
                received: std::cell::Cell::new(0),
            },
        };
        std::thread::Builder::new()
            .name("ember_api".into())
            .spawn(move || {
                if let Some(init) = thread_init {
                    init();
                }
                server.run()
            })
    }
}

/// The VMM went away; the API has nobody left to serve.
struct VmmGone;

struct VmmLink {
    to_vmm: Sender<VmmAction>,
    vmm_evt: EventFd,
    from_vmm: Receiver<ApiResponse>,
    /// Answers received since the last flush of every connection.
    received: std::cell::Cell<usize>,
}

/// Answers the VMM sent that the API thread has not yet handed to their sockets. The VMM
/// thread waits for it to drop to zero before the process exits, so that e.g. the 204 of an
/// `InstanceStart` whose guest resets at once still reaches the client.
pub static RESPONSES_IN_FLIGHT: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// Called by the VMM thread before it sends an answer.
pub fn response_sent() {
    RESPONSES_IN_FLIGHT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

/// Called by the VMM thread when an answer could not be sent after all.
pub fn response_not_sent() {
    RESPONSES_IN_FLIGHT.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
}

/// Waits (bounded) until the API thread has written every answer out.
pub fn wait_for_responses(limit: std::time::Duration) {
    let start = std::time::Instant::now();
    while RESPONSES_IN_FLIGHT.load(std::sync::atomic::Ordering::SeqCst) > 0
        && start.elapsed() < limit
    {
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}

impl VmmLink {
    fn call(&self, action: VmmAction) -> Result<ApiResponse, VmmGone> {
        self.to_vmm.send(action).map_err(|_| VmmGone)?;
        if let Err(e) = self.vmm_evt.write(1) {
            log::error!("cannot wake the VMM thread: {e}");
        }
        let r = self.from_vmm.recv().map_err(|_| VmmGone);
        if r.is_ok() {
            self.received.set(self.received.get() + 1);
        }
        r
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
                    log::warn!(
                        "Closing an API connection after a bad request: {}",
                        e.message
                    );
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
                    // Sent now, not after the batch: the next request may wait on a VMM that
                    // is exiting (an InstanceStart whose guest powers off at once), and this
                    // answer would then never leave.
                    self.flush();
                    if !request.keep_alive {
                        self.closing = true;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Tells a client over the connection cap why it is dropped, as Firecracker does (503), on a
/// best-effort basis: the answer is tiny and a fresh socket has room for it, and nothing here
/// may block or raise SIGPIPE.
fn refuse_full(stream: &UnixStream) {
    let mut out = Vec::new();
    let body = http::fault_body("Too many open connections");
    http::write_response(&mut out, Version::Http11, 503, Some(&body), false);
    // SAFETY: sends from a live buffer of the given length on a socket we own.
    let _ = unsafe {
        libc::send(
            stream.as_raw_fd(),
            out.as_ptr() as *const libc::c_void,
            out.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
}

struct Server {
    listener: UnixListener,
    /// Accepting failed for lack of resources; retried when a connection closes or
    /// `ACCEPT_RETRY` after `paused_at`.
    listener_paused: bool,
    paused_at: std::time::Instant,
    /// The last accept failed: log the next failures quietly.
    accept_failing: bool,
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
            } else if self.listener_paused {
                // Descriptors may be freed by others than API clients (the VMM, a raised
                // limit): retry accepting now and then, not only when a client leaves.
                ACCEPT_RETRY.as_millis() as i32
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
            if self.listener_paused && self.paused_at.elapsed() >= ACCEPT_RETRY {
                self.set_listener(true);
            }
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
            let n = self.link.received.replace(0);
            if n > 0 {
                RESPONSES_IN_FLIGHT.fetch_sub(n, std::sync::atomic::Ordering::SeqCst);
            }
            self.reap_and_rearm();
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    self.accept_failing = false;
                    if self.conns.len() >= MAX_CONNECTIONS {
                        log::warn!(
                            "Refusing an API connection: {MAX_CONNECTIONS} are already open."
                        );
                        refuse_full(&stream);
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        log::warn!("Dropping an API connection: {e}");
                        continue;
                    }
                    let id = self.next_id;
                    self.next_id += 1;
                    let ev = EpollEvent::new(EventSet::IN, id);
                    if let Err(e) = self
                        .epoll
                        .ctl(ControlOperation::Add, stream.as_raw_fd(), ev)
                    {
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
                    // stop watching it for a while.
                    if self.accept_failing {
                        log::debug!("Cannot accept API connections: {e}");
                    } else {
                        log::warn!("Cannot accept API connections: {e}");
                    }
                    self.accept_failing = true;
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
        if !on {
            self.paused_at = std::time::Instant::now();
        }
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

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::mpsc::{channel, Receiver as MpscReceiver};
    use std::time::Duration;

    use super::*;
    use std::path::PathBuf;

    const LIMIT: usize = 1024;

    fn temp_socket(tag: &str) -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ember-api-test-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("api.sock")
    }

    /// Starts a server with a fake VMM that answers every action and reports it.
    fn start(tag: &str) -> (PathBuf, MpscReceiver<VmmAction>) {
        let path = temp_socket(tag);
        let server = ApiServer::bind(&path).unwrap();
        let (to_vmm, vmm_rx) = channel::<VmmAction>();
        let (vmm_tx, from_vmm) = channel::<ApiResponse>();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let vmm_evt = evt.try_clone().unwrap();
        let (seen_tx, seen_rx) = channel();
        std::thread::spawn(move || {
            while let Ok(action) = vmm_rx.recv() {
                // The eventfd was written before or right after the send.
                let _ = evt.read();
                let answer = match &action {
                    VmmAction::GetVersion => {
                        ApiResponse::json(&serde_json::json!({"firecracker_version": "1.0.0"}))
                    }
                    VmmAction::NotSupported(f) => ApiResponse::not_supported(f),
                    _ => ApiResponse::NoContent,
                };
                let _ = seen_tx.send(action);
                if vmm_tx.send(answer).is_err() {
                    return;
                }
            }
        });
        server.spawn(LIMIT, to_vmm, vmm_evt, from_vmm).unwrap();
        (path, seen_rx)
    }

    fn connect(path: &Path) -> UnixStream {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// Reads one response: (status, headers, body).
    fn read_response(s: &mut UnixStream) -> (u16, String, String) {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            match s.read(&mut byte) {
                Ok(1) => buf.push(byte[0]),
                other => panic!("connection ended inside a response head: {other:?} {buf:?}"),
            }
        }
        let head = String::from_utf8(buf).unwrap();
        let status = head[9..12].parse().unwrap();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .map_or(0, |v| v.trim().parse().unwrap());
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).unwrap();
        (status, head, String::from_utf8(body).unwrap())
    }

    fn assert_closed(s: &mut UnixStream) {
        let mut b = [0u8; 16];
        assert_eq!(s.read(&mut b).unwrap(), 0, "expected the server to close");
    }

    const GET_VERSION: &[u8] = b"GET /version HTTP/1.1\r\n\r\n";
    const START: &[u8] =
        b"PUT /actions HTTP/1.1\r\nContent-Length: 31\r\n\r\n{\"action_type\":\"InstanceStart\"}";

    /// The answer to a pipelined request leaves before the next request is handled: a VMM
    /// that never answers the second (it is exiting) must not swallow the first's answer.
    #[test]
    fn an_answer_leaves_before_the_next_request_is_handled() {
        let path = temp_socket("stall");
        let server = ApiServer::bind(&path).unwrap();
        let (to_vmm, vmm_rx) = channel::<VmmAction>();
        let (vmm_tx, from_vmm) = channel::<ApiResponse>();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let vmm_evt = evt.try_clone().unwrap();
        std::thread::spawn(move || {
            // Answers the first action, then holds the second for good.
            let _first = vmm_rx.recv();
            let _ = vmm_tx.send(ApiResponse::NoContent);
            let _second = vmm_rx.recv();
            std::thread::sleep(Duration::from_secs(3600));
            drop(vmm_tx);
        });
        server.spawn(LIMIT, to_vmm, vmm_evt, from_vmm).unwrap();
        let mut c = connect(&path);
        let mut batch = START.to_vec();
        batch.extend_from_slice(GET_VERSION);
        c.write_all(&batch).unwrap();
        let (status, _, _) = read_response(&mut c);
        assert_eq!(status, 204);
    }

    #[test]
    fn keep_alive_and_pipelining() {
        let (path, seen) = start("keepalive");
        let mut c = connect(&path);
        c.write_all(GET_VERSION).unwrap();
        let (status, head, body) = read_response(&mut c);
        assert_eq!(status, 200);
        assert!(head.contains("Server: Firecracker API\r\n"), "{head}");
        assert!(
            head.contains("Content-Type: application/json\r\n"),
            "{head}"
        );
        assert_eq!(body, r#"{"firecracker_version":"1.0.0"}"#);
        c.write_all(START).unwrap();
        let (status, head, body) = read_response(&mut c);
        assert_eq!((status, body.as_str()), (204, ""));
        assert!(head.starts_with("HTTP/1.1 204 No Content\r\n"), "{head}");
        assert_eq!(seen.recv().unwrap(), VmmAction::GetVersion);
        assert_eq!(seen.recv().unwrap(), VmmAction::InstanceStart);

        // Three pipelined requests, one of them refused by the router: answered in order.
        let mut batch = GET_VERSION.to_vec();
        batch.extend_from_slice(b"GET /nope HTTP/1.1\r\n\r\n");
        batch.extend_from_slice(START);
        c.write_all(&batch).unwrap();
        assert_eq!(read_response(&mut c).0, 200);
        let (status, _, body) = read_response(&mut c);
        assert_eq!(status, 400);
        assert_eq!(
            body,
            r#"{"fault_message":"Invalid request method and/or path: GET nope."}"#
        );
        assert_eq!(read_response(&mut c).0, 204);

        // Connection: close is honoured after the answer.
        c.write_all(b"GET /version HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let (status, head, _) = read_response(&mut c);
        assert_eq!(status, 200);
        assert!(head.contains("Connection: close\r\n"), "{head}");
        assert_closed(&mut c);
    }

    #[test]
    fn two_clients_at_once() {
        let (path, _seen) = start("two");
        let mut a = connect(&path);
        let mut b = connect(&path);
        a.write_all(GET_VERSION).unwrap();
        b.write_all(START).unwrap();
        assert_eq!(read_response(&mut b).0, 204);
        assert_eq!(read_response(&mut a).0, 200);
        b.write_all(GET_VERSION).unwrap();
        assert_eq!(read_response(&mut b).0, 200);
    }

    #[test]
    fn a_stalled_half_request_does_not_block_others() {
        let (path, seen) = start("stall");
        let mut slow = connect(&path);
        slow.write_all(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 36\r\n\r\n{\"vcpu")
            .unwrap();
        let mut fast = connect(&path);
        fast.write_all(GET_VERSION).unwrap();
        assert_eq!(read_response(&mut fast).0, 200);
        assert_eq!(seen.recv().unwrap(), VmmAction::GetVersion);
        // The slow client can still finish its request later.
        slow.write_all(b"_count\":2,\"mem_size_mib\":1024}")
            .unwrap();
        assert_eq!(read_response(&mut slow).0, 204);
        assert!(matches!(
            seen.recv().unwrap(),
            VmmAction::PutMachineConfig(m) if m.vcpu_count == 2 && m.mem_size_mib == 1024
        ));
    }

    #[test]
    fn a_client_leaving_mid_request_is_forgotten() {
        let (path, seen) = start("leave");
        {
            let mut gone = connect(&path);
            gone.write_all(b"PUT /actions HTTP/1.1\r\nContent-Length: 31\r\n\r\n{\"act")
                .unwrap();
        }
        // And one that shuts down its write side inside a request, still reading.
        let mut half = connect(&path);
        half.write_all(b"GET /ver").unwrap();
        half.shutdown(std::net::Shutdown::Write).unwrap();
        assert_closed(&mut half);

        let mut c = connect(&path);
        c.write_all(GET_VERSION).unwrap();
        assert_eq!(read_response(&mut c).0, 200);
        // The VMM saw only the complete request.
        assert_eq!(seen.recv().unwrap(), VmmAction::GetVersion);
        assert!(seen.try_recv().is_err());
    }

    #[test]
    fn framing_errors_answer_then_close() {
        let (path, seen) = start("framing");
        let mut c = connect(&path);
        c.write_all(b"PUT /mmds HTTP/1.1\r\nContent-Length: 5000\r\n\r\n")
            .unwrap();
        let (status, _, body) = read_response(&mut c);
        assert_eq!(status, 400);
        assert!(body.contains("larger than the limit of 1024"), "{body}");
        assert_closed(&mut c);

        let mut c = connect(&path);
        c.write_all(b"BLAH\x01 / HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(read_response(&mut c).0, 400);
        assert_closed(&mut c);

        // Expect: 100-continue gets its interim answer, then the real one.
        let mut c = connect(&path);
        c.write_all(b"PUT /actions HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 31\r\n\r\n")
            .unwrap();
        let mut interim = [0u8; 25];
        c.read_exact(&mut interim).unwrap();
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        c.write_all(b"{\"action_type\":\"InstanceStart\"}").unwrap();
        assert_eq!(read_response(&mut c).0, 204);
        assert_eq!(seen.recv().unwrap(), VmmAction::InstanceStart);

        // HTTP/1.0 closes after the answer unless asked otherwise.
        let mut c = connect(&path);
        c.write_all(b"GET /version HTTP/1.0\r\n\r\n").unwrap();
        let (status, head, _) = read_response(&mut c);
        assert_eq!(status, 200);
        assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
        assert_closed(&mut c);
    }

    #[test]
    fn a_client_that_never_reads_does_not_block_others() {
        let (path, _seen) = start("flood");
        let mut flood = connect(&path);
        flood
            .set_write_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        // Pipeline requests without reading until the sockets are full both ways.
        let mut sent = 0usize;
        let burst = GET_VERSION.repeat(64);
        while sent < 64 * 1024 * 1024 {
            match flood.write(&burst) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        assert!(sent < 64 * 1024 * 1024, "the server never stopped reading");
        let mut other = connect(&path);
        other.write_all(GET_VERSION).unwrap();
        assert_eq!(read_response(&mut other).0, 200);
        // The flooder still gets its answers, in order, once it reads.
        for _ in 0..10 {
            assert_eq!(read_response(&mut flood).0, 200);
        }
    }

    #[test]
    fn connections_over_the_cap_are_refused() {
        let (path, _seen) = start("cap");
        let mut held: Vec<UnixStream> = (0..MAX_CONNECTIONS).map(|_| connect(&path)).collect();
        // Make sure the server has accepted all of them.
        for c in held.iter_mut().step_by(16) {
            c.write_all(GET_VERSION).unwrap();
            assert_eq!(read_response(c).0, 200);
        }
        // The one too many is told why, then closed.
        let mut extra = connect(&path);
        let _ = extra.write_all(GET_VERSION);
        let (status, head, body) = read_response(&mut extra);
        assert_eq!(status, 503);
        assert!(head.contains("Connection: close\r\n"), "{head}");
        assert_eq!(body, r#"{"fault_message":"Too many open connections"}"#);
        let mut b = [0u8; 8];
        assert!(matches!(extra.read(&mut b), Ok(0) | Err(_)));
        // Closing one makes room again.
        drop(held.pop());
        let mut again = None;
        for _ in 0..100 {
            let mut c = connect(&path);
            if c.write_all(GET_VERSION).is_ok() {
                let status = read_response(&mut c).0;
                if status != 503 {
                    again = Some(status);
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(again, Some(200));
    }

    #[test]
    fn stale_sockets_are_replaced_live_ones_refused() {
        let path = temp_socket("stale");
        // A socket file nobody listens on any more.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let server = ApiServer::bind(&path).unwrap();
        assert!(UnixStream::connect(&path).is_ok());

        // While it is bound, a second bind is refused and the file left alone.
        let e = ApiServer::bind(&path).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        drop(server);

        let file = temp_socket("file");
        std::fs::write(&file, b"not a socket").unwrap();
        let e = ApiServer::bind(&file).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"not a socket");
    }
}
