//! The NBD server: a set of named exports and accept loops (unix socket and
//! TCP), one thread per connection (up to a bound, see
//! [`volmig_api::io::threads`]; beyond it one task on the shared runtime), any number of connections per export
//! (NBD_FLAG_CAN_MULTI_CONN is advertised: the backend is shared, so flushes
//! are visible across connections).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs, UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};
use volmig_api::io::VolumeIo;
use volmig_api::io::threads::{self, Slots};

use super::bufpool::BufPool;
use super::error::NbdError;
use super::handshake::{self, Outcome};
use super::proto;
use super::transmission::{self, Conn};

/// A client that has not finished option haggling by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
const READ_BUFFER: usize = 64 * 1024;
const WRITE_BUFFER: usize = 256 * 1024;

/// Connections served on their own thread at once, per server, unless
/// [`NbdServer::set_connection_threads`] says otherwise.
pub const MAX_CONNECTION_THREADS: usize = 128;
/// The name of a connection's dedicated I/O thread.
const CONNECTION_THREAD_NAME: &str = "nbd-conn";

/// One named export.
pub struct Export<B> {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) read_only: bool,
    pub(crate) backend: Arc<B>,
    /// Set when the export is removed: its connections close.
    removed: watch::Sender<bool>,
}

impl<B> Export<B> {
    /// A writable export without description.
    pub fn new(name: impl Into<String>, backend: Arc<B>) -> Self {
        Export {
            name: name.into(),
            description: String::new(),
            read_only: false,
            backend,
            removed: watch::Sender::new(false),
        }
    }

    /// Human-readable description (NBD_INFO_DESCRIPTION, NBD_OPT_LIST).
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// Advertise NBD_FLAG_READ_ONLY and refuse writes, trims and zeroing with EPERM.
    pub fn with_read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn description(&self) -> &str {
        &self.description
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// Becomes true when the export is removed from its server.
    pub(crate) fn removed(&self) -> watch::Receiver<bool> {
        self.removed.subscribe()
    }
}

impl<B> fmt::Debug for Export<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("description", &self.description)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

/// Exports in registration order; the first one is the default export.
pub(crate) struct ExportTable<B> {
    list: RwLock<Vec<Arc<Export<B>>>>,
}

impl<B> ExportTable<B> {
    /// Look an export up by name; the empty name is the default export.
    pub(crate) fn lookup(&self, name: &[u8]) -> Option<Arc<Export<B>>> {
        let list = self.list.read().unwrap_or_else(PoisonError::into_inner);
        if name.is_empty() {
            return list.first().cloned();
        }
        list.iter().find(|e| e.name.as_bytes() == name).cloned()
    }

