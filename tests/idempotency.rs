//! Event ids are idempotency keys: a repeated id is applied at most once and answered with
//! the recorded result, so retries and re-runs of a whole replay change nothing.

mod support;

use std::time::Duration;

use distbank::replay::{self, ReplayOptions};
use distbank::{input, output};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_the_same_replay_twice_gives_the_same_output_and_balance() {
    let input = input::load(&support::fixture("spec_3_input.json")).expect("fixture");
    let cluster = support::start_cluster(3, 400, 3).await;
    let clients = support::clients(&cluster);
    replay::wait_until_serving(&clients, Duration::from_secs(30))
        .await
        .expect("serving");
    let first = output::render(
        &replay::replay(&input, &clients, &ReplayOptions::default())
            .await
            .expect("first"),
    );
    support::replicas_converge(&cluster, 500).await;
    let second = output::render(
        &replay::replay(&input, &clients, &ReplayOptions::default())
            .await
            .expect("second"),
    );
    assert_eq!(first, second);
    assert!(first.contains(r#""balance": 570"#), "{first}");
    support::replicas_converge(&cluster, 500).await;
    cluster.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_event_is_applied_once_even_through_another_branch() {
    let cluster = support::start_cluster(4, 100, 3).await;
    let clients = support::clients(&cluster);
    let mut b2 = support::bank_client(&clients, 2);
    let mut b4 = support::bank_client(&clients, 4);
    assert_eq!(
        support::call(&mut b2, Some(7), "withdraw", 60)
            .await
            .expect("first")
            .status,
        "success"
    );
    // The same event again (a retry after a lost answer), even via another branch.
    assert_eq!(
        support::call(&mut b4, Some(7), "withdraw", 60)
            .await
            .expect("retry")
            .status,
        "success"
    );
    support::replicas_converge(&cluster, 40).await;
    // A failed withdrawal stays failed on retry, although it would now succeed.
    assert_eq!(
        support::call(&mut b2, Some(8), "withdraw", 50)
            .await
            .expect("answer")
            .status,
        "fail"
    );
    assert_eq!(
        support::call(&mut b2, Some(9), "deposit", 100)
            .await
            .expect("answer")
            .status,
        "success"
    );
    assert_eq!(
        support::call(&mut b2, Some(8), "withdraw", 50)
            .await
            .expect("retry")
            .status,
        "fail"
    );
    support::replicas_converge(&cluster, 140).await;
    // A retried query answers what it saw the first time.
    let first = support::call(&mut b4, Some(10), "query", 0).await.expect("query");
    assert_eq!(
        support::call(&mut b4, Some(11), "deposit", 1)
            .await
            .expect("deposit")
            .status,
        "success"
    );
    let again = support::call(&mut b4, Some(10), "query", 0).await.expect("query again");
    assert_eq!((first.balance, again.balance), (140, 140));
    cluster.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_are_applied_once() {
    let cluster = support::start_cluster(3, 0, 3).await;
    let clients = support::clients(&cluster);
    let sends = (0..12).map(|i| {
        let mut bank = support::bank_client(&clients, 1 + i % 3);
        async move { support::call(&mut bank, Some(42), "deposit", 5).await }
    });
    for reply in futures::future::join_all(sends).await {
        assert_eq!(reply.expect("answer").status, "success");
    }
    support::replicas_converge(&cluster, 5).await;
    cluster.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_id_reused_for_a_different_operation_is_refused() {
    let cluster = support::start_cluster(3, 100, 3).await;
    let clients = support::clients(&cluster);
    let mut bank = support::bank_client(&clients, 3);
    assert_eq!(
        support::call(&mut bank, Some(5), "deposit", 10)
            .await
            .expect("deposit")
            .status,
        "success"
    );
    for (op, amount) in [("withdraw", 10), ("deposit", 11), ("query", 0)] {
        let status = support::call(&mut bank, Some(5), op, amount)
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::AlreadyExists, "{op}: {status}");
        assert!(status.message().contains("deposit 10"), "{status}");
    }
    assert_eq!(
        support::call(&mut bank, Some(6), "query", 0)
            .await
            .expect("query")
            .balance,
        110
    );
    let status = support::call(&mut bank, Some(6), "withdraw", 1)
        .await
        .expect_err("query id reused");
    assert_eq!(status.code(), Code::AlreadyExists, "{status}");
    support::replicas_converge(&cluster, 110).await;
    cluster.shutdown().await.expect("clean shutdown");
}
