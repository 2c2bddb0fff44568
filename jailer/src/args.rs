//! The command line and its validation. Everything here only reads: a `Config` that comes out
//! of `parse` + `Config::check_host` is safe to act on, and nothing was created on the way.

use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use argh::FromArgs;

use crate::cgroup::{CgroupSetting, CgroupVersion};

/// Firecracker's default jail base.
pub const DEFAULT_BASE: &str = "/srv/jailer";
/// RLIMIT_NOFILE when no `--resource-limit no-file=N` is given.
pub const DEFAULT_NO_FILE: u64 = 2048;

/// ember-jailer: builds a chroot jail for the VMM and execs it there as an unprivileged user.
/// Everything after `--` goes to the VMM.
#[derive(FromArgs)]
struct RawArgs {
    /// the microVM id: 1 to 64 characters of A-Z, a-z, 0-9 and -
    #[argh(option)]
    id: String,
    /// path of the VMM binary, copied into the jail and exec'd there
    #[argh(option)]
    exec_file: String,
    /// user id the VMM runs as
    #[argh(option)]
    uid: u32,
    /// group id the VMM runs as
    #[argh(option)]
    gid: u32,
    /// base directory of the jails (default /srv/jailer)
    #[argh(option, default = "String::from(DEFAULT_BASE)")]
    chroot_base_dir: String,
    /// network namespace to join (a path such as /var/run/netns/NAME)
    #[argh(option)]
    netns: Option<String>,
    /// detach from the terminal: new session, stdio to /dev/null
    #[argh(switch)]
    daemonize: bool,
    /// run the VMM in a new PID namespace (its pid goes to /<exec file name>.pid in the jail)
    #[argh(switch)]
    new_pid_ns: bool,
    /// cgroup value FILE=VALUE, FILE being <controller>.<property> (repeatable)
    #[argh(option)]
    cgroup: Vec<String>,
    /// cgroup version, 1 or 2 (default 1)
    #[argh(option, default = "String::from(\"1\")")]
    cgroup_version: String,
    /// cgroup under which the microVM's cgroup is created (default: the exec file's name)
    #[argh(option)]
    parent_cgroup: Option<String>,
    /// resource limit fsize=N or no-file=N (repeatable; no-file defaults to 2048)
    #[argh(option)]
    resource_limit: Vec<String>,
}

/// A resource `--resource-limit` can bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    /// RLIMIT_FSIZE.
    Fsize,
    /// RLIMIT_NOFILE.
    NoFile,
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Resource::Fsize => "fsize",
            Resource::NoFile => "no-file",
        })
    }
}

/// The validated request.
#[derive(Debug)]
pub struct Config {
    pub id: String,
    /// The exec file as given (a regular file).
    pub exec_file: PathBuf,
    /// Its last path component: the jail's directory name and the binary's name inside.
    pub exec_name: String,
    pub uid: u32,
    pub gid: u32,
    /// Absolute.
    pub base_dir: PathBuf,
    pub netns: Option<PathBuf>,
    pub daemonize: bool,
    pub new_pid_ns: bool,
    pub cgroups: Vec<CgroupSetting>,
    pub cgroup_version: CgroupVersion,
    /// Relative, without `.` or `..`.
    pub parent_cgroup: PathBuf,
    /// In the order to apply; no-file always present.
    pub rlimits: Vec<(Resource, u64)>,
    /// Everything after `--`.
    pub vmm_args: Vec<String>,
}

impl Config {
    /// `<base>/<exec name>/<id>`.
    pub fn jail_dir(&self) -> PathBuf {
        self.base_dir.join(&self.exec_name).join(&self.id)
    }

    /// `<base>/<exec name>/<id>/root`.
    pub fn root_dir(&self) -> PathBuf {
        self.jail_dir().join("root")
    }

