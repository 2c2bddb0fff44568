//! Routing: (method, path, body) to a [`VmmAction`], or the 400 Firecracker would answer.
//!
//! The rules follow Firecracker's router: a GET with a body and a PUT or PATCH without one are
//! refused whatever the path; an unknown route names the method and the first path segment
//! (`Invalid request method and/or path: PUT vm.`); bodies are deserialised strictly.

use serde::de::DeserializeOwned;

use super::metrics::{Endpoint, RequestCounters};
use super::models::{
    ActionBody, ActionType, BalloonBody, BalloonStatsUpdateBody, BalloonUpdateBody,
    DriveUpdateBody, MmdsConfigBody, NetworkInterfaceUpdateBody, SerialConfig, SnapshotCreateBody,
    SnapshotLoadBody, VmState, VmStateConfig,
};
use super::{ApiResponse, VmmAction};
use crate::config::{
    BootSourceConfig, CpuConfig, DriveConfig, EntropyConfig, LoggerConfig, MachineConfig,
    MachineConfigUpdate, MetricsConfig, NetworkInterfaceConfig,
};

/// The outcome of routing one request.
pub struct Routed {
    /// The counters the request bumps once its answer is known.
    pub counters: RequestCounters,
    pub outcome: Result<VmmAction, ApiResponse>,
}

type Outcome = Result<VmmAction, ApiResponse>;

fn bad(message: impl Into<String>) -> ApiResponse {
    ApiResponse::bad_request(message)
}

fn invalid_path(method: &str, shown: &str) -> ApiResponse {
    bad(format!(
        "Invalid request method and/or path: {method} {shown}."
    ))
}

fn de<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiResponse> {
    serde_json::from_slice(body).map_err(|e| {
        bad(format!(
            "An error occurred when deserializing the json body of a request: {e}."
        ))
    })
}

/// Resource ids in paths: non-empty, letters or digits and `_`. Letters and digits of any
/// script, as in Firecracker (`char::is_alphanumeric`).
fn checked_id(id: Option<&str>) -> Result<&str, ApiResponse> {
    match id {
        None | Some("") => Err(bad("The ID cannot be empty.")),
        Some(id) if id.chars().all(|c| c.is_alphanumeric() || c == '_') => Ok(id),
        Some(_) => Err(bad(
            "API Resource IDs can only contain alphanumeric characters and underscores.",
        )),
    }
}

fn id_matches(path_id: &str, body_id: &str) -> Result<(), ApiResponse> {
    if path_id == body_id {
        Ok(())
    } else {
        Err(bad(
            "The id from the path does not match the id from the body!",
        ))
    }
}

/// Some clients send the absolute form `http://host/path`; only the path matters here.
fn abs_path(target: &str) -> &str {
    for scheme in ["http://", "https://"] {
        if let Some(rest) = target.strip_prefix(scheme) {
            return rest.find('/').map_or("/", |i| &rest[i..]);
        }
    }
    target
}

fn endpoint(first: &str, rest: &[&str]) -> Endpoint {
    match first {
        "" => Endpoint::InstanceInfo,
        "version" => Endpoint::Version,
        "vm" if rest == ["config"] => Endpoint::VmConfig,
        "vm" => Endpoint::VmState,
        "machine-config" => Endpoint::MachineConfig,
        "cpu-config" => Endpoint::CpuConfig,
        "boot-source" => Endpoint::BootSource,
        "actions" => Endpoint::Actions,
        "logger" => Endpoint::Logger,
        "metrics" => Endpoint::Metrics,
        "serial" => Endpoint::Serial,
        "drives" => Endpoint::Drive,
        "network-interfaces" => Endpoint::Network,
        "vsock" => Endpoint::Vsock,
        "mmds" => Endpoint::Mmds,
        _ => Endpoint::Other,
    }
}

