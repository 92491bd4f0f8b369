//! TLS from a directory laid out like a Kubernetes TLS Secret (`tls.crt`, `tls.key`,
//! `ca.crt`, as cert-manager writes it), followed while the branch runs.
//!
//! cert-manager renews a certificate well before it expires (by default with a third of its
//! lifetime left) and rewrites the Secret; the kubelet then swaps the mounted files. A branch
//! that read its certificates only at start would present the old one until it expired, and
//! from then on its peers would refuse it. So a [`CertDir`] is re-read periodically
//! ([`CertDir::follow`], `--tls-reload-secs`), and when the files changed and parse, every new
//! connection uses them: handshakes on the branch's listeners ([`Incoming`]), and connections
//! to its peers (a peer channel made before the change is replaced on its next use,
//! `replication::network`). Connections already open keep their session, as with any TLS
//! server. Files that do not parse, or a key that does not match its certificate (read
//! halfway through an update), are reported and the certificates in use stay; the next check
//! tries again.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";
pub const CA_FILE: &str = "ca.crt";

/// How often a branch re-reads its TLS directories by default (`--tls-reload-secs`). The
/// kubelet itself takes up to a minute or two to update a mounted Secret.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(30);

/// How long a client may take for its TLS handshake before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS: reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("TLS: {path} holds no PEM {what} (expected a \"-----BEGIN {what}\" block)")]
    NotPem { path: PathBuf, what: &'static str },
    #[error("TLS: {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("TLS: {what}: {source}")]
    Config {
        what: String,
        source: tonic::transport::Error,
    },
}

/// Reads a PEM CA bundle (for clients that only verify servers: `--tls-ca`).
pub fn read_ca(path: &Path) -> Result<Certificate, TlsError> {
    Ok(Certificate::from_pem(read_pem(path, "CERTIFICATE")?))
}

fn read_pem(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    // "PRIVATE KEY" also matches "RSA PRIVATE KEY" and "EC PRIVATE KEY" headers.
    let text = String::from_utf8_lossy(&bytes);
    if !text.contains("-----BEGIN ") || !text.contains(&format!("{what}-----")) {
        return Err(TlsError::NotPem {
            path: path.to_path_buf(),
            what,
        });
    }
    Ok(bytes)
}

/// Which side of TLS a directory serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsRole {
    /// The customer API: a server certificate; customers are not asked for one.
    Server,
    /// Between branches: every branch presents its certificate, on its listener and on its
    /// calls to peers, and accepts only certificates the directory's CA signed (`ca.crt`
    /// required: without it a branch could not tell a peer from anyone else).
    Mutual,
}

/// A TLS directory and the configuration last built from it.
#[derive(Debug)]
pub struct CertDir {
    dir: PathBuf,
    role: TlsRole,
    current: RwLock<Arc<Loaded>>,
}

/// One successful read of the directory.
#[derive(Debug)]
struct Loaded {
    files: Files,
    /// Counts the reloads: a peer channel made under another generation is replaced.
    generation: u64,
    server: Arc<ServerConfig>,
    /// For calls to peers (mutual TLS only).
    client: Option<ClientTlsConfig>,
}

#[derive(Debug, PartialEq, Eq)]
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Option<Vec<u8>>,
}

impl CertDir {
    /// Reads and checks `dir` (every error names the file).
    pub fn load(dir: &Path, role: TlsRole) -> Result<Arc<CertDir>, TlsError> {
        let loaded = Loaded::build(Files::read(dir, role)?, dir, role, 0)?;
        Ok(Arc::new(CertDir {
            dir: dir.to_path_buf(),
            role,
            current: RwLock::new(Arc::new(loaded)),
        }))
    }

    fn current(&self) -> Arc<Loaded> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The server configuration for the next handshake.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.current().server.clone()
    }

    /// The client configuration for new connections to peers, with its generation; `None`
    /// for a [`TlsRole::Server`] directory.
    pub fn client_config(&self) -> Option<(u64, ClientTlsConfig)> {
        let current = self.current();
        current.client.clone().map(|client| (current.generation, client))
    }

    /// Reads the directory again: `Ok(true)` when the files changed and are now in use,
    /// `Ok(false)` when nothing changed; an error keeps the configuration in use.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let files = Files::read(&self.dir, self.role)?;
        let current = self.current();
        if files == current.files {
            return Ok(false);
        }
        let next = Loaded::build(files, &self.dir, self.role, current.generation + 1)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        Ok(true)
    }

    /// Re-reads the directory every `interval` until `stop` (a zero interval: never).
    /// `what` names the directory's use in logs and metrics (`peer`, `customer`).
    pub async fn follow(self: Arc<Self>, branch: u64, what: &'static str, interval: Duration, stop: CancellationToken) {
        if interval.is_zero() {
            return;
        }
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let dir = self.clone();
            let outcome = match tokio::task::spawn_blocking(move || dir.reload()).await {
                Ok(outcome) => outcome,
                Err(e) => Err(TlsError::Invalid {
                    path: self.dir.clone(),
                    message: format!("the reload task failed: {e}"),
                }),
            };
            match outcome {
                Ok(false) => {}
                Ok(true) => {
                    crate::metrics::record_tls_reload(branch, what, true);
                    tracing::info!(
                        branch,
                        tls = what,
                        dir = %self.dir.display(),
                        "TLS certificates changed on disk: new connections use them"
                    );
                }
                Err(e) => {
                    crate::metrics::record_tls_reload(branch, what, false);
                    tracing::warn!(
                        branch,
                        tls = what,
                        error = %e,
                        "TLS certificates on disk cannot be used; keeping the ones in use"
                    );
                }
            }
        }
    }
}

