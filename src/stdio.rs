//! Writing to the stdout ember shares with its parent (the console and the log go there by
//! default) without letting a parent that stops reading stall ember.
//!
//! ember must not make a shared file description non-blocking: the parent's own writes would
//! start failing. Instead each write is non-blocking on its own, with pwritev2(RWF_NOWAIT),
//! which pipes and sockets support. Elsewhere (an older kernel, a terminal, a regular file,
//! whose writes do not wait for a reader) it is a plain write(2).

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::Duration;

/// How long a writer waits for a reader that is behind before it drops output.
pub const STALL: Duration = Duration::from_millis(100);

/// Whether `fd` is a pipe or a socket: the kinds whose reader can hold a writer for ever.
pub fn is_stream(fd: RawFd) -> bool {
    // SAFETY: all-zero bytes are a valid `stat` (plain integers) for fstat(2) to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat(2) writes only into `st`; a bad descriptor only makes it fail.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return false;
    }
    matches!(st.st_mode & libc::S_IFMT, libc::S_IFIFO | libc::S_IFSOCK)
}

/// One write of `buf` to `fd`. For a pipe or a socket (`stream`) it does not wait for room:
/// `WouldBlock` when it is full. Allocates nothing and takes no lock (signal handlers use it),
/// and asks nothing of the kernel but the write (the vCPU threads' filters allow no fstat).
pub fn write_nowait(fd: RawFd, buf: &[u8], stream: bool) -> io::Result<usize> {
    if !stream {
        return plain_write(fd, buf);
    }
    loop {
        let iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: the iovec describes `buf`, which outlives the call; offset -1 is the file's
        // current position, as for write(2).
        let n = unsafe { libc::pwritev2(fd, &iov, 1, -1, libc::RWF_NOWAIT) };
        if let Ok(n) = usize::try_from(n) {
            return Ok(n);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            // A kernel without RWF_NOWAIT for this file: a plain write, as before.
            Some(libc::EOPNOTSUPP) => return plain_write(fd, buf),
            _ => return Err(e),
        }
    }
}

fn plain_write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: write(2) from a buffer we borrow.
        let n = unsafe { libc::write(fd, buf.as_ptr() as *const libc::c_void, buf.len()) };
        if let Ok(n) = usize::try_from(n) {
            return Ok(n);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Waits up to `timeout` for room to write on `fd` (or for its reader to leave). A signal
/// ends the wait as a timeout does: ember kicks a vCPU thread out of whatever it is doing to
/// pause it or stop it, and a kick must not just start the wait again.
fn wait_writable(fd: RawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one pollfd that lives through the call.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    r > 0
}

/// A writer to a pipe or socket shared with the parent. A reader that is behind gets up to
/// [`STALL`] to make room; once it has left a write waiting that long, output is dropped
/// (the write fails with `WouldBlock`) until the reader takes a write again, so a parent that
/// never reads costs each writer one wait, not one per line.
pub struct SharedPipe {
    file: File,
    stalled: bool,
}

impl Write for SharedPipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let fd = self.file.as_raw_fd();
        loop {
            match write_nowait(fd, buf, true) {
                Ok(n) => {
                    self.stalled = false;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && !self.stalled => {
                    if !wait_writable(fd, STALL) {
                        self.stalled = true;
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A writer to ember's stdout (a duplicate of fd 1): [`SharedPipe`] when it is a pipe or a
/// socket, the file itself otherwise.
pub fn stdout_writer() -> io::Result<Box<dyn Write + Send>> {
    let file = File::from(io::stdout().as_fd().try_clone_to_owned()?);
    Ok(if is_stream(file.as_raw_fd()) {
        Box::new(SharedPipe {
            file,
            stalled: false,
        })
    } else {
        Box::new(file)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;
    use std::time::Instant;

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two descriptors, which the Files below then own alone.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh descriptors from pipe2, owned by nothing else.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    #[test]
    fn a_pipe_nobody_reads_costs_one_wait_then_drops() {
        // A blocking pipe, as a parent's would be: only our writes are non-blocking.
        let (_r, w) = pipe();
        let mut out = SharedPipe {
            file: w,
            stalled: false,
        };
        let line = [b'x'; 1000];
        let t = Instant::now();
        let mut dropped = 0;
        for _ in 0..1000 {
            if out.write_all(&line).is_err() {
                dropped += 1;
            }
        }
        // 64 KiB went in; the rest was dropped after one wait of STALL.
        assert!(dropped > 900, "{dropped}");
        assert!(t.elapsed() < STALL * 5, "{:?}", t.elapsed());
    }

    #[test]
    fn a_slow_reader_loses_nothing() {
        let (mut r, w) = pipe();
        let mut out = SharedPipe {
            file: w,
            stalled: false,
        };
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                std::thread::sleep(Duration::from_millis(1));
                match io::Read::read(&mut r, &mut buf) {
                    Ok(0) | Err(_) => return got.len(),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        });
        let line = [b'y'; 1000];
        for _ in 0..300 {
            out.write_all(&line).unwrap();
        }
        drop(out);
        assert_eq!(reader.join().unwrap(), 300_000);
    }

    #[test]
    fn regular_files_are_not_streams() {
        let path = std::env::temp_dir().join(format!("ember-stdio-{}", std::process::id()));
        let f = File::create(&path).unwrap();
        assert!(!is_stream(f.as_raw_fd()));
        assert_eq!(write_nowait(f.as_raw_fd(), b"hello\n", false).unwrap(), 6);
        assert_eq!(std::fs::read(&path).unwrap(), b"hello\n");
        std::fs::remove_file(&path).unwrap();
    }
}
