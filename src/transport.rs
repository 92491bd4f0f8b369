//! How connections are made, for every gRPC client and server in the crate: client endpoints
//! (TCP_NODELAY, HTTP/2 keepalive, TLS), server TLS, and local deadlines on outbound calls.
//!
//! TLS material is read from a directory laid out like a Kubernetes TLS Secret as cert-manager
//! writes it (`tls.crt`, `tls.key`, `ca.crt`), so a mounted Secret is used as is.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// HTTP/2 pings on idle and busy connections. A peer that vanished without a reset (a removed
/// pod, a dropped network) is noticed within interval + timeout, and the next call reconnects,
/// resolving the name again.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";
pub const CA_FILE: &str = "ca.crt";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS: reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("TLS: {path} holds no PEM {what} (expected a \"-----BEGIN {what}\" block)")]
    NotPem { path: PathBuf, what: &'static str },
    #[error("TLS: {what}: {source}")]
    Config {
        what: String,
        source: tonic::transport::Error,
    },
}

/// The certificates of one TLS-speaking side.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// This side's certificate chain and private key (`tls.crt`, `tls.key`).
    pub identity: Identity,
    /// The CA that signs the other side (`ca.crt`), when the directory has one.
    pub ca: Option<Certificate>,
}

impl TlsFiles {
    /// Reads `tls.crt`, `tls.key` and, if present, `ca.crt` from `dir`.
    pub fn load_dir(dir: &Path) -> Result<TlsFiles, TlsError> {
        let cert = read_pem(&dir.join(CERT_FILE), "CERTIFICATE")?;
        let key = read_pem(&dir.join(KEY_FILE), "PRIVATE KEY")?;
        let ca_path = dir.join(CA_FILE);
        let ca = if ca_path.exists() {
            Some(read_ca(&ca_path)?)
        } else {
            None
        };
        Ok(TlsFiles {
            identity: Identity::from_pem(cert, key),
            ca,
        })
    }
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

/// Mutual TLS between branches: every branch presents its certificate and accepts only peers
/// whose certificate the shared CA signed.
#[derive(Debug, Clone)]
pub struct PeerTls {
    pub server: ServerTlsConfig,
    pub client: ClientTlsConfig,
}

impl PeerTls {
    /// From a directory with `tls.crt`, `tls.key` and `ca.crt` (all three required: without
    /// the CA a branch could not tell a peer from anyone else).
    pub fn load_dir(dir: &Path) -> Result<PeerTls, TlsError> {
        let files = TlsFiles::load_dir(dir)?;
        let ca = files.ca.ok_or_else(|| TlsError::Read {
            path: dir.join(CA_FILE),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "peer mutual TLS needs the CA that signs every branch",
            ),
        })?;
        Ok(PeerTls {
            server: ServerTlsConfig::new()
                .identity(files.identity.clone())
                .client_ca_root(ca.clone()),
            client: ClientTlsConfig::new().identity(files.identity).ca_certificate(ca),
        })
    }
}

/// Server-side TLS for the customer API (customers are not asked for certificates).
pub fn customer_server_tls(dir: &Path) -> Result<ServerTlsConfig, TlsError> {
    let files = TlsFiles::load_dir(dir)?;
    Ok(ServerTlsConfig::new().identity(files.identity))
}

/// A client endpoint for `address` (`host:port`, or a URL). With `tls` the scheme is https and
/// the server's certificate must name the host.
pub fn endpoint(address: &str, connect_timeout: Duration, tls: Option<&ClientTlsConfig>) -> Result<Endpoint, TlsError> {
    let url = match (address.split_once("://"), tls) {
        (Some(_), _) => address.to_string(),
        (None, Some(_)) => format!("https://{address}"),
        (None, None) => format!("http://{address}"),
    };
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|source| TlsError::Config {
            what: format!("address {address:?}"),
            source,
        })?
        .tcp_nodelay(true)
        .connect_timeout(connect_timeout)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    match tls {
        None => Ok(endpoint),
        Some(tls) => endpoint.tls_config(tls.clone()).map_err(|source| TlsError::Config {
            what: format!("client TLS for {url}"),
            source,
        }),
    }
}

/// Sends `request` through `send` with a deadline of `timeout`, on both sides: as
/// `grpc-timeout`, so the server stops working on it, and locally, because tonic's client only
/// sends the header: a call on a connection whose peer vanished would otherwise wait until TCP
/// gives up, minutes later. (Raft's own RPCs need only the header: openraft times them out.)
pub async fn call<Req, T, Fut>(
    timeout: Duration,
    mut request: tonic::Request<Req>,
    send: impl FnOnce(tonic::Request<Req>) -> Fut,
) -> Result<T, tonic::Status>
where
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    request.set_timeout(timeout);
    match tokio::time::timeout(timeout, send(request)).await {
        Ok(result) => result,
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "no answer within {:.1} s",
            timeout.as_secs_f64()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_that_never_answers_fails_with_deadline_exceeded() {
        let never = |_request| std::future::pending::<Result<(), tonic::Status>>();
        let status = call(Duration::from_millis(20), tonic::Request::new(()), never)
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    }

    #[test]
    fn missing_and_non_pem_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let error = TlsFiles::load_dir(dir.path()).unwrap_err().to_string();
        assert!(error.contains("tls.crt"), "{error}");
        std::fs::write(dir.path().join(CERT_FILE), "not a certificate").unwrap();
        let error = TlsFiles::load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            error.contains("tls.crt") && error.contains("no PEM CERTIFICATE"),
            "{error}"
        );
    }

    #[test]
    fn peer_tls_requires_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(CERT_FILE),
            "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join(KEY_FILE),
            "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let error = PeerTls::load_dir(dir.path()).unwrap_err().to_string();
        assert!(error.contains("ca.crt"), "{error}");
    }
}
