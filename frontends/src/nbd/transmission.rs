//! Transmission phase of one connection.
//!
//! A reader loop parses requests and dispatches each to its own task (at most
//! [`MAX_IN_FLIGHT`] requests and [`MAX_IN_FLIGHT_BYTES`] of data buffers in
//! flight per connection); a writer task fed by a bounded channel writes the
//! replies through a `BufWriter` and flushes whenever the channel is
//! momentarily empty, so replies completing together share a syscall.
//!
//! Every check on a request happens before the backend is called; nothing a
//! client sends can make the server panic.

use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tracing::{debug, info, warn};
use volmig_api::io::threads;
use volmig_api::io::{Extent, VolumeIo};

use super::bufpool::BufPool;
use super::error::NbdError;
use super::proto::{self, BlockDescriptor, ChunkHeader, Request, SimpleReply};
use super::server::{Export, wait_shutdown};

/// Requests in flight per connection.
pub const MAX_IN_FLIGHT: usize = 64;
/// On a connection thread, the reader lets replies out about this many
/// times per batch of pipelined requests (see `reader_loop`).
const YIELD_SHARE: usize = 3;
/// Bytes of READ/WRITE data buffers in flight per connection. Must be at
/// least [`proto::MAX_BLOCK_SIZE`].
pub const MAX_IN_FLIGHT_BYTES: usize = 128 * 1024 * 1024;
/// Replies queued for the writer task.
const REPLY_QUEUE: usize = 128;
/// Most descriptors returned by one BLOCK_STATUS reply.
const MAX_DESCRIPTORS: usize = 1 << 16;
/// After replying to a request that forces a close, keep reading (and
/// dropping) input for this long so the close does not turn into a TCP reset
/// that would destroy the reply.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 64 * 1024 * 1024;

const _: () = assert!(MAX_IN_FLIGHT_BYTES >= proto::MAX_BLOCK_SIZE as usize);

/// Per-connection state shared by the request tasks.
pub(crate) struct Conn<B> {
    pub export: Arc<Export<B>>,
    pub pool: Arc<BufPool>,
    pub structured: bool,
    pub meta_context: Option<u32>,
    pub peer: Arc<str>,
}

/// Encoded reply header (fixed part), at most 32 bytes.
struct Head {
    bytes: [u8; 32],
    len: usize,
}