    /// Checks what the request names on the host, without changing anything. Returns the exec
    /// file, open and checked: that file, not whatever is at its path later, is copied.
    pub fn check_host(&self) -> Result<File, ArgsError> {
        let exec = &self.exec_file;
        let not_regular = || ArgsError::ExecFile(exec.clone(), "not a regular file".into());
        match std::fs::metadata(exec) {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Err(not_regular()),
            Err(e) => return Err(ArgsError::ExecFile(exec.clone(), e.to_string())),
        }
        // O_NONBLOCK: a FIFO put at the path since cannot block the open; it fails the check
        // below.
        let mut file = File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(exec)
            .map_err(|e| ArgsError::ExecFile(exec.clone(), e.to_string()))?;
        match file.metadata() {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Err(not_regular()),
            Err(e) => return Err(ArgsError::ExecFile(exec.clone(), e.to_string())),
        }
        // The jail is empty: only an ELF executable can run there (no interpreter for a
        // script). Caught here, before the jail exists, not by a failed exec inside it.
        let mut magic = [0u8; 4];
        let read = file
            .read_exact(&mut magic)
            .and_then(|()| file.seek(SeekFrom::Start(0)));
        if read.is_err() || magic != *b"\x7fELF" {
            return Err(ArgsError::ExecFile(
                exec.clone(),
                "not an ELF executable".into(),
            ));
        }
        // The base and every jail directory below it must be directories where they exist.
        // Below the base, symbolic links are refused: the jailer, as root, would follow them
        // out of the jail when it copies and changes owners.
        let below_base = [
            self.base_dir.join(&self.exec_name),
            self.jail_dir(),
            self.root_dir(),
            self.root_dir().join("run"),
        ];
        for dir in std::iter::once(self.base_dir.clone()).chain(below_base.iter().cloned()) {
            let meta = if dir == self.base_dir {
                std::fs::metadata(&dir)
            } else {
                std::fs::symlink_metadata(&dir)
            };
            match meta {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => return Err(ArgsError::Symlink(dir)),
                Ok(_) => return Err(ArgsError::NotADirectory(dir)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) => return Err(ArgsError::Inaccessible(dir, e.to_string())),
            }
        }
        let jailed = self.root_dir().join(&self.exec_name);
        if jailed.symlink_metadata().is_ok() {
            return Err(ArgsError::AlreadyJailed {
                id: self.id.clone(),
                path: jailed,
            });
        }
        if let Some(ns) = &self.netns {
            if let Err(e) = std::fs::metadata(ns) {
                return Err(ArgsError::Netns(ns.clone(), e.to_string()));
            }
        }
        Ok(file)
    }
}

/// What is wrong with the command line.
#[derive(Debug)]
pub enum ArgsError {
    /// argh's own message (unknown flag, missing required flag, bad number).
    Parse(String),
    InvalidId(String),
    /// --uid or --gid 4294967295, which chown(2) takes as "leave unchanged".
    InvalidOwner(&'static str),
    ExecFile(PathBuf, String),
    ExecName(PathBuf),
    BaseDir(String),
    NotADirectory(PathBuf),
    Symlink(PathBuf),
    Inaccessible(PathBuf, String),
    AlreadyJailed {
        id: String,
        path: PathBuf,
    },
    Netns(PathBuf, String),
    Cgroup {
        arg: String,
        reason: String,
    },
    CgroupVersion(String),
    ParentCgroup(String),
    ResourceLimit {
        arg: String,
        reason: String,
    },
}

impl fmt::Display for ArgsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgsError::Parse(msg) => write!(f, "{msg}"),
            ArgsError::InvalidOwner(flag) => write!(
                f,
                "invalid --{flag} 4294967295: that is (uid_t)-1, which chown(2) takes as \
                 \"leave unchanged\""
            ),
            ArgsError::InvalidId(id) => write!(
                f,
                "invalid --id {id:?}: it must be 1 to 64 characters of A-Z, a-z, 0-9 and -"
            ),
            ArgsError::ExecFile(p, why) => write!(f, "invalid --exec-file {p:?}: {why}"),
            ArgsError::ExecName(p) => write!(
                f,
                "invalid --exec-file {p:?}: its file name must be valid UTF-8"
            ),
            ArgsError::BaseDir(why) => write!(f, "invalid --chroot-base-dir: {why}"),
            ArgsError::NotADirectory(p) => write!(
                f,
                "invalid --chroot-base-dir: {p:?} exists and is not a directory (the base and \
                 the jail below it must be directories)"
            ),
            ArgsError::Symlink(p) => write!(
                f,
                "{p:?} is a symbolic link: the jail's directories must be real directories"
            ),
            ArgsError::Inaccessible(p, why) => write!(f, "cannot inspect {p:?}: {why}"),
            ArgsError::AlreadyJailed { id, path } => write!(
                f,
                "the id {id:?} is already jailed: {path:?} exists (remove the jail or pick another id)"
            ),
            ArgsError::Netns(p, why) => write!(f, "invalid --netns {p:?}: {why}"),
            ArgsError::Cgroup { arg, reason } => write!(f, "invalid --cgroup {arg:?}: {reason}"),
            ArgsError::CgroupVersion(v) => {
                write!(f, "invalid --cgroup-version {v:?}: expected 1 or 2")
            }
            ArgsError::ParentCgroup(p) => write!(
                f,
                "invalid --parent-cgroup {p:?}: it must be a relative path of non-empty names, \
                 without . or .."
            ),
            ArgsError::ResourceLimit { arg, reason } => {
                write!(f, "invalid --resource-limit {arg:?}: {reason}")
            }
        }
    }
}

