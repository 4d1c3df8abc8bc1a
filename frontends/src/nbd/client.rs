//! A minimal async NBD client: fixed newstyle handshake with NBD_OPT_GO,
//! simple or structured replies, one request at a time.
//!
//! One `NbdClient` is one connection; to drive an export from several tasks,
//! open one client per task (servers advertising NBD_FLAG_CAN_MULTI_CONN,
//! like ours, make that safe).

use std::fmt;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpStream, ToSocketAddrs, UnixStream};

use super::error::NbdError;
use super::proto::{self, BlockDescriptor, InfoReply, OptionHeader, OptionReplyHeader, Request};

/// Option replies larger than this are treated as a protocol violation.
const MAX_OPTION_REPLY: u32 = 1024 * 1024;
/// Largest non-data chunk payload (block status, errors) accepted.
const MAX_CHUNK_PAYLOAD: u32 = 16 * 1024 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest TRIM sent in one request.
const MAX_TRIM: u64 = 1 << 30;

/// What to negotiate.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Ask for structured replies (NBD_OPT_STRUCTURED_REPLY).
    pub structured_replies: bool,
    /// Select `base:allocation` (needs structured replies) so that
    /// [`NbdClient::block_status`] works.
    pub base_allocation: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            structured_replies: true,
            base_allocation: true,
        }
    }
}

/// What the server told us about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
    pub description: Option<String>,
}

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// One connection to one export.
pub struct NbdClient {
    reader: BufReader<BoxRead>,
    writer: BufWriter<BoxWrite>,
    info: ExportInfo,
    structured: bool,
    meta_context: Option<u32>,
    next_cookie: u64,
    /// Set after an error that leaves the stream in an unknown state.
    broken: bool,
}

impl fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdClient")
            .field("info", &self.info)
            .field("structured", &self.structured)
            .field("meta_context", &self.meta_context)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

async fn send_option(
    w: &mut BufWriter<BoxWrite>,
    option: u32,
    data: &[u8],
) -> Result<(), NbdError> {
    let length = u32::try_from(data.len()).map_err(|_| NbdError::Protocol {
        detail: "option payload too large".into(),
    })?;
    let ctx = "sending option";
    w.write_all(&proto::encode_option_header(&OptionHeader {
        option,
        length,
    }))
    .await
    .map_err(NbdError::io(ctx))?;
    w.write_all(data).await.map_err(NbdError::io(ctx))?;
    w.flush().await.map_err(NbdError::io(ctx))
}

async fn read_option_reply(
    r: &mut BufReader<BoxRead>,
    option: u32,
) -> Result<(OptionReplyHeader, Vec<u8>), NbdError> {
    let ctx = "reading option reply";
    let mut hdr = [0u8; proto::OPTION_REPLY_HEADER_SIZE];
    r.read_exact(&mut hdr).await.map_err(NbdError::io(ctx))?;
    let h = proto::parse_option_reply_header(&hdr)?;
    if h.option != option {
        return Err(NbdError::Protocol {
            detail: format!(
                "reply for option {} while waiting for {}",
                h.option,
                proto::option_name(option)
            ),
        });
    }
    if h.length > MAX_OPTION_REPLY {
        return Err(NbdError::Protocol {
            detail: format!("{}-byte option reply", h.length),
        });
    }
    let mut data = vec![0u8; h.length as usize];
    r.read_exact(&mut data).await.map_err(NbdError::io(ctx))?;
    Ok((h, data))
}

fn rejected(option: u32, reply: u32, data: &[u8]) -> NbdError {
    NbdError::OptionRejected {
        option,
        reply,
        message: String::from_utf8_lossy(data).into_owned(),
    }
}

fn unexpected_reply(option: u32, reply: u32) -> NbdError {
    NbdError::Protocol {
        detail: format!(
            "unexpected reply {} ({reply:#x}) to {}",
            proto::reply_name(reply),
            proto::option_name(option)
        ),
    }
}

struct Negotiated {
    info: ExportInfo,
    structured: bool,
    meta_context: Option<u32>,
}