/// Routes one request. `body` is `None` when the request had no (or an empty) body.
pub fn route(method: &str, target: &str, body: Option<&[u8]>) -> Routed {
    let path = abs_path(target);
    // As Firecracker: leading slashes are ignored, a trailing one too.
    let tokens: Vec<&str> = path.trim_start_matches('/').split_terminator('/').collect();
    let (first, rest) = match tokens.split_first() {
        Some((first, rest)) => (*first, rest),
        None => ("", &[][..]),
    };
    let counters = RequestCounters::lookup(method, endpoint(first, rest));
    let outcome = match (method, body) {
        ("GET", Some(_)) => Err(bad("GET request cannot have a body.")),
        ("GET", None) => route_get(path, first, rest),
        ("PUT", None) => Err(bad("Empty PUT request.")),
        ("PUT", Some(body)) => route_put(path, first, rest, body),
        ("PATCH", None) => Err(bad("Empty PATCH request.")),
        ("PATCH", Some(body)) => route_patch(path, first, rest, body),
        (other, _) => Err(invalid_path(other, first)),
    };
    Routed { counters, outcome }
}

/// For endpoints without sub-paths: anything after the first segment is an unknown path.
fn exact(method: &str, path: &str, rest: &[&str], action: impl FnOnce() -> Outcome) -> Outcome {
    if rest.is_empty() {
        action()
    } else {
        Err(invalid_path(method, path))
    }
}

fn route_get(path: &str, first: &str, rest: &[&str]) -> Outcome {
    let m = "GET";
    match first {
        "" => exact(m, path, rest, || Ok(VmmAction::GetInstanceInfo)),
        "version" => exact(m, path, rest, || Ok(VmmAction::GetVersion)),
        "vm" if rest == ["config"] => Ok(VmmAction::GetVmConfig),
        "machine-config" => exact(m, path, rest, || Ok(VmmAction::GetMachineConfig)),
        "mmds" => exact(m, path, rest, || Ok(VmmAction::GetMmds)),
        "balloon" => match rest {
            [] => Ok(VmmAction::GetBalloon),
            ["statistics"] => Ok(VmmAction::GetBalloonStats),
            [other] => Err(bad(format!("Unrecognized GET request path `{other}`."))),
            _ => Err(invalid_path(m, path)),
        },
        _ => Err(invalid_path(m, first)),
    }
}

fn route_put(path: &str, first: &str, rest: &[&str], body: &[u8]) -> Outcome {
    let m = "PUT";
    match first {
        "actions" => exact(m, path, rest, || {
            Ok(match de::<ActionBody>(body)?.action_type {
                ActionType::InstanceStart => VmmAction::InstanceStart,
                ActionType::SendCtrlAltDel => VmmAction::SendCtrlAltDel,
                ActionType::FlushMetrics => VmmAction::FlushMetrics,
            })
        }),
        "boot-source" => exact(m, path, rest, || {
            Ok(VmmAction::PutBootSource(de::<BootSourceConfig>(body)?))
        }),
        "cpu-config" => exact(m, path, rest, || {
            Ok(VmmAction::PutCpuConfig(de::<CpuConfig>(body)?))
        }),
        "machine-config" => exact(m, path, rest, || {
            Ok(VmmAction::PutMachineConfig(de::<MachineConfig>(body)?))
        }),
        "logger" => exact(m, path, rest, || {
            Ok(VmmAction::PutLogger(de::<LoggerConfig>(body)?))
        }),
        "metrics" => exact(m, path, rest, || {
            Ok(VmmAction::PutMetrics(de::<MetricsConfig>(body)?))
        }),
        "serial" => exact(m, path, rest, || {
            Ok(VmmAction::PutSerial(de::<SerialConfig>(body)?))
        }),
        "drives" => with_id(m, path, rest, |id| {
            let d = de::<DriveConfig>(body)?;
            id_matches(id, &d.drive_id)?;
            Ok(VmmAction::PutDrive(d))
        }),
        "network-interfaces" => with_id(m, path, rest, |id| {
            let n = de::<NetworkInterfaceConfig>(body)?;
            id_matches(id, &n.iface_id)?;
            Ok(VmmAction::PutNetworkInterface(n))
        }),
        "vsock" => exact(m, path, rest, || {
            Ok(VmmAction::PutVsock(de::<crate::config::VsockConfig>(body)?))
        }),
        "entropy" => exact(m, path, rest, || {
            Ok(VmmAction::PutEntropy(de::<EntropyConfig>(body)?))
        }),
        "balloon" => exact(m, path, rest, || {
            de::<BalloonBody>(body)?;
            Ok(VmmAction::NotSupported("balloon"))
        }),
        "mmds" => match rest {
            [] => {
                de::<serde_json::Value>(body)?;
                Ok(VmmAction::NotSupported("mmds"))
            }
            ["config"] => {
                de::<MmdsConfigBody>(body)?;
                Ok(VmmAction::NotSupported("mmds-config"))
            }
            [other] => Err(bad(format!("Unrecognized PUT request path `{other}`."))),
            _ => Err(invalid_path(m, path)),
        },
        "snapshot" => match rest {
            [] => Err(bad("Missing snapshot operation type.")),
            ["create"] => {
                de::<SnapshotCreateBody>(body)?;
                Ok(VmmAction::NotSupported("snapshot"))
            }
            ["load"] => {
                let load = de::<SnapshotLoadBody>(body)?;
                load.check_memory_source().map_err(|why| {
                    bad(format!(
                        "An error occurred when deserializing the json body of a request: {why}."
                    ))
                })?;
                Ok(VmmAction::NotSupported("snapshot"))
            }
            _ => Err(invalid_path(m, path)),
        },
        _ => Err(invalid_path(m, first)),
    }
}

