//! Thin, checked wrappers around the system calls the jailer needs. Every `unsafe` block of the
//! crate lives here, each with the reason it is sound.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// A path as a C string for the kernel.
pub fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_long(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Microseconds on `clock` (CLOCK_MONOTONIC, CLOCK_PROCESS_CPUTIME_ID).
pub fn clock_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the call only writes to it.
    let ret = unsafe { libc::clock_gettime(clock, &mut ts) };
    if ret != 0 {
        return 0;
    }
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

/// Closes every file descriptor above 2.
pub fn close_fds_above_stdio() {
    // SAFETY: close_range takes plain integers; closing descriptors this process does not use
    // any more is the point (nothing in the process holds them yet: this runs first in main).
    let ret = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if ret == 0 {
        return;
    }
    // Older kernels: close what /proc/self/fd lists (the directory's own fd is closed by the
    // time the list is complete, so closing it again only gives EBADF).
    let fds: Vec<libc::c_int> = match std::fs::read_dir("/proc/self/fd") {
        Ok(rd) => rd
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|&fd| fd > 2)
            .collect(),
        Err(_) => (3..1024).collect(),
    };
    for fd in fds {
        // SAFETY: closing an integer descriptor; an unused one just gives EBADF.
        unsafe { libc::close(fd) };
    }
}

/// mknod(path, S_IFCHR | mode, makedev(major, minor)).
pub fn mknod_char(path: &Path, mode: libc::mode_t, major: u32, minor: u32) -> io::Result<()> {
    let c = cstr(path)?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    check(unsafe {
        libc::mknod(
            c.as_ptr(),
            libc::S_IFCHR | mode,
            libc::makedev(major, minor),
        )
    })
    .map(drop)
}

/// fchownat(fd, "", uid, gid, AT_EMPTY_PATH): the owner of the file `fd` refers to, which may
/// be an O_PATH descriptor.
pub fn fchown_fd(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: `fd` is a live descriptor borrowed for the call and the path is a static empty
    // C string, which AT_EMPTY_PATH makes the kernel take as `fd` itself.
    check(unsafe { libc::fchownat(fd.as_raw_fd(), c"".as_ptr(), uid, gid, libc::AT_EMPTY_PATH) })
        .map(drop)
}

/// The (major, minor) of a device number.
pub fn dev_major_minor(rdev: u64) -> (u32, u32) {
    (libc::major(rdev), libc::minor(rdev))
}

/// unshare(flags).
pub fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: unshare takes only flags and touches no memory of ours.
    check(unsafe { libc::unshare(flags) }).map(drop)
}

/// The CLONE_NEW* type of a namespace file (ioctl NS_GET_NSTYPE); ENOTTY for other files.
pub fn ns_type(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    // _IO(0xb7, 0x3) from <linux/nsfs.h>.
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: this ioctl takes no argument and only returns an integer.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE) })
}

/// setns(fd, nstype).
pub fn setns(fd: BorrowedFd<'_>, nstype: libc::c_int) -> io::Result<()> {
    // SAFETY: `fd` is a live descriptor borrowed for the duration of the call.
    check(unsafe { libc::setns(fd.as_raw_fd(), nstype) }).map(drop)
}

/// mount(NULL, target, NULL, flags, NULL): changes propagation of an existing mount.
pub fn mount_propagation(target: &Path, flags: libc::c_ulong) -> io::Result<()> {
    let t = cstr(target)?;
    // SAFETY: `t` is a valid C string; the other pointers are NULL, which mount(2) accepts
    // for a propagation change.
    check(unsafe {
        libc::mount(
            std::ptr::null(),
            t.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    })
    .map(drop)
}

/// mount(path, path, NULL, MS_BIND, NULL): a bind mount of `path` onto itself.
pub fn bind_onto_itself(path: &Path) -> io::Result<()> {
    let p = cstr(path)?;
    // SAFETY: source and target are the same valid C string; fstype and data may be NULL for
    // MS_BIND.
    check(unsafe {
        libc::mount(
            p.as_ptr(),
            p.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    })
    .map(drop)
}

/// pivot_root(new_root, put_old).
pub fn pivot_root(new_root: &Path, put_old: &Path) -> io::Result<()> {
    let n = cstr(new_root)?;
    let o = cstr(put_old)?;
    // SAFETY: both arguments are valid C strings that outlive the call.
    check_long(unsafe { libc::syscall(libc::SYS_pivot_root, n.as_ptr(), o.as_ptr()) }).map(drop)
}

/// umount2(target, MNT_DETACH).
pub fn umount_detach(target: &Path) -> io::Result<()> {
    let t = cstr(target)?;
    // SAFETY: `t` is a valid C string that outlives the call.
    check(unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) }).map(drop)
}

/// setrlimit(resource, {value, value}).
pub fn set_rlimit(resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: `lim` is a valid rlimit the kernel only reads.
    check(unsafe { libc::setrlimit(resource, &lim) }).map(drop)
}

/// What fork returned on this side.
pub enum Forked {
    Parent(libc::pid_t),
    Child,
}

/// fork(). The jailer is single-threaded, so the child may go on running Rust code.
pub fn fork() -> io::Result<Forked> {
    // SAFETY: the process has a single thread (the jailer never spawns any), so the child
    // inherits consistent locks and allocator state.
    let pid = check(unsafe { libc::fork() })?;
    Ok(if pid == 0 {
        Forked::Child
    } else {
        Forked::Parent(pid)
    })
}

/// setsid().
pub fn setsid() -> io::Result<()> {
    // SAFETY: no arguments, no memory touched.
    check(unsafe { libc::setsid() }).map(drop)
}

/// dup2(from, to).
pub fn dup2(from: BorrowedFd<'_>, to: libc::c_int) -> io::Result<()> {
    // SAFETY: `from` is a live descriptor; `to` is one of the standard descriptors, which the
    // caller means to replace.
    check(unsafe { libc::dup2(from.as_raw_fd(), to) }).map(drop)
}

/// setgroups(0, NULL), setgid(gid), setuid(uid): drops every privilege of root.
pub fn drop_privileges(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: an empty list needs no buffer; the kernel reads nothing.
    check(unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: plain integer argument.
    check(unsafe { libc::setgid(gid) })?;
    // SAFETY: plain integer argument.
    check(unsafe { libc::setuid(uid) })?;
    Ok(())
}

/// execve(path, argv, envp) with an empty environment. Returns only on failure.
pub fn execve_empty_env(path: &Path, argv: &[CString]) -> io::Error {
    let p = match cstr(path) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: `p`, every string of `argv` and both NULL-terminated pointer arrays stay alive
    // for the call; on success the process image is replaced and nothing here is used again.
    unsafe { libc::execve(p.as_ptr(), ptrs.as_ptr(), envp.as_ptr()) };
    io::Error::last_os_error()
}

/// Runs `f` with the process's umask at 0, then puts the old one back. Tests only: the umask is
/// the process's, so callers take turns.
#[cfg(test)]
pub fn with_umask_0<T>(f: impl FnOnce() -> T) -> T {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: umask only swaps the process's file mode mask; the old one is put back below.
    let old = unsafe { libc::umask(0) };
    let out = f();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    out
}
