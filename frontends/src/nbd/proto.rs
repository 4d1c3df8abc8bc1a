//! NBD wire format: constants and pure encode/parse functions.
//!
//! Everything here is side-effect free so it can be property-tested and
//! fuzzed. All integers on the wire are big-endian. Reference:
//! <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.

use super::error::NbdError;

// ---------------------------------------------------------------------------
// Magic numbers
// ---------------------------------------------------------------------------

/// "NBDMAGIC": first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation magic, also prefixes every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Oldstyle negotiation magic (not supported, only recognised by the client).
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---------------------------------------------------------------------------
// Handshake flags
// ---------------------------------------------------------------------------

/// Server handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: may omit the 124 zero bytes after NBD_OPT_EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle understood.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: don't send the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// All client flags this implementation knows.
pub const KNOWN_CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

// ---------------------------------------------------------------------------
// Transmission flags
// ---------------------------------------------------------------------------

pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
pub const FLAG_BLOCK_STAT_PAYLOAD: u16 = 1 << 12;

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_PEEK_EXPORT: u32 = 4;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// ---------------------------------------------------------------------------
// Option reply types
// ---------------------------------------------------------------------------

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
/// Bit set in every option error reply.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

// ---------------------------------------------------------------------------
// NBD_REP_INFO types
// ---------------------------------------------------------------------------

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------
// Commands and command flags
// ---------------------------------------------------------------------------

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_RESIZE: u16 = 8;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// ---------------------------------------------------------------------------
// Structured replies
// ---------------------------------------------------------------------------

pub const REPLY_FLAG_DONE: u16 = 1 << 0;

pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Bit set in every error chunk type.
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

// ---------------------------------------------------------------------------
// Error values (transmission phase)
// ---------------------------------------------------------------------------

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// ---------------------------------------------------------------------------
// base:allocation
// ---------------------------------------------------------------------------

pub const META_BASE_ALLOCATION: &str = "base:allocation";
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

// ---------------------------------------------------------------------------
// Sizes and limits
// ---------------------------------------------------------------------------

pub const REQUEST_SIZE: usize = 28;
pub const SIMPLE_REPLY_SIZE: usize = 16;
pub const CHUNK_HEADER_SIZE: usize = 20;
pub const OPTION_HEADER_SIZE: usize = 16;
pub const OPTION_REPLY_HEADER_SIZE: usize = 20;
/// Size of the server's initial greeting (NBDMAGIC, IHAVEOPT, handshake flags).
pub const GREETING_SIZE: usize = 18;

/// Longest string (export name, query, message) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;
/// Largest option payload the server buffers; larger ones close the connection.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Advertised block size constraints.
pub const MIN_BLOCK_SIZE: u32 = 1;
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
pub const MAX_BLOCK_SIZE: u32 = 32 * 1024 * 1024;

// ---------------------------------------------------------------------------
// Byte helpers
// ---------------------------------------------------------------------------

fn need(what: &'static str, buf: &[u8], n: usize) -> Result<(), NbdError> {
    if buf.len() < n {
        Err(NbdError::Truncated {
            what,
            need: n,
            have: buf.len(),
        })
    } else {
        Ok(())
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// A cursor over an option payload that fails (instead of panicking) when
/// the payload is too short.
struct Cursor<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Cursor { buf, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], NbdError> {
        need(self.what, self.buf, n)?;
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, NbdError> {
        Ok(be16(self.take(2)?, 0))
    }

    fn u32(&mut self) -> Result<u32, NbdError> {
        Ok(be32(self.take(4)?, 0))
    }

    fn u64(&mut self) -> Result<u64, NbdError> {
        Ok(be64(self.take(8)?, 0))
    }

    fn string(&mut self, len: u32) -> Result<&'a [u8], NbdError> {
        let len = len as usize;
        if len > MAX_STRING_LEN {
            return Err(NbdError::Malformed {
                what: self.what,
                detail: "string longer than 4096 bytes",
            });
        }
        self.take(len)
    }

    fn finish(self) -> Result<(), NbdError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(NbdError::Malformed {
                what: self.what,
                detail: "trailing bytes",
            })
        }
    }
}

// ---------------------------------------------------------------------------
// Transmission: requests
// ---------------------------------------------------------------------------

