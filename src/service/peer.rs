//! The peer-only API: Raft's messages (opaque bincode payloads) and the two branch-level
//! calls a non-leader needs from the leader, `Submit` and `ReadIndex`.

use tonic::{Request, Response, Status};

use crate::account::Command;
use crate::branch::{Branch, SubmitError};
use crate::proto;
use crate::proto::peer::peer_server::Peer;
use crate::proto::peer::{RaftPayload, ReadIndexReply, ReadIndexRequest, SubmitReply, SubmitRequest};
use crate::replication::codec;
use crate::telemetry;
use tracing::Instrument as _;

pub struct PeerService {
    branch: Branch,
}

impl PeerService {
    pub fn new(branch: Branch) -> PeerService {
        PeerService { branch }
    }
}

fn decode<T: serde::de::DeserializeOwned>(request: Request<RaftPayload>) -> Result<T, Status> {
    codec::decode(&request.into_inner().data)
        .map_err(|e| Status::invalid_argument(format!("undecodable Raft message: {e}")))
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Response<RaftPayload>, Status> {
    codec::encode(value)
        .map(|data| Response::new(RaftPayload { data }))
        .map_err(|e| Status::internal(format!("cannot encode Raft reply: {e}")))
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn append_entries(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let result = self.branch.raft().append_entries(decode(request)?).await;
        encode(&result)
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let result = self.branch.raft().vote(decode(request)?).await;
        encode(&result)
    }

    async fn install_snapshot(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let result = self.branch.raft().install_snapshot(decode(request)?).await;
        encode(&result)
    }

    async fn submit(&self, request: Request<SubmitRequest>) -> Result<Response<SubmitReply>, Status> {
        // With tracing on, the leader's work joins the trace of the branch that forwarded it.
        let span = if telemetry::enabled() {
            let span = tracing::info_span!(
                "peer.Submit",
                otel.name = "distbank.peer.v1.Peer/Submit",
                otel.kind = "server",
                branch.id = self.branch.id(),
                event.id = request.get_ref().event_id,
                trace_id = tracing::field::Empty,
            );
            telemetry::set_parent_from_metadata(&span, request.metadata());
            span
        } else {
            tracing::Span::none()
        };
        self.submit_traced(request).instrument(span).await
    }

    async fn read_index(&self, _request: Request<ReadIndexRequest>) -> Result<Response<ReadIndexReply>, Status> {
        match self.branch.local_read_index().await {
            Ok(read_index) => Ok(Response::new(ReadIndexReply { read_index })),
            Err(e) => Err(Status::failed_precondition(format!("cannot serve a read index: {e}"))),
        }
    }
}

impl PeerService {
    async fn submit_traced(&self, request: Request<SubmitRequest>) -> Result<Response<SubmitReply>, Status> {
        let request = request.into_inner();
        let operation = proto::operation_from_peer(request.operation, request.amount)
            .ok_or_else(|| Status::invalid_argument(format!("unknown operation {}", request.operation)))?;
        let command = Command::for_request(request.event_id, operation)
            .ok_or_else(|| Status::invalid_argument("an anonymous query is a read, not a log entry"))?;
        match self.branch.submit_local(command).await {
            Ok(committed) => {
                let (outcome, balance) = proto::outcome_to_peer(committed.outcome, 0);
                Ok(Response::new(SubmitReply {
                    log_index: committed.log_index,
                    outcome: outcome as i32,
                    balance,
                }))
            }
            // The sender retries with whoever leads now.
            Err(SubmitError::NotLeader) => Err(Status::failed_precondition("not the leader")),
            Err(SubmitError::Failed(e)) => Err(e.into()),
        }
    }
}
