//! Prometheus metrics: a `/metrics` endpoint on its own listener (`--metrics-listen`).
//!
//! Process-wide, labelled by branch (several branches may share a process in `distbank run`):
//! - `distbank_operations_total{branch,operation,result}` and
//!   `distbank_operation_duration_seconds{branch,operation}`: customer requests;
//! - `distbank_raft_*{branch}`: term, leadership and the leader known, last log / applied
//!   index, apply lag, and on the leader `distbank_raft_replication_lag_entries{branch,peer}`;
//!   read at scrape time from openraft's metrics, so they cost nothing between scrapes;
//! - `distbank_peer_up{branch,peer}`: whether the last Raft RPC to that peer got an answer;
//! - `distbank_writes_per_batch{branch,kind}`: group commit at work, writes per log entry
//!   (`kind="entry"`, on the leader) and per forwarded `Submit` (`kind="forward"`);
//! - `distbank_read_index_total{branch,path}`: on the leader, read indexes given from its
//!   lease (`path="lease"`) or after a quorum round (`path="quorum"`);
//! - `distbank_pre_votes_total{branch,result}`: pre-vote rounds a voter ran because it heard
//!   from no leader: `won` (it then started an election) or `lost` (a majority still hears the
//!   leader or has a newer log: this branch is likely cut off);
//! - `distbank_tls_reloads_total{branch,tls,result}`: TLS directories re-read after their files
//!   changed (`tls="peer"|"customer"`): `reloaded`, or `failed` (the files on disk cannot be
//!   used; the certificates in use stay, and will expire);
//! - `distbank_tls_handshake_failures_total{branch,listener}`: clients whose TLS handshake
//!   failed (no certificate, another CA, plaintext); after a certificate change, how a
//!   refused peer shows;
//! - `distbank_ready{branch}`: the readiness health status.
//!
//! Without `--metrics-listen` nothing is recorded ([`enabled`] is false).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::branch::Branch;
use crate::replication::NodeId;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    branch: u64,
    operation: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    branch: u64,
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BranchLabels {
    branch: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BatchLabels {
    branch: u64,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReadIndexLabels {
    branch: u64,
    path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PreVoteLabels {
    branch: u64,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TlsReloadLabels {
    branch: u64,
    tls: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    branch: u64,
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    branch: u64,
    peer: u64,
}

struct Metrics {
    registry: Registry,
    operations: Family<OperationLabels, Counter>,
    latency: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    batch_size: Family<BatchLabels, Histogram, fn() -> Histogram>,
    read_indexes: Family<ReadIndexLabels, Counter>,
    pre_votes: Family<PreVoteLabels, Counter>,
    tls_reloads: Family<TlsReloadLabels, Counter>,
    tls_handshake_failures: Family<ListenerLabels, Counter>,
    peer_up: Family<PeerLabels, Gauge>,
    ready: Family<BranchLabels, Gauge>,
    term: Family<BranchLabels, Gauge>,
    is_leader: Family<BranchLabels, Gauge>,
    leader: Family<BranchLabels, Gauge>,
    last_log_index: Family<BranchLabels, Gauge>,
    last_applied_index: Family<BranchLabels, Gauge>,
    apply_lag: Family<BranchLabels, Gauge>,
    replication_lag: Family<PeerLabels, Gauge>,
    branches: Mutex<BTreeMap<NodeId, Branch>>,
}

/// Registers `metric` and hands it back (a family is a handle to state the registry shares).
fn registered<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~16 s: a loopback commit takes about a millisecond, a stalled one seconds.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 16,
    ))
}

fn batch_size_histogram() -> Histogram {
    // 1 .. 256 writes: a lone write, up to the largest batch (`MAX_WRITES_PER_BATCH`).
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 9))
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("distbank");
        let operations = registered(
            &mut registry,
            "operations",
            "Customer operations by branch, operation and result",
            Family::default(),
        );
        let latency: Family<LatencyLabels, Histogram, fn() -> Histogram> = registered(
            &mut registry,
            "operation_duration_seconds",
            "Time to answer a customer operation (consensus included)",
            Family::new_with_constructor(latency_histogram),
        );
        let batch_size: Family<BatchLabels, Histogram, fn() -> Histogram> = registered(
            &mut registry,
            "writes_per_batch",
            "Writes per log entry (kind=entry, on the leader) and per forwarded Submit (kind=forward)",
            Family::new_with_constructor(batch_size_histogram),
        );
        let read_indexes = registered(
            &mut registry,
            "read_index",
            "On the leader: read indexes given from its lease (path=lease) or after a quorum round (path=quorum)",
            Family::default(),
        );
        let pre_votes = registered(
            &mut registry,
            "pre_votes",
            "Pre-vote rounds of a voter that heard from no leader: won (an election follows) or lost",
            Family::default(),
        );
        let tls_reloads = registered(
            &mut registry,
            "tls_reloads",
            "TLS directories re-read after their files changed: reloaded, or failed (the certificates in use stay)",
            Family::default(),
        );
        let tls_handshake_failures = registered(
            &mut registry,
            "tls_handshake_failures",
            "Clients whose TLS handshake failed on a listener (no certificate, another CA, plaintext)",
            Family::default(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            registered(registry, name, help, Family::<BranchLabels, Gauge>::default())
        };
        let ready = gauge(&mut registry, "ready", "1 while the readiness health status is SERVING");
        let term = gauge(&mut registry, "raft_current_term", "Raft term");
        let is_leader = gauge(&mut registry, "raft_is_leader", "1 on the Raft leader");
        let leader = gauge(
            &mut registry,
            "raft_leader",
            "The branch this branch knows as leader (0: none known)",
        );
        let last_log_index = gauge(&mut registry, "raft_last_log_index", "Index of the last log entry");
        let last_applied_index = gauge(
            &mut registry,
            "raft_last_applied_index",
            "Index of the last entry applied to this replica",
        );
        let apply_lag = gauge(
            &mut registry,
            "raft_apply_lag_entries",
            "Log entries this replica holds but has not applied yet",
        );
        let replication_lag = registered(
            &mut registry,
            "raft_replication_lag_entries",
            "On the leader: entries a peer is behind the leader's log",
            Family::<PeerLabels, Gauge>::default(),
        );
        let peer_up = registered(
            &mut registry,
            "peer_up",
            "1 if the last Raft RPC to the peer got an answer, 0 if it failed",
            Family::<PeerLabels, Gauge>::default(),
        );
        Metrics {
            registry,
            operations,
            latency,
            batch_size,
            read_indexes,
            pre_votes,
            tls_reloads,
            tls_handshake_failures,
            peer_up,
            ready,
            term,
            is_leader,
            leader,
            last_log_index,
            last_applied_index,
            apply_lag,
            replication_lag,
            branches: Mutex::default(),
        }
    }

    fn pre_vote(&self, branch: NodeId, won: bool) {
        let result = if won { "won" } else { "lost" };
        self.pre_votes.get_or_create(&PreVoteLabels { branch, result }).inc();
    }

    fn tls_reload(&self, branch: NodeId, tls: &'static str, reloaded: bool) {
        let result = if reloaded { "reloaded" } else { "failed" };
        self.tls_reloads
            .get_or_create(&TlsReloadLabels { branch, tls, result })
            .inc();
    }

    /// Copies openraft's current metrics of every registered branch into the gauges.
    fn refresh(&self) {
        let branches = self.branches.lock().unwrap_or_else(|p| p.into_inner());
        // Rebuilt at every scrape: only a branch that leads now has per-peer lag figures (a
        // former leader's are stale). Cleared once for all branches, not per branch: in a
        // process that runs several, a follower must not wipe the leader's figures.
        self.replication_lag.clear();
        for (&id, branch) in branches.iter() {
            let m = branch.raft().metrics().borrow().clone();
            let labels = BranchLabels { branch: id };
            let last_log = m.last_log_index.unwrap_or(0);
            let applied = m.last_applied.map_or(0, |log_id| log_id.index);
            self.term.get_or_create(&labels).set(gauge_value(m.current_term));
            self.is_leader
                .get_or_create(&labels)
                .set(i64::from(m.current_leader == Some(id)));
            // Any one branch's /metrics names the leader (its image has no shell to ask with).
            self.leader
                .get_or_create(&labels)
                .set(m.current_leader.map_or(0, gauge_value));
            self.last_log_index.get_or_create(&labels).set(gauge_value(last_log));
            self.last_applied_index.get_or_create(&labels).set(gauge_value(applied));
            self.apply_lag
                .get_or_create(&labels)
                .set(gauge_value(last_log.saturating_sub(applied)));
            for (&peer, matched) in m.replication.iter().flatten() {
                let matched = matched.map_or(0, |log_id| log_id.index);
                self.replication_lag
                    .get_or_create(&PeerLabels { branch: id, peer })
                    .set(gauge_value(last_log.saturating_sub(matched)));
            }
        }
    }
}