/// A transmission-phase request header (without the WRITE payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Encode a request header (28 bytes).
pub fn encode_request(r: &Request) -> [u8; REQUEST_SIZE] {
    let mut b = [0u8; REQUEST_SIZE];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.kind.to_be_bytes());
    b[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.length.to_be_bytes());
    b
}

/// Parse a request header from the first 28 bytes of `b`.
pub fn parse_request(b: &[u8]) -> Result<Request, NbdError> {
    need("request header", b, REQUEST_SIZE)?;
    let magic = be32(b, 0);
    if magic != REQUEST_MAGIC {
        return Err(NbdError::BadMagic {
            what: "request header",
            expected: REQUEST_MAGIC.into(),
            found: magic.into(),
        });
    }
    Ok(Request {
        flags: be16(b, 4),
        kind: be16(b, 6),
        cookie: be64(b, 8),
        offset: be64(b, 16),
        length: be32(b, 24),
    })
}

// ---------------------------------------------------------------------------
// Transmission: simple replies
// ---------------------------------------------------------------------------

/// A simple reply header (followed by the data of a successful READ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

pub fn encode_simple_reply(r: &SimpleReply) -> [u8; SIMPLE_REPLY_SIZE] {
    let mut b = [0u8; SIMPLE_REPLY_SIZE];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&r.error.to_be_bytes());
    b[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    b
}

pub fn parse_simple_reply(b: &[u8]) -> Result<SimpleReply, NbdError> {
    need("simple reply", b, SIMPLE_REPLY_SIZE)?;
    let magic = be32(b, 0);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(NbdError::BadMagic {
            what: "simple reply",
            expected: SIMPLE_REPLY_MAGIC.into(),
            found: magic.into(),
        });
    }
    Ok(SimpleReply {
        error: be32(b, 4),
        cookie: be64(b, 8),
    })
}

// ---------------------------------------------------------------------------
// Transmission: structured reply chunks
// ---------------------------------------------------------------------------

/// A structured reply chunk header; `length` bytes of payload follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub length: u32,
}

pub fn encode_chunk_header(c: &ChunkHeader) -> [u8; CHUNK_HEADER_SIZE] {
    let mut b = [0u8; CHUNK_HEADER_SIZE];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&c.flags.to_be_bytes());
    b[6..8].copy_from_slice(&c.kind.to_be_bytes());
    b[8..16].copy_from_slice(&c.cookie.to_be_bytes());
    b[16..20].copy_from_slice(&c.length.to_be_bytes());
    b
}

pub fn parse_chunk_header(b: &[u8]) -> Result<ChunkHeader, NbdError> {
    need("structured reply chunk", b, CHUNK_HEADER_SIZE)?;
    let magic = be32(b, 0);
    if magic != STRUCTURED_REPLY_MAGIC {
        return Err(NbdError::BadMagic {
            what: "structured reply chunk",
            expected: STRUCTURED_REPLY_MAGIC.into(),
            found: magic.into(),
        });
    }
    Ok(ChunkHeader {
        flags: be16(b, 4),
        kind: be16(b, 6),
        cookie: be64(b, 8),
        length: be32(b, 16),
    })
}

