//! cgroups v1 and v2: `plan` finds where each controller is mounted and checks the request
//! without touching anything; `CgroupPlan::apply` creates `<mount>/<parent>/<id>`, writes the
//! values and moves the jailer into it (its children, and the VMM after exec, stay there).

use std::fmt;
use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// Which hierarchy `--cgroup` values go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// One `--cgroup FILE=VALUE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupSetting {
    /// `<controller>.<property>`, a plain file name.
    pub file: String,
    /// What comes before the first dot.
    pub controller: String,
    pub value: String,
}

impl CgroupSetting {
    /// Parses `FILE=VALUE`; the reason is a sentence for the user.
    pub fn parse(arg: &str) -> Result<CgroupSetting, String> {
        let Some((file, value)) = arg.split_once('=') else {
            return Err("expected FILE=VALUE, e.g. cpu.shares=512".into());
        };
        if file.contains("..") || file.contains('/') {
            return Err(format!(
                "the file {file:?} must be a plain file name (no '/' or '..')"
            ));
        }
        let Some((controller, property)) = file.split_once('.') else {
            return Err(format!(
                "the file {file:?} is not of the form <controller>.<property>"
            ));
        };
        if controller.is_empty() || property.is_empty() {
            return Err(format!(
                "the file {file:?} is not of the form <controller>.<property>"
            ));
        }
        if !file
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || c == b'-')
        {
            return Err(format!(
                "the file {file:?} may only contain A-Z, a-z, 0-9, '.', '_' and '-'"
            ));
        }
        if value.is_empty() || value.contains('\n') {
            return Err("the value must be non-empty and on one line".into());
        }
        Ok(CgroupSetting {
            file: file.to_string(),
            controller: controller.to_string(),
            value: value.to_string(),
        })
    }
}

/// What went wrong with cgroups.
#[derive(Debug)]
pub enum CgroupError {
    ReadMounts(io::Error),
    /// No v1 hierarchy has this controller.
    NotMounted(String),
    /// No cgroup2 mount at all.
    NoUnifiedMount,
    /// The v2 hierarchy does not offer this controller (it may be bound to v1).
    Unavailable {
        controller: String,
        mount: PathBuf,
    },
    Read(PathBuf, io::Error),
    Create(PathBuf, io::Error),
    Write {
        path: PathBuf,
        value: String,
        err: io::Error,
    },
    /// cpuset.cpus/mems empty all the way up.
    NothingToInherit(PathBuf),
}

impl fmt::Display for CgroupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CgroupError::ReadMounts(e) => write!(f, "cannot read /proc/mounts: {e}"),
            CgroupError::NotMounted(c) => write!(
                f,
                "invalid --cgroup: no cgroup v1 hierarchy with the {c:?} controller is mounted"
            ),
            CgroupError::NoUnifiedMount => {
                write!(f, "--cgroup-version 2: no cgroup2 hierarchy is mounted")
            }
            CgroupError::Unavailable { controller, mount } => write!(
                f,
                "invalid --cgroup: the {controller:?} controller is not available in the cgroup v2 \
                 hierarchy at {mount:?} (see its cgroup.controllers)"
            ),
            CgroupError::Read(p, e) => write!(f, "cannot read {p:?}: {e}"),
            CgroupError::Create(p, e) => write!(f, "cannot create the cgroup {p:?}: {e}"),
            CgroupError::Write { path, value, err } => {
                write!(f, "cannot write {value:?} to {path:?}: {err}")
            }
            CgroupError::NothingToInherit(p) => write!(
                f,
                "cannot fill {p:?}: no ancestor cgroup has a value to inherit"
            ),
        }
    }
}

impl std::error::Error for CgroupError {}

/// One cgroup directory to create and fill.
#[derive(Debug)]
struct Target {
    /// Where the hierarchy is mounted.
    mount: PathBuf,
    /// `<mount>/<parent>/<id>`.
    leaf: PathBuf,
    /// v1 cpuset: fill empty cpuset.cpus/mems from the parent.
    cpuset: bool,
    settings: Vec<CgroupSetting>,
}

/// The checked cgroup work.
#[derive(Debug)]
pub struct CgroupPlan {
    version: CgroupVersion,
    targets: Vec<Target>,
    /// v2: controllers to enable down the hierarchy.
    controllers: Vec<String>,
}