fn gauge_value(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

static METRICS: OnceLock<Metrics> = OnceLock::new();
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether metrics are recorded (a metrics listener runs).
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

fn metrics() -> Option<&'static Metrics> {
    if enabled() { METRICS.get() } else { None }
}

/// Counts one answered customer operation and its latency.
pub fn record_operation(branch: NodeId, operation: &'static str, result: &'static str, elapsed: Duration) {
    if let Some(m) = metrics() {
        m.operations
            .get_or_create(&OperationLabels {
                branch,
                operation,
                result,
            })
            .inc();
        m.latency
            .get_or_create(&LatencyLabels { branch, operation })
            .observe(elapsed.as_secs_f64());
    }
}

/// One group-commit batch of `writes` writes: a log entry (`"entry"`) or a forwarded `Submit`
/// (`"forward"`).
pub fn record_batch(branch: NodeId, kind: &'static str, writes: usize) {
    if let Some(m) = metrics() {
        m.batch_size
            .get_or_create(&BatchLabels { branch, kind })
            .observe(writes as f64);
    }
}

/// Counts one read index given by `branch` as leader, from its lease or after a quorum round.
pub fn record_read_index(branch: NodeId, path: &'static str) {
    if let Some(m) = metrics() {
        m.read_indexes.get_or_create(&ReadIndexLabels { branch, path }).inc();
    }
}