impl std::error::Error for ArgsError {}

/// What the command line asks for.
pub enum Parsed {
    Run(Box<Config>),
    /// `--help` or `--version`: print this and exit 0.
    Print(String),
}

/// 1 to 64 characters of [A-Za-z0-9-], like Firecracker's instance ids.
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
}

/// Parses `argv` (without the program name).
pub fn parse(argv: &[String]) -> Result<Parsed, ArgsError> {
    let split = argv.iter().position(|a| a == "--").unwrap_or(argv.len());
    let (ours, vmm) = argv.split_at(split);
    let vmm_args: Vec<String> = vmm.iter().skip(1).cloned().collect();
    if ours.iter().any(|a| a == "--version") {
        return Ok(Parsed::Print(format!(
            "ember-jailer v{}",
            env!("CARGO_PKG_VERSION")
        )));
    }
    let strs: Vec<&str> = ours.iter().map(String::as_str).collect();
    let raw = match RawArgs::from_args(&["ember-jailer"], &strs) {
        Ok(raw) => raw,
        Err(early) if early.status.is_ok() => return Ok(Parsed::Print(early.output)),
        Err(early) => return Err(ArgsError::Parse(early.output.trim_end().to_string())),
    };
    validate(raw, vmm_args).map(|c| Parsed::Run(Box::new(c)))
}

