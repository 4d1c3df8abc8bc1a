//! The descriptor keeper: a tiny process that outlives the agent (a
//! sidecar container sharing a socket directory with it) and holds the
//! kernel objects an agent restart must not close: for FUSE, every
//! `/dev/fuse` descriptor of the connection and the INIT parameters the
//! kernel negotiated once (it never sends INIT again). While the keeper
//! holds them, the kernel never sees their last close, so the FUSE
//! connection, its mount and the loop devices on it stay alive, their
//! I/O waiting, while no agent runs.
//!
//! Protocol: a SOCK_SEQPACKET unix socket, one request and one reply per
//! connection, each one message of [`MAGIC`] + JSON, descriptors attached
//! with SCM_RIGHTS:
//!
//! - `put {key, meta}` + descriptors → `ok` (replaces what `key` held)
//! - `get {key}` → `have {meta, fds}` + descriptors, or `none`
//! - `drop {key}` → `ok` (the keeper closes its copies)
//! - `ping` → `ok`

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{BlockError, BlockErrorKind, BlockKind};

/// Every message starts with these bytes (protocol version 1).
pub const MAGIC: &[u8; 4] = b"VMK1";
/// Most descriptors in one message.
pub const MAX_FDS: usize = 64;
/// Largest message.
const MAX_MSG: usize = 64 * 1024;
/// How long the keeper waits for a client's request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A request to the keeper.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Put {
        key: String,
        meta: serde_json::Value,
    },
    Get {
        key: String,
    },
    Drop {
        key: String,
    },
    Ping,
}

/// The keeper's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "lowercase")]
pub enum Reply {
    Ok,
    /// What `key` holds: its metadata and how many descriptors follow.
    Have {
        meta: serde_json::Value,
        fds: usize,
    },
    None,
    Error {
        message: String,
    },
}

/// Encodes a message: magic + JSON.
pub fn encode<T: Serialize>(m: &T) -> Vec<u8> {
    let mut v = MAGIC.to_vec();
    // Serializing these plain enums cannot fail.
    v.extend_from_slice(&serde_json::to_vec(m).unwrap_or_default());
    v
}

/// Decodes a message; an error says what is wrong with it.
pub fn decode<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, String> {
    let body = b
        .strip_prefix(MAGIC.as_slice())
        .ok_or_else(|| "not a volmig keeper message (bad magic)".to_string())?;
    serde_json::from_slice(body).map_err(|e| format!("malformed keeper message: {e}"))
}

fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let b = path.as_os_str().as_bytes();
    if b.len() >= a.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path too long ({} bytes)", b.len()),
        ));
    }
    for (d, s) in a.sun_path.iter_mut().zip(b) {
        *d = *s as libc::c_char;
    }
    Ok((
        a,
        (size_of::<libc::sa_family_t>() + b.len() + 1) as libc::socklen_t,
    ))
}

fn seqpacket() -> io::Result<OwnedFd> {
    // SAFETY: a plain syscall returning a new descriptor.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends one message with `fds` attached (SCM_RIGHTS).
pub fn send_msg(sock: BorrowedFd<'_>, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} descriptors, at most {MAX_FDS}", fds.len()),
        ));
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // 8-aligned room for CMSG_SPACE(MAX_FDS * 4) bytes.
    let mut cbuf = [0u64; 64];
    // SAFETY: msghdr is plain data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let bytes = std::mem::size_of_val(fds) as u32;
        // SAFETY: the CMSG_* macros compute sizes and pointers inside
        // `cbuf`, which holds CMSG_SPACE(MAX_FDS * 4) bytes; exactly
        // fds.len() descriptors are copied into the first header's data.
        unsafe {
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(bytes) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(c).cast::<RawFd>(),
                fds.len(),
            );
        }
    }
    // SAFETY: msg points at iov and cbuf, live for the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one message and the descriptors attached to it (close-on-exec).
