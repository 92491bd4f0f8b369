//! Health semantics and metrics of a real `distbank branch` process: liveness vs readiness,
//! readiness NOT_SERVING on SIGTERM while the listener still answers, and `/metrics` counters
//! that move with customer operations.

mod support;

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use distbank::proto::EVENT_ID_METADATA;
use distbank::proto::bank::TransactionRequest;
use distbank::proto::bank::bank_client::BankClient;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

const TIMEOUT: Duration = Duration::from_secs(120);

/// A branch process (killed when dropped) and the addresses it logged.
struct BranchProcess {
    child: Child,
    customer: String,
    metrics: Option<String>,
    _dir: tempfile::TempDir,
}

/// Starts `distbank branch` for branch 1 of an input with `branches` branches, on port 0
/// listeners; the other branches' peer addresses point at nothing.
async fn start_branch(branches: u64, metrics: bool) -> BranchProcess {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.json");
    let items: Vec<String> = (1..=branches)
        .map(|id| format!(r#"{{"id": {id}, "type": "branch", "balance": 100}}"#))
        .collect();
    std::fs::write(&input, format!("[{}]", items.join(","))).unwrap();
    // Port 1 on loopback refuses connections: those branches are simply down.
    let peers: Vec<String> = (1..=branches).map(|id| format!("{id}=127.0.0.1:1")).collect();
    let mut command = Command::new(env!("CARGO_BIN_EXE_distbank"));
    command
        .args(["--log-format", "json", "branch", "--id", "1"])
        .arg("--input")
        .arg(&input)
        .args(["--listen", "127.0.0.1:0", "--peer-listen", "127.0.0.1:0"])
        .args(["--peers", &peers.join(","), "--voters", &branches.to_string()])
        .env("RUST_LOG", "info")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if metrics {
        command.args(["--metrics-listen", "127.0.0.1:0"]);
    }
    let mut child = command.spawn().expect("distbank branch starts");
    // A thread reads stderr (and keeps draining it, so the process never blocks on a full pipe).
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut customer = None;
    let mut metrics_addr = None;
    while customer.is_none() || (metrics && metrics_addr.is_none()) {
        let line = lines
            .recv_timeout(TIMEOUT)
            .expect("distbank branch logs its addresses before exiting");
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let fields = &json["fields"];
        if fields["message"] == "starting branch" {
            customer = fields["listen"].as_str().map(str::to_string);
        }
        if fields["message"] == "serving metrics at /metrics" {
            metrics_addr = fields["addr"].as_str().map(str::to_string);
        }
    }
    BranchProcess {
        child,
        customer: customer.unwrap(),
        metrics: metrics_addr,
        _dir: dir,
    }
}

impl Drop for BranchProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn channel(addr: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connects")
}

async fn check(channel: &Channel, service: &str) -> ServingStatus {
    let reply = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health check answers");
    ServingStatus::try_from(reply.into_inner().status).unwrap()
}

async fn wait_for_status(channel: &Channel, service: &str, want: ServingStatus) {
    let waited = tokio::time::timeout(TIMEOUT, async {
        while check(channel, service).await != want {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "{service:?} never became {want:?}");
}

/// GET /metrics over a plain HTTP/1.1 connection; the samples by series.
async fn deposit(client: &mut BankClient<Channel>, event: u64, amount: i32) -> String {
    let mut request = tonic::Request::new(TransactionRequest {
        customer_id: 1,
        operation: "deposit".into(),
        amount,
    });
    request
        .metadata_mut()
        .insert(EVENT_ID_METADATA, event.to_string().parse().unwrap());
    client
        .msg_delivery(request)
        .await
        .expect("deposit answers")
        .into_inner()
        .status
}

#[tokio::test]
async fn liveness_serves_while_readiness_waits_for_a_quorum() {
    // Branch 1 of 3 with both other branches down: alive, but never able to answer.
    let branch = start_branch(3, false).await;
    let channel = channel(&branch.customer).await;
    wait_for_status(&channel, "liveness", ServingStatus::Serving).await;
    assert_eq!(check(&channel, "readiness").await, ServingStatus::NotServing);
    assert_eq!(check(&channel, "").await, ServingStatus::NotServing);
}

#[tokio::test]
async fn metrics_count_operations_and_readiness_drops_before_the_listener_closes() {
    let mut branch = start_branch(1, true).await;
    let metrics = branch.metrics.clone().unwrap();
    let channel = channel(&branch.customer).await;
    wait_for_status(&channel, "readiness", ServingStatus::Serving).await;
    assert_eq!(check(&channel, "liveness").await, ServingStatus::Serving);

    let deposits = r#"distbank_operations_total{branch="1",operation="deposit",result="success"}"#;
    let before = support::scrape(&metrics, TIMEOUT).await;
    assert_eq!(before.get(deposits), None, "no deposit yet: {before:#?}");
    assert_eq!(before.get(r#"distbank_raft_is_leader{branch="1"}"#), Some(&1.0));
    assert_eq!(before.get(r#"distbank_raft_leader{branch="1"}"#), Some(&1.0));
    assert_eq!(before.get(r#"distbank_ready{branch="1"}"#), Some(&1.0));

    let mut client = BankClient::new(channel.clone());
    assert_eq!(deposit(&mut client, 1, 10).await, "success");
    assert_eq!(deposit(&mut client, 2, 15).await, "success");
    let after = support::scrape(&metrics, TIMEOUT).await;
    assert_eq!(after.get(deposits), Some(&2.0), "{after:#?}");
    assert_eq!(
        after.get(r#"distbank_operation_duration_seconds_count{branch="1",operation="deposit"}"#),
        Some(&2.0)
    );
    let applied = r#"distbank_raft_last_applied_index{branch="1"}"#;
    assert!(after.get(applied) > before.get(applied), "the applied index moved");
    // Two sequential deposits on the leader: two log entries of one write each.
    let entries = r#"distbank_writes_per_batch_count{branch="1",kind="entry"}"#;
    let writes = r#"distbank_writes_per_batch_sum{branch="1",kind="entry"}"#;
    assert_eq!(after.get(entries), Some(&2.0), "{after:#?}");
    assert_eq!(after.get(writes), Some(&2.0), "{after:#?}");
    // A query: its read index comes from the leader's lease (a lone voter needs no round).
    let lease_reads = r#"distbank_read_index_total{branch="1",path="lease"}"#;
    let balance = client
        .msg_delivery(TransactionRequest {
            customer_id: 1,
            operation: "query".into(),
            amount: 0,
        })
        .await
        .expect("query answers")
        .into_inner();
    assert_eq!(balance.balance, 125);
    let read = support::scrape(&metrics, TIMEOUT).await;
    assert!(
        read.get(lease_reads).copied().unwrap_or(0.0) > after.get(lease_reads).copied().unwrap_or(0.0),
        "{read:#?}"
    );
    assert_eq!(read.get(r#"distbank_read_index_total{branch="1",path="quorum"}"#), None);

    // SIGTERM: readiness must turn NOT_SERVING on the still-open listener, then the process
    // drains and exits cleanly.
    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: "readiness".into(),
        })
        .await
        .expect("watch starts")
        .into_inner();
    let first: HealthCheckResponse = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let pid = branch.child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let next = tokio::time::timeout(TIMEOUT, watch.message())
        .await
        .expect("a status change after SIGTERM")
        .expect("the listener still answers")
        .expect("a status, not the end of the stream");
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    drop(watch);
    let exited = tokio::time::timeout(TIMEOUT, async {
        loop {
            if let Some(status) = branch.child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("exits after SIGTERM");
    assert!(exited.success(), "exit status {exited}");
}

/// A branch whose Raft core dies (openraft stops on a storage write or sync failure) cannot
/// serve again: it drains and ends with an error, so `distbank branch` exits non-zero and
/// Kubernetes restarts the pod, instead of idling NOT_SERVING forever.
#[tokio::test]
async fn a_branch_whose_raft_stops_ends_with_an_error() {
    use distbank::branch::{self, BranchConfig, BranchError};

    let customer = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = BranchConfig {
        id: 1,
        initial_balance: 100,
        members: [(1, peer.local_addr().unwrap().to_string())].into_iter().collect(),
        voters: 1,
        timing: Default::default(),
        request_timeout: Duration::from_secs(10),
        data_dir: None,
        tls: Default::default(),
        standalone: false,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = branch::start(config, customer, peer, shutdown.clone()).await.unwrap();
    tokio::time::timeout(TIMEOUT, running.ready()).await.expect("serving");
    // Stands in for a failed fsync: openraft stops its core and reports it in its metrics.
    running.branch.raft().shutdown().await.unwrap();
    let result = tokio::time::timeout(TIMEOUT, running.join())
        .await
        .expect("the branch ends by itself, without a shutdown request");
    assert!(matches!(result, Err(BranchError::RaftStopped(_))), "{result:?}");
    assert!(!shutdown.is_cancelled());
}
