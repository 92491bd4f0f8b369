//! Pre-vote: a voter cut off from the others does not depose the leader when it comes back.
//!
//! Three `distbank branch` processes talk through per-link proxies; one follower is isolated
//! until it has found, twice, that no majority would elect it (its `distbank_pre_votes_total`
//! counter: without pre-vote it would have started elections with ever higher terms) and its
//! readiness says NOT_SERVING (it still knows who leads, but cannot reach it), then the network
//! heals. The leader must still lead in the same term, and the healed follower is SERVING and
//! answers writes and reads again.

mod support;

#[path = "support/processes.rs"]
mod processes;
#[path = "support/proxy.rs"]
mod proxy;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use processes::{free_ports, wait_leader, wait_serving};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const BRANCHES: u64 = 3;
const WAIT: Duration = Duration::from_secs(60);

/// Whether the branch at `url` reports readiness SERVING.
async fn ready(url: String) -> bool {
    let Ok(channel) = tonic::transport::Endpoint::from_shared(url)
        .expect("url")
        .connect()
        .await
    else {
        return false;
    };
    let mut health = HealthClient::new(channel);
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: "readiness".into(),
    });
    request.set_timeout(Duration::from_secs(2));
    matches!(health.check(request).await, Ok(reply) if reply.get_ref().status == ServingStatus::Serving as i32)
}

/// The value of `series` (name with labels, as exposed) on the branch whose metrics listen at
/// `port`.
async fn metric(port: u16, series: String) -> f64 {
    let scraped = support::scrape(&format!("127.0.0.1:{port}"), Duration::from_secs(5)).await;
    scraped.get(&series).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_follower_rejoins_without_deposing_the_leader() {
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics_ports = free_ports(BRANCHES as usize);
    let metrics_port = |id: u64| metrics_ports[id as usize - 1];
    let (network, branches) = proxy::start_branches(dir.path(), BRANCHES, 100, |id| {
        vec![
            "--voters".into(),
            "3".into(),
            "--metrics-listen".into(),
            format!("127.0.0.1:{}", metrics_port(id)),
        ]
    })
    .await;
    wait_serving(&branches.iter().collect::<Vec<_>>(), WAIT).await;
    let direct_peers: BTreeMap<u64, String> = branches.iter().map(|b| (b.spec.id, b.peer_addr())).collect();
    let leader = wait_leader(&direct_peers, WAIT).await;
    let term = |id: u64| {
        metric(
            metrics_port(id),
            format!("distbank_raft_current_term{{branch=\"{id}\"}}"),
        )
    };
    let term_before = term(leader).await;
    assert!(term_before >= 1.0, "the leader reports term {term_before}");
    let follower = (1..=BRANCHES).find(|id| *id != leader).expect("a follower");

    network.isolate(follower);
    let isolated = Instant::now();
    let lost = format!("distbank_pre_votes_total{{branch=\"{follower}\",result=\"lost\"}}");
    support::eventually(WAIT, "two lost pre-vote rounds on the isolated follower", || {
        let lost = lost.clone();
        async move { metric(metrics_port(follower), lost).await >= 2.0 }
    })
    .await;
    let url = branches[follower as usize - 1].customer_url();
    support::eventually(WAIT, "the isolated follower's readiness NOT_SERVING", || {
        let url = url.clone();
        async move { !ready(url).await }
    })
    .await;
    let isolation = isolated.elapsed();
    network.heal();
    wait_serving(&[&branches[follower as usize - 1]], WAIT).await;

    // The healed follower serves again: a write through it, then a read on it.
    let clients = processes::clients_for(&branches);
    let mut bank = support::bank_client(&clients, follower);
    let healed = Instant::now();
    let reply = loop {
        match support::call(&mut bank, Some(7), "deposit", 5).await {
            Ok(reply) => break reply,
            Err(status) => assert!(healed.elapsed() < WAIT, "branch {follower} never answered: {status}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(reply.status, "success");
    let query = support::call(&mut bank, None, "query", 0).await.expect("query");
    assert_eq!(query.balance, 105);

    // Nobody was deposed: the same leader, in the same term, on every branch.
    assert_eq!(wait_leader(&direct_peers, WAIT).await, leader, "leadership moved");
    for id in 1..=BRANCHES {
        assert_eq!(
            term(id).await,
            term_before,
            "branch {id}'s term changed: the isolated follower's return forced an election"
        );
    }
    assert_eq!(metric(metrics_port(follower), lost.replace("lost", "won")).await, 0.0);
    println!(
        "branch {follower} isolated for {:.1} s (2 pre-vote rounds lost, NOT_SERVING), served again {:.0} ms after the heal; \
         leader {leader} kept term {term_before}",
        isolation.as_secs_f64(),
        healed.elapsed().as_secs_f64() * 1e3
    );
}