pub fn recv_msg(sock: BorrowedFd<'_>) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut data = vec![0u8; MAX_MSG];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let mut cbuf = [0u64; 64];
    // SAFETY: msghdr is plain data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf);
    // SAFETY: msg points at live buffers of the sizes it names.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control; CMSG_FIRSTHDR/NXTHDR walk it
    // within msg_controllen; an SCM_RIGHTS payload holds
    // (len - CMSG_LEN(0)) / 4 descriptors, now ours (owned exactly once).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let cnt = ((*c).cmsg_len - libc::CMSG_LEN(0) as usize) / size_of::<RawFd>();
                let p = libc::CMSG_DATA(c).cast::<RawFd>();
                for i in 0..cnt {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(p.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & (libc::MSG_CTRUNC | libc::MSG_TRUNC) != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "keeper message or its descriptors were truncated",
        ));
    }
    data.truncate(n as usize);
    Ok((data, fds))
}

/// The agent's side: a keeper at a socket path.
#[derive(Debug, Clone)]
pub struct KeeperClient {
    socket: PathBuf,
}

impl KeeperClient {
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn err(&self, reason: impl Into<String>) -> BlockError {
        BlockError::at(
            BlockErrorKind::Keeper,
            BlockKind::FuseLoop,
            "keeper",
            "",
            Some(&self.socket),
            reason,
        )
    }

    fn call(&self, req: &Request, fds: &[RawFd]) -> Result<(Reply, Vec<OwnedFd>), BlockError> {
        let s = seqpacket().map_err(|e| self.err(format!("socket: {e}")))?;
        let (a, l) = sockaddr(&self.socket).map_err(|e| self.err(e.to_string()))?;
        // SAFETY: a/l describe a valid sockaddr_un; s is our socket.
        if unsafe { libc::connect(s.as_raw_fd(), (&a as *const libc::sockaddr_un).cast(), l) } < 0 {
            return Err(self.err(format!("connect: {}", io::Error::last_os_error())));
        }
        send_msg(s.as_fd(), &encode(req), fds).map_err(|e| self.err(format!("send: {e}")))?;
        let (m, fds) = recv_msg(s.as_fd()).map_err(|e| self.err(format!("receive: {e}")))?;
        if m.is_empty() {
            return Err(self.err("the keeper closed the connection without answering"));
        }
        let reply: Reply = decode(&m).map_err(|e| self.err(e))?;
        if let Reply::Error { message } = &reply {
            return Err(self.err(message.clone()));
        }
        Ok((reply, fds))
    }

    /// Waits up to `timeout` for the keeper to answer (it may start after
    /// the agent).
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), BlockError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.call(&Request::Ping, &[]) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Hands `fds` and `meta` to the keeper under `key`.
    pub fn put(
        &self,
        key: &str,
        meta: serde_json::Value,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), BlockError> {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let req = Request::Put {
            key: key.to_string(),
            meta,
        };
        match self.call(&req, &raw)? {
            (Reply::Ok, _) => Ok(()),
            (other, _) => Err(self.err(format!("put answered {other:?}"))),
        }
    }

    /// What the keeper holds under `key` (None: nothing, a first start).
    pub fn get(&self, key: &str) -> Result<Option<(serde_json::Value, Vec<OwnedFd>)>, BlockError> {
        match self.call(&Request::Get { key: key.into() }, &[])? {
            (Reply::Have { meta, fds: n }, fds) if n == fds.len() => Ok(Some((meta, fds))),
            (Reply::Have { fds: n, .. }, fds) => Err(self.err(format!(
                "the keeper said {n} descriptors and sent {}",
                fds.len()
            ))),
            (Reply::None, _) => Ok(None),
            (other, _) => Err(self.err(format!("get answered {other:?}"))),
        }
    }

    /// The keeper lets go of what `key` holds.
    pub fn drop_key(&self, key: &str) -> Result<(), BlockError> {
        match self.call(&Request::Drop { key: key.into() }, &[])? {
            (Reply::Ok, _) => Ok(()),
            (other, _) => Err(self.err(format!("drop answered {other:?}"))),
        }
    }
}