fn validate(raw: RawArgs, vmm_args: Vec<String>) -> Result<Config, ArgsError> {
    if !valid_id(&raw.id) {
        return Err(ArgsError::InvalidId(raw.id));
    }
    if raw.uid == u32::MAX {
        return Err(ArgsError::InvalidOwner("uid"));
    }
    if raw.gid == u32::MAX {
        return Err(ArgsError::InvalidOwner("gid"));
    }
    let exec_file = PathBuf::from(&raw.exec_file);
    if raw.exec_file.is_empty() {
        return Err(ArgsError::ExecFile(exec_file, "empty path".into()));
    }
    let exec_name = match exec_file.file_name() {
        Some(n) => n
            .to_str()
            .ok_or_else(|| ArgsError::ExecName(exec_file.clone()))?
            .to_string(),
        None => {
            return Err(ArgsError::ExecFile(
                exec_file,
                "the path does not end in a file name".into(),
            ))
        }
    };
    if raw.chroot_base_dir.is_empty() {
        return Err(ArgsError::BaseDir("empty path".into()));
    }
    let base_dir = std::path::absolute(&raw.chroot_base_dir)
        .map_err(|e| ArgsError::BaseDir(format!("{:?}: {e}", raw.chroot_base_dir)))?;

    let cgroup_version = match raw.cgroup_version.as_str() {
        "1" => CgroupVersion::V1,
        "2" => CgroupVersion::V2,
        _ => return Err(ArgsError::CgroupVersion(raw.cgroup_version)),
    };
    let cgroups = raw
        .cgroup
        .iter()
        .map(|arg| {
            CgroupSetting::parse(arg).map_err(|reason| ArgsError::Cgroup {
                arg: arg.clone(),
                reason,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let parent = raw.parent_cgroup.unwrap_or_else(|| exec_name.clone());
    let parent_cgroup = relative_cgroup_path(&parent).ok_or(ArgsError::ParentCgroup(parent))?;

    let mut rlimits = Vec::new();
    for arg in &raw.resource_limit {
        let r = parse_rlimit(arg).map_err(|reason| ArgsError::ResourceLimit {
            arg: arg.clone(),
            reason,
        })?;
        rlimits.retain(|(res, _)| *res != r.0);
        rlimits.push(r);
    }
    if !rlimits.iter().any(|(r, _)| *r == Resource::NoFile) {
        rlimits.push((Resource::NoFile, DEFAULT_NO_FILE));
    }

    Ok(Config {
        id: raw.id,
        exec_file,
        exec_name,
        uid: raw.uid,
        gid: raw.gid,
        base_dir,
        netns: raw.netns.map(PathBuf::from),
        daemonize: raw.daemonize,
        new_pid_ns: raw.new_pid_ns,
        cgroups,
        cgroup_version,
        parent_cgroup,
        rlimits,
        vmm_args,
    })
}

/// A relative path of plain names (no root, no `.`, no `..`, nothing empty).
fn relative_cgroup_path(s: &str) -> Option<PathBuf> {
    if s.is_empty() || s.starts_with('/') || s.contains('\n') {
        return None;
    }
    let p = Path::new(s);
    if s.split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return None;
    }
    if !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return None;
    }
    Some(p.to_path_buf())
}

fn parse_rlimit(arg: &str) -> Result<(Resource, u64), String> {
    let Some((name, value)) = arg.split_once('=') else {
        return Err("expected RESOURCE=VALUE, e.g. no-file=1024".into());
    };
    let res = match name {
        "fsize" => Resource::Fsize,
        "no-file" => Resource::NoFile,
        _ => {
            return Err(format!(
                "unknown resource {name:?}; expected fsize or no-file"
            ))
        }
    };
    let n: u64 = value
        .parse()
        .map_err(|_| format!("{value:?} is not a non-negative integer"))?;
    Ok((res, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn base(extra: &[&str]) -> Vec<String> {
        let mut v = args(&[
            "--id",
            "vm-1",
            "--exec-file",
            "/usr/bin/ember",
            "--uid",
            "123",
            "--gid",
            "100",
        ]);
        v.extend(args(extra));
        v
    }

    fn config(extra: &[&str]) -> Result<Config, ArgsError> {
        match parse(&base(extra))? {
            Parsed::Run(c) => Ok(*c),
            Parsed::Print(p) => panic!("unexpected print {p}"),
        }
    }

    #[test]
    fn defaults() {
        let c = config(&[]).unwrap();
        assert_eq!(c.exec_name, "ember");
        assert_eq!(c.base_dir, PathBuf::from("/srv/jailer"));
        assert_eq!(c.root_dir(), PathBuf::from("/srv/jailer/ember/vm-1/root"));
        assert_eq!(c.parent_cgroup, PathBuf::from("ember"));
        assert_eq!(c.cgroup_version, CgroupVersion::V1);
        assert_eq!(c.rlimits, vec![(Resource::NoFile, 2048)]);
        assert!(c.vmm_args.is_empty());
        assert!(!c.daemonize && !c.new_pid_ns);
    }

    #[test]
    fn everything_after_double_dash_goes_to_the_vmm() {
        let c = config(&["--daemonize", "--", "--no-api", "--", "--id", "x"]).unwrap();
        assert!(c.daemonize);
        assert_eq!(c.vmm_args, args(&["--no-api", "--", "--id", "x"]));
        assert_eq!(c.id, "vm-1");
    }

    #[test]
    fn ids() {
        assert!(valid_id("a"));
        assert!(valid_id(&"a".repeat(64)));
        assert!(!valid_id(&"a".repeat(65)));
        assert!(!valid_id(""));
        for bad in ["a/b", "..", "a.b", "a_b", "é", "a b"] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    /// (uid_t)-1 would leave the jail root-owned (chown's "unchanged") and only fail at the
    /// setuid, after the jail is built.
    #[test]
    fn minus_one_owners_are_refused() {
        let mut argv = base(&[]);
        argv[5] = u32::MAX.to_string();
        assert!(matches!(parse(&argv), Err(ArgsError::InvalidOwner("uid"))));
        let mut argv = base(&[]);
        argv[7] = u32::MAX.to_string();
        assert!(matches!(parse(&argv), Err(ArgsError::InvalidOwner("gid"))));
        let mut argv = base(&[]);
        argv[5] = (u32::MAX - 1).to_string();
        assert!(matches!(parse(&argv), Ok(Parsed::Run(c)) if c.uid == u32::MAX - 1));
    }

    #[test]
    fn resource_limits() {
        let c = config(&[
            "--resource-limit",
            "fsize=10",
            "--resource-limit",
            "no-file=5",
        ])
        .unwrap();
        assert_eq!(
            c.rlimits,
            vec![(Resource::Fsize, 10), (Resource::NoFile, 5)]
        );
        for bad in ["fsize", "nproc=1", "fsize=-1", "no-file=x"] {
            let e = config(&["--resource-limit", bad]).unwrap_err();
            assert!(matches!(e, ArgsError::ResourceLimit { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn parent_cgroups() {
        let c = config(&["--parent-cgroup", "all/vms"]).unwrap();
        assert_eq!(c.parent_cgroup, PathBuf::from("all/vms"));
        for bad in ["", "/abs", "a/../b", "..", "a//b", "./a", "a/"] {
            let e = config(&["--parent-cgroup", bad]).unwrap_err();
            assert!(matches!(e, ArgsError::ParentCgroup(_)), "{bad}: {e}");
        }
    }

    #[test]
    fn cgroup_flags() {
        let c = config(&[
            "--cgroup",
            "cpu.shares=512",
            "--cgroup",
            "cpu.max=max 100000",
            "--cgroup-version",
            "2",
        ])
        .unwrap();
        assert_eq!(c.cgroup_version, CgroupVersion::V2);
        assert_eq!(c.cgroups.len(), 2);
        assert_eq!(c.cgroups[1].value, "max 100000");
        for bad in [
            "cpu/shares=1",
            "../x.y=1",
            "cpu=1",
            "cpu.shares",
            ".x=1",
            "cpu.=1",
        ] {
            let e = config(&["--cgroup", bad]).unwrap_err();
            assert!(matches!(e, ArgsError::Cgroup { .. }), "{bad}: {e}");
        }
        let e = config(&["--cgroup-version", "3"]).unwrap_err();
        assert!(matches!(e, ArgsError::CgroupVersion(_)));
    }

    /// What is copied into the jail is the file checked, even when its path is given to
    /// another file afterwards.
    #[test]
    fn check_host_returns_the_exec_file_it_checked() {
        let dir =
            std::env::temp_dir().join(format!("ember-jailer-unit-exec-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let exec = dir.join("ember");
        std::fs::write(&exec, b"\x7fELF checked").unwrap();
        let mut argv = base(&["--chroot-base-dir", dir.join("base").to_str().unwrap()]);
        argv[3] = exec.to_str().unwrap().to_string();
        let Ok(Parsed::Run(cfg)) = parse(&argv) else {
            panic!("{argv:?}")
        };
        let mut file = cfg.check_host().unwrap();
        let other = dir.join("other");
        std::fs::write(&other, b"not checked").unwrap();
        std::fs::rename(&other, &exec).unwrap();
        let mut copied = Vec::new();
        file.read_to_end(&mut copied).unwrap();
        assert_eq!(copied, b"\x7fELF checked");
        // A FIFO is refused, and does not block the check.
        std::fs::remove_file(&exec).unwrap();
        let c = std::ffi::CString::new(exec.to_str().unwrap()).unwrap();
        // SAFETY: `c` is a valid C string that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(cfg.check_host(), Err(ArgsError::ExecFile(..))));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn required_flags_and_help() {
        assert!(matches!(
            parse(&args(&["--id", "x"])),
            Err(ArgsError::Parse(_))
        ));
        assert!(matches!(parse(&args(&["--help"])), Ok(Parsed::Print(_))));
        assert!(matches!(parse(&args(&["--version"])), Ok(Parsed::Print(_))));
        assert!(matches!(
            parse(&base(&["--uid", "x"])),
            Err(ArgsError::Parse(_))
        ));
    }
}
