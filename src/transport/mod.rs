//! How connections are made, for every gRPC client and server in the crate: client endpoints
//! (TCP_NODELAY, HTTP/2 keepalive, TLS), listeners with TLS ([`CertDir`], [`Incoming`]:
//! certificates from a directory laid out like a Kubernetes TLS Secret, followed while the
//! branch runs), and local deadlines on outbound calls.

mod tls;

pub use tls::{CA_FILE, CERT_FILE, CertDir, Conn, Incoming, KEY_FILE, RELOAD_INTERVAL, TlsError, TlsRole, read_ca};

use std::future::Future;
use std::time::Duration;

use tonic::transport::{ClientTlsConfig, Endpoint};

/// HTTP/2 pings on idle and busy connections. A peer that vanished without a reset (a removed
/// pod, a dropped network) is noticed within interval + timeout, and the next call reconnects,
/// resolving the name again.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The same between branches, much sooner: a leader stalled on a silent connection cannot
/// replicate to that peer, and a follower cannot forward its customers' requests. Measured
/// (`tests/dead_connections.rs`): a follower whose connections froze answered again after
/// ~10 s with the generic setting, ~2 s with this one. Only our own servers see these pings
/// (gRPC servers of other stacks may refuse pings this frequent; customer clients keep the
/// generic setting).
pub const PEER_KEEPALIVE: Duration = Duration::from_secs(1);

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
}
