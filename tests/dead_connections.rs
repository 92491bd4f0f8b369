//! A peer connection that goes silent without being closed (the machine at its other end
//! vanished: a node failure, a pod whose network went first) is given up within about two
//! seconds (peer keepalive, `transport::PEER_KEEPALIVE`), and the branch reconnects.
//!
//! Three `distbank branch` processes talk through per-link proxies. Every open connection to
//! and from a follower is frozen (open, carrying nothing) while new connections still go
//! through, as when a pod came back at a new address while its old connections hang. The
//! follower's customer then retries a query, each try bounded by a 1 s request timeout: it is
//! answered once the follower has given up its frozen connection to the leader. With the
//! generic 5 s keepalive that took 5-10 s.

mod support;

#[path = "support/processes.rs"]
mod processes;
#[path = "support/proxy.rs"]
mod proxy;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use processes::{wait_leader, wait_serving};

const BRANCHES: u64 = 3;
const WAIT: Duration = Duration::from_secs(60);
/// Below the 5 s a silent connection survives at the least with the generic keepalive: with
/// the peer keepalive the answer comes after about 2 s.
const ANSWERED_WITHIN: Duration = Duration::from_millis(4500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_dead_peer_connection_is_replaced_within_seconds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (network, branches) = proxy::start_branches(dir.path(), BRANCHES, 100, |_| {
        vec!["--voters".into(), "3".into(), "--request-timeout".into(), "1".into()]
    })
    .await;
    wait_serving(&branches.iter().collect::<Vec<_>>(), WAIT).await;
    let direct_peers: BTreeMap<u64, String> = branches.iter().map(|b| (b.spec.id, b.peer_addr())).collect();
    let leader = wait_leader(&direct_peers, WAIT).await;
    let follower = (1..=BRANCHES).find(|id| *id != leader).expect("a follower");
    let clients = processes::clients_for(&branches);
    let mut bank = support::bank_client(&clients, follower);
    // The follower's own connection to the leader is open and in use.
    let reply = support::call(&mut bank, Some(1), "deposit", 5).await.expect("deposit");
    assert_eq!(reply.status, "success");

    network.freeze(follower);
    let frozen = Instant::now();
    let mut tries = 0;
    let balance = loop {
        tries += 1;
        match support::call(&mut bank, None, "query", 0).await {
            Ok(reply) => break reply.balance,
            Err(status) => assert!(
                frozen.elapsed() < WAIT,
                "branch {follower} never answered after its connections froze: {status}"
            ),
        }
    };
    let answered = frozen.elapsed();
    assert_eq!(balance, 105);
    println!(
        "branch {follower}'s connections frozen: a query answered {:.0} ms later ({tries} tries)",
        answered.as_secs_f64() * 1e3
    );
    assert!(
        answered < ANSWERED_WITHIN,
        "the frozen connection held the follower for {answered:?}: it should be given up within ~2 s"
    );
}
