//! What a user asks for: the bodies the REST API and the `--config-file` accept, with their
//! validation. Runtime state lives elsewhere (`vstate`, `devices`); nothing here touches KVM.

pub mod drive;
pub mod machine;
pub mod net;
pub mod vsock;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use drive::{CacheType, DriveConfig, EntropyConfig, IoEngine};
pub use machine::{CpuConfig, MachineConfig, MachineConfigUpdate};
pub use net::NetworkInterfaceConfig;
pub use vsock::VsockConfig;

/// The longest kernel command line, including its terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// Used when the user gives no `boot_args`.
pub const DEFAULT_KERNEL_CMDLINE: &str = "reboot=k panic=1 nomodule 8250.nr_uarts=0 i8042.noaux \
     i8042.nomux i8042.dumbkbd swiotlb=noforce";

#[derive(Debug, PartialEq, Eq)]
pub enum ConfigError {
    InvalidVcpuCount(u8),
    InvalidVcpuCountSmt,
    InvalidMemorySize,
    InvalidBitmap(String),
    InvalidNumber(String),
    InvalidCpuidRegister(String),
    CmdlineTooLong(usize),
    /// A file named in the configuration cannot be opened.
    File {
        what: &'static str,
        path: String,
        reason: String,
    },
    /// A field or key that ember does not implement yet.
    Unsupported(&'static str),
    /// A section of the config file could not be parsed.
    Section {
        section: String,
        reason: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        use ConfigError::*;
        match self {
            InvalidVcpuCount(n) => write!(
                f,
                "The vCPU number is invalid: {n} (it must be between 1 and {}).",
                machine::MAX_VCPUS
            ),
            InvalidVcpuCountSmt => write!(
                f,
                "The vCPU number is invalid: it can only be 1 or an even number when SMT is enabled."
            ),
            InvalidMemorySize => write!(
                f,
                "The memory size (MiB) is either 0, too large, or not a multiple of the \
                 configured page size (2 MiB with huge_pages 2M)."
            ),
            InvalidBitmap(s) => write!(
                f,
                "Invalid bitmap {s:?}: expected 0b followed by 0, 1 or x digits."
            ),
            InvalidNumber(s) => write!(f, "Invalid number {s:?}."),
            InvalidCpuidRegister(s) => write!(
                f,
                "Invalid CPUID register {s:?}: expected eax, ebx, ecx or edx."
            ),
            CmdlineTooLong(n) => write!(
                f,
                "The kernel command line is {n} bytes long with its NUL; at most {CMDLINE_MAX_SIZE} bytes are allowed."
            ),
            File { what, path, reason } => write!(f, "Cannot open the {what} {path:?}: {reason}"),
            Unsupported(what) => write!(f, "{what} is not supported by ember yet."),
            Section { section, reason } => write!(f, "{section}: {reason}"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The body of `PUT /boot-source`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSourceConfig {
    pub kernel_image_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

impl BootSourceConfig {
    /// The command line the guest gets, before devices append their entries.
    pub fn cmdline(&self) -> &str {
        self.boot_args.as_deref().unwrap_or(DEFAULT_KERNEL_CMDLINE)
    }

    /// Checks the command line and opens the kernel and initrd. Firecracker opens them when the
    /// boot source is set and boots what it opened then: a typo fails the PUT, not the start,
    /// and a path replaced or removed before the start does not change what boots.
    pub fn open(&self) -> Result<BootFiles, ConfigError> {
        let len = self.cmdline().len() + 1;
        if len > CMDLINE_MAX_SIZE {
            return Err(ConfigError::CmdlineTooLong(len));
        }
        let kernel = open_host_file("kernel image", &self.kernel_image_path, HostFile::Regular)?;
        let initrd = match &self.initrd_path {
            Some(p) => Some(open_host_file("initrd", p, HostFile::Regular)?),
            None => None,
        };
        Ok(BootFiles { kernel, initrd })
    }
}

/// The files of a boot source, opened once.
#[derive(Debug)]
pub struct BootFiles {
    pub kernel: std::fs::File,
    pub initrd: Option<std::fs::File>,
}

/// The host files a configuration names, opened when it was given and kept for the start:
/// runtime state beside [`VmConfig`]. Firecracker opens them then too, so a path changed
/// afterwards does not change what the VM gets.
#[derive(Debug, Default)]
pub struct OpenedFiles {
    pub boot: Option<BootFiles>,
    /// By drive id.
    pub drives: std::collections::BTreeMap<String, std::fs::File>,
}

/// What a host file named by a client or a config file may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostFile {
    /// A regular file, read-only (a kernel, an initrd).
    Regular,
    /// A regular file or a block device, opened for reading and, if `write`, writing (a drive).
    Disk { write: bool },
}

/// Opens a file named in the configuration without ever waiting on it: open(2) of a named pipe
/// waits for the other end to be opened (which held the API, and the VMM thread with it, for
/// good), so the open is non-blocking and the type is checked on the descriptor itself, not on
/// the path a rename could swap. The descriptor is back to blocking I/O when returned.
pub fn open_host_file(
    what: &'static str,
    path: &str,
    kind: HostFile,
) -> Result<std::fs::File, ConfigError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let err = |reason: String| ConfigError::File {
        what,
        path: path.to_string(),
        reason,
    };
    let wrong_type = |t: std::fs::FileType| match kind {
        HostFile::Regular if !t.is_file() => Some("it is not a regular file"),
        HostFile::Disk { .. } if !t.is_file() && !t.is_block_device() => {
            Some("it is neither a regular file nor a block device")
        }
        _ => None,
    };
    // Checked on the path first too, so that a device whose open has effects of its own (a
    // tape rewinds, a serial line raises DTR) is refused without being opened.
    if let Some(why) = std::fs::metadata(path)
        .ok()
        .and_then(|m| wrong_type(m.file_type()))
    {
        return Err(err(why.into()));
    }
    let write = matches!(kind, HostFile::Disk { write: true });
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| err(e.to_string()))?;
    // And on what was opened: the path may have changed in between.
    let t = f.metadata().map_err(|e| err(e.to_string()))?.file_type();
    if let Some(why) = wrong_type(t) {
        return Err(err(why.into()));
    }
    set_blocking(&f).map_err(|e| err(e.to_string()))?;
    Ok(f)
}

/// Clears O_NONBLOCK on a file opened with it only so that the open could not wait.
pub fn set_blocking(f: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl(2) on the descriptor `f` owns; F_GETFL/F_SETFL touch only its flags.
    let cleared = unsafe {
        let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        flags >= 0 && libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) == 0
    };
    if cleared {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum LogLevel {
    Off,
    Error,
    Warning,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn parse(s: &str) -> Option<LogLevel> {
        Some(match s.to_ascii_lowercase().as_str() {
            "off" => LogLevel::Off,
            "error" => LogLevel::Error,
            "warning" | "warn" => LogLevel::Warning,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            _ => return None,
        })
    }

    pub fn to_filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Off => log::LevelFilter::Off,
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warning => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

// Firecracker accepts the level in any case.
impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        LogLevel::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown log level {s:?}, expected one of Error, Warning, Info, Debug, Trace, Off"
            ))
        })
    }
}

