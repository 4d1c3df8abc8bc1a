//! Mutual TLS between masters and agents with certificates that change
//! while the processes run. In a cluster the certificates are a Secret that
//! kubelet projects into each pod as files and updates in place when the
//! operator (or cert-manager) renews them; a process that read them once
//! would present an expired certificate, or distrust a new CA, until it is
//! restarted. Here a TLS configuration is built from three files (`ca.pem`:
//! the CAs to trust, possibly several during a CA rotation; the process's
//! certificate; its key) and rebuilt whenever their contents change: the
//! files are read again for every new connection (a few kilobytes), so a
//! renewed certificate is used from the next handshake on, without a
//! restart. Established connections keep their session.
//!
//! Both sides speak HTTP/2 (ALPN `h2`) over the handshakes done here:
//! [`incoming`] for a server (the agent), [`ClientTls::connect`] for a
//! client (the master's `GrpcSlave`).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// The three files of one side's TLS identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CAs whose certificates the peer may present (PEM, one or more).
    pub ca: PathBuf,
    /// This side's certificate (PEM; a chain: leaf first).
    pub cert: PathBuf,
    /// This side's private key (PEM).
    pub key: PathBuf,
}

impl TlsFiles {
    /// `ca.pem`, `<role>.pem` and `<role>-key.pem` in `dir` (as `volmig
    /// certs` writes them and the chart mounts them).
    pub fn in_dir(dir: &Path, role: &str) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{role}.pem")),
            key: dir.join(format!("{role}-key.pem")),
        }
    }

    fn paths(&self) -> [&PathBuf; 3] {
        [&self.ca, &self.cert, &self.key]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: {what}", path.display())]
    Pem { path: PathBuf, what: String },
    #[error("TLS configuration from {}: {reason}", files.cert.display())]
    Config {
        files: Box<TlsFiles>,
        reason: String,
    },
}

/// The crypto this workspace uses (tonic's `tls-ring`).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The parsed contents of a [`TlsFiles`].
struct Pem {
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn parse(files: &TlsFiles, contents: &[Vec<u8>; 3]) -> Result<Pem, TlsError> {
    let pem_err = |path: &PathBuf, what: String| TlsError::Pem {
        path: path.clone(),
        what,
    };
    let certs = |path: &PathBuf, bytes: &[u8]| -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let certs = CertificateDer::pem_slice_iter(bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(path, e.to_string()))?;
        if certs.is_empty() {
            return Err(pem_err(path, "no certificate in it".into()));
        }
        Ok(certs)
    };
    let mut roots = RootCertStore::empty();
    for c in certs(&files.ca, &contents[0])? {
        roots
            .add(c)
            .map_err(|e| pem_err(&files.ca, format!("not a CA certificate: {e}")))?;
    }
    let chain = certs(&files.cert, &contents[1])?;
    let key = PrivateKeyDer::from_pem_slice(&contents[2])
        .map_err(|e| pem_err(&files.key, format!("no private key: {e}")))?;
    Ok(Pem { roots, chain, key })
}