/// Payload of an NBD_REPLY_TYPE_ERROR chunk: errno, message length, message.
pub fn encode_error_payload(errno: u32, message: &[u8]) -> Vec<u8> {
    let msg = &message[..message.len().min(MAX_STRING_LEN)];
    let mut v = Vec::with_capacity(6 + msg.len());
    v.extend_from_slice(&errno.to_be_bytes());
    // Bounded by MAX_STRING_LEN above, so it fits in u16.
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

/// Parse the common prefix of every error chunk (ERROR and ERROR_OFFSET):
/// returns the errno and the message.
pub fn parse_error_payload(p: &[u8]) -> Result<(u32, &[u8]), NbdError> {
    let mut c = Cursor::new(p, "error chunk");
    let errno = c.u32()?;
    let len = c.u16()?;
    let msg = c.take(len.into())?;
    Ok((errno, msg))
}

/// Parse the 8-byte offset prefix of an OFFSET_DATA payload; returns the
/// offset and the data.
pub fn parse_offset_data(p: &[u8]) -> Result<(u64, &[u8]), NbdError> {
    let mut c = Cursor::new(p, "offset data chunk");
    let offset = c.u64()?;
    if c.buf.is_empty() {
        return Err(NbdError::Malformed {
            what: "offset data chunk",
            detail: "no data",
        });
    }
    Ok((offset, c.buf))
}

/// Parse an OFFSET_HOLE payload: offset and hole size.
pub fn parse_offset_hole(p: &[u8]) -> Result<(u64, u32), NbdError> {
    let mut c = Cursor::new(p, "offset hole chunk");
    let offset = c.u64()?;
    let size = c.u32()?;
    c.finish()?;
    if size == 0 {
        return Err(NbdError::Malformed {
            what: "offset hole chunk",
            detail: "zero hole size",
        });
    }
    Ok((offset, size))
}

/// One descriptor of an NBD_REPLY_TYPE_BLOCK_STATUS chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDescriptor {
    pub length: u32,
    pub flags: u32,
}

/// Append the wire form of the descriptors to `out`.
pub fn encode_block_descriptors(descs: &[BlockDescriptor], out: &mut Vec<u8>) {
    out.reserve(descs.len() * 8);
    for d in descs {
        out.extend_from_slice(&d.length.to_be_bytes());
        out.extend_from_slice(&d.flags.to_be_bytes());
    }
}

/// Full payload of a BLOCK_STATUS chunk: context id then descriptors.
pub fn encode_block_status_payload(context_id: u32, descs: &[BlockDescriptor]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + descs.len() * 8);
    v.extend_from_slice(&context_id.to_be_bytes());
    encode_block_descriptors(descs, &mut v);
    v
}

pub fn parse_block_status_payload(p: &[u8]) -> Result<(u32, Vec<BlockDescriptor>), NbdError> {
    let mut c = Cursor::new(p, "block status chunk");
    let id = c.u32()?;
    if c.buf.is_empty() || !c.buf.len().is_multiple_of(8) {
        return Err(NbdError::Malformed {
            what: "block status chunk",
            detail: "length is not 4 + a positive multiple of 8",
        });
    }
    let mut descs = Vec::with_capacity(c.buf.len() / 8);
    while !c.buf.is_empty() {
        let length = c.u32()?;
        let flags = c.u32()?;
        if length == 0 {
            return Err(NbdError::Malformed {
                what: "block status chunk",
                detail: "zero-length extent",
            });
        }
        descs.push(BlockDescriptor { length, flags });
    }
    Ok((id, descs))
}

// ---------------------------------------------------------------------------
// Handshake: options
// ---------------------------------------------------------------------------

/// A client option header; `length` bytes of payload follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

pub fn encode_option_header(h: &OptionHeader) -> [u8; OPTION_HEADER_SIZE] {
    let mut b = [0u8; OPTION_HEADER_SIZE];
    b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[8..12].copy_from_slice(&h.option.to_be_bytes());
    b[12..16].copy_from_slice(&h.length.to_be_bytes());
    b
}

pub fn parse_option_header(b: &[u8]) -> Result<OptionHeader, NbdError> {
    need("option header", b, OPTION_HEADER_SIZE)?;
    let magic = be64(b, 0);
    if magic != IHAVEOPT {
        return Err(NbdError::BadMagic {
            what: "option header",
            expected: IHAVEOPT,
            found: magic,
        });
    }
    Ok(OptionHeader {
        option: be32(b, 8),
        length: be32(b, 12),
    })
}

/// A server option reply header; `length` bytes of payload follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply: u32,
    pub length: u32,
}