impl Head {
    fn new(parts: &[&[u8]]) -> Head {
        let mut h = Head {
            bytes: [0; 32],
            len: 0,
        };
        for p in parts {
            // Callers only pass fixed-size protocol headers that fit.
            let end = (h.len + p.len()).min(32);
            let n = end - h.len;
            h.bytes[h.len..end].copy_from_slice(&p[..n]);
            h.len = end;
        }
        h
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

enum Body {
    None,
    /// READ data: goes back to the pool once written.
    Pooled(Vec<u8>),
    Owned(Vec<u8>),
    Static(&'static [u8]),
}

#[derive(Default)]
struct Permits {
    _request: Option<OwnedSemaphorePermit>,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// One reply for the writer task. The permits are released once written.
struct OutMsg {
    head: Head,
    body: Body,
    permits: Permits,
}

impl<B> Conn<B> {
    fn chunk(&self, cookie: u64, kind: u16, length: usize) -> [u8; proto::CHUNK_HEADER_SIZE] {
        proto::encode_chunk_header(&ChunkHeader {
            flags: proto::REPLY_FLAG_DONE,
            kind,
            cookie,
            // Payloads are bounded by MAX_BLOCK_SIZE / MAX_DESCRIPTORS.
            length: u32::try_from(length).unwrap_or(u32::MAX),
        })
    }

    fn reply_ok(&self, cookie: u64, permits: Permits) -> OutMsg {
        let head = if self.structured {
            Head::new(&[&self.chunk(cookie, proto::REPLY_TYPE_NONE, 0)])
        } else {
            Head::new(&[&proto::encode_simple_reply(&SimpleReply {
                error: 0,
                cookie,
            })])
        };
        OutMsg {
            head,
            body: Body::None,
            permits,
        }
    }

    fn reply_err(&self, cookie: u64, errno: u32, message: &'static str) -> OutMsg {
        if self.structured {
            let msg = &message.as_bytes()[..message.len().min(proto::MAX_STRING_LEN)];
            let hdr = self.chunk(cookie, proto::REPLY_TYPE_ERROR, 6 + msg.len());
            // Bounded by MAX_STRING_LEN, fits in u16.
            let mlen = (msg.len() as u16).to_be_bytes();
            OutMsg {
                head: Head::new(&[&hdr, &errno.to_be_bytes(), &mlen]),
                body: Body::Static(msg),
                permits: Permits::default(),
            }
        } else {
            OutMsg {
                head: Head::new(&[&proto::encode_simple_reply(&SimpleReply {
                    error: errno,
                    cookie,
                })]),
                body: Body::None,
                permits: Permits::default(),
            }
        }
    }

    fn reply_read(&self, cookie: u64, offset: u64, data: Vec<u8>, permits: Permits) -> OutMsg {
        let head = if self.structured {
            let hdr = self.chunk(cookie, proto::REPLY_TYPE_OFFSET_DATA, 8 + data.len());
            Head::new(&[&hdr, &offset.to_be_bytes()])
        } else {
            Head::new(&[&proto::encode_simple_reply(&SimpleReply {
                error: 0,
                cookie,
            })])
        };
        OutMsg {
            head,
            body: Body::Pooled(data),
            permits,
        }
    }

    fn reply_block_status(
        &self,
        cookie: u64,
        context: u32,
        descs: &[BlockDescriptor],
        permits: Permits,
    ) -> OutMsg {
        let mut body = Vec::new();
        proto::encode_block_descriptors(descs, &mut body);
        let hdr = self.chunk(cookie, proto::REPLY_TYPE_BLOCK_STATUS, 4 + body.len());
        OutMsg {
            head: Head::new(&[&hdr, &context.to_be_bytes()]),
            body: Body::Owned(body),
            permits,
        }
    }
}

impl<B: VolumeIo> Conn<B> {
    fn backend_error(&self, req: &Request, e: &io::Error) -> u32 {
        let errno = proto::errno_from_io(e);
        warn!(
            export = %self.export.name,
            peer = %self.peer,
            command = proto::command_name(req.kind),
            offset = req.offset,
            length = req.length,
            errno = proto::errno_name(errno),
            error = %e,
            "backend request failed"
        );
        errno
    }
}

/// Convert backend extents into at most [`MAX_DESCRIPTORS`] descriptors that
/// cover no more than `length` bytes; adjacent extents with equal flags are
/// merged, zero-length extents skipped. With `req_one`, at most one.
pub(crate) fn extents_to_descriptors(
    extents: &[Extent],
    length: u32,
    req_one: bool,
) -> Vec<BlockDescriptor> {
    let mut out: Vec<BlockDescriptor> = Vec::new();
    let mut remaining = u64::from(length);
    for e in extents {
        if remaining == 0 {
            break;
        }
        if e.length == 0 {
            continue;
        }
        let flags =
            if e.hole { proto::STATE_HOLE } else { 0 } | if e.zero { proto::STATE_ZERO } else { 0 };
        // remaining <= u32::MAX, so the cast is lossless.
        let len = e.length.min(remaining) as u32;
        match out.last_mut() {
            // The running sum never exceeds `length`, so this cannot overflow.
            Some(last) if last.flags == flags => last.length += len,
            _ => {
                if (req_one && !out.is_empty()) || out.len() >= MAX_DESCRIPTORS {
                    break;
                }
                out.push(BlockDescriptor { length: len, flags });
            }
        }
        remaining -= u64::from(len);
    }
    out
}

/// Run a backend call; a panic becomes an I/O error (EIO to the client)
/// instead of a request that never gets a reply.
async fn guarded<T>(fut: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(r) => r,
        Err(_) => Err(io::Error::other("backend panicked")),
    }
}

/// How the reader loop ended.
enum End {
    /// NBD_CMD_DISC.
    Disconnect,
    /// Client closed its side.
    Eof,
    /// Server shutdown.
    Shutdown,
    /// The export was removed from the server.
    Removed,
    /// The writer task is gone (socket write failed).
    WriterGone,
    /// Protocol violation: close right away.
    Close(NbdError),
    /// Protocol violation after which an error reply was queued: close, but
    /// drain input for a moment so the reply reaches the client.
    Linger(NbdError),
    /// I/O error on the socket.
    Error(NbdError),
}

enum Flow {
    Continue,
    End(End),
}

struct Limits {
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

impl Limits {
    async fn acquire(&self, data_len: usize) -> Option<Permits> {
        let request = self.requests.clone().acquire_owned().await.ok()?;
        let bytes = if data_len > 0 {
            // data_len <= MAX_BLOCK_SIZE < u32::MAX here.
            let n = u32::try_from(data_len).ok()?;
            Some(self.bytes.clone().acquire_many_owned(n).await.ok()?)
        } else {
            None
        };
        Some(Permits {
            _request: Some(request),
            _bytes: bytes,
        })
    }
}

async fn send(tx: &mpsc::Sender<OutMsg>, msg: OutMsg) -> Flow {
    if tx.send(msg).await.is_err() {
        Flow::End(End::WriterGone)
    } else {
        Flow::Continue
    }
}

/// Serve requests until the client disconnects, breaks the protocol or the
/// server shuts down. In-flight requests are always completed (and their
/// replies sent) before this returns.
pub(crate) async fn run<R, W, B>(
    conn: Conn<B>,
    mut reader: BufReader<R>,
    writer: BufWriter<W>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
    B: VolumeIo,
{
    let conn = Arc::new(conn);
    let (tx, rx) = mpsc::channel(REPLY_QUEUE);
    let writer_task = tokio::spawn(writer_loop(writer, rx, conn.pool.clone()));
    let limits = Limits {
        requests: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        bytes: Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES)),
    };

    let mut removed = conn.export.removed();
    let end = reader_loop(
        &conn,
        &mut reader,
        &tx,
        &limits,
        &mut shutdown,
        &mut removed,
    )
    .await;
    // Request tasks hold clones of `tx`; the writer ends once they are done.
    drop(tx);
    let written = match writer_task.await {
        Ok(r) => r,
        Err(e) => Err(NbdError::Protocol {
            detail: format!("reply writer task failed: {e}"),
        }),
    };

    let result = match end {
        End::Disconnect => {
            debug!(export = %conn.export.name, peer = %conn.peer, "client sent NBD_CMD_DISC");
            Ok(())
        }
        End::Eof => {
            debug!(export = %conn.export.name, peer = %conn.peer, "client closed the connection");
            Ok(())
        }
        End::Shutdown => {
            info!(export = %conn.export.name, peer = %conn.peer, "closing connection for server shutdown");
            Ok(())
        }
        End::Removed => {
            info!(export = %conn.export.name, peer = %conn.peer, "closing connection: the export was removed");
            Ok(())
        }
        End::WriterGone => Ok(()),
        End::Close(e) | End::Error(e) => Err(e),
        End::Linger(e) => {
            linger(&mut reader).await;
            Err(e)
        }
    };
    match (result, written) {
        (Err(e), _) => Err(e),
        (Ok(()), Err(e)) if !e.is_disconnect() => Err(e),
        _ => Ok(()),
    }
}

async fn linger<R: AsyncRead + Unpin>(reader: &mut R) {
    let mut scratch = vec![0u8; 64 * 1024];
    let _ = tokio::time::timeout(LINGER_TIME, async {
        let mut total = 0usize;
        while total < LINGER_BYTES {
            match reader.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

async fn reader_loop<R, B>(
    conn: &Arc<Conn<B>>,
    reader: &mut BufReader<R>,
    tx: &mpsc::Sender<OutMsg>,
    limits: &Limits,
    shutdown: &mut watch::Receiver<bool>,
    removed: &mut watch::Receiver<bool>,
) -> End
where
    R: AsyncRead + Unpin,
    B: VolumeIo,
{
    let mut hdr = [0u8; proto::REQUEST_SIZE];
    // On a connection thread the reader, the request tasks and the reply
    // writer share one thread. Parsing every pipelined request before
    // yielding would run them all, then send all their replies in one
    // batch: the client waits for the whole batch and sends its next
    // requests in one batch too, so client and server take turns instead
    // of working at once (half of nbdkit's IOPS at queue depth 8). Yielding
    // after every request sends each reply as soon as it is ready, but
    // costs a write per reply, which deep queues feel (half the IOPS at
    // depth 32). So the reader yields after every `depth / YIELD_SHARE`
    // requests, `depth` being the client's queue depth as seen here
    // (requests waiting in the buffer plus those in flight; a decaying
    // maximum): a batch is cut in about three.
    let on_thread = threads::may_block();
    let (mut since_yield, mut depth) = (0usize, 1usize);
    loop {
        tokio::select! {
            biased;
            _ = wait_shutdown(shutdown) => return End::Shutdown,
            _ = wait_shutdown(removed) => return End::Removed,
            r = reader.read_exact(&mut hdr) => {
                if let Err(e) = r {
                    return if e.kind() == io::ErrorKind::UnexpectedEof {
                        End::Eof
                    } else {
                        End::Error(NbdError::Io { context: "reading request header", source: e })
                    };
                }
            }
        }
        let req = match proto::parse_request(&hdr) {
            Ok(r) => r,
            Err(e) => {
                warn!(export = %conn.export.name, peer = %conn.peer, error = %e, "closing connection");
                return End::Close(e);
            }
        };
        let per = proto::REQUEST_SIZE
            + if req.kind == proto::CMD_WRITE {
                req.length as usize
            } else {
                0
            };
        if let Flow::End(end) = handle_request(conn, reader, tx, limits, req).await {
            return end;
        }
        if on_thread {
            let queued = reader.buffer().len() / per;
            let in_flight = MAX_IN_FLIGHT - limits.requests.available_permits();
            depth = depth.max(queued + in_flight);
            since_yield += 1;
            if since_yield >= (depth / YIELD_SHARE).max(1) {
                since_yield = 0;
                depth = (depth - depth / 8).max(1);
                tokio::task::yield_now().await;
            }
        }
    }
}

/// Validate one request, then answer it inline (errors, trivial requests) or
/// hand it to a task.
async fn handle_request<R, B>(
    conn: &Arc<Conn<B>>,
    reader: &mut R,
    tx: &mpsc::Sender<OutMsg>,
    limits: &Limits,
    req: Request,
) -> Flow
where
    R: AsyncRead + Unpin,
    B: VolumeIo,
{
    let size = conn.export.backend.size();
    let in_range = req
        .offset
        .checked_add(u64::from(req.length))
        .is_some_and(|end| end <= size);
    // FUA is accepted on every command (the spec requires it once
    // SEND_FUA is advertised); other flags only where they are defined.
    let allowed = proto::CMD_FLAG_FUA
        | match req.kind {
            proto::CMD_READ if conn.structured => proto::CMD_FLAG_DF,
            proto::CMD_WRITE_ZEROES => proto::CMD_FLAG_NO_HOLE,
            proto::CMD_BLOCK_STATUS => proto::CMD_FLAG_REQ_ONE,
            _ => 0,
        };
    let bad_flags = req.flags & !allowed != 0;
    let fua = req.flags & proto::CMD_FLAG_FUA != 0;
    let read_only = conn.export.read_only;
    let cookie = req.cookie;
    let len = req.length as usize;

    macro_rules! fail {
        ($errno:expr, $msg:expr) => {{
            debug!(
                export = %conn.export.name,
                peer = %conn.peer,
                command = proto::command_name(req.kind),
                offset = req.offset,
                length = req.length,
                flags = req.flags,
                errno = proto::errno_name($errno),
                reason = $msg,
                "rejecting request"
            );
            return send(tx, conn.reply_err(cookie, $errno, $msg)).await;
        }};
    }

    match req.kind {
        proto::CMD_DISC => Flow::End(End::Disconnect),

        proto::CMD_READ => {
            if bad_flags {
                fail!(proto::EINVAL, "unsupported flags for NBD_CMD_READ");
            }
            if req.length > proto::MAX_BLOCK_SIZE {
                fail!(proto::EINVAL, "read larger than the maximum block size");
            }
            if !in_range {
                fail!(proto::EINVAL, "read beyond the end of the export");
            }
            if len == 0 {
                return send(tx, conn.reply_ok(cookie, Permits::default())).await;
            }
            let Some(permits) = limits.acquire(len).await else {
                return Flow::End(End::WriterGone);
            };
            let conn = conn.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let buf = conn.pool.get(len);
                let msg = match guarded(conn.export.backend.read(req.offset, buf)).await {
                    Ok(buf) if buf.len() == len => {
                        conn.reply_read(cookie, req.offset, buf, permits)
                    }
                    Ok(buf) => {
                        warn!(export = %conn.export.name, expected = len, got = buf.len(),
                              "backend read returned a buffer of the wrong length");
                        conn.pool.put(buf);
                        conn.reply_err(cookie, proto::EIO, "backend returned short read")
                    }
                    Err(e) => {
                        let errno = conn.backend_error(&req, &e);
                        conn.reply_err(cookie, errno, "read failed")
                    }
                };
                let _ = tx.send(msg).await;
            });
            Flow::Continue
        }

        proto::CMD_WRITE => {
            if req.length > proto::MAX_BLOCK_SIZE {
                // The payload can't be skipped safely: answer, then close.
                let e = NbdError::RequestTooLarge {
                    command: "NBD_CMD_WRITE",
                    length: req.length.into(),
                    max: proto::MAX_BLOCK_SIZE.into(),
                };
                warn!(export = %conn.export.name, peer = %conn.peer, error = %e, "closing connection");
                let _ = tx
                    .send(conn.reply_err(
                        cookie,
                        proto::EINVAL,
                        "write larger than the maximum block size",
                    ))
                    .await;
                return Flow::End(End::Linger(e));
            }
            if len == 0 {
                if bad_flags {
                    fail!(proto::EINVAL, "unsupported flags for NBD_CMD_WRITE");
                }
                if read_only {
                    fail!(proto::EPERM, "export is read-only");
                }
                if !in_range {
                    fail!(proto::ENOSPC, "write beyond the end of the export");
                }
                return send(tx, conn.reply_ok(cookie, Permits::default())).await;
            }
            let Some(permits) = limits.acquire(len).await else {
                return Flow::End(End::WriterGone);
            };
            let mut buf = conn.pool.get(len);
            if let Err(e) = reader.read_exact(&mut buf).await {
                let end = if e.kind() == io::ErrorKind::UnexpectedEof {
                    End::Eof
                } else {
                    End::Error(NbdError::Io {
                        context: "reading write payload",
                        source: e,
                    })
                };
                return Flow::End(end);
            }
            // The payload has been consumed: errors from here on keep the
            // connection usable and leave the data untouched.
            let err = if bad_flags {
                Some((proto::EINVAL, "unsupported flags for NBD_CMD_WRITE"))
            } else if read_only {
                Some((proto::EPERM, "export is read-only"))
            } else if !in_range {
                Some((proto::ENOSPC, "write beyond the end of the export"))
            } else {
                None
            };
            if let Some((errno, msg)) = err {
                conn.pool.put(buf);
                drop(permits);
                fail!(errno, msg);
            }
            let conn = conn.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let msg = match guarded(conn.export.backend.write(req.offset, buf, fua)).await {
                    Ok(buf) => {
                        conn.pool.put(buf);
                        conn.reply_ok(cookie, permits)
                    }
                    Err(e) => {
                        let errno = conn.backend_error(&req, &e);
                        conn.reply_err(cookie, errno, "write failed")
                    }
                };
                let _ = tx.send(msg).await;
            });
            Flow::Continue
        }

        proto::CMD_FLUSH => {
            if bad_flags {
                fail!(proto::EINVAL, "unsupported flags for NBD_CMD_FLUSH");
            }
            spawn_simple(conn, tx, limits, req, |conn| async move {
                conn.export.backend.flush().await
            })
            .await
        }

        proto::CMD_TRIM => {
            if bad_flags {
                fail!(proto::EINVAL, "unsupported flags for NBD_CMD_TRIM");
            }
            if read_only {
                fail!(proto::EPERM, "export is read-only");
            }
            if !in_range {
                fail!(proto::EINVAL, "trim beyond the end of the export");
            }
            if len == 0 {
                return send(tx, conn.reply_ok(cookie, Permits::default())).await;
            }
            spawn_simple(conn, tx, limits, req, move |conn| async move {
                let b = &conn.export.backend;
                b.trim(req.offset, req.length.into()).await?;
                if fua { b.flush().await } else { Ok(()) }
            })
            .await
        }

        proto::CMD_WRITE_ZEROES => {
            // FAST_ZERO is not advertised, so it is an invalid flag here.
            if bad_flags {
                fail!(proto::EINVAL, "unsupported flags for NBD_CMD_WRITE_ZEROES");
            }
            if read_only {
                fail!(proto::EPERM, "export is read-only");
            }
            if !in_range {
                fail!(proto::ENOSPC, "write zeroes beyond the end of the export");
            }
            if len == 0 {
                return send(tx, conn.reply_ok(cookie, Permits::default())).await;
            }
            let may_trim = req.flags & proto::CMD_FLAG_NO_HOLE == 0;
            spawn_simple(conn, tx, limits, req, move |conn| async move {
                let b = &conn.export.backend;
                b.write_zeroes(req.offset, req.length.into(), may_trim)
                    .await?;
                if fua { b.flush().await } else { Ok(()) }
            })
            .await
        }

        proto::CMD_BLOCK_STATUS => {
            let Some(context) = conn.meta_context else {
                fail!(proto::EINVAL, "no metadata context was negotiated");
            };
            if bad_flags {
                fail!(proto::EINVAL, "unsupported flags for NBD_CMD_BLOCK_STATUS");
            }
            if len == 0 {
                fail!(proto::EINVAL, "zero-length block status request");
            }
            if !in_range {
                fail!(proto::EINVAL, "block status beyond the end of the export");
            }
            let Some(permits) = limits.acquire(0).await else {
                return Flow::End(End::WriterGone);
            };
            let req_one = req.flags & proto::CMD_FLAG_REQ_ONE != 0;
            let conn = conn.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let msg = match guarded(
                    conn.export
                        .backend
                        .block_status(req.offset, req.length.into()),
                )
                .await
                {
                    Ok(extents) => {
                        let descs = extents_to_descriptors(&extents, req.length, req_one);
                        if descs.is_empty() {
                            warn!(export = %conn.export.name, offset = req.offset,
                                  "backend returned no extents");
                            conn.reply_err(cookie, proto::EIO, "no block status available")
                        } else {
                            conn.reply_block_status(cookie, context, &descs, permits)
                        }
                    }
                    Err(e) => {
                        let errno = conn.backend_error(&req, &e);
                        conn.reply_err(cookie, errno, "block status failed")
                    }
                };
                let _ = tx.send(msg).await;
            });
            Flow::Continue
        }

        proto::CMD_CACHE => {
            // A hint: validated like a read, then acknowledged.
            if bad_flags {
                fail!(proto::EINVAL, "unsupported flags for NBD_CMD_CACHE");
            }
            if req.length > proto::MAX_BLOCK_SIZE {
                fail!(proto::EINVAL, "cache larger than the maximum block size");
            }
            if !in_range {
                fail!(proto::EINVAL, "cache beyond the end of the export");
            }
            send(tx, conn.reply_ok(cookie, Permits::default())).await
        }

        _ => fail!(proto::EINVAL, "unknown command"),
    }
}

/// Run a request without data payload in its own task and reply with
/// success or the mapped error.
async fn spawn_simple<B, F, Fut>(
    conn: &Arc<Conn<B>>,
    tx: &mpsc::Sender<OutMsg>,
    limits: &Limits,
    req: Request,
    op: F,
) -> Flow
where
    B: VolumeIo,
    F: FnOnce(Arc<Conn<B>>) -> Fut + Send + 'static,
    Fut: Future<Output = io::Result<()>> + Send,
{
    let Some(permits) = limits.acquire(0).await else {
        return Flow::End(End::WriterGone);
    };
    let conn = conn.clone();
    let tx = tx.clone();
    tokio::spawn(async move {
        let msg = match guarded(op(conn.clone())).await {
            Ok(()) => conn.reply_ok(req.cookie, permits),
            Err(e) => {
                let errno = conn.backend_error(&req, &e);
                conn.reply_err(req.cookie, errno, "request failed")
            }
        };
        let _ = tx.send(msg).await;
    });
    Flow::Continue
}

async fn writer_loop<W: AsyncWrite + Unpin>(
    mut w: BufWriter<W>,
    mut rx: mpsc::Receiver<OutMsg>,
    pool: Arc<BufPool>,
) -> Result<(), NbdError> {
    let ctx = "sending reply";
    loop {
        let msg = match rx.try_recv() {
            Ok(m) => m,
            Err(TryRecvError::Empty) => {
                // Nothing else ready: push what we have to the client.
                w.flush().await.map_err(NbdError::io(ctx))?;
                match rx.recv().await {
                    Some(m) => m,
                    None => break,
                }
            }
            Err(TryRecvError::Disconnected) => break,
        };
        let OutMsg {
            head,
            body,
            permits,
        } = msg;
        w.write_all(head.as_slice())
            .await
            .map_err(NbdError::io(ctx))?;
        match body {
            Body::None => {}
            Body::Pooled(b) => {
                w.write_all(&b).await.map_err(NbdError::io(ctx))?;
                pool.put(b);
            }
            Body::Owned(b) => w.write_all(&b).await.map_err(NbdError::io(ctx))?,
            Body::Static(s) => w.write_all(s).await.map_err(NbdError::io(ctx))?,
        }
        drop(permits);
    }
    w.shutdown()
        .await
        .map_err(NbdError::io("closing connection"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(length: u64, hole: bool, zero: bool) -> Extent {
        Extent { length, hole, zero }
    }

    #[test]
    fn descriptors_are_clamped_and_merged() {
        let e = [
            ext(4096, false, false),
            ext(4096, false, false),
            ext(0, true, true),
            ext(1 << 40, true, true),
        ];
        let d = extents_to_descriptors(&e, 65536, false);
        assert_eq!(
            d,
            vec![
                BlockDescriptor {
                    length: 8192,
                    flags: 0
                },
                BlockDescriptor {
                    length: 65536 - 8192,
                    flags: proto::STATE_HOLE | proto::STATE_ZERO
                },
            ]
        );
        let total: u64 = d.iter().map(|d| u64::from(d.length)).sum();
        assert_eq!(total, 65536);
    }

    #[test]
    fn req_one_gives_one_descriptor() {
        let e = [
            ext(100, false, false),
            ext(100, false, false),
            ext(100, true, false),
        ];
        let d = extents_to_descriptors(&e, 250, true);
        assert_eq!(
            d,
            vec![BlockDescriptor {
                length: 200,
                flags: 0
            }]
        );
        let d = extents_to_descriptors(&e, 50, true);
        assert_eq!(
            d,
            vec![BlockDescriptor {
                length: 50,
                flags: 0
            }]
        );
    }

    #[test]
    fn no_extents_gives_nothing() {
        assert!(extents_to_descriptors(&[], 100, false).is_empty());
        assert!(extents_to_descriptors(&[ext(0, false, false)], 100, false).is_empty());
    }

    #[test]
    fn huge_extent_lists_are_capped() {
        let e: Vec<Extent> = (0..(MAX_DESCRIPTORS + 10))
            .map(|i| ext(1, i % 2 == 0, false))
            .collect();
        let d = extents_to_descriptors(&e, u32::MAX, false);
        assert_eq!(d.len(), MAX_DESCRIPTORS);
    }

    #[test]
    fn head_never_overflows() {
        let h = Head::new(&[&[1u8; 20], &[2u8; 20]]);
        assert_eq!(h.as_slice().len(), 32);
    }
}