fn server_config(files: &TlsFiles, pem: Pem) -> Result<ServerConfig, TlsError> {
    let err = |reason: String| TlsError::Config {
        files: Box::new(files.clone()),
        reason,
    };
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(pem.roots), provider())
        .build()
        .map_err(|e| err(e.to_string()))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(pem.chain, pem.key)
        .map_err(|e| err(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

fn client_config(files: &TlsFiles, pem: Pem) -> Result<ClientConfig, TlsError> {
    let err = |reason: String| TlsError::Config {
        files: Box::new(files.clone()),
        reason,
    };
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(e.to_string()))?
        .with_root_certificates(pem.roots)
        .with_client_auth_cert(pem.chain, pem.key)
        .map_err(|e| err(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

struct Loaded<C> {
    contents: [Vec<u8>; 3],
    config: Arc<C>,
}

/// A TLS configuration of type `C` built from [`TlsFiles`], rebuilt when
/// their contents change.
pub struct Reloading<C> {
    files: TlsFiles,
    build: fn(&TlsFiles, Pem) -> Result<C, TlsError>,
    loaded: Mutex<Option<Loaded<C>>>,
}

/// The agent's side: its certificate, and the CAs its clients' come from.
pub type ServerTls = Reloading<ServerConfig>;

/// A master's side: its client certificate, and the CAs agents' come from.
pub type ClientTls = Reloading<ClientConfig>;

impl ServerTls {
    pub fn server(files: TlsFiles) -> Self {
        Reloading::new(files, server_config)
    }
}

impl ClientTls {
    pub fn client(files: TlsFiles) -> Self {
        Reloading::new(files, client_config)
    }

    /// A TCP connection to `addr` (`host:port`) with a TLS handshake under
    /// the current files; `server_name` is the name the agent's
    /// certificate must carry.
    pub async fn connect(
        &self,
        addr: &str,
        server_name: &str,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = ServerName::try_from(server_name.to_string()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("TLS server name {server_name}: {e}"),
            )
        })?;
        let config = self.current().await.map_err(io::Error::other)?;
        let tcp = TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
    }
}

impl<C> Reloading<C> {
    fn new(files: TlsFiles, build: fn(&TlsFiles, Pem) -> Result<C, TlsError>) -> Self {
        Self {
            files,
            build,
            loaded: Mutex::new(None),
        }
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Loaded<C>>> {
        // Whole values go in and out; a panic cannot tear one.
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The configuration of the files as they are now, built again only if
    /// they changed. Files that do not make a configuration (one of them
    /// missing, or replaced and the others not yet) keep the last good
    /// one, with a warning; an error only if there never was one.
    pub async fn current(&self) -> Result<Arc<C>, TlsError> {
        let mut contents: [Vec<u8>; 3] = Default::default();
        let mut read_err = None;
        for (slot, path) in contents.iter_mut().zip(self.files.paths()) {
            match tokio::fs::read(path).await {
                Ok(b) => *slot = b,
                Err(source) => {
                    read_err = Some(TlsError::Read {
                        path: path.clone(),
                        source,
                    });
                    break;
                }
            }
        }
        let built = match read_err {
            Some(e) => Err(e),
            None => {
                if let Some(l) = self.lock().as_ref()
                    && l.contents == contents
                {
                    return Ok(l.config.clone());
                }
                parse(&self.files, &contents).and_then(|pem| (self.build)(&self.files, pem))
            }
        };
        let mut loaded = self.lock();
        match built {
            Ok(cfg) => {
                let config = Arc::new(cfg);
                if loaded.is_some() {
                    info!(cert = %self.files.cert.display(), "TLS files changed: using them from now on");
                }
                *loaded = Some(Loaded {
                    contents,
                    config: config.clone(),
                });
                Ok(config)
            }
            Err(e) => match loaded.as_ref() {
                Some(l) => {
                    warn!(error = %e, "TLS files unusable; keeping the ones read before");
                    Ok(l.config.clone())
                }
                None => Err(e),
            },
        }
    }

    /// Reads and checks the files now, blocking (for start-up: a bad file
    /// is an error at once rather than at the first connection).
    pub fn check(&self) -> Result<(), TlsError> {
        let mut contents: [Vec<u8>; 3] = Default::default();
        for (slot, path) in contents.iter_mut().zip(self.files.paths()) {
            *slot = std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.clone(),
                source,
            })?;
        }
        let cfg = parse(&self.files, &contents).and_then(|pem| (self.build)(&self.files, pem))?;
        *self.lock() = Some(Loaded {
            contents,
            config: Arc::new(cfg),
        });
        Ok(())
    }

    /// Waits until the files make a configuration (in a cluster: until
    /// kubelet projected the Secret, which may not exist yet), looking
    /// again every `every`.
    pub async fn ready(&self, every: Duration) -> Arc<C> {
        let mut said = false;
        loop {
            match self.current().await {
                Ok(c) => {
                    if said {
                        info!(cert = %self.files.cert.display(), "TLS files are there");
                    }
                    return c;
                }
                Err(e) => {
                    if !said {
                        warn!(error = %e, "waiting for the TLS files (in a cluster: the Secret, projected by kubelet)");
                        said = true;
                    }
                    tokio::time::sleep(every).await;
                }
            }
        }
    }
}

/// A TLS connection accepted by [`incoming`].
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: self.local,
            remote_addr: self.peer,
        }
    }
}

/// Longest a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server to take them.
const BACKLOG: usize = 64;

/// The connections accepted on `listener`, each after a TLS handshake
/// under the files as they are at that moment (a client that fails its
/// handshake is logged and dropped, never yielded). For tonic's
/// `serve_with_incoming*`; the listener closes when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
) -> impl tokio_stream::Stream<Item = io::Result<TlsConn>> {
    let (tx, rx) = mpsc::channel(BACKLOG);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let (tls, tx) = (tls.clone(), tx.clone());
            tokio::spawn(async move {
                let local = tcp.local_addr().ok();
                let _ = tcp.set_nodelay(true);
                let handshake = async {
                    let config = tls.current().await.map_err(io::Error::other)?;
                    tokio_rustls::TlsAcceptor::from(config).accept(tcp).await
                };
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                    Ok(Ok(inner)) => {
                        let _ = tx
                            .send(Ok(TlsConn {
                                inner,
                                peer: Some(peer),
                                local,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake refused"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
