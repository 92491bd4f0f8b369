//! Helpers shared by the integration tests: fixtures, in-process clusters on port 0, raw
//! customer calls, and waiting for conditions (never fixed sleeps).
#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use distbank::cluster::{ClusterOptions, LocalCluster};
use distbank::discovery::Addresses;
use distbank::proto::EVENT_ID_METADATA;
use distbank::proto::bank::bank_client::BankClient;
use distbank::proto::bank::{TransactionRequest, TransactionResponse};
use distbank::replay::BranchClients;
use tonic::transport::Channel;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

pub fn fixture_text(name: &str) -> String {
    std::fs::read_to_string(fixture(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// Starts `branches` branches (ids 1..=n) in this process and waits until all are SERVING.
pub async fn start_cluster(branches: u64, initial_balance: u64, voters: usize) -> LocalCluster {
    let options = ClusterOptions {
        voters,
        ..ClusterOptions::default()
    };
    start_cluster_with(branches, initial_balance, &options).await
}

/// [`start_cluster`] with every option given.
#[allow(dead_code)] // Not every test binary that includes this module uses it.
pub async fn start_cluster_with(branches: u64, initial_balance: u64, options: &ClusterOptions) -> LocalCluster {
    let ids: Vec<u64> = (1..=branches).collect();
    let cluster = LocalCluster::start(&ids, initial_balance, options)
        .await
        .expect("cluster starts");
    cluster
        .wait_ready(Duration::from_secs(300))
        .await
        .expect("cluster ready");
    cluster
}

/// Customer-API clients for every branch of `cluster`.
pub fn clients(cluster: &LocalCluster) -> BranchClients {
    let addrs = cluster.customer_addrs();
    let ids: Vec<u64> = addrs.keys().copied().collect();
    let addresses = Addresses::Static(addrs.into_iter().map(|(id, a)| (id, format!("http://{a}"))).collect());
    BranchClients::new(&addresses, &ids, Duration::from_secs(2)).expect("clients")
}

pub fn bank_client(clients: &BranchClients, branch: u64) -> BankClient<Channel> {
    BankClient::new(clients.channel(branch).expect("branch exists"))
}

/// One raw `MsgDelivery` call, with the event id in metadata when given.
pub async fn call(
    client: &mut BankClient<Channel>,
    event_id: Option<u64>,
    operation: &str,
    amount: i32,
) -> Result<TransactionResponse, tonic::Status> {
    let mut request = tonic::Request::new(TransactionRequest {
        customer_id: 1,
        operation: operation.to_string(),
        amount,
    });
    if let Some(id) = event_id {
        request.metadata_mut().insert(EVENT_ID_METADATA, id.into());
    }
    client.msg_delivery(request).await.map(|r| r.into_inner())
}

/// Polls `condition` until it holds or `timeout` passes (then panics with `what`).
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until every replica of `cluster` shows `balance`.
pub async fn replicas_converge(cluster: &LocalCluster, balance: u64) {
    eventually(Duration::from_secs(120), "all replicas to converge", || async {
        cluster.local_balances().values().all(|b| *b == balance)
    })
    .await;
    let balances = cluster.local_balances();
    assert!(
        balances.values().all(|b| *b == balance),
        "replicas differ: {balances:?}"
    );
}

/// Scrapes a `/metrics` endpoint: every series (name with labels) and its value.
pub async fn scrape(addr: &str, timeout: Duration) -> std::collections::BTreeMap<String, f64> {
    use std::io::{Read as _, Write as _};
    let addr = addr.to_string();
    let response = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(&addr).expect("metrics port");
        stream.set_read_timeout(Some(timeout)).expect("read timeout");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            .expect("request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("response");
        response
    })
    .await
    .expect("scrape task");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "scrape failed: {head}");
    body.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}
