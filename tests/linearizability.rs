//! Many concurrent customers on different branches: the recorded history of every call
//! (invocation and completion times, operation, answer) must be linearizable against the
//! sequential specification of one account, checked by a Wing-Gong/Lowe search
//! (`support/linearizability.rs`, with its own negative tests). Afterwards every replica
//! holds the same balance, equal to initial + successful deposits - successful withdrawals.
//! One run keeps moving the leadership between the voters while the clients run.

mod support;

#[path = "support/linearizability.rs"]
mod linearizability;

use std::time::Instant;

use distbank::cluster::LocalCluster;
use tokio_util::sync::CancellationToken;

use linearizability::{Call, Op, Ret, Verdict};
use rand::Rng as _;
use rand::SeedableRng as _;

const CLIENTS: usize = 16;
const OPS_PER_CLIENT: usize = 40;
const INITIAL: u64 = 100;
/// Leaderships (term, leader) the moving-leader run must see.
const LEADERSHIPS: usize = 3;

/// One client: random operations on random branches; every write carries a unique event id
/// and is retried with it on UNAVAILABLE; a fifth of the queries are anonymous.
/// After its `OPS_PER_CLIENT` operations it goes on (up to ten times as many) until `enough`.
async fn client(
    index: usize,
    branches: u64,
    clients: distbank::replay::BranchClients,
    start: Instant,
    seed: u64,
    enough: CancellationToken,
) -> Vec<Call> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed + index as u64);
    let mut history = Vec::with_capacity(OPS_PER_CLIENT);
    for n in 0..10 * OPS_PER_CLIENT {
        if n >= OPS_PER_CLIENT && enough.is_cancelled() {
            break;
        }
        let branch = rng.random_range(1..=branches);
        let mut bank = support::bank_client(&clients, branch);
        let event_id = (index * 1_000_000 + n) as u64;
        let (op, name, amount) = linearizability::random_op(&mut rng);
        let id = if op == Op::Query && rng.random_range(0..5) == 0 {
            None
        } else {
            Some(event_id)
        };
        let invoke = start.elapsed().as_nanos() as u64;
        let reply = loop {
            match support::call(&mut bank, id, name, amount as i32).await {
                Ok(reply) => break reply,
                Err(status) if status.code() == tonic::Code::Unavailable && (id.is_some() || op == Op::Query) => {
                    continue;
                }
                Err(status) => panic!("client {index}: {name} {amount} on branch {branch}: {status}"),
            }
        };
        let complete = start.elapsed().as_nanos() as u64;
        let ret = match (op, reply.status.as_str()) {
            (Op::Query, "success") => Ret::Balance(u64::try_from(reply.balance).expect("balance is never negative")),
            (_, "success") => Ret::Success,
            (_, "fail") => Ret::Fail,
            (_, other) => panic!("unexpected status {other:?}"),
        };
        history.push(Call {
            client: index,
            op,
            ret,
            invoke,
            complete: complete.max(invoke + 1),
        });
    }
    history
}

/// Hands the leadership to another voter every few hundred milliseconds until `stop`, and
/// returns how many leaderships there were; cancels `enough` once it has seen `LEADERSHIPS`.
/// Writes in flight meet a leader that steps down: entries an old leader sent (to learners,
/// with a commit attached) must never count as committed unless they are
/// (`replication::piggyback`). An election only succeeds once the leader's own lease has run
/// out (2 T after it was elected: it votes for the candidate; the followers it keeps hearing
/// from refuse), so the clients go on until the leadership has moved often enough.
async fn move_leadership(
    cluster: &LocalCluster,
    voters: u64,
    seed: u64,
    stop: CancellationToken,
    enough: CancellationToken,
) -> usize {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut leaders = std::collections::BTreeSet::new();
    while !stop.is_cancelled() {
        let pause = std::time::Duration::from_millis(rng.random_range(150..400));
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(pause) => {}
        }
        let metrics = cluster.branches()[0].branch.raft().metrics().borrow().clone();
        if let Some(leader) = metrics.current_leader {
            leaders.insert((metrics.current_term, leader));
            if leaders.len() >= LEADERSHIPS {
                enough.cancel();
            }
            let candidates: Vec<u64> = (1..=voters).filter(|id| *id != leader).collect();
            let next = candidates[rng.random_range(0..candidates.len())];
            let raft = cluster.branches()[next as usize - 1].branch.raft();
            // A refused election (log behind, or the leader still heard) changes nothing.
            let _ = raft.trigger().elect().await;
        }
    }
    leaders.len()
}

