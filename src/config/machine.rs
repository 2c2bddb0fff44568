//! `/machine-config` and `/cpu-config`: the instance type the API accepts.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// The most vCPUs a guest may have (the MADT and the GSI layout are sized for it).
pub const MAX_VCPUS: u8 = 32;
pub const DEFAULT_MEM_SIZE_MIB: usize = 128;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    #[default]
    None,
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// Firecracker's static CPU templates. ember runs every guest with the host's normalised CPUID;
/// only `None` is accepted, the others are refused with a reason rather than silently ignored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum StaticCpuTemplate {
    C3,
    T2,
    T2S,
    T2CL,
    T2A,
    V1N1,
    #[default]
    None,
}

/// The body of `PUT /machine-config` and the `machine-config` key of the config file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: usize,
    #[serde(default)]
    pub smt: bool,
    #[serde(default, skip_serializing_if = "is_none_template")]
    pub cpu_template: StaticCpuTemplate,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub huge_pages: HugePages,
}

fn is_none_template(t: &StaticCpuTemplate) -> bool {
    *t == StaticCpuTemplate::None
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: DEFAULT_MEM_SIZE_MIB,
            smt: false,
            cpu_template: StaticCpuTemplate::None,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
        }
    }
}

/// The body of `PATCH /machine-config`: any subset.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    pub vcpu_count: Option<u8>,
    pub mem_size_mib: Option<usize>,
    pub smt: Option<bool>,
    pub cpu_template: Option<StaticCpuTemplate>,
    pub track_dirty_pages: Option<bool>,
    pub huge_pages: Option<HugePages>,
}

impl MachineConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpu_count == 0 || self.vcpu_count > MAX_VCPUS {
            return Err(ConfigError::InvalidVcpuCount(self.vcpu_count));
        }
        if self.smt && self.vcpu_count > 1 && self.vcpu_count % 2 == 1 {
            return Err(ConfigError::InvalidVcpuCountSmt);
        }
        if self.mem_size_mib == 0 || self.mem_size_mib > (1 << 30) {
            return Err(ConfigError::InvalidMemorySize);
        }
        if self.cpu_template != StaticCpuTemplate::None {
            return Err(ConfigError::Unsupported(
                "static CPU templates (use /cpu-config for a custom template)",
            ));
        }
        if self.huge_pages == HugePages::Hugetlbfs2M && !self.mem_size_mib.is_multiple_of(2) {
            return Err(ConfigError::InvalidMemorySize);
        }
        Ok(())
    }

    /// Applies a PATCH on top of `self`; the result still has to be validated.
    pub fn apply(&self, update: &MachineConfigUpdate) -> MachineConfig {
        MachineConfig {
            vcpu_count: update.vcpu_count.unwrap_or(self.vcpu_count),
            mem_size_mib: update.mem_size_mib.unwrap_or(self.mem_size_mib),
            smt: update.smt.unwrap_or(self.smt),
            cpu_template: update.cpu_template.unwrap_or(self.cpu_template),
            track_dirty_pages: update.track_dirty_pages.unwrap_or(self.track_dirty_pages),
            huge_pages: update.huge_pages.unwrap_or(self.huge_pages),
        }
    }
}

/// One register of a CPUID leaf modifier: `bitmap` is `0b` followed by up to 32 of `0`, `1`
/// or `x` (keep), most significant bit first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidRegisterModifierConfig {
    pub register: String,
    pub bitmap: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidLeafModifierConfig {
    pub leaf: String,
    pub subleaf: String,
    pub flags: u32,
    pub modifiers: Vec<CpuidRegisterModifierConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsrModifierConfig {
    pub addr: String,
    pub bitmap: String,
}

/// The body of `PUT /cpu-config`: a custom CPU template, which is how features the host
/// hypervisor cannot run for a guest are masked.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuConfig {
    #[serde(default)]
    pub cpuid_modifiers: Vec<CpuidLeafModifierConfig>,
    #[serde(default)]
    pub msr_modifiers: Vec<MsrModifierConfig>,
    #[serde(default)]
    pub kvm_capabilities: Vec<String>,
}

/// A parsed bitmap: bits under `mask` are forced to `value`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bitmap {
    pub mask: u64,
    pub value: u64,
}