/// The body of `PUT /logger`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// The body of `PUT /metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub metrics_path: String,
}

/// Everything a VM is built from: the config file, or what the API accumulated before
/// `InstanceStart`. Keys and order follow Firecracker's config file.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct VmConfig {
    #[serde(rename = "boot-source", skip_serializing_if = "Option::is_none")]
    pub boot_source: Option<BootSourceConfig>,
    #[serde(rename = "drives")]
    pub drives: Vec<DriveConfig>,
    #[serde(rename = "machine-config")]
    pub machine_config: MachineConfig,
    #[serde(rename = "cpu-config", skip_serializing_if = "Option::is_none")]
    pub cpu_config: Option<CpuConfig>,
    #[serde(rename = "logger", skip_serializing_if = "Option::is_none")]
    pub logger: Option<LoggerConfig>,
    #[serde(rename = "metrics", skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    #[serde(rename = "network-interfaces")]
    pub network_interfaces: Vec<NetworkInterfaceConfig>,
    #[serde(rename = "entropy", skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyConfig>,
    #[serde(rename = "vsock", skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// Add the boot-timer device (`--boot-timer`).
    #[serde(skip)]
    pub boot_timer: bool,
}

/// Top-level keys of a config file that ember knows but does not implement yet.
const NOT_YET: &[&str] = &["balloon", "mmds-config"];

const KNOWN: &[&str] = &[
    "boot-source",
    "drives",
    "machine-config",
    "cpu-config",
    "logger",
    "metrics",
    "network-interfaces",
    "vsock",
    "balloon",
    "entropy",
    "mmds-config",
];

