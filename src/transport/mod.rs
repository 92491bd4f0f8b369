//! How connections are made, for every gRPC client and server in the crate: client endpoints
//! (TCP_NODELAY, HTTP/2 keepalive, TLS, a bounded name lookup), listeners with TLS ([`CertDir`], [`Incoming`]:
//! certificates from a directory laid out like a Kubernetes TLS Secret, followed while the
//! branch runs), local deadlines on outbound calls, and which failed calls are worth
//! sending again ([`is_transient`]).

mod tls;

pub use tls::{CA_FILE, CERT_FILE, CertDir, Conn, Incoming, KEY_FILE, RELOAD_INTERVAL, TlsError, TlsRole, read_ca};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

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

/// How long a client first waits for the name lookup of a connect; then the connect fails
/// (UNAVAILABLE, "dns error") and the next one sends new queries, waiting twice as long after
/// each lookup that timed out, up to [`LOOKUP_TIMEOUT_MAX`] (a resolver that is merely slow is
/// still waited for), and [`LOOKUP_TIMEOUT`] again after one that answered.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(1);
pub const LOOKUP_TIMEOUT_MAX: Duration = Duration::from_secs(8);

/// A channel to `endpoint` that connects on first use and again after its connection is lost,
/// with a bounded name lookup ([`LOOKUP_TIMEOUT`]). tonic's own `connect_lazy` bounds only the
/// TCP connect (hyper's HTTP connector), so a lookup whose UDP query was lost waited out the
/// resolver's own timeouts: glibc's 5 s per try, per search domain (a pod's `ndots:5` tries
/// three first), up to a minute. Found in the e2e test: a restarted branch's peers could not
/// reach it for 5-60 s. An abandoned lookup finishes on its blocking thread.
pub fn connect_lazy(endpoint: &Endpoint) -> Channel {
    let mut http = HttpConnector::new_with_resolver(Lookup::new(GaiResolver::new(), LOOKUP_TIMEOUT));
    // As tonic sets up its own connector (TCP_NODELAY: docs/performance.md, Nagle).
    http.enforce_http(false);
    http.set_nodelay(endpoint.get_tcp_nodelay());
    http.set_connect_timeout(endpoint.get_connect_timeout());
    endpoint.connect_with_connector_lazy(http)
}

/// A name lookup (`resolve`, a hyper resolver) that gives up after a timeout: `base` at
/// first, doubled after each lookup that timed out (shared by the connector's clones, one per
/// connect), back to `base` after one that answered.
#[derive(Clone)]
struct Lookup<R> {
    resolve: R,
    base: Duration,
    timeout_ms: Arc<AtomicU64>,
}

impl<R> Lookup<R> {
    fn new(resolve: R, base: Duration) -> Lookup<R> {
        let timeout_ms = Arc::new(AtomicU64::new(millis(base)));
        Lookup {
            resolve,
            base,
            timeout_ms,
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl<R> tonic::codegen::Service<Name> for Lookup<R>
where
    R: tonic::codegen::Service<Name, Error = std::io::Error> + Send,
    R::Future: Send + 'static,
{
    type Response = R::Response;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<R::Response, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.resolve.poll_ready(cx)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let timeout_ms = self.timeout_ms.clone();
        let (base, max) = (millis(self.base), millis(LOOKUP_TIMEOUT_MAX).max(millis(self.base)));
        let timeout = Duration::from_millis(timeout_ms.load(Ordering::Relaxed));
        let lookup = self.resolve.call(name.clone());
        Box::pin(async move {
            match tokio::time::timeout(timeout, lookup).await {
                Ok(answer) => {
                    timeout_ms.store(base, Ordering::Relaxed);
                    answer
                }
                Err(_) => {
                    let longer = millis(timeout).saturating_mul(2).min(max);
                    timeout_ms.store(longer, Ordering::Relaxed);
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no address for {name} within {:.1} s", timeout.as_secs_f64()),
                    ))
                }
            }
        })
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

/// Whether a failed call may simply be sent again: the branch is down, restarting, electing or
/// closing its connections, or the call ran out of time. Customer calls carry an event id, so a
/// repeat is applied once.
pub fn is_transient(status: &tonic::Status) -> bool {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled | tonic::Code::Unknown => {
            true
        }
        // The connection failed under the call, here, rather than the server answering INTERNAL:
        // a branch that shuts down gracefully sends GOAWAY, and tonic fails the calls the
        // branch never took as INTERNAL "h2 protocol error" (gRPC's spec asks clients to retry
        // those transparently; tonic's channel does not).
        tonic::Code::Internal => failed_here(status),
        _ => false,
    }
}

/// A status made by this process's client from an error (hyper's, h2's, the connection's)
/// carries that error as its source; one read off the wire (`grpc-status`) has none.
fn failed_here(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resolver that never answers, as glibc's while its query is lost.
    #[derive(Clone)]
    struct Silent;

    impl tonic::codegen::Service<Name> for Silent {
        type Response = std::vec::IntoIter<std::net::SocketAddr>;
        type Error = std::io::Error;
        type Future = std::future::Pending<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Name) -> Self::Future {
            std::future::pending()
        }
    }