/// A mount from /proc/mounts.
struct Mount {
    point: PathBuf,
    fstype: String,
    options: Vec<String>,
}

/// Undoes the octal escapes of /proc/mounts (`\040` for a space).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mounts() -> Result<Vec<Mount>, CgroupError> {
    let text = std::fs::read_to_string("/proc/mounts").map_err(CgroupError::ReadMounts)?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let _src = f.next()?;
            let point = PathBuf::from(unescape(f.next()?));
            let fstype = f.next()?.to_string();
            let options = f.next()?.split(',').map(str::to_string).collect();
            Some(Mount {
                point,
                fstype,
                options,
            })
        })
        .collect())
}

/// Checks the request and finds the hierarchies; `None` when no `--cgroup` was given.
pub fn plan(
    settings: &[CgroupSetting],
    version: CgroupVersion,
    parent: &Path,
    id: &str,
) -> Result<Option<CgroupPlan>, CgroupError> {
    if settings.is_empty() {
        return Ok(None);
    }
    let mounts = mounts()?;
    let mut targets: Vec<Target> = Vec::new();
    let mut controllers: Vec<String> = Vec::new();
    match version {
        CgroupVersion::V1 => {
            for s in settings {
                let m = mounts
                    .iter()
                    .find(|m| m.fstype == "cgroup" && m.options.contains(&s.controller))
                    .ok_or_else(|| CgroupError::NotMounted(s.controller.clone()))?;
                match targets.iter_mut().find(|t| t.mount == m.point) {
                    Some(t) => t.settings.push(s.clone()),
                    None => targets.push(Target {
                        mount: m.point.clone(),
                        leaf: m.point.join(parent).join(id),
                        cpuset: m.options.iter().any(|o| o == "cpuset"),
                        settings: vec![s.clone()],
                    }),
                }
            }
        }
        CgroupVersion::V2 => {
            let m = mounts
                .iter()
                .find(|m| m.fstype == "cgroup2")
                .ok_or(CgroupError::NoUnifiedMount)?;
            let list = m.point.join("cgroup.controllers");
            let available =
                std::fs::read_to_string(&list).map_err(|e| CgroupError::Read(list, e))?;
            for s in settings {
                // "cgroup.*" files are the core's, present everywhere without enabling anything.
                if s.controller == "cgroup" || controllers.contains(&s.controller) {
                    continue;
                }
                if !available.split_whitespace().any(|c| c == s.controller) {
                    return Err(CgroupError::Unavailable {
                        controller: s.controller.clone(),
                        mount: m.point.clone(),
                    });
                }
                controllers.push(s.controller.clone());
            }
            targets.push(Target {
                mount: m.point.clone(),
                leaf: m.point.join(parent).join(id),
                cpuset: false,
                settings: settings.to_vec(),
            });
        }
    }
    Ok(Some(CgroupPlan {
        version,
        targets,
        controllers,
    }))
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|err| CgroupError::Write {
            path: path.to_path_buf(),
            value: value.to_string(),
            err,
        })
}

fn read_file(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|e| CgroupError::Read(path.to_path_buf(), e))
}

/// `mount` and every directory from it down to `leaf`, top first.
fn levels(mount: &Path, leaf: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = leaf
        .ancestors()
        .take_while(|p| p.starts_with(mount))
        .map(Path::to_path_buf)
        .collect();
    v.reverse();
    v
}

