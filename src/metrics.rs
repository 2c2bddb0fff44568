//! Metrics in Firecracker's format: one JSON object per line, counters reporting the change
//! since the previous flush. Counters are plain atomics in one static, so any thread (a vCPU,
//! a signal handler) bumps them without locks.

use crate::logger::{Sink, Written};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use serde::ser::{Serialize, SerializeMap, SerializeStruct, Serializer};

/// A counter; serialising it reports the increase since the last serialisation.
#[derive(Default)]
pub struct IncMetric {
    value: AtomicU64,
    flushed: AtomicU64,
}

impl IncMetric {
    pub const fn new() -> Self {
        IncMetric {
            value: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
        }
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.value.fetch_add(n, Ordering::Relaxed);
    }
    pub fn count(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
    /// Where the last serialisation left the counter, for [`IncMetric::rewind`].
    fn mark(&self) -> u64 {
        self.flushed.load(Ordering::Relaxed)
    }
    /// Forgets the serialisations since `mark`: their line never reached the reader, so the
    /// next line reports their counts again.
    fn rewind(&self, mark: u64) {
        self.flushed.store(mark, Ordering::Relaxed);
    }
}

impl Serialize for IncMetric {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let now = self.value.load(Ordering::Relaxed);
        let before = self.flushed.swap(now, Ordering::Relaxed);
        s.serialize_u64(now.wrapping_sub(before))
    }
}

/// A value that is set, not counted (start-up times, latencies).
#[derive(Default)]
pub struct StoreMetric(AtomicU64);

impl StoreMetric {
    pub const fn new() -> Self {
        StoreMetric(AtomicU64::new(0))
    }
    pub fn store(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn fetch(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Serialize for StoreMetric {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.fetch())
    }
}

/// Declares a metrics group: a struct of metrics serialised field by field.
macro_rules! metrics_group {
    ($name:ident { $($field:ident : $ty:ident),* $(,)? }) => {
        #[derive(Default)]
        pub struct $name { $(pub $field: $ty),* }
        impl $name {
            pub const fn new() -> Self { $name { $($field: $ty::new()),* } }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut st = s.serialize_struct(stringify!($name), [$(stringify!($field)),*].len())?;
                $(st.serialize_field(stringify!($field), &self.$field)?;)*
                st.end()
            }
        }
    };
}

metrics_group!(ApiServerMetrics {
    process_startup_time_us: StoreMetric,
    process_startup_time_cpu_us: StoreMetric,
});

metrics_group!(UartMetrics {
    error_count: IncMetric,
    flush_count: IncMetric,
    missed_read_count: IncMetric,
    missed_write_count: IncMetric,
    read_count: IncMetric,
    write_count: IncMetric,
    rate_limiter_dropped_bytes: IncMetric,
});

metrics_group!(I8042Metrics {
    error_count: IncMetric,
    missed_read_count: IncMetric,
    missed_write_count: IncMetric,
    read_count: IncMetric,
    reset_count: IncMetric,
    write_count: IncMetric,
});

metrics_group!(VcpuMetrics {
    exit_io_in: IncMetric,
    exit_io_out: IncMetric,
    exit_mmio_read: IncMetric,
    exit_mmio_write: IncMetric,
    failures: IncMetric,
    unhandled_io: IncMetric,
    unhandled_mmio: IncMetric,
});

metrics_group!(VmmMetrics {
    device_events: IncMetric,
    panic_count: IncMetric,
});

metrics_group!(LoggerMetrics {
    missed_metrics_count: IncMetric,
    metrics_fails: IncMetric,
    missed_log_count: IncMetric,
    log_fails: IncMetric,
});

metrics_group!(SeccompMetrics {
    num_faults: IncMetric
});

metrics_group!(SignalMetrics {
    sigbus: IncMetric,
    sigsegv: IncMetric,
    sigxfsz: IncMetric,
    sigxcpu: IncMetric,
    sigpipe: IncMetric,
    sighup: IncMetric,
    sigill: IncMetric,
});

metrics_group!(BlockMetrics {
    read_count: IncMetric,
    write_count: IncMetric,
    read_bytes: IncMetric,
    write_bytes: IncMetric,
    flush_count: IncMetric,
    invalid_reqs_count: IncMetric,
    io_errors: IncMetric,
    rate_limiter_throttled_events: IncMetric,
});

metrics_group!(EntropyMetrics {
    entropy_bytes: IncMetric,
    invalid_reqs: IncMetric,
    rate_limiter_throttled_events: IncMetric,
});

