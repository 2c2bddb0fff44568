//! Request bodies the API accepts that have no home in `config` yet. Some are carried to the
//! VMM (`SerialConfig`); the others only check a body's shape, so that a client sending a
//! malformed body to a feature ember lacks still gets the deserialisation error first.

use serde::{Deserialize, Serialize};

/// `TokenBucket`: size 0 or refill_time 0 turns the bucket off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds.
    pub refill_time: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

/// The body of `PUT /serial`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<TokenBucket>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum VmState {
    Paused,
    Resumed,
}

/// The body of `PATCH /vm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStateConfig {
    pub state: VmState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

/// The body of `PUT /actions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionBody {
    pub action_type: ActionType,
}

// The shapes below are only validated; their features answer "not supported" for now.

/// The body of `PATCH /drives/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveUpdateBody {
    pub drive_id: String,
    #[serde(default)]
    pub path_on_host: Option<String>,
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
}

/// The body of `PATCH /network-interfaces/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceUpdateBody {
    pub iface_id: String,
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// The body of `PUT /balloon`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct BalloonBody {
    amount_mib: u32,
    deflate_on_oom: bool,
    #[serde(default)]
    stats_polling_interval_s: Option<u16>,
    #[serde(default)]
    free_page_hinting: Option<bool>,
    #[serde(default)]
    free_page_reporting: Option<bool>,
}

/// The body of `PATCH /balloon`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct BalloonUpdateBody {
    amount_mib: u32,
}

/// The body of `PATCH /balloon/statistics`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct BalloonStatsUpdateBody {
    stats_polling_interval_s: u16,
}

#[derive(Deserialize)]
enum MmdsVersion {
    V1,
    V2,
}

/// The body of `PUT /mmds/config`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct MmdsConfigBody {
    network_interfaces: Vec<String>,
    #[serde(default)]
    version: Option<MmdsVersion>,
    #[serde(default)]
    ipv4_address: Option<String>,
    #[serde(default)]
    imds_compat: Option<bool>,
}

#[derive(Deserialize)]
enum SnapshotType {
    Full,
    Diff,
}

/// The body of `PUT /snapshot/create`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct SnapshotCreateBody {
    snapshot_path: String,
    mem_file_path: String,
    #[serde(default)]
    snapshot_type: Option<SnapshotType>,
}

#[derive(Deserialize)]
enum MemBackendType {
    File,
    Uffd,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct MemBackend {
    backend_type: MemBackendType,
    backend_path: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct NetworkOverride {
    iface_id: String,
    host_dev_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct VsockOverride {
    uds_path: String,
}

/// The body of `PUT /snapshot/load`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct SnapshotLoadBody {
    snapshot_path: String,
    #[serde(default)]
    pub mem_file_path: Option<String>,
    #[serde(default)]
    mem_backend: Option<MemBackend>,
    #[serde(default)]
    enable_diff_snapshots: Option<bool>,
    #[serde(default)]
    track_dirty_pages: Option<bool>,
    #[serde(default)]
    resume_vm: Option<bool>,
    #[serde(default)]
    network_overrides: Option<Vec<NetworkOverride>>,
    #[serde(default)]
    vsock_override: Option<VsockOverride>,
    #[serde(default)]
    clock_realtime: Option<bool>,
}

impl SnapshotLoadBody {
    /// Firecracker's rule: exactly one of `mem_backend` and `mem_file_path`.
    pub fn check_memory_source(&self) -> Result<(), &'static str> {
        match (&self.mem_backend, &self.mem_file_path) {
            (Some(_), Some(_)) => Err(
                "too many fields: either `mem_backend` or `mem_file_path` exclusively is required",
            ),
            (None, None) => {
                Err("missing field: either `mem_backend` or `mem_file_path` is required")
            }
            _ => Ok(()),
        }
    }
}