    pub(crate) fn all(&self) -> Vec<Arc<Export<B>>> {
        self.list
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

struct Inner<B> {
    exports: ExportTable<B>,
    pool: Arc<BufPool>,
    active: AtomicUsize,
    accepted: AtomicU64,
    threads: Arc<Slots>,
}

/// An NBD server for exports backed by `B`.
///
/// Cheap to clone; clones share exports, buffer pool and counters. Exports
/// can be added and removed while serving; removing one closes the
/// connections using it (after answering their requests in flight).
pub struct NbdServer<B> {
    inner: Arc<Inner<B>>,
}

impl<B> Clone for NbdServer<B> {
    fn clone(&self) -> Self {
        NbdServer {
            inner: self.inner.clone(),
        }
    }
}

impl<B: VolumeIo> Default for NbdServer<B> {
    fn default() -> Self {
        Self::new()
    }
}

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// A running accept loop. Dropping the handle signals shutdown (without
/// waiting); [`ServerHandle::shutdown`] signals and waits.
pub struct ServerHandle {
    addr: ListenAddr,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl ServerHandle {
    pub fn local_addr(&self) -> &ListenAddr {
        &self.addr
    }

    /// The bound TCP address (with the real port if port 0 was requested).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match self.addr {
            ListenAddr::Tcp(a) => Some(a),
            ListenAddr::Unix(_) => None,
        }
    }

    pub fn unix_path(&self) -> Option<&Path> {
        match &self.addr {
            ListenAddr::Unix(p) => Some(p),
            ListenAddr::Tcp(_) => None,
        }
    }

    /// Stop accepting; each connection stops reading requests, finishes the
    /// ones in flight, replies and closes.
    pub fn signal_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Signal shutdown and wait until the listener is closed (the unix
    /// socket file removed) and every connection has finished.
    pub async fn shutdown(mut self) -> Result<(), NbdError> {
        self.signal_shutdown();
        match self.task.take() {
            Some(task) => task.await.map_err(|e| NbdError::Protocol {
                detail: format!("accept loop failed: {e}"),
            }),
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

/// Resolves once shutdown has been signalled; never if the sender is gone
/// without signalling.
pub(crate) async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

fn validate_export_name(name: &str) -> Result<(), NbdError> {
    let reason = if name.is_empty() {
        Some("empty (reserved for the default export)")
    } else if name.len() > proto::MAX_STRING_LEN {
        Some("longer than 4096 bytes")
    } else if name.contains('\0') {
        Some("contains NUL")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(NbdError::InvalidExportName {
            name: name.chars().take(64).collect(),
            reason,
        }),
        None => Ok(()),
    }
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

/// Where a connection starts.
enum Start<B> {
    /// A client that negotiates its export (fixed newstyle handshake).
    Handshake,
    /// A peer already in the transmission phase with this export: the
    /// kernel's NBD client configured over netlink, which never
    /// negotiates (simple replies, no metadata context).
    Transmission(Arc<Export<B>>),
}

impl Listener {
    async fn accept(&self, id: u64) -> io::Result<(Stream, String)> {
        match self {
            Listener::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                Ok((Stream::Unix(s), format!("unix#{id}")))
            }
            Listener::Tcp(l) => {
                let (s, addr) = l.accept().await?;
                // NBD recommends disabling Nagle.
                if let Err(e) = s.set_nodelay(true) {
                    debug!(error = %e, "cannot set TCP_NODELAY");
                }
                Ok((Stream::Tcp(s), addr.to_string()))
            }
        }
    }
}

impl<B: VolumeIo> NbdServer<B> {
    pub fn new() -> Self {
        NbdServer {
            inner: Arc::new(Inner {
                exports: ExportTable {
                    list: RwLock::new(Vec::new()),
                },
                pool: Arc::new(BufPool::default()),
                active: AtomicUsize::new(0),
                accepted: AtomicU64::new(0),
                threads: Arc::new(Slots::new(MAX_CONNECTION_THREADS)),
            }),
        }
    }

    /// Register an export. The first export registered is the default one
    /// (what clients get for the empty name).
    pub fn add_export(&self, export: Export<B>) -> Result<(), NbdError> {
        validate_export_name(&export.name)?;
        let mut list = self
            .inner
            .exports
            .list
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if list.iter().any(|e| e.name == export.name) {
            return Err(NbdError::DuplicateExport { name: export.name });
        }
        info!(export = %export.name, read_only = export.read_only,
              size = export.backend.size(), "export added");
        list.push(Arc::new(export));
        Ok(())
    }

    /// Unregister an export; returns its backend if it existed. New
    /// clients no longer find it; the connections already using it answer
    /// the requests they have in flight, then close (their clients see the
    /// connection end, never a half-done request).
    pub fn remove_export(&self, name: &str) -> Option<Arc<B>> {
        let e = {
            let mut list = self
                .inner
                .exports
                .list
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let pos = list.iter().position(|e| e.name == name)?;
            list.remove(pos)
        };
        e.removed.send_replace(true);
        info!(export = %name, "export removed; closing its connections");
        Some(e.backend.clone())
    }

    pub fn export_names(&self) -> Vec<String> {
        self.inner
            .exports
            .all()
            .iter()
            .map(|e| e.name.clone())
            .collect()
    }

    /// Connections currently open (handshake or transmission).
    /// Serve at most `max` connections at once on dedicated threads (see
    /// [`volmig_api::io::threads`]); the others, and all of them
    /// with 0, run on the caller's runtime.
    pub fn set_connection_threads(&self, max: usize) {
        self.inner.threads.set_max(max);
    }

    pub fn active_connections(&self) -> usize {
        self.inner.active.load(Ordering::Relaxed)
    }

    /// Connections accepted since the server was created.
    pub fn total_connections(&self) -> u64 {
        self.inner.accepted.load(Ordering::Relaxed)
    }

    /// Listen on a unix socket. A stale socket file at `path` is replaced;
    /// any other existing file is an error. The file is removed on shutdown.
    pub async fn serve_unix(&self, path: impl AsRef<Path>) -> Result<ServerHandle, NbdError> {
        let path = path.as_ref().to_path_buf();
        let bind_err = |source| NbdError::Bind {
            addr: path.display().to_string(),
            source,
        };
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_socket() => {
                std::fs::remove_file(&path).map_err(bind_err)?;
            }
            Ok(_) => {
                return Err(bind_err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "path exists and is not a socket",
                )));
            }
            Err(_) => {}
        }
        let listener = UnixListener::bind(&path).map_err(bind_err)?;
        info!(path = %path.display(), "NBD server listening");
        Ok(self.spawn_accept_loop(
            Listener::Unix(listener, path.clone()),
            ListenAddr::Unix(path),
        ))
    }

    /// Listen on TCP (use port 0 for an ephemeral port, see
    /// [`ServerHandle::tcp_addr`]).
    pub async fn serve_tcp(
        &self,
        addr: impl ToSocketAddrs + fmt::Debug,
    ) -> Result<ServerHandle, NbdError> {
        let shown = format!("{addr:?}");
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| NbdError::Bind {
                addr: shown.clone(),
                source,
            })?;
        let local = listener.local_addr().map_err(|source| NbdError::Bind {
            addr: shown,
            source,
        })?;
        info!(addr = %local, "NBD server listening");
        Ok(self.spawn_accept_loop(Listener::Tcp(listener), ListenAddr::Tcp(local)))
    }

    /// Serve one already-connected stream (handshake and transmission) to
    /// completion. Useful for in-process transports and tests.
    pub async fn serve_connection<S>(&self, stream: S, peer: &str) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        // Never signalled: the sender is dropped, wait_shutdown pends forever.
        let (_tx, rx) = watch::channel(false);
        self.inner.accepted.fetch_add(1, Ordering::Relaxed);
        handle_connection(
            self.inner.clone(),
            r,
            w,
            peer.to_string(),
            rx,
            Start::Handshake,
        )
        .await
    }

