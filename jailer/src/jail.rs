//! The jail's file system: `<base>/<exec name>/<id>/root` with a private copy of the VMM, the
//! switch into it (`pivot_root`), and the device nodes inside.

use std::fmt;
use std::fs::{self, OpenOptions, Permissions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::sys;

/// What went wrong building the jail.
#[derive(Debug)]
pub enum JailError {
    CreateDir(PathBuf, io::Error),
    Copy {
        from: PathBuf,
        to: PathBuf,
        err: io::Error,
    },
    Chown(PathBuf, io::Error),
    Chmod(PathBuf, io::Error),
    /// A step of the switch into the new root: what, and why it failed.
    Pivot(&'static str, io::Error),
    Mknod(PathBuf, io::Error),
    /// Not what the jailer created there a moment before.
    Replaced(PathBuf, Kind),
}

impl fmt::Display for JailError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JailError::CreateDir(p, e) => write!(f, "cannot create the directory {p:?}: {e}"),
            JailError::Copy { from, to, err } => {
                write!(f, "cannot copy the exec file {from:?} to {to:?}: {err}")
            }
            JailError::Chown(p, e) => write!(f, "cannot change the owner of {p:?}: {e}"),
            JailError::Chmod(p, e) => write!(f, "cannot change the mode of {p:?}: {e}"),
            JailError::Pivot(step, e) => write!(f, "cannot enter the jail ({step}): {e}"),
            JailError::Mknod(p, e) => write!(f, "cannot create the device node {p:?}: {e}"),
            JailError::Replaced(p, Kind::Dir) => {
                write!(f, "{p:?} is not a directory (was it replaced?)")
            }
            JailError::Replaced(p, Kind::CharDev(major, minor)) => write!(
                f,
                "{p:?} is not the character device {major}:{minor} (was it replaced?)"
            ),
        }
    }
}

impl std::error::Error for JailError {}

/// What `prepare` created, so that a failure before the jail is entered leaves nothing behind.
#[derive(Default)]
pub struct Created {
    dirs: Vec<PathBuf>,
    files: Vec<PathBuf>,
}

impl Created {
    /// Removes what was created, newest first. Directories that are not empty (the caller put
    /// files there) stay.
    pub fn rollback(&self) {
        for f in self.files.iter().rev() {
            let _ = fs::remove_file(f);
        }
        for d in self.dirs.iter().rev() {
            let _ = fs::remove_dir(d);
        }
    }
}

fn create_dir_all(dir: &Path, created: &mut Created) -> Result<(), JailError> {
    let mut missing = Vec::new();
    for p in dir.ancestors() {
        if p.as_os_str().is_empty() || p.is_dir() {
            break;
        }
        missing.push(p);
    }
    for p in missing.into_iter().rev() {
        // At most 0755 whatever the caller's umask: a directory others may write to on the
        // way to the root would let them swap the root for a link.
        match fs::DirBuilder::new().mode(0o755).create(p) {
            Ok(()) => created.dirs.push(p.to_path_buf()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && p.is_dir() => {}
            Err(e) => return Err(JailError::CreateDir(p.to_path_buf(), e)),
        }
    }
    Ok(())
}

/// What `own` expects to find at its path.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Dir,
    /// A character device with this (major, minor).
    CharDev(u32, u32),
}

/// Changes the owner of `path` when it is the `kind` expected. uid owns the jail's root and
/// may put anything there at any time, such as a hard link to a host file where a device
/// node was just made: the path is opened once (never through a final symbolic link), checked,
/// and changed through that descriptor.
fn own(path: &Path, kind: Kind, uid: u32, gid: u32) -> Result<(), JailError> {
    let err = |e| JailError::Chown(path.to_path_buf(), e);
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)
        .map_err(err)?;
    let m = f.metadata().map_err(err)?;
    let ok = match kind {
        Kind::Dir => m.is_dir(),
        Kind::CharDev(major, minor) => {
            m.file_type().is_char_device() && sys::dev_major_minor(m.rdev()) == (major, minor)
        }
    };
    if !ok {
        return Err(JailError::Replaced(path.to_path_buf(), kind));
    }
    sys::fchown_fd(f.as_fd(), uid, gid).map_err(err)
}