fn route_patch(path: &str, first: &str, rest: &[&str], body: &[u8]) -> Outcome {
    let m = "PATCH";
    match first {
        "machine-config" => exact(m, path, rest, || {
            let update = de::<MachineConfigUpdate>(body)?;
            if update == MachineConfigUpdate::default() {
                return Err(bad("Empty PATCH request."));
            }
            Ok(VmmAction::PatchMachineConfig(update))
        }),
        "vm" => exact(m, path, rest, || {
            Ok(match de::<VmStateConfig>(body)?.state {
                VmState::Paused => VmmAction::Pause,
                VmState::Resumed => VmmAction::Resume,
            })
        }),
        "drives" => with_id(m, path, rest, |id| {
            let d = de::<DriveUpdateBody>(body)?;
            id_matches(id, &d.drive_id)?;
            Ok(VmmAction::PatchDrive(d))
        }),
        "network-interfaces" => with_id(m, path, rest, |id| {
            let n = de::<NetworkInterfaceUpdateBody>(body)?;
            id_matches(id, &n.iface_id)?;
            Ok(VmmAction::PatchNetworkInterface(n))
        }),
        "balloon" => match rest {
            [] => {
                de::<BalloonUpdateBody>(body)?;
                Ok(VmmAction::NotSupported("balloon"))
            }
            ["statistics"] => {
                de::<BalloonStatsUpdateBody>(body)?;
                Ok(VmmAction::NotSupported("balloon"))
            }
            [other] => Err(bad(format!("Unrecognized PATCH request path `{other}`."))),
            _ => Err(invalid_path(m, path)),
        },
        "mmds" => exact(m, path, rest, || {
            de::<serde_json::Value>(body)?;
            Ok(VmmAction::NotSupported("mmds"))
        }),
        _ => Err(invalid_path(m, first)),
    }
}

