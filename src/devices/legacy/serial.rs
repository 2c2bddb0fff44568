//! COM1: vm-superio's 16550A on the PIO bus, its output a byte stream (stdout or a file),
//! its input fed by the VMM's event loop.

use std::io::Write;

use vm_superio::serial::SerialEvents;
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use super::EventFdTrigger;
use crate::devices::bus::BusDevice;
use crate::devices::rate_limiter::{now_ns, TokenBucket};

pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_SIZE: u64 = 8;
pub const COM1_GSI: u32 = 4;

/// Tells the event loop when the guest has drained the input FIFO, so that reading the
/// host's input resumes only when there is room (no unbounded buffering).
pub struct SerialEventsImpl {
    pub buffer_ready: EventFd,
}

impl SerialEvents for SerialEventsImpl {
    fn buffer_read(&self) {
        crate::metrics::METRICS.uart.read_count.inc();
    }
    fn out_byte(&self) {
        crate::metrics::METRICS.uart.write_count.inc();
    }
    fn tx_lost_byte(&self) {
        crate::metrics::METRICS.uart.missed_write_count.inc();
    }
    fn in_buffer_empty(&self) {
        let _ = self.buffer_ready.write(1);
    }
}

pub type SerialOut = Box<dyn Write + Send>;

/// Where the console's output goes, and the bucket (bytes) that limits it (None: unlimited).
pub struct ConsoleSink {
    pub out: SerialOut,
    pub limiter: Option<TokenBucket>,
}

/// The console's output. vm-superio flushes its writer after every byte, so the real writes
/// happen in `emit`: one host write per bus write, or per line when line-buffered.
///
/// With a rate limiter (`PUT /serial`'s `rate_limiter`, bytes) every byte the guest writes is
/// taken from the bucket as it arrives; a byte the bucket cannot pay for is dropped and counted
/// in `uart.rate_limiter_dropped_bytes`, never queued, so a chatty guest can neither stall the
/// VMM nor fill the host's disk.
pub struct ConsoleOut {
    out: SerialOut,
    pending: Vec<u8>,
    limiter: Option<TokenBucket>,
}

/// A guest that never ends its line still gets its output out at this size.
const MAX_PENDING: usize = 4096;

impl Write for ConsoleOut {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if let Some(bucket) = self.limiter.as_mut() {
            if !bucket.try_take(b.len() as u64, now_ns()) {
                crate::metrics::METRICS
                    .uart
                    .rate_limiter_dropped_bytes
                    .add(b.len() as u64);
                return Ok(b.len());
            }
        }
        self.pending.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // Deferred on purpose: see `emit`.
        Ok(())
    }
}

impl ConsoleOut {
    /// Writes out what is pending: everything, or only complete lines.
    fn emit(&mut self, whole_lines_only: bool) {
        let n = if whole_lines_only && self.pending.len() < MAX_PENDING {
            match self.pending.iter().rposition(|&b| b == b'\n') {
                Some(i) => i + 1,
                None => return,
            }
        } else {
            self.pending.len()
        };
        if n == 0 {
            return;
        }
        if self.out.write_all(&self.pending[..n]).is_err() {
            crate::metrics::METRICS.uart.missed_write_count.inc();
        }
        let _ = self.out.flush();
        self.pending.drain(..n);
    }
}

pub struct SerialDevice {
    pub serial: Serial<EventFdTrigger, SerialEventsImpl, ConsoleOut>,
    /// Hold output until a line is complete (the VMM then flushes partial lines on a timer),
    /// so that log lines of other threads never land in the middle of a console line.
    line_buffered: bool,
}

impl SerialDevice {
    pub fn new(irq: EventFdTrigger, buffer_ready: EventFd, out: SerialOut) -> SerialDevice {
        SerialDevice {
            serial: Serial::with_events(
                irq,
                SerialEventsImpl { buffer_ready },
                ConsoleOut {
                    out,
                    pending: Vec::with_capacity(256),
                    limiter: None,
                },
            ),
            line_buffered: false,
        }
    }

    /// Limits the bytes of output the guest may write (None: unlimited).
    pub fn with_rate_limiter(mut self, bucket: Option<TokenBucket>) -> SerialDevice {
        self.serial.writer_mut().limiter = bucket;
        self
    }

