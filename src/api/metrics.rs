//! Per-endpoint request counters, in Firecracker's `get_api_requests`, `put_api_requests` and
//! `patch_api_requests` groups. A request counts once it reaches a known endpoint; it fails when
//! its answer is not a success, whether the API thread or the VMM refused it.

use serde::ser::{Serialize, SerializeStruct, Serializer};

use crate::metrics::IncMetric;

/// Declares a struct of counters serialised field by field, in declaration order.
macro_rules! counters {
    ($name:ident { $($field:ident),* $(,)? }) => {
        pub struct $name { $(pub $field: IncMetric),* }
        impl $name {
            pub const fn new() -> Self { $name { $($field: IncMetric::new()),* } }
        }
        impl Default for $name {
            fn default() -> Self { Self::new() }
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

counters!(GetApiRequests {
    instance_info_count,
    machine_cfg_count,
    mmds_count,
    vmm_version_count,
    vm_config_count,
});

counters!(PutApiRequests {
    actions_count,
    actions_fails,
    boot_source_count,
    boot_source_fails,
    cpu_cfg_count,
    cpu_cfg_fails,
    drive_count,
    drive_fails,
    logger_count,
    logger_fails,
    machine_cfg_count,
    machine_cfg_fails,
    metrics_count,
    metrics_fails,
    mmds_count,
    mmds_fails,
    network_count,
    network_fails,
    serial_count,
    serial_fails,
    vsock_count,
    vsock_fails,
});

counters!(PatchApiRequests {
    drive_count,
    drive_fails,
    machine_cfg_count,
    machine_cfg_fails,
    mmds_count,
    mmds_fails,
    network_count,
    network_fails,
    vm_state_count,
    vm_state_fails,
});

pub struct ApiMetrics {
    pub get_api_requests: GetApiRequests,
    pub put_api_requests: PutApiRequests,
    pub patch_api_requests: PatchApiRequests,
}

pub static API_METRICS: ApiMetrics = ApiMetrics {
    get_api_requests: GetApiRequests::new(),
    put_api_requests: PutApiRequests::new(),
    patch_api_requests: PatchApiRequests::new(),
};

/// Adds the three request groups to a metrics line. Counters report the change since the
/// previous call, like every `IncMetric`, so call this once per flush.
pub fn serialize_into(map: &mut serde_json::Map<String, serde_json::Value>) {
    let m = &API_METRICS;
    let groups: [(&str, serde_json::Result<serde_json::Value>); 3] = [
        (
            "get_api_requests",
            serde_json::to_value(&m.get_api_requests),
        ),
        (
            "put_api_requests",
            serde_json::to_value(&m.put_api_requests),
        ),
        (
            "patch_api_requests",
            serde_json::to_value(&m.patch_api_requests),
        ),
    ];
    for (key, value) in groups {
        match value {
            Ok(v) => {
                map.insert(key.to_string(), v);
            }
            Err(e) => log::warn!("cannot serialise {key}: {e}"),
        }
    }
}

/// The endpoints that have counters, whatever the method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    InstanceInfo,
    Version,
    VmConfig,
    MachineConfig,
    CpuConfig,
    BootSource,
    Actions,
    VmState,
    Logger,
    Metrics,
    Serial,
    Drive,
    Network,
    Vsock,
    Mmds,
    /// Known endpoints without counters (balloon, entropy, snapshot).
    Other,
}

/// Which counters a request bumps: `count` on arrival, `fails` when it is refused.
#[derive(Clone, Copy)]
pub struct RequestCounters {
    count: Option<&'static IncMetric>,
    fails: Option<&'static IncMetric>,
}

impl RequestCounters {
    pub const NONE: RequestCounters = RequestCounters {
        count: None,
        fails: None,
    };

    pub fn lookup(method: &str, endpoint: Endpoint) -> RequestCounters {
        let (g, p, pa) = (
            &API_METRICS.get_api_requests,
            &API_METRICS.put_api_requests,
            &API_METRICS.patch_api_requests,
        );
        let (count, fails): (&'static IncMetric, Option<&'static IncMetric>) =
            match (method, endpoint) {
                ("GET", Endpoint::InstanceInfo) => (&g.instance_info_count, None),
                ("GET", Endpoint::Version) => (&g.vmm_version_count, None),
                ("GET", Endpoint::VmConfig) => (&g.vm_config_count, None),
                ("GET", Endpoint::MachineConfig) => (&g.machine_cfg_count, None),
                ("GET", Endpoint::Mmds) => (&g.mmds_count, None),
                ("PUT", Endpoint::Actions) => (&p.actions_count, Some(&p.actions_fails)),
                ("PUT", Endpoint::BootSource) => (&p.boot_source_count, Some(&p.boot_source_fails)),
                ("PUT", Endpoint::CpuConfig) => (&p.cpu_cfg_count, Some(&p.cpu_cfg_fails)),
                ("PUT", Endpoint::Drive) => (&p.drive_count, Some(&p.drive_fails)),
                ("PUT", Endpoint::Logger) => (&p.logger_count, Some(&p.logger_fails)),
                ("PUT", Endpoint::MachineConfig) => {
                    (&p.machine_cfg_count, Some(&p.machine_cfg_fails))
                }
                ("PUT", Endpoint::Metrics) => (&p.metrics_count, Some(&p.metrics_fails)),
                ("PUT", Endpoint::Mmds) => (&p.mmds_count, Some(&p.mmds_fails)),
                ("PUT", Endpoint::Network) => (&p.network_count, Some(&p.network_fails)),
                ("PUT", Endpoint::Serial) => (&p.serial_count, Some(&p.serial_fails)),
                ("PUT", Endpoint::Vsock) => (&p.vsock_count, Some(&p.vsock_fails)),
                ("PATCH", Endpoint::Drive) => (&pa.drive_count, Some(&pa.drive_fails)),
                ("PATCH", Endpoint::MachineConfig) => {
                    (&pa.machine_cfg_count, Some(&pa.machine_cfg_fails))
                }
                ("PATCH", Endpoint::Mmds) => (&pa.mmds_count, Some(&pa.mmds_fails)),
                ("PATCH", Endpoint::Network) => (&pa.network_count, Some(&pa.network_fails)),
                ("PATCH", Endpoint::VmState) => (&pa.vm_state_count, Some(&pa.vm_state_fails)),
                _ => return RequestCounters::NONE,
            };
        RequestCounters {
            count: Some(count),
            fails,
        }
    }

    /// Records one request and whether it succeeded.
    pub fn record(&self, success: bool) {
        if let Some(c) = self.count {
            c.inc();
        }
        if !success {
            if let Some(f) = self.fails {
                f.inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_serialise_with_firecracker_keys() {
        RequestCounters::lookup("PUT", Endpoint::Logger).record(false);
        RequestCounters::lookup("POST", Endpoint::Logger).record(false);
        let mut map = serde_json::Map::new();
        serialize_into(&mut map);
        let put = &map["put_api_requests"];
        assert!(put["logger_count"].as_u64().unwrap_or(0) >= 1);
        assert!(put["logger_fails"].as_u64().unwrap_or(0) >= 1);
        assert!(map["get_api_requests"]["instance_info_count"].is_u64());
        assert!(map["patch_api_requests"]["machine_cfg_fails"].is_u64());
    }
}