/// Counts one pre-vote round of `branch`, won or lost.
pub fn record_pre_vote(branch: NodeId, won: bool) {
    if let Some(m) = metrics() {
        m.pre_vote(branch, won);
    }
}

/// Counts one re-read of a changed TLS directory of `branch` (`tls`: peer or customer).
pub fn record_tls_reload(branch: NodeId, tls: &'static str, reloaded: bool) {
    if let Some(m) = metrics() {
        m.tls_reload(branch, tls, reloaded);
    }
}

/// Counts one failed TLS handshake on `listener` (peer or customer) of `branch`.
pub fn record_tls_handshake_failure(branch: NodeId, listener: &'static str) {
    if let Some(m) = metrics() {
        m.tls_handshake_failures
            .get_or_create(&ListenerLabels { branch, listener })
            .inc();
    }
}

/// Records whether the last Raft RPC from `branch` to `peer` got an answer.
pub fn record_peer(branch: NodeId, peer: NodeId, up: bool) {
    if let Some(m) = metrics() {
        m.peer_up.get_or_create(&PeerLabels { branch, peer }).set(i64::from(up));
    }
}

/// Records the readiness health status of `branch`.
pub fn record_ready(branch: NodeId, ready: bool) {
    if let Some(m) = metrics() {
        m.ready.get_or_create(&BranchLabels { branch }).set(i64::from(ready));
    }
}

/// Makes `branch`'s Raft state part of the scrape (until [`unregister_branch`]).
pub fn register_branch(branch: &Branch) {
    if let Some(m) = metrics() {
        m.branches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(branch.id(), branch.clone());
    }
}

pub fn unregister_branch(id: NodeId) {
    if let Some(m) = metrics() {
        m.branches.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }
}

/// The current metrics in the Prometheus text format.
pub fn render() -> String {
    let Some(m) = METRICS.get() else {
        return String::new();
    };
    m.refresh();
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &m.registry);
    text
}

#[derive(Debug, thiserror::Error)]
#[error("metrics listener on {addr}: {source}")]
pub struct MetricsError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Turns recording on and binds the `/metrics` listener; returns the bound address and the
/// server, which runs until `shutdown` is cancelled.
pub async fn serve(
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, impl Future<Output = ()> + Send + 'static), MetricsError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError { addr, source })?;
    let bound = listener.local_addr().map_err(|source| MetricsError { addr, source })?;
    METRICS.get_or_init(Metrics::new);
    ENABLED.store(true, Ordering::Relaxed);
    let router = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )],
                render(),
            )
        }),
    );
    let server = async move {
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    };
    Ok((bound, server))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The counters that move only on faults have no series on a healthy branch, so the
    /// chart's alert test (tests/chart/test_alerts.py) cannot find them in a scrape: their
    /// names and labels, as the alerts select them, are checked here.
    #[test]
    fn fault_counters_are_named_as_the_alerts_expect() {
        let m = Metrics::new();
        m.pre_vote(3, false);
        m.tls_reload(2, "customer", false);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &m.registry).unwrap();
        assert!(
            text.contains("distbank_pre_votes_total{branch=\"3\",result=\"lost\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("distbank_tls_reloads_total{branch=\"2\",tls=\"customer\",result=\"failed\"} 1\n"),
            "{text}"
        );
    }
}