    /// A channel whose name lookup hangs fails its call as UNAVAILABLE within the lookup
    /// timeout (retried by every caller), long before the call's own deadline.
    #[tokio::test]
    async fn a_hung_lookup_fails_the_connect_as_unavailable() {
        let lookup = Lookup::new(Silent, Duration::from_millis(100));
        let mut http = HttpConnector::new_with_resolver(lookup.clone());
        http.enforce_http(false);
        let endpoint = endpoint("branch-1.example:50051", Duration::from_secs(5), None).unwrap();
        let channel = endpoint.connect_with_connector_lazy(http);
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let started = std::time::Instant::now();
        let request = tonic::Request::new(tonic_health::pb::HealthCheckRequest::default());
        let status = call(Duration::from_secs(20), request, |r| health.check(r))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(status.message().contains("dns error"), "{status:?}");
        assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
        // The next lookup may take longer (a slow resolver is not cut off for good).
        assert_eq!(lookup.timeout_ms.load(Ordering::Relaxed), 200);
    }

    /// The timeout doubles after each lookup that timed out, up to the cap, and is back to
    /// its base after one that answered.
    #[tokio::test(start_paused = true)]
    async fn the_lookup_timeout_grows_while_lookups_time_out() {
        use tonic::codegen::Service as _;
        let mut lookup = Lookup::new(Silent, Duration::from_secs(1));
        let name: Name = "branch-1.example".parse().unwrap();
        let mut waited = Vec::new();
        for _ in 0..6 {
            let error = lookup.call(name.clone()).await.unwrap_err();
            assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
            waited.push(error.to_string());
        }
        assert!(waited[0].ends_with("within 1.0 s"), "{waited:?}");
        assert!(waited[3].ends_with("within 8.0 s"), "{waited:?}");
        assert!(waited[5].ends_with("within 8.0 s"), "{waited:?}");
        let mut answering = Lookup {
            resolve: GaiResolver::new(),
            base: lookup.base,
            timeout_ms: lookup.timeout_ms.clone(),
        };
        let localhost: Name = "localhost".parse().unwrap();
        tokio::time::resume();
        answering.call(localhost).await.expect("localhost resolves");
        assert_eq!(lookup.timeout_ms.load(Ordering::Relaxed), 1000);
    }

    /// A server that says GOAWAY before taking any stream, as a branch that shuts down
    /// gracefully does to calls that race with its goodbye: the call fails here as INTERNAL,
    /// and is worth sending again. The frames are written by hand so the race always goes
    /// the same way.
    #[tokio::test]
    async fn a_call_refused_by_goaway_is_transient() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            // SETTINGS (empty), then GOAWAY: last stream 0, NO_ERROR.
            let settings = [0u8, 0, 0, 4, 0, 0, 0, 0, 0];
            let goaway = [0u8, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            socket.write_all(&settings).await.unwrap();
            socket.write_all(&goaway).await.unwrap();
            // Hold the connection open until the client is done with it.
            let mut sink = [0u8; 1024];
            while socket.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        });
        let endpoint = endpoint(&address.to_string(), Duration::from_secs(5), None).unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(connect_lazy(&endpoint));
        let request = tonic::Request::new(tonic_health::pb::HealthCheckRequest::default());
        let status = call(Duration::from_secs(20), request, |r| health.check(r))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
        assert!(is_transient(&status), "{status:?}");
        drop(health);
        server.await.unwrap();
    }

    /// INTERNAL answered by a server is a bug there, not a reason to try again.
    #[test]
    fn internal_from_the_server_is_not_transient() {
        assert!(!is_transient(&tonic::Status::internal("a bug on the branch")));
        assert!(!is_transient(&tonic::Status::invalid_argument("negative amount")));
        assert!(is_transient(&tonic::Status::unavailable("electing")));
    }

    #[tokio::test]
    async fn a_call_that_never_answers_fails_with_deadline_exceeded() {
        let never = |_request| std::future::pending::<Result<(), tonic::Status>>();
        let status = call(Duration::from_millis(20), tonic::Request::new(()), never)
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    }
}