metrics_group!(NetMetrics {
    rx_bytes_count: IncMetric,
    rx_packets_count: IncMetric,
    tx_bytes_count: IncMetric,
    tx_packets_count: IncMetric,
    tx_spoofed_mac_count: IncMetric,
    rx_dropped: IncMetric,
    rx_malformed: IncMetric,
    tx_malformed: IncMetric,
    tx_fails: IncMetric,
    rx_rate_limiter_throttled: IncMetric,
    tx_rate_limiter_throttled: IncMetric,
});

metrics_group!(VsockMetrics {
    conns_added: IncMetric,
    conns_removed: IncMetric,
    conn_event_fails: IncMetric,
    rx_packets_count: IncMetric,
    tx_packets_count: IncMetric,
    rx_bytes_count: IncMetric,
    tx_bytes_count: IncMetric,
    malformed_packets: IncMetric,
    rst_sent: IncMetric,
});

// Transport-level trouble common to every virtio device. `deferred_passes`: queue passes cut
// at their budget and run again later (a guest refilling a queue as fast as ember empties it).
metrics_group!(VirtioMetrics {
    malformed_chains: IncMetric,
    invalid_notifications: IncMetric,
    invalid_register_writes: IncMetric,
    needs_reset: IncMetric,
    deferred_passes: IncMetric,
});

// Firecracker's `balloon` and `mmds` groups, which its clients read: ember has neither device
// yet (the API refuses them), so they stay at zero.
metrics_group!(BalloonMetrics {
    activate_fails: IncMetric,
    inflate_count: IncMetric,
    stats_updates_count: IncMetric,
    stats_update_fails: IncMetric,
    deflate_count: IncMetric,
    event_fails: IncMetric,
});

metrics_group!(MmdsMetrics {
    rx_accepted: IncMetric,
    rx_accepted_err: IncMetric,
    rx_accepted_unusual: IncMetric,
    rx_bad_eth: IncMetric,
    rx_count: IncMetric,
    tx_bytes: IncMetric,
    tx_count: IncMetric,
    tx_errors: IncMetric,
    tx_frames: IncMetric,
    connections_created: IncMetric,
    connections_destroyed: IncMetric,
});

metrics_group!(LatencyMetrics {
    vmm_start_us: StoreMetric,
    pause_vm: StoreMetric,
    resume_vm: StoreMetric,
});

pub struct Metrics {
    pub api_server: ApiServerMetrics,
    pub balloon: BalloonMetrics,
    pub block: BlockMetrics,
    pub entropy: EntropyMetrics,
    pub i8042: I8042Metrics,
    pub latencies_us: LatencyMetrics,
    pub logger: LoggerMetrics,
    pub mmds: MmdsMetrics,
    pub net: NetMetrics,
    pub seccomp: SeccompMetrics,
    pub signals: SignalMetrics,
    pub uart: UartMetrics,
    pub vcpu: VcpuMetrics,
    pub vmm: VmmMetrics,
    pub virtio: VirtioMetrics,
    pub vsock: VsockMetrics,
}

pub static METRICS: Metrics = Metrics {
    api_server: ApiServerMetrics::new(),
    balloon: BalloonMetrics::new(),
    block: BlockMetrics::new(),
    entropy: EntropyMetrics::new(),
    i8042: I8042Metrics::new(),
    latencies_us: LatencyMetrics::new(),
    logger: LoggerMetrics::new(),
    mmds: MmdsMetrics::new(),
    net: NetMetrics::new(),
    seccomp: SeccompMetrics::new(),
    signals: SignalMetrics::new(),
    uart: UartMetrics::new(),
    vcpu: VcpuMetrics::new(),
    vmm: VmmMetrics::new(),
    virtio: VirtioMetrics::new(),
    vsock: VsockMetrics::new(),
};

impl Serialize for Metrics {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.serialize_all(s, false)
    }
}

/// Serialises [`METRICS`] without ever blocking: the per-device groups are left out when their
/// registry is locked (a signal handler may have interrupted the thread holding it).
struct NonBlocking<'a>(&'a Metrics);

impl Serialize for NonBlocking<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize_all(s, true)
    }
}

