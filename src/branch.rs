//! One branch: a Raft member holding a replica of the account, its two gRPC listeners
//! (customer API + health, peer API), readiness, and shutdown.
//!
//! The operations customers see are built here from openraft's primitives:
//! - a write (deposit, withdraw, or a query that carries an event id) is appended through the
//!   leader, forwarded there over the peer service when this branch is not the leader, and
//!   answered only once **this** branch's replica has applied it;
//! - a query is a linearizable read on this branch: the leader confirms its leadership and
//!   names a read index (ReadIndex, one round to the voters), this replica waits until it has
//!   applied that index, then reads locally. A query's answer is recorded under its event id
//!   on the branch that gave it, so a retried or re-run query gets the same answer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Router, TcpIncoming};
use tonic::transport::{Server, ServerTlsConfig};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tracing::Instrument as _;

use std::future::Future;
use std::pin::Pin;

use crate::account::{Command, IDEMPOTENCY_WINDOW, Operation, Outcome, RecentTable};
use crate::batch::Batcher;
use crate::coalesce::Coalescer;
use crate::proto;
use crate::proto::bank::bank_server::{Bank, BankServer};
use crate::proto::peer::peer_server::PeerServer;
use crate::replication::disk::StoreError;
use crate::replication::network::{MAX_PEER_MESSAGE, PeerChannels};
use crate::replication::store::{StateMachine, Storage};
use crate::replication::{NodeId, Proposal, Proposed, Raft, RaftTiming, raft_config};
use crate::service::bank::BankService;
use crate::service::peer::PeerService;
use crate::transport::{PeerTls, TlsError};
use crate::{metrics, telemetry, transport};

/// Customer requests one connection may have in flight; more are refused with
/// RESOURCE_EXHAUSTED. Below HTTP/2's default stream limit (200), so the limit is what bites.
pub const MAX_CUSTOMER_REQUESTS_PER_CONNECTION: usize = 128;

/// A customer message is three small fields; anything near this size is not a customer.
pub const MAX_CUSTOMER_MESSAGE: usize = 16 * 1024;

/// How one branch is configured.
#[derive(Debug, Clone)]
pub struct BranchConfig {
    /// This branch's id (its Raft node id).
    pub id: NodeId,
    /// The account's balance before any event (the same on every branch).
    pub initial_balance: u64,
    /// Every branch's peer-API address (`host:port`), this one included.
    pub members: BTreeMap<NodeId, String>,
    /// How many branches vote (the lowest ids); the others are non-voting replicas.
    pub voters: usize,
    pub timing: RaftTiming,
    /// How long a customer request may wait for consensus before it fails with UNAVAILABLE.
    pub request_timeout: Duration,
    /// Where the consensus state is kept across restarts; `None` = in memory only.
    pub data_dir: Option<PathBuf>,
    pub tls: BranchTls,
}

/// Optional TLS on a branch's listeners and peer connections.
#[derive(Debug, Clone, Default)]
pub struct BranchTls {
    /// Mutual TLS on the peer API and on this branch's calls to peers.
    pub peer: Option<PeerTls>,
    /// Server TLS on the customer API (health included; see [`start_with_health`]).
    pub customer: Option<ServerTlsConfig>,
}

impl BranchConfig {
    /// The voting members: the `voters` lowest branch ids.
    pub fn voter_ids(&self) -> BTreeSet<NodeId> {
        self.members.keys().copied().take(self.voters.max(1)).collect()
    }
}

