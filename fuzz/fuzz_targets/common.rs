//! What the gRPC fuzz targets share: one real branch, started once per fuzzing process.

use std::time::Duration;

use distbank::cluster::{ClusterOptions, LocalCluster};

/// A runtime and a single-branch cluster (branch 1, its own leader) with `initial_balance`,
/// SERVING.
pub fn single_branch(initial_balance: u64) -> (tokio::runtime::Runtime, LocalCluster) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let cluster = runtime.block_on(async {
        let options = ClusterOptions {
            voters: 1,
            ..Default::default()
        };
        let cluster = LocalCluster::start(&[1], initial_balance, &options)
            .await
            .expect("cluster starts");
        cluster.wait_ready(Duration::from_secs(60)).await.expect("ready");
        cluster
    });
    (runtime, cluster)
}
