//! Where a local cluster's branches run: on the process's per-core runtimes by default (and
//! nothing of a cluster stays there once it is stopped or dropped), on the caller's runtime
//! when asked. One test in this file: it counts the tasks on runtimes the whole process shares.

mod support;

use std::time::Duration;

use distbank::cluster::{ClusterOptions, LocalCluster, Runtimes};

async fn start(runtimes: Runtimes) -> LocalCluster {
    let options = ClusterOptions {
        runtimes,
        ..ClusterOptions::default()
    };
    support::start_cluster_with(3, 100, &options).await
}

/// A deposit through branch 2's customer API, seen by every replica.
async fn deposit(cluster: &LocalCluster, amount: i32, balance: u64) {
    let clients = support::clients(cluster);
    let mut bank = support::bank_client(&clients, 2);
    let reply = support::call(&mut bank, None, "deposit", amount)
        .await
        .expect("deposit");
    assert_eq!(reply.status, "success");
    support::replicas_converge(cluster, balance).await;
}

async fn per_core_runtimes_empty(what: &str) {
    support::eventually(Duration::from_secs(60), what, || async {
        LocalCluster::per_core_tasks() == 0
    })
    .await;
}

#[tokio::test]
async fn branches_run_where_asked_and_leave_nothing_behind() {
    let shared = start(Runtimes::Shared).await;
    assert_eq!(shared.runtimes(), 1);
    deposit(&shared, 5, 105).await;
    assert_eq!(
        LocalCluster::per_core_tasks(),
        0,
        "a shared cluster runs nothing on the per-core runtimes"
    );
    shared.shutdown().await.expect("clean shutdown");

    let per_core = start(Runtimes::PerCore).await;
    assert!(per_core.runtimes() >= 1);
    assert!(
        LocalCluster::per_core_tasks() > 0,
        "the branches' servers and Raft tasks run on the per-core runtimes"
    );
    deposit(&per_core, 7, 107).await;
    per_core.shutdown().await.expect("clean shutdown");
    per_core_runtimes_empty("every task of a stopped cluster to end").await;

    // Dropped without a shutdown (an error path): its branches stop all the same.
    let dropped = start(Runtimes::PerCore).await;
    deposit(&dropped, 1, 101).await;
    drop(dropped);
    per_core_runtimes_empty("every task of a dropped cluster to end").await;
}
