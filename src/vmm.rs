//! The VMM thread: one epoll loop (event-manager) that owns host-side events — the stop
//! request, serial input, later the API — while vCPU threads run the guest.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::lock;
use crate::devices::legacy::serial::SerialDevice;
use crate::vstate::vcpu::{exit_code, ExitSignal};

pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;
pub type Manager = EventManager<Subscriber>;

/// Wakes the loop when the VM (or a signal) asks to stop; the loop then reads the code.
pub struct StopWatcher {
    evt: EventFd,
}

impl StopWatcher {
    pub fn new(exit: &ExitSignal) -> std::io::Result<StopWatcher> {
        Ok(StopWatcher {
            evt: exit.evt.try_clone()?,
        })
    }
}

impl MutEventSubscriber for StopWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::error!("cannot watch the stop event: {e:?}");
        }
    }
}

const STDIN: i32 = 0;

/// Host stdin to the guest's COM1. Reading stops while the guest's FIFO is full and resumes
/// when the guest drains it, so input is never buffered without bound.
pub struct SerialInput {
    serial: Arc<Mutex<SerialDevice>>,
    buffer_ready: EventFd,
    pending: Vec<u8>,
    stdin_active: bool,
}

impl SerialInput {
    pub fn new(serial: Arc<Mutex<SerialDevice>>, buffer_ready: EventFd) -> SerialInput {
        SerialInput {
            serial,
            buffer_ready,
            pending: Vec::new(),
            stdin_active: false,
        }
    }

    fn flush_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let n = lock(&self.serial).enqueue_input(&self.pending);
        self.pending.drain(..n);
    }

    fn set_stdin(&mut self, ops: &mut EventOps, on: bool) {
        let ev = Events::new_raw(STDIN, EventSet::IN);
        if on && !self.stdin_active {
            // A regular file or /dev/null cannot be polled: then there is no input.
            self.stdin_active = ops.add(ev).is_ok();
        } else if !on && self.stdin_active {
            let _ = ops.remove(ev);
            self.stdin_active = false;
        }
    }
}

impl MutEventSubscriber for SerialInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.buffer_ready.as_raw_fd() {
            let _ = self.buffer_ready.read();
        } else if events.fd() == STDIN {
            let mut buf = [0u8; 64];
            match std::io::stdin().lock().read(&mut buf) {
                Ok(0) => {
                    self.set_stdin(ops, false);
                    return;
                }
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => self.set_stdin(ops, false),
            }
        }
        self.flush_pending();
        // Read more host input only when everything read so far went to the guest.
        let want = self.pending.is_empty();
        self.set_stdin(ops, want);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.buffer_ready, EventSet::IN)) {
            log::error!("cannot watch the serial buffer event: {e:?}");
        }
        self.set_stdin(ops, true);
    }
}

/// Runs the loop until the VM or a signal asks to stop; returns the process exit code.
pub fn run_until_stopped(em: &mut Manager, exit: &ExitSignal) -> i32 {
    loop {
        match em.run() {
            Ok(_) => {}
            Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EINTR => {}
            Err(e) => {
                log::error!("event loop failed: {e:?}");
                return exit_code::GENERIC_ERROR;
            }
        }
        if let Some(code) = exit.code() {
            return code;
        }
        if let Some(sig) = crate::signal::stop_signal() {
            log::info!("Received signal {sig}; stopping the microVM.");
            return exit_code::OK;
        }
    }
}

pub fn add_subscriber<S: MutEventSubscriber + Send + 'static>(em: &mut Manager, s: S) {
    em.add_subscriber(Arc::new(Mutex::new(s)));
}