    /// Line-buffers the output; whoever sets this must call `flush_output` periodically.
    pub fn set_line_buffered(&mut self, on: bool) {
        self.line_buffered = on;
    }

    /// Writes out whatever the guest printed so far.
    pub fn flush_output(&mut self) {
        self.serial.writer_mut().emit(false);
    }

    /// Queues host input for the guest; returns how many bytes fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.serial.fifo_capacity();
        let n = room.min(bytes.len());
        if n == 0 {
            return 0;
        }
        match self.serial.enqueue_raw_bytes(&bytes[..n]) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial: cannot queue input: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // A wider access than one byte only has meaning in its first byte.
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.serial.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // A run of coalesced writes to the data register arrives as one call, every byte.
        for &b in data {
            if let Err(e) = self.serial.write(offset as u8, b) {
                crate::metrics::METRICS.uart.error_count.inc();
                log::debug!("serial: write failed: {e:?}");
            }
        }
        if offset == 0 {
            let lines_only = self.line_buffered;
            self.serial.writer_mut().emit(lines_only);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_and_input() {
        let out = Shared::default();
        let ready = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(
            EventFdTrigger::new().unwrap(),
            ready.try_clone().unwrap(),
            Box::new(out.clone()),
        );
        dev.write(0, b"hi\n");
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        let mut d = [0u8];
        dev.read(0, &mut d);
        assert_eq!(d[0], b'a');
        dev.read(0, &mut d);
        assert_eq!(d[0], b'b');
        // Draining the FIFO tells the event loop to read more input.
        assert_eq!(ready.read().unwrap(), 1);
        // A full FIFO takes only what fits.
        let big = vec![b'x'; 200];
        let n = dev.enqueue_input(&big);
        assert!(n > 0 && n < 200);
        assert_eq!(dev.enqueue_input(&big), 0);
    }

    #[test]
    fn rate_limited_output_drops_and_counts_what_the_bucket_cannot_pay_for() {
        use crate::api::models::TokenBucket as BucketConfig;
        let out = Shared::default();
        let ready = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        // 10 bytes a minute plus a one-time burst of 5: 15 bytes now, then (almost) nothing.
        let cfg = BucketConfig {
            size: 10,
            one_time_burst: Some(5),
            refill_time: 60_000,
        };
        let mut dev =
            SerialDevice::new(EventFdTrigger::new().unwrap(), ready, Box::new(out.clone()))
                .with_rate_limiter(TokenBucket::new(&cfg, now_ns()));
        let before = crate::metrics::METRICS
            .uart
            .rate_limiter_dropped_bytes
            .count();
        dev.write(0, b"0123456789abcdefghijklmnopqrstuvwxyz\n");
        assert_eq!(&*out.0.lock().unwrap(), b"0123456789abcde");
        let dropped = crate::metrics::METRICS
            .uart
            .rate_limiter_dropped_bytes
            .count()
            - before;
        // Other tests may drop bytes at the same time, never fewer.
        assert!(dropped >= 37 - 15, "{dropped}");

        // Without a limiter nothing is dropped.
        let out = Shared::default();
        let ready = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev =
            SerialDevice::new(EventFdTrigger::new().unwrap(), ready, Box::new(out.clone()))
                .with_rate_limiter(None);
        let big = vec![b'y'; 10_000];
        dev.write(0, &big);
        assert_eq!(out.0.lock().unwrap().len(), 10_000);
    }

    #[test]
    fn line_buffered_output_waits_for_the_newline_or_a_flush() {
        let out = Shared::default();
        let ready = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev =
            SerialDevice::new(EventFdTrigger::new().unwrap(), ready, Box::new(out.clone()));
        dev.set_line_buffered(true);
        dev.write(0, b"ab");
        assert!(out.0.lock().unwrap().is_empty());
        dev.write(0, b"c\n");
        assert_eq!(&*out.0.lock().unwrap(), b"abc\n");
        dev.write(0, b"$ ");
        dev.flush_output();
        assert_eq!(&*out.0.lock().unwrap(), b"abc\n$ ");
    }
}
