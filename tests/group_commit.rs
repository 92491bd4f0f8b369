//! Group commit: concurrent writes share log entries and forwarded `Submit` calls, each write
//! still gets its own answer, and a forwarded batch with one bad write is refused whole.

mod support;

use std::time::Duration;

use distbank::proto::peer::peer_client::PeerClient;
use distbank::proto::peer::{Operation as PeerOperation, SubmitRequest, Write};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_log_entries_and_each_gets_its_own_answer() {
    let cluster = support::start_cluster(5, 100, 3).await;
    let clients = support::clients(&cluster);
    let branch = &cluster.branches()[0].branch;
    let before = branch.last_applied_index().unwrap_or(0);

    // 64 writes at once through all five branches: deposits of 1..=32 and withdrawals of 1000
    // (more than the account ever holds, so each must fail on its own, not the batch).
    let sends = (0..64u64).map(|i| {
        let mut bank = support::bank_client(&clients, 1 + i % 5);
        async move {
            let reply = if i % 2 == 0 {
                support::call(&mut bank, Some(1000 + i), "deposit", (i / 2 + 1) as i32).await
            } else {
                support::call(&mut bank, Some(1000 + i), "withdraw", 100_000).await
            };
            (i, reply)
        }
    });
    for (i, reply) in futures::future::join_all(sends).await {
        let status = reply.unwrap_or_else(|e| panic!("write {i}: {e}")).status;
        let expected = if i % 2 == 0 { "success" } else { "fail" };
        assert_eq!(status, expected, "write {i}");
    }
    let deposited: u64 = (1..=32).sum();
    support::replicas_converge(&cluster, 100 + deposited).await;

    let entries = branch.last_applied_index().unwrap_or(0) - before;
    assert!(
        entries < 64,
        "64 concurrent writes took {entries} log entries: none were batched"
    );
    cluster.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_batch_with_one_bad_write_is_refused_whole() {
    let cluster = support::start_cluster(3, 100, 3).await;
    let write = |operation: PeerOperation, amount| Write {
        event_id: None,
        operation: operation as i32,
        amount,
        traceparent: String::new(),
    };
    for running in cluster.branches() {
        let mut peer = PeerClient::connect(format!("http://{}", running.peer_addr))
            .await
            .expect("peer API reachable");
        let request = SubmitRequest {
            writes: vec![
                write(PeerOperation::Deposit, 50),
                write(PeerOperation::Query, 0),
                write(PeerOperation::Unspecified, 7),
            ],
            sender: None,
        };
        let status = peer.submit(request).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("write 1"), "names the bad write: {status:?}");
    }
    // Nothing was proposed: a read through the customer API still sees the initial balance.
    let clients = support::clients(&cluster);
    let mut bank = support::bank_client(&clients, 1);
    let reply = support::call(&mut bank, None, "query", 0).await.expect("query");
    assert_eq!(reply.balance, 100);
    tokio::time::timeout(Duration::from_secs(60), cluster.shutdown())
        .await
        .expect("shutdown in time")
        .expect("clean shutdown");
}
