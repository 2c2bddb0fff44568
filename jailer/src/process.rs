//! The process side: network namespace, resource limits, daemonizing, the PID namespace, and
//! finally dropping privileges and exec'ing the VMM.

use std::ffi::CString;
use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::args::Resource;
use crate::sys::{self, Forked};

/// What went wrong on the process side.
#[derive(Debug)]
pub enum ProcessError {
    Netns(PathBuf, io::Error),
    NotNetns(PathBuf),
    Rlimit(Resource, u64, io::Error),
    DevNull(io::Error),
    Daemonize(&'static str, io::Error),
    PidNs(&'static str, io::Error),
    PidFile(PathBuf, io::Error),
    Privileges { uid: u32, gid: u32, err: io::Error },
    Exec(PathBuf, io::Error),
    BadArg(String),
}

impl fmt::Display for ProcessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProcessError::Netns(p, e) => {
                write!(f, "cannot join the network namespace {p:?}: {e}")
            }
            ProcessError::NotNetns(p) => {
                write!(f, "invalid --netns {p:?}: not a network namespace file")
            }
            ProcessError::Rlimit(r, v, e) => {
                write!(f, "cannot set the resource limit {r}={v}: {e}")
            }
            ProcessError::DevNull(e) => write!(f, "cannot open /dev/null: {e}"),
            ProcessError::Daemonize(step, e) => write!(f, "cannot daemonize ({step}): {e}"),
            ProcessError::PidNs(step, e) => {
                write!(
                    f,
                    "cannot start the VMM in a new PID namespace ({step}): {e}"
                )
            }
            ProcessError::PidFile(p, e) => write!(f, "cannot write the pid file {p:?}: {e}"),
            ProcessError::Privileges { uid, gid, err } => {
                write!(f, "cannot switch to uid {uid}, gid {gid}: {err}")
            }
            ProcessError::Exec(p, e) if e.kind() == io::ErrorKind::NotFound => write!(
                f,
                "cannot exec {p:?} in the jail: {e} (a dynamically linked binary finds no loader \
                 there: the exec file must be static)"
            ),
            ProcessError::Exec(p, e) => write!(f, "cannot exec {p:?} in the jail: {e}"),
            ProcessError::BadArg(a) => write!(f, "the VMM argument {a:?} contains a NUL byte"),
        }
    }
}

impl std::error::Error for ProcessError {}

/// Opens the namespace file at `path` and checks that it is a network namespace.
pub fn open_netns(path: &Path) -> Result<File, ProcessError> {
    let err = |e| ProcessError::Netns(path.to_path_buf(), e);
    let f = File::open(path).map_err(err)?;
    match sys::ns_type(f.as_fd()) {
        Ok(t) if t == libc::CLONE_NEWNET => Ok(f),
        Ok(_) => Err(ProcessError::NotNetns(path.to_path_buf())),
        // Not a namespace file at all.
        Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => {
            Err(ProcessError::NotNetns(path.to_path_buf()))
        }
        Err(e) => Err(err(e)),
    }
}

/// setns(CLONE_NEWNET) on a file from `open_netns`.
pub fn join_netns(path: &Path, ns: &File) -> Result<(), ProcessError> {
    sys::setns(ns.as_fd(), libc::CLONE_NEWNET)
        .map_err(|e| ProcessError::Netns(path.to_path_buf(), e))
}

/// Sets each limit (soft = hard).
pub fn set_rlimits(limits: &[(Resource, u64)]) -> Result<(), ProcessError> {
    for &(res, value) in limits {
        let which = match res {
            Resource::Fsize => libc::RLIMIT_FSIZE,
            Resource::NoFile => libc::RLIMIT_NOFILE,
        };
        sys::set_rlimit(which, value).map_err(|e| ProcessError::Rlimit(res, value, e))?;
    }
    Ok(())
}

/// Opens /dev/null while the host's /dev is still visible.
pub fn open_dev_null() -> Result<File, ProcessError> {
    File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(ProcessError::DevNull)
}

