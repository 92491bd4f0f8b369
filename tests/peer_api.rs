//! The peer API's Raft messages from a sender that is not a well-behaved branch: undecodable
//! payloads, and a well-formed one whose string claims an exabyte, are refused with
//! INVALID_ARGUMENT (unary and on the AppendEntries stream) and change nothing, and an AppendEntries stream left open by its sender does not hold a
//! branch's shutdown.

mod support;

use std::time::Duration;

use distbank::account::Command;
use distbank::proto::peer::RaftPayload;
use distbank::proto::peer::peer_client::PeerClient;
use distbank::replication::{Proposal, Proposed, TypeConfig, codec};
use openraft::raft::AppendEntriesRequest;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn garbage() -> RaftPayload {
    RaftPayload { data: vec![0xff; 40] }
}

/// An AppendEntries whose entry's traceparent claims 2^62 bytes: decoded without a bound,
/// bincode allocates the claimed length first and the branch aborts.
fn claiming_an_exabyte() -> RaftPayload {
    let entry = Entry::<TypeConfig> {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
        payload: EntryPayload::Normal(Proposal {
            writes: vec![Proposed {
                command: Command::PropagateDeposit {
                    event_id: None,
                    amount: 1,
                },
                traceparent: Some("QQQQ".into()),
            }],
        }),
    };
    let request = AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(1, 1),
        prev_log_id: None,
        entries: vec![entry],
        leader_commit: None,
    };
    let mut data = codec::encode(&request).expect("encodes");
    let at = data
        .windows(5)
        .position(|window| window == [4, b'Q', b'Q', b'Q', b'Q'])
        .expect("the string's length prefix");
    // bincode's varint: 253, then the length as a little-endian u64.
    data.splice(at..at + 1, std::iter::once(253).chain((1u64 << 62).to_le_bytes()));
    RaftPayload { data }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_raft_messages_are_refused_and_change_nothing() {
    let cluster = support::start_cluster(3, 100, 3).await;
    for running in cluster.branches() {
        let mut peer = PeerClient::connect(format!("http://{}", running.peer_addr))
            .await
            .expect("peer API reachable");
        for status in [
            peer.append_entries(garbage()).await.expect_err("unary refused"),
            peer.append_entries(claiming_an_exabyte())
                .await
                .expect_err("exabyte refused"),
            peer.vote(garbage()).await.expect_err("vote refused"),
            peer.pre_vote(garbage()).await.expect_err("pre-vote refused"),
            peer.install_snapshot(garbage()).await.expect_err("snapshot refused"),
        ] {
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
            assert!(status.message().contains("undecodable Raft message"), "{status:?}");
        }
        // On the stream, the refusal ends the stream with the same status.
        for payload in [garbage(), claiming_an_exabyte()] {
            let (requests, outgoing) = mpsc::channel(1);
            let mut replies = peer
                .append_entries_stream(ReceiverStream::new(outgoing))
                .await
                .expect("stream opens")
                .into_inner();
            requests.send(payload).await.expect("message sent");
            let status = replies.message().await.expect_err("stream refused");
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
            assert!(status.message().contains("undecodable Raft message"), "{status:?}");
        }
    }
    // The cluster still replicates: a deposit on one branch is seen on every replica.
    let clients = support::clients(&cluster);
    let mut bank = support::bank_client(&clients, 2);
    let reply = support::call(&mut bank, None, "deposit", 5).await.expect("deposit");
    assert_eq!(reply.status, "success");
    support::replicas_converge(&cluster, 105).await;
    tokio::time::timeout(Duration::from_secs(60), cluster.shutdown())
        .await
        .expect("shutdown in time")
        .expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_append_stream_does_not_hold_shutdown() {
    let cluster = support::start_cluster(3, 100, 3).await;
    // A sender that opens a stream to every branch and then neither sends nor closes it.
    let mut held = Vec::new();
    for running in cluster.branches() {
        let mut peer = PeerClient::connect(format!("http://{}", running.peer_addr))
            .await
            .expect("peer API reachable");
        let (requests, outgoing) = mpsc::channel::<RaftPayload>(1);
        let replies = peer
            .append_entries_stream(ReceiverStream::new(outgoing))
            .await
            .expect("stream opens")
            .into_inner();
        held.push((requests, replies));
    }
    // Graceful shutdown waits for open streams; the branches end theirs when they stop.
    tokio::time::timeout(Duration::from_secs(30), cluster.shutdown())
        .await
        .expect("shutdown not held by the open streams")
        .expect("clean shutdown");
    for (_requests, mut replies) in held {
        // Ended by the branch: a clean end of stream (or the connection closing under it).
        if let Ok(next) = replies.message().await {
            assert!(next.is_none(), "no reply was asked for: {next:?}");
        }
    }
}