/// Copies (never links) `src`, the exec file opened from `exec`, to `<root>/<name>`, mode 0755,
/// owned by uid:gid. The target must not exist.
fn copy_exec(
    exec: &Path,
    src: &mut fs::File,
    target: &Path,
    uid: u32,
    gid: u32,
    created: &mut Created,
) -> Result<(), JailError> {
    let err = |err| JailError::Copy {
        from: exec.to_path_buf(),
        to: target.to_path_buf(),
        err,
    };
    let mut dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o700)
        .open(target)
        .map_err(err)?;
    created.files.push(target.to_path_buf());
    io::copy(src, &mut dst).map_err(err)?;
    // Through the descriptor, never the path: uid owns the root and may have put anything
    // (a symbolic link to a host file) at `target` by now.
    std::os::unix::fs::fchown(&dst, Some(uid), Some(gid))
        .map_err(|e| JailError::Chown(target.to_path_buf(), e))?;
    dst.set_permissions(Permissions::from_mode(0o755))
        .map_err(|e| JailError::Chmod(target.to_path_buf(), e))
}

/// Creates `<root>` (and what is missing above it), copies the VMM in, gives the root and
/// `<root>/run` (where the API socket goes) to uid:gid.
pub fn prepare(
    root: &Path,
    exec: &Path,
    exec_file: &mut fs::File,
    exec_name: &str,
    uid: u32,
    gid: u32,
    created: &mut Created,
) -> Result<(), JailError> {
    create_dir_all(root, created)?;
    copy_exec(exec, exec_file, &root.join(exec_name), uid, gid, created)?;
    own(root, Kind::Dir, uid, gid)?;
    let run = root.join("run");
    create_dir_all(&run, created)?;
    own(&run, Kind::Dir, uid, gid)?;
    Ok(())
}

/// Makes `root` the process's `/` in a new mount namespace; the host's tree is detached.
pub fn pivot_into(root: &Path) -> Result<(), JailError> {
    let step = |what| move |e| JailError::Pivot(what, e);
    sys::unshare(libc::CLONE_NEWNS).map_err(step("unshare the mount namespace"))?;
    // Nothing done in here may propagate back to the host; pivot_root also refuses shared
    // mounts.
    sys::mount_propagation(Path::new("/"), libc::MS_SLAVE | libc::MS_REC)
        .map_err(step("make / a recursive slave"))?;
    // pivot_root needs the new root to be a mount point.
    sys::bind_onto_itself(root).map_err(step("bind-mount the root onto itself"))?;
    std::env::set_current_dir(root).map_err(step("chdir into the root"))?;
    // pivot_root(".", ".") stacks the old root on top of the new one at /, and unmounting "."
    // then detaches the old root (pivot_root(2)): no old_root directory to create in the jail
    // and remove again, which cost ~0.5 ms of the jailer's run on ext4.
    sys::pivot_root(Path::new("."), Path::new(".")).map_err(step("pivot_root"))?;
    sys::umount_detach(Path::new(".")).map_err(step("unmount the old root"))?;
    std::env::set_current_dir("/").map_err(step("chdir to /"))?;
    std::os::unix::fs::chroot(".").map_err(step("chroot"))?;
    Ok(())
}

/// The host's /dev/userfaultfd as (major, minor), when it has one. Read before the pivot.
pub fn host_userfaultfd() -> Option<(u32, u32)> {
    let m = fs::metadata("/dev/userfaultfd").ok()?;
    m.file_type()
        .is_char_device()
        .then(|| sys::dev_major_minor(m.rdev()))
}