async fn concurrent_history_is_linearizable(branches: u64, voters: usize, seed: u64) {
    linearizable_run(branches, voters, seed, false).await;
}

async fn linearizable_run(branches: u64, voters: usize, seed: u64, move_leaders: bool) {
    let cluster = support::start_cluster(branches, INITIAL, voters).await;
    let clients = support::clients(&cluster);
    let start = Instant::now();
    let enough = CancellationToken::new();
    if !move_leaders {
        enough.cancel();
    }
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|i| tokio::spawn(client(i, branches, clients.clone(), start, seed, enough.clone())))
        .collect();
    let stop = CancellationToken::new();
    let elections = async {
        if move_leaders {
            move_leadership(&cluster, voters as u64, seed, stop.clone(), enough.clone()).await
        } else {
            0
        }
    };
    let clients_done = async {
        let mut history = Vec::new();
        for task in tasks {
            history.extend(task.await.expect("client task"));
        }
        stop.cancel();
        history
    };
    let (history, leaderships) = tokio::join!(clients_done, elections);
    let elapsed = start.elapsed();
    if move_leaders {
        println!("{leaderships} leaderships seen during the run");
        assert!(
            leaderships >= LEADERSHIPS,
            "the leadership moved too rarely to test anything: {leaderships}"
        );
    }

    let checked = Instant::now();
    let verdict = linearizability::check(INITIAL, &history, 20_000_000);
    println!(
        "{} calls from {CLIENTS} clients on {branches} branches ({voters} voters) in {elapsed:?}; checked in {:?}",
        history.len(),
        checked.elapsed()
    );
    match &verdict {
        Verdict::Linearizable { .. } => {}
        other => panic!("history is not linearizable: {other:?}"),
    }

    // The account rules over the whole run: replicas end at initial + deposits - withdrawals.
    let expected = INITIAL as i64 + history.iter().map(linearizability::effect).sum::<i64>();
    assert!(expected >= 0, "more withdrawn than ever held: {expected}");
    let successes = history.iter().filter(|c| c.ret == Ret::Success).count();
    let failures = history.iter().filter(|c| c.ret == Ret::Fail).count();
    assert!(
        successes > 0 && failures > 0,
        "workload should mix successful and failing withdrawals"
    );
    support::replicas_converge(&cluster, expected as u64).await;
    cluster.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_clients_on_five_branches_three_voters() {
    concurrent_history_is_linearizable(5, 3, 1).await;
}

/// Learners receive entries with their commit attached (`replication::piggyback`); here the
/// leadership keeps moving while they do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_clients_on_seven_branches_while_the_leadership_moves() {
    linearizable_run(7, 3, 3, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_clients_on_seven_branches_all_voting() {
    concurrent_history_is_linearizable(7, 7, 2).await;
}

/// The checker is not vacuous on real data: the same run with one answer falsified (a query
/// that reports one more than the balance) is rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_falsified_answer_in_a_real_history_is_caught() {
    let cluster = support::start_cluster(3, INITIAL, 3).await;
    let clients = support::clients(&cluster);
    let start = Instant::now();
    let enough = CancellationToken::new();
    enough.cancel();
    let mut history = client(0, 3, clients.clone(), start, 7, enough).await;
    // A sequential history: any query's answer is determined exactly.
    let query = history
        .iter_mut()
        .find(|c| matches!(c.ret, Ret::Balance(_)))
        .expect("the workload has a query");
    if let Ret::Balance(b) = query.ret {
        query.ret = Ret::Balance(b + 1);
    }
    let verdict = linearizability::check(INITIAL, &history, 1_000_000);
    assert!(matches!(verdict, Verdict::NotLinearizable { .. }), "{verdict:?}");
    cluster.shutdown().await.expect("clean shutdown");
}