    /// Serves `stream`, whose peer is already in the transmission phase
    /// with the export `export` (the kernel's NBD client, configured over
    /// netlink: no handshake, simple replies, no metadata context), to
    /// completion, on a dedicated I/O thread if one is free (else on the
    /// caller's runtime). Errors only when the export does not exist or
    /// the stream cannot be registered; how the connection ended is
    /// logged. Removing the export closes the connection.
    pub async fn serve_transmission(
        &self,
        stream: std::os::unix::net::UnixStream,
        export: &str,
        peer: &str,
    ) -> Result<(), NbdError> {
        let e = self
            .inner
            .exports
            .lookup(export.as_bytes())
            .filter(|e| e.name == export)
            .ok_or_else(|| NbdError::UnknownExport {
                name: export.to_string(),
            })?;
        stream
            .set_nonblocking(true)
            .map_err(NbdError::io("registering a transmission stream"))?;
        let stream = UnixStream::from_std(stream)
            .map_err(NbdError::io("registering a transmission stream"))?;
        self.inner.accepted.fetch_add(1, Ordering::Relaxed);
        // Never signalled: the sender is dropped, wait_shutdown pends forever.
        let (_tx, rx) = watch::channel(false);
        let peer = peer.to_string();
        match serve_on_thread(
            &self.inner,
            Stream::Unix(stream),
            peer,
            rx,
            Start::Transmission(e.clone()),
        ) {
            Ok(done) => {
                let _ = done.await;
            }
            Err((stream, peer, rx)) => {
                serve_stream(self.inner.clone(), stream, peer, rx, Start::Transmission(e)).await
            }
        }
        Ok(())
    }

