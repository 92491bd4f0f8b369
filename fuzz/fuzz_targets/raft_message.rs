//! Raft messages as they arrive in a `RaftPayload` (what a branch decodes from a peer: the
//! requests of AppendEntries, its stream, Vote, PreVote and InstallSnapshot, and the replies
//! a leader or candidate decodes): arbitrary bytes never panic the decoder, and whatever
//! decodes encodes again to bytes that decode to the same message (one canonical form, so
//! nothing is lost in transit).
#![no_main]

use std::fmt::Debug;

use distbank::branch::{PreVoteReply, PreVoteRequest};
use distbank::replication::codec;
use distbank::replication::{NodeId, TypeConfig};
use libfuzzer_sys::fuzz_target;
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

fn round_trip<T: Serialize + DeserializeOwned + Debug>(data: &[u8]) {
    let Ok(message) = codec::decode::<T>(data) else {
        return;
    };
    let bytes = codec::encode(&message).unwrap_or_else(|e| panic!("{message:?} decoded but does not encode: {e}"));
    let again: T = codec::decode(&bytes).unwrap_or_else(|e| panic!("{message:?} re-encoded does not decode: {e}"));
    let twice = codec::encode(&again).expect("encodes");
    assert_eq!(bytes, twice, "{message:?} changed in a round trip: {again:?}");
}

fuzz_target!(|data: &[u8]| {
    round_trip::<AppendEntriesRequest<TypeConfig>>(data);
    round_trip::<VoteRequest<NodeId>>(data);
    round_trip::<PreVoteRequest>(data);
    round_trip::<PreVoteReply>(data);
    round_trip::<InstallSnapshotRequest<TypeConfig>>(data);
    round_trip::<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>>(data);
    round_trip::<Result<VoteResponse<NodeId>, RaftError<NodeId>>>(data);
    round_trip::<Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>>(data);
});