/// Double fork with setsid in between; the caller's process exits 0 at once, the grandchild
/// returns here with stdin/stdout/stderr on /dev/null.
pub fn daemonize(dev_null: File) -> Result<(), ProcessError> {
    let step = |what| move |e| ProcessError::Daemonize(what, e);
    if let Forked::Parent(_) = sys::fork().map_err(step("first fork"))? {
        std::process::exit(0);
    }
    // Not a process group leader after the fork, so setsid works.
    sys::setsid().map_err(step("setsid"))?;
    // The session leader exits: the grandchild can never acquire a controlling terminal.
    if let Forked::Parent(_) = sys::fork().map_err(step("second fork"))? {
        std::process::exit(0);
    }
    for fd in [libc::STDIN_FILENO, libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        sys::dup2(dev_null.as_fd(), fd).map_err(step("redirect stdio to /dev/null"))?;
    }
    Ok(())
}

/// Forks the rest of the work into a new PID namespace, where it is pid 1. The parent writes
/// the child's pid (as the parent sees it) to `pid_file` and exits 0; the child returns.
pub fn enter_new_pid_ns(pid_file: &Path) -> Result<(), ProcessError> {
    sys::unshare(libc::CLONE_NEWPID).map_err(|e| ProcessError::PidNs("unshare", e))?;
    match sys::fork().map_err(|e| ProcessError::PidNs("fork", e))? {
        Forked::Child => Ok(()),
        Forked::Parent(pid) => {
            if let Err(e) = write_pid_file(pid_file, pid) {
                let err = ProcessError::PidFile(pid_file.to_path_buf(), e);
                eprintln!("ember-jailer: {err}");
                std::process::exit(1);
            }
            std::process::exit(0);
        }
    }
}

/// Writes `pid` to `path`, in the jail's root, which uid owns: whatever is there (a FIFO that
/// would block, a symbolic or hard link to a host file that would be truncated) is removed, and
/// the file is created anew.
fn write_pid_file(path: &Path, pid: libc::pid_t) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // O_CREAT | O_EXCL: fails on anything put back in the meantime, never follows it.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)?;
    f.write_all(pid.to_string().as_bytes())
}

/// Drops to uid:gid (no supplementary groups) and execs `path` with `args` and an empty
/// environment. Returns only on failure.
pub fn exec_as(path: &Path, args: &[String], uid: u32, gid: u32) -> ProcessError {
    let mut argv = Vec::with_capacity(args.len() + 1);
    for a in std::iter::once(path.to_string_lossy().into_owned()).chain(args.iter().cloned()) {
        match CString::new(a) {
            Ok(c) => argv.push(c),
            Err(e) => {
                let bytes = e.into_vec();
                return ProcessError::BadArg(String::from_utf8_lossy(&bytes).into_owned());
            }
        }
    }
    if let Err(err) = sys::drop_privileges(uid, gid) {
        return ProcessError::Privileges { uid, gid, err };
    }
    ProcessError::Exec(path.to_path_buf(), sys::execve_empty_env(path, &argv))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn pid_file_replaces_links_and_fifos_without_following_them() {
        let dir =
            std::env::temp_dir().join(format!("ember-jailer-unit-pid-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "secret").unwrap();
        let pid_file = dir.join("ember.pid");
        for plant in ["symlink", "hardlink", "fifo", "none"] {
            let _ = std::fs::remove_file(&pid_file);
            match plant {
                "symlink" => std::os::unix::fs::symlink(&victim, &pid_file).unwrap(),
                "hardlink" => std::fs::hard_link(&victim, &pid_file).unwrap(),
                "fifo" => {
                    let c = sys::cstr(&pid_file).unwrap();
                    // SAFETY: `c` is a valid C string that outlives the call.
                    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
                }
                _ => {}
            }
            // A FIFO nobody reads would block the open for good: time out instead.
            let (tx, rx) = std::sync::mpsc::channel();
            let p = pid_file.clone();
            std::thread::spawn(move || {
                let _ = tx.send(write_pid_file(&p, 1234).map_err(|e| e.to_string()));
            });
            let res = rx
                .recv_timeout(std::time::Duration::from_secs(5))
                .unwrap_or_else(|_| panic!("{plant}: writing the pid file blocked"));
            res.unwrap_or_else(|e| panic!("{plant}: {e}"));
            assert_eq!(std::fs::read(&victim).unwrap(), b"secret", "{plant}");
            let m = std::fs::symlink_metadata(&pid_file).unwrap();
            assert!(m.is_file(), "{plant}");
            assert_eq!(m.permissions().mode() & 0o022, 0, "{plant}");
            assert_eq!(std::fs::read_to_string(&pid_file).unwrap(), "1234");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
