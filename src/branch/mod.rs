//! One branch: a Raft member holding a replica of the account, and the operations its
//! customers see, built here from openraft's primitives:
//! - a write (deposit, withdraw, or a query that carries an event id) is appended through the
//!   leader, forwarded there over the peer service when this branch is not the leader, and
//!   answered only once **this** branch's replica has applied it;
//! - a query is a linearizable read on this branch: the leader confirms its leadership and
//!   names a read index (ReadIndex, one round to the voters), this replica waits until it has
//!   applied that index, then reads locally. A query's answer is recorded under its event id
//!   on the branch that gave it, so a retried or re-run query gets the same answer.
//!
//! Around them, in private modules: `server` runs a branch (its two gRPC listeners, start-up, shutdown),
//! `membership` forms the cluster (voters, then every other branch as a non-voting replica),
//! `election` decides when a voter campaigns (pre-vote) and when one that lost its data may
//! vote again, `handoff` moves the leadership away from a leader that stops (TimeoutNow),
//! `query_records` puts query answers in the replicated log so restarts do not forget them,
//! `readiness` is what its health service reports.

mod election;
pub use election::{PreVoteReply, PreVoteRequest};
mod handoff;
pub use handoff::{HandOff, TimeoutNowReply, TimeoutNowRequest};
mod membership;
mod query_records;
mod readiness;
mod server;

pub use readiness::{LIVENESS, READINESS};
pub use server::{RunningBranch, customer_router, run, start, start_with_health};

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::account::{Command, IDEMPOTENCY_WINDOW, Operation, Outcome, RecentTable};
use crate::batch::Batcher;
use crate::coalesce::Coalescer;
use crate::proto;
use crate::replication::demand::Waiting;
use crate::replication::disk::StoreError;
use crate::replication::network::PeerChannels;
use crate::replication::store::{LogStore, StateMachine};
use crate::replication::{NodeId, Proposal, Proposed, Raft, RaftTiming, codec};
use crate::transport::{CertDir, TlsError};
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
    /// The branch is a process of its own (`distbank branch`), stopped and restarted apart
    /// from the others: when it stops while leading it hands the leadership over first
    /// (`handoff`), and the answers it gives to queries with event ids are recorded in the
    /// replicated log, so that a restart does not forget them (`query_records`). Off where all
    /// branches live and end in one process (`distbank run`, `server`, `bench`): nothing
    /// outlives that process, and neither would be worth its cost there.
    pub standalone: bool,
}

/// Optional TLS on a branch's listeners and peer connections.
#[derive(Debug, Clone, Default)]
pub struct BranchTls {
    /// Mutual TLS on the peer API and on this branch's calls to peers.
    pub peer: Option<Arc<CertDir>>,
    /// Server TLS on the customer API (health included; see [`start_with_health`]).
    pub customer: Option<Arc<CertDir>>,
    /// How often the directories are re-read for renewed certificates (zero: never;
    /// `distbank branch` uses [`crate::transport::RELOAD_INTERVAL`]).
    pub reload_every: Duration,
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
    /// The log, for its last entry's id (pre-votes compare logs: [`election`]).
    log: LogStore,
    timing: RaftTiming,
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
    /// Proposals stopped by a hand-off; the campaign a stopping leader asked for.
    hand_off: Arc<handoff::HandOffState>,
    /// Query answers on their way into the replicated log (standalone branches).
    query_records: query_records::QueryRecords,
    /// Started with an empty data directory and not caught up yet: votes only in the
    /// cluster's formation ([`election`]'s "A voter that lost its data").
    withholding_votes: std::sync::atomic::AtomicBool,
}

/// One try at the leader, in [`Branch::with_leader`].
enum Try<T> {
    /// An answer, or a failure that trying again cannot fix.
    Done(T),
    /// Not this time (leadership moved, the leader did not answer): why.
    Again(String),
}

/// The leader's answer to a forwarded write.
#[derive(Debug, Clone, Copy)]
pub struct Committed {
    pub log_index: u64,
    pub outcome: Outcome,
}