impl Files {
    fn read(dir: &Path, role: TlsRole) -> Result<Files, TlsError> {
        let cert = read_pem(&dir.join(CERT_FILE), "CERTIFICATE")?;
        let key = read_pem(&dir.join(KEY_FILE), "PRIVATE KEY")?;
        let ca_path = dir.join(CA_FILE);
        let ca = match role {
            TlsRole::Mutual if !ca_path.exists() => {
                return Err(TlsError::Read {
                    path: ca_path,
                    source: io::Error::new(
                        io::ErrorKind::NotFound,
                        "peer mutual TLS needs the CA that signs every branch",
                    ),
                });
            }
            TlsRole::Mutual => Some(read_pem(&ca_path, "CERTIFICATE")?),
            TlsRole::Server => None,
        };
        Ok(Files { cert, key, ca })
    }
}

impl Loaded {
    fn build(files: Files, dir: &Path, role: TlsRole, generation: u64) -> Result<Loaded, TlsError> {
        let invalid = |file: &str, message: String| TlsError::Invalid {
            path: dir.join(file),
            message,
        };
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let chain = certificates(&files.cert).map_err(|e| invalid(CERT_FILE, e))?;
        let key = PrivateKeyDer::from_pem_slice(&files.key).map_err(|e| invalid(KEY_FILE, e.to_string()))?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(CERT_FILE, e.to_string()))?;
        let builder = match &files.ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for certificate in certificates(ca).map_err(|e| invalid(CA_FILE, e))? {
                    roots.add(certificate).map_err(|e| invalid(CA_FILE, e.to_string()))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| invalid(CA_FILE, e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        // Also checks that the key belongs to the certificate (a read halfway through an
        // update can pair a new certificate with the old key).
        let mut server = builder
            .with_single_cert(chain, key)
            .map_err(|e| invalid(KEY_FILE, format!("with {CERT_FILE}: {e}")))?;
        // gRPC is HTTP/2 only.
        server.alpn_protocols = vec![b"h2".to_vec()];
        let client = match (role, &files.ca) {
            (TlsRole::Mutual, Some(ca)) => Some(
                ClientTlsConfig::new()
                    .identity(Identity::from_pem(&files.cert, &files.key))
                    .ca_certificate(Certificate::from_pem(ca)),
            ),
            _ => None,
        };
        Ok(Loaded {
            files,
            generation,
            server: Arc::new(server),
            client,
        })
    }
}

/// Every certificate in a PEM bundle (at least one).
fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certificates.is_empty() {
        return Err("no certificate in it".into());
    }
    Ok(certificates)
}

/// The connections a listener accepts, with the TLS handshake done when the listener has a
/// [`CertDir`] (each handshake with the certificates current when it starts). Handshakes run
/// beside the accept loop, so a slow or silent client holds up nobody.
pub struct Incoming {
    tcp: TcpIncoming,
    tls: Option<Arc<CertDir>>,
    handshakes: JoinSet<io::Result<TlsStream<TcpStream>>>,
    /// For the failed-handshake metric: the branch and which of its listeners.
    branch: u64,
    listener: &'static str,
}

impl Incoming {
    /// `tcp`'s connections, over TLS from `tls` when given; `listener` names it (`peer`,
    /// `customer`) in the failed-handshake metric of `branch`.
    pub fn new(tcp: TcpIncoming, tls: Option<Arc<CertDir>>, branch: u64, listener: &'static str) -> Incoming {
        Incoming {
            tcp,
            tls,
            handshakes: JoinSet::new(),
            branch,
            listener,
        }
    }
}

