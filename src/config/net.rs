//! Network interfaces (`PUT /network-interfaces/{id}`, the `network-interfaces` key).

use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::api::models::RateLimiter;
use crate::devices::virtio::net::parse_mac;
use crate::devices::virtio::tap::Tap;

/// The body of `PUT /network-interfaces/{id}`, and one entry of the config file's
/// `network-interfaces`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceConfig {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

impl NetworkInterfaceConfig {
    fn section(&self, reason: impl Into<String>) -> ConfigError {
        ConfigError::Section {
            section: format!("network interface {}", self.iface_id),
            reason: reason.into(),
        }
    }

    /// The MAC address, parsed.
    pub fn mac(&self) -> Result<Option<[u8; 6]>, ConfigError> {
        match &self.guest_mac {
            None => Ok(None),
            Some(s) => parse_mac(s)
                .map(Some)
                .ok_or_else(|| self.section(format!("invalid guest_mac {s:?}"))),
        }
    }

    /// Opens the TAP device as the device will use it.
    pub fn open(&self) -> Result<Tap, ConfigError> {
        Tap::open(&self.host_dev_name).map_err(|e| ConfigError::File {
            what: "TAP device",
            path: self.host_dev_name.clone(),
            reason: e.to_string(),
        })
    }

    /// Refuses what ember does not implement, and opens the TAP so that a typo fails the
    /// request rather than the start.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.mac()?;
        if let Some(m) = self.mtu {
            if m < 68 {
                return Err(self.section(format!("invalid mtu {m} (at least 68)")));
            }
        }
        self.open().map(drop)
    }
}

/// Adds or replaces (same id) an interface; refuses a TAP or MAC another one uses.
pub fn insert_iface(
    list: &mut Vec<NetworkInterfaceConfig>,
    n: NetworkInterfaceConfig,
) -> Result<(), ConfigError> {
    for o in list.iter().filter(|o| o.iface_id != n.iface_id) {
        if o.host_dev_name == n.host_dev_name {
            return Err(n.section(format!(
                "the TAP device {} is already used by {}",
                n.host_dev_name, o.iface_id
            )));
        }
        if n.guest_mac.is_some() && o.mac()? == n.mac()? {
            return Err(n.section(format!(
                "the guest MAC address is already used by {}",
                o.iface_id
            )));
        }
    }
    match list.iter_mut().find(|o| o.iface_id == n.iface_id) {
        Some(o) => *o = n,
        None => list.push(n),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(id: &str, tap: &str, mac: Option<&str>) -> NetworkInterfaceConfig {
        NetworkInterfaceConfig {
            iface_id: id.into(),
            host_dev_name: tap.into(),
            guest_mac: mac.map(String::from),
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        }
    }

    #[test]
    fn validation_and_insertion() {
        let mut n = iface("eth0", "tap0", Some("zz"));
        assert!(n.validate().unwrap_err().to_string().contains("guest_mac"));
        n.guest_mac = None;
        let mut e = iface("eth0", "ember-nonexistent-name-too-long", None);
        // Rate limiters are accepted: the TAP is what fails.
        e.rx_rate_limiter =
            Some(serde_json::from_str(r#"{"bandwidth":{"size":1,"refill_time":1}}"#).unwrap());
        let e = e.validate().unwrap_err().to_string();
        assert!(e.contains("TAP device"), "{e}");

        let mut list = Vec::new();
        insert_iface(&mut list, iface("a", "tap0", Some("06:00:00:00:00:01"))).unwrap();
        insert_iface(&mut list, iface("b", "tap1", Some("06:00:00:00:00:02"))).unwrap();
        assert!(insert_iface(&mut list, iface("c", "tap0", None)).is_err());
        assert!(insert_iface(&mut list, iface("c", "tap2", Some("06:00:00:00:00:01"))).is_err());
        insert_iface(&mut list, iface("a", "tap3", None)).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].host_dev_name, "tap3");
    }
}