impl Metrics {
    /// The static groups, then the per-device ones (`block_<id>`, `net_<id>`). Allocates
    /// nothing of its own.
    fn serialize_all<S: Serializer>(&self, s: S, nonblocking: bool) -> Result<S::Ok, S::Error> {
        let api = &crate::api::metrics::API_METRICS;
        let mut st = s.serialize_map(None)?;
        st.serialize_entry("utc_timestamp_ms", &crate::time::utc_ms())?;
        st.serialize_entry("api_server", &self.api_server)?;
        st.serialize_entry("get_api_requests", &api.get_api_requests)?;
        st.serialize_entry("put_api_requests", &api.put_api_requests)?;
        st.serialize_entry("patch_api_requests", &api.patch_api_requests)?;
        st.serialize_entry("balloon", &self.balloon)?;
        st.serialize_entry("block", &self.block)?;
        st.serialize_entry("entropy", &self.entropy)?;
        st.serialize_entry("i8042", &self.i8042)?;
        st.serialize_entry("latencies_us", &self.latencies_us)?;
        st.serialize_entry("logger", &self.logger)?;
        st.serialize_entry("mmds", &self.mmds)?;
        st.serialize_entry("net", &self.net)?;
        st.serialize_entry("seccomp", &self.seccomp)?;
        st.serialize_entry("signals", &self.signals)?;
        st.serialize_entry("uart", &self.uart)?;
        st.serialize_entry("vcpu", &self.vcpu)?;
        st.serialize_entry("virtio", &self.virtio)?;
        st.serialize_entry("vmm", &self.vmm)?;
        st.serialize_entry("vsock", &self.vsock)?;
        let devices = if nonblocking {
            match DEVICE_METRICS.try_lock() {
                Ok(g) => Some(g),
                Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            }
        } else {
            Some(device_metrics())
        };
        if let Some(devices) = devices {
            for (key, m) in &devices.block {
                st.serialize_entry(key, &**m)?;
            }
            for (key, m) in &devices.net {
                st.serialize_entry(key, &**m)?;
            }
        }
        st.end()
    }
}

/// The per-device groups, each with its JSON key, in registration order. A group outlives its
/// device, so a device made again with the same id keeps counting in the same group.
struct DeviceMetrics {
    block: Vec<(String, Arc<BlockMetrics>)>,
    net: Vec<(String, Arc<NetMetrics>)>,
}

static DEVICE_METRICS: Mutex<DeviceMetrics> = Mutex::new(DeviceMetrics {
    block: Vec::new(),
    net: Vec::new(),
});

fn device_metrics() -> MutexGuard<'static, DeviceMetrics> {
    DEVICE_METRICS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The group `block_<drive_id>` of one drive (registered on first use).
pub fn block_metrics(drive_id: &str) -> Arc<BlockMetrics> {
    let key = format!("block_{drive_id}");
    let mut devices = device_metrics();
    if let Some((_, m)) = devices.block.iter().find(|(k, _)| *k == key) {
        return Arc::clone(m);
    }
    let m = Arc::new(BlockMetrics::new());
    devices.block.push((key, Arc::clone(&m)));
    m
}

/// The group `net_<iface_id>` of one network interface (registered on first use).
pub fn net_metrics(iface_id: &str) -> Arc<NetMetrics> {
    let key = format!("net_{iface_id}");
    let mut devices = device_metrics();
    if let Some((_, m)) = devices.net.iter().find(|(k, _)| *k == key) {
        return Arc::clone(m);
    }
    let m = Arc::new(NetMetrics::new());
    devices.net.push((key, Arc::clone(&m)));
    m
}

static SINK: Mutex<Option<Sink>> = Mutex::new(None);

#[derive(Debug)]
pub enum MetricsError {
    AlreadyInitialized,
    Open(String, std::io::Error),
}

impl std::fmt::Display for MetricsError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            MetricsError::AlreadyInitialized => {
                write!(f, "Reinitialization of metrics not allowed.")
            }
            MetricsError::Open(p, e) => write!(f, "Cannot open the metrics file {p:?}: {e}"),
        }
    }
}

impl std::error::Error for MetricsError {}

/// Opens the metrics destination (a file or a named pipe) once.
pub fn init(path: &str) -> Result<(), MetricsError> {
    let mut sink = SINK.lock().unwrap_or_else(|e| e.into_inner());
    if sink.is_some() {
        return Err(MetricsError::AlreadyInitialized);
    }
    *sink = Some(Sink::open(path).map_err(|e| MetricsError::Open(path.to_string(), e))?);
    Ok(())
}

/// Writes one line of metrics, if a destination is configured.
pub fn flush() {
    let mut sink = SINK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(f) = sink.as_mut() {
        // The counts of dropped lines must reach the reader even when the line that carries
        // them is itself dropped.
        let l = &METRICS.logger;
        let missed = [
            &l.missed_metrics_count,
            &l.metrics_fails,
            &l.missed_log_count,
            &l.log_fails,
        ];
        let marks = missed.map(IncMetric::mark);
        match serde_json::to_vec(&METRICS) {
            Ok(mut line) => {
                line.push(b'\n');
                let written = f.write_line(&line);
                if written != Written::Whole {
                    for (m, mark) in missed.iter().zip(marks) {
                        m.rewind(mark);
                    }
                }
                match written {
                    Written::Whole => {}
                    Written::Full => l.missed_metrics_count.inc(),
                    Written::Failed => l.metrics_fails.inc(),
                }
            }
            Err(e) => {
                l.metrics_fails.inc();
                log::warn!("cannot serialise metrics: {e}");
            }
        }
    }
}