async fn handshake(
    r: &mut BufReader<BoxRead>,
    w: &mut BufWriter<BoxWrite>,
    export: &str,
    opts: &ClientOptions,
) -> Result<Negotiated, NbdError> {
    let mut greeting = [0u8; proto::GREETING_SIZE];
    r.read_exact(&mut greeting)
        .await
        .map_err(NbdError::io("reading server greeting"))?;
    let hflags = proto::parse_greeting(&greeting)?;
    if hflags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::Protocol {
            detail: "server does not support fixed newstyle negotiation".into(),
        });
    }
    let no_zeroes = hflags & proto::FLAG_NO_ZEROES != 0;
    let mut cflags = proto::FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        cflags |= proto::FLAG_C_NO_ZEROES;
    }
    w.write_all(&cflags.to_be_bytes())
        .await
        .map_err(NbdError::io("sending client flags"))?;

    let mut structured = false;
    if opts.structured_replies {
        send_option(w, proto::OPT_STRUCTURED_REPLY, &[]).await?;
        let (h, _) = read_option_reply(r, proto::OPT_STRUCTURED_REPLY).await?;
        match h.reply {
            proto::REP_ACK => structured = true,
            e if e & proto::REP_FLAG_ERROR != 0 => {}
            other => return Err(unexpected_reply(proto::OPT_STRUCTURED_REPLY, other)),
        }
    }

    let mut meta_context = None;
    if structured && opts.base_allocation {
        let payload = proto::encode_meta_context_request(
            export.as_bytes(),
            &[proto::META_BASE_ALLOCATION.as_bytes()],
        );
        send_option(w, proto::OPT_SET_META_CONTEXT, &payload).await?;
        loop {
            let (h, data) = read_option_reply(r, proto::OPT_SET_META_CONTEXT).await?;
            match h.reply {
                proto::REP_META_CONTEXT => {
                    let (id, name) = proto::parse_meta_context_reply(&data)?;
                    if name == proto::META_BASE_ALLOCATION.as_bytes() {
                        meta_context = Some(id);
                    }
                }
                proto::REP_ACK => break,
                e if e & proto::REP_FLAG_ERROR != 0 => {
                    meta_context = None;
                    break;
                }
                other => return Err(unexpected_reply(proto::OPT_SET_META_CONTEXT, other)),
            }
        }
    }

    let payload = proto::encode_info_request(
        export.as_bytes(),
        &[proto::INFO_BLOCK_SIZE, proto::INFO_DESCRIPTION],
    );
    send_option(w, proto::OPT_GO, &payload).await?;
    let mut info = ExportInfo {
        size: 0,
        flags: 0,
        min_block: 1,
        preferred_block: proto::PREFERRED_BLOCK_SIZE,
        max_block: proto::MAX_BLOCK_SIZE,
        description: None,
    };
    let mut have_export = false;
    loop {
        let (h, data) = read_option_reply(r, proto::OPT_GO).await?;
        match h.reply {
            proto::REP_INFO => match proto::parse_info_reply(&data)? {
                InfoReply::Export { size, flags } => {
                    info.size = size;
                    info.flags = flags;
                    have_export = true;
                }
                InfoReply::BlockSize {
                    min,
                    preferred,
                    max,
                } => {
                    info.min_block = min.max(1);
                    info.preferred_block = preferred;
                    info.max_block = max;
                }
                InfoReply::Description(d) => {
                    info.description = Some(String::from_utf8_lossy(d).into_owned());
                }
                InfoReply::Name(_) | InfoReply::Unknown { .. } => {}
            },
            proto::REP_ACK => break,
            proto::REP_ERR_UNSUP => {
                // Old server without NBD_OPT_GO.
                send_option(w, proto::OPT_EXPORT_NAME, export.as_bytes()).await?;
                let ctx = "reading NBD_OPT_EXPORT_NAME reply";
                info.size = r.read_u64().await.map_err(NbdError::io(ctx))?;
                info.flags = r.read_u16().await.map_err(NbdError::io(ctx))?;
                if !no_zeroes {
                    let mut zeroes = [0u8; 124];
                    r.read_exact(&mut zeroes).await.map_err(NbdError::io(ctx))?;
                }
                have_export = true;
                break;
            }
            e if e & proto::REP_FLAG_ERROR != 0 => return Err(rejected(proto::OPT_GO, e, &data)),
            other => return Err(unexpected_reply(proto::OPT_GO, other)),
        }
    }
    if !have_export {
        return Err(NbdError::Protocol {
            detail: "NBD_OPT_GO succeeded without NBD_INFO_EXPORT".into(),
        });
    }
    Ok(Negotiated {
        info,
        structured,
        meta_context,
    })
}

