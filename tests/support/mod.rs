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

/// A branch started on its own (not inside a `LocalCluster`), so that a test can stop it
/// alone, as SIGTERM would.
pub struct Member {
    pub running: distbank::branch::RunningBranch,
    pub stop: tokio_util::sync::CancellationToken,
}

/// Starts branches 1..=`branches` in this process on port-0 listeners, each with the
/// configuration `configure` makes of a default one (3 voters, balance 100, in memory), and
/// waits until all are SERVING.
pub async fn start_members(
    branches: u64,
    configure: impl Fn(distbank::branch::BranchConfig) -> distbank::branch::BranchConfig,
) -> Vec<Member> {
    let mut listeners = Vec::new();
    for _ in 0..branches {
        let customer = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let peer = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listeners.push((customer, peer));
    }
    let members: std::collections::BTreeMap<u64, String> = (1..=branches)
        .zip(&listeners)
        .map(|(id, (_, peer))| (id, peer.local_addr().expect("addr").to_string()))
        .collect();
    let mut started = Vec::new();
    for (id, (customer, peer)) in (1..=branches).zip(listeners) {
        let config = configure(distbank::branch::BranchConfig {
            id,
            initial_balance: 100,
            members: members.clone(),
            voters: 3,
            timing: Default::default(),
            request_timeout: Duration::from_secs(10),
            data_dir: None,
            tls: Default::default(),
            standalone: false,
        });
        let stop = tokio_util::sync::CancellationToken::new();
        let running = distbank::branch::start(config, customer, peer, stop.clone())
            .await
            .expect("branch starts");
        started.push(Member { running, stop });
    }
    for member in &started {
        tokio::time::timeout(Duration::from_secs(120), member.running.ready())
            .await
            .expect("serving");
    }
    started
}

/// Where the leader is among `members`, once they agree on one.
pub async fn leader_index(members: &[Member]) -> usize {
    let leader = async {
        loop {
            if let Some(leader) = members[0].running.branch.raft().current_leader().await
                && let Some(at) = members.iter().position(|m| m.running.branch.id() == leader)
            {
                return at;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(120), leader)
        .await
        .expect("a leader")
}
