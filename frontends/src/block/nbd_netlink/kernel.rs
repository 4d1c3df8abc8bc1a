//! The kernel side of the NBD driver: [`NbdKernel`] is what the driver asks
//! of the kernel; [`Netlink`] asks the real one (a generic netlink socket,
//! sysfs, the device node). Tests drive the driver with a fake.
//!
//! Every call blocks briefly (one netlink round trip); the driver makes
//! them from the blocking pool.

use std::fs::File;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use super::genl::{self, Connect, DeviceStatus, Reconfigure, Reply};

/// How long one netlink request may take (CONNECT starts the device).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const RECV_BUFFER: usize = 64 * 1024;

/// What the NBD driver needs from the kernel.
pub trait NbdKernel: Send + Sync + 'static {
    /// `NBD_CMD_CONNECT`: the index of the configured device.
    fn connect(&self, req: &Connect) -> io::Result<u32>;
    /// `NBD_CMD_RECONFIGURE`.
    fn reconfigure(&self, req: &Reconfigure) -> io::Result<()>;
    /// `NBD_CMD_DISCONNECT`.
    fn disconnect(&self, index: u32) -> io::Result<()>;
    /// `NBD_CMD_STATUS` of one device; `None` if it does not exist.
    fn status(&self, index: u32) -> io::Result<Option<DeviceStatus>>;
    /// The backend identifier the device was connected with
    /// (`/sys/block/nbdN/backend`); `None` when it has none.
    fn backend(&self, index: u32) -> io::Result<Option<String>>;
    /// Opens the device exclusively (fails with EBUSY while it is mounted
    /// or held); the claim lasts as long as the returned value.
    fn claim(&self, index: u32) -> io::Result<Box<dyn Send>>;
}

/// The device node of index `index`.
pub fn device_path(index: u32) -> PathBuf {
    PathBuf::from(format!("/dev/nbd{index}"))
}

/// The running kernel.
#[derive(Debug, Default)]
pub struct Netlink {
    family: OnceLock<u16>,
}

impl Netlink {
    pub fn new() -> Self {
        Netlink::default()
    }

    fn family(&self) -> io::Result<u16> {
        if let Some(f) = self.family.get() {
            return Ok(*f);
        }
        let f = resolve_family(genl::NBD_FAMILY_NAME).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOENT) {
                io::Error::new(
                    io::ErrorKind::Unsupported,
                    "the kernel has no \"nbd\" generic netlink family (modprobe nbd)",
                )
            } else {
                e
            }
        })?;
        Ok(*self.family.get_or_init(|| f))
    }

    fn call(&self, cmd: u8, attrs: &genl::Attrs) -> io::Result<Vec<Vec<u8>>> {
        let family = self.family()?;
        let mut sock = GenlSocket::open()?;
        sock.call(|seq| genl::request(family, cmd, genl::NBD_GENL_VERSION, seq, attrs))
    }
}

/// True if the `nbd` generic netlink family resolves (the module is
/// loaded, or the kernel loads it on demand).
pub fn family_available() -> bool {
    resolve_family(genl::NBD_FAMILY_NAME).is_ok()
}

fn resolve_family(name: &str) -> io::Result<u16> {
    let mut sock = GenlSocket::open()?;
    let replies = sock.call(|seq| genl::get_family(name, seq))?;
    let attrs = replies
        .first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no family reply"))?;
    genl::parse_family_id(attrs).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

impl NbdKernel for Netlink {
    fn connect(&self, req: &Connect) -> io::Result<u32> {
        let replies = self.call(genl::NBD_CMD_CONNECT, &genl::connect_attrs(req))?;
        let attrs = replies.first().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "no reply to NBD_CMD_CONNECT")
        })?;
        genl::parse_connect_reply(attrs).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    fn reconfigure(&self, req: &Reconfigure) -> io::Result<()> {
        self.call(genl::NBD_CMD_RECONFIGURE, &genl::reconfigure_attrs(req))
            .map(drop)
    }

    fn disconnect(&self, index: u32) -> io::Result<()> {
        self.call(genl::NBD_CMD_DISCONNECT, &genl::disconnect_attrs(index))
            .map(drop)
    }

    fn status(&self, index: u32) -> io::Result<Option<DeviceStatus>> {
        let replies = match self.call(genl::NBD_CMD_STATUS, &genl::status_attrs(Some(index))) {
            Ok(r) => r,
            // An index past the last device.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut found = None;
        for attrs in &replies {
            let list = genl::parse_status_reply(attrs)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            found = found.or(list.into_iter().find(|d| d.index == index));
        }
        Ok(found)
    }

    fn backend(&self, index: u32) -> io::Result<Option<String>> {
        match std::fs::read_to_string(format!("/sys/block/nbd{index}/backend")) {
            Ok(s) => Ok(Some(s.trim_end_matches('\n').to_string())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn claim(&self, index: u32) -> io::Result<Box<dyn Send>> {
        use std::os::unix::fs::OpenOptionsExt;
        let f: File = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
            .open(device_path(index))?;
        Ok(Box::new(f))
    }
}

/// A `NETLINK_GENERIC` socket for one request at a time.
struct GenlSocket {
    fd: OwnedFd,
    seq: u32,
}

impl GenlSocket {
    fn open() -> io::Result<Self> {
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: REQUEST_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: `tv` is a valid timeval for the duration of the call and
        // its size is passed.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: sockaddr_nl is plain old data; all-zero is valid.
        let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `addr` is a valid sockaddr_nl and its size is passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(GenlSocket { fd, seq: 1 })
    }

    /// Sends the request `build(seq)` makes and collects the attributes of
    /// every reply message until the kernel's ack; an error ack is the
    /// call's error.
    fn call(&mut self, build: impl FnOnce(u32) -> Vec<u8>) -> io::Result<Vec<Vec<u8>>> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let msg = build(seq);
        // SAFETY: sockaddr_nl is plain old data; all-zero (pid 0) is the kernel.
        let mut to: libc::sockaddr_nl = unsafe { mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `msg` and `to` are valid for the given lengths.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&to as *const libc::sockaddr_nl).cast(),
                mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; RECV_BUFFER];
        let mut out = Vec::new();
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let n = n as usize;
            if n > buf.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("netlink reply of {n} bytes truncated"),
                ));
            }
            let replies = genl::parse_replies(&buf[..n])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            for r in replies {
                if r.seq() != seq {
                    continue;
                }
                match r {
                    Reply::Message { attrs, .. } => out.push(attrs),
                    Reply::Ack { .. } | Reply::Done { .. } => return Ok(out),
                    Reply::Error { errno, .. } => return Err(io::Error::from_raw_os_error(errno)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The socket code against the real kernel: the generic netlink
    /// controller resolves itself, an unknown family is ENOENT (names are at most 15 bytes).
    #[test]
    fn the_controller_family_resolves_over_a_real_socket() {
        assert_eq!(resolve_family("nlctrl").unwrap(), genl::GENL_ID_CTRL);
        let e = resolve_family("volmig-nofam").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    }

    #[test]
    fn device_nodes_are_named_by_index() {
        assert_eq!(device_path(12), PathBuf::from("/dev/nbd12"));
    }
}