    fn spawn_accept_loop(&self, listener: Listener, addr: ListenAddr) -> ServerHandle {
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(self.inner.clone(), listener, rx));
        ServerHandle {
            addr,
            shutdown: tx,
            task: Some(task),
        }
    }
}

async fn accept_loop<B: VolumeIo>(
    inner: Arc<Inner<B>>,
    listener: Listener,
    shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    let mut rx = shutdown.clone();
    loop {
        let id = inner.accepted.load(Ordering::Relaxed);
        tokio::select! {
            biased;
            _ = wait_shutdown(&mut rx) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            res = listener.accept(id) => match res {
                Ok((stream, peer)) => {
                    inner.accepted.fetch_add(1, Ordering::Relaxed);
                    debug!(peer = %peer, "connection accepted");
                    match serve_on_thread(&inner, stream, peer, shutdown.clone(), Start::Handshake) {
                        Ok(done) => {
                            conns.spawn(async move {
                                let _ = done.await;
                            });
                        }
                        Err((stream, peer, shutdown)) => {
                            conns.spawn(serve_stream(
                                inner.clone(),
                                stream,
                                peer,
                                shutdown,
                                Start::Handshake,
                            ));
                        }
                    }
                }
                Err(e) => {
                    // E.g. EMFILE: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    let path = match listener {
        Listener::Unix(l, path) => {
            drop(l);
            Some(path)
        }
        Listener::Tcp(l) => {
            drop(l);
            None
        }
    };
    if let Some(path) = path
        && let Err(e) = std::fs::remove_file(&path)
    {
        debug!(path = %path.display(), error = %e, "cannot remove socket file");
    }
    info!(
        connections = conns.len(),
        "NBD listener closed, draining connections"
    );
    while conns.join_next().await.is_some() {}
}

/// Serves one accepted stream on the calling runtime, to completion.
async fn serve_stream<B: VolumeIo>(
    inner: Arc<Inner<B>>,
    stream: Stream,
    peer: String,
    shutdown: watch::Receiver<bool>,
    start: Start<B>,
) {
    let result = match stream {
        Stream::Unix(s) => {
            let (r, w) = s.into_split();
            handle_connection(inner, r, w, peer.clone(), shutdown, start).await
        }
        Stream::Tcp(s) => {
            let (r, w) = s.into_split();
            handle_connection(inner, r, w, peer.clone(), shutdown, start).await
        }
    };
    match result {
        Ok(()) => debug!(peer = %peer, "connection closed"),
        Err(e) if e.is_disconnect() => {
            debug!(peer = %peer, error = %e, "connection dropped")
        }
        Err(e) => info!(peer = %peer, error = %e, "connection closed on error"),
    }
}

/// A stream detached from the shared runtime's reactor, to be registered
/// with a connection thread's own.
enum StdStream {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl Stream {
    fn into_std(self) -> io::Result<StdStream> {
        Ok(match self {
            Stream::Unix(s) => StdStream::Unix(s.into_std()?),
            Stream::Tcp(s) => StdStream::Tcp(s.into_std()?),
        })
    }
}

impl StdStream {
    /// Registers the stream with the current runtime (it is still in
    /// non-blocking mode: `into_std` keeps it).
    fn into_tokio(self) -> io::Result<Stream> {
        Ok(match self {
            StdStream::Unix(s) => Stream::Unix(UnixStream::from_std(s)?),
            StdStream::Tcp(s) => Stream::Tcp(TcpStream::from_std(s)?),
        })
    }
}

/// What [`serve_on_thread`] hands back when no thread takes the stream.
type NotOnThread = (Stream, String, watch::Receiver<bool>);

/// Serves the connection on a dedicated I/O thread (see
/// [`volmig_api::io::threads`]) if a slot is free; otherwise hands the
/// stream back for the shared runtime.
fn serve_on_thread<B: VolumeIo>(
    inner: &Arc<Inner<B>>,
    stream: Stream,
    peer: String,
    shutdown: watch::Receiver<bool>,
    start: Start<B>,
) -> Result<tokio::sync::oneshot::Receiver<()>, NotOnThread> {
    let Some(slot) = inner.threads.take() else {
        return Err((stream, peer, shutdown));
    };
    let std_stream = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            // The stream is gone with the failed conversion.
            info!(peer = %peer, error = %e, "cannot move the connection to its thread; closed");
            let (_tx, rx) = tokio::sync::oneshot::channel();
            return Ok(rx);
        }
    };
    let inner2 = inner.clone();
    let spawned = threads::spawn_dedicated(
        CONNECTION_THREAD_NAME,
        slot,
        tokio::runtime::Handle::current(),
        (std_stream, peer, shutdown, start),
        move |(s, peer, shutdown, start): (StdStream, String, watch::Receiver<bool>, Start<B>)| async move {
            match s.into_tokio() {
                Ok(s) => serve_stream(inner2, s, peer, shutdown, start).await,
                Err(e) => info!(peer = %peer, error = %e, "cannot register the connection; closed"),
            }
        },
    );
    match spawned {
        Ok(done) => Ok(done),
        Err(((s, peer, shutdown, _start), e)) => {
            debug!(peer = %peer, error = %e, "no connection thread; serving on the shared runtime");
            match s.into_tokio() {
                Ok(s) => Err((s, peer, shutdown)),
                Err(e) => {
                    info!(peer = %peer, error = %e, "cannot register the connection; closed");
                    let (_tx, rx) = tokio::sync::oneshot::channel();
                    Ok(rx)
                }
            }
        }
    }
}

struct ActiveGuard<'a>(&'a AtomicUsize);

impl<'a> ActiveGuard<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(counter)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn handle_connection<B, R, W>(
    inner: Arc<Inner<B>>,
    r: R,
    w: W,
    peer: String,
    mut shutdown: watch::Receiver<bool>,
    start: Start<B>,
) -> Result<(), NbdError>
where
    B: VolumeIo,
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let _active = ActiveGuard::new(&inner.active);
    let mut reader = BufReader::with_capacity(READ_BUFFER, r);
    let mut writer = BufWriter::with_capacity(WRITE_BUFFER, w);

    if let Start::Transmission(export) = start {
        info!(export = %export.name, peer = %peer, "transmission stream attached");
        if threads::may_block() {
            // This thread serves a kernel block device.
            crate::block::mark_io_flusher();
        }
        let conn = Conn {
            export,
            pool: inner.pool.clone(),
            structured: false,
            meta_context: None,
            peer: peer.into(),
        };
        return transmission::run(conn, reader, writer, shutdown).await;
    }

    let negotiated = tokio::select! {
        _ = wait_shutdown(&mut shutdown) => return Ok(()),
        r = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            handshake::negotiate(&mut reader, &mut writer, &inner.exports),
        ) => match r {
            Err(_) => return Err(NbdError::Timeout { context: "negotiating options" }),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(Outcome::Aborted)) => {
                debug!(peer = %peer, "client aborted negotiation");
                return Ok(());
            }
            Ok(Ok(Outcome::Transmission(n))) => n,
        },
    };

    info!(
        export = %negotiated.export.name,
        peer = %peer,
        structured = negotiated.structured,
        base_allocation = negotiated.meta_context.is_some(),
        "client connected"
    );
    let conn = Conn {
        export: negotiated.export,
        pool: inner.pool.clone(),
        structured: negotiated.structured,
        meta_context: negotiated.meta_context,
        peer: peer.into(),
    };
    transmission::run(conn, reader, writer, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_names_are_validated() {
        assert!(validate_export_name("disk0").is_ok());
        assert!(validate_export_name("").is_err());
        assert!(validate_export_name("a\0b").is_err());
        assert!(validate_export_name(&"x".repeat(4097)).is_err());
    }
}
