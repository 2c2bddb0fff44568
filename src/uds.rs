//! Unix-domain socket helpers shared by the API server and the vsock device: both bind a
//! listener at a path a client names, and both connect to host listeners.

use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Connects to a host listener without waiting. A Unix socket connects at once or, when the
/// listener's backlog is full (a host service that stopped accepting), blocks in connect(2)
/// until it accepts: the VMM thread, and every device with it, would wait on the host. Made
/// non-blocking, that is EAGAIN at once, and the guest hears a RST. (Also used to ask whether a
/// socket file is live.)
pub fn connect_nonblocking(path: &std::path::Path) -> io::Result<UnixStream> {
    // SAFETY: sockaddr_un is plain old data, for which all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    // One byte stays zero: the path's terminating NUL.
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (d, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the fd it returns is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket nobody else owns; the stream closes it on every path.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un of which `len` bytes are used.
    let r = unsafe {
        libc::connect(
            fd,
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

/// Whether a listener serves the socket file at `path`.
fn is_live(path: &Path) -> io::Result<bool> {
    let err = match connect_nonblocking(path) {
        Ok(_) => return Ok(true),
        Err(e) => e,
    };
    match err.raw_os_error() {
        Some(libc::ECONNREFUSED) => Ok(false),
        // A listener with a full backlog is still a live one.
        Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => Ok(true),
        _ => Err(err),
    }
}

/// A socket file ember bound: removed at the end only while it is still the one ember made
/// (the path may have been unlinked and reused by another process meanwhile).
#[derive(Clone, Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// Device, inode and birth time: an inode number alone is reused at once, and the change
    /// time moves with a chmod (which operators do to the API socket).
    id: (u64, u64, Option<std::time::SystemTime>),
}

fn identity(m: &std::fs::Metadata) -> (u64, u64, Option<std::time::SystemTime>) {
    (m.dev(), m.ino(), m.created().ok())
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn remove(&self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| identity(&m) == self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds a listener at `path`, a path a client or the command line named. A stale socket there
/// (nobody listening) is replaced; a live one (another process's, or another VM's) or any
/// other file is an error, and stays as it was: a mistyped path must not delete a file or take
/// over another service's socket.
pub fn bind_listener(path: &Path) -> io::Result<(UnixListener, SocketFile)> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            match is_live(path) {
                // Still the same stale socket (not one swapped in since): replaced.
                Ok(false) => {
                    let same = std::fs::symlink_metadata(path)
                        .is_ok_and(|m| identity(&m) == identity(&meta));
                    if same {
                        std::fs::remove_file(path)?;
                    }
                }
                Ok(true) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("another process serves the socket {}", path.display()),
                    ))
                }
                // Gone since: nothing to replace.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("cannot tell whether {} is in use: {e}", path.display()),
                    ))
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    let m = std::fs::symlink_metadata(path)?;
    Ok((
        listener,
        SocketFile {
            path: path.to_path_buf(),
            id: identity(&m),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_stale_sockets_are_replaced() {
        let dir = std::env::temp_dir().join(format!("ember-uds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A regular file stays, untouched.
        let file = dir.join("file");
        std::fs::write(&file, b"precious").unwrap();
        let e = bind_listener(&file).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");
        // A live socket stays its owner's.
        let live = dir.join("live");
        let owner = UnixListener::bind(&live).unwrap();
        let e = bind_listener(&live).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        assert!(UnixStream::connect(&live).is_ok());
        // Once its owner is gone, it is stale: replaced.
        drop(owner);
        let (ours, file) = bind_listener(&live).unwrap();
        drop(ours);
        // Removed at the end only while it is still ours: not once another took the path.
        std::fs::remove_file(&live).unwrap();
        let other = UnixListener::bind(&live).unwrap();
        file.remove();
        assert!(live.exists(), "another process's socket was removed");
        drop(other);
        std::fs::remove_file(&live).unwrap();
        let (_l, file) = bind_listener(&live).unwrap();
        // A chmod (as operators do to the API socket) keeps it ours.
        std::fs::set_permissions(&live, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        file.remove();
        assert!(!live.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