/// Creates /dev/kvm, /dev/net/tun, /dev/urandom and, when the host has it, /dev/userfaultfd,
/// all owned by uid:gid. Runs inside the jail.
pub fn make_devices(uid: u32, gid: u32, userfaultfd: Option<(u32, u32)>) -> Result<(), JailError> {
    let mut created = Created::default();
    create_dir_all(Path::new("/dev/net"), &mut created)?;
    let mut nodes = vec![
        ("/dev/kvm", 10, 232),
        ("/dev/net/tun", 10, 200),
        ("/dev/urandom", 1, 9),
    ];
    if let Some((major, minor)) = userfaultfd {
        nodes.push(("/dev/userfaultfd", major, minor));
    }
    for (path, major, minor) in nodes {
        let p = Path::new(path);
        sys::mknod_char(p, libc::S_IRUSR | libc::S_IWUSR, major, minor)
            .map_err(|e| JailError::Mknod(p.to_path_buf(), e))?;
        own(p, Kind::CharDev(major, minor), uid, gid)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::{Duration, Instant};

    /// A fresh scratch directory, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let p = std::env::temp_dir()
                .join(format!("ember-jailer-unit-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            Scratch(p)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn ids() -> (u32, u32) {
        // SAFETY: geteuid/getegid take no arguments and cannot fail.
        unsafe { (libc::geteuid(), libc::getegid()) }
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    /// While the copy runs, the tenant (who owns the jail root) swaps the new file for a
    /// symbolic link to a host file: the owner and mode go to the copy, never to that file.
    #[test]
    fn copy_exec_changes_only_the_copy_when_swapped_for_a_symlink() {
        let s = Scratch::new("swap");
        let (uid, gid) = ids();
        let victim = s.0.join("victim");
        fs::write(&victim, "secret").unwrap();
        fs::set_permissions(&victim, Permissions::from_mode(0o600)).unwrap();
        // A FIFO as the source holds the copy open until the swap is done.
        let fifo = s.0.join("exec");
        let c = sys::cstr(&fifo).unwrap();
        // SAFETY: `c` is a valid C string that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let target = s.0.join("ember");
        let swapper = {
            let (fifo, target, victim) = (fifo.clone(), target.clone(), victim.clone());
            std::thread::spawn(move || {
                let mut w = OpenOptions::new().write(true).open(&fifo).unwrap();
                w.write_all(b"\x7fELF").unwrap();
                let start = Instant::now();
                while target.symlink_metadata().is_err() {
                    assert!(start.elapsed() < Duration::from_secs(10), "no copy");
                    std::thread::sleep(Duration::from_millis(1));
                }
                fs::rename(&target, target.with_extension("moved")).unwrap();
                std::os::unix::fs::symlink(&victim, &target).unwrap();
            })
        };
        let mut src = fs::File::open(&fifo).unwrap();
        let mut created = Created::default();
        let res = copy_exec(&fifo, &mut src, &target, uid, gid, &mut created);
        swapper.join().unwrap();
        res.unwrap();
        assert_eq!(mode(&victim), 0o600, "the host file's mode changed");
        assert_eq!(fs::read(&victim).unwrap(), b"secret");
        let copy = target.with_extension("moved");
        assert_eq!(mode(&copy), 0o755);
        assert_eq!(fs::read(&copy).unwrap(), b"\x7fELF");
    }

    /// Under a caller's umask of 0, the jail's directories are still writable by root only.
    #[test]
    fn jail_directories_are_not_writable_by_others_under_umask_0() {
        let s = Scratch::new("umask");
        let root = s.0.join("base/ember/vm1/root");
        let mut created = Created::default();
        sys::with_umask_0(|| create_dir_all(&root, &mut created)).unwrap();
        for dir in [
            "base",
            "base/ember",
            "base/ember/vm1",
            "base/ember/vm1/root",
        ] {
            assert_eq!(mode(&s.0.join(dir)), 0o755, "{dir}");
        }
    }

    fn owner(p: &Path) -> (u32, u32) {
        let m = fs::symlink_metadata(p).unwrap();
        (m.uid(), m.gid())
    }

    /// After the checks, uid (who owns the root) replaced `run` with a symbolic link to a host
    /// directory.
    #[test]
    fn prepare_refuses_a_run_that_is_a_symlink() {
        let s = Scratch::new("runlink");
        let (uid, gid) = ids();
        let exec = s.0.join("exec");
        fs::write(&exec, "\x7fELF").unwrap();
        let root = s.0.join("root");
        let host = s.0.join("host");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&host).unwrap();
        std::os::unix::fs::symlink(&host, root.join("run")).unwrap();
        let mut created = Created::default();
        let mut src = fs::File::open(&exec).unwrap();
        let res = prepare(&root, &exec, &mut src, "ember", uid, gid, &mut created);
        assert!(matches!(res, Err(JailError::Replaced(..))), "{res:?}");
        created.rollback();
        assert!(!root.join("ember").exists());
    }

    /// A hard link to a host file put where a device node was just made keeps its owner.
    #[test]
    fn own_refuses_what_is_not_the_expected_kind() {
        let s = Scratch::new("own");
        let victim = s.0.join("victim");
        fs::write(&victim, "x").unwrap();
        let before = owner(&victim);
        let link = s.0.join("kvm");
        fs::hard_link(&victim, &link).unwrap();
        let (uid, gid) = (before.0 ^ 1, before.1 ^ 1);
        let res = own(&link, Kind::CharDev(10, 232), uid, gid);
        assert!(matches!(res, Err(JailError::Replaced(..))), "{res:?}");
        let res = own(&link, Kind::Dir, uid, gid);
        assert!(matches!(res, Err(JailError::Replaced(..))), "{res:?}");
        assert_eq!(owner(&victim), before);
        // A symbolic link to a directory is not a directory here.
        let dir = s.0.join("dir");
        fs::create_dir(&dir).unwrap();
        let dir_link = s.0.join("dirlink");
        std::os::unix::fs::symlink(&dir, &dir_link).unwrap();
        assert!(own(&dir_link, Kind::Dir, uid, gid).is_err());
        // The real thing works.
        let (my_uid, my_gid) = ids();
        own(&dir, Kind::Dir, my_uid, my_gid).unwrap();
    }
}
