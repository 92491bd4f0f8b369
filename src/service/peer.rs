//! The peer-only API: Raft's messages (opaque bincode payloads), the pre-vote a voter asks
//! before it campaigns (`PreVote`, bincode too), a stopping leader's request that a voter take
//! over (`TimeoutNow`, bincode), and the two branch-level calls a non-leader needs from the
//! leader, `Submit` and `ReadIndex`.

use std::pin::Pin;

use futures::{Stream, StreamExt as _};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::account::Command;
use crate::branch::{Branch, Committed, SubmitError};
use crate::proto;
use crate::proto::peer::peer_server::Peer;
use crate::proto::peer::{RaftPayload, ReadIndexReply, ReadIndexRequest, SubmitReply, SubmitRequest, WriteResult};
use crate::replication::codec;
use crate::telemetry;
use tracing::Instrument as _;

pub struct PeerService {
    branch: Branch,
    /// Cancelled just before this branch's Raft stops. From then on Raft's messages are
    /// refused as UNAVAILABLE (a stopped Raft core would answer them with a fatal error that
    /// openraft also logs as one), and the long-lived AppendEntries streams end: they would
    /// otherwise hold the peer server's graceful shutdown open for as long as the leader at
    /// the other end lives.
    raft_stopping: CancellationToken,
}

impl PeerService {
    pub fn new(branch: Branch, raft_stopping: CancellationToken) -> PeerService {
        PeerService { branch, raft_stopping }
    }

    /// This branch's Raft, while it is not stopping.
    fn raft(&self) -> Result<&crate::replication::Raft, Status> {
        running(&self.raft_stopping)?;
        Ok(self.branch.raft())
    }
}

fn running(raft_stopping: &CancellationToken) -> Result<(), Status> {
    if raft_stopping.is_cancelled() {
        return Err(Status::unavailable("this branch is stopping"));
    }
    Ok(())
}

/// A Raft message from its payload (unary calls and stream messages alike).
fn decode<T: serde::de::DeserializeOwned>(payload: &RaftPayload) -> Result<T, Status> {
    codec::decode(&payload.data).map_err(|e| Status::invalid_argument(format!("undecodable Raft message: {e}")))
}

fn encode<T: serde::Serialize>(value: &T) -> Result<RaftPayload, Status> {
    codec::encode(value)
        .map(|data| RaftPayload { data })
        .map_err(|e| Status::internal(format!("cannot encode Raft reply: {e}")))
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn append_entries(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let result = self.raft()?.append_entries(decode(request.get_ref())?).await;
        encode(&result).map(Response::new)
    }

    type AppendEntriesStreamStream = Pin<Box<dyn Stream<Item = Result<RaftPayload, Status>> + Send + 'static>>;

    /// One reply per request, in order: `then` handles one message at a time, as openraft's
    /// replication to one peer sends the next request only after the reply to the last.
    async fn append_entries_stream(
        &self,
        request: Request<Streaming<RaftPayload>>,
    ) -> Result<Response<Self::AppendEntriesStreamStream>, Status> {
        let raft = self.raft()?.clone();
        let stopping = self.raft_stopping.clone();
        let replies = request
            .into_inner()
            .then(move |message| {
                let (raft, stopping) = (raft.clone(), stopping.clone());
                async move {
                    let request = decode(&message?)?;
                    running(&stopping)?;
                    encode(&raft.append_entries(request).await)
                }
            })
            .take_until(self.raft_stopping.clone().cancelled_owned());
        Ok(Response::new(Box::pin(replies)))
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let raft = self.raft()?;
        let vote: openraft::raft::VoteRequest<crate::replication::NodeId> = decode(request.get_ref())?;
        // A branch that lost its data must not vote until it has caught up (branch::election).
        if let Some(why) = self.branch.vote_withheld(vote.last_log_id.as_ref()) {
            return Err(Status::failed_precondition(why));
        }
        encode(&raft.vote(vote).await).map(Response::new)
    }

    async fn pre_vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let reply = self.branch.answer_pre_vote(&decode(request.get_ref())?).await;
        encode(&reply).map(Response::new)
    }

    async fn timeout_now(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let reply = self
            .branch
            .answer_timeout_now(&decode(request.get_ref())?)
            .await
            .map_err(Status::unavailable)?;
        encode(&reply).map(Response::new)
    }

    async fn install_snapshot(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let result = self.raft()?.install_snapshot(decode(request.get_ref())?).await;
        encode(&result).map(Response::new)
    }

    async fn submit(&self, request: Request<SubmitRequest>) -> Result<Response<SubmitReply>, Status> {
        let SubmitRequest { writes, sender } = request.into_inner();
        // Every write is checked before any is proposed: a refused request changes nothing.
        let commands = writes
            .iter()
            .enumerate()
            .map(|(i, write)| {
                proto::command_from_peer(write.event_id, write.operation, write.amount)
                    .map_err(|e| Status::invalid_argument(format!("write {i}: {e}")))
            })
            .collect::<Result<Vec<_>, Status>>()?;
        // The sender waits for the new entries: they go to it without lingering.
        let waiting = self.branch.peer_waits(sender);
        // Concurrent submissions: the leader's group commit puts them in as few entries as it can.
        let results = futures::future::join_all(
            writes
                .iter()
                .zip(commands)
                .map(|(write, command)| self.submit_one(command, &write.traceparent)),
        )
        .await;
        if let Some(waiting) = waiting {
            let last = results.iter().flatten().map(|committed| committed.log_index).max();
            waiting.until(last.unwrap_or(0));
        }
        if !results.is_empty() && results.iter().all(|r| matches!(r, Err(SubmitError::NotLeader))) {
            // The sender retries with whoever leads now.
            return Err(Status::failed_precondition("not the leader"));
        }
        let results = results
            .into_iter()
            .map(|result| match result {
                Ok(committed) => {
                    let (outcome, balance) = proto::outcome_to_peer(committed.outcome, 0);
                    WriteResult {
                        log_index: committed.log_index,
                        outcome: outcome as i32,
                        balance,
                        error: String::new(),
                    }
                }
                Err(e) => WriteResult {
                    error: e.to_string(),
                    ..Default::default()
                },
            })
            .collect();
        Ok(Response::new(SubmitReply { results }))
    }

    async fn read_index(&self, request: Request<ReadIndexRequest>) -> Result<Response<ReadIndexReply>, Status> {
        // The sender waits for everything up to the read index: as for a forwarded write.
        let sender = request.into_inner().sender;
        let waiting = self.branch.peer_waits(sender);
        let read_index = self.branch.local_read_index().await;
        if let (Some(waiting), Ok(index)) = (waiting, &read_index) {
            waiting.until(index.unwrap_or(0));
        }
        match read_index {
            Ok(read_index) => Ok(Response::new(ReadIndexReply { read_index })),
            Err(e) => Err(Status::failed_precondition(format!("cannot serve a read index: {e}"))),
        }
    }
}

impl PeerService {
    /// One forwarded write; with tracing on, the leader's work joins the customer's trace.
    async fn submit_one(&self, command: Command, traceparent: &str) -> Result<Committed, SubmitError> {
        let span = if telemetry::enabled() && !traceparent.is_empty() {
            let span = tracing::info_span!(
                "peer.Submit",
                otel.name = "distbank.peer.v1.Peer/Submit",
                otel.kind = "server",
                branch.id = self.branch.id(),
                event.id = command.event_id(),
                trace_id = tracing::field::Empty,
            );
            telemetry::set_parent_from_traceparent(&span, traceparent);
            span
        } else {
            tracing::Span::none()
        };
        self.branch.submit_local(command).instrument(span).await
    }
}