/// Creates the missing directories from `mount` down to `leaf`, recording each new one.
fn create_levels(mount: &Path, leaf: &Path, created: &mut Vec<PathBuf>) -> Result<(), CgroupError> {
    for dir in levels(mount, leaf).into_iter().skip(1) {
        // At most 0755 whatever the caller's umask: nobody else may add cgroups below.
        match std::fs::DirBuilder::new().mode(0o755).create(&dir) {
            Ok(()) => created.push(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(e) => return Err(CgroupError::Create(dir, e)),
        }
    }
    Ok(())
}

/// v1 cpuset: a child starts with empty cpus/mems and refuses tasks until they are set.
fn inherit_cpuset(mount: &Path, leaf: &Path) -> Result<(), CgroupError> {
    let levels = levels(mount, leaf);
    for file in ["cpuset.cpus", "cpuset.mems"] {
        for pair in levels.windows(2) {
            let (up, down) = (&pair[0], &pair[1]);
            let mine = down.join(file);
            if !read_file(&mine)?.trim().is_empty() {
                continue;
            }
            let theirs = read_file(&up.join(file))?;
            if theirs.trim().is_empty() {
                return Err(CgroupError::NothingToInherit(mine));
            }
            write_file(&mine, theirs.trim())?;
        }
    }
    Ok(())
}

impl CgroupPlan {
    /// Creates the cgroups, writes the values and moves process `pid` in. When anything fails
    /// before `pid` moves, the directories created here are removed again.
    pub fn apply(&self, pid: u32) -> Result<(), CgroupError> {
        let mut created = Vec::new();
        let res = self.prepare(&mut created);
        if res.is_err() {
            for dir in created.iter().rev() {
                let _ = std::fs::remove_dir(dir);
            }
            return res;
        }
        let procs = match self.version {
            CgroupVersion::V1 => "tasks",
            CgroupVersion::V2 => "cgroup.procs",
        };
        for t in &self.targets {
            write_file(&t.leaf.join(procs), &pid.to_string())?;
        }
        Ok(())
    }

    fn prepare(&self, created: &mut Vec<PathBuf>) -> Result<(), CgroupError> {
        for t in &self.targets {
            create_levels(&t.mount, &t.leaf, created)?;
            if t.cpuset {
                inherit_cpuset(&t.mount, &t.leaf)?;
            }
            if self.version == CgroupVersion::V2 {
                self.enable_controllers(t)?;
            }
            for s in &t.settings {
                write_file(&t.leaf.join(&s.file), &s.value)?;
            }
        }
        Ok(())
    }

    /// v2: every level above the leaf must list the controllers in cgroup.subtree_control.
    fn enable_controllers(&self, t: &Target) -> Result<(), CgroupError> {
        let levels = levels(&t.mount, &t.leaf);
        for dir in &levels[..levels.len().saturating_sub(1)] {
            let file = dir.join("cgroup.subtree_control");
            let enabled = read_file(&file)?;
            for c in &self.controllers {
                if !enabled.split_whitespace().any(|e| e == c) {
                    write_file(&file, &format!("+{c}"))?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings() {
        let s = CgroupSetting::parse("cpuset.cpus=0-1").unwrap();
        assert_eq!(s.controller, "cpuset");
        assert_eq!(s.file, "cpuset.cpus");
        assert_eq!(s.value, "0-1");
        let s = CgroupSetting::parse("hugetlb.2MB.max=0").unwrap();
        assert_eq!(s.controller, "hugetlb");
        for bad in [
            "cpu/shares=1",
            "../x.y=1",
            "x..y=1",
            "cpu.shares",
            "cpu=1",
            ".shares=1",
            "cpu.=1",
            "cpu.shares=",
            "cpu shares.x=1",
        ] {
            assert!(CgroupSetting::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mount_escapes() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/end\\04"), "/end\\04");
    }

    /// Under a caller's umask of 0, the cgroup directories are still writable by root only.
    #[test]
    fn cgroup_directories_are_not_writable_by_others_under_umask_0() {
        use std::os::unix::fs::PermissionsExt;
        let mount =
            std::env::temp_dir().join(format!("ember-jailer-unit-cgroup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&mount);
        std::fs::create_dir_all(&mount).unwrap();
        let leaf = mount.join("ember/vm1");
        let mut created = Vec::new();
        let res = crate::sys::with_umask_0(|| create_levels(&mount, &leaf, &mut created));
        res.unwrap();
        assert_eq!(created, vec![mount.join("ember"), leaf.clone()]);
        for dir in &created {
            let mode = std::fs::metadata(dir).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o755, "{dir:?}");
        }
        std::fs::remove_dir_all(&mount).unwrap();
    }

    #[test]
    fn levels_from_mount_to_leaf() {
        let l = levels(
            Path::new("/sys/fs/cgroup/cpu"),
            Path::new("/sys/fs/cgroup/cpu/a/b"),
        );
        assert_eq!(
            l,
            vec![
                PathBuf::from("/sys/fs/cgroup/cpu"),
                PathBuf::from("/sys/fs/cgroup/cpu/a"),
                PathBuf::from("/sys/fs/cgroup/cpu/a/b"),
            ]
        );
    }
}
