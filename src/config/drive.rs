//! Block devices (`PUT /drives/{id}`, the `drives` key) and the entropy device (`PUT /entropy`,
//! the `entropy` key).

use std::fs::File;

use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::api::models::RateLimiter;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// FLUSH is not offered and is a no-op.
    #[default]
    Unsafe,
    /// FLUSH is offered and is an fsync.
    Writeback,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    #[default]
    Sync,
    Async,
}

/// The body of `PUT /drives/{id}`, and one entry of the config file's `drives`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    pub drive_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    pub is_root_device: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    #[serde(default)]
    pub is_read_only: Option<bool>,
    #[serde(default)]
    pub cache_type: CacheType,
    #[serde(default)]
    pub io_engine: IoEngine,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

impl DriveConfig {
    pub fn read_only(&self) -> bool {
        self.is_read_only.unwrap_or(false)
    }

    /// Opens the backing file as the device will use it: read-only for a read-only drive.
    pub fn open(&self) -> Result<File, ConfigError> {
        let Some(path) = &self.path_on_host else {
            return Err(ConfigError::Section {
                section: format!("drive {}", self.drive_id),
                reason: "path_on_host is required".into(),
            });
        };
        super::open_host_file(
            "drive",
            path,
            super::HostFile::Disk {
                write: !self.read_only(),
            },
        )
    }

    /// Refuses what ember does not implement, and opens the file: a typo fails the request
    /// rather than the start, and the file opened now is the one the drive gets.
    pub fn validate_and_open(&self) -> Result<File, ConfigError> {
        if self.socket.is_some() {
            return Err(ConfigError::Unsupported("A vhost-user drive (socket)"));
        }
        self.open()
    }
}

/// The body of `PUT /entropy`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

impl EntropyConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}

/// Adds `drive` to `drives`: the same id replaces the earlier entry in place; a second root
/// device is refused. Returns the drive's file, opened.
pub fn insert_drive(
    drives: &mut Vec<DriveConfig>,
    drive: DriveConfig,
) -> Result<File, ConfigError> {
    let file = drive.validate_and_open()?;
    if drive.is_root_device
        && drives
            .iter()
            .any(|d| d.is_root_device && d.drive_id != drive.drive_id)
    {
        return Err(ConfigError::Section {
            section: format!("drive {}", drive.drive_id),
            reason: "A root block device already exists!".into(),
        });
    }
    match drives.iter_mut().find(|d| d.drive_id == drive.drive_id) {
        Some(d) => *d = drive,
        None => drives.push(drive),
    }
    Ok(file)
}

/// The drives in attach order: the root device first, then the others as configured.
pub fn attach_order(drives: &[DriveConfig]) -> Vec<&DriveConfig> {
    drives
        .iter()
        .filter(|d| d.is_root_device)
        .chain(drives.iter().filter(|d| !d.is_root_device))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drive(id: &str, root: bool, path: &str) -> DriveConfig {
        serde_json::from_value(serde_json::json!({
            "drive_id": id, "is_root_device": root, "path_on_host": path
        }))
        .unwrap()
    }

    #[test]
    fn defaults_replace_and_root_rules() {
        let d = drive("a", false, "/proc/self/exe");
        assert_eq!(d.cache_type, CacheType::Unsafe);
        assert_eq!(d.io_engine, IoEngine::Sync);
        let mut drives = Vec::new();
        // Opened read-write: use a temporary file.
        let p = std::env::temp_dir().join(format!("ember-drive-cfg-{}", std::process::id()));
        std::fs::write(&p, [0u8; 1024]).unwrap();
        let path = p.to_str().unwrap();
        insert_drive(&mut drives, drive("data", false, path)).unwrap();
        insert_drive(&mut drives, drive("root", true, path)).unwrap();
        let e = insert_drive(&mut drives, drive("other", true, path)).unwrap_err();
        assert!(e.to_string().contains("root"), "{e}");
        // Same id replaces.
        insert_drive(&mut drives, drive("root", true, path)).unwrap();
        assert_eq!(drives.len(), 2);
        let order: Vec<_> = attach_order(&drives)
            .iter()
            .map(|d| d.drive_id.clone())
            .collect();
        assert_eq!(order, ["root", "data"]);
        let e = insert_drive(&mut drives, drive("x", false, "/nonexistent/disk")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/disk"), "{e}");
        let mut a = drive("y", false, path);
        a.io_engine = IoEngine::Async;
        a.validate_and_open().unwrap();
        std::fs::remove_file(p).unwrap();
    }
}