/// For signal handlers: serialises into a stack buffer (never allocate in a handler) and never
/// blocks on the lock: while another thread holds it (its flush takes microseconds, and its
/// deltas must reach the file before this one) it retries for a bounded while, then gives up
/// (the holder may be this very thread, interrupted).
pub fn try_flush() {
    let mut sink = SINK.try_lock();
    for _ in 0..1_000_000 {
        if !matches!(sink, Err(TryLockError::WouldBlock)) {
            break;
        }
        std::hint::spin_loop();
        sink = SINK.try_lock();
    }
    let sink = match sink {
        Ok(g) => Some(g),
        Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    };
    if let Some(sink) = sink {
        if let Some(f) = sink.as_ref() {
            let mut line = crate::logger::StackBuf::<32768>::new();
            if serde_json::to_writer(&mut line, &NonBlocking(&METRICS)).is_ok() {
                let _ = std::io::Write::write(&mut line, b"\n");
                let _ = f.write_line_raw(line.as_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewound_counter_reports_its_count_again() {
        // What flush does when the line carrying a count was dropped.
        let m = IncMetric::new();
        m.add(2);
        let mark = m.mark();
        assert_eq!(serde_json::to_string(&m).unwrap(), "2");
        m.rewind(mark);
        m.inc();
        assert_eq!(serde_json::to_string(&m).unwrap(), "3");
        assert_eq!(serde_json::to_string(&m).unwrap(), "0");
    }

    #[test]
    fn counters_report_deltas() {
        let m = IncMetric::new();
        m.add(3);
        assert_eq!(serde_json::to_string(&m).unwrap(), "3");
        m.inc();
        assert_eq!(serde_json::to_string(&m).unwrap(), "1");
        assert_eq!(serde_json::to_string(&m).unwrap(), "0");
        let v: serde_json::Value = serde_json::to_value(&METRICS).unwrap();
        assert!(v["uart"]["write_count"].is_u64());
        assert!(v["api_server"]["process_startup_time_us"].is_u64());
        assert!(v["utc_timestamp_ms"].as_u64().unwrap() > 0);
    }

    /// Every group the spec names is in each line, as in Firecracker's.
    #[test]
    fn every_group_the_spec_names_is_present() {
        let v: serde_json::Value = serde_json::to_value(&METRICS).unwrap();
        for g in [
            "api_server",
            "get_api_requests",
            "put_api_requests",
            "patch_api_requests",
            "latencies_us",
            "seccomp",
            "signals",
            "vcpu",
            "uart",
            "i8042",
            "block",
            "net",
            "vsock",
            "entropy",
            "balloon",
            "mmds",
            "logger",
            "vmm",
        ] {
            assert!(v[g].is_object(), "no {g} group");
        }
        assert!(v["balloon"]["inflate_count"].is_u64());
        assert!(v["mmds"]["rx_accepted"].is_u64());
        assert!(v["signals"]["sigpipe"].is_u64());
    }

    #[test]
    fn per_device_groups_follow_the_static_ones_and_never_block() {
        let blk = block_metrics("metrics_rs_test");
        let net = net_metrics("metrics_rs_test");
        blk.read_count.add(2);
        net.tx_packets_count.inc();
        // Values are deltas since the last serialisation (other tests serialise too).
        let v: serde_json::Value = serde_json::to_value(&METRICS).unwrap();
        assert!(matches!(
            v["block_metrics_rs_test"]["read_count"].as_u64(),
            Some(0..=2)
        ));
        assert!(matches!(
            v["net_metrics_rs_test"]["tx_packets_count"].as_u64(),
            Some(0..=1)
        ));
        assert_eq!(blk.read_count.count(), 2);
        assert!(v["block"]["read_count"].is_u64() && v["net"]["rx_dropped"].is_u64());
        assert!(Arc::ptr_eq(&blk, &block_metrics("metrics_rs_test")));

        // What the signal handler writes: the per-device groups are skipped while the
        // registry is held, and the line fits in its stack buffer.
        let held = device_metrics();
        let mut line = crate::logger::StackBuf::<32768>::new();
        serde_json::to_writer(&mut line, &NonBlocking(&METRICS)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(line.as_bytes()).unwrap();
        assert!(v["uart"].is_object());
        assert!(v.get("block_metrics_rs_test").is_none());
        drop(held);
        let mut line = crate::logger::StackBuf::<32768>::new();
        serde_json::to_writer(&mut line, &NonBlocking(&METRICS)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(line.as_bytes()).unwrap();
        assert!(v["block_metrics_rs_test"].is_object());
    }
}
