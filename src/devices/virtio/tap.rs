//! A TAP device opened through `/dev/net/tun`: `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a 12-byte
//! `virtio_net_hdr_v1` in front of every frame, non-blocking.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// `_IOW('T', 202, int)`.
pub const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `_IOW('T', 208, unsigned int)`.
pub const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `_IOW('T', 216, int)`.
pub const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;
const IFF_VNET_HDR: u16 = 0x4000;

pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_UFO: u32 = 0x10;

/// The size of `virtio_net_hdr_v1`.
pub const VNET_HDR_LEN: usize = 12;

/// What the net device needs from its backend: frames in and out, each with its header.
pub trait NetBackend: Send {
    /// Sends one frame (header included); the whole buffer or an error.
    fn send(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Receives one frame (header included) into `buf`; `WouldBlock` when there is none.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// The offloads (TUN_F_*) the guest accepts on RX.
    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
}

pub struct Tap {
    file: File,
    name: String,
}

fn ioctl_ptr(fd: RawFd, req: libc::c_ulong, arg: *mut libc::c_void) -> io::Result<()> {
    // SAFETY: `fd` is an open tun fd and `arg` points to a live buffer of the size `req`
    // expects (checked by the callers: a 40-byte ifreq or an int).
    let r = unsafe { libc::ioctl(fd, req, arg) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Tap {
    /// Attaches to the TAP device `name` (which must exist or be creatable by the caller).
    pub fn open(name: &str) -> io::Result<Tap> {
        // The kernel takes `%d` in a name as a template for the next free number: the
        // device would not be the one named. '/', ':' and whitespace it refuses anyway.
        let bad = |c: char| c == '\0' || c == '/' || c == '%' || c == ':' || c.is_whitespace();
        if name.is_empty() || name.len() >= 16 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the TAP name must be 1 to 15 bytes long",
            ));
        }
        if let Some(c) = name.chars().find(|&c| bad(c)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a TAP name cannot hold {c:?}"),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        // struct ifreq: ifr_name[16], then the union whose first member is ifr_flags (short).
        let mut ifreq = [0u8; 40];
        ifreq[..name.len()].copy_from_slice(name.as_bytes());
        ifreq[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
        ioctl_ptr(file.as_raw_fd(), TUNSETIFF, ifreq.as_mut_ptr().cast())?;
        let mut hdr_len = VNET_HDR_LEN as libc::c_int;
        ioctl_ptr(
            file.as_raw_fd(),
            TUNSETVNETHDRSZ,
            (&mut hdr_len as *mut libc::c_int).cast(),
        )?;
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// `TUNSETOFFLOAD`: which offloads (TUN_F_*) the guest accepts on RX.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is an attached tun fd.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// A second fd on the same TAP queue, for watching it.
    pub fn try_clone_file(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn send(&mut self, buf: &[u8]) -> io::Result<()> {
        loop {
            // SAFETY: the pointer and length describe a live slice; the fd is ours.
            let n = unsafe { libc::write(self.file.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            return Ok(());
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: the pointer and length describe a live, writable slice.
            let n =
                unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            return Ok(n as usize);
        }
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        Tap::set_offload(self, flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_kernel_would_not_take_as_given_are_refused() {
        for (name, says) in [
            ("", "1 to 15 bytes"),
            ("a-name-of-16-byt", "1 to 15 bytes"),
            ("tap%d", "'%'"),
            ("../x", "'/'"),
            ("a b", "' '"),
            ("eth0:1", "':'"),
        ] {
            let e = Tap::open(name).err().expect(name);
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{name}: {e}");
            assert!(e.to_string().contains(says), "{name}: {e}");
        }
    }
}
