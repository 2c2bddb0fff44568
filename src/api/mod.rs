//! The REST API: an HTTP/1.1 server on a Unix socket speaking Firecracker's API.
//!
//! The API thread ([`server`]) frames requests ([`http`]), turns each into a [`VmmAction`] or
//! an immediate error ([`parse`]), and hands actions to the VMM thread one at a time:
//!
//! 1. the API thread sends the action on its `Sender<VmmAction>` and writes 1 to the VMM's
//!    `EventFd`, so the VMM's epoll loop wakes up;
//! 2. the VMM reads the eventfd, drains the channel with `try_recv`, performs each action and
//!    sends exactly one [`ApiResponse`] per action, in order, on its `Sender<ApiResponse>`;
//! 3. the API thread blocks on that response and writes it back to the client.

pub mod http;
pub mod metrics;
pub mod models;
pub mod parse;
pub mod server;

use crate::config::{
    BootSourceConfig, CpuConfig, DriveConfig, EntropyConfig, LoggerConfig, MachineConfig,
    MachineConfigUpdate, MetricsConfig, NetworkInterfaceConfig,
};
pub use models::SerialConfig;
pub use server::ApiServer;

/// A request the VMM has to perform and answer.
#[derive(Clone, Debug, PartialEq)]
pub enum VmmAction {
    /// `GET /`: answer `{"id", "state", "vmm_version", "app_name"}`.
    GetInstanceInfo,
    /// `GET /version`: answer `{"firecracker_version": "..."}`.
    GetVersion,
    /// `GET /vm/config`: the whole configuration, keys as in the config file.
    GetVmConfig,
    GetMachineConfig,
    GetBalloon,
    GetBalloonStats,
    GetMmds,
    /// Fields left out of the body are already back at their defaults.
    PutMachineConfig(MachineConfig),
    /// Never empty: an empty PATCH is refused here.
    PatchMachineConfig(MachineConfigUpdate),
    PutCpuConfig(CpuConfig),
    /// Only parsed: the VMM still has to `validate()` it (files, command line).
    PutBootSource(BootSourceConfig),
    PutLogger(LoggerConfig),
    PutMetrics(MetricsConfig),
    PutSerial(SerialConfig),
    /// Only parsed: the VMM still has to validate it (the file, the root device).
    PutDrive(DriveConfig),
    PutEntropy(EntropyConfig),
    PutVsock(crate::config::VsockConfig),
    /// Only parsed: the VMM still has to validate it (the TAP, the MAC, rate limiters).
    PutNetworkInterface(NetworkInterfaceConfig),
    /// `PATCH /drives/{id}`: after start, swap the backing file and/or update the rate limiter.
    PatchDrive(models::DriveUpdateBody),
    /// `PATCH /network-interfaces/{id}`: after start, update the rate limiters.
    PatchNetworkInterface(models::NetworkInterfaceUpdateBody),
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
    Pause,
    Resume,
    /// A recognised endpoint whose feature ember does not implement yet; the body has already
    /// been checked. The VMM answers 400 "<feature> is not supported by ember yet.", never 204.
    NotSupported(&'static str),
}

/// The VMM's answer to one [`VmmAction`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiResponse {
    /// 204.
    NoContent,
    /// 200 with this JSON body.
    Ok(String),
    /// This status (400, or 413 for the metadata store) with `{"fault_message": <message>}`.
    Error(u16, String),
}

impl ApiResponse {
    pub fn bad_request(message: impl Into<String>) -> ApiResponse {
        ApiResponse::Error(400, message.into())
    }

    /// A 200 answer with `value` serialised as its body.
    pub fn json<T: serde::Serialize + ?Sized>(value: &T) -> ApiResponse {
        match serde_json::to_string(value) {
            Ok(s) => ApiResponse::Ok(s),
            Err(e) => ApiResponse::Error(500, format!("Cannot serialise the answer: {e}")),
        }
    }

    /// The answer to [`VmmAction::NotSupported`].
    pub fn not_supported(feature: &str) -> ApiResponse {
        ApiResponse::bad_request(format!("{feature} is not supported by ember yet."))
    }

    pub fn is_success(&self) -> bool {
        matches!(self, ApiResponse::NoContent | ApiResponse::Ok(_))
    }
}