pub fn encode_option_reply_header(h: &OptionReplyHeader) -> [u8; OPTION_REPLY_HEADER_SIZE] {
    let mut b = [0u8; OPTION_REPLY_HEADER_SIZE];
    b[0..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b[8..12].copy_from_slice(&h.option.to_be_bytes());
    b[12..16].copy_from_slice(&h.reply.to_be_bytes());
    b[16..20].copy_from_slice(&h.length.to_be_bytes());
    b
}

pub fn parse_option_reply_header(b: &[u8]) -> Result<OptionReplyHeader, NbdError> {
    need("option reply header", b, OPTION_REPLY_HEADER_SIZE)?;
    let magic = be64(b, 0);
    if magic != OPTION_REPLY_MAGIC {
        return Err(NbdError::BadMagic {
            what: "option reply header",
            expected: OPTION_REPLY_MAGIC,
            found: magic,
        });
    }
    Ok(OptionReplyHeader {
        option: be32(b, 8),
        reply: be32(b, 12),
        length: be32(b, 16),
    })
}

/// Server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn encode_greeting(handshake_flags: u16) -> [u8; GREETING_SIZE] {
    let mut b = [0u8; GREETING_SIZE];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&handshake_flags.to_be_bytes());
    b
}

/// Parse the server greeting; returns the handshake flags.
pub fn parse_greeting(b: &[u8]) -> Result<u16, NbdError> {
    need("server greeting", b, GREETING_SIZE)?;
    let m1 = be64(b, 0);
    if m1 != NBDMAGIC {
        return Err(NbdError::BadMagic {
            what: "server greeting",
            expected: NBDMAGIC,
            found: m1,
        });
    }
    let m2 = be64(b, 8);
    if m2 == CLISERV_MAGIC {
        return Err(NbdError::Malformed {
            what: "server greeting",
            detail: "oldstyle negotiation is not supported",
        });
    }
    if m2 != IHAVEOPT {
        return Err(NbdError::BadMagic {
            what: "server greeting",
            expected: IHAVEOPT,
            found: m2,
        });
    }
    Ok(be16(b, 16))
}

/// Payload of NBD_OPT_INFO / NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    pub name: &'a [u8],
    pub requests: Vec<u16>,
}

pub fn encode_info_request(name: &[u8], requests: &[u16]) -> Vec<u8> {
    let mut v = Vec::with_capacity(6 + name.len() + 2 * requests.len());
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name);
    v.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        v.extend_from_slice(&r.to_be_bytes());
    }
    v
}

pub fn parse_info_request(p: &[u8]) -> Result<InfoRequest<'_>, NbdError> {
    let mut c = Cursor::new(p, "NBD_OPT_INFO/GO payload");
    let name_len = c.u32()?;
    let name = c.string(name_len)?;
    let n = c.u16()?;
    let mut requests = Vec::with_capacity(usize::from(n).min(c.buf.len() / 2));
    for _ in 0..n {
        requests.push(c.u16()?);
    }
    c.finish()?;
    Ok(InfoRequest { name, requests })
}

/// Payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest<'a> {
    pub export: &'a [u8],
    pub queries: Vec<&'a [u8]>,
}

pub fn encode_meta_context_request(export: &[u8], queries: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(export.len() as u32).to_be_bytes());
    v.extend_from_slice(export);
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q);
    }
    v
}

pub fn parse_meta_context_request(p: &[u8]) -> Result<MetaContextRequest<'_>, NbdError> {
    let mut c = Cursor::new(p, "meta context payload");
    let name_len = c.u32()?;
    let export = c.string(name_len)?;
    let n = c.u32()?;
    // Every query takes at least 4 bytes; don't trust `n` for the allocation.
    let mut queries = Vec::with_capacity((n as usize).min(c.buf.len() / 4));
    for _ in 0..n {
        let len = c.u32()?;
        queries.push(c.string(len)?);
    }
    c.finish()?;
    Ok(MetaContextRequest { export, queries })
}

/// Payload of an NBD_REP_META_CONTEXT reply: context id and name.
pub fn encode_meta_context_reply(id: u32, name: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(name);
    v
}

pub fn parse_meta_context_reply(p: &[u8]) -> Result<(u32, &[u8]), NbdError> {
    let mut c = Cursor::new(p, "meta context reply");
    let id = c.u32()?;
    Ok((id, c.buf))
}

/// Payload of an NBD_REP_SERVER reply: name, then a description.
pub fn encode_server_reply(name: &[u8], description: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len() + description.len());
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name);
    v.extend_from_slice(description);
    v
}

pub fn parse_server_reply(p: &[u8]) -> Result<(&[u8], &[u8]), NbdError> {
    let mut c = Cursor::new(p, "NBD_REP_SERVER payload");
    let len = c.u32()?;
    let name = c.take(len as usize)?;
    Ok((name, c.buf))
}