/// Where the reply to a request goes.
enum Sink<'a> {
    None,
    Data(&'a mut [u8]),
    Extents(&'a mut Vec<BlockDescriptor>),
}

impl NbdClient {
    /// Connect over a unix socket with default options.
    pub async fn connect_unix(path: impl AsRef<Path>, export: &str) -> Result<Self, NbdError> {
        Self::connect_unix_with(path, export, &ClientOptions::default()).await
    }

    pub async fn connect_unix_with(
        path: impl AsRef<Path>,
        export: &str,
        opts: &ClientOptions,
    ) -> Result<Self, NbdError> {
        let path = path.as_ref();
        let s = UnixStream::connect(path)
            .await
            .map_err(|source| NbdError::Connect {
                addr: path.display().to_string(),
                source,
            })?;
        let (r, w) = s.into_split();
        Self::handshake_split(Box::new(r), Box::new(w), export, opts).await
    }

    /// Connect over TCP with default options.
    pub async fn connect_tcp(
        addr: impl ToSocketAddrs + fmt::Debug,
        export: &str,
    ) -> Result<Self, NbdError> {
        Self::connect_tcp_with(addr, export, &ClientOptions::default()).await
    }

    pub async fn connect_tcp_with(
        addr: impl ToSocketAddrs + fmt::Debug,
        export: &str,
        opts: &ClientOptions,
    ) -> Result<Self, NbdError> {
        let shown = format!("{addr:?}");
        let s = TcpStream::connect(addr)
            .await
            .map_err(|source| NbdError::Connect {
                addr: shown.clone(),
                source,
            })?;
        s.set_nodelay(true).map_err(|source| NbdError::Connect {
            addr: shown,
            source,
        })?;
        let (r, w) = s.into_split();
        Self::handshake_split(Box::new(r), Box::new(w), export, opts).await
    }

    /// Run the client over any byte stream.
    pub async fn from_stream<S>(
        stream: S,
        export: &str,
        opts: &ClientOptions,
    ) -> Result<Self, NbdError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        Self::handshake_split(Box::new(r), Box::new(w), export, opts).await
    }

    async fn handshake_split(
        r: BoxRead,
        w: BoxWrite,
        export: &str,
        opts: &ClientOptions,
    ) -> Result<Self, NbdError> {
        let mut reader = BufReader::with_capacity(256 * 1024, r);
        let mut writer = BufWriter::with_capacity(256 * 1024, w);
        let n = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            handshake(&mut reader, &mut writer, export, opts),
        )
        .await
        .map_err(|_| NbdError::Timeout {
            context: "negotiating with the server",
        })??;
        Ok(NbdClient {
            reader,
            writer,
            info: n.info,
            structured: n.structured,
            meta_context: n.meta_context,
            next_cookie: 0,
            broken: false,
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Transmission flags (NBD_FLAG_*).
    pub fn flags(&self) -> u16 {
        self.info.flags
    }

    pub fn is_read_only(&self) -> bool {
        self.info.flags & proto::FLAG_READ_ONLY != 0
    }

    pub fn can_multi_conn(&self) -> bool {
        self.info.flags & proto::FLAG_CAN_MULTI_CONN != 0
    }

    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    /// True if `base:allocation` was negotiated ([`Self::block_status`] works).
    pub fn has_base_allocation(&self) -> bool {
        self.meta_context.is_some()
    }

    /// Largest READ/WRITE/WRITE_ZEROES length sent in one request.
    fn max_request(&self) -> u64 {
        u64::from(self.info.max_block.clamp(1, proto::MAX_BLOCK_SIZE))
    }

    /// Read `len` bytes at `offset` (split into several requests if needed).
    pub async fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, NbdError> {
        let mut buf = vec![0u8; len];
        self.read_into(offset, &mut buf).await?;
        Ok(buf)
    }

    /// Fill `buf` from `offset`.
    pub async fn read_into(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        let max = self.max_request() as usize;
        let mut pos = offset;
        for chunk in buf.chunks_mut(max) {
            let len = chunk.len() as u32;
            self.command(proto::CMD_READ, 0, pos, len, None, Sink::Data(chunk))
                .await?;
            pos = pos.wrapping_add(u64::from(len));
        }
        Ok(())
    }

    /// Write `data` at `offset`; with `fua` each request is durable when it
    /// returns.
    pub async fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdError> {
        let flags = if fua { proto::CMD_FLAG_FUA } else { 0 };
        let max = self.max_request() as usize;
        let mut pos = offset;
        for chunk in data.chunks(max) {
            let len = chunk.len() as u32;
            self.command(proto::CMD_WRITE, flags, pos, len, Some(chunk), Sink::None)
                .await?;
            pos = pos.wrapping_add(u64::from(len));
        }
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<(), NbdError> {
        self.command(proto::CMD_FLUSH, 0, 0, 0, None, Sink::None)
            .await
    }

    /// Discard `[offset, offset+len)`.
    pub async fn trim(&mut self, offset: u64, len: u64) -> Result<(), NbdError> {
        self.ranged(proto::CMD_TRIM, 0, offset, len, MAX_TRIM).await
    }

    /// Zero `[offset, offset+len)`; `no_hole` forbids deallocating it.
    pub async fn write_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        no_hole: bool,
    ) -> Result<(), NbdError> {
        let flags = if no_hole { proto::CMD_FLAG_NO_HOLE } else { 0 };
        let max = self.max_request();
        self.ranged(proto::CMD_WRITE_ZEROES, flags, offset, len, max)
            .await
    }

    async fn ranged(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u64,
        max: u64,
    ) -> Result<(), NbdError> {
        let mut pos = offset;
        let mut left = len;
        while left > 0 {
            let n = left.min(max);
            self.command(cmd, flags, pos, n as u32, None, Sink::None)
                .await?;
            pos = pos.wrapping_add(n);
            left -= n;
        }
        Ok(())
    }

    /// `base:allocation` extents from `offset` (at most `len` bytes, fewer if
    /// the server says so). Needs structured replies and base:allocation.
    pub async fn block_status(
        &mut self,
        offset: u64,
        len: u32,
        req_one: bool,
    ) -> Result<Vec<BlockDescriptor>, NbdError> {
        if self.meta_context.is_none() {
            return Err(NbdError::Protocol {
                detail: "base:allocation was not negotiated".into(),
            });
        }
        let flags = if req_one { proto::CMD_FLAG_REQ_ONE } else { 0 };
        let mut out = Vec::new();
        self.command(
            proto::CMD_BLOCK_STATUS,
            flags,
            offset,
            len,
            None,
            Sink::Extents(&mut out),
        )
        .await?;
        Ok(out)
    }

    /// Send NBD_CMD_DISC and close. Waits (briefly) for the server to close
    /// its side so that the server has finished with this connection.
    pub async fn disconnect(mut self) -> Result<(), NbdError> {
        if self.broken {
            return Ok(());
        }
        let req = Request {
            flags: 0,
            kind: proto::CMD_DISC,
            cookie: self.cookie(),
            offset: 0,
            length: 0,
        };
        let ctx = "sending NBD_CMD_DISC";
        self.writer
            .write_all(&proto::encode_request(&req))
            .await
            .map_err(NbdError::io(ctx))?;
        self.writer.flush().await.map_err(NbdError::io(ctx))?;
        self.writer.shutdown().await.map_err(NbdError::io(ctx))?;
        let mut scratch = [0u8; 512];
        let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, async {
            while let Ok(n) = self.reader.read(&mut scratch).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        Ok(())
    }

    fn cookie(&mut self) -> u64 {
        self.next_cookie = self.next_cookie.wrapping_add(1);
        self.next_cookie
    }

    /// Send one request and wait for its reply. Errors other than an NBD
    /// error reply make the client unusable.
    async fn command(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<&[u8]>,
        sink: Sink<'_>,
    ) -> Result<(), NbdError> {
        if self.broken {
            return Err(NbdError::Closed {
                context: "an earlier error broke the connection",
            });
        }
        let r = self
            .command_inner(kind, flags, offset, length, payload, sink)
            .await;
        if let Err(e) = &r
            && e.errno().is_none()
        {
            self.broken = true;
        }
        r
    }

    async fn command_inner(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<&[u8]>,
        sink: Sink<'_>,
    ) -> Result<(), NbdError> {
        let cookie = self.cookie();
        let req = Request {
            flags,
            kind,
            cookie,
            offset,
            length,
        };
        let ctx = "sending request";
        self.writer
            .write_all(&proto::encode_request(&req))
            .await
            .map_err(NbdError::io(ctx))?;
        if let Some(p) = payload {
            self.writer.write_all(p).await.map_err(NbdError::io(ctx))?;
        }
        self.writer.flush().await.map_err(NbdError::io(ctx))?;
        self.read_reply(&req, sink).await
    }

    fn protocol(detail: impl Into<String>) -> NbdError {
        NbdError::Protocol {
            detail: detail.into(),
        }
    }

    async fn read_reply(&mut self, req: &Request, mut sink: Sink<'_>) -> Result<(), NbdError> {
        let ctx = "reading reply";
        let command_error = |errno: u32| NbdError::Command {
            command: proto::command_name(req.kind),
            offset: req.offset,
            length: req.length.into(),
            errno,
        };
        let mut magic = self.reader.read_u32().await.map_err(NbdError::io(ctx))?;

        if magic == proto::SIMPLE_REPLY_MAGIC {
            let mut b = [0u8; proto::SIMPLE_REPLY_SIZE];
            b[0..4].copy_from_slice(&magic.to_be_bytes());
            self.reader
                .read_exact(&mut b[4..])
                .await
                .map_err(NbdError::io(ctx))?;
            let reply = proto::parse_simple_reply(&b)?;
            if reply.cookie != req.cookie {
                return Err(Self::protocol(format!(
                    "reply cookie {} does not match request {}",
                    reply.cookie, req.cookie
                )));
            }
            if reply.error != 0 {
                return Err(command_error(reply.error));
            }
            return match sink {
                Sink::None => Ok(()),
                Sink::Data(buf) => {
                    if self.structured {
                        return Err(Self::protocol(
                            "simple reply with data after structured replies were negotiated",
                        ));
                    }
                    self.reader
                        .read_exact(buf)
                        .await
                        .map_err(NbdError::io("reading data"))?;
                    Ok(())
                }
                Sink::Extents(_) => {
                    Err(Self::protocol("block status answered with a simple reply"))
                }
            };
        }

        if !self.structured {
            return Err(Self::protocol(format!("bad reply magic {magic:#x}")));
        }
        let mut first_error: Option<u32> = None;
        let mut covered: u64 = 0;
        let mut got_extents = false;
        loop {
            let mut b = [0u8; proto::CHUNK_HEADER_SIZE];
            b[0..4].copy_from_slice(&magic.to_be_bytes());
            self.reader
                .read_exact(&mut b[4..])
                .await
                .map_err(NbdError::io(ctx))?;
            let h = proto::parse_chunk_header(&b)?;
            if h.cookie != req.cookie {
                return Err(Self::protocol(format!(
                    "chunk cookie {} does not match request {}",
                    h.cookie, req.cookie
                )));
            }
            match (h.kind, &mut sink) {
                (proto::REPLY_TYPE_NONE, _) => {
                    if h.length != 0 {
                        return Err(Self::protocol("NBD_REPLY_TYPE_NONE with payload"));
                    }
                }
                (proto::REPLY_TYPE_OFFSET_DATA, Sink::Data(buf)) => {
                    if h.length <= 8 {
                        return Err(Self::protocol("short NBD_REPLY_TYPE_OFFSET_DATA"));
                    }
                    let off = self.reader.read_u64().await.map_err(NbdError::io(ctx))?;
                    let n = u64::from(h.length - 8);
                    let start = off
                        .checked_sub(req.offset)
                        .filter(|s| s.saturating_add(n) <= u64::from(req.length))
                        .ok_or_else(|| Self::protocol("data chunk outside the requested range"))?;
                    let dst = &mut buf[start as usize..(start + n) as usize];
                    self.reader
                        .read_exact(dst)
                        .await
                        .map_err(NbdError::io("reading data"))?;
                    covered += n;
                }
                (proto::REPLY_TYPE_OFFSET_HOLE, Sink::Data(buf)) => {
                    if h.length != 12 {
                        return Err(Self::protocol("bad NBD_REPLY_TYPE_OFFSET_HOLE length"));
                    }
                    let mut p = [0u8; 12];
                    self.reader
                        .read_exact(&mut p)
                        .await
                        .map_err(NbdError::io(ctx))?;
                    let (off, size) = proto::parse_offset_hole(&p)?;
                    let n = u64::from(size);
                    let start = off
                        .checked_sub(req.offset)
                        .filter(|s| s.saturating_add(n) <= u64::from(req.length))
                        .ok_or_else(|| Self::protocol("hole chunk outside the requested range"))?;
                    buf[start as usize..(start + n) as usize].fill(0);
                    covered += n;
                }
                (proto::REPLY_TYPE_BLOCK_STATUS, Sink::Extents(out)) => {
                    if h.length > MAX_CHUNK_PAYLOAD {
                        return Err(Self::protocol("oversized block status chunk"));
                    }
                    let mut p = vec![0u8; h.length as usize];
                    self.reader
                        .read_exact(&mut p)
                        .await
                        .map_err(NbdError::io(ctx))?;
                    let (id, descs) = proto::parse_block_status_payload(&p)?;
                    if Some(id) == self.meta_context {
                        out.extend_from_slice(&descs);
                        got_extents = true;
                    }
                }
                (kind, _) if kind & proto::REPLY_TYPE_FLAG_ERROR != 0 => {
                    if h.length < 6 || h.length > MAX_CHUNK_PAYLOAD {
                        return Err(Self::protocol("bad error chunk length"));
                    }
                    let mut p = vec![0u8; h.length as usize];
                    self.reader
                        .read_exact(&mut p)
                        .await
                        .map_err(NbdError::io(ctx))?;
                    let (errno, _msg) = proto::parse_error_payload(&p)?;
                    // A zero errno in an error chunk is invalid; treat as EINVAL.
                    let errno = if errno == 0 { proto::EINVAL } else { errno };
                    first_error.get_or_insert(errno);
                }
                (kind, _) => {
                    return Err(Self::protocol(format!(
                        "unexpected chunk type {kind} for {}",
                        proto::command_name(req.kind)
                    )));
                }
            }
            if h.flags & proto::REPLY_FLAG_DONE != 0 {
                break;
            }
            magic = self.reader.read_u32().await.map_err(NbdError::io(ctx))?;
            if magic != proto::STRUCTURED_REPLY_MAGIC {
                return Err(Self::protocol(format!("bad chunk magic {magic:#x}")));
            }
        }
        if let Some(errno) = first_error {
            return Err(command_error(errno));
        }
        match sink {
            Sink::Data(_) if covered != u64::from(req.length) => Err(Self::protocol(format!(
                "read reply covered {covered} of {} bytes",
                req.length
            ))),
            Sink::Extents(_) if !got_extents => {
                Err(Self::protocol("block status reply without extents"))
            }
            _ => Ok(()),
        }
    }
}