/// `/<resource>/{id}`: the id is checked before the body, as Firecracker does.
fn with_id(
    method: &str,
    path: &str,
    rest: &[&str],
    action: impl FnOnce(&str) -> Outcome,
) -> Outcome {
    match rest {
        [] => Err(bad("The ID cannot be empty.")),
        [id] => action(checked_id(Some(id))?),
        _ => Err(invalid_path(method, path)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::models::TokenBucket;
    use crate::config::machine::{HugePages, StaticCpuTemplate};

    fn ok(method: &str, path: &str, body: Option<&str>) -> VmmAction {
        match route(method, path, body.map(str::as_bytes)).outcome {
            Ok(a) => a,
            Err(e) => panic!("{method} {path}: {e:?}"),
        }
    }

    fn err(method: &str, path: &str, body: Option<&str>) -> String {
        match route(method, path, body.map(str::as_bytes)).outcome {
            Ok(a) => panic!("{method} {path}: expected an error, got {a:?}"),
            Err(ApiResponse::Error(400, m)) => m,
            Err(other) => panic!("{method} {path}: expected a 400, got {other:?}"),
        }
    }

    const DESER: &str = "An error occurred when deserializing the json body of a request: ";

    #[test]
    fn gets() {
        assert_eq!(ok("GET", "/", None), VmmAction::GetInstanceInfo);
        assert_eq!(ok("GET", "/version", None), VmmAction::GetVersion);
        assert_eq!(ok("GET", "/vm/config", None), VmmAction::GetVmConfig);
        assert_eq!(
            ok("GET", "/machine-config", None),
            VmmAction::GetMachineConfig
        );
        assert_eq!(
            ok("GET", "/machine-config/", None),
            VmmAction::GetMachineConfig
        );
        assert_eq!(ok("GET", "/balloon", None), VmmAction::GetBalloon);
        assert_eq!(
            ok("GET", "/balloon/statistics", None),
            VmmAction::GetBalloonStats
        );
        assert_eq!(ok("GET", "/mmds", None), VmmAction::GetMmds);
        assert_eq!(
            ok("GET", "http://localhost/version", None),
            VmmAction::GetVersion
        );
        assert_eq!(
            err("GET", "/vm", None),
            "Invalid request method and/or path: GET vm."
        );
        assert_eq!(
            err("GET", "/balloon/foo", None),
            "Unrecognized GET request path `foo`."
        );
        assert_eq!(
            err("GET", "/version/extra", None),
            "Invalid request method and/or path: GET /version/extra."
        );
        assert_eq!(
            err("GET", "/machine-config", Some("{}")),
            "GET request cannot have a body."
        );
    }

    #[test]
    fn unknown_paths_and_methods() {
        assert_eq!(
            err("GET", "/nope", None),
            "Invalid request method and/or path: GET nope."
        );
        assert_eq!(
            err("PUT", "/vm", Some("{}")),
            "Invalid request method and/or path: PUT vm."
        );
        assert_eq!(
            err("PUT", "/version", Some("{}")),
            "Invalid request method and/or path: PUT version."
        );
        assert_eq!(
            err("DELETE", "/drives/a", None),
            "Invalid request method and/or path: DELETE drives."
        );
        assert_eq!(
            err("POST", "/actions", Some("{}")),
            "Invalid request method and/or path: POST actions."
        );
        // Methods are case-sensitive.
        assert_eq!(
            err("get", "/", None),
            "Invalid request method and/or path: get ."
        );
    }

    #[test]
    fn empty_bodies() {
        assert_eq!(err("PUT", "/machine-config", None), "Empty PUT request.");
        assert_eq!(err("PUT", "/nope", None), "Empty PUT request.");
        assert_eq!(err("PATCH", "/vm", None), "Empty PATCH request.");
        assert_eq!(
            err("PATCH", "/machine-config", Some("{}")),
            "Empty PATCH request."
        );
    }

    #[test]
    fn machine_config() {
        let a = ok(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 2, "mem_size_mib": 256}"#),
        );
        assert_eq!(
            a,
            VmmAction::PutMachineConfig(MachineConfig {
                vcpu_count: 2,
                mem_size_mib: 256,
                ..MachineConfig::default()
            })
        );
        let a = ok(
            "PUT",
            "/machine-config",
            Some(
                r#"{"vcpu_count": 2, "mem_size_mib": 256, "smt": true, "cpu_template": "T2",
                    "track_dirty_pages": true, "huge_pages": "2M"}"#,
            ),
        );
        let VmmAction::PutMachineConfig(m) = a else {
            panic!("{a:?}")
        };
        assert!(m.smt && m.track_dirty_pages);
        assert_eq!(m.cpu_template, StaticCpuTemplate::T2);
        assert_eq!(m.huge_pages, HugePages::Hugetlbfs2M);

        let e = err("PUT", "/machine-config", Some(r#"{"vcpu_count": 2}"#));
        assert!(
            e.starts_with(DESER) && e.contains("missing field `mem_size_mib`"),
            "{e}"
        );
        let e = err(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 2, "mem_size_mib": 256, "bogus": 1}"#),
        );
        assert!(
            e.starts_with(DESER) && e.contains("unknown field `bogus`"),
            "{e}"
        );
        let e = err(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": "2", "mem_size_mib": 256}"#),
        );
        assert!(e.contains("invalid type"), "{e}");
        let e = err("PUT", "/machine-config", Some("{"));
        assert!(e.starts_with(DESER) && e.ends_with('.'), "{e}");

        assert_eq!(
            ok("PATCH", "/machine-config", Some(r#"{"mem_size_mib": 512}"#)),
            VmmAction::PatchMachineConfig(MachineConfigUpdate {
                mem_size_mib: Some(512),
                ..Default::default()
            })
        );
        let e = err("PATCH", "/machine-config", Some(r#"{"vcpus": 1}"#));
        assert!(e.contains("unknown field `vcpus`"), "{e}");
    }

    #[test]
    fn actions_and_vm_state() {
        for (t, a) in [
            ("InstanceStart", VmmAction::InstanceStart),
            ("SendCtrlAltDel", VmmAction::SendCtrlAltDel),
            ("FlushMetrics", VmmAction::FlushMetrics),
        ] {
            let body = format!(r#"{{"action_type": "{t}"}}"#);
            assert_eq!(ok("PUT", "/actions", Some(&body)), a);
        }
        let e = err("PUT", "/actions", Some(r#"{"action_type": "Reboot"}"#));
        assert!(e.contains("unknown variant `Reboot`"), "{e}");
        let e = err("PUT", "/actions", Some("{}"));
        assert!(e.contains("missing field `action_type`"), "{e}");
        let e = err(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart", "x": 1}"#),
        );
        assert!(e.contains("unknown field `x`"), "{e}");

        assert_eq!(
            ok("PATCH", "/vm", Some(r#"{"state": "Paused"}"#)),
            VmmAction::Pause
        );
        assert_eq!(
            ok("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)),
            VmmAction::Resume
        );
        let e = err("PATCH", "/vm", Some(r#"{"state": 1}"#));
        assert!(e.starts_with(DESER), "{e}");
        let e = err("PATCH", "/vm", Some(r#"{"state": "Paused", "now": true}"#));
        assert!(e.contains("unknown field `now`"), "{e}");
    }

    #[test]
    fn boot_source_logger_metrics_cpu_serial() {
        assert_eq!(
            ok(
                "PUT",
                "/boot-source",
                Some(r#"{"kernel_image_path": "/k", "boot_args": "console=ttyS0"}"#)
            ),
            VmmAction::PutBootSource(BootSourceConfig {
                kernel_image_path: "/k".into(),
                initrd_path: None,
                boot_args: Some("console=ttyS0".into()),
            })
        );
        let e = err("PUT", "/boot-source", Some(r#"{"boot_args": "x"}"#));
        assert!(e.contains("missing field `kernel_image_path`"), "{e}");
        let e = err(
            "PUT",
            "/boot-source",
            Some(r#"{"kernel_image_path": "/k", "kernel": 1}"#),
        );
        assert!(e.contains("unknown field `kernel`"), "{e}");

        let a = ok(
            "PUT",
            "/logger",
            Some(r#"{"log_path": "/l", "level": "debug", "show_level": true}"#),
        );
        let VmmAction::PutLogger(l) = a else {
            panic!("{a:?}")
        };
        assert_eq!(l.log_path.as_deref(), Some("/l"));
        let e = err("PUT", "/logger", Some(r#"{"level": "loud"}"#));
        assert!(e.contains("unknown log level"), "{e}");
        let e = err("PUT", "/logger", Some(r#"{"show_level": "yes"}"#));
        assert!(e.contains("invalid type"), "{e}");

        assert_eq!(
            ok("PUT", "/metrics", Some(r#"{"metrics_path": "/m"}"#)),
            VmmAction::PutMetrics(MetricsConfig {
                metrics_path: "/m".into()
            })
        );
        let e = err("PUT", "/metrics", Some("{}"));
        assert!(e.contains("missing field `metrics_path`"), "{e}");

        let a = ok(
            "PUT",
            "/cpu-config",
            Some(
                r#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
                    "modifiers": [{"register": "ecx", "bitmap": "0bx0"}]}]}"#,
            ),
        );
        let VmmAction::PutCpuConfig(c) = a else {
            panic!("{a:?}")
        };
        assert_eq!(c.cpuid_modifiers.len(), 1);
        let e = err("PUT", "/cpu-config", Some(r#"{"reg_modifiers": []}"#));
        assert!(e.contains("unknown field `reg_modifiers`"), "{e}");

        assert_eq!(
            ok(
                "PUT",
                "/serial",
                Some(r#"{"serial_out_path": "/s", "rate_limiter": {"size": 1, "refill_time": 2}}"#)
            ),
            VmmAction::PutSerial(SerialConfig {
                serial_out_path: Some("/s".into()),
                rate_limiter: Some(TokenBucket {
                    size: 1,
                    one_time_burst: None,
                    refill_time: 2
                }),
            })
        );
        assert_eq!(
            ok("PUT", "/serial", Some("{}")),
            VmmAction::PutSerial(SerialConfig::default())
        );
        let e = err("PUT", "/serial", Some(r#"{"rate_limiter": {"size": 1}}"#));
        assert!(e.contains("missing field `refill_time`"), "{e}");
    }

    #[test]
    fn drives_and_network_interfaces_check_ids() {
        let drive = r#"{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true,
                        "is_read_only": false, "cache_type": "Writeback", "io_engine": "Sync"}"#;
        assert_eq!(
            ok(
                "PUT",
                "/vsock",
                Some(r#"{"guest_cid": 3, "uds_path": "/v"}"#)
            ),
            VmmAction::PutVsock(crate::config::VsockConfig {
                vsock_id: None,
                guest_cid: 3,
                uds_path: "/v".into()
            })
        );
        assert_eq!(
            ok("PUT", "/entropy", Some("{}")),
            VmmAction::PutEntropy(EntropyConfig::default())
        );
        match ok("PUT", "/drives/rootfs", Some(drive)) {
            VmmAction::PutDrive(d) => {
                assert_eq!(d.drive_id, "rootfs");
                assert!(d.is_root_device);
                assert_eq!(d.cache_type, crate::config::CacheType::Writeback);
                assert_eq!(d.path_on_host.as_deref(), Some("/r"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            err("PUT", "/drives/other", Some(drive)),
            "The id from the path does not match the id from the body!"
        );
        assert_eq!(
            err("PUT", "/drives", Some(drive)),
            "The ID cannot be empty."
        );
        assert_eq!(
            err("PUT", "/drives/", Some(drive)),
            "The ID cannot be empty."
        );
        assert_eq!(
            err("PUT", "/drives/a-b", Some(drive)),
            "API Resource IDs can only contain alphanumeric characters and underscores."
        );
        // Letters of any script are alphanumeric to Firecracker too.
        match ok(
            "PUT",
            "/drives/dísk_1",
            Some(r#"{"drive_id": "dísk_1", "is_root_device": false}"#),
        ) {
            VmmAction::PutDrive(d) => assert_eq!(d.drive_id, "dísk_1"),
            other => panic!("{other:?}"),
        }
        let e = err(
            "PUT",
            "/drives/rootfs",
            Some(r#"{"drive_id": "rootfs", "path_on_host": "/r"}"#),
        );
        assert!(e.contains("missing field `is_root_device`"), "{e}");
        let e = err(
            "PUT",
            "/drives/rootfs",
            Some(r#"{"drive_id": "rootfs", "is_root_device": true, "cache_type": "Fast"}"#),
        );
        assert!(e.contains("unknown variant `Fast`"), "{e}");
        assert_eq!(
            ok(
                "PATCH",
                "/drives/d_1",
                Some(r#"{"drive_id": "d_1", "path_on_host": "/new"}"#)
            ),
            VmmAction::PatchDrive(DriveUpdateBody {
                drive_id: "d_1".into(),
                path_on_host: Some("/new".into()),
                rate_limiter: None,
            })
        );
        let e = err(
            "PATCH",
            "/drives/d_1",
            Some(r#"{"drive_id": "d_1", "is_read_only": true}"#),
        );
        assert!(e.contains("unknown field `is_read_only`"), "{e}");
        assert_eq!(
            err("PATCH", "/drives/d_2", Some(r#"{"drive_id": "d_1"}"#)),
            "The id from the path does not match the id from the body!"
        );

        let net = r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:00:00:00:01",
                      "rx_rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}"#;
        match ok("PUT", "/network-interfaces/eth0", Some(net)) {
            VmmAction::PutNetworkInterface(n) => {
                assert_eq!(n.host_dev_name, "tap0");
                assert_eq!(n.guest_mac.as_deref(), Some("06:00:00:00:00:01"));
                assert!(n.rx_rate_limiter.is_some());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            err("PUT", "/network-interfaces/eth1", Some(net)),
            "The id from the path does not match the id from the body!"
        );
        let e = err(
            "PUT",
            "/network-interfaces/eth0",
            Some(r#"{"iface_id": "eth0"}"#),
        );
        assert!(e.contains("missing field `host_dev_name`"), "{e}");
        assert_eq!(
            ok(
                "PATCH",
                "/network-interfaces/eth0",
                Some(
                    r#"{"iface_id": "eth0", "tx_rate_limiter": {"ops": {"size": 5, "refill_time": 10}}}"#
                )
            ),
            VmmAction::PatchNetworkInterface(NetworkInterfaceUpdateBody {
                iface_id: "eth0".into(),
                rx_rate_limiter: None,
                tx_rate_limiter: Some(crate::api::models::RateLimiter {
                    bandwidth: None,
                    ops: Some(TokenBucket {
                        size: 5,
                        one_time_burst: None,
                        refill_time: 10
                    }),
                }),
            })
        );
        assert_eq!(
            err(
                "PATCH",
                "/network-interfaces/eth0/x",
                Some(r#"{"iface_id": "eth0"}"#)
            ),
            "Invalid request method and/or path: PATCH /network-interfaces/eth0/x."
        );
    }

    #[test]
    fn other_unsupported_features_validate_bodies() {
        let cases: &[(&str, &str, &str, &str)] = &[
            (
                "PUT",
                "/balloon",
                r#"{"amount_mib": 1, "deflate_on_oom": true}"#,
                "balloon",
            ),
            ("PATCH", "/balloon", r#"{"amount_mib": 1}"#, "balloon"),
            (
                "PATCH",
                "/balloon/statistics",
                r#"{"stats_polling_interval_s": 1}"#,
                "balloon",
            ),
            ("PUT", "/mmds", r#"{"latest": {"a": 1}}"#, "mmds"),
            ("PATCH", "/mmds", r#"{"latest": null}"#, "mmds"),
            (
                "PUT",
                "/mmds/config",
                r#"{"network_interfaces": ["eth0"], "version": "V2"}"#,
                "mmds-config",
            ),
            (
                "PUT",
                "/snapshot/create",
                r#"{"snapshot_path": "/s", "mem_file_path": "/m", "snapshot_type": "Diff"}"#,
                "snapshot",
            ),
            (
                "PUT",
                "/snapshot/load",
                r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Uffd",
                    "backend_path": "/u"}, "resume_vm": true}"#,
                "snapshot",
            ),
        ];
        for (m, p, b, feature) in cases {
            assert_eq!(
                ok(m, p, Some(b)),
                VmmAction::NotSupported(feature),
                "{m} {p}"
            );
        }
        let bad_bodies: &[(&str, &str, &str)] = &[
            ("PUT", "/vsock", r#"{"guest_cid": 3}"#),
            ("PUT", "/entropy", r#"{"rate": 1}"#),
            ("PUT", "/balloon", r#"{"amount_mib": 1}"#),
            ("PATCH", "/balloon", r#"{"amount_mib": -1}"#),
            ("PATCH", "/balloon/statistics", r#"{}"#),
            ("PUT", "/mmds", r#"{"a": "#),
            (
                "PUT",
                "/mmds/config",
                r#"{"version": "V3", "network_interfaces": []}"#,
            ),
            ("PUT", "/snapshot/create", r#"{"snapshot_path": "/s"}"#),
            ("PUT", "/snapshot/load", r#"{"snapshot_path": "/s"}"#),
            (
                "PUT",
                "/snapshot/load",
                r#"{"snapshot_path": "/s", "mem_file_path": "/m",
                    "mem_backend": {"backend_type": "File", "backend_path": "/m"}}"#,
            ),
        ];
        for (m, p, b) in bad_bodies {
            let e = err(m, p, Some(b));
            assert!(e.starts_with(DESER), "{m} {p}: {e}");
        }
        assert_eq!(
            err("PUT", "/snapshot", Some("{}")),
            "Missing snapshot operation type."
        );
        assert_eq!(
            err("PUT", "/snapshot/delete", Some("{}")),
            "Invalid request method and/or path: PUT /snapshot/delete."
        );
        assert_eq!(
            err("PUT", "/mmds/other", Some("{}")),
            "Unrecognized PUT request path `other`."
        );
        assert_eq!(
            err("PATCH", "/balloon/other", Some("{}")),
            "Unrecognized PATCH request path `other`."
        );
    }

    #[test]
    fn counters_are_chosen_by_method_and_endpoint() {
        use crate::api::metrics::API_METRICS;
        let before = API_METRICS.put_api_requests.drive_fails.count();
        let r = route("PUT", "/drives/x", Some(b"{}"));
        r.counters.record(r.outcome.is_ok());
        assert!(API_METRICS.put_api_requests.drive_fails.count() > before);
        let before = API_METRICS.get_api_requests.vmm_version_count.count();
        let r = route("GET", "/version", None);
        r.counters.record(true);
        assert!(API_METRICS.get_api_requests.vmm_version_count.count() > before);
    }

    /// Random and mutated inputs through the HTTP parser and the router: no panic, and every
    /// outcome is an action, "need more bytes" or a 4xx.
    #[test]
    fn fuzz_parser_and_router() {
        use crate::api::http::{parse, Parse};

        struct XorShift(u64);
        impl XorShift {
            fn next(&mut self) -> u64 {
                let mut x = self.0;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                self.0 = x;
                x
            }
            fn below(&mut self, n: usize) -> usize {
                (self.next() % n.max(1) as u64) as usize
            }
        }

        let seeds: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\n\r\n",
            b"PUT /machine-config HTTP/1.1\r\nContent-Length: 35\r\n\r\n{\"vcpu_count\":2,\"mem_size_mib\":256}",
            b"PUT /drives/root HTTP/1.1\r\nContent-Length: 59\r\n\r\n{\"drive_id\":\"root\",\"is_root_device\":true,\"path_on_host\":\"\"}",
            b"PATCH /vm HTTP/1.1\r\nContent-Length: 18\r\n\r\n{\"state\":\"Paused\"}",
            b"PUT /actions HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 31\r\n\r\n{\"action_type\":\"InstanceStart\"}",
            b"PUT /snapshot/load HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 21\r\n\r\n{\"snapshot_path\":\"/\"}",
        ];
        // The seeds themselves are whole requests.
        for seed in seeds {
            assert!(
                matches!(parse(seed, 256), Parse::Complete { consumed, .. } if consumed == seed.len())
            );
        }
        let alphabet = b"GETPUTPATCH /\r\n:{}\"[],0123456789abcdefContent-Length";
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let limit = 256;
        for _ in 0..50_000 {
            let mut input: Vec<u8> = if rng.below(4) == 0 {
                let len = rng.below(300);
                (0..len)
                    .map(|_| {
                        if rng.below(2) == 0 {
                            alphabet[rng.below(alphabet.len())]
                        } else {
                            rng.next() as u8
                        }
                    })
                    .collect()
            } else {
                seeds[rng.below(seeds.len())].to_vec()
            };
            for _ in 0..rng.below(6) {
                let len = input.len();
                match rng.below(5) {
                    0 if len > 0 => input[rng.below(len)] = rng.next() as u8,
                    1 if len > 0 => {
                        input.remove(rng.below(len));
                    }
                    2 => input.insert(rng.below(len + 1), alphabet[rng.below(alphabet.len())]),
                    3 if len > 0 => input.truncate(rng.below(len)),
                    _ => {
                        let other = seeds[rng.below(seeds.len())];
                        input.extend_from_slice(&other[..rng.below(other.len() + 1)]);
                    }
                }
            }
            // Walk the buffer like a connection does, request after request.
            let mut rest = &input[..];
            loop {
                match parse(rest, limit) {
                    Parse::Incomplete { .. } => break,
                    Parse::Invalid(e) => {
                        assert!((400..500).contains(&e.status), "{e:?}");
                        break;
                    }
                    Parse::Complete { request, consumed } => {
                        assert!(consumed > 0 && consumed <= rest.len());
                        let routed = route(&request.method, &request.path, request.body.as_deref());
                        if let Err(resp) = routed.outcome {
                            match resp {
                                ApiResponse::Error(s, _) => assert!((400..500).contains(&s)),
                                other => panic!("not an error: {other:?}"),
                            }
                        }
                        rest = &rest[consumed..];
                    }
                }
            }
        }
    }
}