/// An NBD_REP_INFO payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoReply<'a> {
    Export { size: u64, flags: u16 },
    Name(&'a [u8]),
    Description(&'a [u8]),
    BlockSize { min: u32, preferred: u32, max: u32 },
    Unknown { kind: u16, data: &'a [u8] },
}

pub fn encode_info_reply(info: &InfoReply<'_>) -> Vec<u8> {
    let mut v = Vec::with_capacity(14);
    match info {
        InfoReply::Export { size, flags } => {
            v.extend_from_slice(&INFO_EXPORT.to_be_bytes());
            v.extend_from_slice(&size.to_be_bytes());
            v.extend_from_slice(&flags.to_be_bytes());
        }
        InfoReply::Name(n) => {
            v.extend_from_slice(&INFO_NAME.to_be_bytes());
            v.extend_from_slice(n);
        }
        InfoReply::Description(d) => {
            v.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
            v.extend_from_slice(d);
        }
        InfoReply::BlockSize {
            min,
            preferred,
            max,
        } => {
            v.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
            v.extend_from_slice(&min.to_be_bytes());
            v.extend_from_slice(&preferred.to_be_bytes());
            v.extend_from_slice(&max.to_be_bytes());
        }
        InfoReply::Unknown { kind, data } => {
            v.extend_from_slice(&kind.to_be_bytes());
            v.extend_from_slice(data);
        }
    }
    v
}

pub fn parse_info_reply(p: &[u8]) -> Result<InfoReply<'_>, NbdError> {
    let mut c = Cursor::new(p, "NBD_REP_INFO payload");
    let kind = c.u16()?;
    let info = match kind {
        INFO_EXPORT => {
            let size = c.u64()?;
            let flags = c.u16()?;
            c.finish()?;
            InfoReply::Export { size, flags }
        }
        INFO_NAME => InfoReply::Name(c.buf),
        INFO_DESCRIPTION => InfoReply::Description(c.buf),
        INFO_BLOCK_SIZE => {
            let min = c.u32()?;
            let preferred = c.u32()?;
            let max = c.u32()?;
            c.finish()?;
            InfoReply::BlockSize {
                min,
                preferred,
                max,
            }
        }
        kind => InfoReply::Unknown { kind, data: c.buf },
    };
    Ok(info)
}

// ---------------------------------------------------------------------------
// Names for logs and errors
// ---------------------------------------------------------------------------

pub fn command_name(kind: u16) -> &'static str {
    match kind {
        CMD_READ => "NBD_CMD_READ",
        CMD_WRITE => "NBD_CMD_WRITE",
        CMD_DISC => "NBD_CMD_DISC",
        CMD_FLUSH => "NBD_CMD_FLUSH",
        CMD_TRIM => "NBD_CMD_TRIM",
        CMD_CACHE => "NBD_CMD_CACHE",
        CMD_WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
        CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        CMD_RESIZE => "NBD_CMD_RESIZE",
        _ => "unknown command",
    }
}

pub fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_PEEK_EXPORT => "NBD_OPT_PEEK_EXPORT",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "unknown option",
    }
}

pub fn reply_name(reply: u32) -> &'static str {
    match reply {
        REP_ACK => "NBD_REP_ACK",
        REP_SERVER => "NBD_REP_SERVER",
        REP_INFO => "NBD_REP_INFO",
        REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        REP_ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD",
        _ => "unknown reply",
    }
}

pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        0 => "success",
        EPERM => "EPERM",
        EIO => "EIO",
        ENOMEM => "ENOMEM",
        EINVAL => "EINVAL",
        ENOSPC => "ENOSPC",
        EOVERFLOW => "EOVERFLOW",
        ENOTSUP => "ENOTSUP",
        ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown error",
    }
}