impl Branch {
    /// Wires a branch's operations to its Raft instance, replica and peer connections.
    fn new(config: &BranchConfig, raft: Raft, state: StateMachine, log: LogStore, peers: PeerChannels) -> Branch {
        let hand_off = Arc::new(handoff::HandOffState::new());
        let started_empty = config.data_dir.is_some() && log.last_log_id().is_none();
        Branch {
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
                    log,
                    timing: config.timing,
                    request_timeout: config.request_timeout,
                    queries: std::sync::Mutex::new(RecentTable::new(IDEMPOTENCY_WINDOW)),
                    read_indexes: Coalescer::new(round(false)),
                    leader_read_indexes: Coalescer::new(round(true)),
                    proposals: Batcher::new(BATCHES_IN_FLIGHT, MAX_WRITES_PER_BATCH, {
                        let (raft, id, timeout, hand_off) =
                            (raft.clone(), config.id, config.request_timeout, hand_off.clone());
                        move |writes| Box::pin(propose(raft.clone(), id, timeout, hand_off.clone(), writes))
                    }),
                    forwards: Batcher::new(BATCHES_IN_FLIGHT, MAX_WRITES_PER_BATCH, {
                        let (raft, peers, id, timeout) =
                            (raft.clone(), peers.clone(), config.id, config.request_timeout);
                        move |writes| Box::pin(forward_batch(raft.clone(), peers.clone(), id, timeout, writes))
                    }),
                    raft,
                    peers,
                    hand_off,
                    query_records: query_records::QueryRecords::new(config.standalone),
                    withholding_votes: std::sync::atomic::AtomicBool::new(started_empty),
                }
            }),
        }
    }

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
        // The answer is the leader's: the entry is committed and its result decided. This
        // replica need not have applied it yet; a later query here first waits for the
        // leader's commit index, which covers this write (docs/design.md, step 4).
        Ok(match committed.outcome {
            Outcome::EventIdReused { .. } => {
                // The peer API's reply does not carry the recorded operation: read it here.
                self.wait_applied(committed.log_index, deadline).await?;
                Outcome::EventIdReused {
                    recorded: event_id
                        .and_then(|id| self.inner.state.recorded_operation(id))
                        .unwrap_or(operation),
                }
            }
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
        // began, so a write recorded under the same id is seen here, and so is an answer to
        // this query recorded earlier (by this branch before a restart, or by another one).
        let recorded = self.inner.state.recorded_query(id);
        if recorded.is_none()
            && let Some(operation) = self.inner.state.recorded_operation(id)
        {
            return Ok(Outcome::EventIdReused { recorded: operation });
        }
        let Outcome::Balance(read) = outcome else {
            return Ok(outcome);
        };
        let mut queries = self.inner.queries.lock().unwrap_or_else(|p| p.into_inner());
        let first = queries.get(id).is_none() && recorded.is_none();
        let balance = *queries.get_or_insert(id, recorded.unwrap_or(read));
        drop(queries);
        if first {
            self.inner.query_records.add(id, balance);
        }
        Ok(Outcome::Balance(balance))
    }

    fn recorded_query(&self, event_id: u64) -> Option<u64> {
        let queries = self.inner.queries.lock().unwrap_or_else(|p| p.into_inner());
        queries.get(event_id).copied()
    }

    /// Appends `command` through the current leader, retrying across leader changes until
    /// `deadline`.
    async fn submit(&self, command: Command, deadline: Instant) -> Result<Committed, BranchError> {
        let allowed = deadline.saturating_duration_since(Instant::now());
        let on_self = move || async move {
            match tokio::time::timeout_at(deadline, self.submit_local(command)).await {
                Ok(Ok(committed)) => Try::Done(Ok(committed)),
                Ok(Err(SubmitError::NotLeader)) => Try::Again("leadership moved".into()),
                Ok(Err(e)) => Try::Done(Err(e.into())),
                Err(_) => Try::Again("this branch, the leader, did not commit it in time".into()),
            }
        };
        let on_leader = move |leader| async move {
            match self.forward(leader, command, deadline).await {
                Ok(committed) => Try::Done(Ok(committed)),
                Err(e) => Try::Again(e),
            }
        };
        match self.with_leader(deadline, on_self, on_leader).await {
            Ok(result) => result,
            Err(last_error) => Err(BranchError::Unavailable(format!(
                "no commit within {allowed:.1?}: {last_error}"
            ))),
        }
    }

    /// Runs `on_self` when this branch leads, `on_leader(leader)` when another branch does, and
    /// again after each leader change (or 20 ms) until one is done or `deadline` passes; then
    /// the last reason it was not.
    async fn with_leader<T, S, SF, L, LF>(&self, deadline: Instant, on_self: S, on_leader: L) -> Result<T, String>
    where
        S: Fn() -> SF,
        SF: Future<Output = Try<T>>,
        L: Fn(NodeId) -> LF,
        LF: Future<Output = Try<T>>,
    {
        let mut metrics = self.inner.raft.metrics();
        let mut last_error = "no leader elected yet".to_string();
        loop {
            let leader = metrics.borrow().current_leader;
            let attempt = match leader {
                Some(leader) if leader == self.inner.id => Some(on_self().await),
                Some(leader) => Some(on_leader(leader).await),
                None => None,
            };
            match attempt {
                Some(Try::Done(answer)) => return Ok(answer),
                Some(Try::Again(why)) => last_error = why,
                None => {}
            }
            if Instant::now() >= deadline {
                return Err(last_error);
            }
            // Wait for news (a leader change) or a short backoff, whichever comes first.
            let backoff = Instant::now() + Duration::from_millis(20);
            let _ = tokio::time::timeout_at(backoff.min(deadline), metrics.changed()).await;
        }
    }

    /// Appends `command` on this branch, which must be the leader (the peer service's
    /// `Submit` lands here; it never forwards again, so requests cannot loop). Concurrent
    /// writes share log entries (group commit, [`crate::batch`]).
    pub(crate) async fn submit_local(&self, command: Command) -> Result<Committed, SubmitError> {
        // Only inside a request's trace: a write nobody traced (a query record, a forwarded
        // write without a traceparent) would otherwise start a trace of its own.
        let (span, traceparent) = if telemetry::enabled() && !tracing::Span::current().is_none() {
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
        let on_self = move || async move {
            match tokio::time::timeout_at(deadline, self.local_read_index()).await {
                Ok(Ok(index)) => Try::Done(index),
                Ok(Err(e)) => Try::Again(e),
                Err(_) => Try::Again("this branch, the leader, gave no read index in time".into()),
            }
        };
        let on_leader = move |leader| async move {
            match self.forward_read_index(leader, deadline).await {
                Ok(index) => Try::Done(index),
                Err(e) => Try::Again(e),
            }
        };
        self.with_leader(deadline, on_self, on_leader).await
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
        if let Some(index) = self.lease_read_index().await {
            crate::metrics::record_read_index(self.inner.id, "lease");
            return Ok(index);
        }
        crate::metrics::record_read_index(self.inner.id, "quorum");
        match self.inner.raft.get_read_log_id().await {
            Ok((read_log_id, _applied)) => Ok(read_log_id.map(|id| id.index)),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The read index without a quorum round, while this branch leads on a valid lease
    /// ([`crate::replication::lease`]) and has committed an entry of its own term (before
    /// that, its commit index may not yet cover what earlier leaders committed). `None`:
    /// take the round.
    async fn lease_read_index(&self) -> Option<Option<u64>> {
        // With leases off (`--read-mode quorum`), not even the trip to openraft's core.
        if !self.inner.peers.lease().grants() {
            return None;
        }
        let me = self.inner.id;
        // Leadership and commit index first, the lease after: a lease still valid after the
        // snapshot was taken means no other leader can have committed anything before it.
        let (vote, committed, voters) = self
            .inner
            .raft
            .with_raft_state(|state| {
                let membership = &state.membership_state;
                let effective = membership.effective().get_joint_config();
                // One voter set, the same in the committed configuration: no change under way.
                let voters: Option<BTreeSet<NodeId>> = match effective.as_slice() {
                    [voters] if membership.committed().get_joint_config() == effective => {
                        Some(voters.iter().copied().collect())
                    }
                    _ => None,
                };
                (*state.vote_ref(), state.committed, voters)
            })
            .await
            .ok()?;
        // Checked after the snapshot: a hand-off begun after it asks a voter to campaign out of
        // turn (without waiting out any lease) only later.
        if self.inner.hand_off.handing_off() {
            return None;
        }
        let committed = committed?;
        let leads = vote.is_committed() && vote.leader_id().voted_for() == Some(me);
        if !leads || committed.leader_id != *vote.leader_id() {
            return None;
        }
        let expiry = self.inner.peers.lease().expiry(&vote, &voters?, me)?;
        (Instant::now() < expiry).then_some(Some(committed.index))
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
    /// learner, it gets new entries at once rather than in batches, until it has what the
    /// request is answered with ([`Waiting::until`]). `None`: a peer that did not say who it
    /// is (an older release); every learner counts. Voters are never held back anyway.
    pub(crate) fn peer_waits(&self, sender: Option<NodeId>) -> Option<Waiting> {
        match sender {
            Some(id) if !self.inner.state.is_learner(id) => None,
            sender => Some(self.inner.peers.demand().want(sender)),
        }
    }

    /// While this branch leads: every learner gets the entries it lacks at once, as if a
    /// customer waited on each (for a caller that needs every replica current soon).
    pub fn flush_learners(&self) {
        self.inner.peers.demand().want(None).until(0);
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
/// by `timeout`: the next batch waits for this one, so it must not wait forever. A leader
/// handing off proposes nothing more: its writers go to the next leader.
async fn propose(
    raft: Raft,
    branch: NodeId,
    timeout: Duration,
    hand_off: Arc<handoff::HandOffState>,
    writes: Vec<Proposed>,
) -> Vec<Result<Committed, SubmitError>> {
    let count = writes.len();
    metrics::record_batch(branch, "entry", count);
    let write = tokio::time::timeout(timeout, raft.client_write(Proposal { writes }));
    let Some(result) = hand_off.propose(write).await else {
        return vec![Err(SubmitError::NotLeader); count];
    };
    let Ok(result) = result else {
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
                let (event_id, operation, amount) = proto::command_to_peer(&write.command);
                proto::peer::Write {
                    event_id,
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

/// One peer call whose request and reply travel bincode-encoded in a `RaftPayload` (the
/// pre-vote, the hand-off's `TimeoutNow`): encoding, deadline and decoding in one place. Local
/// failures come back as `Status`es too, so a caller can still tell an older peer's
/// `Unimplemented` apart from them.
async fn payload_call<Req, Rep, F, Fut>(
    branch: &Branch,
    target: NodeId,
    request: &Req,
    timeout: Duration,
    send: F,
) -> Result<Rep, tonic::Status>
where
    Req: serde::Serialize,
    Rep: serde::de::DeserializeOwned,
    F: FnOnce(PeerClient, tonic::Request<proto::peer::RaftPayload>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<proto::peer::RaftPayload>, tonic::Status>>,
{
    let client = peer_client(&branch.inner.raft, &branch.inner.peers, target).map_err(tonic::Status::unavailable)?;
    let data = codec::encode(request).map_err(|e| tonic::Status::internal(e.to_string()))?;
    let request = tonic::Request::new(proto::peer::RaftPayload { data });
    let reply = transport::call(timeout, request, |r| send(client, r)).await?;
    codec::decode(&reply.into_inner().data)
        .map_err(|e| tonic::Status::internal(format!("undecodable reply from branch {target}: {e}")))
}

type PeerClient = proto::peer::peer_client::PeerClient<tonic::transport::Channel>;

/// A peer-API client for `target`, at the address the current membership gives it.
fn peer_client(raft: &Raft, peers: &PeerChannels, target: NodeId) -> Result<PeerClient, String> {
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
