//! Generic netlink messages for the kernel's `nbd` family, built and parsed
//! by hand (pure functions; the socket is in `kernel.rs`).
//!
//! A message is `nlmsghdr` (16 bytes: len, type, flags, seq, pid), then
//! `genlmsghdr` (4 bytes: cmd, version, reserved), then attributes, each
//! `nlattr` (len, type; 4 bytes) and its payload padded to 4 bytes. All
//! integers are in host byte order. Nested attributes are written without
//! `NLA_F_NESTED`, as libnl (and so nbd-client) writes them; the nbd family
//! accepts both.

use std::fmt;

/// `NLM_F_REQUEST`.
pub const NLM_F_REQUEST: u16 = 1;
/// `NLM_F_ACK`.
pub const NLM_F_ACK: u16 = 4;
/// `NLMSG_ERROR` (an ack when its error is 0).
pub const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`.
pub const NLMSG_DONE: u16 = 3;
/// The generic netlink controller's fixed family id.
pub const GENL_ID_CTRL: u16 = 0x10;
pub const CTRL_CMD_GETFAMILY: u8 = 3;
pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;
pub const CTRL_VERSION: u8 = 2;

/// The nbd family (`include/uapi/linux/nbd-netlink.h`).
pub const NBD_FAMILY_NAME: &str = "nbd";
pub const NBD_GENL_VERSION: u8 = 1;

pub const NBD_CMD_CONNECT: u8 = 1;
pub const NBD_CMD_DISCONNECT: u8 = 2;
pub const NBD_CMD_RECONFIGURE: u8 = 3;
pub const NBD_CMD_LINK_DEAD: u8 = 4;
pub const NBD_CMD_STATUS: u8 = 5;

pub const NBD_ATTR_INDEX: u16 = 1;
pub const NBD_ATTR_SIZE_BYTES: u16 = 2;
pub const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
pub const NBD_ATTR_TIMEOUT: u16 = 4;
pub const NBD_ATTR_SERVER_FLAGS: u16 = 5;
pub const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
pub const NBD_ATTR_SOCKETS: u16 = 7;
pub const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
pub const NBD_ATTR_DEVICE_LIST: u16 = 9;
pub const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;

pub const NBD_DEVICE_ITEM: u16 = 1;
pub const NBD_DEVICE_INDEX: u16 = 1;
pub const NBD_DEVICE_CONNECTED: u16 = 2;

pub const NBD_SOCK_ITEM: u16 = 1;
pub const NBD_SOCK_FD: u16 = 1;

const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;
const NLA_HDRLEN: usize = 4;
/// Attribute type bits that are flags (`NLA_F_NESTED`, `NLA_F_NET_BYTEORDER`).
const NLA_TYPE_MASK: u16 = !(3 << 14);

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A malformed reply from the kernel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed netlink {what}: {detail}")]
pub struct Malformed {
    pub what: &'static str,
    pub detail: String,
}

fn malformed(what: &'static str, detail: impl fmt::Display) -> Malformed {
    Malformed {
        what,
        detail: detail.to_string(),
    }
}

/// Builds a run of attributes.
#[derive(Debug, Default, Clone)]
pub struct Attrs {
    buf: Vec<u8>,
}

impl Attrs {
    pub fn new() -> Self {
        Attrs::default()
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// One attribute; payloads longer than an attribute can hold are a
    /// caller bug (every payload here is a few bytes or a short string).
    pub fn put(&mut self, kind: u16, payload: &[u8]) -> &mut Self {
        let len = NLA_HDRLEN + payload.len();
        let len16 = u16::try_from(len).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len16.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    pub fn put_u8(&mut self, kind: u16, v: u8) -> &mut Self {
        self.put(kind, &[v])
    }

    pub fn put_u16(&mut self, kind: u16, v: u16) -> &mut Self {
        self.put(kind, &v.to_ne_bytes())
    }

    pub fn put_u32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.put(kind, &v.to_ne_bytes())
    }

    pub fn put_u64(&mut self, kind: u16, v: u64) -> &mut Self {
        self.put(kind, &v.to_ne_bytes())
    }

    /// A NUL-terminated string (`NLA_STRING` / `NLA_NUL_STRING`).
    pub fn put_str(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.put(kind, &v)
    }

    /// A nested attribute whose content `f` writes.
    pub fn put_nested(&mut self, kind: u16, f: impl FnOnce(&mut Attrs)) -> &mut Self {
        let mut inner = Attrs::new();
        f(&mut inner);
        self.put(kind, &inner.buf)
    }
}

/// A whole request: `nlmsghdr` + `genlmsghdr` + `attrs`. The port id is 0
/// (the kernel fills in the sender's).
pub fn request(family: u16, cmd: u8, version: u8, seq: u32, attrs: &Attrs) -> Vec<u8> {
    let len = NLMSG_HDRLEN + GENL_HDRLEN + attrs.buf.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
    m.extend_from_slice(&family.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.push(cmd);
    m.push(version);
    m.extend_from_slice(&0u16.to_ne_bytes());
    m.extend_from_slice(&attrs.buf);
    m
}

/// One message of a reply datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A generic netlink message: its command and attributes.
    Message {
        family: u16,
        seq: u32,
        cmd: u8,
        attrs: Vec<u8>,
    },
    /// `NLMSG_ERROR` with error 0.
    Ack { seq: u32 },
    /// `NLMSG_ERROR` with a (positive) errno.
    Error { seq: u32, errno: i32 },
    /// `NLMSG_DONE`.
    Done { seq: u32 },
}

impl Reply {
    pub fn seq(&self) -> u32 {
        match self {
            Reply::Message { seq, .. }
            | Reply::Ack { seq }
            | Reply::Error { seq, .. }
            | Reply::Done { seq } => *seq,
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Every message in one datagram.
pub fn parse_replies(mut buf: &[u8]) -> Result<Vec<Reply>, Malformed> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let (Some(len), Some(kind), Some(seq)) = (u32_at(buf, 0), u16_at(buf, 4), u32_at(buf, 8))
        else {
            return Err(malformed("message", format!("{} bytes left", buf.len())));
        };
        let len = len as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(malformed(
                "message",
                format!("length {len} with {} bytes", buf.len()),
            ));
        }
        let body = &buf[NLMSG_HDRLEN..len];
        out.push(match kind {
            NLMSG_ERROR => {
                let Some(err) = u32_at(body, 0) else {
                    return Err(malformed("error message", "no error code"));
                };
                // The kernel sends -errno.
                let errno = (err as i32).wrapping_neg();
                if errno == 0 {
                    Reply::Ack { seq }
                } else {
                    Reply::Error { seq, errno }
                }
            }
            NLMSG_DONE => Reply::Done { seq },
            family => {
                if body.len() < GENL_HDRLEN {
                    return Err(malformed("generic message", "no genl header"));
                }
                Reply::Message {
                    family,
                    seq,
                    cmd: body[0],
                    attrs: body[GENL_HDRLEN..].to_vec(),
                }
            }
        });
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(out)
}

/// The attributes of a run, in order: (type without flag bits, payload).
pub fn parse_attrs(mut buf: &[u8]) -> Result<Vec<(u16, &[u8])>, Malformed> {
    let mut out = Vec::new();
    while buf.len() >= NLA_HDRLEN {
        let (Some(len), Some(kind)) = (u16_at(buf, 0), u16_at(buf, 2)) else {
            break;
        };
        let len = len as usize;
        if len < NLA_HDRLEN || len > buf.len() {
            return Err(malformed(
                "attribute",
                format!("length {len} with {} bytes", buf.len()),
            ));
        }
        out.push((kind & NLA_TYPE_MASK, &buf[NLA_HDRLEN..len]));
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(out)
}

fn attr<'a>(attrs: &[(u16, &'a [u8])], kind: u16) -> Option<&'a [u8]> {
    attrs.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v)
}

fn as_u32(what: &'static str, v: &[u8]) -> Result<u32, Malformed> {
    v.get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_ne_bytes)
        .ok_or_else(|| malformed(what, format!("{} bytes for a u32", v.len())))
}

fn as_u16(what: &'static str, v: &[u8]) -> Result<u16, Malformed> {
    v.get(..2)
        .and_then(|b| b.try_into().ok())
        .map(u16::from_ne_bytes)
        .ok_or_else(|| malformed(what, format!("{} bytes for a u16", v.len())))
}

/// `CTRL_CMD_GETFAMILY` for `name`.
pub fn get_family(name: &str, seq: u32) -> Vec<u8> {
    let mut a = Attrs::new();
    a.put_str(CTRL_ATTR_FAMILY_NAME, name);
    request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, CTRL_VERSION, seq, &a)
}

/// The family id in a `CTRL_CMD_GETFAMILY` reply's attributes.
pub fn parse_family_id(attrs: &[u8]) -> Result<u16, Malformed> {
    let a = parse_attrs(attrs)?;
    let id = attr(&a, CTRL_ATTR_FAMILY_ID)
        .ok_or_else(|| malformed("family reply", "no CTRL_ATTR_FAMILY_ID"))?;
    as_u16("CTRL_ATTR_FAMILY_ID", id)
}

/// NBD server flags (`NBD_FLAG_*` of the transmission flags) for a device
/// served by volmig: flush, FUA, trim, write zeroes, several connections.
pub fn server_flags() -> u64 {
    use crate::nbd::proto;
    u64::from(
        proto::FLAG_HAS_FLAGS
            | proto::FLAG_SEND_FLUSH
            | proto::FLAG_SEND_FUA
            | proto::FLAG_SEND_TRIM
            | proto::FLAG_SEND_WRITE_ZEROES
            | proto::FLAG_CAN_MULTI_CONN,
    )
}

/// What `NBD_CMD_CONNECT` sets up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// A device index, or any free one.
    pub index: Option<u32>,
    pub size: u64,
    pub block_size: u64,
    /// Seconds; 0: no I/O timeout (the kernel only warns about slow requests).
    pub timeout: u64,
    /// Seconds the kernel holds I/O for a new socket after the last one died.
    pub dead_conn_timeout: u64,
    pub server_flags: u64,
    /// `NBD_CFLAG_*`; volmig sets none (no destroy/disconnect on close).
    pub client_flags: u64,
    pub identifier: String,
    /// Socket file descriptors of this process, one per connection.
    pub sockets: Vec<i32>,
}

fn put_sockets(a: &mut Attrs, sockets: &[i32]) {
    a.put_nested(NBD_ATTR_SOCKETS, |s| {
        for fd in sockets {
            s.put_nested(NBD_SOCK_ITEM, |i| {
                // File descriptors are non-negative.
                i.put_u32(NBD_SOCK_FD, u32::try_from(*fd).unwrap_or(u32::MAX));
            });
        }
    });
}

/// The attributes of `NBD_CMD_CONNECT`.
pub fn connect_attrs(c: &Connect) -> Attrs {
    let mut a = Attrs::new();
    if let Some(i) = c.index {
        a.put_u32(NBD_ATTR_INDEX, i);
    }
    a.put_u64(NBD_ATTR_SIZE_BYTES, c.size)
        .put_u64(NBD_ATTR_BLOCK_SIZE_BYTES, c.block_size)
        .put_u64(NBD_ATTR_TIMEOUT, c.timeout)
        .put_u64(NBD_ATTR_DEAD_CONN_TIMEOUT, c.dead_conn_timeout)
        .put_u64(NBD_ATTR_SERVER_FLAGS, c.server_flags)
        .put_u64(NBD_ATTR_CLIENT_FLAGS, c.client_flags)
        .put_str(NBD_ATTR_BACKEND_IDENTIFIER, &c.identifier);
    put_sockets(&mut a, &c.sockets);
    a
}

/// What `NBD_CMD_RECONFIGURE` changes on a connected device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconfigure {
    pub index: u32,
    /// Must equal the identifier the device was connected with.
    pub identifier: String,
    /// New sockets, each replacing a dead connection.
    pub sockets: Vec<i32>,
    /// A new size in bytes.
    pub size: Option<u64>,
    pub timeout: Option<u64>,
    pub dead_conn_timeout: Option<u64>,
}

/// The attributes of `NBD_CMD_RECONFIGURE`.
pub fn reconfigure_attrs(r: &Reconfigure) -> Attrs {
    let mut a = Attrs::new();
    a.put_u32(NBD_ATTR_INDEX, r.index);
    if let Some(s) = r.size {
        a.put_u64(NBD_ATTR_SIZE_BYTES, s);
    }
    if let Some(t) = r.timeout {
        a.put_u64(NBD_ATTR_TIMEOUT, t);
    }
    if let Some(t) = r.dead_conn_timeout {
        a.put_u64(NBD_ATTR_DEAD_CONN_TIMEOUT, t);
    }
    a.put_str(NBD_ATTR_BACKEND_IDENTIFIER, &r.identifier);
    if !r.sockets.is_empty() {
        put_sockets(&mut a, &r.sockets);
    }
    a
}

/// The attributes of `NBD_CMD_DISCONNECT`.
pub fn disconnect_attrs(index: u32) -> Attrs {
    let mut a = Attrs::new();
    a.put_u32(NBD_ATTR_INDEX, index);
    a
}

/// The attributes of `NBD_CMD_STATUS` (every device without an index).
pub fn status_attrs(index: Option<u32>) -> Attrs {
    let mut a = Attrs::new();
    if let Some(i) = index {
        a.put_u32(NBD_ATTR_INDEX, i);
    }
    a
}

/// The device index in the reply to `NBD_CMD_CONNECT`.
pub fn parse_connect_reply(attrs: &[u8]) -> Result<u32, Malformed> {
    let a = parse_attrs(attrs)?;
    let v =
        attr(&a, NBD_ATTR_INDEX).ok_or_else(|| malformed("connect reply", "no NBD_ATTR_INDEX"))?;
    as_u32("NBD_ATTR_INDEX", v)
}

/// One device in an `NBD_CMD_STATUS` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStatus {
    pub index: u32,
    /// The device has a live configuration (connected, or waiting for a
    /// reconnect).
    pub connected: bool,
}

/// The devices in the reply to `NBD_CMD_STATUS`.
pub fn parse_status_reply(attrs: &[u8]) -> Result<Vec<DeviceStatus>, Malformed> {
    let a = parse_attrs(attrs)?;
    let Some(list) = attr(&a, NBD_ATTR_DEVICE_LIST) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (kind, item) in parse_attrs(list)? {
        if kind != NBD_DEVICE_ITEM {
            continue;
        }
        let fields = parse_attrs(item)?;
        let index = attr(&fields, NBD_DEVICE_INDEX)
            .ok_or_else(|| malformed("device item", "no NBD_DEVICE_INDEX"))?;
        let connected = attr(&fields, NBD_DEVICE_CONNECTED)
            .and_then(|v| v.first().copied())
            .ok_or_else(|| malformed("device item", "no NBD_DEVICE_CONNECTED"))?;
        out.push(DeviceStatus {
            index: as_u32("NBD_DEVICE_INDEX", index)?,
            connected: connected != 0,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Little-endian u16/u32/u64 bytes, the layout on the machines this
    /// runs on (the encoder uses host order).
    fn le(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    fn sample_connect() -> Connect {
        Connect {
            index: None,
            size: 1 << 30,
            block_size: 4096,
            timeout: 0,
            dead_conn_timeout: 600,
            server_flags: server_flags(),
            client_flags: 0,
            identifier: "volmig:v1".into(),
            sockets: vec![7, 9],
        }
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn connect_is_encoded_exactly() {
        let msg = request(
            0x1a,
            NBD_CMD_CONNECT,
            NBD_GENL_VERSION,
            42,
            &connect_attrs(&sample_connect()),
        );
        let expected = le(&[
            // nlmsghdr: len 136, type 0x1a, flags REQUEST|ACK, seq 42, pid 0
            &[136, 0, 0, 0, 0x1a, 0, 5, 0, 42, 0, 0, 0, 0, 0, 0, 0],
            // genlmsghdr: cmd CONNECT, version 1
            &[1, 1, 0, 0],
            // SIZE_BYTES = 1 GiB
            &[12, 0, 2, 0, 0, 0, 0, 0x40, 0, 0, 0, 0],
            // BLOCK_SIZE_BYTES = 4096
            &[12, 0, 3, 0, 0, 0x10, 0, 0, 0, 0, 0, 0],
            // TIMEOUT = 0
            &[12, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            // DEAD_CONN_TIMEOUT = 600
            &[12, 0, 8, 0, 0x58, 2, 0, 0, 0, 0, 0, 0],
            // SERVER_FLAGS = HAS_FLAGS|SEND_FLUSH|SEND_FUA|SEND_TRIM|SEND_WRITE_ZEROES|CAN_MULTI_CONN = 0x16d
            &[12, 0, 5, 0, 0x6d, 1, 0, 0, 0, 0, 0, 0],
            // CLIENT_FLAGS = 0
            &[12, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            // BACKEND_IDENTIFIER "volmig:v1\0" (len 14, padded to 16)
            &[14, 0, 10, 0],
            b"volmig:v1\0",
            &[0, 0],
            // SOCKETS { SOCK_ITEM { SOCK_FD 7 }, SOCK_ITEM { SOCK_FD 9 } }
            &[28, 0, 7, 0],
            &[12, 0, 1, 0, 8, 0, 1, 0, 7, 0, 0, 0],
            &[12, 0, 1, 0, 8, 0, 1, 0, 9, 0, 0, 0],
        ]);
        assert_eq!(msg.len(), 136);
        assert_eq!(msg, expected);
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn reconfigure_disconnect_and_status_are_encoded_exactly() {
        let r = Reconfigure {
            index: 3,
            identifier: "id".into(),
            sockets: vec![5],
            size: None,
            timeout: None,
            dead_conn_timeout: Some(600),
        };
        let msg = request(0x1a, NBD_CMD_RECONFIGURE, 1, 7, &reconfigure_attrs(&r));
        let expected = le(&[
            &[64, 0, 0, 0, 0x1a, 0, 5, 0, 7, 0, 0, 0, 0, 0, 0, 0],
            &[3, 1, 0, 0],
            // INDEX = 3
            &[8, 0, 1, 0, 3, 0, 0, 0],
            // DEAD_CONN_TIMEOUT = 600
            &[12, 0, 8, 0, 0x58, 2, 0, 0, 0, 0, 0, 0],
            // BACKEND_IDENTIFIER "id\0" (len 7, padded to 8)
            &[7, 0, 10, 0, b'i', b'd', 0, 0],
            // SOCKETS { SOCK_ITEM { SOCK_FD 5 } }
            &[16, 0, 7, 0, 12, 0, 1, 0, 8, 0, 1, 0, 5, 0, 0, 0],
        ]);
        assert_eq!(msg, expected);

        // A resize: size, no sockets.
        let r = Reconfigure {
            index: 3,
            identifier: "id".into(),
            sockets: vec![],
            size: Some(8192),
            timeout: None,
            dead_conn_timeout: None,
        };
        let msg = request(0x1a, NBD_CMD_RECONFIGURE, 1, 8, &reconfigure_attrs(&r));
        let expected = le(&[
            &[48, 0, 0, 0, 0x1a, 0, 5, 0, 8, 0, 0, 0, 0, 0, 0, 0],
            &[3, 1, 0, 0],
            &[8, 0, 1, 0, 3, 0, 0, 0],
            &[12, 0, 2, 0, 0, 0x20, 0, 0, 0, 0, 0, 0],
            &[7, 0, 10, 0, b'i', b'd', 0, 0],
        ]);
        assert_eq!(msg, expected);

        let msg = request(0x1a, NBD_CMD_DISCONNECT, 1, 9, &disconnect_attrs(3));
        let expected = le(&[
            &[28, 0, 0, 0, 0x1a, 0, 5, 0, 9, 0, 0, 0, 0, 0, 0, 0],
            &[2, 1, 0, 0],
            &[8, 0, 1, 0, 3, 0, 0, 0],
        ]);
        assert_eq!(msg, expected);

        let msg = request(0x1a, NBD_CMD_STATUS, 1, 10, &status_attrs(Some(3)));
        let expected = le(&[
            &[28, 0, 0, 0, 0x1a, 0, 5, 0, 10, 0, 0, 0, 0, 0, 0, 0],
            &[5, 1, 0, 0],
            &[8, 0, 1, 0, 3, 0, 0, 0],
        ]);
        assert_eq!(msg, expected);
        let msg = request(0x1a, NBD_CMD_STATUS, 1, 11, &status_attrs(None));
        assert_eq!(msg.len(), 20);
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn get_family_is_encoded_exactly() {
        let msg = get_family("nbd", 1);
        let expected = le(&[
            &[28, 0, 0, 0, 0x10, 0, 5, 0, 1, 0, 0, 0, 0, 0, 0, 0],
            &[3, 2, 0, 0],
            &[8, 0, 2, 0, b'n', b'b', b'd', 0],
        ]);
        assert_eq!(msg, expected);
    }

    /// A reply the way the kernel builds one: message + attributes.
    fn reply(family: u16, seq: u32, cmd: u8, attrs: &Attrs) -> Vec<u8> {
        let mut m = request(family, cmd, 1, seq, attrs);
        // Replies carry no REQUEST/ACK flags.
        m[6] = 0;
        m[7] = 0;
        m
    }

    fn ack(seq: u32, errno: i32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&36u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&(-errno).to_ne_bytes());
        // The request's header, echoed.
        m.extend_from_slice(&[0u8; 16]);
        m
    }

    #[test]
    fn replies_are_parsed_message_by_message() {
        let mut a = Attrs::new();
        a.put_u32(NBD_ATTR_INDEX, 5);
        let mut dgram = reply(0x1a, 4, NBD_CMD_CONNECT, &a);
        dgram.extend(ack(4, 0));
        let r = parse_replies(&dgram).unwrap();
        assert_eq!(r.len(), 2);
        let Reply::Message {
            cmd, attrs, seq, ..
        } = &r[0]
        else {
            panic!("{r:?}")
        };
        assert_eq!((*cmd, *seq), (NBD_CMD_CONNECT, 4));
        assert_eq!(parse_connect_reply(attrs).unwrap(), 5);
        assert_eq!(r[1], Reply::Ack { seq: 4 });

        let r = parse_replies(&ack(9, libc::EBUSY)).unwrap();
        assert_eq!(
            r,
            vec![Reply::Error {
                seq: 9,
                errno: libc::EBUSY
            }]
        );
    }

    #[test]
    fn truncated_replies_are_errors_not_panics() {
        let a = ack(1, 0);
        for cut in 1..a.len() {
            let _ = parse_replies(&a[..cut]);
        }
        assert!(parse_replies(&a[..10]).is_err());
        let mut bad = a.clone();
        bad[0] = 200; // longer than the datagram
        assert!(parse_replies(&bad).is_err());
        assert!(parse_attrs(&[3, 0, 1, 0]).is_err());
        assert!(parse_connect_reply(&[]).is_err());
        let mut a = Attrs::new();
        a.put_u8(NBD_ATTR_INDEX, 1);
        assert!(parse_connect_reply(a.bytes()).is_err(), "u8 for a u32");
    }

    #[test]
    fn status_lists_devices() {
        let mut a = Attrs::new();
        a.put_nested(NBD_ATTR_DEVICE_LIST, |l| {
            l.put_nested(NBD_DEVICE_ITEM, |i| {
                i.put_u32(NBD_DEVICE_INDEX, 0)
                    .put_u8(NBD_DEVICE_CONNECTED, 1);
            });
            l.put_nested(NBD_DEVICE_ITEM, |i| {
                i.put_u32(NBD_DEVICE_INDEX, 7)
                    .put_u8(NBD_DEVICE_CONNECTED, 0);
            });
        });
        assert_eq!(
            parse_status_reply(a.bytes()).unwrap(),
            vec![
                DeviceStatus {
                    index: 0,
                    connected: true
                },
                DeviceStatus {
                    index: 7,
                    connected: false
                },
            ]
        );
        assert!(parse_status_reply(&[]).unwrap().is_empty());
        // The NLA_F_NESTED flag is ignored when reading.
        let mut raw = a.bytes().to_vec();
        raw[3] |= 0x80;
        assert_eq!(parse_status_reply(&raw).unwrap().len(), 2);
    }

    #[test]
    fn family_id_is_read_from_the_controller_reply() {
        let mut a = Attrs::new();
        a.put_u16(CTRL_ATTR_FAMILY_ID, 0x1a)
            .put_str(CTRL_ATTR_FAMILY_NAME, "nbd");
        let dgram = reply(GENL_ID_CTRL, 1, 1, &a);
        let r = parse_replies(&dgram).unwrap();
        let Reply::Message { attrs, .. } = &r[0] else {
            panic!("{r:?}")
        };
        assert_eq!(parse_family_id(attrs).unwrap(), 0x1a);
    }
}