/// Map a backend I/O error to the NBD error value sent to the client.
pub fn errno_from_io(e: &std::io::Error) -> u32 {
    use std::io::ErrorKind;
    if let Some(code) = e.raw_os_error() {
        return match code {
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
            libc::EPERM | libc::EACCES | libc::EROFS => EPERM,
            libc::EINVAL => EINVAL,
            libc::ENOTSUP => ENOTSUP,
            libc::ESHUTDOWN => ESHUTDOWN,
            _ => EIO,
        };
    }
    match e.kind() {
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::FileTooLarge => ENOSPC,
        ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => EPERM,
        ErrorKind::InvalidInput => EINVAL,
        ErrorKind::Unsupported => ENOTSUP,
        _ => EIO,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_layout_matches_spec() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 0x1122_3344_5566_7788,
            length: 0x99aa_bbcc,
        };
        let b = encode_request(&r);
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..6], &[0, 1]);
        assert_eq!(&b[6..8], &[0, 1]);
        assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&b[24..28], &[0x99, 0xaa, 0xbb, 0xcc]);
        assert_eq!(parse_request(&b).unwrap(), r);
    }

    #[test]
    fn magics_are_the_spec_values() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
        assert_eq!(OPTION_REPLY_MAGIC, 0x3e889045565a9);
        assert_eq!(REP_ERR_UNKNOWN, 0x8000_0006);
        assert_eq!(REPLY_TYPE_ERROR, 0x8001);
    }

    #[test]
    fn bad_request_magic_is_rejected() {
        let mut b = encode_request(&Request {
            flags: 0,
            kind: CMD_READ,
            cookie: 1,
            offset: 0,
            length: 512,
        });
        b[0] ^= 0xff;
        assert!(matches!(parse_request(&b), Err(NbdError::BadMagic { .. })));
        assert!(matches!(
            parse_request(&b[..27]),
            Err(NbdError::Truncated { need: 28, .. })
        ));
    }

    #[test]
    fn info_request_rejects_inconsistent_lengths() {
        // Name length larger than the payload.
        let mut p = encode_info_request(b"disk", &[INFO_BLOCK_SIZE]);
        p[3] = 200;
        assert!(parse_info_request(&p).is_err());
        // Trailing garbage.
        let mut p = encode_info_request(b"disk", &[]);
        p.push(0);
        assert!(parse_info_request(&p).is_err());
        // Request count larger than the payload.
        let mut p = encode_info_request(b"", &[]);
        p[5] = 3;
        assert!(parse_info_request(&p).is_err());
    }

    #[test]
    fn meta_context_request_rejects_overlong_strings() {
        let long = vec![b'a'; MAX_STRING_LEN + 1];
        let p = encode_meta_context_request(b"x", &[&long]);
        assert!(parse_meta_context_request(&p).is_err());
    }

    #[test]
    fn errno_mapping() {
        let e = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(errno_from_io(&e), ENOSPC);
        let e = std::io::Error::from_raw_os_error(libc::EROFS);
        assert_eq!(errno_from_io(&e), EPERM);
        let e = std::io::Error::from_raw_os_error(libc::EBADF);
        assert_eq!(errno_from_io(&e), EIO);
        let e = std::io::Error::new(std::io::ErrorKind::InvalidInput, "x");
        assert_eq!(errno_from_io(&e), EINVAL);
        let e = std::io::Error::other("x");
        assert_eq!(errno_from_io(&e), EIO);
    }

    proptest! {
        #[test]
        fn request_roundtrip(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) {
            let r = Request { flags, kind, cookie, offset, length };
            prop_assert_eq!(parse_request(&encode_request(&r)).unwrap(), r);
        }

        #[test]
        fn simple_reply_roundtrip(error: u32, cookie: u64) {
            let r = SimpleReply { error, cookie };
            prop_assert_eq!(parse_simple_reply(&encode_simple_reply(&r)).unwrap(), r);
        }

        #[test]
        fn chunk_header_roundtrip(flags: u16, kind: u16, cookie: u64, length: u32) {
            let c = ChunkHeader { flags, kind, cookie, length };
            prop_assert_eq!(parse_chunk_header(&encode_chunk_header(&c)).unwrap(), c);
        }

        #[test]
        fn option_header_roundtrip(option: u32, length: u32) {
            let h = OptionHeader { option, length };
            prop_assert_eq!(parse_option_header(&encode_option_header(&h)).unwrap(), h);
        }

        #[test]
        fn option_reply_header_roundtrip(option: u32, reply: u32, length: u32) {
            let h = OptionReplyHeader { option, reply, length };
            prop_assert_eq!(parse_option_reply_header(&encode_option_reply_header(&h)).unwrap(), h);
        }

        #[test]
        fn greeting_roundtrip(flags: u16) {
            prop_assert_eq!(parse_greeting(&encode_greeting(flags)).unwrap(), flags);
        }

        #[test]
        fn info_request_roundtrip(
            name in proptest::collection::vec(any::<u8>(), 0..300),
            reqs in proptest::collection::vec(any::<u16>(), 0..20),
        ) {
            let p = encode_info_request(&name, &reqs);
            let parsed = parse_info_request(&p).unwrap();
            prop_assert_eq!(parsed.name, &name[..]);
            prop_assert_eq!(parsed.requests, reqs);
        }

        #[test]
        fn meta_context_roundtrip(
            export in proptest::collection::vec(any::<u8>(), 0..100),
            queries in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..50), 0..8),
        ) {
            let qs: Vec<&[u8]> = queries.iter().map(|q| q.as_slice()).collect();
            let p = encode_meta_context_request(&export, &qs);
            let parsed = parse_meta_context_request(&p).unwrap();
            prop_assert_eq!(parsed.export, &export[..]);
            prop_assert_eq!(parsed.queries, qs);
        }

        #[test]
        fn info_reply_roundtrip(size: u64, flags: u16, min: u32, preferred: u32, max: u32,
                                name in proptest::collection::vec(any::<u8>(), 0..64)) {
            for info in [
                InfoReply::Export { size, flags },
                InfoReply::BlockSize { min, preferred, max },
                InfoReply::Name(&name),
                InfoReply::Description(&name),
            ] {
                let p = encode_info_reply(&info);
                prop_assert_eq!(parse_info_reply(&p).unwrap(), info);
            }
        }

        #[test]
        fn error_payload_roundtrip(errno: u32, msg in proptest::collection::vec(any::<u8>(), 0..200)) {
            let p = encode_error_payload(errno, &msg);
            let (e, m) = parse_error_payload(&p).unwrap();
            prop_assert_eq!(e, errno);
            prop_assert_eq!(m, &msg[..]);
        }

        #[test]
        fn block_status_roundtrip(id: u32,
                                  descs in proptest::collection::vec((1u32.., any::<u32>()), 1..50)) {
            let descs: Vec<BlockDescriptor> =
                descs.into_iter().map(|(length, flags)| BlockDescriptor { length, flags }).collect();
            let p = encode_block_status_payload(id, &descs);
            let (pid, pd) = parse_block_status_payload(&p).unwrap();
            prop_assert_eq!(pid, id);
            prop_assert_eq!(pd, descs);
        }

        #[test]
        fn server_reply_roundtrip(name in proptest::collection::vec(any::<u8>(), 0..64),
                                  desc in proptest::collection::vec(any::<u8>(), 0..64)) {
            let p = encode_server_reply(&name, &desc);
            let (n, d) = parse_server_reply(&p).unwrap();
            prop_assert_eq!(n, &name[..]);
            prop_assert_eq!(d, &desc[..]);
        }

        /// No parser may panic on arbitrary input.
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_request(&bytes);
            let _ = parse_simple_reply(&bytes);
            let _ = parse_chunk_header(&bytes);
            let _ = parse_option_header(&bytes);
            let _ = parse_option_reply_header(&bytes);
            let _ = parse_greeting(&bytes);
            let _ = parse_info_request(&bytes);
            let _ = parse_meta_context_request(&bytes);
            let _ = parse_meta_context_reply(&bytes);
            let _ = parse_server_reply(&bytes);
            let _ = parse_info_reply(&bytes);
            let _ = parse_error_payload(&bytes);
            let _ = parse_offset_data(&bytes);
            let _ = parse_offset_hole(&bytes);
            let _ = parse_block_status_payload(&bytes);
        }

        /// Arbitrary bytes behind a valid magic parse as a request (the
        /// header has no invalid field values besides the magic).
        #[test]
        fn any_request_body_parses(body in proptest::collection::vec(any::<u8>(), 24..=24)) {
            let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
            b.extend_from_slice(&body);
            prop_assert!(parse_request(&b).is_ok());
        }
    }
}