fn section<T: serde::de::DeserializeOwned>(
    name: &str,
    value: serde_json::Value,
) -> Result<T, ConfigError> {
    let err = |reason: String| ConfigError::Section {
        section: name.to_string(),
        reason,
    };
    // Parse from pretty text rather than the Value: serde's error then carries a line, and
    // that line names the offending field ("invalid type" alone does not).
    let text = serde_json::to_string_pretty(&value).map_err(|e| err(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| err(describe_json_error(&text, &e)))
}

/// The config file's `cpu-config` when it names a file, as Firecracker's does.
fn read_cpu_template(path: &str) -> Result<CpuConfig, ConfigError> {
    let err = |reason: String| ConfigError::Section {
        section: "cpu-config".into(),
        reason,
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| err(format!("cannot read the CPU template {path:?}: {e}")))?;
    serde_json::from_str(&text).map_err(|e| {
        err(format!(
            "the CPU template {path:?}: {}",
            describe_json_error(&text, &e)
        ))
    })
}

/// A serde_json error as a sentence that names the field it is about, without line numbers.
pub fn describe_json_error(text: &str, e: &serde_json::Error) -> String {
    let mut msg = e.to_string();
    if let Some(i) = msg.rfind(" at line ") {
        msg.truncate(i);
    }
    let field = text
        .lines()
        .nth(e.line().saturating_sub(1))
        .and_then(|l| l.trim_start().strip_prefix('"'))
        .and_then(|l| l.split_once("\":"))
        .map(|(k, _)| k.to_string());
    match field {
        Some(f) if !msg.contains(&format!("`{f}`")) => format!("field `{f}`: {msg}"),
        _ => msg,
    }
}

impl VmConfig {
    /// Parses and validates a `--config-file`, and opens its boot source's files. Each error
    /// names the key it is about.
    pub fn from_json(text: &str) -> Result<(VmConfig, OpenedFiles), ConfigError> {
        let root: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ConfigError::Section {
                section: "config file".into(),
                reason: e.to_string(),
            })?;
        let serde_json::Value::Object(mut map) = root else {
            return Err(ConfigError::Section {
                section: "config file".into(),
                reason: "expected a JSON object".into(),
            });
        };
        // Firecracker ignores top-level keys it does not know (its config struct does not deny
        // them), so a file written for another version still boots; the sections themselves
        // are strict.
        for k in map.keys().filter(|k| !KNOWN.contains(&k.as_str())) {
            log::warn!("config file: ignoring the unknown key {k:?}");
        }
        for k in NOT_YET {
            match map.get(*k) {
                None | Some(serde_json::Value::Null) => {}
                Some(serde_json::Value::Array(a)) if a.is_empty() => {}
                Some(_) => return Err(ConfigError::Unsupported(k)),
            }
        }
        let mut cfg = VmConfig::default();
        if let Some(v) = map.remove("logger") {
            cfg.logger = Some(section("logger", v)?);
        }
        if let Some(v) = map.remove("metrics") {
            cfg.metrics = Some(section("metrics", v)?);
        }
        if let Some(v) = map.remove("machine-config") {
            let m: MachineConfig = section("machine-config", v)?;
            m.validate().map_err(|e| ConfigError::Section {
                section: "machine-config".into(),
                reason: e.to_string(),
            })?;
            cfg.machine_config = m;
        }
        if let Some(v) = map.remove("cpu-config") {
            let c: CpuConfig = match v {
                // Firecracker's form: the path of a file holding the custom CPU template.
                serde_json::Value::String(path) => read_cpu_template(&path)?,
                // The template itself, as `PUT /cpu-config` takes it.
                v => section("cpu-config", v)?,
            };
            c.to_modifiers().map_err(|e| ConfigError::Section {
                section: "cpu-config".into(),
                reason: e.to_string(),
            })?;
            cfg.cpu_config = Some(c);
        }
        let bs: BootSourceConfig = section(
            "boot-source",
            map.remove("boot-source")
                .ok_or_else(|| ConfigError::Section {
                    section: "boot-source".into(),
                    reason: "missing; it is required".into(),
                })?,
        )?;
        let mut files = OpenedFiles {
            boot: Some(bs.open().map_err(|e| ConfigError::Section {
                section: "boot-source".into(),
                reason: e.to_string(),
            })?),
            ..Default::default()
        };
        cfg.boot_source = Some(bs);
        match map.remove("drives") {
            None => {
                return Err(ConfigError::Section {
                    section: "drives".into(),
                    reason: "missing; it is required (it may be [])".into(),
                })
            }
            Some(serde_json::Value::Array(a)) => {
                for v in a {
                    let d: DriveConfig = section("drives", v)?;
                    let id = d.drive_id.clone();
                    let file = cfg.add_drive(d).map_err(|e| ConfigError::Section {
                        section: "drives".into(),
                        reason: e.to_string(),
                    })?;
                    files.drives.insert(id, file);
                }
            }
            Some(_) => {
                return Err(ConfigError::Section {
                    section: "drives".into(),
                    reason: "expected an array".into(),
                })
            }
        }
        match map.remove("network-interfaces") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::Array(a)) => {
                for v in a {
                    let n: NetworkInterfaceConfig = section("network-interfaces", v)?;
                    cfg.add_network_interface(n)
                        .map_err(|e| ConfigError::Section {
                            section: "network-interfaces".into(),
                            reason: e.to_string(),
                        })?;
                }
            }
            Some(_) => {
                return Err(ConfigError::Section {
                    section: "network-interfaces".into(),
                    reason: "expected an array".into(),
                })
            }
        }
        match map.remove("vsock") {
            None | Some(serde_json::Value::Null) => {}
            Some(v) => {
                let c: VsockConfig = section("vsock", v)?;
                c.validate()?;
                cfg.vsock = Some(c);
            }
        }
        match map.remove("entropy") {
            None | Some(serde_json::Value::Null) => {}
            Some(v) => {
                let e: EntropyConfig = section("entropy", v)?;
                e.validate().map_err(|e| ConfigError::Section {
                    section: "entropy".into(),
                    reason: e.to_string(),
                })?;
                cfg.entropy = Some(e);
            }
        }
        Ok((cfg, files))
    }

    /// Validates (the TAP opens) and adds or replaces an interface (same id).
    pub fn add_network_interface(&mut self, n: NetworkInterfaceConfig) -> Result<(), ConfigError> {
        n.validate()?;
        net::insert_iface(&mut self.network_interfaces, n)
    }

    /// Adds or replaces a drive (same id); refuses a second root device. Returns the drive's
    /// file, opened.
    pub fn add_drive(&mut self, d: DriveConfig) -> Result<std::fs::File, ConfigError> {
        drive::insert_drive(&mut self.drives, d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_files_of_the_wrong_type_are_refused_without_waiting() {
        let dir = std::env::temp_dir().join(format!("ember-hostfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("pipe");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) of a path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let file = dir.join("file");
        std::fs::write(&file, b"x").unwrap();
        let (p, f, d) = (
            fifo.to_str().unwrap(),
            file.to_str().unwrap(),
            dir.to_str().unwrap(),
        );
        for (path, kind, says) in [
            (p, HostFile::Regular, "not a regular file"),
            (p, HostFile::Disk { write: true }, "nor a block device"),
            ("/dev/null", HostFile::Regular, "not a regular file"),
            (
                "/dev/null",
                HostFile::Disk { write: false },
                "nor a block device",
            ),
            (d, HostFile::Regular, "not a regular file"),
        ] {
            let e = open_host_file("test", path, kind).unwrap_err().to_string();
            assert!(e.contains(says), "{path}: {e}");
        }
        assert!(open_host_file("test", f, HostFile::Regular).is_ok());
        assert!(open_host_file("test", f, HostFile::Disk { write: true }).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn kernel_path() -> String {
        // Any readable file will do for validation.
        "/proc/self/exe".to_string()
    }

    #[test]
    fn config_file_ok_and_errors_name_the_field() {
        let ok = format!(
            r#"{{"boot-source":{{"kernel_image_path":"{}","boot_args":"hello"}},"drives":[],
               "machine-config":{{"vcpu_count":2,"mem_size_mib":256}}}}"#,
            kernel_path()
        );
        let (cfg, _) = VmConfig::from_json(&ok).unwrap();
        assert_eq!(cfg.machine_config.vcpu_count, 2);
        assert_eq!(cfg.boot_source.unwrap().cmdline(), "hello");

        let missing_mem = format!(
            r#"{{"boot-source":{{"kernel_image_path":"{}"}},"drives":[],
               "machine-config":{{"vcpu_count":2}}}}"#,
            kernel_path()
        );
        let e = VmConfig::from_json(&missing_mem).unwrap_err().to_string();
        assert!(
            e.contains("machine-config") && e.contains("mem_size_mib"),
            "{e}"
        );

        let unknown = format!(
            r#"{{"boot-source":{{"kernel_image_path":"{}","bogus":1}},"drives":[]}}"#,
            kernel_path()
        );
        let e = VmConfig::from_json(&unknown).unwrap_err().to_string();
        assert!(e.contains("boot-source") && e.contains("bogus"), "{e}");

        let wrong_type = format!(
            r#"{{"boot-source":{{"kernel_image_path":"{}"}},"drives":[],
               "machine-config":{{"vcpu_count":"two","mem_size_mib":128}}}}"#,
            kernel_path()
        );
        let e = VmConfig::from_json(&wrong_type).unwrap_err().to_string();
        assert!(
            e.contains("machine-config") && e.contains("`vcpu_count`"),
            "{e}"
        );
        assert!(!e.contains("line"), "{e}");

        let e = VmConfig::from_json(r#"{"drives":[]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("boot-source"), "{e}");

        let e = VmConfig::from_json(
            r#"{"boot-source":{"kernel_image_path":"/nonexistent/vmlinux"},"drives":[]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("/nonexistent/vmlinux"), "{e}");

        let long = format!(
            r#"{{"boot-source":{{"kernel_image_path":"{}","boot_args":"{}"}},"drives":[]}}"#,
            kernel_path(),
            "a".repeat(2048)
        );
        let e = VmConfig::from_json(&long).unwrap_err().to_string();
        assert!(e.contains("2049"), "{e}");
    }

    #[test]
    fn config_file_drives_and_entropy() {
        let p = std::env::temp_dir().join(format!("ember-cfg-disk-{}", std::process::id()));
        std::fs::write(&p, [0u8; 4096]).unwrap();
        let text = format!(
            r#"{{"boot-source":{{"kernel_image_path":"{}"}},
               "drives":[{{"drive_id":"data","path_on_host":"{p}","is_root_device":false}},
                         {{"drive_id":"root","path_on_host":"{p}","is_root_device":true,
                           "is_read_only":true,"cache_type":"Writeback"}}],
               "entropy":{{}}}}"#,
            kernel_path(),
            p = p.display()
        );
        let (cfg, _) = VmConfig::from_json(&text).unwrap();
        assert_eq!(cfg.drives.len(), 2);
        assert_eq!(cfg.entropy, Some(EntropyConfig::default()));
        let v = serde_json::to_value(&cfg).unwrap();
        assert_eq!(v["drives"][1]["cache_type"], "Writeback");
        assert!(v["entropy"].is_object());

        let missing = format!(
            r#"{{"boot-source":{{"kernel_image_path":"{}"}},
               "drives":[{{"drive_id":"d","path_on_host":"/nonexistent/disk.img","is_root_device":true}}]}}"#,
            kernel_path()
        );
        let e = VmConfig::from_json(&missing).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/disk.img"), "{e}");

        let limited = format!(
            r#"{{"boot-source":{{"kernel_image_path":"{}"}},"drives":[],
               "entropy":{{"rate_limiter":{{"bandwidth":{{"size":1,"refill_time":1}}}}}}}}"#,
            kernel_path()
        );
        let (cfg, _) = VmConfig::from_json(&limited).unwrap();
        assert!(cfg.entropy.unwrap().rate_limiter.is_some());
        std::fs::remove_file(p).unwrap();
    }

    /// Firecracker's `cpu-config` key is the path of a template file; unknown top-level keys
    /// are ignored, as Firecracker's config struct does not deny them.
    #[test]
    fn config_file_cpu_template_path_and_unknown_keys() {
        let dir = std::env::temp_dir().join(format!("ember-cfg-cpu-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tpl = dir.join("template.json");
        std::fs::write(
            &tpl,
            r#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
                "modifiers": [{"register": "ecx", "bitmap": "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx0x"}]}]}"#,
        )
        .unwrap();
        let text = format!(
            r#"{{"boot-source":{{"kernel_image_path":"{}"}},"drives":[],
               "cpu-config":"{}","some-future-key":{{"x":1}}}}"#,
            kernel_path(),
            tpl.display()
        );
        let (cfg, _) = VmConfig::from_json(&text).unwrap();
        assert_eq!(cfg.cpu_config.unwrap().cpuid_modifiers.len(), 1);

        let missing = format!(
            r#"{{"boot-source":{{"kernel_image_path":"{}"}},"drives":[],
               "cpu-config":"/nonexistent/template.json"}}"#,
            kernel_path()
        );
        let e = VmConfig::from_json(&missing).unwrap_err().to_string();
        assert!(
            e.contains("cpu-config") && e.contains("/nonexistent/template.json"),
            "{e}"
        );

        std::fs::write(&tpl, r#"{"cpuid_modifiers": [], "bogus": 1}"#).unwrap();
        let e = VmConfig::from_json(&text).unwrap_err().to_string();
        assert!(e.contains("cpu-config") && e.contains("bogus"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn log_level_any_case() {
        let l: LoggerConfig = serde_json::from_str(r#"{"level":"wArNiNg"}"#).unwrap();
        assert_eq!(l.level, Some(LogLevel::Warning));
        assert!(serde_json::from_str::<LoggerConfig>(r#"{"level":"loud"}"#).is_err());
    }
}