impl Stream for Incoming {
    type Item = io::Result<Conn>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            match Pin::new(&mut this.tcp).poll_next(cx) {
                Poll::Ready(Some(Ok(tcp))) => {
                    let Some(tls) = &this.tls else {
                        return Poll::Ready(Some(Ok(Conn::Plain(tcp))));
                    };
                    let acceptor = TlsAcceptor::from(tls.server_config());
                    this.handshakes.spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(handshake) => handshake,
                            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")),
                        }
                    });
                    continue;
                }
                // tonic decides which accept errors end the server.
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {}
            }
            match this.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Ok(stream)))) => return Poll::Ready(Some(Ok(Conn::Tls(Box::new(stream))))),
                // A client that failed its handshake (no certificate, another CA, plaintext)
                // is that client's problem, not the listener's; counted, since after a
                // certificate change it is how a peer that is refused shows.
                Poll::Ready(Some(Ok(Err(e)))) => {
                    crate::metrics::record_tls_handshake_failure(this.branch, this.listener);
                    tracing::debug!(branch = this.branch, listener = this.listener, error = %e, "TLS handshake failed");
                }
                Poll::Ready(Some(Err(e))) => tracing::debug!(error = %e, "TLS handshake task failed"),
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// An accepted connection, in plaintext or after its TLS handshake.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match self {
            Conn::Plain(tcp) => tcp.connect_info(),
            Conn::Tls(tls) => tls.get_ref().0.connect_info(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Conn::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Conn::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Conn::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(tcp) => tcp.is_write_vectored(),
            Conn::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Conn::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Conn::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

    use super::*;

    /// A CA's PEM and a function that signs a new certificate (PEM, key PEM) with it.
    fn ca() -> (String, impl Fn() -> (String, String)) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key).unwrap().pem();
        let issuer = Issuer::new(params, key);
        let sign = move || {
            let key = KeyPair::generate().unwrap();
            let params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
            (params.signed_by(&key, &issuer).unwrap().pem(), key.serialize_pem())
        };
        (pem, sign)
    }

    fn write(dir: &Path, cert: &str, key: &str, ca: Option<&str>) {
        std::fs::write(dir.join(CERT_FILE), cert).unwrap();
        std::fs::write(dir.join(KEY_FILE), key).unwrap();
        if let Some(ca) = ca {
            std::fs::write(dir.join(CA_FILE), ca).unwrap();
        }
    }

    /// The certificate the server configuration in use was built from.
    fn presented(dir: &CertDir) -> Vec<u8> {
        dir.current().files.cert.clone()
    }

    #[test]
    fn missing_and_non_pem_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let error = CertDir::load(dir.path(), TlsRole::Server).unwrap_err().to_string();
        assert!(error.contains("tls.crt"), "{error}");
        std::fs::write(dir.path().join(CERT_FILE), "not a certificate").unwrap();
        let error = CertDir::load(dir.path(), TlsRole::Server).unwrap_err().to_string();
        assert!(
            error.contains("tls.crt") && error.contains("no PEM CERTIFICATE"),
            "{error}"
        );
    }

    #[test]
    fn peer_tls_requires_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let (_, sign) = ca();
        let (cert, key) = sign();
        write(dir.path(), &cert, &key, None);
        let error = CertDir::load(dir.path(), TlsRole::Mutual).unwrap_err().to_string();
        assert!(error.contains("ca.crt"), "{error}");
        // The customer side needs no CA.
        let server = CertDir::load(dir.path(), TlsRole::Server).unwrap();
        assert!(server.client_config().is_none());
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (ca_pem, sign) = ca();
        let (cert, _) = sign();
        let (_, other_key) = sign();
        write(dir.path(), &cert, &other_key, Some(&ca_pem));
        let error = CertDir::load(dir.path(), TlsRole::Mutual).unwrap_err().to_string();
        assert!(error.contains("tls.key") && error.contains("tls.crt"), "{error}");
    }

    #[test]
    fn changed_files_are_used_after_a_reload_and_broken_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let (ca_pem, sign) = ca();
        let (cert, key) = sign();
        write(dir.path(), &cert, &key, Some(&ca_pem));
        let certs = CertDir::load(dir.path(), TlsRole::Mutual).unwrap();
        let (generation, _) = certs.client_config().unwrap();
        let before = presented(&certs);
        assert!(!certs.reload().unwrap(), "nothing changed");
        assert_eq!(certs.client_config().unwrap().0, generation);

        // Renewed: a new key and certificate from the same CA.
        let (renewed, renewed_key) = sign();
        write(dir.path(), &renewed, &renewed_key, None);
        assert!(certs.reload().unwrap());
        assert_eq!(certs.client_config().unwrap().0, generation + 1);
        let after = presented(&certs);
        assert_ne!(before, after, "the server still presents the old certificate");

        // Halfway through an update: the next certificate with the current key.
        let (next, _) = sign();
        std::fs::write(dir.path().join(CERT_FILE), &next).unwrap();
        assert!(certs.reload().is_err());
        assert_eq!(certs.client_config().unwrap().0, generation + 1);
        assert_eq!(
            presented(&certs),
            after,
            "a broken update replaced the certificates in use"
        );
        std::fs::write(dir.path().join(CERT_FILE), "").unwrap();
        assert!(certs.reload().unwrap_err().to_string().contains("tls.crt"));
        assert_eq!(presented(&certs), after);
    }
}