/// What a keeper holds: by key, metadata and descriptors.
#[derive(Debug, Default)]
pub struct Held {
    entries: BTreeMap<String, (serde_json::Value, Vec<OwnedFd>)>,
}

impl Held {
    /// Answers one request (`fds` came with it).
    pub fn handle(&mut self, req: Request, fds: Vec<OwnedFd>) -> (Reply, Vec<RawFd>) {
        match req {
            Request::Put { key, meta } => {
                tracing::info!(%key, descriptors = fds.len(), %meta, "holding");
                self.entries.insert(key, (meta, fds));
                (Reply::Ok, Vec::new())
            }
            Request::Get { key } => match self.entries.get(&key) {
                Some((meta, fds)) => (
                    Reply::Have {
                        meta: meta.clone(),
                        fds: fds.len(),
                    },
                    fds.iter().map(|f| f.as_raw_fd()).collect(),
                ),
                None => (Reply::None, Vec::new()),
            },
            Request::Drop { key } => {
                if let Some((_, fds)) = self.entries.remove(&key) {
                    tracing::info!(%key, descriptors = fds.len(), "dropped");
                }
                (Reply::Ok, Vec::new())
            }
            Request::Ping => (Reply::Ok, Vec::new()),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The keeper process's socket, bound (mode 0600).
pub struct KeeperServer {
    sock: OwnedFd,
    path: PathBuf,
    held: Held,
}

impl KeeperServer {
    /// Binds `path` (a stale socket file there is replaced).
    pub fn bind(path: &Path) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(path);
        let s = seqpacket()?;
        let (a, l) = sockaddr(path)?;
        // SAFETY: a/l describe a valid sockaddr_un; s is our socket.
        if unsafe { libc::bind(s.as_raw_fd(), (&a as *const libc::sockaddr_un).cast(), l) } < 0 {
            return Err(io::Error::last_os_error());
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        // SAFETY: listen on our bound socket.
        if unsafe { libc::listen(s.as_raw_fd(), 16) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            sock: s,
            path: path.to_path_buf(),
            held: Held::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves one client. Errors of one client never end the keeper.
    pub fn serve_one(&mut self) -> io::Result<()> {
        // SAFETY: accept on our listening socket; the new descriptor is
        // owned right below.
        let c = unsafe {
            libc::accept4(
                self.sock.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if c < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: c is a fresh descriptor nobody else owns.
        let c = unsafe { OwnedFd::from_raw_fd(c) };
        let tv = libc::timeval {
            tv_sec: REQUEST_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: setsockopt reads a timeval from a live value of that size.
        unsafe {
            libc::setsockopt(
                c.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        let (m, fds) = recv_msg(c.as_fd())?;
        let (reply, send) = match decode::<Request>(&m) {
            Ok(req) => self.held.handle(req, fds),
            Err(message) => (Reply::Error { message }, Vec::new()),
        };
        send_msg(c.as_fd(), &encode(&reply), &send)
    }

    /// Serves clients until the process ends.
    pub fn run(mut self) -> ! {
        tracing::info!(socket = %self.path.display(), "descriptor keeper ready");
        loop {
            if let Err(e) = self.serve_one()
                && e.kind() != io::ErrorKind::Interrupted
            {
                tracing::warn!(error = %e, "keeper client failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    /// The keeper outlives agent upgrades in place (its container keeps
    /// its image): a newer agent must speak the protocol of an older
    /// keeper. These bytes are that protocol; changing them breaks
    /// in-place upgrades (`kubectl volmig upgrade-agents`).
    #[test]
    fn the_wire_format_is_the_one_older_keepers_speak() {
        assert_eq!(
            encode(&Request::Get { key: "fuse".into() }),
            b"VMK1{\"op\":\"get\",\"key\":\"fuse\"}"
        );
        assert_eq!(encode(&Request::Ping), b"VMK1{\"op\":\"ping\"}");
        assert_eq!(
            encode(&Request::Put {
                key: "fuse".into(),
                meta: serde_json::json!({"dev": 1}),
            }),
            b"VMK1{\"op\":\"put\",\"key\":\"fuse\",\"meta\":{\"dev\":1}}"
        );
        assert_eq!(
            decode::<Reply>(b"VMK1{\"reply\":\"have\",\"meta\":{\"dev\":1},\"fds\":3}").unwrap(),
            Reply::Have {
                meta: serde_json::json!({"dev": 1}),
                fds: 3
            }
        );
        assert_eq!(
            decode::<Reply>(b"VMK1{\"reply\":\"none\"}").unwrap(),
            Reply::None
        );
        assert_eq!(
            decode::<Reply>(b"VMK1{\"reply\":\"ok\"}").unwrap(),
            Reply::Ok
        );
    }

    #[test]
    fn messages_roundtrip_and_bad_ones_are_named() {
        for r in [
            Request::Put {
                key: "fuse".into(),
                meta: serde_json::json!({"minor": 45}),
            },
            Request::Get { key: "fuse".into() },
            Request::Drop { key: "x".into() },
            Request::Ping,
        ] {
            assert_eq!(decode::<Request>(&encode(&r)).unwrap(), r);
        }
        let m = encode(&Reply::Have {
            meta: serde_json::json!({}),
            fds: 3,
        });
        assert!(
            m.starts_with(b"VMK1{\"reply\":\"have\""),
            "{}",
            String::from_utf8_lossy(&m)
        );
        assert!(decode::<Request>(b"GET").unwrap_err().contains("magic"));
        assert!(
            decode::<Request>(b"VMK1{\"op\":\"steal\"}")
                .unwrap_err()
                .contains("malformed")
        );
    }

    fn tmpfile(text: &str) -> std::fs::File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn read_all(fd: OwnedFd) -> String {
        let mut f = std::fs::File::from(fd);
        f.rewind().unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        s
    }

    /// A keeper serving `n` clients on its own thread.
    fn keeper(dir: &Path, n: usize) -> (KeeperClient, std::thread::JoinHandle<usize>) {
        let path = dir.join("keeper.sock");
        let mut k = KeeperServer::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            for _ in 0..n {
                k.serve_one().unwrap();
            }
            k.held.len()
        });
        (KeeperClient::new(&path), t)
    }

    #[test]
    fn descriptors_outlive_their_sender_in_the_keeper() {
        let dir = tempfile::tempdir().unwrap();
        let (c, t) = keeper(dir.path(), 6);
        c.wait_ready(Duration::from_secs(5)).unwrap();
        assert!(
            c.get("fuse").unwrap().is_none(),
            "a first start holds nothing"
        );
        let (a, b) = (tmpfile("first"), tmpfile("second"));
        c.put(
            "fuse",
            serde_json::json!({"max_write": 1048576}),
            &[a.as_fd(), b.as_fd()],
        )
        .unwrap();
        // The sender goes away; the keeper's copies keep the files open.
        drop((a, b));
        let (meta, fds) = c.get("fuse").unwrap().expect("held");
        assert_eq!(meta["max_write"], 1048576);
        let texts: Vec<String> = fds.into_iter().map(read_all).collect();
        assert_eq!(texts, ["first", "second"], "the same open files, in order");
        c.drop_key("fuse").unwrap();
        assert!(c.get("fuse").unwrap().is_none());
        assert_eq!(t.join().unwrap(), 0, "nothing held after drop");
    }

    #[test]
    fn a_missing_keeper_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let c = KeeperClient::new(&dir.path().join("nobody.sock"));
        let e = c.wait_ready(Duration::from_millis(200)).unwrap_err();
        assert!(
            e.to_string().contains("nobody.sock") && e.to_string().contains("connect"),
            "{e}"
        );
    }
}