/// Why a branch could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum BranchError {
    #[error("branch {id} is not in the member list ({members})")]
    NotAMember { id: NodeId, members: String },
    #[error("invalid Raft configuration: {0}")]
    Config(#[from] openraft::ConfigError),
    #[error("data directory: {0}")]
    Storage(#[from] StoreError),
    #[error("Raft failed to start: {0}")]
    Start(String),
    #[error("cannot listen on {what}: {source}")]
    Listen {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("Raft stopped: {0}")]
    RaftStopped(String),
    /// Consensus could not be reached in time (no leader, no quorum, peers unreachable). The
    /// request may still take effect: retry it with the same event id.
    #[error("not available: {0}")]
    Unavailable(String),
    #[error("the branch is shutting down")]
    ShuttingDown,
}

/// A cheap-to-clone handle to a running branch's consensus state.
#[derive(Clone)]
pub struct Branch {
    inner: Arc<Inner>,
}

struct Inner {
    id: NodeId,
    raft: Raft,
    state: StateMachine,
    peers: PeerChannels,
    request_timeout: Duration,
    /// Answers given to queries, by event id (this branch's own; queries are not replicated).
    /// Bounded like the replicated table (the most recent `IDEMPOTENCY_WINDOW` ids).
    queries: std::sync::Mutex<RecentTable<u64>>,
    /// Concurrent queries on this branch share read-index requests...
    read_indexes: Coalescer<Result<Option<u64>, String>>,
    /// ...and, when this branch leads, quorum rounds (its own queries and followers' requests).
    leader_read_indexes: Coalescer<Result<Option<u64>, String>>,
    /// Writes this branch proposes as leader, grouped into log entries...
    proposals: Batcher<Proposed, Result<Committed, SubmitError>>,
    /// ...and writes it forwards to the leader, grouped into `Submit` calls.
    forwards: Batcher<(NodeId, Proposed), Result<Committed, String>>,
}

/// The leader's answer to a forwarded write.
#[derive(Debug, Clone, Copy)]
pub struct Committed {
    pub log_index: u64,
    pub outcome: Outcome,
}

impl Branch {
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// The local replica's current balance (for inspection; not a linearizable read).
    pub fn local_balance(&self) -> u64 {
        self.inner.state.balance()
    }

    /// Executes one customer operation with linearizable semantics (see the module docs).
    pub async fn execute(&self, event_id: Option<u64>, operation: Operation) -> Result<Outcome, BranchError> {
        let deadline = Instant::now() + self.inner.request_timeout;
        let Some(command) = Command::for_request(event_id, operation) else {
            return self.query(event_id, deadline).await;
        };
        if let Some(id) = event_id
            && self.recorded_query(id).is_some()
        {
            return Ok(Outcome::EventIdReused {
                recorded: Operation::Query,
            });
        }
        let committed = self.submit(command, deadline).await?;
        // Answer only once this replica shows the change: the customer's own branch then
        // reflects every write it acknowledged.
        self.wait_applied(committed.log_index, deadline).await?;
        Ok(match committed.outcome {
            Outcome::EventIdReused { .. } => Outcome::EventIdReused {
                recorded: event_id
                    .and_then(|id| self.inner.state.recorded_operation(id))
                    .unwrap_or(operation),
            },
            outcome => outcome,
        })
    }

    /// A query: a linearizable read, recorded under its event id (first answer wins).
    async fn query(&self, event_id: Option<u64>, deadline: Instant) -> Result<Outcome, BranchError> {
        let Some(id) = event_id else {
            return self.linearizable_read(deadline).await;
        };
        if let Some(balance) = self.recorded_query(id) {
            return Ok(Outcome::Balance(balance));
        }
        let outcome = self.linearizable_read(deadline).await?;
        // After the read barrier this replica knows every write committed before the query
        // began, so a write recorded under the same id is seen here.
        if let Some(recorded) = self.inner.state.recorded_operation(id) {
            return Ok(Outcome::EventIdReused { recorded });
        }
        let Outcome::Balance(balance) = outcome else {
            return Ok(outcome);
        };
        let mut queries = self.inner.queries.lock().unwrap_or_else(|p| p.into_inner());
        Ok(Outcome::Balance(*queries.get_or_insert(id, balance)))
    }

    fn recorded_query(&self, event_id: u64) -> Option<u64> {
        let queries = self.inner.queries.lock().unwrap_or_else(|p| p.into_inner());
        queries.get(event_id).copied()
    }

    /// Appends `command` through the current leader, retrying across leader changes until
    /// `deadline`.
    async fn submit(&self, command: Command, deadline: Instant) -> Result<Committed, BranchError> {
        let mut metrics = self.inner.raft.metrics();
        let mut last_error = "no leader elected yet".to_string();
        loop {
            let leader = metrics.borrow().current_leader;
            match leader {
                Some(leader) if leader == self.inner.id => {
                    match tokio::time::timeout_at(deadline, self.submit_local(command)).await {
                        Ok(Ok(committed)) => return Ok(committed),
                        Ok(Err(SubmitError::NotLeader)) => last_error = "leadership moved".into(),
                        Ok(Err(e)) => return Err(e.into()),
                        Err(_) => break,
                    }
                }
                Some(leader) => match self.forward(leader, command, deadline).await {
                    Ok(committed) => return Ok(committed),
                    Err(e) => last_error = e,
                },
                None => {}
            }
            if Instant::now() >= deadline {
                break;
            }
            // Wait for news (a leader change) or a short backoff, whichever comes first.
            let backoff = Instant::now() + Duration::from_millis(20);
            let _ = tokio::time::timeout_at(backoff.min(deadline), metrics.changed()).await;
        }
        Err(BranchError::Unavailable(format!(
            "no commit within {:?}: {last_error}",
            self.inner.request_timeout
        )))
    }

    /// Appends `command` on this branch, which must be the leader (the peer service's
    /// `Submit` lands here; it never forwards again, so requests cannot loop). Concurrent
    /// writes share log entries (group commit, [`crate::batch`]).
    pub(crate) async fn submit_local(&self, command: Command) -> Result<Committed, SubmitError> {
        let (span, traceparent) = if telemetry::enabled() {
            let span = tracing::info_span!(
                "consensus",
                otel.name = "raft.client_write",
                branch.id = self.inner.id,
                event.id = command.event_id(),
                log.index = tracing::field::Empty,
            );
            let traceparent = span.in_scope(telemetry::current_traceparent);
            (span, traceparent)
        } else {
            (tracing::Span::none(), None)
        };
        let write = Proposed { command, traceparent };
        let committed = self
            .inner
            .proposals
            .submit(write)
            .instrument(span.clone())
            .await
            .unwrap_or_else(|| {
                Err(SubmitError::Unavailable(
                    "the write's batch ended without a result".into(),
                ))
            })?;
        span.record("log.index", committed.log_index);
        Ok(committed)
    }

    /// Forwards `command` to `leader`, in one `Submit` call with whatever else this branch has
    /// waiting for it.
    async fn forward(&self, leader: NodeId, command: Command, deadline: Instant) -> Result<Committed, String> {
        let write = Proposed {
            command,
            traceparent: telemetry::current_traceparent(),
        };
        match tokio::time::timeout_at(deadline, self.inner.forwards.submit((leader, write))).await {
            Ok(Some(result)) => result,
            Ok(None) => Err("the forwarded batch ended without a result".into()),
            Err(_) => Err(format!("forwarding to leader {leader}: no answer in time")),
        }
    }

    /// A linearizable read of the balance on this branch.
    pub async fn linearizable_read(&self, deadline: Instant) -> Result<Outcome, BranchError> {
        let read_index = self.read_index(deadline).await?;
        if let Some(index) = read_index {
            self.wait_applied(index, deadline).await?;
        }
        Ok(self.inner.state.query())
    }

    /// The index a linearizable read must wait for (one shared round for concurrent readers).
    async fn read_index(&self, deadline: Instant) -> Result<Option<u64>, BranchError> {
        match tokio::time::timeout_at(deadline, self.inner.read_indexes.run()).await {
            Ok(Some(result)) => result.map_err(|e| BranchError::Unavailable(format!("no read index: {e}"))),
            Ok(None) => Err(BranchError::ShuttingDown),
            Err(_) => Err(BranchError::Unavailable("no read index in time".into())),
        }
    }

    /// Asks the leader (possibly this branch) for the index a linearizable read must wait for.
    async fn read_index_round(&self, deadline: Instant) -> Result<Option<u64>, String> {
        let mut metrics = self.inner.raft.metrics();
        let mut last_error = "no leader elected yet".to_string();
        loop {
            let leader = metrics.borrow().current_leader;
            match leader {
                Some(leader) if leader == self.inner.id => {
                    match tokio::time::timeout_at(deadline, self.local_read_index()).await {
                        Ok(Ok(index)) => return Ok(index),
                        Ok(Err(e)) => last_error = e,
                        Err(_) => break,
                    }
                }
                Some(leader) => match self.forward_read_index(leader, deadline).await {
                    Ok(index) => return Ok(index),
                    Err(e) => last_error = e,
                },
                None => {}
            }
            if Instant::now() >= deadline {
                break;
            }
            let backoff = Instant::now() + Duration::from_millis(20);
            let _ = tokio::time::timeout_at(backoff.min(deadline), metrics.changed()).await;
        }
        Err(last_error)
    }

    /// ReadIndex on the leader: confirms leadership with a quorum round, shared by the reads
    /// that arrive together.
    pub(crate) async fn local_read_index(&self) -> Result<Option<u64>, String> {
        self.inner
            .leader_read_indexes
            .run()
            .await
            .unwrap_or_else(|| Err("the branch is shutting down".into()))
    }

    async fn leader_read_index_round(&self) -> Result<Option<u64>, String> {
        match self.inner.raft.get_read_log_id().await {
            Ok((read_log_id, _applied)) => Ok(read_log_id.map(|id| id.index)),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn forward_read_index(&self, leader: NodeId, deadline: Instant) -> Result<Option<u64>, String> {
        let mut client = peer_client(&self.inner.raft, &self.inner.peers, leader)?;
        let request = tonic::Request::new(proto::peer::ReadIndexRequest {
            sender: Some(self.inner.id),
        });
        let timeout = deadline.saturating_duration_since(Instant::now());
        let reply = transport::call(timeout, request, |r| client.read_index(r))
            .await
            .map_err(|status| format!("read index from leader {leader}: {}", status.message()))?;
        Ok(reply.into_inner().read_index)
    }

    /// A peer waits on this branch as leader (a forwarded write, a read index): when it is a
    /// learner, it gets new entries at once rather than in batches. `None`: a peer that did not
    /// say who it is (an older release); every learner counts. Other ids change nothing.
    pub(crate) fn peer_waits(&self, sender: Option<NodeId>) {
        match sender {
            Some(id) if !self.inner.state.is_learner(id) => {}
            sender => self.inner.peers.demand().want(sender),
        }
    }

    /// While this branch leads: every learner gets the entries it lacks at once, as if a
    /// customer waited on each (for a caller that needs every replica current soon).
    pub fn flush_learners(&self) {
        self.inner.peers.demand().want(None);
    }

    /// Index of the last entry this replica has applied.
    pub fn last_applied_index(&self) -> Option<u64> {
        self.inner.state.last_applied_index()
    }

    /// The size of this replica's idempotency table (event ids with a recorded result).
    pub fn recorded_events(&self) -> usize {
        self.inner.state.recorded_events()
    }

    /// How many query answers this branch keeps by event id (its own, not replicated).
    pub fn recorded_queries(&self) -> usize {
        self.inner.queries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Waits until this replica has applied the entry at `index`.
    pub async fn wait_applied(&self, index: u64, deadline: Instant) -> Result<(), BranchError> {
        tokio::time::timeout_at(deadline, self.inner.state.wait_applied(index))
            .await
            .map_err(|_| BranchError::Unavailable(format!("this replica did not apply log index {index} in time")))
    }
}

/// Why `submit_local` did not commit (cloneable: a batch's failure is every write's).
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum SubmitError {
    /// This branch is not the leader (any more): the caller should find the new one.
    #[error("not the leader")]
    NotLeader,
    /// Not committed in time (no quorum, leadership lost mid-way); it may still take effect.
    #[error("not committed: {0}")]
    Unavailable(String),
    #[error("the branch is shutting down")]
    ShuttingDown,
}

impl From<SubmitError> for BranchError {
    fn from(e: SubmitError) -> BranchError {
        match e {
            SubmitError::NotLeader => BranchError::Unavailable("leadership moved".into()),
            SubmitError::Unavailable(e) => BranchError::Unavailable(e),
            SubmitError::ShuttingDown => BranchError::ShuttingDown,
        }
    }
}

/// Most writes one log entry or one forwarded `Submit` carries (~80 bytes each with a
/// traceparent; openraft sends up to 300 entries per AppendEntries, well under the peer
/// message limit).
const MAX_WRITES_PER_BATCH: usize = 256;

/// Log entries a leader proposes at once (and forwarded batches a follower has in flight):
/// one, so the writes that arrive while it commits form the next batch (classic group commit).
/// Measured on the concurrent bench: more in flight means smaller batches and no more
/// throughput; with data directories, batching doubles it (one fsync per batch).
const BATCHES_IN_FLIGHT: usize = 1;

/// Proposes one batch of writes as one log entry; every write gets the entry's fate. Bounded
/// by `timeout`: the next batch waits for this one, so it must not wait forever.
async fn propose(
    raft: Raft,
    branch: NodeId,
    timeout: Duration,
    writes: Vec<Proposed>,
) -> Vec<Result<Committed, SubmitError>> {
    let count = writes.len();
    metrics::record_batch(branch, "entry", count);
    let Ok(result) = tokio::time::timeout(timeout, raft.client_write(Proposal { writes })).await else {
        return vec![Err(SubmitError::Unavailable(format!("no commit within {timeout:?}"))); count];
    };
    match result {
        Ok(response) => {
            let log_index = response.log_id.index;
            response
                .data
                .into_iter()
                .map(|applied| {
                    Ok(Committed {
                        log_index,
                        outcome: applied.outcome,
                    })
                })
                .collect()
        }
        Err(e) => {
            let e = match e {
                RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => SubmitError::NotLeader,
                RaftError::APIError(e) => SubmitError::Unavailable(e.to_string()),
                RaftError::Fatal(_) => SubmitError::ShuttingDown,
            };
            vec![Err(e); count]
        }
    }
}

/// Sends a batch of writes to their leaders (one `Submit` per leader; normally there is one).
async fn forward_batch(
    raft: Raft,
    peers: PeerChannels,
    branch: NodeId,
    timeout: Duration,
    writes: Vec<(NodeId, Proposed)>,
) -> Vec<Result<Committed, String>> {
    let mut results: Vec<Result<Committed, String>> = vec![Err("not sent".into()); writes.len()];
    let mut by_leader: BTreeMap<NodeId, Vec<(usize, Proposed)>> = BTreeMap::new();
    for (position, (leader, write)) in writes.into_iter().enumerate() {
        by_leader.entry(leader).or_default().push((position, write));
    }
    for (leader, writes) in by_leader {
        let (positions, writes): (Vec<usize>, Vec<Proposed>) = writes.into_iter().unzip();
        metrics::record_batch(branch, "forward", writes.len());
        // A leader that is deposed (or cut off) mid-call would hold up every write queued
        // behind this batch until the timeout; the callers retry with the new leader instead.
        let answer = tokio::select! {
            answer = submit_to(&raft, &peers, branch, leader, writes, timeout) => answer,
            () = leader_moved(&raft, leader) => Err(format!("leadership moved away from {leader}")),
        };
        let answers = match answer {
            Ok(answers) => answers,
            Err(e) => vec![Err(e); positions.len()],
        };
        for (position, answer) in positions.into_iter().zip(answers) {
            results[position] = answer;
        }
    }
    results
}

/// Resolves once this branch no longer sees `leader` as the leader.
async fn leader_moved(raft: &Raft, leader: NodeId) {
    // Server metrics change only with leader, vote or membership; the full metrics with every
    // entry this branch appends or applies.
    let mut metrics = raft.server_metrics();
    if metrics.wait_for(|m| m.current_leader != Some(leader)).await.is_err() {
        // Raft stopped: the call's own timeout ends it.
        std::future::pending::<()>().await;
    }
}

/// One `Submit` call to `leader`; per-write results in order.
async fn submit_to(
    raft: &Raft,
    peers: &PeerChannels,
    sender: NodeId,
    leader: NodeId,
    writes: Vec<Proposed>,
    timeout: Duration,
) -> Result<Vec<Result<Committed, String>>, String> {
    let mut client = peer_client(raft, peers, leader)?;
    let count = writes.len();
    let request = tonic::Request::new(proto::peer::SubmitRequest {
        writes: writes
            .into_iter()
            .map(|write| {
                let (operation, amount) = proto::operation_to_peer(write.command.operation());
                proto::peer::Write {
                    event_id: write.command.event_id(),
                    operation: operation as i32,
                    amount,
                    traceparent: write.traceparent.unwrap_or_default(),
                }
            })
            .collect(),
        sender: Some(sender),
    });
    let reply = transport::call(timeout, request, |r| client.submit(r))
        .await
        .map_err(|status| format!("forwarding to leader {leader}: {}", status.message()))?
        .into_inner();
    if reply.results.len() != count {
        return Err(format!(
            "leader {leader} answered {} of {count} forwarded writes",
            reply.results.len()
        ));
    }
    Ok(reply
        .results
        .into_iter()
        .map(|result| {
            if !result.error.is_empty() {
                return Err(format!("leader {leader}: {}", result.error));
            }
            let outcome = proto::outcome_from_peer(result.outcome, result.balance)
                .ok_or_else(|| format!("leader {leader} sent an unknown outcome {}", result.outcome))?;
            Ok(Committed {
                log_index: result.log_index,
                outcome,
            })
        })
        .collect())
}

/// A peer-API client for `target`, at the address the current membership gives it.
fn peer_client(
    raft: &Raft,
    peers: &PeerChannels,
    target: NodeId,
) -> Result<proto::peer::peer_client::PeerClient<tonic::transport::Channel>, String> {
    let metrics = raft.metrics();
    let addr = metrics
        .borrow()
        .membership_config
        .nodes()
        .find(|(id, _)| **id == target)
        .map(|(_, node)| node.addr.clone())
        .ok_or_else(|| format!("leader {target} is not in the known membership"))?;
    peers
        .client(target, &addr)
        .map_err(|e| format!("bad address {addr} for branch {target}: {e}"))
}

/// A started branch: its handle, its addresses, and the tasks serving it.
pub struct RunningBranch {
    pub branch: Branch,
    pub customer_addr: std::net::SocketAddr,
    pub peer_addr: std::net::SocketAddr,
    ready: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<Result<(), BranchError>>,
}

impl RunningBranch {
    /// Resolves once the branch reports SERVING (it can answer linearizably).
    pub async fn ready(&self) {
        let mut ready = self.ready.clone();
        let _ = ready.wait_for(|ready| *ready).await;
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits until the branch has shut down (after its shutdown token was cancelled).
    pub async fn join(self) -> Result<(), BranchError> {
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(BranchError::Start(format!("branch task failed: {e}"))),
        }
    }
}

/// Starts a branch on the given listeners; it runs until `shutdown` is cancelled.
///
/// `customer` serves the original `Bank` API and `grpc.health.v1`; `peer` serves the peer-only
/// API. Health reports NOT_SERVING until the branch can answer a linearizable read.
pub async fn start(
    config: BranchConfig,
    customer: TcpListener,
    peer: TcpListener,
    shutdown: CancellationToken,
) -> Result<RunningBranch, BranchError> {
    start_with_health(config, customer, peer, None, shutdown).await
}

/// [`start`], also serving `grpc.health.v1` alone, in plaintext, on `health`: Kubernetes' gRPC
/// probes cannot speak TLS, so a branch with customer TLS needs a port they can reach.
pub async fn start_with_health(
    config: BranchConfig,
    customer: TcpListener,
    peer: TcpListener,
    health_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<RunningBranch, BranchError> {
    if !config.members.contains_key(&config.id) {
        return Err(BranchError::NotAMember {
            id: config.id,
            members: config
                .members
                .keys()
                .map(|id| id.to_string())
                .collect::<Vec<_>>()
                .join(","),
        });
    }
    let customer_addr = customer.local_addr().map_err(|source| BranchError::Listen {
        what: "customer API",
        source,
    })?;
    let peer_addr = peer.local_addr().map_err(|source| BranchError::Listen {
        what: "peer API",
        source,
    })?;

    let storage = match &config.data_dir {
        None => Storage::in_memory(config.id, config.initial_balance),
        Some(dir) => {
            let (dir, id, balance) = (dir.clone(), config.id, config.initial_balance);
            tokio::task::spawn_blocking(move || Storage::open(&dir, id, balance))
                .await
                .map_err(|e| BranchError::Start(format!("opening the data directory: {e}")))??
        }
    };
    let state = storage.state.clone();
    let mut peers = PeerChannels::new(
        config.id,
        Duration::from_secs(2),
        config.members.clone(),
        config.tls.peer.as_ref().map(|tls| tls.client.clone()),
    );
    // Learners get entries with their commit attached (one message per write instead of two)
    // only when the log lives in memory: with a data directory a learner fsyncs what it
    // appends, and holding its entries until the commit would put that fsync after the commit
    // instead of beside the voters' (see replication::piggyback). Idle learners get entries in
    // batches either way (replication::demand).
    peers = peers.with_replica(state.clone(), config.data_dir.is_none());
    let raft = Raft::new(
        config.id,
        Arc::new(raft_config(config.timing)?),
        peers.clone(),
        storage.log,
        storage.state,
    )
    .await
    .map_err(|e| BranchError::Start(e.to_string()))?;
    let branch = Branch {
        inner: Arc::new_cyclic(|inner: &std::sync::Weak<Inner>| {
            // The rounds hold a weak handle: the coalescers' tasks end with the branch.
            let round = |leader_side: bool| {
                let inner = inner.clone();
                move || -> Pin<Box<dyn Future<Output = Result<Option<u64>, String>> + Send>> {
                    let inner = inner.upgrade();
                    Box::pin(async move {
                        let branch = Branch {
                            inner: inner.ok_or("the branch is shutting down")?,
                        };
                        if leader_side {
                            branch.leader_read_index_round().await
                        } else {
                            let deadline = Instant::now() + branch.inner.request_timeout;
                            branch.read_index_round(deadline).await
                        }
                    })
                }
            };
            Inner {
                id: config.id,
                state,
                request_timeout: config.request_timeout,
                queries: std::sync::Mutex::new(RecentTable::new(IDEMPOTENCY_WINDOW)),
                read_indexes: Coalescer::new(round(false)),
                leader_read_indexes: Coalescer::new(round(true)),
                proposals: Batcher::new(BATCHES_IN_FLIGHT, MAX_WRITES_PER_BATCH, {
                    let (raft, id, timeout) = (raft.clone(), config.id, config.request_timeout);
                    move |writes| Box::pin(propose(raft.clone(), id, timeout, writes))
                }),
                forwards: Batcher::new(BATCHES_IN_FLIGHT, MAX_WRITES_PER_BATCH, {
                    let (raft, peers, id, timeout) = (raft.clone(), peers.clone(), config.id, config.request_timeout);
                    move |writes| Box::pin(forward_batch(raft.clone(), peers.clone(), id, timeout, writes))
                }),
                raft,
                peers,
            }
        }),
    };

    // TLS settings are checked before anything starts, so a bad certificate is a start error.
    let customer_builder = server_builder(config.tls.customer.as_ref(), "customer API")?;
    let peer_builder = server_builder(config.tls.peer.as_ref().map(|tls| &tls.server), "peer API")?;
    let (health, health_service) = tonic_health::server::health_reporter();
    // Liveness: the process serves gRPC. Readiness ("", "readiness", and the Bank service):
    // the branch can answer linearizably; not before it has caught up.
    health.set_service_status(LIVENESS, ServingStatus::Serving).await;
    set_readiness(config.id, &health, ServingStatus::NotServing).await;
    metrics::register_branch(&branch);

    let (ready_tx, ready_rx) = watch::channel(false);
    let task = tokio::spawn(serve(
        config,
        branch.clone(),
        Listeners {
            customer: (customer, customer_builder),
            peer: (peer, peer_builder),
            health: health_listener,
        },
        health,
        health_service,
        ready_tx,
        shutdown,
    ));
    Ok(RunningBranch {
        branch,
        customer_addr,
        peer_addr,
        ready: ready_rx,
        task,
    })
}

/// Starts a branch and runs it until `shutdown` is cancelled (the library entry point for one
/// branch process).
pub async fn run(
    config: BranchConfig,
    customer: TcpListener,
    peer: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), BranchError> {
    start(config, customer, peer, shutdown).await?.join().await
}

/// A branch's listeners, each with its server builder (TLS already applied).
struct Listeners {
    customer: (TcpListener, Server),
    peer: (TcpListener, Server),
    health: Option<TcpListener>,
}

/// A server builder, with `tls` when given; a certificate or key that does not parse fails here.
fn server_builder(tls: Option<&ServerTlsConfig>, what: &'static str) -> Result<Server, TlsError> {
    let builder = Server::builder();
    match tls {
        None => Ok(builder),
        Some(tls) => builder.tls_config(tls.clone()).map_err(|source| TlsError::Config {
            what: format!("{what} server TLS"),
            source,
        }),
    }
}

/// The customer listener's services, health beside the customer API, with the limits every
/// branch applies (`examples/grpc_ceiling` serves its no-op bank through it too, so its
/// calibration pays what a branch pays).
pub fn customer_router<B: Bank, H: Health>(builder: Server, health: HealthServer<H>, bank: B) -> Router {
    builder
        // Bounded work per connection: past the limit a request is refused at once with
        // RESOURCE_EXHAUSTED (retryable) instead of queueing without bound.
        .concurrency_limit_per_connection(MAX_CUSTOMER_REQUESTS_PER_CONNECTION)
        .load_shed(true)
        .add_service(health)
        .add_service(
            BankServer::new(bank)
                .max_decoding_message_size(MAX_CUSTOMER_MESSAGE)
                .max_encoding_message_size(MAX_CUSTOMER_MESSAGE),
        )
}

async fn serve(
    config: BranchConfig,
    branch: Branch,
    listeners: Listeners,
    health: tonic_health::server::HealthReporter,
    health_service: HealthServer<impl Health>,
    ready: watch::Sender<bool>,
    shutdown: CancellationToken,
) -> Result<(), BranchError> {
    let Listeners {
        customer: (customer, customer_builder),
        peer: (peer, mut peer_builder),
        health: health_listener,
    } = listeners;
    // Accepted sockets need nodelay explicitly: serve_with_incoming ignores the builder's
    // setting, and Nagle's algorithm adds ~40 ms to small replies.
    let customer_incoming = TcpIncoming::from(customer).with_nodelay(Some(true));
    let peer_incoming = TcpIncoming::from(peer).with_nodelay(Some(true));

    let customer_stop = CancellationToken::new();
    let peer_stop = CancellationToken::new();
    let customer_server = tokio::spawn(
        customer_router(
            customer_builder,
            health_service.clone(),
            BankService::new(branch.clone()),
        )
        .serve_with_incoming_shutdown(customer_incoming, customer_stop.clone().cancelled_owned()),
    );
    let peer_server = tokio::spawn(
        peer_builder
            .add_service(
                PeerServer::new(PeerService::new(branch.clone(), peer_stop.clone()))
                    .max_decoding_message_size(MAX_PEER_MESSAGE)
                    .max_encoding_message_size(MAX_PEER_MESSAGE),
            )
            .serve_with_incoming_shutdown(peer_incoming, peer_stop.clone().cancelled_owned()),
    );
    // The probe port lives as long as the process: liveness must answer during the drain.
    let health_stop = CancellationToken::new();
    let health_server = health_listener.map(|listener| {
        tokio::spawn(
            Server::builder()
                .add_service(health_service)
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    health_stop.clone().cancelled_owned(),
                ),
        )
    });

    let background = CancellationToken::new();
    let membership_task = tokio::spawn(manage_membership(config.clone(), branch.clone(), background.clone()));
    let readiness_task = tokio::spawn(await_readiness(
        branch.clone(),
        health.clone(),
        ready,
        background.clone(),
    ));

    // Stop when asked, or when Raft itself stopped (a storage write or sync failed: openraft
    // stops rather than go on with state it may not have persisted). A branch whose Raft is
    // dead can never serve again, so it drains and the process exits non-zero for a restart.
    let fatal = tokio::select! {
        _ = shutdown.cancelled() => None,
        fatal = raft_stopped(branch.raft()) => Some(fatal),
    };
    match &fatal {
        None => tracing::info!(
            branch = config.id,
            "shutting down: NOT_SERVING, draining customer requests"
        ),
        Some(fatal) => tracing::error!(
            branch = config.id,
            error = %fatal,
            "Raft stopped on its own: NOT_SERVING, draining, then exiting"
        ),
    }
    // Readiness goes first, while the listener still answers, so load balancers and probes
    // stop sending customers here before the drain; liveness stays SERVING until the end.
    set_readiness(config.id, &health, ServingStatus::NotServing).await;
    background.cancel();
    let _ = membership_task.await;
    let _ = readiness_task.await;
    // Drain customers first (their requests need consensus), then stop Raft, then peers.
    customer_stop.cancel();
    let customer_result = customer_server.await;
    if let Err(e) = branch.raft().shutdown().await {
        tracing::warn!(branch = config.id, error = %e, "Raft did not stop cleanly");
    }
    peer_stop.cancel();
    let peer_result = peer_server.await;
    health_stop.cancel();
    let mut results = vec![customer_result, peer_result];
    if let Some(server) = health_server {
        results.push(server.await);
    }
    for result in results {
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(BranchError::Serve(e)),
            Err(e) => return Err(BranchError::Start(format!("server task failed: {e}"))),
        }
    }
    metrics::unregister_branch(config.id);
    tracing::debug!(branch = config.id, "stopped");
    match fatal {
        None => Ok(()),
        Some(fatal) => Err(BranchError::RaftStopped(fatal)),
    }
}

/// Resolves when Raft's core has stopped (its metrics carry the fatal error), with the error.
async fn raft_stopped(raft: &Raft) -> String {
    let mut metrics = raft.metrics();
    loop {
        if let Err(fatal) = &metrics.borrow_and_update().running_state {
            return fatal.to_string();
        }
        if metrics.changed().await.is_err() {
            return "Raft's metrics channel closed".into();
        }
    }
}

/// Forms the cluster: the lowest-id voter initializes the voters; whichever voter leads adds
/// every other configured branch as a non-voting replica (learner) once the voters' own
/// membership entry has been applied (openraft refuses overlapping membership changes).
async fn manage_membership(config: BranchConfig, branch: Branch, stop: CancellationToken) {
    let raft = branch.raft().clone();
    let voters = config.voter_ids();
    let node = |id: &NodeId| BasicNode::new(config.members.get(id).cloned().unwrap_or_default());
    if voters.first() == Some(&config.id) {
        match raft.is_initialized().await {
            Ok(false) => {
                let members: BTreeMap<NodeId, BasicNode> = voters.iter().map(|id| (*id, node(id))).collect();
                if let Err(e) = raft.initialize(members).await {
                    tracing::warn!(branch = config.id, error = %e, "initialize");
                }
            }
            Ok(true) => {}
            Err(e) => tracing::warn!(branch = config.id, error = %e, "is_initialized"),
        }
    }
    if !voters.contains(&config.id) {
        return;
    }
    // Woken by changes of leader, vote or membership (server metrics), and of the applied
    // index only while a membership entry waits to be applied. The full metrics change with
    // every acknowledgement from every peer: on a 50-branch leader, ~50 times per write.
    let mut server = raft.server_metrics();
    let mut data = raft.data_metrics();
    loop {
        let (missing, settled) = {
            let m = server.borrow_and_update();
            let applied = data.borrow_and_update().last_applied.map(|id| id.index);
            let settled = m.membership_config.log_id().map(|id| id.index) <= applied;
            let missing: BTreeMap<NodeId, BasicNode> = if m.current_leader != Some(config.id) || !settled {
                BTreeMap::new()
            } else {
                let present: BTreeSet<NodeId> = m.membership_config.nodes().map(|(id, _)| *id).collect();
                config
                    .members
                    .keys()
                    .filter(|id| !present.contains(id))
                    .map(|id| (*id, node(id)))
                    .collect()
            };
            (missing, settled)
        };
        if !missing.is_empty() {
            let count = missing.len();
            match raft.change_membership(ChangeMembers::AddNodes(missing), false).await {
                Ok(_) => tracing::info!(branch = config.id, learners = count, "added non-voting replicas"),
                Err(e) => tracing::debug!(branch = config.id, error = %e, "adding replicas; will retry"),
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = server.changed() => if changed.is_err() { return },
            changed = data.changed(), if !settled => if changed.is_err() { return },
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// The health service name that reports liveness: SERVING while the process runs.
pub const LIVENESS: &str = "liveness";
/// The health service name that reports readiness (so do "" and `Bank`).
pub const READINESS: &str = "readiness";

async fn set_readiness(branch: NodeId, health: &tonic_health::server::HealthReporter, status: ServingStatus) {
    metrics::record_ready(branch, status == ServingStatus::Serving);
    health.set_service_status("", status).await;
    health.set_service_status(READINESS, status).await;
    match status {
        ServingStatus::Serving => health.set_serving::<BankServer<BankService>>().await,
        _ => health.set_not_serving::<BankServer<BankService>>().await,
    }
}

/// Readiness: SERVING once a linearizable read succeeds here (the branch knows the leader, is
/// a member, and has caught up with everything committed before the check); NOT_SERVING again
/// while it knows no leader (an election, or cut off from the quorum), until a read succeeds.
async fn await_readiness(
    branch: Branch,
    health: tonic_health::server::HealthReporter,
    ready: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let metrics = branch.raft().metrics();
    loop {
        loop {
            let attempt = branch.linearizable_read(Instant::now() + Duration::from_secs(1));
            tokio::select! {
                _ = stop.cancelled() => return,
                result = attempt => if result.is_ok() { break },
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        set_readiness(branch.id(), &health, ServingStatus::Serving).await;
        let _ = ready.send(true);
        tracing::debug!(branch = branch.id(), "SERVING");
        // Polled, not woken on every metrics change: those come with every applied entry, on
        // every branch, and would cost more than the check (probes look every few seconds).
        let mut poll = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = poll.tick() => {}
            }
            if metrics.borrow().current_leader.is_none() {
                break;
            }
        }
        set_readiness(branch.id(), &health, ServingStatus::NotServing).await;
        let _ = ready.send(false);
        tracing::info!(
            branch = branch.id(),
            "no known leader: readiness NOT_SERVING until caught up"
        );
    }
}
