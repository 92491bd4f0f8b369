//! The peer API's Raft messages from a sender that is not a well-behaved branch: undecodable
//! payloads are refused with INVALID_ARGUMENT (unary and on the AppendEntries stream) and
//! change nothing, and an AppendEntries stream left open by its sender does not hold a
//! branch's shutdown.

mod support;

use std::time::Duration;

use distbank::proto::peer::RaftPayload;
use distbank::proto::peer::peer_client::PeerClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn garbage() -> RaftPayload {
    RaftPayload { data: vec![0xff; 40] }
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
            peer.vote(garbage()).await.expect_err("vote refused"),
            peer.install_snapshot(garbage()).await.expect_err("snapshot refused"),
        ] {
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
            assert!(status.message().contains("undecodable Raft message"), "{status:?}");
        }
        // On the stream, the refusal ends the stream with the same status.
        let (requests, outgoing) = mpsc::channel(1);
        let mut replies = peer
            .append_entries_stream(ReceiverStream::new(outgoing))
            .await
            .expect("stream opens")
            .into_inner();
        requests.send(garbage()).await.expect("message sent");
        let status = replies.message().await.expect_err("stream refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("undecodable Raft message"), "{status:?}");
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