pub fn parse_bitmap(s: &str, width: u32) -> Result<Bitmap, ConfigError> {
    let bad = || ConfigError::InvalidBitmap(s.to_string());
    let digits = s.strip_prefix("0b").ok_or_else(bad)?;
    if digits.is_empty() || digits.len() > width as usize {
        return Err(bad());
    }
    let mut mask = 0u64;
    let mut value = 0u64;
    for c in digits.chars() {
        mask <<= 1;
        value <<= 1;
        match c {
            '0' => mask |= 1,
            '1' => {
                mask |= 1;
                value |= 1
            }
            'x' | 'X' => {}
            _ => return Err(bad()),
        }
    }
    Ok(Bitmap { mask, value })
}

pub fn parse_u32(s: &str) -> Result<u32, ConfigError> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|_| ConfigError::InvalidNumber(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_parsing() {
        let b = parse_bitmap("0b1x0", 32).unwrap();
        assert_eq!(b.mask, 0b101);
        assert_eq!(b.value, 0b100);
        assert!(parse_bitmap("1x0", 32).is_err());
        assert!(parse_bitmap("0b12", 32).is_err());
        assert!(parse_bitmap(&format!("0b{}", "1".repeat(33)), 32).is_err());
        assert_eq!(parse_u32("0x8000001d").unwrap(), 0x8000_001d);
        assert_eq!(parse_u32("7").unwrap(), 7);
        assert!(parse_u32("0xg").is_err());
    }

    #[test]
    fn machine_config_rules() {
        let mut m = MachineConfig::default();
        assert!(m.validate().is_ok());
        m.vcpu_count = 0;
        assert!(m.validate().is_err());
        m.vcpu_count = 33;
        assert!(m.validate().is_err());
        m.vcpu_count = 3;
        m.smt = true;
        assert!(m.validate().is_err());
        m.vcpu_count = 4;
        assert!(m.validate().is_ok());
        m.mem_size_mib = 0;
        assert!(m.validate().is_err());
        // With 2 MiB pages, RAM is a whole number of them.
        m.huge_pages = HugePages::Hugetlbfs2M;
        m.mem_size_mib = 129;
        assert!(matches!(m.validate(), Err(ConfigError::InvalidMemorySize)));
        m.mem_size_mib = 130;
        assert!(m.validate().is_ok());
        let u = MachineConfigUpdate {
            mem_size_mib: Some(256),
            ..Default::default()
        };
        assert_eq!(MachineConfig::default().apply(&u).mem_size_mib, 256);
    }
}

/// A custom CPU template in the form the vCPU setup applies.
#[derive(Clone, Debug, Default)]
pub struct CpuModifiers {
    pub cpuid: Vec<crate::arch::CpuidLeafModifier>,
    pub msrs: Vec<crate::arch::MsrModifier>,
}

impl CpuConfig {
    pub fn to_modifiers(&self) -> Result<CpuModifiers, ConfigError> {
        use crate::arch::{CpuidLeafModifier, CpuidRegister, CpuidRegisterModifier, MsrModifier};
        if !self.kvm_capabilities.is_empty() {
            return Err(ConfigError::Unsupported(
                "kvm_capabilities in a CPU template",
            ));
        }
        let mut out = CpuModifiers::default();
        for leaf in &self.cpuid_modifiers {
            let mut modifiers = Vec::new();
            for m in &leaf.modifiers {
                let register = match m.register.to_ascii_lowercase().as_str() {
                    "eax" => CpuidRegister::Eax,
                    "ebx" => CpuidRegister::Ebx,
                    "ecx" => CpuidRegister::Ecx,
                    "edx" => CpuidRegister::Edx,
                    _ => return Err(ConfigError::InvalidCpuidRegister(m.register.clone())),
                };
                let b = parse_bitmap(&m.bitmap, 32)?;
                modifiers.push(CpuidRegisterModifier {
                    register,
                    mask: b.mask as u32,
                    value: b.value as u32,
                });
            }
            out.cpuid.push(CpuidLeafModifier {
                leaf: parse_u32(&leaf.leaf)?,
                subleaf: parse_u32(&leaf.subleaf)?,
                flags: leaf.flags,
                modifiers,
            });
        }
        for m in &self.msr_modifiers {
            let b = parse_bitmap(&m.bitmap, 64)?;
            out.msrs.push(MsrModifier {
                addr: parse_u32(&m.addr)?,
                mask: b.mask,
                value: b.value,
            });
        }
        Ok(out)
    }
}
