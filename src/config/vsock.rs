//! The vsock device (`PUT /vsock`, the `vsock` key).

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// The body of `PUT /vsock`, and the config file's `vsock`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    pub guest_cid: u32,
    pub uds_path: String,
}

impl VsockConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |reason: String| ConfigError::Section {
            section: "vsock".into(),
            reason,
        };
        if self.guest_cid < 3 {
            return Err(err(format!(
                "invalid guest_cid {} (it must be at least 3)",
                self.guest_cid
            )));
        }
        if self.uds_path.is_empty() {
            return Err(err("uds_path is empty".into()));
        }
        // sun_path holds 108 bytes with the NUL; `<uds_path>_<port>` must fit too.
        if self.uds_path.len() + 11 > 107 {
            return Err(err(format!("uds_path {:?} is too long", self.uds_path)));
        }
        // ember binds its socket there at the start, replacing only a stale socket: any other
        // file is refused now (a live socket is refused when the start binds).
        if let Ok(m) = std::fs::symlink_metadata(&self.uds_path) {
            if !std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) {
                return Err(err(format!(
                    "uds_path {:?} exists and is not a socket",
                    self.uds_path
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        let mut c = VsockConfig {
            vsock_id: None,
            guest_cid: 3,
            uds_path: "/tmp/v.sock".into(),
        };
        assert!(c.validate().is_ok());
        c.guest_cid = 2;
        assert!(c.validate().is_err());
        c.guest_cid = 3;
        c.uds_path = String::new();
        assert!(c.validate().is_err());
        c.uds_path = "/".repeat(100);
        assert!(c.validate().is_err());
    }
}
